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
if [ "$mode" = --check ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
if [ "$mode" = --out ]; then
  out=$2
  targets=("$3")
fi
mapfile -t flags < cuda/nvcc.flags
# One nvcc per module and target, FK_JOBS (else every core) at a time, the largest sources
# first so that the last to finish is a small one.
compile() {
  local target=$1 cu=$2 module
  module=$(basename "$cu" .cu)
  "$nvcc" "${flags[@]}" -arch="$target" -ptx "$cu" -o "$out/$target/$module.ptx" || return 1
  # Names with internal linkage (anonymous namespaces) carry a hash of the checkout's
  # path; one fixed value keeps the PTX the same wherever it is built (a module's
  # internal names are its own, so any consistent value links).
  sed -i -E 's/_(INTERNAL|GLOBAL__N_)_[0-9a-f]{8}_/_\1_00000000_/g' "$out/$target/$module.ptx"
}
jobs=${FK_JOBS:-$(nproc)}
mapfile -t sources < <(ls -S cuda/*.cu)
running=0 failed=0
for cu in "${sources[@]}"; do
  for target in "${targets[@]}"; do
    mkdir -p "$out/$target"
    if [ "$running" -ge "$jobs" ]; then
      wait -n || failed=1
      running=$((running - 1))
    fi
    compile "$target" "$cu" &
    running=$((running + 1))
  done
done
while [ "$running" -gt 0 ]; do
  wait -n || failed=1
  running=$((running - 1))
done
if [ "$failed" -ne 0 ]; then
  echo "gen-ptx: nvcc failed (its messages are above)" >&2
  exit 1
fi
if [ "$mode" = --check ]; then
  if ! diff -r "$out" ptx >/dev/null; then
    diff -r "$out" ptx | head -20
    echo "gen-ptx: committed ptx/ is stale; run scripts/gen-ptx.sh" >&2
    exit 1
  fi
  echo "gen-ptx: ptx/ is fresh"
fi
