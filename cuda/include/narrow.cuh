// narrow.cuh: acc[kRows × kCols] (+)= A[kRows × K] · B[K × kCols] for GEMMs whose output is
// only a few columns wide (u = x Aᵀ and v = dY B: `rank` columns; the weight gradients
// dAᵀ = xᵀ v and [dB | dbias] = dYᵀ [u | 1], K = the tokens), whose time is the read of A,
// the activations. gemm.cuh's sources and tiles (so its tails, alignment fallback, dropout
// and row copies), through kStages stages in dynamic shared memory with kStages - 1 loads in
// flight (cp.async.wait_group kStages - 2): gemm.cuh's two stages with one load in flight
// left 8 KB of A in flight per SM, latency-bound at ≈ 0.8 TB/s on an H200 (bench/NOTES.md).
// Eight warps, each 16 rows × every column; tiles of 8 columns wholly past the output's width
// are zero-filled (no global reads) and not multiplied. A stage is kBK (32) along K, or
// kWideK (64: a whole 128-byte line of each bf16 row per step, lora_down_k64) in fewer,
// larger stages.
#pragma once
#include "gemm.cuh"

namespace narrow {

using gemm::kBK;
using gemm::kThreads;
constexpr int kRows = FK_NARROW_ROWS, kCols = FK_NARROW_COLS, kWideK = FK_NARROW_WIDE_STEP;
static_assert(kRows == 16 * (kThreads / 32), "a warp's 16 rows each");
static_assert(FK_NARROW_STEP == kBK, "params/gemm.h's step is gemm.cuh's");

// One stage, BK along K; kCount of them fill the launch's dynamic shared memory.
template <bool AKContig, bool BKContig, int BK = kBK>
struct Stage {
  static_assert(BK == kBK || BK == kWideK, "a step width params/gemm.h sizes");
  static constexpr int kK = BK, kCount = BK == kBK ? FK_NARROW_STAGES : FK_NARROW_WIDE_STAGES;
  static constexpr uint32_t kSmemBytes = BK == kBK ? FK_NARROW_SMEM_BYTES : FK_NARROW_WIDE_SMEM_BYTES;
  gemm::Tile<AKContig, kRows, BK> a;
  gemm::Tile<BKContig, kCols, BK> b;
};
template <int BK>
constexpr bool fits() {
  return Stage<true, true, BK>::kCount * sizeof(Stage<true, true, BK>) <= Stage<true, true, BK>::kSmemBytes &&
         Stage<true, false, BK>::kCount * sizeof(Stage<true, false, BK>) <= Stage<true, false, BK>::kSmemBytes &&
         Stage<false, false, BK>::kCount * sizeof(Stage<false, false, BK>) <= Stage<false, false, BK>::kSmemBytes;
}
static_assert(fits<kBK>() && fits<kWideK>(), "the launch's dynamic shared memory holds the stages");

using Accumulators = float[kCols / 8][4];  // [n tile of 8][fragment]

// acc += A_stage · B_stage over the first n_tiles tiles of 8 columns.
template <typename T, class StageT>
FK_DEVICE void compute(Accumulators& acc, StageT& st, int n_tiles) {
  const int row0 = (threadIdx.x / 32) * 16;
#pragma unroll
  for (int kk = 0; kk < StageT::kK; kk += 16) {
    uint32_t af[4];
    gemm::load_a(af, st.a, row0, kk);
#pragma unroll
    for (int np = 0; np < kCols / 16; ++np) {
      if (2 * np >= n_tiles) break;
      uint32_t bf[4];
      gemm::load_b(bf, st.b, np * 16, kk);
      gemm::mma<T>(acc[2 * np], af, &bf[0]);
      if (2 * np + 1 < n_tiles) gemm::mma<T>(acc[2 * np + 1], af, &bf[2]);
    }
  }
}

// Runs the K range [k_begin, k_end) into acc through the stages at `st` (kCount of them),
// starting at its step `first` (mod the steps) and wrapping around: blocks that start at
// different steps read different columns of their rows at any one time (lora.cu's
// stagger_start).
template <typename T, class StageT, class SrcA, class SrcB>
FK_DEVICE void run(Accumulators& acc, StageT* st, SrcA& a, SrcB& b, uint32_t k_begin, uint32_t k_end, int n_tiles,
                   uint32_t first = 0) {
  if (k_begin >= k_end) return;
  constexpr int kStages = StageT::kCount, kStep = StageT::kK;
  const int ktiles = (k_end - k_begin + kStep - 1) / kStep;
  first %= uint32_t(ktiles);
  // Where step kt reads along K.
  auto k_at = [&](int kt) {
    const uint32_t s = uint32_t(kt) + first;
    return k_begin + (s < uint32_t(ktiles) ? s : s - ktiles) * kStep;
  };
  // Step kt's loads into stage kt % kStages; a group per step, empty past the end, so that
  // wait_group counts steps.
  auto issue = [&](int kt) {
    if (kt < ktiles) {
      StageT& s = st[kt % kStages];
      const uint32_t k0 = k_at(kt);
      a.issue(s.a, k0);
      b.issue(s.b, k0);
      a.finish(s.a, k0);
      b.finish(s.b, k0);
    }
    cp_async_commit();
  };
  // Step kt's work that needs none of its data (a dropout mask), done while step kt - 1
  // multiplies.
  auto pre_wait = [&](int kt) {
    if (kt < ktiles) a.pre_wait(k_at(kt)), b.pre_wait(k_at(kt));
  };
  for (int kt = 0; kt < kStages - 1; ++kt) issue(kt);
  pre_wait(0);
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();  // this thread's loads of step kt have landed
    StageT& s = st[kt % kStages];
    const uint32_t k0 = k_at(kt);
    a.post_wait(s.a, k0);
    b.post_wait(s.b, k0);
    __syncthreads();  // step kt landed for every thread; step kt - 1's stage is free
    issue(kt + kStages - 1);
    compute<T>(acc, s, n_tiles);
    pre_wait(kt + 1);
  }
  cp_async_wait<0>();  // only the empty groups past the end remain: none left behind
}

// Calls f(row, col, acc_ref, acc_ref) for each pair of accumulators this thread holds in
// columns col and col + 1 (col even) of a row, in tile coordinates.
template <class F>
FK_DEVICE void for_each_pair(Accumulators& acc, F f) {
  const int lane = threadIdx.x % 32, row = (threadIdx.x / 32) * 16 + lane / 4, col = 2 * (lane % 4);
#pragma unroll
  for (int nt = 0; nt < kCols / 8; ++nt) {
    f(row, nt * 8 + col, acc[nt][0], acc[nt][1]);
    f(row + 8, nt * 8 + col, acc[nt][2], acc[nt][3]);
  }
}

// Calls f(row, col, acc_ref) for each accumulator this thread holds, as for_each_pair.
template <class F>
FK_DEVICE void for_each(Accumulators& acc, F f) {
  for_each_pair(acc, [&](int row, int col, float& a, float& b) {
    f(row, col, a);
    f(row, col + 1, b);
  });
}

// The tiles of 8 columns a block whose first column is n0 computes, of `cols`.
FK_DEVICE int n_tiles(uint32_t cols, uint32_t n0) { return int(min(uint32_t(kCols), cols - n0) + 7) / 8; }

}  // namespace narrow
