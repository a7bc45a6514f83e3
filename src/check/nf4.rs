//! Checks of the NF4 kernels against `reference::nf4` (bitsandbytes' format and numerics)
//! and `reference::linear` (the matmuls, in f64).

use super::{row, time_if, CheckCase, CheckRow, Measure, Report, Scale};
use crate::device::Device;
use crate::dtype::{DType, FloatElem};
use crate::error::Result;
use crate::nf4::{self, MatmulPath, Nf4Weight};
use crate::reference::{linear, nf4 as reference};
use crate::testing::{bit_mismatches, random_vec, rel_l2};
use crate::{bf16, f16};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Rows of a large matmul's output compared with the reference (besides its first and last).
const SAMPLED_ROWS: usize = 64;
/// Multiply-adds of the f64 reference above which a matmul check compares sampled rows
/// rather than every row (a training-size GEMM's would take minutes on a CPU).
const SAMPLED_ABOVE: usize = 100_000_000;

/// An NF4 check's size: the weight `[rows, cols]`, `m` rows of activations.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// Seed of the weight and the activations.
    pub seed: u64,
    /// Rows of the weight: out_features.
    pub rows: usize,
    /// Columns of the weight: in_features, the matmuls' K.
    pub cols: usize,
    /// Rows of the activations (tokens) in the matmul checks.
    pub m: usize,
    /// Elements per NF4 block.
    pub blocksize: usize,
    /// Whether the absmaxes are double-quantized.
    pub double_quant: bool,
    /// Whether to time the kernels (on a GPU only).
    pub timed: bool,
}

impl CheckCase for Case {
    fn seed(&self) -> u64 {
        self.seed
    }

    fn shape(&self) -> String {
        let dq = if self.double_quant { " dq" } else { "" };
        format!(
            "{}x{}→{} bs{}{dq}",
            self.m, self.cols, self.rows, self.blocksize
        )
    }
}

/// The weight a check of case `c` draws from its seed, like a trained layer's: normal-ish
/// values, a few outliers. f32: each dtype's weight is this one rounded ([`rounded`]), so
/// that `fk check` draws it once for all its rows (45 M elements at the realistic shape).
fn weight(c: &Case) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    (0..c.rows * c.cols)
        .map(|_| {
            let x: f32 = (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum::<f32>() * 0.02;
            if rng.random_range(0..1000) == 0 {
                x * 20.0
            } else {
                x
            }
        })
        .collect()
}

/// `w` rounded to T.
fn rounded<T: FloatElem>(w: &[f32]) -> Vec<T> {
    w.iter().map(|&v| T::from_f32(v)).collect()
}

/// `w` rounded to T and quantized as case `c` says.
fn quantized_in<T: FloatElem>(c: &Case, w: &[f32]) -> Result<reference::Nf4Quantized> {
    reference::quantize(
        &rounded::<T>(w),
        &[c.rows, c.cols],
        c.blocksize,
        c.double_quant,
    )
}

/// The generator of a matmul check's activations (and of the rows it samples): a stream of
/// its own, so that rows with the same seed share the weight whatever their `m`.
fn activations_rng(c: &Case) -> StdRng {
    StdRng::seed_from_u64(c.seed ^ 0x9E37_79B9_7F4A_7C15)
}

/// Quantization on the device against the reference: codes, absmaxes and the nested
/// statistics bit for bit (the reference is checked against bitsandbytes' own output).
pub fn quantize<T: FloatElem>(dev: &Device, c: Case) -> Result<CheckRow> {
    let w: Vec<T> = rounded(&weight(&c));
    let expected = reference::quantize(&w, &[c.rows, c.cols], c.blocksize, c.double_quant)?;
    quantize_drawn(dev, c, &w, &expected)
}

