#!/usr/bin/env python3
"""PyTorch (and PEFT) baselines for the GPU check, timed the way `fk bench` times its
kernels: CUDA events, warm-up, L2 flushed before each repetition, median of 50, random data.

  python3 scripts/torch_baselines.py --json OUT.json

Prints one line per row and writes a JSON array of {name, shape, time_us, note} (PEFT's
memory row adds `bytes`), whole after each row: the GPU check may cut it short, so PEFT's
rows, which the issues' targets divide by, come first."""
import argparse
import json
import os
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    try:
        import torch
    except ImportError as e:  # the GPU check reports this and goes on
        print(f"torch baselines skipped: {e}")
        json.dump([], open(args.json, "w"))
        return
    if not torch.cuda.is_available():
        print("torch baselines skipped: no CUDA device")
        json.dump([], open(args.json, "w"))
        return
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    flush = torch.empty(2 * l2, dtype=torch.uint8, device=dev)
    rows = []

    def save():
        """The rows so far, whole (a temporary file renamed): the GPU check may cut this short."""
        with open(args.json + ".part", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(args.json + ".part", args.json)

    def bench(name, shape, fn, note="", reps=50, warmup=3):
        for _ in range(warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            flush.fill_(0x5A)
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        t = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))[reps // 2]
        rows.append({"name": name, "shape": shape, "time_us": t, "note": note})
        print(f"{name:<40} {shape:<28} {t:10.2f} us  {note}")
        save()

    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dtype)

    # PEFT's LoRA layer first (the LoRA targets divide by its rows): 8192 tokens, 4096→4096,
    # r=16, bf16. Its default keeps the adapter in f32, so it saves an f32 copy of x.
    try:
        import peft

        base = torch.nn.Sequential(torch.nn.Linear(4096, 4096, bias=False)).to(dev, torch.bfloat16)
        cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["0"], lora_dropout=0.0)
        model = peft.get_peft_model(base, cfg)
        for p in model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.02)
        x = randn(8192, 4096).requires_grad_(True)
        dy = randn(8192, 4096)
        with torch.no_grad():
            bench("peft LoRA forward", "8192x4096→4096 r16", lambda: model(x), note=f"peft {peft.__version__}")

        def fwd_bwd():
            x.grad = None  # each repetition writes x's gradient afresh, as a training step does
            y = model(x)
            y.backward(dy)

        bench("peft LoRA forward+backward", "8192x4096→4096 r16", fwd_bwd, note=f"peft {peft.__version__}")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        y = model(x)
        saved = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
        rows.append({"name": "peft LoRA memory saved for backward", "shape": "8192x4096→4096 r16",
                     "time_us": None, "bytes": saved, "note": f"{saved} bytes"})
        print(f"peft LoRA saves {saved / 2**20:.1f} MiB for backward (beyond y)")
        save()
        del y
    except Exception as e:  # noqa: BLE001 - a missing or changed PEFT must not stop the check
        print(f"peft baseline skipped: {e!r}")

    # Dense bf16 linear layers at the shapes fk bench runs through cuBLAS.
    for m, k, n in [(8192, 8192, 8192), (8192, 4096, 4096), (8192, 4096, 11008), (8192, 11008, 4096), (1, 4096, 11008), (1, 11008, 4096)]:
        x, w = randn(m, k), randn(n, k)
        bench("torch.nn.functional.linear bf16", f"{m}x{k}→{n}", lambda: torch.nn.functional.linear(x, w))

    # Sparse deltas: index_add_ (scatter) and index_select (gather) on 1% of 4096x11008.
    numel = 4096 * 11008
    k = numel // 100
    idx = torch.randperm(numel, generator=g, device=dev)[:k].sort().values
    w = randn(numel)
    v = randn(k)
    bench("torch index_add_ bf16", "1% of 4096x11008", lambda: w.index_add_(0, idx, v, alpha=0.5))
    v32 = randn(k, dtype=torch.float32)
    w32 = randn(numel, dtype=torch.float32)
    bench("torch index_add_ f32", "1% of 4096x11008", lambda: w32.index_add_(0, idx, v32, alpha=0.5))
    bench("torch index_select bf16→f32", "1% of 4096x11008", lambda: w.index_select(0, idx).float())

    save()


if __name__ == "__main__":
    sys.exit(main())
