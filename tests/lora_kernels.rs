//! The fused LoRA kernels against the f64 reference on every backend available: forward,
//! backward and merge, bf16 and f16, dense and NF4 bases, with and without dropout, bias and
//! rsLoRA, at odd shapes and ranks.

use finetune_kernels::check::lora::{self as check, paths, Case};
use finetune_kernels::check::CheckRow;
use finetune_kernels::lora::{
    ColumnRuns, LoraBase, LoraConfig, LoraLinear, LoraPath, Nf4Decode, TileLoads,
};
use finetune_kernels::nf4::{self, MatmulPath, Nf4Weight};
use finetune_kernels::reference::{lora as reference, nf4 as nf4_reference};
use finetune_kernels::testing::{backends, backends_in_turn, emulators, random_vec, rel_l2};
use finetune_kernels::{bf16, f16, Error};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

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
        scratch in any::<bool>(), tile_loads in prop_oneof![Just(TileLoads::Tma), Just(TileLoads::TmaMulticast), Just(TileLoads::CpAsync)],
        k_splits in prop_oneof![Just(None), (1u32..7).prop_map(Some)], narrow_stagger in any::<bool>(), wide_down in any::<bool>(),
        wgmma_blocks in prop_oneof![Just(None), (1usize..4).prop_map(Some)], fused_down in any::<bool>(), fused_v in any::<bool>(),
        nf4_gemv in any::<bool>(),
    ) {
        for dev in backends() {
            for path in paths(&dev) {
                let nf4_decode = if scratch { Nf4Decode::Scratch } else { Nf4Decode::InTile };
                let c = Case { rslora, dropout, bias, nf4, nf4_decode, nf4_gemv, tile_loads, path: Some(path), k_splits, narrow_stagger, wide_down, wgmma_blocks, fused_down, fused_v, ..Case::new(seed, m, d_in, d_out, rank) };
                assert_pass(check::forward_and_backward::<bf16>(&dev, c));
                assert_pass(check::forward_and_backward::<f16>(&dev, c));
            }
        }
    }
}

/// The largest rank a layer takes (two full 128-wide tiles of rank) and one short of it,
/// with dropout and bias, dense and NF4 bases, on every path the device has.
#[test]
fn the_largest_rank() {
    for dev in backends() {
        for (rank, nf4) in [
            (LoraConfig::MAX_RANK, false),
            (LoraConfig::MAX_RANK - 1, true),
        ] {
            for path in paths(&dev) {
                let c = Case {
                    rslora: true,
                    dropout: 0.2,
                    bias: true,
                    nf4,
                    nf4_gemv: false, // the paths' own kernels (the GEMV's test has rank 256)
                    path: Some(path),
                    ..Case::new(rand::random(), 37, 72, 40, rank)
                };
                assert_pass(check::forward_and_backward::<bf16>(&dev, c));
                assert!(check::merge::<f16>(&dev, c).unwrap().pass());
            }
        }
    }
}

/// Aligned widths (the cp.async paths), ranks past one tile, several row splits, and u and
/// v split over K (the default below 512 of K is one split), with and without the rank-wide
/// GEMMs' staggered starts (several steps per block, so that the walks wrap around), and u
/// from lora_down_k64 (whole, split and partial steps of 64).
#[test]
fn aligned_shapes_large_ranks_and_many_splits() {
    let shapes = [(130, 256, 64, 16), (600, 64, 128, 136), (1100, 32, 48, 8)];
    let variants = [
        (0.0, false, None, false, false),
        (0.2, true, Some(3), true, true),
        (0.0, true, None, true, false),
        (0.3, false, Some(2), false, true),
    ];
    let cases = shapes
        .iter()
        .flat_map(|s| variants.iter().map(move |v| (s, v)));
    for (i, (&(m, d_in, d_out, rank), &(dropout, nf4, k_splits, narrow_stagger, wide_down))) in
        cases.enumerate()
    {
        for dev in backends_in_turn(i) {
            for path in paths(&dev) {
                let c = Case {
                    dropout,
                    bias: true,
                    nf4,
                    path: Some(path),
                    k_splits,
                    narrow_stagger,
                    wide_down,
                    ..Case::new(rand::random(), m, d_in, d_out, rank)
                };
                assert_pass(check::forward_and_backward::<bf16>(&dev, c));
            }
        }
    }
}

/// The wgmma path's forward and dX past their pipeline's depth (K steps of 64 that reuse
/// every stage several times), with partial row and column tiles, through TMA (rows a
/// multiple of 8 elements: the operands of the first, third and fourth shapes but dY of
/// width 300), TMA with B shared by clusters of two (the fifth shape, every operand TMA's:
/// three row tiles in the forward, so its last pair has a block past the rows, and two
/// column tiles in dX; over NF4, dX only, and without dropout: dX's two segments in one run),
/// cp.async (the third shape again, with TMA off) and plain loads (odd widths and ranks);
/// over an NF4 base, both its decoders (runs of 16 when `in` is a multiple of 16, any shape
/// otherwise). Most shapes on fewer blocks than tiles (the last column: each block walks
/// several tiles, the next one's loads in flight while it stores the last; with dropout, dX
/// without its low-rank term, which `lora_dx_fixup` adds), a cluster too.
#[test]
fn wgmma_path_over_many_stages() {
    use TileLoads::{CpAsync, Tma, TmaMulticast};
    let cases = [
        (140, 1000, 300, 16, 0.1, true, false, Tma, Some(1)),
        (131, 777, 263, 13, 0.0, false, false, Tma, Some(2)),
        (5, 2048, 256, 64, 0.0, true, false, Tma, None),
        (5, 2048, 256, 64, 0.0, true, false, CpAsync, None),
        (300, 136, 1104, 8, 0.2, false, false, TmaMulticast, Some(2)),
        (140, 1008, 300, 16, 0.1, true, true, Tma, Some(3)),
        (131, 777, 263, 13, 0.0, false, true, Tma, Some(1)),
        (5, 2048, 256, 64, 0.0, true, true, CpAsync, None),
        (300, 144, 1104, 8, 0.0, false, true, TmaMulticast, Some(4)),
    ];
    for (i, (m, d_in, d_out, rank, dropout, bias, nf4, tile_loads, blocks)) in
        cases.into_iter().enumerate()
    {
        for dev in backends_in_turn(i).into_iter().filter(|d| d.has_wgmma()) {
            let c = Case {
                dropout,
                bias,
                nf4,
                nf4_gemv: false, // the wgmma GEMM at 5 rows too
                tile_loads,
                path: Some(LoraPath::FusedWgmma),
                wgmma_blocks: blocks,
                ..Case::new(rand::random(), m, d_in, d_out, rank)
            };
            assert_pass(check::forward::<bf16>(&dev, c));
            assert_pass(check::forward::<f16>(&dev, c));
            assert_pass(check::backward::<bf16>(&dev, c));
        }
    }
}

