#!/usr/bin/env python3
"""NF4 test vectors that bitsandbytes itself produces, for tests/nf4_reference.rs and
tests/nf4_checkpoint.rs.

    python3 scripts/nf4_vectors.py --device cpu --out tests/data/nf4/cpu
    PYTHONPATH=.bnb python3 scripts/nf4_vectors.py --device cuda --out "$OUT/nf4"

The inputs are the same on both devices (made on the CPU from a fixed seed). bitsandbytes'
CUDA kernels are the ground truth; its CPU path differs in documented places (see
src/reference/nf4.rs), which the Rust tests model. Files written to --out:

  vectors.safetensors     per case `<case>.input` (the weight), `.codes` (packed u8),
                          `.absmax` (f32, or u8 codes when double-quantized), and when
                          double-quantized `.nested_absmax`, `.offset` (f32 [1]) and
                          `.absmax_f32` (bitsandbytes' dequantized absmax); `.dequant` is
                          `dequantize_4bit` in the input's dtype. `nf4_code` and
                          `dynamic_map` are bitsandbytes' tables. Metadata: one JSON object
                          per case (blocksize, double_quant, kind) and the versions.
  checkpoint_input.safetensors
                          a small bf16 "model" (linears, embeddings, norms, lm_head).
  checkpoint_dq.safetensors, checkpoint_plain.safetensors
                          its linears as bitsandbytes `Linear4bit` (blocksize 64, with and
                          without double quantization), the whole state_dict saved the way
                          transformers saves one (safetensors, metadata format=pt).
  checkpoint_dequant.safetensors
                          `dq.<name>` / `plain.<name>`: bitsandbytes' dequantized linears.

    python3 scripts/nf4_vectors.py --check-fk IN.safetensors OUT.safetensors [--device D]

loads every NF4 weight of an `fk quantize` output with bitsandbytes
(`Params4bit.from_prequantized`, as transformers does), dequantizes it, compares it with the
input and with bitsandbytes' own quantization of the input, and checks the copied tensors.
Exits non-zero on any failure.
"""

import argparse
import json
import os
import sys

# torch.compile (which bitsandbytes' CPU fallbacks ask for) only changes their speed here,
# and costs minutes of compiling; run them eagerly.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
from bitsandbytes.backends.default import ops as default_ops  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
QS_SUFFIX = ".quant_state.bitsandbytes__nf4"


def as_f32(bits):
    return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)[0].item()


def next_after(x, direction, dtype):
    """The neighbour of x (already in dtype) towards +inf (direction 1) or -inf (-1)."""
    t = torch.tensor([x], dtype=dtype)
    return torch.nextafter(t, torch.tensor([direction * float("inf")], dtype=dtype))[0].item()


def nf4_code():
    return F.get_4bit_type("nf4", device="cpu")


def thresholds():
    """The 15 pivots of bitsandbytes' dQuantizeNF4, as the CUDA kernel's f32 immediates."""
    bits = [0xBF591CD9, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871,
            0x3D22FAFF, 0x3DF64863, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D03, 0x3F248DAF,
            0x3F5C89D9]
    return [as_f32(b) for b in bits]


def midpoints():
    """The f32 midpoints of neighbouring codes: bitsandbytes' CPU path compares with these;
    four of them are an ulp away from the CUDA thresholds."""
    c = nf4_code()
    return ((c[:-1] + c[1:]) / 2).tolist()


# ---------------------------------------------------------------------------- cases


def ties_case(dtype):
    """Blocks of 64 whose absmax is a power of two (so 1/absmax is exact on every path),
    holding every threshold, its neighbours in the dtype, the exact f32 midpoints and the
    codes themselves, times the absmax. One block's absmax is a negative element."""
    scales = {"f16": [1.0, -4.0, 2.0**-6, 2.0**10]}.get(dtype, [1.0, -4.0, 2.0**-10, 2.0**20])
    tdt = DTYPES[dtype]
    values = []
    for a in scales:
        block = [a]
        for t in thresholds():
            v = torch.tensor([t * abs(a)], dtype=tdt).item()
            block += [v, next_after(v, 1, tdt), next_after(v, -1, tdt)]
        block += [m * abs(a) for m in midpoints() if m not in thresholds()]
        block += [c * abs(a) for c in nf4_code().tolist()[1:-1]]
        values += (block + [0.0] * 64)[:64]
    values.append(0.3)  # a one-element tail block: odd count, padding nibble
    return torch.tensor(values, dtype=torch.float32).to(tdt)


