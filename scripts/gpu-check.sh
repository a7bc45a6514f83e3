#!/usr/bin/env bash
# The one prepared GPU check (DESIGN.md §9), in two steps:
#
#   scripts/gpu-check.sh build
#       Here, on a CPU machine: release test binaries, fk, stripped, into .bundle/ (git-
#       ignored, at most 48 MiB) with a manifest.
#   scripts/gpu-check.sh run OUTDIR [--dry-run]
#       On the GPU machine, from the repository root with .bundle/ present: environment,
#       PTX rebuilt with that machine's nvcc, the GPU test suite (FK_REQUIRE_GPU=1) on the
#       committed and on the rebuilt PTX, compute-sanitizer (memcheck, racecheck, initcheck,
#       synccheck) on `fk check --small`, the register dump, `fk check`, `fk bench`, the
#       PyTorch/PEFT baselines and Nsight Compute's counters for `fk profile`. Writes OUTDIR/<date>-<gpu>.md and .json (format:
#       bench/results/README.md), the register dump and a log; prints a summary last.
#       --dry-run runs the same steps without a GPU, marking the GPU-only ones skipped, so
#       that the output format is tested here. For a lease with less time left:
#       FK_CHECK_SECONDS (default 240) bounds `fk check`; FK_BENCH_SECONDS (default 100)
#       each of `fk bench`'s families (each a process of its own); FK_TEST_SECONDS (default
#       120) each test binary; FK_PROFILE_SECONDS (default 120) each of the profile's two runs
#       (ncu writes a family's counters only when its run ends: a run cut short loses them
#       all; LoRA's has ≈ 55 launches, each replayed per section).
#
# It never changes the GPU's clocks, power or mode.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bundle=.bundle
max_bundle_mib=48

