#!/usr/bin/env bash
# Install what wiremesh's tests need on Debian 12 (bookworm), as root.
#
# Idempotent and quiet: when everything is already present it touches neither
# the network nor apt and finishes in well under a second.
#
# Installs:
#   * Debian packages: wireguard-go wireguard-tools iperf3 iproute2
#     iputils-ping procps postgresql curl nftables conntrack (nft: the
#     subnet-router, exit-node and NAT tests; conntrack: the NAT tests flush a
#     router's table when they change its NAT; the PostgreSQL control-store tests
#     start their own throwaway cluster from its binaries; the packaged
#     cluster's service is not needed)
#   * two wireguard-go versions side by side, for interop tests:
#       /usr/local/lib/wiremesh-ci/wireguard-go-0.0.20220316  (bookworm)
#       /usr/local/lib/wiremesh-ci/wireguard-go-0.0.20231211  (bookworm-backports)
#     Each is extracted from its .deb with `dpkg -x` (the system package stays
#     the stable one); the Debian package version it came from is recorded in
#     <binary>.deb-version. Note: the 0.0.20231211 binary reports itself as
#     "v0.0.20230223" in --version (upstream did not bump version.go).
#   * the apt source /etc/apt/sources.list.d/wiremesh-backports.sources
#     (bookworm-backports, same mirror and keyring as the main Debian source;
#     backports has priority 100, so nothing is upgraded from it implicitly).
set -euo pipefail

CI_LIB=/usr/local/lib/wiremesh-ci
WG_GO_STABLE=0.0.20220316
WG_GO_BACKPORTS=0.0.20231211
PACKAGES=(wireguard-go wireguard-tools iperf3 iproute2 iputils-ping procps postgresql curl nftables conntrack)
BPO_SOURCES=/etc/apt/sources.list.d/wiremesh-backports.sources
APT_OPTS=(-o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)

log() { echo "install-deps: $*"; }
die() {
    echo "install-deps: ERROR: $*" >&2
    exit 1
}
trap 'echo "install-deps: ERROR: command failed (line $LINENO): $BASH_COMMAND" >&2' ERR

# Run a command with its output hidden; on failure show the output and stop.
# apt's warnings ("W: Failed to fetch ...", which apt-get update does not treat
# as an error) are shown even on success, so a broken mirror is visible early.
quiet() {
    local out rc=0
    out=$(mktemp)
    "$@" >"$out" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "install-deps: ERROR: '$*' failed (exit $rc); its output:" >&2
        sed 's/^/    /' "$out" >&2
        rm -f "$out"
        exit "$rc"
    fi
    grep -E '^(W|E|Err):' "$out" | sed 's/^/install-deps: apt: /' >&2 || true
    rm -f "$out"
}

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        die "must run as root (or with passwordless sudo): installs Debian packages and writes $CI_LIB"
    fi
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg >/dev/null 2>&1; then
    die "apt-get/dpkg not found: this script supports Debian 12 (bookworm) only"
fi

CODENAME=""
if [ -r /etc/os-release ]; then
    # shellcheck disable=SC1091
    CODENAME=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
fi
[ "$CODENAME" = bookworm ] ||
    log "WARNING: this is '${CODENAME:-unknown}', not Debian 12 (bookworm); the pinned wireguard-go versions may be unavailable"

export DEBIAN_FRONTEND=noninteractive

APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        quiet "${SUDO[@]}" apt-get "${APT_OPTS[@]}" update
        APT_UPDATED=1
    fi
}

