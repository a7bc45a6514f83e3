//! Counter-based random numbers on the device: Philox4x32-10 blocks and dropout keep-masks.
//!
//! The fused kernels (LoRA dropout, MeZO perturbations) call the device functions in
//! `cuda/include/philox.cuh` directly and regenerate their randomness from (seed, element
//! index) instead of storing it. The kernels here run those same functions over a range, so
//! the GPU and the emulator are tested against the reference bit for bit, and so a caller
//! can materialize a mask when it wants one.
//!
//! Kernels: `cuda/philox.cu`. Definitions: `cuda/params/philox.h`. Reference:
//! [`crate::reference::philox`]. Tests: `tests/philox.rs`.

use crate::device::{Buffer, Device, Kernel, LaunchConfig};
use crate::error::{Error, Result};
use crate::params::{DropoutMaskParams, PhiloxParams};

const MODULE: &str = "philox";
const THREADS: u32 = 256;
const MAX_BLOCKS: u32 = 1 << 16;

fn kernel(name: &str) -> Kernel {
    Kernel {
        module: MODULE,
        name: name.to_string(),
    }
}

/// Every kernel this module can launch (the build checks look each up in the PTX).
pub fn kernels() -> Vec<Kernel> {
    vec![kernel("philox_u32"), kernel("philox_dropout_mask")]
}

/// A grid with one thread per Philox block of four words (or four mask elements).
fn config(blocks: u64) -> LaunchConfig {
    LaunchConfig::grid_stride(blocks, THREADS, MAX_BLOCKS)
}

/// Errors unless `p` is a dropout probability in [0, 1) (p = 1 would divide by zero in the
/// `1 / (1 - p)` rescaling of the kept elements).
pub fn check_dropout_p(p: f32) -> Result<()> {
    if (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            what: "dropout p",
            why: format!("{p} is not in [0, 1)"),
        })
    }
}

/// `blocks` Philox4x32-10 outputs, four words each, as
/// [`crate::reference::philox::random_words`] defines them: block `b` has the counter
/// `(c lo, c hi, stream[0], stream[1])` with `c = counter + b` and the key `seed`.
pub fn random_words(
    dev: &Device,
    seed: u64,
    counter: u64,
    stream: [u32; 2],
    blocks: usize,
) -> Result<Buffer<u32>> {
    let len = blocks.checked_mul(4).ok_or_else(|| Error::Unsupported {
        op: "philox_u32",
        why: format!("{blocks} blocks of 4 words overflow usize"),
    })?;
    let mut out = dev.alloc_output::<u32>(len)?;
    let p = PhiloxParams {
        out: out.ptr_mut() as *mut u32,
        blocks: blocks as u64,
        seed,
        counter,
        stream0: stream[0],
        stream1: stream[1],
    };
    // SAFETY: out holds 4 * blocks words on `dev`; the kernel writes exactly those.
    unsafe { raw::random_words(dev, None, &p)? };
    Ok(out)
}

/// The dropout keep-mask of elements `0..n` under `seed` with drop probability `p`: 1 where
/// an element is kept, 0 where it is dropped (definition: `cuda/params/philox.h`).
pub fn dropout_mask(dev: &Device, seed: u64, p: f32, n: usize) -> Result<Buffer<u8>> {
    check_dropout_p(p)?;
    let mut keep = dev.alloc_output::<u8>(n)?;
    let params = DropoutMaskParams {
        keep: keep.ptr_mut() as *mut u8,
        n: n as u64,
        seed,
        p,
    };
    // SAFETY: keep holds n bytes on `dev`; the kernel writes exactly those.
    unsafe { raw::dropout_mask(dev, None, &params)? };
    Ok(keep)
}

/// Raw entry points for framework authors: launch on memory and a stream your framework
/// owns (`Some(stream)`; `None` is the device's own, and all the emulator takes). An empty
/// range launches nothing. The functions above are these after their checks.
///
/// Checked, before any launch (an empty range included): [`random_words`]' `p.out` 4-byte
/// aligned, else [`Error::Misaligned`] (the kernel stores one u32 at a time; a misaligned
/// store faults on a GPU and leaves its context unusable). [`dropout_mask`]'s `p.keep` is
/// written a byte at a time and needs no alignment. Nothing else is checked.
pub mod raw {
    use super::*;
    use cudarc::driver::sys::CUstream;

    /// What [`random_words`] checks first: `p.out` aligned to its u32 words
    /// ([`Error::Misaligned`]).
    fn checked(p: &PhiloxParams) -> Result<()> {
        Error::check_aligned("philox raw out", p.out, 4)
    }

    /// Philox blocks `p.counter .. p.counter + p.blocks`, four u32 words each, into `p.out`.
    ///
    /// Checked: `p.out` 4-byte aligned ([`Error::Misaligned`]).
    ///
    /// # Safety
    /// `p.out` must be valid memory of `dev` for `4 * p.blocks` u32; `stream` must belong
    /// to `dev`'s context.
    pub unsafe fn random_words(
        dev: &Device,
        stream: Option<CUstream>,
        p: &PhiloxParams,
    ) -> Result<()> {
        checked(p)?;
        // SAFETY: forwarded from this function's contract.
        unsafe { dev.launch_on(&kernel("philox_u32"), config(p.blocks), stream, p) }
    }

    /// The dropout keep-mask of elements `0 .. p.n` into `p.keep`, one byte each.
    ///
    /// Checked: nothing (`p.keep` is stored a byte at a time: any address will do).
    ///
    /// # Safety
    /// `p.keep` must be valid memory of `dev` for `p.n` bytes; `stream` must belong to
    /// `dev`'s context. `p.p` should be in [0, 1).
    pub unsafe fn dropout_mask(
        dev: &Device,
        stream: Option<CUstream>,
        p: &DropoutMaskParams,
    ) -> Result<()> {
        // SAFETY: forwarded from this function's contract.
        unsafe {
            dev.launch_on(
                &kernel("philox_dropout_mask"),
                config(p.n.div_ceil(4)),
                stream,
                p,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::with_grid_cap;
    use crate::reference::philox as reference;
    use crate::testing::backends;

    /// Both kernels' grid-stride loops past their first pass (grids of one block and of
    /// three), bit for bit against the reference: a real launch takes a second pass only
    /// past 2¹⁶ blocks of 256 threads (16 M Philox blocks, or a mask of 64 M elements).
    #[test]
    fn grid_stride_loops_take_several_passes() {
        for dev in backends() {
            let seed = rand::random();
            // 2,051 Philox blocks and 8,203 mask bytes: several passes of a block of 256
            // threads, and a partial last one.
            let (blocks, n, p) = (2051, 8203, 0.3);
            for cap in [1, 3] {
                let (words, keep) = with_grid_cap(cap, || {
                    let words = random_words(&dev, seed, 7, [3, 5], blocks)?.to_host()?;
                    let keep = dropout_mask(&dev, seed, p, n)?.to_host()?;
                    Ok::<_, Error>((words, keep))
                })
                .unwrap();
                let case = format!("seed {seed}, {cap} blocks, {dev:?}");
                assert_eq!(
                    words,
                    reference::random_words(seed, 7, [3, 5], blocks),
                    "{case}"
                );
                assert_eq!(keep, reference::dropout_mask(seed, p, n), "{case}");
            }
        }
    }
}