/// TMA, TMA multicast to clusters of two and cp.async bring the same tiles: the wgmma path's
/// outputs agree bit for bit with each (the same wgmmas in the same order over the same
/// values), at a shape whose every operand TMA loads, with partial tiles in every direction
/// (dX's five column tiles make three pairs, the last with a block past the columns), and
/// with two blocks walking all the tiles (one cluster, multicast) as with a block per tile. On
/// a GPU this is what shows that the tensor maps and the clusters mean to the driver what they
/// mean to the emulator.
#[test]
fn tma_multicast_and_cp_async_load_the_same_tiles() {
    for dev in backends().into_iter().filter(|d| d.has_wgmma()) {
        let mut rng = StdRng::seed_from_u64(rand::random());
        let (m, d_in, d_out, rank) = (136, 584, 264, 24);
        let config = LoraConfig {
            rank,
            alpha: 16.0,
            use_rslora: false,
            dropout: 0.1,
            seed: rand::random(),
        };
        let w = dev
            .upload(&random_vec::<bf16>(&mut rng, d_out * d_in, 0.1))
            .unwrap();
        let a = random_vec::<bf16>(&mut rng, rank * d_in, 0.1);
        let b = random_vec::<bf16>(&mut rng, d_out * rank, 0.1);
        let x = dev
            .upload(&random_vec::<bf16>(&mut rng, m * d_in, 1.0))
            .unwrap();
        let dy = dev
            .upload(&random_vec::<bf16>(&mut rng, m * d_out, 1.0))
            .unwrap();
        let layer = LoraLinear::new(
            LoraBase::Dense(w),
            None,
            dev.upload(&a).unwrap(),
            dev.upload(&b).unwrap(),
            config,
        )
        .unwrap()
        .with_path(LoraPath::FusedWgmma)
        .unwrap();
        let run = |layer: &LoraLinear<bf16>| {
            let (y, saved) = layer.forward(&x, m).unwrap();
            let dx = layer.backward(&x, &saved, &dy).unwrap().dx;
            (y.to_host().unwrap(), dx.to_host().unwrap())
        };
        let layer = layer.with_tile_loads(TileLoads::Tma);
        let (y_tma, dx_tma) = run(&layer);
        let layer = layer.with_tile_loads(TileLoads::TmaMulticast);
        let (y_mc, dx_mc) = run(&layer);
        let layer = layer.with_wgmma_blocks(Some(2)).unwrap();
        let (y_mc2, dx_mc2) = run(&layer);
        let layer = layer.with_tile_loads(TileLoads::Tma);
        let (y_tma2, dx_tma2) = run(&layer);
        let layer = layer.with_wgmma_blocks(None).unwrap();
        let (y_cp, dx_cp) = run(&layer.with_tile_loads(TileLoads::CpAsync));
        let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&y_tma), bits(&y_cp), "forward on {dev:?}");
        assert_eq!(bits(&dx_tma), bits(&dx_cp), "dX on {dev:?}");
        assert_eq!(bits(&y_mc), bits(&y_cp), "forward, multicast, on {dev:?}");
        assert_eq!(bits(&dx_mc), bits(&dx_cp), "dX, multicast, on {dev:?}");
        assert_eq!(bits(&y_tma2), bits(&y_cp), "forward, 2 blocks, on {dev:?}");
        assert_eq!(bits(&dx_tma2), bits(&dx_cp), "dX, 2 blocks, on {dev:?}");
        assert_eq!(
            bits(&y_mc2),
            bits(&y_cp),
            "forward, multicast, 2 blocks, on {dev:?}"
        );
        assert_eq!(
            bits(&dx_mc2),
            bits(&dx_cp),
            "dX, multicast, 2 blocks, on {dev:?}"
        );
        assert!(y_tma.iter().all(|v| v.to_f32().is_finite()));
    }
}