def zero_blocks_case(g):
    """An all-zero block in the middle and an all-zero tail of odd length."""
    w = torch.randn(101, generator=g)
    w[32:64] = 0
    w[96:] = 0
    return w.to(torch.bfloat16)


def uniform_absmax_case(g):
    """Every block's absmax is 1, so absmax - mean is all zero for the nested quantization."""
    w = torch.rand(6, 64, generator=g) * 1.8 - 0.9
    w[torch.arange(6), torch.randint(0, 64, (6,), generator=g)] = torch.tensor([1.0, -1.0] * 3)
    return w.reshape(4, 96).to(torch.bfloat16)


def subnormal_case(g, dtype):
    """f32-subnormal values: bitsandbytes' CUDA build (--use_fast_math) flushes them to zero."""
    tiny = 2.0**-126
    w = torch.randn(3 * 32 + 3, generator=g)
    w[:32] = torch.randint(-(2**20), 2**20, (32,), generator=g).float() * 2.0**-149
    w[32:64] = (torch.rand(32, generator=g) * 2 - 1) * tiny
    w[32] = tiny
    w[33:36] = torch.tensor([tiny / 2, -tiny / 2, tiny * 0.75])
    return w.to(DTYPES[dtype])


def huge_case(g):
    """f32 blocks whose absmax is at least 2^126: MUFU.RCP.FTZ flushes 1/absmax to zero."""
    w = torch.randn(3 * 32 + 5, generator=g).clamp(-0.9, 0.9)
    w[:32] *= 3e38
    w[0] = 3e38
    w[32:64] *= 2.0**127
    w[40] = -(2.0**127)
    w[64:96] *= 2.0**125
    w[64] = 2.0**125
    return w


def negmax_case(g):
    """Blocks whose largest magnitude is a negative element, one of them f16's -65504."""
    w = (torch.rand(3, 100, generator=g) * 2 - 1) * 0.5
    flat = w.reshape(-1)
    for b in range(0, 300, 128):
        flat[b + 5] = -1.0
    flat[133] = -65504.0
    return w.to(torch.float16)


def random_weight(g, shape, scale, heavy):
    w = torch.randn(shape, generator=g)
    return (w**3 if heavy else w) * scale


def cases(g):
    """(name, weight, blocksize, double_quant, kind): random weights at every blocksize,
    dtype and double-quant setting with a short odd tail block, then crafted ones."""
    out = []
    k = 0
    for bs in BLOCKSIZES:
        rows = 3 if bs <= 256 else 2 if bs == 512 else 1
        for dtype in DTYPES:
            for dq in (False, True):
                scale = [0.02, 1.0, 37.0][k % 3]
                w = random_weight(g, (rows, bs + 7), scale, heavy=k % 4 == 3)
                out.append((f"random_bs{bs}_{dtype}_{'dq' if dq else 'plain'}",
                            w.to(DTYPES[dtype]), bs, dq, "random"))
                k += 1
    out += [
        ("nested_bf16", random_weight(g, (67, 301), 0.05, False).to(torch.bfloat16), 64, True, "random"),
        ("nested_f16", random_weight(g, (33, 333), 0.5, True).to(torch.float16), 32, True, "random"),
        ("shape_1", random_weight(g, (1,), 1.0, False).to(torch.bfloat16), 64, False, "shape"),
        ("shape_1_dq", random_weight(g, (1,), 1.0, False).to(torch.bfloat16), 64, True, "shape"),
        ("shape_3", random_weight(g, (3,), 1.0, False).to(torch.float16), 64, False, "shape"),
        ("shape_77", random_weight(g, (77,), 1.0, False), 32, True, "shape"),
        ("shape_3x5x7", random_weight(g, (3, 5, 7), 1.0, False).to(torch.bfloat16), 64, True, "shape"),
    ]
    for dtype in DTYPES:
        out.append((f"ties_{dtype}", ties_case(dtype), 64, False, "ties"))
    out += [
        ("zero_blocks", zero_blocks_case(g), 32, False, "zero"),
        ("zero_blocks_dq", zero_blocks_case(g), 32, True, "zero"),
        ("uniform_absmax", uniform_absmax_case(g), 64, True, "uniform_absmax"),
        ("subnormal_f32", subnormal_case(g, "f32"), 32, False, "subnormal"),
        ("subnormal_bf16", subnormal_case(g, "bf16"), 32, False, "subnormal"),
        ("huge_f32", huge_case(g), 32, False, "huge"),
        ("negmax_f16", negmax_case(g), 128, False, "negmax"),
    ]
    return out


