//! The crate's one error type. Every check that can fail on user input returns one of these
//! before anything is launched; nothing here panics on bad input.

use std::ffi::c_void;
use std::fmt;

/// Why no CUDA device can run kernels here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoDevice {
    /// `libcuda.so` could not be loaded: no NVIDIA driver is installed.
    NoDriver,
    /// The driver loaded but reports no CUDA device.
    NoGpu,
    /// The driver is older than the committed PTX needs (ISA 9.0: CUDA 13.0, R580).
    DriverTooOld {
        /// The CUDA version the driver supports, as `cuDriverGetVersion` reports it:
        /// `1000 × major + 10 × minor` (12040 is CUDA 12.4).
        driver: i32,
        /// The version the committed PTX needs, in the same encoding (13000: CUDA 13.0).
        needed: i32,
    },
    /// The device's compute capability is below the sm_80 baseline.
    ComputeCapability {
        /// The major number of the device's compute capability (7 of 7.5, a Turing GPU).
        major: i32,
        /// Its minor number (5 of 7.5).
        minor: i32,
    },
    /// A device ordinal past the device count.
    Ordinal {
        /// The ordinal asked for (0-based).
        ordinal: usize,
        /// How many devices the driver reports.
        count: usize,
    },
    /// The driver is there but cannot run anything: `cuInit`'s error (a stub libcuda from a
    /// container image, a kernel module that does not match the library, every device taken
    /// by exclusive-process mode...).
    DriverUnusable {
        /// The driver's name for `cuInit`'s error, e.g. `CUDA_ERROR_STUB_LIBRARY`.
        name: String,
    },
    /// The host emulator backend was not compiled in (feature `emu`).
    EmulatorNotBuilt,
}

/// Everything that can go wrong in the crate: bad input found by a check before a launch, no
/// usable device, a failed driver call or allocation, a kernel bug the emulator caught, or a
/// file that cannot be read, written or trusted.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// Two shapes that must agree do not.
    ShapeMismatch {
        /// The operand or check, often with its shape in words, e.g. `lora A [rank, in]`.
        what: String,
        /// The shape it must have (a length check: its one dimension).
        expected: Vec<usize>,
        /// What it has: the shape, or for a buffer checked by length `[len]`, its element
        /// count.
        got: Vec<usize>,
    },
    /// A dtype (or combination of dtypes) that this kernel is not built for.
    UnsupportedDtype {
        /// The operation, e.g. `lora` or `nf4 matmul`.
        op: &'static str,
        /// The dtype or dtypes given, as text.
        dtypes: String,
    },
    /// A shape or parameter outside what the kernel supports.
    Unsupported {
        /// The operation, e.g. `lora` or `module load`.
        op: &'static str,
        /// What is outside its support, in words.
        why: String,
    },
    /// A raw entry point's pointer that breaks its kernel's alignment requirement: the
    /// pointer, its address and the alignment needed in bytes.
    Misaligned {
        /// Which pointer, e.g. `nf4 raw weight codes`.
        what: &'static str,
        /// The alignment it needs, in bytes.
        align: usize,
        /// Its address.
        value: u64,
    },
    /// A flattened index past the end of the tensor it indexes.
    IndexOutOfRange {
        /// Where the bad index is in the index list (0-based).
        position: usize,
        /// The index there.
        index: u64,
        /// The element count of the tensor indexed: indices must be below it.
        numel: u64,
    },
    /// Indices given to a path that needs them sorted and unique.
    UnsortedIndices {
        /// The first position in the index list (0-based) whose index is not above the one
        /// before it.
        position: usize,
        /// The index at `position - 1`.
        previous: u64,
        /// The index at `position`.
        index: u64,
    },
    /// An argument outside what the call accepts: a value (NaN, infinite or out of its
    /// range), a null pointer, a name, a size or a launch shape; what it is and why not.
    InvalidArgument {
        /// Which argument, e.g. `lora alpha` or `LaunchConfig::grid`.
        what: &'static str,
        /// Why it is refused, in words.
        why: String,
    },
    /// No device can run kernels; says why.
    NoDevice(NoDevice),
    /// Buffers from two different devices (or backends) in one call.
    DeviceMismatch,
    /// A CUDA driver call failed: the call and the driver's error name.
    Driver {
        /// The driver call (or the wrapper making it), e.g. `cuModuleLoadData`.
        call: &'static str,
        /// The driver's name for its error, e.g. `CUDA_ERROR_INVALID_VALUE`.
        name: String,
    },
    /// An allocation of this many bytes failed (device memory on a GPU, host memory under
    /// the emulator).
    OutOfMemory {
        /// The size of the allocation that failed, in bytes.
        bytes: usize,
    },
    /// The host emulator caught a kernel bug (race, divergent barrier, bad mask, a deadlock,
    /// `__trap`...) or could not run the launch (the host out of memory). What it cannot
    /// catch: an emulated kernel's access out of its buffers is the host process's own, and
    /// may crash it as on a GPU it would fault (`FK_EMU_ASAN=1` builds report those).
    Emulator(String),
    /// A file could not be read or written.
    Io {
        /// The file (or directory), as given.
        path: String,
        /// The operating system's error, or what else is wrong, in words.
        why: String,
    },
    /// A checkpoint that is not what it claims: the file, the tensor (empty when the
    /// problem is the file as a whole) and what is wrong with it.
    Checkpoint {
        /// The file, as given.
        file: String,
        /// The tensor's name in the file; empty when the file as a whole is at fault.
        tensor: String,
        /// What is wrong, in words.
        why: String,
    },
}

