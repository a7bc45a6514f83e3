//! `fk profile`: each kernel whose time bench/NOTES.md cannot yet explain, launched once at
//! its benchmark shape, for a hardware-counter profiler to read (scripts/gpu-check.sh runs it
//! under Nsight Compute, `ncu`). No timing loop: a profiler replays each launch itself, so one
//! launch per kernel keeps the profile to seconds. Two families, one profiler run each (NF4's,
//! then LoRA's); each case is announced before its launches, and cuBLAS's own GEMMs run among
//! them (the Extended path), the rate to compare with.

use super::lora::{layer, D, M, RANK};
use super::nf4::weight;
use crate::bf16;
use crate::check::lora::paths;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::lora::{LoraPath, TileLoads};
use crate::nf4::{self, MatmulPath};
use crate::testing::random_vec;
use rand::{rngs::StdRng, SeedableRng};

/// Runs the cases of `family` (`nf4` or `lora`) on `dev`, calling `announce` with each
/// case's name before its launches.
pub fn run(dev: &Device, family: &str, announce: &mut dyn FnMut(&str)) -> Result<()> {
    match family {
        "nf4" => nf4_cases(dev, announce)?,
        "lora" => lora_cases(dev, announce)?,
        other => {
            return Err(Error::InvalidArgument {
                what: "profile family",
                why: format!("{other:?} is not nf4 or lora"),
            })
        }
    }
    dev.synchronize()
}

/// The tensor-core GEMV both ways and the SIMT one (1 row), dequantize, and on Hopper the
/// fused wgmma GEMM that decodes in its tiles (8192 rows); at LLaMA-7B's MLP shapes.
fn nf4_cases(dev: &Device, announce: &mut dyn FnMut(&str)) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(5);
    let (_, wide) = weight(dev, 11008, 4096)?;
    let (_, tall) = weight(dev, 4096, 11008)?;
    for (q, path) in [
        (&wide, MatmulPath::GemvMma),
        (&tall, MatmulPath::GemvMma),
        (&wide, MatmulPath::Gemv),
    ] {
        announce(&format!(
            "{} 1x{}→{}",
            path.label(true, crate::DType::BF16),
            q.cols(),
            q.rows()
        ));
        let x = dev.upload(&random_vec::<bf16>(&mut rng, q.cols(), 1.0))?;
        let mut y = dev.alloc_output::<bf16>(q.rows())?;
        nf4::forward_with(q, &x, 1, &mut y, path)?;
    }
    announce("nf4_dequantize_bf16 4096x11008");
    let mut w = dev.alloc_output::<bf16>(wide.rows() * wide.cols())?;
    wide.dequantize(&mut w)?;
    if dev.has_wgmma() {
        announce("nf4_gemm_wgmma_bf16 8192x4096→11008");
        let x = dev.upload(&random_vec::<bf16>(&mut rng, M * wide.cols(), 1.0))?;
        let mut y = dev.alloc_output::<bf16>(M * wide.rows())?;
        nf4::forward_with(&wide, &x, M, &mut y, MatmulPath::FusedGemmWgmma)?;
    }
    Ok(())
}

/// LoRA at 8192 tokens, 4096→4096, r = 16: forward and backward on the Extended path
/// (cuBLAS) and the wgmma one, without and with dropout (lora_dx_fixup).
fn lora_cases(dev: &Device, announce: &mut dyn FnMut(&str)) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(6);
    let x = dev.upload(&random_vec::<bf16>(&mut rng, M * D, 1.0))?;
    let dy = dev.upload(&random_vec::<bf16>(&mut rng, M * D, 1.0))?;
    // Not the mma.sync Fused path: its times are not among the open questions.
    let lora_paths = paths(dev).into_iter().filter(|&p| p != LoraPath::Fused);
    for (path, dropout) in lora_paths.flat_map(|p| [(p, 0.0), (p, 0.1)]) {
        let (l, _) = layer(dev, (D, D), None, dropout, false, path, TileLoads::Tma)?;
        let name = format!("lora {path:?} p {dropout} {M}x{D}→{D} r{RANK}");
        announce(&format!("{name} forward"));
        let (_, saved) = l.forward(&x, M)?;
        announce(&format!("{name} backward"));
        l.backward(&x, &saved, &dy)?;
    }
    Ok(())
}
