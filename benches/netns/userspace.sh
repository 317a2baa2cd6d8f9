#!/usr/bin/env bash
# TCP throughput through wiremesh tunnels whose ends are TUN devices or the
# userspace netstack (`wiremeshd interface IF --userspace`), between two
# network namespaces joined by a veth pair, all configurations interleaved
# in one run so their ratios are comparable.
#
#   cargo build --release -p wiremesh-daemon
#   sudo bash benches/netns/userspace.sh
#
# Namespace B runs an HTTP server that sends SIZE bytes; namespace A fetches
# them with curl (B sends, A receives). An end is either
#   tun: `wiremeshd interface IF` (TUN); curl / the server use its address;
#   us:  `wiremeshd interface IF --userspace`: A's curl goes through its
#        SOCKS5 proxy (--socks5), B's server sits on B's loopback behind
#        --forward tcp:8000=127.0.0.1:8000.
# So a userspace figure includes what a user of --userspace gets: the proxy
# or forward hop over the kernel's loopback on that end.
#
# Environment:
#   SIZE       bytes per transfer                 default 1073741824 (1 GiB)
#   REPS       interleaved repetitions            default 3
#   CONFIGS    comma list of veth,tun-tun,us-tun,tun-us,us-us (sender B - receiver A;
#              veth: no tunnel, the same server and curl over the bare veth, the
#              ceiling of the measuring tools themselves)
#   WIREMESHD  default <repo>/target/release/wiremeshd
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
SIZE=${SIZE:-1073741824}
REPS=${REPS:-3}
CONFIGS=${CONFIGS:-veth,tun-tun,us-tun,tun-us,us-us}
WIREMESHD=${WIREMESHD:-$REPO_ROOT/target/release/wiremeshd}

ID=$$
NS_A=wmus-$ID-a
NS_B=wmus-$ID-b
UNDER_A=169.254.78.1
UNDER_B=169.254.78.2
TUN_A=10.98.0.1
TUN_B=10.98.0.2
PORT_A=51830
PORT_B=51831
HTTP_PORT=8000
SOCKS=127.0.0.1:1055
PIDS=()
TMP=$(mktemp -d)

