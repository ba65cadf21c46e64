#!/usr/bin/env bash
# Builds and runs perch's fuzz targets with cargo-fuzz (nightly toolchain, libFuzzer).
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Each target starts from its committed seeds (fuzz/corpus/<target>, plus read-only seed
# directories listed below) in a working corpus under the cache, so runs do not grow the
# committed corpus; crashes land in $cache/fuzz-artifacts/<target>/. Prints one line per target:
# executions, seconds, and the crash count (artifacts written). Exits 1 if any target crashed.
# CI runs every target for a few seconds (.ci/run) so the harnesses keep building and running.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(onnx_model adapter peft calibration config control mqtt_command y4m image)
cache=${PERCH_CACHE:-$HOME/.cache/perch}
export CARGO_TARGET_DIR="$cache/fuzz-target"
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# Without a sanitizer: the targets parse and validate (no inference kernels run), and the
# uninstrumented build executes several times faster on two cores.
cargo +nightly fuzz build --fuzz-dir fuzz --sanitizer none
declare -A extra=([adapter]=models/adapters [image]=tests/data [onnx_model]=tests/fixtures/malformed)
failed=0
for t in "${targets[@]}"; do
  work="$cache/fuzz-corpus/$t"; art="$cache/fuzz-artifacts/$t"
  mkdir -p "$work" "$art"
  cp -n fuzz/corpus/"$t"/* "$work"/ 2>/dev/null || true
  log="$cache/fuzz-$t.log"
  set +e
  cargo +nightly fuzz run --fuzz-dir fuzz --sanitizer none "$t" "$work" ${extra[$t]:-} -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -timeout=20 -artifact_prefix="$art/" \
    -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  crashes=$(find "$art" -type f | wc -l)
  echo "fuzz $t: ${execs:-0} executions in ${secs} s, exit $rc, $crashes artifacts in $art"
  [ "$rc" -eq 0 ] || failed=1
done
exit $failed
