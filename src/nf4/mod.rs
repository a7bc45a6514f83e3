//! NF4 (QLoRA's 4-bit NormalFloat) on the device: bitsandbytes-exact quantization with
//! double quantization, dequantization, and the matmuls through a frozen NF4 weight with
//! the dequantization fused in: GEMVs for decode and small batches (1 to 64 rows on tensor
//! cores, 1 to 16 SIMT; the backward `dX = dY Ŵ` of 1 to 16 rows too), a tensor-core GEMM for
//! the forward `y = x Ŵᵀ`, and the same for the backward (on `mma.sync`, and on Hopper's
//! `wgmma`); or dequantize + cuBLAS.
//! [`choose_path`] picks by batch size, from measurements.
//!
//! Kernels: `cuda/nf4.cu`. Reference: [`crate::reference::nf4`] (bitsandbytes' format and
//! numerics) and [`crate::reference::linear`] (the matmuls). Checkpoints: [`checkpoint`].
//! Tests: `tests/nf4_kernels.rs`. Benchmarks: `src/bench/nf4.rs` (`fk bench`).
//!
//! The GEMMs use `Ŵ`, the weight dequantized to the activations' dtype exactly as
//! [`Nf4Weight::dequantize`] writes it, so they compute with the same operands as
//! "dequantize, then a bf16 matmul", and [`MatmulPath::DequantizeCublas`] is literally that.
//! The SIMT GEMV and the dX GEMV keep `Ŵ` in f32 (code × absmax, never rounded to the dtype):
//! their reference is the f32 weight. The tensor-core GEMV multiplies by the codes rounded to the dtype and
//! scales each block's sum by the f32 absmax: its reference is
//! [`Nf4Quantized::dequantize_with_codes_in`].

pub mod checkpoint;

use crate::device::blas::{self, WeightOp};
use crate::device::{
    check_device, check_row_stride, Buffer, Device, Kernel, LaunchConfig, TileMap,
};
use crate::dtype::{DType, FloatElem};
use crate::error::{Error, Result};
use crate::params::{
    self, Nf4DequantizeParams, Nf4GemvEpilogue, Nf4MatmulParams, Nf4NestedParams, Nf4QuantizeParams,
};
use crate::reference::nf4::{check_blocksize, dynamic_map, Absmax, NestedAbsmax, Nf4Quantized};

const MODULE: &str = "nf4";
pub(crate) const THREADS: u32 = 256;
const MAX_BLOCKS: u32 = 1 << 16;
/// Rows of activations up to which the tensor-core GEMV runs (instantiated for 8, 16, 32 and
/// 64: one `mma` n-tile of 8 rows each, the weight read once for all of them), and with it
/// the dispatch's forward ([`choose_path`]).
pub const GEMV_MAX_ROWS: usize = 64;
/// Rows up to which the SIMT GEMV runs (instantiated for 1, 2, 4, 8 and 16: a register
/// accumulator per row and weight row).
pub const SIMT_GEMV_MAX_ROWS: usize = 16;
/// Rows up to which the dX GEMV runs (instantiated for 1, 2, 4, 8 and 16), and with it the
/// dispatch's backward ([`choose_path`]).
pub const GEMV_DX_MAX_ROWS: usize = 16;

/// The absmaxes on the device: plain, or double-quantized.
enum DeviceAbsmax {
    Plain(Buffer<f32>),
    Nested {
        codes: Buffer<u8>,
        absmax: Buffer<f32>,
        map: Buffer<f32>,
        offset: f32,
    },
}

/// A frozen NF4 weight `[rows, cols]` (`[out_features, in_features]`) on a device, in
/// bitsandbytes' layout.
pub struct Nf4Weight {
    codes: Buffer<u8>,
    absmax: DeviceAbsmax,
    rows: usize,
    cols: usize,
    blocksize: usize,
    dtype: DType,
}

fn check_shape(rows: usize, cols: usize) -> Result<usize> {
    let numel = rows
        .checked_mul(cols)
        .filter(|&n| n > 0 && rows <= u32::MAX as usize && cols <= u32::MAX as usize);
    numel.ok_or_else(|| Error::Unsupported {
        op: "nf4",
        why: format!("weight shape [{rows}, {cols}]"),
    })
}

fn kernel(name: String) -> Kernel {
    Kernel {
        module: MODULE,
        name,
    }
}

impl Nf4Weight {
    /// Uploads a weight quantized on the host (by [`crate::reference::nf4::quantize`] or
    /// read from a bitsandbytes checkpoint). It must be 2-D and pass
    /// [`Nf4Quantized::validate`].
    pub fn upload(dev: &Device, q: &Nf4Quantized) -> Result<Self> {
        let [rows, cols] = q.shape[..] else {
            return Err(Error::Unsupported {
                op: "nf4",
                why: format!("a linear weight is 2-D, got shape {:?}", q.shape),
            });
        };
        check_shape(rows, cols)?;
        q.validate()?;
        let absmax = match &q.absmax {
            Absmax::Plain(a) => DeviceAbsmax::Plain(dev.upload(a)?),
            Absmax::Nested(n) => {
                if n.blocksize != params::FK_NF4_NESTED_BLOCKSIZE as usize {
                    return Err(Error::Unsupported {
                        op: "nf4",
                        why: format!("nested blocksize {} (bitsandbytes uses 256)", n.blocksize),
                    });
                }
                DeviceAbsmax::Nested {
                    codes: dev.upload(&n.codes)?,
                    absmax: dev.upload(&n.absmax)?,
                    map: dev.upload(&n.code)?,
                    offset: n.offset,
                }
            }
        };
        Ok(Nf4Weight {
            codes: dev.upload(&q.codes)?,
            absmax,
            rows,
            cols,
            blocksize: q.blocksize,
            dtype: q.dtype,
        })
    }

