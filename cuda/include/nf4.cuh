// nf4.cuh: NF4 primitives shared by the NF4 kernels: the code table, bitsandbytes' code
// choice (ties and NaN included), its 8-bit dynamic-map search, per-block absmax, and the
// weight as an operand of gemm.cuh's and wgmma.cuh's GEMMs.
// Reference: src/reference/nf4.rs.
#pragma once
#include "compat.cuh"
#include "dtype.cuh"
#include "gemm.cuh"
#include "ptx.cuh"
#include "wgmma.cuh"
#include "../params/nf4.h"

// bitsandbytes' NF4 table (create_normal_map), as f32.
__constant__ float kNf4Code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// The midpoints bitsandbytes' decision tree compares against, as f32, ascending.
__constant__ float kNf4Thresholds[15] = {
    -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
    -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
    0.1202552504837513f, 0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
    0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f};

// The code bitsandbytes picks for a normalized value: its tree tests `x > threshold` at
// each node, which is the number of thresholds strictly below x. Ties go to the lower
// code; NaN compares false everywhere and gets code 0.
FK_DEVICE uint8_t nf4_index(float x) {
  uint8_t q = 0;
#pragma unroll
  for (int i = 0; i < 15; ++i) q += x > kNf4Thresholds[i];
  return q;
}

// bitsandbytes' dQuantize<0>: binary search of a sorted 256-entry map, then the nearer of
// the two neighbours by its midpoint rules (which differ above and below the pivot).
FK_DEVICE uint8_t dynamic_index(const float* map, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = map[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = map[pivot];
  }
  if (upper_pivot == 255) upper = map[upper_pivot];
  if (lower_pivot == 0) lower = map[lower_pivot];
  if (x > val) {
    const float midpoint = (upper + val) * 0.5f;
    return static_cast<uint8_t>(x > midpoint ? upper_pivot : pivot);
  }
  const float midpoint = (lower + val) * 0.5f;
  return static_cast<uint8_t>(x < midpoint ? lower_pivot : pivot);
}

// The absmax of quantization block b: stored, or decoded from double quantization as
// bitsandbytes does (its fast-math multiply, then torch's IEEE add of the offset).
FK_DEVICE float nf4_absmax(const Nf4Weight& w, uint64_t b) {
  if (!w.nested) return w.absmax[b];
  return mul_ftz(w.nested_map[w.nested_codes[b]], w.nested_absmax[b / FK_NF4_NESTED_BLOCKSIZE]) + w.offset;
}

// Brings into L1 the global bytes nf4_absmax(w, b) reads (the nested map aside, which a
// kernel keeps in shared memory), so that a decode after other work finds them there.
FK_DEVICE void nf4_prefetch_absmax(const Nf4Weight& w, uint64_t b) {
  if (w.nested) {
    prefetch_l1(w.nested_codes + b);
    prefetch_l1(w.nested_absmax + b / FK_NF4_NESTED_BLOCKSIZE);
  } else {
    prefetch_l1(w.absmax + b);
  }
}

// The weight with its nested map in shared memory (absmax lookups by divergent index, no
// dependent global load), when nested. Call from every thread of the block.
FK_DEVICE Nf4Weight with_shared_map(Nf4Weight w) {
  FK_SHARED(map, float[256]);
  if (w.nested) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) map[i] = w.nested_map[i];
    __syncthreads();
    w.nested_map = map;
  }
  return w;
}

// The code table in shared memory (call from every thread of the block): lookups by
// divergent indices would serialize on the constant cache.
FK_DEVICE float* shared_code_table() {
  FK_SHARED(table, float[16]);
  if (threadIdx.x < 16) table[threadIdx.x] = kNf4Code[threadIdx.x];
  __syncthreads();
  return table;
}

// An element's value: code * absmax as bitsandbytes' kDequantizeBlockwise multiplies.
FK_DEVICE float nf4_value(const float* table, uint32_t code, float absmax) { return mul_ftz(table[code], absmax); }

// The 4-bit code of flattened element e (element 2i in the high nibble).
FK_DEVICE uint32_t nf4_code(const uint8_t* codes, uint64_t e) {
  const uint32_t byte = codes[e >> 1];
  return (e & 1) ? (byte & 0xF) : (byte >> 4);
}

