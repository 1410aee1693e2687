#!/usr/bin/env bash
# Run every check of nftlb-rs: formatting, clippy, doc tests and the whole test
# suite (unit, snapshot and namespace-based integration tests).
#
# Usage: bash scripts/test.sh            (as root on Debian 12; any cwd)
#
# Installs missing Debian packages first. Every step runs even if an earlier one
# failed; the script exits non-zero if any step failed. The test runner runs last
# so that its summary line is the last thing printed on success.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

# A root login shell may not have rustup's bin directory on PATH.
if ! command -v cargo >/dev/null 2>&1 && [ -x "${HOME:-/root}/.cargo/bin/cargo" ]; then
    PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "test.sh: cargo not found; install the Rust toolchain first" >&2
    exit 1
fi

# Integration tests create network namespaces and nftables rules.
if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: warning: not running as root; namespace-based tests will fail" >&2
fi

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-auto}"
# Fail fast on a stuck test instead of running into CI's hard limit.
TEST_TIMEOUT="${TEST_TIMEOUT:-40m}"

failed=()
step() {
    echo
    echo "==> $*"
}

step "Installing missing dependencies"
if ! bash scripts/install-deps.sh; then
    echo "test.sh: dependency installation failed" >&2
    exit 1
fi

step "cargo fmt --check"
if cargo fmt --version >/dev/null 2>&1; then
    cargo fmt --all -- --check || failed+=("cargo fmt --check")
else
    echo "SKIPPED: rustfmt is not installed (rustup component add rustfmt)"
fi

step "cargo clippy --all-targets -- -D warnings"
if cargo clippy --version >/dev/null 2>&1; then
    cargo clippy --all-targets --locked -- -D warnings || failed+=("cargo clippy")
else
    echo "SKIPPED: clippy is not installed (rustup component add clippy)"
fi

# Build everything up front (tests may run the compiled binaries).
step "cargo build --all-targets"
cargo build --all-targets --locked || failed+=("cargo build")

# nextest does not run doc tests; run them separately when there is a library.
if [ -f src/lib.rs ]; then
    step "cargo test --doc"
    cargo test --doc --locked || failed+=("cargo test --doc")
fi

if cargo nextest --version >/dev/null 2>&1; then
    step "cargo nextest run --all-targets"
    timeout --foreground -k 30s "$TEST_TIMEOUT" \
        cargo nextest run --all-targets --locked --no-fail-fast || failed+=("cargo nextest run")
else
    step "cargo test --all-targets (cargo-nextest not installed)"
    timeout --foreground -k 30s "$TEST_TIMEOUT" \
        cargo test --all-targets --locked --no-fail-fast || failed+=("cargo test")
fi

if [ "${#failed[@]}" -ne 0 ]; then
    echo
    echo "test.sh: FAILED steps: ${failed[*]}" >&2
    exit 1
fi