    /// Quantizes `w` (`[rows, cols]`, bf16/f16/f32) on its device, bit-identical to
    /// bitsandbytes' `quantize_4bit(w, blocksize, compress_statistics=double_quant,
    /// quant_type="nf4")` (the double-quantization offset is the mean of the absmaxes, summed
    /// in f64 in a fixed order: see `FK_NF4_MEAN_CHUNK`). A NaN or infinite element is an
    /// error; `w` is never modified.
    pub fn quantize<T: FloatElem>(
        w: &Buffer<T>,
        rows: usize,
        cols: usize,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self> {
        let numel = check_shape(rows, cols)?;
        check_blocksize("nf4 quantize", blocksize)?;
        Error::check_len("nf4 quantize input", numel, w.len())?;
        let dev = w.device().clone();
        let blocks = numel.div_ceil(blocksize);
        let mut codes = dev.alloc_output::<u8>(numel.div_ceil(2))?;
        let mut absmax = dev.alloc_output::<f32>(blocks)?;
        let mut nonfinite = dev.zeros::<u32>(1)?;
        let p = Nf4QuantizeParams {
            input: w.ptr(),
            codes: codes.ptr_mut() as *mut u8,
            absmax: absmax.ptr_mut() as *mut f32,
            nonfinite: nonfinite.ptr_mut() as *mut u32,
            numel: numel as u64,
            blocksize: blocksize as u32,
        };
        let cfg = LaunchConfig::warp_stride(blocks as u64, THREADS, MAX_BLOCKS);
        // SAFETY: w holds numel elements of T; codes, absmax and the flag are sized above.
        unsafe { dev.launch(&kernel(format!("nf4_quantize_{}", T::DTYPE)), cfg, &p)? };
        if nonfinite.to_host()?[0] != 0 {
            return Err(Error::InvalidArgument {
                what: "nf4 weight",
                why: "it holds NaN or infinite elements".into(),
            });
        }
        let absmax = if double_quant {
            nest(&dev, &absmax)?
        } else {
            DeviceAbsmax::Plain(absmax)
        };
        Ok(Nf4Weight {
            codes,
            absmax,
            rows,
            cols,
            blocksize,
            dtype: T::DTYPE,
        })
    }

    /// Rows of the weight: `out_features`.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the weight: `in_features`.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Elements per quantization block, each block scaled by one absmax: consecutive
    /// elements of the weight flattened row-major (a block may span rows).
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }

    /// Whether the absmaxes are double-quantized (bitsandbytes' `compress_statistics`): 8-bit
    /// codes with an f32 absmax per 256 of them and an offset, rather than plain f32.
    pub fn is_double_quant(&self) -> bool {
        matches!(self.absmax, DeviceAbsmax::Nested { .. })
    }

    /// The device that holds the weight's codes and absmaxes.
    pub fn device(&self) -> &Device {
        self.codes.device()
    }

    /// Bytes the weight occupies on the device.
    pub fn bytes(&self) -> usize {
        self.codes.len()
            + match &self.absmax {
                DeviceAbsmax::Plain(a) => 4 * a.len(),
                DeviceAbsmax::Nested {
                    codes, absmax, map, ..
                } => codes.len() + 4 * (absmax.len() + map.len()),
            }
    }

    /// Copies the weight back to the host, in the reference's (and bitsandbytes') form.
    pub fn to_host(&self) -> Result<Nf4Quantized> {
        let absmax = match &self.absmax {
            DeviceAbsmax::Plain(a) => Absmax::Plain(a.to_host()?),
            DeviceAbsmax::Nested {
                codes,
                absmax,
                map,
                offset,
            } => {
                let map: [f32; 256] = map.to_host()?.try_into().expect("the map holds 256 values");
                Absmax::Nested(NestedAbsmax {
                    codes: codes.to_host()?,
                    absmax: absmax.to_host()?,
                    code: map,
                    offset: *offset,
                    blocksize: params::FK_NF4_NESTED_BLOCKSIZE as usize,
                })
            }
        };
        Ok(Nf4Quantized {
            shape: vec![self.rows, self.cols],
            dtype: self.dtype,
            blocksize: self.blocksize,
            codes: self.codes.to_host()?,
            absmax,
        })
    }

    /// The params view kernels take.
    pub fn params(&self) -> params::Nf4Weight {
        let null_u8 = std::ptr::null::<u8>();
        let null_f32 = std::ptr::null::<f32>();
        let (absmax, nested_codes, nested_absmax, nested_map, offset, nested) = match &self.absmax {
            DeviceAbsmax::Plain(a) => (a.ptr() as *const f32, null_u8, null_f32, null_f32, 0.0, 0),
            DeviceAbsmax::Nested {
                codes,
                absmax,
                map,
                offset,
            } => (
                null_f32,
                codes.ptr() as *const u8,
                absmax.ptr() as *const f32,
                map.ptr() as *const f32,
                *offset,
                1,
            ),
        };
        params::Nf4Weight {
            codes: self.codes.ptr() as *const u8,
            absmax,
            nested_codes,
            nested_absmax,
            nested_map,
            offset,
            nested,
            blocksize: self.blocksize as u32,
            rows: self.rows as u32,
            cols: self.cols as u32,
        }
    }

    /// Writes `Ŵ` (`[rows, cols]`) into `out` in O's dtype (bf16, f16 or f32), bit-identical
    /// to bitsandbytes' `dequantize_4bit`.
    pub fn dequantize<O: FloatElem>(&self, out: &mut Buffer<O>) -> Result<()> {
        Error::check_len("nf4 dequantize output", self.rows * self.cols, out.len())?;
        self.dequantize_strided(out, self.cols)
    }

    /// [`Nf4Weight::dequantize`] into the first `cols` columns of the rows of a wider matrix
    /// (`ld >= cols` elements per row; the other columns are left as they are).
    pub fn dequantize_strided<O: FloatElem>(&self, out: &mut Buffer<O>, ld: usize) -> Result<()> {
        self.dequantize_in_blocks(out, ld, None)
    }

    /// [`Nf4Weight::dequantize_strided`] on at most `max_blocks` blocks, each then looping
    /// over passes (the benchmarks' one-wave launch); `None`: a thread a pass.
    pub(crate) fn dequantize_in_blocks<O: FloatElem>(
        &self,
        out: &mut Buffer<O>,
        ld: usize,
        max_blocks: Option<u32>,
    ) -> Result<()> {
        check_row_stride("nf4 dequantize ld", ld, self.cols)?;
        let need = (self.rows - 1)
            .checked_mul(ld)
            .and_then(|n| n.checked_add(self.cols));
        if need.is_none_or(|n| out.len() < n) {
            return Err(Error::ShapeMismatch {
                what: format!(
                    "nf4 dequantize output: {} rows of {} elements, {ld} apart",
                    self.rows, self.cols
                ),
                expected: vec![need.unwrap_or(usize::MAX)],
                got: vec![out.len()],
            });
        }
        check_device(self.device(), out)?;
        let p = Nf4DequantizeParams {
            w: self.params(),
            out: out.ptr_mut(),
            out_ld: ld as u64,
        };
        let mut cfg = dequantize_launch(p.w.rows as u64 * p.w.cols as u64, O::DTYPE);
        if let Some(blocks) = max_blocks {
            cfg.grid.0 = cfg.grid.0.min(blocks.max(1));
        }
        // SAFETY: out holds rows of ld elements, checked above; the weight's buffers match
        // its shape.
        unsafe { raw::dequantize_on(self.device(), None, O::DTYPE, &p, cfg) }
    }
}

