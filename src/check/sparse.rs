//! Checks of the sparse-delta kernels against `reference::sparse`.

use super::{row, time_if, CheckCase, CheckRow, Measure, Report, Scale};
use crate::device::Device;
use crate::dtype::{DType, FloatElem};
use crate::error::Result;
use crate::reference::sparse as reference;
use crate::sparse::{self, AdamwConfig, IndexWidth, ScatterPlan, SparseAdamw, SparseIndex};
use crate::testing::{bit_mismatches, random_support, random_vec};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::BTreeMap;

/// A sparse check's size: `numel` dense elements, `n` support entries.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// Seed of the random inputs.
    pub seed: u64,
    /// Elements of the dense tensor.
    pub numel: u64,
    /// Entries of the support (values scattered or gathered).
    pub n: usize,
    /// The index width the kernels run with.
    pub width: IndexWidth,
    /// Whether to time the kernel (on a GPU only).
    pub timed: bool,
}

impl CheckCase for Case {
    fn seed(&self) -> u64 {
        self.seed
    }

    fn shape(&self) -> String {
        format!("numel {} n {} {:?}", self.numel, self.n, self.width)
    }
}

fn name<A: FloatElem, B: FloatElem>(op: &str, w: IndexWidth) -> String {
    let suffix = if w == IndexWidth::U64 { "_idx64" } else { "" };
    format!("{op}_{}_{}{suffix}", A::DTYPE, B::DTYPE)
}

/// Unsorted indices with repeats, drawn from a pool of about n/3 targets.
fn repeated_indices(rng: &mut StdRng, numel: u64, n: usize) -> Vec<u64> {
    let pool = random_support(rng, numel, (numel as usize).min(1 + n / 3));
    (0..n)
        .map(|_| pool[rng.random_range(0..pool.len())])
        .collect()
}

/// Sorted unique scatter-add: bit-exact.
pub fn scatter_sorted<W: FloatElem, V: FloatElem>(dev: &Device, c: Case) -> Result<CheckRow> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let w0: Vec<W> = random_vec(&mut rng, c.numel as usize, 2.0);
    let idx = random_support(&mut rng, c.numel, c.n);
    let v: Vec<V> = random_vec(&mut rng, c.n, 1.0);
    let alpha = rng.random_range(-2.0..2.0);
    let mut expected = w0.clone();
    reference::scatter_add(&mut expected, &idx, &v, alpha)?;

    let index = SparseIndex::with_width(dev, &idx, c.numel, c.width)?;
    let mut w = dev.upload(&w0)?;
    let values = dev.upload(&v)?;
    sparse::scatter_add(&mut w, &index, &values, alpha)?;
    let bad = bit_mismatches(&w.to_host()?, &expected).len();
    let t = time_if(dev, c.timed, || {
        sparse::scatter_add(&mut w, &index, &values, alpha)
    })?;
    Ok(row(
        name::<W, V>("scatter_add", c.width),
        dev,
        &c,
        Measure::Exact,
        bad as f64,
        t,
    ))
}

/// Scatter-add through a plan, unsorted indices with repeats: bit-exact.
pub fn scatter_planned<W: FloatElem, V: FloatElem>(dev: &Device, c: Case) -> Result<CheckRow> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let w0: Vec<W> = random_vec(&mut rng, c.numel as usize, 2.0);
    let idx = repeated_indices(&mut rng, c.numel, c.n);
    let v: Vec<V> = random_vec(&mut rng, c.n, 1.0);
    let alpha = rng.random_range(-2.0..2.0);
    let mut expected = w0.clone();
    reference::scatter_add(&mut expected, &idx, &v, alpha)?;

    let plan = ScatterPlan::with_width(dev, &idx, c.numel, c.width)?;
    let mut w = dev.upload(&w0)?;
    let values = dev.upload(&v)?;
    sparse::scatter_add_planned(&mut w, &plan, &values, alpha)?;
    let bad = bit_mismatches(&w.to_host()?, &expected).len();
    let t = time_if(dev, c.timed, || {
        sparse::scatter_add_planned(&mut w, &plan, &values, alpha)
    })?;
    Ok(row(
        name::<W, V>("segmented_scatter_add", c.width),
        dev,
        &c,
        Measure::Exact,
        bad as f64,
        t,
    ))
}