# --- apt source for bookworm-backports --------------------------------------
# Take the mirror URI and keyring from the machine's own Debian source (deb822
# debian.sources, or a one-line sources.list), so mirrors/proxies keep working.
detect_mirror() {
    local uri="" key="" f
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        [ "$f" = "$BPO_SOURCES" ] && continue
        # The first stanza whose Suites has exactly "bookworm" (not -security).
        read -r uri key < <(awk -v want=bookworm '
            function flush() {
                if (!done && hit && uri != "") { print uri, (key == "" ? "-" : key); done = 1 }
                hit = 0; uri = ""; key = ""
            }
            /^[[:space:]]*$/ { flush(); next }
            /^[[:space:]]*#/ { next }
            tolower($1) == "uris:" { uri = $2 }
            tolower($1) == "signed-by:" { key = $2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == want) hit = 1 }
            END { flush() }' "$f") || true
        [ -n "$uri" ] && break
    done
    if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
        # deb [signed-by=/path] http://mirror/debian bookworm main
        read -r uri key < <(awk '
            $1 == "deb" {
                key = "-"; i = 2
                if ($2 ~ /^\[/) {
                    for (; i <= NF; i++) {
                        if ($i ~ /signed-by=/) { k = $i; sub(/.*signed-by=/, "", k); sub(/\].*/, "", k); key = k }
                        if ($i ~ /\]$/) { i++; break }
                    }
                }
                if ($(i + 1) == "bookworm") { print $i, key; exit }
            }' /etc/apt/sources.list) || true
    fi
    [ -n "$uri" ] || uri=http://deb.debian.org/debian
    if [ -z "$key" ] || [ "$key" = "-" ]; then
        key=/usr/share/keyrings/debian-archive-keyring.gpg
    fi
    MIRROR_URI=$uri
    MIRROR_KEY=$key
}

ensure_backports_source() {
    detect_mirror
    local want
    want=$(printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
        "$MIRROR_URI" "$MIRROR_KEY")
    if [ ! -f "$BPO_SOURCES" ] || [ "$(cat "$BPO_SOURCES")" != "$want" ]; then
        log "adding apt source $BPO_SOURCES ($MIRROR_URI bookworm-backports)"
        printf '# Added by wiremesh ci/install-deps.sh for side-by-side wireguard-go %s.\n%s\n' \
            "$WG_GO_BACKPORTS" "$want" | "${SUDO[@]}" tee "$BPO_SOURCES" >/dev/null
        BPO_SOURCE_CHANGED=1
    fi
}

# Update only the backports source (fast; leaves the other lists alone).
update_backports_only() {
    log "apt-get update (bookworm-backports only)"
    quiet "${SUDO[@]}" apt-get "${APT_OPTS[@]}" update \
        -o Dir::Etc::sourcelist="$BPO_SOURCES" -o Dir::Etc::sourceparts=- \
        -o APT::Get::List-Cleanup=0
}

# --- Debian packages ----------------------------------------------------------
is_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" = "ii " ]
}

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        is_installed "$p" || missing+=("$p")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return
    fi
    apt_update_once
    log "apt-get install ${missing[*]}"
    quiet "${SUDO[@]}" apt-get "${APT_OPTS[@]}" install -y -q --no-install-recommends "${missing[@]}"
    for p in "${missing[@]}"; do
        is_installed "$p" || die "package $p is still not installed after apt-get install"
    done
}

# --- side-by-side wireguard-go --------------------------------------------------
# The full Debian version (e.g. 0.0.20231211-1~bpo12+1) apt knows for an upstream version.
apt_version_of() {
    apt-cache madison wireguard-go 2>/dev/null |
        awk -F'|' -v v="$1" '{ gsub(/ /, "", $2); if (index($2, v "-") == 1) { print $2; exit } }'
}

