// wgmma.cuh: the Hopper GEMM (sm_90a; the emulator runs it too) from small pieces:
//   acc[kBM × kBN] += Σ over segments  A_s[kBM × K_s] · B_s[kBN × K_s]ᵀ
// for each output tile, a block walking its share of them (Schedule) with the next tile's
// first loads in flight while it stores the last (run_tiles). B is always a matrix of
// K-contiguous rows (`Rows`, or nf4.cuh's NF4 weight); A is either the same (`Rows`:
// activations [rows, K] against weights [out, K], the forward) or a matrix whose rows run
// along K with the tile's rows contiguous (`Columns`: Wᵀ for dXᵀ = Wᵀ·dYᵀ, W [K, in] read
// as is; or the NF4 weight so). A GEMM is one or more segments (K ranges of different matrices,
// one layout of A) run into the same accumulators, as gemm.cuh's are; the caller stores them
// (store_tile) or walks them (for_each). A segment may carry a side product (Side: its A
// tiles times a few rows of another matrix, into accumulators of the caller's) and a
// segment's A may be such accumulators (FromRegisters: an RS wgmma's A fragments): the LoRA
// forward makes u = x Aᵀ beside y = x Wᵀ and adds u Bᵀ from registers.
//
// Layout: two warpgroups, each 64 rows × kBN columns of the tile (128 f32 accumulators a
// thread), `wgmma.m64n256k16` four times per stage of 64 along K. Stages are filled by every
// thread, kStages deep, the steps numbered across the block's tiles: at step kt the block
// waits for stage kt, then starts refilling the stage of step kt - 2 (whose wgmmas every
// thread has waited out before the barrier: at most step kt - 1's are in flight) with step
// kt + kStages - 2, issues step kt's wgmmas, and finishes the refill; after a tile's last
// step, it stores the tile through the two stages no load is filling. An operand fills its
// tile in those two calls: issue() starts its loads (a TMA load from thread 0, cp.async, or
// global loads into the operand's registers), finish() completes them (the NF4 weight is
// dequantized into the tile there, while the wgmmas run). Each stage has an mbarrier that
// thread 0 arrives on at every fill, announcing the bytes of the fill's TMA loads; every
// thread waits on it before the step's barrier. One barrier per step. `Rows` tiles are in
// ptx.cuh's 128-byte swizzle, read by wgmma from shared memory; a `Columns` tile is its K
// lines in the same swizzle, in two halves of 64 rows (columns_slot), which is wgmma's
// MN-major A (imm-trans-a), read from shared memory too.
//
// Launched in clusters (of 2), the blocks of a cluster share B's tiles: Schedule gives a
// cluster's blocks tiles whose B rows are the same, and each block loads its part of B's rows
// by TMA into every block of the cluster (multicast), so that L2 serves each B tile once per
// cluster. The step's barrier is then the cluster's: a block refills a stage in its peers only
// once they are done reading it. A B without a tensor map is loaded by each block whole.
#pragma once
#include "compat.cuh"
#include "dtype.cuh"
#include "ptx.cuh"
#include "../params/gemm.h"

namespace wgmma {

constexpr int kBM = FK_WGMMA_TILE_M, kBN = FK_WGMMA_TILE_N, kBK = 64, kStages = FK_WGMMA_STAGES,
              kThreads = FK_WGMMA_THREADS;
static_assert(kBM == 128 && kBN == 256 && kThreads == 256, "two warpgroups of m64n256");
static_assert(kBK == 64, "mma_step spells out four k16 wgmmas");
static_assert(kStages >= 3, "a stage in flight, one being refilled, one being read");

// One stage: A's tile, then kBN swizzled rows of B, each row 64 elements (128 bytes) as eight
// 16-byte chunks. A `Rows` A is kBM such rows; a `Columns` A is two halves of 64 of the
// tile's rows, each 64 lines (one per K) of 128 bytes in the same swizzle (columns_slot):
// the same 16 KB. Both tiles are multiples of 1024 bytes, so every tile stays 1024-byte
// aligned.
struct Stage {
  uint4 a[kBM * 8];
  uint4 b[kBN * 8];
};
static_assert(sizeof(Stage::a) % 1024 == 0 && sizeof(Stage) % 1024 == 0, "1024-byte aligned tiles");
// After the stages (and a side product's tiles, Side), each stage's mbarrier.
static_assert(FK_WGMMA_SMEM_BYTES == kStages * sizeof(Stage) + 64 + 1024, "params/gemm.h's size");
static_assert(FK_WGMMA_SIDE_SMEM_BYTES == FK_WGMMA_SMEM_BYTES + kStages * FK_WGMMA_SIDE_ROWS * 128, "params/gemm.h's size");
static_assert(kStages * 8 <= 64, "the stages' mbarriers fit in 64 bytes");

using Accumulators = float[kBN / 2];

// The largest of its arguments, at compile time.
template <class... I>
__host__ __device__ constexpr int largest(int first, I... rest) {
  ((first = rest > first ? rest : first), ...);
  return first;
}

// The distance between an operand's k16 slices in a stage: 32 bytes along a K-major row, two
// 1024-byte atoms of 8 K lines in an MN-major chunk.
template <bool kMnMajor>
constexpr int kSliceBytes = kMnMajor ? 2048 : 32;

// Chunk `chunk` (8 elements along K) of row `row` in a swizzled tile.
FK_DEVICE int swizzled(int row, int chunk) { return row * 8 + (chunk ^ (row & 7)); }

// The element slot of (K line k, tile row m) in a `Columns` tile: the chunk of 64 rows m is in,
// then line k of it, swizzled (a TMA box of 64 × 64 lands so): each chunk is the PTX ISA's
// canonical MN-major layout with the 128-byte swizzle, 8 K lines an atom, atoms 1024 bytes
// apart, chunks FK_WGMMA_MN_CHUNK_BYTES (the descriptor's LBO).
FK_DEVICE int columns_slot(int k, int m) { return swizzled(64 * (m / 64) + k, (m % 64) / 8) * 8 + m % 8; }

// An operand's matrix: the tile's rows [row0, row0 + tile rows) of `rows`, K `k_len` long, zero
// outside; its lines (rows or columns, per the operand) `ld` elements apart. Loaded by TMA
// where the host encoded `map` (the same matrix: its lines `rows` or `k_len` long, boxes of
// 64 along them, 128-byte swizzle, zeros outside), else by cp.async in 16-byte runs when
// `fast` (prepare()), element by element otherwise.
template <typename T>
struct Matrix {
  const T* ptr;
  uint64_t ld;
  uint32_t row0;
  uint32_t rows;
  uint32_t k_len;
  const FkTensorMap* map = nullptr;
  bool fast = false;

