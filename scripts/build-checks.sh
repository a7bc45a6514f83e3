#!/usr/bin/env bash
# The build checks CI runs (DESIGN.md §3). No GPU needed; the pinned toolchain installs
# itself (scripts/install-toolchain.sh, scripts/gen-bindings.sh). Each check runs even if
# an earlier one failed; the script exits 1 if any failed and names them at the end.
#
#   1. ptx/ is exactly what the pinned nvcc makes of cuda/        (scripts/gen-ptx.sh --check)
#   2. src/params.rs is exactly what bindgen makes of cuda/params (scripts/gen-bindings.sh --check)
#   3. every kernel the Rust side can launch (`fk kernels`) is an `.entry` in
#      ptx/<target>/<module>.ptx for every target
#   4. ptxas -v on every ptx/<target>/*.ptx: no spills, no stack frame (local memory), no
#      "Potential Performance Loss" (ptxas serializing wgmma),
#      registers and static shared memory within cuda/budgets.txt, every kernel budgeted,
#      and the SASS (cuobjdump -sass of ptxas' cubin) matches the budget's opcode rules
#   5. no inline assembly outside cuda/include/ptx.cuh in anything under cuda/, except the
#      host emulator's runtime (cuda/emu/, not its .cu/.cuh kernels), whose assembly is
#      x86-64 for fiber switches, not PTX
#   6. the README performance table is what scripts/readme-perf.py generates
#   7. DESIGN.md is the project's design document: where the workplace's copy sits beside
#      the checkout (../shared/DESIGN.md), the two are the same (a clean clone has none)
#
# Ends with a table: kernel, registers per target, static smem, budget, SASS rule.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
start=$(date +%s)
failed=()
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

check() {
  local name=$1
  shift
  local t0=$(date +%s)
  echo "== $name"
  if "$@"; then
    echo "   ok ($(( $(date +%s) - t0 ))s)"
  else
    echo "   FAILED ($(( $(date +%s) - t0 ))s): $name"
    failed+=("$name")
  fi
}

