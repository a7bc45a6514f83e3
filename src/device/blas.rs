//! cuBLAS through cudarc, for baselines and for the "dequantize + cuBLAS" dispatch path:
//! loaded at run time if present (probed first: cudarc panics when the library is missing),
//! one handle per device.

use super::CudaDevice;
use crate::dtype::FloatElem;
use crate::error::{Error, Result};
use cudarc::cublas::{sys, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::CudaSlice;

/// Whether `w` is applied as `Wᵀ` (a linear layer's forward: `y = x Wᵀ`) or as `W`
/// (its input gradient: `dX = dY W`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightOp {
    /// `w` is stored `[n, k]` and applied as `Wᵀ`.
    Transposed,
    /// `w` is stored `[k, n]` and applied as is.
    Plain,
}

/// This device's cuBLAS handle, created on first use; `None` if libcublas is not loadable.
pub fn handle(dev: &CudaDevice) -> Result<Option<&CudaBlas>> {
    let slot = dev.blas.get_or_init(|| {
        // SAFETY: only tries to dlopen libcublas by its usual names.
        if !unsafe { sys::is_culib_present() } {
            return Ok(None);
        }
        CudaBlas::new(dev.stream().clone())
            .map(Some)
            .map_err(|e| Error::Driver {
                call: "cublasCreate",
                name: format!("{e:?}"),
            })
    });
    slot.as_ref().map(|b| b.as_ref()).map_err(Clone::clone)
}

/// Row-major `out[m, n] = a[m, k] · op(w)` with `w` stored `[n, k]` (Transposed) or
/// `[k, n]` (Plain); f32 accumulation. Rows are `lda`, `ldw`, `ldo` elements apart (at
/// least the row length), so operands may be column ranges of wider matrices. Errors if a
/// buffer cannot hold its rows or a size is past cuBLAS's i32.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: FloatElem>(
    blas: &CudaBlas,
    a: &CudaSlice<T>,
    lda: usize,
    w: &CudaSlice<T>,
    ldw: usize,
    out: &mut CudaSlice<T>,
    ldo: usize,
    (m, n, k): (usize, usize, usize),
    op: WeightOp,
) -> Result<()>
where
    CudaBlas: Gemm<T>,
{
    let (w_rows, w_cols) = match op {
        WeightOp::Transposed => (n, k),
        WeightOp::Plain => (k, n),
    };
    for (what, len, rows, cols, ld) in [
        ("a", a.len(), m, k, lda),
        ("w", w.len(), w_rows, w_cols, ldw),
        ("out", out.len(), m, n, ldo),
    ] {
        let need = rows
            .checked_sub(1)
            .map_or(Some(0), |r| r.checked_mul(ld)?.checked_add(cols));
        let fits = ld >= cols && need.is_some_and(|need| need <= len);
        if !fits || [rows, cols, ld].iter().any(|&v| v > i32::MAX as usize) {
            return Err(Error::Unsupported {
                op: "cublas matmul",
                why: format!("{what}: {rows} rows of {cols}, {ld} apart, in {len} elements"),
            });
        }
    }
    // Column-major view: outᵀ[n, m] = op(w)ᵀ-as-stored · aᵀ.
    let transa = match op {
        WeightOp::Transposed => sys::cublasOperation_t::CUBLAS_OP_T,
        WeightOp::Plain => sys::cublasOperation_t::CUBLAS_OP_N,
    };
    let cfg = GemmConfig {
        transa,
        transb: sys::cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: T::from_f32(1.0),
        lda: ldw as i32,
        ldb: lda as i32,
        beta: T::from_f32(0.0),
        ldc: ldo as i32,
    };
    // cuBLAS runs on the context current on this thread: the device's, whichever thread
    // this is.
    out.stream()
        .context()
        .bind_to_thread()
        .map_err(|e| Error::driver("cuCtxSetCurrent", e))?;
    super::breakdown::mark(out.stream().cu_stream(), "cuBLAS GEMM")?;
    // SAFETY: each buffer holds the rows cfg describes (checked above), within i32.
    unsafe { blas.gemm(cfg, w, a, out) }.map_err(|e| Error::Driver {
        call: "cublasGemmEx",
        name: format!("{e:?}"),
    })
}
