#!/usr/bin/env python3
"""Assembles the GPU check's results file from the pieces gpu-check.sh collected.

  gpu_results.py WORKDIR OUTDIR GPU_SLUG SECONDS
  gpu_results.py --self-test     (parses a sample of Nsight Compute's CSV; CI runs it)

Writes OUTDIR/<date>-<gpu>.md and OUTDIR/<date>-<gpu>.json (format: bench/results/README.md)
and prints the summary table last."""
import csv
import json
import math
import os
import re
import sys


def read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def read_json(path, default, notes):
    """A JSON file's value, or `default` (with a note saying why) when it is missing or cut
    short: a step killed mid-write must not cost the results of the others."""
    text = read(path)
    if not text.strip():
        return default
    try:
        return json.loads(text)
    except ValueError as e:
        notes.append(f"{os.path.basename(path)}: unreadable ({e}); left out")
        return default


def bench_rows(work, notes):
    """`fk bench`'s rows: bench.json holds the families that ended; a family still running
    when the step was cut wrote its rows one by one beside it (bench.json.families/), and
    those are taken too, marked."""
    rows = read_json(os.path.join(work, "bench.json"), [], notes)
    done = {r.get("family") for r in rows}
    families = os.path.join(work, "bench.json.families")
    for name in sorted(os.listdir(families)) if os.path.isdir(families) else []:
        family = name[: -len(".json")]
        if not name.endswith(".json") or family == "ceilings" or family in done:
            continue
        partial = read_json(os.path.join(families, name), [], notes)
        if partial:
            notes.append(f"bench family {family}: cut short, its {len(partial)} rows taken from {name}")
            rows += partial
    return rows


def write_whole(path, text):
    """`text` into `path` through a temporary file and a rename: a kill mid-write leaves the
    last whole version."""
    part = f"{path}.{os.getpid()}.part"  # a writer of its own: gpu-check.sh runs two at times
    with open(part, "w") as f:
        f.write(text)
    os.replace(part, path)


def parse_env(text):
    env = {}
    for line in text.splitlines():
        k, _, v = line.partition(": ")
        if v:
            env[k.strip()] = v.strip()
    return env


def parse_steps(log, seconds):
    """[[step, seconds it took]] from gpu-check.sh's log ("== NAME (Ns)" as each step starts),
    the last one up to the check's wall time so far: what to size a shorter lease by."""
    starts = [(m.group(1), int(m.group(2))) for m in re.finditer(r"^== (.*) \((\d+)s\)$", log, re.M)]
    ends = [t for _, t in starts[1:]] + [seconds]
    return [[name, end - start] for (name, start), end in zip(starts, ends)]


def parse_tests(text):
    """{binary: {"passed": n, "failed": [names], "unfinished": [names], "ignored": n, "exit":
    code, "alone": {name: "ok" / "FAILED" / "exit N"}}}: "alone", each failed test run again in a
    process of its own (gpu-check.sh: after a GPU fault, which ends the process's context, the
    tests that ran beside it fail too); "unfinished", the tests that had not reported when the
    binary was killed at its timeout, run again alone likewise (the first 4)."""
    out, cur, alone = {}, None, None
    for line in text.splitlines():
        if (m := re.match(r"^### (.*) alone( \(unfinished\))?$", line)) and cur is not None:
            alone = m.group(1)
            out[cur]["alone"][alone] = "not run"
            if m.group(2):
                out[cur]["unfinished"].append(alone)
        elif line.startswith("## "):
            cur, alone = line[3:].split(" (")[0], None
            out[cur] = {"passed": 0, "failed": [], "unfinished": [], "ignored": 0, "exit": None, "notes": [], "alone": {}}
        elif cur is None:
            continue
        elif alone is not None:
            if m := re.match(r"^test (.*) \.\.\. (ok|FAILED|ignored)", line):
                out[cur]["alone"][alone] = m.group(2)
            elif (m := re.match(r"^exit (\d+)", line)) and out[cur]["alone"][alone] == "not run":
                out[cur]["alone"][alone] = f"exit {m.group(1)}"
        elif m := re.match(r"^test (.*) \.\.\. (ok|FAILED|ignored)", line):
            if m.group(2) == "ok":
                out[cur]["passed"] += 1
            elif m.group(2) == "ignored":
                out[cur]["ignored"] += 1
            else:
                out[cur]["failed"].append(m.group(1))
        elif m := re.match(r"^exit (\d+)", line):
            out[cur]["exit"] = int(m.group(1))
        elif line.startswith("note: "):
            out[cur]["notes"].append(line[6:])
    return out


