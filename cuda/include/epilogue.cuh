// epilogue.cuh: storing gemm.cuh's and narrow.cuh's output tiles (mma.sync) from their
// accumulators; wgmma.cuh's tile has its own, staged through shared memory
// (wgmma::store_tile).
#pragma once
#include "compat.cuh"
#include "dtype.cuh"
#include "gemm.cuh"
#include "narrow.cuh"

using gemm::for_each_pair;
using narrow::for_each;
using narrow::for_each_pair;

// at[0] = a and, where the pair's second column is inside the matrix (`second`), at[1] = b,
// rounded to T: in one store where the pair is aligned for it, element by element otherwise.
template <typename T>
FK_DEVICE void store_two(T* at, float a, float b, bool aligned, bool second) {
  if (aligned && second) return store_pair(at, a, b);
  at[0] = from_f32<T>(a);
  if (second) at[1] = from_f32<T>(b);
}

// Stores acc · factor (+ column_bias[c]) into out[m0 + r][n0 + c] for m0 + r < rows,
// n0 + c < cols (rows `ld` elements apart), rounded to T. A pair of columns goes in one store
// where the rows keep pairs aligned (n0 is even), element by element otherwise. column_bias is
// the tile's bias in shared memory (gemm_bias_table): a load of bias from global memory after
// a store to out would wait for it (the compiler cannot tell their addresses apart).
template <typename T, class Acc>
FK_DEVICE void store(Acc& acc, T* out, uint64_t ld, uint32_t m0, uint32_t n0, uint32_t rows, uint32_t cols,
                     float factor = 1.0f, const float* column_bias = nullptr) {
  const bool pairs = ld % 2 == 0 && reinterpret_cast<uintptr_t>(out) % (2 * sizeof(T)) == 0;
  for_each_pair(acc, [&](int r, int c, float a, float b) {
    const uint32_t row = m0 + r, col = n0 + c;
    if (row >= rows || col >= cols) return;
    float y0 = a * factor, y1 = b * factor;
    if (column_bias) y0 += column_bias[c], y1 += column_bias[c + 1];
    store_two(out + row * ld + col, y0, y1, pairs, col + 1 < cols);
  });
}

// bias[n0 .. n0 + kBN) (0 past cols; all 0 without a bias) as f32 in `table`, shared memory
// of a gemm.cuh block that its stages no longer need: after the block's last run_segment,
// which ends on a barrier with no copies in flight. Every thread of the block calls it.
template <typename T>
FK_DEVICE const float* gemm_bias_table(float* table, const T* bias, uint32_t n0, uint32_t cols) {
  for (int c = threadIdx.x; c < gemm::kBN; c += gemm::kThreads) table[c] = bias && n0 + c < cols ? to_f32(bias[n0 + c]) : 0.0f;
  __syncthreads();
  return table;
}

// out[m0 + r][n0 + c] = in[m0 + r][n0 + c] + factor · acc for m0 + r < rows, n0 + c < cols
// (rows in_ld and out_ld elements apart; in may be out), rounded to T, from gemm.cuh's
// accumulators. A fragment's pairs of columns go as the 16-bit halves of a word, in one 4-byte
// access each where both matrices keep pairs aligned, 2-byte ones otherwise and for a last odd
// column (nothing past `cols` is read or written). Half the fragments at a time, each half's
// loads before its stores: a load after a store to `out` waits for it (the compiler cannot
// tell their addresses apart), a round trip to memory per pair; all at once spills on sm_80.
template <typename T>
FK_DEVICE void store_sum(gemm::Accumulators& acc, T* out, uint64_t out_ld, const T* in, uint64_t in_ld, uint32_t m0,
                         uint32_t n0, uint32_t rows, uint32_t cols, float factor) {
  constexpr int kBatch = gemm::kFragments / 2;
  const bool words = out_ld % 2 == 0 && in_ld % 2 == 0 && reinterpret_cast<uintptr_t>(out) % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(in) % 4 == 0;
#pragma unroll
  for (int batch = 0; batch < gemm::kFragments; batch += kBatch) {
    uint32_t was[kBatch][2];  // fragment i's rows g and g + 8
    gemm::for_each_fragment(acc, [&](int i, int r, int c, float (&)[4]) {
      if (i < batch || i >= batch + kBatch) return;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const uint32_t row = m0 + r + 8 * half, col = n0 + c;
        uint32_t& w = was[i - batch][half];
        w = 0;
        if (row >= rows || col >= cols) continue;
        const T* at = in + row * in_ld + col;
        if (words && col + 1 < cols) {
          w = *reinterpret_cast<const uint32_t*>(at);
        } else {
          w = bits16(at[0]) | (col + 1 < cols ? uint32_t(bits16(at[1])) << 16 : 0u);
        }
      }
    });
    gemm::for_each_fragment(acc, [&](int i, int r, int c, float (&q)[4]) {
      if (i < batch || i >= batch + kBatch) return;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const uint32_t row = m0 + r + 8 * half, col = n0 + c;
        if (row >= rows || col >= cols) continue;
        const uint32_t w = was[i - batch][half];
        const float lo = to_f32(from_bits16<T>(w & 0xffffu)) + factor * q[2 * half];
        const float hi = to_f32(from_bits16<T>(w >> 16)) + factor * q[2 * half + 1];
        store_two(out + row * out_ld + col, lo, hi, words, col + 1 < cols);
      }
    });
  }
}
