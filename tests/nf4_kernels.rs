//! NF4 kernels against the reference on every backend available: quantization and
//! dequantization bit for bit, the matmuls within the bf16/f16 bound, at odd shapes with
//! tails in every dimension, every blocksize, with and without double quantization.

use finetune_kernels::check::nf4::{self as check, Case};
use finetune_kernels::check::CheckRow;
use finetune_kernels::nf4::{self, MatmulPath, Nf4Weight};
use finetune_kernels::reference::nf4 as reference;
use finetune_kernels::testing::{backends, emulators, random_vec};
use finetune_kernels::{bf16, f16, Error};
use proptest::prelude::*;
use rand::{rngs::StdRng, SeedableRng};

const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
const GEMVS: [MatmulPath; 2] = [MatmulPath::GemvMma, MatmulPath::Gemv];

fn assert_pass(row: finetune_kernels::Result<CheckRow>) {
    let row = row.unwrap();
    assert!(row.pass(), "{row}");
}

/// The fused GEMMs the device runs (mma.sync everywhere; wgmma on Hopper and the emulator).
fn fused_gemms(dev: &finetune_kernels::Device) -> Vec<MatmulPath> {
    let mut paths = vec![MatmulPath::FusedGemm];
    if dev.has_wgmma() {
        paths.push(MatmulPath::FusedGemmWgmma);
    }
    paths
}