  FK_DEVICE void prepare() { fast = runs_of_8(ptr, ld); }
  template <int kRows>
  FK_DEVICE void finish(uint4*, uint32_t) {}
  // The bytes a fill's TMA loads bring.
  template <int kRows>
  FK_DEVICE uint32_t tma_bytes() const { return map ? kRows * kBK * 2 : 0; }
};

// An operand of K-contiguous rows: element (row, k) at ptr[row · ld + k]. Loaded into the
// 128-byte swizzle, by TMA in one box of 64 × kRows, or (B shared by `sharers` blocks of a
// cluster) in one box of 64 × kRows / sharers multicast to all of them.
template <typename T>
struct Rows : Matrix<T> {
  static constexpr bool kMnMajor = false;
  static constexpr bool kMulticasts = true;  // as B, shared by a cluster when it has a map

  // Starts loading K [k0, k0 + 64) of the block's rows into `tile` (kRows rows), counted off
  // `bar` when by TMA (this block's part of the rows, into all `sharers`, when shared). Through
  // cp.async a thread always takes the same chunk of rows 32 apart, rows whose swizzle is the
  // same: one address computation, then a stride per row.
  template <int kRows>
  FK_DEVICE void issue(uint4* tile, uint32_t k0, uint64_t* bar, uint32_t sharers) const {
    const auto& [ptr, ld, row0, rows, k_len, map, fast] = static_cast<const Matrix<T>&>(*this);
    if (map) {
      if (threadIdx.x == 0) {
        if (sharers == 1) {
          tma_load_2d(tile, map, int32_t(k0), int32_t(row0), bar);
        } else {
          const uint32_t part = kRows / sharers, rank = cluster_ctarank();
          tma_load_2d_multicast(tile + rank * part * 8, map, int32_t(k0), int32_t(row0 + rank * part), bar,
                                uint16_t((1u << sharers) - 1));
        }
      }
      return;
    }
    // A tile of fewer than 32 rows (a side tile, Side) takes the threads of its rows only.
    constexpr int kPasses = (kRows + 31) / 32;
    const int chunk = threadIdx.x % 8, row = threadIdx.x / 8;
    if (kRows < 32 && row >= kRows) return;
    const uint32_t k = k0 + chunk * 8, valid = k < k_len ? min(8u, k_len - k) : 0u;
    uint4* dst = &tile[swizzled(row, chunk)];
    if (fast) {
      const T* src = ptr + uint64_t(row0 + row) * ld + k;
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const bool in = valid && row0 + row + 32 * i < rows;
        cp_async_zfill16(dst + 32 * 8 * i, in ? src + 32 * i * ld : ptr, in ? int(valid) * 2 : 0);
      }
      return;
    }
#pragma unroll 1
    for (int i = 0; i < kPasses; ++i) {
      const uint32_t r = row0 + row + 32 * i;
      uint16_t v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = r < rows && j < int(valid) ? bits16(ptr[uint64_t(r) * ld + k + j]) : uint16_t(0);
      dst[32 * 8 * i] = make_uint4(v[0] | uint32_t(v[1]) << 16, v[2] | uint32_t(v[3]) << 16, v[4] | uint32_t(v[5]) << 16,
                                   v[6] | uint32_t(v[7]) << 16);
    }
  }
};

// An operand whose element (row, k) is ptr[k · ld + row]: its lines run along the tile's rows
// (A's rows, B's columns). Loaded into chunks of 64 of the tile's rows (columns_slot), by TMA
// in a box of 64 × 64 a chunk: wgmma's MN-major A or B (imm-trans).
template <typename T>
struct Columns : Matrix<T> {
  static constexpr bool kMnMajor = true;
  static constexpr bool kMulticasts = false;  // as B, each block loads its own

  template <int kRows>
  static constexpr int kChunks = kRows / 64;
  template <int kRows>
  FK_DEVICE uint32_t tma_bytes() const { return this->map ? kChunks<kRows> * FK_WGMMA_MN_CHUNK_BYTES : 0; }

