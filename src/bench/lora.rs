//! LoRA benchmarks for the GPU check (DESIGN.md §8: 8192 tokens, 4096→4096, r=16, bf16; the
//! emulator's tests run them at [`Scale::SMALL`]):
//! forward and backward on each path, dense and NF4 bases, against cuBLAS's base GEMM and
//! dX GEMM alone in the same run (PEFT's layer is timed by scripts/torch_baselines.py).

use super::{time_cublas, Ceilings, GpuTimer, Row, Rows, Scale, Stats, REPS};
use crate::bf16;
use crate::check::lora::paths;
use crate::device::blas::WeightOp;
use crate::device::{Buffer, Device};
use crate::error::Result;
use crate::lora::{ColumnRuns, LoraBase, LoraConfig, LoraLinear, LoraPath, Nf4Decode, TileLoads};
use crate::nf4::Nf4Weight;
use crate::testing::random_vec;
use rand::{rngs::StdRng, SeedableRng};

/// The benchmarks' layer, `d_in`→`d_out` (rank [`Scale::of`]'s), and the bytes of its base
/// weight: a dense base
/// (bf16), or (`nf4`) an NF4 one (with its absmaxes) fed to the GEMMs as it says; with a bias
/// where `bias`.
pub(super) fn layer(
    dev: &Device,
    (d_in, d_out): (usize, usize),
    nf4: Option<Nf4Decode>,
    dropout: f32,
    bias: bool,
    path: LoraPath,
    loads: TileLoads,
) -> Result<(LoraLinear<bf16>, usize)> {
    let rank = Scale::of(dev).lora.2;
    let mut rng = StdRng::seed_from_u64(7);
    let w = dev.upload(&random_vec::<bf16>(&mut rng, d_out * d_in, 0.02))?;
    let (base, w_bytes) = if nf4.is_some() {
        let q = Nf4Weight::quantize(&w, d_out, d_in, 64, true)?;
        let bytes = q.bytes();
        (LoraBase::Nf4(Box::new(q)), bytes)
    } else {
        (LoraBase::Dense(w), 2 * d_out * d_in)
    };
    let a = dev.upload(&random_vec::<bf16>(&mut rng, rank * d_in, 0.02))?;
    let b = dev.upload(&random_vec::<bf16>(&mut rng, d_out * rank, 0.02))?;
    let bias = if bias {
        Some(dev.upload(&random_vec::<bf16>(&mut rng, d_out, 0.1))?)
    } else {
        None
    };
    let config = LoraConfig {
        rank,
        alpha: 32.0,
        use_rslora: false,
        dropout,
        seed: 3,
    };
    Ok((
        LoraLinear::new(base, bias, a, b, config)?
            .with_path(path)?
            .with_nf4_decode(nf4.unwrap_or_default())
            .with_tile_loads(loads),
        w_bytes,
    ))
}

/// The benchmark's layer on `path`: a dense base, no dropout, no bias, tiles by TMA.
fn plain_layer(dev: &Device, path: LoraPath) -> Result<LoraLinear<bf16>> {
    let d = Scale::of(dev).lora.1;
    Ok(layer(dev, (d, d), None, 0.0, false, path, TileLoads::Tma)?.0)
}

/// What every LoRA row is measured on and against: the layer's shape ([`Scale::of`]), x and
/// dY, and cuBLAS's base GEMM and its dX GEMM alone, timed in the same process.
struct Inputs {
    m: usize,
    d: usize,
    rank: usize,
    x: Buffer<bf16>,
    dy: Buffer<bf16>,
    fwd_base: Option<Stats>,
    dx_base: Option<Stats>,
}

impl Inputs {
    fn new(dev: &Device, timer: &mut GpuTimer) -> Result<Inputs> {
        let (m, d, rank) = Scale::of(dev).lora;
        let mut rng = StdRng::seed_from_u64(11);
        Ok(Inputs {
            m,
            d,
            rank,
            x: dev.upload(&random_vec::<bf16>(&mut rng, m * d, 1.0))?,
            dy: dev.upload(&random_vec::<bf16>(&mut rng, m * d, 1.0))?,
            fwd_base: time_cublas(dev, timer, m, d, d, WeightOp::Transposed)?,
            dx_base: time_cublas(dev, timer, m, d, d, WeightOp::Plain)?,
        })
    }

