/* Params for the Philox kernels (cuda/philox.cu). The only ABI between Rust and the
 * kernels: Rust's side is generated from this file by bindgen (src/params.rs).
 *
 * Philox4x32-10 (Salmon et al., SC 2011) with Random123's constants:
 *   round:  (hi0, lo0) = M0 * c0,  (hi1, lo1) = M1 * c2  (32x32 -> 64-bit products)
 *           c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
 *   ten rounds, the key bumped by (W0, W1) before every round but the first;
 *   M0 = 0xD2511F53, M1 = 0xCD9E8D57, W0 = 0x9E3779B9, W1 = 0xBB67AE85.
 * A 64-bit seed is the key (seed & 0xffffffff, seed >> 32).
 *
 * The dropout keep-mask of element i (a flattened row-major index) under (seed, p):
 *   g = i / 4;  w = philox4x32_10((g & 0xffffffff, g >> 32, 0, 0), key(seed))[i % 4]
 *   u = (float)(w >> 8) * 2^-24            exact, uniform on [0, 1) in steps of 2^-24
 *   keep iff u >= p                          so P(keep) = 1 - p (p rounded up to the grid)
 * Counter words 2 and 3 are zero for dropout; other users of a seed put an id there. The
 * device functions are in cuda/include/philox.cuh, the reference in src/reference/philox.rs. */
#ifndef FK_PARAMS_PHILOX_H
#define FK_PARAMS_PHILOX_H
#include <stdint.h>

/* out[4*b .. 4*b+4] = philox4x32_10((c & 0xffffffff, c >> 32, stream0, stream1), key(seed))
 * with c = counter + b (mod 2^64), for b < blocks. */
typedef struct PhiloxParams {
  uint32_t* out; /* [4 * blocks] */
  uint64_t blocks;
  uint64_t seed;
  uint64_t counter;
  uint32_t stream0;
  uint32_t stream1;
} PhiloxParams;

/* keep[i] = 1 if element i survives dropout with probability p under seed, else 0, for
 * i < n. p in [0, 1). */
typedef struct DropoutMaskParams {
  uint8_t* keep; /* [n] */
  uint64_t n;
  uint64_t seed;
  float p;
} DropoutMaskParams;

#endif
