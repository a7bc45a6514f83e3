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
    Transposed,
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
/// `[k, n]` (Plain); f32 accumulation.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: FloatElem>(
    blas: &CudaBlas,
    a: &CudaSlice<T>,
    w: &CudaSlice<T>,
    out: &mut CudaSlice<T>,
    m: usize,
    n: usize,
    k: usize,
    op: WeightOp,
) -> Result<()>
where
    CudaBlas: Gemm<T>,
{
    // Column-major view: outᵀ[n, m] = op(w)ᵀ-as-stored · aᵀ.
    let (transa, lda) = match op {
        WeightOp::Transposed => (sys::cublasOperation_t::CUBLAS_OP_T, k),
        WeightOp::Plain => (sys::cublasOperation_t::CUBLAS_OP_N, n),
    };
    let cfg = GemmConfig {
        transa,
        transb: sys::cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: T::from_f32(1.0),
        lda: lda as i32,
        ldb: k as i32,
        beta: T::from_f32(0.0),
        ldc: n as i32,
    };
    // SAFETY: the slices hold m·k, n·k and m·n elements (checked by the callers), as cfg
    // describes.
    unsafe { blas.gemm(cfg, w, a, out) }.map_err(|e| Error::Driver {
        call: "cublasGemmEx",
        name: format!("{e:?}"),
    })
}
