//! Reference for a LoRA layer exactly as PEFT defines it (DESIGN.md §6), in f64: the oracle
//! for the fused LoRA kernels and the math behind [`crate::lora::adapter`]'s merge.
//!
//! Shapes, row-major, PyTorch's `nn.Linear` layout (`m` rows of activations, `r` the rank):
//!
//! | operand | shape | PEFT name |
//! |---|---|---|
//! | `x` | `[m, in]` | the layer input |
//! | `w` | `[out, in]` | `base_layer.weight` (as the kernel sees it, e.g. NF4-dequantized) |
//! | `bias` | `[out]` | `base_layer.bias`, optional |
//! | `a` | `[r, in]` | `lora_A.weight` |
//! | `b` | `[out, r]` | `lora_B.weight` |
//! | `y`, `dy` | `[m, out]` | |
//! | `u` | `[m, r]` | `lora_A(dropout(x))`, what forward saves for backward (unscaled here; the kernels' [`crate::lora::Saved::u`] holds `scale · u`) |
//!
//! `y = x Wᵀ + bias + scale · (dropout(x) Aᵀ) Bᵀ` with `scale = alpha / r`, or `alpha / √r`
//! with rsLoRA, rounded to f32 as PyTorch does when it multiplies an f32 tensor by it.
//! `dropout(x) = x · keep / (1 − p)` where `keep` is the Philox mask
//! ([`crate::reference::philox::dropout_mask`]) keyed by the seed and the flattened index
//! `i · in + j` of `x`; a dropped element contributes exactly 0 (a select, not a multiply,
//! so a NaN there does not reach `u`; it still reaches `y` through `x Wᵀ`).
//!
//! Every sum is taken in f64 from the operands' values, then rounded to f32 (and from there
//! to the output type, as a kernel's f32 accumulator is). Backward's `v = scale · dY B` is
//! rounded to `T` before its two uses (dX and dA), as the kernels store it and as PyTorch's
//! autograd holds it for PEFT.

use crate::dtype::FloatElem;
use crate::error::{Error, Result};
use crate::philox::check_dropout_p;
use crate::reference::by_rows;
use crate::reference::philox::dropout_mask;

/// The hyper-parameters of one LoRA layer, PEFT's `LoraConfig` fields `r`, `lora_alpha`,
/// `use_rslora`, `lora_dropout`, plus the dropout seed (PEFT draws from torch's global RNG;
/// here the mask is a function of the seed, so backward regenerates it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraConfig {
    /// PEFT's `r`: the rank, the inner dimension of A `[r, in]` and B `[out, r]`; at least 1.
    pub rank: usize,
    /// PEFT's `lora_alpha`, a Python float: f64, so the scale is PEFT's to the last bit.
    pub alpha: f64,
    /// PEFT's `use_rslora`: scale by `alpha / √r` rather than `alpha / r`.
    pub use_rslora: bool,
    /// PEFT's `lora_dropout`: the probability that an element of `x` is dropped on the
    /// adapter's branch (the base GEMM sees all of `x`), in [0, 1).
    pub dropout: f32,
    /// Keys the Philox dropout mask, with each element's flattened index in `x`; the same
    /// seed gives the same mask. No effect when `dropout` is 0.
    pub seed: u64,
}

impl LoraConfig {
    /// Rank `rank` and `lora_alpha` `alpha`, the rest as PEFT's `LoraConfig` defaults them:
    /// no rsLoRA, no dropout (seed 0; set `dropout` and `seed` to draw a mask).
    pub fn new(rank: usize, alpha: f64) -> Self {
        LoraConfig {
            rank,
            alpha,
            use_rslora: false,
            dropout: 0.0,
            seed: 0,
        }
    }

    /// The largest rank [`crate::lora::LoraLinear`] takes. The kernels tile any rank; this
    /// bounds the work and memory a layer can ask for, and the kernel tests run at it.
    /// Adapters on disk and this reference take any rank (PEFT allows r = 512 and more).
    pub const MAX_RANK: usize = 256;

