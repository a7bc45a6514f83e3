// philox.cuh: counter-based Philox4x32-10 (Salmon et al., SC 2011; Random123's constants)
// and the dropout keep-mask built on it, exactly as cuda/params/philox.h defines it.
// Reference: src/reference/philox.rs (bit-identical, tested against Random123's vectors).
//
// A fused kernel regenerates its dropout mask from (seed, element index) wherever it needs
// it, forward or backward; nothing is stored. One Philox call gives the keep bits of four
// consecutive elements, so kernels should ask per group of four (dropout_keep_bits), and
// draw several groups before using any: a call is a chain of 10 dependent rounds.
#pragma once
#include "compat.cuh"

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// The high word of a 32x32-bit product (nvcc emits one wide multiply; no intrinsic, so the
// emulator compiles it as is).
FK_DEVICE uint32_t philox_mulhi(uint32_t a, uint32_t b) {
  return (uint32_t)(((uint64_t)a * b) >> 32);
}

// Ten rounds; the key is bumped by (W0, W1) before every round but the first.
FK_DEVICE uint4 philox4x32_10(uint4 c, uint2 k) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k.x += kPhiloxW0;
      k.y += kPhiloxW1;
    }
    const uint32_t hi0 = philox_mulhi(kPhiloxM0, c.x), lo0 = kPhiloxM0 * c.x;
    const uint32_t hi1 = philox_mulhi(kPhiloxM1, c.z), lo1 = kPhiloxM1 * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
  }
  return c;
}

// The key of a 64-bit seed: (low word, high word).
FK_DEVICE uint2 philox_key(uint64_t seed) { return make_uint2((uint32_t)seed, (uint32_t)(seed >> 32)); }

// The top 24 bits of a word as a float in [0, 1), exactly (24 bits fit the mantissa).
FK_DEVICE float philox_uniform24(uint32_t word) { return (float)(word >> 8) * 0x1p-24f; }

// Keep bits of elements 4*group .. 4*group+3 (bit j for element 4*group+j): kept iff the
// element's uniform is >= p. Counter words 2 and 3 are zero for dropout.
FK_DEVICE unsigned dropout_keep_bits(uint64_t seed, uint64_t group, float p) {
  const uint4 w = philox4x32_10(make_uint4((uint32_t)group, (uint32_t)(group >> 32), 0u, 0u),
                                philox_key(seed));
  return (unsigned)(philox_uniform24(w.x) >= p) | (unsigned)(philox_uniform24(w.y) >= p) << 1 |
         (unsigned)(philox_uniform24(w.z) >= p) << 2 | (unsigned)(philox_uniform24(w.w) >= p) << 3;
}

// Keep bits of `count` (1 to 8) consecutive elements from `first` on, bit j for element
// first + j: one Philox call per group of four the run touches (two for an aligned 8).
FK_DEVICE uint32_t dropout_keep_run(uint64_t seed, uint64_t first, int count, float p) {
  const uint64_t group = first / 4, groups = (first % 4 + count + 3) / 4;
  uint32_t bits = dropout_keep_bits(seed, group, p);
  if (groups > 1) bits |= dropout_keep_bits(seed, group + 1, p) << 4;
  if (groups > 2) bits |= dropout_keep_bits(seed, group + 2, p) << 8;
  return bits >> (first % 4);
}
