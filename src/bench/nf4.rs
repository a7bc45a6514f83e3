//! NF4 benchmarks for the GPU check, at LLaMA-7B's MLP shapes (DESIGN.md §8): the GEMV at
//! decode sizes against cuBLAS's bf16 GEMV, the forward and backward GEMMs (fused, and
//! dequantize + cuBLAS) against cuBLAS's bf16 GEMM at several M (which sets the dispatch
//! threshold), dequantization against a copy, quantization.

use super::{
    cublas_present, time_copy, time_copy_rotated, time_cublas, time_cublas_rotated, time_memset,
    Ceilings, GpuTimer, Row, Rows, Scale, Stats, REPS,
};
use crate::device::blas::WeightOp;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::nf4::{self, MatmulPath, Nf4Weight};
use crate::testing::random_vec;
use crate::{bf16, Buffer};
use rand::{rngs::StdRng, SeedableRng};

pub(super) fn weight(dev: &Device, rows: usize, cols: usize) -> Result<(Buffer<bf16>, Nf4Weight)> {
    let w = dev.upload(&weight_values(rows, cols))?;
    let q = Nf4Weight::quantize(&w, rows, cols, 64, true)?;
    Ok((w, q))
}

/// A bf16 weight `[rows, cols]` as a trained layer's might be.
fn weight_values(rows: usize, cols: usize) -> Vec<bf16> {
    let mut rng = StdRng::seed_from_u64((rows * cols) as u64);
    random_vec::<bf16>(&mut rng, rows * cols, 0.05)
}

fn with_cublas(
    dev: &Device,
    timer: &mut GpuTimer,
    row: Row,
    m: usize,
    n: usize,
    k: usize,
    op: WeightOp,
) -> Result<Row> {
    Ok(match time_cublas(dev, timer, m, n, k, op)? {
        Some(t) => row.with_baseline("cuBLAS bf16, same shape", t.median_us),
        None => row,
    })
}

/// How many blocks of `nf4_dequantize_bf16` fit on the GPU at once: its one-wave launch,
/// where `Nf4Weight::dequantize` launches a thread a pass (8.3 waves at 4096×11008). Whether
/// loading the nested map once a block rather than once a pass, and no partial last wave, are
/// worth changing the launch for (bench/NOTES.md).
fn dequantize_wave(dev: &Device) -> Result<u32> {
    let per_sm = match dev {
        Device::Cuda(d) => {
            let k = nf4::dequantize_kernel(DType::BF16);
            d.resources(&k, nf4::THREADS, 0)?.blocks_per_sm
        }
        Device::Emu(_) => 1,
    };
    Ok(dev.sm_count() as u32 * per_sm)
}

/// The matmul through `path` for `m` rows: forward `[m, cols] → [m, rows]` or backward.
fn matmul_row(
    dev: &Device,
    timer: &mut GpuTimer,
    c: &Ceilings,
    q: &Nf4Weight,
    m: usize,
    path: MatmulPath,
    forward: bool,
) -> Result<Row> {
    let (k_in, n_out) = if forward {
        (q.cols(), q.rows())
    } else {
        (q.rows(), q.cols())
    };
    let mut rng = StdRng::seed_from_u64(m as u64);
    let a = dev.upload(&random_vec::<bf16>(&mut rng, m * k_in, 1.0))?;
    let mut out = dev.alloc_poisoned::<bf16>(m * n_out)?;
    let t = timer.time(3, REPS, || {
        if forward {
            nf4::forward_with(q, &a, m, &mut out, path)
        } else {
            nf4::backward_dx_with(q, &a, m, &mut out, path)
        }
    })?;
    let kernel = path.label(forward, crate::DType::BF16);
    let row = matmul_work_row(&kernel, &t, q, m, (k_in, n_out), c);
    let op = if forward {
        WeightOp::Transposed
    } else {
        WeightOp::Plain
    };
    with_cublas(dev, timer, row, m, n_out, k_in, op)
}