    /// `alpha / r`, or `alpha / √r` with rsLoRA: computed in f64 as Python does, rounded to
    /// f32 as PyTorch does when it scales an f32 tensor by a Python float.
    pub fn scale(&self) -> f32 {
        let r = self.rank as f64;
        let denominator = if self.use_rslora { r.sqrt() } else { r };
        (self.alpha / denominator) as f32
    }

    /// Errors unless the rank is at least 1, alpha and the scale are finite and the dropout
    /// probability is in [0, 1).
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::Unsupported {
                op: "lora",
                why: "rank 0".into(),
            });
        }
        if !self.alpha.is_finite() || !self.scale().is_finite() {
            return Err(Error::InvalidArgument {
                what: "lora alpha",
                why: format!("{} gives the scale {}", self.alpha, self.scale()),
            });
        }
        check_dropout_p(self.dropout)
    }

    /// The factor a kept element is multiplied by, `1 / (1 − p)`.
    fn keep_scale(&self) -> f64 {
        1.0 / (1.0 - self.dropout as f64)
    }
}

/// One LoRA layer's weights: `T` is the activations' dtype, `L` the adapter's (often f32
/// over a bf16 model), `W` the base weight's (T unless a kernel sees the weight in more
/// precision than T: f32 for an NF4 weight's codes in T times its f32 absmax, as the NF4
/// GEMV computes). Shapes in the [module docs](self).
#[derive(Debug, Clone, Copy)]
pub struct LoraLayer<'a, T, L, W = T> {
    /// `[out, in]`
    pub w: &'a [W],
    /// `[out]`
    pub bias: Option<&'a [T]>,
    /// `[r, in]`
    pub a: &'a [L],
    /// `[out, r]`
    pub b: &'a [L],
    /// Input features: the columns of `w` and `a`, the width of `x`'s rows.
    pub d_in: usize,
    /// Output features: the rows of `w` and `b`, the width of `y`'s rows.
    pub d_out: usize,
    /// The rank, the scale's alpha and rsLoRA, the dropout and its seed.
    pub config: LoraConfig,
}

/// What forward returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward<T> {
    /// `[m, out]`
    pub y: Vec<T>,
    /// `[m, r]`: `dropout(x) Aᵀ`, kept in f32 for backward.
    pub u: Vec<f32>,
}

/// What backward returns. The parameter gradients are f32 whatever `T` is: they feed f32
/// optimizer state, and a kernel that writes them in a narrower type compares against
/// their rounding.
#[derive(Debug, Clone, PartialEq)]
pub struct Grads<T> {
    /// `[m, in]`: `dY W + v A ⊙ keep / (1 − p)`, `v = scale · dY B` rounded to `T`
    pub dx: Vec<T>,
    /// `[r, in]`: `vᵀ dropout(x)`
    pub da: Vec<f32>,
    /// `[out, r]`: `scale · dYᵀ u`
    pub db: Vec<f32>,
    /// `[out]`: the column sums of `dY`, when the layer has a bias.
    pub dbias: Option<Vec<f32>>,
}

/// A row-major f64 matrix: the reference's only data structure.
#[derive(Debug, Clone)]
struct Mat {
    rows: usize,
    cols: usize,
    data: Vec<f64>,
}

impl Mat {
    fn new<E: FloatElem>(v: &[E], rows: usize, cols: usize) -> Mat {
        debug_assert_eq!(v.len(), rows * cols);
        Mat {
            rows,
            cols,
            data: v.iter().map(|e| e.to_f32() as f64).collect(),
        }
    }

    fn t(&self) -> Mat {
        let mut data = Vec::with_capacity(self.data.len());
        for j in 0..self.cols {
            data.extend((0..self.rows).map(|i| self.data[i * self.cols + j]));
        }
        Mat {
            rows: self.cols,
            cols: self.rows,
            data,
        }
    }

    fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// `self · other` (`[rows, k] · [k, cols]`).
    fn mul(&self, other: &Mat) -> Mat {
        self.mul_t(&other.t())
    }

