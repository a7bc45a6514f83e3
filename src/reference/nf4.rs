//! NF4 (QLoRA's 4-bit NormalFloat) exactly as bitsandbytes' CUDA kernels compute it:
//! `quantize_4bit(w, blocksize, compress_statistics, quant_type="nf4")` and
//! `dequantize_4bit`, bitsandbytes 0.50.2 (`kQuantizeBlockwise`, `kQuantizeBlockwiseSmall`,
//! `kDequantizeBlockwise` in `csrc/kernels.cu`, built with `--use_fast_math`).
//!
//! The format (DESIGN.md §6): the weight is flattened row-major and cut into blocks of
//! `blocksize` elements (the last block may be short); each block stores its f32 absmax and
//! one 4-bit code per element, two codes per byte with element `2i` in the **high** nibble.
//! With double quantization the absmaxes are stored as 8-bit codes of `absmax - offset`
//! (`offset` = their mean) in blocks of 256, with an f32 absmax per such block.
//!
//! What bitsandbytes' CUDA kernel does, step by step (read from its source and confirmed on
//! the sm_90 SASS of `libbitsandbytes_cuda130.so`):
//! - `absmax = max |x|` over the block, in f32 (`FMNMX.FTZ`: subnormal inputs count as 0).
//!   The tail block's missing elements are loaded as 0, which never changes the max.
//! - `r = 1 / absmax` by `MUFU.RCP` (fast math: `rcp.approx.ftz.f32`), then each element's
//!   code is `nf4_index(x * r)` (`FMUL.FTZ`). An all-zero block has `r = inf`, `0 * inf = NaN`,
//!   and NaN takes code 0 (`-1.0`), so it dequantizes to `-0.0`.
//! - [`nf4_index`] is a decision tree of strict `x > t` comparisons against 15 f32
//!   thresholds: a value exactly on a threshold takes the **lower** code. The thresholds are
//!   the midpoints of neighbouring codes written as decimal literals; four of them
//!   (between codes 0|1, 8|9, 12|13, 14|15) round to the f32 one ulp off the exact f32
//!   midpoint, so "nearest code, ties down" is true except at those four single values.
//! - An odd element count leaves the last byte's low nibble to a padding element loaded as
//!   0: code 7 (`0.0`), or code 0 if the last block is all zero (`0 * inf` again).
//! - Double quantization (`functional.quantize_4bit`): `offset = absmax.mean()` (a torch f32
//!   reduction), then `quantize_blockwise(absmax - offset, blocksize=256)` with the signed
//!   dynamic map: the same absmax and `MUFU.RCP`, then [`dynamic_index`] (`dQuantize<0>`).
//! - Dequantization: `NF4_CODE[q] * absmax` in f32 (`FMUL.FTZ`), rounded to the output dtype
//!   (round-to-nearest-even). A nested absmax is first `map[q] * absmax2 + offset` (the add
//!   in torch, IEEE f32).
//!
//! `MUFU.RCP` is an approximate reciprocal (≤ 1 ulp from `1/x`); [`reciprocal`] reproduces
//! the H100/H200 one bit for bit from a recorded table ([`super::mufu`]), so a code that
//! sits within an ulp of a threshold comes out as bitsandbytes' does. bitsandbytes' CUDA
//! output on an H200 (`tests/data/nf4/cuda/`: 65 weights, every blocksize and dtype, ties,
//! zero, subnormal and huge blocks) matches this reference bit for bit.
//!
//! Two places where this reference can differ from bitsandbytes' CUDA output, both
//! documented at the function that owns them:
//! - The offset: torch's mean sums in an order of its own; [`absmax_mean`] sums in f64. Use
//!   [`quantize_with_offset`] to reproduce a given offset bit for bit.
//! - NaN and Inf: bitsandbytes does not check (a NaN element is skipped by the max and takes
//!   code 0; an Inf absmax zeroes its block). [`quantize`] rejects them with a typed error.
//!
//! bitsandbytes' own CPU path is *not* the CUDA one (tests/nf4_reference.rs checks both):
//! the 4-bit codes come from torch ops (`backends/default/ops.py`) that divide the tail block
//! by its absmax instead of multiplying by the reciprocal (and store that block's absmax
//! clamped to 1e-38), give all-zero blocks code 7, compare against the exact f32
//! midpoints, and do not flush subnormals; the 8-bit nested
//! codes come from a 65536-entry lookup table (`csrc/cpu_ops.cpp`) that can pick a
//! neighbouring code; and the AVX-512 `dequantize_4bit` reads the wrong absmax when a row's
//! length is a multiple of 16 but not of the blocksize.

