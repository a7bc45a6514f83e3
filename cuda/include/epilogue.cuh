// epilogue.cuh: storing gemm.cuh's and narrow.cuh's output tiles (mma.sync) from their
// accumulators; wgmma.cuh's tile has its own, staged through shared memory
// (wgmma::store_tile).
#pragma once
#include "compat.cuh"
#include "dtype.cuh"
#include "gemm.cuh"
#include "narrow.cuh"

using gemm::for_each;
using narrow::for_each;

// Stores acc · factor (+ bias[column]) into out[m0 + r][n0 + c] for m0 + r < rows,
// n0 + c < cols (rows `ld` elements apart), rounded to T.
template <typename T, class Acc>
FK_DEVICE void store(Acc& acc, T* out, uint64_t ld, uint32_t m0, uint32_t n0, uint32_t rows, uint32_t cols,
                     float factor = 1.0f, const T* bias = nullptr) {
  for_each(acc, [&](int r, int c, float v) {
    if (m0 + r >= rows || n0 + c >= cols) return;
    float y = v * factor;
    if (bias) y += to_f32(bias[n0 + c]);
    out[(m0 + r) * ld + n0 + c] = from_f32<T>(y);
  });
}
