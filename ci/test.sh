#!/usr/bin/env bash
# wiremesh's full test command: `bash ci/test.sh` (CI runs it through .ci/run).
#
# Sections: install test dependencies (ci/install-deps.sh), rustfmt, clippy,
# no_std builds of wiremesh-core (host and thumbv7em-none-eabihf, with and
# without `alloc`), `cargo test --workspace`, the README's first command
# (scripts/tailnet-demo.sh, as root), then a short bounded run of every
# cargo-fuzz target when fuzz/ and a nightly toolchain exist.
#
# Every section runs even if an earlier one failed (so one run shows all
# problems); the script exits non-zero if any failed. Set FAIL_FAST=1 to stop
# at the first failure.
#
# Environment:
#   CARGO_TARGET_DIR  build directory (default: target/ in the repository)
#   FUZZ_SECONDS      seconds per fuzz target (default 20; 0 skips fuzzing)
#   FAIL_FAST=1       stop at the first failing section
#   SKIP_DEPS=1       do not run ci/install-deps.sh
#   CI                when set (CI=true), tests that cannot run fail instead of skipping
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
if [ -n "${CI:-}" ]; then
    export CARGO_TERM_COLOR=never
    # A fresh clone has nothing to reuse, and incremental state doubles the
    # target directory's size.
    export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
fi
FUZZ_SECONDS="${FUZZ_SECONDS:-20}"
THUMB=thumbv7em-none-eabihf

now_ms() { date +%s%3N; }
secs_since() { # secs_since START_MS -> "12.3"
    local d=$(($(now_ms) - $1))
    printf '%d.%d' $((d / 1000)) $((d % 1000 / 100))
}

T0=$(now_ms)
RESULTS=()
FAILED=0
TEST_TOTALS=""

# disk_report: free space where the build goes, and the build's own size.
disk_report() {
    mkdir -p "$CARGO_TARGET_DIR"
    echo "disk: $(df -h --output=avail "$CARGO_TARGET_DIR" | tail -n 1 | tr -d ' ') free at $CARGO_TARGET_DIR;" \
        "target dir $(du -sh "$CARGO_TARGET_DIR" 2>/dev/null | cut -f1)"
}

summary() {
    echo
    disk_report
    echo "==================== ci/test.sh summary ===================="
    local r
    for r in "${RESULTS[@]}"; do
        echo "  $r"
    done
    echo "  total: $(secs_since "$T0")s"
    if [ "$FAILED" -ne 0 ]; then
        echo "ci/test.sh: FAILED"
    else
        echo "ci/test.sh: all sections passed"
    fi
    if [ -n "$TEST_TOTALS" ]; then
        echo
        echo "tests: $TEST_TOTALS"
    fi
}

# step NAME COMMAND...: run one section with a header, timing and result.
step() {
    local name=$1
    shift
    echo
    echo "==================== $name ===================="
    echo "\$ $*"
    local start rc=0
    start=$(now_ms)
    "$@" || rc=$?
    local took
    took=$(secs_since "$start")
    if [ "$rc" -eq 0 ]; then
        echo "---- ok: $name (${took}s)"
        RESULTS+=("ok       ${took}s	$name")
    else
        echo "---- FAILED: $name (exit $rc, ${took}s)"
        RESULTS+=("FAILED   ${took}s	$name (exit $rc)")
        FAILED=1
        if [ "${FAIL_FAST:-0}" = 1 ]; then
            summary
            exit 1
        fi
    fi
    return 0
}

# skip NAME REASON: record a section that cannot run here.
skip() {
    echo
    echo "==================== $1 ===================="
    echo "---- SKIPPED: $1: $2"
    RESULTS+=("SKIPPED  -	$1: $2")
}

echo "wiremesh ci/test.sh in $ROOT"
echo "CARGO_TARGET_DIR=$CARGO_TARGET_DIR CI=${CI:-} FUZZ_SECONDS=$FUZZ_SECONDS"
if ! command -v cargo >/dev/null 2>&1 && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "ci/test.sh: ERROR: cargo not found on PATH (install Rust with rustup)" >&2
    exit 1
fi
echo "$(rustc --version) / $(cargo --version)"
disk_report

# --- dependencies ---------------------------------------------------------------
if [ "${SKIP_DEPS:-0}" = 1 ]; then
    skip "install test dependencies" "SKIP_DEPS=1"
