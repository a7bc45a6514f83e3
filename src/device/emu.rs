//! The host emulator backend: the same CUDA source, compiled for the host against the
//! runtime in `cuda/emu/` (feature `emu`), run on host memory. Each block (each cluster of
//! blocks, launched in clusters) runs on one OS thread with a fiber per GPU thread; barriers
//! and warp collectives are checked, and fibers run in an order drawn from a [`Schedule`],
//! so races show up as wrong results.

use super::{Kernel, LaunchConfig};
use crate::error::{NoDevice, Result};
#[cfg(feature = "emu")]
use crate::params::FkEmuOptions;

/// The order fibers run in between barriers (and blocks run in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Lowest thread first; the blocks of a cluster in rank order, each running ahead of the
    /// next as far as its own barriers let it (a missing cluster barrier shows).
    Forward,
    /// As `Forward`, highest first.
    Reverse,
    /// A fresh random permutation at every barrier, drawn from the seed (printed in errors
    /// and in [`EmuDevice::describe`], so a failure replays).
    Random(u64),
}

/// How the emulator runs kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmuOptions {
    /// The order fibers and blocks run in.
    pub schedule: Schedule,
    /// OS threads running blocks in parallel (a block never migrates between them).
    pub threads: u32,
    /// Stack size of each fiber (each GPU thread): at least [`MIN_STACK_BYTES`]. A kernel's
    /// frame past it ends the process at the stack's guard page (as an out-of-bounds access
    /// by an emulated kernel may; `FK_EMU_ASAN=1` builds report those instead).
    pub stack_bytes: u32,
}

/// The least [`EmuOptions::stack_bytes`] taken. The default, 256 KiB, fits every kernel
/// here, under AddressSanitizer too; a fiber's stack far smaller than any kernel's frame
/// would only end the process.
pub const MIN_STACK_BYTES: u32 = 64 << 10;

impl Default for EmuOptions {
    /// A random schedule (seed from `FK_EMU_SEED` if set), one OS thread per core up to 4,
    /// 256 KiB stacks.
    fn default() -> Self {
        let seed = std::env::var("FK_EMU_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        EmuOptions {
            schedule: Schedule::Random(seed),
            threads: cores.min(4),
            stack_bytes: 256 << 10,
        }
    }
}

/// The emulator as a device.
#[derive(Debug)]
pub struct EmuDevice {
    options: EmuOptions,
}

#[cfg(feature = "emu")]
extern "C" {
    fn fk_emu_launch(
        name: *const std::ffi::c_char,
        grid: *const u32,
        block: *const u32,
        cluster: *const u32,
        dynamic_smem: u32,
        params: *const std::ffi::c_void,
        params_size: u64,
        options: *const FkEmuOptions,
        err: *mut std::ffi::c_char,
        err_len: u64,
    ) -> std::ffi::c_int;
    fn fk_emu_from_f32(format: u32, x: f32) -> u32;
    fn fk_emu_to_f32(format: u32, bits: u32) -> f32;
}

/// The emulator's `rcp_approx_ftz`: the reference model of `MUFU.RCP`.
#[cfg(feature = "emu")]
extern "C" fn rcp_approx_ftz(x: f32) -> f32 {
    crate::reference::mufu::rcp_approx_ftz(x)
}

impl EmuDevice {
    /// The emulator, or [`NoDevice::EmulatorNotBuilt`] without feature `emu`; fewer stack
    /// bytes than [`MIN_STACK_BYTES`] are refused.
    pub fn new(options: EmuOptions) -> Result<Self> {
        if options.stack_bytes < MIN_STACK_BYTES {
            return Err(crate::Error::InvalidArgument {
                what: "emulator stack bytes",
                why: format!("{}: at least {MIN_STACK_BYTES}", options.stack_bytes),
            });
        }
        if cfg!(feature = "emu") {
            Ok(EmuDevice { options })
        } else {
            Err(NoDevice::EmulatorNotBuilt.into())
        }
    }

    /// The options this emulator runs kernels with.
    pub fn options(&self) -> &EmuOptions {
        &self.options
    }

    /// One line naming the device, its schedule (with the seed of a random one, so a failure
    /// replays) and its thread count.
    pub fn describe(&self) -> String {
        let s = match self.options.schedule {
            Schedule::Forward => "forward".to_string(),
            Schedule::Reverse => "reverse".to_string(),
            Schedule::Random(seed) => format!("random seed {seed}"),
        };
        format!(
            "emu (host emulator, schedule {s}, {} threads)",
            self.options.threads
        )
    }

