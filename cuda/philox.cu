// Philox kernels: raw Philox4x32-10 blocks and dropout keep-masks, so the device function
// the fused kernels use (include/philox.cuh) is tested on the GPU and the emulator against
// the reference (src/reference/philox.rs). Wrapper: src/philox.rs. Tests: tests/philox.rs.
//
// One thread per Philox block (four words, or four mask elements), grid-stride.
#include "include/compat.cuh"
#include "include/grid.cuh"
#include "include/philox.cuh"
#include "params/philox.h"

FK_KERNEL(philox_u32, PhiloxParams) {
  for (uint64_t b = grid_start(); b < p.blocks; b += grid_stride()) {
    const uint64_t c = p.counter + b;
    const uint4 w = philox4x32_10(make_uint4((uint32_t)c, (uint32_t)(c >> 32), p.stream0, p.stream1),
                                  philox_key(p.seed));
    p.out[4 * b] = w.x;
    p.out[4 * b + 1] = w.y;
    p.out[4 * b + 2] = w.z;
    p.out[4 * b + 3] = w.w;
  }
}

FK_KERNEL(philox_dropout_mask, DropoutMaskParams) {
  const uint64_t groups = p.n / 4 + (p.n % 4 != 0);
  for (uint64_t g = grid_start(); g < groups; g += grid_stride()) {
    const unsigned bits = dropout_keep_bits(p.seed, g, p.p);
    for (uint64_t j = 0; j < 4 && 4 * g + j < p.n; ++j) p.keep[4 * g + j] = (bits >> j) & 1u;
  }
}
