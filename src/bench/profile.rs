//! `fk profile`: each kernel whose time bench/NOTES.md cannot yet explain, launched once at
//! its benchmark shape, for a hardware-counter profiler to read (scripts/gpu-check.sh runs it
//! under Nsight Compute, `ncu`). No timing loop: a profiler replays each launch itself, so one
//! launch per kernel keeps the profile to seconds. Two families, one profiler run each (NF4's,
//! then LoRA's); each case is announced before its launches, and cuBLAS's own GEMMs run among
//! them (the Extended path), the rate to compare with.

use super::lora::layer;
use super::nf4::weight;
use super::Scale;
use crate::bf16;
use crate::check::lora::paths;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::lora::{ColumnRuns, LoraPath, TileLoads};
use crate::nf4::{self, MatmulPath};
use crate::testing::random_vec;
use rand::{rngs::StdRng, SeedableRng};

/// The families [`run`] profiles.
pub const FAMILIES: [&str; 2] = ["nf4", "lora"];

/// Runs the cases of `family` (one of [`FAMILIES`]) on `dev` at the benchmarks' shapes
/// ([`Scale::of`]), calling `announce` with each case's name before its launches.
pub fn run(dev: &Device, family: &str, announce: &mut dyn FnMut(&str)) -> Result<()> {
    run_at(dev, family, Scale::of(dev), announce)
}

fn run_at(dev: &Device, family: &str, at: Scale, announce: &mut dyn FnMut(&str)) -> Result<()> {
    match family {
        "nf4" => nf4_cases(dev, at, announce)?,
        "lora" => lora_cases(dev, at, announce)?,
        other => {
            return Err(Error::InvalidArgument {
                what: "profile family",
                why: format!("{other:?} is not nf4 or lora"),
            })
        }
    }
    dev.synchronize()
}

/// The tensor-core GEMV both ways and the SIMT one (1 row), the tensor-core one at 64 rows
/// (is it x's traffic from L2 that binds it, or its one block per SM: bench/NOTES.md),
/// dequantize, and on Hopper the fused wgmma GEMM that decodes in its tiles.
fn nf4_cases(dev: &Device, at: Scale, announce: &mut dyn FnMut(&str)) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    let (rows, cols) = at.nf4;
    let (_, wide) = weight(dev, rows, cols)?;
    let (_, tall) = weight(dev, cols, rows)?;
    for (q, path, m) in [
        (&wide, MatmulPath::GemvMma, 1),
        (&tall, MatmulPath::GemvMma, 1),
        (&wide, MatmulPath::Gemv, 1),
        (&wide, MatmulPath::GemvMma, 64),
    ] {
        announce(&format!(
            "{} {m}x{}→{}",
            path.label(true, DType::BF16),
            q.cols(),
            q.rows()
        ));
        let x = dev.upload(&random_vec::<bf16>(&mut rng, m * q.cols(), 1.0))?;
        let mut y = dev.alloc_output::<bf16>(m * q.rows())?;
        nf4::forward_with(q, &x, m, &mut y, path)?;
    }
    announce(&format!("nf4_dequantize_bf16 {cols}x{rows}"));
    let mut w = dev.alloc_output::<bf16>(rows * cols)?;
    wide.dequantize(&mut w)?;
    if dev.has_wgmma() {
        let m = at.nf4_tokens;
        announce(&format!("nf4_gemm_wgmma_bf16 {m}x{cols}→{rows}"));
        let x = dev.upload(&random_vec::<bf16>(&mut rng, m * cols, 1.0))?;
        let mut y = dev.alloc_output::<bf16>(m * rows)?;
        nf4::forward_with(&wide, &x, m, &mut y, MatmulPath::FusedGemmWgmma)?;
    }
    Ok(())
}

/// LoRA, rank 16: forward and backward on the Extended path (cuBLAS) and the wgmma one,
/// without and with dropout (lora_dx_fixup); the wgmma forward as lora_down and its GEMM (the
/// default makes u in the GEMM), that GEMM in column runs, and u made in column runs; the
/// wgmma backward as lora_backward_v and dXᵀ's GEMM (the default makes v in dX's), and v
/// made in column runs.
fn lora_cases(dev: &Device, at: Scale, announce: &mut dyn FnMut(&str)) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(6);
    let (m, d, rank) = at.lora;
    let x = dev.upload(&random_vec::<bf16>(&mut rng, m * d, 1.0))?;
    let dy = dev.upload(&random_vec::<bf16>(&mut rng, m * d, 1.0))?;
    // Not the mma.sync Fused path: its times are not among the open questions.
    let lora_paths = paths(dev).into_iter().filter(|&p| p != LoraPath::Fused);
    for (path, dropout) in lora_paths.flat_map(|p| [(p, 0.0), (p, 0.1)]) {
        let (l, _) = layer(dev, (d, d), None, dropout, false, path, TileLoads::Tma)?;
        let name = format!("lora {path:?} p {dropout} {m}x{d}→{d} r{rank}");
        announce(&format!("{name} forward"));
        let (_, saved) = l.forward(&x, m)?;
        announce(&format!("{name} backward"));
        l.backward(&x, &saved, &dy)?;
        // The wgmma forward with u made in the GEMM once a run of column tiles, and the
        // backward with v so; the forward's GEMM without u (after lora_down) in column runs and
        // in the window order: the second's DRAM % and L2 hit rate against the third's are
        // what the order costs (bench/NOTES.md, u inside the GEMM); the backward after
        // lora_backward_v.
        if path == LoraPath::FusedWgmma && dropout == 0.0 {
            let l = l.with_column_runs(ColumnRuns::Longest);
            announce(&format!("{name} column runs, u kept, forward"));
            let (_, saved) = l.forward(&x, m)?;
            announce(&format!("{name} column runs, v kept, backward"));
            l.backward(&x, &saved, &dy)?;
            let l = l.with_fused_down(false).with_fused_v(false);
            announce(&format!("{name} column runs forward"));
            l.forward(&x, m)?;
            let l = l.with_column_runs(ColumnRuns::Off);
            announce(&format!("{name} lora_down forward"));
            let (_, saved) = l.forward(&x, m)?;
            announce(&format!("{name} lora_backward_v backward"));
            l.backward(&x, &saved, &dy)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every case runs, at small shapes, on every backend (a GPU session is too scarce to
    /// find a broken case in the profile step), and an unknown family is a typed error.
    #[test]
    fn every_case_runs() {
        let small = Scale::SMALL;
        for dev in crate::testing::backends() {
            // Four GEMVs and dequantize, and the wgmma GEMM where there is wgmma; LoRA's
            // forward and backward without and with dropout on each path but Fused, the wgmma
            // forward after lora_down, in both orders, and with u made in column runs; the
            // wgmma backward after lora_backward_v, and with v made in column runs.
            let lora_paths = paths(&dev)
                .iter()
                .filter(|&&p| p != LoraPath::Fused)
                .count();
            for (family, count) in [
                ("nf4", 5 + dev.has_wgmma() as usize),
                ("lora", 4 * lora_paths + 5 * dev.has_wgmma() as usize),
            ] {
                let mut cases = Vec::new();
                run_at(&dev, family, small, &mut |c| cases.push(c.to_string())).unwrap();
                assert_eq!(cases.len(), count, "{family} on {dev:?}: {cases:?}");
            }
            let err = run_at(&dev, "sparse", small, &mut |_| {}).unwrap_err();
            assert!(err.to_string().contains("not nf4 or lora"), "{err}");
        }
    }
}
