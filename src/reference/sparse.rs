//! Reference for the sparse-delta kernels (cuda/sparse.cu).

use crate::dtype::FloatElem;
use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// Every index below `numel`, else the first that is not ([`Error::IndexOutOfRange`]). The
/// device structures (`crate::sparse`) check their indices with it too.
pub(crate) fn check_indices(indices: &[u64], numel: u64) -> Result<()> {
    match indices.iter().position(|&t| t >= numel) {
        Some(position) => Err(Error::IndexOutOfRange {
            position,
            index: indices[position],
            numel,
        }),
        None => Ok(()),
    }
}

/// `w[t] += alpha * Σ values[i]` over every `i` with `indices[i] == t`, the sum taken in f32
/// in order of position, then one rounding into W's dtype. With sorted unique indices this
/// is `w[idx[i]] += alpha * v[i]`. Errors, W untouched, if `values` and `indices` differ
/// in length or an index is not below `w.len()`.
pub fn scatter_add<W: FloatElem, V: FloatElem>(
    w: &mut [W],
    indices: &[u64],
    values: &[V],
    alpha: f32,
) -> Result<()> {
    Error::check_shape("scatter_add values [n]", &[indices.len()], values.len())?;
    check_indices(indices, w.len() as u64)?;
    let mut sums: BTreeMap<u64, f32> = BTreeMap::new();
    for (&t, &v) in indices.iter().zip(values) {
        // From -0: -0 + x is x for every x, a -0 included, as the kernels' sums start.
        let s = sums.entry(t).or_insert(-0.0);
        *s += v.to_f32();
    }
    for (t, sum) in sums {
        let x = &mut w[t as usize];
        *x = W::from_f32(x.to_f32() + alpha * sum);
    }
    Ok(())
}

/// `out[i] = src[indices[i]]`, converted through f32. Errors if an index is not below
/// `src.len()`.
pub fn gather<S: FloatElem, O: FloatElem>(src: &[S], indices: &[u64]) -> Result<Vec<O>> {
    check_indices(indices, src.len() as u64)?;
    Ok(indices
        .iter()
        .map(|&t| O::from_f32(src[t as usize].to_f32()))
        .collect())
}

/// AdamW hyper-parameters, PyTorch's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamwConfig {
    /// Learning rate (default 1e-3).
    pub lr: f32,
    /// Decay rate of the first moment (default 0.9).
    pub beta1: f32,
    /// Decay rate of the second moment (default 0.999).
    pub beta2: f32,
    /// Added to the bias-corrected `sqrt(v)` in the denominator (default 1e-8).
    pub eps: f32,
    /// Decoupled weight decay; each step multiplies the delta by `1 - lr * weight_decay`
    /// (default 1e-2).
    pub weight_decay: f32,
}