# Nsight Compute's raw metric names for the profile table's columns (absent ones print "—").
NCU_COLUMNS = [
    ("µs", "gpu__time_duration.sum"),
    ("DRAM %", "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("mem %", "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"),
    ("SM %", "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("occupancy %", "sm__warps_active.avg.pct_of_peak_sustained_active"),
    ("of theoretical %", "sm__maximum_warps_per_active_cycle_pct"),
    ("regs", "launch__registers_per_thread"),
    ("L1 hit %", "l1tex__t_sector_hit_rate.pct"),
    ("L2 hit %", "lts__t_sector_hit_rate.pct"),
]
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
TO_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}


def parse_ncu(text):
    """ncu --csv --page raw: a header of metric names, a row of units, a row per launch.
    Returns [{"kernel", "grid", "block", "metrics": {column: value}, "stalls": [[reason,
    cycles per issued instruction], ...] (the largest three)}], launches in order."""
    rows = list(csv.reader(l for l in text.splitlines() if l.startswith('"')))
    if len(rows) < 2 or "Kernel Name" not in rows[0]:
        return []
    names, units = rows[0], rows[1]
    launches = []
    for r in rows[2:]:
        cell = dict(zip(names, r))
        unit = dict(zip(names, units))

        def number(metric):
            try:
                v = float(cell.get(metric, "").replace(",", ""))
            except ValueError:
                return None
            if not math.isfinite(v):
                return None
            return v * TO_US.get(unit.get(metric, ""), 1.0) if metric == "gpu__time_duration.sum" else v

        stalls = sorted(((m.group(1), number(n)) for n in names if (m := STALL.match(n)) and number(n) is not None), key=lambda x: -x[1])
        launches.append({
            "kernel": cell.get("Kernel Name", "?"),
            "grid": cell.get("Grid Size", ""),
            "block": cell.get("Block Size", ""),
            "metrics": {label: number(metric) for label, metric in NCU_COLUMNS},
            "stalls": [[k, v] for k, v in stalls[:3]],
        })
    return launches


PREDICTIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "predictions.json")


def resolve(sel, bench, torch_rows):
    """A selector of bench/predictions.json against a run's rows: (µs, or the row's `field`
    where the selector names one, e.g. "saved_bytes"; label; bench row or None), or None when
    a row it needs, or that figure of it, is absent."""
    field = sel.get("field", "time_us")
    if "kernel" in sel:
        for r in bench:
            if r["kernel"] == sel["kernel"] and sel.get("shape", r["shape"]) == r["shape"] and r.get(field):
                label = r["kernel"] + (f" {sel['shape']}" if "shape" in sel else "") + ("" if field == "time_us" else f" ({field})")
                return r[field], label, r
        return None
    if "torch" in sel:
        for r in torch_rows:
            if r["name"] == sel["torch"] and r.get(field):
                return r[field], r["name"], None
        return None
    found = [x for x in (resolve(s, bench, torch_rows) for s in sel.get("any", sel.get("sum", []))) if x]
    if "any" in sel:
        return min(found, key=lambda x: x[0]) if found else None
    if len(found) != len(sel["sum"]):
        return None
    return sum(x[0] for x in found), " + ".join(x[1] for x in found), None