// The N values (N ≤ 8) of N / 2 bytes of codes in one block, as they lie in memory (the first
// byte lowest; element 2i in byte i's high nibble).
template <int N>
FK_DEVICE void nf4_values(const float* table, uint32_t codes, float absmax, float* v) {
  static_assert(N % 2 == 0 && N <= 8, "bytes of one 32-bit word");
  for (int i = 0; i < N / 2; ++i) {
    const uint32_t byte = (codes >> (8 * i)) & 0xFF;
    v[2 * i] = nf4_value(table, byte >> 4, absmax);
    v[2 * i + 1] = nf4_value(table, byte & 0xF, absmax);
  }
}

// The 16 values of 8 bytes of codes in one block.
FK_DEVICE void nf4_values16(const float* table, uint2 codes, float absmax, float (&v)[16]) {
  nf4_values<8>(table, codes.x, absmax, v);
  nf4_values<8>(table, codes.y, absmax, v + 8);
}

// Ŵ of an NF4 weight as a GEMM operand (gemm.cuh): the forward's B (KContig: element
// (n, k) = Ŵ[n][k], a [kBN][kBK] tile) or the backward's (element (k, n) = Ŵ[k][n], a
// [kBK][kBN] tile). Either way the tile's stored rows are W rows and its columns W columns,
// and each thread dequantizes 16 consecutive elements of one W row.
template <typename T, bool KContig>
struct Nf4Source {
  Nf4Weight w;
  const float* table;  // kNf4Code in shared memory
  uint32_t mn0;        // the tile's origin along n
  uint2 codes = {0, 0};
  float absmax = 0.0f;
  bool valid = false;

  static constexpr int kRows = KContig ? gemm::kBN : gemm::kBK, kCols = KContig ? gemm::kBK : gemm::kBN;

  // When each 16-element run lies in one quantization block with its codes 8-byte aligned.
  FK_DEVICE bool fast() const { return w.cols % 16 == 0; }
  FK_DEVICE void origin(uint32_t k0, uint32_t* row0, uint32_t* col0) const {
    *row0 = KContig ? mn0 : k0;
    *col0 = KContig ? k0 : mn0;
  }
  FK_DEVICE void run_of_thread(int* row, int* col) const {
    *row = threadIdx.x / (kCols / 16);
    *col = (threadIdx.x % (kCols / 16)) * 16;
  }

  FK_DEVICE void issue(gemm::Tile<KContig, gemm::kBN>&, uint32_t k0) {
    if (!fast()) return;
    uint32_t row0, col0;
    origin(k0, &row0, &col0);
    int tr, tc;
    run_of_thread(&tr, &tc);
    const uint32_t row = row0 + tr, col = col0 + tc;
    valid = row < w.rows && col < w.cols;
    if (valid) {
      const uint64_t e = uint64_t(row) * w.cols + col;
      codes = *reinterpret_cast<const uint2*>(w.codes + e / 2);
      absmax = nf4_absmax(w, e / w.blocksize);
    }
  }

  FK_DEVICE void finish(gemm::Tile<KContig, gemm::kBN>& tile, uint32_t k0) {
    uint32_t row0, col0;
    origin(k0, &row0, &col0);
    if (fast()) {
      int tr, tc;
      run_of_thread(&tr, &tc);
      float v[16] = {};
      if (valid) nf4_values16(table, codes, absmax, v);
      store16(reinterpret_cast<T*>(&tile.data[tr][tc]), v);
      return;
    }
    for (int i = threadIdx.x; i < kRows * kCols; i += gemm::kThreads) {  // any shape
      const int tr = i / kCols, tc = i % kCols;
      const uint32_t row = row0 + tr, col = col0 + tc;
      unsigned short v = 0;
      if (row < w.rows && col < w.cols) {
        const uint64_t e = uint64_t(row) * w.cols + col;
        v = bits16(from_f32<T>(nf4_value(table, nf4_code(w.codes, e), nf4_absmax(w, e / w.blocksize))));
      }
      tile.data[tr][tc] = v;
    }
  }

  FK_DEVICE void pre_wait(uint32_t) {}
  FK_DEVICE void post_wait(gemm::Tile<KContig, gemm::kBN>&, uint32_t) {}
};