  // Starts loading K [k0, k0 + 64): through cp.async the threads take runs of 8 rows of K
  // lines, as many lines at a time (kLines, a multiple of 8: the same swizzle) as the tile's
  // runs leave threads for: one address computation, then a stride per pass. Never shared.
  template <int kRows>
  FK_DEVICE void issue(uint4* tile, uint32_t k0, uint64_t* bar, uint32_t) const {
    static_assert(kRows % 64 == 0, "whole chunks of 64 rows");
    const auto& [ptr, ld, row0, rows, k_len, map, fast] = static_cast<const Matrix<T>&>(*this);
    if (map) {
      if (threadIdx.x == 0)
        for (int c = 0; c < kChunks<kRows>; ++c)
          tma_load_2d(tile + c * 64 * 8, map, int32_t(row0) + 64 * c, int32_t(k0), bar);
      return;
    }
    constexpr int kRuns = kRows / 8, kLines = kThreads / kRuns, kPasses = (kBK + kLines - 1) / kLines;
    static_assert(kLines % 8 == 0, "passes kLines apart keep each line's swizzle");
    const int run = threadIdx.x % kRuns, kk = threadIdx.x / kRuns;
    const uint32_t r = row0 + run * 8, valid = r < rows ? min(8u, rows - r) : 0u;
    uint16_t* const first = reinterpret_cast<uint16_t*>(tile) + columns_slot(kk, run * 8);
    const T* const src = ptr + uint64_t(k0 + kk) * ld + r;
    if (fast) {
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const uint32_t n = k0 + kk + kLines * i < k_len ? valid : 0u;
        cp_async_zfill16(first + kLines * 64 * i, n ? src + uint64_t(kLines) * i * ld : ptr, int(n) * 2);
      }
      return;
    }
#pragma unroll 1
    for (int i = 0; i < kPasses; ++i) {
      const uint32_t k = k0 + kk + kLines * i, n = k < k_len ? valid : 0u;
      uint16_t* dst = first + kLines * 64 * i;
#pragma unroll
      for (int j = 0; j < 8; ++j) dst[j] = j < int(n) ? bits16(ptr[uint64_t(k) * ld + r + j]) : uint16_t(0);
    }
  }
};

// A segment with no side product. The interface a side product offers run_tiles: a stage's
// side tile of kLines lines (filled as an operand's: issue, finish, tma_bytes), kExtraBytes
// of shared memory of its own past the side tiles (prepare), ahead(origin) then start(origin)
// before each tile's first step (ahead, for loads into registers, before the tile before is
// stored, so that their round trip overlaps the store; start with no wgmma in flight and
// that store done), mma() beside each step's wgmmas, waited() once the step's wait has let
// the previous step's go, flush() with the tile's wgmmas waited out (before run_tiles'
// `done`).
struct NoSide {
  static constexpr int kLines = 0;
  static constexpr int kExtraBytes = 0;
  FK_DEVICE void prepare(unsigned char*) {}
  FK_DEVICE void issue(uint4*, uint32_t, uint64_t*, bool) const {}
  FK_DEVICE void finish(uint4*, uint32_t, bool) {}
  FK_DEVICE uint32_t tma_bytes(bool) const { return 0; }
  FK_DEVICE void ahead(uint2) {}
  FK_DEVICE void start(uint2) {}
  FK_DEVICE void waited() {}
  FK_DEVICE void flush() {}
};

// A segment's side product: beside each step's four wgmmas, A's (K-major) slices times the
// stage's side tile, kN K-contiguous rows of `b` (`Rows`, kN ≤ FK_WGMMA_SIDE_ROWS), into `acc`,
// kN / 2 accumulators a thread in ptx.cuh's layout at N = kN. `b` stays where the caller put it
// (row0): every tile multiplies the same rows, so the product depends on A's rows alone, and a
// tile whose A rows are those of the block's tile before it (Schedule::same_a: the next
// column tile of a run, or of a grid smaller than a row of tiles) keeps the product that
// tile made: `fresh` false, its side loads and wgmmas are skipped. The caller owns acc:
// zeroes it before a fresh tile's first step, leaves it as it is before a kept one, and reads
// it once a tile's wgmmas are waited out. The LoRA forward's u = x Aᵀ from the sweep of x
// that y's GEMM makes, and the backward's v = dY B from dX's sweep of dY (lora.cu;
// bench/NOTES.md).
template <class OperandB, int kN>
struct Side {
  static_assert(!OperandB::kMnMajor, "a side tile of K-contiguous rows");
  static constexpr int kLines = kN;
  static constexpr int kExtraBytes = 0;
  OperandB b;
  float (&acc)[kN / 2];

  FK_DEVICE void prepare(unsigned char*) { b.prepare(); }
  FK_DEVICE void ahead(uint2) {}
  FK_DEVICE void start(uint2) {}
  FK_DEVICE void waited() {}
  FK_DEVICE void flush() {}
  FK_DEVICE void issue(uint4* tile, uint32_t k0, uint64_t* bar, bool fresh) const {
    if (fresh) b.template issue<kN>(tile, k0, bar, 1);
  }
  FK_DEVICE void finish(uint4* tile, uint32_t k0, bool fresh) {
    if (fresh) b.template finish<kN>(tile, k0);
  }
  FK_DEVICE uint32_t tma_bytes(bool fresh) const { return fresh ? b.template tma_bytes<kN>() : 0u; }
  // A's k16 slice j at a + j · slice (this warpgroup's rows of the stage `st`, whose step is
  // at k0), the side tile's 32 bytes apart.
  template <typename T>
  FK_DEVICE void mma(const Stage&, const char* a, int slice, const uint4* tile, bool fresh, uint32_t) {
    if (!fresh) return;
    const char* b = reinterpret_cast<const char*>(tile);
    wgmma_m64nNk16<T, kN>(acc, a, b);
    wgmma_m64nNk16<T, kN>(acc, a + slice, b + 32);
    wgmma_m64nNk16<T, kN>(acc, a + 2 * slice, b + 64);
    wgmma_m64nNk16<T, kN>(acc, a + 3 * slice, b + 96);
  }
};