# ---------------------------------------------------------------------------- bitsandbytes


class Dequantizer:
    """`dequantize_4bit`, except on the CPU where bitsandbytes 0.50.2's AVX-512 kernel indexes
    the absmax per row and so is wrong when a row's length is a multiple of 16 but not of the
    blocksize: there its default backend (the CUDA kernel's formula) is used, and the
    disagreements are counted."""

    def __init__(self):
        self.cpu_path_wrong = 0

    def __call__(self, q, state):
        out = F.dequantize_4bit(q, state, quant_type="nf4")
        if q.device.type != "cpu":
            return out
        absmax = state.absmax
        if state.nested:
            absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        compute = default_ops._dequantize_4bit_compute.__wrapped__  # eager, not torch.compile
        ref = compute(q.reshape(-1), absmax.float(), nf4_code(), state.blocksize, state.shape, state.dtype)
        if not torch.equal(out.view(torch.uint8), ref.view(torch.uint8)):
            self.cpu_path_wrong += 1
        return ref


def quantize_case(w, bs, dq, device, dequantize):
    q, state = F.quantize_4bit(w.to(device), blocksize=bs, compress_statistics=dq, quant_type="nf4")
    t = {
        "input": w,
        "codes": q.reshape(-1),
        "absmax": state.absmax,
        "dequant": dequantize(q, state),
    }
    if dq:
        t["nested_absmax"] = state.state2.absmax
        t["offset"] = state.offset.reshape(1).float()
        t["absmax_f32"] = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert torch.equal(state.state2.code.cpu(), F.create_dynamic_map())
        assert state.state2.blocksize == 256
    assert torch.equal(state.code.cpu(), nf4_code())
    return {k: v.detach().cpu().contiguous() for k, v in t.items()}


def write_vectors(out, device, g, meta, dequantize):
    tensors = {"nf4_code": nf4_code(), "dynamic_map": F.create_dynamic_map()}
    metadata = dict(meta)
    for name, w, bs, dq, kind in cases(g):
        for part, t in quantize_case(w, bs, dq, device, dequantize).items():
            tensors[f"{name}.{part}"] = t
        metadata[name] = json.dumps({"blocksize": bs, "double_quant": dq, "kind": kind})
    save_file(tensors, os.path.join(out, "vectors.safetensors"), metadata=metadata)
    print(f"vectors: {len(metadata) - len(meta)} cases")


# ---------------------------------------------------------------------------- checkpoints

HIDDEN, INTERMEDIATE, VOCAB = 48, 352, 50
LINEARS = {  # name: (in, out, bias)
    "model.layers.0.self_attn.q_proj": (HIDDEN, HIDDEN, False),
    "model.layers.0.self_attn.o_proj": (HIDDEN, HIDDEN, True),
    "model.layers.0.mlp.up_proj": (HIDDEN, INTERMEDIATE, False),
    "model.layers.0.mlp.down_proj": (INTERMEDIATE, HIDDEN, False),
    "model.layers.0.extra.odd_proj": (7, 5, True),  # 35 elements: an odd count
}


def checkpoint_input(g):
    t = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g),
         "model.layers.0.input_layernorm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=g),
         "model.norm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=g),
         "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.05}
    for name, (fan_in, fan_out, bias) in LINEARS.items():
        t[f"{name}.weight"] = torch.randn(fan_out, fan_in, generator=g) / fan_in**0.5
        if bias:
            t[f"{name}.bias"] = torch.randn(fan_out, generator=g) * 0.01
    return {k: v.to(torch.bfloat16).contiguous() for k, v in t.items()}


def bnb_state_dict(inputs, dq, device, dequantize):
    """The inputs with every linear replaced by a bitsandbytes Linear4bit, as a state_dict
    (what transformers saves for a 4-bit model), plus the linears dequantized."""
    state, dequant = {}, {}
    for name, t in inputs.items():
        module = name.rsplit(".", 1)[0]
        if module not in LINEARS:
            state[name] = t
            continue
        if not name.endswith(".weight"):
            continue
        fan_in, fan_out, bias = LINEARS[module]
        lin = bnb.nn.Linear4bit(fan_in, fan_out, bias=bias, compute_dtype=torch.bfloat16,
                                compress_statistics=dq, quant_type="nf4", quant_storage=torch.uint8)
        lin.weight = bnb.nn.Params4bit(t, requires_grad=False, blocksize=64,
                                       compress_statistics=dq, quant_type="nf4")
        if bias:
            lin.bias = torch.nn.Parameter(inputs[f"{module}.bias"], requires_grad=False)
        lin = lin.to(device)
        for k, v in lin.state_dict().items():
            state[f"{module}.{k}"] = v
        dequant[name] = dequantize(lin.weight.data, lin.weight.quant_state)
    cpu = lambda d: {k: v.detach().cpu().contiguous() for k, v in d.items()}  # noqa: E731
    return cpu(state), cpu(dequant)


