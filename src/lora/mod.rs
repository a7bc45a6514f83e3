//! LoRA in PEFT's layout (DESIGN.md §6): the fused layer kernels over a dense or NF4 base
//! ([`LoraLinear`]), and adapters on disk ([`adapter`]).
//!
//! `y = x Wᵀ + bias + scale · (dropout(x) Aᵀ) Bᵀ`, with `A [rank, in]`, `B [out, rank]`,
//! `scale = alpha / rank` (or `alpha / √rank`, rsLoRA) and the dropout mask regenerated from
//! a Philox seed. Kernels: `cuda/lora.cu` (math and what is saved: `cuda/params/lora.h`).
//! Reference: [`crate::reference::lora`]. Tests: `tests/lora_kernels.rs`.
//!
//! Forward saves `u = scale · dropout(x) Aᵀ` (`[m, rank]`, the activations' dtype) and the
//! seed; with the caller's `x` that is all backward needs: nothing `[m, out]`- or
//! `[out, in]`-sized. Backward's reductions over tokens are split by rows and summed in a
//! fixed order: deterministic, no float atomics.
//!
//! Three paths ([`LoraPath`]), the same math:
//! - **Fused**: every product on this crate's tensor-core kernels (`mma.sync`): the base GEMM
//!   runs extended along K by the low-rank term, `[u | x]·[B | W]ᵀ`, one accumulator, bias in
//!   the epilogue. Runs everywhere (the emulator too).
//! - **FusedWgmma** (Hopper, and the emulator): Fused with the two big GEMMs on `wgmma`
//!   (`cuda/include/wgmma.cuh`), the same K segments and epilogues at Hopper's tensor-core
//!   rate, with no copy of x or dY: the forward, and backward's dX (computed as dXᵀ so that A
//!   and W are read as they lie); an NF4 base's tiles are dequantized while the `wgmma`s of
//!   earlier ones run (`Nf4Operand`, `cuda/include/nf4.cuh`); the K-contiguous operands
//!   (x, u, B, a dense W; dY, v) come in by TMA where they allow it ([`TileLoads`]); the
//!   GEMMs are persistent, a block per SM walking its tiles with the next one's loads in
//!   flight while it stores the last ([`LoraLinear::with_wgmma_blocks`]); without dropout at
//!   ranks up to 32 the forward GEMM makes u itself, from its own tiles of x, so that no
//!   pass over x precedes it ([`LoraLinear::fused_down`]), and backward's dX GEMM (then in
//!   dX's own layout) makes v and dB's partials from its tiles of dY, so that dY is read
//!   once ([`LoraLinear::fused_v`], [`LoraLinear::fused_db`]), and dA's partials from the
//!   tiles of x it brings after each tile's sweep, so that no pass over x is left
//!   ([`LoraLinear::fused_da`]). Not the
//!   default: at 8192 tokens, 4096→4096, r16 on an H200 it was 0.9% and 1.7% faster than
//!   Extended (forward, backward; bench/results/2026-11-27T0501-h200), then 3.0% and 4.4%
//!   slower (2026-11-27T0544-h200, with the faster rank-wide GEMMs): within its own kernels'
//!   run-to-run spread (≈ 4-5%), and cuBLAS is the steadier. (Both runs predate the persistent
//!   GEMMs and u inside the forward GEMM.)
//! - **Extended** (the default on a GPU): the same K-extension laid out in memory, so the two
//!   big GEMMs go to cuBLAS (`wgmma` on Hopper, about twice `mma.sync`'s rate, measured in
//!   bench/results): the layer keeps W inside an extended weight
//!   `[W | B | bias | 0] over [A | 0]` (rows `ld = ⌈in + rank + 1⌉₆₄` apart), the
//!   down-projection also writes `x_ext = [x | u | 1 | 0]`, and `y = x_ext · Wextᵀ` is one
//!   GEMM; backward writes `dy_ext = [dY | v | 0]` and `dX = dy_ext · [W ; A]`. Under dropout
//!   the masked low-rank term of dX cannot ride along K: cuBLAS computes `dY W` and one more
//!   pass over dX adds it. The small products (down-projection, `v`, dA, dB, dbias) stay
//!   on the crate's kernels, which are memory-bound there.
//!
//! Framework authors who own their memory and stream run the fused paths' steps through
//! [`raw`], filling [`LoraParams`] themselves.
//!
//! Over an NF4 base the fused paths decode `Ŵ` in their base GEMMs' tiles, never
//! materializing it, or into a scratch weight each call ([`Nf4Decode`]), whichever a GPU run
//! measures faster for the GEMM. A forward of a few rows (decode, small-batch evaluation: up
//! to [`LoraLinear::nf4_gemv_rows`]) takes, on every path, `lora_down` and then the NF4 GEMV
//! with the bias and `u Bᵀ` in its epilogue ([`nf4::gemv_with_epilogue`]): the 4-bit weight
//! is read once and nothing is decoded.
//!
//! The down-projection `u` and `v = scale · dY B` are GEMMs only `rank` wide: one block per
//! 128 rows would leave most of a GPU idle, so they are split over K ([`k_split_count`],
//! [`LoraLinear::with_k_splits`]) into f32 partials that one more kernel sums in a fixed
//! order. Two variants of them wait on a GPU run to say whether they pay (bench/NOTES.md):
//! blocks that start their walks along K at different steps
//! ([`LoraLinear::with_narrow_stagger`]), and `u` in steps of 64 along K rather than 32
//! ([`LoraLinear::with_wide_down`]).

pub mod adapter;

use crate::device::blas::{self, WeightOp};
use crate::device::{check_device, Buffer, Device, Kernel, LaunchConfig, TileMap};
use crate::dtype::{DType, FloatElem};
use crate::error::{Error, Result};
use crate::nf4::{self, Nf4Weight};
use crate::params::{self, FkTensorMap, LoraParams};
pub use crate::reference::lora::LoraConfig;
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::sys::CUstream;

const MODULE: &str = "lora";
const THREADS: u32 = params::FK_GEMM_THREADS;

/// The frozen base weight `[out, in]` of a LoRA layer.
pub enum LoraBase<T: FloatElem> {
    /// A dense weight in the activations' dtype, `out × in` elements, row-major.
    Dense(Buffer<T>),
    /// An NF4-quantized weight (QLoRA), `[out, in]` as its rows and columns; the kernels use
    /// it dequantized to the activations' dtype.
    Nf4(Box<Nf4Weight>),
}

/// Which kernels compute the layer's base GEMMs (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraPath {
    /// Every product on the crate's `mma.sync` kernels; runs everywhere.
    Fused,
    /// Fused, with the forward GEMM and backward's dX on `wgmma` (Hopper, the emulator).
    FusedWgmma,
    /// The base GEMMs on cuBLAS through a K-extended layout (a GPU with cuBLAS).
    Extended,
}

impl LoraPath {
    /// The path [`LoraLinear::new`] picks on `dev`. By measurement (the module docs):
    /// cuBLAS's on a GPU, Hopper included; the mma.sync kernels where there is no GPU (the
    /// emulator).
    pub fn default_for(dev: &Device) -> LoraPath {
        if dev.has_cublas() {
            LoraPath::Extended
        } else {
            LoraPath::Fused
        }
    }
}

/// How the fused paths feed an NF4 base's `Ŵ` to their base GEMMs (the Extended path always
/// dequantizes into its scratch extended weight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Nf4Decode {
    /// Dequantized on its way into the GEMM's tiles, never materialized: no transient weight,
    /// but slower on every path measured (bench/results/2026-11-27T0501-h200, H200: the
    /// forward's kernel 3.6× the dense one on wgmma, 1.2× on mma.sync).
    InTile,
    /// Dequantized into a scratch `[out, in]` weight each call (one more pass over the
    /// weight, `out × in` elements of transient memory, freed in stream order as the
    /// Extended path's is), then the dense-base kernels. The default: the QLoRA layer then
    /// runs within 1.05× of the dense one (the same run).
    #[default]
    Scratch,
}

/// How the FusedWgmma path brings its K-contiguous operands (x, u, B, a dense W; dY, v)
/// into shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TileLoads {
    /// By TMA, one thread issuing each stage's tensor-map copies, for every operand whose
    /// address is 16-byte aligned and whose rows are a multiple of 16 bytes apart (in
    /// elements: 8); the others by cp.async.
    #[default]
    Tma,
    /// As `Tma`, with the blocks in clusters of two that share their B tiles (the forward's
    /// B and W, dX's v and dY): each block loads half of each B tile by TMA into both
    /// (multicast), so that L2 serves B once per pair. Needs every B operand loadable by TMA;
    /// otherwise, and for the forward over an NF4 base (whose B, Ŵ, each block decodes), as
    /// `Tma`.
    TmaMulticast,
    /// By cp.async from every thread (the path before TMA, kept to compare against).
    CpAsync,
}

/// The order in which the FusedWgmma GEMMs' persistent blocks walk their output tiles
/// ([`LoraLinear::with_column_runs`]). Every order computes each tile alike: the same
/// results, bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColumnRuns {
    /// Block b takes the tiles b, b + blocks, …: the blocks at work together hold a window of
    /// consecutive tiles, a few row tiles' columns.
    #[default]
    Off,
    /// Runs of at most this many consecutive column tiles of one row tile, dealt out to the
    /// blocks in turn (0 and 1: [`ColumnRuns::Off`]): a side product of the rows (u, v) is
    /// made once a run, and the blocks at work together hold about `blocks × n` tiles' rows.
    AtMost(u32),
    /// Runs as long as the launch allows: each row tile's column tiles split into ⌊blocks /
    /// row tiles⌋ runs, at least one (8 tiles a run at 8192 × 4096 → 4096 on 132 SMs).
    /// The fewest side products, but every round of tiles reads all of the rows (x, dY).
    Longest,
}

impl ColumnRuns {
    /// `LoraParams::longest_column_run`.
    fn longest(self) -> u32 {
        match self {
            ColumnRuns::Off => 0,
            ColumnRuns::AtMost(n) => n,
            ColumnRuns::Longest => u32::MAX,
        }
    }
}

/// Where the base weight lives: a dense W is kept compact (Fused) or inside the extended
/// weight (Extended, `[out + rank, extended_ld]`: see `LoraLinear::dense_ld`); an NF4 weight
/// stays NF4 and is dequantized into a scratch extended weight per call on the Extended path.
enum Base<T: FloatElem> {
    Dense(Buffer<T>),
    Nf4(Box<Nf4Weight>),
}

/// A LoRA layer on a device: the frozen base, an optional bias, and the adapter.
pub struct LoraLinear<T: FloatElem> {
    base: Base<T>,
    bias: Option<Buffer<T>>,
    /// `lora_A.weight`, `[rank, in]`.
    pub a: Buffer<T>,
    /// `lora_B.weight`, `[out, rank]`.
    pub b: Buffer<T>,
    d_in: usize,
    d_out: usize,
    config: LoraConfig,
    path: LoraPath,
    /// Splits of K for u and v (`None`: [`k_split_count`]).
    k_splits: Option<u32>,
    /// Whether the rank-wide GEMMs stagger their blocks' walks along K.
    narrow_stagger: bool,
    /// The FusedWgmma GEMMs' tile order ([`Self::with_column_runs`]).
    column_runs: ColumnRuns,
    /// Whether the FusedWgmma forward computes `u` in its GEMM where it can ([`Self::fused_down`]).
    fused_down: bool,
    /// Whether the FusedWgmma backward computes `v` in its dX GEMM where it can
    /// ([`Self::fused_v`]).
    fused_v: bool,
    /// Whether that dX GEMM makes the dB partials too ([`Self::fused_db`]).
    fused_db: bool,
    /// Whether it makes the dA partials too ([`Self::fused_da`]).
    fused_da: bool,
    /// Whether `u` comes from `lora_down_k64` (steps of 64 along K) rather than `lora_down`.
    wide_down: bool,
    nf4_decode: Nf4Decode,
    nf4_gemv_rows: usize,
    tile_loads: TileLoads,
    /// Most blocks of the wgmma base GEMMs (`None`: one per SM).
    wgmma_blocks: Option<usize>,
    /// This layer among the process's ([`NEXT_LAYER`]), which its [`Saved`] carry.
    id: u64,
}