// An A operand in registers (the tag of FromRegisters).
struct RegisterOperand {};

// A K range: A's and B's share K, A's `k_len` long. A: Rows, Columns or another operand of
// the same interface (prepare, issue, finish, tma_bytes, k_len, kMnMajor, kMulticasts), or
// FromRegisters; B: Rows, Columns or the like, and optionally a side product of A (Side).
// issue()'s `sharers`: the blocks of the cluster that share the tile (1 for A and a side's
// tile), each loading a part for all where the operand can. run_tiles takes any struct with
// Segment's members as a segment (lora.cu's DaSteps: steps of its own after a tile's others).
template <class OperandA, class OperandB, class SideProduct = NoSide>
struct Segment {
  using A = OperandA;
  using B = OperandB;
  using S = SideProduct;
  static constexpr bool kPlain = std::is_same<S, NoSide>::value && !std::is_base_of<RegisterOperand, A>::value;
  A a;
  B b;
  S side;
  FK_DEVICE int steps() const { return int((a.k_len + kBK - 1) / kBK); }
  // At the tile at origin o (A's first row, B's first row).
  FK_DEVICE void place(uint2 o) { a.row0 = o.x, b.row0 = o.y; }
  // Step `st`'s wgmmas (run_tiles, where a segment is not plain; the step at k0 of the
  // segment): mma_step's, with the side product's beside them where `fresh`, or A's own step
  // from registers.
  template <typename T, bool kMnMajorA, bool kMnMajorB>
  FK_DEVICE void mma(Accumulators& acc, const Stage& st, const uint4* side_tile, bool fresh, uint32_t k0);
};

template <class A, class B>
FK_DEVICE Segment<A, B> segment(const A& a, const B& b) {
  return {a, b, {}};
}

template <class A, class B, class S>
FK_DEVICE Segment<A, B, S> segment(const A& a, const B& b, const S& side) {
  return {a, b, side};
}

// Issues one step's four wgmmas from `st` (and `side`'s beside them: side(a, slice) with A's
// first slice and the slices' stride), leaves them in flight and waits out the previous
// step's. An operand's k16 slices (kSliceBytes) are 32 bytes apart along its rows (K-major)
// or 2 KB apart, two 1024-byte atoms of 8 K lines (MN-major).
template <typename T, bool kMnMajorA, bool kMnMajorB, class SideMma>
FK_DEVICE void mma_step(Accumulators& acc, const Stage& st, SideMma side) {
  const int half = threadIdx.x / 128;  // this warpgroup's 64 rows of A
  constexpr int kA = kSliceBytes<kMnMajorA>, kB = kSliceBytes<kMnMajorB>;
  wgmma_fence();
  // Spelled out, not a loop: nvcc may keep a loop over four 128-operand asm statements, and
  // the accumulators' copies between its iterations make ptxas serialize every wgmma.
  const char* a = reinterpret_cast<const char*>(&st.a[half * 64 * 8]);
  const char* b = reinterpret_cast<const char*>(st.b);
  wgmma_m64n256k16<T, kMnMajorA, kMnMajorB>(acc, a, b);
  wgmma_m64n256k16<T, kMnMajorA, kMnMajorB>(acc, a + kA, b + kB);
  wgmma_m64n256k16<T, kMnMajorA, kMnMajorB>(acc, a + 2 * kA, b + 2 * kB);
  wgmma_m64n256k16<T, kMnMajorA, kMnMajorB>(acc, a + 3 * kA, b + 3 * kB);
  side(a, kA);
  wgmma_commit();
  wgmma_wait<1>();
}

// A segment's A: `scale` · acc rounded to T, the caller's accumulators of a side product
// (kN / 2 a thread: this warp's 16 rows of the warpgroup's 64 by kN columns, ptx.cuh's
// layout), K = kN, zeros past `k_len`: one step, whose B is the segment's tile of kN columns
// and more (zero past k_len). The step waits out every wgmma in flight first, so it comes
// after the side product's last (the LoRA forward's step y += scale·u · Bᵀ, with u just made
// by the base segment's side product and never in memory). The accumulator layout at N = kN
// is, k16 slice by slice, the A fragment layout of an RS wgmma: slice j's fragment is
// acc[8j .. 8j + 8) paired in order. `frag` keeps the fragments until the step's wait. (The
// LoRA backward's dX += scale·v · A likewise, v made beside dY W, A an MN-major B.)
template <typename T, int kN>
struct FromRegisters : RegisterOperand {
  static constexpr bool kMnMajor = false;
  static constexpr bool kMulticasts = false;  // an A operand
  float (&acc)[kN / 2];
  float scale;
  uint32_t k_len;
  uint32_t row0 = 0;  // set by Schedule::place; the registers are the tile's rows already
  uint32_t frag[kN / 16][4] = {};

