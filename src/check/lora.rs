//! Checks of the fused LoRA kernels against `reference::lora` (PEFT's layer, in f64).

use super::{row, time_if, CheckCase, CheckRow, Measure, Report, Scale};
use crate::check::nf4::{matmul_bound, unit};
use crate::device::{Buffer, Device};
use crate::dtype::FloatElem;
use crate::error::Result;
use crate::lora::{
    ColumnRuns, LoraBase, LoraConfig, LoraLinear, LoraPath, Nf4Decode, Saved, TileLoads,
};
use crate::nf4::{self, Nf4Weight};
use crate::reference::{lora as reference, nf4 as nf4_reference};
use crate::testing::{random_vec, rel_l2};
use crate::{bf16, f16};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// A LoRA check's size and options.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// Seed of the random inputs, weights and hyper-parameters.
    pub seed: u64,
    /// Rows of the input `x` (tokens).
    pub m: usize,
    /// Input features: columns of `x` and of the base weight.
    pub d_in: usize,
    /// Output features: rows of the base weight.
    pub d_out: usize,
    /// The LoRA rank.
    pub rank: usize,
    /// Whether the scale is `alpha / √rank` (rsLoRA) instead of `alpha / rank`.
    pub rslora: bool,
    /// Dropout probability on the LoRA branch's input.
    pub dropout: f32,
    /// Whether the layer has a bias.
    pub bias: bool,
    /// Whether the base weight is NF4 (random blocksize and double quantization) instead
    /// of dense.
    pub nf4: bool,
    /// How the fused paths feed the NF4 base to their GEMMs.
    pub nf4_decode: Nf4Decode,
    /// An NF4 base's forward of up to `nf4::GEMV_MAX_ROWS` rows on the NF4 GEMV, the bias
    /// and `u Bᵀ` in its epilogue (`LoraLinear::with_nf4_gemv_rows`, on by default); `false`:
    /// on the path's own GEMM at any rows.
    pub nf4_gemv: bool,
    /// How the FusedWgmma path loads its tiles.
    pub tile_loads: TileLoads,
    /// Whether to time the kernels (on a GPU only).
    pub timed: bool,
    /// The layer's path; `None` takes the one `LoraLinear::new` picks for the device.
    pub path: Option<LoraPath>,
    /// Splits of K for u and v (`LoraLinear::with_k_splits`); `None` picks by shape.
    pub k_splits: Option<u32>,
    /// Staggered rank-wide GEMMs (`LoraLinear::with_narrow_stagger`).
    pub narrow_stagger: bool,
    /// `u` from `lora_down_k64` (`LoraLinear::with_wide_down`).
    pub wide_down: bool,
    /// Most blocks of the wgmma GEMMs (`LoraLinear::with_wgmma_blocks`); `None`: one per SM.
    pub wgmma_blocks: Option<usize>,
    /// The wgmma GEMMs' tile order (`LoraLinear::with_column_runs`).
    pub column_runs: ColumnRuns,
    /// The wgmma forward computing `u` in its GEMM where it can (`LoraLinear::with_fused_down`,
    /// on by default); `false`: `lora_down` first, as elsewhere.
    pub fused_down: bool,
    /// The wgmma backward computing `v` in its dX GEMM where it can (`LoraLinear::with_fused_v`,
    /// on by default); `false`: `lora_backward_v` first, as elsewhere.
    pub fused_v: bool,
}

impl Case {
    /// A `[m, d_in] → [m, d_out]` layer of rank `rank` with a dense base and nothing else:
    /// no dropout, bias or rsLoRA, untimed, on the path and K splits the layer picks.
    pub fn new(seed: u64, m: usize, d_in: usize, d_out: usize, rank: usize) -> Case {
        Case {
            seed,
            m,
            d_in,
            d_out,
            rank,
            rslora: false,
            dropout: 0.0,
            bias: false,
            nf4: false,
            nf4_decode: Nf4Decode::InTile,
            nf4_gemv: true,
            tile_loads: TileLoads::Tma,
            timed: false,
            path: None,
            k_splits: None,
            narrow_stagger: false,
            wide_down: false,
            wgmma_blocks: None,
            column_runs: ColumnRuns::Off,
            fused_down: true,
            fused_v: true,
        }
    }
}