/// The dequantize kernel writing `out`.
pub(crate) fn dequantize_kernel(out: DType) -> Kernel {
    kernel(format!("nf4_dequantize_{out}"))
}

/// nf4_dequantize's grid for an `out` output: a thread per pass of `FK_NF4_DEQUANTIZE_RUNS`
/// runs of 16 bytes of output (8 elements of bf16 or f16 a run, 4 of f32).
fn dequantize_launch(numel: u64, out: DType) -> LaunchConfig {
    let per_thread = params::FK_NF4_DEQUANTIZE_RUNS as u64 * 16 / out.size() as u64;
    LaunchConfig::grid_stride(numel.div_ceil(per_thread), THREADS, MAX_BLOCKS)
}

/// Double quantization of the absmaxes on the device (bitsandbytes' compress_statistics).
fn nest(dev: &Device, absmax: &Buffer<f32>) -> Result<DeviceAbsmax> {
    let blocks = absmax.len();
    let groups = blocks.div_ceil(params::FK_NF4_NESTED_BLOCKSIZE as usize);
    let map = dev.upload(&dynamic_map())?;
    let mut chunk_sums =
        dev.alloc_output::<f64>(blocks.div_ceil(params::FK_NF4_MEAN_CHUNK as usize))?;
    let mut offset = dev.alloc_output::<f32>(1)?;
    let mut codes = dev.alloc_output::<u8>(blocks)?;
    let mut nested_absmax = dev.alloc_output::<f32>(groups)?;
    let p = Nf4NestedParams {
        absmax: absmax.ptr() as *const f32,
        chunk_sums: chunk_sums.ptr_mut() as *mut f64,
        offset: offset.ptr_mut() as *mut f32,
        nested_codes: codes.ptr_mut() as *mut u8,
        nested_absmax: nested_absmax.ptr_mut() as *mut f32,
        nested_map: map.ptr() as *const f32,
        blocks: blocks as u64,
    };
    let one_block = LaunchConfig {
        grid: (1, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
        cluster: (1, 1, 1),
    };
    // SAFETY: every buffer is sized for `blocks` absmaxes above.
    unsafe { dev.launch(&kernel("nf4_absmax_mean".into()), one_block, &p)? };
    let cfg = LaunchConfig::warp_stride(groups as u64, THREADS, MAX_BLOCKS);
    // SAFETY: as above; the offset was written by the previous launch on the same stream.
    unsafe { dev.launch(&kernel("nf4_quantize_nested".into()), cfg, &p)? };
    let offset = offset.to_host()?[0];
    Ok(DeviceAbsmax::Nested {
        codes,
        absmax: nested_absmax,
        map,
        offset,
    })
}

/// How a matmul through an NF4 weight is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulPath {
    /// The fused GEMV on tensor cores (forward only, up to [`GEMV_MAX_ROWS`] rows): the
    /// weight is `mma.sync`'s A operand, decoded from a table of code pairs a byte at a time
    /// (about 3.5 instructions per weight element in its loop, against 8 for
    /// [`MatmulPath::Gemv`]), so that the 4-bit weight's bytes should bound it. The codes
    /// enter the `mma` rounded to the activations' dtype (as bitsandbytes' GEMV rounds
    /// code × absmax); each block's sum is scaled by its f32 absmax.
    GemvMma,
    /// The fused SIMT GEMV (forward only, up to [`SIMT_GEMV_MAX_ROWS`] rows): `Ŵ` in f32, a
    /// table lookup and a multiply-add per element (about eight instructions per element).
    /// On an H200 (2026-11-27T0544) 1.07× / 1.22× [`MatmulPath::GemvMma`]'s time at 1 row
    /// and 4.5× / 5.8× at 16 (4096→11008 / 11008→4096); kept beside it until a GPU run times
    /// the tensor-core GEMV's later versions (bench/predictions.json's decision).
    Gemv,
    /// The fused dX GEMV (backward only, up to [`GEMV_DX_MAX_ROWS`] rows): dX sums over W's
    /// rows, so its blocks take a slab of columns each over one split of the rows
    /// ([`gemv_dx_splits`]), keep f32 sums (`Ŵ` in f32, code × absmax) and write a partial per
    /// split, which a second kernel adds in split order: deterministic. Reads the 4-bit weight
    /// once, where dequantize + cuBLAS writes and reads it in bf16 (2.5 bytes an element more)
    /// and the `mma.sync` GEMM's dX has a block per 128 columns (32 blocks at 4096).
    GemvDx,
    /// The fused tensor-core GEMM (`mma.sync`): the weight is dequantized on its way into
    /// shared memory and never materialized.
    FusedGemm,
    /// The fused GEMM on Hopper's `wgmma` (`cuda/include/wgmma.cuh`; Hopper and the
    /// emulator): the weight dequantized into each stage while an earlier stage's `wgmma`s
    /// run (`Nf4Operand`, `cuda/include/nf4.cuh`), never materialized; the backward computes
    /// `dXᵀ` so that W is read as it lies. Not chosen by [`choose_path`]: on an H200
    /// (2026-11-27T0544) it took 3.8× / 3.2× [`MatmulPath::DequantizeCublas`]'s time at 8192
    /// rows, forward / dX (bench/NOTES.md).
    FusedGemmWgmma,
    /// Dequantize `Ŵ` into a scratch buffer, then cuBLAS. On Hopper cuBLAS runs `wgmma`,
    /// about twice the rate of the `mma.sync` the fused GEMM uses, so once there are enough
    /// rows the extra pass over the weight (2.5 bytes per element) costs less than the
    /// difference: see [`choose_path`].
    DequantizeCublas,
}

impl MatmulPath {
    /// The most activation rows the path takes (the GEMMs: any number).
    pub fn max_rows(self) -> usize {
        match self {
            MatmulPath::GemvMma => GEMV_MAX_ROWS,
            MatmulPath::Gemv => SIMT_GEMV_MAX_ROWS,
            MatmulPath::GemvDx => GEMV_DX_MAX_ROWS,
            _ => usize::MAX,
        }
    }