    /// The baseline of a forward (`backward` false) or a backward row, where the run has one.
    fn baseline(&self, backward: bool) -> Option<(&'static str, &Stats)> {
        if backward {
            self.dx_base.as_ref().map(|b| ("cuBLAS dX GEMM alone", b))
        } else {
            self.fwd_base
                .as_ref()
                .map(|b| ("cuBLAS base GEMM alone", b))
        }
    }

    /// The rows' shape column.
    fn shape(&self) -> String {
        format!("{}x{}→{} r{}", self.m, self.d, self.d, self.rank)
    }

    /// A whole layer's FLOPs, forward or backward: the base GEMM and the rank-wide ones.
    fn layer_flops(&self, backward: bool) -> f64 {
        let rank_gemms = if backward { 4 } else { 2 };
        let (m, d) = (self.m, self.d);
        2.0 * (m * d * d + rank_gemms * m * d * self.rank) as f64
    }

    /// The forward GEMM's work (the wgmma kernel's rows): the base and the rank-wide K
    /// segment.
    fn gemm_work(&self) -> (f64, f64) {
        (0.0, 2.0 * (self.m * self.d * (self.d + self.rank)) as f64)
    }

    /// The bytes a layer call must move: x (or dY) read and y (or dX) written, and dY too
    /// backward, and the base weight's `w_bytes`.
    fn layer_bytes(&self, backward: bool, w_bytes: usize) -> f64 {
        let activations = if backward { 3 } else { 2 };
        (activations * 2 * self.m * self.d + w_bytes) as f64
    }
}

/// The layer on `path` forward and backward, whole and launch by launch, over each base and
/// option that path has (`fk bench`'s families `lora_extended`, `lora_fused` and
/// `lora_fused_wgmma`; none on a GPU without the path).
pub fn path_rows(
    dev: &Device,
    timer: &mut GpuTimer,
    c: &Ceilings,
    path: LoraPath,
    out: &mut Rows,
) -> Result<()> {
    if !paths(dev).contains(&path) {
        return Ok(());
    }
    let inputs = Inputs::new(dev, timer)?;
    let (x, dy, m, d) = (&inputs.x, &inputs.dy, inputs.m, inputs.d);
    // The NF4 base decoded in the GEMM's tiles, and (fused paths) through a scratch
    // weight; on wgmma, the dense layer once more with B shared by pairs of blocks (TMA
    // multicast), once with its tiles loaded by cp.async, and once with a bias (its
    // epilogue's cost).
    for (nf4, dropout, bias, loads) in [
        (None, 0.0, false, TileLoads::Tma),
        (None, 0.1, false, TileLoads::Tma),
        (Some(Nf4Decode::InTile), 0.0, false, TileLoads::Tma),
        (Some(Nf4Decode::Scratch), 0.0, false, TileLoads::Tma),
        (None, 0.0, false, TileLoads::TmaMulticast),
        (None, 0.0, false, TileLoads::CpAsync),
        (None, 0.0, true, TileLoads::Tma),
    ] {
        if nf4 == Some(Nf4Decode::Scratch) && path == LoraPath::Extended {
            continue; // the Extended path always dequantizes
        }
        if (loads != TileLoads::Tma || bias) && path != LoraPath::FusedWgmma {
            continue; // only the wgmma path loads by TMA; the bias row is the wgmma epilogue's
        }
        let (l, w_bytes) = layer(dev, (d, d), nf4, dropout, bias, path, loads)?;
        let name = format!(
            "lora_{}{}{}",
            match path {
                LoraPath::Extended => "extended",
                LoraPath::Fused => "fused",
                LoraPath::FusedWgmma => "fused_wgmma",
            },
            match nf4 {
                None => "",
                Some(Nf4Decode::InTile) => "_nf4",
                Some(Nf4Decode::Scratch) => "_nf4_scratch",
            },
            if dropout > 0.0 { "_dropout" } else { "" },
        ) + if bias { "_bias" } else { "" }
            + match loads {
                TileLoads::Tma => "",
                TileLoads::TmaMulticast => "_multicast",
                TileLoads::CpAsync => "_cp_async",
            };
        let shape = inputs.shape();
        let t = timer.time(2, REPS, || l.forward(x, m).map(|_| ()))?;
        // What the forward leaves for backward, beside the time (issue 6: less than PEFT).
        let (_, saved) = l.forward(x, m)?;
        out.push(
            layer_row(
                &format!("{name} forward"),
                &t,
                (
                    inputs.layer_bytes(false, w_bytes),
                    inputs.layer_flops(false),
                ),
                inputs.baseline(false),
                &inputs,
                c,
            )
            .with_saved_bytes(saved.device_bytes()),
        )?;
        let t = timer.time(2, REPS, || l.backward(x, &saved, dy).map(|_| ()))?;
        out.push(layer_row(
            &format!("{name} backward"),
            &t,
            (inputs.layer_bytes(true, w_bytes), inputs.layer_flops(true)),
            inputs.baseline(true),
            &inputs,
            c,
        ))?;
        // Where the time goes, launch by launch (each launch's kernel, or cuBLAS); an
        // extra, so a failure to break a call down costs its rows only.
        let forward = timer.breakdown(1, 5, || l.forward(x, m).map(|_| ()));
        let backward = timer.breakdown(1, 5, || l.backward(x, &saved, dy).map(|_| ()));
        for (dir, parts) in [("forward", forward), ("backward", backward)] {
            match parts {
                Ok(parts) => {
                    for (kernel, t) in parts {
                        let part = format!("{name} {dir} ▸ {kernel}");
                        out.push(Row::new("lora", &part, &shape, &t, 0.0, 0.0, c))?;
                    }
                }
                Err(e) => eprintln!("bench: no breakdown of {name} {dir}: {e}"),
            }
        }
    }
    Ok(())
}

