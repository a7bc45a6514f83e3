//! The NF4 reference (src/reference/nf4.rs) against bitsandbytes, and its properties.
//!
//! 1. Vectors that bitsandbytes produced (`tests/data/nf4/<device>/vectors.safetensors`, made
//!    by scripts/nf4_vectors.py). Vectors from bitsandbytes' CUDA kernels must match the
//!    reference bit for bit: codes, absmax, nested codes and absmax, dequantized absmax and
//!    weights. Vectors from its CPU path match bit for bit except where that path is
//!    documented to differ (src/reference/nf4.rs); there a model of the CPU path written
//!    here must match bitsandbytes instead, so the differences are pinned down too.
//! 2. `nf4_index` against bitsandbytes' decision tree transcribed node by node: at every
//!    threshold and its neighbouring f32 values, and on a sweep of all f32 bit patterns.
//! 3. Property tests on fresh random weights: every blocksize and dtype, odd sizes,
//!    with and without double quantization.

use finetune_kernels::reference::nf4::{
    absmax_mean, dynamic_index, dynamic_map, nf4_index, quantize, quantize_with_offset, Absmax,
    NestedAbsmax, Nf4Quantized, BLOCKSIZES, NF4_CODE, NF4_THRESHOLDS, NF4_ZERO,
};
use finetune_kernels::testing::random_vec;
use finetune_kernels::{bf16, f16, DType, Error, FloatElem};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

// ------------------------------------------------------------------ vectors from bitsandbytes

/// Every `tests/data/nf4/<device>/` that holds vectors (at least the committed CPU ones).
fn vector_dirs() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/nf4");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|d| d.join("vectors.safetensors").exists())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no NF4 vectors under {}", root.display());
    dirs
}

fn tensor<T: bytemuck::Pod>(st: &SafeTensors, name: &str) -> Vec<T> {
    let view = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    view.data()
        .chunks_exact(size_of::<T>())
        .map(bytemuck::pod_read_unaligned)
        .collect()
}

fn bits<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// One case's settings, from the file's metadata.
struct Case {
    name: String,
    blocksize: usize,
    double_quant: bool,
}

/// What the vectors showed beyond pass/fail, printed at the end.
#[derive(Default, Debug)]
struct Report {
    cases: usize,
    offsets_equal: usize,
    offsets: usize,
    offset_max_ulps: u32,
    cpu_blocks_differing: usize,
    cpu_nested_codes_off_by_one: usize,
}

/// The f32 midpoints of neighbouring codes, which bitsandbytes' CPU path compares with.
fn midpoints() -> Vec<f32> {
    NF4_CODE.windows(2).map(|p| (p[0] + p[1]) / 2.0).collect()
}

/// The scaled values the CPU and CUDA paths give different codes: four of the CUDA
/// kernel's thresholds are an ulp off the exact midpoint, and at either of the two the
/// paths disagree.
fn threshold_or_midpoint_mismatch(s: f32) -> bool {
    let off: Vec<(f32, f32)> = NF4_THRESHOLDS
        .into_iter()
        .zip(midpoints())
        .filter(|(t, m)| t != m)
        .collect();
    assert_eq!(off.len(), 4);
    off.iter().any(|&(t, m)| s == t || s == m)
}

/// bitsandbytes' CPU `quantize_4bit` (torch ops, `backends/default/ops.py`): no flush to
/// zero; `1 / max(absmax, 1e-38)` times the value, except the tail block, divided by its
/// clamped absmax; `bucketize` against the exact midpoints (ties down); the padding element
/// is a 0 after scaling (code 7); the tail block stores its clamped absmax. Returns the
/// unpacked codes (with the padding) and the absmax.
fn cpu_path_quantize(x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let mids = midpoints();
    let full = x.len() - x.len() % blocksize;
    let (mut codes, mut absmax) = (Vec::new(), Vec::new());
    for (b, block) in x.chunks(blocksize).enumerate() {
        let m = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let clamped = m.max(1e-38);
        let tail = b * blocksize >= full;
        for &v in block {
            let scaled = if tail {
                v / clamped
            } else {
                v * (1.0 / clamped)
            };
            codes.push(mids.iter().filter(|&&t| scaled > t).count() as u8);
        }
        absmax.push(if tail { clamped } else { m });
    }
    if x.len() % 2 == 1 {
        codes.push(NF4_ZERO);
    }
    (codes, absmax)
}