/// The tensor-core GEMV's `m` rows as two launches of `m / 2` (`nf4_gemv_mma_bf16, two
/// launches of half the rows`): the weight read twice, the second time mostly from L2 (23 MB
/// of the H200's 50), where one launch of 64 rows runs a block per SM (151 registers) and one
/// of 32 two. Against the one-launch row of the same shape: bench/predictions.json's decision.
fn gemv_in_halves(
    dev: &Device,
    timer: &mut GpuTimer,
    c: &Ceilings,
    q: &Nf4Weight,
    m: usize,
) -> Result<Row> {
    let (k_in, n_out, half) = (q.cols(), q.rows(), m / 2);
    let mut rng = StdRng::seed_from_u64(m as u64);
    let a = [(); 2].map(|_| random_vec::<bf16>(&mut rng, half * k_in, 1.0));
    let [a0, a1] = [dev.upload(&a[0])?, dev.upload(&a[1])?];
    let [mut y0, mut y1] = [
        dev.alloc_poisoned::<bf16>(half * n_out)?,
        dev.alloc_poisoned::<bf16>(half * n_out)?,
    ];
    let t = timer.time(3, REPS, || {
        nf4::forward_with(q, &a0, half, &mut y0, MatmulPath::GemvMma)?;
        nf4::forward_with(q, &a1, half, &mut y1, MatmulPath::GemvMma)
    })?;
    let kernel = "nf4_gemv_mma_bf16, two launches of half the rows";
    Ok(matmul_work_row(kernel, &t, q, m, (k_in, n_out), c))
}

/// The bytes a 1-row GEMV through `q` must move: the weight, x and y.
fn gemv_bytes(q: &Nf4Weight) -> usize {
    q.bytes() + 2 * (q.rows() + q.cols())
}

/// A copy's row (`kernel`, timed `t`) moving the bytes of a 1-row GEMV through `q`: what a
/// kernel of that size reaches under the same timer.
fn gemv_copy_row(kernel: &str, t: &Stats, q: &Nf4Weight, c: &Ceilings) -> Row {
    let bytes = gemv_bytes(q);
    Row::new(
        "baseline",
        kernel,
        &format!("{bytes} B"),
        t,
        bytes as f64,
        0.0,
        c,
    )
}

/// The row of a matmul through `q` with `m` rows of `k_in` in and `n_out` out that took `t`:
/// its bytes (the weight once, the activations in and out) and FLOPs.
fn matmul_work_row(
    kernel: &str,
    t: &Stats,
    q: &Nf4Weight,
    m: usize,
    (k_in, n_out): (usize, usize),
    c: &Ceilings,
) -> Row {
    let bytes = (q.bytes() + 2 * m * (k_in + n_out)) as f64;
    let flops = 2.0 * (m * q.rows() * q.cols()) as f64;
    let shape = format!("{m}x{k_in}→{n_out}");
    Row::new("nf4", kernel, &shape, t, bytes, flops, c)
}