/// The paths `dev` runs, for either base: the fused kernels everywhere, the
/// cuBLAS-extended layer where cuBLAS is, and the fused layer's wgmma GEMMs where wgmma runs
/// (Hopper, the emulator), last: the newest kernels, so that a GPU fault in
/// them (which ends the process's CUDA context) leaves the other paths' results standing.
pub fn paths(dev: &Device) -> Vec<LoraPath> {
    let mut p = vec![LoraPath::Fused];
    if dev.has_cublas() {
        p.push(LoraPath::Extended);
    }
    if dev.has_wgmma() {
        p.push(LoraPath::FusedWgmma);
    }
    p
}

impl CheckCase for Case {
    fn seed(&self) -> u64 {
        self.seed
    }

    fn shape(&self) -> String {
        let mut s = format!("{}x{}→{} r{}", self.m, self.d_in, self.d_out, self.rank);
        if self.dropout > 0.0 {
            s += &format!(" p{}", self.dropout);
        }
        if let Some(k) = self.k_splits {
            s += &format!(" k/{k}");
        }
        if self.narrow_stagger {
            s += " stagger";
        }
        if self.wide_down {
            s += " k64";
        }
        if let Some(b) = self.wgmma_blocks {
            s += &format!(" {b} blocks");
        }
        match self.column_runs {
            ColumnRuns::Off => {}
            ColumnRuns::AtMost(n) => s += &format!(" column runs ≤ {n}"),
            ColumnRuns::Longest => s += " column runs",
        }
        if !self.fused_down {
            s += " lora_down";
        }
        if !self.fused_v {
            s += " lora_backward_v";
        }
        if self.bias {
            s += " bias";
        }
        if self.rslora {
            s += " rs";
        }
        if self.nf4 {
            s += " nf4";
            if self.nf4_decode == Nf4Decode::Scratch {
                s += " scratch";
            }
            if !self.nf4_gemv {
                s += " no gemv";
            }
        }
        if let Some(path) = self.path {
            s += &format!(" {path:?}");
            if path == LoraPath::FusedWgmma {
                s += match self.tile_loads {
                    TileLoads::Tma => "",
                    TileLoads::TmaMulticast => " multicast",
                    TileLoads::CpAsync => " cp.async",
                };
            }
        }
        s
    }
}

/// The layer on the device and its host copies (w as the kernels see it: NF4 dequantized;
/// `w_gemv` as the NF4 GEMV does, its codes in T times the f32 absmax).
struct Setup<T: FloatElem> {
    layer: LoraLinear<T>,
    w: Vec<T>,
    w_gemv: Vec<f32>,
    bias: Option<Vec<T>>,
    a: Vec<T>,
    b: Vec<T>,
    x: Vec<T>,
    config: LoraConfig,
}

