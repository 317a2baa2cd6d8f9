#!/usr/bin/env bash
# A local wiremesh tailnet in one command (run as root):
#
#   scripts/tailnet-demo.sh          build, bring up, show status and pings, tear down
#   scripts/tailnet-demo.sh --keep   the same, but leave it running and say how to reach it
#   scripts/tailnet-demo.sh --down   tear down a tailnet left running by --keep
#
# What it brings up: a coordination server (`wiremeshd control`, SQLite state
# in a temporary directory) and three node agents (`wiremeshd node`: alpha,
# beta, gamma), each in its own network namespace, all joined by a bridge in
# a hub namespace on 192.0.2.0/24 (TEST-NET-1, never routed). Everything it
# creates is named wmdemo-*: namespaces wmdemo-{hub,control,alpha,beta,gamma},
# TUN devices wmdemo-{alpha,beta,gamma}, sockets
# /var/run/{wiremesh,wireguard}/wmdemo-*.sock, and the directory $WMDEMO_DIR
# (default /run/wmdemo: state, logs, admin token). Nothing in the host's own
# network namespace is touched.
#
# Environment: CARGO_TARGET_DIR is honoured (through `cargo metadata`);
# WMDEMO_NO_BUILD=1 skips `cargo build` and uses binaries already built.
set -euo pipefail

PREFIX=wmdemo
NODES=(alpha beta gamma)
NAMESPACES=("$PREFIX-hub" "$PREFIX-control" "$PREFIX-alpha" "$PREFIX-beta" "$PREFIX-gamma")
DIR=${WMDEMO_DIR:-/run/$PREFIX}
SUBNET=192.0.2
CONTROL_IP=$SUBNET.1
CONTROL_PORT=8443
WAIT_CONTROL=20 # seconds for the server to listen
WAIT_MAPS=30    # seconds for every node to register and get a map naming the two others
CMD_TIMEOUT=20  # bound on any one CLI command

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$0"
KEEP_UP=0   # set when --keep succeeded: the EXIT trap then leaves everything running
STARTED=0   # set once we start creating things: only then does the trap tear down

say() { printf '==> %s\n' "$*"; }
warn() { printf 'tailnet-demo: %s\n' "$*" >&2; }