    /// The name checks and benchmarks give this path's forward (or backward dX) with
    /// `dtype` activations: its kernel's, e.g. `nf4_gemm_dx_bf16`.
    pub fn label(self, forward: bool, dtype: DType) -> String {
        let stem = match (self, forward) {
            (MatmulPath::GemvMma, _) => "nf4_gemv_mma",
            (MatmulPath::Gemv, _) => "nf4_gemv",
            (MatmulPath::GemvDx, _) => "nf4_gemv_dx",
            (MatmulPath::FusedGemm, true) => "nf4_gemm",
            (MatmulPath::FusedGemm, false) => "nf4_gemm_dx",
            (MatmulPath::FusedGemmWgmma, true) => "nf4_gemm_wgmma",
            (MatmulPath::FusedGemmWgmma, false) => "nf4_gemm_dx_wgmma",
            (MatmulPath::DequantizeCublas, true) => "nf4_dequant_cublas",
            (MatmulPath::DequantizeCublas, false) => "nf4_dequant_cublas_dx",
        };
        format!("{stem}_{dtype}")
    }
}

/// The path [`forward`] / [`backward_dx`] take for `m` rows on `dev`: the tensor-core GEMV
/// for a forward of up to [`GEMV_MAX_ROWS`] rows, the dX GEMV for a backward of up to
/// [`GEMV_DX_MAX_ROWS`]; past them, dequantize + cuBLAS where cuBLAS is present (the
/// emulator, or cuBLAS not loadable: the fused GEMM).
///
/// The dX GEMV (thirtieth session) has not run on a GPU: it reads the 4-bit weight once where
/// dequantize + cuBLAS's dX took 76-82 µs at 4 to 64 rows on an H200 (below), and its
/// predicted 12-30 µs at 1 row and 25-50 at 16 are bench/predictions.json's, with the decision
/// that keeps [`GEMV_DX_MAX_ROWS`] or sets it to 0.
///
/// Measured on an H200 (bench/results/2026-11-27T0544-h200.md, 4096→11008 and 11008→4096,
/// bf16): dequantize + cuBLAS took 76-82 µs at 4 to 64 rows (forward and dX), a dequantize
/// pass plus cuBLAS reading Ŵ at any small batch, and 961 / 942 µs at 8192 rows, within 5% of cuBLAS on a bf16
/// weight; the fused `mma.sync` GEMM 150-154 µs at 4 to 64 rows (its dX 533-538) and 4306 at
/// 8192, so cuBLAS's `wgmma` wins past the GEMV in both directions. The tensor-core GEMV took
/// 27.1 / 27.4 µs at 1 row and 35.4 / 29.5 at 16 (the SIMT one 29.1 / 33.3 and 158.5 / 171.6).
/// Past 16 rows it had no instantiation then. Each block of it reads all of x (its 16 weight
/// rows' share of K from every activation row) from L2, so 16 more rows cost it ≈ 8 µs at
/// 4096→11008 there: ≈ 45 µs at 32 rows and ≈ 60 at 64 from those figures, under dequantize +
/// cuBLAS, hence all 64. The next GPU check times both at 32 and 64 rows
/// (bench/predictions.json's decision).
pub fn choose_path(dev: &Device, m: usize, forward: bool) -> MatmulPath {
    match fused_path(m, forward) {
        MatmulPath::FusedGemm if dev.has_cublas() => MatmulPath::DequantizeCublas,
        path => path,
    }
}

/// The fused kernel for `m` rows: the tensor-core GEMV for a forward of up to
/// [`GEMV_MAX_ROWS`] rows, the dX GEMV for a backward of up to [`GEMV_DX_MAX_ROWS`], else
/// the GEMM (what [`choose_path`] and the raw entry point share).
fn fused_path(m: usize, forward: bool) -> MatmulPath {
    match forward {
        true if m <= GEMV_MAX_ROWS => MatmulPath::GemvMma,
        false if m <= GEMV_DX_MAX_ROWS => MatmulPath::GemvDx,
        _ => MatmulPath::FusedGemm,
    }
}

/// Columns a lane of the dX GEMV sums for a bucket of `m` rows (`gemv_dx` in cuda/nf4.cu:
/// at most 64 sums a lane, so fewer columns as rows grow).
fn gemv_dx_cols_per_lane(m: usize) -> usize {
    match m.max(1).next_power_of_two() {
        1 | 2 => 32,
        b => 64 / b,
    }
}

/// The dX GEMV's slabs of columns (a block's: 32 lanes' columns) for `m` rows through a
/// weight of `cols` columns.
fn gemv_dx_slabs(cols: usize, m: usize) -> usize {
    cols.div_ceil(32 * gemv_dx_cols_per_lane(m))
}

/// How many splits of the weight's `rows` the dX GEMV sums apart for `m` rows on `dev`
/// (each a partial of `m × cols` f32 in the workspace, `splits · m · cols` in all: see
/// [`raw::matmul_with`]): enough for two blocks on each SM (128 registers a thread, 256
/// threads), as its slabs of columns alone are few (4 at 1 row and 4096 columns), and at
/// least 64 rows a split (8 a warp), so that the partials stay small beside the weight.
pub fn gemv_dx_splits(dev: &Device, rows: usize, cols: usize, m: usize) -> usize {
    let wanted = (2 * dev.sm_count()).div_ceil(gemv_dx_slabs(cols, m).max(1));
    wanted.clamp(1, rows.div_ceil(64).max(1))
}

/// The fused kernel and launch of `path` (a GEMV, or the GEMM) for `p`'s forward or backward
/// dX, on a GPU of `sms` SMs (the wgmma GEMM's persistent blocks, one per SM).
fn fused_launch(
    act: DType,
    p: &Nf4MatmulParams,
    forward: bool,
    path: MatmulPath,
    sms: usize,
) -> (Kernel, LaunchConfig) {
    let (rows, cols, m) = (p.w.rows, p.w.cols, p.m);
    let bucket = m.max(1).next_power_of_two();
    match path {
        MatmulPath::GemvMma => {
            let rows_per_block = params::FK_NF4_GEMV_MMA_ROWS;
            let cfg = LaunchConfig {
                grid: (rows.div_ceil(rows_per_block), 1, 1),
                block: (params::FK_NF4_GEMV_MMA_THREADS, 1, 1),
                shared_bytes: 0,
                cluster: (1, 1, 1),
            };
            (
                kernel(format!("nf4_gemv_mma_{act}_m{}", bucket.max(8))),
                cfg,
            )
        }
        MatmulPath::Gemv => {
            // One warp per 4 weight rows (2 for more than 4 activation rows: fewer registers).
            let rows_per_warp = if bucket <= 4 { 4 } else { 2 };
            let warps = rows.div_ceil(rows_per_warp) as u64;
            (
                kernel(format!("nf4_gemv_{act}_m{bucket}")),
                LaunchConfig::warp_stride(warps, THREADS, MAX_BLOCKS),
            )
        }
        MatmulPath::GemvDx => {
            let cfg = LaunchConfig {
                grid: (
                    gemv_dx_slabs(cols as usize, m as usize) as u32,
                    p.row_splits,
                    1,
                ),
                block: (params::FK_NF4_GEMV_DX_THREADS, 1, 1),
                shared_bytes: 0,
                cluster: (1, 1, 1),
            };
            (kernel(format!("nf4_gemv_dx_{act}_m{bucket}")), cfg)
        }
        MatmulPath::FusedGemmWgmma => {
            let n_out = if forward { rows } else { cols };
            let cfg = LaunchConfig::wgmma(m as usize, n_out as usize, !forward, 1, sms);
            (kernel(path.label(forward, act)), cfg)
        }
        // (Dequantize + cuBLAS launches no fused kernel; its callers never ask.)
        MatmulPath::FusedGemm | MatmulPath::DequantizeCublas => {
            let n_out = if forward { rows } else { cols };
            let cfg = LaunchConfig::tiles(m as usize, n_out as usize, 1);
            let name = if forward {
                format!("nf4_gemm_{act}")
            } else {
                format!("nf4_gemm_dx_{act}")
            };
            (kernel(name), cfg)
        }
    }
}

