#!/usr/bin/env bash
# Builds Sluice's cargo-fuzz (libFuzzer) targets (fuzz/) and runs each for a bounded time, starting
# from its committed seed corpus (fuzz/corpus/<target>/). Fails if any target finds a crash: a
# panic, an overflow, a timeout or an allocation over the memory limit. The failing input is
# saved under fuzz/artifacts/<target>/; replay it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none --dev <target> fuzz/artifacts/<target>/<file>
#
#   deploy/fuzz.sh                      # every target, 30 s each
#   deploy/fuzz.sh 300 validator        # one target, 5 minutes
#   FUZZ_SECONDS=10 deploy/fuzz.sh      # every target, 10 s each
#
# Needs only a stable toolchain: cargo-fuzz's -Z flags are accepted with RUSTC_BOOTSTRAP=1, and
# cargo-fuzz is installed from crates.io when missing. The seed corpus is read, never written: new
# inputs go to a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-${FUZZ_SECONDS:-30}}
[[ $# -gt 0 ]] && shift
[[ $seconds =~ ^[1-9][0-9]*$ ]] || { echo "fuzz.sh: seconds per target must be a positive integer, not '$seconds'" >&2; exit 2; }

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "Installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# No sanitizer: the code under test is safe Rust (unsafe_code is forbidden), so ASan would find
# nothing overflow checks and panics do not, and it doubles the build. An unoptimized build
# (with debug assertions and overflow checks) compiles several times faster than -O, which
# matters more for a short run than executions per second.
flags=(--sanitizer none --dev)
# Per input: 10 s at most, 1 GiB of RSS and no single allocation above it ("absurd memory").
libfuzzer=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -max_len=16384 -print_final_stats=1)

if [[ $# -gt 0 ]]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

start=$(date +%s)
cargo fuzz build "${flags[@]}"
echo "fuzz.sh: built in $(($(date +%s) - start)) s"

failed=()
for target in "${targets[@]}"; do
  work=$(mktemp -d)
  # Tokens the mutator splices in, so short runs reach past the JSON and header syntax.
  case $target in
    validator | create_body) dict=(-dict=fuzz/dict/json.dict) ;;
    rate_headers) dict=(-dict=fuzz/dict/headers.dict) ;;
    *) dict=() ;;
  esac
  echo "fuzz.sh: $target for $seconds s"
  if ! cargo fuzz run "${flags[@]}" "$target" "$work" "fuzz/corpus/$target" -- "${libfuzzer[@]}" "${dict[@]}" 2>"$work.log"; then
    # The panic message (before its backtrace), then where the input was saved.
    grep -E -A4 '^(thread .* panicked|==[0-9]+== ERROR)' "$work.log" | head -n 20 >&2 || true
    grep -E 'Test unit written to|^\s+cargo fuzz run' "$work.log" >&2 || tail -n 30 "$work.log" >&2
    failed+=("$target")
  else
    grep -E '^(stat::number_of_executed_units|Done [0-9]+ runs)' "$work.log" | sed "s/^/fuzz.sh: $target: /" || true
  fi
  rm -rf "$work" "$work.log"
done

echo "fuzz.sh: done in $(($(date +%s) - start)) s"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzz.sh: crashes found by: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