/// The fused GEMMs' forward and backward dX, bf16.
fn assert_fused_gemm_both_ways(dev: &finetune_kernels::Device, c: Case) {
    for path in fused_gemms(dev) {
        for forward in [true, false] {
            assert_pass(check::matmul::<bf16>(dev, c, path, forward));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]

    #[test]
    fn quantize_and_dequantize_match_the_reference(
        seed in any::<u64>(), rows in 1usize..70, cols in 1usize..300, bs in 0usize..8, dq in any::<bool>()
    ) {
        let c = Case { seed, rows, cols, m: 1, blocksize: BLOCKSIZES[bs], double_quant: dq, timed: false };
        for dev in backends() {
            assert_pass(check::quantize::<bf16>(&dev, c));
            assert_pass(check::quantize::<f16>(&dev, c));
            assert_pass(check::quantize::<f32>(&dev, c));
            assert_pass(check::dequantize::<bf16>(&dev, c));
            assert_pass(check::dequantize::<f16>(&dev, c));
            assert_pass(check::dequantize::<f32>(&dev, c));
        }
    }

    /// Half the widths are multiples of 32 (the tensor-core GEMV's fast path: steps of 64
    /// where the width is a multiple of 64 and the blocksize 64 or more, else of 32, which
    /// change blocks every step at blocksize 32), half any width (the scalar paths);
    /// every row count each GEMV takes (the tensor-core one's n tiles of 8, 1 to 8 of them).
    #[test]
    fn gemv_matches_the_reference(
        seed in any::<u64>(), rows in 1usize..150,
        cols in prop_oneof![1usize..300, (1usize..12).prop_map(|k| 32 * k)],
        m in 1usize..=nf4::GEMV_MAX_ROWS, bs in 0usize..3, dq in any::<bool>()
    ) {
        let c = Case { seed, rows, cols, m, blocksize: BLOCKSIZES[bs], double_quant: dq, timed: false };
        for dev in backends() {
            for gemv in GEMVS.into_iter().filter(|g| m <= g.max_rows()) {
                assert_pass(check::matmul::<bf16>(&dev, c, gemv, true));
                assert_pass(check::matmul::<f16>(&dev, c, gemv, true));
            }
        }
    }

    /// The GEMVs' epilogue (a QLoRA layer's forward at decode sizes): a bias, a low-rank
    /// term, both or neither, added before the one rounding; ranks that are multiples of 8
    /// (16-byte loads of u's and b's rows) and any rank (rows element by element where they
    /// are not 16-byte aligned), past 256 too; the widths as above.
    #[test]
    fn gemv_epilogue_adds_a_bias_and_a_low_rank_term(
        seed in any::<u64>(), rows in 1usize..150,
        cols in prop_oneof![1usize..300, (1usize..12).prop_map(|k| 32 * k)],
        m in 1usize..=nf4::GEMV_MAX_ROWS, bs in 0usize..3, dq in any::<bool>(), bias in any::<bool>(),
        rank in prop_oneof![Just(None), (1usize..40).prop_map(Some), (1usize..40).prop_map(|r| Some(8 * r))],
    ) {
        let c = Case { seed, rows, cols, m, blocksize: BLOCKSIZES[bs], double_quant: dq, timed: false };
        let epilogue = check::Epilogue { bias, rank };
        for dev in backends() {
            for gemv in GEMVS.into_iter().filter(|g| m <= g.max_rows()) {
                assert_pass(check::gemv_with_epilogue::<bf16>(&dev, c, gemv, epilogue));
                assert_pass(check::gemv_with_epilogue::<f16>(&dev, c, gemv, epilogue));
            }
        }
    }

    /// The dX GEMV (a backward of 1 to 16 rows): widths that are multiples of 32 (every
    /// row bucket's fast path: a lane's 32, 16, 8 or 4 columns whole) and any width (each
    /// element's own code and absmax where a lane's columns are not whole); weights of up to
    /// 400 rows, in up to 7 splits whose partials the reduce adds (64 rows a split at least),
    /// the last split short or empty; the blocksizes 32 to 128, with and without double
    /// quantization.
    #[test]
    fn gemv_dx_matches_the_reference(
        seed in any::<u64>(), rows in 1usize..400,
        cols in prop_oneof![1usize..300, (1usize..12).prop_map(|k| 32 * k)],
        m in 1usize..=nf4::GEMV_DX_MAX_ROWS, bs in 0usize..3, dq in any::<bool>()
    ) {
        let c = Case { seed, rows, cols, m, blocksize: BLOCKSIZES[bs], double_quant: dq, timed: false };
        for dev in backends() {
            assert_pass(check::matmul::<bf16>(&dev, c, MatmulPath::GemvDx, false));
            assert_pass(check::matmul::<f16>(&dev, c, MatmulPath::GemvDx, false));
        }
    }

    /// Half the widths are multiples of 16 (the wgmma GEMM's fast decoder), half any width.
    #[test]
    fn fused_gemm_forward_and_dx_match_the_reference(
        seed in any::<u64>(), rows in 1usize..300,
        cols in prop_oneof![1usize..300, (1usize..19).prop_map(|k| 16 * k)],
        m in 1usize..300, bs in 0usize..3
    ) {
        let c = Case { seed, rows, cols, m, blocksize: BLOCKSIZES[bs], double_quant: seed % 2 == 0, timed: false };
        for dev in backends() {
            for path in fused_gemms(&dev) {
                for forward in [true, false] {
                    assert_pass(check::matmul::<bf16>(&dev, c, path, forward));
                    assert_pass(check::matmul::<f16>(&dev, c, path, forward));
                }
            }
        }
    }
}

/// The matmuls at the blocksizes the matmul proptests leave out (256 to 4096): blocks that
/// span several rows of the weight, and a last block cut short.
#[test]
fn matmuls_at_the_large_blocksizes() {
    for dev in backends() {
        for &blocksize in &BLOCKSIZES[3..] {
            let c = Case {
                seed: rand::random(),
                rows: 45,
                cols: 301,
                m: 19,
                blocksize,
                double_quant: blocksize % 512 == 0,
                timed: false,
            };
            assert_fused_gemm_both_ways(&dev, c);
            // The GEMVs' generic paths (301 columns) and their fast ones (320).
            for cols in [301, 320] {
                let c = Case { m: 3, cols, ..c };
                for gemv in GEMVS {
                    assert_pass(check::matmul::<f16>(&dev, c, gemv, true));
                }
                assert_pass(check::matmul::<f16>(&dev, c, MatmulPath::GemvDx, false));
            }
        }
    }
}

/// The fast paths (16- and 32-aligned widths, several k-tiles, more than one tile each
/// way) as well as the generic ones.
#[test]
fn aligned_shapes_take_the_fast_paths_and_agree() {
    for dev in backends() {
        for (rows, cols, m) in [
            (256, 256, 130),
            (130, 64, 129),
            (64, 96, 17),
            (64, 96, 16),
            (48, 128, 64),
            (128, 96, 9),
            (300, 1024, 3),
            // 130 steps of 32: the tensor-core GEMV's warps take several groups, the last short.
            (40, 4160, 5),
        ] {
            let c = Case {
                seed: rand::random(),
                rows,
                cols,
                m,
                blocksize: 64,
                double_quant: true,
                timed: false,
            };
            assert_fused_gemm_both_ways(&dev, c);
            for gemv in GEMVS.into_iter().filter(|g| m <= g.max_rows()) {
                assert_pass(check::matmul::<bf16>(&dev, c, gemv, true));
            }
            if m <= nf4::GEMV_DX_MAX_ROWS {
                assert_pass(check::matmul::<bf16>(&dev, c, MatmulPath::GemvDx, false));
            }
        }
    }
}

/// The tensor-core GEMV where each warp takes several groups of steps (K past 2,048: 8 warps ×
/// 256 elements a round), each group's codes loaded while the group before is computed. Steps
/// of 32 (K an odd multiple of 32, or blocksize 32): 81 steps (the warps' second groups of 8,
/// 8 and 1 step) and 200 (a fourth round of 8). Steps of 64 (K a multiple of 64, blocksize 64
/// or more): 81 steps (groups of 4: a third round, its last group of 1 step) and 100. At 1, 9,
/// 16, 33 and 64 activation rows (1, 2, 2, 5 and 8 n tiles), blocksizes 32 to 256, with and
/// without double quantization.
#[test]
fn gemv_mma_over_several_groups_per_warp() {
    for dev in backends() {
        for (cols, m, blocksize, double_quant) in [
            (32 * 81, 1, 64, true),
            (32 * 81, 16, 32, false),
            (32 * 81, 64, 64, true),
            (32 * 200, 9, 256, true),
            (32 * 200, 1, 128, false),
            (32 * 200, 33, 32, false),
            (64 * 81, 1, 64, true),
            (64 * 81, 33, 128, false),
            (64 * 81, 64, 64, false),
            (64 * 100, 16, 64, true),
        ] {
            let c = Case {
                seed: rand::random(),
                rows: 21,
                cols,
                m,
                blocksize,
                double_quant,
                timed: false,
            };
            assert_pass(check::matmul::<bf16>(&dev, c, MatmulPath::GemvMma, true));
            assert_pass(check::matmul::<f16>(&dev, c, MatmulPath::GemvMma, true));
        }
    }
}

/// The wgmma GEMMs on more tiles than the GPU has SMs (the emulator's 132): a block walks
/// two tiles, the second's loads in flight while it stores the first. The forward's tiles
/// are y's (17 × 9 of 128 × 256), dX's dXᵀ's (16 × 9), each over one step of K.
#[test]
fn wgmma_gemms_walk_several_tiles_per_block() {
    for dev in backends().into_iter().filter(|d| d.has_wgmma()) {
        // Tiles, forward and dX: more than one block per SM takes.
        assert!(17 * 9 > dev.sm_count() && 16 * 9 > dev.sm_count());
        for (rows, cols, forward) in [(2050, 64, true), (64, 2000, false)] {
            let c = Case {
                seed: rand::random(),
                rows,
                cols,
                m: 2100,
                blocksize: 64,
                double_quant: true,
                timed: false,
            };
            assert_pass(check::matmul::<bf16>(
                &dev,
                c,
                MatmulPath::FusedGemmWgmma,
                forward,
            ));
        }
    }
}

#[test]
fn dispatch_runs_every_path_it_can_choose() {
    for dev in backends() {
        let c = Case {
            seed: rand::random(),
            rows: 96,
            cols: 160,
            m: 5,
            blocksize: 64,
            double_quant: true,
            timed: false,
        };
        assert_eq!(nf4::choose_path(&dev, 1, true), MatmulPath::GemvMma);
        assert_eq!(nf4::choose_path(&dev, 16, true), MatmulPath::GemvMma);
        assert_eq!(nf4::choose_path(&dev, 64, true), MatmulPath::GemvMma);
        assert_ne!(nf4::choose_path(&dev, 65, true), MatmulPath::GemvMma);
        assert_ne!(
            nf4::choose_path(&dev, 4, false),
            MatmulPath::GemvMma,
            "the GEMV is forward-only"
        );
        assert_eq!(nf4::choose_path(&dev, 1, false), MatmulPath::GemvDx);
        assert_eq!(nf4::choose_path(&dev, 16, false), MatmulPath::GemvDx);
        assert_ne!(nf4::choose_path(&dev, 17, false), MatmulPath::GemvDx);
        assert_ne!(
            nf4::choose_path(&dev, 1, true),
            MatmulPath::GemvDx,
            "the dX GEMV is backward-only"
        );
        // Every (path, direction) the dispatch picks for some m, each run once at that m.
        let mut chosen = Vec::new();
        for m in [1, 4, 5, 16, 17, 40, 64, 65, 100_000] {
            for forward in [true, false] {
                let path = nf4::choose_path(&dev, m, forward);
                if !chosen.iter().any(|&(p, f, _)| (p, f) == (path, forward)) {
                    chosen.push((path, forward, m.min(40)));
                }
            }
        }
        assert!(chosen.len() >= 3, "{chosen:?}");
        for (path, forward, m) in chosen {
            assert_pass(check::matmul::<bf16>(&dev, Case { m, ..c }, path, forward));
        }
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    for dev in backends() {
        let mut rng = StdRng::seed_from_u64(rand::random());
        let w: Vec<bf16> = random_vec(&mut rng, 6 * 10, 1.0);
        let wd = dev.upload(&w).unwrap();
        assert!(matches!(
            Nf4Weight::quantize(&wd, 6, 10, 48, false),
            Err(Error::Unsupported { .. })
        ));
        assert!(matches!(
            Nf4Weight::quantize(&wd, 6, 11, 64, false),
            Err(Error::ShapeMismatch { .. })
        ));
        let mut nan = w.clone();
        nan[17] = bf16::NAN;
        let nd = dev.upload(&nan).unwrap();
        assert!(matches!(
            Nf4Weight::quantize(&nd, 6, 10, 64, true),
            Err(Error::InvalidArgument { .. })
        ));

        let q = Nf4Weight::quantize(&wd, 6, 10, 64, true).unwrap();
        let x = dev
            .upload(&random_vec::<bf16>(&mut rng, 3 * 10, 1.0))
            .unwrap();
        let mut y = dev.alloc_poisoned::<bf16>(3 * 6).unwrap();
        let mut short = dev.alloc_poisoned::<bf16>(3 * 5).unwrap();
        assert!(matches!(
            nf4::forward(&q, &x, 3, &mut short),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            nf4::forward(&q, &x, 4, &mut y),
            Err(Error::ShapeMismatch { .. })
        ));
        // Shapes that fit a backward ([3, out] in, [3, in] out) on the forward-only GEMVs,
        // and a forward of one row more than each takes.
        let dy = dev
            .upload(&random_vec::<bf16>(&mut rng, 3 * 6, 1.0))
            .unwrap();
        let mut dx = dev.alloc_poisoned::<bf16>(3 * 10).unwrap();
        for gemv in GEMVS {
            assert!(matches!(
                nf4::backward_dx_with(&q, &dy, 3, &mut dx, gemv),
                Err(Error::Unsupported { .. })
            ));
            let m = gemv.max_rows() + 1;
            let x = dev
                .upload(&random_vec::<bf16>(&mut rng, m * 10, 1.0))
                .unwrap();
            let mut y = dev.alloc_poisoned::<bf16>(m * 6).unwrap();
            assert!(matches!(
                nf4::forward_with(&q, &x, m, &mut y, gemv),
                Err(Error::Unsupported { .. })
            ));
        }
        // An epilogue on a GEMM, even an empty one: only the GEMVs take one.
        let none = nf4::GemvEpilogue {
            bias: None,
            low_rank: None,
        };
        assert!(matches!(
            nf4::gemv_with_epilogue(&q, &x, 3, &mut y, MatmulPath::FusedGemm, none),
            Err(Error::Unsupported { .. })
        ));
        // The wgmma GEMM on a device that runs wgmma only.
        match (
            dev.has_wgmma(),
            nf4::forward_with(&q, &x, 3, &mut y, MatmulPath::FusedGemmWgmma),
        ) {
            (true, Ok(())) => {}
            (false, Err(Error::Unsupported { why, .. })) => {
                assert!(why.contains("sm_90a"), "{why}")
            }
            (_, other) => panic!("the wgmma GEMM: {other:?}"),
        }
        let x32 = dev
            .upload(&random_vec::<f32>(&mut rng, 3 * 10, 1.0))
            .unwrap();
        let mut y32 = dev.alloc_poisoned::<f32>(3 * 6).unwrap();
        assert!(matches!(
            nf4::forward_with(&q, &x32, 3, &mut y32, MatmulPath::FusedGemm),
            Err(Error::UnsupportedDtype { .. })
        ));

        let mut host = reference::quantize(&w, &[6, 10], 64, false).unwrap();
        host.shape = vec![60];
        assert!(matches!(
            Nf4Weight::upload(&dev, &host),
            Err(Error::Unsupported { .. })
        ));
        host.shape = vec![6, 10];
        host.codes.pop();
        assert!(matches!(
            Nf4Weight::upload(&dev, &host),
            Err(Error::ShapeMismatch { .. })
        ));
        let mut host = reference::quantize(&w, &[6, 10], 64, true).unwrap();
        host.dtype = finetune_kernels::DType::U8;
        assert!(matches!(
            Nf4Weight::upload(&dev, &host),
            Err(Error::Unsupported { .. })
        ));
        host.dtype = finetune_kernels::DType::BF16;
        if let reference::Absmax::Nested(n) = &mut host.absmax {
            n.offset = f32::NAN;
        }
        assert!(matches!(
            Nf4Weight::upload(&dev, &host),
            Err(Error::Unsupported { .. })
        ));
    }
}

/// Activations, outputs and a dequantized copy on another device than the weight's (two
/// emulators: each its own device, as two GPUs are) are refused on every path, before
/// anything is written.
#[test]
fn buffers_on_another_device_are_refused() {
    let Some((one, two)) = emulators().pop().zip(emulators().pop()) else {
        return; // No emulator built: no second device to mix in.
    };
    let mut rng = StdRng::seed_from_u64(rand::random());
    let w: Vec<bf16> = random_vec(&mut rng, 6 * 10, 1.0);
    let q = Nf4Weight::quantize(&one.upload(&w).unwrap(), 6, 10, 64, true).unwrap();
    let mut x = |dev: &finetune_kernels::Device| {
        dev.upload(&random_vec::<bf16>(&mut rng, 3 * 10, 1.0))
            .unwrap()
    };
    let (x_here, x_there) = (x(&one), x(&two));
    let dy_there = two
        .upload(&random_vec::<bf16>(&mut rng, 3 * 6, 1.0))
        .unwrap();
    let (mut y_here, mut y_there) = (one.zeros::<bf16>(3 * 6).unwrap(), two.zeros(3 * 6).unwrap());
    let mut dx_here = one.zeros::<bf16>(3 * 10).unwrap();
    for path in [
        MatmulPath::GemvMma,
        MatmulPath::Gemv,
        MatmulPath::FusedGemm,
        MatmulPath::FusedGemmWgmma,
    ] {
        for result in [
            nf4::forward_with(&q, &x_there, 3, &mut y_here, path),
            nf4::forward_with(&q, &x_here, 3, &mut y_there, path),
            nf4::backward_dx_with(&q, &dy_there, 3, &mut dx_here, path),
        ] {
            assert_eq!(result, Err(Error::DeviceMismatch), "{path:?}");
        }
    }
    let mut out_there = two.zeros::<f32>(6 * 10).unwrap();
    assert_eq!(q.dequantize(&mut out_there), Err(Error::DeviceMismatch));
    for (what, zeros) in [
        ("y", y_here.to_host().unwrap()),
        ("y elsewhere", y_there.to_host().unwrap()),
        ("dx", dx_here.to_host().unwrap()),
    ] {
        assert!(zeros.iter().all(|v| v.to_bits() == 0), "{what} was written");
    }
    assert!(out_there.to_host().unwrap().iter().all(|&v| v == 0.0));
}

/// Past FK_NF4_MEAN_CHUNK blocks the double-quantization offset is a sum of chunk sums:
/// the kernel and the reference must still agree bit for bit (2123 blocks, three chunks).
#[test]
fn double_quant_offset_over_many_chunks() {
    for dev in backends() {
        let c = Case {
            seed: rand::random(),
            rows: 97,
            cols: 700,
            m: 1,
            blocksize: 32,
            double_quant: true,
            timed: false,
        };
        assert_pass(check::quantize::<bf16>(&dev, c));
    }
}

/// A weight quantized on the device round-trips through the host form unchanged.
#[test]
fn device_weights_round_trip_through_the_host() {
    for dev in backends() {
        let mut rng = StdRng::seed_from_u64(rand::random());
        let w: Vec<f16> = random_vec(&mut rng, 33 * 65, 0.1);
        for dq in [false, true] {
            let q = Nf4Weight::quantize(&dev.upload(&w).unwrap(), 33, 65, 128, dq)
                .unwrap()
                .to_host()
                .unwrap();
            let again = Nf4Weight::upload(&dev, &q).unwrap().to_host().unwrap();
            assert_eq!(q.codes, again.codes);
            assert_eq!(q.dequantize::<f32>(), again.dequantize::<f32>());
        }
    }
}

/// Dequantizing into the rows of a wider matrix writes exactly the weight's columns and
/// leaves the rest alone (the LoRA layer's extended weight relies on it).
#[test]
fn dequantize_into_wider_rows() {
    for dev in backends() {
        let mut rng = StdRng::seed_from_u64(rand::random());
        for (rows, cols, ld) in [(33, 64, 72), (9, 131, 140), (5, 32, 32)] {
            let w: Vec<bf16> = random_vec(&mut rng, rows * cols, 0.1);
            let q = reference::quantize(&w, &[rows, cols], 64, true).unwrap();
            let want = q.dequantize::<bf16>();
            let wd = Nf4Weight::upload(&dev, &q).unwrap();
            let fill: Vec<bf16> = random_vec(&mut rng, rows * ld, 5.0);
            let mut out = dev.upload(&fill).unwrap();
            wd.dequantize_strided(&mut out, ld).unwrap();
            let got = out.to_host().unwrap();
            for r in 0..rows {
                for c in 0..ld {
                    let expect = if c < cols {
                        want[r * cols + c]
                    } else {
                        fill[r * ld + c]
                    };
                    assert_eq!(
                        got[r * ld + c].to_bits(),
                        expect.to_bits(),
                        "[{r}][{c}] of {rows}x{cols} in rows of {ld}"
                    );
                }
            }
            // And back out: copy_rows_from gathers the columns into a dense matrix.
            let mut dense = dev.alloc_poisoned::<bf16>(rows * cols).unwrap();
            dense.copy_rows_from(&out, rows, cols, ld, cols).unwrap();
            assert_eq!(
                dense
                    .to_host()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            // A stride below the row's length is named (it had been a shape mismatch that
            // expected fewer elements than out has).
            for err in [
                wd.dequantize_strided(&mut out, cols - 1).unwrap_err(),
                dense
                    .copy_rows_from(&out, rows, cols, cols - 1, cols)
                    .unwrap_err(),
            ] {
                assert!(
                    matches!(&err, Error::InvalidArgument { what, why }
                        if what.ends_with("ld") && why.contains(&format!("a row of {cols}"))),
                    "{err}"
                );
            }
            // A row stride whose (rows - 1) · ld wraps past usize::MAX to a small number.
            let wraps = (usize::MAX / (rows - 1)).wrapping_add(1);
            assert!(matches!(
                wd.dequantize_strided(&mut out, wraps),
                Err(Error::ShapeMismatch { .. })
            ));
            assert!(matches!(
                dense.copy_rows_from(&out, rows, cols, wraps, cols),
                Err(Error::ShapeMismatch { .. })
            ));
        }
    }
}
