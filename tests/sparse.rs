//! Sparse-delta kernels against the CPU reference, on every backend available.
//! Fresh random inputs per case, odd sizes, both index widths, every dtype pair; outputs
//! are poisoned before each run. Exact paths must match the reference bit for bit.

use finetune_kernels::reference::sparse as reference;
use finetune_kernels::sparse::{
    self, AdamwConfig, IndexWidth, ScatterPlan, SparseAdamw, SparseIndex,
};
use finetune_kernels::testing::{backends, bit_mismatches, random_support, random_vec, rel_l2};
use finetune_kernels::{bf16, f16, Device, Error, FloatElem};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

const WIDTHS: [IndexWidth; 2] = [IndexWidth::U32, IndexWidth::U64];

/// Calls `$f::<W, V>($args)` for every dtype pair the kernels are built for.
macro_rules! for_each_pair {
    ($f:ident($($arg:expr),*)) => {{
        $f::<bf16, bf16>($($arg),*);
        $f::<bf16, f32>($($arg),*);
        $f::<f16, f16>($($arg),*);
        $f::<f16, f32>($($arg),*);
        $f::<f32, f32>($($arg),*);
    }};
}

fn name<W: FloatElem, V: FloatElem>() -> String {
    format!("({}, {})", W::DTYPE, V::DTYPE)
}

fn check_sorted_scatter<W: FloatElem, V: FloatElem>(dev: &Device, seed: u64, numel: u64, k: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    for width in WIDTHS {
        let w0: Vec<W> = random_vec(&mut rng, numel as usize, 2.0);
        let idx = random_support(&mut rng, numel, k);
        let v: Vec<V> = random_vec(&mut rng, k, 1.0);
        let alpha = rng.random_range(-2.0..2.0);
        let mut expected = w0.clone();
        reference::scatter_add(&mut expected, &idx, &v, alpha);

        let index = SparseIndex::with_width(dev, &idx, numel, width).unwrap();
        let mut w = dev.upload(&w0).unwrap();
        sparse::scatter_add(&mut w, &index, &dev.upload(&v).unwrap(), alpha).unwrap();
        let got = w.to_host().unwrap();
        let bad = bit_mismatches(&got, &expected);
        assert!(
            bad.is_empty(),
            "{} {width:?} seed {seed}: {} mismatches, first at {}",
            name::<W, V>(),
            bad.len(),
            bad[0]
        );
    }
}

fn check_planned_scatter<W: FloatElem, V: FloatElem>(
    dev: &Device,
    seed: u64,
    numel: u64,
    n: usize,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    for width in WIDTHS {
        let w0: Vec<W> = random_vec(&mut rng, numel as usize, 2.0);
        // Unsorted, with repeats: draw from a small pool of targets.
        let pool = random_support(&mut rng, numel, (numel as usize).min(1 + n / 3));
        let idx: Vec<u64> = (0..n)
            .map(|_| pool[rng.random_range(0..pool.len())])
            .collect();
        let v: Vec<V> = random_vec(&mut rng, n, 1.0);
        let alpha = rng.random_range(-2.0..2.0);
        let mut expected = w0.clone();
        reference::scatter_add(&mut expected, &idx, &v, alpha);

        let plan = ScatterPlan::with_width(dev, &idx, numel, width).unwrap();
        let mut w = dev.upload(&w0).unwrap();
        sparse::scatter_add_planned(&mut w, &plan, &dev.upload(&v).unwrap(), alpha).unwrap();
        let got = w.to_host().unwrap();
        let bad = bit_mismatches(&got, &expected);
        assert!(
            bad.is_empty(),
            "{} {width:?} seed {seed}: {} mismatches, first at {}",
            name::<W, V>(),
            bad.len(),
            bad[0]
        );
    }
}

/// Relative bound for the atomic path: each repeated target rounds once per addition
/// instead of once, so allow a few ulps of W's dtype.
fn atomic_bound<W: FloatElem>() -> f64 {
    match W::DTYPE {
        finetune_kernels::DType::F32 => 1e-5,
        finetune_kernels::DType::F16 => 1e-2,
        _ => 4e-2,
    }
}

