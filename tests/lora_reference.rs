//! The LoRA reference against itself: its backward against central finite differences of
//! its forward, dropout against the Philox mask, the merge against the forward, and bad
//! input as typed errors.
//!
//! The forward is linear in each operand separately (for a fixed mask), so a central
//! difference is exact up to rounding whatever the step: a step of 0.5 keeps the f32
//! rounding of `y` far below the tolerance.

use finetune_kernels::reference::lora::{LoraConfig, LoraLayer};
use finetune_kernels::reference::philox::dropout_mask;
use finetune_kernels::testing::{random_vec, rel_l2};
use finetune_kernels::Error;
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Owned operands of a layer `[m, in] -> [m, out]`, all f32.
struct Case {
    m: usize,
    d_in: usize,
    d_out: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
    a: Vec<f32>,
    b: Vec<f32>,
    dy: Vec<f32>,
    config: LoraConfig,
}

impl Case {
    /// Fresh operands for `[m, in, out, rank]`.
    fn new(
        seed: u64,
        [m, d_in, d_out, rank]: [usize; 4],
        dropout: f32,
        bias: bool,
        use_rslora: bool,
    ) -> Case {
        let mut rng = StdRng::seed_from_u64(seed);
        Case {
            m,
            d_in,
            d_out,
            x: random_vec(&mut rng, m * d_in, 2.0),
            w: random_vec(&mut rng, d_out * d_in, 1.0),
            bias: bias.then(|| random_vec(&mut rng, d_out, 1.0)),
            a: random_vec(&mut rng, rank * d_in, 1.0),
            b: random_vec(&mut rng, d_out * rank, 1.0),
            dy: random_vec(&mut rng, m * d_out, 1.0),
            config: LoraConfig {
                rank,
                alpha: rng.random_range(0.5..32.0),
                use_rslora,
                dropout,
                seed: rng.random(),
            },
        }
    }

    /// A small random shape: every size from 1 up, ranks past `in` and `out` included.
    fn random(seed: u64, dropout: f32, bias: bool, use_rslora: bool) -> Case {
        let mut rng = StdRng::seed_from_u64(seed);
        let shape = [
            rng.random_range(1..6),
            rng.random_range(1..14),
            rng.random_range(1..12),
            rng.random_range(1..7),
        ];
        Case::new(rng.random(), shape, dropout, bias, use_rslora)
    }

    fn layer(&self) -> LoraLayer<'_, f32, f32> {
        LoraLayer {
            w: &self.w,
            bias: self.bias.as_deref(),
            a: &self.a,
            b: &self.b,
            d_in: self.d_in,
            d_out: self.d_out,
            config: self.config,
        }
    }

    /// `Σ dy · y`, in f64: its gradient with respect to any operand is what backward gives.
    fn loss(&self) -> f64 {
        let y = self.layer().forward(&self.x, self.m).unwrap().y;
        y.iter()
            .zip(&self.dy)
            .map(|(&y, &g)| y as f64 * g as f64)
            .sum()
    }
}

#[derive(Clone, Copy, Debug)]
enum Operand {
    X,
    W,
    Bias,
    A,
    B,
}

fn operand(case: &mut Case, which: Operand) -> &mut Vec<f32> {
    match which {
        Operand::X => &mut case.x,
        Operand::W => &mut case.w,
        Operand::Bias => case.bias.as_mut().unwrap(),
        Operand::A => &mut case.a,
        Operand::B => &mut case.b,
    }
}

/// The central difference of the loss at every element of one operand, with the step the
/// f32 operand really took.
fn finite_differences(case: &mut Case, which: Operand) -> Vec<f64> {
    const STEP: f32 = 0.5;
    (0..operand(case, which).len())
        .map(|k| {
            let v = operand(case, which)[k];
            operand(case, which)[k] = v + STEP;
            let up = case.loss();
            operand(case, which)[k] = v - STEP;
            let down = case.loss();
            operand(case, which)[k] = v;
            let step = ((v + STEP) as f64) - ((v - STEP) as f64);
            (up - down) / step
        })
        .collect()
}

