//! A QLoRA layer trained for a few steps, as a training loop would drive it.
//!
//! The frozen base is NF4 (quantized here from a random bf16 weight); a "teacher" layer with
//! fixed random LoRA factors makes the targets, and a "student" layer over the same base,
//! initialized as PEFT does (A random, B zero, dropout on), learns its own factors by SGD on
//! the squared error. Every product runs on the crate's kernels; only the loss and the SGD
//! step run on the host. Over the 60 steps the loss falls several times over (the example
//! fails unless it falls at least fourfold); the student's dropout and bf16 factors keep it
//! from reaching zero.
//!
//! `cargo run --release --example qlora_train` (a GPU if there is one, else the emulator).

use finetune_kernels::lora::{LoraBase, LoraConfig, LoraLinear};
use finetune_kernels::nf4::Nf4Weight;
use finetune_kernels::testing::random_vec;
use finetune_kernels::{bf16, Buffer, Device, Result};
use rand::{rngs::StdRng, SeedableRng};

const TOKENS: usize = 64;
const D_IN: usize = 256;
const D_OUT: usize = 192;
const RANK: usize = 8;

fn layer(
    dev: &Device,
    base: &Nf4Weight,
    a: &[bf16],
    b: &[bf16],
    dropout: f32,
) -> Result<LoraLinear<bf16>> {
    let base = Nf4Weight::upload(dev, &base.to_host()?)?;
    let config = LoraConfig {
        dropout,
        seed: 1,
        ..LoraConfig::new(RANK, 16.0)
    };
    LoraLinear::new(
        LoraBase::Nf4(Box::new(base)),
        None,
        dev.upload(a)?,
        dev.upload(b)?,
        config,
    )
}

fn host_f32(b: &Buffer<bf16>) -> Result<Vec<f32>> {
    Ok(b.to_host()?.iter().map(|v| v.to_f32()).collect())
}

fn main() -> Result<()> {
    let dev = Device::best()?;
    println!("device: {}", dev.describe());
    let mut rng = StdRng::seed_from_u64(11);
    let w = dev.upload(&random_vec::<bf16>(&mut rng, D_OUT * D_IN, 0.05))?;
    let base = Nf4Weight::quantize(&w, D_OUT, D_IN, 64, true)?;

    let teacher = layer(
        &dev,
        &base,
        &random_vec(&mut rng, RANK * D_IN, 0.1),
        &random_vec(&mut rng, D_OUT * RANK, 0.1),
        0.0,
    )?;
    // PEFT's initialization: A random, B zero, so the student starts as the base layer.
    let mut a: Vec<f32> = random_vec::<bf16>(&mut rng, RANK * D_IN, 0.05)
        .iter()
        .map(|v| v.to_f32())
        .collect();
    let mut b = vec![0.0f32; D_OUT * RANK];
    let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let mut student = layer(&dev, &base, &to_bf16(&a), &to_bf16(&b), 0.05)?;

    let lr = 0.2f32;
    let mut losses = Vec::new();
    for step in 0..=60 {
        let x = dev.upload(&random_vec::<bf16>(&mut rng, TOKENS * D_IN, 1.0))?;
        let (target, _) = teacher.forward(&x, TOKENS)?;
        student.set_seed(step); // a fresh dropout mask per step
        let (y, saved) = student.forward(&x, TOKENS)?;
        let (y, target) = (host_f32(&y)?, host_f32(&target)?);
        // Squared error summed over outputs, averaged over tokens.
        let n = TOKENS as f32;
        let loss = y
            .iter()
            .zip(&target)
            .map(|(p, t)| (p - t).powi(2))
            .sum::<f32>()
            / n;
        if step % 10 == 0 {
            println!("step {step:2}: loss {loss:.3e}");
        }
        losses.push(loss);
        let dy: Vec<bf16> = y
            .iter()
            .zip(&target)
            .map(|(p, t)| bf16::from_f32(2.0 * (p - t) / n))
            .collect();
        let grads = student.backward(&x, &saved, &dev.upload(&dy)?)?;
        for (p, g) in a.iter_mut().zip(grads.da.to_host()?) {
            *p -= lr * g;
        }
        for (p, g) in b.iter_mut().zip(grads.db.to_host()?) {
            *p -= lr * g;
        }
        student.a = dev.upload(&to_bf16(&a))?;
        student.b = dev.upload(&to_bf16(&b))?;
    }
    // The last ten steps' mean against the first step's: one noisy step does not decide it.
    let last = losses[losses.len() - 10..].iter().sum::<f32>() / 10.0;
    assert!(last * 4.0 < losses[0], "the loss did not fall: {losses:?}");
    Ok(())
}