fn setup<T: FloatElem>(dev: &Device, c: &Case, rng: &mut StdRng) -> Result<Setup<T>> {
    // The LoRA term grows as scale · √rank (sums over the rank): alpha drawn so that it stays
    // a sizable share of y at every rank (alpha from 1 to 32 made it about 1% of y at rank 136,
    // where a fault confined to it came within a few times the bound).
    let per_rank = if c.rslora {
        1.0
    } else {
        (c.rank as f64).sqrt()
    };
    let config = LoraConfig {
        rank: c.rank,
        alpha: rng.random_range(0.5..4.0) * per_rank,
        use_rslora: c.rslora,
        dropout: c.dropout,
        seed: rng.random(),
    };
    let w0: Vec<T> = random_vec(rng, c.d_out * c.d_in, 0.05);
    let (base, w, w_gemv) = if c.nf4 {
        // Blocksize and double quantization drawn with the rest of the case: the wgmma path
        // decodes runs of 16 elements, each inside one block at every blocksize.
        let blocksize = 32 << rng.random_range(0..4);
        let q = nf4_reference::quantize(&w0, &[c.d_out, c.d_in], blocksize, rng.random())?;
        (
            LoraBase::Nf4(Box::new(Nf4Weight::upload(dev, &q)?)),
            q.dequantize::<T>(),
            q.dequantize_with_codes_in::<T>(),
        )
    } else {
        (LoraBase::Dense(dev.upload(&w0)?), w0, vec![])
    };
    let bias: Option<Vec<T>> = c.bias.then(|| random_vec(rng, c.d_out, 0.5));
    let a: Vec<T> = random_vec(rng, c.rank * c.d_in, 0.1);
    let b: Vec<T> = random_vec(rng, c.d_out * c.rank, 0.1);
    let x: Vec<T> = random_vec(rng, c.m * c.d_in, 1.0);
    let mut layer = LoraLinear::new(
        base,
        bias.as_ref().map(|b| dev.upload(b)).transpose()?,
        dev.upload(&a)?,
        dev.upload(&b)?,
        config,
    )?;
    if let Some(path) = c.path {
        layer = layer.with_path(path)?;
    }
    layer = layer
        .with_k_splits(c.k_splits)?
        .with_narrow_stagger(c.narrow_stagger)
        .with_wide_down(c.wide_down)
        .with_wgmma_blocks(c.wgmma_blocks)?
        .with_column_runs(c.column_runs)
        .with_fused_down(c.fused_down)
        .with_fused_v(c.fused_v)
        .with_nf4_decode(c.nf4_decode)
        .with_nf4_gemv_rows(if c.nf4_gemv { nf4::GEMV_MAX_ROWS } else { 0 })
        .with_tile_loads(c.tile_loads);
    Ok(Setup {
        layer,
        w,
        w_gemv,
        bias,
        a,
        b,
        x,
        config,
    })
}

fn reference_layer<'a, T: FloatElem, W: FloatElem>(
    s: &'a Setup<T>,
    c: &Case,
    w: &'a [W],
) -> reference::LoraLayer<'a, T, T, W> {
    reference::LoraLayer {
        w,
        bias: s.bias.as_deref(),
        a: &s.a,
        b: &s.b,
        d_in: c.d_in,
        d_out: c.d_out,
        config: s.config,
    }
}

/// ‖scale · u Bᵀ‖₂ for the reference's `u` (`[m, rank]`, unscaled), in f64.
fn lora_term_norm<T: FloatElem>(s: &Setup<T>, u: &[f32], c: Case) -> f64 {
    let (r, scale) = (c.rank, s.config.scale() as f64);
    let mut sum = 0.0;
    for row in u.chunks(r) {
        for b_row in s.b.chunks(r) {
            let v: f64 = row
                .iter()
                .zip(b_row)
                .map(|(&u, b)| u as f64 * b.to_f32() as f64)
                .sum();
            sum += (scale * v) * (scale * v);
        }
    }
    sum.sqrt()
}

