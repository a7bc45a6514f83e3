//! Element types that device buffers hold, and the conversions the kernels use.

use half::{bf16, f16};

/// A storage dtype, as kernels name it (`<op>_<dtype>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// bfloat16 (`half::bf16`), 2 bytes.
    BF16,
    /// IEEE half precision (`half::f16`), 2 bytes.
    F16,
    /// IEEE single precision, 4 bytes.
    F32,
    /// Unsigned byte, 1 byte.
    U8,
    /// Unsigned 32-bit integer, 4 bytes.
    U32,
    /// Unsigned 64-bit integer, 8 bytes.
    U64,
    /// IEEE double precision, 8 bytes.
    F64,
}

impl DType {
    /// The name used in kernel names: `bf16`, `f16`, `f32`, `f64`, `u8`, `u32`, `u64`.
    pub fn name(self) -> &'static str {
        match self {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
            DType::U8 => "u8",
            DType::U32 => "u32",
            DType::U64 => "u64",
            DType::F64 => "f64",
        }
    }

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::BF16 | DType::F16 => 2,
            DType::F32 | DType::U32 => 4,
            DType::U64 | DType::F64 => 8,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A type a device buffer can hold.
pub trait Elem:
    Copy
    + Default
    + bytemuck::Pod
    + Send
    + Sync
    + std::fmt::Debug
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
    + 'static
{
    /// The [`DType`] tag of this Rust type.
    const DTYPE: DType;
}

/// A floating-point element: kernels load it as f32 and round once on store
/// (round-to-nearest-even, as CUDA's `__float2bfloat16` / `__float2half` do).
pub trait FloatElem: Elem {
    /// Widens to f32 (exact for every implementor).
    fn to_f32(self) -> f32;
    /// Rounds an f32 to this type, round-to-nearest-even.
    fn from_f32(x: f32) -> Self;
}

macro_rules! elem {
    ($t:ty, $d:expr) => {
        impl Elem for $t {
            const DTYPE: DType = $d;
        }
    };
}
elem!(bf16, DType::BF16);
elem!(f16, DType::F16);
elem!(f32, DType::F32);
elem!(u8, DType::U8);
elem!(u32, DType::U32);
elem!(u64, DType::U64);
elem!(f64, DType::F64);

impl FloatElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl FloatElem for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl FloatElem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// The f32 bit pattern of all-ones bytes: what poisoned buffers hold (a NaN in every float
/// dtype), so an element a kernel forgot to write shows up.
pub const POISON_BYTE: u8 = 0xFF;