/// The id the next [`LoraLinear`] gets.
static NEXT_LAYER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What forward keeps for backward (besides the caller's `x`), for the layer that made it
/// only: another layer's backward refuses it (layers of one shape, a model's every q_proj,
/// would otherwise take each other's silently).
pub struct Saved<T: FloatElem> {
    /// `scale · dropout(x) Aᵀ`, `[m, rank]`.
    pub u: Buffer<T>,
    /// Rows of `x` forward took (tokens).
    pub m: usize,
    /// The dropout seed forward used.
    pub seed: u64,
    /// The layer whose forward made it ([`LoraLinear`]'s `id`).
    layer: u64,
}

impl<T: FloatElem> Saved<T> {
    /// The device memory this holds for backward: `u`'s bytes (the seed and `m` live on the
    /// host). The layer keeps nothing else between a forward and its backward: workspaces are
    /// freed with the call that made them.
    pub fn device_bytes(&self) -> usize {
        self.u.len() * std::mem::size_of::<T>()
    }
}

/// The gradients of one backward pass. Parameter gradients are f32 (for f32 optimizer
/// state), `dx` is in the activations' dtype.
pub struct LoraGrads<T: FloatElem> {
    /// `[m, in]`
    pub dx: Buffer<T>,
    /// `[rank, in]`
    pub da: Buffer<f32>,
    /// `[out, rank]`
    pub db: Buffer<f32>,
    /// `[out]`, when the layer has a bias.
    pub dbias: Option<Buffer<f32>>,
}

fn kernel(name: String) -> Kernel {
    Kernel {
        module: MODULE,
        name,
    }
}

/// The field of `p` holding the tensor map its `FK_LORA_TMA_*` bit flags.
fn tma_slot(p: &mut LoraParams, bit: u32) -> &mut FkTensorMap {
    match bit {
        params::FK_LORA_TMA_X => &mut p.x_map,
        params::FK_LORA_TMA_W => &mut p.w_map,
        params::FK_LORA_TMA_U => &mut p.u_map,
        params::FK_LORA_TMA_B => &mut p.b_map,
        params::FK_LORA_TMA_DY => &mut p.dy_map,
        params::FK_LORA_TMA_V => &mut p.v_map,
        params::FK_LORA_TMA_A => &mut p.a_map,
        _ => unreachable!("tma_maps names only FK_LORA_TMA_* bits"),
    }
}

/// The row length of an extended matrix of `cols` columns: a multiple of 64 elements, so
/// every row starts on a 128-byte cache line (TMA needs only 16-byte strides; unaligned rows
/// split loads across lines, and K a multiple of 64 leaves cuBLAS no partial K tile). The
/// padding is zeros, and the forward GEMM runs K over it.
fn padded_ld(cols: usize) -> usize {
    cols.div_ceil(64) * 64
}

/// `lora_down` (u, K = in) or `lora_backward_v` (v, K = out), `name`, for the buffers `p`
/// names: its variant in steps of 64 (`{name}_k64`) where `wide`, split over K into
/// `p.rank_partials` when `p.k_splits > 1` and then summed by `{name}_reduce`, which also
/// writes the tail of x_ext's (dy_ext's) rows where `p` names one.
///
/// # Safety
/// Every buffer `p` names must hold what cuda/params/lora.h says for its shapes.
unsafe fn rank_launch(
    dev: &Device,
    stream: Option<CUstream>,
    name: &str,
    wide: bool,
    t: DType,
    p: &LoraParams,
) -> Result<()> {
    let (m, r, splits) = (p.m as usize, p.rank as usize, p.k_splits.max(1));
    // An extended row's tail past `base`: the rank's columns, then `ones` (x_ext's column of
    // ones) and zeros to `ld`; the kernel walks it in 32-bit indices.
    let tail = |ld: u64, base: u32, ones: u64| -> Result<usize> {
        let least = u64::from(base) + u64::from(p.rank) + ones;
        if ld < least || ld > u64::from(u32::MAX) {
            return Err(Error::InvalidArgument {
                what: "lora extended rows",
                why: format!("row stride {ld}: from {least} to {} elements", u32::MAX),
            });
        }
        Ok((ld - u64::from(base)) as usize)
    };
    let width = match (name, p.x_ext.is_null(), p.dy_ext.is_null()) {
        ("lora_down", false, _) => tail(p.x_ld, p.d_in, 1)?,
        ("lora_backward_v", _, false) => tail(p.dy_ld, p.d_out, 0)?,
        _ => r,
    };
    let (variant, launch) = if wide {
        ("_k64", LaunchConfig::narrow(m, r, splits).with_wide_steps())
    } else {
        ("", LaunchConfig::narrow(m, r, splits))
    };
    // SAFETY: forwarded from this function's contract.
    unsafe {
        dev.launch_on(&kernel(format!("{name}{variant}_{t}")), launch, stream, p)?;
        if splits == 1 {
            return Ok(());
        }
        dev.launch_on(
            &kernel(format!("{name}_reduce_{t}")),
            LaunchConfig::grid_stride((m * width) as u64, THREADS, 1 << 16),
            stream,
            p,
        )
    }
}

/// The width of the side product (16 or 32) with which a wgmma GEMM makes u or v of `rank`
/// beside its own product (`lora_forward_down{16,32}_wgmma`, `lora_backward_dx_v{16,32}_wgmma`),
/// or `None` past `FK_WGMMA_SIDE_ROWS` (the side tiles would not fit beside the stages).
fn side_width(rank: u32) -> Option<u32> {
    let fits = (1..=params::FK_WGMMA_SIDE_ROWS).contains(&rank);
    fits.then_some(if rank <= 16 { 16 } else { 32 })
}

/// [`side_width`] for u, which the forward's GEMM can make only without dropout (u needs the
/// masked x, which its tiles do not hold).
fn down_width(rank: u32, dropout: f32) -> Option<u32> {
    (dropout == 0.0).then(|| side_width(rank)).flatten()
}

/// Which wgmma base GEMM a fused op is (its launch's shared memory, [`LoraLinear::tma_maps`]'
/// operands).
#[derive(Clone, Copy)]
enum WgmmaGemm {
    /// The forward: u read (`None`: `forward`) or made beside y from a side tile of that many
    /// rows (`forward_down16`, `forward_down32`).
    Forward(Option<u32>),
    /// dX as dXᵀ = [A ; W]ᵀ · [v | dY]ᵀ (`backward_dx`).
    DxTransposed,
    /// dX = [dY | v] · [W ; A], v (and the dB partials, where asked) made beside it from a
    /// side tile of that many rows of Bᵀ (`backward_dx_v16`, `backward_dx_v32`).
    DxWithV(u32),
}

impl WgmmaGemm {
    /// The GEMM of fused op `op` (as [`fused_gemm_launch`] names them).
    fn of(op: &str) -> Self {
        if op == "backward_dx" {
            WgmmaGemm::DxTransposed
        } else if let Some(rows) = op.strip_prefix("backward_dx_v") {
            WgmmaGemm::DxWithV(rows.parse().unwrap_or(params::FK_WGMMA_SIDE_ROWS))
        } else {
            WgmmaGemm::Forward(op.strip_prefix("forward_down").and_then(|w| w.parse().ok()))
        }
    }

    /// Its launch's dynamic shared memory: the stages, and the side tiles where it has any
    /// (and dX's tile of `[u | 1]` for the dB partials).
    fn shared_bytes(self) -> u32 {
        match self {
            WgmmaGemm::Forward(Some(_)) => params::FK_WGMMA_SIDE_SMEM_BYTES,
            WgmmaGemm::DxWithV(_) => params::FK_WGMMA_SIDE_ACROSS_SMEM_BYTES,
            _ => params::FK_WGMMA_SMEM_BYTES,
        }
    }
}

/// The dynamic shared memory the launches of LoRA kernel `name` (one of [`kernels`]) ask for:
/// a wgmma GEMM's stages and side tiles (`WgmmaGemm::shared_bytes`) and the rank-wide GEMMs'
/// tiles (`LaunchConfig::narrow`); 0 for the others, whose shared memory is static.
pub fn launch_shared_bytes(name: &str) -> u32 {
    let op = name
        .strip_prefix("lora_")
        .and_then(|n| n.rsplit_once('_'))
        .map_or("", |(op, _dtype)| op);
    if let Some(gemm) = op.strip_suffix("_wgmma") {
        return WgmmaGemm::of(gemm.strip_suffix("_nf4").unwrap_or(gemm)).shared_bytes();
    }
    match op {
        "down" | "backward_v" | "grad_a" | "grad_b" => params::FK_NARROW_SMEM_BYTES,
        "down_k64" => params::FK_NARROW_WIDE_SMEM_BYTES,
        _ => 0,
    }
}

/// The fused paths' base GEMM `op` (`forward`; `forward_down16` or `forward_down32`, which
/// compute u too, on wgmma only; `backward_dx`: computed as dXᵀ on wgmma; or `backward_dx_v16`
/// or `backward_dx_v32`, dX computing v too, on wgmma only) for `m` rows and an `n`-wide
/// output, its base decoded from NF4 in its tiles where `nf4` is `"nf4_"`: on `mma.sync`
/// (`wgmma` None), or on wgmma launched persistent in clusters of `cluster` on at most
/// `max_blocks` blocks.
fn fused_gemm_launch(
    op: &str,
    nf4: &str,
    t: DType,
    wgmma: Option<(u32, usize)>,
    m: usize,
    n: usize,
) -> (Kernel, LaunchConfig) {
    match wgmma {
        Some((cluster, max_blocks)) => {
            let gemm = WgmmaGemm::of(op);
            let transposed = matches!(gemm, WgmmaGemm::DxTransposed);
            let launch = LaunchConfig::wgmma(m, n, transposed, cluster, max_blocks)
                .with_shared_bytes(gemm.shared_bytes());
            (kernel(format!("lora_{op}_{nf4}wgmma_{t}")), launch)
        }
        None => (
            kernel(format!("lora_{op}_{nf4}{t}")),
            LaunchConfig::tiles(m, n, 1),
        ),
    }
}

/// dX by a fused base GEMM (`name`, `cfg`), then, where it is a wgmma one (`wgmma`) and
/// there is dropout, the masked low-rank term that one leaves out.
///
/// # Safety
/// As [`rank_launch`]; the wgmma kernels only where the device has wgmma.
unsafe fn backward_dx_launch(
    dev: &Device,
    stream: Option<CUstream>,
    t: DType,
    (name, cfg): (&Kernel, LaunchConfig),
    wgmma: bool,
    p: &LoraParams,
) -> Result<()> {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        dev.launch_on(name, cfg, stream, p)?;
        if wgmma && p.dropout > 0.0 {
            masked_lora_dx(dev, stream, t, p)?;
        }
    }
    Ok(())
}