/// ‖v‖₂ in f64.
fn norm<T: FloatElem>(v: &[T]) -> f64 {
    v.iter()
        .map(|x| (x.to_f32() as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The saved `u` divided by `scale` back to `dropout(x) Aᵀ`, as the reference keeps it.
fn unscaled_u<T: FloatElem>(s: &Setup<T>, saved: &Saved<T>) -> Result<Vec<f32>> {
    let scale = s.config.scale();
    Ok(saved
        .u
        .to_host()?
        .iter()
        .map(|v| v.to_f32() / scale)
        .collect())
}

/// The name a row of the layer's `op` goes by: the path, then the base (`_nf4`, or
/// `_nf4_scratch` through a scratch weight), then the dtype, e.g.
/// `lora_extended_forward_nf4_bf16`; an NF4 base's forward on the GEMV names the GEMV.
fn layer_kernel<T: FloatElem>(s: &Setup<T>, c: &Case, op: &str) -> String {
    if op == "forward" && s.layer.forward_on_nf4_gemv(c.m) {
        // Every path's forward of a few rows over NF4: lora_down, then the GEMV.
        let gemv = nf4::MatmulPath::GemvMma.label(true, T::DTYPE);
        return format!("lora_forward ▸ {gemv} + epilogue");
    }
    let path = if s.layer.path() == LoraPath::Extended {
        "extended_"
    } else {
        ""
    };
    let nf4 = match (c.nf4, s.layer.nf4_decode()) {
        (false, _) => "",
        (true, Nf4Decode::InTile) => "_nf4",
        (true, Nf4Decode::Scratch) => "_nf4_scratch",
    };
    // The wgmma path differs from the fused one in its two big GEMMs only; its forward may
    // compute u too (`lora_forward_down16_wgmma_bf16`), its dX v (`lora_backward_dx_v16_…`).
    let wgmma =
        if s.layer.path() == LoraPath::FusedWgmma && (op == "forward" || op == "backward_dx") {
            "_wgmma"
        } else {
            ""
        };
    let op = match (s.layer.fused_down(), s.layer.fused_v()) {
        (Some(side), _) if op == "forward" => format!("forward_down{side}"),
        (_, Some(side)) if op == "backward_dx" => format!("backward_dx_v{side}"),
        _ => op.to_string(),
    };
    format!("lora_{path}{op}{nf4}{wgmma}_{}", T::DTYPE)
}

/// The case's layer, its `x` on the device, and the case's random stream past them.
fn layer_and_x<T: FloatElem>(dev: &Device, c: &Case) -> Result<(Setup<T>, Buffer<T>, StdRng)> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let s = setup::<T>(dev, c, &mut rng)?;
    let x = dev.upload(&s.x)?;
    Ok((s, x, rng))
}

/// Forward: `y` and the saved `u` (which the kernel keeps scaled by `scale`).
pub fn forward<T: FloatElem>(dev: &Device, c: Case) -> Result<Vec<CheckRow>>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let (s, x, _) = layer_and_x::<T>(dev, &c)?;
    Ok(forward_rows(dev, c, &s, &x)?.0)
}

/// Backward: `dx`, `dA`, `dB` and `dbias` from the kernels' own forward.
pub fn backward<T: FloatElem>(dev: &Device, c: Case) -> Result<Vec<CheckRow>>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let (s, x, mut rng) = layer_and_x::<T>(dev, &c)?;
    let (_, saved) = s.layer.forward(&x, c.m)?;
    backward_rows(dev, c, &s, &mut rng, &x, &saved)
}

/// `forward`'s rows, then `backward`'s (the same rows as the two calls), from one layer:
/// its setup (at the realistic shape, a CPU quantization of the NF4 base and uploads of
/// tens of MB) made once.
pub fn forward_and_backward<T: FloatElem>(dev: &Device, c: Case) -> Result<Vec<CheckRow>>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let (s, x, mut rng) = layer_and_x::<T>(dev, &c)?;
    let (mut rows, saved) = forward_rows(dev, c, &s, &x)?;
    rows.extend(backward_rows(dev, c, &s, &mut rng, &x, &saved)?);
    Ok(rows)
}

/// The forward's rows, and what its first run saved for backward.
fn forward_rows<T: FloatElem>(
    dev: &Device,
    c: Case,
    s: &Setup<T>,
    x: &Buffer<T>,
) -> Result<(Vec<CheckRow>, Saved<T>)>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let expected = if s.layer.forward_on_nf4_gemv(c.m) {
        reference_layer(s, &c, &s.w_gemv).forward(&s.x, c.m)?
    } else {
        reference_layer(s, &c, &s.w).forward(&s.x, c.m)?
    };
    let (y, saved) = s.layer.forward(x, c.m)?;
    let u = unscaled_u(s, &saved)?;
    let t = time_if(dev, c.timed, || s.layer.forward(x, c.m).map(|_| ()))?;
    let name = layer_kernel(s, &c, "forward");
    // y's LoRA term is computed from u rounded to T (the u forward saves), the reference's
    // from the exact u: up to half a unit of T of each u element, so up to a unit of the LoRA
    // term's norm in y (more than y's own rounding where the base and LoRA terms cancel).
    let y_norm = norm(&expected.y);
    let u_rounding = if y_norm > 0.0 {
        unit(T::DTYPE) * lora_term_norm(s, &expected.u, c) / y_norm
    } else {
        0.0
    };
    // u from lora_down, or from the forward's own kernel.
    let u_name = match s.layer.fused_down() {
        Some(_) if !s.layer.forward_on_nf4_gemv(c.m) => format!("{name} ▸ u"),
        _ => format!("lora_down_{}", T::DTYPE),
    };
    let rows = vec![
        row(
            name,
            dev,
            &c,
            Measure::RelL2(matmul_bound(T::DTYPE, c.d_in + c.rank) + u_rounding),
            rel_l2(&y.to_host()?, &expected.y),
            t,
        ),
        row(
            u_name,
            dev,
            &c,
            Measure::RelL2(matmul_bound(T::DTYPE, c.d_in)),
            rel_l2(&u, &expected.u),
            None,
        ),
    ];
    Ok((rows, saved))
}