use crate::dtype::{DType, FloatElem};
use crate::error::{Error, Result};

/// The 16 NF4 values (bitsandbytes' `nf4_dequantization_lut`, as f32).
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// The pivots of bitsandbytes' `dQuantizeNF4` decision tree, ascending: `x` gets code `i`
/// when `NF4_THRESHOLDS[i-1] < x <= NF4_THRESHOLDS[i]`. These are bitsandbytes' decimal
/// literals, which Rust and nvcc both round once to f32 (the test pins the bits).
#[allow(clippy::excessive_precision)]
pub const NF4_THRESHOLDS: [f32; 15] = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
];

/// The code of `0.0`, which also pads an odd element count.
pub const NF4_ZERO: u8 = 7;

/// The blocksizes bitsandbytes' `quantize_4bit` accepts.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The blocksize of the second (8-bit) quantization of the absmaxes.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The NF4 code of `x` (already scaled into [-1, 1]), as bitsandbytes' decision tree picks
/// it: the number of thresholds strictly below `x`. The tree is a binary search over the
/// sorted thresholds, so this is the same function; ties go to the lower code, and NaN,
/// which compares false everywhere, gets code 0.
pub fn nf4_index(x: f32) -> u8 {
    NF4_THRESHOLDS.iter().filter(|&&t| x > t).count() as u8
}

/// The positive half of bitsandbytes' `create_dynamic_map(signed=True)` (indices 128..=254)
/// as f32 bits. The map is 7 decades of linearly spaced fractions, `±10^(e-6) · f` for
/// `e = 0..7`, plus 0 and 1; bitsandbytes builds it with torch's f32 `linspace`, whose exact
/// roundings are easier to table than to recompute (the test checks it against bitsandbytes).
const DYNAMIC_MAP_POSITIVE: [u32; 127] = [
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333,
];

/// bitsandbytes' signed dynamic 8-bit map, ascending: `map[i] = -map[254 - i]` for
/// `i < 127`, `map[127] = 0`, `map[255] = 1` (there is no `-1`).
pub fn dynamic_map() -> [f32; 256] {
    let mut map = [0.0f32; 256];
    for (i, &bits) in DYNAMIC_MAP_POSITIVE.iter().enumerate() {
        map[128 + i] = f32::from_bits(bits);
        map[126 - i] = -f32::from_bits(bits);
    }
    map[255] = 1.0;
    map
}

/// The 8-bit code of `x` (scaled into [-1, 1]) in a sorted 256-entry map, as bitsandbytes'
/// `dQuantize<0>` picks it: a 7-step binary search with strict `x > val`, then a choice
/// between the last pivot and its neighbour by their f32 midpoint, `(a + b) * 0.5f` (no
/// subnormals arise: the map's smallest magnitude is 5.5e-7). NaN walks down to code 0.
pub fn dynamic_index(map: &[f32; 256], x: f32) -> u8 {
    let (mut pivot, mut lower_pivot, mut upper_pivot) = (127usize, 0usize, 255usize);
    let (mut lower, mut upper) = (-1.0f32, 1.0f32);
    let mut val = map[pivot];
    let mut step = 64;
    while step > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = map[pivot];
        step /= 2;
    }
    // The search never compares against the ends: their values come from the map.
    if upper_pivot == 255 {
        upper = map[255];
    }
    if lower_pivot == 0 {
        lower = map[0];
    }
    let code = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    code as u8
}

/// `x` with a subnormal flushed to a zero of the same sign: what every f32 instruction does
/// under `--use_fast_math` (`.ftz`) to its inputs and its result.
pub fn flush_subnormal(x: f32) -> f32 {
    if x.is_subnormal() {
        0.0f32.copysign(x)
    } else {
        x
    }
}

/// `a * b` as `FMUL.FTZ` computes it.
pub fn mul_ftz(a: f32, b: f32) -> f32 {
    flush_subnormal(flush_subnormal(a) * flush_subnormal(b))
}

/// `1 / x` as bitsandbytes computes it: `MUFU.RCP` (`rcp.approx.ftz.f32`, fast math), which
/// is within one ulp of `1/x` but not always the correctly rounded value. See
/// [`super::mufu`].
pub fn reciprocal(x: f32) -> f32 {
    super::mufu::rcp_approx_ftz(x)
}