/// dX with v made beside it (`lora_backward_dx_v{16,32}[_nf4]_wgmma`, `name`, `cfg`): Bᵀ into
/// `p.bt` first (`lora_transpose_b`: the kernel's side tile takes rows of it), then as
/// [`backward_dx_launch`] on wgmma.
///
/// # Safety
/// As [`rank_launch`], `p.bt` holding `[rank, out]`; only where the device has wgmma.
unsafe fn backward_dx_v_launch(
    dev: &Device,
    stream: Option<CUstream>,
    t: DType,
    (name, cfg): (&Kernel, LaunchConfig),
    p: &LoraParams,
) -> Result<()> {
    let n = u64::from(p.rank) * u64::from(p.d_out);
    // SAFETY: forwarded from this function's contract.
    unsafe {
        dev.launch_on(
            &kernel(format!("lora_transpose_b_{t}")),
            LaunchConfig::grid_stride(n, THREADS, 1 << 16),
            stream,
            p,
        )?;
        backward_dx_launch(dev, stream, t, (name, cfg), true, p)
    }
}

/// dX += mask ⊙ (v A) / (1 - p) (`lora_dx_fixup`): the low-rank term under dropout, after a
/// dX GEMM that left it out (cuBLAS on the Extended path, the wgmma kernel on FusedWgmma),
/// since the mask applies to it alone.
///
/// # Safety
/// As [`rank_launch`].
unsafe fn masked_lora_dx(
    dev: &Device,
    stream: Option<CUstream>,
    t: DType,
    p: &LoraParams,
) -> Result<()> {
    // SAFETY: forwarded from this function's contract.
    unsafe {
        dev.launch_on(
            &kernel(format!("lora_dx_fixup_{t}")),
            LaunchConfig::tiles(p.m as usize, p.d_in as usize, 1),
            stream,
            p,
        )
    }
}