fn check_matmul<T: FloatElem>(
    w: &Nf4Weight,
    a: &Buffer<T>,
    out: &Buffer<T>,
    m: usize,
    forward: bool,
) -> Result<()> {
    if !matches!(T::DTYPE, DType::BF16 | DType::F16) {
        return Err(Error::UnsupportedDtype {
            op: "nf4 matmul",
            dtypes: T::DTYPE.to_string(),
        });
    }
    let (k_in, n_out) = if forward {
        (w.cols, w.rows)
    } else {
        (w.rows, w.cols)
    };
    let what = if forward { "x" } else { "dy" };
    if a.len() != m.saturating_mul(k_in) {
        return Err(Error::ShapeMismatch {
            what: what.into(),
            expected: vec![m, k_in],
            got: vec![a.len()],
        });
    }
    if out.len() != m.saturating_mul(n_out) {
        return Err(Error::ShapeMismatch {
            what: "output".into(),
            expected: vec![m, n_out],
            got: vec![out.len()],
        });
    }
    if m > u32::MAX as usize {
        return Err(Error::Unsupported {
            op: "nf4 matmul",
            why: format!("{m} rows"),
        });
    }
    check_device(w.device(), a)?;
    check_device(w.device(), out)
}

/// `y[m, rows] = x[m, cols] · Ŵᵀ` through the path [`choose_path`] picks; returns it.
pub fn forward<T: FloatElem>(
    w: &Nf4Weight,
    x: &Buffer<T>,
    m: usize,
    y: &mut Buffer<T>,
) -> Result<MatmulPath>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let path = choose_path(w.device(), m, true);
    forward_with(w, x, m, y, path)?;
    Ok(path)
}

/// `dx[m, cols] = dy[m, rows] · Ŵ` through the path [`choose_path`] picks; returns it.
pub fn backward_dx<T: FloatElem>(
    w: &Nf4Weight,
    dy: &Buffer<T>,
    m: usize,
    dx: &mut Buffer<T>,
) -> Result<MatmulPath>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let path = choose_path(w.device(), m, false);
    backward_dx_with(w, dy, m, dx, path)?;
    Ok(path)
}

/// The forward through a given path (for tests and benchmarks).
pub fn forward_with<T: FloatElem>(
    w: &Nf4Weight,
    x: &Buffer<T>,
    m: usize,
    y: &mut Buffer<T>,
    path: MatmulPath,
) -> Result<()>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    check_matmul(w, x, y, m, true)?;
    run_matmul(w, x, m, y, path, true, Nf4GemvEpilogue::default())
}

/// The backward dX through a given path (for tests and benchmarks).
pub fn backward_dx_with<T: FloatElem>(
    w: &Nf4Weight,
    dy: &Buffer<T>,
    m: usize,
    dx: &mut Buffer<T>,
    path: MatmulPath,
) -> Result<()>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    check_matmul(w, dy, dx, m, false)?;
    run_matmul(w, dy, m, dx, path, false, Nf4GemvEpilogue::default())
}

/// What a GEMV adds to each output before its one rounding, in f32: a LoRA layer's bias and
/// low-rank term over an NF4 base, so that its forward at decode sizes reads the 4-bit
/// weight once and writes `y` once ([`gemv_with_epilogue`]).
#[derive(Clone, Copy)]
pub struct GemvEpilogue<'a, T: FloatElem> {
    /// `bias [rows]`, added to every row of the output.
    pub bias: Option<&'a Buffer<T>>,
    /// The low-rank term `u bᵀ`: `u [m, rank]` and `b [rows, rank]` (a LoRA layer's
    /// `scale · dropout(x) Aᵀ` and `lora_B`), and the rank.
    pub low_rank: Option<(&'a Buffer<T>, &'a Buffer<T>, usize)>,
}

/// `y[m, rows] = x[m, cols] · Ŵᵀ + bias + u bᵀ` through a GEMV `path`
/// ([`MatmulPath::GemvMma`] for up to [`GEMV_MAX_ROWS`] rows, [`MatmulPath::Gemv`] for up to
/// [`SIMT_GEMV_MAX_ROWS`]): the epilogue's terms are summed in f32 with the product and
/// rounded once. Another path is an [`Error::Unsupported`]: the GEMMs take no epilogue.
pub fn gemv_with_epilogue<T: FloatElem>(
    w: &Nf4Weight,
    x: &Buffer<T>,
    m: usize,
    y: &mut Buffer<T>,
    path: MatmulPath,
    epilogue: GemvEpilogue<'_, T>,
) -> Result<()>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    if !matches!(path, MatmulPath::GemvMma | MatmulPath::Gemv) {
        return Err(Error::Unsupported {
            op: "nf4 gemv epilogue",
            why: format!("only the GEMVs add an epilogue, not {path:?}"),
        });
    }
    check_matmul(w, x, y, m, true)?;
    let mut e = Nf4GemvEpilogue::default();
    if let Some(bias) = epilogue.bias {
        Error::check_shape("nf4 gemv epilogue bias [rows]", &[w.rows], bias.len())?;
        check_device(w.device(), bias)?;
        e.bias = bias.ptr();
    }
    if let Some((u, b, rank)) = epilogue.low_rank {
        if rank == 0 || rank > u32::MAX as usize {
            return Err(Error::InvalidArgument {
                what: "nf4 gemv epilogue rank",
                why: format!("{rank}: 1 to {}", u32::MAX),
            });
        }
        Error::check_shape("nf4 gemv epilogue u [m, rank]", &[m, rank], u.len())?;
        Error::check_shape("nf4 gemv epilogue b [rows, rank]", &[w.rows, rank], b.len())?;
        check_device(w.device(), u)?;
        check_device(w.device(), b)?;
        (e.u, e.b, e.rank) = (u.ptr(), b.ptr(), rank as u32);
    }
    run_matmul(w, x, m, y, path, true, e)
}