  FK_DEVICE void prepare() {}
  template <int kRows>
  FK_DEVICE void issue(uint4*, uint32_t, uint64_t*, uint32_t) const {}
  template <int kRows>
  FK_DEVICE void finish(uint4*, uint32_t) {}
  template <int kRows>
  FK_DEVICE uint32_t tma_bytes() const { return 0; }

  template <bool kMnMajorB>
  FK_DEVICE void mma(Accumulators& d, const Stage& st) {
    wgmma_wait<0>();
    wgmma_hold(acc);
#pragma unroll
    for (int j = 0; j < kN / 16; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) frag[j][i] = pack2<T>(scale * acc[8 * j + 2 * i], scale * acc[8 * j + 2 * i + 1]);
    wgmma_fence();
    const char* b = reinterpret_cast<const char*>(st.b);
#pragma unroll
    for (int j = 0; j < kN / 16; ++j) wgmma_m64n256k16_rs<T, kMnMajorB>(d, frag[j], b + kSliceBytes<kMnMajorB> * j);
    wgmma_commit();
    wgmma_wait<1>();
  }
};

template <class A, class B, class S>
template <typename T, bool kMnMajorA, bool kMnMajorB>
FK_DEVICE void Segment<A, B, S>::mma(Accumulators& acc, const Stage& st, const uint4* side_tile, bool fresh, uint32_t k0) {
  if constexpr (std::is_base_of<RegisterOperand, A>::value) {
    a.template mma<kMnMajorB>(acc, st);
  } else if constexpr (std::is_same<S, NoSide>::value) {
    mma_step<T, kMnMajorA, kMnMajorB>(acc, st, [](const char*, int) {});
  } else {
    static_assert(!kMnMajorA, "a side product of a K-major A");
    mma_step<T, kMnMajorA, kMnMajorB>(acc, st, [&](const char* a_slice, int slice) {
      side.template mma<T>(st, a_slice, slice, side_tile, fresh, k0);
    });
    side.waited();
  }
}

// Calls f(segment, k0) for the segment step kt belongs to (a segment's steps start at
// first[s]), k0 its K offset there.
template <class F, class... Segs>
FK_DEVICE void at_step(int kt, const int* first, F f, Segs&... segs) {
  int s = 0;
  ((kt >= first[s] && kt < first[s + 1] ? f(segs, uint32_t(kt - first[s]) * kBK) : void(), ++s), ...);
}

// Starts (issue(), kFinish false) or finishes (finish()) filling `st` (and `side_tile`, for a
// segment's side product where the tile is `fresh`) with step kt; starting, thread 0 arrives
// on the stage's barrier `full` with the bytes TMA will bring (B's whole tile, when the
// cluster's `sharers` blocks each bring a part).
template <bool kFinish, class... Segs>
FK_DEVICE void fill(Stage& st, uint4* side_tile, bool fresh, uint64_t* full, uint32_t sharers, int kt, const int* first,
                    Segs&... segs) {
  at_step(kt, first, [&](auto& seg, uint32_t k0) {
    if constexpr (kFinish) {
      seg.a.template finish<kBM>(st.a, k0);
      seg.b.template finish<kBN>(st.b, k0);
      seg.side.finish(side_tile, k0, fresh);
    } else {
      if (threadIdx.x == 0)
        mbarrier_arrive_expect_tx(full, seg.a.template tma_bytes<kBM>() + seg.b.template tma_bytes<kBN>() + seg.side.tma_bytes(fresh));
      seg.a.template issue<kBM>(st.a, k0, full, 1);
      seg.b.template issue<kBN>(st.b, k0, full, sharers);
      seg.side.issue(side_tile, k0, full, fresh);
    }
  }, segs...);
}

// The output tiles of a persistent launch (a 1-D grid, in clusters of c blocks or not): a grid
// of tile positions over A's `a_rows` (kBM a tile) and B's `b_rows` (kBN), walked B-fastest or
// A-fastest as a 2-D launch would have ordered its blocks, dealt out in turn to the launch's
// clusters; a cluster's c blocks take c neighbouring positions along A, so that they share B's
// tile (and may multicast it): a unit. A launch of a cluster per unit gives each block one tile.
// With runs (`longest_run` > 1, B-fastest only), what is dealt out is a run: consecutive B
// tiles of one A position, at most `longest_run` and at most an even share of the position's
// B tiles among the launch's clusters per A position (all of them if it has fewer clusters
// than A positions), so that a block walks its run's tiles one after another and may keep
// what they share (bench/NOTES.md, the forward's u inside its GEMM). Runs are dealt out in
// turn as units are: short runs keep the clusters at work together on few A positions (L2
// shares their A tiles), long ones share more along a run.
struct Schedule {
  uint32_t b_tiles, units_a, cluster, rank, first, stride, count, run, runs_per_a;
  bool b_fastest;