fn unpack(codes: &[u8]) -> Vec<u8> {
    codes.iter().flat_map(|b| [b >> 4, b & 0x0F]).collect()
}

/// bitsandbytes' parts of a case as our type, to dequantize them.
fn bnb_quantized(st: &SafeTensors, c: &Case, shape: &[usize], dtype: DType) -> Nf4Quantized {
    let absmax = if c.double_quant {
        let map: Vec<f32> = tensor(st, "dynamic_map");
        Absmax::Nested(NestedAbsmax {
            codes: tensor(st, &format!("{}.absmax", c.name)),
            absmax: tensor(st, &format!("{}.nested_absmax", c.name)),
            code: map.try_into().unwrap(),
            offset: tensor::<f32>(st, &format!("{}.offset", c.name))[0],
            blocksize: 256,
        })
    } else {
        Absmax::Plain(tensor(st, &format!("{}.absmax", c.name)))
    };
    let q = Nf4Quantized {
        shape: shape.to_vec(),
        dtype,
        blocksize: c.blocksize,
        codes: tensor(st, &format!("{}.codes", c.name)),
        absmax,
    };
    q.validate().unwrap();
    q
}

fn check_case<T: FloatElem>(st: &SafeTensors, c: &Case, cuda: bool, report: &mut Report) {
    let name = &c.name;
    let shape = st
        .tensor(&format!("{name}.input"))
        .unwrap()
        .shape()
        .to_vec();
    let input: Vec<T> = tensor(st, &format!("{name}.input"));
    let x: Vec<f32> = input.iter().map(|v| v.to_f32()).collect();
    let bs = c.blocksize;
    let bnb = bnb_quantized(st, c, &shape, T::DTYPE);

    // Dequantization of bitsandbytes' own codes: the same f32 multiply, then one rounding.
    // Its CPU path does not flush subnormal products to zero.
    let ours: Vec<T> = bnb.dequantize();
    let theirs: Vec<T> = tensor(st, &format!("{name}.dequant"));
    let absmax = bnb.absmax_f32();
    for (i, (o, t)) in ours.iter().zip(&theirs).enumerate() {
        if bits(&[*o]) != bits(&[*t]) {
            let product = NF4_CODE[bnb.code(i) as usize] * absmax[i / bs];
            assert!(
                !cuda && product.is_subnormal(),
                "{name}: dequant[{i}] {o:?} vs bitsandbytes {t:?}"
            );
        }
    }
    if c.double_quant {
        let theirs: Vec<f32> = tensor(st, &format!("{name}.absmax_f32"));
        assert_eq!(
            bits(&absmax),
            bits(&theirs),
            "{name}: dequantized nested absmax"
        );
    }

    // Quantization, around bitsandbytes' offset when double-quantized.
    let plain = quantize(&input, &shape, bs, false).unwrap();
    let Absmax::Plain(plain_absmax) = &plain.absmax else {
        unreachable!()
    };
    let q = if c.double_quant {
        let offset = tensor::<f32>(st, &format!("{name}.offset"))[0];
        report.offsets += 1;
        let ulps = absmax_mean(plain_absmax)
            .to_bits()
            .abs_diff(offset.to_bits());
        report.offsets_equal += (ulps == 0) as usize;
        report.offset_max_ulps = report.offset_max_ulps.max(ulps);
        quantize_with_offset(&input, &shape, bs, offset).unwrap()
    } else {
        plain.clone()
    };
    if cuda {
        assert_eq!(q, bnb, "{name}: quantized");
    } else {
        check_cpu_path(c, &x, &q, &bnb, plain_absmax, report);
    }
    report.cases += 1;
}