log() { echo "userspace-bench: $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# stop_all: ends everything running in the two namespaces (all of it ours).
stop_all() {
    local ns pids deadline
    for ns in "$NS_A" "$NS_B"; do
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        # shellcheck disable=SC2086
        [ -n "${pids// /}" ] && kill -TERM $pids 2>/dev/null || true
    done
    deadline=$((SECONDS + 5))
    for ns in "$NS_A" "$NS_B"; do
        while [ -n "$(ip netns pids "$ns" 2>/dev/null)" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done || true
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        # shellcheck disable=SC2086
        [ -n "${pids// /}" ] && kill -KILL $pids 2>/dev/null || true
    done
    local pid
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
    rm -f /var/run/wireguard/wmus"$ID"*.sock
    return 0
}

cleanup() {
    set +e
    stop_all
    ip netns del "$NS_A" 2>/dev/null
    ip netns del "$NS_B" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, TUN)"
for c in ip wg curl python3 ss timeout; do
    command -v "$c" >/dev/null 2>&1 || die "'$c' not found"
done
# The interpreter itself (a version manager's shim would outlive a kill).
PYTHON=$(python3 -c 'import sys; print(sys.executable)')
[ -x "$WIREMESHD" ] || die "$WIREMESHD not found: cargo build --release -p wiremesh-daemon"

in_a() { ip netns exec "$NS_A" "$@"; }
in_b() { ip netns exec "$NS_B" "$@"; }

ip netns add "$NS_A"
ip netns add "$NS_B"
ip link add wmusv"$ID"a type veth peer name wmusv"$ID"b
ip link set wmusv"$ID"a netns "$NS_A"
ip link set wmusv"$ID"b netns "$NS_B"
in_a ip link set lo up
in_b ip link set lo up
in_a ip addr add "$UNDER_A/24" dev wmusv"$ID"a
in_b ip addr add "$UNDER_B/24" dev wmusv"$ID"b
in_a ip link set wmusv"$ID"a up
in_b ip link set wmusv"$ID"b up

KEY_A=$(wg genkey)
KEY_B=$(wg genkey)
PUB_A=$(echo "$KEY_A" | wg pubkey)
PUB_B=$(echo "$KEY_B" | wg pubkey)
cat >"$TMP/a.conf" <<EOF
[Interface]
PrivateKey = $KEY_A
ListenPort = $PORT_A
[Peer]
PublicKey = $PUB_B
AllowedIPs = $TUN_B/32
Endpoint = $UNDER_B:$PORT_B
EOF
cat >"$TMP/b.conf" <<EOF
[Interface]
PrivateKey = $KEY_B
ListenPort = $PORT_B
[Peer]
PublicKey = $PUB_A
AllowedIPs = $TUN_A/32
Endpoint = $UNDER_A:$PORT_A
EOF

# An HTTP server sending N zero bytes for GET /N (standard library only).
cat >"$TMP/server.py" <<'EOF'
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
chunk = memoryview(bytes(1 << 20))
def serve(c):
    with c:
        head = b""
        while b"\r\n\r\n" not in head:
            d = c.recv(4096)
            if not d:
                return
            head += d
        n = int(head.split(b" ")[1].strip(b"/") or b"0")
        c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % n)
        while n > 0:
            k = min(n, len(chunk))
            c.sendall(chunk[:k])
            n -= k
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(64)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
EOF

N=0
# start_end SIDE MODE: runs wiremeshd for side a or b in mode tun or us; sets IFNAME.
start_end() {
    local side=$1 mode=$2 ns addr conf
    N=$((N + 1))
    IFNAME=wmus${ID}${side}$N
    if [ "$side" = a ]; then ns=$NS_A addr=$TUN_A conf=$TMP/a.conf; else ns=$NS_B addr=$TUN_B conf=$TMP/b.conf; fi
    # A TUN worker's UDP socket can outlive its process for a moment (its
    # io_uring is torn down asynchronously): wait for the port to be free.
    local port=$PORT_A deadline=$((SECONDS + 10))
    [ "$side" = b ] && port=$PORT_B
    while [ -n "$(ip netns exec "$ns" ss -Hlun "sport = :$port")" ]; do
        [ "$SECONDS" -lt "$deadline" ] || die "UDP port $port still in use in $ns"
        sleep 0.1
    done
    local args=("$WIREMESHD" interface "$IFNAME" --foreground --config "$conf")
    if [ "$mode" = us ]; then
        args+=(--userspace --address "$addr/24")
        if [ "$side" = a ]; then args+=(--socks5 "$SOCKS"); else args+=(--forward "tcp:$HTTP_PORT=127.0.0.1:$HTTP_PORT"); fi
    fi
    ip netns exec "$ns" "${args[@]}" >"$TMP/$IFNAME.log" 2>&1 &
    PIDS+=($!)
    deadline=$((SECONDS + 10))
    while [ ! -S "/var/run/wireguard/$IFNAME.sock" ]; do
        [ "$SECONDS" -lt "$deadline" ] || die "$IFNAME did not start: $(cat "$TMP/$IFNAME.log")"
        sleep 0.05
    done
    if [ "$mode" = tun ]; then
        ip netns exec "$ns" ip addr add "$addr/24" dev "$IFNAME"
        ip netns exec "$ns" ip link set "$IFNAME" mtu 1420 up
    else
        # The proxies are bound before the "(userspace)" line is printed.
        while ! grep -q "(userspace)" "$TMP/$IFNAME.log"; do
            [ "$SECONDS" -lt "$deadline" ] || die "$IFNAME did not start: $(cat "$TMP/$IFNAME.log")"
            sleep 0.05
        done
    fi
}

# fetch MODE_A BYTES: curl in A for BYTES from B; prints bytes/s.
fetch() {
    local via=() host=$TUN_B
    [ "$1" = us ] && via=(--socks5-hostname "$SOCKS")
    [ "$1" = veth ] && host=$UNDER_B
    in_a curl -sS --max-time 120 "${via[@]}" -o /dev/null -w '%{speed_download}' "http://$host:$HTTP_PORT/$2"
}

RESULTS=$TMP/results
: >"$RESULTS"
IFS=, read -r -a CONFIG_LIST <<<"$CONFIGS"
for rep in $(seq 1 "$REPS"); do
    for config in "${CONFIG_LIST[@]}"; do
        mode_b=${config%-*}
        mode_a=${config#*-}
        case "$mode_a$mode_b" in vethveth | tuntun | tunus | ustun | usus) ;; *) die "unknown config $config" ;; esac
        if [ "$config" = veth ]; then
            bind=$UNDER_B
        else
            start_end a "$mode_a"
            start_end b "$mode_b"
            if [ "$mode_b" = us ]; then bind=127.0.0.1; else bind=$TUN_B; fi
        fi
        in_b "$PYTHON" "$TMP/server.py" "$bind" "$HTTP_PORT" &
        server=$!
        PIDS+=("$server")
        # Warm up: the handshake, and the server listening.
        deadline=$((SECONDS + 20))
        until fetch "$mode_a" 1000 >/dev/null 2>&1; do
            [ "$SECONDS" -lt "$deadline" ] || die "$config: no first transfer; logs: $(tail -n 5 "$TMP"/*.log)"
            sleep 0.2
        done
        bps=$(fetch "$mode_a" "$SIZE")
        gbit=$(python3 -c "print(f'{$bps * 8 / 1e9:.3f}')")
        log "rep $rep $config (sender B $mode_b, receiver A $mode_a): $gbit Gbit/s"
        echo "$rep $config $gbit" >>"$RESULTS"
        stop_all
    done
done

python3 - "$RESULTS" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
by = {}
for rep, config, g in rows:
    by.setdefault(config, {})[rep] = float(g)
print("| config (sender B - receiver A) | median Gbit/s | runs |")
print("|---|---|---|")
for c, v in by.items():
    print(f"| {c} | {statistics.median(v.values()):.3f} | {', '.join(f'{x:.3f}' for x in v.values())} |")
if "tun-tun" in by:
    print()
    print("| config | median ratio to tun-tun (paired per repetition) |")
    print("|---|---|")
    for c, v in by.items():
        if c in ("tun-tun", "veth"):
            continue
        r = [v[k] / by["tun-tun"][k] for k in v if k in by["tun-tun"] and by["tun-tun"][k] > 0]
        if r:
            print(f"| {c} | {statistics.median(r):.2f}x |")
EOF
