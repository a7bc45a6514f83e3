//! Sparse-delta kernels against the CPU reference, on every backend available.
//! Fresh random inputs per case, odd sizes, both index widths, every dtype pair; outputs
//! are poisoned before each run. Exact paths must match the reference bit for bit.

use finetune_kernels::check::{self, sparse::Case};
use finetune_kernels::for_each_sparse_pair;
use finetune_kernels::reference::sparse as reference;
use finetune_kernels::sparse::{
    self, AdamwConfig, IndexWidth, ScatterPlan, SparseAdamw, SparseIndex,
};
use finetune_kernels::testing::{
    backends, bit_mismatches, emulators, random_support, random_vec, rel_l2,
};
use finetune_kernels::{bf16, DType, Error};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

const WIDTHS: [IndexWidth; 2] = [IndexWidth::U32, IndexWidth::U64];

/// Runs one check for every dtype pair and both index widths on every backend.
macro_rules! check_all {
    ($f:ident, $seed:expr, $numel:expr, $n:expr) => {
        for dev in backends() {
            for width in WIDTHS {
                let case = Case {
                    seed: $seed,
                    numel: $numel,
                    n: $n,
                    width,
                    timed: false,
                };
                for row in for_each_sparse_pair!(check::sparse::$f, &dev, case) {
                    let row = row.unwrap();
                    assert!(row.pass(), "{row}");
                }
            }
        }
    };
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn scatter_add_sorted_matches_reference(seed in any::<u64>(), numel in 1u64..3000, frac in 0.0f64..1.0) {
        check_all!(scatter_sorted, seed, numel, ((numel as f64 * frac) as usize).max(1));
    }

    #[test]
    fn scatter_add_planned_matches_reference(seed in any::<u64>(), numel in 1u64..3000, n in 1usize..4000) {
        check_all!(scatter_planned, seed, numel, n);
    }

    #[test]
    fn scatter_add_atomic_within_bound(seed in any::<u64>(), numel in 1u64..3000, n in 1usize..4000) {
        check_all!(scatter_atomic, seed, numel, n);
    }

    #[test]
    fn gather_matches_reference(seed in any::<u64>(), numel in 1u64..3000, n in 1usize..3000) {
        check_all!(gather, seed, numel, n);
    }

    #[test]
    fn sparse_adamw_matches_reference_bit_for_bit(seed in any::<u64>(), numel in 1u64..3000, frac in 0.0f64..1.0) {
        check_all!(adamw, seed, numel, ((numel as f64 * frac) as usize).max(1));
    }
}