/// The wgmma forward with its blocks walking runs of column tiles (`with_column_runs`)
/// computes what the window order does, bit for bit, and passes the reference: 2 and 3 row
/// tiles by 5 column tiles (the last partial) on one block (two runs of 5 in turn), on 4 and
/// 7 blocks (runs of 3 and 2; one block idle), in clusters of two sharing B, and over an NF4
/// base decoded in the tiles; after lora_down, and with u made in the GEMM (`fused_down`:
/// once a run, kept in registers across its tiles, against once a tile in the window order);
/// in the longest runs and in runs of at most 2 (then 3 runs a row, dealt to the blocks in
/// turn, the last a single tile). (The proptest does not draw it: its outputs are one column
/// tile wide, where every run is a single tile and the order cannot differ.)
#[test]
fn column_runs_compute_the_window_orders_forward() {
    use TileLoads::{CpAsync, Tma, TmaMulticast};
    let cases = [
        (200, false, Tma, Some(1)),
        (200, false, CpAsync, Some(4)),
        (300, false, Tma, Some(7)),
        (300, false, TmaMulticast, Some(4)),
        (300, true, Tma, Some(4)),
    ];
    for (i, (m, nf4, tile_loads, blocks)) in cases.into_iter().enumerate() {
        for dev in backends_in_turn(i).into_iter().filter(|d| d.has_wgmma()) {
            for fused_down in [true, false] {
                let c = Case {
                    bias: true,
                    nf4,
                    tile_loads,
                    path: Some(LoraPath::FusedWgmma),
                    wgmma_blocks: blocks,
                    column_runs: ColumnRuns::Longest,
                    fused_down,
                    ..Case::new(rand::random(), m, 72, 1100, 9)
                };
                assert_pass(check::forward::<bf16>(&dev, c));
                let (window, x) = wgmma_layer(
                    &dev,
                    &Case {
                        column_runs: ColumnRuns::Off,
                        ..c
                    },
                );
                let y = |layer: &LoraLinear<bf16>| {
                    let y = layer.forward(&x, m).unwrap().0.to_host().unwrap();
                    y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                let in_order = y(&window);
                let mut layer = window;
                for runs in [ColumnRuns::Longest, ColumnRuns::AtMost(2)] {
                    layer = layer.with_column_runs(runs);
                    assert_eq!(
                        y(&layer),
                        in_order,
                        "{m} rows, nf4 {nf4}, {tile_loads:?}, {blocks:?} blocks, \
                         fused down {fused_down}, {runs:?}, on {dev:?}"
                    );
                }
            }
        }
    }
}

/// A layer at `c`'s shape from `c.seed` (dense or NF4 base, a bias where `c.bias`), on the wgmma
/// path with `c`'s tile loads and blocks, and an input x.
fn wgmma_layer(
    dev: &finetune_kernels::Device,
    c: &Case,
) -> (LoraLinear<bf16>, finetune_kernels::Buffer<bf16>) {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let w = dev
        .upload(&random_vec::<bf16>(&mut rng, c.d_out * c.d_in, 0.1))
        .unwrap();
    let base = if c.nf4 {
        LoraBase::Nf4(Box::new(
            finetune_kernels::nf4::Nf4Weight::quantize(&w, c.d_out, c.d_in, 64, true).unwrap(),
        ))
    } else {
        LoraBase::Dense(w)
    };
    let upload =
        |rng: &mut StdRng, n, scale| dev.upload(&random_vec::<bf16>(rng, n, scale)).unwrap();
    let bias = c.bias.then(|| upload(&mut rng, c.d_out, 1.0));
    let a = upload(&mut rng, c.rank * c.d_in, 0.1);
    let b = upload(&mut rng, c.d_out * c.rank, 0.1);
    let mut config = LoraConfig::new(c.rank, 16.0);
    config.dropout = c.dropout;
    let layer = LoraLinear::new(base, bias, a, b, config)
        .unwrap()
        .with_path(LoraPath::FusedWgmma)
        .unwrap()
        .with_nf4_decode(Nf4Decode::InTile)
        .with_tile_loads(c.tile_loads)
        .with_wgmma_blocks(c.wgmma_blocks)
        .unwrap()
        .with_column_runs(c.column_runs)
        .with_fused_down(c.fused_down)
        .with_fused_v(c.fused_v);
    let x = upload(&mut rng, c.m * c.d_in, 1.0);
    (layer, x)
}

/// The launches the side-product tests (u in the forward's GEMM, v in dX's) run each shape
/// under, all to the same bits: tile loads, most blocks, column runs.
const SIDE_PRODUCT_RUNS: [(TileLoads, Option<usize>, ColumnRuns); 4] = [
    (TileLoads::Tma, Some(1), ColumnRuns::Off),
    (TileLoads::TmaMulticast, Some(2), ColumnRuns::Longest),
    (TileLoads::CpAsync, Some(3), ColumnRuns::AtMost(2)),
    (TileLoads::Tma, None, ColumnRuns::Off),
];

/// The wgmma forward that makes u inside its GEMM (`LoraLinear::fused_down`: x's tiles times
/// A's rows beside W's, `wgmma` N = 16 or 32, then scale·u from those registers times B)
/// passes the reference, forward and (once a shape) backward, which takes the u it saved, at
/// ranks 1, 9, 16 (N = 16), 17 and 32 (N = 32), dense and NF4 bases decoded in the tiles,
/// with partial row, column and K tiles, on one block (every tile in turn: u kept across a
/// row's tiles, zeroed between rows), several, and a block per tile, through TMA, TMA
/// multicast to pairs and cp.async (A's side tile by TMA or cp.async too), in the window
/// order and in column runs. Its y and u are the same bits whichever way the tiles come (the
/// same wgmmas in the same order), and within rounding of lora_down + the GEMM's. Where it
/// does not apply (dropout, rank 33, turned off) the layer says so and runs lora_down.
#[test]
fn fused_down_makes_u_in_the_forward_gemm() {
    let cases = [
        (200, 200, 300, 1, false, true),
        (131, 777, 263, 16, true, false),
        (200, 136, 520, 17, false, true),
        (70, 328, 264, 32, true, true),
        (300, 72, 300, 9, false, false),
    ];
    for (i, (m, d_in, d_out, rank, nf4, bias)) in cases.into_iter().enumerate() {
        for dev in backends_in_turn(i).into_iter().filter(|d| d.has_wgmma()) {
            let mut bits: Option<(Vec<u16>, Vec<u16>)> = None;
            for (tile_loads, blocks, column_runs) in SIDE_PRODUCT_RUNS {
                let c = Case {
                    bias,
                    nf4,
                    tile_loads,
                    path: Some(LoraPath::FusedWgmma),
                    wgmma_blocks: blocks,
                    column_runs,
                    ..Case::new(rand::random(), m, d_in, d_out, rank)
                };
                for row in check::forward::<bf16>(&dev, c).unwrap() {
                    assert!(
                        row.kernel.contains("down"),
                        "{row}: not the fused-down kernel"
                    );
                    assert!(row.pass(), "{row}");
                }
                if bits.is_none() {
                    // Backward takes the u forward saved: once a shape (the bits agree below).
                    assert_pass(check::backward::<bf16>(&dev, c));
                }
                // The same layer and x whatever the tile loads: the seed is fixed for the shape.
                let c = Case {
                    seed: (m * 7 + rank) as u64,
                    ..c
                };
                let (layer, x) = wgmma_layer(&dev, &c);
                assert_eq!(layer.fused_down(), Some(if rank <= 16 { 16 } else { 32 }));
                let (y, saved) = layer.forward(&x, m).unwrap();
                let to_bits = |v: Vec<bf16>| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                let got = (
                    to_bits(y.to_host().unwrap()),
                    to_bits(saved.u.to_host().unwrap()),
                );
                let what = format!(
                    "{m}x{d_in}→{d_out} r{rank} nf4 {nf4}, {tile_loads:?}, {blocks:?} blocks, \
                     on {dev:?}"
                );
                match &bits {
                    None => {
                        // Against lora_down + the GEMM: the same values up to rounding.
                        let separate = layer.with_fused_down(false);
                        assert_eq!(separate.fused_down(), None);
                        let (y2, saved2) = separate.forward(&x, m).unwrap();
                        let f = |v: &[u16]| {
                            v.iter()
                                .map(|&b| bf16::from_bits(b).to_f32())
                                .collect::<Vec<_>>()
                        };
                        let (y2, u2) = (y2.to_host().unwrap(), saved2.u.to_host().unwrap());
                        let y_err = rel_l2(&f(&got.0), &y2);
                        let u_err = rel_l2(&f(&got.1), &u2);
                        assert!(
                            y_err < 1e-2 && u_err < 1e-2,
                            "{what}: y {y_err:e}, u {u_err:e} from lora_down's"
                        );
                        bits = Some(got);
                    }
                    Some(first) => assert!(
                        first == &got,
                        "{what}: y or u differs from the first loads' bits"
                    ),
                }
            }
        }
    }
    for dev in backends().into_iter().filter(|d| d.has_wgmma()) {
        // Where u cannot come from the GEMM, the layer says so, and runs lora_down.
        for (rank, dropout) in [(33, 0.0), (16, 0.1)] {
            let c = Case {
                dropout,
                path: Some(LoraPath::FusedWgmma),
                ..Case::new(rand::random(), 40, 72, 40, rank)
            };
            assert_eq!(
                wgmma_layer(&dev, &c).0.fused_down(),
                None,
                "rank {rank}, p {dropout}"
            );
            for row in check::forward::<bf16>(&dev, c).unwrap() {
                assert!(
                    !row.kernel.contains("down16") && !row.kernel.contains("down32"),
                    "{row}"
                );
                assert!(row.pass(), "{row}");
            }
        }
    }
}

/// The wgmma backward that makes v inside its dX GEMM (`LoraLinear::fused_v`: dX = dY W +
/// scale·v A in dX's own layout, W and A as wgmma's MN-major B, v = scale·dY B from dY's tiles
/// beside it): ranks 1 to 32 over dense and NF4 bases, with and without dropout (then
/// lora_dx_fixup adds the masked term from the v the kernel wrote), partial row, column and K
/// tiles (one column tile: every step makes a dB partial), TMA, multicast and cp.async loads,
/// 1, 2 and 3 blocks, a block per SM, and column runs (v made once a run). Each against the
/// reference (dX; dB and dbias from the partials it made beside them, `LoraLinear::fused_db`;
/// dA from the partials it made from the tiles of x it brings after each tile's sweep, their
/// dropped elements zeroed there under dropout, rows of x whole groups of 4 or not,
/// `LoraLinear::fused_da`); dX and the gradients
/// bit-equal across the loads, block counts and orders; dB and dbias within rounding of
/// lora_grad_b's, dA of lora_grad_a's, dX and dA of lora_backward_v + the dXᵀ kernel's.
#[test]
fn fused_v_makes_v_in_the_dx_gemm() {
    let cases = [
        (200, 300, 200, 1, false, 0.0),
        (131, 263, 777, 16, true, 0.0),
        (200, 520, 136, 17, false, 0.1),
        // Rows of x not whole groups of 4: the mask of dA's steps drawn run by run.
        (200, 263, 136, 9, false, 0.1),
        (70, 264, 328, 32, true, 0.05),
        (300, 300, 72, 9, false, 0.0),
        // One column tile: every step of dY makes a dB partial, the warpgroups in turn.
        (150, 200, 300, 8, false, 0.0),
    ];
    for (i, (m, d_in, d_out, rank, nf4, dropout)) in cases.into_iter().enumerate() {
        for dev in backends_in_turn(i).into_iter().filter(|d| d.has_wgmma()) {
            let mut bits: Option<Vec<Vec<u32>>> = None;
            for (tile_loads, blocks, column_runs) in SIDE_PRODUCT_RUNS {
                let c = Case {
                    nf4,
                    dropout,
                    bias: true,
                    tile_loads,
                    path: Some(LoraPath::FusedWgmma),
                    wgmma_blocks: blocks,
                    column_runs,
                    ..Case::new(rand::random(), m, d_in, d_out, rank)
                };
                let rows = check::backward::<bf16>(&dev, c).unwrap();
                assert!(
                    rows[0].kernel.contains("dx_v"),
                    "{}: not the fused-v kernel",
                    rows[0]
                );
                for row in rows {
                    assert!(row.pass(), "{row}");
                }
                // The same layer, x and dY whatever the loads: the seed is fixed for the shape.
                let c = Case {
                    seed: (m * 7 + rank) as u64,
                    ..c
                };
                let (layer, x) = wgmma_layer(&dev, &c);
                assert_eq!(layer.fused_v(), Some(if rank <= 16 { 16 } else { 32 }));
                assert!(layer.fused_db());
                assert!(layer.fused_da());
                let dy = dev
                    .upload(&random_vec::<bf16>(
                        &mut StdRng::seed_from_u64(c.seed),
                        m * d_out,
                        1.0,
                    ))
                    .unwrap();
                let grads = |layer: &LoraLinear<bf16>| {
                    let (_, saved) = layer.forward(&x, m).unwrap();
                    let g = layer.backward(&x, &saved, &dy).unwrap();
                    let dx = g.dx.to_host().unwrap();
                    let (da, db) = (g.da.to_host().unwrap(), g.db.to_host().unwrap());
                    let dbias = g.dbias.unwrap().to_host().unwrap();
                    (dx, da, db, dbias)
                };
                let (dx, da, db, dbias) = grads(&layer);
                let got = vec![
                    dx.iter().map(|v| u32::from(v.to_bits())).collect(),
                    da.iter().map(|v| v.to_bits()).collect(),
                    db.iter().map(|v| v.to_bits()).collect(),
                    dbias.iter().map(|v| v.to_bits()).collect(),
                ];
                let what = format!(
                    "{m}x{d_in}→{d_out} r{rank} nf4 {nf4} p {dropout}, {tile_loads:?}, \
                     {blocks:?} blocks, column runs {column_runs:?}, on {dev:?}"
                );
                match &bits {
                    None => {
                        // dB and dbias by lora_grad_b instead: the same up to rounding.
                        let layer = layer.with_fused_db(false);
                        assert!(!layer.fused_db());
                        let (_, _, db2, dbias2) = grads(&layer);
                        let db_err = rel_l2(&db, &db2);
                        let dbias_err = rel_l2(&dbias, &dbias2);
                        assert!(
                            db_err < 1e-5 && dbias_err < 1e-5,
                            "{what}: dB {db_err:e}, dbias {dbias_err:e} from lora_grad_b's"
                        );
                        // dA by lora_grad_a from the v the kernel wrote: the same up to rounding.
                        let layer = layer.with_fused_db(true).with_fused_da(false);
                        assert!(layer.fused_db() && !layer.fused_da());
                        let (dx3, da3, _, _) = grads(&layer);
                        assert!(dx3 == dx, "{what}: dX changed with lora_grad_a");
                        let da_err = rel_l2(&da, &da3);
                        assert!(da_err < 1e-5, "{what}: dA {da_err:e} from lora_grad_a's");
                        // Against lora_backward_v + the dXᵀ kernel: the same up to rounding.
                        let separate = layer.with_fused_v(false).with_fused_da(true);
                        assert_eq!(separate.fused_v(), None);
                        assert!(!separate.fused_db() && !separate.fused_da());
                        let (dx2, da2, _, _) = grads(&separate);
                        let dx_err = rel_l2(&dx, &dx2);
                        let da_err = rel_l2(&da, &da2);
                        assert!(
                            dx_err < 1e-2 && da_err < 1e-2,
                            "{what}: dX {dx_err:e}, dA {da_err:e} from lora_backward_v's"
                        );
                        bits = Some(got);
                    }
                    Some(first) => assert!(
                        first == &got,
                        "{what}: dX or a gradient differs from the first loads' bits"
                    ),
                }
            }
        }
    }
    for dev in backends().into_iter().filter(|d| d.has_wgmma()) {
        // Where v cannot come from the GEMM, the layer says so, and runs lora_backward_v.
        let c = Case {
            path: Some(LoraPath::FusedWgmma),
            ..Case::new(rand::random(), 40, 72, 40, 33)
        };
        assert_eq!(wgmma_layer(&dev, &c).0.fused_v(), None);
        for row in check::backward::<bf16>(&dev, c).unwrap() {
            assert!(!row.kernel.contains("dx_v"), "{row}");
            assert!(row.pass(), "{row}");
        }
    }
}

/// An NF4 base through a scratch weight on the fused paths (the dense-base kernels over the
/// dequantized Ŵ), several K steps each way.
#[test]
fn nf4_through_a_scratch_weight() {
    for dev in backends() {
        for path in paths(&dev) {
            let c = Case {
                dropout: 0.1,
                bias: true,
                nf4: true,
                nf4_decode: Nf4Decode::Scratch,
                path: Some(path),
                ..Case::new(rand::random(), 70, 320, 200, 8)
            };
            assert_pass(check::forward::<bf16>(&dev, c));
            assert_pass(check::backward::<f16>(&dev, c));
        }
    }
}

#[test]
fn merge_matches_the_reference() {
    for dev in backends() {
        // An odd width (rows of pairs not 4-byte aligned: element by element) and an even one
        // (a pair a word).
        for d_in in [77, 64] {
            let c = Case {
                rslora: true,
                ..Case::new(rand::random(), 1, d_in, 133, 9)
            };
            for path in paths(&dev) {
                let c = Case {
                    path: Some(path),
                    ..c
                };
                assert!(check::merge::<bf16>(&dev, c).unwrap().pass());
                assert!(check::merge::<f16>(&dev, c).unwrap().pass());
            }
        }
    }
}

/// The NF4 merge against the reference chain: dequantize, `W + scale · B A` in f64,
/// quantize again. The merged weights agree but where the kernel's f32 merge and the f64
/// one round to different neighbours, which can move an element across a code boundary:
/// a handful of codes at most.
#[test]
fn merge_into_nf4_matches_the_reference_requantization() {
    for dev in backends() {
        let mut rng = StdRng::seed_from_u64(rand::random());
        let (d_out, d_in, rank, blocksize) = (64, 130, 4, 64);
        let w = dev
            .upload(&random_vec::<bf16>(&mut rng, d_out * d_in, 0.05))
            .unwrap();
        let q =
            finetune_kernels::nf4::Nf4Weight::quantize(&w, d_out, d_in, blocksize, true).unwrap();
        let config = LoraConfig {
            rank,
            alpha: 8.0,
            use_rslora: false,
            dropout: 0.0,
            seed: 1,
        };
        let a_host = random_vec::<bf16>(&mut rng, rank * d_in, 0.1);
        let b_host = random_vec::<bf16>(&mut rng, d_out * rank, 0.1);
        let w_host: Vec<bf16> = q.to_host().unwrap().dequantize();
        let expected_merged = reference::LoraLayer {
            w: &w_host,
            bias: None::<&[bf16]>,
            a: &a_host,
            b: &b_host,
            d_in,
            d_out,
            config,
        }
        .merged()
        .unwrap();
        let expected =
            nf4_reference::quantize(&expected_merged, &[d_out, d_in], blocksize, true).unwrap();
        let expected_back: Vec<f32> = expected.dequantize();

        let layer = LoraLinear::new(
            LoraBase::Nf4(Box::new(q)),
            None,
            dev.upload(&a_host).unwrap(),
            dev.upload(&b_host).unwrap(),
            config,
        )
        .unwrap();
        let (merged, error) = layer.merged_nf4().unwrap();
        let got = merged.to_host().unwrap();
        assert_eq!((merged.rows(), merged.cols()), (d_out, d_in));
        let codes_off = (0..d_out * d_in)
            .filter(|&i| got.code(i) != expected.code(i))
            .count();
        assert!(
            codes_off <= 8,
            "{codes_off} of {} codes differ",
            d_out * d_in
        );
        assert!(
            rel_l2(&got.dequantize::<f32>(), &expected_back) < 0.01,
            "merged NF4 weight differs from the reference's"
        );
        // The reported error is the requantization's own: NF4 keeps 2-3 significant bits.
        let want = rel_l2(&expected_back, &expected_merged);
        assert!(
            (error - want).abs() <= 0.05 * want && want > 0.01,
            "requantization error {error}, reference {want}"
        );
    }
}

/// An NF4 base's forward of up to `nf4::GEMV_MAX_ROWS` rows, on every path, takes the NF4
/// GEMV with the bias and `u Bᵀ` in its epilogue: within the reference's bound (forward and
/// the backward after it), and bit for bit what `nf4::gemv_with_epilogue` gives over the `u`
/// the forward saved (no other path's kernels give those bits). Odd widths (the GEMV's scalar
/// path), aligned ones (steps of 64), ranks with rows of u and B 16-byte aligned or not,
/// the largest rank, dropout (u masked, the base not).
#[test]
fn nf4_forward_of_a_few_rows_takes_the_gemv() {
    let cases = [
        (1, 131, 45, 7, 0.0, true, false),
        (5, 256, 72, 16, 0.2, false, true),
        (
            nf4::GEMV_MAX_ROWS,
            64,
            33,
            LoraConfig::MAX_RANK,
            0.0,
            true,
            true,
        ),
        (17, 96, 129, 32, 0.1, true, false),
    ];
    for (i, &(m, d_in, d_out, rank, dropout, bias, rslora)) in cases.iter().enumerate() {
        for dev in backends_in_turn(i) {
            for path in paths(&dev) {
                let c = Case {
                    dropout,
                    bias,
                    rslora,
                    nf4: true,
                    path: Some(path),
                    ..Case::new(rand::random(), m, d_in, d_out, rank)
                };
                assert_pass(check::forward_and_backward::<bf16>(&dev, c));
                assert_pass(check::forward::<f16>(&dev, c));

                let mut rng = StdRng::seed_from_u64(c.seed);
                let w: Vec<bf16> = random_vec(&mut rng, d_out * d_in, 0.05);
                let q = nf4_reference::quantize(&w, &[d_out, d_in], 64, true).unwrap();
                let upload = |v: &[bf16]| dev.upload(v).unwrap();
                let bias = bias.then(|| upload(&random_vec(&mut rng, d_out, 0.5)));
                let a = upload(&random_vec(&mut rng, rank * d_in, 0.1));
                let b = upload(&random_vec(&mut rng, d_out * rank, 0.1));
                let x = upload(&random_vec(&mut rng, m * d_in, 1.0));
                let config = LoraConfig {
                    rank,
                    alpha: 8.0,
                    use_rslora: rslora,
                    dropout,
                    seed: rng.random(),
                };
                let base = LoraBase::Nf4(Box::new(Nf4Weight::upload(&dev, &q).unwrap()));
                let bias_again = bias.as_ref().map(|v| upload(&v.to_host().unwrap()));
                let layer = LoraLinear::new(base, bias, a, b, config)
                    .and_then(|l| l.with_path(path))
                    .unwrap();
                assert!(layer.forward_on_nf4_gemv(m), "{path:?}");
                let (y, saved) = layer.forward(&x, m).unwrap();
                let mut want = dev.alloc_poisoned::<bf16>(m * d_out).unwrap();
                let epilogue = nf4::GemvEpilogue {
                    bias: bias_again.as_ref(),
                    low_rank: Some((&saved.u, &layer.b, rank)),
                };
                let q = Nf4Weight::upload(&dev, &q).unwrap();
                nf4::gemv_with_epilogue(&q, &x, m, &mut want, MatmulPath::GemvMma, epilogue)
                    .unwrap();
                let bits = |v: &finetune_kernels::Buffer<bf16>| {
                    v.to_host()
                        .unwrap()
                        .iter()
                        .map(|x| x.to_bits())
                        .collect::<Vec<_>>()
                };
                assert_eq!(bits(&y), bits(&want), "{path:?} m {m} r {rank}");
            }
        }
    }
}

/// Backward regenerates the mask from the seed forward saved, not the layer's current one
/// (a trainer reseeds after every forward); and no tokens give empty outputs and zero
/// gradients.
#[test]
fn backward_uses_the_saved_seed_and_empty_batches_work() {
    for dev in backends() {
        for path in paths(&dev) {
            let mut rng = StdRng::seed_from_u64(rand::random());
            let (m, d_in, d_out, rank) = (45, 52, 37, 6);
            let config = LoraConfig {
                rank,
                alpha: 16.0,
                use_rslora: false,
                dropout: 0.3,
                seed: rand::random(),
            };
            let w: Vec<bf16> = random_vec(&mut rng, d_out * d_in, 0.1);
            let a: Vec<bf16> = random_vec(&mut rng, rank * d_in, 0.1);
            let b: Vec<bf16> = random_vec(&mut rng, d_out * rank, 0.1);
            let layer = || {
                LoraLinear::new(
                    LoraBase::Dense(dev.upload(&w).unwrap()),
                    None,
                    dev.upload(&a).unwrap(),
                    dev.upload(&b).unwrap(),
                    config,
                )
                .and_then(|l| l.with_path(path))
                .unwrap()
            };
            let x = dev
                .upload(&random_vec::<bf16>(&mut rng, m * d_in, 1.0))
                .unwrap();
            let dy = dev
                .upload(&random_vec::<bf16>(&mut rng, m * d_out, 1.0))
                .unwrap();
            let (fixed, mut reseeded) = (layer(), layer());
            let (_, saved) = fixed.forward(&x, m).unwrap();
            let want = fixed.backward(&x, &saved, &dy).unwrap();
            let (_, saved) = reseeded.forward(&x, m).unwrap();
            // All the device memory kept for backward: u, [m, rank] bf16.
            assert_eq!(saved.device_bytes(), m * rank * 2, "{path:?}");
            reseeded.set_seed(config.seed ^ 0x5EED);
            let got = reseeded.backward(&x, &saved, &dy).unwrap();
            assert_eq!(
                got.dx.to_host().unwrap(),
                want.dx.to_host().unwrap(),
                "{path:?}"
            );
            assert_eq!(
                got.da.to_host().unwrap(),
                want.da.to_host().unwrap(),
                "{path:?}"
            );

            let none = dev.upload::<bf16>(&[]).unwrap();
            let (y, saved) = fixed.forward(&none, 0).unwrap();
            assert_eq!((y.len(), saved.u.len(), saved.device_bytes()), (0, 0, 0));
            let g = fixed.backward(&none, &saved, &none).unwrap();
            assert_eq!(g.dx.len(), 0);
            assert!(g.da.to_host().unwrap().iter().all(|&v| v == 0.0));
            assert!(g.db.to_host().unwrap().iter().all(|&v| v == 0.0));
            assert_eq!((g.da.len(), g.db.len()), (rank * d_in, d_out * rank));
        }
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
        // Each bad config with A and B sized for its own rank, so only the config can fail.
        for bad in [
            LoraConfig { rank: 0, ..config },
            LoraConfig {
                rank: LoraConfig::MAX_RANK + 1,
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
                alpha: f64::NAN,
                ..config
            },
        ] {
            let r = bad.rank.max(1);
            let e = LoraLinear::new(LoraBase::Dense(w()), None, a(r * d_in), a(d_out * r), bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            let named = match &e {
                Error::Unsupported { why, .. } => why.contains("rank"),
                Error::InvalidArgument { what, .. } => {
                    what.contains("alpha") || what.contains("dropout")
                }
                _ => false,
            };
            assert!(named, "{bad:?}: {e}");
        }
        // Over a dense base (whose shape comes from A and B): an A or B that is not whole
        // rows of the rank is named; whole rows that disagree with the base name the base,
        // and where its shape came from.
        for (a_len, b_len, named) in [
            (rank * d_in - 1, d_out * rank, "lora A"),
            (rank * d_in, d_out * rank + 2, "lora B"),
            (rank * (d_in - 1), d_out * rank, "A's columns"),
        ] {
            let e = LoraLinear::new(LoraBase::Dense(w()), None, a(a_len), a(b_len), config)
                .err()
                .expect("A or B of another shape");
            assert!(
                matches!(&e, Error::ShapeMismatch { what, .. } if what.contains(named)),
                "{named}: {e}"
            );
        }
        // B of a rank other than A's, over an NF4 base (whose shape does not come from A and
        // B): the error names B. Then a bias of the wrong length.
        let q = finetune_kernels::nf4::Nf4Weight::quantize(&w(), d_out, d_in, 64, false).unwrap();
        let e = LoraLinear::new(
            LoraBase::Nf4(Box::new(q)),
            None,
            a(rank * d_in),
            a(d_out * (rank + 1)),
            config,
        )
        .err()
        .expect("a B of another rank");
        assert!(
            matches!(&e, Error::ShapeMismatch { what, .. } if what.contains("lora B")),
            "{e}"
        );
        // The wgmma path takes either base, on a device that runs wgmma only.
        let q = finetune_kernels::nf4::Nf4Weight::quantize(&w(), d_out, d_in, 64, false).unwrap();
        let nf4_layer = LoraLinear::new(
            LoraBase::Nf4(Box::new(q)),
            None,
            a(rank * d_in),
            a(d_out * rank),
            config,
        )
        .unwrap();
        match (
            dev.has_wgmma(),
            nf4_layer.with_path(LoraPath::FusedWgmma).map(|_| ()),
        ) {
            (true, Ok(())) => {}
            (false, Err(Error::Unsupported { why, .. })) => {
                assert!(why.contains("sm_90a"), "{why}")
            }
            (_, other) => panic!("an NF4 base on the wgmma path: {:?}", other.err()),
        }
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
        let layer = || {
            LoraLinear::new(
                LoraBase::Dense(w()),
                None,
                a(rank * d_in),
                a(d_out * rank),
                config,
            )
            .unwrap()
        };
        // K splits from 1 to MAX_K_SPLITS.
        for bad in [0, finetune_kernels::lora::MAX_K_SPLITS + 1] {
            let err = layer().with_k_splits(Some(bad)).map(|_| ()).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
        }
        // The extended path hands its GEMMs to cuBLAS: where it cannot, refused, saying why.
        match (
            dev.has_cublas(),
            layer().with_path(LoraPath::Extended).map(|_| ()),
        ) {
            (true, Ok(())) => {}
            (false, Err(Error::Unsupported { why, .. })) => {
                assert!(why.contains("GPU") || why.contains("cuBLAS"), "{why}")
            }
            (_, other) => panic!("the extended path: {:?}", other.err()),
        }
        // At least one block for the wgmma GEMMs.
        let err = layer().with_wgmma_blocks(Some(0)).map(|_| ()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    what: "wgmma_blocks",
                    ..
                }
            ),
            "{err}"
        );
        let (layer, other) = (layer(), layer());
        let x = dev
            .upload(&random_vec::<f16>(&mut rng, 4 * d_in, 1.0))
            .unwrap();
        assert!(matches!(
            layer.forward(&x, 5),
            Err(Error::ShapeMismatch { .. })
        ));
        // More rows than the kernels' u32 counts (refused before the buffer's length).
        assert!(matches!(
            layer.forward(&x, 1 << 32),
            Err(Error::Unsupported { .. })
        ));
        let (_, saved) = layer.forward(&x, 4).unwrap();
        let short_dy = dev
            .upload(&random_vec::<f16>(&mut rng, 4 * d_out - 1, 1.0))
            .unwrap();
        assert!(matches!(
            layer.backward(&x, &saved, &short_dy),
            Err(Error::ShapeMismatch { .. })
        ));
        // What another layer's forward saved, even of this shape: refused, and the layer's
        // own still taken.
        let dy = dev
            .upload(&random_vec::<f16>(&mut rng, 4 * d_out, 1.0))
            .unwrap();
        let err = other.backward(&x, &saved, &dy).err();
        assert!(
            matches!(err, Some(Error::InvalidArgument { what: "saved", .. })),
            "{err:?}"
        );
        layer.backward(&x, &saved, &dy).unwrap();
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

/// A layer's parts, and each call's buffers, on another device than A's (two emulators:
/// each its own device, as two GPUs are) are refused: B, the bias, a dense or NF4 base at
/// construction; x and dY per call; and an A swapped for one elsewhere after it (A and B
/// are public, for optimizers).
#[test]
fn buffers_on_another_device_are_refused() {
    let Some((one, two)) = emulators().pop().zip(emulators().pop()) else {
        return; // No emulator built: no second device to mix in.
    };
    let (d_out, d_in, rank, m) = (6, 10, 3, 4);
    let config = LoraConfig::new(rank, 8.0);
    let buf = |dev: &finetune_kernels::Device, n: usize| {
        dev.upload(&random_vec::<bf16>(
            &mut StdRng::seed_from_u64(n as u64),
            n,
            0.1,
        ))
        .unwrap()
    };
    let nf4 = |dev| {
        let q = finetune_kernels::nf4::Nf4Weight::quantize(
            &buf(dev, d_out * d_in),
            d_out,
            d_in,
            64,
            false,
        );
        LoraBase::Nf4(Box::new(q.unwrap()))
    };
    let dense = |dev| LoraBase::Dense(buf(dev, d_out * d_in));
    for (what, parts) in [
        ("B", (dense(&one), None, buf(&two, d_out * rank))),
        (
            "bias",
            (dense(&one), Some(buf(&two, d_out)), buf(&one, d_out * rank)),
        ),
        ("dense W", (dense(&two), None, buf(&one, d_out * rank))),
        ("NF4 W", (nf4(&two), None, buf(&one, d_out * rank))),
    ] {
        let (base, bias, b) = parts;
        let layer = LoraLinear::new(base, bias, buf(&one, rank * d_in), b, config);
        assert!(
            matches!(layer, Err(Error::DeviceMismatch)),
            "{what} elsewhere: {:?}",
            layer.err()
        );
    }
    let layer = || {
        LoraLinear::new(
            dense(&one),
            None,
            buf(&one, rank * d_in),
            buf(&one, d_out * rank),
            config,
        )
        .unwrap()
    };
    let (x, dy) = (buf(&one, m * d_in), buf(&one, m * d_out));
    let here = layer();
    assert!(matches!(
        here.forward(&buf(&two, m * d_in), m),
        Err(Error::DeviceMismatch)
    ));
    let (_, saved) = here.forward(&x, m).unwrap();
    let dy_there = buf(&two, m * d_out);
    assert!(matches!(
        here.backward(&x, &saved, &dy_there),
        Err(Error::DeviceMismatch)
    ));
    let mut swapped = layer();
    swapped.a = buf(&two, rank * d_in);
    assert!(matches!(swapped.forward(&x, m), Err(Error::DeviceMismatch)));
    assert!(matches!(swapped.merged(), Err(Error::DeviceMismatch)));
    here.backward(&x, &saved, &dy).unwrap();
}

/// The kernels of the extended path write exactly the layouts cuBLAS then reads
/// (cuda/params/lora.h): checked element by element on every backend, so the emulator covers
/// everything of that path but the cuBLAS calls themselves.
#[test]
fn extended_layouts_are_what_cublas_reads() {
    use finetune_kernels::device::{Kernel, LaunchConfig};
    use finetune_kernels::params::LoraParams;
    use finetune_kernels::reference::philox::dropout_mask;
    for dev in backends() {
        let mut rng = StdRng::seed_from_u64(rand::random());
        // d_in 41: rows that are not whole groups of four (the fixup's runs of four straddle
        // groups, m · d_in is not a multiple of 4, so its last group is partial, and dX's pairs
        // are not 4-byte aligned); 44: whole groups, one Philox call a run, paired accesses.
        for (m, d_in) in [(70usize, 41usize), (53, 44)] {
            let (d_out, rank, p_drop) = (24usize, 5usize, 0.25f32);
            // Unsplit, then split over K into more ranges than K has tiles (one is empty).
            let mut unsplit: Option<(Vec<bf16>, Vec<bf16>)> = None;
            // Rows padded to 64 elements, as the layer pads them.
            let ld = (d_in + rank + 1).div_ceil(64) * 64;
            let dy_ld = (d_out + rank).div_ceil(64) * 64;
            let x: Vec<bf16> = random_vec(&mut rng, m * d_in, 1.0);
            let dy: Vec<bf16> = random_vec(&mut rng, m * d_out, 1.0);
            let a: Vec<bf16> = random_vec(&mut rng, rank * d_in, 0.3);
            let b: Vec<bf16> = random_vec(&mut rng, d_out * rank, 0.3);
            let bias: Vec<bf16> = random_vec(&mut rng, d_out, 0.3);
            let dx0: Vec<bf16> = random_vec(&mut rng, m * d_in, 1.0);
            for k_splits in [1u32, 3] {
                let (xd, dyd, ad, bd, biasd) = (
                    dev.upload(&x).unwrap(),
                    dev.upload(&dy).unwrap(),
                    dev.upload(&a).unwrap(),
                    dev.upload(&b).unwrap(),
                    dev.upload(&bias).unwrap(),
                );
                let mut u = dev.alloc_poisoned::<bf16>(m * rank).unwrap();
                let mut v = dev.alloc_poisoned::<bf16>(m * rank).unwrap();
                let mut x_ext = dev.alloc_poisoned::<bf16>(m * ld).unwrap();
                let mut dy_ext = dev.alloc_poisoned::<bf16>(m * dy_ld).unwrap();
                let mut w_ext = dev.alloc_poisoned::<bf16>((d_out + rank) * ld).unwrap();
                let mut dx = dev.upload(&dx0).unwrap();
                let mut partials = dev
                    .alloc_poisoned::<f32>(k_splits as usize * m * rank)
                    .unwrap();
                let p = LoraParams {
                    m: m as u32,
                    d_in: d_in as u32,
                    d_out: d_out as u32,
                    rank: rank as u32,
                    w: w_ext.ptr_mut(),
                    bias: biasd.ptr(),
                    a: ad.ptr(),
                    b: bd.ptr(),
                    scale: 1.5,
                    dropout: p_drop,
                    seed: 99,
                    x: xd.ptr(),
                    u: u.ptr_mut(),
                    dy: dyd.ptr(),
                    v: v.ptr_mut(),
                    dx: dx.ptr_mut(),
                    w_ld: ld as u64,
                    x_ext: x_ext.ptr_mut(),
                    x_ld: ld as u64,
                    dy_ext: dy_ext.ptr_mut(),
                    dy_ld: dy_ld as u64,
                    rank_partials: partials.ptr_mut() as *mut f32,
                    k_splits,
                    ..LoraParams::default()
                };
                let k = |name: &str| Kernel {
                    module: "lora",
                    name: name.into(),
                };
                // SAFETY: every pointer above is sized for the shapes in p.
                unsafe {
                    dev.launch(
                        &k("lora_extend_weight_bf16"),
                        LaunchConfig::grid_stride(
                            (d_out * (ld - d_in) + rank * ld) as u64,
                            256,
                            1 << 16,
                        ),
                        &p,
                    )
                    .unwrap();
                    // Each reduce right after its GEMM: the two share the partials.
                    let rows = |width: usize| LaunchConfig::grid_stride((m * width) as u64, 256, 7);
                    let narrow = LaunchConfig::narrow(m, rank, k_splits);
                    dev.launch(&k("lora_down_bf16"), narrow, &p).unwrap();
                    if k_splits > 1 {
                        dev.launch(&k("lora_down_reduce_bf16"), rows(ld - d_in), &p)
                            .unwrap();
                    }
                    dev.launch(&k("lora_backward_v_bf16"), narrow, &p).unwrap();
                    if k_splits > 1 {
                        dev.launch(&k("lora_backward_v_reduce_bf16"), rows(dy_ld - d_out), &p)
                            .unwrap();
                    }
                    dev.launch(
                        &k("lora_dx_fixup_bf16"),
                        LaunchConfig::tiles(m, d_in, 1),
                        &p,
                    )
                    .unwrap();
                }
                let (u, v) = (u.to_host().unwrap(), v.to_host().unwrap());
                // Split or not, u and v differ by rounding only (the sums run in another order).
                let (u0, v0) = unsplit.get_or_insert_with(|| (u.clone(), v.clone()));
                for (name, got, want) in [("u", &u, &*u0), ("v", &v, &*v0)] {
                    for (i, (g, w)) in got.iter().zip(want).enumerate() {
                        let (g, w) = (g.to_f32(), w.to_f32());
                        assert!(
                            (g - w).abs() <= w.abs().max(1e-3) / 64.0,
                            "{name}[{i}] split {k_splits}: {g} vs unsplit {w}"
                        );
                    }
                }
                let (x_ext, dy_ext, w_ext) = (
                    x_ext.to_host().unwrap(),
                    dy_ext.to_host().unwrap(),
                    w_ext.to_host().unwrap(),
                );
                let bits = |z: bf16| z.to_bits();
                // Row `row` of an extended matrix: [base | low-rank part | 1 if `one` | 0...].
                let extended =
                    |base: &[bf16], width: usize, low: &[bf16], one: bool, row: usize, c: usize| {
                        if c < width {
                            base[row * width + c]
                        } else if c < width + rank {
                            low[row * rank + c - width]
                        } else {
                            bf16::from_f32(if one && c == width + rank { 1.0 } else { 0.0 })
                        }
                    };
                for row in 0..m {
                    for c in 0..ld {
                        let want = extended(&x, d_in, &u, true, row, c);
                        assert_eq!(bits(x_ext[row * ld + c]), bits(want), "x_ext[{row}][{c}]");
                    }
                    for c in 0..dy_ld {
                        let want = extended(&dy, d_out, &v, false, row, c);
                        assert_eq!(
                            bits(dy_ext[row * dy_ld + c]),
                            bits(want),
                            "dy_ext[{row}][{c}]"
                        );
                    }
                }
                for row in 0..d_out + rank {
                    for c in d_in.min(if row < d_out { d_in } else { 0 })..ld {
                        let want = if row < d_out {
                            if c < d_in + rank {
                                b[row * rank + c - d_in]
                            } else if c == d_in + rank {
                                bias[row]
                            } else {
                                bf16::ZERO
                            }
                        } else if c < d_in {
                            a[(row - d_out) * d_in + c]
                        } else {
                            bf16::ZERO
                        };
                        assert_eq!(bits(w_ext[row * ld + c]), bits(want), "w_ext[{row}][{c}]");
                    }
                }
                // dx_fixup: dx0 + keep ⊙ (v A) / (1 - p), against a host computation in f32: a
                // dropped element is dx0 exactly, a kept one within a rounding of bf16 (the tensor
                // cores sum v A in another order).
                let keep = dropout_mask(99, p_drop, m * d_in);
                let dx = dx.to_host().unwrap();
                for e in 0..m * d_in {
                    let (row, col) = (e / d_in, e % d_in);
                    let mut s = 0.0f32;
                    for j in 0..rank {
                        s = v[row * rank + j]
                            .to_f32()
                            .mul_add(a[j * d_in + col].to_f32(), s);
                    }
                    if keep[e] == 1 {
                        let want = dx0[e].to_f32() + s * (1.0 / (1.0 - p_drop));
                        let tol = want.abs() * 2f32.powi(-8) + 1e-6;
                        assert!(
                            (dx[e].to_f32() - want).abs() <= tol,
                            "dx[{e}]: {} vs {want}",
                            dx[e]
                        );
                    } else {
                        assert_eq!(bits(dx[e]), bits(dx0[e]), "dx[{e}] was dropped");
                    }
                }
            }
        }
    }
}