    /// `self · otherᵀ` (`[rows, k] · [cols, k]ᵀ`): row by row dot products.
    fn mul_t(&self, other: &Mat) -> Mat {
        assert_eq!(self.cols, other.cols);
        let data = by_rows(self.rows, other.rows, self.cols, 0.0, |i, out| {
            let a = self.row(i);
            for (j, o) in out.iter_mut().enumerate() {
                *o = a.iter().zip(other.row(j)).map(|(x, y)| x * y).sum::<f64>();
            }
        });
        Mat {
            rows: self.rows,
            cols: other.rows,
            data,
        }
    }

    /// `self + s · other`, elementwise.
    fn add_scaled(mut self, s: f64, other: &Mat) -> Mat {
        assert_eq!((self.rows, self.cols), (other.rows, other.cols));
        self.data
            .iter_mut()
            .zip(&other.data)
            .for_each(|(x, y)| *x += s * y);
        self
    }

    /// `s · self`.
    fn scaled(mut self, s: f64) -> Mat {
        self.data.iter_mut().for_each(|x| *x *= s);
        self
    }

    /// Each element times the factor of its flattened position.
    fn mul_elementwise(mut self, factor: &[f64]) -> Mat {
        self.data.iter_mut().zip(factor).for_each(|(x, f)| *x *= f);
        self
    }

    fn rounded<E: FloatElem>(&self) -> Vec<E> {
        self.data.iter().map(|&x| E::from_f32(x as f32)).collect()
    }
}