/// The `nf4` family's rows at [`Scale::of`]'s weight, into `out` as they are measured:
/// dequantization (one launch, and one wave looping) and quantization, the GEMVs at up to 64
/// rows (as many as each takes) on the weight and its transpose, the rotated decode rows, the
/// GEMV ladder, and the fused and dequantize + cuBLAS GEMMs forward and backward from 4 rows to
/// [`Scale::nf4_tokens`], with their copy and cuBLAS baselines. Errors from any launch,
/// timing or write of the rows, except the GEMV ladder's, which costs only its own rows.
pub fn rows(dev: &Device, timer: &mut GpuTimer, c: &Ceilings, out: &mut Rows) -> Result<()> {
    let at = Scale::of(dev);
    let (rows, cols) = at.nf4;
    let (w, q) = weight(dev, rows, cols)?;
    let numel = rows * cols;
    let shape = format!("{cols}x{rows}");

    let mut dequantized = dev.alloc_poisoned::<bf16>(numel)?;
    let t = timer.time(3, REPS, || q.dequantize(&mut dequantized))?;
    let bytes = (q.bytes() + 2 * numel) as f64;
    out.push(
        Row::new("nf4", "nf4_dequantize_bf16", &shape, &t, bytes, 0.0, c)
            .with_copy_baseline(dev, timer)?,
    )?;
    let wave = Some(dequantize_wave(dev)?);
    let t = timer.time(3, REPS, || {
        q.dequantize_in_blocks(&mut dequantized, cols, wave)
    })?;
    out.push(
        Row::new(
            "nf4",
            "nf4_dequantize_bf16, one wave looping",
            &shape,
            &t,
            bytes,
            0.0,
            c,
        )
        .with_copy_baseline(dev, timer)?,
    )?;
    // Writing alone: dequantization writes four bytes for each it reads, so a memset of its
    // output says how near the copy-relative target a write-bound kernel can come here.
    let written = 2 * numel;
    let t = time_memset(dev, timer, written)?;
    out.push(Row::new(
        "baseline",
        "d2d memset (the dequantized weight's bytes)",
        &format!("{written} B"),
        &t,
        written as f64,
        0.0,
        c,
    ))?;

    let t = timer.time(1, REPS, || {
        Nf4Weight::quantize(&w, rows, cols, 64, true).map(|_| ())
    })?;
    out.push(Row::new(
        "nf4",
        "nf4_quantize_bf16 (double quant)",
        &shape,
        &t,
        (2 * numel + numel / 2) as f64,
        0.0,
        c,
    ))?;

    // A copy moving the 1-row GEMV's bytes (half read, half written): the bandwidth a kernel
    // of that size can reach under this timer (a copy of tens of MB stays well short of the
    // 1 GiB copy the floor is measured with).
    let t = time_copy(dev, timer, gemv_bytes(&q) / 2)?;
    out.push(gemv_copy_row(
        "d2d copy (the 1-row GEMV's bytes)",
        &t,
        &q,
        c,
    ))?;
    // Both GEMVs side by side (bench/predictions.json's decision between them), each with
    // its fixed cost (a tiny weight) and what double quantization's dependent absmax loads
    // cost it (the same weight without).
    let (_, q_small) = weight(dev, 256, 256)?;
    let q_plain = Nf4Weight::quantize(&w, rows, cols, 64, false)?;
    let (_, q_t) = weight(dev, cols, rows)?;
    for gemv in [MatmulPath::GemvMma, MatmulPath::Gemv] {
        out.push(matmul_row(dev, timer, c, &q_small, 1, gemv, true)?)?;
        let mut row = matmul_row(dev, timer, c, &q_plain, 1, gemv, true)?;
        row.kernel += " (no double quant)";
        out.push(row)?;
        if gemv == MatmulPath::GemvMma {
            // Blocksize 32 keeps the tensor-core GEMV in steps of 32 elements (4-byte code
            // loads); 64 takes steps of 64 (8-byte loads): what the wider loads gain, against
            // 3% more bytes (an absmax code per 32 elements, not 64).
            let q_32 = Nf4Weight::quantize(&w, rows, cols, 32, true)?;
            let mut row = matmul_row(dev, timer, c, &q_32, 1, gemv, true)?;
            row.kernel += " (blocksize 32: steps of 32)";
            out.push(row)?;
        }
        for weight in [&q, &q_t] {
            for m in [1, 4, 8, 16, 32, 64] {
                if m <= gemv.max_rows() {
                    out.push(matmul_row(dev, timer, c, weight, m, gemv, true)?)?;
                }
            }
        }
    }
    for weight in [&q, &q_t] {
        out.push(gemv_in_halves(dev, timer, c, weight, 64)?)?;
    }
    // The dX GEMV (a backward of up to 16 rows) on both shapes; dequantize + cuBLAS's dX at the
    // same rows is below (4096→11008's weight) and here (11008→4096's), for the dispatch's
    // choice between them (bench/predictions.json).
    for weight in [&q, &q_t] {
        for m in [1, 4, 8, 16] {
            out.push(matmul_row(
                dev,
                timer,
                c,
                weight,
                m,
                MatmulPath::GemvDx,
                false,
            )?)?;
        }
    }
    if dev.has_cublas() {
        for m in [1, 16] {
            let path = MatmulPath::DequantizeCublas;
            out.push(matmul_row(dev, timer, c, &q_t, m, path, false)?)?;
        }
        out.push(matmul_row(
            dev,
            timer,
            c,
            &q,
            1,
            MatmulPath::DequantizeCublas,
            false,
        )?)?;
    }
    rotated_rows(dev, timer, c, out)?;
    out.extend_extra(gemv_ladder(dev, timer, c), "GEMV ladder")?;
    let cublas_present = dev.has_cublas();
    // Dequantize + cuBLAS forward on the other shape too (below: 4096→11008's, and dX's), at
    // the rows where the dispatch chooses between it and the GEMV.
    if cublas_present {
        for m in [32, 64] {
            let path = MatmulPath::DequantizeCublas;
            out.push(matmul_row(dev, timer, c, &q_t, m, path, true)?)?;
        }
    }
    // 4 to 64 rows: against the GEMVs (nf4::choose_path's crossover).
    for m in [4, 8, 16, 32, 64, at.nf4_tokens] {
        for forward in [true, false] {
            out.push(matmul_row(
                dev,
                timer,
                c,
                &q,
                m,
                MatmulPath::FusedGemm,
                forward,
            )?)?;
            if cublas_present {
                out.push(matmul_row(
                    dev,
                    timer,
                    c,
                    &q,
                    m,
                    MatmulPath::DequantizeCublas,
                    forward,
                )?)?;
            }
        }
    }
    Ok(())
}

