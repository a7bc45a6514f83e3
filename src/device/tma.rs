//! Tensor maps for the TMA loads of the Hopper GEMM (`cuda/include/wgmma.cuh`'s `Rows` and
//! `Columns` operands; the params field is `cuda/params/tma.h`'s `FkTensorMap`).
//!
//! A map describes one matrix of 16-bit elements, loaded in boxes of 64 elements along its
//! rows (K for `Rows`, the tile's rows for `Columns`) by some of its rows, into the 128-byte
//! swizzle, zeros outside the matrix.
//! On a GPU the driver encodes it (`cuTensorMapEncodeTiled`); on the emulator the same 128
//! bytes hold an `FkEmuTensorMap` that `cuda/emu/tma.cpp` reads. What the driver would
//! refuse is decided here, once, for both: such a matrix gets no map, and the kernel loads
//! it through cp.async as before.

use super::Device;
use crate::dtype::{DType, Elem};
use crate::error::{Error, Result};
use crate::params::{FkEmuTensorMap, FkTensorMap, FK_EMU_TENSOR_MAP_MAGIC};
use std::ffi::c_void;

/// Elements per box along a row: 128 bytes, the swizzle's span (one wgmma stage of K).
const BOX_K: u32 = 64;

/// A matrix of `rows` rows of `cols` elements, rows `ld` elements apart, loaded in boxes of
/// 64 elements along a row by `box_rows` rows. TMA takes it (the driver's and the PTX ISA's
/// rules for a 2-D tiled map with the 128-byte swizzle) if the address is 16-byte aligned,
/// rows are a multiple of 16 bytes apart (under 2^40 bytes) and no closer than a row's
/// length, both dimensions are in [1, 2^32] and the box has at most 256 rows.
#[derive(Debug, Clone, Copy)]
pub struct TileMap {
    /// Address of the matrix's first element (on the emulator, a host address).
    pub ptr: *const c_void,
    /// Elements per row (the inner dimension).
    pub cols: usize,
    /// Number of rows.
    pub rows: usize,
    /// Distance between consecutive rows, in elements.
    pub ld: usize,
    /// Rows per box (the outer box dimension).
    pub box_rows: u32,
}

impl TileMap {
    /// Whether a TMA load takes this matrix (the rules above).
    pub(crate) fn loadable(&self, elem_bytes: usize) -> bool {
        let Some(stride) = self.ld.checked_mul(elem_bytes) else {
            return false;
        };
        (self.ptr as usize).is_multiple_of(16)
            && stride % 16 == 0
            && (stride as u64) < (1u64 << 40)
            && self.ld >= self.cols
            && (1..=1usize << 32).contains(&self.cols)
            && (1..=1usize << 32).contains(&self.rows)
            && (1..=256).contains(&self.box_rows)
    }
}

impl Device {
    /// The tensor map of `m` for a kernel's TMA loads of `T` (bf16 or f16), or `None` where
    /// TMA cannot take it (see [`TileMap`]) or the device has no TMA (a GPU before sm_90);
    /// the kernel loads it through cp.async then.
    pub fn tile_map<T: Elem>(&self, m: TileMap) -> Result<Option<FkTensorMap>> {
        let elem_bytes = T::DTYPE.size();
        if !matches!(T::DTYPE, DType::BF16 | DType::F16) {
            return Err(Error::UnsupportedDtype {
                op: "tensor map",
                dtypes: T::DTYPE.to_string(),
            });
        }
        if !self.has_wgmma() || !m.loadable(elem_bytes) {
            return Ok(None);
        }
        let mut map = FkTensorMap::default();
        match self {
            Device::Cuda(_) => encode_cuda::<T>(&m, &mut map)?,
            Device::Emu(_) => {
                let emu = FkEmuTensorMap {
                    magic: FK_EMU_TENSOR_MAP_MAGIC,
                    base: m.ptr as u64,
                    dims: [m.cols as u64, m.rows as u64],
                    row_stride: (m.ld * elem_bytes) as u64,
                    box_: [BOX_K, m.box_rows],
                    elem_bytes: elem_bytes as u32,
                    swizzle_128b: 1,
                };
                bytemuck::bytes_of_mut(&mut map.opaque)[..std::mem::size_of::<FkEmuTensorMap>()]
                    .copy_from_slice(emu_bytes(&emu));
            }
        }
        Ok(Some(map))
    }
}

fn emu_bytes(m: &FkEmuTensorMap) -> &[u8] {
    // SAFETY: FkEmuTensorMap is a repr(C) struct of integers with no padding (five u64s,
    // then four u32s: 56 bytes, as bindgen's layout test asserts); any byte is initialized.
    unsafe {
        std::slice::from_raw_parts(
            m as *const FkEmuTensorMap as *const u8,
            std::mem::size_of::<FkEmuTensorMap>(),
        )
    }
}

fn encode_cuda<T: Elem>(m: &TileMap, out: &mut FkTensorMap) -> Result<()> {
    use cudarc::driver::sys;
    let elem_bytes = T::DTYPE.size();
    let dtype = match T::DTYPE {
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        _ => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let dims = [m.cols as u64, m.rows as u64];
    let strides = [(m.ld * elem_bytes) as u64];
    let boxes = [BOX_K, m.box_rows];
    let element_strides = [1u32, 1];
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: every pointer is to a live local of the length a rank-2 map reads (dims and
    // box 2, strides 1); the address and strides satisfy the driver's rules (loadable).
    unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            2,
            m.ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .map_err(|e| Error::driver("cuTensorMapEncodeTiled", e))?;
    out.opaque = map.opaque;
    Ok(())
}
