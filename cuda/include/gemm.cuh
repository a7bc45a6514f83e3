// gemm.cuh: a tensor-core GEMM (mma.sync m16n8k16, f32 accumulators) from small pieces:
//   acc[kBM × kBN] (+)= A[kBM × K] · B[K × kBN]  for one output tile per block,
// where each operand comes from a *source* that fills a shared-memory stage: a dense
// matrix in either orientation (cp.async), an NF4 weight dequantized on the way in, with
// an optional dropout mask. A GEMM is one or more *segments* (K ranges, possibly with
// different sources) run into the same accumulators; the epilogue is the caller's.
//
// Layout: 8 warps, each a 64×32 sub-tile (4×4 mma tiles); K in steps of kBK through two
// stages. A source fills stage s+1 while stage s is multiplied:
//   issue(next)  starts loads (cp.async, or global loads into registers)
//   compute(cur)
//   finish(next) writes what issue held in registers (e.g. dequantized NF4)
//   pre_wait(next) does the work for it that needs none of its data (e.g. a dropout mask's
//                bits; narrow.cuh calls it a step ahead)
//   cp.async wait; post_wait(next) fixes up the landed data (e.g. dropout); barrier
#pragma once
#include "compat.cuh"
#include "dtype.cuh"
#include "ptx.cuh"
#include "../params/gemm.h"

namespace gemm {

constexpr int kBM = FK_GEMM_TILE, kBN = FK_GEMM_TILE, kBK = 32, kThreads = FK_GEMM_THREADS, kPad = 8;

// A stage of one operand, BK along K (kBK here; narrow.cuh's stages may be wider). KContig:
// stored [Extent][BK] (k contiguous), read with ldmatrix; otherwise [BK][Extent] (the other
// index contiguous), read with ldmatrix.trans.
template <bool KContig, int Extent, int BK = kBK>
struct Tile {
  static constexpr bool kKContig = KContig;
  static constexpr int kK = BK;
  __align__(16) uint16_t data[KContig ? Extent : BK][(KContig ? BK : Extent) + kPad];
  // The element at (mn, k) of the tile.
  FK_DEVICE uint16_t& at(int mn, int k) { return KContig ? data[mn][k] : data[k][mn]; }
  // The 16-byte run of 8 elements starting at (mn, k), along the contiguous index.
  FK_DEVICE uint16_t* run(int mn, int k) { return &at(mn, k); }
};

template <bool AKContig, bool BKContig>
struct Stages {
  Tile<AKContig, kBM> a[2];
  Tile<BKContig, kBN> b[2];
};

using Accumulators = float[4][4][4];  // [m tile][n tile][fragment]

FK_DEVICE int warp_m() { return (threadIdx.x / 32) / 4; }  // 0..1: 64 rows each
FK_DEVICE int warp_n() { return (threadIdx.x / 32) % 4; }  // 0..3: 32 cols each

// A fragments of the 16×16 block at (m0, kk) (ptx-fragments.md: mma A layout).
template <class TileA>
FK_DEVICE void load_a(uint32_t (&r)[4], TileA& t, int m0, int kk) {
  const int lane = threadIdx.x % 32;
  if constexpr (TileA::kKContig) {
    ldmatrix_x4(r, t.run(m0 + lane % 16, kk + (lane / 16) * 8));
  } else {
    ldmatrix_x4_trans(r, &t.data[kk + (lane / 16) * 8 + lane % 8][m0 + ((lane / 8) % 2) * 8]);
  }
}

// B fragments of two 16×8 blocks at (kk, n0) and (kk, n0 + 8): r = {b0, b1} of each.
template <class TileB>
FK_DEVICE void load_b(uint32_t (&r)[4], TileB& t, int n0, int kk) {
  const int lane = threadIdx.x % 32;
  if constexpr (TileB::kKContig) {
    ldmatrix_x4(r, t.run(n0 + (lane / 16) * 8 + lane % 8, kk + ((lane / 8) % 2) * 8));
  } else {
    ldmatrix_x4_trans(r, &t.data[kk + ((lane / 8) % 2) * 8 + lane % 8][n0 + (lane / 16) * 8]);
  }
}

template <typename T>
FK_DEVICE void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t* b) {
  const uint32_t bb[2] = {b[0], b[1]};
  if constexpr (std::is_same<T, __half>::value) {
    mma_m16n8k16_f16(d, a, bb, d);
  } else {
    mma_m16n8k16_bf16(d, a, bb, d);
  }
}

// acc += A_stage · B_stage.
template <typename T, class TileA, class TileB>
FK_DEVICE void compute(Accumulators& acc, TileA& a, TileB& b) {
  const int wm = warp_m(), wn = warp_n();
#pragma unroll
  for (int kk = 0; kk < kBK; kk += 16) {
    uint32_t af[4][4], bf[2][4];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) load_a(af[mt], a, wm * 64 + mt * 16, kk);
#pragma unroll
    for (int np = 0; np < 2; ++np) load_b(bf[np], b, wn * 32 + np * 16, kk);
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) mma<T>(acc[mt][nt], af[mt], &bf[nt / 2][2 * (nt % 2)]);
  }
}