    #[cfg(feature = "emu")]
    fn ffi_options(&self) -> FkEmuOptions {
        let (schedule, seed) = match self.options.schedule {
            Schedule::Forward => (crate::params::FK_EMU_SCHEDULE_FORWARD, 0),
            Schedule::Reverse => (crate::params::FK_EMU_SCHEDULE_REVERSE, 0),
            Schedule::Random(seed) => (crate::params::FK_EMU_SCHEDULE_RANDOM, seed),
        };
        FkEmuOptions {
            schedule,
            seed,
            threads: self.options.threads,
            stack_bytes: self.options.stack_bytes,
            rcp_approx_ftz: Some(rcp_approx_ftz),
        }
    }

    /// Runs `kernel` to completion on the host.
    ///
    /// # Safety
    /// As [`super::Device::launch`]: pointers in `params` are host addresses valid for
    /// the kernel's accesses.
    pub(crate) unsafe fn launch<P: Copy>(
        &self,
        kernel: &Kernel,
        cfg: LaunchConfig,
        params: &P,
    ) -> Result<()> {
        #[cfg(feature = "emu")]
        {
            let name = super::kernel_cname(kernel)?;
            let grid = [cfg.grid.0, cfg.grid.1, cfg.grid.2];
            let block = [cfg.block.0, cfg.block.1, cfg.block.2];
            let cluster = [cfg.cluster.0, cfg.cluster.1, cfg.cluster.2];
            let opts = self.ffi_options();
            let mut err = vec![0u8; 16 << 10];
            // SAFETY: the arrays and the params struct outlive the call; the runtime writes
            // at most err_len bytes, NUL-terminated; the caller vouches for the params.
            let rc = unsafe {
                fk_emu_launch(
                    name.as_ptr(),
                    grid.as_ptr(),
                    block.as_ptr(),
                    cluster.as_ptr(),
                    cfg.shared_bytes,
                    params as *const P as *const std::ffi::c_void,
                    std::mem::size_of::<P>() as u64,
                    &opts,
                    err.as_mut_ptr() as *mut std::ffi::c_char,
                    err.len() as u64,
                )
            };
            if rc == 0 {
                return Ok(());
            }
            let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
            Err(crate::Error::Emulator(
                String::from_utf8_lossy(&err[..end]).into_owned(),
            ))
        }
        #[cfg(not(feature = "emu"))]
        {
            let _ = (kernel, cfg, params);
            Err(NoDevice::EmulatorNotBuilt.into())
        }
    }
}

/// A storage format the emulator converts to and from as CUDA does.
#[cfg(feature = "emu")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// bfloat16: 8 exponent bits, 7 mantissa bits.
    BF16,
    /// IEEE half precision: 5 exponent bits, 10 mantissa bits.
    F16,
    /// FP8 E4M3 (`__nv_fp8_e4m3`): 4 exponent bits, 3 mantissa bits, no infinities.
    E4M3,
    /// FP8 E5M2 (`__nv_fp8_e5m2`): 5 exponent bits, 2 mantissa bits.
    E5M2,
}

#[cfg(feature = "emu")]
impl Format {
    fn code(self) -> u32 {
        match self {
            Format::BF16 => crate::params::FK_EMU_FORMAT_BF16,
            Format::F16 => crate::params::FK_EMU_FORMAT_F16,
            Format::E4M3 => crate::params::FK_EMU_FORMAT_E4M3,
            Format::E5M2 => crate::params::FK_EMU_FORMAT_E5M2,
        }
    }
}

/// The emulator's f32 → `format` conversion (round to nearest even; FP8 saturates to
/// finite, as `cvt.rn.satfinite` does), for tests.
#[cfg(feature = "emu")]
pub fn emu_from_f32(format: Format, x: f32) -> u32 {
    // SAFETY: a pure function of its arguments.
    unsafe { fk_emu_from_f32(format.code(), x) }
}

/// The emulator's `format` → f32 conversion (exact), for tests.
#[cfg(feature = "emu")]
pub fn emu_to_f32(format: Format, bits: u32) -> f32 {
    // SAFETY: a pure function of its arguments.
    unsafe { fk_emu_to_f32(format.code(), bits) }
}