/// bitsandbytes' CPU path against our model of it, and the reference against bitsandbytes
/// wherever the two paths agree by construction.
fn check_cpu_path(
    c: &Case,
    x: &[f32],
    q: &Nf4Quantized,
    bnb: &Nf4Quantized,
    plain_absmax: &[f32],
    report: &mut Report,
) {
    let name = &c.name;
    let bs = c.blocksize;
    let (cpu_codes, cpu_absmax) = cpu_path_quantize(x, bs);
    let theirs = unpack(&bnb.codes);
    assert_eq!(
        cpu_codes, theirs,
        "{name}: bitsandbytes' CPU codes vs the model of its CPU path"
    );
    let ours = unpack(&q.codes);
    let full = x.len() - x.len() % bs;
    for (b, block) in x.chunks(bs).enumerate() {
        let range = b * bs..b * bs + block.len();
        if ours[range.clone()] == theirs[range.clone()] {
            continue;
        }
        report.cpu_blocks_differing += 1;
        // A documented difference: the tail block, an all-zero block, flushed subnormals,
        // a reciprocal flushed to zero, or a value on one of the four off-midpoint thresholds.
        let m = cpu_absmax[b];
        let documented = range.start >= full
            || m == 0.0
            || block.iter().any(|v| v.is_subnormal())
            || m >= 2f32.powi(126)
            || range
                .clone()
                .all(|i| ours[i] == theirs[i] || threshold_or_midpoint_mismatch(x[i] * (1.0 / m)));
        assert!(
            documented,
            "{name}: block {b} differs from bitsandbytes' CPU path for no documented reason"
        );
    }
    // The absmax agrees, except that bitsandbytes' CUDA build flushes a subnormal one to 0.
    for (b, (&o, &t)) in plain_absmax.iter().zip(&cpu_absmax).enumerate() {
        assert!(
            o == t || (t.is_subnormal() && o == 0.0),
            "{name}: absmax of block {b}: {o:e} vs {t:e}"
        );
    }
    if !c.double_quant {
        assert_eq!(
            bnb.absmax,
            Absmax::Plain(cpu_absmax),
            "{name}: bitsandbytes' CPU absmax"
        );
        return;
    }
    // Nested: the 8-bit absmax is exact; bitsandbytes' CPU picks 8-bit codes through a
    // 65536-entry table, which can land on the neighbouring code.
    let (Absmax::Nested(ours), Absmax::Nested(theirs)) = (&q.absmax, &bnb.absmax) else {
        unreachable!()
    };
    assert_eq!(
        bits(&ours.absmax),
        bits(&theirs.absmax),
        "{name}: nested absmax"
    );
    for (o, t) in ours.codes.iter().zip(&theirs.codes) {
        assert!(
            o.abs_diff(*t) <= 1,
            "{name}: nested code {o} vs bitsandbytes' CPU {t}"
        );
        report.cpu_nested_codes_off_by_one += (o != t) as usize;
    }
}

#[test]
fn matches_bitsandbytes_vectors() {
    for dir in vector_dirs() {
        let bytes = std::fs::read(dir.join("vectors.safetensors")).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let cuda = meta["device"] == "cuda";

        let map: Vec<f32> = tensor(&st, "dynamic_map");
        assert_eq!(
            bits(&map),
            bits(&dynamic_map()),
            "bitsandbytes' dynamic map"
        );
        let code: Vec<f32> = tensor(&st, "nf4_code");
        assert_eq!(bits(&code), bits(&NF4_CODE), "bitsandbytes' NF4 table");

        let mut report = Report::default();
        let mut names: Vec<&String> = meta
            .keys()
            .filter(|k| st.tensor(&format!("{k}.input")).is_ok())
            .collect();
        names.sort();
        for name in names {
            let cfg: serde_json::Value = serde_json::from_str(&meta[name]).unwrap();
            let c = Case {
                name: name.clone(),
                blocksize: cfg["blocksize"].as_u64().unwrap() as usize,
                double_quant: cfg["double_quant"].as_bool().unwrap(),
            };
            match st.tensor(&format!("{name}.input")).unwrap().dtype() {
                Dtype::BF16 => check_case::<bf16>(&st, &c, cuda, &mut report),
                Dtype::F16 => check_case::<f16>(&st, &c, cuda, &mut report),
                Dtype::F32 => check_case::<f32>(&st, &c, cuda, &mut report),
                d => panic!("{name}: input dtype {d:?}"),
            }
        }
        println!(
            "{}: {} ({}): {report:?}",
            dir.display(),
            meta["device_name"],
            meta["bitsandbytes"]
        );
        assert!(
            report.cases >= 60,
            "{}: only {} cases",
            dir.display(),
            report.cases
        );
        // The offset is torch's f32 mean, ours an f64 sum rounded once: torch's pairwise f32
        // sum of at most a few thousand absmaxes stays within an ulp or two of it (1 seen).
        assert!(
            report.offset_max_ulps <= 2,
            "offset {} ulps from bitsandbytes'",
            report.offset_max_ulps
        );
    }
}

