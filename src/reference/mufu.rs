//! `MUFU.RCP` (PTX `rcp.approx.ftz.f32`) as an H100/H200 computes it, bit for bit.
//!
//! The hardware reciprocal is within one ulp of `1/x` but not always the correctly rounded
//! one. Which neighbour it picks depends only on the mantissa, so one bit per mantissa
//! says it all: `cuda/emu/mufu_rcp_sm90.bin` holds 2²³ bits (bit `m` of the little-endian
//! bitstream is set where, for `x = 1.m`, the hardware returns the neighbour of `1/x` that
//! round-to-nearest does not). `fk regdump --rcp-table` recorded it on an H200 (sm_90);
//! the register dump's `regdump_rcp` section, replayed by `tests/emu_regdump.rs`, checks
//! the model below on 1024 inputs over every exponent, zeros, infinities, NaN and
//! subnormals.
//!
//! The rest follows from the exponent: the result for `x = 1.m · 2^e` is the table's result
//! for `1.m` scaled by `2^-e`, flushed to zero when it falls below the smallest normal.
//! Subnormal inputs are flushed first (`.ftz`), NaN becomes the canonical `0x7fffffff`.
//!
//! This is the one model of `MUFU.RCP`: the NF4 reference calls it, and the emulator runs
//! it for `rcp_approx_ftz` in every emulated kernel.

/// One bit per f32 mantissa: set where `MUFU.RCP(1.m)` is not `RN(1 / 1.m)`.
static RCP_OTHER_NEIGHBOUR: &[u8; 1 << 20] = include_bytes!("../../cuda/emu/mufu_rcp_sm90.bin");

/// The NaN `MUFU.RCP` returns for any NaN input.
const CANONICAL_NAN: u32 = 0x7fff_ffff;

/// `rcp.approx.ftz.f32` of `x`, as the GPU computes it.
pub fn rcp_approx_ftz(x: f32) -> f32 {
    if x.is_nan() {
        return f32::from_bits(CANONICAL_NAN);
    }
    let sign = x.to_bits() & 0x8000_0000;
    let magnitude = x.to_bits() & 0x7fff_ffff;
    let biased_exponent = magnitude >> 23;
    if biased_exponent == 0 {
        // Zero, or a subnormal flushed to zero.
        return f32::from_bits(sign | f32::INFINITY.to_bits());
    }
    if biased_exponent == 0xff {
        return f32::from_bits(sign);
    }
    let mantissa = magnitude & 0x7f_ffff;
    let a = f32::from_bits(0x3f80_0000 | mantissa);
    let mut r = 1.0 / a;
    if RCP_OTHER_NEIGHBOUR[mantissa as usize / 8] >> (mantissa % 8) & 1 == 1 {
        // The product of two 24-bit significands is exact in f64.
        let above = f64::from(r) * f64::from(a) > 1.0;
        r = f32::from_bits(if above {
            r.to_bits() - 1
        } else {
            r.to_bits() + 1
        });
    }
    // r · 2^-e, exact in f64 (r is in [0.5, 1] and |e| ≤ 127); flushed if not normal in f32.
    let scaled = f64::from(r) * 2f64.powi(127 - biased_exponent as i32);
    let result = if scaled < f64::from(f32::MIN_POSITIVE) {
        0.0
    } else {
        scaled as f32
    };
    f32::from_bits(sign | result.to_bits())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn powers_of_two_and_specials_are_exact() {
        for e in -126..=127 {
            let x = 2f32.powi(e);
            let want = if e == 127 { 0.0 } else { 2f32.powi(-e) };
            assert_eq!(rcp_approx_ftz(x), want, "1/2^{e}");
            assert_eq!(rcp_approx_ftz(-x), -want, "-1/2^{e}");
        }
        assert_eq!(rcp_approx_ftz(0.0), f32::INFINITY);
        assert_eq!(rcp_approx_ftz(-0.0), f32::NEG_INFINITY);
        assert_eq!(rcp_approx_ftz(f32::from_bits(1)), f32::INFINITY);
        assert_eq!(rcp_approx_ftz(f32::INFINITY).to_bits(), 0);
        assert_eq!(rcp_approx_ftz(f32::NEG_INFINITY).to_bits(), 0x8000_0000);
        assert_eq!(rcp_approx_ftz(f32::NAN).to_bits(), CANONICAL_NAN);
    }

    #[test]
    fn always_a_neighbour_of_the_reciprocal() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
        let mut differing = 0;
        for _ in 0..100_000 {
            let x = f32::from_bits(rng.random_range(0x0080_0000..0x7e80_0000u32));
            let exact = 1.0 / f64::from(x);
            let rn = 1.0 / x;
            if rcp_approx_ftz(x) != rn {
                differing += 1;
                // The other neighbour: on the other side of 1/x, one ulp from RN.
                let rn_bits = rn.to_bits();
                let other = if f64::from(rn) > exact {
                    rn_bits - 1
                } else {
                    rn_bits + 1
                };
                assert_eq!(rcp_approx_ftz(x).to_bits(), other, "x = {x:e}");
            }
        }
        // The table sets about 13% of mantissas.
        assert!(
            (8_000..18_000).contains(&differing),
            "{differing} of 100000 differ"
        );
    }
}