/// The variants the open predictions compare (bench/NOTES.md), each a launch of one kernel or
/// a whole layer: `lora_down` resident two blocks an SM, the rank-wide GEMMs staggered and in
/// steps of 64, and on wgmma the GEMMs before they made u and v, a block per tile, in column
/// runs, and the ladder (`fk bench`'s family `lora_variants`).
pub fn variant_rows(
    dev: &Device,
    timer: &mut GpuTimer,
    c: &Ceilings,
    out: &mut Rows,
) -> Result<()> {
    let inputs = Inputs::new(dev, timer)?;
    let (x, m) = (&inputs.x, inputs.m);
    // The rank-wide GEMMs' bytes (a read of x or dY), and a dense base weight's.
    let (read, dense_w) = (((2 * m * inputs.d) as f64, 0.0), 2 * inputs.d * inputs.d);
    out.extend_extra(narrow_residency(dev, timer, c, &inputs), "narrow residency")?;
    // The rank-wide GEMMs (each a read of x or dY, 64 MB here) with their blocks' walks along
    // K staggered, against the same kernels unstaggered in the `lora_fused {forward,
    // backward} ▸ kernel` rows above: if the blocks reading the same columns of their rows at
    // once is what holds them at ≈ 1.5 TB/s (bench/NOTES.md), these are faster.
    let staggered = plain_layer(dev, LoraPath::Fused).and_then(|l| {
        layer_launch_rows(
            &l.with_narrow_stagger(true),
            timer,
            c,
            &inputs,
            "lora_fused staggered",
            &[
                ("forward", "lora_down_bf16"),
                ("backward", "lora_backward_v_bf16"),
                ("backward", "lora_grad_a_bf16"),
                ("backward", "lora_grad_b_bf16"),
            ],
            read,
        )
    });
    out.extend_extra(staggered, "staggered rank-wide")?;
    // u in steps of 64 along K (a whole 128-byte line of each row per step, not half), as is
    // and staggered, against the `lora_down` rows above.
    for stagger in [false, true] {
        let wide = plain_layer(dev, LoraPath::Fused).and_then(|l| {
            layer_launch_rows(
                &l.with_wide_down(true).with_narrow_stagger(stagger),
                timer,
                c,
                &inputs,
                if stagger {
                    "lora_fused k64 staggered"
                } else {
                    "lora_fused k64"
                },
                &[("forward", "lora_down_k64_bf16")],
                read,
            )
        });
        out.extend_extra(wide, "lora_down_k64")?;
    }
    out.extend_extra(decode_rows(dev, timer, c, &inputs), "decode sizes")?;
    if paths(dev).contains(&LoraPath::FusedWgmma) {
        // The wgmma layer as it was before its GEMMs made u, v and the partials of dB and dA
        // themselves (`lora_fused_wgmma forward` and `backward`, above, run
        // lora_forward_down16_wgmma and lora_backward_dx_v16_wgmma alone, then lora_reduce):
        // lora_down, then the GEMM; lora_backward_v, then dXᵀ's; dX making v and dA's partials
        // but not dB's (lora_grad_b after it); dX making v and dB's but not dA's (lora_grad_a
        // after it). Each whole against cuBLAS, and its GEMM's launch; the rows below compare
        // variants of those GEMMs against these.
        type Configure = fn(LoraLinear<bf16>) -> LoraLinear<bf16>;
        let variants: [(&str, &str, &str, Configure); 4] = [
            (
                "lora_fused_wgmma lora_down",
                "forward",
                "lora_forward_wgmma",
                |l| l.with_fused_down(false),
            ),
            (
                "lora_fused_wgmma lora_backward_v",
                "backward",
                "lora_backward_dx_wgmma",
                |l| l.with_fused_v(false),
            ),
            (
                "lora_fused_wgmma lora_grad_b",
                "backward",
                "lora_backward_dx_v16_wgmma",
                |l| l.with_fused_db(false),
            ),
            (
                "lora_fused_wgmma lora_grad_a",
                "backward",
                "lora_backward_dx_v16_wgmma",
                |l| l.with_fused_da(false),
            ),
        ];
        for (label, dir, kernel, configure) in variants {
            let separate = plain_layer(dev, LoraPath::FusedWgmma)
                .map(configure)
                .and_then(|l| {
                    let (t, work) = if dir == "forward" {
                        let t = timer.time(2, REPS, || l.forward(x, m).map(|_| ()))?;
                        // x and y, and W: the main loop's forward bytes for a dense base.
                        (
                            t,
                            (
                                inputs.layer_bytes(false, dense_w),
                                inputs.layer_flops(false),
                            ),
                        )
                    } else {
                        let (_, saved) = l.forward(x, m)?;
                        let t = timer
                            .time(2, REPS, || l.backward(x, &saved, &inputs.dy).map(|_| ()))?;
                        (
                            t,
                            (inputs.layer_bytes(true, dense_w), inputs.layer_flops(true)),
                        )
                    };
                    let vs = inputs.baseline(dir == "backward");
                    let mut rows = vec![layer_row(
                        &format!("{label} {dir}"),
                        &t,
                        work,
                        vs,
                        &inputs,
                        c,
                    )];
                    rows.extend(layer_launch_rows(
                        &l,
                        timer,
                        c,
                        &inputs,
                        label,
                        &[(dir, kernel)],
                        inputs.gemm_work(),
                    )?);
                    Ok(rows)
                });
            out.extend_extra(separate, &format!("{label} {dir}"))?;
        }
        // The persistent wgmma kernels (a block per SM, each walking its tiles, the next
        // tile's loads in flight while it stores the last) against the same kernels launched a
        // block per tile, as they were before (each tile's fill and store alone on its SM).
        let per_tile = plain_layer(dev, LoraPath::FusedWgmma)
            .map(|l| l.with_fused_down(false).with_fused_v(false))
            .and_then(|l| l.with_wgmma_blocks(Some(usize::MAX)))
            .and_then(|l| {
                layer_launch_rows(
                    &l,
                    timer,
                    c,
                    &inputs,
                    "lora_fused_wgmma a block per tile",
                    &[
                        ("forward", "lora_forward_wgmma"),
                        ("backward", "lora_backward_dx_wgmma"),
                    ],
                    inputs.gemm_work(),
                )
            });
        out.extend_extra(per_tile, "block-per-tile")?;
        // The forward kernel with each block walking runs of consecutive column tiles of one
        // row tile (8 here), the order u-inside-the-GEMM needs (bench/NOTES.md): what the order
        // alone costs in DRAM and L2, against `lora_fused_wgmma lora_down ▸ forward ▸
        // lora_forward_wgmma`.
        let runs = plain_layer(dev, LoraPath::FusedWgmma).and_then(|l| {
            layer_launch_rows(
                &l.with_column_runs(ColumnRuns::Longest)
                    .with_fused_down(false),
                timer,
                c,
                &inputs,
                "lora_fused_wgmma column runs",
                &[("forward", "lora_forward_wgmma")],
                inputs.gemm_work(),
            )
        });
        out.extend_extra(runs, "column-run")?;
        // The whole design: u made in the GEMM once a run and kept in registers across the
        // run's tiles (the side product 1 tile in 8 here in the longest runs, 1 in 4 or 2 in
        // shorter ones, whose rounds read fewer rows of x), against `lora_fused_wgmma forward
        // ▸ lora_forward_down16_wgmma` (once a tile) and the lora_down rows above; v in dX's
        // GEMM likewise, against `lora_fused_wgmma backward ▸ lora_backward_dx_v16_wgmma` and
        // the lora_backward_v rows.
        for (runs, of) in [
            (ColumnRuns::Longest, ""),
            (ColumnRuns::AtMost(4), " of 4"),
            (ColumnRuns::AtMost(2), " of 2"),
        ] {
            for (kept, dir, kernel) in [
                ("u", "forward", "lora_forward_down16_wgmma"),
                ("v", "backward", "lora_backward_dx_v16_wgmma"),
            ] {
                let label = format!("lora_fused_wgmma column runs{of}, {kept} kept");
                let rows = plain_layer(dev, LoraPath::FusedWgmma).and_then(|l| {
                    layer_launch_rows(
                        &l.with_column_runs(runs),
                        timer,
                        c,
                        &inputs,
                        &label,
                        &[(dir, kernel)],
                        inputs.gemm_work(),
                    )
                });
                out.extend_extra(rows, &label)?;
            }
        }
        out.extend_extra(wgmma_ladder(dev, timer, c), "wgmma ladder")?;
    }
    Ok(())
}

