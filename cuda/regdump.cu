// Register-dump kernels: launched with one warp (32 threads, one block; wgmma's with one
// warpgroup). The GPU check runs them on real hardware and commits the dump; the emulator
// must reproduce it bit for bit.
#include "include/compat.cuh"
#include "include/ptx.cuh"
#include "include/wgmma.cuh"
#include "params/regdump.h"

namespace {

// Rows sit 48 bytes apart in a permuted order, so a dump also shows that each lane's own
// address is used (not "row 0 plus an offset").
constexpr int kRowStride = 24;  // halves
FK_DEVICE int row_slot(int matrix, int row) { return ((matrix * 8 + row) * 5) % 32; }
// Element (m, r, c) holds a marker and its coordinates, so every value names its origin.
FK_DEVICE uint16_t element_id(int m, int r, int c) { return 0xA000 | (m << 6) | (r << 3) | c; }

template <int N>
FK_DEVICE void store_regs(uint32_t* out, int variant, int lane, const uint32_t (&r)[N]) {
  for (int i = 0; i < 4; ++i) out[(variant * 32 + lane) * 4 + i] = i < N ? r[i] : 0u;
}

template <typename Mma>
FK_DEVICE void dump_mma(const RegdumpParams& p, Mma mma) {
  const int lane = threadIdx.x;
  const uint32_t* in = p.in + lane * FK_REGDUMP_MMA_IN;
  const uint32_t a[4] = {in[0], in[1], in[2], in[3]};
  const uint32_t b[2] = {in[4], in[5]};
  const float c[4] = {__uint_as_float(in[6]), __uint_as_float(in[7]), __uint_as_float(in[8]),
                      __uint_as_float(in[9])};
  float d[4];
  mma(d, a, b, c);
  for (int i = 0; i < 4; ++i) p.out[lane * 4 + i] = __float_as_uint(d[i]);
}

// Where the dumped wgmma takes its operands from.
enum class WgmmaA { shared, registers, shared_mn_major, b_mn_major };

// One warpgroup: A and B into a 1024-byte-aligned tile in the 128-byte swizzle (wgmma.cuh's
// layout: B's 8 rows after A's 64), then four m64n8k16 along K (each a new descriptor start
// address 32 bytes on) accumulate into C. WgmmaA::registers: A instead comes from registers,
// each lane's fragments built from the input by ptx.cuh's RS layout; shared_mn_major: A's 64
// rows are stored MN-major (wgmma.cuh's `Columns` tile: a swizzled 128-byte line per k), each
// k16 slice 2 KB on; b_mn_major: B's 8 columns so (the first 8 of a chunk's 64, after A's
// 64 rows), A K-major.
template <typename T, WgmmaA kA>
FK_DEVICE void dump_wgmma(const RegdumpParams& p) {
  constexpr int kRows = 64 + 8;
  constexpr bool kMnA = kA == WgmmaA::shared_mn_major, kMnB = kA == WgmmaA::b_mn_major;
  FK_SHARED(smem, uint4[(kMnB ? 128 : kRows) * 8 + 64]);  // + 1 KB to align
  uint4* tile = reinterpret_cast<uint4*>(reinterpret_cast<unsigned char*>(smem) + shared_align_1024(smem));
  const int t = threadIdx.x;
  for (int c = t; c < kRows * 8; c += FK_REGDUMP_WGMMA_THREADS) {
    const uint32_t* w = p.in + c * 4;  // row c / 8, elements 8 (c % 8) ... + 7
    const bool b = c >= 64 * 8;
    if ((kMnA && !b) || (kMnB && b)) {
      const uint16_t* e = reinterpret_cast<const uint16_t*>(w);
      uint16_t* slots = reinterpret_cast<uint16_t*>(tile + (b ? 64 * 8 : 0));
      const int row = c / 8 - (b ? 64 : 0);
      for (int j = 0; j < 8; ++j) slots[wgmma::columns_slot(8 * (c % 8) + j, row)] = e[j];  // (row, k) at line k
    } else {
      tile[wgmma::swizzled(c / 8, c % 8)] = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
  uint32_t af[4][4];  // [k16 slice][register]: rows g, g + 8 of this warp's 16; k 2q, 2q + 8
  const int row = (t / 32) * 16 + (t % 32) / 4, q = t % 4;
  for (int s = 0; s < 4; ++s)
    for (int r = 0; r < 4; ++r) af[s][r] = p.in[((row + 8 * (r & 1)) * 64 + 16 * s + 2 * q + 8 * (r >> 1)) / 2];
  fence_proxy_async_shared();
  __syncthreads();
  const uint32_t* c_in = p.in + kRows * 32 + t * 4;
  float d[4] = {__uint_as_float(c_in[0]), __uint_as_float(c_in[1]), __uint_as_float(c_in[2]), __uint_as_float(c_in[3])};
  wgmma_fence();
  for (int s = 0; s < 4; ++s) {
    const char* a = reinterpret_cast<const char*>(tile), *b = reinterpret_cast<const char*>(tile + 64 * 8);
    if constexpr (kA == WgmmaA::registers) {
      wgmma_m64n8k16_rs<T>(d, af[s], b + 32 * s);
    } else if constexpr (kMnA) {
      wgmma_m64n8k16<T, true>(d, a + 2048 * s, b + 32 * s);
    } else if constexpr (kMnB) {
      wgmma_m64n8k16<T, false, true>(d, a + 32 * s, b + 2048 * s);
    } else {
      wgmma_m64n8k16<T>(d, a + 32 * s, b + 32 * s);
    }
  }
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_hold(d);
  for (int i = 0; i < 4; ++i) p.out[t * 4 + i] = __float_as_uint(d[i]);
}

}  // namespace

// What TMA writes, not dumped but checked against the PTX ISA's formula on every backend
// (tests/device.rs): each box lands in a 1024-byte-aligned tile (the swizzle's unit), every
// thread waits on the box's phase of the barrier, then the tile is copied out as it lies.
// kMulticast, in clusters of n blocks (params/regdump.h): block r of a cluster loads rows
// [c1 + r·box_rows, c1 + (r + 1)·box_rows) into every block of it, so each block's tile holds
// the n boxes stacked; block b copies its tile out to out[(b · boxes + i) · n · 64 · box_rows].
template <bool kMulticast>
FK_DEVICE void dump_tma(const RegdumpTmaParams& p) {
  unsigned char* smem = dyn_smem<unsigned char>();
  uint16_t* tile = reinterpret_cast<uint16_t*>(smem + shared_align_1024(smem));
  const uint32_t n = kMulticast ? cluster_nctarank() : 1, rank = kMulticast ? cluster_ctarank() : 0;
  const uint32_t part = 64 * p.box_rows, elems = n * part;
  uint64_t* bar = reinterpret_cast<uint64_t*>(tile + elems);
  // Every read of the tile is done (in every block it lands in) before the next load.
  auto sync = [] { kMulticast ? cluster_sync() : __syncthreads(); };
  if (threadIdx.x == 0) {
    mbarrier_init(bar, 1);
    fence_mbarrier_init();
  }
  sync();  // every barrier is initialized before any load names it
  for (uint32_t i = 0; i < p.boxes; ++i) {
    if (threadIdx.x == 0) {
      mbarrier_arrive_expect_tx(bar, elems * 2);
      const int32_t c0 = p.c0 + 64 * int32_t(i), c1 = p.c1 + int32_t(rank * p.box_rows);
      if constexpr (kMulticast) {
        tma_load_2d_multicast(tile + rank * part, &p.map, c0, c1, bar, uint16_t((1u << n) - 1));
      } else {
        tma_load_2d(tile, &p.map, c0, c1, bar);
      }
    }
    mbarrier_wait(bar, i % 2);
    uint16_t* out = p.out + (uint64_t(blockIdx.x) * p.boxes + i) * elems;
    for (uint32_t e = threadIdx.x; e < elems; e += blockDim.x) out[e] = tile[e];
    sync();
  }
  if (threadIdx.x == 0) mbarrier_inval(bar);
}

FK_KERNEL_TMA(regdump_tma, RegdumpTmaParams, FK_REGDUMP_TMA_THREADS) { dump_tma<false>(p); }
FK_KERNEL_TMA(regdump_tma_multicast, RegdumpTmaParams, FK_REGDUMP_TMA_THREADS) { dump_tma<true>(p); }

FK_KERNEL(regdump_ldmatrix, RegdumpParams) {
  FK_SHARED(tiles, uint16_t[32 * kRowStride]);
  const int lane = threadIdx.x;
  for (int e = lane; e < 4 * 64; e += 32) {
    const int m = e / 64, r = (e / 8) % 8, c = e % 8;
    tiles[row_slot(m, r) * kRowStride + c] = element_id(m, r, c);
  }
  __syncwarp();
  const uint16_t* row = tiles + row_slot(lane / 8, lane % 8) * kRowStride;
  uint32_t r1[1], r2[2], r4[4];
  ldmatrix_x1(r1, row);
  store_regs(p.out, 0, lane, r1);
  ldmatrix_x2(r2, row);
  store_regs(p.out, 1, lane, r2);
  ldmatrix_x4(r4, row);
  store_regs(p.out, 2, lane, r4);
  ldmatrix_x1_trans(r1, row);
  store_regs(p.out, 3, lane, r1);
  ldmatrix_x2_trans(r2, row);
  store_regs(p.out, 4, lane, r2);
  ldmatrix_x4_trans(r4, row);
  store_regs(p.out, 5, lane, r4);
}

// stmatrix.x4.trans (sm_90; it traps below): lane l's register j holds the ids
// 0x4000 | j << 7 | l << 1 | half, stored to the rows ldmatrix reads (row_slot); then
// out[(8m + r) · 4 + w] holds elements 2w and 2w + 1 of row r of matrix m.
FK_KERNEL(regdump_stmatrix, RegdumpParams) {
  FK_SHARED(tiles, uint16_t[32 * kRowStride]);
  const int lane = threadIdx.x;
  uint32_t regs[4];
  for (uint32_t j = 0; j < 4; ++j) {
    const uint32_t id = 0x4000u | (j << 7) | (uint32_t(lane) << 1);
    regs[j] = id | (id | 1u) << 16;
  }
  stmatrix_x4_trans(tiles + row_slot(lane / 8, lane % 8) * kRowStride, regs);
  __syncwarp();
  for (int e = lane; e < 4 * 8 * 4; e += 32) {
    const uint16_t* row = tiles + row_slot(e / 32, (e / 4) % 8) * kRowStride;
    p.out[e] = uint32_t(row[2 * (e % 4)]) | uint32_t(row[2 * (e % 4) + 1]) << 16;
  }
}

FK_KERNEL(regdump_mma_bf16, RegdumpParams) { dump_mma(p, mma_m16n8k16_bf16); }
FK_KERNEL(regdump_mma_f16, RegdumpParams) { dump_mma(p, mma_m16n8k16_f16); }
FK_KERNEL(regdump_mma_e4m3, RegdumpParams) { dump_mma(p, mma_m16n8k32_e4m3); }
FK_KERNEL(regdump_mma_e5m2, RegdumpParams) { dump_mma(p, mma_m16n8k32_e5m2); }
FK_KERNEL(regdump_wgmma_bf16, RegdumpParams) { dump_wgmma<__nv_bfloat16, WgmmaA::shared>(p); }
FK_KERNEL(regdump_wgmma_f16, RegdumpParams) { dump_wgmma<__half, WgmmaA::shared>(p); }
FK_KERNEL(regdump_wgmma_rs_bf16, RegdumpParams) { dump_wgmma<__nv_bfloat16, WgmmaA::registers>(p); }
FK_KERNEL(regdump_wgmma_rs_f16, RegdumpParams) { dump_wgmma<__half, WgmmaA::registers>(p); }
FK_KERNEL(regdump_wgmma_mn_bf16, RegdumpParams) { dump_wgmma<__nv_bfloat16, WgmmaA::shared_mn_major>(p); }
FK_KERNEL(regdump_wgmma_mn_f16, RegdumpParams) { dump_wgmma<__half, WgmmaA::shared_mn_major>(p); }
FK_KERNEL(regdump_wgmma_mn_b_bf16, RegdumpParams) { dump_wgmma<__nv_bfloat16, WgmmaA::b_mn_major>(p); }
FK_KERNEL(regdump_wgmma_mn_b_f16, RegdumpParams) { dump_wgmma<__half, WgmmaA::b_mn_major>(p); }

FK_KERNEL(regdump_cvt, RegdumpParams) {
  const int lane = threadIdx.x;
  const float hi = __uint_as_float(p.in[lane * FK_REGDUMP_CVT_IN]);
  const float lo = __uint_as_float(p.in[lane * FK_REGDUMP_CVT_IN + 1]);
  uint32_t* out = p.out + lane * FK_REGDUMP_CVT_OUT;
  out[0] = cvt_bf16x2(hi, lo);
  out[1] = cvt_e4m3x2(hi, lo);
  out[2] = cvt_e5m2x2(hi, lo);
}

// MUFU.RCP (rcp.approx.ftz.f32), which bitsandbytes' quantizer uses, against the correctly
// rounded reciprocal: bit i of word w is set when they differ for x = 1.m, m = 32w + i
// (2^23 mantissas, 2^18 words; one word per thread). The emulator replays MUFU.RCP from it.
FK_KERNEL(regdump_rcp_table, RegdumpParams) {
  const uint32_t w = blockIdx.x * blockDim.x + threadIdx.x;
  if (w >= FK_REGDUMP_RCP_WORDS) return;
  uint32_t bits = 0;
  for (uint32_t i = 0; i < 32; ++i) {
    const float x = __uint_as_float(0x3f800000u | (w * 32 + i));
    bits |= uint32_t(__float_as_uint(rcp_approx_ftz(x)) != __float_as_uint(__frcp_rn(x))) << i;
  }
  p.out[w] = bits;
}

// MUFU.RCP of arbitrary inputs (every exponent, subnormals, zeros, infinities): checks that
// the table above, scaled by the exponent and flushed, predicts it everywhere.
FK_KERNEL(regdump_rcp, RegdumpParams) {
  for (int i = threadIdx.x; i < FK_REGDUMP_RCP_SAMPLES; i += blockDim.x)
    p.out[i] = __float_as_uint(rcp_approx_ftz(__uint_as_float(p.in[i])));
}