// Runs the K range [k_begin, k_end) of one segment into acc. Sources take absolute k.
template <typename T, class Stage, class SrcA, class SrcB>
FK_DEVICE void run_segment(Accumulators& acc, Stage& st, SrcA& a, SrcB& b, uint32_t k_begin, uint32_t k_end) {
  if (k_begin >= k_end) return;
  const int ktiles = (k_end - k_begin + kBK - 1) / kBK;
  a.issue(st.a[0], k_begin);
  b.issue(st.b[0], k_begin);
  a.finish(st.a[0], k_begin);
  b.finish(st.b[0], k_begin);
  cp_async_commit();
  a.pre_wait(k_begin);
  b.pre_wait(k_begin);
  cp_async_wait<0>();
  a.post_wait(st.a[0], k_begin);
  b.post_wait(st.b[0], k_begin);
  __syncthreads();
  for (int kt = 0; kt < ktiles; ++kt) {
    const int cur = kt & 1, nxt = cur ^ 1;
    const uint32_t k_next = k_begin + (kt + 1) * kBK;
    const bool more = kt + 1 < ktiles;
    if (more) {
      a.issue(st.a[nxt], k_next);
      b.issue(st.b[nxt], k_next);
    }
    cp_async_commit();
    compute<T>(acc, st.a[cur], st.b[cur]);
    if (more) {
      a.finish(st.a[nxt], k_next);
      b.finish(st.b[nxt], k_next);
      a.pre_wait(k_next);
      b.pre_wait(k_next);
    }
    cp_async_wait<0>();
    if (more) {
      a.post_wait(st.a[nxt], k_next);
      b.post_wait(st.b[nxt], k_next);
    }
    __syncthreads();
  }
}

constexpr int kFragments = sizeof(Accumulators) / sizeof(float[4]);

// Calls f(index, row, col, fragment) for each m16n8 fragment this thread holds, index 0 to
// kFragments - 1 (known at compile time: the loops unroll): fragment[i] is the accumulator at
// (row + 8 * (i / 2), col + i % 2), in tile coordinates relative to the block's origin (row =
// the lane's group, col = twice its index in the group, as mma.sync's).
template <class F>
FK_DEVICE void for_each_fragment(Accumulators& acc, F f) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4, wm = warp_m(), wn = warp_n();
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) f(mt * 4 + nt, wm * 64 + mt * 16 + g, wn * 32 + nt * 8 + 2 * t, acc[mt][nt]);
}

// Calls f(row, col, acc_ref, acc_ref) for each pair of accumulators this thread holds in
// columns col and col + 1 (col even) of a row, in tile coordinates relative to the block's
// origin.
template <class F>
FK_DEVICE void for_each_pair(Accumulators& acc, F f) {
  for_each_fragment(acc, [&](int, int row, int col, float (&q)[4]) {
    f(row, col, q[0], q[1]);
    f(row + 8, col, q[2], q[3]);
  });
}

// ---- sources -------------------------------------------------------------------------------

// A dense matrix of T, element (mn, k) at ptr[mn * mn_stride + k * k_stride] with one of the
// strides 1; `extent` rows along mn, `k_len` along k; zero outside. The contiguous index of
// the matrix must match the tile's (KContig with k_stride == 1). It fills tiles BK along K.
template <typename T, bool KContig, int Extent, int BK = kBK>
struct DenseSource {
  using TileT = Tile<KContig, Extent, BK>;

  const T* ptr;
  uint64_t ld;       // the stride of the non-contiguous index
  uint32_t mn0;      // the tile's origin along mn
  uint32_t extent;   // valid mn: [0, extent)
  uint32_t k_len;    // valid k: [0, k_len)

  FK_DEVICE bool aligned() const { return runs_of_8(ptr, ld); }
  FK_DEVICE uint64_t offset(uint32_t mn, uint32_t k) const { return KContig ? mn * ld + k : uint64_t(k) * ld + mn; }
  FK_DEVICE bool inside(uint32_t mn, uint32_t k) const { return mn < extent && k < k_len; }

  FK_DEVICE void issue(TileT& tile, uint32_t k0) {
    constexpr int kRows = KContig ? Extent : BK, kCols = KContig ? BK : Extent;  // as stored
    if (aligned()) {
      // 16-byte runs along the contiguous index; a run is wholly inside or outside (ld % 8).
      for (int c = threadIdx.x; c < kRows * kCols / 8; c += kThreads) {
        const int row = c / (kCols / 8), col = (c % (kCols / 8)) * 8;
        const int mn = KContig ? row : col, k = KContig ? col : row;
        const uint32_t gm = mn0 + mn, gk = k0 + k;
        const bool in = inside(gm, gk);
        const uint32_t valid = in ? (KContig ? min(8u, k_len - gk) : min(8u, extent - gm)) : 0;
        cp_async_zfill16(&tile.data[row][col], in ? ptr + offset(gm, gk) : ptr, int(valid) * 2);
      }
    } else {
      for (int i = threadIdx.x; i < kRows * kCols; i += kThreads) {
        const int row = i / kCols, col = i % kCols;
        const int mn = KContig ? row : col, k = KContig ? col : row;
        tile.data[row][col] = inside(mn0 + mn, k0 + k) ? bits16(ptr[offset(mn0 + mn, k0 + k)]) : 0;
      }
    }
  }
  FK_DEVICE void finish(TileT&, uint32_t) {}
  FK_DEVICE void pre_wait(uint32_t) {}
  FK_DEVICE void post_wait(TileT&, uint32_t) {}

  // Calls f(row, col, count) for each run of `count` stored elements this thread loaded in
  // issue() (8 along the contiguous index, or single elements): the only elements a
  // post_wait hook may touch before the barrier, since only this thread's cp.async copies
  // are known to have landed.
  template <class F>
  FK_DEVICE void for_each_loaded(F f) const {
    constexpr int kRows = KContig ? Extent : BK, kCols = KContig ? BK : Extent;
    const int step = aligned() ? 8 : 1;
    for (int c = threadIdx.x; c < kRows * kCols / step; c += kThreads) f(c / (kCols / step), (c % (kCols / step)) * step, step);
  }
};

}  // namespace gemm