/// [`quantize`] of `w`, the case's weight already drawn and its reference quantization made.
fn quantize_drawn<T: FloatElem>(
    dev: &Device,
    c: Case,
    w: &[T],
    expected: &reference::Nf4Quantized,
) -> Result<CheckRow> {
    let wd = dev.upload(w)?;
    let q = Nf4Weight::quantize(&wd, c.rows, c.cols, c.blocksize, c.double_quant)?.to_host()?;
    let mut bad = bit_mismatches(&q.codes, &expected.codes).len();
    bad += match (&q.absmax, &expected.absmax) {
        (reference::Absmax::Plain(a), reference::Absmax::Plain(b)) => bit_mismatches(a, b).len(),
        (reference::Absmax::Nested(a), reference::Absmax::Nested(b)) => {
            bit_mismatches(&a.codes, &b.codes).len()
                + bit_mismatches(&a.absmax, &b.absmax).len()
                + (a.offset.to_bits() != b.offset.to_bits()) as usize
        }
        _ => usize::MAX / 2,
    };
    let t = time_if(dev, c.timed, || {
        Nf4Weight::quantize(&wd, c.rows, c.cols, c.blocksize, c.double_quant).map(|_| ())
    })?;
    Ok(row(
        format!("nf4_quantize_{}", T::DTYPE),
        dev,
        &c,
        Measure::Exact,
        bad as f64,
        t,
    ))
}

/// Dequantization into a poisoned buffer, bit for bit against the reference.
pub fn dequantize<O: FloatElem>(dev: &Device, c: Case) -> Result<CheckRow> {
    let q = reference::quantize(&weight(&c), &[c.rows, c.cols], c.blocksize, c.double_quant)?;
    dequantize_drawn::<O>(dev, c, &q)
}

/// [`dequantize`] of `q`, the case's f32 weight already drawn and quantized.
fn dequantize_drawn<O: FloatElem>(
    dev: &Device,
    c: Case,
    q: &reference::Nf4Quantized,
) -> Result<CheckRow> {
    let wd = Nf4Weight::upload(dev, q)?;
    let mut out = dev.alloc_poisoned::<O>(c.rows * c.cols)?;
    wd.dequantize(&mut out)?;
    let bad = bit_mismatches(&out.to_host()?, &q.dequantize::<O>()).len();
    let t = time_if(dev, c.timed, || wd.dequantize(&mut out))?;
    Ok(row(
        format!("nf4_dequantize_{}", O::DTYPE),
        dev,
        &c,
        Measure::Exact,
        bad as f64,
        t,
    ))
}

/// The bound for a matmul with T operands and output over a reduction of length k: the
/// output's rounding (unit roundoff of T) plus f32 accumulation (k · 2⁻²³, generous for
/// the tensor cores' truncating adds).
pub fn matmul_bound(t: DType, k: usize) -> f64 {
    unit(t) + k as f64 * 2f64.powi(-23)
}

/// The relative spacing of T around 1 (bf16 2⁻⁸, f16 2⁻¹¹): one rounding's worst case,
/// twice the unit roundoff, for the bounds of results rounded to T.
pub fn unit(t: DType) -> f64 {
    if t == DType::F16 {
        2f64.powi(-11)
    } else {
        2f64.powi(-8)
    }
}

/// A forward (`forward`) or backward-dX matmul through `path`, against the f64 reference
/// on the dequantized weight.
pub fn matmul<T: FloatElem>(
    dev: &Device,
    c: Case,
    path: MatmulPath,
    forward: bool,
) -> Result<CheckRow>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let q = quantized_in::<T>(&c, &weight(&c))?;
    matmul_drawn::<T>(dev, c, &q, path, forward, None)
}

/// What a GEMV check adds in the kernel's epilogue ([`nf4::gemv_with_epilogue`]): a bias, a
/// low-rank term of this rank, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epilogue {
    /// A bias `[rows]`.
    pub bias: bool,
    /// The rank of a low-rank term `u bᵀ`.
    pub rank: Option<usize>,
}