fn run_matmul<T: FloatElem>(
    w: &Nf4Weight,
    a: &Buffer<T>,
    m: usize,
    out: &mut Buffer<T>,
    path: MatmulPath,
    forward: bool,
    epilogue: Nf4GemvEpilogue,
) -> Result<()>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    if m == 0 {
        return Ok(());
    }
    let dev = w.device().clone();
    let mut p = Nf4MatmulParams {
        w: w.params(),
        a: a.ptr(),
        out: out.ptr_mut(),
        m: m as u32,
        epilogue,
        ..Nf4MatmulParams::default()
    };
    if path == MatmulPath::FusedGemmWgmma {
        // The activations are the wgmma GEMM's K-contiguous operand: the forward's A (boxes
        // of the tile's rows), dX's B (of its columns: dXᵀ's).
        let (k, box_rows) = if forward {
            (w.cols, crate::params::FK_WGMMA_TILE_M)
        } else {
            (w.rows, crate::params::FK_WGMMA_TILE_N)
        };
        let tile = TileMap {
            ptr: a.ptr(),
            cols: k,
            rows: m,
            ld: k,
            box_rows,
        };
        if let Some(map) = w.device().tile_map::<T>(tile)? {
            p.a_tma = 1;
            p.a_map = map;
        }
    }
    // The dX GEMV's partial sums, a split of the rows each.
    let mut partials = None;
    if path == MatmulPath::GemvDx {
        let splits = gemv_dx_splits(&dev, w.rows, w.cols, m);
        let buf = partials.insert(dev.alloc_output::<f32>(splits * m * w.cols)?);
        (p.partials, p.row_splits) = (buf.ptr_mut().cast(), splits as u32);
    }
    match path {
        MatmulPath::GemvMma
        | MatmulPath::Gemv
        | MatmulPath::GemvDx
        | MatmulPath::FusedGemm
        | MatmulPath::FusedGemmWgmma => {
            // SAFETY: shapes checked in check_matmul, an epilogue's by gemv_with_epilogue
            // (raw::matmul_with refuses one on a GEMM); the GEMVs for a bucket of rows read
            // only the first m rows (the tensor-core one reads rows past m and past the
            // weight's last as the last real ones), the GEMMs bounds-check every tile edge;
            // the dX GEMV's partials are the row_splits · m · cols allocated above.
            unsafe { raw::matmul_with(&dev, None, T::DTYPE, forward, path, &p) }
        }
        MatmulPath::DequantizeCublas => {
            let Device::Cuda(cuda) = &dev else {
                return Err(Error::Unsupported {
                    op: "nf4 matmul",
                    why: "dequantize + cuBLAS needs a GPU".into(),
                });
            };
            let blas = blas::handle(cuda)?.ok_or(Error::Unsupported {
                op: "nf4 matmul",
                why: "cuBLAS is not loadable".into(),
            })?;
            let mut scratch = dev.alloc_output::<T>(w.rows * w.cols)?;
            w.dequantize(&mut scratch)?;
            let (a, s) = (
                a.as_cuda_slice().expect("a CUDA buffer"),
                scratch.as_cuda_slice().expect("a CUDA buffer"),
            );
            let o = out.as_cuda_slice_mut().expect("a CUDA buffer");
            if forward {
                blas::matmul(
                    blas,
                    a,
                    w.cols,
                    s,
                    w.cols,
                    o,
                    w.rows,
                    (m, w.rows, w.cols),
                    WeightOp::Transposed,
                )
            } else {
                blas::matmul(
                    blas,
                    a,
                    w.rows,
                    s,
                    w.cols,
                    o,
                    w.cols,
                    (m, w.cols, w.rows),
                    WeightOp::Plain,
                )
            }
        }
    }
}

/// Every kernel this module can launch (the build checks look each up in the PTX).
pub fn kernels() -> Vec<Kernel> {
    let mut names = vec![
        "nf4_absmax_mean".to_string(),
        "nf4_quantize_nested".to_string(),
    ];
    for t in ["bf16", "f16", "f32"] {
        names.push(format!("nf4_quantize_{t}"));
        names.push(format!("nf4_dequantize_{t}"));
    }
    for t in ["bf16", "f16"] {
        for m in [1, 2, 4, 8, 16] {
            names.push(format!("nf4_gemv_{t}_m{m}"));
        }
        for m in [8, 16, 32, 64] {
            names.push(format!("nf4_gemv_mma_{t}_m{m}"));
        }
        for m in [1, 2, 4, 8, 16] {
            names.push(format!("nf4_gemv_dx_{t}_m{m}"));
        }
        names.push(format!("nf4_gemv_dx_reduce_{t}"));
        names.push(format!("nf4_gemm_{t}"));
        names.push(format!("nf4_gemm_dx_{t}"));
        names.push(format!("nf4_gemm_wgmma_{t}"));
        names.push(format!("nf4_gemm_dx_wgmma_{t}"));
    }
    names.into_iter().map(kernel).collect()
}

/// Raw entry points for framework authors: launch on memory and a stream your framework
/// owns (`Some(stream)`; `None` is the device's own, and all the emulator takes). Fill
/// [`params::Nf4Weight`] with device pointers in bitsandbytes' layout. Checked: the dtype,
/// the weight's params ([`raw::check_weight`]: blocksize, shape, its pointers present and
/// aligned), the activations' and dequantized output's 16-byte alignment
/// ([`Error::Misaligned`]), the GEMVs' row limits and wgmma's Hopper. That the pointers
/// point at memory of the sizes the shapes say is the caller's promise.
pub mod raw {
    use super::*;
    use cudarc::driver::sys::CUstream;

    fn float_dtype(op: &'static str, t: DType, allowed: &[DType]) -> Result<()> {
        if allowed.contains(&t) {
            Ok(())
        } else {
            Err(Error::UnsupportedDtype {
                op,
                dtypes: t.to_string(),
            })
        }
    }