# provide_wg_go UPSTREAM_VERSION: make $CI_LIB/wireguard-go-UPSTREAM_VERSION.
provide_wg_go() {
    local ver=$1 dest="$CI_LIB/wireguard-go-$1" stamp="$CI_LIB/wireguard-go-$1.deb-version"
    if [ -x "$dest" ] && [ -f "$stamp" ] && case "$(cat "$stamp")" in "$ver"-*) true ;; *) false ;; esac &&
        "$dest" --version >/dev/null 2>&1; then
        return # already there
    fi
    "${SUDO[@]}" mkdir -p "$CI_LIB"

    # The system package may be exactly this version: copy its binary.
    local sysver
    sysver=$(dpkg-query -W -f='${Version}' wireguard-go 2>/dev/null || true)
    if is_installed wireguard-go && case "$sysver" in "$ver"-*) true ;; *) false ;; esac &&
        [ -x /usr/bin/wireguard-go ]; then
        log "copying /usr/bin/wireguard-go ($sysver) to $dest"
        "${SUDO[@]}" install -m 0755 /usr/bin/wireguard-go "$dest.tmp"
        "${SUDO[@]}" mv -f "$dest.tmp" "$dest"
        echo "$sysver" | "${SUDO[@]}" tee "$stamp" >/dev/null
        return
    fi

    # Otherwise download the .deb (bookworm or bookworm-backports) and extract it.
    local full
    full=$(apt_version_of "$ver")
    if [ -z "$full" ]; then
        if [ "$APT_UPDATED" -eq 0 ] && [ -f "$BPO_SOURCES" ]; then
            update_backports_only
            full=$(apt_version_of "$ver")
        fi
        if [ -z "$full" ]; then
            apt_update_once
            full=$(apt_version_of "$ver")
        fi
    fi
    [ -n "$full" ] || die "apt knows no wireguard-go $ver (is $BPO_SOURCES reachable? apt-cache madison wireguard-go: $(apt-cache madison wireguard-go 2>&1 | tr '\n' ';'))"

    local tmp
    tmp=$(mktemp -d)
    # apt-get download drops privileges to _apt; let it write here.
    if id _apt >/dev/null 2>&1; then "${SUDO[@]}" chown _apt "$tmp" 2>/dev/null || true; fi
    log "downloading wireguard-go=$full"
    (cd "$tmp" && quiet "${SUDO[@]}" apt-get "${APT_OPTS[@]}" download -q "wireguard-go=$full")
    local deb
    deb=$(find "$tmp" -maxdepth 1 -name 'wireguard-go_*.deb' | head -n 1)
    [ -n "$deb" ] || die "apt-get download wireguard-go=$full produced no .deb"
    quiet "${SUDO[@]}" dpkg -x "$deb" "$tmp/root"
    [ -x "$tmp/root/usr/bin/wireguard-go" ] || die "$deb has no usr/bin/wireguard-go"
    "${SUDO[@]}" install -m 0755 "$tmp/root/usr/bin/wireguard-go" "$dest.tmp"
    "${SUDO[@]}" mv -f "$dest.tmp" "$dest"
    echo "$full" | "${SUDO[@]}" tee "$stamp" >/dev/null
    "${SUDO[@]}" rm -rf "$tmp"
    "$dest" --version >/dev/null 2>&1 || die "$dest does not run"
}

# --- main -----------------------------------------------------------------------
start=$(date +%s.%N)
BPO_SOURCE_CHANGED=0
ensure_backports_source
install_packages
provide_wg_go "$WG_GO_STABLE"
# A changed backports source needs its list fetched before madison can see it.
if [ "$BPO_SOURCE_CHANGED" -eq 1 ] && [ "$APT_UPDATED" -eq 0 ] &&
    ! [ -x "$CI_LIB/wireguard-go-$WG_GO_BACKPORTS" ]; then
    update_backports_only
fi
provide_wg_go "$WG_GO_BACKPORTS"

first_line() { "$@" 2>&1 | head -n 1 || true; }
log "versions:"
log "  wireguard-go (system)     $(dpkg-query -W -f='${Version}' wireguard-go): /usr/bin/wireguard-go: $(first_line /usr/bin/wireguard-go --version)"
for v in "$WG_GO_STABLE" "$WG_GO_BACKPORTS"; do
    log "  wireguard-go $v $(cat "$CI_LIB/wireguard-go-$v.deb-version"): $CI_LIB/wireguard-go-$v: $(first_line "$CI_LIB/wireguard-go-$v" --version)"
done
log "  wg (wireguard-tools)      $(dpkg-query -W -f='${Version}' wireguard-tools)"
log "  iperf3                    $(dpkg-query -W -f='${Version}' iperf3)"
log "  iproute2                  $(dpkg-query -W -f='${Version}' iproute2): $(first_line ip -V)"
log "  iputils-ping              $(dpkg-query -W -f='${Version}' iputils-ping)"
log "  procps                    $(dpkg-query -W -f='${Version}' procps)"
log "  postgresql                $(dpkg-query -W -f='${Version}' postgresql): $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tr '\n' ' ')"
log "  curl                      $(dpkg-query -W -f='${Version}' curl)"
log "done in $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s"