/// A forward through the GEMV `path` with `epilogue`, against the f64 reference of the
/// product and the epilogue's terms summed before one rounding.
pub fn gemv_with_epilogue<T: FloatElem>(
    dev: &Device,
    c: Case,
    path: MatmulPath,
    epilogue: Epilogue,
) -> Result<CheckRow>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let q = quantized_in::<T>(&c, &weight(&c))?;
    matmul_drawn::<T>(dev, c, &q, path, true, Some(epilogue))
}

/// [`matmul`] through `q`, the case's weight in T already drawn and quantized; a forward
/// through a GEMV may add an `epilogue` ([`gemv_with_epilogue`]).
fn matmul_drawn<T: FloatElem>(
    dev: &Device,
    c: Case,
    q: &reference::Nf4Quantized,
    path: MatmulPath,
    forward: bool,
    epilogue: Option<Epilogue>,
) -> Result<CheckRow>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let mut rng = activations_rng(&c);
    // Ŵ as the path uses it: the SIMT GEMVs keep it in f32 (they never materialize it), the
    // tensor-core GEMV multiplies by the codes in T and scales by the f32 absmax, the GEMMs
    // dequantize it to T on the way into their tiles.
    let what: Vec<f32> = match path {
        MatmulPath::Gemv | MatmulPath::GemvDx => q.dequantize::<f32>(),
        MatmulPath::GemvMma => q.dequantize_with_codes_in::<T>(),
        MatmulPath::FusedGemm | MatmulPath::FusedGemmWgmma | MatmulPath::DequantizeCublas => {
            q.dequantize::<T>().iter().map(|v| v.to_f32()).collect()
        }
    };
    let (k_in, n_out) = if forward {
        (c.cols, c.rows)
    } else {
        (c.rows, c.cols)
    };
    let a: Vec<T> = random_vec(&mut rng, c.m * k_in, 1.0);
    // The f64 reference of a training-size GEMM would take minutes on a CPU: check a random
    // sample of rows there, with the first and the last (a tail tile's), every row at test
    // sizes. Every output is read for NaN (unwritten: outputs start poisoned) below.
    let checked: Vec<usize> = if c.m * k_in * n_out > SAMPLED_ABOVE && c.m > SAMPLED_ROWS {
        let mut r = rand::seq::index::sample(&mut rng, c.m, SAMPLED_ROWS).into_vec();
        r.extend([0, c.m - 1]);
        r.sort_unstable();
        r.dedup();
        r
    } else {
        (0..c.m).collect()
    };
    let a_checked: Vec<T> = checked
        .iter()
        .flat_map(|&r| a[r * k_in..(r + 1) * k_in].iter().copied())
        .collect();
    let (n_checked, label) = (checked.len(), path.label(forward, T::DTYPE));
    // A GEMV's epilogue: its terms, which the reference takes as more of K,
    // [x | u | 1] · [Ŵ | b | bias]ᵀ, summed before the one rounding.
    let (expected, label, k_ref, bias, u, b) = match epilogue {
        Some(e) => {
            let rank = e.rank.unwrap_or(0);
            let bias: Vec<T> = random_vec(&mut rng, if e.bias { c.rows } else { 0 }, 1.0);
            let u: Vec<T> = random_vec(&mut rng, c.m * rank, 1.0);
            let b: Vec<T> = random_vec(&mut rng, c.rows * rank, 0.1);
            let one = T::from_f32(if e.bias { 1.0 } else { 0.0 });
            let x_ext: Vec<T> = (a_checked.chunks(c.cols).zip(&checked))
                .flat_map(|(x, &r)| x.iter().chain(&u[r * rank..(r + 1) * rank]).chain([&one]))
                .copied()
                .collect();
            let w_ext: Vec<f32> = (0..c.rows)
                .flat_map(|n| {
                    let w = what[n * c.cols..(n + 1) * c.cols].iter().copied();
                    let bias_n = bias.get(n).map_or(0.0, |v| v.to_f32());
                    w.chain(b[n * rank..(n + 1) * rank].iter().map(|v| v.to_f32()))
                        .chain([bias_n])
                })
                .collect();
            let k = c.cols + rank + 1;
            let expected = linear::linear(&x_ext, &w_ext, n_checked, c.rows, k)?;
            let terms = match e.rank {
                Some(r) => format!(" + epilogue (bias {}, rank {r})", e.bias),
                None => format!(" + epilogue (bias {})", e.bias),
            };
            (expected, label + &terms, k, bias, u, b)
        }
        None => {
            let expected = if forward {
                linear::linear(&a_checked, &what, n_checked, c.rows, c.cols)?
            } else {
                linear::linear_dx(&a_checked, &what, n_checked, c.rows, c.cols)?
            };
            (expected, label, k_in, vec![], vec![], vec![])
        }
    };
    let wd = Nf4Weight::upload(dev, q)?;
    let ad = dev.upload(&a)?;
    let (bias_d, u_d, b_d) = (dev.upload(&bias)?, dev.upload(&u)?, dev.upload(&b)?);
    let mut out = dev.alloc_poisoned::<T>(c.m * n_out)?;
    let run = |out: &mut crate::Buffer<T>| match epilogue {
        Some(e) => {
            let terms = nf4::GemvEpilogue {
                bias: e.bias.then_some(&bias_d),
                low_rank: e.rank.map(|r| (&u_d, &b_d, r)),
            };
            nf4::gemv_with_epilogue(&wd, &ad, c.m, out, path, terms)
        }
        None if forward => nf4::forward_with(&wd, &ad, c.m, out, path),
        None => nf4::backward_dx_with(&wd, &ad, c.m, out, path),
    };
    run(&mut out)?;
    let got = out.to_host()?;
    let got_checked: Vec<T> = checked
        .iter()
        .flat_map(|&r| got[r * n_out..(r + 1) * n_out].iter().copied())
        .collect();
    // Inputs are finite, so a NaN anywhere is an output left unwritten, sampled or not.
    let err = if got.iter().any(|v| v.to_f32().is_nan()) {
        f64::INFINITY
    } else {
        rel_l2(&got_checked, &expected)
    };
    let t = time_if(dev, c.timed, || run(&mut out))?;
    Ok(row(
        label,
        dev,
        &c,
        Measure::RelL2(matmul_bound(T::DTYPE, k_ref)),
        err,
        t,
    ))
}