    /// An epilogue (`p.epilogue`) only on a GEMV, with a b and a rank of at least 1 beside
    /// its u, and each pointer aligned to the activations' dtype.
    fn check_epilogue(act: DType, path: MatmulPath, e: &Nf4GemvEpilogue) -> Result<()> {
        if e.bias.is_null() && e.u.is_null() {
            return Ok(());
        }
        if !matches!(path, MatmulPath::GemvMma | MatmulPath::Gemv) {
            return Err(Error::Unsupported {
                op: "nf4 matmul",
                why: format!("only the GEMVs add an epilogue, not {path:?}"),
            });
        }
        if !e.u.is_null() && (e.b.is_null() || e.rank == 0) {
            return Err(Error::InvalidArgument {
                what: "nf4 raw gemv epilogue",
                why: format!(
                    "a u with b {:?} and rank {}: b non-null, rank >= 1",
                    e.b, e.rank
                ),
            });
        }
        // b is read only beside a u.
        let b = if e.u.is_null() { std::ptr::null() } else { e.b };
        Error::check_all_aligned(&[
            ("nf4 raw gemv epilogue bias", e.bias, act.size()),
            ("nf4 raw gemv epilogue u", e.u, act.size()),
            ("nf4 raw gemv epilogue b", b, act.size()),
        ])
    }

    /// What the kernels assume of a weight's params, checked: a blocksize bitsandbytes
    /// allows (the kernels shift by its log2), at least one row and column, and the pointers
    /// its absmax kind reads, present and aligned (codes to 16 bytes, for the GEMVs' vector
    /// loads; the f32 arrays to 4). (That they point at memory of the weight's size is the
    /// caller's promise.)
    pub fn check_weight(w: &params::Nf4Weight) -> Result<()> {
        check_blocksize("nf4 raw weight", w.blocksize as usize)?;
        let nested = match w.nested {
            0 => false,
            1 => true,
            n => {
                return Err(Error::InvalidArgument {
                    what: "nf4 raw weight",
                    why: format!("nested {n}: 0 (f32 absmax) or 1 (double quantized)"),
                })
            }
        };
        let missing = if w.rows == 0 || w.cols == 0 {
            Some(format!("a {} × {} weight", w.rows, w.cols))
        } else if w.codes.is_null() {
            Some("codes are null".into())
        } else if !nested && w.absmax.is_null() {
            Some("absmax is null".into())
        } else if nested
            && (w.nested_codes.is_null() || w.nested_absmax.is_null() || w.nested_map.is_null())
        {
            Some("double quantized, with a null nested_codes, nested_absmax or nested_map".into())
        } else {
            None
        };
        if let Some(why) = missing {
            return Err(Error::InvalidArgument {
                what: "nf4 raw weight",
                why,
            });
        }
        Error::check_aligned("nf4 raw weight codes", w.codes, 16)?;
        if nested {
            Error::check_aligned("nf4 raw weight nested_absmax", w.nested_absmax, 4)?;
            Error::check_aligned("nf4 raw weight nested_map", w.nested_map, 4)
        } else {
            Error::check_aligned("nf4 raw weight absmax", w.absmax, 4)
        }
    }

    /// `out = Ŵ` in `out`'s dtype (bf16, f16, f32).
    ///
    /// # Safety
    /// The pointers in `p` must be valid memory of `dev` (device addresses on a GPU, host
    /// addresses under the emulator) for the weight's shape, `out` for its rows `out_ld`
    /// apart (0: `cols`); `stream` must belong to `dev`'s context.
    pub unsafe fn dequantize(
        dev: &Device,
        stream: Option<CUstream>,
        out: DType,
        p: &Nf4DequantizeParams,
    ) -> Result<()> {
        let cfg = dequantize_launch(p.w.rows as u64 * p.w.cols as u64, out);
        // SAFETY: forwarded from this function's contract.
        unsafe { dequantize_on(dev, stream, out, p, cfg) }
    }

    /// [`dequantize`] on the grid `cfg` (any number of blocks of the kernel's threads: its
    /// blocks loop over passes).
    ///
    /// # Safety
    /// As [`dequantize`].
    pub(crate) unsafe fn dequantize_on(
        dev: &Device,
        stream: Option<CUstream>,
        out: DType,
        p: &Nf4DequantizeParams,
        cfg: LaunchConfig,
    ) -> Result<()> {
        float_dtype(
            "nf4 dequantize",
            out,
            &[DType::BF16, DType::F16, DType::F32],
        )?;
        check_weight(&p.w)?;
        Error::check_aligned("nf4 raw dequantize out", p.out, 16)?;
        // SAFETY: forwarded from this function's contract.
        unsafe { dev.launch_on(&dequantize_kernel(out), cfg, stream, p) }
    }

    /// The fused forward (`forward == true`: the tensor-core GEMV for m ≤
    /// [`GEMV_MAX_ROWS`], else the `mma.sync` GEMM) or backward dX (the dX GEMV for m ≤
    /// [`GEMV_DX_MAX_ROWS`] where `p.partials` holds its workspace, as [`matmul_with`] says;
    /// else, a null `p.partials` included, the GEMM).
    ///
    /// # Safety
    /// As [`dequantize`], with `a` and `out` sized `[m, cols]`/`[m, rows]` (forward) or
    /// `[m, rows]`/`[m, cols]` (backward), and the GEMVs' epilogue (`p.epilogue`; checked:
    /// only on a GEMV) readable where not null: `bias [rows]`, `u [m, rank]`,
    /// `b [rows, rank]` ([`super::gemv_with_epilogue`]); `out` overlapping none of them (a
    /// block's stores would race with another's epilogue reads).
    pub unsafe fn matmul(
        dev: &Device,
        stream: Option<CUstream>,
        act: DType,
        forward: bool,
        p: &Nf4MatmulParams,
    ) -> Result<()> {
        let path = match fused_path(p.m as usize, forward) {
            MatmulPath::GemvDx if p.partials.is_null() => MatmulPath::FusedGemm,
            path => path,
        };
        // SAFETY: forwarded from this function's contract.
        unsafe { matmul_with(dev, stream, act, forward, path, p) }
    }