/// The backward's rows, from `saved` of a forward of the same layer on `x` and a `dy` drawn
/// from `rng` after the setup.
fn backward_rows<T: FloatElem>(
    dev: &Device,
    c: Case,
    s: &Setup<T>,
    rng: &mut StdRng,
    x: &Buffer<T>,
    saved: &Saved<T>,
) -> Result<Vec<CheckRow>>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let dy_host: Vec<T> = random_vec(rng, c.m * c.d_out, 1.0);
    // The reference backward takes the u the kernel saved, as the kernel does.
    let u = unscaled_u(s, saved)?;
    let expected = reference_layer(s, &c, &s.w).backward(&s.x, &u, &dy_host, c.m)?;
    let dy = dev.upload(&dy_host)?;
    let g = s.layer.backward(x, saved, &dy)?;
    let t = time_if(dev, c.timed, || s.layer.backward(x, saved, &dy).map(|_| ()))?;
    // dB, dbias: f32 sums over the m tokens of products exact in f32 (dY and u are T).
    let sum_bound = (c.m + 2) as f64 * 2f64.powi(-23);
    // dA and dX use v = scale·dY·B rounded to T, as the reference does too; where the
    // kernel's f32 sum and the exact one straddle a rounding boundary of T, v rounds to the
    // other neighbour: up to one unit of T more.
    let da_bound = sum_bound + unit(T::DTYPE);
    let dx_bound = matmul_bound(T::DTYPE, c.d_out + c.rank) + unit(T::DTYPE);
    let dx_name = layer_kernel(s, &c, "backward_dx");
    // dB's partials: the dX kernel's where it makes them beside dX, else lora_grad_b's.
    let db_name = if s.layer.fused_db() {
        format!("{dx_name} dB")
    } else {
        format!("lora_grad_b_{}", T::DTYPE)
    };
    // dA's likewise, lora_grad_a's otherwise.
    let da_name = if s.layer.fused_da() {
        format!("{dx_name} dA")
    } else {
        format!("lora_grad_a_{}", T::DTYPE)
    };
    let mut rows = vec![
        row(
            dx_name,
            dev,
            &c,
            Measure::RelL2(dx_bound),
            rel_l2(&g.dx.to_host()?, &expected.dx),
            t,
        ),
        row(
            da_name,
            dev,
            &c,
            Measure::RelL2(da_bound),
            rel_l2(&g.da.to_host()?, &expected.da),
            None,
        ),
        row(
            db_name.clone(),
            dev,
            &c,
            Measure::RelL2(sum_bound),
            rel_l2(&g.db.to_host()?, &expected.db),
            None,
        ),
    ];
    // A dbias where the reference has none, or none where it has one, is an infinite error.
    let dbias_err = match (&g.dbias, &expected.dbias) {
        (Some(got), Some(want)) => Some(rel_l2(&got.to_host()?, want)),
        (None, None) => None,
        _ => Some(f64::INFINITY),
    };
    if let Some(err) = dbias_err {
        rows.push(row(
            format!("{db_name} dbias"),
            dev,
            &c,
            Measure::RelL2(sum_bound),
            err,
            None,
        ));
    }
    Ok(rows)
}