impl<T: FloatElem> LoraLinear<T> {
    /// A layer from its parts; checks every shape, dtype and device against the config.
    pub fn new(
        base: LoraBase<T>,
        bias: Option<Buffer<T>>,
        a: Buffer<T>,
        b: Buffer<T>,
        config: LoraConfig,
    ) -> Result<Self> {
        config.validate()?;
        if config.rank > LoraConfig::MAX_RANK {
            return Err(Error::Unsupported {
                op: "lora",
                why: format!(
                    "rank {} is over {}, the most the layer takes",
                    config.rank,
                    LoraConfig::MAX_RANK
                ),
            });
        }
        if !matches!(T::DTYPE, DType::BF16 | DType::F16) {
            return Err(Error::UnsupportedDtype {
                op: "lora",
                dtypes: T::DTYPE.to_string(),
            });
        }
        let (d_out, d_in) = match &base {
            LoraBase::Dense(w) => {
                // A dense base has no shape of its own: `in` is A's, `out` B's, each whole.
                let (r, whole) = (config.rank, |n: usize| n.div_ceil(config.rank));
                Error::check_shape("lora A [rank, in]", &[r, whole(a.len())], a.len())?;
                Error::check_shape("lora B [out, rank]", &[whole(b.len()), r], b.len())?;
                let (d_in, d_out) = (a.len() / r, b.len() / r);
                let what = "lora base weight [out, in], out B's rows, in A's columns";
                Error::check_shape(what, &[d_out, d_in], w.len())?;
                (d_out, d_in)
            }
            LoraBase::Nf4(w) => (w.rows(), w.cols()),
        };
        if d_in == 0 || d_out == 0 || d_in > u32::MAX as usize || d_out > u32::MAX as usize {
            return Err(Error::Unsupported {
                op: "lora",
                why: format!("layer shape [{d_out}, {d_in}]"),
            });
        }
        Error::check_shape("lora A [rank, in]", &[config.rank, d_in], a.len())?;
        Error::check_shape("lora B [out, rank]", &[d_out, config.rank], b.len())?;
        let dev = a.device().clone();
        check_device(&dev, &b)?;
        match &base {
            LoraBase::Dense(w) => check_device(&dev, w)?,
            LoraBase::Nf4(w) => {
                if !dev.same(w.device()) {
                    return Err(Error::DeviceMismatch);
                }
            }
        }
        if let Some(bias) = &bias {
            Error::check_shape("bias [out]", &[d_out], bias.len())?;
            check_device(&dev, bias)?;
        }
        let path = LoraPath::default_for(&dev);
        let base = match base {
            LoraBase::Dense(w) => Base::Dense(w),
            LoraBase::Nf4(q) => Base::Nf4(q),
        };
        let layer = LoraLinear {
            base,
            bias,
            a,
            b,
            d_in,
            d_out,
            config,
            path: LoraPath::Fused,
            k_splits: None,
            narrow_stagger: false,
            column_runs: ColumnRuns::Off,
            fused_down: true,
            fused_v: true,
            fused_db: true,
            fused_da: true,
            wide_down: false,
            nf4_decode: Nf4Decode::default(),
            nf4_gemv_rows: nf4::GEMV_MAX_ROWS,
            tile_loads: TileLoads::default(),
            wgmma_blocks: None,
            id: NEXT_LAYER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        layer.with_path(path)
    }

    /// The layer moved to `path` (Extended needs a GPU with cuBLAS). For a dense base the
    /// Extended path moves W into the extended weight (no second copy of W is kept).
    pub fn with_path(mut self, path: LoraPath) -> Result<Self> {
        if path == self.path {
            return Ok(self);
        }
        if path == LoraPath::Extended {
            // Why not, where it cannot: no GPU, no libcublas, or cublasCreate's own error.
            self.blas()?;
        }
        if path == LoraPath::FusedWgmma && !self.device().has_wgmma() {
            return Err(Error::Unsupported {
                op: "lora",
                why: format!(
                    "the wgmma path needs Hopper (sm_90a); {}",
                    self.device().describe()
                ),
            });
        }
        if let Base::Dense(w) = &self.base {
            let (ld, new_ld) = (self.dense_ld(self.path), self.dense_ld(path));
            let rows = match path {
                LoraPath::Extended => self.d_out + self.config.rank,
                LoraPath::Fused | LoraPath::FusedWgmma => self.d_out,
            };
            let mut moved = self.device().zeros::<T>(rows * new_ld)?;
            moved.copy_rows_from(w, self.d_out, self.d_in, ld, new_ld)?;
            self.base = Base::Dense(moved);
        }
        self.path = path;
        Ok(self)
    }

    /// The row stride of a dense base on `path`: compact on the fused path, the extended
    /// weight's on the extended one.
    fn dense_ld(&self, path: LoraPath) -> usize {
        match path {
            LoraPath::Fused | LoraPath::FusedWgmma => self.d_in,
            LoraPath::Extended => self.extended_ld(),
        }
    }

    /// The kernels that compute the base GEMMs now ([`Self::with_path`]; at construction,
    /// [`LoraPath::Extended`] on a GPU with cuBLAS, else [`LoraPath::Fused`]).
    pub fn path(&self) -> LoraPath {
        self.path
    }

    /// The layer with the two GEMMs only `rank` wide (`u = x Aᵀ`, `v = dY B`) split into
    /// `splits` ranges of K, summed in order by one more kernel; `None` picks by shape
    /// ([`k_split_count`]). A tuning and testing knob: results differ only by rounding.
    pub fn with_k_splits(mut self, splits: Option<u32>) -> Result<Self> {
        if splits.is_some_and(|s| !(1..=MAX_K_SPLITS).contains(&s)) {
            return Err(Error::InvalidArgument {
                what: "k_splits",
                why: format!("{splits:?}: from 1 to {MAX_K_SPLITS}"),
            });
        }
        self.k_splits = splits;
        Ok(self)
    }

    /// The layer with the GEMMs only `rank` wide (`u`, `v`, and the weight gradients, each a
    /// read of an activation against a narrow factor) staggered: the blocks start their walks
    /// along K at different steps, so that the blocks at work together read different columns
    /// of their rows rather than all the same few, in case the memory system serves that
    /// pattern poorly (bench/NOTES.md, "the rank-wide GEMMs"). Off by default until a GPU
    /// run says it pays. Results differ only by rounding (another order of the same sums).
    pub fn with_narrow_stagger(mut self, stagger: bool) -> Self {
        self.narrow_stagger = stagger;
        self
    }

    /// The layer with the FusedWgmma GEMMs' persistent blocks each walking runs of
    /// consecutive column tiles of one row tile ([`ColumnRuns`]) rather than the tiles b,
    /// b + 132, …: the order in which a forward that makes u in its GEMM
    /// ([`Self::fused_down`]), or a dX that makes v ([`Self::fused_v`]), makes it once a run
    /// and keeps it for the run's tiles (bench/NOTES.md, "the forward's u inside its GEMM"),
    /// and which may cost DRAM and L2 traffic (the longer the runs, the more rows each round
    /// of tiles reads): the benchmarks time runs of 2, 4 and the longest against the window
    /// order. Off by default until a GPU run says; the same results, bit for bit. A launch
    /// with a block per tile (clusters, unless [`LoraLinear::with_wgmma_blocks`] says
    /// otherwise) makes every run a single tile.
    pub fn with_column_runs(mut self, runs: ColumnRuns) -> Self {
        self.column_runs = runs;
        self
    }

    /// The layer with the FusedWgmma forward computing `u` inside its base GEMM where it can
    /// (the default; `false`: `lora_down`, then the GEMM, as the other cases run):
    /// [`Self::fused_down`] says where.
    pub fn with_fused_down(mut self, fused: bool) -> Self {
        self.fused_down = fused;
        self
    }

    /// The width of the side product (16 or 32) when the forward computes `u` inside its
    /// GEMM: on the FusedWgmma path, without dropout, at ranks up to 32, unless
    /// [`Self::with_fused_down`] turned it off; `None` otherwise. The kernel
    /// (`lora_forward_down{16,32}_wgmma`) multiplies each tile of x by A's rows beside W's
    /// (`wgmma.m64n16k16` or `m64n32k16`, 16 or 32 columns beside the tile's 256: 6.25% or
    /// 12.5% more tensor work), then adds `scale · u Bᵀ` from those registers: no pass of
    /// its own over x for `u` (`lora_down`: 4.6% of the base GEMM's time at the copy rate,
    /// 8192 × 4096 → 4096, bench/NOTES.md). Each tile computes u, unless it follows a tile of
    /// the same rows on its block, whose u it keeps in registers (in
    /// [`Self::with_column_runs`]' order: once a run of column tiles); the row's first column
    /// tile writes it. Under dropout `u` needs the masked x, which the tiles do not hold;
    /// larger ranks' tiles would not fit beside the stages.
    pub fn fused_down(&self) -> Option<u32> {
        let on = self.fused_down && self.path == LoraPath::FusedWgmma;
        on.then(|| down_width(self.config.rank as u32, self.config.dropout))
            .flatten()
    }

    /// The layer with the FusedWgmma backward computing `v` inside its dX GEMM where it can
    /// (the default; `false`: `lora_backward_v`, then the dX GEMM, as the other cases run):
    /// [`Self::fused_v`] says where.
    pub fn with_fused_v(mut self, fused: bool) -> Self {
        self.fused_v = fused;
        self
    }

    /// The width of the side product (16 or 32) when the backward computes `v = scale · dY B`
    /// inside its dX GEMM: on the FusedWgmma path at ranks up to 32, with dropout or without,
    /// unless [`Self::with_fused_v`] turned it off; `None` otherwise. The kernel
    /// (`lora_backward_dx_v{16,32}_wgmma`) computes dX = dY W + scale · v A in dX's own
    /// layout (dY the K-major A, W and A read as they lie as wgmma's MN-major B) and makes v
    /// beside it from the same tiles of dY, as [`Self::fused_down`]'s forward makes u from x:
    /// no pass of its own over dY for `v` (`lora_backward_v`). Kept across tiles of the same
    /// rows ([`Self::with_column_runs`]), written by the row's first column tile for dA.
    /// Under dropout the kernel leaves the masked term out and `lora_dx_fixup` adds it, as
    /// on the other wgmma path.
    pub fn fused_v(&self) -> Option<u32> {
        let on = self.fused_v && self.path == LoraPath::FusedWgmma;
        on.then(|| side_width(self.config.rank as u32)).flatten()
    }

    /// The layer with the dX GEMM that makes `v` making the partials of `dB` and `dbias` too
    /// (the default; `false`: `lora_grad_b` makes them, as the other cases do):
    /// [`Self::fused_db`] says where.
    pub fn with_fused_db(mut self, fused: bool) -> Self {
        self.fused_db = fused;
        self
    }

    /// Whether the backward's dX GEMM makes the partials of `dB = dYᵀ u` and `dbias` (as
    /// `[dB | dbias] = dYᵀ [u | 1]`, one per 128 rows) beside dX and `v`: wherever
    /// [`Self::fused_v`] is on, unless [`Self::with_fused_db`] turned it off. Each of the
    /// GEMM's steps over dY's tile (64 columns of dY) is multiplied once more, by one of the
    /// column tiles of its rows in turn, read across its rows times the tile's `[u | 1]`: no
    /// pass of its own over dY for `dB` (`lora_grad_b`), whose partials `lora_reduce` adds as
    /// before, in a fixed order.
    pub fn fused_db(&self) -> bool {
        self.fused_db && self.fused_v().is_some()
    }

    /// The layer with the dX GEMM that makes `v` making the partials of `dA` too where it
    /// can (the default; `false`: `lora_grad_a` makes them, as the other cases do):
    /// [`Self::fused_da`] says where.
    pub fn with_fused_da(mut self, fused: bool) -> Self {
        self.fused_da = fused;
        self
    }

    /// Whether the backward's dX GEMM makes the partials of `dA = vᵀ dropout(x)` (one per
    /// 128 rows) beside dX and `v`: wherever [`Self::fused_v`] is on, unless
    /// [`Self::with_fused_da`] turned it off. After each tile's sweep of dY, when its `v` is
    /// whole, two more steps bring the tile's x (the tile has x's shape: 128 rows by 256 of
    /// its columns), zero what dropout drops (the mask regenerated, as everywhere), and
    /// multiply it, read across its rows, by `scale · v` (`wgmma.m64n16k16` or `m64n32k16`, a
    /// few per step): no pass of its own over x for `dA` (`lora_grad_a`, the last one the
    /// backward had), whose partials `lora_reduce` adds as before, in a fixed order.
    pub fn fused_da(&self) -> bool {
        self.fused_da && self.fused_v().is_some()
    }

    /// The layer with `u = x Aᵀ` computed by `lora_down_k64`, whose steps along K are 64
    /// wide, not 32: each step reads a whole 128-byte line of each bf16 row rather than half
    /// of one, in 4 stages of 27 KB rather than 6 of 15 (two blocks per SM either way). A
    /// variant the benchmarks set against `lora_down` (bench/NOTES.md), off by default until
    /// a GPU run says which is faster. Results differ only by rounding.
    pub fn with_wide_down(mut self, wide: bool) -> Self {
        self.wide_down = wide;
        self
    }

    /// The layer with an NF4 base's `Ŵ` fed to the fused paths' base GEMMs as `decode` says
    /// (no effect on a dense base, or on the Extended path).
    pub fn with_nf4_decode(mut self, decode: Nf4Decode) -> Self {
        self.nf4_decode = decode;
        self
    }

    /// How the fused paths feed an NF4 base's `Ŵ` to their base GEMMs
    /// ([`Self::with_nf4_decode`]; [`Nf4Decode::Scratch`] by default).
    pub fn nf4_decode(&self) -> Nf4Decode {
        self.nf4_decode
    }

    /// The layer with an NF4 base's forward of up to `rows` rows (at most
    /// [`nf4::GEMV_MAX_ROWS`]; 0: none) on the NF4 tensor-core GEMV, on every path: `u` from
    /// `lora_down`, then the GEMV reads the 4-bit weight once and adds the bias and `u Bᵀ`
    /// in its epilogue ([`nf4::gemv_with_epilogue`]), where the other paths would first
    /// decode `Ŵ` (into a scratch weight, or in each tile of a GEMM sized for many rows).
    /// Decode and small-batch evaluation. The backward is as before.
    pub fn with_nf4_gemv_rows(mut self, rows: usize) -> Self {
        self.nf4_gemv_rows = rows.min(nf4::GEMV_MAX_ROWS);
        self
    }

    /// Rows up to which an NF4 base's forward takes the GEMV ([`Self::with_nf4_gemv_rows`];
    /// [`nf4::GEMV_MAX_ROWS`] by default).
    pub fn nf4_gemv_rows(&self) -> usize {
        self.nf4_gemv_rows
    }

    /// Whether a forward of `m` rows takes the NF4 GEMV ([`Self::with_nf4_gemv_rows`]): an
    /// NF4 base and at most that many rows.
    pub fn forward_on_nf4_gemv(&self, m: usize) -> bool {
        matches!(self.base, Base::Nf4(_)) && m <= self.nf4_gemv_rows
    }

    /// The layer with the FusedWgmma path's operands loaded as `loads` says (no effect on
    /// the other paths).
    pub fn with_tile_loads(mut self, loads: TileLoads) -> Self {
        self.tile_loads = loads;
        self
    }

    /// How the FusedWgmma path loads its operands' tiles ([`Self::with_tile_loads`];
    /// [`TileLoads::Tma`] by default).
    pub fn tile_loads(&self) -> TileLoads {
        self.tile_loads
    }

    /// The layer with the FusedWgmma path's base GEMMs launched on at most `blocks` blocks,
    /// each walking its share of the output tiles (`None`: one block per SM, the default;
    /// fewer leave SMs to work on other streams; clustered launches,
    /// [`TileLoads::TmaMulticast`], a block per tile unless told). A tuning and testing knob:
    /// results do not depend on it.
    pub fn with_wgmma_blocks(mut self, blocks: Option<usize>) -> Result<Self> {
        if blocks == Some(0) {
            return Err(Error::InvalidArgument {
                what: "wgmma_blocks",
                why: "0 blocks: at least 1".into(),
            });
        }
        self.wgmma_blocks = blocks;
        Ok(self)
    }

    /// Whether the fused paths' base GEMMs read a scratch dequantized `Ŵ` (an NF4 base,
    /// [`Nf4Decode::Scratch`]).
    fn decodes_to_scratch(&self) -> bool {
        matches!(self.base, Base::Nf4(_)) && self.nf4_decode == Nf4Decode::Scratch
    }

    /// For the fused paths' base GEMM: with [`Nf4Decode::Scratch`], `Ŵ` dequantized into a
    /// scratch weight that `p` now names as a dense base (keep it until the kernel has run:
    /// its memory is freed in stream order).
    fn scratch_base(&self, p: &mut LoraParams) -> Result<Option<Buffer<T>>> {
        let Base::Nf4(q) = &self.base else {
            return Ok(None);
        };
        if !self.decodes_to_scratch() {
            return Ok(None);
        }
        let mut w = self.device().alloc_output::<T>(self.d_out * self.d_in)?;
        q.dequantize(&mut w)?;
        p.w = w.ptr();
        p.w_ld = self.d_in as u64;
        Ok(Some(w))
    }

    /// `u` (`lora_down`, K = in) or `v` (`lora_backward_v`, K = out) into the buffers `p`
    /// names (and the tail of x_ext's or dy_ext's rows where `p` names one), through the
    /// kernel's variant in steps of 64 (`{name}_k64`) where `wide`, split over K as the layer
    /// says.
    fn rank_gemm(
        &self,
        name: &str,
        wide: bool,
        p: &mut LoraParams,
        m: usize,
        k: usize,
    ) -> Result<()> {
        let dev = self.device();
        let r = self.config.rank;
        let splits = self
            .k_splits
            .unwrap_or_else(|| k_split_count(m, k, dev.sm_count()));
        let mut partials = None;
        if splits > 1 {
            let buf = partials.insert(dev.alloc_output::<f32>(splits as usize * m * r)?);
            p.rank_partials = buf.ptr_mut() as *mut f32;
        }
        p.k_splits = splits;
        // SAFETY: the caller sized every buffer in p for m rows; the partials hold
        // splits · m · rank f32 when split.
        let launched = unsafe { rank_launch(dev, None, name, wide, T::DTYPE, p) };
        p.rank_partials = std::ptr::null_mut();
        p.k_splits = 1;
        launched
    }

    /// The layer's hyper-parameters: rank, alpha, rsLoRA, dropout and the dropout seed the
    /// next forward uses.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Sets the dropout seed the next forward uses (draw a fresh one per step).
    pub fn set_seed(&mut self, seed: u64) {
        self.config.seed = seed;
    }

    /// Input features: the columns of the base weight and of A, the width of `x`'s rows.
    pub fn d_in(&self) -> usize {
        self.d_in
    }

    /// Output features: the rows of the base weight and of B, the width of `y`'s rows.
    pub fn d_out(&self) -> usize {
        self.d_out
    }

    /// The device the layer runs on: A's, where B, the base, the bias and every call's
    /// buffers must be too.
    pub fn device(&self) -> &Device {
        self.a.device()
    }

    /// The params every kernel of the layer shares; the per-call buffers start null. A and B
    /// are public (an optimizer updates them in place), so their shapes and device are
    /// checked again here, before any kernel reads them.
    fn params(&self, m: usize, seed: u64) -> Result<LoraParams> {
        let r = self.config.rank;
        Error::check_shape("lora A [rank, in]", &[r, self.d_in], self.a.len())?;
        Error::check_shape("lora B [out, rank]", &[self.d_out, r], self.b.len())?;
        check_device(self.device(), &self.b)?;
        let base_device = match &self.base {
            Base::Dense(w) => w.device(),
            Base::Nf4(q) => q.device(),
        };
        if !self.device().same(base_device) {
            return Err(Error::DeviceMismatch);
        }
        let (w, w_ld, nf4) = match &self.base {
            Base::Dense(w) => (
                w.ptr(),
                self.dense_ld(self.path) as u64,
                params::Nf4Weight::default(),
            ),
            Base::Nf4(q) => (std::ptr::null(), 0, q.params()),
        };
        Ok(LoraParams {
            m: m as u32,
            d_in: self.d_in as u32,
            d_out: self.d_out as u32,
            rank: self.config.rank as u32,
            w,
            nf4,
            bias: self.bias.as_ref().map_or(std::ptr::null(), |b| b.ptr()),
            a: self.a.ptr(),
            b: self.b.ptr(),
            scale: self.config.scale(),
            dropout: self.config.dropout,
            seed,
            splits: 1,
            w_ld,
            k_splits: 1,
            narrow_stagger: self.narrow_stagger.into(),
            longest_column_run: self.column_runs.longest(),
            ..LoraParams::default()
        })
    }

    fn check_rows(&self, what: &str, buf: &Buffer<T>, m: usize, cols: usize) -> Result<()> {
        if m > u32::MAX as usize {
            // The kernels' params hold the rows as u32.
            return Err(Error::Unsupported {
                op: "lora",
                why: format!("{m} rows of {what}: at most {} a call", u32::MAX),
            });
        }
        Error::check_shape(what, &[m, cols], buf.len())?;
        check_device(self.device(), buf)
    }

    /// The fused paths' base GEMM `op` (as [`fused_gemm_launch`]'s) for `m` rows and an
    /// `n`-wide output: its kernel and launch, and on wgmma the tensor maps of its TMA loads
    /// in `p` (whose buffers, a scratch base's included, are set).
    fn base_gemm(
        &self,
        op: &str,
        p: &mut LoraParams,
        m: usize,
        n: usize,
    ) -> Result<(Kernel, LaunchConfig)> {
        let nf4 = self.nf4_prefix();
        let t = T::DTYPE;
        Ok(if self.path == LoraPath::FusedWgmma {
            let gemm = WgmmaGemm::of(op);
            let shared = self.tile_loads != TileLoads::CpAsync && self.tma_maps(p, gemm, m)?;
            // A pair shares B; clustered, a block per tile unless told (LaunchConfig::wgmma).
            let (cluster, max_blocks) = if shared {
                (2, self.wgmma_blocks.unwrap_or(usize::MAX))
            } else {
                (1, self.wgmma_blocks.unwrap_or(self.device().sm_count()))
            };
            fused_gemm_launch(op, nf4, t, Some((cluster, max_blocks)), m, n)
        } else {
            fused_gemm_launch(op, nf4, t, None, m, n)
        })
    }

    /// Encodes the tensor map of each operand of the wgmma base GEMM `gemm` that TMA can
    /// load, and flags it in `p.tma`: the forward's x and u (boxes of the tile's rows), B and
    /// a dense W (the tile's columns), and A where the forward computes u (its side tile's
    /// rows); dXᵀ's dY and v (its B: boxes of dXᵀ's columns), and its A operands, A and a
    /// dense W, read along their rows (boxes of 64 of them by 64 lines of K); dX's dY (boxes
    /// of the tile's rows) and, where it makes v, its MN-major B, W and A, read along their
    /// rows likewise, its side tile's Bᵀ (`p.bt`: boxes of its rows), and x as the forward's
    /// where it makes dA's partials (`p.a_splits`). Returns whether B
    /// is shared by pairs of blocks ([`TileLoads::TmaMulticast`]; its boxes are then half
    /// the tile's columns): never where B is MN-major.
    fn tma_maps(&self, p: &mut LoraParams, gemm: WgmmaGemm, m: usize) -> Result<bool> {
        let (rows_a, rows_b, lines) = (params::FK_WGMMA_TILE_M, params::FK_WGMMA_TILE_N, 64);
        let (r, d_in, d_out) = (self.config.rank, self.d_in, self.d_out);
        let tile = |ptr: *const std::ffi::c_void, cols, rows, ld, box_rows| TileMap {
            ptr,
            cols,
            rows,
            ld,
            box_rows,
        };
        let w_ld = if p.w_ld == 0 { d_in } else { p.w_ld as usize };
        let (mut operands, w_box, b_bits) = match gemm {
            WgmmaGemm::DxTransposed => (
                vec![
                    (params::FK_LORA_TMA_DY, tile(p.dy, d_out, m, d_out, rows_b)),
                    (params::FK_LORA_TMA_V, tile(p.v, r, m, r, rows_b)),
                    (params::FK_LORA_TMA_A, tile(p.a, d_in, r, d_in, lines)),
                ],
                lines,
                vec![params::FK_LORA_TMA_DY, params::FK_LORA_TMA_V],
            ),
            WgmmaGemm::DxWithV(side_rows) => {
                let mut operands = vec![
                    (params::FK_LORA_TMA_DY, tile(p.dy, d_out, m, d_out, rows_a)),
                    (
                        params::FK_LORA_TMA_B,
                        tile(p.bt.cast_const(), d_out, r, d_out, side_rows),
                    ),
                    (params::FK_LORA_TMA_A, tile(p.a, d_in, r, d_in, lines)),
                ];
                if p.a_splits != 0 {
                    // x's tile, for dA's partials: the forward's boxes.
                    operands.push((params::FK_LORA_TMA_X, tile(p.x, d_in, m, d_in, rows_a)));
                }
                (operands, lines, vec![])
            }
            WgmmaGemm::Forward(side_rows) => {
                // u is read where lora_down made it; A where the GEMM makes u (its side tile).
                let down = match side_rows {
                    None => (params::FK_LORA_TMA_U, tile(p.u, r, m, r, rows_a)),
                    Some(rows) => (params::FK_LORA_TMA_A, tile(p.a, d_in, r, d_in, rows)),
                };
                (
                    vec![
                        (params::FK_LORA_TMA_X, tile(p.x, d_in, m, d_in, rows_a)),
                        down,
                        (params::FK_LORA_TMA_B, tile(p.b, r, d_out, r, rows_b)),
                    ],
                    rows_b,
                    vec![params::FK_LORA_TMA_B, params::FK_LORA_TMA_W],
                )
            }
        };
        if self.nf4_prefix().is_empty() {
            operands.push((params::FK_LORA_TMA_W, tile(p.w, d_in, d_out, w_ld, w_box)));
        }
        // Shared when every B operand is one TMA takes (over an NF4 base the forward's B, Ŵ,
        // is decoded by each block: it is not among the operands).
        let shared = self.tile_loads == TileLoads::TmaMulticast
            && !b_bits.is_empty()
            && b_bits.iter().all(|bit| {
                operands
                    .iter()
                    .any(|(b, m)| b == bit && m.loadable(T::DTYPE.size()))
            });
        for (bit, mut operand) in operands {
            if shared && b_bits.contains(&bit) {
                operand.box_rows /= 2;
            }
            if let Some(map) = self.device().tile_map::<T>(operand)? {
                p.tma |= bit;
                *tma_slot(p, bit) = map;
            }
        }
        Ok(shared)
    }

    /// `nf4_` for the fused kernels that decode an NF4 base in their tiles.
    fn nf4_prefix(&self) -> &'static str {
        match self.base {
            Base::Nf4(_) if !self.decodes_to_scratch() => "nf4_",
            _ => "",
        }
    }