/// A QLoRA layer's forward at decode sizes (1 and 16 rows, the benchmark's width and rank,
/// with a bias) on the device's default path: on the NF4 GEMV with the bias and `u Bᵀ` in
/// its epilogue (the layer's default, `lora_qlora N rows forward`), against the same layer
/// without it (`…, no GEMV forward`: on a GPU the Extended path, which first dequantizes the
/// weight into its extended scratch) and the dense layer (`lora_dense N rows forward`). The
/// floor is the NF4 weight's bytes (the dense row's, its bf16 weight's).
fn decode_rows(
    dev: &Device,
    timer: &mut GpuTimer,
    c: &Ceilings,
    inputs: &Inputs,
) -> Result<Vec<Row>> {
    let (d, rank) = (inputs.d, inputs.rank);
    let path = LoraPath::default_for(dev);
    let qlora = || {
        layer(
            dev,
            (d, d),
            Some(Nf4Decode::Scratch),
            0.0,
            true,
            path,
            TileLoads::Tma,
        )
    };
    let (gemv, nf4_bytes) = qlora()?;
    let without = qlora()?.0.with_nf4_gemv_rows(0);
    let (dense, dense_bytes) = layer(dev, (d, d), None, 0.0, true, path, TileLoads::Tma)?;
    let mut rng = StdRng::seed_from_u64(13);
    let mut rows = Vec::new();
    for m in [1, 16] {
        let x = dev.upload(&random_vec::<bf16>(&mut rng, m * d, 1.0))?;
        let mut time = |l: &LoraLinear<bf16>| timer.time(2, REPS, || l.forward(&x, m).map(|_| ()));
        let (t_gemv, t_without, t_dense) = (time(&gemv)?, time(&without)?, time(&dense)?);
        let shape = format!("{m}x{d}→{d} r{rank}");
        let of = if m == 1 {
            "1 row".to_string()
        } else {
            format!("{m} rows")
        };
        // x read and y written, the weight's bytes; the base GEMM and the rank-wide two.
        let row = |label: String, t: &Stats, w_bytes: usize| {
            let bytes = (w_bytes + 4 * m * d) as f64;
            let flops = (2 * m * d * (d + 2 * rank)) as f64;
            Row::new("lora", &label, &shape, t, bytes, flops, c)
        };
        rows.push(
            row(format!("lora_qlora {of} forward"), &t_gemv, nf4_bytes)
                .with_baseline("the same layer without the GEMV", t_without.median_us),
        );
        rows.push(row(
            format!("lora_qlora {of}, no GEMV forward"),
            &t_without,
            nf4_bytes,
        ));
        rows.push(row(
            format!("lora_dense {of} forward"),
            &t_dense,
            dense_bytes,
        ));
    }
    Ok(rows)
}

