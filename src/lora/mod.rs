//! LoRA in PEFT's layout (DESIGN.md §6): the fused layer kernels over a dense or NF4 base
//! ([`LoraLinear`]), and adapters on disk ([`adapter`]).
//!
//! `y = x Wᵀ + bias + scale · (dropout(x) Aᵀ) Bᵀ`, with `A [rank, in]`, `B [out, rank]`,
//! `scale = alpha / rank` (or `alpha / √rank`, rsLoRA) and the dropout mask regenerated from
//! a Philox seed. Kernels: `cuda/lora.cu` (math and what is saved: `cuda/params/lora.h`).
//! Reference: [`crate::reference::lora`]. Tests: `tests/lora_kernels.rs`.
//!
//! Forward saves `u = scale · dropout(x) Aᵀ` (`[m, rank]`, the activations' dtype) and the
//! seed; with the caller's `x` that is all backward needs: nothing `[m, out]`- or
//! `[out, in]`-sized. Backward's reductions over tokens are split by rows and summed in a
//! fixed order: deterministic, no float atomics.

pub mod adapter;

use crate::device::{check_device, Buffer, Device, Kernel, LaunchConfig};
use crate::dtype::{DType, FloatElem};
use crate::error::{Error, Result};
use crate::nf4::Nf4Weight;
use crate::params::{self, LoraParams};
pub use crate::reference::lora::LoraConfig;

const MODULE: &str = "lora";
const TILE: u32 = 128;
const THREADS: u32 = 256;

/// The frozen base weight `[out, in]` of a LoRA layer.
pub enum LoraBase<T: FloatElem> {
    Dense(Buffer<T>),
    Nf4(Box<Nf4Weight>),
}

/// A LoRA layer on a device: the frozen base, an optional bias, and the adapter.
pub struct LoraLinear<T: FloatElem> {
    base: LoraBase<T>,
    bias: Option<Buffer<T>>,
    /// `lora_A.weight`, `[rank, in]`.
    pub a: Buffer<T>,
    /// `lora_B.weight`, `[out, rank]`.
    pub b: Buffer<T>,
    d_in: usize,
    d_out: usize,
    config: LoraConfig,
}

/// What forward keeps for backward (besides the caller's `x`).
pub struct Saved<T: FloatElem> {
    /// `scale · dropout(x) Aᵀ`, `[m, rank]`.
    pub u: Buffer<T>,
    pub m: usize,
    /// The dropout seed forward used.
    pub seed: u64,
}

/// The gradients of one backward pass. Parameter gradients are f32 (for f32 optimizer
/// state), `dx` is in the activations' dtype.
pub struct LoraGrads<T: FloatElem> {
    /// `[m, in]`
    pub dx: Buffer<T>,
    /// `[rank, in]`
    pub da: Buffer<f32>,
    /// `[out, rank]`
    pub db: Buffer<f32>,
    /// `[out]`, when the layer has a bias.
    pub dbias: Option<Buffer<f32>>,
}

fn kernel(name: String) -> Kernel {
    Kernel {
        module: MODULE,
        name,
    }
}

fn tiles(rows: usize, cols: usize, splits: u32) -> LaunchConfig {
    LaunchConfig {
        grid: (
            (cols as u32).div_ceil(TILE),
            (rows as u32).div_ceil(TILE),
            splits,
        ),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    }
}

