#!/usr/bin/env python3
"""Makes the PEFT test data for tests/lora_adapter.rs, with PEFT itself.

A two-layer model (`up`: Linear(37, 29) with bias, `block.down`: Linear(29, 19) without,
odd sizes, a dotted module name) gets LoRA on both Linear modules, with random nonzero A and
B (PEFT initializes B to zero, which would hide a wrong B). Two adapters:

  plain/    r = 5, lora_alpha = 7, lora_dropout = 0.1   scale = alpha / r
  rslora/   r = 3, lora_alpha = 6, use_rslora = true    scale = alpha / sqrt(r)

Written, all float32 on the CPU:

  base.safetensors            the base model's state_dict, plus an int64 `position_ids`
                              that a merge must copy through unchanged
  <adapter>/adapter_model.safetensors, <adapter>/adapter_config.json
                              PeftModel.save_pretrained (its README.md model card removed)
  <adapter>/io.safetensors    x [6, 37]; h = up(x) [6, 29]; y = down(h) [6, 19]: PEFT's
                              outputs in eval mode (dropout off)
  <adapter>/merged.safetensors  merge_and_unload()'s state_dict, plus position_ids

Run from the repository root (torch 2.11 CPU, peft 0.21.2, transformers 5.24):

  PYTHONPATH=.peft .venv-nf4/bin/python tests/data/lora/make_peft_adapter.py

and with --verify DIR to load an adapter directory written by this crate (tests/lora_adapter.rs
leaves its re-save of plain/ in target/tmp/lora/plain) with PeftModel.from_pretrained and
check that it computes exactly the y that plain/ does.
"""
import argparse
import copy
import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = 6


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Linear(29, 19, bias=False)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(37, 29)
        self.block = Block()

    def forward(self, x):
        return self.block.down(self.up(x))


def peft_outputs(model, x):
    """h = up(x) and y = down(h) of a PEFT-wrapped Tiny."""
    inner = model.base_model.model
    with torch.no_grad():
        h = inner.up(x)
        return h, inner.block.down(h)


def make(name, base, position_ids, **lora):
    out = os.path.join(HERE, name)
    config = LoraConfig(target_modules=["up", "down"], init_lora_weights=False, **lora)
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn_like(p) * 0.5)
    model.eval()
    model.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))
    x = torch.randn(ROWS, 37)
    h, y = peft_outputs(model, x)
    save_file({"x": x, "h": h.contiguous(), "y": y.contiguous()}, os.path.join(out, "io.safetensors"))
    merged = model.merge_and_unload().state_dict()
    merged["position_ids"] = position_ids
    save_file({k: v.contiguous() for k, v in merged.items()}, os.path.join(out, "merged.safetensors"))


def verify(adapter_dir):
    """PEFT loads `adapter_dir` and computes the same y as from plain/ (in this process:
    torch's f32 CPU matmuls need not repeat the last bit across runs)."""
    io = load_file(os.path.join(HERE, "plain", "io.safetensors"))
    ys = []
    for d in [os.path.join(HERE, "plain"), adapter_dir]:
        base = Tiny()
        state = load_file(os.path.join(HERE, "base.safetensors"))
        base.load_state_dict({k: v for k, v in state.items() if k != "position_ids"})
        model = PeftModel.from_pretrained(base, d).eval()
        ys.append(peft_outputs(model, io["x"])[1])
    diff = (ys[1] - ys[0]).abs().max().item()
    print(f"{adapter_dir}: PEFT loads it; max |y - y from plain/| = {diff}")
    assert diff == 0.0, "the re-saved adapter computes another y"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verify", metavar="DIR", help="check an adapter written by this crate")
    args = parser.parse_args()
    if args.verify:
        verify(args.verify)
        return
    torch.manual_seed(20240611)
    base = Tiny()
    position_ids = torch.arange(ROWS, dtype=torch.int64)
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    save_file({**state, "position_ids": position_ids}, os.path.join(HERE, "base.safetensors"))
    make("plain", base, position_ids, r=5, lora_alpha=7, lora_dropout=0.1)
    make("rslora", base, position_ids, r=3, lora_alpha=6, use_rslora=True)


if __name__ == "__main__":
    main()