/// Checks every gradient of a case against finite differences.
fn check_gradients(mut case: Case) {
    let forward = case.layer().forward(&case.x, case.m).unwrap();
    let grads = case
        .layer()
        .backward(&case.x, &forward.u, &case.dy, case.m)
        .unwrap();
    let mut checks = vec![
        (Operand::X, grads.dx.clone()),
        (Operand::W, vec![]),
        (Operand::A, grads.da.clone()),
        (Operand::B, grads.db.clone()),
    ];
    match (&case.bias, &grads.dbias) {
        (Some(_), Some(db)) => checks.push((Operand::Bias, db.clone())),
        (None, None) => {}
        (has, got) => panic!("bias {} but dbias {}", has.is_some(), got.is_some()),
    }
    for (which, analytic) in checks {
        let numeric = finite_differences(&mut case, which);
        // W is frozen: backward gives no dW, but the loss must still depend on W as dYᵀ x.
        let analytic: Vec<f64> = match which {
            Operand::W => (0..case.d_out * case.d_in)
                .map(|k| {
                    let (o, i) = (k / case.d_in, k % case.d_in);
                    (0..case.m)
                        .map(|r| {
                            case.dy[r * case.d_out + o] as f64 * case.x[r * case.d_in + i] as f64
                        })
                        .sum()
                })
                .collect(),
            _ => analytic.iter().map(|&g| g as f64).collect(),
        };
        let largest = analytic.iter().fold(1.0f64, |m, g| m.max(g.abs()));
        for (k, (n, g)) in numeric.iter().zip(&analytic).enumerate() {
            assert!(
                (n - g).abs() <= 1e-4 * largest,
                "{which:?}[{k}]: finite difference {n}, backward {g} (m {} in {} out {} {:?})",
                case.m,
                case.d_in,
                case.d_out,
                case.config
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn backward_matches_finite_differences(
        seed in any::<u64>(),
        dropout in prop_oneof![Just(0.0f32), 0.05f32..0.9],
        bias in any::<bool>(),
        use_rslora in any::<bool>(),
    ) {
        check_gradients(Case::random(seed, dropout, bias, use_rslora));
    }
}

#[test]
fn odd_shapes_and_the_largest_rank() {
    // Past the kernels' limit: the reference (and adapters on disk) take any rank.
    let shape = [3, 17, 5, LoraConfig::MAX_RANK + 44];
    check_gradients(Case::new(rand::random(), shape, 0.3, true, true));
}

/// With W = 0 and no bias, the layer with dropout is the layer without it applied to
/// `x · keep / (1 − p)`, the mask keyed by the flattened index of x.
#[test]
fn dropout_is_the_philox_mask_over_x() {
    // 65 elements of x: all kept has a chance of 0.6^65.
    let mut case = Case::new(rand::random(), [5, 13, 7, 3], 0.4, false, false);
    case.w.iter_mut().for_each(|w| *w = 0.0);
    let with = case.layer().forward(&case.x, case.m).unwrap();
    let keep = dropout_mask(case.config.seed, 0.4, case.x.len());
    assert!(keep.contains(&0), "no element dropped: pick another seed");
    let dropped: Vec<f32> = case
        .x
        .iter()
        .zip(&keep)
        .map(|(&x, &k)| if k == 1 { (x as f64 / 0.6) as f32 } else { 0.0 })
        .collect();
    let mut plain = case.layer();
    plain.config.dropout = 0.0;
    let without = plain.forward(&dropped, case.m).unwrap();
    assert!(rel_l2(&with.u, &without.u) < 1e-6);
    assert!(rel_l2(&with.y, &without.y) < 1e-6);
}

/// `x W'ᵀ + bias` with the merged weight is the forward without dropout.
#[test]
fn merged_weight_gives_the_forward() {
    for use_rslora in [false, true] {
        let case = Case::random(rand::random(), 0.0, true, use_rslora);
        let merged = case.layer().merged().unwrap();
        let plain = LoraLayer {
            w: &merged,
            b: &vec![0.0f32; case.b.len()],
            ..case.layer()
        };
        let y = case.layer().forward(&case.x, case.m).unwrap().y;
        let y_merged = plain.forward(&case.x, case.m).unwrap().y;
        assert!(rel_l2(&y_merged, &y) < 1e-5, "{}", rel_l2(&y_merged, &y));
    }
}

#[test]
fn scale_is_peft_scaling() {
    let c = LoraConfig::new(16, 32.0);
    assert_eq!((c.use_rslora, c.dropout), (false, 0.0), "PEFT's defaults");
    assert_eq!(c.scale(), 2.0);
    let rs = LoraConfig {
        use_rslora: true,
        ..c
    };
    assert_eq!(rs.scale(), 8.0);
    let odd = LoraConfig {
        rank: 3,
        alpha: 1.0,
        ..c
    };
    assert_eq!(odd.scale(), (1.0f64 / 3.0) as f32);
}

#[test]
fn bad_config_and_shapes_are_typed_errors() {
    let case = Case::random(7, 0.0, true, false);
    let bad_configs = [
        (0, 8.0, 0.0),
        (4, f64::NAN, 0.0),
        (4, f64::INFINITY, 0.0),
        (4, 8.0, 1.0),
        (4, 8.0, -0.1),
        (4, 8.0, f32::NAN),
    ];
    for (rank, alpha, dropout) in bad_configs {
        let config = LoraConfig {
            rank,
            alpha,
            dropout,
            ..case.config
        };
        let e = config.validate().unwrap_err();
        assert!(
            matches!(
                e,
                Error::Unsupported { op: "lora", .. } | Error::InvalidArgument { .. }
            ),
            "{e}"
        );
        let layer = LoraLayer {
            config,
            ..case.layer()
        };
        assert_eq!(layer.forward(&case.x, case.m).unwrap_err(), e);
        assert_eq!(layer.merged().unwrap_err(), e);
    }

    // Each operand one element too long.
    let long = |v: &[f32]| vec![0.0f32; v.len() + 1];
    let (a, b, w) = (long(&case.a), long(&case.b), long(&case.w));
    let bias = long(case.bias.as_ref().unwrap());
    let layer = case.layer();
    let shape_errors = [
        LoraLayer { a: &a, ..layer }.forward(&case.x, case.m),
        LoraLayer { b: &b, ..layer }.forward(&case.x, case.m),
        LoraLayer { w: &w, ..layer }.forward(&case.x, case.m),
        LoraLayer {
            bias: Some(&bias),
            ..layer
        }
        .forward(&case.x, case.m),
        layer.forward(&case.x, case.m + 1),
    ];
    for e in shape_errors {
        assert!(matches!(e, Err(Error::ShapeMismatch { .. })), "{e:?}");
    }
    let f = layer.forward(&case.x, case.m).unwrap();
    for (u, dy) in [(&long(&f.u), &case.dy), (&f.u, &long(&case.dy))] {
        assert!(matches!(
            layer.backward(&case.x, u, dy, case.m),
            Err(Error::ShapeMismatch { .. })
        ));
    }
    // A rank mismatch between A and B names B.
    let wide_b = vec![0.0f32; case.d_out * (case.config.rank + 1)];
    match (LoraLayer {
        b: &wide_b,
        ..layer
    })
    .merged()
    {
        Err(Error::ShapeMismatch { what, .. }) => assert!(what.contains("lora B"), "{what}"),
        other => panic!("{other:?}"),
    }
    // No input features: an empty x fits any m, which had sized y and u alone (m = usize::MAX
    // panicked on a capacity overflow; a large one would have asked for its memory).
    let b = vec![0.0f32; case.d_out * case.config.rank];
    let featureless = LoraLayer {
        w: &[],
        a: &[],
        b: &b,
        d_in: 0,
        ..layer
    };
    for m in [0, usize::MAX] {
        let e = featureless.forward(&[], m).unwrap_err();
        assert!(
            matches!(&e, Error::Unsupported { why, .. } if why.contains("no input features")),
            "{e}"
        );
    }
}