/// The crate's result type: [`Error`] unless another error type is named.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The driver's name for `e`, e.g. `CUDA_ERROR_OUT_OF_MEMORY`.
pub(crate) fn driver_error_name(e: cudarc::driver::DriverError) -> String {
    e.error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0))
}

/// Driver errors that a faulting kernel leaves on its context: every later call returns one,
/// so the call that reports it is seldom the one that failed.
const STICKY: [&str; 9] = [
    "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_LAUNCH_TIMEOUT",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    "CUDA_ERROR_INVALID_PC",
    "CUDA_ERROR_ASSERT",
];

impl fmt::Display for NoDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoDevice::NoDriver => write!(f, "no NVIDIA driver: libcuda.so could not be loaded"),
            NoDevice::NoGpu => write!(f, "the NVIDIA driver reports no CUDA device"),
            NoDevice::DriverTooOld { driver, needed } => write!(
                f,
                "the driver supports CUDA {}.{}, the shipped PTX needs {}.{} (R580+); \
                 regenerate PTX with a local nvcc (FK_NVCC, see README)",
                driver / 1000,
                driver % 1000 / 10,
                needed / 1000,
                needed % 1000 / 10
            ),
            NoDevice::ComputeCapability { major, minor } => write!(
                f,
                "compute capability {major}.{minor} is below the sm_80 baseline (Ampere)"
            ),
            NoDevice::Ordinal { ordinal, count } => {
                write!(f, "device {ordinal} requested, the driver reports {count}")
            }
            NoDevice::DriverUnusable { name } => {
                write!(
                    f,
                    "the NVIDIA driver is installed but cuInit failed: {name}"
                )
            }
            NoDevice::EmulatorNotBuilt => {
                write!(
                    f,
                    "the host emulator is not built in (enable feature `emu`)"
                )
            }
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // A buffer checked by its length has an element count, not a shape, for `got`.
            Error::ShapeMismatch { what, expected, got } if expected.len() > 1 && got.len() == 1 => {
                let numel = expected.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
                let numel = numel.map_or("more than usize".into(), |n| n.to_string());
                write!(
                    f,
                    "shape mismatch in {what}: expected {expected:?} ({numel} elements), got {} elements",
                    got[0]
                )
            }
            Error::ShapeMismatch { what, expected, got } => {
                write!(f, "shape mismatch in {what}: expected {expected:?}, got {got:?}")
            }
            Error::UnsupportedDtype { op, dtypes } => {
                write!(f, "{op} is not built for dtypes {dtypes}")
            }
            Error::Unsupported { op, why } => write!(f, "{op}: unsupported: {why}"),
            Error::Misaligned { what, align, value } => {
                write!(f, "{what} must be {align}-byte aligned; its address is {value:#x}")
            }
            Error::IndexOutOfRange { position, index, numel } => write!(
                f,
                "index {index} at position {position} is out of range for {numel} elements"
            ),
            Error::UnsortedIndices { position, previous, index } => write!(
                f,
                "indices must be sorted and unique: position {position} holds {index} after {previous}"
            ),
            Error::InvalidArgument { what, why } => write!(f, "invalid {what}: {why}"),
            Error::NoDevice(why) => write!(f, "no device: {why}"),
            Error::DeviceMismatch => write!(f, "buffers belong to different devices"),
            Error::Driver { call, name } if STICKY.contains(&name.as_str()) => write!(
                f,
                "CUDA driver call {call} failed: {name} (an error a kernel left behind: an \
                 earlier asynchronous launch or copy failed, and this context runs nothing more)"
            ),
            Error::Driver { call, name } => write!(f, "CUDA driver call {call} failed: {name}"),
            Error::OutOfMemory { bytes } => {
                write!(f, "out of memory: {bytes} bytes could not be allocated")
            }
            Error::Emulator(msg) => write!(f, "emulator: {msg}"),
            Error::Io { path, why } => write!(f, "{path}: {why}"),
            Error::Checkpoint { file, tensor, why } if tensor.is_empty() => {
                write!(f, "{file}: {why}")
            }
            Error::Checkpoint { file, tensor, why } => write!(f, "{file}: tensor {tensor}: {why}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<NoDevice> for Error {
    fn from(why: NoDevice) -> Self {
        Error::NoDevice(why)
    }
}