/// The merged weight `W + scale · B A` (dense base).
pub fn merge<T: FloatElem>(dev: &Device, c: Case) -> Result<CheckRow> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    // A dense base: the NF4 merge (dequantize, merge, requantize) has its own test.
    let c = Case { nf4: false, ..c };
    let s = setup::<T>(dev, &c, &mut rng)?;
    let expected = reference_layer(&s, &c, &s.w).merged()?;
    let got = s.layer.merged()?.to_host()?;
    Ok(row(
        format!("lora_merge_{}", T::DTYPE),
        dev,
        &c,
        Measure::RelL2(unit(T::DTYPE)),
        rel_l2(&got, &expected),
        None,
    ))
}

/// Every LoRA kernel: bf16 and f16, dense and NF4 bases, with and without dropout and bias,
/// case by case into `report` (at the realistic scale each case's reference takes seconds).
pub fn all(dev: &Device, scale: Scale, seed: u64, report: &mut Report) -> Result<()> {
    let realistic = scale == Scale::Realistic;
    // Realistic: DESIGN.md §8's layer (4096→4096, r=16) at 64 tokens, whose f64 reference
    // takes seconds on a CPU (the 8192-token timings are `fk bench`'s). Small: odd sizes.
    let (m, d_in, d_out, rank) = if realistic {
        (64, 4096, 4096, 16)
    } else {
        (37, 131, 45, 5)
    };
    let base = Case::new(seed, m, d_in, d_out, rank);
    report.push(merge::<bf16>(dev, base)?);
    report.push(merge::<f16>(dev, base)?);
    // Path by path, in paths()'s order (the newest kernels last).
    for path in paths(dev) {
        for (dropout, bias, nf4, rslora, nf4_decode) in [
            (0.0, false, false, false, Nf4Decode::InTile),
            (0.1, true, false, true, Nf4Decode::InTile),
            (0.0, false, true, false, Nf4Decode::InTile),
            (0.05, true, true, false, Nf4Decode::InTile),
            (0.05, true, true, false, Nf4Decode::Scratch),
        ] {
            if nf4_decode == Nf4Decode::Scratch && path == LoraPath::Extended {
                continue; // the Extended path always dequantizes: the same rows again
            }
            // The NF4 base on the path's own GEMMs: at these rows its forward would take the
            // GEMV, which the row after the loop checks.
            let c = Case {
                dropout,
                bias,
                nf4,
                nf4_decode,
                nf4_gemv: false,
                rslora,
                seed: seed ^ (dropout.to_bits() as u64),
                path: Some(path),
                ..base
            };
            report.extend(forward_and_backward::<bf16>(dev, c)?);
            if !realistic {
                report.extend(forward_and_backward::<f16>(dev, c)?);
            }
        }
    }
    // A QLoRA layer's forward of a few rows (decode): the NF4 GEMV, the bias and u Bᵀ in its
    // epilogue, on every path alike.
    let decode = Case {
        dropout: 0.05,
        bias: true,
        nf4: true,
        ..Case::new(seed, if realistic { 1 } else { 3 }, d_in, d_out, rank)
    };
    report.extend(forward::<bf16>(dev, decode)?);
    report.extend(forward::<f16>(dev, decode)?);
    if dev.has_wgmma() {
        // The wgmma path at a shape whose every operand TMA can load (rows a multiple of 8
        // elements), by cp.async, by TMA multicast to pairs of blocks, and by plain TMA where
        // the rows above did not already (the realistic shape's operands all take TMA).
        let loads: &[TileLoads] = if realistic {
            &[TileLoads::TmaMulticast, TileLoads::CpAsync]
        } else {
            &[TileLoads::Tma, TileLoads::TmaMulticast, TileLoads::CpAsync]
        };
        for &tile_loads in loads {
            let c = Case {
                dropout: 0.1,
                bias: true,
                tile_loads,
                path: Some(LoraPath::FusedWgmma),
                ..Case::new(
                    seed,
                    m,
                    d_in.next_multiple_of(8),
                    d_out.next_multiple_of(8),
                    8,
                )
            };
            report.extend(forward_and_backward::<bf16>(dev, c)?);
        }
    }
    Ok(())
}