impl<T: FloatElem, L: FloatElem, W: FloatElem> LoraLayer<'_, T, L, W> {
    fn validate(&self) -> Result<()> {
        self.config.validate()?;
        let (r, i, o) = (self.config.rank, self.d_in, self.d_out);
        Error::check_shape("w [out, in]", &[o, i], self.w.len())?;
        if let Some(bias) = self.bias {
            Error::check_shape("bias [out]", &[o], bias.len())?;
        }
        Error::check_shape("lora A [r, in]", &[r, i], self.a.len())?;
        Error::check_shape("lora B [out, r]", &[o, r], self.b.len())
    }

    /// Per element of `x` `[m, in]`: `1 / (1 − p)` if kept, else 0.
    fn dropout_factor(&self, m: usize) -> Vec<f64> {
        let kept = self.config.keep_scale();
        dropout_mask(self.config.seed, self.config.dropout, m * self.d_in)
            .into_iter()
            .map(|k| if k == 1 { kept } else { 0.0 })
            .collect()
    }

    /// `dropout(x)`: a dropped element is 0 even where x is NaN or infinite.
    fn dropped(&self, x: &Mat) -> Mat {
        let factor = self.dropout_factor(x.rows);
        let data = x
            .data
            .iter()
            .zip(&factor)
            .map(|(&v, &f)| if f == 0.0 { 0.0 } else { v * f })
            .collect();
        Mat {
            rows: x.rows,
            cols: x.cols,
            data,
        }
    }

    fn scale(&self) -> f64 {
        self.config.scale() as f64
    }

    /// `y` `[m, out]` and `u` `[m, r]` for `x` `[m, in]`. A layer of no input features is
    /// refused, as [`crate::lora::LoraLinear`] refuses it: an empty `x` `[m, 0]` would fit
    /// any `m`, and `m` alone would size the outputs.
    pub fn forward(&self, x: &[T], m: usize) -> Result<Forward<T>> {
        self.validate()?;
        if self.d_in == 0 {
            return Err(Error::Unsupported {
                op: "lora",
                why: format!("layer shape [{}, 0]: no input features", self.d_out),
            });
        }
        Error::check_shape("x [m, in]", &[m, self.d_in], x.len())?;
        let (r, i, o) = (self.config.rank, self.d_in, self.d_out);
        let x = Mat::new(x, m, i);
        let u = self.dropped(&x).mul_t(&Mat::new(self.a, r, i));
        let mut y = x
            .mul_t(&Mat::new(self.w, o, i))
            .add_scaled(self.scale(), &u.mul_t(&Mat::new(self.b, o, r)));
        if let Some(bias) = self.bias {
            for row in y.data.chunks_mut(o) {
                row.iter_mut()
                    .zip(bias)
                    .for_each(|(v, b)| *v += b.to_f32() as f64);
            }
        }
        Ok(Forward {
            y: y.rounded(),
            u: u.rounded(),
        })
    }

    /// The gradients for `dy` `[m, out]`, given forward's input `x` `[m, in]` and its saved
    /// `u` `[m, r]` (used as given, as a kernel uses what forward saved): [`Forward::u`],
    /// unscaled, not the kernels' `scale · u` ([`crate::lora::Saved::u`]).
    pub fn backward(&self, x: &[T], u: &[f32], dy: &[T], m: usize) -> Result<Grads<T>> {
        self.validate()?;
        let (r, i, o) = (self.config.rank, self.d_in, self.d_out);
        Error::check_shape("x [m, in]", &[m, i], x.len())?;
        Error::check_shape("u [m, r]", &[m, r], u.len())?;
        Error::check_shape("dy [m, out]", &[m, o], dy.len())?;
        let (x, u, dy) = (Mat::new(x, m, i), Mat::new(u, m, r), Mat::new(dy, m, o));
        let a = Mat::new(self.a, r, i);
        // v = scale · dY B, held in T between its two uses (as PEFT's autograd holds it).
        let v = dy.mul(&Mat::new(self.b, o, r)).scaled(self.scale());
        let v = Mat::new(&v.rounded::<T>(), m, r);
        let dx = dy
            .mul(&Mat::new(self.w, o, i))
            .add_scaled(1.0, &v.mul(&a).mul_elementwise(&self.dropout_factor(m)));
        let f32s = |g: Mat| g.data.iter().map(|&v| v as f32).collect();
        let scaled = |g: Mat| f32s(g.scaled(self.scale()));
        let dbias = self.bias.map(|_| {
            (0..o)
                .map(|j| (0..m).map(|row| dy.data[row * o + j]).sum::<f64>() as f32)
                .collect()
        });
        Ok(Grads {
            dx: dx.rounded(),
            da: f32s(v.t().mul(&self.dropped(&x))),
            db: scaled(dy.t().mul(&u)),
            dbias,
        })
    }

    /// The merged weight `W + scale · B A` `[out, in]`, rounded to W's dtype through f32.
    pub fn merged(&self) -> Result<Vec<W>> {
        self.validate()?;
        let (r, i, o) = (self.config.rank, self.d_in, self.d_out);
        let delta = Mat::new(self.b, o, r).mul(&Mat::new(self.a, r, i));
        Ok(Mat::new(self.w, o, i)
            .add_scaled(self.scale(), &delta)
            .rounded())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rank: usize) -> LoraConfig {
        LoraConfig::new(rank, 8.0)
    }

    #[test]
    fn scale_follows_peft() {
        assert_eq!(config(4).scale(), 2.0);
        // 0.9 / 3 in f64, then f32: 0.3 rounded up; through an f32 alpha it rounded down.
        let ninth = LoraConfig::new(3, 0.9);
        assert_eq!(ninth.scale(), 0.3f32);
        assert_ne!(ninth.scale(), (0.9f32 as f64 / 3.0) as f32);
        let rs = LoraConfig {
            use_rslora: true,
            ..config(4)
        };
        assert_eq!(rs.scale(), 4.0);
    }

    #[test]
    fn tiny_layer_by_hand() {
        // x = [1, 2], W = I, A = [[1, 1]], B = [[1], [2]], scale = 8:
        // u = 3, y = [1, 2] + 8 * 3 * [1, 2] = [25, 50].
        let layer = LoraLayer {
            w: &[1f32, 0.0, 0.0, 1.0],
            bias: None,
            a: &[1f32, 1.0],
            b: &[1f32, 2.0],
            d_in: 2,
            d_out: 2,
            config: config(1),
        };
        let f = layer.forward(&[1.0, 2.0], 1).unwrap();
        assert_eq!(f.u, vec![3.0]);
        assert_eq!(f.y, vec![25.0, 50.0]);
        assert_eq!(layer.merged().unwrap(), vec![9.0, 8.0, 16.0, 17.0]);
    }
}
