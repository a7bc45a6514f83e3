//! Decode-sized matmuls through a 4-bit base weight, as a framework would call them.
//!
//! Quantizes a bf16 weight to NF4 (bitsandbytes' format, double quantization), runs
//! `y = x Ŵᵀ` for a few rows through the path `nf4::forward` picks, and checks the result
//! against the dequantized weight multiplied on the host in f64.
//!
//! `cargo run --release --example nf4_decode` (a GPU if there is one, else the emulator).

use finetune_kernels::nf4::{self, Nf4Weight};
use finetune_kernels::reference::linear::linear;
use finetune_kernels::testing::{random_vec, rel_l2};
use finetune_kernels::{bf16, DType, Device, Result};
use rand::{rngs::StdRng, SeedableRng};

fn main() -> Result<()> {
    let dev = Device::best()?;
    println!("device: {}", dev.describe());
    let (rows, cols, m) = (384, 512, 4); // out_features, in_features, tokens
    let mut rng = StdRng::seed_from_u64(7);

    let w = dev.upload(&random_vec::<bf16>(&mut rng, rows * cols, 0.05))?;
    let q = Nf4Weight::quantize(&w, rows, cols, 64, true)?;
    println!(
        "weight {rows}x{cols}: {} bytes as NF4 (bf16: {})",
        q.bytes(),
        2 * rows * cols
    );

    let x_host = random_vec::<bf16>(&mut rng, m * cols, 1.0);
    let x = dev.upload(&x_host)?;
    let mut y = dev.alloc_poisoned::<bf16>(m * rows)?;
    let path = nf4::forward(&q, &x, m, &mut y)?;
    println!("{m} rows through {}", path.label(true, DType::BF16));

    // The same product from the dequantized weight, in f64 on the host (the crate's
    // reference matmul), one rounding to bf16.
    let mut w_hat = dev.alloc_poisoned::<bf16>(rows * cols)?;
    q.dequantize(&mut w_hat)?;
    let want = linear(&x_host, &w_hat.to_host()?, m, rows, cols)?;
    // Both sides round to bf16 (the output; the GEMV also its codes), about 1e-3 each.
    let err = rel_l2(&y.to_host()?, &want);
    println!("relative error against dequantize-then-multiply: {err:.2e}");
    assert!(
        err < 1e-2,
        "the fused product is off: {err:e} (NaN if unwritten)"
    );
    Ok(())
}
