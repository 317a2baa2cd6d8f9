#!/usr/bin/env bash
# End-to-end throughput and latency benchmark of userspace WireGuard
# implementations between two network namespaces joined by a veth pair.
#
#   sudo bash benches/netns/run.sh
#
# See benches/netns/README.md for what it measures and every option. In short
# (all through the environment):
#   DURATION   seconds per iperf3 run (-t)                        default 6
#   REPS       interleaved repetitions of the whole config list   default 3
#   CONFIGS    comma list, subset of: veth,wggo-new,wggo-old,wiremesh,wm-to-wggo,wggo-to-wm
#              (default: all of them)
#   WIREMESHD  wiremeshd binary (run as `wiremeshd interface IF --foreground`)
#              default <repo>/target/release/wiremeshd; missing -> its configs are skipped
#   WG_GO_NEW  wireguard-go 0.0.20231211   default /usr/local/lib/wiremesh-ci/wireguard-go-0.0.20231211
#   WG_GO_OLD  wireguard-go 0.0.20220316   default /usr/local/lib/wiremesh-ci/wireguard-go-0.0.20220316
#              (or /usr/bin/wireguard-go when that is 0.0.20220316)
#   OUT        results directory           default <repo>/benches/netns/results
#   KEEP_LOGS  1: keep the per-run tunnel/iperf3 logs next to the CSV
#
# An "implementation" is a command that, given an interface name, runs a
# foreground userspace WireGuard process that creates that TUN interface and
# serves /var/run/wireguard/<ifname>.sock for wg(8) (see impl_argv below).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

DURATION=${DURATION:-6}
REPS=${REPS:-3}
ALL_CONFIGS=(veth wggo-new wggo-old wiremesh wm-to-wggo wggo-to-wm)
CONFIGS=${CONFIGS:-$(
    IFS=,
    echo "${ALL_CONFIGS[*]}"
)}
WIREMESHD=${WIREMESHD:-$REPO_ROOT/target/release/wiremeshd}
CI_LIB=/usr/local/lib/wiremesh-ci
WG_GO_NEW=${WG_GO_NEW:-$CI_LIB/wireguard-go-0.0.20231211}
if [ -z "${WG_GO_OLD:-}" ]; then
    WG_GO_OLD=$CI_LIB/wireguard-go-0.0.20220316
    if [ ! -x "$WG_GO_OLD" ] && [ -x /usr/bin/wireguard-go ] &&
        /usr/bin/wireguard-go --version 2>/dev/null | grep -q 'v0\.0\.20220316'; then
        WG_GO_OLD=/usr/bin/wireguard-go
    fi
fi
OUT=${OUT:-$REPO_ROOT/benches/netns/results}
KEEP_LOGS=${KEEP_LOGS:-0}

TUN_MTU=1420
WG_SOCKET_DIR=/var/run/wireguard
IPERF_PORT=5201
PING_COUNT=20
PING_INTERVAL=0.05
# Bounds on every wait.
START_TIMEOUT=10   # tunnel process creates its UAPI socket
STOP_TIMEOUT=5     # tunnel process exits after SIGTERM
PING_UP_TIMEOUT=30 # first ping through a fresh tunnel succeeds
CMD_TIMEOUT=30     # any single configuration command
IPERF_TIMEOUT=$((DURATION + 30))
# The "under load" single stream: long enough that the pings (1 s after it
# starts, ~1 s long) fall well inside it.
LOAD_T=$((DURATION > 4 ? DURATION : 4))