/// The double-quantized absmaxes (bitsandbytes' `state2` with `offset`).
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    /// One 8-bit code per NF4 block: the index into `code` of `(absmax - offset) / absmax2`.
    pub codes: Vec<u8>,
    /// One f32 absmax per `blocksize` codes.
    pub absmax: Vec<f32>,
    /// The 8-bit map (bitsandbytes' `nested_quant_map`; [`dynamic_map`] when we quantize).
    pub code: [f32; 256],
    /// Added back after dequantizing: the mean of the original absmaxes.
    pub offset: f32,
    /// [`NESTED_BLOCKSIZE`] when we quantize; a checkpoint may say otherwise.
    pub blocksize: usize,
}

/// The per-block scales of an NF4 weight. (The nested variant carries its 1 KiB map inline:
/// there is one per weight, so boxing it would buy nothing.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 absmax per NF4 block.
    Plain(Vec<f32>),
    /// The absmaxes double-quantized to 8-bit codes.
    Nested(NestedAbsmax),
}

/// An NF4-quantized weight in bitsandbytes' layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Quantized {
    /// The original weight's shape (`[out, in]` for a linear layer).
    pub shape: Vec<usize>,
    /// The original weight's dtype (bitsandbytes' `quant_state.dtype`).
    pub dtype: DType,
    /// Elements per NF4 block (one of [`BLOCKSIZES`]); the last block may be short.
    pub blocksize: usize,
    /// `ceil(numel / 2)` bytes, element `2i` in the high nibble.
    pub codes: Vec<u8>,
    /// The per-block scales: one per [`Nf4Quantized::blocks`].
    pub absmax: Absmax,
}

/// Errors unless bitsandbytes accepts `blocksize` (one of [`BLOCKSIZES`]); `op` names
/// what was asked for.
pub fn check_blocksize(op: &'static str, blocksize: usize) -> Result<()> {
    if BLOCKSIZES.contains(&blocksize) {
        return Ok(());
    }
    Err(Error::Unsupported {
        op,
        why: format!("blocksize {blocksize}: bitsandbytes allows {BLOCKSIZES:?}"),
    })
}

/// Checks what bitsandbytes would accept, and refuses the NaN/Inf it would silently mangle.
fn check_weight<T: FloatElem>(w: &[T], shape: &[usize], blocksize: usize) -> Result<()> {
    check_blocksize("nf4 quantize", blocksize)?;
    let numel = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if numel != Some(w.len()) {
        return Err(Error::ShapeMismatch {
            what: "nf4 quantize: weight length vs shape".into(),
            expected: shape.to_vec(),
            got: vec![w.len()],
        });
    }
    if w.is_empty() {
        return Err(Error::Unsupported {
            op: "nf4 quantize",
            why: "an empty weight".into(),
        });
    }
    if let Some(i) = w.iter().position(|x| !x.to_f32().is_finite()) {
        return Err(Error::InvalidArgument {
            what: "nf4 weight",
            why: format!(
                "element {i} is {}; bitsandbytes would quantize its block to garbage",
                w[i].to_f32()
            ),
        });
    }
    Ok(())
}

/// Blockwise absmax quantization, the part the 4-bit and the 8-bit kernels share: for each
/// block of `blocksize` values, its absmax and each value times the reciprocal of it.
fn scale_blocks(
    x: &[f32],
    blocksize: usize,
    code_of: impl Fn(f32) -> u8 + Sync,
) -> (Vec<u8>, Vec<f32>) {
    let absmax: Vec<f32> = x
        .chunks(blocksize)
        .map(|block| {
            block
                .iter()
                .fold(0.0f32, |m, &v| m.max(flush_subnormal(v.abs())))
        })
        .collect();
    let recips: Vec<f32> = absmax.iter().map(|&m| reciprocal(m)).collect();
    let codes = by_element(x.len(), 0u8, |i| {
        code_of(mul_ftz(x[i], recips[i / blocksize]))
    });
    (codes, absmax)
}

/// `[f(0), f(1), ..., f(n - 1)]`, on every core when n is large (each element computed
/// alone: the result does not depend on the split). At the GPU check's shapes (45 M
/// elements) a quantization or dequantization took about a second on one core.
fn by_element<T: Copy + Send>(n: usize, zero: T, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    const RUN: usize = 4096;
    let mut out = super::by_rows(n.div_ceil(RUN), RUN, 16, zero, |r, row| {
        for (j, o) in row.iter_mut().enumerate() {
            if r * RUN + j < n {
                *o = f(r * RUN + j);
            }
        }
    });
    out.truncate(n);
    out
}