// ------------------------------------------------------------------ nf4_index vs the tree

/// bitsandbytes' `dQuantizeNF4`, node by node (`t[i]` is `NF4_THRESHOLDS[i]`).
fn decision_tree(x: f32) -> u8 {
    let t = NF4_THRESHOLDS;
    if x > t[7] {
        if x > t[11] {
            if x > t[13] {
                if x > t[14] {
                    15
                } else {
                    14
                }
            } else if x > t[12] {
                13
            } else {
                12
            }
        } else if x > t[9] {
            if x > t[10] {
                11
            } else {
                10
            }
        } else if x > t[8] {
            9
        } else {
            8
        }
    } else if x > t[3] {
        if x > t[5] {
            if x > t[6] {
                7
            } else {
                6
            }
        } else if x > t[4] {
            5
        } else {
            4
        }
    } else if x > t[1] {
        if x > t[2] {
            3
        } else {
            2
        }
    } else if x > t[0] {
        1
    } else {
        0
    }
}

fn next_up(x: f32) -> f32 {
    f32::from_bits(if x >= 0.0 {
        x.to_bits() + 1
    } else {
        x.to_bits() - 1
    })
}

fn next_down(x: f32) -> f32 {
    -next_up(-x)
}

#[test]
fn nf4_index_is_the_decision_tree_with_ties_down() {
    for (i, &t) in NF4_THRESHOLDS.iter().enumerate() {
        assert_eq!(
            nf4_index(t),
            i as u8,
            "a value on threshold {i} takes the lower code"
        );
        assert_eq!(nf4_index(next_up(t)), i as u8 + 1);
        assert_eq!(nf4_index(next_down(t)), i as u8);
        let (mut up, mut down) = (t, t);
        for _ in 0..8 {
            assert_eq!(nf4_index(up), decision_tree(up));
            assert_eq!(nf4_index(down), decision_tree(down));
            (up, down) = (next_up(up), next_down(down));
        }
    }
    // Every code's own value maps back to it, and the edge cases.
    for (i, &c) in NF4_CODE.iter().enumerate() {
        assert_eq!(nf4_index(c), i as u8);
    }
    assert_eq!(nf4_index(f32::NAN), 0, "NaN compares false everywhere");
    assert_eq!(
        (nf4_index(f32::INFINITY), nf4_index(f32::NEG_INFINITY)),
        (15, 0)
    );
    assert_eq!((nf4_index(0.0), nf4_index(-0.0)), (NF4_ZERO, NF4_ZERO));
    // A sweep of all f32 bit patterns (every 1021st: a prime stride hits all low bits).
    for b in (0..=u32::MAX).step_by(1021) {
        let x = f32::from_bits(b);
        assert_eq!(nf4_index(x), decision_tree(x), "{x:e} ({b:#x})");
    }
}

#[test]
fn dynamic_index_picks_the_nearest_code() {
    let map = dynamic_map();
    let mut rng = StdRng::seed_from_u64(rand::random());
    for _ in 0..100_000 {
        let x: f32 = rng.random_range(-1.0..=1.0);
        let q = dynamic_index(&map, x) as usize;
        let d = |i: usize| (map[i] as f64 - x as f64).abs();
        let best = (0..256).map(d).fold(f64::INFINITY, f64::min);
        // Ties and f32 midpoint rounding aside, no code is nearer.
        assert!(
            d(q) <= best + 3e-7 * x.abs().max(1e-6) as f64,
            "x = {x:e}: code {q}"
        );
    }
    assert_eq!(dynamic_index(&map, f32::NAN), 0);
}