    /// [`matmul`] through a fused `path` of your choice: a GEMV (forward, 1 to
    /// [`GEMV_MAX_ROWS`] rows, [`SIMT_GEMV_MAX_ROWS`] for the SIMT one), the dX GEMV
    /// (backward, 1 to [`GEMV_DX_MAX_ROWS`] rows), the `mma.sync` GEMM, or the wgmma one
    /// (Hopper; its activations by TMA where `p.a_tma` flags a map you encoded, else
    /// cp.async). For [`MatmulPath::DequantizeCublas`] dequantize into your scratch
    /// ([`dequantize`]) and call your cuBLAS: it is refused here.
    ///
    /// The dX GEMV launches two kernels on `stream` and needs a workspace: `p.row_splits`
    /// (1 to the weight's rows; [`super::gemv_dx_splits`] is the safe API's choice) and
    /// `p.partials`, f32 `[row_splits, m, cols]`, 16-byte aligned (checked), which it
    /// overwrites; no other path reads either.
    ///
    /// # Safety
    /// As [`matmul`]; for the dX GEMV, `p.partials` writable for `row_splits · m · cols`
    /// f32 and overlapping no operand.
    pub unsafe fn matmul_with(
        dev: &Device,
        stream: Option<CUstream>,
        act: DType,
        forward: bool,
        path: MatmulPath,
        p: &Nf4MatmulParams,
    ) -> Result<()> {
        float_dtype("nf4 matmul", act, &[DType::BF16, DType::F16])?;
        check_weight(&p.w)?;
        Error::check_all_aligned(&[
            ("nf4 raw matmul activations", p.a, 16),
            ("nf4 raw matmul out", p.out, act.size()),
        ])?;
        check_epilogue(act, path, &p.epilogue)?;
        let m = p.m as usize;
        match path {
            // Each GEMV runs one direction, up to its rows.
            MatmulPath::GemvMma | MatmulPath::Gemv | MatmulPath::GemvDx
                if forward == (path == MatmulPath::GemvDx) || m > path.max_rows() =>
            {
                let way = |f: bool| if f { "forward" } else { "backward" };
                let (its, got) = (way(path != MatmulPath::GemvDx), way(forward));
                return Err(Error::Unsupported {
                    op: "nf4 gemv",
                    why: format!(
                        "the {path:?} GEMV is {its}-only, 1..={} rows; got {m} rows {got}",
                        path.max_rows()
                    ),
                });
            }
            MatmulPath::GemvDx => {
                if p.row_splits == 0 || p.row_splits > p.w.rows.min(u16::MAX as u32) {
                    return Err(Error::InvalidArgument {
                        what: "nf4 raw gemv dx row_splits",
                        why: format!(
                            "{}: 1 to the weight's rows ({}), at most {}",
                            p.row_splits,
                            p.w.rows,
                            u16::MAX
                        ),
                    });
                }
                if p.partials.is_null() {
                    return Err(Error::InvalidArgument {
                        what: "nf4 raw gemv dx partials",
                        why: "null: the dX GEMV needs [row_splits, m, cols] f32".into(),
                    });
                }
                Error::check_aligned("nf4 raw gemv dx partials", p.partials, 16)?;
            }
            MatmulPath::FusedGemmWgmma if !dev.has_wgmma() => {
                return Err(Error::Unsupported {
                    op: "nf4 matmul",
                    why: format!("the wgmma GEMM needs Hopper (sm_90a); {}", dev.describe()),
                });
            }
            MatmulPath::DequantizeCublas => {
                return Err(Error::Unsupported {
                    op: "nf4 raw matmul",
                    why: "dequantize + cuBLAS is yours to call: dequantize, then your GEMM".into(),
                });
            }
            _ => {}
        }
        if m == 0 {
            return Ok(());
        }
        let (k, cfg) = fused_launch(act, p, forward, path, dev.sm_count());
        // SAFETY: forwarded from this function's contract.
        unsafe { dev.launch_on(&k, cfg, stream, p) }?;
        if path == MatmulPath::GemvDx {
            // The splits' partials added in order into out.
            let cfg = LaunchConfig::grid_stride(p.m as u64 * p.w.cols as u64, THREADS, MAX_BLOCKS);
            let k = kernel(format!("nf4_gemv_dx_reduce_{act}"));
            // SAFETY: as the launch above; the reduce reads the partials it wrote.
            unsafe { dev.launch_on(&k, cfg, stream, p) }?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16;
    use crate::device::with_grid_cap;
    use crate::reference::nf4::quantize;
    use crate::testing::{backends, random_vec};
    use rand::{rngs::StdRng, SeedableRng};

    /// The grid-stride loops past their first pass: quantize (a warp per block, several blocks
    /// each), its nested absmaxes (a warp per group of 256, several each) and dequantize
    /// (passes of FK_NF4_DEQUANTIZE_RUNS runs a thread, several each), on grids of 1 and 3
    /// blocks, bit-exact against the reference, and dequantize's launch capped likewise by
    /// its caller (the benchmarks' one wave). A real launch takes a second pass only past 2¹⁶
    /// blocks (dequantize: 536 M elements), which no other test reaches.
    #[test]
    fn grid_stride_loops_take_several_passes() {
        for dev in backends() {
            let mut rng = StdRng::seed_from_u64(rand::random());
            // 67 × 1031 at blocksize 32: 2,159 blocks in 9 nested groups, 8 passes of dequantize
            // on one block; 29 × 300 at 64 plain, into rows of 307 (runs that straddle rows).
            for (rows, cols, blocksize, double_quant, ld) in
                [(67, 1031, 32, true, 1031), (29, 300, 64, false, 307)]
            {
                let w: Vec<bf16> = random_vec(&mut rng, rows * cols, 0.3);
                let want = quantize(&w, &[rows, cols], blocksize, double_quant).unwrap();
                let wd = dev.upload(&w).unwrap();
                for max_blocks in [1, 3] {
                    let case = format!(
                        "{rows}x{cols} bs {blocksize} dq {double_quant} in {max_blocks} blocks"
                    );
                    let (q, got) = with_grid_cap(max_blocks, || {
                        let q = Nf4Weight::quantize(&wd, rows, cols, blocksize, double_quant)?;
                        let mut out = dev.alloc_poisoned::<f32>((rows - 1) * ld + cols)?;
                        q.dequantize_strided(&mut out, ld)?;
                        Ok::<_, Error>((q, out.to_host()?))
                    })
                    .unwrap();
                    assert_eq!(q.to_host().unwrap(), want, "quantize {case}");
                    // The benchmarks' one-wave launch: the same bits, the gaps left alone.
                    let mut wave = dev.alloc_poisoned::<f32>(got.len()).unwrap();
                    q.dequantize_in_blocks(&mut wave, ld, Some(max_blocks))
                        .unwrap();
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&wave.to_host().unwrap()), bits(&got), "{case}");
                    let expect = want.dequantize::<f32>();
                    for r in 0..rows {
                        for c in 0..cols {
                            assert_eq!(
                                got[r * ld + c].to_bits(),
                                expect[r * cols + c].to_bits(),
                                "dequantize [{r}][{c}] {case}"
                            );
                        }
                    }
                }
            }
        }
    }
}