fn check_atomic_scatter<W: FloatElem, V: FloatElem>(dev: &Device, seed: u64, numel: u64, n: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let w0: Vec<W> = random_vec(&mut rng, numel as usize, 2.0);
    let pool = random_support(&mut rng, numel, (numel as usize).min(1 + n / 3));
    let idx: Vec<u64> = (0..n)
        .map(|_| pool[rng.random_range(0..pool.len())])
        .collect();
    let v: Vec<V> = random_vec(&mut rng, n, 1.0);
    let mut expected = w0.clone();
    reference::scatter_add(&mut expected, &idx, &v, 1.0);

    let index = SparseIndex::new(dev, &idx, numel).unwrap();
    let mut w = dev.upload(&w0).unwrap();
    sparse::scatter_add_atomic(&mut w, &index, &dev.upload(&v).unwrap(), 1.0).unwrap();
    let got = w.to_host().unwrap();
    // Untouched elements are exact; touched ones within the bound, measured against the
    // change the scatter made (not the whole weight, which would hide errors).
    let touched: std::collections::BTreeSet<u64> = idx.iter().copied().collect();
    for t in 0..numel {
        if !touched.contains(&t) {
            assert_eq!(
                got[t as usize].to_f32().to_bits(),
                w0[t as usize].to_f32().to_bits(),
                "untouched {t}"
            );
        }
    }
    let change = |w: &[W]| -> Vec<f32> {
        touched
            .iter()
            .map(|&t| w[t as usize].to_f32() - w0[t as usize].to_f32())
            .collect()
    };
    let err = rel_l2(&change(&got), &change(&expected));
    assert!(
        err <= atomic_bound::<W>(),
        "{} seed {seed}: rel error {err:e}",
        name::<W, V>()
    );
}

fn check_gather<S: FloatElem, O: FloatElem>(dev: &Device, seed: u64, numel: u64, k: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    for width in WIDTHS {
        let src: Vec<S> = random_vec(&mut rng, numel as usize, 3.0);
        // Gather accepts any order and repeats.
        let idx: Vec<u64> = (0..k).map(|_| rng.random_range(0..numel)).collect();
        let expected: Vec<O> = reference::gather(&src, &idx);
        let index = SparseIndex::with_width(dev, &idx, numel, width).unwrap();
        let mut out = dev.alloc_poisoned::<O>(k).unwrap();
        sparse::gather(&dev.upload(&src).unwrap(), &index, &mut out).unwrap();
        let got = out.to_host().unwrap();
        let bad = bit_mismatches(&got, &expected);
        assert!(
            bad.is_empty(),
            "{} {width:?} seed {seed}: {} mismatches",
            name::<S, O>(),
            bad.len()
        );
    }
}