/// The mean of the absmaxes in f64, rounded once to f32: summed in chunks of
/// `FK_NF4_MEAN_CHUNK` in index order, then the chunk sums in index order, as the kernel
/// sums them, so the two agree bitwise. bitsandbytes uses torch's f32 `mean()`, whose
/// summation order is torch's own, so its offset can be an ulp or so away;
/// [`quantize_with_offset`] takes bitsandbytes' value where that matters.
pub fn absmax_mean(absmax: &[f32]) -> f32 {
    let sum: f64 = absmax
        .chunks(crate::params::FK_NF4_MEAN_CHUNK as usize)
        .map(|chunk| chunk.iter().map(|&a| a as f64).sum::<f64>())
        .sum();
    (sum / absmax.len() as f64) as f32
}

/// Double quantization of the absmaxes given the offset:
/// `quantize_blockwise(absmax - offset, code=dynamic_map(), blocksize=256)`.
pub fn quantize_nested(absmax: &[f32], offset: f32) -> NestedAbsmax {
    let map = dynamic_map();
    // torch computes `absmax - offset` as a plain IEEE f32 subtraction.
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (codes, absmax2) = scale_blocks(&centered, NESTED_BLOCKSIZE, |x| dynamic_index(&map, x));
    NestedAbsmax {
        codes,
        absmax: absmax2,
        code: map,
        offset,
        blocksize: NESTED_BLOCKSIZE,
    }
}

/// Quantizes `w` (flattened row-major, `shape` its shape) to NF4 as bitsandbytes'
/// `quantize_4bit(..., quant_type="nf4", compress_statistics=double_quant)` does on CUDA.
/// Errors: a blocksize bitsandbytes does not accept, a shape that does not match `w`, an
/// empty weight, or a NaN/Inf element (which bitsandbytes does not check).
pub fn quantize<T: FloatElem>(
    w: &[T],
    shape: &[usize],
    blocksize: usize,
    double_quant: bool,
) -> Result<Nf4Quantized> {
    check_weight(w, shape, blocksize)?;
    let mut q = quantize_plain(w, shape, blocksize);
    if double_quant {
        let Absmax::Plain(absmax) = &q.absmax else {
            unreachable!()
        };
        q.absmax = Absmax::Nested(quantize_nested(absmax, absmax_mean(absmax)));
    }
    Ok(q)
}

/// [`quantize`] with double quantization around a given `offset` (e.g. the one bitsandbytes
/// computed), so the nested codes can be compared bit for bit.
pub fn quantize_with_offset<T: FloatElem>(
    w: &[T],
    shape: &[usize],
    blocksize: usize,
    offset: f32,
) -> Result<Nf4Quantized> {
    check_weight(w, shape, blocksize)?;
    if !offset.is_finite() {
        return Err(Error::InvalidArgument {
            what: "nf4 offset",
            why: format!("{offset}"),
        });
    }
    let mut q = quantize_plain(w, shape, blocksize);
    let Absmax::Plain(absmax) = &q.absmax else {
        unreachable!()
    };
    q.absmax = Absmax::Nested(quantize_nested(absmax, offset));
    Ok(q)
}

fn quantize_plain<T: FloatElem>(w: &[T], shape: &[usize], blocksize: usize) -> Nf4Quantized {
    let x: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
    let (nibbles, absmax) = scale_blocks(&x, blocksize, nf4_index);
    // The padding element of an odd count is a 0 in the last block: `0 * r`.
    let pad = nf4_index(mul_ftz(0.0, reciprocal(absmax[absmax.len() - 1])));
    let codes = nibbles
        .chunks(2)
        .map(|pair| pair[0] << 4 | pair.get(1).copied().unwrap_or(pad))
        .collect();
    Nf4Quantized {
        shape: shape.to_vec(),
        dtype: T::DTYPE,
        blocksize,
        codes,
        absmax: Absmax::Plain(absmax),
    }
}

impl NestedAbsmax {
    /// The f32 absmaxes, as bitsandbytes' `dequantize_blockwise` then `+ offset` compute them.
    pub fn dequantize(&self) -> Vec<f32> {
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                mul_ftz(self.code[q as usize], self.absmax[i / self.blocksize]) + self.offset
            })
            .collect()
    }
}