def judge(spec, bench, torch_rows):
    """Each target, prediction and decision of `spec` against a run's rows: {kind, where,
    what, row, measured (µs, or a ratio where it compares), expected, verdict}."""
    out = []
    for kind in ("targets", "predictions"):
        for e in spec.get(kind, []):
            got, vs, measured, verdict = resolve(e["row"], bench, torch_rows), e.get("vs"), None, "no row"
            label = got[1] if got else ""
            if got and vs is not None:
                if vs == "baseline":
                    base = (got[2]["baseline_us"], got[2]["baseline"]) if got[2] and got[2].get("baseline_us") else None
                else:
                    b = resolve(vs, bench, torch_rows)
                    base = (b[0], b[1]) if b else None
                if base:
                    measured, label = got[0] / base[0], f"{label} / {base[1]}"
                else:
                    label += " / (no row)"
            elif got:
                measured = got[0]
            if kind == "targets":
                expected = f"≤ {e['at_most']}"
                if measured is not None:
                    verdict = "met" if measured <= e["at_most"] else "MISSED"
            else:
                lo, hi = e["range"]
                expected = f"{lo}-{hi}"
                if measured is not None:
                    verdict = "in range" if lo <= measured <= hi else "below" if measured < lo else "above"
            where = f"issue {e['issue']}" if kind == "targets" else f"session {e.get('session', '?')}"
            out.append({"kind": kind[:-1], "where": where, "what": e["what"], "row": label,
                        "measured": measured, "expected": expected, "verdict": verdict})
    # A decision: its options by time, the fastest first; measured, the next one's time over
    # the fastest's (how much the choice matters).
    for d in spec.get("decisions", []):
        timed = sorted((got[0], o["name"]) for o in d["options"] if (got := resolve(o["row"], bench, torch_rows)))
        missing = [o["name"] for o in d["options"] if o["name"] not in {n for _, n in timed}]
        measured = timed[1][0] / timed[0][0] if len(timed) > 1 else None
        verdict = ("no row" if not timed else f"only {timed[0][1]}" if len(timed) == 1
                   else f"{timed[0][1]} fastest, then {timed[1][1]}")
        row = ", ".join(f"{n} {t:.1f} µs" for t, n in timed) + (f"; no row: {', '.join(missing)}" if missing else "")
        out.append({"kind": "decision", "where": d["where"], "what": d["what"], "row": row,
                    "measured": measured, "expected": "the fastest", "verdict": verdict})
    return out


def judged_lines(judged):
    """The Markdown table of [`judge`]'s output."""
    md = ["| | what | measured | expected | verdict | rows |", "|---|---|---:|---|---|---|"]
    for j in judged:
        m = "—" if j["measured"] is None else f"{j['measured']:.3f}" if j["measured"] < 10 else f"{j['measured']:.1f}"
        md.append(f"| {j['kind']}, {j['where']} | {j['what']} | {m} | {j['expected']} | {j['verdict']} | {j['row'] or '—'} |")
    return md


