// wgmma.cuh: the Hopper GEMM (sm_90a; the emulator runs it too) from small pieces:
//   acc[kBM × kBN] += Σ over segments  A_s[kBM × K_s] · B_s[kBN × K_s]ᵀ
// for one output tile per block, both operands row-major with K contiguous (a TN GEMM:
// activations [rows, K] against weights [out, K]). A GEMM is one or more segments (K ranges
// of different matrices) run into the same accumulators, as gemm.cuh's are; the epilogue is
// the caller's, through for_each.
//
// Layout: two warpgroups, each 64 rows × kBN columns of the tile (128 f32 accumulators a
// thread), `wgmma.m64n256k16` four times per stage of 64 along K. Stages are filled by
// cp.async from every thread into ptx.cuh's 128-byte swizzle, kStages deep: at step kt the
// block waits for stage kt, then refills the stage of step kt - 2 (whose wgmmas every thread
// has waited out before the barrier: wgmma_wait<1> leaves only step kt - 1 in flight) with
// step kt + kStages - 2, and issues step kt's wgmmas. One barrier per step.
#pragma once
#include "compat.cuh"
#include "dtype.cuh"
#include "ptx.cuh"
#include "../params/gemm.h"

namespace wgmma {

constexpr int kBM = FK_WGMMA_TILE_M, kBN = FK_WGMMA_TILE_N, kBK = 64, kStages = FK_WGMMA_STAGES,
              kThreads = FK_WGMMA_THREADS;
static_assert(kBM == 128 && kBN == 256 && kThreads == 256, "two warpgroups of m64n256");
static_assert(kStages >= 3, "a stage in flight, one being refilled, one being read");

// One stage: kBM rows of A, then kBN rows of B, each row 64 elements (128 bytes) as eight
// 16-byte chunks in the 128-byte swizzle.
struct Stage {
  uint4 a[kBM * 8];
  uint4 b[kBN * 8];
};
static_assert(FK_WGMMA_SMEM_BYTES == kStages * sizeof(Stage) + 1024, "params/gemm.h's size");

using Accumulators = float[kBN / 2];

// Chunk `chunk` (8 elements along K) of row `row` in a swizzled tile.
FK_DEVICE int swizzled(int row, int chunk) { return row * 8 + (chunk ^ (row & 7)); }

// A row-major operand: rows [row0, row0 + kRows) of a matrix with `rows` rows, K-contiguous
// rows `ld` apart, `k_len` long; zero outside.
template <typename T>
struct Operand {
  const T* ptr;
  uint64_t ld;
  uint32_t row0;
  uint32_t rows;
  uint32_t k_len;

  // 16-byte runs are whole: every chunk is in or out of the matrix together with its source.
  FK_DEVICE bool aligned() const { return ld % 8 == 0 && (reinterpret_cast<uintptr_t>(ptr) % 16) == 0; }