# Prints the end of every log we have, then exits non-zero (the EXIT trap tears down).
die() {
    warn "FAILED: $*"
    if [ -d "$DIR" ]; then
        local log
        for log in "$DIR"/*.log; do
            [ -f "$log" ] || continue
            printf '\n--- last lines of %s ---\n' "$log" >&2
            tail -n 15 "$log" >&2 || true
        done
    fi
    exit 1
}

usage() {
    sed -n '2,19p' "$SELF" | sed 's/^# \{0,1\}//'
}

in_ns() { # NAME CMD...: run CMD in namespace wmdemo-NAME
    local ns="$PREFIX-$1"
    shift
    ip netns exec "$ns" "$@"
}

# Runs the CLI in a node's namespace against that node's agent, bounded.
cli() { # NODE ARGS...
    local node=$1
    shift
    in_ns "$node" timeout --foreground -k 2 "$CMD_TIMEOUT" "$WIREMESH" --tun "$PREFIX-$node" "$@"
}

ns_exists() { [ -e "/var/run/netns/$1" ]; }

# ---------------------------------------------------------------------------
# Teardown: by namespace, so it also works for --down from another shell.
# ---------------------------------------------------------------------------

ns_pids() { # every process in our namespaces
    local ns
    for ns in "${NAMESPACES[@]}"; do
        if ns_exists "$ns"; then ip netns pids "$ns" 2>/dev/null || true; fi
    done
}

teardown() {
    local pids pid i
    # SIGTERM first: node agents remove their sockets and TUN devices.
    pids=$(ns_pids)
    if [ -n "$pids" ]; then
        for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
        for ((i = 0; i < 50; i++)); do
            [ -z "$(ns_pids)" ] && break
            sleep 0.1
        done
        for pid in $(ns_pids); do kill -KILL "$pid" 2>/dev/null || true; done
    fi
    for ns in "${NAMESPACES[@]}"; do
        if ns_exists "$ns"; then
            ip netns del "$ns" 2>/dev/null || warn "could not delete namespace $ns"
        fi
    done
    for node in "${NODES[@]}"; do
        rm -f "/var/run/wiremesh/$PREFIX-$node.sock" "/var/run/wireguard/$PREFIX-$node.sock"
    done
    # Socket directories we created (recorded at start), if nothing else uses them.
    if [ -f "$DIR/created-dirs" ]; then
        while read -r d; do rmdir "$d" 2>/dev/null || true; done <"$DIR/created-dirs"
    fi
    rm -rf "$DIR"
}

leftovers() {
    local ns
    for ns in "${NAMESPACES[@]}"; do ns_exists "$ns" && echo "namespace $ns"; done
    [ -e "$DIR" ] && echo "directory $DIR"
    return 0
}

on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "$STARTED" = 1 ] && [ "$KEEP_UP" = 0 ]; then
        say "tearing down"
        teardown
        if [ -n "$(leftovers)" ]; then
            warn "teardown left: $(leftovers | tr '\n' ' ')"
            [ "$rc" = 0 ] && rc=1
        else
            say "torn down: processes stopped, namespaces deleted, $DIR removed"
        fi
    fi
    exit "$rc"
}

# ---------------------------------------------------------------------------
# Arguments and prerequisites
# ---------------------------------------------------------------------------

MODE=run
case "${1:-}" in
"") ;;
--keep) MODE=keep ;;
--down) MODE=down ;;
-h | --help)
    usage
    exit 0
    ;;
*)
    warn "unknown argument: $1"
    usage >&2
    exit 2
    ;;
esac
[ $# -le 1 ] || {
    usage >&2
    exit 2
}

[ "$(id -u)" = 0 ] || {
    warn "must run as root (it creates network namespaces and TUN devices): sudo $SELF ${1:-}"
    exit 1
}

if [ "$MODE" = down ]; then
    if [ -z "$(leftovers)" ]; then
        say "nothing to tear down (no $PREFIX-* namespaces, no $DIR)"
        exit 0
    fi
    say "tearing down the demo tailnet"
    teardown
    if [ -n "$(leftovers)" ]; then
        warn "could not remove: $(leftovers | tr '\n' ' ')"
        exit 1
    fi
    say "done: processes stopped, namespaces deleted, $DIR removed"
    exit 0
fi

# Debian packages the demo needs: ip(8), ping(8), and a C compiler for the build (ring, SQLite).
missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v ping >/dev/null 2>&1 || missing+=(iputils-ping)
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || {
        warn "missing ${missing[*]} and no apt-get to install them; install them and run again"
        exit 1
    }
    say "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get update -q >/dev/null || {
        warn "apt-get update failed"
        exit 1
    }
    timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null || {
        warn "apt-get install ${missing[*]} failed"
        exit 1
    }
fi
if [ ! -c /dev/net/tun ]; then
    modprobe tun 2>/dev/null || true
    [ -c /dev/net/tun ] || {
        warn "/dev/net/tun is missing (no TUN support here; in a container, pass --device /dev/net/tun)"
        exit 1
    }
fi

if [ -n "$(leftovers)" ]; then
    warn "a demo tailnet is already up (or was left behind): $(leftovers | tr '\n' ' ')"
    warn "tear it down first: $SELF --down"
    exit 1
fi

# ---------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------

cd "$REPO"
command -v cargo >/dev/null 2>&1 || {
    warn "cargo not found in PATH (with sudo, the user's ~/.cargo/bin is not on root's PATH;"
    warn "install Rust for root with rustup, or run: sudo env \"PATH=\$PATH\" $SELF)"
    exit 1
}
if [ "${WMDEMO_NO_BUILD:-0}" != 1 ]; then
    say "building wiremeshd and wiremesh (cargo build --release -p wiremesh-daemon)"
    cargo build --release -p wiremesh-daemon || {
        warn "the build failed (see above)"
        exit 1
    }
fi
# The target directory as cargo sees it (CARGO_TARGET_DIR, .cargo/config, or ./target).
TARGET=$(cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$TARGET" ] || TARGET=${CARGO_TARGET_DIR:-$REPO/target}
WIREMESHD=$TARGET/release/wiremeshd
WIREMESH=$TARGET/release/wiremesh
for b in "$WIREMESHD" "$WIREMESH"; do
    [ -x "$b" ] || {
        warn "$b was not built"
        exit 1
    }
done
T_UP=$SECONDS

# ---------------------------------------------------------------------------
# Network: a bridge in wmdemo-hub, one veth per namespace
# ---------------------------------------------------------------------------

STARTED=1
trap on_exit EXIT
trap 'warn "unexpected failure (exit $?) at line $LINENO: $BASH_COMMAND"' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -m 700 "$DIR"
for d in /var/run/wiremesh /var/run/wireguard; do
    [ -d "$d" ] || echo "$d" >>"$DIR/created-dirs"
done

say "creating namespaces ${NAMESPACES[*]} on a bridge ($SUBNET.0/24)"
for ns in "${NAMESPACES[@]}"; do
    ip netns add "$ns" || die "cannot create network namespace $ns (does this kernel allow it? in a container, run it --privileged)"
    ip -n "$ns" link set lo up
done
ip -n "$PREFIX-hub" link add br0 type bridge
ip -n "$PREFIX-hub" link set br0 up
attach() { # NAME HOST: veth from the hub's bridge to eth0 in wmdemo-NAME, address SUBNET.HOST/24
    local ns="$PREFIX-$1"
    ip -n "$PREFIX-hub" link add "v-$1" type veth peer name eth0 netns "$ns"
    ip -n "$PREFIX-hub" link set "v-$1" master br0 up
    ip -n "$ns" addr add "$SUBNET.$2/24" dev eth0
    ip -n "$ns" link set eth0 up
}
attach control 1
host=11
for node in "${NODES[@]}"; do
    attach "$node" "$host"
    host=$((host + 1))
done

# ---------------------------------------------------------------------------
# Coordination server
# ---------------------------------------------------------------------------

# Daemons run in their own sessions (setsid): a Ctrl-C reaches only this script,
# whose trap stops them in order; with --keep they outlive it.
start() { # NAME LOG CMD...
    local name=$1 log=$2
    shift 2
    : >"$log" # exists before the daemon writes to it, so readers never race its creation
    ip netns exec "$PREFIX-$name" setsid "$@" </dev/null >"$log" 2>&1 &
    echo $! >"$DIR/$name.pid"
}

alive() { kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

say "starting the coordination server in $PREFIX-control (https://$CONTROL_IP:$CONTROL_PORT, state in $DIR/control)"
start control "$DIR/control.log" "$WIREMESHD" control --listen "$CONTROL_IP:$CONTROL_PORT" --state "$DIR/control"
URL=
for ((i = 0; i < WAIT_CONTROL * 10; i++)); do
    URL=$(sed -n 's/^control URL: //p' "$DIR/control.log")
    [ -n "$URL" ] && break
    alive control || die "the coordination server exited"
    sleep 0.1
done
[ -n "$URL" ] || die "the coordination server did not print its URL within ${WAIT_CONTROL}s"
TOKEN=$(sed -n 's/^admin token (shown once, stored hashed): //p' "$DIR/control.log")
[ -n "$TOKEN" ] || die "the coordination server printed no admin token (was its state directory not fresh?)"
(umask 077 && printf '%s\n' "$TOKEN" >"$DIR/admin-token")
printf '%s\n' "$URL" >"$DIR/control-url"
say "control URL (certificate pinned): $URL"

say "creating an auth key: wiremesh keys create --reusable --expiry 1h"
KEY=$(in_ns control timeout --foreground -k 2 "$CMD_TIMEOUT" "$WIREMESH" keys create --reusable --expiry 1h \
    --control "$URL" --admin-token-file "$DIR/admin-token") || die "wiremesh keys create failed"
case "$KEY" in wmkey-*) ;; *) die "unexpected auth key output: $KEY" ;; esac
say "auth key: ${KEY:0:14}… (shown once by the server, stored hashed)"

# ---------------------------------------------------------------------------
# Node agents
# ---------------------------------------------------------------------------

for node in "${NODES[@]}"; do
    say "starting node agent $node in $PREFIX-$node (TUN $PREFIX-$node)"
    start "$node" "$DIR/$node.log" "$WIREMESHD" node --control "$URL" --auth-key "$KEY" \
        --hostname "$node" --state "$DIR/$node" --tun "$PREFIX-$node"
done

# The demo's other nodes that the node's map shows online (from the human
# status: one line per peer, the full name third, online fourth). The tailnet
# also holds the control server's identity-service node, not counted here.
online_peers() {
    cli "$1" status 2>/dev/null | awk -v names=" ${NODES[*]} " \
        '$4 == "online" { split($3, label, "."); if (index(names, " " label[1] " ")) n++ } END { print n + 0 }'
}

say "waiting (up to ${WAIT_MAPS}s) for every node to register and get a map with the other two"
want=$((${#NODES[@]} - 1))
deadline=$((SECONDS + WAIT_MAPS))
for node in "${NODES[@]}"; do
    until [ "$(online_peers "$node")" = "$want" ]; do
        alive "$node" || die "the node agent $node exited"
        [ "$SECONDS" -lt "$deadline" ] || die "$node did not get a map with $want online peers within ${WAIT_MAPS}s"
        sleep 0.1
    done
done
say "all ${#NODES[@]} nodes registered and mapped after $((SECONDS - T_UP))s"
for node in "${NODES[@]}"; do
    sed -n 's/^registered as /    /p' "$DIR/$node.log"
done

# Tailnet addresses, from each node's own status line.
self_addr() { # NODE FIELD(1=IPv4, 2=IPv6)
    cli "$1" status | awk -v f="$2" 'NR == 1 { print $f }'
}
ALPHA_V4=$(self_addr alpha 1)
BETA_V6=$(self_addr beta 2)
if [ -z "$ALPHA_V4" ] || [ -z "$BETA_V6" ]; then die "cannot read tailnet addresses from wiremesh status"; fi

# ---------------------------------------------------------------------------
# The show: pings through the tunnel, then status
# ---------------------------------------------------------------------------

echo
say "alpha\$ wiremesh ping beta          (by name, through the tunnel)"
cli alpha ping beta || die "wiremesh ping beta from alpha failed"
echo
# A pair's first packets can be lost while its path is set up (it starts
# on the relay, which needs both nodes connected to it, and moves direct
# once probes answer): ping until two replies came, 10 s at most.
say "gamma\$ ping -c 2 -w 10 $ALPHA_V4         (alpha's tailnet IPv4)"
in_ns gamma timeout --foreground -k 2 "$CMD_TIMEOUT" ping -c 2 -w 10 "$ALPHA_V4" || die "ping from gamma to alpha ($ALPHA_V4) failed"
echo
say "gamma\$ ping -c 2 -w 10 $BETA_V6   (beta's tailnet IPv6)"
in_ns gamma timeout --foreground -k 2 "$CMD_TIMEOUT" ping -c 2 -w 10 "$BETA_V6" || die "ping from gamma to beta ($BETA_V6) failed"
echo
say "alpha\$ wiremesh status"
cli alpha status || die "wiremesh status on alpha failed"
echo

if [ "$MODE" = keep ]; then
    KEEP_UP=1
    cat <<EOF
The tailnet is up and stays up ($((SECONDS - T_UP))s after the build). Reach it with:

  ip netns exec $PREFIX-alpha $WIREMESH --tun $PREFIX-alpha status
  ip netns exec $PREFIX-alpha $WIREMESH --tun $PREFIX-alpha ping gamma
  ip netns exec $PREFIX-beta  $WIREMESH --tun $PREFIX-beta whois $ALPHA_V4
  ip netns exec $PREFIX-beta  ping $ALPHA_V4
  ip netns exec $PREFIX-gamma bash        # a shell on gamma (its TUN is $PREFIX-gamma; wg show $PREFIX-gamma works)

Admin (the server listens in $PREFIX-control; the admin token is in $DIR/admin-token):

  ip netns exec $PREFIX-control $WIREMESH nodes list --control '$URL' --admin-token-file $DIR/admin-token
  ip netns exec $PREFIX-control $WIREMESH keys create --control '$URL' --admin-token-file $DIR/admin-token

Logs: $DIR/{control,alpha,beta,gamma}.log

Tear it all down:  $SELF --down
EOF
else
    say "tailnet demo OK: up, pinged and shown in $((SECONDS - T_UP))s after the build"
fi