fn check_adamw<W: FloatElem, G: FloatElem>(dev: &Device, seed: u64, numel: u64, k: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    for width in WIDTHS {
        let w0: Vec<W> = random_vec(&mut rng, numel as usize, 1.0);
        let idx = random_support(&mut rng, numel, k);
        let cfg = AdamwConfig {
            lr: rng.random_range(1e-4..1e-1),
            beta1: rng.random_range(0.5..0.99),
            beta2: rng.random_range(0.9..0.9999),
            eps: 1e-8,
            weight_decay: rng.random_range(0.0..0.1),
        };
        let mut expected = w0.clone();
        let mut state = reference::SparseAdamwState::new(&w0, &idx);

        let mut w = dev.upload(&w0).unwrap();
        let index = SparseIndex::with_width(dev, &idx, numel, width).unwrap();
        let mut opt = SparseAdamw::new(&w, index, cfg).unwrap();
        for step in 1..=3 {
            let grad: Vec<G> = random_vec(&mut rng, numel as usize, 0.5);
            reference::sparse_adamw_step(
                &mut expected,
                &grad,
                &idx,
                &mut state,
                &reference::AdamwStepScalars::new(&cfg, step),
            );
            opt.step(&mut w, &dev.upload(&grad).unwrap()).unwrap();
        }
        let got = w.to_host().unwrap();
        let bad = bit_mismatches(&got, &expected);
        assert!(
            bad.is_empty(),
            "{} {width:?} seed {seed}: W differs at {} elements",
            name::<W, G>(),
            bad.len()
        );
        assert_eq!(
            opt.state_to_host().unwrap(),
            state,
            "{} {width:?} seed {seed}: state differs",
            name::<W, G>()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn scatter_add_sorted_matches_reference(seed in any::<u64>(), numel in 1u64..3000, frac in 0.0f64..1.0) {
        let k = ((numel as f64 * frac) as usize).max(1);
        for dev in backends() { for_each_pair!(check_sorted_scatter(&dev, seed, numel, k)); }
    }

    #[test]
    fn scatter_add_planned_matches_reference(seed in any::<u64>(), numel in 1u64..3000, n in 1usize..4000) {
        for dev in backends() { for_each_pair!(check_planned_scatter(&dev, seed, numel, n)); }
    }

    #[test]
    fn scatter_add_atomic_within_bound(seed in any::<u64>(), numel in 1u64..3000, n in 1usize..4000) {
        for dev in backends() { for_each_pair!(check_atomic_scatter(&dev, seed, numel, n)); }
    }

    #[test]
    fn gather_matches_reference(seed in any::<u64>(), numel in 1u64..3000, k in 1usize..3000) {
        for dev in backends() { for_each_pair!(check_gather(&dev, seed, numel, k)); }
    }

    #[test]
    fn sparse_adamw_matches_reference_bit_for_bit(seed in any::<u64>(), numel in 1u64..3000, frac in 0.0f64..1.0) {
        let k = ((numel as f64 * frac) as usize).max(1);
        for dev in backends() { for_each_pair!(check_adamw(&dev, seed, numel, k)); }
    }
}

#[test]
fn tail_and_multi_block_sizes() {
    // One element, one warp, exactly one block, one past a block, and several blocks.
    for dev in backends() {
        for numel in [1u64, 31, 256, 257, 70_001] {
            let k = (numel as usize).div_ceil(2);
            for_each_pair!(check_sorted_scatter(&dev, numel, numel, k));
            for_each_pair!(check_adamw(&dev, numel + 1, numel, k));
        }
    }
}

/// Every rejected call leaves W exactly as it was.
#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    for dev in backends() {
        let mut rng = StdRng::seed_from_u64(rng_seed());
        let w0: Vec<bf16> = random_vec(&mut rng, 100, 1.0);
        let mut w = dev.upload(&w0).unwrap();
        let v = dev.upload(&random_vec::<f32>(&mut rng, 3, 1.0)).unwrap();

        let e = SparseIndex::new(&dev, &[1u32, 100, 5], 100).err().unwrap();
        assert_eq!(
            e,
            Error::IndexOutOfRange {
                position: 1,
                index: 100,
                numel: 100
            }
        );
        assert!(ScatterPlan::new(&dev, &[7u64, 1000], 100).is_err());

        let unsorted = SparseIndex::new(&dev, &[5u32, 3, 9], 100).unwrap();
        let e = sparse::scatter_add(&mut w, &unsorted, &v, 1.0)
            .err()
            .unwrap();
        assert_eq!(
            e,
            Error::UnsortedIndices {
                position: 1,
                previous: 5,
                index: 3
            }
        );
        let dup = SparseIndex::new(&dev, &[3u32, 3, 9], 100).unwrap();
        assert!(matches!(
            sparse::scatter_add(&mut w, &dup, &v, 1.0),
            Err(Error::UnsortedIndices { .. })
        ));
        assert!(matches!(
            SparseAdamw::new(&w, dup, AdamwConfig::default()),
            Err(Error::UnsortedIndices { .. })
        ));

        let sorted = SparseIndex::new(&dev, &[1u32, 2], 100).unwrap();
        assert!(matches!(
            sparse::scatter_add(&mut w, &sorted, &v, 1.0),
            Err(Error::ShapeMismatch { .. })
        ));
        let wrong_numel = SparseIndex::new(&dev, &[1u32, 2, 3], 99).unwrap();
        assert!(matches!(
            sparse::scatter_add(&mut w, &wrong_numel, &v, 1.0),
            Err(Error::ShapeMismatch { .. })
        ));
        let three = SparseIndex::new(&dev, &[1u32, 2, 3], 100).unwrap();
        for alpha in [f32::NAN, f32::INFINITY] {
            assert!(matches!(
                sparse::scatter_add(&mut w, &three, &v, alpha),
                Err(Error::InvalidArgument { what: "alpha", .. })
            ));
        }
        let mut out_bf16 = dev.alloc_poisoned::<bf16>(3).unwrap();
        let src_f32 = dev.upload(&random_vec::<f32>(&mut rng, 100, 1.0)).unwrap();
        assert!(matches!(
            sparse::gather(&src_f32, &three, &mut out_bf16),
            Err(Error::UnsupportedDtype { .. })
        ));
        for bad in [
            AdamwConfig {
                lr: f32::NAN,
                ..Default::default()
            },
            AdamwConfig {
                beta1: 1.0,
                ..Default::default()
            },
            AdamwConfig {
                beta2: -0.1,
                ..Default::default()
            },
            AdamwConfig {
                eps: 0.0,
                ..Default::default()
            },
            AdamwConfig {
                weight_decay: f32::INFINITY,
                ..Default::default()
            },
        ] {
            let idx = SparseIndex::new(&dev, &[1u32, 2, 3], 100).unwrap();
            assert!(
                matches!(
                    SparseAdamw::new(&w, idx, bad),
                    Err(Error::InvalidArgument { .. })
                ),
                "{bad:?}"
            );
        }
        let mut opt = SparseAdamw::new(&w, three, AdamwConfig::default()).unwrap();
        let short_grad = dev.upload(&random_vec::<bf16>(&mut rng, 99, 1.0)).unwrap();
        assert!(matches!(
            opt.step(&mut w, &short_grad),
            Err(Error::ShapeMismatch { .. })
        ));
        assert_eq!(opt.steps_taken(), 0);

        assert!(
            bit_mismatches(&w.to_host().unwrap(), &w0).is_empty(),
            "a rejected call changed W"
        );
    }
}