build() {
  set -e
  rm -rf "$bundle"
  mkdir -p "$bundle"
  # No PTX inside the binaries (FK_PTX_EMBED=0): the run reads ptx/ from the repository copy
  # through FK_PTX_DIR, which keeps the bundle small. A target dir of its own keeps the
  # normal build's embedded PTX.
  export FK_PTX_EMBED=0 CARGO_TARGET_DIR=target/bundle
  cargo build --release --locked --bin fk
  cp target/bundle/release/fk "$bundle/fk"
  # Test binaries: cargo prints their paths as JSON artifacts. Those that never touch a GPU
  # (the emulator's own tests, the CPU references) stay out: CI runs them, and on the GPU
  # machine they would only spend the lease and the bundle's size.
  local cpu_only=" cli emu emu_numeric emu_regdump lora_reference nf4_reference shards "
  cargo test --release --locked --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] != ["bin"] and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
    case "$cpu_only" in *" $name "*) continue ;; esac
    cp "$exe" "$bundle/test-$name"
  done
  strip "$bundle"/* 2>/dev/null || true
  {
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo none)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
    (cd "$bundle" && sha256sum fk test-*)
  } >"$bundle/MANIFEST"
  size=$(du -sm "$bundle" | cut -f1)
  echo "gpu-check build: $bundle is ${size} MiB:"
  ls -la "$bundle"
  if [ "$size" -gt "$max_bundle_mib" ]; then
    echo "gpu-check build: bundle exceeds ${max_bundle_mib} MiB" >&2
    exit 1
  fi
}

run() {
  out=${1:?usage: gpu-check.sh run OUTDIR [--dry-run]}
  dry=${2:-}
  mkdir -p "$out"
  work=$(mktemp -d)
  log="$out/gpu-check.log"
  : >"$log"
  start=$(date +%s)
  step() { echo "== $* ($(( $(date +%s) - start ))s)" | tee -a "$log"; }
  # The results file is rewritten after every step, so a run cut short still reports.
  results() { python3 scripts/gpu_results.py "$work" "$out" "$gpu_slug" "$(( $(date +%s) - start ))" "$@"; }
    [ -x "$bundle/fk" ] || { echo "gpu-check run: no $bundle/fk; run 'gpu-check.sh build' first" >&2; exit 2; }
  # The bundle's binaries carry no PTX: they load the repository's committed ptx/.
  export FK_PTX_DIR="$root/ptx"
  require=1; [ -n "$dry" ] && require=0

  step environment
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "bundle: $(head -1 "$bundle/MANIFEST")"
    if [ -z "$dry" ] && command -v nvidia-smi >/dev/null; then
      echo "gpu: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
      echo "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)"
      echo "cuda: $(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)"
      echo "clocks_at_start: $(nvidia-smi --query-gpu=clocks.sm,clocks.mem,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader | head -1)"
    else
      echo "gpu: none (dry run)"
    fi
    echo "nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo none)"
  } | tee "$work/env.txt" | tee -a "$log"
  gpu_slug=$(sed -n 's/^gpu: //p' "$work/env.txt" | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-' | sed 's/^nvidia-//')
  [ -n "$gpu_slug" ] || gpu_slug=none

  # cuBLAS for the baselines and the dispatch: PyTorch's wheels carry it.
  libdirs=$(python3 - 2>/dev/null <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for f in glob.glob(os.path.join(sp, "nvidia", "**", "libcublas*.so*"), recursive=True):
        dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
  export LD_LIBRARY_PATH="${libdirs:+$libdirs:}${LD_LIBRARY_PATH:-}"

  # Steps in order of what a short lease most needs: what only hardware can tell first.
  step "register dump"
  if [ -z "$dry" ]; then
    timeout 60 "$bundle/fk" regdump --out "$out/regdump-$gpu_slug.txt" --rcp-table "$out/rcp-$gpu_slug.bin" 2>&1 | tee -a "$log"
  else
    echo "skipped (dry run)" | tee -a "$log"
  fi

  # The driver JIT-compiles the PTX itself: its registers and local memory are the real ones
  # (the build checks' ptxas only predicts them).
  step "kernel resources as the driver compiled them"
  if [ -z "$dry" ]; then
    timeout 120 "$bundle/fk" kernels --resources >"$work/resources.txt" 2>&1
    tail -1 "$work/resources.txt" | tee -a "$log"
  else
    echo "skipped (dry run)" | tee "$work/resources.txt" | tee -a "$log"
  fi

  # GPU tests (FK_BACKENDS=gpu: the emulated ones run in CI).
  run_tests() {
    local which=$1 rc
    for t in "$bundle"/test-*; do
      echo "## $(basename "$t") ($which PTX)" >>"$work/tests-$which.txt"
      FK_BACKENDS=gpu FK_REQUIRE_GPU=$require timeout "${FK_TEST_SECONDS:-120}" "$t" --test-threads=4 \
        >"$work/binary.txt" 2>&1
      rc=$?
      cat "$work/binary.txt" >>"$work/tests-$which.txt"
      echo "exit $rc" >>"$work/tests-$which.txt"
      # A GPU fault ends the process's CUDA context and fails every test still running in it;
      # a kernel that never returns holds its test until the binary's timeout (exit 124), and
      # the tests beside it never report. Either way each such test (the first 4, 20 s each at
      # most: the lease is short) again in a process of its own says which one it was.
      [ "$rc" -eq 0 ] && continue
      {
        sed -n 's/^test \(.*\) \.\.\. FAILED$/\1 alone/p' "$work/binary.txt"
        if [ "$rc" -eq 124 ]; then
          "$t" --list --format terse 2>/dev/null | sed -n 's/: test$//p' | while read -r name; do
            grep -qF "test $name ... " "$work/binary.txt" || echo "$name alone (unfinished)"
          done
        fi
      } | head -4 | while read -r name how; do
        echo "### $name $how" >>"$work/tests-$which.txt"
        FK_BACKENDS=gpu FK_REQUIRE_GPU=$require timeout 20 "$t" --exact "$name" --test-threads=1 \
          >>"$work/tests-$which.txt" 2>&1
        echo "exit $?" >>"$work/tests-$which.txt"
      done
    done
    cp "$work/tests-$which.txt" "$out/tests-$which.txt"
    grep -E "^test .* \.\.\. |^exit |^##" "$work/tests-$which.txt" >>"$log"
  }
  step "tests on committed PTX"
  run_tests committed
  results >/dev/null

  step "fk bench"
  if [ -z "$dry" ]; then
    # Each family in a process of its own, at most FK_BENCH_SECONDS (default 100) each: a GPU
    # fault or a kernel that never returns costs that family's later rows, not the others'.
    timeout 420 "$bundle/fk" bench --seconds "${FK_BENCH_SECONDS:-100}" --json "$work/bench.json" \
      --md "$work/bench.md" >>"$log" 2>&1 || echo "fk bench: a family failed (bench.md says which)" | tee -a "$log"
  else
    echo "skipped (dry run)" | tee -a "$log"
  fi
  results >/dev/null

  step "PyTorch baselines"
  if [ -z "$dry" ]; then
    timeout 120 python3 scripts/torch_baselines.py --json "$work/torch.json" 2>&1 | tee -a "$log"
  else
    echo "skipped (dry run)" | tee -a "$log"
  fi
  results >/dev/null

  # Nsight Compute's counters for `fk profile`'s launches (one of each kernel with an open
  # question, bench/NOTES.md): throughput against the peaks, occupancy, where warps stall,
  # cache hit rates. --clock-control none: the clocks stay as they are (METHOD.md).
  step "hardware counters (ncu on fk profile)"
  ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | tail -1)
  if [ -z "$dry" ] && [ -n "$ncu_bin" ]; then
    # The sections this ncu knows of those wanted (an unknown name would end the run).
    known=$("$ncu_bin" --list-sections 2>/dev/null)
    sections=()
    for s in SpeedOfLight Occupancy LaunchStats WarpStateStats MemoryWorkloadAnalysis; do
      if [ -z "$known" ] || grep -qw "$s" <<<"$known"; then sections+=(--section "$s"); fi
    done
    echo "ncu: $("$ncu_bin" --version 2>/dev/null | tail -1); ${sections[*]}" >>"$work/profile.txt"
    # A family per run: ncu may write its report only when the program ends, so that a
    # timeout costs one family's counters, not both.
    for family in nf4 lora; do
      timeout "${FK_PROFILE_SECONDS:-120}" "$ncu_bin" --clock-control none "${sections[@]}" \
        --csv --page raw --print-units base --log-file "$work/ncu-$family.csv" \
        "$bundle/fk" profile "$family" >>"$work/profile.txt" 2>&1
      echo "$family: exit $?" >>"$work/profile.txt"
    done
    grep -v "^profile case: " "$work/profile.txt" | tail -4 | tee -a "$log"
  else
    echo "skipped (dry run or no ncu)" | tee "$work/profile.txt" | tee -a "$log"
  fi
  results >/dev/null

  step compute-sanitizer
  : >"$work/sanitizer.txt"
  for tool in memcheck racecheck initcheck synccheck; do
    if [ -z "$dry" ] && command -v compute-sanitizer >/dev/null; then
      timeout 45 compute-sanitizer --tool "$tool" --error-exitcode 9 "$bundle/fk" check --small --seed 1 >"$work/san-$tool.txt" 2>&1
      rc=$?
      echo "$tool: exit $rc; $(grep -c '^========= ' "$work/san-$tool.txt") sanitizer lines; $(tail -1 "$work/san-$tool.txt")" >>"$work/sanitizer.txt"
      grep -E "^========= (Invalid|Race|Uninit|Barrier|ERROR)" "$work/san-$tool.txt" | head -5 >>"$work/sanitizer.txt"
    else
      echo "$tool: skipped (dry run or no compute-sanitizer)" >>"$work/sanitizer.txt"
    fi
    results >/dev/null
  done
  cat "$work/sanitizer.txt" | tee -a "$log"

  step "fk check (realistic shapes)"
  FK_REQUIRE_GPU=$require timeout "${FK_CHECK_SECONDS:-240}" "$bundle/fk" check --seed "$(date +%s)" >"$work/check.txt" 2>&1
  echo "exit $?" >>"$work/check.txt"
  tail -5 "$work/check.txt" | tee -a "$log"
  results >/dev/null

  step "PTX rebuilt with this machine's nvcc"
  local_ptx="$work/ptx"
  if [ -z "$dry" ] && command -v nvcc >/dev/null; then
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
    target=sm_$arch; [ "$arch" = 90 ] && target=sm_90a
    if FK_NVCC=nvcc scripts/gen-ptx.sh --out "$local_ptx" "$target" 2>>"$log"; then
      # Every committed module, compared with its rebuilt twin.
      for f in ptx/"$target"/*.ptx; do
        module=$(basename "$f")
        cmp -s "$f" "$local_ptx/$target/$module" && echo "$module: identical to committed" ||
          echo "$module: differs from committed (nvcc $(nvcc --version | tail -1))"
      done | tee "$work/ptx.txt" | tee -a "$log"
    else
      # Half-rebuilt PTX would fail tests for the wrong reason: nothing is compared.
      echo "gen-ptx.sh failed with this machine's nvcc: not compared (log: $log)" | tee "$work/ptx.txt" | tee -a "$log"
    fi
    if grep -q "differs" "$work/ptx.txt"; then
      step "tests on rebuilt PTX"
      FK_PTX_DIR="$local_ptx" run_tests rebuilt
      export FK_PTX_DIR="$root/ptx"
    fi
  else
    echo "skipped (dry run or no nvcc)" | tee "$work/ptx.txt" | tee -a "$log"
  fi

  step "bitsandbytes NF4 vectors"
  # bitsandbytes itself quantizes the test weights (a slim copy of its package in .bnb/,
  # carried with the bundle); the vectors are committed under tests/data/nf4/.
  if [ -z "$dry" ] && [ -d .bnb ]; then
    PYTHONPATH=.bnb timeout 120 python3 scripts/nf4_vectors.py --device cuda --out "$work/nf4" 2>&1 | tail -5 | tee -a "$log"
    [ -d "$work/nf4" ] && tar -C "$work" -cf "$out/nf4-vectors.tar" nf4
  else
    echo "skipped (dry run or no .bnb/)" | tee -a "$log"
  fi

  step "results"
  results 2>&1 | tee -a "$log"
}

case "${1:-}" in
  build) build ;;
  run) shift; run "$@" ;;
  *) echo "usage: gpu-check.sh build | run OUTDIR [--dry-run]" >&2; exit 2 ;;
esac