    /// `y = x Wᵀ + bias + scale · (dropout(x) Aᵀ) Bᵀ` for `x` `[m, in]`: returns `y`
    /// `[m, out]` and what backward needs. The down-projection, then the base GEMM extended
    /// along K by the low-rank term (bias in its epilogue, or in the extended weight); or
    /// the two in one GEMM ([`Self::fused_down`]).
    pub fn forward(&self, x: &Buffer<T>, m: usize) -> Result<(Buffer<T>, Saved<T>)>
    where
        CudaBlas: Gemm<T>,
    {
        self.check_rows("x", x, m, self.d_in)?;
        let dev = self.device().clone();
        let mut u = dev.alloc_output::<T>(m * self.config.rank)?;
        let mut y = dev.alloc_output::<T>(m * self.d_out)?;
        let saved_seed = self.config.seed;
        if m == 0 {
            return Ok((
                y,
                Saved {
                    u,
                    m,
                    seed: saved_seed,
                    layer: self.id,
                },
            ));
        }
        let mut p = self.params(m, self.config.seed)?;
        p.x = x.ptr();
        p.u = u.ptr_mut();
        p.y = y.ptr_mut();
        match (&self.base, self.path) {
            (Base::Nf4(q), _) if self.forward_on_nf4_gemv(m) => {
                self.rank_gemm("lora_down", self.wide_down, &mut p, m, self.d_in)?;
                let epilogue = nf4::GemvEpilogue {
                    bias: self.bias.as_ref(),
                    low_rank: Some((&u, &self.b, self.config.rank)),
                };
                nf4::gemv_with_epilogue(q, x, m, &mut y, nf4::MatmulPath::GemvMma, epilogue)?;
            }
            (_, LoraPath::Fused | LoraPath::FusedWgmma) => {
                let op = match self.fused_down() {
                    Some(side) => format!("forward_down{side}"),
                    None => {
                        self.rank_gemm("lora_down", self.wide_down, &mut p, m, self.d_in)?;
                        "forward".to_string()
                    }
                };
                let _scratch = self.scratch_base(&mut p)?;
                let (name, cfg) = self.base_gemm(&op, &mut p, m, self.d_out)?;
                // SAFETY: x [m, in], u [m, rank] and y [m, out] were checked or sized above;
                // the layer's own buffers were checked by params(), a scratch base is
                // [out, in] and lives past the launch. The wgmma kernel runs only
                // where has_wgmma (with_path).
                unsafe {
                    dev.launch(&name, cfg, &p)?;
                }
            }
            (_, LoraPath::Extended) => {
                let ld = self.extended_ld();
                let (scratch, x_ext) = self.extended_down(&mut p, m)?;
                let w_ext = self.extended(&scratch);
                let blas = self.blas()?;
                blas::matmul(
                    blas,
                    cuda_slice(&x_ext),
                    ld,
                    cuda_slice(w_ext),
                    ld,
                    y.as_cuda_slice_mut().expect("a CUDA buffer"),
                    self.d_out,
                    (m, self.d_out, ld),
                    WeightOp::Transposed,
                )?;
            }
        }
        Ok((
            y,
            Saved {
                u,
                m,
                seed: saved_seed,
                layer: self.id,
            },
        ))
    }

    /// The extended forward up to its GEMM: refreshes the extended weight, then lora_down
    /// writes u and `x_ext = [x | scale·u | 1 | 0...]`. Returns the scratch weight (NF4
    /// base) and x_ext.
    fn extended_down(
        &self,
        p: &mut LoraParams,
        m: usize,
    ) -> Result<(Option<Buffer<T>>, Buffer<T>)> {
        let ld = self.extended_ld();
        let scratch = self.extended_weight(p)?;
        let mut x_ext = self.device().alloc_output::<T>(m * ld)?;
        p.x_ext = x_ext.ptr_mut();
        p.x_ld = ld as u64;
        // x_ext holds m rows of ld.
        self.rank_gemm("lora_down", self.wide_down, p, m, self.d_in)?;
        Ok((scratch, x_ext))
    }

    /// The extended weight's row length: `[W | B | bias | 0...]` rows, and x_ext's.
    fn extended_ld(&self) -> usize {
        padded_ld(self.d_in + self.config.rank + 1)
    }

    fn blas(&self) -> Result<&CudaBlas> {
        let Device::Cuda(cuda) = self.device() else {
            return Err(Error::Unsupported {
                op: "lora",
                why: "the extended path needs a GPU".into(),
            });
        };
        blas::handle(cuda)?.ok_or(Error::Unsupported {
            op: "lora",
            why: "cuBLAS is not loadable".into(),
        })
    }

    /// The extended weight: the layer's own (dense base) or the scratch one
    /// [`Self::extended_weight`] dequantized (NF4 base).
    fn extended<'a>(&'a self, scratch: &'a Option<Buffer<T>>) -> &'a Buffer<T> {
        match (&self.base, scratch) {
            (_, Some(w)) => w,
            (Base::Dense(w), None) => w,
            (Base::Nf4(_), None) => unreachable!("an NF4 base's extended weight is a scratch one"),
        }
    }

