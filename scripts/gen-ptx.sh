#!/usr/bin/env bash
# Regenerates ptx/<target>/<module>.ptx from cuda/<module>.cu with the pinned nvcc
# (or $FK_NVCC). Flags come from cuda/nvcc.flags, as in build.rs.
#   scripts/gen-ptx.sh                  rewrite ptx/
#   scripts/gen-ptx.sh --check          fail if ptx/ differs from what nvcc produces
#   scripts/gen-ptx.sh --out DIR TARGET write DIR/TARGET/ only (the GPU check, with the
#                                       machine's own nvcc for its own target)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
nvcc=${FK_NVCC:-$(scripts/install-toolchain.sh)/nvcc}
mode=${1:-write}
out=ptx
targets=(sm_80 sm_89 sm_90a)
[ "$mode" = --check ] && out=$(mktemp -d)
if [ "$mode" = --out ]; then
  out=$2
  targets=("$3")
fi
mapfile -t flags < cuda/nvcc.flags
for target in "${targets[@]}"; do
  mkdir -p "$out/$target"
  for cu in cuda/*.cu; do
    module=$(basename "$cu" .cu)
    "$nvcc" "${flags[@]}" -arch="$target" -ptx "$cu" -o "$out/$target/$module.ptx"
    # Names with internal linkage (anonymous namespaces) carry a hash of the checkout's
    # path; one fixed value keeps the PTX the same wherever it is built (a module's
    # internal names are its own, so any consistent value links).
    sed -i -E 's/_(INTERNAL|GLOBAL__N_)_[0-9a-f]{8}_/_\1_00000000_/g' "$out/$target/$module.ptx"
  done
done
if [ "$mode" = --check ]; then
  if ! diff -r "$out" ptx >/dev/null; then
    diff -r "$out" ptx | head -20
    echo "gen-ptx: committed ptx/ is stale; run scripts/gen-ptx.sh" >&2
    exit 1
  fi
  rm -rf "$out"
  echo "gen-ptx: ptx/ is fresh"
fi