#[test]
fn tail_and_multi_block_sizes() {
    // One element, one warp, exactly one block, one past a block, and several blocks.
    for numel in [1u64, 31, 256, 257, 70_001] {
        let n = (numel as usize).div_ceil(2);
        check_all!(scatter_sorted, rng_seed(), numel, n);
        check_all!(scatter_planned, rng_seed(), numel, n);
        check_all!(adamw, rng_seed(), numel, n);
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

/// Empty supports: every path takes them and changes nothing; gather writes nothing.
#[test]
fn empty_supports_change_nothing() {
    for dev in backends() {
        let mut rng = StdRng::seed_from_u64(rng_seed());
        let w0: Vec<bf16> = random_vec(&mut rng, 37, 1.0);
        let mut w = dev.upload(&w0).unwrap();
        let none: [u32; 0] = [];
        let values = dev.upload::<f32>(&[]).unwrap();
        let index = SparseIndex::sorted(&dev, &none, 37).unwrap();
        assert!(index.is_empty());
        sparse::scatter_add(&mut w, &index, &values, 0.5).unwrap();
        sparse::scatter_add_atomic(&mut w, &index, &values, 0.5).unwrap();
        let plan = ScatterPlan::new(&dev, &none, 37).unwrap();
        assert_eq!((plan.len(), plan.segments()), (0, 0));
        sparse::scatter_add_planned(&mut w, &plan, &values, 0.5).unwrap();
        let mut out = dev.alloc_poisoned::<f32>(0).unwrap();
        sparse::gather(&w, &index, &mut out).unwrap();
        let grad = dev.upload(&random_vec::<bf16>(&mut rng, 37, 1.0)).unwrap();
        let mut opt = SparseAdamw::new(&w, index, AdamwConfig::default()).unwrap();
        opt.step(&mut w, &grad).unwrap();
        assert_eq!(opt.steps_taken(), 1);
        assert!(bit_mismatches(&w.to_host().unwrap(), &w0).is_empty());
    }
}

/// Sums start from -0, the identity of addition: a weight of -0 plus values of -0 stays -0
/// on the sorted path (one addition), the planned path and the reference alike, bit for bit.
#[test]
fn signed_zeros_add_as_the_reference_does() {
    for dev in backends() {
        let numel = 40u64;
        let w0 = vec![-0.0f32; numel as usize];
        let idx: Vec<u64> = (0..numel).step_by(3).collect();
        let v = vec![-0.0f32; idx.len()];
        let mut expected = w0.clone();
        reference::scatter_add(&mut expected, &idx, &v, 1.5).unwrap();
        assert!(expected.iter().all(|x| x.to_bits() == (-0.0f32).to_bits()));
        let values = dev.upload(&v).unwrap();
        let mut w = dev.upload(&w0).unwrap();
        let index = SparseIndex::sorted(&dev, &idx, numel).unwrap();
        sparse::scatter_add(&mut w, &index, &values, 1.5).unwrap();
        assert!(bit_mismatches(&w.to_host().unwrap(), &expected).is_empty());
        let mut w = dev.upload(&w0).unwrap();
        let plan = ScatterPlan::new(&dev, &idx, numel).unwrap();
        sparse::scatter_add_planned(&mut w, &plan, &values, 1.5).unwrap();
        assert!(bit_mismatches(&w.to_host().unwrap(), &expected).is_empty());
    }
}

/// u32 offsets up to 2³² elements, u64 past it: chosen by size, and u32 asked for past it
/// refused (no dense tensor needed: the index checks its sizes alone).
#[test]
fn index_width_follows_the_tensor_size() {
    for dev in backends() {
        let last_u32 = (1u64 << 32) - 1;
        let at = SparseIndex::new(&dev, &[last_u32], 1 << 32).unwrap();
        assert_eq!(at.width(), IndexWidth::U32);
        let past = SparseIndex::new(&dev, &[1u64 << 32], (1 << 32) + 1).unwrap();
        assert_eq!(past.width(), IndexWidth::U64);
        assert!(matches!(
            SparseIndex::with_width(&dev, &[1u64 << 32], (1 << 32) + 1, IndexWidth::U32),
            Err(Error::Unsupported { .. })
        ));
        assert!(matches!(
            ScatterPlan::with_width(&dev, &[3u64], (1 << 32) + 1, IndexWidth::U32),
            Err(Error::Unsupported { .. })
        ));
    }
}

/// What the raw entry points promise past the safe API's checks: an index `>= numel` is
/// skipped by the scatter-adds (the weight untouched) and read as NaN by gather.
#[test]
fn raw_kernels_skip_indices_out_of_range() {
    use finetune_kernels::params::{GatherParams, ScatterAddParams};
    for dev in backends() {
        let mut rng = StdRng::seed_from_u64(rng_seed());
        let numel = 50u64;
        let w0: Vec<f32> = random_vec(&mut rng, numel as usize, 1.0);
        let idx = [2u32, 7, 50, 1000, 49];
        let v: Vec<f32> = random_vec(&mut rng, idx.len(), 1.0);
        let in_range: Vec<(u64, f32)> = idx
            .iter()
            .zip(&v)
            .filter(|(&i, _)| (i as u64) < numel)
            .map(|(&i, &x)| (i as u64, x))
            .collect();
        let mut expected = w0.clone();
        let (kept_idx, kept_v): (Vec<u64>, Vec<f32>) = in_range.into_iter().unzip();
        reference::scatter_add(&mut expected, &kept_idx, &kept_v, 0.75).unwrap();
        let indices = dev.upload(&idx).unwrap();
        let values = dev.upload(&v).unwrap();
        for atomic in [false, true] {
            let mut w = dev.upload(&w0).unwrap();
            let p = ScatterAddParams {
                w: w.ptr_mut(),
                values: values.ptr(),
                indices: indices.ptr(),
                n: idx.len() as u64,
                numel,
                alpha: 0.75,
            };
            // SAFETY: every pointer holds the lengths in p; the in-range indices are unique.
            unsafe {
                sparse::raw::scatter_add(
                    &dev,
                    None,
                    DType::F32,
                    DType::F32,
                    IndexWidth::U32,
                    atomic,
                    &p,
                )
            }
            .unwrap();
            assert!(
                bit_mismatches(&w.to_host().unwrap(), &expected).is_empty(),
                "atomic {atomic}"
            );
        }
        let src = dev.upload(&w0).unwrap();
        // Zeros, not poison (which is NaN too): a slot skipped, not written, shows.
        let mut out = dev.zeros::<f32>(idx.len()).unwrap();
        let p = GatherParams {
            out: out.ptr_mut(),
            src: src.ptr(),
            indices: indices.ptr(),
            n: idx.len() as u64,
            numel,
        };
        // SAFETY: as above.
        unsafe { sparse::raw::gather(&dev, None, DType::F32, DType::F32, IndexWidth::U32, &p) }
            .unwrap();
        let got = out.to_host().unwrap();
        for (k, &i) in idx.iter().enumerate() {
            match w0.get(i as usize) {
                Some(x) => assert_eq!(got[k].to_bits(), x.to_bits(), "{i}"),
                None => assert_eq!(got[k].to_bits(), 0x7fff_ffff, "{i}: {}", got[k]),
            }
        }
    }
}

/// The checks the safe API makes past the ones above: buffers of two devices, lengths of
/// the planned path and of gather's output, and a dtype pair AdamW has no kernel for; none
/// changes W or counts a step.
#[test]
fn mismatched_buffers_are_typed_errors() {
    let mut rng = StdRng::seed_from_u64(rng_seed());
    let (one, two) = (emulators().remove(0), emulators().remove(0));
    let w0: Vec<f32> = random_vec(&mut rng, 60, 1.0);
    let mut w = one.upload(&w0).unwrap();
    let values = one.upload(&random_vec::<f32>(&mut rng, 3, 1.0)).unwrap();
    let elsewhere = SparseIndex::sorted(&two, &[1u32, 4, 9], 60).unwrap();
    assert_eq!(
        sparse::scatter_add(&mut w, &elsewhere, &values, 1.0),
        Err(Error::DeviceMismatch)
    );
    let plan_elsewhere = ScatterPlan::new(&two, &[9u32, 1, 9], 60).unwrap();
    assert_eq!(
        sparse::scatter_add_planned(&mut w, &plan_elsewhere, &values, 1.0),
        Err(Error::DeviceMismatch)
    );
    let values_elsewhere = two.upload(&random_vec::<f32>(&mut rng, 3, 1.0)).unwrap();
    let index = SparseIndex::sorted(&one, &[1u32, 4, 9], 60).unwrap();
    assert_eq!(
        sparse::scatter_add(&mut w, &index, &values_elsewhere, 1.0),
        Err(Error::DeviceMismatch)
    );
    let plan = ScatterPlan::new(&one, &[9u32, 1, 9, 2], 60).unwrap();
    assert!(matches!(
        sparse::scatter_add_planned(&mut w, &plan, &values, 1.0),
        Err(Error::ShapeMismatch { .. })
    ));
    let short_w = ScatterPlan::new(&one, &[9u32, 1, 9], 61).unwrap();
    assert!(matches!(
        sparse::scatter_add_planned(&mut w, &short_w, &values, 1.0),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut out = one.alloc_poisoned::<f32>(4).unwrap();
    assert!(matches!(
        sparse::gather(&w, &index, &mut out),
        Err(Error::ShapeMismatch { .. })
    ));
    let mut opt = SparseAdamw::new(&w, index, AdamwConfig::default()).unwrap();
    let bf16_grad = one.upload(&random_vec::<bf16>(&mut rng, 60, 1.0)).unwrap();
    assert!(matches!(
        opt.step(&mut w, &bf16_grad),
        Err(Error::UnsupportedDtype { .. })
    ));
    assert_eq!(opt.steps_taken(), 0);
    assert!(bit_mismatches(&w.to_host().unwrap(), &w0).is_empty());
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
/// over several steps (checks the reference itself, not a kernel), with its decoupled
/// weight decay applied to the delta, as ours is: the weight decays toward its pretrained
/// value, not toward zero.
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
    let mut state = reference::SparseAdamwState::new(&w0, &idx).unwrap();
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
        )
        .unwrap();
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