  FK_DEVICE Schedule(uint32_t a_rows, uint32_t b_rows, bool b_fastest_, uint32_t longest_run = 1)
      : b_tiles((b_rows + kBN - 1) / kBN), cluster(cluster_nctarank()), b_fastest(b_fastest_) {
    units_a = ((a_rows + kBM - 1) / kBM + cluster - 1) / cluster;
    rank = blockIdx.x % cluster;  // a 1-D grid in clusters of (c, 1, 1): the block's rank in its cluster
    first = blockIdx.x / cluster;
    stride = gridDim.x / cluster;
    if (longest_run > 1 && b_fastest) {
      const uint32_t split = max(1u, min(b_tiles, stride / max(units_a, 1u)));
      run = min(longest_run, (b_tiles + split - 1) / split);
      runs_per_a = (b_tiles + run - 1) / run;
      count = 0;
      for (uint32_t r = first; r < units_a * runs_per_a; r += stride) count += run_length(r);
    } else {
      run = 1;
      runs_per_a = b_tiles;
      const uint32_t units = units_a * b_tiles;
      count = first < units ? (units - first + stride - 1) / stride : 0;
    }
  }
  // The B tiles of run r (the last of an A position's runs may be short).
  FK_DEVICE uint32_t run_length(uint32_t r) const { return min(run, b_tiles - (r % runs_per_a) * run); }
  // Whether the block's tile i has the A rows of its tile i - 1 (a side product of them kept).
  FK_DEVICE bool same_a(int i) const { return i > 0 && origin(i).x == origin(i - 1).x; }
  // The block's tile i: (A's first row, B's first row).
  FK_DEVICE uint2 origin(int i) const {
    uint32_t ua, ub;
    if (run > 1) {
      uint32_t r = first, k = uint32_t(i);
      while (k >= run_length(r)) k -= run_length(r), r += stride;
      ua = r / runs_per_a;
      ub = (r % runs_per_a) * run + k;
    } else {
      const uint32_t u = first + uint32_t(i) * stride;
      ua = b_fastest ? u / b_tiles : u % units_a;
      ub = b_fastest ? u % b_tiles : u / units_a;
    }
    return make_uint2((ua * cluster + rank) * kBM, ub * kBN);
  }
  // Points the segments' operands at tile i.
  template <class... Segs>
  FK_DEVICE void place(int i, Segs&... segs) const {
    const uint2 o = origin(i);
    (segs.place(o), ...);
  }
};

// Where an epilogue may stage the output tile in shared memory while the next tile's first
// loads are in flight: the B parts (32 KB each: half a tile of 16-bit elements) of the two
// stages that no load is filling after a tile's last step, and 16 KB (A's part of one) for a
// table of kBN floats.
struct Staging {
  void* half[2];
  float* table;
};

