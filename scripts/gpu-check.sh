#!/usr/bin/env bash
# The one prepared GPU check (DESIGN.md §9), in two steps:
#
#   scripts/gpu-check.sh build
#       Here, on a CPU machine: release test binaries, fk, stripped, into .bundle/ (git-
#       ignored, at most 48 MiB) with a manifest.
#   scripts/gpu-check.sh run OUTDIR [--dry-run]
#       On the GPU machine, from the repository root with .bundle/ present (a device call
#       must carry it: .bundle is git-ignored): environment, the register dump, the kernels'
#       resources as the driver compiled them, the GPU test suite (FK_REQUIRE_GPU=1), the
#       PyTorch/PEFT baselines, `fk bench`, Nsight Compute's counters for `fk profile`,
#       `fk check`, compute-sanitizer (memcheck, synccheck, racecheck, initcheck) on
#       `fk check --small`, the PTX rebuilt with that machine's nvcc (and the tests again on
#       it if it differs), bitsandbytes' own NF4 vectors. Writes OUTDIR/<date>-<gpu>.md and
#       .json (format: bench/results/README.md) and OUTDIR/raw.tar.gz (the log, each step's
#       output, the register dump, the counters' CSVs): three files, as a device call brings
#       back at most 8, rewritten after every step and every 20 s, so that a run cut short
#       reports what it did. Prints a summary last.
#       --dry-run runs the same steps without a GPU, marking the GPU-only ones skipped, so
#       that the output format is tested here. Time limits (seconds), for a short lease:
#       FK_TEST_SECONDS (default 120) each test binary; FK_BENCH_SECONDS (default 100) each
#       of `fk bench`'s 8 families (each a process of its own); FK_PROFILE_NF4_SECONDS and
#       FK_PROFILE_LORA_SECONDS (defaults FK_PROFILE_SECONDS, else 60 and 120) the profile's
#       two runs (ncu writes a family's counters only when its run ends: a run cut short
#       loses them all; LoRA's has ≈ 55 launches, each replayed per section);
#       FK_CHECK_SECONDS (default 240) `fk check`.
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
  # through FK_PTX_DIR, which keeps the bundle small. A target dir of its own
  # (FK_BUNDLE_TARGET_DIR, default target/bundle) keeps the normal build's embedded PTX; CI,
  # which builds no more tests after this, gives it target/ to reuse the dependencies built.
  export FK_PTX_EMBED=0 CARGO_TARGET_DIR=${FK_BUNDLE_TARGET_DIR:-target/bundle}
  cargo build --release --locked --bin fk
  cp "$CARGO_TARGET_DIR/release/fk" "$bundle/fk"
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
  # A device run brings back at most 8 files: OUTDIR gets the results (.md, .json) and
  # raw.tar.gz, which holds the rest (the log, every step's output, the register dump, the
  # counters' CSVs). All three are rewritten after each step, and every 20 s by a ticker,
  # so a run cut short by its time limit keeps what it had done.
  work=$(mktemp -d)
  log="$work/gpu-check.log"
  : >"$log"
  start=$(date +%s)
  step() { echo "== $* ($(( $(date +%s) - start ))s)" | tee -a "$log"; }
  results() {
    python3 scripts/gpu_results.py "$work" "$out" "$gpu_slug" "$(( $(date +%s) - start ))" "$@"
    local part="$out/.raw.$BASHPID" rc
    # Exit 1 is a file that changed while read (a step still writing): the archive is whole.
    tar -C "$work" -czf "$part" . 2>/dev/null
    rc=$?
    if [ "$rc" -le 1 ]; then mv -f "$part" "$out/raw.tar.gz"; else rm -f "$part"; fi
  }
  [ -x "$bundle/fk" ] || { echo "gpu-check run: no $bundle/fk; run 'gpu-check.sh build' first" >&2; exit 2; }
  # The bundle's binaries carry no PTX: they load the repository's committed ptx/.
  export FK_PTX_DIR="$root/ptx"
  require=1; [ -n "$dry" ] && require=0

  step environment
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "bundle: $(head -1 "$bundle/MANIFEST")"
    if [ -z "$dry" ] && command -v nvidia-smi >/dev/null; then
      echo "gpu: $(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
      echo "driver: $(timeout 20 nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)"
      echo "cuda: $(timeout 20 nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -1)"
      echo "clocks_at_start: $(timeout 20 nvidia-smi --query-gpu=clocks.sm,clocks.mem,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader | head -1)"
    else
      echo "gpu: none (dry run)"
    fi
    echo "nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo none)"
  } | tee "$work/env.txt" | tee -a "$log"
  gpu_slug=$(sed -n 's/^gpu: //p' "$work/env.txt" | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-' | sed 's/^nvidia-//')
  [ -n "$gpu_slug" ] || gpu_slug=none
  ( while sleep 20; do results >/dev/null 2>&1; done ) &
  ticker=$!
  trap 'kill $ticker 2>/dev/null' EXIT

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

  # Steps in order of what a short lease most needs: what only hardware can tell, then what
  # the issues' targets and the open predictions read (the PyTorch rows, then the
  # benchmarks), the counters, the realistic check, the sanitizers (each tool reported as
  # it ends), the PTX rebuilt.
  step "register dump"
  if [ -z "$dry" ]; then
    timeout 60 "$bundle/fk" regdump --out "$work/regdump-$gpu_slug.txt" --rcp-table "$work/rcp-$gpu_slug.bin" 2>&1 | tee -a "$log"
  else
    echo "skipped (dry run)" | tee -a "$log"
  fi
  results >/dev/null

  # The driver JIT-compiles the PTX itself: its registers and local memory are the real ones
  # (the build checks' ptxas only predicts them).
  step "kernel resources as the driver compiled them"
  if [ -z "$dry" ]; then
    timeout 120 "$bundle/fk" kernels --resources >"$work/resources.txt" 2>&1
    tail -1 "$work/resources.txt" | tee -a "$log"
  else
    echo "skipped (dry run)" | tee "$work/resources.txt" | tee -a "$log"
  fi
  results >/dev/null

  # GPU tests (FK_BACKENDS=gpu: the emulated ones run in CI).
  run_tests() {
    local which=$1 rc
    for t in "$bundle"/test-*; do
      echo "## $(basename "$t") ($which PTX)" >>"$work/tests-$which.txt"
      FK_BACKENDS=gpu FK_REQUIRE_GPU=$require FK_ALLOW_NO_BACKEND=$((1 - require)) \
        timeout "${FK_TEST_SECONDS:-120}" "$t" --test-threads=4 \
        >"$work/binary.txt" 2>&1
      rc=$?
      cat "$work/binary.txt" >>"$work/tests-$which.txt"
      echo "exit $rc" >>"$work/tests-$which.txt"
      # A GPU fault ends the process's CUDA context and fails every test still running in it;
      # a kernel that never returns holds its test until the binary's timeout (exit 124), and
      # the tests beside it never report. Either way each such test (the first 4, 20 s each at
      # most: the lease is short) again in a process of its own says which one it was.
      if [ "$rc" -ne 0 ]; then
        {
          sed -n 's/^test \(.*\) \.\.\. FAILED$/\1 alone/p' "$work/binary.txt"
          if [ "$rc" -eq 124 ]; then
            "$t" --list --format terse 2>/dev/null | sed -n 's/: test$//p' | while read -r name; do
              grep -qF "test $name ... " "$work/binary.txt" || echo "$name alone (unfinished)"
            done
          fi
        } | head -4 | while read -r name how; do
          echo "### $name $how" >>"$work/tests-$which.txt"
          FK_BACKENDS=gpu FK_REQUIRE_GPU=$require FK_ALLOW_NO_BACKEND=$((1 - require)) \
            timeout 20 "$t" --exact "$name" --test-threads=1 \
            >>"$work/tests-$which.txt" 2>&1
          echo "exit $?" >>"$work/tests-$which.txt"
        done
      fi
      results >/dev/null
    done
    grep -E "^test .* \.\.\. |^exit |^##" "$work/tests-$which.txt" >>"$log"
  }
  step "tests on committed PTX"
  run_tests committed

  step "PyTorch baselines"
  if [ -z "$dry" ]; then
    timeout 120 python3 scripts/torch_baselines.py --json "$work/torch.json" 2>&1 | tee -a "$log"
  else
    echo "skipped (dry run)" | tee -a "$log"
  fi
  results >/dev/null

  step "fk bench"
  if [ -z "$dry" ]; then
    # Each family in a process of its own, at most FK_BENCH_SECONDS (default 100) each: a GPU
    # fault or a kernel that never returns costs that family's later rows, not the others'.
    # fk bench ends each family at its limit; the outer limit, past all 8 families' together,
    # only guards against fk bench itself. A family the run's end cuts short keeps the rows
    # it wrote (gpu_results.py takes them).
    timeout $(( 10 * ${FK_BENCH_SECONDS:-100} )) "$bundle/fk" bench --seconds "${FK_BENCH_SECONDS:-100}" \
      --json "$work/bench.json" --md "$work/bench.md" >>"$log" 2>&1 ||
      echo "fk bench: a family failed (bench.md says which)" | tee -a "$log"
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
    # timeout costs one family's counters, not both. LoRA's ≈ 55 launches take longer than
    # NF4's 6.
    for family in nf4 lora; do
      case $family in
        nf4) limit=${FK_PROFILE_NF4_SECONDS:-${FK_PROFILE_SECONDS:-60}} ;;
        lora) limit=${FK_PROFILE_LORA_SECONDS:-${FK_PROFILE_SECONDS:-120}} ;;
      esac
      timeout "$limit" "$ncu_bin" --clock-control none "${sections[@]}" \
        --csv --page raw --print-units base --log-file "$work/ncu-$family.csv" \
        "$bundle/fk" profile "$family" >>"$work/profile.txt" 2>&1
      echo "$family: exit $? (limit $limit s)" >>"$work/profile.txt"
      results >/dev/null
    done
    grep -v "^profile case: " "$work/profile.txt" | tail -4 | tee -a "$log"
  else
    echo "skipped (dry run or no ncu)" | tee "$work/profile.txt" | tee -a "$log"
  fi
  results >/dev/null

  step "fk check (realistic shapes)"
  FK_REQUIRE_GPU=$require timeout "${FK_CHECK_SECONDS:-240}" "$bundle/fk" check --seed "$(date +%s)" >"$work/check.txt" 2>&1
  echo "exit $?" >>"$work/check.txt"
  tail -5 "$work/check.txt" | tee -a "$log"
  results >/dev/null

  # memcheck and synccheck first: a fault or a barrier misuse ends a run; a race or an
  # uninitialized read is a finding.
  step compute-sanitizer
  : >"$work/sanitizer.txt"
  for tool in memcheck synccheck racecheck initcheck; do
    if [ -z "$dry" ] && command -v compute-sanitizer >/dev/null; then
      FK_REQUIRE_GPU=$require timeout 45 compute-sanitizer --tool "$tool" --error-exitcode 9 "$bundle/fk" check --small --seed 1 >"$work/san-$tool.txt" 2>&1
      rc=$?
      echo "$tool: exit $rc; $(grep -c '^========= ' "$work/san-$tool.txt") sanitizer lines; $(tail -1 "$work/san-$tool.txt")" >>"$work/sanitizer.txt"
      grep -E "^========= (Invalid|Race|Uninit|Barrier|ERROR)" "$work/san-$tool.txt" | head -5 >>"$work/sanitizer.txt"
    else
      echo "$tool: skipped (dry run or no compute-sanitizer)" >>"$work/sanitizer.txt"
    fi
    results >/dev/null
  done
  cat "$work/sanitizer.txt" | tee -a "$log"

  step "PTX rebuilt with this machine's nvcc"
  local_ptx=$(mktemp -d)  # not under $work: 15 MB a target, no need to bring it back
  if [ -z "$dry" ] && command -v nvcc >/dev/null; then
    arch=$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
    target=sm_$arch; [ "$arch" = 90 ] && target=sm_90a
    if FK_NVCC=nvcc timeout 240 scripts/gen-ptx.sh --out "$local_ptx" "$target" 2>>"$log"; then
      # Every committed module against its rebuilt twin, the compiler's header comments left
      # out (another nvcc 13 build writes its own version there and nothing else may differ).
      for f in ptx/"$target"/*.ptx; do
        module=$(basename "$f")
        cmp -s <(grep -v '^//' "$f") <(grep -v '^//' "$local_ptx/$target/$module") &&
          echo "$module: identical to committed" ||
          echo "$module: differs from committed (nvcc $(nvcc --version | tail -1))"
      done | tee "$work/ptx.txt" | tee -a "$log"
    else
      # Half-rebuilt PTX would fail tests for the wrong reason: nothing is compared.
      echo "gen-ptx.sh failed with this machine's nvcc: not compared (log: gpu-check.log)" | tee "$work/ptx.txt" | tee -a "$log"
    fi
    results >/dev/null
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
    [ -d "$work/nf4" ] && tar -C "$work" -cf "$work/nf4-vectors.tar" nf4 && rm -rf "$work/nf4"
  else
    echo "skipped (dry run or no .bnb/)" | tee -a "$log"
  fi

  kill "$ticker" 2>/dev/null
  wait "$ticker" 2>/dev/null
  step "results"
  results 2>&1 | tee -a "$log"
}

case "${1:-}" in
  build) build ;;
  run) shift; run "$@" ;;
  *) echo "usage: gpu-check.sh build | run OUTDIR [--dry-run]" >&2; exit 2 ;;
esac