/// The row `label` of a whole layer call that took `t`, its floor from `work` (bytes, FLOPs),
/// against a cuBLAS GEMM alone (`vs`: its name and time) where the run has one.
fn layer_row(
    label: &str,
    t: &Stats,
    (bytes, flops): (f64, f64),
    vs: Option<(&str, &Stats)>,
    inputs: &Inputs,
    c: &Ceilings,
) -> Row {
    let row = Row::new("lora", label, &inputs.shape(), t, bytes, flops, c);
    match vs {
        Some((name, b)) => row.with_baseline(name, b.median_us),
        None => row,
    }
}

/// Whether two narrow.cuh blocks (92 KB of shared memory each) run on one SM together:
/// `lora_down` at the benchmark's shape with K split 2 ways (128 blocks, at most one per SM)
/// and 4 ways (256 blocks, each reading half as much, two per SM if both fit). Together, the
/// second takes about half the first's time; one at a time, about the same. Rows (parts):
/// `lora_down residency ▸ k/N ▸ kernel`, bytes the read of x.
fn narrow_residency(
    dev: &Device,
    timer: &mut GpuTimer,
    c: &Ceilings,
    inputs: &Inputs,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for splits in [2, 4] {
        let l = plain_layer(dev, LoraPath::Fused)?.with_k_splits(Some(splits))?;
        let parts = timer.breakdown(1, REPS, || l.forward(&inputs.x, inputs.m).map(|_| ()))?;
        rows.push(launch_row(
            &parts,
            "lora_down_bf16",
            &format!("lora_down residency ▸ k/{splits}"),
            &inputs.shape(),
            ((2 * inputs.m * inputs.d) as f64, 0.0),
            c,
        )?);
    }
    Ok(rows)
}