// For each of the block's tiles (`tiles`: count, place), acc += the segments' products, in
// order (every segment's A of one layout: K- or MN-major), then done(i, acc, staging) with the
// tile's wgmmas waited out. The pipeline runs on across tiles: the next tile's first loads
// are in flight while `done` stores this one. acc starts tile 0 from its values in (zeros, a
// previous run's), every later tile from zeros. `smem`: FK_WGMMA_SMEM_BYTES of dynamic shared
// memory. Ends with every wgmma waited out and a barrier (smem is free again: every load into
// it, a peer's too, has landed).
template <typename T, class Tiles, class Done, class... Segs>
FK_DEVICE void run_tiles(Accumulators& acc, unsigned char* smem, const Tiles& tiles, Done done, Segs&... segs) {
  constexpr bool kMnMajorA = (Segs::A::kMnMajor && ...), kMnMajorB = (Segs::B::kMnMajor && ...);
  static_assert(((Segs::A::kMnMajor == kMnMajorA) && ...), "one layout of A per run");
  static_assert(((Segs::B::kMnMajor == kMnMajorB) && ...), "one layout of B per run");
  // Segments with a side product or an A in registers take their own steps (Segment::mma).
  constexpr bool kPlain = (Segs::kPlain && ...);
  // The side products' tiles, a stage's each, after the stages (FK_WGMMA_SIDE_SMEM_BYTES), then
  // their own shared memory (kExtraBytes: FK_WGMMA_SIDE_ACROSS_SMEM_BYTES in all, lora.cu's
  // DxSides).
  constexpr int kSideLines = largest(0, Segs::S::kLines...), kExtraBytes = largest(0, Segs::S::kExtraBytes...);
  static_assert(kSideLines <= FK_WGMMA_SIDE_ROWS && kSideLines % 8 == 0, "side tiles of whole 1024-byte groups");
  static_assert(kExtraBytes % 1024 == 0, "the side's own shared memory stays 1024-byte aligned");
#if FK_PTX && !FK_HAS_WGMMA
  // Below sm_90a the entries trap (Device::has_wgmma keeps them off those GPUs): no body to
  // compile there, nor to spill.
  __trap();
  return;
#endif
  wgmma_hold(acc);  // the accumulators' values in (zeros, a previous run's) set before any wgmma
  Stage* stages = reinterpret_cast<Stage*>(smem + shared_align_1024(smem));
  uint4* side_tiles = reinterpret_cast<uint4*>(stages + kStages);  // kSideLines lines of 8 chunks a stage
  unsigned char* extra = reinterpret_cast<unsigned char*>(side_tiles + kStages * kSideLines * 8);
  uint64_t* full = reinterpret_cast<uint64_t*>(extra + kExtraBytes);
  // Blocks sharing B's tiles: the cluster's, where every B can multicast (an NF4 weight as B,
  // decoded by each block, carries none, so such a GEMM is never launched in clusters; as A,
  // in dX's GEMM, it is each block's own, beside a B that multicasts).
  constexpr bool kMulticasts = (Segs::B::kMulticasts && ...);
  const uint32_t sharers = kMulticasts ? cluster_nctarank() : 1;
  auto sync = [sharers] { sharers > 1 ? cluster_sync() : __syncthreads(); };
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) mbarrier_init(&full[s], 1);
    fence_mbarrier_init();
  }
  int first[sizeof...(Segs) + 1] = {0};
  {
    int s = 0;
    ((segs.a.prepare(), segs.b.prepare(), segs.side.prepare(extra), first[s + 1] = first[s] + segs.steps(), ++s), ...);
  }
  if (tiles.count > 0) {
    const uint2 o = tiles.origin(0);
    ((segs.side.ahead(o), segs.side.start(o)), ...);
  }
  // Global step g is step g % steps of the block's tile g / steps.
  const int steps = first[sizeof...(Segs)], total = int(tiles.count) * steps;
  fence_proxy_async_shared();  // the caller's generic accesses to smem come before TMA's writes
  sync();                      // and the barriers are initialized, in every block loads land in
  // Fills come in order of g, each issued then finished before the next is issued: the
  // operands move to a tile at its first step's issue and stay there through its last fill.
  auto side_tile = [&](int g) { return side_tiles + (g % kStages) * kSideLines * 8; };
  // Whether step g's tile makes its side products anew (Side: not where it keeps its last tile's).
  auto fresh = [&](int g) {
    if constexpr (kSideLines == 0) return true;
    return !tiles.same_a(g / steps);
  };
  auto issue = [&](int g) {
    if (g % steps == 0) tiles.place(g / steps, segs...);
    fill<false>(stages[g % kStages], side_tile(g), fresh(g), &full[g % kStages], sharers, g % steps, first, segs...);
  };
  auto finish = [&](int g) {
    fill<true>(stages[g % kStages], side_tile(g), fresh(g), &full[g % kStages], sharers, g % steps, first, segs...);
  };
  for (int g = 0; g < kStages - 2; ++g) {
    if (g < total) {
      issue(g);
      finish(g);
    }
    cp_async_commit();
  }
  for (int g = 0; g < total; ++g) {
    cp_async_wait<kStages - 3>();                             // this thread's copies for step g have landed,
    mbarrier_wait(&full[g % kStages], (g / kStages) % 2);  // and the TMA loads
    fence_proxy_async_shared();  // this thread's stores into the stage are visible to wgmma
    sync();                      // everyone's are; step g - 2's wgmmas are done, in every block
    const bool refill = g + kStages - 2 < total;
    if (refill) issue(g + kStages - 2);
    cp_async_commit();
    if constexpr (kPlain) {
      mma_step<T, kMnMajorA, kMnMajorB>(acc, stages[g % kStages], [](const char*, int) {});
    } else {
      const bool side_fresh = fresh(g);
      at_step(g % steps, first,
              [&](auto& seg, uint32_t k0) {
                seg.template mma<T, kMnMajorA, kMnMajorB>(acc, stages[g % kStages], side_tile(g), side_fresh, k0);
              },
              segs...);
    }
    if (refill) finish(g + kStages - 2);
    if (g % steps == steps - 1) {
      wgmma_wait<0>();
      wgmma_hold(acc);
      (segs.side.flush(), ...);
      const bool more = g + 1 < total;
      const uint2 next = more ? tiles.origin(g / steps + 1) : make_uint2(0, 0);
      if (more) (segs.side.ahead(next), ...);
      __syncthreads();  // both warpgroups' wgmmas are done with stage g
      // Steps g + 1 .. g + kStages - 2 are in flight; stages g and g - 1 are read out and
      // refilled only after the next step's barrier, which every thread reaches done with them.
      Stage& s0 = stages[g % kStages];
      Stage& s1 = stages[(g + kStages - 1) % kStages];
      done(g / steps, acc, Staging{{s0.b, s1.b}, reinterpret_cast<float*>(s0.a)});
      if (more) {
#pragma unroll
        for (int i = 0; i < kBN / 2; ++i) acc[i] = 0.0f;
        wgmma_hold(acc);
        (segs.side.start(next), ...);  // no wgmma in flight: all waited out above
      }
    }
  }
  wgmma_wait<0>();
  wgmma_hold(acc);
  cp_async_wait<0>();
  // Every wait on the barriers is done, in both blocks of a cluster: they may go, and no
  // partner's multicast still aims at this block's shared memory when it exits.
  sync();
  if (threadIdx.x == 0)
    for (int s = 0; s < kStages; ++s) mbarrier_inval(&full[s]);
}

// Calls f(row, col, v0, v1) for each pair of accumulators this thread holds (by reference),
// (row, col) and (row, col + 1) in tile coordinates (ptx.cuh's accumulator layout).
template <int N, class F>
FK_DEVICE void for_each_pair(float (&acc)[N], F f) {
  const int lane = threadIdx.x % 32, row = (threadIdx.x / 32) * 16 + lane / 4;  // warps 0-7 in order
#pragma unroll
  for (int j = 0; j < N; j += 2) f(row + 8 * ((j % 4) / 2), 8 * (j / 4) + 2 * (lane % 4), acc[j], acc[j + 1]);
}

// Calls f(row, col, value) for each accumulator this thread holds (by reference).
template <class F>
FK_DEVICE void for_each(Accumulators& acc, F f) {
  for_each_pair(acc, [&](int r, int c, float& v0, float& v1) {
    f(r, c, v0);
    f(r, c + 1, v1);
  });
}