    /// Refreshes B, bias and A in the extended weight (for an NF4 base: dequantizes W into a
    /// new one first and returns it) and points `p` at it.
    fn extended_weight(&self, p: &mut LoraParams) -> Result<Option<Buffer<T>>> {
        let dev = self.device().clone();
        let ld = self.extended_ld();
        let mut scratch = None;
        if let Base::Nf4(q) = &self.base {
            let mut w = dev.alloc_output::<T>((self.d_out + self.config.rank) * ld)?;
            q.dequantize_strided(&mut w, ld)?;
            p.w = w.ptr();
            scratch = Some(w);
        }
        p.w_ld = ld as u64;
        let n = (self.d_out * (ld - self.d_in) + self.config.rank * ld) as u64;
        // SAFETY: p.w is the extended weight, [out + rank, ld]; A and B were checked by
        // params(), bias in new(). The kernel writes only the B, bias, padding and A parts. It writes through
        // &self: the extended path runs only on a CUDA device (with_path checks cuBLAS), so
        // this is device memory, which no Rust reference covers, and the layer's launches are
        // ordered on its device's one stream.
        unsafe {
            dev.launch(
                &kernel(format!("lora_extend_weight_{}", T::DTYPE)),
                LaunchConfig::grid_stride(n, THREADS, 1 << 16),
                p,
            )?;
        }
        Ok(scratch)
    }

    /// The gradients for `dy` `[m, out]`, given forward's input `x` and what it saved (this
    /// layer's forward: another's [`Saved`] is an [`Error::InvalidArgument`]).
    pub fn backward(&self, x: &Buffer<T>, saved: &Saved<T>, dy: &Buffer<T>) -> Result<LoraGrads<T>>
    where
        CudaBlas: Gemm<T>,
    {
        if saved.layer != self.id {
            return Err(Error::InvalidArgument {
                what: "saved",
                why: format!(
                    "made by another layer's forward (layer {}; this is layer {})",
                    saved.layer, self.id
                ),
            });
        }
        let m = saved.m;
        self.check_rows("x", x, m, self.d_in)?;
        self.check_rows("saved u", &saved.u, m, self.config.rank)?;
        self.check_rows("dy", dy, m, self.d_out)?;
        let dev = self.device().clone();
        let r = self.config.rank;
        if m == 0 {
            // No tokens: zero gradients.
            return Ok(LoraGrads {
                dx: dev.alloc_output(0)?,
                da: dev.zeros(r * self.d_in)?,
                db: dev.zeros(self.d_out * r)?,
                dbias: self
                    .bias
                    .as_ref()
                    .map(|_| dev.zeros(self.d_out))
                    .transpose()?,
            });
        }
        let mut dx = dev.alloc_output::<T>(m * self.d_in)?;
        let mut da = dev.alloc_output::<f32>(r * self.d_in)?;
        let mut db = dev.alloc_output::<f32>(self.d_out * r)?;
        let mut dbias = self
            .bias
            .as_ref()
            .map(|_| dev.alloc_output::<f32>(self.d_out))
            .transpose()?;
        let mut v = dev.alloc_output::<T>(m * r)?;
        let (fused_da, fused_db) = (self.fused_da(), self.fused_db());
        let sizes = raw::grad_partials(&dev, m, self.d_in, self.d_out, r, fused_da, fused_db);
        let mut partials = dev.alloc_output::<f32>(sizes.len)?;
        let mut p = self.params(m, saved.seed)?;
        p.x = x.ptr();
        p.u = saved.u.ptr() as *mut std::ffi::c_void;
        p.dy = dy.ptr();
        p.v = v.ptr_mut();
        p.dx = dx.ptr_mut();
        p.partials = partials.ptr_mut() as *mut f32;
        p.splits = sizes.splits;
        p.b_splits = sizes.b_splits;
        p.a_splits = sizes.a_splits;
        p.da = da.ptr_mut() as *mut f32;
        p.db = db.ptr_mut() as *mut f32;
        p.dbias = dbias
            .as_mut()
            .map_or(std::ptr::null_mut(), |b| b.ptr_mut() as *mut f32);
        let t = T::DTYPE;
        match self.path {
            LoraPath::Fused | LoraPath::FusedWgmma => {
                let fused_v = self.fused_v();
                let op = match fused_v {
                    Some(side) => format!("backward_dx_v{side}"),
                    None => {
                        self.rank_gemm("lora_backward_v", false, &mut p, m, self.d_out)?;
                        "backward_dx".to_string()
                    }
                };
                // Bᵀ, for the side tile of the kernel that makes v (before its tensor maps).
                let mut bt = fused_v
                    .map(|_| dev.alloc_output::<T>(r * self.d_out))
                    .transpose()?;
                if let Some(bt) = &mut bt {
                    p.bt = bt.ptr_mut();
                }
                let _scratch = self.scratch_base(&mut p)?;
                let (name, cfg) = self.base_gemm(&op, &mut p, m, self.d_in)?;
                let wgmma = self.path == LoraPath::FusedWgmma;
                // SAFETY: every buffer in p was checked or sized above (a scratch base is
                // [out, in] and lives past the launch; bt is [rank, out]; the partials hold
                // the dB partials the kernel makes where b_splits asks); the kernels only
                // read u (passed through the mutable field of the shared params struct). The
                // wgmma kernels run only where has_wgmma (with_path).
                unsafe {
                    if fused_v.is_some() {
                        backward_dx_v_launch(&dev, None, t, (&name, cfg), &p)?;
                    } else {
                        backward_dx_launch(&dev, None, t, (&name, cfg), wgmma, &p)?;
                    }
                }
            }
            LoraPath::Extended => {
                let scratch = self.extended_weight(&mut p)?;
                let w_ext = self.extended(&scratch);
                // Without dropout, dX = [dY | v] · [W ; A] in one GEMM over dy_ext; with it,
                // dY W straight from dY, and the masked v A in one more pass.
                let dy_ext = if self.config.dropout > 0.0 {
                    self.rank_gemm("lora_backward_v", false, &mut p, m, self.d_out)?;
                    None
                } else {
                    let dy_ld = padded_ld(self.d_out + r);
                    let mut dy_ext = dev.alloc_output::<T>(m * dy_ld)?;
                    p.dy_ext = dy_ext.ptr_mut();
                    p.dy_ld = dy_ld as u64;
                    // dy_ext holds m rows of dy_ld.
                    self.rank_gemm("lora_backward_v", false, &mut p, m, self.d_out)?;
                    Some((dy_ext, dy_ld))
                };
                let (a, lda, k) = match &dy_ext {
                    Some((e, ld)) => (e, *ld, self.d_out + r),
                    None => (dy, self.d_out, self.d_out),
                };
                let blas = self.blas()?;
                blas::matmul(
                    blas,
                    cuda_slice(a),
                    lda,
                    cuda_slice(w_ext),
                    self.extended_ld(),
                    dx.as_cuda_slice_mut().expect("a CUDA buffer"),
                    self.d_in,
                    (m, self.d_in, k),
                    WeightOp::Plain,
                )?;
                if self.config.dropout > 0.0 {
                    // SAFETY: dx [m, in] and v [m, rank] were sized above; A is checked.
                    unsafe { masked_lora_dx(&dev, None, t, &p)? };
                }
            }
        }
        // SAFETY: as above; the partials are as grad_partials sized them.
        unsafe { raw::grads(&dev, None, t, &p)? };
        Ok(LoraGrads { dx, da, db, dbias })
    }

    /// The merged dense weight `W + scale · B A` (`[out, in]`), for a dense base.
    pub fn merged(&self) -> Result<Buffer<T>> {
        let Base::Dense(_) = &self.base else {
            return Err(Error::Unsupported {
                op: "lora merge",
                why: "an NF4 base merges through merged_nf4".into(),
            });
        };
        let mut out = self.device().alloc_output::<T>(self.d_out * self.d_in)?;
        self.merge_into(&mut out, None)?;
        Ok(out)
    }

    /// `out = W + scale · B A` (`[out, in]`), W the dense base or, given, `w` `[out, in]`.
    fn merge_into(&self, out: &mut Buffer<T>, w: Option<&Buffer<T>>) -> Result<()> {
        let mut p = self.params(0, 0)?;
        if let Some(w) = w {
            p.w = w.ptr();
            p.w_ld = self.d_in as u64;
        }
        p.merged = out.ptr_mut();
        // SAFETY: out and a given w are [out, in], the dense base's rows w_ld apart; A and B
        // were checked by params().
        unsafe { raw::merge(self.device(), None, T::DTYPE, &p) }
    }

    /// For an NF4 base: dequantize, merge, requantize (same blocksize and double
    /// quantization). Returns the merged NF4 weight and the requantization error it added,
    /// `‖Q(W') − W'‖₂ / ‖W'‖₂` with `W'` the merged weight in T.
    pub fn merged_nf4(&self) -> Result<(Nf4Weight, f64)> {
        let Base::Nf4(q) = &self.base else {
            return Err(Error::Unsupported {
                op: "lora merge",
                why: "a dense base merges through merged".into(),
            });
        };
        let dev = self.device().clone();
        let mut w = dev.alloc_output::<T>(self.d_out * self.d_in)?;
        q.dequantize(&mut w)?;
        let mut merged = dev.alloc_output::<T>(self.d_out * self.d_in)?;
        self.merge_into(&mut merged, Some(&w))?;
        let requantized = Nf4Weight::quantize(
            &merged,
            self.d_out,
            self.d_in,
            q.blocksize(),
            q.is_double_quant(),
        )?;
        let mut back = dev.alloc_output::<T>(self.d_out * self.d_in)?;
        requantized.dequantize(&mut back)?;
        let error = crate::testing::rel_l2(&back.to_host()?, &merged.to_host()?);
        Ok((requantized, error))
    }
}

fn cuda_slice<T: FloatElem>(b: &Buffer<T>) -> &cudarc::driver::CudaSlice<T> {
    b.as_cuda_slice()
        .expect("the extended path runs on CUDA buffers")
}

/// Most splits of K [`LoraLinear::with_k_splits`] takes.
pub const MAX_K_SPLITS: u32 = 64;

/// Splits of K for the GEMMs only `rank` wide, for `m` rows on a GPU of `sms`
/// multiprocessors: their time is the read of the activations, which needs loads in flight
/// on every SM, and one block per 128 rows alone leaves most of a GPU idle (64 blocks for
/// 8192 tokens on 132 SMs), so as many splits as fill two blocks per SM (two fit one,
/// `cuda/include/narrow.cuh`), each at least 512 of K, at most 16.
pub fn k_split_count(m: usize, k: usize, sms: usize) -> u32 {
    let tiles = m.div_ceil(params::FK_NARROW_ROWS as usize).max(1);
    (2 * sms / tiles).min(k.div_ceil(512)).clamp(1, 16) as u32
}

/// Row splits of the weight-gradient reductions over `m` tokens for a layer whose wider side
/// is `width`: [`k_split_count`] with the roles swapped (the output `width` tall, the
/// reduction over the tokens).
fn split_count(m: usize, width: usize, sms: usize) -> u32 {
    k_split_count(width, m, sms)
}

/// Every kernel this module can launch (the build checks look each up in the PTX).
pub fn kernels() -> Vec<Kernel> {
    let mut names = vec!["lora_reduce".to_string()];
    for t in ["bf16", "f16"] {
        for op in [
            "down",
            "down_k64",
            "forward",
            "forward_nf4",
            "forward_wgmma",
            "forward_nf4_wgmma",
            "forward_down16_wgmma",
            "forward_down32_wgmma",
            "forward_down16_nf4_wgmma",
            "forward_down32_nf4_wgmma",
            "backward_v",
            "backward_dx_wgmma",
            "backward_dx_nf4_wgmma",
            "backward_dx_v16_wgmma",
            "backward_dx_v32_wgmma",
            "backward_dx_v16_nf4_wgmma",
            "backward_dx_v32_nf4_wgmma",
            "backward_dx",
            "backward_dx_nf4",
            "grad_a",
            "grad_b",
            "merge",
            "extend_weight",
            "transpose_b",
            "dx_fixup",
            "down_reduce",
            "backward_v_reduce",
        ] {
            names.push(format!("lora_{op}_{t}"));
        }
    }
    names.into_iter().map(kernel).collect()
}