log() { echo "netns-bench: $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# --- state for cleanup -------------------------------------------------------
ID=$$
NS_A=wmbench-$ID-a
NS_B=wmbench-$ID-b
VETH_A=wmbv${ID}a
VETH_B=wmbv${ID}b
UNDER_A=169.254.77.1
UNDER_B=169.254.77.2
UNDER6_A=fd00:776d:4d::1
UNDER6_B=fd00:776d:4d::2
TUN_A=10.99.0.1
TUN_B=10.99.0.2
TUN6_A=fd99::1
TUN6_B=fd99::2
WG_PORT_A=51820
WG_PORT_B=51821

PIDS=()    # every background process this script started
IFNAMES=() # every tunnel interface name it used (their UAPI sockets are ours)
NS_MADE=()
TMP=""
CLEANED=0
IF_COUNTER=0

cleanup() {
    [ "$CLEANED" -eq 1 ] && return
    CLEANED=1
    set +e
    local pid ns name
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        wait_exit "$pid" "$STOP_TIMEOUT" || kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    for ns in "${NS_MADE[@]}"; do
        # Anything still in our namespaces was started by us.
        local left
        left=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        # shellcheck disable=SC2086
        [ -n "${left// /}" ] && kill -KILL $left 2>/dev/null
        ip netns del "$ns" 2>/dev/null
    done
    for name in "${IFNAMES[@]}"; do
        rm -f "$WG_SOCKET_DIR/$name.sock"
    done
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then
        if [ "$KEEP_LOGS" = 1 ] && [ -n "${LOG_KEEP_DIR:-}" ]; then
            mkdir -p "$LOG_KEEP_DIR" && cp "$TMP"/*.log "$LOG_KEEP_DIR"/ 2>/dev/null
        fi
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# wait_exit PID SECONDS: true once PID has exited (or is a zombie), false on timeout.
wait_exit() {
    local pid=$1 deadline=$((SECONDS + $2)) st
    while :; do
        st=$(ps -o stat= -p "$pid" 2>/dev/null || true)
        case "$st" in "" | Z*) return 0 ;; esac
        [ "$SECONDS" -ge "$deadline" ] && return 1
        sleep 0.05
    done
}

# stop_pid PID: SIGTERM, wait, SIGKILL, reap.
stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_exit "$pid" "$STOP_TIMEOUT"; then
        log "pid $pid did not exit ${STOP_TIMEOUT}s after SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        wait_exit "$pid" 2 || true
    fi
    wait "$pid" 2>/dev/null || true
    local p keep=()
    for p in "${PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
    PIDS=("${keep[@]+"${keep[@]}"}")
}

is_exec() { [ -f "$1" ] && [ -x "$1" ]; }

# --- preconditions -------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, TUN): sudo bash $0"
for c in ip wg iperf3 ping python3 timeout ss ps; do
    command -v "$c" >/dev/null 2>&1 || die "'$c' not found (run ci/install-deps.sh)"
done
case "$DURATION" in '' | *[!0-9]*) die "DURATION must be a positive integer, got '$DURATION'" ;; esac
case "$REPS" in '' | *[!0-9]*) die "REPS must be a positive integer, got '$REPS'" ;; esac
if [ "$DURATION" -lt 1 ] || [ "$REPS" -lt 1 ]; then die "DURATION and REPS must be >= 1"; fi

# --- implementations -----------------------------------------------------------
# impl_argv IMPL IFNAME: sets ARGV to the command that runs IMPL in the
# foreground, creating IFNAME.
impl_argv() {
    case "$1" in
    wggo-new) ARGV=("$WG_GO_NEW" -f "$2") ;;
    wggo-old) ARGV=("$WG_GO_OLD" -f "$2") ;;
    wiremesh) ARGV=("$WIREMESHD" interface "$2" --foreground) ;;
    *) die "unknown implementation $1" ;;
    esac
}
impl_binary() {
    case "$1" in
    wggo-new) echo "$WG_GO_NEW" ;;
    wggo-old) echo "$WG_GO_OLD" ;;
    wiremesh) echo "$WIREMESHD" ;;
    esac
}
impl_label() {
    case "$1" in
    wggo-new) echo "wireguard-go 0.0.20231211" ;;
    wggo-old) echo "wireguard-go 0.0.20220316" ;;
    wiremesh) echo "wiremesh" ;;
    veth) echo "raw veth" ;;
    esac
}
# config_impls CONFIG: "SENDER RECEIVER" (sender = namespace A, iperf3 client).
config_impls() {
    case "$1" in
    veth) echo "veth veth" ;;
    wggo-new) echo "wggo-new wggo-new" ;;
    wggo-old) echo "wggo-old wggo-old" ;;
    wiremesh) echo "wiremesh wiremesh" ;;
    wm-to-wggo) echo "wiremesh wggo-new" ;;
    wggo-to-wm) echo "wggo-new wiremesh" ;;
    *) return 1 ;;
    esac
}

# --- select configurations ---------------------------------------------------------
SELECTED=()
IFS=, read -r -a REQUESTED <<<"$CONFIGS"
for cfg in "${REQUESTED[@]}"; do
    cfg=${cfg// /}
    [ -n "$cfg" ] || continue
    config_impls "$cfg" >/dev/null || die "unknown config '$cfg' in CONFIGS (known: ${ALL_CONFIGS[*]})"
    read -r a b <<<"$(config_impls "$cfg")"
    missing=""
    for impl in $a $b; do
        [ "$impl" = veth ] && continue
        bin=$(impl_binary "$impl")
        if ! is_exec "$bin"; then
            case "$impl" in
            wiremesh) missing="wiremeshd not found or not executable at WIREMESHD=$bin (build it: cargo build --release -p wiremesh-daemon)" ;;
            wggo-new) missing="wireguard-go 0.0.20231211 not found at WG_GO_NEW=$bin (run ci/install-deps.sh)" ;;
            wggo-old) missing="wireguard-go 0.0.20220316 not found at WG_GO_OLD=$bin (run ci/install-deps.sh)" ;;
            esac
            break
        fi
    done
    if [ -n "$missing" ]; then
        log "SKIPPING config $cfg: $missing"
        continue
    fi
    SELECTED+=("$cfg")
done
[ "${#SELECTED[@]}" -gt 0 ] || die "no configuration can run (CONFIGS=$CONFIGS)"
for cfg in "${SELECTED[@]}"; do
    [ "$cfg" = veth ] && continue
    [ -c /dev/net/tun ] || die "/dev/net/tun missing: tunnel configs need TUN"
    break
done

# --- output ------------------------------------------------------------------------
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[ -e "$OUT/run-$STAMP.csv" ] && STAMP=$STAMP-$ID # two runs in one second
CSV=$OUT/run-$STAMP.csv
SUMMARY=$OUT/run-$STAMP.txt
LOG_KEEP_DIR=$OUT/run-$STAMP-logs
TMP=$(mktemp -d /tmp/wmbench.XXXXXX)
chmod 700 "$TMP"
echo "timestamp,rep,config,sender,receiver,gbps_p1,gbps_p4,ping_idle_ms,ping_load_ms,gbps_under_load,loadavg1,status" >"$CSV"

# --- namespaces and the veth underlay ------------------------------------------------
ip netns add "$NS_A"
NS_MADE+=("$NS_A")
ip netns add "$NS_B"
NS_MADE+=("$NS_B")
ip -n "$NS_A" link set lo up
ip -n "$NS_B" link set lo up
ip link add name "$VETH_A" netns "$NS_A" type veth peer name "$VETH_B" netns "$NS_B"
ip -n "$NS_A" addr add "$UNDER_A/24" dev "$VETH_A"
ip -n "$NS_B" addr add "$UNDER_B/24" dev "$VETH_B"
ip -n "$NS_A" addr add "$UNDER6_A/64" dev "$VETH_A" nodad
ip -n "$NS_B" addr add "$UNDER6_B/64" dev "$VETH_B" nodad
ip -n "$NS_A" link set "$VETH_A" up
ip -n "$NS_B" link set "$VETH_B" up
timeout "$CMD_TIMEOUT" ip netns exec "$NS_A" ping -c 1 -W 2 -q "$UNDER_B" >/dev/null ||
    die "the veth underlay does not pass a ping"

# --- tunnels -------------------------------------------------------------------------------
new_ifname() {
    IF_COUNTER=$((IF_COUNTER + 1))
    NEW_IF=wmb${ID}t$IF_COUNTER # <= 15 bytes: 3 + 7 (pid_max) + 1 + up to 4
    IFNAMES+=("$NEW_IF")
    rm -f "$WG_SOCKET_DIR/$NEW_IF.sock"
}

# tunnel_start NS IMPL: starts IMPL in NS on a fresh interface; sets
# T_IF, T_PID, T_LOG. Returns 1 (after printing its log) if it does not come up.
tunnel_start() {
    local ns=$1 impl=$2
    new_ifname
    T_IF=$NEW_IF
    T_LOG=$TMP/$impl-$T_IF.log
    impl_argv "$impl" "$T_IF"
    WG_PROCESS_FOREGROUND=1 LOG_LEVEL=error \
        ip netns exec "$ns" "${ARGV[@]}" </dev/null >"$T_LOG" 2>&1 &
    T_PID=$!
    PIDS+=("$T_PID")
    local deadline=$((SECONDS + START_TIMEOUT))
    while [ ! -S "$WG_SOCKET_DIR/$T_IF.sock" ]; do
        if wait_exit "$T_PID" 0; then
            log "$impl ($T_IF) exited early; its log:"
            sed 's/^/    /' "$T_LOG" >&2
            return 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "$impl did not create $WG_SOCKET_DIR/$T_IF.sock within ${START_TIMEOUT}s; its log:"
            sed 's/^/    /' "$T_LOG" >&2
            return 1
        fi
        sleep 0.02
    done
    if ! timeout "$CMD_TIMEOUT" ip -n "$ns" link show "$T_IF" >/dev/null 2>&1; then
        log "$impl serves $T_IF.sock but there is no interface $T_IF in $ns"
        return 1
    fi
}

# nsrun NS CMD...: run a configuration command in NS, bounded; on failure print it.
nsrun() {
    local ns=$1
    shift
    local out
    if ! out=$(timeout "$CMD_TIMEOUT" ip netns exec "$ns" "$@" 2>&1); then
        log "[$ns] '$*' failed: $out"
        return 1
    fi
}

# tunnel_configure NS IF PRIVFILE PORT PEERPUB PEER_ALLOWED PEER_ENDPOINT ADDR4 ADDR6
tunnel_configure() {
    local ns=$1 ifn=$2 priv=$3 port=$4 peer=$5 allowed=$6 ep=$7 a4=$8 a6=$9
    nsrun "$ns" wg set "$ifn" private-key "$priv" listen-port "$port" \
        peer "$peer" allowed-ips "$allowed" endpoint "$ep" || return 1
    nsrun "$ns" ip addr add "$a4/24" dev "$ifn" || return 1
    nsrun "$ns" ip addr add "$a6/64" dev "$ifn" nodad || return 1
    nsrun "$ns" ip link set "$ifn" mtu "$TUN_MTU" up || return 1
}

# tunnel_up SENDER_IMPL RECEIVER_IMPL: sets A_PID, B_PID, A_IF, B_IF.
tunnel_up() {
    local ia=$1 ib=$2
    A_PID="" B_PID="" A_IF="" B_IF="" T_PID="" T_IF=""
    # Record pid and name even on failure, so tunnel_down stops what started.
    tunnel_start "$NS_A" "$ia" || {
        A_PID=$T_PID A_IF=$T_IF
        return 1
    }
    A_PID=$T_PID A_IF=$T_IF A_LOG=$T_LOG T_PID="" T_IF=""
    tunnel_start "$NS_B" "$ib" || {
        B_PID=$T_PID B_IF=$T_IF
        return 1
    }
    B_PID=$T_PID B_IF=$T_IF B_LOG=$T_LOG
    local ka kb pa pb
    ka=$TMP/key-$A_IF kb=$TMP/key-$B_IF
    (umask 077 && wg genkey >"$ka" && wg genkey >"$kb") || return 1
    pa=$(wg pubkey <"$ka") && pb=$(wg pubkey <"$kb") || return 1
    tunnel_configure "$NS_A" "$A_IF" "$ka" "$WG_PORT_A" "$pb" "$TUN_B/32,$TUN6_B/128" \
        "$UNDER_B:$WG_PORT_B" "$TUN_A" "$TUN6_A" || return 1
    tunnel_configure "$NS_B" "$B_IF" "$kb" "$WG_PORT_B" "$pa" "$TUN_A/32,$TUN6_A/128" \
        "$UNDER_A:$WG_PORT_A" "$TUN_B" "$TUN6_B" || return 1
    rm -f "$ka" "$kb"
    # The first ping triggers the handshake; wait for one to get through.
    local deadline=$((SECONDS + PING_UP_TIMEOUT))
    until timeout 5 ip netns exec "$NS_A" ping -c 1 -W 1 -q "$TUN_B" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "no ping through the tunnel $ia -> $ib within ${PING_UP_TIMEOUT}s; logs:"
            sed 's/^/    A: /' "$A_LOG" >&2
            sed 's/^/    B: /' "$B_LOG" >&2
            return 1
        fi
        sleep 0.2
    done
    # And back, so both sides have a session before measuring.
    timeout 5 ip netns exec "$NS_B" ping -c 1 -W 2 -q "$TUN_A" >/dev/null 2>&1 || true
}

tunnel_down() {
    local pid ifn
    for pid in ${A_PID:-} ${B_PID:-}; do stop_pid "$pid"; done
    for ifn in ${A_IF:-} ${B_IF:-}; do
        rm -f "$WG_SOCKET_DIR/$ifn.sock"
        # A killed process leaves no TUN behind, but be sure.
        ip -n "$NS_A" link del "$ifn" 2>/dev/null || true
        ip -n "$NS_B" link del "$ifn" 2>/dev/null || true
    done
    A_PID="" B_PID="" A_IF="" B_IF=""
}

# --- measurements ------------------------------------------------------------------------------
# ping_avg TARGET: prints the average rtt in ms of 20 pings from A (NA if none came back).
ping_avg() {
    local out
    out=$(timeout "$CMD_TIMEOUT" ip netns exec "$NS_A" ping -c "$PING_COUNT" -i "$PING_INTERVAL" -q "$1" 2>&1 || true)
    echo "$out" | python3 -c '
import re, sys
m = re.search(r"= [\d.]+/([\d.]+)/[\d.]+/[\d.]+ ms", sys.stdin.read())
print(m.group(1) if m else "NA")'
}

# iperf_server_start: a one-off (-1) iperf3 server in B, bounded; waits until it listens.
iperf_server_start() {
    timeout "$IPERF_TIMEOUT" ip netns exec "$NS_B" iperf3 -s -1 -p "$IPERF_PORT" \
        </dev/null >>"$TMP/iperf3-server.log" 2>&1 &
    SRV_PID=$!
    PIDS+=("$SRV_PID")
    local deadline=$((SECONDS + 10))
    until ip netns exec "$NS_B" ss -Hltn "sport = :$IPERF_PORT" 2>/dev/null | grep -q .; do
        if wait_exit "$SRV_PID" 0 || [ "$SECONDS" -ge "$deadline" ]; then
            log "iperf3 server did not start listening"
            return 1
        fi
        sleep 0.05
    done
}

iperf_server_stop() {
    [ -n "${SRV_PID:-}" ] && stop_pid "$SRV_PID"
    SRV_PID=""
}

# iperf_gbps JSONFILE: receiver-side Gbit/s (end.sum_received), or NA.
iperf_gbps() {
    python3 - "$1" <<'EOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print("NA"); print(f"netns-bench: iperf3 JSON unreadable: {e}", file=sys.stderr); sys.exit()
if d.get("error"):
    print("NA"); print(f"netns-bench: iperf3: {d['error']}", file=sys.stderr); sys.exit()
try:
    print(f"{d['end']['sum_received']['bits_per_second'] / 1e9:.3f}")
except KeyError:
    print("NA")
EOF
}

# iperf_run TARGET STREAMS: sets IPERF_GBPS to the Gbit/s of one bounded
# iperf3 run A -> B (not a $(...) function: it starts background processes
# that the cleanup trap must know about).
iperf_run() {
    local target=$1 streams=$2 json=$TMP/iperf3-client.json
    IPERF_GBPS=NA
    rm -f "$json"
    iperf_server_start || {
        iperf_server_stop
        return
    }
    timeout "$IPERF_TIMEOUT" ip netns exec "$NS_A" iperf3 -c "$target" -p "$IPERF_PORT" \
        -t "$DURATION" -P "$streams" -J </dev/null >"$json" 2>>"$TMP/iperf3-client.log" || true
    iperf_server_stop
    IPERF_GBPS=$(iperf_gbps "$json")
}

# ping_under_load TARGET: sets LOAD_PING and LOAD_GBPS (ping while a single stream runs).
ping_under_load() {
    local target=$1 json=$TMP/iperf3-load.json cpid
    LOAD_PING=NA LOAD_GBPS=NA
    rm -f "$json"
    iperf_server_start || {
        iperf_server_stop
        return
    }
    timeout "$IPERF_TIMEOUT" ip netns exec "$NS_A" iperf3 -c "$target" -p "$IPERF_PORT" \
        -t "$LOAD_T" -P 1 -J </dev/null >"$json" 2>>"$TMP/iperf3-client.log" &
    cpid=$!
    PIDS+=("$cpid")
    sleep 1
    LOAD_PING=$(ping_avg "$target")
    wait_exit "$cpid" "$IPERF_TIMEOUT" || true
    stop_pid "$cpid"
    iperf_server_stop
    LOAD_GBPS=$(iperf_gbps "$json")
}

# --- one run ------------------------------------------------------------------------------------
run_one() {
    local rep=$1 cfg=$2 sa sb target status=ok load
    read -r sa sb <<<"$(config_impls "$cfg")"
    local p1=NA p4=NA idle=NA
    LOAD_PING=NA LOAD_GBPS=NA
    load=$(cut -d' ' -f1 /proc/loadavg)
    if [ "$cfg" = veth ]; then
        target=$UNDER_B
    else
        target=$TUN_B
        if ! tunnel_up "$sa" "$sb"; then
            status=tunnel-failed
        fi
    fi
    if [ "$status" = ok ]; then
        idle=$(ping_avg "$target")
        iperf_run "$target" 1
        p1=$IPERF_GBPS
        iperf_run "$target" 4
        p4=$IPERF_GBPS
        ping_under_load "$target"
        if [ "$cfg" != veth ]; then
            for pid in $A_PID $B_PID; do
                wait_exit "$pid" 0 && status=tunnel-died
            done
        fi
    fi
    [ "$cfg" != veth ] && tunnel_down
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ),$rep,$cfg,$sa,$sb,$p1,$p4,$idle,$LOAD_PING,$LOAD_GBPS,$load,$status" >>"$CSV"
    printf 'netns-bench: rep %d %-11s P1 %7s  P4 %7s Gbit/s  ping idle %6s  load %7s ms  (%s)\n' \
        "$rep" "$cfg" "$p1" "$p4" "$idle" "$LOAD_PING" "$status" >&2
}

# --- main ------------------------------------------------------------------------------------------
{
    echo "# wiremesh netns benchmark $STAMP"
    echo "command: DURATION=$DURATION REPS=$REPS CONFIGS=$(
        IFS=,
        echo "${SELECTED[*]}"
    ) bash benches/netns/run.sh"
    echo "host: $(uname -sr), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "iperf3: $(iperf3 --version 2>&1 | head -n1)"
    for impl in wggo-new wggo-old wiremesh; do
        bin=$(impl_binary "$impl")
        if is_exec "$bin"; then
            echo "$impl: $bin ($(timeout 5 "$bin" --version 2>&1 | head -n1 || true))"
        fi
    done
    echo "tunnel MTU $TUN_MTU, veth MTU 1500, iperf3 -t $DURATION (-t $LOAD_T under load), ping -c $PING_COUNT -i $PING_INTERVAL"
} >"$SUMMARY"
sed 's/^/netns-bench: /' "$SUMMARY" >&2
log "configs: ${SELECTED[*]}; $REPS reps; raw numbers -> $CSV"

for rep in $(seq 1 "$REPS"); do
    for cfg in "${SELECTED[@]}"; do
        run_one "$rep" "$cfg"
    done
done

# --- report ------------------------------------------------------------------------------------------
python3 - "$CSV" <<'EOF' | tee -a "$SUMMARY"
import csv, statistics, sys

rows = list(csv.DictReader(open(sys.argv[1])))
labels = {
    "veth": "raw veth (no tunnel)",
    "wggo-new": "wireguard-go 0.0.20231211 <-> itself",
    "wggo-old": "wireguard-go 0.0.20220316 <-> itself",
    "wiremesh": "wiremesh <-> wiremesh",
    "wm-to-wggo": "wiremesh -> wireguard-go 0.0.20231211",
    "wggo-to-wm": "wireguard-go 0.0.20231211 -> wiremesh",
}
metrics = [("gbps_p1", "P1 Gbit/s"), ("gbps_p4", "P4 Gbit/s"),
           ("ping_idle_ms", "ping idle ms"), ("ping_load_ms", "ping load ms")]

def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None

configs = []
for r in rows:
    if r["config"] not in configs:
        configs.append(r["config"])

def median(cfg, key):
    vals = [num(r[key]) for r in rows if r["config"] == cfg]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None

def fmt(v, nd):
    return "NA" if v is None else f"{v:.{nd}f}"

print()
print("Medians per configuration (sender -> receiver; iperf3 receiver side):")
print()
print("| config | what | runs ok | " + " | ".join(m[1] for m in metrics) + " |")
print("|---|---|---|" + "---:|" * len(metrics))
for c in configs:
    n = sum(1 for r in rows if r["config"] == c and r["status"] == "ok")
    tot = sum(1 for r in rows if r["config"] == c)
    vals = [fmt(median(c, k), 2 if k.startswith("gbps") else 3) for k, _ in metrics]
    print(f"| {c} | {labels.get(c, c)} | {n}/{tot} | " + " | ".join(vals) + " |")

# Ratios: per repetition (paired, so drift over the run cancels), then the median.
pairs = [("wiremesh", "wggo-new"), ("wiremesh", "wggo-old"), ("wiremesh", "veth"),
         ("wm-to-wggo", "wggo-new"), ("wggo-to-wm", "wggo-new"),
         ("wm-to-wggo", "wiremesh"), ("wggo-to-wm", "wiremesh"),
         ("wggo-new", "wggo-old"), ("wggo-new", "veth"), ("wggo-old", "veth")]
if "wiremesh" in configs:
    pairs = [p for p in pairs if "wiremesh" in p or p[0] in ("wm-to-wggo", "wggo-to-wm")]

def ratio(a, b, key):
    by_rep = {}
    for r in rows:
        by_rep.setdefault(r["rep"], {})[r["config"]] = num(r[key])
    rs = [d[a] / d[b] for d in by_rep.values()
          if d.get(a) is not None and d.get(b) not in (None, 0.0)]
    return statistics.median(rs) if rs else None

shown = [(a, b) for a, b in pairs if a in configs and b in configs]
if shown:
    print()
    print("Ratios (median over repetitions of the same-repetition ratio; "
          "throughput > 1 = first is faster, latency < 1 = first is lower):")
    print()
    print("| ratio | " + " | ".join(m[1] for m in metrics) + " |")
    print("|---|" + "---:|" * len(metrics))
    for a, b in shown:
        print(f"| {a} / {b} | " + " | ".join(fmt(ratio(a, b, k), 2) for k, _ in metrics) + " |")
bad = [r for r in rows if r["status"] != "ok"]
if bad:
    print()
    print("Runs that failed: " + ", ".join(f"rep {r['rep']} {r['config']} ({r['status']})" for r in bad))
EOF
log "raw numbers: $CSV"
log "summary:     $SUMMARY"
if grep -q ',tunnel-' "$CSV"; then
    log "some runs failed (see status column)"
    exit 1
fi