// ------------------------------------------------------------------ property tests

/// The largest distance from a value in [-1, 1] to its NF4 code: half the widest gap.
fn nf4_half_gap() -> f32 {
    NF4_CODE
        .windows(2)
        .map(|p| (p[1] - p[0]) / 2.0)
        .fold(0.0, f32::max)
}

/// The same for the dynamic map, whose lowest code is above -1.
fn dynamic_half_gap() -> f32 {
    let map = dynamic_map();
    map.windows(2)
        .map(|p| (p[1] - p[0]) / 2.0)
        .fold(1.0 + map[0], f32::max)
}

/// Checks one random weight's quantization against the properties bitsandbytes' format
/// promises, independently of how the reference computes it.
fn check_properties<T: FloatElem>(seed: u64, numel: usize, blocksize: usize, double_quant: bool) {
    let mut rng = StdRng::seed_from_u64(seed);
    let scale = 10f32.powf(rng.random_range(-3.0..3.0));
    let mut w: Vec<T> = random_vec(&mut rng, numel, scale);
    if rng.random_bool(0.3) {
        let i = rng.random_range(0..numel);
        w[i] = T::from_f32(w[i].to_f32() * 50.0); // an outlier
    }
    let shape = [numel];
    let q = quantize(&w, &shape, blocksize, double_quant).unwrap();
    q.validate().unwrap();
    assert_eq!(
        (q.numel(), q.blocks(), q.dtype),
        (numel, numel.div_ceil(blocksize), T::DTYPE)
    );
    let plain = quantize(&w, &shape, blocksize, false).unwrap();
    let Absmax::Plain(absmax) = &plain.absmax else {
        panic!("plain")
    };
    let deq: Vec<f32> = plain.dequantize();
    let x: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();

    for (b, block) in x.chunks(blocksize).enumerate() {
        let m = absmax[b];
        assert_eq!(
            m,
            block.iter().fold(0.0f32, |a, v| a.max(v.abs())),
            "block {b}: absmax"
        );
        for (j, &v) in block.iter().enumerate() {
            let i = b * blocksize + j;
            // Within half the widest code gap of the absmax (plus the reciprocal's ulps).
            assert!(
                (deq[i] - v).abs() <= nf4_half_gap() * m * (1.0 + 1e-6),
                "element {i}: {v} -> {}",
                deq[i]
            );
            // The nearest code, except within an ulp of a midpoint (the kernel's thresholds).
            let s = v as f64 / m as f64;
            let d = |c: f32| (c as f64 - s).abs();
            let best = NF4_CODE.iter().map(|&c| d(c)).fold(f64::INFINITY, f64::min);
            assert!(
                d(NF4_CODE[plain.code(i) as usize]) <= best + 4e-7,
                "element {i}: not the nearest code"
            );
            // The largest magnitude comes back exactly.
            if v.abs() == m && m > 0.0 {
                assert_eq!(deq[i], v, "element {i}: the block's absmax element");
            }
        }
    }
    // Odd counts pad the last low nibble with the code of 0.0 (the block is not all zero).
    if numel % 2 == 1 {
        let last = *q.codes.last().unwrap() & 0x0F;
        assert_eq!(
            last,
            if absmax[absmax.len() - 1] == 0.0 {
                0
            } else {
                NF4_ZERO
            }
        );
    }
    if double_quant {
        let Absmax::Nested(n) = &q.absmax else {
            panic!("nested")
        };
        assert_eq!(
            q.codes, plain.codes,
            "double quantization leaves the 4-bit codes alone"
        );
        // The offset is the mean of the absmaxes: within an ulp of a plain f64 mean.
        let mean = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
        assert!(
            n.offset.to_bits().abs_diff(mean.to_bits()) <= 1,
            "offset {} for a mean of {mean}",
            n.offset
        );
        let approx = q.absmax_f32();
        for (b, (&a, &r)) in approx.iter().zip(absmax).enumerate() {
            let bound =
                dynamic_half_gap() * n.absmax[b / 256] * (1.0 + 1e-6) + n.offset.abs() * 1e-6;
            assert!(
                (a - r).abs() <= bound,
                "block {b}: absmax {r} comes back as {a}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn quantization_properties(seed in any::<u64>(), bs in 0usize..8, frac in 0.0f64..3.2, dtype in 0usize..3, dq in any::<bool>()) {
        let blocksize = BLOCKSIZES[bs];
        let numel = ((blocksize as f64 * frac) as usize).max(1);
        match dtype {
            0 => check_properties::<bf16>(seed, numel, blocksize, dq),
            1 => check_properties::<f16>(seed, numel, blocksize, dq),
            _ => check_properties::<f32>(seed, numel, blocksize, dq),
        }
    }

    #[test]
    fn many_nested_blocks(seed in any::<u64>(), numel in 16_000usize..40_000) {
        check_properties::<bf16>(seed, numel, 64, true);
    }
}

#[test]
fn odd_sizes_and_tails() {
    for numel in [1, 2, 3, 31, 32, 33, 63, 65, 255, 257, 4095, 4097] {
        for &blocksize in &BLOCKSIZES {
            check_properties::<bf16>(rand::random(), numel, blocksize, numel % 2 == 1);
        }
    }
}

#[test]
fn zero_blocks_take_code_zero_and_dequantize_to_negative_zero() {
    let mut w = vec![bf16::from_f32(0.5); 96];
    w[32..64].fill(bf16::ZERO);
    w[64..].fill(bf16::ZERO);
    w.truncate(65); // the last block: one zero, and an odd count
    let q = quantize(&w, &[65], 32, false).unwrap();
    assert!(
        (32..65).all(|i| q.code(i) == 0),
        "0 * (1/0) is NaN, and NaN takes code 0"
    );
    assert_eq!(
        q.codes[32], 0x00,
        "the padding nibble of an all-zero last block is code 0 too"
    );
    let d: Vec<f32> = q.dequantize();
    assert!(d[32..].iter().all(|v| v.to_bits() == (-0.0f32).to_bits()));
}

#[test]
fn flush_to_zero_as_bitsandbytes_cuda_build() {
    // A block of f32 subnormals has absmax 0; a subnormal next to the smallest normal
    // counts as 0 (code 7), where IEEE arithmetic would give 0.5 (code 12).
    let tiny = f32::MIN_POSITIVE;
    let w = [tiny * 0.25, -tiny * 0.5, tiny, tiny * 0.5];
    let q = quantize(&w, &[4], 32, false).unwrap();
    assert_eq!(q.absmax, Absmax::Plain(vec![tiny]));
    assert_eq!(
        [q.code(0), q.code(1), q.code(2), q.code(3)],
        [NF4_ZERO, NF4_ZERO, 15, NF4_ZERO]
    );
    // An absmax of 2^126 or more: 1/absmax is subnormal and flushed, so the block is all 7s.
    let q = quantize(&[3e38f32, -1e38, 2e30], &[3], 32, false).unwrap();
    assert!((0..3).all(|i| q.code(i) == NF4_ZERO));
}

#[test]
fn bad_input_is_a_typed_error() {
    let w = vec![bf16::from_f32(1.0); 64];
    for bs in [0, 16, 48, 8192] {
        assert!(
            matches!(
                quantize(&w, &[64], bs, false),
                Err(Error::Unsupported { .. })
            ),
            "blocksize {bs}"
        );
    }
    assert!(matches!(
        quantize(&w, &[8, 9], 64, false),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        quantize(&w, &[usize::MAX, 2], 64, false),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        quantize::<bf16>(&[], &[0], 64, false),
        Err(Error::Unsupported { .. })
    ));
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut v = vec![0.5f32; 70];
        v[66] = bad;
        let e = quantize(&v, &[70], 64, true).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument { why, .. } if why.contains("element 66")),
            "{e}"
        );
    }
    assert!(matches!(
        quantize_with_offset(&w, &[64], 64, f32::NAN),
        Err(Error::InvalidArgument { .. })
    ));
    let mut q = quantize(&w, &[64], 64, false).unwrap();
    q.codes.pop();
    assert!(q.validate().is_err());
}
