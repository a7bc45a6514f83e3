//! The fused LoRA kernels against the f64 reference on every backend available: forward,
//! backward and merge, bf16 and f16, dense and NF4 bases, with and without dropout, bias and
//! rsLoRA, at odd shapes and ranks.

use finetune_kernels::check::lora::{self as check, Case};
use finetune_kernels::check::CheckRow;
use finetune_kernels::lora::{LoraBase, LoraConfig, LoraLinear};
use finetune_kernels::testing::{backends, random_vec};
use finetune_kernels::{bf16, f16, Error};
use proptest::prelude::*;
use rand::{rngs::StdRng, SeedableRng};

fn assert_pass(rows: finetune_kernels::Result<Vec<CheckRow>>) {
    for row in rows.unwrap() {
        assert!(row.pass(), "{row}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    #[test]
    fn forward_and_backward_match_the_reference(
        seed in any::<u64>(), m in 1usize..150, d_in in 1usize..150, d_out in 1usize..150, rank in 1usize..40,
        dropout in prop_oneof![Just(0.0f32), 0.0f32..0.6], bias in any::<bool>(), rslora in any::<bool>(), nf4 in any::<bool>(),
    ) {
        let c = Case { seed, m, d_in, d_out, rank, rslora, dropout, bias, nf4, timed: false };
        for dev in backends() {
            assert_pass(check::forward::<bf16>(&dev, c));
            assert_pass(check::backward::<bf16>(&dev, c));
            assert_pass(check::forward::<f16>(&dev, c));
            assert_pass(check::backward::<f16>(&dev, c));
        }
    }
}

/// Aligned widths (the cp.async paths), ranks past one tile, several row splits.
#[test]
fn aligned_shapes_large_ranks_and_many_splits() {
    for dev in backends() {
        for (m, d_in, d_out, rank) in [(130, 256, 64, 16), (600, 64, 128, 136), (1100, 32, 48, 8)] {
            for (dropout, nf4) in [(0.0, false), (0.2, true)] {
                let c = Case {
                    seed: rand::random(),
                    m,
                    d_in,
                    d_out,
                    rank,
                    rslora: false,
                    dropout,
                    bias: true,
                    nf4,
                    timed: false,
                };
                assert_pass(check::forward::<bf16>(&dev, c));
                assert_pass(check::backward::<bf16>(&dev, c));
            }
        }
    }
}

#[test]
fn merge_matches_the_reference() {
    for dev in backends() {
        let c = Case {
            seed: rand::random(),
            m: 1,
            d_in: 77,
            d_out: 133,
            rank: 9,
            rslora: true,
            dropout: 0.0,
            bias: false,
            nf4: false,
            timed: false,
        };
        assert!(check::merge::<bf16>(&dev, c).unwrap().pass());
        assert!(check::merge::<f16>(&dev, c).unwrap().pass());
    }
}

#[test]
fn merge_into_nf4_reports_its_requantization_error() {
    for dev in backends() {
        let mut rng = StdRng::seed_from_u64(rand::random());
        let (d_out, d_in, rank) = (64, 128, 4);
        let w = dev
            .upload(&random_vec::<bf16>(&mut rng, d_out * d_in, 0.05))
            .unwrap();
        let q = finetune_kernels::nf4::Nf4Weight::quantize(&w, d_out, d_in, 64, true).unwrap();
        let config = LoraConfig {
            rank,
            alpha: 8.0,
            use_rslora: false,
            dropout: 0.0,
            seed: 1,
        };
        let a = dev
            .upload(&random_vec::<bf16>(&mut rng, rank * d_in, 0.1))
            .unwrap();
        let b = dev
            .upload(&random_vec::<bf16>(&mut rng, d_out * rank, 0.1))
            .unwrap();
        let layer = LoraLinear::new(LoraBase::Nf4(Box::new(q)), None, a, b, config).unwrap();
        let (merged, error) = layer.merged_nf4().unwrap();
        // NF4 keeps about 2-3 significant bits per element: a few percent relative error.
        assert!(error > 0.0 && error < 0.15, "requantization error {error}");
        assert_eq!((merged.rows(), merged.cols()), (d_out, d_in));
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    for dev in backends() {
        let mut rng = StdRng::seed_from_u64(rand::random());
        let (d_out, d_in, rank) = (6, 10, 3);
        let w = || {
            dev.upload(&random_vec::<f16>(
                &mut StdRng::seed_from_u64(1),
                d_out * d_in,
                0.1,
            ))
            .unwrap()
        };
        let a = |n: usize| {
            dev.upload(&random_vec::<f16>(&mut StdRng::seed_from_u64(2), n, 0.1))
                .unwrap()
        };
        let config = LoraConfig {
            rank,
            alpha: 8.0,
            use_rslora: false,
            dropout: 0.0,
            seed: 1,
        };
        for bad in [
            LoraConfig { rank: 0, ..config },
            LoraConfig {
                rank: 257,
                ..config
            },
            LoraConfig {
                dropout: 1.0,
                ..config
            },
            LoraConfig {
                dropout: -0.1,
                ..config
            },
            LoraConfig {
                alpha: f32::NAN,
                ..config
            },
        ] {
            assert!(
                LoraLinear::new(
                    LoraBase::Dense(w()),
                    None,
                    a(rank * d_in),
                    a(d_out * rank),
                    bad
                )
                .is_err(),
                "{bad:?}"
            );
        }
        // A and B of different ranks, a bias of the wrong length.
        assert!(matches!(
            LoraLinear::new(
                LoraBase::Dense(w()),
                None,
                a(rank * d_in),
                a(d_out * (rank + 1)),
                config
            ),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            LoraLinear::new(
                LoraBase::Dense(w()),
                Some(a(d_out + 1)),
                a(rank * d_in),
                a(d_out * rank),
                config
            ),
            Err(Error::ShapeMismatch { .. })
        ));
        let layer = LoraLinear::new(
            LoraBase::Dense(w()),
            None,
            a(rank * d_in),
            a(d_out * rank),
            config,
        )
        .unwrap();
        let x = dev
            .upload(&random_vec::<f16>(&mut rng, 4 * d_in, 1.0))
            .unwrap();
        assert!(matches!(
            layer.forward(&x, 5),
            Err(Error::ShapeMismatch { .. })
        ));
        let (_, saved) = layer.forward(&x, 4).unwrap();
        let short_dy = dev
            .upload(&random_vec::<f16>(&mut rng, 4 * d_out - 1, 1.0))
            .unwrap();
        assert!(matches!(
            layer.backward(&x, &saved, &short_dy),
            Err(Error::ShapeMismatch { .. })
        ));
        // f32 activations are not built.
        let w32 = dev
            .upload(&random_vec::<f32>(&mut rng, d_out * d_in, 0.1))
            .unwrap();
        let a32 = dev
            .upload(&random_vec::<f32>(&mut rng, rank * d_in, 0.1))
            .unwrap();
        let b32 = dev
            .upload(&random_vec::<f32>(&mut rng, d_out * rank, 0.1))
            .unwrap();
        assert!(matches!(
            LoraLinear::new(LoraBase::Dense(w32), None, a32, b32, config),
            Err(Error::UnsupportedDtype { .. })
        ));
    }
}
