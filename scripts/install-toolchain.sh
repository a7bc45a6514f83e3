#!/usr/bin/env bash
# Installs the pinned CUDA compiler toolchain (DESIGN.md §3) from PyPI wheels into
# .toolchain/ (git-ignored). Idempotent: a second run with the same pins does nothing.
# Prints the directory holding nvcc, ptxas, cuobjdump and nvdisasm.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/.toolchain"
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-cuobjdump==13.2.51
  nvidia-cuda-nvdisasm==13.2.51
)
stamp="$dest/.pins"
want=$(printf '%s\n' "${pins[@]}")
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  rm -rf "$dest/site"  # bindgen and libclang (gen-bindings.sh) stay
  mkdir -p "$dest"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --no-compile \
    --target "$dest/site" "${pins[@]}" >&2
  printf '%s\n' "$want" >"$stamp"
fi
cuda="$dest/site/nvidia/cu13"
[ -x "$cuda/bin/nvcc" ] || { echo "install-toolchain: nvcc missing under $cuda/bin" >&2; exit 1; }
echo "$cuda/bin"