impl Default for AdamwConfig {
    fn default() -> Self {
        AdamwConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// The per-step scalars both the kernel and the reference use, computed once on the host
/// in f64 and rounded to f32 (`step` counts from 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamwStepScalars {
    /// `beta1`, as configured.
    pub beta1: f32,
    /// `beta2`, as configured.
    pub beta2: f32,
    /// `1 - beta1`.
    pub one_minus_beta1: f32,
    /// `1 - beta2`.
    pub one_minus_beta2: f32,
    /// `eps`, as configured.
    pub eps: f32,
    /// The factor the delta is multiplied by before the update: `1 - lr * weight_decay`.
    pub decay: f32,
    /// `lr / (1 - beta1^step)`: the learning rate with the first moment's bias correction.
    pub step_size: f32,
    /// `sqrt(1 - beta2^step)`: the second moment's bias correction, which `sqrt(v)` is
    /// divided by.
    pub sqrt_bc2: f32,
}

impl AdamwStepScalars {
    /// The scalars of step `step` (from 1; clamped to `i32::MAX`) under `cfg`. Step 0 would
    /// divide by a zero bias correction.
    pub fn new(cfg: &AdamwConfig, step: u64) -> Self {
        let (b1, b2, lr) = (cfg.beta1 as f64, cfg.beta2 as f64, cfg.lr as f64);
        let t = step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        AdamwStepScalars {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            one_minus_beta1: (1.0 - b1) as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            eps: cfg.eps,
            decay: (1.0 - lr * cfg.weight_decay as f64) as f32,
            step_size: (lr / bc1) as f32,
            sqrt_bc2: bc2.sqrt() as f32,
        }
    }
}

/// The state of a sparse AdamW run over a fixed support (all `[n]`, f32).
#[derive(Debug, Clone, PartialEq)]
pub struct SparseAdamwState {
    /// W at the support before training.
    pub base: Vec<f32>,
    /// The trained change: W at the support is `base + delta`.
    pub delta: Vec<f32>,
    /// AdamW's first moment (`m`) per support element.
    pub exp_avg: Vec<f32>,
    /// AdamW's second moment (`v`) per support element.
    pub exp_avg_sq: Vec<f32>,
}

impl SparseAdamwState {
    /// The state before the first step: `base` gathered from `w` at `indices`, the delta
    /// and both moments zero. Errors if an index is not below `w.len()`.
    pub fn new<W: FloatElem>(w: &[W], indices: &[u64]) -> Result<Self> {
        let n = indices.len();
        Ok(SparseAdamwState {
            base: gather::<W, f32>(w, indices)?,
            delta: vec![0.0; n],
            exp_avg: vec![0.0; n],
            exp_avg_sq: vec![0.0; n],
        })
    }
}

/// One fused sparse AdamW step: gathers the dense gradient at the support, updates the
/// moments and the delta, and writes `base + delta` into W at the support. The same f32
/// operations in the same order as the kernel. Errors, nothing changed, if `grad` is not
/// W's length, a state vector not the support's, or an index not below `w.len()`.
pub fn sparse_adamw_step<W: FloatElem, G: FloatElem>(
    w: &mut [W],
    grad: &[G],
    indices: &[u64],
    state: &mut SparseAdamwState,
    s: &AdamwStepScalars,
) -> Result<()> {
    Error::check_shape("sparse_adamw_step grad (W's shape)", &[w.len()], grad.len())?;
    for (what, v) in [
        ("base", &state.base),
        ("delta", &state.delta),
        ("exp_avg", &state.exp_avg),
        ("exp_avg_sq", &state.exp_avg_sq),
    ] {
        let what = format!("sparse_adamw_step state {what} [n]");
        Error::check_shape(&what, &[indices.len()], v.len())?;
    }
    check_indices(indices, w.len() as u64)?;
    for (i, &t) in indices.iter().enumerate() {
        let g = grad[t as usize].to_f32();
        let m = s.beta1 * state.exp_avg[i] + s.one_minus_beta1 * g;
        let v = s.beta2 * state.exp_avg_sq[i] + s.one_minus_beta2 * g * g;
        let denom = v.sqrt() / s.sqrt_bc2 + s.eps;
        let delta = state.delta[i] * s.decay - s.step_size * m / denom;
        state.exp_avg[i] = m;
        state.exp_avg_sq[i] = v;
        state.delta[i] = delta;
        w[t as usize] = W::from_f32(state.base[i] + delta);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn scatter_add_sums_repeats_before_rounding() {
        let mut w = vec![bf16::from_f32(1.0); 4];
        // 1 + 3 * 2^-9 rounds to 1 + 2^-7 in bf16 only if the three adds are summed first.
        let eps = 2f32.powi(-9);
        scatter_add(&mut w, &[2, 2, 2], &[eps, eps, eps], 1.0).unwrap();
        assert_eq!(w[2].to_f32(), 1.0 + 2f32.powi(-7));
        assert_eq!(w[0].to_f32(), 1.0);
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        // First step, no decay: update = lr * g / (|g| + eps') ≈ lr * sign(g).
        let cfg = AdamwConfig {
            lr: 0.01,
            weight_decay: 0.0,
            ..Default::default()
        };
        let w0 = [0.5f32, -0.25, 2.0];
        let mut w = w0.to_vec();
        let idx = [0u64, 2];
        let mut st = SparseAdamwState::new(&w, &idx).unwrap();
        sparse_adamw_step(
            &mut w,
            &[3.0f32, 7.0, -0.5],
            &idx,
            &mut st,
            &AdamwStepScalars::new(&cfg, 1),
        )
        .unwrap();
        assert!((w[0] - (0.5 - 0.01)).abs() < 1e-6, "{}", w[0]);
        assert_eq!(w[1], -0.25);
        assert!((w[2] - (2.0 + 0.01)).abs() < 1e-6, "{}", w[2]);
    }

    /// Mismatched lengths and indices past the end are typed errors, and nothing is written
    /// before they are found.
    #[test]
    fn bad_input_is_an_error_and_changes_nothing() {
        let w0 = vec![1.0f32, 2.0, 3.0];
        let mut w = w0.clone();
        let past = |r: Result<()>| {
            matches!(
                r,
                Err(Error::IndexOutOfRange {
                    position: 1,
                    index: 3,
                    numel: 3
                })
            )
        };
        assert!(past(scatter_add(&mut w, &[0, 3], &[1.0f32, 1.0], 1.0)));
        assert!(matches!(
            scatter_add(&mut w, &[0, 1], &[1.0f32], 1.0),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            gather::<f32, f32>(&w, &[2, 5]),
            Err(Error::IndexOutOfRange {
                position: 1,
                index: 5,
                ..
            })
        ));
        assert!(SparseAdamwState::new(&w, &[7]).is_err());
        let idx = [0u64, 2];
        let s = AdamwStepScalars::new(&AdamwConfig::default(), 1);
        let mut st = SparseAdamwState::new(&w, &idx).unwrap();
        let before = st.clone();
        assert!(matches!(
            sparse_adamw_step(&mut w, &[1.0f32, 1.0], &idx, &mut st, &s),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(past(sparse_adamw_step(
            &mut w,
            &[1.0f32; 3],
            &[0, 3],
            &mut st,
            &s
        )));
        st.delta.pop();
        assert!(matches!(
            sparse_adamw_step(&mut w, &[1.0f32; 3], &idx, &mut st, &s),
            Err(Error::ShapeMismatch { .. })
        ));
        st.delta.push(before.delta[1]);
        assert_eq!((&w, &st), (&w0, &before));
    }
}