impl Nf4Quantized {
    /// Number of elements of the original weight: the product of `shape`.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of NF4 blocks, `ceil(numel / blocksize)`: one absmax each.
    pub fn blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    /// The 4-bit code of element `i`.
    pub fn code(&self, i: usize) -> u8 {
        let byte = self.codes[i / 2];
        if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0F
        }
    }

    /// Checks that the parts agree with each other (a checkpoint or a caller may have built
    /// them); the other methods assume it.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| {
            Err(Error::Unsupported {
                op: "nf4 weight",
                why,
            })
        };
        check_blocksize("nf4 weight", self.blocksize)?;
        if !matches!(self.dtype, DType::BF16 | DType::F16 | DType::F32) {
            return bad(format!(
                "dtype {}: NF4 weights are bf16, f16 or f32",
                self.dtype
            ));
        }
        let numel = self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let numel = match numel {
            Some(n) if n > 0 => n,
            _ => return bad(format!("shape {:?}", self.shape)),
        };
        Error::check_len("nf4 codes (bytes)", numel.div_ceil(2), self.codes.len())?;
        let blocks = numel.div_ceil(self.blocksize);
        match &self.absmax {
            Absmax::Plain(a) => Error::check_len("nf4 absmax", blocks, a.len()),
            Absmax::Nested(n) => {
                Error::check_len("nf4 nested codes", blocks, n.codes.len())?;
                if n.blocksize == 0 {
                    return bad("nested blocksize 0".into());
                }
                if !n.offset.is_finite() {
                    return bad(format!("nested offset {}", n.offset));
                }
                Error::check_len(
                    "nf4 nested absmax",
                    blocks.div_ceil(n.blocksize),
                    n.absmax.len(),
                )
            }
        }
    }

    /// One f32 absmax per block: the stored ones, or the nested ones dequantized.
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Nested(n) => n.dequantize(),
        }
    }

    /// The weight the tensor-core GEMV multiplies by: `NF4_CODE[q]` rounded to `C` (the
    /// activations' dtype, in which the codes enter `mma.sync`), times the f32 absmax, in
    /// f32 (one rounding of a product the kernel never rounds: 2⁻²⁴ relative, far below any
    /// matmul bound).
    pub fn dequantize_with_codes_in<C: FloatElem>(&self) -> Vec<f32> {
        let absmax = self.absmax_f32();
        by_element(self.numel(), 0.0, |i| {
            C::from_f32(NF4_CODE[self.code(i) as usize]).to_f32() * absmax[i / self.blocksize]
        })
    }

    /// The weight back in `O`, as bitsandbytes' `dequantize_4bit` computes it:
    /// `NF4_CODE[q] * absmax` in f32, rounded once to `O`. Panics if [`Self::validate`] fails.
    pub fn dequantize<O: FloatElem>(&self) -> Vec<O> {
        let absmax = self.absmax_f32();
        by_element(self.numel(), O::from_f32(0.0), |i| {
            O::from_f32(mul_ftz(
                NF4_CODE[self.code(i) as usize],
                absmax[i / self.blocksize],
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The immediates of bitsandbytes' `dQuantizeNF4` in its sm_90 SASS (`FSETP.GT.FTZ`).
    #[test]
    fn thresholds_are_the_kernels_f32_immediates() {
        let sass: [u32; 15] = [
            0xbf591cd9, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec, 0xbe0d38bc, 0xbd3a7871,
            0x3d22faff, 0x3df64863, 0x3e5067e0, 0x3e9582d4, 0x3ec753f9, 0x3f006d03, 0x3f248daf,
            0x3f5c89d9,
        ];
        assert_eq!(NF4_THRESHOLDS.map(f32::to_bits), sass);
    }

    /// bitsandbytes' `get_4bit_type("nf4")` as f32 bits (the CUDA table rounds the same).
    #[test]
    fn code_table_bits() {
        let bnb: [u32; 16] = [
            0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871,
            0x00000000, 0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab,
            0x3f3913b3, 0x3f800000,
        ];
        assert_eq!(NF4_CODE.map(f32::to_bits), bnb);
    }

    #[test]
    fn dynamic_map_is_sorted_and_symmetric() {
        let map = dynamic_map();
        assert!(map.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((map[0], map[127], map[255]), (-map[254], 0.0, 1.0));
        for (i, &v) in map.iter().enumerate() {
            assert_eq!(dynamic_index(&map, v), i as u8, "map[{i}] = {v}");
        }
    }
}