pub mod raw {
    //! Raw entry points for framework authors: the layer's steps on memory and a stream your
    //! framework owns (`Some(stream)`; `None` is the device's own, and all the emulator takes),
    //! through the fused kernels. You fill one [`LoraParams`] with your pointers as
    //! `cuda/params/lora.h` says (what each kernel reads, the saved `u`, the workspaces' layout),
    //! `tma` left 0 (the wgmma kernels then load by cp.async). Checked before a launch: the
    //! dtype; every pointer aligned as the kernels need ([`Error::Misaligned`]: the dtype's
    //! arrays to their element, the f32 ones to 4, `x_ext` and `dy_ext` to 16); that the
    //! device has wgmma where asked; an NF4 base's params and shape against
    //! the layer's ([`crate::nf4::raw::check_weight`], alignment included); the row strides
    //! `x_ld` and `dy_ld`; [`forward_fused_down`]'s rank and dropout, and
    //! [`backward_dx_fused_v`]'s rank, splits and pointers; [`backward_dx`]'s refusal of
    //! splits (it makes no partials) and [`grads`]' of zero splits. Not checked: that the
    //! pointers hold what the shapes say. A forward is [`down`] then [`forward`] (or, on wgmma
    //! without dropout at ranks up to 32, [`forward_fused_down`] alone); a backward
    //! [`backward_v`], [`backward_dx`] (or, on wgmma at ranks up to 32,
    //! [`backward_dx_fused_v`] alone, which makes dA's and dB's partials too where
    //! `p.a_splits` and `p.b_splits` ask),
    //! then [`grads`]. [`LoraLinear`]'s fused paths launch
    //! through the same code after their checks, with workspaces of their own (`tests/raw.rs`
    //! holds the two to the same bits).

    use super::*;