def write_checkpoints(out, device, g, meta, dequantize):
    inputs = checkpoint_input(g)
    save_file(inputs, os.path.join(out, "checkpoint_input.safetensors"), metadata={"format": "pt"})
    all_dequant = {}
    for dq, tag in ((True, "dq"), (False, "plain")):
        state, dequant = bnb_state_dict(inputs, dq, device, dequantize)
        save_file(state, os.path.join(out, f"checkpoint_{tag}.safetensors"), metadata={"format": "pt"})
        all_dequant.update({f"{tag}.{k}": v for k, v in dequant.items()})
    save_file(all_dequant, os.path.join(out, "checkpoint_dequant.safetensors"), metadata=meta)
    print(f"checkpoints: {len(LINEARS)} Linear4bit modules, with and without double quant")


# ---------------------------------------------------------------------------- --check-fk


def check_fk(path_in, path_out, device):
    """bitsandbytes loads an `fk quantize` output, and it means the input; on CUDA, where
    bitsandbytes' own quantization is the reference, its codes and absmaxes are the same."""
    inputs, ours = load_file(path_in), load_file(path_out)
    failures = 0
    quantized = [k[: -len(QS_SUFFIX)] for k in ours if k.endswith(QS_SUFFIX)]
    for name in sorted(quantized):
        stats = {k[len(name) + 1:]: v for k, v in ours.items() if k.startswith(name + ".")}
        p = bnb.nn.Params4bit.from_prequantized(data=ours[name], quantized_stats=stats, device=device)
        qs = p.quant_state
        w = inputs[name].to(device)
        deq = Dequantizer()(p.data, qs).float()
        rel = ((deq - w.float()).norm() / w.float().norm()).item()
        q_bnb, s_bnb = F.quantize_4bit(w, blocksize=qs.blocksize, compress_statistics=qs.nested, quant_type="nf4")
        same = (q_bnb.reshape(-1) == p.data.reshape(-1)).float().mean().item()
        ok = qs.shape == w.shape and qs.dtype == w.dtype and rel < 0.15
        if device == "cuda":
            # fk models bitsandbytes' CUDA quantization bit for bit: codes and absmaxes agree.
            ok = ok and same == 1.0 and torch.equal(qs.absmax, s_bnb.absmax)
            if qs.nested:
                ok = ok and torch.equal(qs.state2.absmax, s_bnb.state2.absmax) and torch.equal(qs.offset, s_bnb.offset)
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} {name}: shape {list(qs.shape)} {qs.dtype} blocksize {qs.blocksize} "
              f"nested {qs.nested}; rel. error {rel:.4f}; bytes equal to bitsandbytes' {same:.6f}")
    for name, t in ours.items():
        if name in inputs and name not in quantized:
            same = t.dtype == inputs[name].dtype and torch.equal(t.view(torch.uint8), inputs[name].view(torch.uint8))
            failures += not same
            if not same:
                print(f"BAD {name}: copied tensor differs")
    print(f"{len(quantized)} NF4 weights loaded by bitsandbytes {bnb.__version__}, {failures} failures")
    return failures == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="directory for the vectors")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=20240531)
    ap.add_argument("--check-fk", nargs=2, metavar=("IN", "OUT"))
    args = ap.parse_args()
    if args.check_fk:
        sys.exit(0 if check_fk(*args.check_fk, args.device) else 1)
    if not args.out:
        ap.error("--out DIR is needed")
    os.makedirs(args.out, exist_ok=True)
    meta = {"device": args.device, "bitsandbytes": bnb.__version__, "torch": torch.__version__,
            "seed": str(args.seed),
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    g = torch.Generator().manual_seed(args.seed)
    dequantize = Dequantizer()
    write_vectors(args.out, args.device, g, meta, dequantize)
    write_checkpoints(args.out, args.device, g, meta, dequantize)
    if args.device == "cpu":
        print(f"bitsandbytes' own CPU dequantize_4bit disagreed with its default backend "
              f"on {dequantize.cpu_path_wrong} weights (those use the default backend)")
    print(f"written to {args.out}: {meta}")


if __name__ == "__main__":
    main()
