// grid.cuh: grid-stride loops and warp reductions shared by the kernels.
#pragma once
#include "compat.cuh"

constexpr unsigned kFullMask = 0xffffffffu;

FK_DEVICE uint64_t grid_start() { return blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; }
FK_DEVICE uint64_t grid_stride() { return (uint64_t)gridDim.x * blockDim.x; }
FK_DEVICE uint64_t warp_start() { return grid_start() / 32; }
FK_DEVICE uint64_t warp_stride() { return grid_stride() / 32; }
FK_DEVICE int lane_id() { return threadIdx.x % 32; }

// Butterfly reductions: every lane ends with the result, in an order fixed by the lane
// pattern, so results are deterministic.
FK_DEVICE float warp_sum(float x) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) x += __shfl_xor_sync(kFullMask, x, d);
  return x;
}

FK_DEVICE float warp_max(float x) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, d));
  return x;
}

// True for finite f32 (no NaN, no infinity), by the exponent bits.
FK_DEVICE bool is_finite(float x) { return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u; }