def main():
    work, out, slug, seconds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    env = parse_env(read(os.path.join(work, "env.txt")))
    date = env.get("date", "unknown")[:10]
    # Several runs a day: the stem carries the start time (UTC), e.g. 2026-11-26T0806-h200.
    when = env.get("date", "unknown")
    stem = f"{when[:10]}T{when[11:13]}{when[14:16]}-{slug}" if len(when) >= 16 else f"{when}-{slug}"
    tests = {w: parse_tests(read(os.path.join(work, f"tests-{w}.txt"))) for w in ("committed", "rebuilt")}
    sanitizer = read(os.path.join(work, "sanitizer.txt")).strip()
    resources = read(os.path.join(work, "resources.txt")).strip()
    check = read(os.path.join(work, "check.txt")).strip()
    notes = []
    bench = bench_rows(work, notes)
    bench_md = read(os.path.join(work, "bench.md")).strip()
    if not bench_md and bench:
        bench_md = "bench.md not written (the step was cut short): the rows are in the .json file."
    torch_rows = read_json(os.path.join(work, "torch.json"), [], notes)
    judged = judge(json.loads(read(PREDICTIONS, "{}") or "{}"), bench, torch_rows)
    ptx = read(os.path.join(work, "ptx.txt")).strip()
    regdump = sorted(f for f in os.listdir(work) if f.startswith("regdump-"))
    profile_log = read(os.path.join(work, "profile.txt")).strip()
    steps = parse_steps(read(os.path.join(work, "gpu-check.log")), seconds)
    ncu = {family: read(os.path.join(work, f"ncu-{family}.csv")) for family in ("nf4", "lora")}
    for family, text in ncu.items():  # every metric, named for the results (in raw.tar.gz)
        if text:
            write_whole(os.path.join(work, f"{stem}-ncu-{family}.csv"), text)
    try:
        profile = {"launches": [l for text in ncu.values() for l in parse_ncu(text)], "error": None}
    except Exception as e:  # an unexpected ncu format must not cost the rest of the results
        profile = {"launches": [], "error": f"{type(e).__name__}: {e}"}
    profile["cases"] = [l[len("profile case: "):] for l in profile_log.splitlines() if l.startswith("profile case: ")]
    profile["log_tail"] = [l for l in profile_log.splitlines() if not l.startswith("profile case: ")][-5:]
    # ncu's own errors and warnings go to its log file, with the CSV.
    profile["log_tail"] += [l for text in ncu.values() for l in text.splitlines() if l.startswith(("==ERROR==", "==WARNING=="))][:10]

    result = {
        "format": "finetune-kernels gpu-check v1",
        "environment": env,
        "seconds": seconds,
        "steps": steps,
        "ptx_rebuilt": ptx.splitlines(),
        "tests": tests,
        "sanitizer": sanitizer.splitlines(),
        "check": check.splitlines(),
        "regdump": regdump,
        "resources": resources.splitlines(),
        "bench": bench,
        "judged": judged,
        "torch": torch_rows,
        "profile": profile,
        "notes": notes,
    }
    write_whole(os.path.join(out, stem + ".json"), json.dumps(result, indent=1))

    def test_lines(which):
        rows = []
        for binary, r in tests[which].items():
            alone = lambda f: f" (alone: {r['alone'][f]})" if f in r["alone"] else ""
            failed = ", ".join(f + alone(f) for f in r["failed"])
            if r["unfinished"]:
                hung = "unfinished at the timeout: " + ", ".join(f + alone(f) for f in r["unfinished"])
                failed = f"{failed}; {hung}" if failed else hung
            failed = failed or ("crashed: no failing test, exit not 0" if r["exit"] not in (0, None) else "—")
            rows.append(f"| {binary} | {r['passed']} | {len(r['failed'])} | {r['ignored']} | {r['exit']} | {failed} |")
        return "\n".join(rows) or "| (not run) | | | | | |"

    md = [f"# GPU check {date}: {env.get('gpu', '?')}", ""]
    md += ["## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()] + [f"- wall time of the check: {seconds} s"]
    md += ["- steps (s): " + ", ".join(f"{name} {t}" for name, t in steps)]
    md += [f"- note: {n}" for n in notes] + [""]
    for which in ("committed", "rebuilt"):
        md += [f"## Tests ({which} PTX)", "", "| binary | passed | failed | ignored | exit | failures |", "|---|---:|---:|---:|---:|---|", test_lines(which), ""]
    md += ["## PTX rebuilt on the machine", "", "```", ptx, "```", ""]
    md += ["## compute-sanitizer (`fk check --small`)", "", "```", sanitizer, "```", ""]
    md += ["## Register dump", "", ", ".join(regdump) or "not recorded", ""]
    md += ["## Kernel resources as the driver compiled them (`fk kernels --resources`)", "", "```", resources or "not run", "```", ""]
    md += ["## fk check (realistic shapes)", "", "```", check, "```", ""]
    md += ["## Benchmarks", "", bench_md or "not run", ""]
    if torch_rows:
        md += ["## PyTorch / PEFT baselines (same run)", "", "| name | shape | time µs | note |", "|---|---|---:|---|"]
        for r in torch_rows:
            t = "—" if r["time_us"] is None else f"{r['time_us']:.2f}"
            md.append(f"| {r['name']} | {r['shape']} | {t} | {r['note']} |")
        md.append("")
    md += ["## Targets and predictions (`bench/predictions.json`, judged on the rows above)", ""]
    md += judged_lines(judged) + [""]
    md += ["## Hardware counters (Nsight Compute on `fk profile`)", ""]
    if profile["cases"]:
        md += ["Cases, in launch order: " + "; ".join(profile["cases"]) + ".", ""]
    if profile["launches"]:
        fmt = lambda v: "—" if v is None else f"{v:.0f}" if v == int(v) or abs(v) >= 1e4 else f"{v:.1f}"
        md += ["| # | kernel | grid | block | " + " | ".join(l for l, _ in NCU_COLUMNS) + " | top stalls (cycles per issued instruction) |",
               "|---:|---|---|---|" + "---:|" * len(NCU_COLUMNS) + "---|"]
        for i, k in enumerate(profile["launches"]):
            stalls = ", ".join(f"{r} {v:.1f}" for r, v in k["stalls"]) or "—"
            md.append(f"| {i} | `{k['kernel'][:60]}` | {k['grid']} | {k['block']} | "
                      + " | ".join(fmt(k["metrics"][l]) for l, _ in NCU_COLUMNS) + f" | {stalls} |")
        md.append("")
    md += ["```", "\n".join(profile["log_tail"]) or "not run", profile["error"] or "", "```", ""]
    write_whole(os.path.join(out, stem + ".md"), "\n".join(md))

    # The summary, printed last.
    print(f"\nresults: {out}/{stem}.md and .json ({seconds} s)")
    for which in ("committed", "rebuilt"):
        p = sum(r["passed"] for r in tests[which].values())
        fl = sum(len(r["failed"]) for r in tests[which].values())
        # A binary that exits non-zero without a failing test crashed (or was killed).
        crashed = [b for b, r in tests[which].items() if r["exit"] not in (0, None) and not r["failed"]]
        print(f"tests ({which} PTX): {p} passed, {fl} failed" + (f", crashed: {' '.join(crashed)}" if crashed else ""))
    for line in sanitizer.splitlines():
        if re.match(r"^\w+: ", line):
            print("sanitizer " + line[:110])
    # fk check ends at its time limit in a GPU check, before its own summary line, or stops
    # where a kernel fails to run ("check stopped: ...").
    verdicts = [l.split()[-1] for l in check.splitlines() if l.split()[-1:] in (["pass"], ["FAIL"])]
    stopped = next((l for l in check.splitlines() if l.startswith("check stopped:")), None)
    counted = f"fk check: {verdicts.count('pass')} rows passed, {verdicts.count('FAIL')} failed"
    print(next((l for l in check.splitlines() if "checks," in l),
               f"{counted}, then {stopped}" if stopped else f"{counted} (no summary: cut short)"))
    print(f"register dump: {', '.join(regdump) or 'none'}")
    print(next((l for l in resources.splitlines() if l.startswith("kernels with local memory")), "kernel resources: not run"))
    print(f"profile: {len(profile['launches'])} launches with counters" + (f" ({profile['error']})" if profile["error"] else ""))
    # Every row is in the results file; here (the end of what a device call shows) the verdicts.
    print(f"bench: {len(bench)} rows; targets and predictions (bench/predictions.json):")
    for j in judged:
        m = "—" if j["measured"] is None else f"{j['measured']:.3f}"
        print(f"  {j['verdict']:<8} {m:>9} (expected {j['expected']}) {j['what'][:80]}")


# A raw-page CSV as ncu writes it with --log-file (its progress lines, a header of metric
# names, a row of units, a row per launch; numbers with thousands separators; "n/a" where a
# metric has no value), shaped after published ones: `--self-test` parses it (CI runs it, as
# no GPU run has yet produced one here).
NCU_SAMPLE = """==PROF== Connected to process 4242 (/bundle/fk)
==PROF== Profiling "nf4_gemv_mma_bf16_m8" - 0: 0%....50%....100% - 38 passes
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","dram__throughput.avg.pct_of_peak_sustained_elapsed","gpu__time_duration.sum","launch__registers_per_thread","lts__t_sector_hit_rate.pct","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio","smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio"
"","","","","","","","","","","","%","nsecond","register/thread","%","","","",""
"0","4242","fk","127.0.0.1","nf4_gemv_mma_bf16_m8","1","7","(256, 1, 1)","(688, 1, 1)","0","9.0","41.25","24,130","80","12.5","0.85","9.31","1.02","n/a"
"1","4242","fk","127.0.0.1","void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(T1::Params)","1","7","(128, 1, 1)","(1,024, 1, 1)","0","9.0","n/a","1,234,567","168","88","0.1","0.2","3.5","7.25"
==PROF== Disconnected from process 4242
"""


# A binary whose tests b and c failed beside each other (a fault), then each alone; and one
# killed at its timeout with test e unreported, which hangs alone too.
TESTS_SAMPLE = """## test-lora_kernels (committed PTX)
test a ... ok
test b ... FAILED
test c ... FAILED
test result: FAILED. 1 passed; 2 failed
exit 101
### b alone
test b ... FAILED
exit 101
### c alone
test c ... ok
exit 0
## test-nf4_kernels (committed PTX)
test d ... ok
exit 124
### e alone (unfinished)
exit 124
"""


def self_test():
    launches = parse_ncu(NCU_SAMPLE)
    assert len(launches) == 2, launches
    gemv, gemm = launches
    assert gemv["kernel"] == "nf4_gemv_mma_bf16_m8" and gemm["kernel"].startswith("void cutlass::Kernel2<"), launches
    assert gemv["grid"] == "(688, 1, 1)" and gemm["grid"] == "(1,024, 1, 1)", launches
    assert math.isclose(gemv["metrics"]["µs"], 24.13) and math.isclose(gemm["metrics"]["µs"], 1234.567), launches
    assert gemv["metrics"]["DRAM %"] == 41.25 and gemm["metrics"]["DRAM %"] is None, launches
    assert gemv["metrics"]["regs"] == 80 and gemv["metrics"]["SM %"] is None, launches
    assert gemv["stalls"] == [["long_scoreboard", 9.31], ["wait", 1.02], ["barrier", 0.85]], gemv["stalls"]
    assert [s[0] for s in gemm["stalls"]] == ["math_pipe_throttle", "wait", "long_scoreboard"], gemm["stalls"]
    assert parse_ncu("==ERROR== the profiler failed\n") == []
    log = "== environment (0s)\ndate: x\n== register dump (3s)\n== tests on committed PTX (10s)\nexit 0\n"
    assert parse_steps(log, 70) == [["environment", 3], ["register dump", 7], ["tests on committed PTX", 60]]
    tests = parse_tests(TESTS_SAMPLE)["test-lora_kernels"]
    assert tests["passed"] == 1 and tests["failed"] == ["b", "c"] and tests["exit"] == 101, tests
    assert tests["alone"] == {"b": "FAILED", "c": "ok"} and tests["unfinished"] == [], tests
    hung = parse_tests(TESTS_SAMPLE)["test-nf4_kernels"]
    assert hung["passed"] == 1 and hung["failed"] == [] and hung["exit"] == 124, hung
    assert hung["unfinished"] == ["e"] and hung["alone"] == {"e": "exit 124"}, hung
    # A target against its row's baseline, one through the fastest of several rows against
    # another row, a sum against a PyTorch row; predictions in, under and over their ranges,
    # and one whose row the run lacks.
    row = lambda k, t, shape="s", base=None: {"kernel": k, "shape": shape, "time_us": t,
                                              "baseline": base and "cuBLAS", "baseline_us": base}
    bench = [row("gemv", 12.0, "1x4", 40.0), row("gemv", 30.0, "1x8", 40.0), row("fwd a", 500.0),
             row("fwd b", 400.0), row("bwd", 600.0), row("copy", 10.0)]
    bench[3]["saved_bytes"] = 100
    torch_rows = [{"name": "peft", "shape": "s", "time_us": 1250.0, "note": ""},
                  {"name": "peft saved", "shape": "s", "time_us": None, "bytes": 400, "note": "400 bytes"}]
    spec = {"targets": [
        {"issue": 5, "what": "t1", "row": {"kernel": "gemv", "shape": "1x4"}, "vs": "baseline", "at_most": 0.3},
        {"issue": 5, "what": "t2", "row": {"kernel": "gemv", "shape": "1x8"}, "vs": "baseline", "at_most": 0.3},
        {"issue": 6, "what": "t3", "row": {"any": [{"kernel": "fwd a"}, {"kernel": "fwd b"}, {"kernel": "gone"}]},
         "vs": {"kernel": "copy"}, "at_most": 35},
        {"issue": 6, "what": "t4", "row": {"sum": [{"kernel": "fwd b"}, {"kernel": "bwd"}]},
         "vs": {"torch": "peft"}, "at_most": 0.8},
        {"issue": 6, "what": "t5", "row": {"any": [{"kernel": "fwd a", "field": "saved_bytes"},
                                                   {"kernel": "fwd b", "field": "saved_bytes"}]},
         "vs": {"torch": "peft saved", "field": "bytes"}, "at_most": 1.0}],
        "decisions": [
        {"what": "d1", "where": "x.rs", "options": [{"name": "a", "row": {"kernel": "fwd a"}},
                                                   {"name": "b", "row": {"kernel": "fwd b"}},
                                                   {"name": "gone", "row": {"kernel": "gone"}}]}],
        "predictions": [
        {"session": 1, "what": "p1", "row": {"kernel": "bwd"}, "range": [550, 650]},
        {"session": 1, "what": "p2", "row": {"kernel": "fwd a"}, "vs": {"kernel": "fwd b"}, "range": [1.3, 1.4]},
        {"session": 1, "what": "p3", "row": {"kernel": "copy"}, "range": [5, 8]},
        {"session": 1, "what": "p4", "row": {"kernel": "gone"}, "range": [1, 2]}]}
    judged = judge(spec, bench, torch_rows)
    verdicts = [j["verdict"] for j in judged]
    assert verdicts == ["met", "MISSED", "MISSED", "met", "met", "in range", "below", "above", "no row",
                        "b fastest, then a"], verdicts
    assert math.isclose(judged[4]["measured"], 0.25) and judged[4]["row"] == "fwd b (saved_bytes) / peft saved", judged[4]
    assert math.isclose(judged[-1]["measured"], 1.25) and judged[-1]["row"] == "b 400.0 µs, a 500.0 µs; no row: gone", judged[-1]
    assert math.isclose(judged[0]["measured"], 0.3) and math.isclose(judged[2]["measured"], 40.0), judged
    assert judged[2]["row"] == "fwd b / copy" and math.isclose(judged[3]["measured"], 0.8), judged
    assert len(judged_lines(judged)) == 2 + len(judged)
    spec = json.loads(read(PREDICTIONS))
    assert spec["targets"] and spec["predictions"], "bench/predictions.json"
    for e in spec["targets"] + spec["predictions"]:
        assert ("at_most" in e) != ("range" in e) and "row" in e and "what" in e, e
    assert all(len(d["options"]) > 1 and d["where"] for d in spec["decisions"]), spec["decisions"]
    # A step cut short: a family still running (its rows written one by one), one that ended,
    # and a PyTorch file cut mid-write.
    import tempfile
    with tempfile.TemporaryDirectory() as work:
        os.makedirs(os.path.join(work, "bench.json.families"))
        write_whole(os.path.join(work, "bench.json"), json.dumps([{"family": "nf4", "kernel": "a"}]))
        for family, rows in [("nf4", [{"family": "nf4", "kernel": "a"}]), ("lora", [{"family": "lora", "kernel": "b"}]),
                             ("ceilings", {"copy": 1})]:
            write_whole(os.path.join(work, "bench.json.families", family + ".json"), json.dumps(rows))
        write_whole(os.path.join(work, "torch.json"), '[{"name": "peft", "ti')
        notes = []
        assert [r["kernel"] for r in bench_rows(work, notes)] == ["a", "b"], notes
        assert read_json(os.path.join(work, "torch.json"), [], notes) == [] and len(notes) == 2, notes
    print("gpu_results self-test: parse_ncu, parse_steps, parse_tests, judge, cut-short steps ok")


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        self_test()
    elif sys.argv[1:2] == ["--judge"] and len(sys.argv) == 3:
        # An earlier results file against today's bench/predictions.json.
        with open(sys.argv[2]) as f:
            run = json.load(f)
        print("\n".join(judged_lines(judge(json.loads(read(PREDICTIONS)), run["bench"], run.get("torch", [])))))
    else:
        main()