impl<T: FloatElem> LoraLinear<T> {
    /// A layer from its parts; checks every shape, dtype and device against the config.
    pub fn new(
        base: LoraBase<T>,
        bias: Option<Buffer<T>>,
        a: Buffer<T>,
        b: Buffer<T>,
        config: LoraConfig,
    ) -> Result<Self> {
        config.validate()?;
        if !matches!(T::DTYPE, DType::BF16 | DType::F16) {
            return Err(Error::UnsupportedDtype {
                op: "lora",
                dtypes: T::DTYPE.to_string(),
            });
        }
        let (d_out, d_in) = match &base {
            LoraBase::Dense(w) => {
                let d_in = a.len() / config.rank;
                let d_out = b.len() / config.rank;
                Error::check_len("lora base weight [out, in]", d_out * d_in, w.len())?;
                (d_out, d_in)
            }
            LoraBase::Nf4(w) => (w.rows(), w.cols()),
        };
        if d_in == 0 || d_out == 0 || d_in > u32::MAX as usize || d_out > u32::MAX as usize {
            return Err(Error::Unsupported {
                op: "lora",
                why: format!("layer shape [{d_out}, {d_in}]"),
            });
        }
        let shape = |what: &str, expected: Vec<usize>, got: usize| -> Result<()> {
            if expected.iter().product::<usize>() == got {
                Ok(())
            } else {
                Err(Error::ShapeMismatch {
                    what: what.into(),
                    expected,
                    got: vec![got],
                })
            }
        };
        shape("lora A [rank, in]", vec![config.rank, d_in], a.len())?;
        shape("lora B [out, rank]", vec![d_out, config.rank], b.len())?;
        let dev = a.device().clone();
        check_device(&dev, &b)?;
        match &base {
            LoraBase::Dense(w) => check_device(&dev, w)?,
            LoraBase::Nf4(w) => {
                if !dev.same(w.device()) {
                    return Err(Error::DeviceMismatch);
                }
            }
        }
        if let Some(bias) = &bias {
            shape("bias [out]", vec![d_out], bias.len())?;
            check_device(&dev, bias)?;
        }
        Ok(LoraLinear {
            base,
            bias,
            a,
            b,
            d_in,
            d_out,
            config,
        })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Sets the dropout seed the next forward uses (draw a fresh one per step).
    pub fn set_seed(&mut self, seed: u64) {
        self.config.seed = seed;
    }

    pub fn d_in(&self) -> usize {
        self.d_in
    }

    pub fn d_out(&self) -> usize {
        self.d_out
    }

    pub fn base(&self) -> &LoraBase<T> {
        &self.base
    }

    pub fn device(&self) -> &Device {
        self.a.device()
    }

    fn params(&self, m: usize, seed: u64) -> LoraParams {
        let null = std::ptr::null::<std::ffi::c_void>();
        let mut nf4 = params::Nf4Weight {
            codes: std::ptr::null(),
            absmax: std::ptr::null(),
            nested_codes: std::ptr::null(),
            nested_absmax: std::ptr::null(),
            nested_map: std::ptr::null(),
            offset: 0.0,
            nested: 0,
            blocksize: 64,
            rows: self.d_out as u32,
            cols: self.d_in as u32,
        };
        let w = match &self.base {
            LoraBase::Dense(w) => w.ptr(),
            LoraBase::Nf4(q) => {
                nf4 = q.params();
                null
            }
        };
        LoraParams {
            m: m as u32,
            d_in: self.d_in as u32,
            d_out: self.d_out as u32,
            rank: self.config.rank as u32,
            w,
            nf4,
            bias: self.bias.as_ref().map_or(null, |b| b.ptr()),
            a: self.a.ptr(),
            b: self.b.ptr(),
            scale: self.config.scale(),
            dropout: self.config.dropout,
            seed,
            x: null,
            u: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            dy: null,
            v: std::ptr::null_mut(),
            dx: std::ptr::null_mut(),
            partials: std::ptr::null_mut(),
            splits: 1,
            da: std::ptr::null_mut(),
            db: std::ptr::null_mut(),
            dbias: std::ptr::null_mut(),
            merged: std::ptr::null_mut(),
        }
    }

    fn check_rows(&self, what: &str, buf: &Buffer<T>, m: usize, cols: usize) -> Result<()> {
        if buf.len() != m.saturating_mul(cols) {
            return Err(Error::ShapeMismatch {
                what: what.into(),
                expected: vec![m, cols],
                got: vec![buf.len()],
            });
        }
        check_device(self.device(), buf)
    }

    fn suffix(&self) -> String {
        let nf4 = if matches!(self.base, LoraBase::Nf4(_)) {
            "nf4_"
        } else {
            ""
        };
        format!("{nf4}{}", T::DTYPE)
    }

    /// `y = x Wᵀ + bias + scale · (dropout(x) Aᵀ) Bᵀ` for `x` `[m, in]`: returns `y`
    /// `[m, out]` and what backward needs. Two launches: the down-projection, then the base
    /// GEMM extended along K by the LoRA term (`[u | x] · [B | W]ᵀ`), bias in its epilogue.
    pub fn forward(&self, x: &Buffer<T>, m: usize) -> Result<(Buffer<T>, Saved<T>)> {
        self.check_rows("x", x, m, self.d_in)?;
        let dev = self.device().clone();
        let mut u = dev.alloc_poisoned::<T>(m * self.config.rank)?;
        let mut y = dev.alloc_poisoned::<T>(m * self.d_out)?;
        if m > 0 {
            let mut p = self.params(m, self.config.seed);
            p.x = x.ptr();
            p.u = u.ptr_mut();
            p.y = y.ptr_mut();
            let t = T::DTYPE;
            // SAFETY: x [m, in], u [m, rank] and y [m, out] were checked or sized above; the
            // layer's own buffers were checked in new().
            unsafe {
                dev.launch(
                    &kernel(format!("lora_down_{t}")),
                    tiles(m, self.config.rank, 1),
                    &p,
                )?;
                dev.launch(
                    &kernel(format!("lora_forward_{}", self.suffix())),
                    tiles(m, self.d_out, 1),
                    &p,
                )?;
            }
        }
        Ok((
            y,
            Saved {
                u,
                m,
                seed: self.config.seed,
            },
        ))
    }

    /// The gradients for `dy` `[m, out]`, given forward's input `x` and what it saved.
    pub fn backward(
        &self,
        x: &Buffer<T>,
        saved: &Saved<T>,
        dy: &Buffer<T>,
    ) -> Result<LoraGrads<T>> {
        let m = saved.m;
        self.check_rows("x", x, m, self.d_in)?;
        self.check_rows("saved u", &saved.u, m, self.config.rank)?;
        self.check_rows("dy", dy, m, self.d_out)?;
        let dev = self.device().clone();
        let r = self.config.rank;
        let mut dx = dev.alloc_poisoned::<T>(m * self.d_in)?;
        let mut da = dev.alloc_poisoned::<f32>(r * self.d_in)?;
        let mut db = dev.alloc_poisoned::<f32>(self.d_out * r)?;
        let mut dbias = self
            .bias
            .as_ref()
            .map(|_| dev.alloc_poisoned::<f32>(self.d_out))
            .transpose()?;
        if m == 0 {
            // No tokens: zero gradients.
            da = dev.zeros(r * self.d_in)?;
            db = dev.zeros(self.d_out * r)?;
            dbias = self
                .bias
                .as_ref()
                .map(|_| dev.zeros(self.d_out))
                .transpose()?;
            return Ok(LoraGrads { dx, da, db, dbias });
        }
        let mut v = dev.alloc_poisoned::<T>(m * r)?;
        let splits = split_count(m);
        let mut partials =
            dev.alloc_poisoned::<f32>(splits as usize * (r * self.d_in + self.d_out * (r + 1)))?;
        let mut p = self.params(m, saved.seed);
        p.x = x.ptr();
        p.u = saved.u.ptr() as *mut std::ffi::c_void;
        p.dy = dy.ptr();
        p.v = v.ptr_mut();
        p.dx = dx.ptr_mut();
        p.partials = partials.ptr_mut() as *mut f32;
        p.splits = splits;
        p.da = da.ptr_mut() as *mut f32;
        p.db = db.ptr_mut() as *mut f32;
        p.dbias = dbias
            .as_mut()
            .map_or(std::ptr::null_mut(), |b| b.ptr_mut() as *mut f32);
        let t = T::DTYPE;
        let reduce_len = (r * self.d_in + self.d_out * (r + 1)) as u64;
        // SAFETY: every buffer in p was checked or sized above; the kernels only read u
        // (passed through the mutable field of the shared params struct).
        unsafe {
            dev.launch(&kernel(format!("lora_backward_v_{t}")), tiles(m, r, 1), &p)?;
            dev.launch(
                &kernel(format!("lora_backward_dx_{}", self.suffix())),
                tiles(m, self.d_in, 1),
                &p,
            )?;
            dev.launch(
                &kernel(format!("lora_grad_a_{t}")),
                tiles(r, self.d_in, splits),
                &p,
            )?;
            dev.launch(
                &kernel(format!("lora_grad_b_{t}")),
                tiles(self.d_out, r + 1, splits),
                &p,
            )?;
            dev.launch(
                &kernel("lora_reduce".into()),
                LaunchConfig::grid_stride(reduce_len, THREADS, 1 << 16),
                &p,
            )?;
        }
        Ok(LoraGrads { dx, da, db, dbias })
    }

    /// The merged dense weight `W + scale · B A` (`[out, in]`), for a dense base.
    pub fn merged(&self) -> Result<Buffer<T>> {
        let LoraBase::Dense(_) = &self.base else {
            return Err(Error::Unsupported {
                op: "lora merge",
                why: "an NF4 base merges through merged_nf4".into(),
            });
        };
        let dev = self.device().clone();
        let mut out = dev.alloc_poisoned::<T>(self.d_out * self.d_in)?;
        let mut p = self.params(0, 0);
        p.merged = out.ptr_mut();
        // SAFETY: out is [out, in] like W; A and B were checked in new().
        unsafe {
            dev.launch(
                &kernel(format!("lora_merge_{}", T::DTYPE)),
                tiles(self.d_out, self.d_in, 1),
                &p,
            )?
        };
        Ok(out)
    }

    /// For an NF4 base: dequantize, merge, requantize (same blocksize and double
    /// quantization). Returns the merged NF4 weight and the requantization error it added,
    /// `‖Q(W') − W'‖₂ / ‖W'‖₂` with `W'` the merged weight in T.
    pub fn merged_nf4(&self) -> Result<(Nf4Weight, f64)> {
        let LoraBase::Nf4(q) = &self.base else {
            return Err(Error::Unsupported {
                op: "lora merge",
                why: "a dense base merges through merged".into(),
            });
        };
        let dev = self.device().clone();
        let mut w = dev.alloc_poisoned::<T>(self.d_out * self.d_in)?;
        q.dequantize(&mut w)?;
        let mut merged = dev.alloc_poisoned::<T>(self.d_out * self.d_in)?;
        let mut p = self.params(0, 0);
        p.w = w.ptr();
        p.merged = merged.ptr_mut();
        // SAFETY: w and merged are [out, in]; A and B were checked in new().
        unsafe {
            dev.launch(
                &kernel(format!("lora_merge_{}", T::DTYPE)),
                tiles(self.d_out, self.d_in, 1),
                &p,
            )?
        };
        let requantized = Nf4Weight::quantize(
            &merged,
            self.d_out,
            self.d_in,
            q.blocksize(),
            q.is_double_quant(),
        )?;
        let mut back = dev.alloc_poisoned::<T>(self.d_out * self.d_in)?;
        requantized.dequantize(&mut back)?;
        let error = crate::testing::rel_l2(&back.to_host()?, &merged.to_host()?);
        Ok((requantized, error))
    }
}

/// Row splits of the weight-gradient reductions: enough blocks to fill a GPU, each split at
/// least 512 rows.
fn split_count(m: usize) -> u32 {
    (m.div_ceil(512)).clamp(1, 16) as u32
}

/// Every kernel this module can launch (the build checks look each up in the PTX).
pub fn kernels() -> Vec<Kernel> {
    let mut names = vec!["lora_reduce".to_string()];
    for t in ["bf16", "f16"] {
        for op in [
            "down",
            "forward",
            "forward_nf4",
            "backward_v",
            "backward_dx",
            "backward_dx_nf4",
            "grad_a",
            "grad_b",
            "merge",
        ] {
            names.push(format!("lora_{op}_{t}"));
        }
    }
    names.into_iter().map(kernel).collect()
}