kernel_checks() {
  local bin
  bin=$(scripts/install-toolchain.sh) || return 1
  # Release, as CI has just built it for the tests.
  if ! cargo run --release --quiet --bin fk -- kernels >"$work/kernels.txt"; then
    echo "   could not run 'fk kernels'"
    return 1
  fi
  python3 - "$bin" "$work" <<'PY'
import concurrent.futures as cf
import fnmatch
import glob
import os
import re
import subprocess
import sys

bin_dir, work = sys.argv[1], sys.argv[2]
TARGETS = ["sm_80", "sm_89", "sm_90a"]
errors = []


def fail(msg):
    errors.append(msg)
    print("   " + msg)


# ---- budgets -------------------------------------------------------------------------
budgets = []  # (line number, pattern, regs, smem, [(targets or None, negate, regex)])
with open("cuda/budgets.txt") as f:
    for no, line in enumerate(f, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) < 3 or not fields[1].isdigit() or not fields[2].isdigit():
            fail(f"cuda/budgets.txt:{no}: want 'PATTERN REGS SMEM [RULE...]', got {line!r}")
            continue
        rules = []
        for rule in fields[3:]:
            m = re.match(r"^((?:sm_\w+)(?:,sm_\w+)*):(.*)$", rule)
            targets, rx = (m.group(1).split(","), m.group(2)) if m else (None, rule)
            negate = rx.startswith("!")
            rx = rx[1:] if negate else rx
            for t in targets or []:
                if t not in TARGETS:
                    fail(f"cuda/budgets.txt:{no}: unknown target {t} (have {', '.join(TARGETS)})")
            try:
                rules.append((targets, negate, re.compile(rx)))
            except re.error as e:
                fail(f"cuda/budgets.txt:{no}: bad regex {rx!r}: {e}")
        budgets.append((no, fields[0], int(fields[1]), int(fields[2]), rules, fields[3:]))


def budget_for(kernel):
    for b in budgets:
        if fnmatch.fnmatchcase(kernel, b[1]):
            return b
    return None


# ---- entries: fk kernels against ptx/<target>/<module>.ptx -----------------------------
dirs = sorted(os.path.basename(d) for d in glob.glob("ptx/*") if os.path.isdir(d))
if dirs != sorted(TARGETS):
    fail(f"ptx/ holds {dirs}, expected {TARGETS}")
entries = {}  # (target, module) -> set of entry names
for t in TARGETS:
    for path in sorted(glob.glob(f"ptx/{t}/*.ptx")):
        module = os.path.basename(path)[:-4]
        with open(path) as f:
            entries[(t, module)] = set(re.findall(r"\.entry\s+([A-Za-z_$][\w$]*)\s*\(", f.read()))
wanted = [tuple(l.split()) for l in open(f"{work}/kernels.txt") if l.strip()]
for module, kernel in wanted:
    for t in TARGETS:
        if (t, module) not in entries:
            fail(f"entry: {module} {kernel}: no ptx/{t}/{module}.ptx")
        elif kernel not in entries[(t, module)]:
            fail(f"entry: {module} {kernel}: no .entry {kernel}( in ptx/{t}/{module}.ptx")
missing_entries = len(errors)
launchable = set(wanted)
for (t, module), names in sorted(entries.items()):
    extra = sorted(n for n in names if (module, n) not in launchable)
    if extra and t == TARGETS[0]:
        print(f"   note: ptx/*/{module}.ptx has entries the Rust side never launches: {', '.join(extra)}")
if len(errors) == missing_entries:
    print(f"   {len(wanted)} launchable kernels, each an .entry on {len(TARGETS)} targets")


# ---- ptxas -v and cuobjdump -sass ------------------------------------------------------
def assemble(t, path):
    module = os.path.basename(path)[:-4]
    cubin = f"{work}/{module}-{t}.cubin"
    p = subprocess.run([f"{bin_dir}/ptxas", "-v", f"-arch={t}", path, "-o", cubin],
                       capture_output=True, text=True)
    if p.returncode != 0:
        return t, module, None, p.stdout + p.stderr, ""
    s = subprocess.run([f"{bin_dir}/cuobjdump", "-sass", cubin], capture_output=True, text=True)
    return t, module, p.stdout + p.stderr, "", s.stdout if s.returncode == 0 else None


usage = {}  # (kernel, target) -> dict
sass = {}  # (kernel, target) -> text
jobs = [(t, p) for t in TARGETS for p in sorted(glob.glob(f"ptx/{t}/*.ptx"))]
with cf.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
    results = list(ex.map(lambda j: assemble(*j), jobs))
for t, module, log, err, sass_text in results:
    if log is None:
        fail(f"ptxas -arch={t} ptx/{t}/{module}.ptx failed:\n{err}")
        continue
    entry = props = None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)' for", line):
            entry = m.group(1)
            usage[(entry, t)] = {"module": module, "regs": None, "smem": 0, "stack": 0,
                                 "spill_st": 0, "spill_ld": 0, "cmem": 0}
        elif m := re.search(r"Function properties for (\S+)", line):
            props = m.group(1)
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            stack, st, ld = map(int, m.groups())
            if (props, t) in usage:
                usage[(props, t)].update(stack=stack, spill_st=st, spill_ld=ld)
            elif stack or st or ld:  # a non-inlined device function
                fail(f"{t} {module}: function {props}: {stack} B stack, {st} B spill stores, {ld} B spill loads")
        elif (m := re.search(r"Used (\d+) registers", line)) and entry:
            u = usage[(entry, t)]
            u["regs"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                u["smem"] = int(s.group(1))
            if c := re.search(r"(\d+) bytes cmem\[0\]", line):
                u["cmem"] = int(c.group(1))
        elif "Potential Performance Loss" in line:
            # e.g. C7513/C7514: ptxas serialized a kernel's wgmmas (each waits for the last)
            fail(f"ptxas {t} {module}: {line.strip()}")
        elif "warning" in line.lower():
            print(f"   ptxas {t} {module}: {line.strip()}")
    if sass_text is None:
        fail(f"cuobjdump -sass failed on the {t} cubin of {module}")
        continue
    for m in re.finditer(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass_text, re.S):
        sass[(m.group(1), t)] = m.group(2)

used_lines = set()
kernels = sorted({k for k, _ in usage})
for k in kernels:
    b = budget_for(k)
    for t in TARGETS:
        u = usage.get((k, t))
        if u is None:
            fail(f"{k}: not in ptxas output for {t}")
            continue
        where = f"{k} on {t}"
        if u["regs"] is None:
            fail(f"{where}: no register count in ptxas output")
        if u["spill_st"] or u["spill_ld"]:
            fail(f"{where}: spills ({u['spill_st']} B stores, {u['spill_ld']} B loads)")
        if u["stack"]:
            fail(f"{where}: {u['stack']} B stack frame (local memory)")
        if b is None:
            continue
        used_lines.add(b[0])
        if u["regs"] is not None and u["regs"] > b[2]:
            fail(f"{where}: {u['regs']} registers > budget {b[2]} (cuda/budgets.txt:{b[0]})")
        if u["smem"] > b[3]:
            fail(f"{where}: {u['smem']} B static smem > budget {b[3]} (cuda/budgets.txt:{b[0]})")
        code = sass.get((k, t))
        for targets, negate, rx in b[4]:
            if targets is not None and t not in targets:
                continue
            if code is None:
                fail(f"{where}: no SASS for the kernel in cuobjdump's output")
                break
            found = rx.search(code) is not None
            if found == negate:
                verb = "contains" if negate else "lacks"
                fail(f"{where}: SASS {verb} /{rx.pattern}/ (cuda/budgets.txt:{b[0]})")
    if b is None:
        fail(f"{k}: no line of cuda/budgets.txt matches it (every kernel needs a budget)")
for b in budgets:
    if b[0] not in used_lines:
        print(f"   note: cuda/budgets.txt:{b[0]} ({b[1]}) matches no kernel")

# ---- summary -------------------------------------------------------------------------
rows = []
for k in kernels:
    us = [usage.get((k, t), {}) for t in TARGETS]
    regs = "/".join(str(u.get("regs", "?")) for u in us)
    smem = max(u.get("smem", 0) for u in us)
    b = budget_for(k)
    rows.append((k, regs, str(smem), f"{b[2]} {b[3]}" if b else "NONE", " ".join(b[5]) if b else ""))
head = ("kernel", "regs " + "/".join(TARGETS), "smem", "budget", "SASS rules")
with open(f"{work}/summary.txt", "w") as f:
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    for r in [head] + rows:
        f.write("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4] + "\n")
print(f"   ptxas + SASS: {len(kernels)} kernels x {len(TARGETS)} targets, {len(errors)} problems")
sys.exit(1 if errors else 0)
PY
}

inline_ptx() {
  python3 - <<'PY'
import os
import re
import sys

ALLOWED = "cuda/include/ptx.cuh"
asm = re.compile(r"\b(?:asm|__asm__|__asm)\b\s*(?:volatile\b|__volatile__\b)?\s*(?:\(|\{)")
bad = 0
for dirpath, dirnames, files in os.walk("cuda"):
    host = dirpath == "cuda/emu" or dirpath.startswith("cuda/emu/")
    for name in sorted(files):
        path = os.path.join(dirpath, name)
        # The emulator's host runtime may hold x86-64 assembly (fiber switches); kernel
        # sources (.cu, .cuh) are checked wherever they are, cuda/emu/ included.
        if path == ALLOWED or (host and not name.endswith((".cu", ".cuh"))):
            continue
        try:
            text = open(path, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        # Blank out comments (keeping line breaks) so prose mentioning asm( is fine.
        text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
        text = re.sub(r"//[^\n]*", "", text)
        for m in asm.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            print(f"   {path}:{line}: inline assembly outside {ALLOWED}")
            bad += 1
sys.exit(1 if bad else 0)
PY
}

check "ptx/ matches the pinned nvcc (gen-ptx.sh --check)" scripts/gen-ptx.sh --check
check "src/params.rs matches cuda/params (gen-bindings.sh --check)" scripts/gen-bindings.sh --check
check "kernel entries, ptxas resources and SASS (cuda/budgets.txt)" kernel_checks
check "no inline PTX outside cuda/include/ptx.cuh" inline_ptx
check "README performance table is generated (readme-perf.py --check)" python3 scripts/readme-perf.py --check
design_copy() {
  local shared=../shared/DESIGN.md
  [ -f "$shared" ] || return 0
  cmp -s "$shared" DESIGN.md && return 0
  echo "DESIGN.md differs from $shared: take the design's change (cp $shared DESIGN.md) or change it there"
  return 1
}
check "DESIGN.md is the shared design document" design_copy

if [ -f "$work/summary.txt" ]; then
  echo
  echo "== ptxas resources (registers per target; static smem bytes, the most on any target)"
  cat "$work/summary.txt"
fi
echo
if [ ${#failed[@]} -gt 0 ]; then
  echo "build-checks: ${#failed[@]} FAILED in $(( $(date +%s) - start ))s:"
  printf '  - %s\n' "${failed[@]}"
  exit 1
fi
echo "build-checks: all passed in $(( $(date +%s) - start ))s"
