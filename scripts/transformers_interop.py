#!/usr/bin/env python3
"""Model directories written by `fk quantize` and `fk merge`, loaded by transformers itself.

tests/shards.rs holds the outputs to what the crate means them to be; this script asks the
libraries that will read them. A tiny Llama (2 layers, hidden 64, intermediate 192, bf16,
random weights) is saved by transformers in shards with their index, then:

  1. `fk quantize BASE NF4`: transformers loads NF4 (bitsandbytes' Linear4bit for the
     decoder's linears, from config.json's quantization_config) with no missing, unexpected
     or mismatched keys; embeddings, norms and lm_head stay dense. Its codes and logits are
     those of transformers quantizing BASE itself through bitsandbytes (the same
     BitsAndBytesConfig), its logits within NF4's error of the dense model's.
  2. An adapter made by PEFT on BASE (random A and B, r = 8, q_proj, v_proj, down_proj),
     `fk merge BASE ADAPTER MERGED`: transformers loads MERGED, and its logits are PEFT's
     (within bf16 rounding), and its weights are PEFT's merge_and_unload()'s to 1 ulp (PEFT
     adds the bf16-rounded delta to the weight, fk rounds once).
  3. `fk merge NF4 ADAPTER MERGED_NF4`: transformers loads it as NF4 again, with the codes
     and logits of PEFT's merge into the same bitsandbytes weights.
  4. The same model with tied embeddings (no lm_head tensor): after `fk quantize`, lm_head
     loads dense, tied to the embeddings.

Run from the repository root, after `cargo build --release` (torch, transformers, peft and
bitsandbytes for the CPU in a venv; the versions are printed):

  .venv-nf4/bin/python scripts/transformers_interop.py --fk target/release/fk --work /tmp/interop

Exits non-zero on any failure. Nothing here needs a GPU. Every row of every weight holds
whole blocks of 64: bitsandbytes' CPU dequantize_4bit reads the wrong absmax where a row's
length is a multiple of 16 but not of the blocksize (src/reference/nf4.rs), and its CPU
inference kernel refuses such rows, so at an intermediate size of 160 PEFT's merge into NF4
on the CPU starts from a wrong weight. tests/nf4_reference.rs holds the crate to
bitsandbytes' CUDA output at such shapes.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import bitsandbytes as bnb
import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)


def rel(a, b):
    """‖a − b‖ / ‖b‖ in f32."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def fk(binary, *args):
    run = subprocess.run([binary, *args], capture_output=True, text=True)
    print(f"$ fk {' '.join(args)}\n{run.stdout}{run.stderr}".rstrip())
    check(run.returncode == 0, f"fk {args[0]} exits 0")


def load(path, **kw):
    model, info = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", output_loading_info=True, **kw)
    bad = {k: v for k, v in info.items() if v}
    check(not bad, f"transformers loads {os.path.basename(path)} with every key in place {bad or ''}")
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def code_bytes_differ(a, b):
    """How many NF4 code bytes of `a` differ from `b`'s (before any forward: bitsandbytes'
    CPU inference repacks them in place), and how many there are."""
    differ = total = 0
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if type(p).__name__ == "Params4bit":
            differ += (p.data.view(torch.uint8) != q.data.view(torch.uint8)).sum().item()
            total += p.numel()
    return differ, total