  // Starts loading K [k0, k0 + 64) of the block's rows into `tile` (kRows rows). A thread
  // always takes the same chunk of rows 32 apart, rows whose swizzle is the same: one address
  // computation, then a stride per row.
  template <int kRows>
  FK_DEVICE void load(uint4* tile, uint32_t k0, bool is_aligned) const {
    const int chunk = threadIdx.x % 8, row = threadIdx.x / 8;
    const uint32_t k = k0 + chunk * 8, valid = k < k_len ? min(8u, k_len - k) : 0u;
    uint4* dst = &tile[swizzled(row, chunk)];
    if (is_aligned) {
      const T* src = ptr + uint64_t(row0 + row) * ld + k;
#pragma unroll
      for (int i = 0; i < kRows / 32; ++i) {
        const bool in = valid && row0 + row + 32 * i < rows;
        cp_async_zfill16(dst + 32 * 8 * i, in ? src + 32 * i * ld : ptr, in ? int(valid) * 2 : 0);
      }
      return;
    }
#pragma unroll 1
    for (int i = 0; i < kRows / 32; ++i) {
      const uint32_t r = row0 + row + 32 * i;
      uint16_t v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = r < rows && j < int(valid) ? bits16(ptr[uint64_t(r) * ld + k + j]) : uint16_t(0);
      dst[32 * 8 * i] = make_uint4(v[0] | uint32_t(v[1]) << 16, v[2] | uint32_t(v[3]) << 16, v[4] | uint32_t(v[5]) << 16,
                                   v[6] | uint32_t(v[7]) << 16);
    }
  }
};

// A K range: A's and B's rows share K, `k_len` long.
template <typename T>
struct Segment {
  Operand<T> a, b;
  FK_DEVICE int steps() const { return int((a.k_len + kBK - 1) / kBK); }
};

// acc += the 16 columns at k0 of tiles a (64 rows) and b (kBN rows).
template <typename T>
FK_DEVICE void mma(Accumulators& acc, const uint4* a, const uint4* b, int k0) {
  const void* ak = reinterpret_cast<const char*>(a) + 2 * k0;
  const void* bk = reinterpret_cast<const char*>(b) + 2 * k0;
  if constexpr (std::is_same<T, __half>::value) {
    wgmma_m64n256k16_f16(acc, ak, bk);
  } else {
    wgmma_m64n256k16_bf16(acc, ak, bk);
  }
}

// Starts loading step `kt` of all the segments' steps in order into its stage (a segment's
// steps start at `first[s]`).
template <typename T, int kSegments>
FK_DEVICE void load_step(Stage* stages, const Segment<T> (&segs)[kSegments], const int (&first)[kSegments + 1],
                         const bool (&aligned)[kSegments][2], int kt) {
  Stage& st = stages[kt % kStages];
#pragma unroll
  for (int s = 0; s < kSegments; ++s) {
    if (kt >= first[s] && kt < first[s + 1]) {
      const uint32_t k0 = uint32_t(kt - first[s]) * kBK;
      segs[s].a.template load<kBM>(st.a, k0, aligned[s][0]);
      segs[s].b.template load<kBN>(st.b, k0, aligned[s][1]);
    }
  }
}

// acc += the segments' products, in order. `smem`: FK_WGMMA_SMEM_BYTES of dynamic shared
// memory. Ends with every wgmma waited out and a barrier (smem is free again).
template <typename T, int kSegments>
FK_DEVICE void run(Accumulators& acc, unsigned char* smem, const Segment<T> (&segs)[kSegments]) {
  Stage* stages = reinterpret_cast<Stage*>(smem + shared_align_1024(smem));
  bool aligned[kSegments][2];
  int first[kSegments + 1] = {0};
#pragma unroll
  for (int s = 0; s < kSegments; ++s) {
    aligned[s][0] = segs[s].a.aligned();
    aligned[s][1] = segs[s].b.aligned();
    first[s + 1] = first[s] + segs[s].steps();
  }
  const int total = first[kSegments];
  for (int kt = 0; kt < kStages - 2; ++kt) {
    if (kt < total) load_step(stages, segs, first, aligned, kt);
    cp_async_commit();
  }
  const int half = threadIdx.x / 128;  // this warpgroup's 64 rows of A
  for (int kt = 0; kt < total; ++kt) {
    cp_async_wait<kStages - 3>();  // this thread's copies for step kt have landed
    fence_proxy_async_shared();
    __syncthreads();               // everyone's have; step kt - 2's wgmmas are done
    if (kt + kStages - 2 < total) load_step(stages, segs, first, aligned, kt + kStages - 2);
    cp_async_commit();
    const Stage& st = stages[kt % kStages];
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < kBK; k += 16) mma<T>(acc, &st.a[half * 64 * 8], &st.b[0], k);
    wgmma_commit();
    wgmma_wait<1>();
  }
  wgmma_wait<0>();
  wgmma_hold(acc);
  cp_async_wait<0>();
  __syncthreads();
}

// Calls f(row, col, v0, v1) for each pair of accumulators this thread holds: columns col
// and col + 1 of row `row`, in tile coordinates (ptx.cuh's accumulator layout).
template <class F>
FK_DEVICE void for_each_pair(const Accumulators& acc, F f) {
  const int lane = threadIdx.x % 32, row = (threadIdx.x / 32) * 16 + lane / 4;  // warps 0-7 in order
#pragma unroll
  for (int j = 0; j < kBN / 2; j += 2) f(row + 8 * ((j % 4) / 2), 8 * (j / 4) + 2 * (lane % 4), acc[j], acc[j + 1]);
}

}  // namespace wgmma