    /// Which kernels compute the base GEMMs.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum BaseGemm {
        /// `mma.sync`: every device.
        Mma,
        /// `wgmma` (Hopper, and the emulator), persistent: a block per SM.
        Wgmma,
    }

    /// f32 elements of `p.rank_partials` for [`down`] or [`backward_v`] split `k_splits` ways
    /// over K (none when 1; [`k_split_count`] is what [`LoraLinear`] picks). A count past
    /// usize is `usize::MAX`, which no allocation takes, not a wrapped one too small.
    pub fn rank_partials_len(m: usize, rank: usize, k_splits: u32) -> usize {
        if k_splits > 1 {
            (k_splits as usize).saturating_mul(m).saturating_mul(rank)
        } else {
            0
        }
    }

    /// How [`grads`]' reductions over tokens are split: `p.splits`, `p.a_splits`,
    /// `p.b_splits` and the f32 elements of `p.partials` (the dA partials, then the dB ones).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct GradPartials {
        /// Row ranges of the partials `lora_grad_a` and `lora_grad_b` make.
        pub splits: u32,
        /// The dA partials [`backward_dx_fused_v`] makes, one per 128 rows; 0 where
        /// `lora_grad_a` makes them.
        pub a_splits: u32,
        /// The dB partials [`backward_dx_fused_v`] makes, one per 128 rows; 0 where
        /// `lora_grad_b` makes them.
        pub b_splits: u32,
        /// f32 elements of `p.partials`.
        pub len: usize,
    }

    /// The row tiles of the dX kernel over `m` tokens: one dB partial each where it makes them.
    fn dx_row_tiles(m: u32) -> u32 {
        m.div_ceil(params::FK_WGMMA_TILE_M)
    }

    /// The splits that [`LoraLinear`] picks on `dev` for `m` tokens, the dA partials made by
    /// [`backward_dx_fused_v`] where `fused_da` ([`LoraLinear::fused_da`]) and the dB ones
    /// where `fused_db` ([`LoraLinear::fused_db`]), else by [`grads`]. Shapes past what the
    /// kernels count (`m` past u32, a `len` past usize) saturate: `len` is then at least what
    /// they need, never a wrapped count too small.
    pub fn grad_partials(
        dev: &Device,
        m: usize,
        d_in: usize,
        d_out: usize,
        rank: usize,
        fused_da: bool,
        fused_db: bool,
    ) -> GradPartials {
        let splits = split_count(m, d_in.max(d_out), dev.sm_count());
        let rows = u32::try_from(m).unwrap_or(u32::MAX);
        let fused = |on: bool| if on { dx_row_tiles(rows) } else { 0 };
        let (a_splits, b_splits) = (fused(fused_da), fused(fused_db));
        let parts = |fused: u32| if fused != 0 { fused } else { splits } as usize;
        let da = parts(a_splits).saturating_mul(rank).saturating_mul(d_in);
        let db = parts(b_splits)
            .saturating_mul(d_out)
            .saturating_mul(rank.saturating_add(1));
        GradPartials {
            splits,
            a_splits,
            b_splits,
            len: da.saturating_add(db),
        }
    }

    /// What every raw step checks first: the activations' dtype, and every pointer in `p`
    /// aligned as the kernels need ([`Error::Misaligned`]; an access they cannot make faults
    /// and leaves a GPU's context unusable): the dtype's arrays to their element (the kernels
    /// test for 16-byte runs and take element by element where a pointer has none), the f32
    /// ones to 4, and `x_ext` and `dy_ext` to 16 (their rows are written in 16-byte stores
    /// wherever their stride is a multiple of 8 elements).
    fn checked(t: DType, p: &LoraParams) -> Result<()> {
        if !matches!(t, DType::BF16 | DType::F16) {
            return Err(Error::UnsupportedDtype {
                op: "lora",
                dtypes: t.to_string(),
            });
        }
        // Rank 0 would launch no block of a rank-wide GEMM (its outputs left unwritten).
        if !(1..=LoraConfig::MAX_RANK).contains(&(p.rank as usize)) {
            return Err(Error::InvalidArgument {
                what: "lora raw rank",
                why: format!("{}: 1 to {}", p.rank, LoraConfig::MAX_RANK),
            });
        }
        let (elem, f32s, runs) = (t.size(), 4, 16);
        Error::check_all_aligned(&[
            ("lora raw w", p.w, elem),
            ("lora raw bias", p.bias, elem),
            ("lora raw a", p.a, elem),
            ("lora raw b", p.b, elem),
            ("lora raw x", p.x, elem),
            ("lora raw u", p.u, elem),
            ("lora raw y", p.y, elem),
            ("lora raw dy", p.dy, elem),
            ("lora raw v", p.v, elem),
            ("lora raw dx", p.dx, elem),
            ("lora raw bt", p.bt, elem),
            ("lora raw merged", p.merged, elem),
            ("lora raw partials", p.partials.cast(), f32s),
            ("lora raw da", p.da.cast(), f32s),
            ("lora raw db", p.db.cast(), f32s),
            ("lora raw dbias", p.dbias.cast(), f32s),
            ("lora raw rank_partials", p.rank_partials.cast(), f32s),
            ("lora raw x_ext", p.x_ext, runs),
            ("lora raw dy_ext", p.dy_ext, runs),
        ])
    }

    fn gemm_launch(
        dev: &Device,
        op: &str,
        t: DType,
        gemm: BaseGemm,
        p: &LoraParams,
    ) -> Result<(Kernel, LaunchConfig)> {
        checked(t, p)?;
        let nf4 = if p.w.is_null() { "nf4_" } else { "" };
        let (m, n) = if op.starts_with("forward") {
            (p.m, p.d_out)
        } else {
            (p.m, p.d_in)
        };
        let wgmma = match gemm {
            BaseGemm::Mma => None,
            BaseGemm::Wgmma if dev.has_wgmma() => Some((1, dev.sm_count())),
            BaseGemm::Wgmma => {
                return Err(Error::Unsupported {
                    op: "lora raw wgmma",
                    why: format!("wgmma needs Hopper (sm_90a); {}", dev.describe()),
                })
            }
        };
        if p.w.is_null() {
            crate::nf4::raw::check_weight(&p.nf4)?;
            if (p.nf4.rows, p.nf4.cols) != (p.d_out, p.d_in) {
                return Err(Error::ShapeMismatch {
                    what: "lora raw NF4 base [out, in]".into(),
                    expected: vec![p.d_out as usize, p.d_in as usize],
                    got: vec![p.nf4.rows as usize, p.nf4.cols as usize],
                });
            }
        }
        Ok(fused_gemm_launch(op, nf4, t, wgmma, m as usize, n as usize))
    }

    /// `u = scale · dropout(x) Aᵀ` (`lora_down`), split over K into `p.rank_partials` when
    /// `p.k_splits > 1`. With `p.x_ext` set (the Extended path), also the rows of x_ext
    /// past x's columns: `p.x_ld` from `d_in + rank + 1` to `u32::MAX` elements (refused
    /// otherwise).
    ///
    /// # Safety
    /// Every buffer `p` names must be valid memory of `dev` (device addresses on a GPU, host
    /// addresses under the emulator) for its shape, as cuda/params/lora.h says; `stream`
    /// must belong to `dev`'s context. Outputs must not overlap inputs. An NF4 base's params
    /// (`p.nf4`: its blocksize, shape `d_out × d_in` and pointers) are checked, as
    /// [`crate::nf4::raw::check_weight`] does, by the GEMMs that read it.
    pub unsafe fn down(
        dev: &Device,
        stream: Option<CUstream>,
        t: DType,
        p: &LoraParams,
    ) -> Result<()> {
        checked(t, p)?;
        // SAFETY: forwarded from this function's contract.
        unsafe { rank_launch(dev, stream, "lora_down", false, t, p) }
    }

    /// `y = x Wᵀ + bias + u Bᵀ`, W dense (`p.w`), or NF4 decoded in the GEMM's tiles when
    /// `p.w` is null (`p.nf4`).
    ///
    /// # Safety
    /// As [`down`].
    pub unsafe fn forward(
        dev: &Device,
        stream: Option<CUstream>,
        t: DType,
        gemm: BaseGemm,
        p: &LoraParams,
    ) -> Result<()> {
        let (k, cfg) = gemm_launch(dev, "forward", t, gemm, p)?;
        // SAFETY: forwarded from this function's contract.
        unsafe { dev.launch_on(&k, cfg, stream, p) }
    }

    /// [`down`] and [`forward`] in one kernel on wgmma, `u` made in the base GEMM's sweep of
    /// x ([`LoraLinear::fused_down`]): `p.u` written, `y` as [`forward`]'s, the base dense or
    /// NF4 alike. Refused (typed errors) under dropout, at ranks past 32, and where the device
    /// has no wgmma.
    ///
    /// # Safety
    /// As [`down`].
    pub unsafe fn forward_fused_down(
        dev: &Device,
        stream: Option<CUstream>,
        t: DType,
        p: &LoraParams,
    ) -> Result<()> {
        let Some(width) = down_width(p.rank, p.dropout) else {
            return Err(Error::InvalidArgument {
                what: "lora raw forward_fused_down",
                why: format!(
                    "u in the GEMM needs no dropout (p = {}) and a rank of 1 to {} ({}); \
                     use down, then forward",
                    p.dropout,
                    params::FK_WGMMA_SIDE_ROWS,
                    p.rank
                ),
            });
        };
        let op = format!("forward_down{width}");
        let (k, cfg) = gemm_launch(dev, &op, t, BaseGemm::Wgmma, p)?;
        // SAFETY: forwarded from this function's contract.
        unsafe { dev.launch_on(&k, cfg, stream, p) }
    }

    /// `v = scale · dY B` (`lora_backward_v`), split as [`down`]; with `p.dy_ext` set, its
    /// rows past dY's columns too (`p.dy_ld` from `d_out + rank` to `u32::MAX`).
    ///
    /// # Safety
    /// As [`down`].
    pub unsafe fn backward_v(
        dev: &Device,
        stream: Option<CUstream>,
        t: DType,
        p: &LoraParams,
    ) -> Result<()> {
        checked(t, p)?;
        // SAFETY: forwarded from this function's contract.
        unsafe { rank_launch(dev, stream, "lora_backward_v", false, t, p) }
    }

    /// `dX = dY W + mask ⊙ (v A) / (1 - p)`, the base as [`forward`]'s. It makes no
    /// gradient partials, so it refuses (a typed error) a `p.a_splits` or `p.b_splits` that
    /// would have [`grads`] skip the kernels that make them.
    ///
    /// # Safety
    /// As [`down`].
    pub unsafe fn backward_dx(
        dev: &Device,
        stream: Option<CUstream>,
        t: DType,
        gemm: BaseGemm,
        p: &LoraParams,
    ) -> Result<()> {
        if p.a_splits != 0 || p.b_splits != 0 {
            return Err(Error::InvalidArgument {
                what: "lora raw backward_dx",
                why: format!(
                    "a_splits {} and b_splits {}: only backward_dx_fused_v makes the dA and \
                     dB partials; set both to 0 (grads then makes them)",
                    p.a_splits, p.b_splits
                ),
            });
        }
        let (k, cfg) = gemm_launch(dev, "backward_dx", t, gemm, p)?;
        // SAFETY: forwarded from this function's contract.
        unsafe { backward_dx_launch(dev, stream, t, (&k, cfg), gemm == BaseGemm::Wgmma, p) }
    }

    /// [`backward_v`] and [`backward_dx`] in one kernel on wgmma, `v` made in the dX GEMM's
    /// sweep of dY ([`LoraLinear::fused_v`]): `p.v` written, `dx` as [`backward_dx`]'s (under
    /// dropout its masked low-rank term added afterwards from that `v`, as [`backward_dx`]
    /// does on wgmma), the base dense or NF4 alike; where `p.b_splits` is set (to
    /// [`grad_partials`]' with `fused_db`), the dB and dbias partials too, into `p.partials`
    /// after the dA ones ([`LoraLinear::fused_db`]), and where `p.a_splits` is (`fused_da`),
    /// the dA partials, reading `p.x` ([`LoraLinear::fused_da`]); [`grads`] then leaves those
    /// alone. `p.bt` is a workspace of `[rank, out]` elements that it fills with Bᵀ first.
    /// Refused (typed errors) at ranks past 32, without `p.bt`, with another `p.a_splits` or
    /// `p.b_splits`, with `p.a_splits` but no `p.x`, and where the device has no wgmma.
    ///
    /// # Safety
    /// As [`down`].
    pub unsafe fn backward_dx_fused_v(
        dev: &Device,
        stream: Option<CUstream>,
        t: DType,
        p: &LoraParams,
    ) -> Result<()> {
        let what = "lora raw backward_dx_fused_v";
        let Some(width) = side_width(p.rank) else {
            return Err(Error::InvalidArgument {
                what,
                why: format!(
                    "v in the dX GEMM needs a rank of 1 to {} ({}); use backward_v, then \
                     backward_dx",
                    params::FK_WGMMA_SIDE_ROWS,
                    p.rank
                ),
            });
        };
        let op = format!("backward_dx_v{width}");
        let (k, cfg) = gemm_launch(dev, &op, t, BaseGemm::Wgmma, p)?;
        let row_tiles = dx_row_tiles(p.m);
        for (name, splits) in [("a", p.a_splits), ("b", p.b_splits)] {
            if splits != 0 && splits != row_tiles {
                return Err(Error::InvalidArgument {
                    what,
                    why: format!(
                        "{name}_splits is {splits}: the d{} partials are one per {} rows, \
                         {row_tiles} for {} rows (0: lora_grad_{name} makes them)",
                        name.to_uppercase(),
                        params::FK_WGMMA_TILE_M,
                        p.m
                    ),
                });
            }
        }
        if p.a_splits != 0 && p.x.is_null() {
            return Err(Error::InvalidArgument {
                what,
                why: "a_splits asks for dA's partials, which read x: x is null".into(),
            });
        }
        if p.bt.is_null() {
            return Err(Error::InvalidArgument {
                what,
                why: "bt, the [rank, out] workspace for Bᵀ, is null".into(),
            });
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { backward_dx_v_launch(dev, stream, t, (&k, cfg), p) }
    }

    /// `dA = vᵀ (mask ⊙ x) / (1 - p)`, `dB = dYᵀ u` and `dbias` (where `p.dbias` is set), in f32,
    /// reduced over `p.splits` row ranges through `p.partials` in a fixed order
    /// ([`grad_partials`]); the dA partials made here (`lora_grad_a`) unless `p.a_splits`
    /// says [`backward_dx_fused_v`] made them, and the dB and dbias ones (`lora_grad_b`)
    /// unless `p.b_splits` does.
    ///
    /// # Safety
    /// As [`down`].
    pub unsafe fn grads(
        dev: &Device,
        stream: Option<CUstream>,
        t: DType,
        p: &LoraParams,
    ) -> Result<()> {
        checked(t, p)?;
        if p.splits == 0 && (p.a_splits == 0 || p.b_splits == 0) {
            return Err(Error::InvalidArgument {
                what: "lora raw grads",
                why: "splits 0: lora_grad_a and lora_grad_b reduce over at least one range of \
                      rows (grad_partials gives the count)"
                    .into(),
            });
        }
        let (r, d_in, d_out, splits) =
            (p.rank as usize, p.d_in as usize, p.d_out as usize, p.splits);
        let reduce_len = (r * d_in + d_out * (r + 1)) as u64;
        // SAFETY: forwarded from this function's contract.
        unsafe {
            if p.a_splits == 0 {
                dev.launch_on(
                    &kernel(format!("lora_grad_a_{t}")),
                    LaunchConfig::narrow(d_in, r, splits),
                    stream,
                    p,
                )?;
            }
            if p.b_splits == 0 {
                dev.launch_on(
                    &kernel(format!("lora_grad_b_{t}")),
                    LaunchConfig::narrow(d_out, r + 1, splits),
                    stream,
                    p,
                )?;
            }
            dev.launch_on(
                &kernel("lora_reduce".into()),
                LaunchConfig::grid_stride(reduce_len, THREADS, 1 << 16),
                stream,
                p,
            )
        }
    }

    /// `merged = W + scale · B A` (`[out, in]`), W dense with rows `p.w_ld` apart (0: `in`).
    ///
    /// # Safety
    /// As [`down`].
    pub unsafe fn merge(
        dev: &Device,
        stream: Option<CUstream>,
        t: DType,
        p: &LoraParams,
    ) -> Result<()> {
        checked(t, p)?;
        // SAFETY: forwarded from this function's contract.
        unsafe {
            dev.launch_on(
                &kernel(format!("lora_merge_{t}")),
                LaunchConfig::tiles(p.d_out as usize, p.d_in as usize, 1),
                stream,
                p,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16;

    /// What `fk kernels --resources` says each wgmma GEMM's launch asks for is what its
    /// launch asks for, for every op, base and dtype.
    #[test]
    fn launch_shared_bytes_names_each_wgmma_launch() {
        let ops = [
            "forward",
            "forward_down16",
            "forward_down32",
            "backward_dx",
            "backward_dx_v16",
            "backward_dx_v32",
        ];
        let names: Vec<String> = kernels().into_iter().map(|k| k.name).collect();
        for op in ops {
            for nf4 in ["", "nf4_"] {
                for t in [DType::BF16, DType::F16] {
                    let (k, cfg) = fused_gemm_launch(op, nf4, t, Some((1, 132)), 1000, 300);
                    assert!(names.contains(&k.name), "{} not in kernels()", k.name);
                    assert_eq!(launch_shared_bytes(&k.name), cfg.shared_bytes, "{}", k.name);
                }
            }
        }
        assert_eq!(
            launch_shared_bytes("lora_down_k64_bf16"),
            params::FK_NARROW_WIDE_SMEM_BYTES
        );
        assert_eq!(launch_shared_bytes("lora_merge_f16"), 0);
    }

    /// `TileLoads::TmaMulticast` really launches pairs (the result tests cannot tell: a
    /// layer that never clustered would compute the same): for the forward and dX, over an
    /// NF4 base for dX only, and not at all when a B operand is not TMA's.
    #[test]
    fn multicast_launches_pairs_where_b_can_be_shared() {
        let Some(dev) = crate::testing::emulators().into_iter().next() else {
            return; // the emulator is not built (feature emu off): nothing launches here
        };
        let (m, d_in, rank) = (200, 136, 8);
        let upload = |n: usize| dev.upload(&vec![bf16::ONE; n]).unwrap();
        let layer = |d_out: usize, nf4: bool| {
            let w = upload(d_out * d_in);
            let base = if nf4 {
                LoraBase::Nf4(Box::new(
                    Nf4Weight::quantize(&w, d_out, d_in, 64, true).unwrap(),
                ))
            } else {
                LoraBase::Dense(w)
            };
            let config = LoraConfig {
                rank,
                alpha: 8.0,
                use_rslora: false,
                dropout: 0.0,
                seed: 1,
            };
            LoraLinear::new(
                base,
                None,
                upload(rank * d_in),
                upload(d_out * rank),
                config,
            )
            .unwrap()
            .with_path(LoraPath::FusedWgmma)
            .unwrap()
            .with_nf4_decode(Nf4Decode::InTile) // Ŵ decoded by each block: no B to share
            .with_tile_loads(TileLoads::TmaMulticast)
        };
        let clusters = |l: &LoraLinear<bf16>, op: &str, d_out: usize| {
            let (x, mut u, dy, mut v) = (
                upload(m * d_in),
                upload(m * rank),
                upload(m * d_out),
                upload(m * rank),
            );
            let mut p = l.params(m, 1).unwrap();
            (p.x, p.u, p.dy, p.v) = (x.ptr(), u.ptr_mut(), dy.ptr(), v.ptr_mut());
            let n = if op == "forward" { d_out } else { d_in };
            l.base_gemm(op, &mut p, m, n).unwrap().1.cluster
        };
        // Out of 263: the forward's B [263, 8] and W (rows of 136) are TMA's, dY (rows of 263
        // elements, 526 bytes) is not.
        for (d_out, nf4, forward, dx) in [
            (264, false, (2, 1, 1), (2, 1, 1)),
            (264, true, (1, 1, 1), (2, 1, 1)),
            (263, false, (2, 1, 1), (1, 1, 1)),
        ] {
            let l = layer(d_out, nf4);
            assert_eq!(
                clusters(&l, "forward", d_out),
                forward,
                "forward {d_out} nf4 {nf4}"
            );
            assert_eq!(
                clusters(&l, "backward_dx", d_out),
                dx,
                "dX {d_out} nf4 {nf4}"
            );
        }
    }
}
