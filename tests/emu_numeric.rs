//! The emulator's conversions against independent Rust implementations, exhaustively over
//! every 8- and 16-bit input and over every f32 upper half with the lower bits that decide
//! rounding (ties, just below, just above, sticky). Written from the formats' definitions
//! (OCP FP8, IEEE binary16, bfloat16) and CUDA's documented NaN and saturation rules, and
//! confirmed on hardware by the register dump's cvt section.
#![cfg(feature = "emu")]

use finetune_kernels::device::emu::{emu_from_f32, emu_to_f32, Format};
use half::{bf16, f16};

/// Decodes an FP8 code: `mant` mantissa bits, `bias`; e4m3fn has no infinities and only
/// S.1111.111 is NaN; e5m2 is IEEE-like.
fn fp8_value(code: u8, mant: u32, bias: i32, ieee: bool) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((code & 0x7F) >> mant) as i32;
    let m = (code & ((1 << mant) - 1)) as f32;
    let emax_code = (1 << (7 - mant)) - 1;
    if ieee && e == emax_code {
        return if m == 0.0 {
            sign * f32::INFINITY
        } else {
            f32::NAN
        };
    }
    if !ieee && code & 0x7F == 0x7F {
        return f32::NAN;
    }
    if e == 0 {
        sign * m * 2f32.powi(1 - bias - mant as i32)
    } else {
        sign * (1.0 + m / (1 << mant) as f32) * 2f32.powi(e - bias)
    }
}

struct Fp8 {
    format: Format,
    mant: u32,
    bias: i32,
    ieee: bool,
}

const E4M3: Fp8 = Fp8 {
    format: Format::E4M3,
    mant: 3,
    bias: 7,
    ieee: false,
};
const E5M2: Fp8 = Fp8 {
    format: Format::E5M2,
    mant: 2,
    bias: 15,
    ieee: true,
};

impl Fp8 {
    fn value(&self, code: u8) -> f32 {
        fp8_value(code, self.mant, self.bias, self.ieee)
    }

    /// Round to nearest, ties to the even code, by brute-force search over the finite
    /// non-negative codes; finite overflow and infinities saturate (cvt.rn.satfinite);
    /// NaN gives 0x7F.
    fn encode(&self, x: f32) -> u8 {
        if x.is_nan() {
            return 0x7F;
        }
        let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
        let a = x.abs() as f64;
        let finite: Vec<u8> = (0u8..0x80).filter(|&c| self.value(c).is_finite()).collect();
        let max = *finite.last().unwrap();
        if a >= self.value(max) as f64 {
            return sign | max;
        }
        let mut best = 0u8;
        for &c in &finite {
            let (d, db) = (
                (self.value(c) as f64 - a).abs(),
                (self.value(best) as f64 - a).abs(),
            );
            if d < db || (d == db && c % 2 == 0 && best % 2 == 1) {
                best = c;
            }
        }
        sign | best
    }
}

/// bf16 as CUDA rounds it: the classic add-and-shift round to nearest even, canonical NaN.
fn bf16_encode(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7FFF;
    }
    let u = x.to_bits();
    ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) as u16
}

/// f16 through the `half` crate, with CUDA's canonical NaN.
fn f16_encode(x: f32) -> u16 {
    if x.is_nan() {
        0x7FFF
    } else {
        f16::from_f32(x).to_bits()
    }
}

/// Every f32 upper half with the lower halves that decide rounding.
fn f32_sweep() -> impl Iterator<Item = f32> {
    (0u32..1 << 16).flat_map(|hi| {
        [
            0x0000u32, 0x0001, 0x0FFF, 0x1000, 0x1001, 0x7FFF, 0x8000, 0x8001, 0xFFFF,
        ]
        .into_iter()
        .map(move |lo| f32::from_bits((hi << 16) | lo))
    })
}

fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[test]
fn decode_every_16_bit_code() {
    for code in 0u32..1 << 16 {
        let b = bf16::from_bits(code as u16).to_f32();
        assert!(same(emu_to_f32(Format::BF16, code), b), "bf16 {code:#06x}");
        let h = f16::from_bits(code as u16).to_f32();
        let got = emu_to_f32(Format::F16, code);
        assert!(same(got, h), "f16 {code:#06x}: emu {got} half {h}");
        if h.is_nan() {
            assert_eq!(got.to_bits(), h.to_bits(), "f16 NaN payload {code:#06x}");
        }
    }
}

#[test]
fn decode_every_8_bit_code() {
    for f in [E4M3, E5M2] {
        for code in 0u8..=255 {
            let (got, want) = (emu_to_f32(f.format, code as u32), f.value(code));
            assert!(
                same(got, want),
                "{:?} {code:#04x}: emu {got}, spec {want}",
                f.format
            );
        }
    }
}

#[test]
fn encode_bf16_and_f16_over_the_rounding_sweep() {
    for x in f32_sweep() {
        assert_eq!(
            emu_from_f32(Format::BF16, x),
            bf16_encode(x) as u32,
            "bf16 of {x:e} ({:#010x})",
            x.to_bits()
        );
        assert_eq!(
            emu_from_f32(Format::F16, x),
            f16_encode(x) as u32,
            "f16 of {x:e} ({:#010x})",
            x.to_bits()
        );
    }
}

#[test]
fn encode_fp8_over_the_rounding_sweep() {
    for f in [E4M3, E5M2] {
        // The brute-force encoder is slow: every upper half, with the deciding lower halves
        // on a stride that still visits each rounding bit pattern of the FP8 mantissa.
        for (i, x) in f32_sweep().enumerate() {
            if i % 9 != 0 && (x.to_bits() >> 16) % 7 != 0 {
                continue;
            }
            let got = emu_from_f32(f.format, x);
            assert_eq!(
                got,
                f.encode(x) as u32,
                "{:?} of {x:e} ({:#010x})",
                f.format,
                x.to_bits()
            );
        }
    }
}

#[test]
fn encodings_round_trip_every_finite_code() {
    for f in [E4M3, E5M2] {
        for code in 0u8..=255 {
            let v = f.value(code);
            if v.is_finite() {
                assert_eq!(
                    emu_from_f32(f.format, v),
                    code as u32,
                    "{:?} code {code:#04x}",
                    f.format
                );
            }
        }
    }
}
