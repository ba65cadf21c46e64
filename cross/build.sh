#!/usr/bin/env bash
# Cross-builds perch for ARM boards from an x86_64 Debian/Ubuntu machine, without Docker.
#
#   cross/build.sh [--profile release|dist] [--setup] [--test] [TARGET...]
#
# TARGETs default to aarch64-unknown-linux-gnu and armv7-unknown-linux-gnueabihf, built in one
# cargo invocation (the build is dominated by one long rustc for tract-core, so two targets in
# parallel cost little more than one). --setup installs the cross toolchains, qemu-user and the
# rustup targets. --test then runs the model-level tests (library, goldens, CLI, adapters, eval, precision)
# under qemu with a small board CPU: cortex-a53 for aarch64, cortex-a7 for armv7.
# Binaries land in $CARGO_TARGET_DIR/<target>/<profile>/perch (target dir default:
# ~/.cache/perch/target-arm, outside the clone).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
setup=0
test=0
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --setup) setup=1; shift ;;
    --test) test=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -eq 0 ] && targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)

# Debian package names, qemu binary, sysroot and emulated CPU per target.
pkgs_of() {
  case "$1" in
    aarch64-unknown-linux-gnu) echo "gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;;
    armv7-unknown-linux-gnueabihf) echo "gcc-arm-linux-gnueabihf libc6-dev-armhf-cross" ;;
    *) echo "cross/build.sh: unsupported target $1" >&2; exit 2 ;;
  esac
}
runner_of() {
  case "$1" in
    aarch64-unknown-linux-gnu) echo "qemu-aarch64 -cpu cortex-a53 -L /usr/aarch64-linux-gnu" ;;
    armv7-unknown-linux-gnueabihf) echo "qemu-arm -cpu cortex-a7 -L /usr/arm-linux-gnueabihf" ;;
  esac
}

if [ "$setup" -eq 1 ]; then
  need=()
  for t in "${targets[@]}"; do
    for p in $(pkgs_of "$t"); do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
  done
  for p in qemu-user pkg-config; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
  if [ ${#need[@]} -gt 0 ]; then
    echo "cross: installing ${need[*]}"
    sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}"
  fi
  rustup target add "${targets[@]}" >/dev/null
fi

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/perch/target-arm}
# Extra cargo configuration (e.g. .ci/run's fixed path for the patched tract-linalg).
cfg=()
[ -n "${PERCH_CARGO_CONFIG:-}" ] && cfg=(--config "$PERCH_CARGO_CONFIG")
target_flags=()
for t in "${targets[@]}"; do target_flags+=(--target "$t"); done

echo "cross: cargo build --profile $profile ${target_flags[*]}"
cargo build "${cfg[@]}" --locked --profile "$profile" "${target_flags[@]}"
for t in "${targets[@]}"; do
  bin="$CARGO_TARGET_DIR/$t/$profile/perch"
  printf 'cross: %s %s bytes\n' "$bin" "$(stat -c %s "$bin")"
done

if [ "$test" -eq 1 ]; then
  # The model-level suites compare against the committed goldens with the same tolerances as
  # on x86_64. The service suites are run by hand (cross/README.md): their timing windows are
  # sized for native speed.
  suites=(--lib --test goldens --test cli --test adapters --test eval --test precision --test tasks)
  for t in "${targets[@]}"; do
    runner=$(runner_of "$t")
    cpu=$(echo "$runner" | awk '{print $3}')
    echo "cross: tests on $t under $runner"
    QEMU_CPU=$cpu PERCH_TEST_RUNNER="$runner" \
      cargo test "${cfg[@]}" --locked --profile "$profile" --target "$t" "${suites[@]}" -- --test-threads 2
  done
fi