def kinds(model):
    """The module class of each linear the checks care about."""
    layer = model.model.layers[0]
    return {
        "q_proj": type(layer.self_attn.q_proj).__name__,
        "down_proj": type(layer.mlp.down_proj).__name__,
        "lm_head": type(model.lm_head).__name__,
        "embed_tokens": type(model.model.embed_tokens).__name__,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fk", required=True, help="the fk binary")
    ap.add_argument("--work", required=True, help="a directory to write the models in (emptied first)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"bitsandbytes {bnb.__version__}")
    shutil.rmtree(args.work, ignore_errors=True)
    base_dir, nf4_dir, adapter_dir, merged_dir, merged_nf4_dir = (
        os.path.join(args.work, d) for d in ["base", "nf4", "adapter", "merged", "merged_nf4"])

    torch.manual_seed(20261129)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, torch_dtype="bfloat16")
    dense = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    dense.save_pretrained(base_dir, max_shard_size="40KB")
    shards = [f for f in os.listdir(base_dir) if f.endswith(".safetensors")]
    check(len(shards) > 1 and os.path.exists(os.path.join(base_dir, "model.safetensors.index.json")),
          f"the base model is sharded ({len(shards)} shards and an index)")
    ids = torch.randint(0, config.vocab_size, (3, 17))
    y_dense = logits(load(base_dir), ids)

    # 1. fk quantize, loaded as bitsandbytes NF4.
    fk(args.fk, "quantize", base_dir, nf4_dir)
    qc = json.load(open(os.path.join(nf4_dir, "config.json"))).get("quantization_config", {})
    print(f"quantization_config: {json.dumps(qc)}")
    ours = load(nf4_dir)
    k = kinds(ours)
    check(k["q_proj"] == "Linear4bit" and k["down_proj"] == "Linear4bit",
          f"the decoder's linears load as bitsandbytes' Linear4bit ({k})")
    check(k["lm_head"] == "Linear" and k["embed_tokens"] == "Embedding", "lm_head and the embeddings stay dense")
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    theirs = load(base_dir, quantization_config=bnb_config)
    # Both quantize the same bf16 weights: their codes could differ only where bitsandbytes'
    # CPU path rounds differently from its CUDA kernels (src/reference/nf4.rs).
    differ, total = code_bytes_differ(ours, theirs)
    check(differ == 0, f"NF4 codes: {differ} of {total} bytes differ from bitsandbytes' own quantization "
                       "(random weights miss the ties and zero blocks where its CPU path differs)")
    y_ours, y_theirs = logits(ours, ids), logits(theirs, ids)
    e_theirs, e_dense = rel(y_ours, y_theirs), rel(y_ours, y_dense)
    check(e_theirs == 0, f"NF4 logits: ours against bitsandbytes' own quantization, rel {e_theirs:.2e}")
    check(e_dense < 0.2 and rel(y_theirs, y_dense) < 0.2,
          f"NF4 logits against the dense model's: rel {e_dense:.2e} (bitsandbytes' {rel(y_theirs, y_dense):.2e}) < 0.2")

    # 2. A PEFT adapter, merged by fk into the dense weights.
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(load(base_dir), lora).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(adapter_dir)
    y_peft = logits(peft_model, ids)
    check(rel(y_peft, y_dense) > 1e-2, f"the adapter changes the logits (rel {rel(y_peft, y_dense):.2e})")
    fk(args.fk, "merge", base_dir, adapter_dir, merged_dir)
    merged = load(merged_dir)
    e = rel(logits(merged, ids), y_peft)
    check(e < 2e-2, f"merged dense logits against PEFT's unmerged ones: rel {e:.2e} < 2e-2")
    # PEFT's own merge on the CPU rounds its f32 delta to bf16, then adds in bf16: one more
    # rounding than fk's W + delta in f32, so at most 1 ulp apart.
    theirs_merged = dict(peft_model.merge_and_unload().named_parameters())
    worst, apart = 0, 0
    for name, w in merged.named_parameters():
        ulps = (w.data.view(torch.int16).int() - theirs_merged[name].data.view(torch.int16).int()).abs()
        worst, apart = max(worst, ulps.max().item()), apart + (ulps > 0).sum().item()
    check(worst <= 1, f"merged weights against PEFT's merge_and_unload: {apart} elements 1 ulp apart, "
                      f"at most {worst} ulp (bound 1)")

    # 3. The same adapter merged into the NF4 weights, requantized, against PEFT's merge into
    #    the same bitsandbytes weights (dequantize, add, quantize again).
    fk(args.fk, "merge", nf4_dir, adapter_dir, merged_nf4_dir)
    merged_nf4 = load(merged_nf4_dir)
    check(kinds(merged_nf4)["q_proj"] == "Linear4bit", "the NF4 merge loads as Linear4bit again")
    peft_nf4 = peft.PeftModel.from_pretrained(load(nf4_dir), adapter_dir).merge_and_unload()
    # The same sums quantized (PEFT's f32, fk's rounded once from f64 to f32): the same codes;
    # PEFT's dequantize to float32 where fk's keep the weight's bf16.
    differ, total = code_bytes_differ(merged_nf4, peft_nf4)
    check(differ == 0, f"merged NF4 codes: {differ} of {total} bytes differ from PEFT's merge into bitsandbytes' NF4")
    y_peft_nf4 = logits(peft_nf4, ids)
    e, e_unmerged = rel(logits(merged_nf4, ids), y_peft_nf4), rel(y_peft_nf4, y_peft)
    check(e < 1e-3, f"merged NF4 logits against PEFT's merge into bitsandbytes' NF4: rel {e:.2e} < 1e-3 "
                    f"(PEFT's against its dense unmerged: {e_unmerged:.2e})")

    # 4. Tied embeddings (no lm_head tensor in the checkpoint, as in many small models):
    #    lm_head stays the embeddings' dense weight.
    tied_config = LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": True})
    tied_dir, tied_nf4_dir = os.path.join(args.work, "tied"), os.path.join(args.work, "tied_nf4")
    LlamaForCausalLM(tied_config).to(torch.bfloat16).save_pretrained(tied_dir)
    fk(args.fk, "quantize", tied_dir, tied_nf4_dir)
    tied = load(tied_nf4_dir)
    check(type(tied.lm_head).__name__ == "Linear"
          and tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr(),
          "tied embeddings: lm_head loads dense, tied to the embeddings")
    e = rel(logits(tied, ids), logits(load(tied_dir), ids))
    check(e < 0.2, f"tied NF4 logits against the dense model's: rel {e:.2e} < 0.2")

    print(f"{len(failures)} failed" if failures else "all passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