/// Rows `{label} ▸ {forward, backward} ▸ launch`: each (direction, kernel) of `kernels`
/// from the layer's forward or backward broken down launch by launch, with the (bytes,
/// FLOPs) its floor counts.
fn layer_launch_rows(
    l: &LoraLinear<bf16>,
    timer: &mut GpuTimer,
    c: &Ceilings,
    inputs: &Inputs,
    label: &str,
    kernels: &[(&str, &str)],
    work: (f64, f64),
) -> Result<Vec<Row>> {
    let (x, dy, m) = (&inputs.x, &inputs.dy, inputs.m);
    // Each direction broken down once, and only if a kernel asks for it.
    let wants = |dir: &str| kernels.iter().any(|&(d, _)| d == dir);
    let forward = if wants("forward") {
        timer.breakdown(1, REPS, || l.forward(x, m).map(|_| ()))?
    } else {
        Vec::new()
    };
    let backward = if wants("backward") {
        let (_, saved) = l.forward(x, m)?;
        timer.breakdown(1, REPS, || l.backward(x, &saved, dy).map(|_| ()))?
    } else {
        Vec::new()
    };
    kernels
        .iter()
        .map(|&(dir, kernel)| {
            let parts = if dir == "forward" {
                &forward
            } else {
                &backward
            };
            let label = format!("{label} ▸ {dir}");
            launch_row(parts, kernel, &label, &inputs.shape(), work, c)
        })
        .collect()
}

/// The row `{label} ▸ {launch}` of the launch in a breakdown whose kernel is `kernel` (a name,
/// or its start), with the (bytes, FLOPs) its floor counts.
fn launch_row(
    parts: &[(String, Stats)],
    kernel: &str,
    label: &str,
    shape: &str,
    (bytes, flops): (f64, f64),
    c: &Ceilings,
) -> Result<Row> {
    let (name, t) = parts
        .iter()
        .find(|(n, _)| n.starts_with(kernel))
        .ok_or_else(|| crate::Error::InvalidArgument {
            what: "bench breakdown",
            why: format!("no {kernel} launch in it"),
        })?;
    Ok(Row::new(
        "lora",
        &format!("{label} ▸ {name}"),
        shape,
        t,
        bytes,
        flops,
        c,
    ))
}

