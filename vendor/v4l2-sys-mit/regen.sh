#!/usr/bin/env bash
# Regenerates (or, with --check, verifies) the committed V4L2 bindings in src/bindings/.
#
#   vendor/v4l2-sys-mit/regen.sh [--check]
#
# Each file is what the published v4l2-sys-mit 0.3.0 build script (bindgen 0.65.1 over
# <linux/videodev2.h>) writes for that target: the script builds the unpatched crate from
# crates.io for each target in a scratch workspace and copies its OUT_DIR/v4l2_bindings.rs.
# Then, for every `v4l2_*` struct with a bindgen layout test, the target's C compiler checks
# that sizeof matches the bindings (_Static_assert), an independent check of the 32/64-bit
# layouts. Needs what a maintainer has, not what a build needs: network access to crates.io,
# libclang (Debian: libclang-dev), the cross compilers and their libc headers (gcc-aarch64-linux-gnu
# libc6-dev-arm64-cross gcc-arm-linux-gnueabihf libc6-dev-armhf-cross), and the rustup targets.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
check=0
[ "${1:-}" = "--check" ] && check=1
targets=(x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
declare -A cc=([x86_64-unknown-linux-gnu]=gcc [aarch64-unknown-linux-gnu]=aarch64-linux-gnu-gcc
               [armv7-unknown-linux-gnueabihf]=arm-linux-gnueabihf-gcc)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src"
cat >"$work/Cargo.toml" <<'TOML'
[package]
name = "v4l2-bindings-regen"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
v4l2-sys-mit = "=0.3.0"
[workspace]
TOML
echo "" >"$work/src/lib.rs"
status=0
for t in "${targets[@]}"; do
  rustup target list --installed | grep -qx "$t" || rustup target add "$t" >/dev/null
  (cd "$work" && CARGO_TARGET_DIR="$work/target" cargo build -q --target "$t" -p v4l2-sys-mit)
  gen=$(find "$work/target/$t" -path '*v4l2-sys-mit-*/out/v4l2_bindings.rs' | head -1)
  [ -n "$gen" ] || { echo "regen: no bindings were generated for $t" >&2; exit 1; }
  # Layout cross-check with the target's C compiler.
  {
    echo '#include <linux/videodev2.h>'
    perl -0777 -ne 'while (/size_of::<(v4l2_\w+)>\(\),\s*(\d+)usize/g) {
      print "_Static_assert(sizeof(struct $1) == $2, \"$1\");\n" unless $1 =~ /__bindgen/ }' "$gen"
  } >"$work/layout-$t.c"
  n=$(grep -c _Static_assert "$work/layout-$t.c")
  "${cc[$t]}" -fsyntax-only "$work/layout-$t.c"
  dest="$here/src/bindings/$t.rs"
  if [ "$check" -eq 1 ]; then
    if cmp -s "$gen" "$dest"; then
      echo "regen: $t: committed bindings are current ($n struct sizes agree with ${cc[$t]})"
    else
      echo "regen: $t: committed bindings differ from a fresh generation" >&2
      status=1
    fi
  else
    cp "$gen" "$dest"
    echo "regen: $t: wrote src/bindings/$t.rs ($n struct sizes agree with ${cc[$t]})"
  fi
done
exit $status
