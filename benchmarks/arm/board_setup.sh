#!/usr/bin/env bash
# The board bench's extra guest packages (network, once): what edgeport-bench needs in the aarch64 guest beyond
# the ARM parity environment (benchmarks/arm/setup.sh: sysroot, CPython 3.11, numpy, MNN, onnxruntime, qemu 10):
# msgspec and Pillow (edgeport-runtime's dependencies), OpenVINO's aarch64 wheel (without openvino-telemetry, which
# the runtime keeps out anyway) and edgeport-runtime itself, built from ./runtime as a wheel.
#   bash benchmarks/arm/board_setup.sh ARM_CACHE PYTHON
# Installs into ARM_CACHE/board-site (re-run after changing runtime/: the wheel is rebuilt every time).
set -euo pipefail
cache=${1:?usage: board_setup.sh ARM_CACHE PYTHON}
py=${2:?usage: board_setup.sh ARM_CACHE PYTHON}
repo=$(cd "$(dirname "$0")/../.." && pwd)
wheels=$cache/board-wheels
site=$cache/board-site
mkdir -p "$wheels"
platforms=()
for v in 17 28 31 35; do platforms+=(--platform "manylinux_2_${v}_aarch64"); done
guest=(--python-version 3.11 --implementation cp --only-binary=:all: "${platforms[@]}" --platform manylinux2014_aarch64)
if ! ls "$wheels"/openvino-2026.4.1-*.whl >/dev/null 2>&1; then
  echo "downloading msgspec, Pillow, OpenVINO (aarch64, cp311) into $wheels" >&2
  "$py" -m pip download --no-deps "${guest[@]}" -d "$wheels" msgspec==0.22.0 "pillow>=10" openvino==2026.4.1
fi
rm -f "$wheels"/edgeport_runtime-*.whl
"$py" -m pip wheel --no-deps --no-build-isolation -q -w "$wheels" "$repo/runtime"
tmp=$(mktemp -d "$cache/board-site.XXXXXX")
"$py" -m pip install -q --no-deps --no-compile "${guest[@]}" --target "$tmp" "$wheels"/*.whl
rm -rf "$site" && mv "$tmp" "$site"
echo "guest packages in $site: $(ls "$site" | grep -c dist-info) distributions" >&2