/// The weight every check at `scale` uses, and the rows of its GEMMs. Realistic: LLaMA-7B's
/// MLP shapes (DESIGN.md §8). Small: odd sizes with tails everywhere.
fn base_case(scale: Scale, seed: u64) -> (Case, usize) {
    let realistic = scale == Scale::Realistic;
    let (rows, cols, m_gemm) = if realistic {
        (11008, 4096, 8192)
    } else {
        (45, 131, 37)
    };
    let c = Case {
        seed,
        rows,
        cols,
        m: 1,
        blocksize: 64,
        double_quant: true,
        timed: realistic,
    };
    (c, m_gemm)
}

/// Every NF4 kernel at `scale`: quantize/dequantize for each dtype, blocksize and double
/// quantization; the matmuls for bf16 and f16 through each path the device has. Each row
/// into `report` as it is checked. Every row draws the same weight (its case's seed), so it
/// is drawn once and quantized once per dtype and blocksize here, as each row would draw it:
/// at the realistic shape each draw or quantization takes about half a second on the host.
pub fn all(dev: &Device, scale: Scale, seed: u64, report: &mut Report) -> Result<()> {
    let (base, m_gemm) = base_case(scale, seed);
    let w = weight(&base);
    let (w_bf16, w_f16) = (rounded::<bf16>(&w), rounded::<f16>(&w));
    let shape = [base.rows, base.cols];
    for (blocksize, dq) in [(64, true), (64, false), (32, true), (4096, true)] {
        let c = Case {
            blocksize,
            double_quant: dq,
            ..base
        };
        let q_bf16 = reference::quantize(&w_bf16, &shape, blocksize, dq)?;
        report.push(quantize_drawn(dev, c, &w_bf16, &q_bf16)?);
        let q_f16 = reference::quantize(&w_f16, &shape, blocksize, dq)?;
        report.push(quantize_drawn(dev, c, &w_f16, &q_f16)?);
        // The f32 weight's quantization is both the quantize row's reference and what the
        // dequantize rows decode.
        let q = reference::quantize(&w, &shape, blocksize, dq)?;
        report.push(quantize_drawn(dev, c, &w, &q)?);
        report.push(dequantize_drawn::<bf16>(dev, c, &q)?);
        report.push(dequantize_drawn::<f16>(dev, c, &q)?);
        report.push(dequantize_drawn::<f32>(dev, c, &q)?);
    }
    let (q_bf16, q_f16) = (
        quantized_in::<bf16>(&base, &w)?,
        quantized_in::<f16>(&base, &w)?,
    );
    let mut paths = vec![MatmulPath::FusedGemm];
    if dev.has_cublas() {
        paths.push(MatmulPath::DequantizeCublas);
    }
    for m in [1, 3, 16, 64] {
        let c = Case { m, ..base };
        for gemv in [MatmulPath::GemvMma, MatmulPath::Gemv, MatmulPath::GemvDx] {
            if m > gemv.max_rows() {
                continue;
            }
            let forward = gemv != MatmulPath::GemvDx;
            report.push(matmul_drawn::<bf16>(dev, c, &q_bf16, gemv, forward, None)?);
            report.push(matmul_drawn::<f16>(dev, c, &q_f16, gemv, forward, None)?);
        }
    }
    // A QLoRA layer's forward at decode sizes: bias and a rank-16 term in the GEMV's epilogue.
    let qlora = Epilogue {
        bias: true,
        rank: Some(16),
    };
    for m in [1, 64] {
        let c = Case { m, ..base };
        report.push(matmul_drawn::<bf16>(
            dev,
            c,
            &q_bf16,
            MatmulPath::GemvMma,
            true,
            Some(qlora),
        )?);
    }
    for path in paths {
        let c = Case { m: m_gemm, ..base };
        for forward in [true, false] {
            report.push(matmul_drawn::<bf16>(dev, c, &q_bf16, path, forward, None)?);
            report.push(matmul_drawn::<f16>(dev, c, &q_f16, path, forward, None)?);
        }
    }
    Ok(())
}

/// The fused wgmma GEMM (Hopper, the emulator; nothing elsewhere) at `scale`, forward and dX,
/// bf16 and f16: separate from [`all`] so that `fk check` runs it after every other family,
/// the newest kernels last (a GPU fault ends the process's CUDA context, and every row after
/// it).
pub fn wgmma(dev: &Device, scale: Scale, seed: u64, report: &mut Report) -> Result<()> {
    if !dev.has_wgmma() {
        return Ok(());
    }
    let (base, m_gemm) = base_case(scale, seed);
    let c = Case { m: m_gemm, ..base };
    let w = weight(&c);
    let (q_bf16, q_f16) = (quantized_in::<bf16>(&c, &w)?, quantized_in::<f16>(&c, &w)?);
    for forward in [true, false] {
        report.push(matmul_drawn::<bf16>(
            dev,
            c,
            &q_bf16,
            MatmulPath::FusedGemmWgmma,
            forward,
            None,
        )?);
        report.push(matmul_drawn::<f16>(
            dev,
            c,
            &q_f16,
            MatmulPath::FusedGemmWgmma,
            forward,
            None,
        )?);
    }
    Ok(())
}