/// The relative spacing of W's dtype around 1 (twice its unit roundoff): the atomic path
/// rounds once per addition, not once per target.
fn spacing(w: DType) -> f64 {
    match w {
        DType::F32 => 2f64.powi(-23),
        DType::F16 => 2f64.powi(-10),
        _ => 2f64.powi(-7),
    }
}

/// Atomic scatter-add with repeats and a random α: untouched elements exact (any change
/// there counts as an infinite error); each touched target t within `(c_t + 1) · ε · m_t`,
/// c_t the additions into it, m_t = |w0| + |α|·Σ|v| its operands' magnitude (not the change,
/// which cancellation can make tiny) and ε W's spacing: a per-element bound, so that one lost
/// addition (an error of about |α v| against a few ulps) fails, where an L2 norm over every
/// target would hide dozens.
pub fn scatter_atomic<W: FloatElem, V: FloatElem>(dev: &Device, c: Case) -> Result<CheckRow> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let w0: Vec<W> = random_vec(&mut rng, c.numel as usize, 2.0);
    let idx = repeated_indices(&mut rng, c.numel, c.n);
    let v: Vec<V> = random_vec(&mut rng, c.n, 1.0);
    let alpha: f32 = rng.random_range(-2.0..2.0);
    let mut expected = w0.clone();
    reference::scatter_add(&mut expected, &idx, &v, alpha)?;

    let index = SparseIndex::with_width(dev, &idx, c.numel, c.width)?;
    let mut w = dev.upload(&w0)?;
    let values = dev.upload(&v)?;
    sparse::scatter_add_atomic(&mut w, &index, &values, alpha)?;
    let got = w.to_host()?;
    // Per target: its magnitude and its additions.
    let mut magnitude: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for (&t, x) in idx.iter().zip(&v) {
        let (m, adds) = magnitude
            .entry(t)
            .or_insert((w0[t as usize].to_f32().abs() as f64, 0.0));
        *m += (alpha * x.to_f32()).abs() as f64;
        *adds += 1.0;
    }
    let untouched_changed = (0..c.numel).any(|t| {
        !magnitude.contains_key(&t)
            && bytemuck::bytes_of(&got[t as usize]) != bytemuck::bytes_of(&expected[t as usize])
    });
    let eps = spacing(W::DTYPE);
    let mut worst: f64 = 0.0;
    for (&t, &(m, adds)) in &magnitude {
        let d = (got[t as usize].to_f32() as f64 - expected[t as usize].to_f32() as f64).abs();
        let bound = (adds + 1.0) * eps * m;
        worst = worst.max(if d.is_nan() { f64::INFINITY } else { d / bound });
    }
    let err = if untouched_changed {
        f64::INFINITY
    } else {
        worst
    };
    let t = time_if(dev, c.timed, || {
        sparse::scatter_add_atomic(&mut w, &index, &values, 1.0)
    })?;
    Ok(row(
        name::<W, V>("scatter_add_atomic", c.width),
        dev,
        &c,
        Measure::PerElement,
        err,
        t,
    ))
}

/// Gather at unsorted, repeated indices into a poisoned output: bit-exact.
pub fn gather<S: FloatElem, O: FloatElem>(dev: &Device, c: Case) -> Result<CheckRow> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let src: Vec<S> = random_vec(&mut rng, c.numel as usize, 3.0);
    let idx: Vec<u64> = (0..c.n).map(|_| rng.random_range(0..c.numel)).collect();
    let expected: Vec<O> = reference::gather(&src, &idx)?;
    let index = SparseIndex::with_width(dev, &idx, c.numel, c.width)?;
    let src = dev.upload(&src)?;
    let mut out = dev.alloc_poisoned::<O>(c.n)?;
    sparse::gather(&src, &index, &mut out)?;
    let bad = bit_mismatches(&out.to_host()?, &expected).len();
    let t = time_if(dev, c.timed, || sparse::gather(&src, &index, &mut out))?;
    Ok(row(
        name::<S, O>("gather", c.width),
        dev,
        &c,
        Measure::Exact,
        bad as f64,
        t,
    ))
}