#[test]
fn nan_propagates_only_where_it_lands() {
    for dev in backends() {
        let mut rng = StdRng::seed_from_u64(rng_seed());
        let numel = 257;
        let w0: Vec<f32> = random_vec(&mut rng, numel, 1.0);
        let idx = [3u64, 50, 200];
        let mut grad: Vec<f32> = random_vec(&mut rng, numel, 1.0);
        grad[50] = f32::NAN;
        grad[51] = f32::NAN; // off the support: must not matter
        let mut w = dev.upload(&w0).unwrap();
        let mut opt = SparseAdamw::new(
            &w,
            SparseIndex::sorted(&dev, &idx, numel as u64).unwrap(),
            AdamwConfig::default(),
        )
        .unwrap();
        opt.step(&mut w, &dev.upload(&grad).unwrap()).unwrap();
        let got = w.to_host().unwrap();
        for (i, x) in got.iter().enumerate() {
            assert_eq!(x.is_nan(), i == 50, "element {i}: {x}");
        }
        let mut values: Vec<f32> = random_vec(&mut rng, 3, 1.0);
        values[2] = f32::NAN;
        let mut w = dev.upload(&w0).unwrap();
        sparse::scatter_add(
            &mut w,
            &SparseIndex::sorted(&dev, &idx, numel as u64).unwrap(),
            &dev.upload(&values).unwrap(),
            1.0,
        )
        .unwrap();
        let got = w.to_host().unwrap();
        for (i, x) in got.iter().enumerate() {
            assert_eq!(x.is_nan(), i == 200, "element {i}: {x}");
        }
    }
}

/// The reference AdamW step against an independent f64 formulation of PyTorch's AdamW
/// over several steps (checks the reference itself, not a kernel).
#[test]
fn reference_adamw_agrees_with_f64_adamw() {
    let mut rng = StdRng::seed_from_u64(rng_seed());
    let cfg = AdamwConfig {
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-6,
        weight_decay: 0.05,
    };
    let numel = 61;
    let idx = random_support(&mut rng, numel, 17);
    let w0: Vec<f32> = random_vec(&mut rng, numel as usize, 1.0);
    let mut w = w0.clone();
    let mut state = reference::SparseAdamwState::new(&w0, &idx);
    let (mut p, mut m, mut v) = (
        vec![0f64; idx.len()],
        vec![0f64; idx.len()],
        vec![0f64; idx.len()],
    );
    for t in 1..=20u64 {
        let grad: Vec<f32> = random_vec(&mut rng, numel as usize, 1.0);
        reference::sparse_adamw_step(
            &mut w,
            &grad,
            &idx,
            &mut state,
            &reference::AdamwStepScalars::new(&cfg, t),
        );
        for (i, &j) in idx.iter().enumerate() {
            let g = grad[j as usize] as f64;
            let (b1, b2, lr) = (cfg.beta1 as f64, cfg.beta2 as f64, cfg.lr as f64);
            p[i] *= 1.0 - lr * cfg.weight_decay as f64;
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let mhat = m[i] / (1.0 - b1.powi(t as i32));
            let vhat = v[i] / (1.0 - b2.powi(t as i32));
            p[i] -= lr * mhat / (vhat.sqrt() + cfg.eps as f64);
        }
    }
    // PyTorch divides by (sqrt(v)/sqrt(bc2) + eps), the textbook by (sqrt(vhat) + eps): the
    // same value. Compare deltas.
    let err = rel_l2(
        &state.delta,
        &p.iter().map(|&x| x as f32).collect::<Vec<_>>(),
    );
    assert!(err < 1e-5, "delta rel error {err:e}");
}

fn rng_seed() -> u64 {
    rand::rng().random()
}
