#!/usr/bin/env python3
"""Assembles the GPU check's results file from the pieces gpu-check.sh collected.

  gpu_results.py WORKDIR OUTDIR GPU_SLUG SECONDS

Writes OUTDIR/<date>-<gpu>.md and OUTDIR/<date>-<gpu>.json (format: bench/results/README.md)
and prints the summary table last."""
import json
import os
import re
import sys


def read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def parse_env(text):
    env = {}
    for line in text.splitlines():
        k, _, v = line.partition(": ")
        if v:
            env[k.strip()] = v.strip()
    return env


def parse_tests(text):
    """{binary: {"passed": n, "failed": [names], "ignored": n, "exit": code}}"""
    out, cur = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            cur = line[3:].split(" (")[0]
            out[cur] = {"passed": 0, "failed": [], "ignored": 0, "exit": None, "notes": []}
        elif cur is None:
            continue
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
    bench = json.loads(read(os.path.join(work, "bench.json"), "[]") or "[]")
    bench_md = read(os.path.join(work, "bench.md")).strip()
    torch_rows = json.loads(read(os.path.join(work, "torch.json"), "[]") or "[]")
    ptx = read(os.path.join(work, "ptx.txt")).strip()
    regdump = sorted(f for f in os.listdir(out) if f.startswith("regdump-"))

    result = {
        "format": "finetune-kernels gpu-check v1",
        "environment": env,
        "seconds": seconds,
        "ptx_rebuilt": ptx.splitlines(),
        "tests": tests,
        "sanitizer": sanitizer.splitlines(),
        "check": check.splitlines(),
        "regdump": regdump,
        "resources": resources.splitlines(),
        "bench": bench,
        "torch": torch_rows,
    }
    with open(os.path.join(out, stem + ".json"), "w") as f:
        json.dump(result, f, indent=1)

    def test_lines(which):
        rows = []
        for binary, r in tests[which].items():
            failed = ", ".join(r["failed"]) or ("crashed: no failing test, exit not 0" if r["exit"] not in (0, None) else "—")
            rows.append(f"| {binary} | {r['passed']} | {len(r['failed'])} | {r['ignored']} | {r['exit']} | {failed} |")
        return "\n".join(rows) or "| (not run) | | | | | |"

    md = [f"# GPU check {date}: {env.get('gpu', '?')}", ""]
    md += ["## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()] + [f"- wall time of the check: {seconds} s", ""]
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
    with open(os.path.join(out, stem + ".md"), "w") as f:
        f.write("\n".join(md))

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
    print(next((l for l in check.splitlines() if "checks," in l), "fk check: no summary"))
    print(f"register dump: {', '.join(regdump) or 'none'}")
    print(next((l for l in resources.splitlines() if l.startswith("kernels with local memory")), "kernel resources: not run"))
    for r in bench:
        base = f" vs {r['baseline']} {r['baseline_us']:.1f}" if r.get("baseline") else ""
        print(f"{r['kernel']:<32} {r['shape']:<28} {r['time_us']:9.2f} us {100 * r['fraction_of_floor']:5.0f}% of floor{base}")


if __name__ == "__main__":
    main()