/// The wgmma kernels' time taken apart without a profiler: each kernel (the forward, dXᵀ's
/// in backward, and dX's that makes v) at one wave of tiles (a 128 × 256 tile per SM: no
/// partial wave) and a K of 1, 16 and 64 steps of 64 ([`Scale::ladder_steps`]). A kernel's
/// time is then ≈ t0 + steps · t_step: t_step the step's time across the GPU (its FLOPs
/// against cuBLAS's rate give the main loop's efficiency; the two numbers say ≈ 1,110
/// cycles), t0 what a tile costs besides its steps (start, pipeline fill, the LoRA segment's
/// step, epilogue). Rows (parts, ` ▸ `: in the full results, not the README): each rung's
/// kernel time, then the two fitted.
fn wgmma_ladder(dev: &Device, timer: &mut GpuTimer, c: &Ceilings) -> Result<Vec<Row>> {
    let at = Scale::of(dev);
    let (rank, ladder) = (at.lora.2, at.ladder_steps);
    let tiles_m = at.sms / 2; // two tiles across: 128 × 256 each, one per SM
    let mut rows = Vec::new();
    let mut rng = StdRng::seed_from_u64(13);
    for (kind, dx, fused_v, kernel) in [
        ("forward", false, false, "lora_forward_wgmma"),
        ("dX", true, false, "lora_backward_dx_wgmma"),
        ("dX making v", true, true, "lora_backward_dx_v16_wgmma"),
    ] {
        // The forward's tile is y's 128 rows by 256 columns, and dX's that makes v dX's; the
        // other dX's is dXᵀ's: 128 columns of dX by 256 rows. K is d_in for the forward,
        // d_out for dX.
        let (m, across) = if dx && !fused_v {
            (256 * tiles_m, 256)
        } else {
            (128 * tiles_m, 512)
        };
        let tiles = 2 * tiles_m;
        let mut times = Vec::new();
        for steps in ladder {
            let k = 64 * steps;
            let (d_in, d_out) = if dx { (across, k) } else { (k, across) };
            let (l, _) = layer(
                dev,
                (d_in, d_out),
                None,
                0.0,
                false,
                LoraPath::FusedWgmma,
                TileLoads::Tma,
            )?;
            // The plain GEMM kernels, as the ladder measured them at 0501 (their u and v from
            // lora_down and lora_backward_v), and dX's that makes v.
            let l = l.with_fused_down(false).with_fused_v(fused_v);
            let x = dev.upload(&random_vec::<bf16>(&mut rng, m * d_in, 1.0))?;
            let dy = dev.upload(&random_vec::<bf16>(&mut rng, m * d_out, 1.0))?;
            let (_, saved) = l.forward(&x, m)?;
            let parts = if dx {
                timer.breakdown(1, REPS, || l.backward(&x, &saved, &dy).map(|_| ()))?
            } else {
                timer.breakdown(1, REPS, || l.forward(&x, m).map(|_| ()))?
            };
            let row = launch_row(
                &parts,
                kernel,
                &format!("lora_fused_wgmma ladder ▸ {steps} steps"),
                &format!("{m}x{d_in}→{d_out} r{rank}, {tiles} tiles"),
                (0.0, 2.0 * (tiles * 128 * 256 * (k + rank)) as f64),
                c,
            )?;
            times.push(row.time_us);
            rows.push(row);
        }
        let (mid, last) = (ladder[1], ladder[2]);
        let step = (times[2] - times[1]) / (last - mid) as f64;
        let fixed = times[1] - mid as f64 * step;
        let shape = format!("{tiles} tiles, one per SM");
        let fit = |us: f64| super::Stats {
            median_us: us,
            reps: REPS,
        };
        let step_flops = 2.0 * (tiles * 128 * 256 * 64) as f64;
        rows.push(Row::new(
            "lora",
            &format!("lora_fused_wgmma ladder ▸ {kind}: one step (fit)"),
            &shape,
            &fit(step),
            0.0,
            step_flops,
            c,
        ));
        rows.push(Row::new(
            "lora",
            &format!("lora_fused_wgmma ladder ▸ {kind}: a tile besides its steps (fit)"),
            &shape,
            &fit(fixed),
            0.0,
            0.0,
            c,
        ));
    }
    Ok(rows)
}