impl Error {
    /// Wraps a cudarc driver error with the name of the call that failed.
    pub(crate) fn driver(call: &'static str, e: cudarc::driver::DriverError) -> Self {
        Error::Driver {
            call,
            name: driver_error_name(e),
        }
    }

    /// Checks that two lengths agree.
    pub(crate) fn check_len(what: &str, expected: usize, got: usize) -> Result<()> {
        Error::check_shape(what, &[expected], got)
    }

    /// Checks that `len` elements fill the shape `dims` (a shape whose size overflows fills
    /// nothing).
    pub(crate) fn check_shape(what: &str, dims: &[usize], len: usize) -> Result<()> {
        if dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) == Some(len) {
            Ok(())
        } else {
            Err(Error::ShapeMismatch {
                what: what.to_string(),
                expected: dims.to_vec(),
                got: vec![len],
            })
        }
    }

    /// Checks that the address `ptr` is a multiple of `align` bytes (a raw entry point's
    /// pointer: a kernel's vector loads and stores fault on a GPU, and leave its context
    /// unusable, where it is not).
    pub(crate) fn check_aligned<P>(what: &'static str, ptr: *const P, align: usize) -> Result<()> {
        let value = ptr as usize as u64;
        if value.is_multiple_of(align as u64) {
            Ok(())
        } else {
            Err(Error::Misaligned { what, align, value })
        }
    }

    /// [`Error::check_aligned`] on each `(what, pointer, alignment)` of a raw params struct,
    /// the first misaligned one the error.
    pub(crate) fn check_all_aligned(
        pointers: &[(&'static str, *const c_void, usize)],
    ) -> Result<()> {
        pointers
            .iter()
            .try_for_each(|&(what, ptr, align)| Error::check_aligned(what, ptr, align))
    }

    /// An I/O failure on `path`.
    pub(crate) fn io(path: &std::path::Path, why: impl ToString) -> Error {
        Error::Io {
            path: path.display().to_string(),
            why: why.to_string(),
        }
    }

    /// A problem with `tensor` (empty: the file itself) of checkpoint `file`.
    pub(crate) fn checkpoint(file: &str, tensor: &str, why: String) -> Error {
        Error::Checkpoint {
            file: file.to_string(),
            tensor: tensor.to_string(),
            why,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fault a kernel left on the context is said to be one, whichever call reports it;
    /// other driver errors are said as they are. (Built by hand: the driver's names come from
    /// libcuda, which CI has not.)
    #[test]
    fn sticky_driver_errors_say_an_earlier_launch_failed() {
        for (name, sticky) in [
            ("CUDA_ERROR_ILLEGAL_ADDRESS", true),
            ("CUDA_ERROR_LAUNCH_FAILED", true),
            ("CUDA_ERROR_OUT_OF_MEMORY", false),
            ("CUDA_ERROR_INVALID_VALUE", false),
        ] {
            let e = Error::Driver {
                call: "cuMemcpyDtoHAsync",
                name: name.into(),
            };
            let text = e.to_string();
            assert!(text.contains(name), "{text}");
            assert_eq!(
                text.contains("earlier asynchronous launch"),
                sticky,
                "{text}"
            );
        }
    }

    /// A length checked against a shape says both as element counts (a shape beside a count
    /// read as two shapes); shapes against shapes stay shapes.
    #[test]
    fn shape_mismatches_compare_like_with_like() {
        let by_len = Error::check_shape("x [m, in]", &[4, 8], 30).unwrap_err();
        let text = by_len.to_string();
        assert!(
            text.contains("[4, 8] (32 elements), got 30 elements"),
            "{text}"
        );
        let shapes = Error::ShapeMismatch {
            what: "w".into(),
            expected: vec![2, 3],
            got: vec![3, 2],
        };
        assert!(shapes.to_string().ends_with("expected [2, 3], got [3, 2]"));
        let huge = Error::check_shape("x", &[usize::MAX, 2], 1).unwrap_err();
        assert!(huge.to_string().contains("more than usize"), "{huge}");
    }
}