elif [ "$(id -u)" -ne 0 ] && ! { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; } &&
    [ -z "${CI:-}" ]; then
    skip "install test dependencies" "not root; network-namespace tests will skip"
else
    step "install test dependencies" bash ci/install-deps.sh
    if [ "$FAILED" -ne 0 ]; then
        # Everything after this would fail confusingly.
        summary
        exit 1
    fi
fi

# --- static checks ---------------------------------------------------------------
step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings

# --- no_std builds of the core ---------------------------------------------------
step "core: no_std build" cargo build -p wiremesh-core --no-default-features
step "core: no_std + alloc build" cargo build -p wiremesh-core --no-default-features --features alloc

thumb_ok=0
if command -v rustup >/dev/null 2>&1; then
    if rustup_out=$(rustup target add "$THUMB" 2>&1); then
        thumb_ok=1
    else
        thumb_reason="'rustup target add $THUMB' failed: $(echo "$rustup_out" | tail -n 1)"
    fi
else
    thumb_reason="rustup not found, cannot add target $THUMB"
fi
if [ "$thumb_ok" = 1 ]; then
    step "core: no_std build for $THUMB" \
        cargo build -p wiremesh-core --no-default-features --target "$THUMB"
    step "core: no_std + alloc build for $THUMB" \
        cargo build -p wiremesh-core --no-default-features --features alloc --target "$THUMB"
else
    echo "WARNING: $thumb_reason" >&2
    skip "core: no_std builds for $THUMB" "$thumb_reason"
fi

# --- tests -----------------------------------------------------------------------
TEST_LOG=$(mktemp)
run_tests() {
    cargo test --workspace --no-fail-fast 2>&1 | tee "$TEST_LOG"
}
step "cargo test --workspace" run_tests
# Totals over every test binary and doc-test run ("test result: ok. 5 passed; 0 failed; ...").
TEST_TOTALS=$(awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i + 1) ~ /^passed/) p += $i
            if ($(i + 1) ~ /^failed/) f += $i
            if ($(i + 1) ~ /^ignored/) s += $i
        }
    } END { printf "%d passed, %d failed, %d skipped", p, f, s }' "$TEST_LOG")
rm -f "$TEST_LOG"

# --- the README's first command -------------------------------------------------
# A local tailnet of three nodes in namespaces, pinged by name, then torn down.
if [ "$(id -u)" -eq 0 ]; then
    step "README first command (scripts/tailnet-demo.sh)" bash scripts/tailnet-demo.sh
elif [ -n "${CI:-}" ]; then
    echo "ci/test.sh: the README's first command needs root (network namespaces)" >&2
    step "README first command (scripts/tailnet-demo.sh)" false
else
    skip "README first command" "needs root (network namespaces)"
fi

# --- fuzzing (short, bounded) ----------------------------------------------------
if [ ! -f fuzz/Cargo.toml ]; then
    skip "fuzz" "no fuzz/Cargo.toml"
elif [ "$FUZZ_SECONDS" = 0 ]; then
    skip "fuzz" "FUZZ_SECONDS=0"
elif ! cargo +nightly --version >/dev/null 2>&1; then
    skip "fuzz" "no nightly toolchain ('cargo +nightly' does not work)"
else
    fuzz_err=$(mktemp)
    if ! command -v cargo-fuzz >/dev/null 2>&1; then
        step "install cargo-fuzz" cargo install cargo-fuzz --locked
    fi
    if ! command -v cargo-fuzz >/dev/null 2>&1; then
        skip "fuzz" "cargo-fuzz could not be installed"
    elif ! targets=$(cargo +nightly fuzz list 2>"$fuzz_err"); then
        cat "$fuzz_err" >&2
        step "fuzz: list targets" false
    elif [ -z "$targets" ]; then
        skip "fuzz" "fuzz/ has no targets"
    else
        step "fuzz: build all targets" cargo +nightly fuzz build --debug-assertions
        for t in $targets; do
            step "fuzz: $t (${FUZZ_SECONDS}s)" cargo +nightly fuzz run --debug-assertions "$t" -- \
                -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=4096 -print_final_stats=1
        done
    fi
fi

summary
[ "$FAILED" -eq 0 ]