// Ŵ of an NF4 weight as a wgmma.cuh operand, in the same two layouts as Nf4Source's:
// `kAlongK` (the forward's B, as wgmma::Rows): element (row, k) = Ŵ[row][k], W rows are the
// tile's rows, in the 128-byte swizzle; otherwise (as wgmma::Columns: dXᵀ's A, or dX's B of
// kTile = kBN rows): element (row, k) = Ŵ[k][row], W rows are the `Columns` tile's K lines.
// issue() loads this thread's codes and absmaxes into registers; finish(), called once the
// step's wgmmas are issued, dequantizes them into the tile, so the loads are in flight while
// the wgmmas are issued and the dequantization overlaps the wgmmas. A thread takes runs of 16
// elements of W rows (kRuns of them), 4 (or 8) threads a row's 64 (or 128, or 256) elements.
template <typename T, bool kAlongK, int kTile = kAlongK ? wgmma::kBN : wgmma::kBM>
struct Nf4Operand {
  static constexpr bool kMnMajor = !kAlongK;  // as wgmma::Columns
  static constexpr bool kMulticasts = false;  // each block decodes its tile
  static constexpr int kWRows = kAlongK ? kTile : wgmma::kBK, kWCols = kAlongK ? wgmma::kBK : kTile;
  static constexpr int kRuns = kWRows * kWCols / 16 / wgmma::kThreads;

  Nf4Weight w;
  const float* table;  // kNf4Code in shared memory
  uint32_t row0;       // the tile's first row: a W row (kAlongK) or W column
  uint32_t k_len;      // W's columns (kAlongK) or rows
  bool fast = false;   // each run inside one quantization block, its codes 8-byte aligned
  int shift = 0;       // log2(blocksize)
  uint32_t valid = 0;  // bit j: run j is inside W
  uint2 codes[kRuns] = {};
  float absmax[kRuns] = {};

  FK_DEVICE void prepare() {
    fast = w.cols % 16 == 0;
    shift = __ffs(static_cast<int>(w.blocksize)) - 1;
  }
  // The tile's W origin for K offset k0.
  FK_DEVICE uint32_t w_row0(uint32_t k0) const { return kAlongK ? row0 : k0; }
  FK_DEVICE uint32_t w_col0(uint32_t k0) const { return kAlongK ? k0 : row0; }
  // Run j of this thread: its W row and column in the tile.
  FK_DEVICE static int run_row(int j) { return (threadIdx.x + wgmma::kThreads * j) / (kWCols / 16); }
  FK_DEVICE static int run_col(int j) { return (threadIdx.x + wgmma::kThreads * j) % (kWCols / 16) * 16; }
  // The tile's 16-bit slot of W's element (row, col) in the tile (two chunks: 8 contiguous).
  FK_DEVICE static int slot(int row, int col) {
    return kAlongK ? wgmma::swizzled(row, col / 8) * 8 + col % 8 : wgmma::columns_slot(row, col);
  }

  template <int kRows>
  FK_DEVICE uint32_t tma_bytes() const { return 0; }

  // Each block decodes its tile whole, shared in a cluster or not.
  template <int kRows>
  FK_DEVICE void issue(uint4*, uint32_t k0, uint64_t*, uint32_t) {
    if (!fast) return;
    valid = 0;
#pragma unroll
    for (int j = 0; j < kRuns; ++j) {
      const uint32_t row = w_row0(k0) + run_row(j), col = w_col0(k0) + run_col(j);
      if (row < w.rows && col < w.cols) {
        const uint64_t e = uint64_t(row) * w.cols + col;
        codes[j] = *reinterpret_cast<const uint2*>(w.codes + e / 2);
        absmax[j] = nf4_absmax(w, e >> shift);
        valid |= 1u << j;
      }
    }
  }

  template <int kRows>
  FK_DEVICE void finish(uint4* tile, uint32_t k0) {
    static_assert(kRows == kTile, "the tile's rows");
    uint16_t* slots = reinterpret_cast<uint16_t*>(tile);
    if (fast) {
#pragma unroll
      for (int j = 0; j < kRuns; ++j) {
        float v[16] = {};
        if ((valid >> j) & 1u) nf4_values16(table, codes[j], absmax[j], v);
        const int row = run_row(j), col = run_col(j);
        *reinterpret_cast<uint4*>(slots + slot(row, col)) = pack8<T>(v);
        *reinterpret_cast<uint4*>(slots + slot(row, col + 8)) = pack8<T>(v + 8);
      }
      return;
    }
    for (int i = threadIdx.x; i < kWRows * kWCols; i += wgmma::kThreads) {  // any shape
      const int r = i / kWCols, c = i % kWCols;
      const uint32_t row = w_row0(k0) + r, col = w_col0(k0) + c;
      uint16_t v = 0;
      if (row < w.rows && col < w.cols) {
        const uint64_t e = uint64_t(row) * w.cols + col;
        v = bits16(from_f32<T>(nf4_value(table, nf4_code(w.codes, e), nf4_absmax(w, e >> shift))));
      }
      slots[slot(r, c)] = v;
    }
  }
};
