#!/usr/bin/env bash
# Builds Debian packages from a built perch binary, with dpkg-deb (no extra tools):
#
#   cross/package.sh --bin PATH --arch arm64|armhf|amd64 [--output-dir DIR]
#
# Writes DIR/perch_<version>_<arch>.deb (binary, systemd unit, example configuration as a
# conffile, maintainer scripts creating the `perch` system user) and
# DIR/perch-models_<version>_all.deb (the demo model and site adapters under /usr/share/perch).
# DIR defaults to target/deb (under CARGO_TARGET_DIR when set).
set -euo pipefail
cd "$(dirname "$0")/.."

bin="" arch="" out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --arch) arch=$2; shift 2 ;;
    --output-dir|--out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "package.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$bin" ] || { echo "package.sh: --bin: '$bin' is not an executable" >&2; exit 2; }
case "$arch" in
  arm64) objdump=aarch64-linux-gnu-objdump ;;
  armhf) objdump=arm-linux-gnueabihf-objdump ;;
  amd64) objdump=objdump ;;
  *) echo "package.sh: --arch must be arm64, armhf or amd64" >&2; exit 2 ;;
esac
out=${out:-${CARGO_TARGET_DIR:-target}/deb}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The newest glibc symbol version the binary needs is its libc6 dependency.
glibc=$($objdump -T "$bin" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)
glibc=${glibc:-2.17}

copy() { install -D -m "$1" "$2" "$3"; }
doc() {
  copy 644 LICENSE-MIT "$1/usr/share/doc/$2/copyright" 2>/dev/null || {
    mkdir -p "$1/usr/share/doc/$2"
    printf 'perch is licensed under Apache-2.0 OR MIT.\n' > "$1/usr/share/doc/$2/copyright"
  }
}
installed_kib() { du -sk --exclude=DEBIAN "$1" | cut -f1; }

# perch
p="$work/perch"
copy 755 "$bin" "$p/usr/bin/perch"
strip_tool=${objdump%objdump}strip
"$strip_tool" "$p/usr/bin/perch" 2>/dev/null || true
copy 644 deploy/perch.service "$p/lib/systemd/system/perch.service"
copy 644 deploy/perch.toml "$p/etc/perch/perch.toml"
copy 644 README.md "$p/usr/share/doc/perch/README.md"
doc "$p" perch
mkdir -p "$p/DEBIAN"
for s in postinst prerm postrm; do copy 755 "deploy/debian/$s" "$p/DEBIAN/$s"; done
echo /etc/perch/perch.toml > "$p/DEBIAN/conffiles"
cat > "$p/DEBIAN/control" <<CONTROL
Package: perch
Version: $version
Architecture: $arch
Maintainer: perch developers <perch@localhost>
Installed-Size: $(installed_kib "$p")
Depends: libc6 (>= $glibc), passwd
Recommends: perch-models
Section: misc
Priority: optional
Description: object detection service with swappable adapters for ARM boards
 perch runs a frozen ONNX object detector (YOLO exports) on camera frames
 with small task adapters (LoRA, fine-tuned heads) merged at load time and
 swapped while it runs. Ships the perch binary, a hardened systemd unit and
 an example configuration in /etc/perch/perch.toml.
CONTROL
dpkg-deb --root-owner-group --build "$p" "$out/perch_${version}_${arch}.deb" >/dev/null

# perch-models
m="$work/perch-models"
copy 644 models/tree-yolo11n-320.onnx "$m/usr/share/perch/models/tree-yolo11n-320.onnx"
copy 644 models/tree-yolo11n-320.calibration.json \
  "$m/usr/share/perch/models/tree-yolo11n-320.calibration.json"
for a in models/adapters/*.safetensors; do
  copy 644 "$a" "$m/usr/share/perch/adapters/$(basename "$a")"
done
copy 644 models/README.md "$m/usr/share/doc/perch-models/README.md"
doc "$m" perch-models
mkdir -p "$m/DEBIAN"
cat > "$m/DEBIAN/control" <<CONTROL
Package: perch-models
Version: $version
Architecture: all
Maintainer: perch developers <perch@localhost>
Installed-Size: $(installed_kib "$m")
Section: misc
Priority: optional
Description: demo tree detector and site adapters for perch
 A YOLO11n tree crown detector exported to ONNX at 320x320 and LoRA / head
 adapters for two NEON sites, as used by the example configuration.
CONTROL
dpkg-deb --root-owner-group --build "$m" "$out/perch-models_${version}_all.deb" >/dev/null
ls -l "$out/perch_${version}_${arch}.deb" "$out/perch-models_${version}_all.deb"