/// Decode's steady state, DESIGN.md §8's other method ([`GpuTimer::time_rotated`]): the
/// 1-row tensor-core GEMV over weights of its own, launch after launch, against cuBLAS's bf16
/// GEMV and a copy of the GEMV's bytes timed the same way; the dequantization so against its
/// copy. Neither launch latency nor the flush's dirty lines are in these rows; the flushed
/// single launches' rows carry both (the 4 KiB copy's timer floor, 3.8 µs at 0544, is most of
/// the GEMV's 5.6 µs floor). Rows `… , weights rotated` (`buffers rotated` for copies).
fn rotated_rows(dev: &Device, timer: &mut GpuTimer, c: &Ceilings, out: &mut Rows) -> Result<()> {
    let (big, small) = Scale::of(dev).nf4;
    // Both shapes' weights hold the same values (drawn once: 45 M of them at the GPU scale).
    let values = weight_values(big, small);
    for (rows, cols) in [(big, small), (small, big)] {
        let w = dev.upload(&values)?;
        let quantize = || Nf4Weight::quantize(&w, rows, cols, 64, true);
        let mut qs = vec![quantize()?];
        for _ in 1..timer.rotation(qs[0].bytes()) {
            qs.push(quantize()?);
        }
        let mut rng = StdRng::seed_from_u64(cols as u64);
        let x = dev.upload(&random_vec::<bf16>(&mut rng, cols, 1.0))?;
        let mut y = dev.alloc_poisoned::<bf16>(rows)?;
        let t = timer.time_rotated(REPS, qs.len(), |i| {
            nf4::forward_with(&qs[i], &x, 1, &mut y, MatmulPath::GemvMma)
        })?;
        let kernel = "nf4_gemv_mma_bf16, weights rotated";
        let mut row = matmul_work_row(kernel, &t, &qs[0], 1, (cols, rows), c);
        if cublas_present(dev)? {
            // The bf16 weight the NF4 ones were quantized from, and more copies of it.
            let mut ws = vec![w];
            for _ in 1..timer.rotation(2 * values.len()) {
                ws.push(dev.upload(&values)?);
            }
            let op = WeightOp::Transposed;
            if let Some(t) = time_cublas_rotated(dev, timer, (1, rows, cols), op, &ws)? {
                row = row.with_baseline("cuBLAS bf16, same shape, weights rotated", t.median_us);
            }
        }
        out.push(row)?;
        if rows != big {
            continue;
        }
        let t = time_copy_rotated(dev, timer, gemv_bytes(&qs[0]) / 2)?;
        let kernel = "d2d copy (the 1-row GEMV's bytes), buffers rotated";
        out.push(gemv_copy_row(kernel, &t, &qs[0], c))?;
        let numel = rows * cols;
        let bytes = qs[0].bytes() + 2 * numel;
        let mut outs = (0..timer.rotation(bytes))
            .map(|_| dev.alloc_poisoned::<bf16>(numel))
            .collect::<Result<Vec<_>>>()?;
        let t = timer.time_rotated(REPS, outs.len(), |i| {
            qs[i % qs.len()].dequantize(&mut outs[i])
        })?;
        let copy = time_copy_rotated(dev, timer, bytes / 2)?;
        let kernel = "nf4_dequantize_bf16, weights rotated";
        out.push(
            Row::new(
                "nf4",
                kernel,
                &format!("{cols}x{rows}"),
                &t,
                bytes as f64,
                0.0,
                c,
            )
            .with_baseline("d2d copy, same bytes, buffers rotated", copy.median_us),
        )?;
    }
    Ok(())
}