// The slot of element (row, col) of an output tile staged in shared memory, kCols to a row:
// each run of 8 16-byte chunks (128 bytes) swizzled as the operand tiles are, so that a warp's
// stores from the accumulators (8 rows at once; 4 of the transposed tile) and its 16-byte reads
// along a row meet each bank once.
template <int kCols>
FK_DEVICE int staged_slot(int row, int col) {
  const int chunk = col / 8;
  // The row split at 8: what a walk adds to a row (multiples of 8) then folds into an
  // address's immediate offset (as row * kCols, ptxas held one address per row: 255 registers).
  // The chunk's multiple of 8 added, not ORed, likewise: written with `|`, ptxas took 255
  // registers in the kernels whose store has no bias (the dX kernels that make v, NF4's GEMM).
  return (row & ~7) * kCols + (row & 7) * kCols + (chunk & ~7) * 8 + ((chunk ^ row) & 7) * 8 + col % 8;
}

// Stores the tile (+ bias[column]), rounded to T, at out[row0 + i][col0 + j] for row0 + i < rows,
// col0 + j < cols (out's rows `ld` elements apart); transposed (dXᵀ's tile for dX, which has
// no bias: `bias` is the untransposed tiles' only): acc(r, c) at out[row0 + c][col0 + r].
// Through shared memory (`staging`: the tile's first and second half of its rows, the bias in
// its table), so that global memory sees whole 16-byte runs of a row, a warp's a contiguous
// 512 bytes, where out allows (runs_of_8; a run cut by `cols` is stored element by element).
// The accumulators' own layout would store 2 bytes a thread, 8 rows (4 transposed) an
// instruction: 8 partly written sectors per instruction, and a bias load before each
// element's store (bias may alias out).
template <typename T, bool kTransposed>
FK_DEVICE void store_tile(Accumulators& acc, const Staging& staging, T* out, uint64_t ld, uint32_t row0, uint32_t col0,
                          uint32_t rows, uint32_t cols, const T* bias = nullptr) {
  constexpr int kRows = kTransposed ? kBN : kBM, kCols = kTransposed ? kBM : kBN, kHalf = kRows / 2;
  static_assert(sizeof(T) == 2, "16-bit outputs: a pair of columns is one 32-bit store");
  static_assert(kHalf * kCols * sizeof(T) == sizeof(Stage::b) && kCols * sizeof(float) <= sizeof(Stage::a),
                "half the tile fills a stage's B part, the bias table fits its A part");
  static_assert(kHalf % 8 == 0, "a half keeps each row's swizzle");
  T* const first = static_cast<T*>(staging.half[0]);
  T* const second = static_cast<T*>(staging.half[1]);
  // Element (row, col)'s slot: the row's half (constant per accumulator, unrolled), then its
  // place in it. (A select, not an array of the two: indexed at run time, that goes to the stack.)
  auto slot = [&](int row, int col) -> T* { return (row < kHalf ? first : second) + staged_slot<kCols>(row % kHalf, col); };
  float* column_bias = staging.table;
  if (!kTransposed && bias) {
    for (int c = threadIdx.x; c < kCols; c += kThreads) column_bias[c] = col0 + c < cols ? to_f32(bias[col0 + c]) : 0.0f;
    __syncthreads();
  }
  auto pack = [](float v0, float v1) { return uint32_t(bits16(from_f32<T>(v0))) | uint32_t(bits16(from_f32<T>(v1))) << 16; };
  if constexpr (kTransposed) {
    // The warp's 8 × 8 blocks of acc, four at a time, transposed into the staged rows by
    // stmatrix.trans: acc(r, c) lands at slot(c, r). A block starts at a multiple of 8 both
    // ways, so each of its staged rows gets one 16-byte chunk, and the swizzle puts the
    // block's 8 rows in 8 different banks. (Element by element, these reads of acc inside
    // run_tiles' loop made ptxas serialize every wgmma of the kernel: C7514.)
    const int lane = threadIdx.x % 32, warp_row = (threadIdx.x / 32) * 16, m = lane / 8;
#pragma unroll
    for (int j = 0; j < kBN / 2; j += 8) {
      // acc[j + 2b], acc[j + 2b + 1]: block b's fragment (the C layout of for_each_pair), its
      // rows the warp's half b % 2 and its columns the 8 of n tile j / 4 + b / 2.
      uint32_t q[4];
#pragma unroll
      for (int b = 0; b < 4; ++b) q[b] = pack(acc[j + 2 * b], acc[j + 2 * b + 1]);
      // This lane gives row lane % 8 of block m: the staged row of its column, at its rows.
      stmatrix_x4_trans(slot(2 * j + 8 * (m / 2) + lane % 8, warp_row + 8 * (m % 2)), q);
    }
  } else {
    for_each_pair(acc, [&](int r, int c, float v0, float v1) {
      if (bias) v0 += column_bias[c], v1 += column_bias[c + 1];
      *reinterpret_cast<uint32_t*>(slot(r, c)) = pack(v0, v1);
    });
  }
  __syncthreads();
  const bool whole_runs = runs_of_8(out, ld);
  for (int i = threadIdx.x; i < kRows * kCols / 8; i += kThreads) {
    const int row = i / (kCols / 8), col = i % (kCols / 8) * 8;
    if (row0 + row >= rows || col0 + col >= cols) continue;
    T* dst = out + uint64_t(row0 + row) * ld + col0 + col;
    const T* src = slot(row, col);
    if (whole_runs && col0 + col + 8 <= cols) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (uint32_t e = 0; e < 8 && col0 + col + e < cols; ++e) dst[e] = src[e];
    }
  }
}

}  // namespace wgmma
