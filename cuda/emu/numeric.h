// numeric.h: bit-exact CUDA conversions between f32 and bf16, f16, e4m3fn, e5m2, for the
// host emulator. One generic round-to-nearest-even routine serves every format.
// Tested exhaustively against an independent Rust implementation (tests/emu_numeric.rs)
// and against hardware (tests/data/regdump-*.txt, the cvt section).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace fk_emu {

inline uint32_t f32_bits(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
inline float f32_from_bits(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }

// A small float format: `mant` stored mantissa bits, `emin` the exponent of the smallest
// normal, `emax` the largest exponent, `bias`; `ieee_top` when the top exponent code holds
// inf/NaN (bf16, f16, e5m2), otherwise only S.1111.111 is NaN (e4m3fn).
struct Format {
  int mant, emin, emax, bias;
  bool ieee_top;
  uint32_t nan;  // canonical NaN CUDA produces (sign clear)
};
constexpr Format kBF16{7, -126, 127, 127, true, 0x7FFF};
constexpr Format kF16{10, -14, 15, 15, true, 0x7FFF};
constexpr Format kE4M3{3, -6, 8, 7, false, 0x7F};
constexpr Format kE5M2{2, -14, 15, 15, true, 0x7F};

// Largest finite value of the format.
inline double max_finite(const Format& f) {
  if (f.ieee_top) return std::ldexp(2.0 - std::ldexp(1.0, -f.mant), f.emax);
  return std::ldexp(2.0 - std::ldexp(1.0, 1 - f.mant), f.emax);  // e4m3fn: 1.110 x 2^8 = 448
}

// Encodes a finite, already-rounded magnitude (0 <= a <= max) with sign.
inline uint32_t encode(const Format& f, double a, bool neg, int bits) {
  uint32_t sign = neg ? (1u << (bits - 1)) : 0u;
  if (a == 0.0) return sign;
  int e;
  std::frexp(a, &e);
  e -= 1;  // a = 1.m x 2^e
  uint32_t exp_field, mant_field;
  if (e < f.emin) {
    exp_field = 0;
    mant_field = static_cast<uint32_t>(std::ldexp(a, f.mant - f.emin));
  } else {
    exp_field = static_cast<uint32_t>(e + f.bias);
    mant_field = static_cast<uint32_t>(std::ldexp(a, f.mant - e)) - (1u << f.mant);
  }
  return sign | (exp_field << f.mant) | mant_field;
}

// f32 -> format, round to nearest even. `satfinite`: finite overflow and infinities clamp
// to the largest finite value (cvt.rn.satfinite); otherwise they become infinity.
inline uint32_t round_f32(const Format& f, int bits, float x, bool satfinite) {
  if (std::isnan(x)) return f.nan;
  const bool neg = std::signbit(x);
  const uint32_t sign = neg ? (1u << (bits - 1)) : 0u;
  const uint32_t inf = f.ieee_top ? ((((1u << (bits - 1 - f.mant)) - 1u) << f.mant)) : 0u;
  const double maxv = max_finite(f);
  if (std::isinf(x)) return satfinite ? encode(f, maxv, neg, bits) : (sign | inf);
  const double a = std::fabs(static_cast<double>(x));
  if (a == 0.0) return sign;
  int e;
  std::frexp(a, &e);
  e -= 1;
  const int q_exp = (e < f.emin ? f.emin : e) - f.mant;  // exponent of one unit in the last place
  const double r = std::nearbyint(std::ldexp(a, -q_exp));  // exact: a has 24 bits, default RNE
  const double v = std::ldexp(r, q_exp);
  if (v > maxv) return satfinite ? encode(f, maxv, neg, bits) : (sign | inf);
  return encode(f, v, neg, bits);
}

// format -> f32 (exact for every format here), built from the bits: the kernels' emulated
// tensor cores widen every operand, and ldexp made that a quarter of a wgmma test's time.
inline float widen(const Format& f, int bits, uint32_t u) {
  const uint32_t sign = ((u >> (bits - 1)) & 1u) << 31;
  const uint32_t top = (1u << (bits - 1 - f.mant)) - 1u;  // the largest exponent code
  const uint32_t exp_field = (u >> f.mant) & top;
  const uint32_t mant_field = u & ((1u << f.mant) - 1u);
  uint32_t magnitude;
  if (f.ieee_top && exp_field == top) {
    magnitude = mant_field ? 0x7FC00000u : 0x7F800000u;
  } else if (!f.ieee_top && exp_field == top && mant_field == (1u << f.mant) - 1u) {
    magnitude = 0x7FC00000u;
  } else if (exp_field == 0) {  // subnormal: mant_field units of 2^(emin - mant), exactly
    magnitude = f32_bits(static_cast<float>(mant_field) * f32_from_bits(static_cast<uint32_t>(127 + f.emin - f.mant) << 23));
  } else {
    magnitude = (static_cast<uint32_t>(static_cast<int>(exp_field) - f.bias + 127) << 23) | (mant_field << (23 - f.mant));
  }
  return f32_from_bits(sign | magnitude);
}

inline uint16_t f32_to_bf16_bits(float x) { return static_cast<uint16_t>(round_f32(kBF16, 16, x, false)); }
inline uint16_t f32_to_f16_bits(float x) { return static_cast<uint16_t>(round_f32(kF16, 16, x, false)); }
inline uint8_t f32_to_e4m3_bits(float x) { return static_cast<uint8_t>(round_f32(kE4M3, 8, x, true)); }
inline uint8_t f32_to_e5m2_bits(float x) { return static_cast<uint8_t>(round_f32(kE5M2, 8, x, true)); }
inline float bf16_bits_to_f32(uint16_t u) { return f32_from_bits(static_cast<uint32_t>(u) << 16); }
// NaNs keep sign and payload and come out quiet (IEEE 754 widening; not yet confirmed on
// hardware: the register dump does not cover f16 -> f32 of NaN).
inline float f16_bits_to_f32(uint16_t u) {
  if ((u & 0x7C00u) == 0x7C00u && (u & 0x03FFu))
    return f32_from_bits((static_cast<uint32_t>(u & 0x8000u) << 16) | 0x7FC00000u | (static_cast<uint32_t>(u & 0x03FFu) << 13));
  return widen(kF16, 16, u);
}
inline float e4m3_bits_to_f32(uint8_t u) { return widen(kE4M3, 8, u); }
inline float e5m2_bits_to_f32(uint8_t u) { return widen(kE5M2, 8, u); }

}  // namespace fk_emu