/// The tensor-core GEMV taken apart without a profiler (it ran at 27 µs where a copy of its
/// bytes takes 13): 1 row through weights of one wave of blocks (16 rows each, 3 per SM) at
/// K = 1024, 4096 and 16384, and of two waves at 4096. Across K at one wave, t ≈ t0 + bytes /
/// rate: t0 a block's fixed chain (code table, first loads, reduction), the rate its
/// streaming; two waves against one, what a wave costs. Rows (parts): `nf4_gemv_mma ladder ▸
/// rows×K`, bytes the weight's.
fn gemv_ladder(dev: &Device, timer: &mut GpuTimer, c: &Ceilings) -> Result<Vec<Row>> {
    let at = Scale::of(dev);
    let wave = 16 * 3 * at.sms;
    let [k_low, k_mid, k_high] = at.gemv_ladder_k;
    let mut rows = Vec::new();
    for (n, k) in [
        (wave, k_low),
        (wave, k_mid),
        (wave, k_high),
        (2 * wave, k_mid),
    ] {
        let (_, q) = weight(dev, n, k)?;
        let mut rng = StdRng::seed_from_u64(k as u64);
        let x = dev.upload(&random_vec::<bf16>(&mut rng, k, 1.0))?;
        let mut y = dev.alloc_poisoned::<bf16>(n)?;
        let t = timer.time(3, REPS, || {
            nf4::forward_with(&q, &x, 1, &mut y, MatmulPath::GemvMma)
        })?;
        rows.push(Row::new(
            "nf4",
            &format!("nf4_gemv_mma ladder ▸ {n}x{k}"),
            &format!("1x{k}→{n}"),
            &t,
            q.bytes() as f64,
            2.0 * (n * k) as f64,
            c,
        ));
    }
    Ok(rows)
}

/// The fused wgmma GEMM (Hopper), forward and backward at 64 and 8192 rows, against cuBLAS
/// at the same shapes.
pub fn wgmma_rows(dev: &Device, timer: &mut GpuTimer, c: &Ceilings, out: &mut Rows) -> Result<()> {
    if !dev.has_wgmma() {
        return Ok(());
    }
    let at = Scale::of(dev);
    let (_, q) = weight(dev, at.nf4.0, at.nf4.1)?;
    for m in [64, at.nf4_tokens] {
        for forward in [true, false] {
            out.push(matmul_row(
                dev,
                timer,
                c,
                &q,
                m,
                MatmulPath::FusedGemmWgmma,
                forward,
            )?)?;
        }
    }
    Ok(())
}
