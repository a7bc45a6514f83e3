//! A LoRA layer's forward and backward through `lora::raw`, as a framework that owns its
//! memory and its stream drives them: it allocates every tensor and workspace itself, fills
//! one `LoraParams` per step as `cuda/params/lora.h` describes, and launches the steps in
//! order on its stream: `down`, `forward`; `backward_v`, `backward_dx`, `grads`. The
//! results are checked against the f64 reference (`reference::lora`).
//!
//! Here the crate's `Device` allocates for brevity, and the stream is the device's own as a
//! raw handle (a framework passes its own; the emulator takes none).
//!
//! `cargo run --release --example lora_raw` (a GPU if there is one, else the emulator).

use finetune_kernels::lora::raw::{self, BaseGemm};
use finetune_kernels::lora::{k_split_count, LoraConfig};
use finetune_kernels::params::LoraParams;
use finetune_kernels::reference::lora::LoraLayer;
use finetune_kernels::testing::{random_vec, rel_l2};
use finetune_kernels::{bf16, DType, Device, Result};
use rand::{rngs::StdRng, SeedableRng};

const M: usize = 100;
const D_IN: usize = 256;
const D_OUT: usize = 192;
const RANK: usize = 8;

fn main() -> Result<()> {
    let dev = Device::best()?;
    println!("device: {}", dev.describe());
    let stream = match &dev {
        Device::Cuda(c) => Some(c.stream().cu_stream()),
        _ => None,
    };
    let gemm = if dev.has_wgmma() {
        BaseGemm::Wgmma
    } else {
        BaseGemm::Mma
    };
    let mut rng = StdRng::seed_from_u64(5);
    let host = |rng: &mut StdRng, n: usize, scale: f32| random_vec::<bf16>(rng, n, scale);
    let (w, bias) = (
        host(&mut rng, D_OUT * D_IN, 0.05),
        host(&mut rng, D_OUT, 1.0),
    );
    let (a, b) = (
        host(&mut rng, RANK * D_IN, 0.1),
        host(&mut rng, D_OUT * RANK, 0.1),
    );
    let (x, dy) = (
        host(&mut rng, M * D_IN, 1.0),
        host(&mut rng, M * D_OUT, 1.0),
    );
    let config = LoraConfig {
        dropout: 0.1,
        seed: 42,
        ..LoraConfig::new(RANK, 16.0)
    };

    // The framework's tensors: inputs, outputs, and the saved u.
    let (w_d, bias_d, a_d, b_d) = (
        dev.upload(&w)?,
        dev.upload(&bias)?,
        dev.upload(&a)?,
        dev.upload(&b)?,
    );
    let (x_d, dy_d) = (dev.upload(&x)?, dev.upload(&dy)?);
    let mut u = dev.alloc_output::<bf16>(M * RANK)?;
    let mut y = dev.alloc_output::<bf16>(M * D_OUT)?;
    let (mut v, mut dx) = (
        dev.alloc_output::<bf16>(M * RANK)?,
        dev.alloc_output::<bf16>(M * D_IN)?,
    );
    let mut da = dev.alloc_output::<f32>(RANK * D_IN)?;
    let mut db = dev.alloc_output::<f32>(D_OUT * RANK)?;
    let mut dbias = dev.alloc_output::<f32>(D_OUT)?;
    // Workspaces: the rank-wide GEMMs split over K, the weight gradients over rows.
    let down_splits = k_split_count(M, D_IN, dev.sm_count());
    let v_splits = k_split_count(M, D_OUT, dev.sm_count());
    let rank_partials_len =
        raw::rank_partials_len(M, RANK, down_splits).max(raw::rank_partials_len(M, RANK, v_splits));
    let mut rank_partials = dev.alloc_output::<f32>(rank_partials_len.max(1))?;
    // lora_grad_a and lora_grad_b make the partials here (backward_v, then backward_dx).
    let sizes = raw::grad_partials(&dev, M, D_IN, D_OUT, RANK, false, false);
    let mut partials = dev.alloc_output::<f32>(sizes.len)?;

    let layer = LoraParams {
        m: M as u32,
        d_in: D_IN as u32,
        d_out: D_OUT as u32,
        rank: RANK as u32,
        w: w_d.ptr(),
        bias: bias_d.ptr(),
        a: a_d.ptr(),
        b: b_d.ptr(),
        scale: config.scale(),
        dropout: config.dropout,
        seed: config.seed,
        x: x_d.ptr(),
        u: u.ptr_mut(),
        rank_partials: rank_partials.ptr_mut() as *mut f32,
        ..LoraParams::default()
    };
    let forward = LoraParams {
        y: y.ptr_mut(),
        k_splits: down_splits,
        ..layer
    };
    let backward = LoraParams {
        dy: dy_d.ptr(),
        v: v.ptr_mut(),
        dx: dx.ptr_mut(),
        k_splits: v_splits,
        partials: partials.ptr_mut() as *mut f32,
        splits: sizes.splits,
        da: da.ptr_mut() as *mut f32,
        db: db.ptr_mut() as *mut f32,
        dbias: dbias.ptr_mut() as *mut f32,
        ..layer
    };
    // SAFETY: every pointer above is a live buffer of `dev` sized for M tokens and the
    // layer's shapes, the workspaces as raw's functions size them; the steps run in order on
    // one stream, so each reads what the one before wrote.
    unsafe {
        raw::down(&dev, stream, DType::BF16, &forward)?;
        raw::forward(&dev, stream, DType::BF16, gemm, &forward)?;
        raw::backward_v(&dev, stream, DType::BF16, &backward)?;
        raw::backward_dx(&dev, stream, DType::BF16, gemm, &backward)?;
        raw::grads(&dev, stream, DType::BF16, &backward)?;
    }

    let reference = LoraLayer {
        w: &w,
        bias: Some(&bias),
        a: &a,
        b: &b,
        d_in: D_IN,
        d_out: D_OUT,
        config,
    };
    let want = reference.forward(&x, M)?;
    let grads = reference.backward(&x, &want.u, &dy, M)?;
    for (what, err) in [
        ("y", rel_l2(&y.to_host()?, &want.y)),
        ("dx", rel_l2(&dx.to_host()?, &grads.dx)),
        ("dA", rel_l2(&da.to_host()?, &grads.da)),
        ("dB", rel_l2(&db.to_host()?, &grads.db)),
        (
            "dbias",
            rel_l2(&dbias.to_host()?, grads.dbias.as_deref().unwrap_or(&[])),
        ),
    ] {
        println!("{what:>5}: relative L2 error against the f64 reference {err:.2e}");
        assert!(err < 2e-2, "{what} is off the reference");
    }
    println!(
        "{gemm:?} base GEMMs, {M} tokens, {D_IN}->{D_OUT}, rank {RANK}, dropout {}",
        config.dropout
    );
    Ok(())
}