/// Three AdamW steps with fresh gradients and random hyper-parameters: W and the whole
/// optimizer state bit-exact.
pub fn adamw<W: FloatElem, G: FloatElem>(dev: &Device, c: Case) -> Result<CheckRow> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let w0: Vec<W> = random_vec(&mut rng, c.numel as usize, 1.0);
    let idx = random_support(&mut rng, c.numel, c.n);
    let cfg = AdamwConfig {
        lr: rng.random_range(1e-4..1e-1),
        beta1: rng.random_range(0.5..0.99),
        beta2: rng.random_range(0.9..0.9999),
        eps: 1e-8,
        weight_decay: rng.random_range(0.0..0.1),
    };
    let mut expected = w0.clone();
    let mut state = reference::SparseAdamwState::new(&w0, &idx)?;
    let mut w = dev.upload(&w0)?;
    let mut opt = SparseAdamw::new(
        &w,
        SparseIndex::with_width(dev, &idx, c.numel, c.width)?,
        cfg,
    )?;
    let mut grad = dev.zeros::<G>(c.numel as usize)?;
    for step in 1..=3 {
        let g: Vec<G> = random_vec(&mut rng, c.numel as usize, 0.5);
        reference::sparse_adamw_step(
            &mut expected,
            &g,
            &idx,
            &mut state,
            &reference::AdamwStepScalars::new(&cfg, step),
        )?;
        grad.copy_from_host(&g)?;
        opt.step(&mut w, &grad)?;
    }
    let got_state = opt.state_to_host()?;
    let mut bad = bit_mismatches(&w.to_host()?, &expected).len();
    for (a, b) in [
        (&got_state.base, &state.base),
        (&got_state.delta, &state.delta),
        (&got_state.exp_avg, &state.exp_avg),
        (&got_state.exp_avg_sq, &state.exp_avg_sq),
    ] {
        bad += bit_mismatches(a, b).len();
    }
    let t = time_if(dev, c.timed, || opt.step(&mut w, &grad))?;
    Ok(row(
        name::<W, G>("sparse_adamw", c.width),
        dev,
        &c,
        Measure::Exact,
        bad as f64,
        t,
    ))
}

/// Calls `$($f)::+::<A, B>` for every dtype pair the kernels are built for, collecting rows.
#[macro_export]
#[doc(hidden)]
macro_rules! for_each_sparse_pair {
    ($($f:ident)::+, $dev:expr, $case:expr) => {{
        use $crate::{bf16, f16};
        vec![
            $($f)::+::<bf16, bf16>($dev, $case),
            $($f)::+::<bf16, f32>($dev, $case),
            $($f)::+::<f16, f16>($dev, $case),
            $($f)::+::<f16, f32>($dev, $case),
            $($f)::+::<f32, f32>($dev, $case),
        ]
    }};
}

/// Every sparse kernel entry once: each op and dtype pair, with u32 and (at the small
/// scale) u64 indices; into `report`, an op's rows as they are checked.
pub fn all(dev: &Device, scale: Scale, seed: u64, report: &mut Report) -> Result<()> {
    // Realistic: 1% of a 4096×11008 weight (DESIGN.md §8). Small: odd sizes past three
    // blocks of 256 threads, the planned path's ≈ 1,000 targets too (a grid-stride test caps
    // the grids at one and three blocks).
    let (numel, n) = match scale {
        Scale::Realistic => (4096 * 11008, 4096 * 11008 / 100),
        Scale::Small => (7919, 2999),
    };
    let widths = match scale {
        Scale::Realistic => vec![IndexWidth::U32],
        Scale::Small => vec![IndexWidth::U32, IndexWidth::U64],
    };
    for width in widths {
        let c = Case {
            seed,
            numel,
            n,
            width,
            timed: scale == Scale::Realistic,
        };
        // One op at a time, its rows reported before the next op is checked.
        let mut push = |rows: Vec<Result<CheckRow>>| -> Result<()> {
            for r in rows {
                report.push(r?);
            }
            Ok(())
        };
        push(for_each_sparse_pair!(scatter_sorted, dev, c))?;
        push(for_each_sparse_pair!(scatter_planned, dev, c))?;
        push(for_each_sparse_pair!(scatter_atomic, dev, c))?;
        push(for_each_sparse_pair!(gather, dev, c))?;
        push(for_each_sparse_pair!(adamw, dev, c))?;
    }
    Ok(())
}
