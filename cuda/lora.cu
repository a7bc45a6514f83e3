// Fused LoRA layer kernels, forward and backward, over a dense (bf16/f16) or NF4 base,
// built on the tensor-core GEMM pieces of gemm.cuh. PEFT's layout and scaling; the math and
// what is saved are in cuda/params/lora.h. Reference: src/reference/lora.rs. Wrapper:
// src/lora/mod.rs. Tests: tests/lora_kernels.rs.
//
//   lora_down        u  = scale/(1-p) · (mask ⊙ x) Aᵀ      (narrow.cuh; split over K to fill
//                                                        two blocks per SM: + lora_down_reduce)
//   lora_down_k64    the same in steps of 64 along K, not 32: a variant the benchmarks set
//                    against lora_down (bench/NOTES.md), picked by LoraLinear::with_wide_down
//   lora_forward     y  = [u | x] · [B | W]ᵀ + bias      two K segments, one accumulator:
//                                                        no pass over y but the one writing it
//   lora_forward_wgmma  the same on Hopper's wgmma (wgmma.cuh; sm_90a only)
//   lora_forward_down{16,32}_wgmma  lora_down and lora_forward_wgmma in one kernel, u made
//                    beside y in the same sweep of x (rank ≤ 16 or 32, no dropout)
//   lora_backward_dx_wgmma  lora_backward_dx on wgmma, as dXᵀ = [A ; W]ᵀ · [v | dY]ᵀ
//                    (under dropout Wᵀ · dYᵀ alone, then lora_dx_fixup)
//   lora_backward_dx_v{16,32}_wgmma  lora_backward_v and lora_backward_dx_wgmma in one kernel,
//                    as dX = [dY | v] · [W ; A], v made beside dX in the same sweep of dY
//                    (rank ≤ 16 or 32; under dropout dY W and v, then lora_dx_fixup), and
//                    lora_grad_b's partials too where asked: no other pass over dY
//   lora_transpose_b Bᵀ, which lora_backward_dx_v*_wgmma reads
//   (_nf4 kernels: the same over an NF4 base, dequantized into the tiles: nf4.cuh)
//   lora_backward_v  v  = scale · dY B                  (split over K likewise)
//   lora_backward_dx dX = mask ⊙ (v A)/(1-p) + dY W       the LoRA segment first, masked in
//                                                        registers, then the base segment
//   lora_grad_a      dA partials = vᵀ (mask ⊙ x)          narrow.cuh, split over rows, reduced
//   lora_grad_b      [dB | dbias] partials = dYᵀ [u | 1]  in order (no float atomics)
//   lora_reduce      sums the partials into dA, dB, dbias
//   lora_merge       W' = W + scale · B A
//   lora_extend_weight  the extended path that hands the base GEMMs to cuBLAS (params/lora.h;
//                    src/lora/mod.rs explains when and why)
//   lora_dx_fixup    dX += mask ⊙ (v A)/(1-p), after a dX GEMM that left it out under dropout
#include "include/compat.cuh"
#include "include/dtype.cuh"
#include "include/epilogue.cuh"
#include "include/gemm.cuh"
#include "include/grid.cuh"
#include "include/narrow.cuh"
#include "include/nf4.cuh"
#include "include/philox.cuh"
#include "include/wgmma.cuh"
#include "params/lora.h"

namespace {

using namespace gemm;

// Activations as a GEMM operand: a dense source that can drop elements (x under dropout:
// those whose flattened index into x, the source's own offset(mn, k), is dropped read as
// zero; 1/(1-p) is folded into the epilogue) and can copy what it loads, before masking, into
// the rows of a wider matrix (x_ext or dy_ext, KContig sources only).
template <typename T, bool KContig, int Extent, int BK = kBK>
struct ActivationSource : DenseSource<T, KContig, Extent, BK> {
  using typename DenseSource<T, KContig, Extent, BK>::TileT;
  uint64_t seed = 0;
  float p = 0.0f;
  T* copy = nullptr;  // rows of copy_ld elements
  uint64_t copy_ld = 0;

  uint32_t keep = 0;  // the keep bits of this thread's runs of the next step: pre_wait's

  // The keep bits of this thread's runs of the step at k0, for_each_loaded's order, `count`
  // bits a run (at most 32 a step). narrow::run draws them a step ahead, so that the Philox
  // calls overlap the step before's multiplies rather than stand between this step's wait and
  // its barrier, behind which the next loads wait.
  FK_DEVICE void pre_wait(uint32_t k0) {
    static_assert(Extent * BK / kThreads <= 32, "a step's keep bits in one word");
    if (p == 0.0f) return;
    keep = 0;
    int bit = 0;
    this->for_each_loaded([&](int row, int col, int count) {
      // A run is consecutive elements of x along either layout's contiguous index.
      const uint32_t mn = this->mn0 + (KContig ? row : col), k = k0 + (KContig ? col : row);
      keep |= (dropout_keep_run(seed, this->offset(mn, k), count, p) & ((1u << count) - 1)) << bit;
      bit += count;
    });
  }

  FK_DEVICE void post_wait(TileT& tile, uint32_t k0) {
    if (!copy && p == 0.0f) return;
    int bit = 0;
    this->for_each_loaded([&](int row, int col, int count) {
      if (KContig && copy) copy_run(tile, row, col, count, k0);
      if (p == 0.0f) return;
      for (int j = 0; j < count; ++j) {
        if (!((keep >> (bit + j)) & 1u)) tile.data[row][col + j] = 0;
      }
      bit += count;
    });
  }

  // Copies a loaded run of a row, unmasked, into the wider matrix: one 16-byte store when the
  // run is a whole aligned 8, element by element otherwise.
  FK_DEVICE void copy_run(const TileT& tile, int row, int col, int count, uint32_t k0) {
    const uint32_t mn = this->mn0 + row, k = k0 + col;
    if (count == 8 && copy_ld % 8 == 0 && this->inside(mn, k + 7)) {
      *reinterpret_cast<uint4*>(copy + mn * copy_ld + k) = *reinterpret_cast<const uint4*>(&tile.data[row][col]);
      return;
    }
    for (int j = 0; j < count; ++j) {
      if (this->inside(mn, k + j)) copy[mn * copy_ld + k + j] = from_bits16<T>(tile.data[row][col + j]);
    }
  }
};

// A dense operand [k_len × extent] whose column `ones` (along mn) reads as 1 for valid k:
// [u | 1] in the dB/dbias gradient, so dbias comes out of the same GEMM as dB.
template <typename T, int Extent>
struct WithOnesColumn : DenseSource<T, false, Extent> {
  uint32_t ones;

  FK_DEVICE void post_wait(typename DenseSource<T, false, Extent>::TileT& tile, uint32_t k0) {
    const int ones_col = int(ones) - int(this->mn0);
    this->for_each_loaded([&](int row, int col, int count) {
      if (ones_col >= col && ones_col < col + count && k0 + row < this->k_len) tile.data[row][ones_col] = bits16(from_f32<T>(1.0f));
    });
  }
};

template <typename T>
FK_DEVICE const T* as(const void* p) {
  return static_cast<const T*>(p);
}

// The tail of an extended row: [base | low-rank part (acc · factor) | 1 if `one` | 0...] from
// column `base` on (the base part is copied by the operand source). Every block writes its
// columns of the low-rank part; the first column of blocks writes the rest.
template <typename T>
FK_DEVICE void extend_rows(narrow::Accumulators& acc, T* ext, uint64_t ld, uint32_t base, uint32_t m0, uint32_t n0, uint32_t rows,
                           uint32_t rank, float factor, bool one) {
  for_each(acc, [&](int r, int c, float v) {
    if (m0 + r < rows && n0 + c < rank) ext[(m0 + r) * ld + base + n0 + c] = from_f32<T>(v * factor);
  });
  if (blockIdx.x != 0) return;
  // Row by row, in 64 bits: a raw caller's rows may be up to 2³² elements apart.
  const uint32_t first = base + rank;
  for (uint32_t r = 0; r < narrow::kRows && m0 + r < rows; ++r)
    for (uint64_t c = first + threadIdx.x; c < ld; c += kThreads)
      ext[(m0 + r) * ld + c] = from_f32<T>(one && c == first ? 1.0f : 0.0f);
}

// Split blockIdx.z's range of a reduction `len` long cut into `splits`, in whole steps of
// `step` (empty when there are more splits than steps).
FK_DEVICE void split_range(uint32_t len, uint32_t splits, uint32_t* begin, uint32_t* end, uint32_t step = kBK) {
  const uint32_t steps = (len + step - 1) / step, per = (steps + splits - 1) / splits;
  *begin = min(len, blockIdx.z * per * step);
  *end = min(len, (blockIdx.z + 1) * per * step);
}

// Where this block's walk along K starts (LoraParams::narrow_stagger).
FK_DEVICE uint32_t stagger_start(const LoraParams& p) { return p.narrow_stagger ? blockIdx.y : 0; }

// This split's part of u or v, [m, rank] f32, in the split-K partials.
FK_DEVICE float* rank_partial(const LoraParams& p) { return p.rank_partials + uint64_t(blockIdx.z) * p.m * p.rank; }

// The dA partials in p.partials, where the dB ones start: the dX kernel's where it makes them.
FK_DEVICE uint32_t da_parts(const LoraParams& p) { return p.a_splits ? p.a_splits : p.splits; }

// BK: the stages' width along K (lora_down: 32; lora_down_k64, its variant: 64).
template <typename T, int BK>
FK_DEVICE void down(const LoraParams& p) {
  auto* st = dyn_smem<narrow::Stage<true, true, BK>>();
  const uint32_t m0 = blockIdx.y * narrow::kRows, n0 = blockIdx.x * narrow::kCols;
  ActivationSource<T, true, narrow::kRows, BK> x{{as<T>(p.x), p.d_in, m0, p.m, p.d_in}, p.seed, p.dropout};
  if (blockIdx.x == 0) x.copy = static_cast<T*>(p.x_ext), x.copy_ld = p.x_ld;  // one column of blocks copies
  DenseSource<T, true, narrow::kCols, BK> a{as<T>(p.a), p.d_in, n0, p.rank, p.d_in};
  narrow::Accumulators acc = {};
  uint32_t k_begin, k_end;
  split_range(p.d_in, max(p.k_splits, 1u), &k_begin, &k_end, BK);
  narrow::run<T>(acc, st, x, a, k_begin, k_end, narrow::n_tiles(p.rank, n0), stagger_start(p));
  if (p.k_splits > 1) return store(acc, rank_partial(p), p.rank, m0, n0, p.m, p.rank);
  const float factor = p.scale / (1.0f - p.dropout);
  store(acc, static_cast<T*>(p.u), p.rank, m0, n0, p.m, p.rank, factor);
  if (p.x_ext) extend_rows(acc, static_cast<T*>(p.x_ext), p.x_ld, p.d_in, m0, n0, p.m, p.rank, factor, true);
}

// The base weight's segment, dense or NF4, into `acc`: forward (KContig) reads W [d_out ×
// d_in] with K = d_in; backward dX reads it the other way, K = d_out.
template <typename T, bool Nf4, bool KContig, class Act, class St>
FK_DEVICE void base_segment(Accumulators& acc, St& st, Act& act, const LoraParams& p, uint32_t n0) {
  const uint32_t k_len = KContig ? p.d_in : p.d_out, extent = KContig ? p.d_out : p.d_in;
  if constexpr (Nf4) {
    Nf4Source<T, KContig> w{p.nf4, shared_code_table(), n0};
    run_segment<T>(acc, st, act, w, 0, k_len);
  } else {
    DenseSource<T, KContig, kBN> w{as<T>(p.w), p.w_ld ? p.w_ld : p.d_in, n0, extent, k_len};
    run_segment<T>(acc, st, act, w, 0, k_len);
  }
}

template <typename T, bool Nf4>
FK_DEVICE void forward(const LoraParams& p) {
  FK_SHARED(st, Stages<true, true>);
  const uint32_t m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  Accumulators acc = {};
  DenseSource<T, true, kBM> u{as<T>(p.u), p.rank, m0, p.m, p.rank};
  DenseSource<T, true, kBN> b{as<T>(p.b), p.rank, n0, p.d_out, p.rank};
  run_segment<T>(acc, st, u, b, 0, p.rank);
  DenseSource<T, true, kBM> x{as<T>(p.x), p.d_in, m0, p.m, p.d_in};
  base_segment<T, Nf4, true>(acc, st, x, p, n0);
  const float* bias = gemm_bias_table(reinterpret_cast<float*>(&st), as<T>(p.bias), n0, p.d_out);
  store(acc, static_cast<T*>(p.y), p.d_out, m0, n0, p.m, p.d_out, 1.0f, bias);
}

// The tensor map of operand `bit` (FK_LORA_TMA_*) where the host encoded one, for a TMA
// load; null otherwise (cp.async). `p` is the kernel's __grid_constant__ params.
FK_DEVICE const FkTensorMap* tma_map(const LoraParams& p, uint32_t bit, const FkTensorMap& map) {
  return p.tma & bit ? &map : nullptr;
}

// The base weight as a wgmma.cuh operand, dense or NF4: the forward's B (kAlongK: W's rows,
// K = d_in), or W's columns (K = d_out) as dXᵀ's A or dX's B (kTile: the tile's rows, kBM or
// kBN); a Schedule points it at each tile.
template <typename T, bool Nf4, bool kAlongK, int kTile = kAlongK ? wgmma::kBN : wgmma::kBM>
FK_DEVICE auto wgmma_weight(const LoraParams& p) {
  const uint32_t k_len = kAlongK ? p.d_in : p.d_out;
  const uint64_t ld = p.w_ld ? p.w_ld : p.d_in;
  if constexpr (Nf4) {
    return Nf4Operand<T, kAlongK, kTile>{with_shared_map(p.nf4), shared_code_table(), 0, k_len};
  } else if constexpr (kAlongK) {
    return wgmma::Rows<T>{{as<T>(p.w), ld, 0, p.d_out, k_len, tma_map(p, FK_LORA_TMA_W, p.w_map)}};
  } else {
    return wgmma::Columns<T>{{as<T>(p.w), ld, 0, p.d_in, k_len, tma_map(p, FK_LORA_TMA_W, p.w_map)}};
  }
}

// lora_forward's two segments through wgmma.cuh, for each of the block's tiles (blocks along
// y's columns first, so that those running together share x's rows).
template <typename T, bool Nf4>
FK_DEVICE void forward_wgmma(const LoraParams& p) {
  const wgmma::Schedule tiles(p.m, p.d_out, true, p.longest_column_run);
  auto lora = wgmma::segment(wgmma::Rows<T>{{as<T>(p.u), p.rank, 0, p.m, p.rank, tma_map(p, FK_LORA_TMA_U, p.u_map)}},
                             wgmma::Rows<T>{{as<T>(p.b), p.rank, 0, p.d_out, p.rank, tma_map(p, FK_LORA_TMA_B, p.b_map)}});
  auto base = wgmma::segment(wgmma::Rows<T>{{as<T>(p.x), p.d_in, 0, p.m, p.d_in, tma_map(p, FK_LORA_TMA_X, p.x_map)}},
                             wgmma_weight<T, Nf4, true>(p));
  wgmma::Accumulators acc = {};
  wgmma::run_tiles<T>(acc, dyn_smem<unsigned char>(), tiles, [&](int i, wgmma::Accumulators& tile, const wgmma::Staging& st) {
    const uint2 o = tiles.origin(i);  // (y's first row, first column)
    wgmma::store_tile<T, false>(tile, st, static_cast<T*>(p.y), p.d_out, o.x, o.y, p.m, p.d_out, as<T>(p.bias));
  }, lora, base);
}

// After tile i, a side product's accumulators (u or v, [m, rank], before the scale): the row's
// first column tile writes scale · acc to `out`, the bits its LoRA step used; they are zeroed
// unless the block's next tile has the same rows, which keeps them.
template <typename T, int kHalfN>
FK_DEVICE void side_done(float (&acc)[kHalfN], const wgmma::Schedule& tiles, int i, const LoraParams& p, T* out) {
  const uint2 o = tiles.origin(i);
  wgmma_hold(acc);
  if (o.y == 0) {
    wgmma::for_each_pair(acc, [&](int r, int c, float v0, float v1) {
      if (o.x + r >= p.m) return;
      T* row = out + uint64_t(o.x + r) * p.rank;
      if (c < int(p.rank)) row[c] = from_f32<T>(p.scale * v0);
      if (c + 1 < int(p.rank)) row[c + 1] = from_f32<T>(p.scale * v1);
    });
  }
  if (i + 1 == int(tiles.count) || !tiles.same_a(i + 1)) {  // the next tile makes its own
#pragma unroll
    for (int j = 0; j < kHalfN; ++j) acc[j] = 0.0f;
  }
  wgmma_hold(acc);
}

// lora_forward_wgmma with u made in the same sweep of x (no lora_down; rank ≤ kN, no dropout:
// bench/NOTES.md, the forward's u inside its GEMM): the base segment carries a side product,
// x's tile times A's rows, into kN / 2 accumulators a thread; the LoRA segment comes last,
// scale·u rounded to T straight from those registers times B's rows. A tile computes u
// again (kN / kBN more tensor work, the price of no pass of its own over x) unless it follows
// a tile of the same rows on its block (column runs, LoraParams::longest_column_run: then once
// a run), whose u it keeps; the row's first column tile writes u, saved for backward, the bits
// y used.
template <typename T, bool Nf4, int kN>
FK_DEVICE void forward_down_wgmma(const LoraParams& p) {
  const wgmma::Schedule tiles(p.m, p.d_out, true, p.longest_column_run);
  float u[kN / 2] = {};
  const wgmma::Rows<T> a{{as<T>(p.a), p.d_in, 0, p.rank, p.d_in, tma_map(p, FK_LORA_TMA_A, p.a_map)}};
  auto base = wgmma::segment(wgmma::Rows<T>{{as<T>(p.x), p.d_in, 0, p.m, p.d_in, tma_map(p, FK_LORA_TMA_X, p.x_map)}},
                             wgmma_weight<T, Nf4, true>(p), wgmma::Side<wgmma::Rows<T>, kN>{a, u});
  auto lora = wgmma::segment(wgmma::FromRegisters<T, kN>{{}, u, p.scale, p.rank},
                             wgmma::Rows<T>{{as<T>(p.b), p.rank, 0, p.d_out, p.rank, tma_map(p, FK_LORA_TMA_B, p.b_map)}});
  wgmma::Accumulators acc = {};
  wgmma::run_tiles<T>(acc, dyn_smem<unsigned char>(), tiles, [&](int i, wgmma::Accumulators& tile, const wgmma::Staging& st) {
    const uint2 o = tiles.origin(i);  // (y's first row, first column)
    side_done<T>(u, tiles, i, p, static_cast<T*>(p.u));
    wgmma::store_tile<T, false>(tile, st, static_cast<T*>(p.y), p.d_out, o.x, o.y, p.m, p.d_out, as<T>(p.bias));
  }, base, lora);
}

// dX's side products in backward_dx_v_wgmma, beside the base segment's steps over dY's tile:
// v = dY B (wgmma::Side over B's columns as K-contiguous rows: Bᵀ [rank, d_out], which
// lora_transpose_b writes) and, where p.b_splits is set, the [dB | dbias] partials dYᵀ [u | 1]
// of the tile's rows, so that no pass over dY of its own (lora_grad_b) is left. Step kt (64
// lines of d_out) of a row tile's dY is made by the column tile c with kt ≡ c modulo the row's
// column tiles, once among them: one warpgroup reads the stage's dY tile across its 128 rows
// (wgmma's MN-major A: M = the step's 64 lines, K = the rows) times the tile's [u | 1] (an
// MN-major B of kNB columns, loaded at the tile's start), into kNB / 2 accumulators that it
// stores after the next step's wait, as the step's lines of partial (row tile) of p.partials'
// dB part; lora_reduce adds the partials in order. The warpgroups take such steps in turn, so
// that one's accumulators are stored while the other's fill.
template <typename T, int kN>
struct DxSides : wgmma::Side<wgmma::Rows<T>, kN> {
  using V = wgmma::Side<wgmma::Rows<T>, kN>;
  static constexpr int kNB = kN + 8;  // [u | 1]: rank + 1 ≤ kN + 1 columns, in 8s
  static constexpr int kExtraBytes = wgmma::kBM * 128;  // a 128-byte line per row of the tile
  static constexpr uint32_t kNone = ~0u;
  const LoraParams& p;
  float db[kNB / 2] = {};  // then each step's first wgmma overwrites them
  uint4* u_tile = nullptr;
  // m0, column: the tile's first row and its column tile (start()).
  uint32_t m0 = 0, column = 0, columns = 1, issued = kNone, pending = kNone;
  bool loaded = false;  // u_tile holds row tile m0's [u | 1]

  FK_DEVICE DxSides(const wgmma::Rows<T>& bt, float (&v)[kN / 2], const LoraParams& p_) : V{bt, v}, p(p_) {}

  FK_DEVICE bool makes_db() const { return p.b_splits != 0; }
  // Whether this thread's warpgroup makes (and stores) the partial of step kt. Its index is
  // taken from lane 0, so that ptxas sees a warp-uniform branch around the wgmmas (one it
  // thinks divergent, it serializes every wgmma of the kernel: C7520).
  FK_DEVICE bool mine(uint32_t kt) const {
    return __shfl_sync(kFullMask, threadIdx.x / 128, 0) == (kt / columns) % 2;
  }

  FK_DEVICE void prepare(unsigned char* extra) {
    V::prepare(extra);
    u_tile = reinterpret_cast<uint4*>(extra);
    columns = (p.d_in + wgmma::kBN - 1) / wgmma::kBN;
  }
  // The tile's [u | 1], rows m0 .. m0 + 127 (zeros past m): row i's 16-byte chunk c (columns
  // 8c .. 8c + 7) in the 128-byte swizzle; kept from the block's tile before where its rows are
  // the same (column runs). ahead() loads the next tile's chunks into registers before the
  // tile before is stored, all before any is used, so that the loads' round trips overlap
  // each other and that store; start() puts them in shared memory.
  static constexpr int kChunks = kNB / 8, kPasses = (wgmma::kBM * kChunks + wgmma::kThreads - 1) / wgmma::kThreads;
  uint4 next_u[kPasses];
  FK_DEVICE bool keeps(uint2 o) const { return loaded && o.x == m0; }
  FK_DEVICE void ahead(uint2 o) {
    if (!makes_db() || keeps(o)) return;
    const T* u = as<T>(p.u);
    const bool whole = p.rank % 8 == 0 && runs_of_8(u, p.rank);
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int at = threadIdx.x + i * wgmma::kThreads, row = at / kChunks, col = at % kChunks * 8;
      const uint32_t token = o.x + row;
      next_u[i] = make_uint4(0, 0, 0, 0);
      if (row >= wgmma::kBM || token >= p.m) continue;
      const T* src = u + uint64_t(token) * p.rank + col;
      if (whole && col + 8 <= int(p.rank)) {
        next_u[i] = ld_global_early(reinterpret_cast<const uint4*>(src));
        continue;
      }
      uint16_t e[8];
#pragma unroll
      for (int j = 0; j < 8; ++j)
        e[j] = col + j < int(p.rank) ? bits16(src[j]) : col + j == int(p.rank) ? bits16(from_f32<T>(1.0f)) : uint16_t(0);
      next_u[i] = make_uint4(e[0] | uint32_t(e[1]) << 16, e[2] | uint32_t(e[3]) << 16, e[4] | uint32_t(e[5]) << 16,
                             e[6] | uint32_t(e[7]) << 16);
    }
  }
  FK_DEVICE void start(uint2 o) {
    column = o.y / wgmma::kBN;
    const bool kept = keeps(o);
    m0 = o.x;
    if (!makes_db() || kept) return;
    loaded = true;
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      const int at = threadIdx.x + i * wgmma::kThreads;
      if (at < wgmma::kBM * kChunks) u_tile[wgmma::swizzled(at / kChunks, at % kChunks)] = next_u[i];
    }
  }
  // Where dA's steps follow the sweep (DaSteps), the tile's x into L2 kXAhead steps before
  // they read it (each x tile is read once, from DRAM): two 128-byte lines a thread, rather
  // than every block's 64 KB in a burst when the blocks, in step, reach those steps together.
  static constexpr uint32_t kXAhead = 8;
  FK_DEVICE void prefetch_x(uint32_t kt) const {
    const uint32_t steps = (p.d_out + wgmma::kBK - 1) / wgmma::kBK;
    if (p.a_splits == 0 || kt != (steps > kXAhead ? steps - kXAhead : 0u)) return;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const uint32_t i = threadIdx.x + j * wgmma::kThreads, row = m0 + i / 4, col = column * wgmma::kBN + 64 * (i % 4);
      if (row < p.m && col < p.d_in) prefetch_l2(as<T>(p.x) + uint64_t(row) * p.d_in + col);
    }
  }
  template <typename U>
  FK_DEVICE void mma(const wgmma::Stage& st, const char* a, int slice, const uint4* tile, bool fresh, uint32_t k0) {
    V::template mma<U>(st, a, slice, tile, fresh, k0);
    const uint32_t kt = k0 / wgmma::kBK;
    prefetch_x(kt);
    if (!makes_db() || kt % columns != column) return;
    issued = k0;
    if (!mine(kt)) return;
    const char* dy = reinterpret_cast<const char*>(st.a);
    const char* ut = reinterpret_cast<const char*>(u_tile);
    // k16 slice j: rows 16j .. 16j + 15 of both, two 1024-byte atoms of 8 lines each. The
    // first overwrites the accumulators (scale-d 0): zeroing them between steps, with a
    // group of wgmmas in flight, would make ptxas serialize every wgmma (C7515).
    constexpr int kSlice = wgmma::kSliceBytes<true>;
#pragma unroll
    for (int j = 0; j < wgmma::kBM / 16; ++j) wgmma_m64nNk16<U, kNB, true, true>(db, dy + kSlice * j, ut + kSlice * j, j > 0);
  }
  // After a step's wait: the step before's partial is done.
  FK_DEVICE void waited() {
    if (pending != kNone) store(pending);
    pending = issued;
    issued = kNone;
  }
  FK_DEVICE void flush() {
    if (pending != kNone) store(pending);
    pending = kNone;
  }
  // Lines k0 .. k0 + 63 of this tile's partial, [d_out, rank + 1], from its warpgroup's
  // accumulators. Only read here: a write to them (wgmma_hold's too) with the next step's
  // group in flight would make ptxas serialize every wgmma (C7515).
  FK_DEVICE void store(uint32_t k0) {
    if (!mine(k0 / wgmma::kBK)) return;
    const uint32_t width = p.rank + 1;
    float* out = p.partials + uint64_t(da_parts(p)) * p.rank * p.d_in + uint64_t(m0 / wgmma::kBM) * p.d_out * width;
    wgmma::for_each_pair(db, [&](int r, int c, float v0, float v1) {
      const uint32_t line = k0 + r % 64;
      if (line >= p.d_out) return;
      float* row = out + uint64_t(line) * width;
      if (uint32_t(c) < width) row[c] = v0;
      if (uint32_t(c) + 1 < width) row[c + 1] = v1;
    });
  }
};

// Keep bits of dX's (and x's) (row, col .. col + 3), col a multiple of 4, bit j for col + j:
// x's dropout mask, regenerated. One Philox call when dX's rows are whole groups of 4
// (kAligned: d_in % 4 == 0), up to two otherwise.
template <bool kAligned>
FK_DEVICE uint32_t dx_keep_run4(const LoraParams& p, uint32_t row, uint32_t col) {
  const uint64_t first = uint64_t(row) * p.d_in + col;
  return kAligned ? dropout_keep_bits(p.seed, first / 4, p.dropout) : dropout_keep_run(p.seed, first, 4, p.dropout);
}

// Columns [col0 + 2·k0, + 64) of x, the tile's rows: a stage part of DaSteps' step at k0
// (its A operand's at col0, its B operand's 64 columns on), 128 rows whichever part it
// fills, loaded as a `Rows` operand whose K is x's columns (by TMA through the forward's map
// of x). kMnMajor is the run's tag for the part (run_tiles wants one layout of A and one of B
// per run); DaSteps reads the tiles its own way.
template <typename T, bool kTag>
struct XColumns : wgmma::Rows<T> {
  static constexpr bool kMnMajor = kTag;
  static constexpr bool kMulticasts = false;
  uint32_t col0 = 0;

  template <int>
  FK_DEVICE void issue(uint4* tile, uint32_t k0, uint64_t* bar, uint32_t) const {
    wgmma::Rows<T>::template issue<wgmma::kBM>(tile, col0 + 2 * k0, bar, 1);
  }
  template <int>
  FK_DEVICE uint32_t tma_bytes() const {
    return wgmma::Rows<T>::template tma_bytes<wgmma::kBM>();
  }
};

// dA's partials beside dX, where p.a_splits asks: (mask ⊙ x)ᵀ · scale·v over the tile's 128
// rows, for the tile's columns of x, as partial (row tile) of p.partials' dA part [rank,
// d_in], which lora_reduce adds in order (and scales by 1/(1-p)): no pass over x of its own
// (lora_grad_a). Two steps after the tile's others (run_tiles takes this as a segment), each
// bringing 128 of the tile's columns of x into the stage's A part and the first half of its
// B part (XColumns); under dropout the threads zero the dropped elements there (drop).
// v, whole once the tile's sweep of dY is done (DxSides), goes into the B part's second half
// as scale·v rounded to T (the bits p.v gets): kN K-major lines of the 128 rows, in two
// 64-row blocks. Warpgroup w reads part w across its rows (MN-major A: M = its 64 columns,
// K = the rows) times those lines, into kN / 2 accumulators that it stores at once: two
// short steps a tile (bench/NOTES.md, dA inside dX's GEMM).
template <typename T, int kN>
struct DaSteps {
  using A = XColumns<T, false>;
  using B = XColumns<T, true>;
  using S = wgmma::NoSide;
  static constexpr bool kPlain = false;
  static_assert(!A::kMulticasts && !B::kMulticasts, "x's tiles are the block's own");
  A a;
  B b;
  S side;
  const LoraParams& p;
  const wgmma::Schedule& tiles;
  float (&v)[kN / 2];
  int tile = -1;  // the block's tile whose steps mma() takes (place() runs ahead, with the loads)

  FK_DEVICE int steps() const { return p.a_splits ? wgmma::kBN / 128 : 0; }
  FK_DEVICE void place(uint2 o) {
    a.row0 = b.row0 = o.x;
    a.col0 = o.y;
    b.col0 = o.y + 64;
  }
  template <typename U, bool, bool>
  FK_DEVICE void mma(wgmma::Accumulators&, wgmma::Stage& st, const uint4*, bool, uint32_t k0) {
    if (k0 == 0) ++tile;
    const uint2 o = tiles.origin(tile);
    // The mask's draws first, while the sweep's last wgmmas run (at the first of the steps).
    if (p.dropout > 0.0f) p.d_in % 4 == 0 ? drop(st, o, k0, std::true_type{}) : drop(st, o, k0, std::false_type{});
    wgmma_wait<0>();  // v's last wgmmas, and the LoRA step's
    wgmma_hold(v);
    T* lines = reinterpret_cast<T*>(st.b + wgmma::kBM * 8);
    wgmma::for_each_pair(v, [&](int r, int c, float v0, float v1) {
      T* block = lines + (r / 64) * kN * 64;
      block[wgmma::swizzled(c, r % 64 / 8) * 8 + r % 8] = from_f32<T>(p.scale * v0);
      block[wgmma::swizzled(c + 1, r % 64 / 8) * 8 + r % 8] = from_f32<T>(p.scale * v1);
    });
    fence_proxy_async_shared();  // the lines (and the dropped elements' zeros) are visible to wgmma
    __syncthreads();             // both warpgroups' rows
    const char* part = threadIdx.x < 128 ? reinterpret_cast<const char*>(st.a) : reinterpret_cast<const char*>(st.b);
    const char* vt = reinterpret_cast<const char*>(lines);
    constexpr int kSlice = wgmma::kSliceBytes<true>;
    float da[kN / 2];
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < wgmma::kBM / 16; ++j)
      wgmma_m64nNk16<U, kN, true, false>(da, part + kSlice * j, vt + (j / 4) * kN * 128 + 32 * (j % 4), j > 0);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_hold(da);
    const uint32_t first = o.y + 2 * k0;  // for_each_pair's row r is column first + r
    float* out = p.partials + uint64_t(o.x / wgmma::kBM) * p.rank * p.d_in;
    wgmma::for_each_pair(da, [&](int r, int c, float d0, float d1) {
      const uint32_t col = first + r;
      if (col >= p.d_in) return;
      if (uint32_t(c) < p.rank) out[uint64_t(c) * p.d_in + col] = d0;
      if (uint32_t(c) + 1 < p.rank) out[uint64_t(c + 1) * p.d_in + col] = d1;
    });
  }
  // Zeroes the elements of the step's two parts of x (tile at o, step at k0) that dropout
  // drops: runs of 4 columns, kRuns a thread, drawn kBatch at a time before any of them is
  // applied (each draw is a chain of Philox rounds; more at once spill beside the tile's
  // accumulators). The parts hold zeros past m and d_in already.
  template <class Aligned>
  FK_DEVICE void drop(wgmma::Stage& st, uint2 o, uint32_t k0, Aligned) {
    constexpr int kRunsPerRow = 64 / 4, kRuns = 2 * wgmma::kBM * kRunsPerRow / wgmma::kThreads, kBatch = 4;
#pragma unroll 1
    for (int j0 = 0; j0 < kRuns; j0 += kBatch) {
      uint32_t keep[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int i = threadIdx.x + (j0 + j) * wgmma::kThreads, part = i / (wgmma::kBM * kRunsPerRow);
        const uint32_t row = o.x + i / kRunsPerRow % wgmma::kBM, col = o.y + 2 * k0 + 64 * part + 4 * (i % kRunsPerRow);
        keep[j] = row < p.m && col < p.d_in ? dx_keep_run4<Aligned::value>(p, row, col) : 0xFu;
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        if ((keep[j] & 0xFu) == 0xFu) continue;
        const int i = threadIdx.x + (j0 + j) * wgmma::kThreads, part = i / (wgmma::kBM * kRunsPerRow);
        const int row = i / kRunsPerRow % wgmma::kBM, run = i % kRunsPerRow;
        uint16_t* e = reinterpret_cast<uint16_t*>(part ? st.b : st.a) + wgmma::swizzled(row, run / 2) * 8 + run % 2 * 4;
#pragma unroll
        for (int b = 0; b < 4; ++b)
          if (!(keep[j] >> b & 1u)) e[b] = 0;
      }
    }
  }
};

// lora_backward_dx_v's dX = dY · W + scale·v · A in the output's own layout, not dXᵀ: dY
// is A (K-contiguous rows), W [d_out, d_in] and A [rank, d_in] the MN-major B (`Columns`, read
// as they lie). v = scale · dY B is made in the same sweep of dY, as the forward's u is of x
// (forward_down_wgmma), and with it the dB partials where p.b_splits asks (DxSides): the base
// segment's side products, kN / 2 accumulators a thread for v; the LoRA segment last, scale·v
// rounded to T from those registers times A's tile. Under dropout the mask applies to the
// LoRA term alone: that segment is empty here, and lora_dx_fixup adds the masked term from
// the v this kernel writes. Tiles of the same rows keep v (column runs), the row's first
// column tile writes it, for lora_grad_a (and the fixup).
template <typename T, bool Nf4, int kN>
FK_DEVICE void backward_dx_v_wgmma(const LoraParams& p) {
  const wgmma::Schedule tiles(p.m, p.d_in, true, p.longest_column_run);
  float v[kN / 2] = {};
  auto w = wgmma_weight<T, Nf4, false, wgmma::kBN>(p);  // before the run: NF4's tables are filled by the whole block
  const wgmma::Rows<T> bt{{as<T>(p.bt), p.d_out, 0, p.rank, p.d_out, tma_map(p, FK_LORA_TMA_B, p.b_map)}};
  auto base = wgmma::segment(wgmma::Rows<T>{{as<T>(p.dy), p.d_out, 0, p.m, p.d_out, tma_map(p, FK_LORA_TMA_DY, p.dy_map)}}, w,
                             DxSides<T, kN>{bt, v, p});
  const uint32_t lora_k = p.dropout > 0.0f ? 0u : p.rank;
  auto lora = wgmma::segment(wgmma::FromRegisters<T, kN>{{}, v, p.scale, lora_k},
                             wgmma::Columns<T>{{as<T>(p.a), p.d_in, 0, p.d_in, p.rank, tma_map(p, FK_LORA_TMA_A, p.a_map)}});
  const wgmma::Rows<T> x{{as<T>(p.x), p.d_in, 0, p.m, p.d_in, tma_map(p, FK_LORA_TMA_X, p.x_map)}};
  DaSteps<T, kN> da{{x}, {x}, {}, p, tiles, v};
  wgmma::Accumulators acc = {};
  wgmma::run_tiles<T>(acc, dyn_smem<unsigned char>(), tiles, [&](int i, wgmma::Accumulators& tile, const wgmma::Staging& st) {
    const uint2 o = tiles.origin(i);  // (dX's first row, first column)
    side_done<T>(v, tiles, i, p, static_cast<T*>(p.v));
    wgmma::store_tile<T, false>(tile, st, static_cast<T*>(p.dx), p.d_in, o.x, o.y, p.m, p.d_in);
  }, base, lora, da);
}

// lora_backward_dx on wgmma: the output tile is dXᵀ (kBM columns of dX by kBN rows), so that
// A [rank, d_in] and W [d_out, d_in] (dense or NF4) are wgmma.cuh's `Columns`-kind operands as
// they lie and v, dY its K-contiguous `Rows`; for each of the block's tiles, blocks along dX's
// columns first, so that those running together share dY's rows (in L2). The LoRA segment
// first, then the base, in one run as the forward's (the base's loads follow the LoRA step's
// with no refill between, and the next tile's loads are in flight while the last is stored).
// Under dropout the mask applies to the LoRA term alone: its segment is empty here, and
// lora_dx_fixup adds the term masked afterwards, as after cuBLAS on the Extended path.
template <typename T, bool Nf4>
FK_DEVICE void backward_dx_wgmma(const LoraParams& p) {
  const wgmma::Schedule tiles(p.d_in, p.m, false);
  auto w = wgmma_weight<T, Nf4, false>(p);  // before the run: NF4's tables are filled by the whole block
  const uint32_t lora_k = p.dropout > 0.0f ? 0u : p.rank;
  auto lora = wgmma::segment(wgmma::Columns<T>{{as<T>(p.a), p.d_in, 0, p.d_in, lora_k, tma_map(p, FK_LORA_TMA_A, p.a_map)}},
                             wgmma::Rows<T>{{as<T>(p.v), p.rank, 0, p.m, p.rank, tma_map(p, FK_LORA_TMA_V, p.v_map)}});
  auto base = wgmma::segment(w, wgmma::Rows<T>{{as<T>(p.dy), p.d_out, 0, p.m, p.d_out, tma_map(p, FK_LORA_TMA_DY, p.dy_map)}});
  wgmma::Accumulators acc = {};
  wgmma::run_tiles<T>(acc, dyn_smem<unsigned char>(), tiles, [&](int i, wgmma::Accumulators& tile, const wgmma::Staging& st) {
    const uint2 o = tiles.origin(i);  // (dX's first column, first row)
    wgmma::store_tile<T, true>(tile, st, static_cast<T*>(p.dx), p.d_in, o.y, o.x, p.m, p.d_in);
  }, lora, base);
}

template <typename T>
FK_DEVICE void backward_v(const LoraParams& p) {
  auto* st = dyn_smem<narrow::Stage<true, false>>();
  const uint32_t m0 = blockIdx.y * narrow::kRows, n0 = blockIdx.x * narrow::kCols;
  ActivationSource<T, true, narrow::kRows> dy{{as<T>(p.dy), p.d_out, m0, p.m, p.d_out}};
  if (blockIdx.x == 0) dy.copy = static_cast<T*>(p.dy_ext), dy.copy_ld = p.dy_ld;
  DenseSource<T, false, narrow::kCols> b{as<T>(p.b), p.rank, n0, p.rank, p.d_out};  // B as [d_out × rank]
  narrow::Accumulators acc = {};
  uint32_t k_begin, k_end;
  split_range(p.d_out, max(p.k_splits, 1u), &k_begin, &k_end);
  narrow::run<T>(acc, st, dy, b, k_begin, k_end, narrow::n_tiles(p.rank, n0), stagger_start(p));
  if (p.k_splits > 1) return store(acc, rank_partial(p), p.rank, m0, n0, p.m, p.rank);
  store(acc, static_cast<T*>(p.v), p.rank, m0, n0, p.m, p.rank, p.scale);
  if (p.dy_ext) extend_rows(acc, static_cast<T*>(p.dy_ext), p.dy_ld, p.d_out, m0, n0, p.m, p.rank, p.scale, false);
}

// After a split-K lora_down or lora_backward_v: sums the splits in order and writes what
// the unsplit kernel would have, out [m, rank] (u or v) and, with `ext`, the tail of each
// extended row from column `base` on: [acc · factor | 1 if `one` | 0...].
template <typename T>
FK_DEVICE void rank_reduce(const LoraParams& p, void* out_, void* ext_, uint64_t ld, uint32_t base, float factor, bool one) {
  T* out = static_cast<T*>(out_);
  T* ext = static_cast<T*>(ext_);
  const uint64_t width = ext ? ld - base : p.rank, n = uint64_t(p.m) * width, part = uint64_t(p.m) * p.rank;
  for (uint64_t i = grid_start(); i < n; i += grid_stride()) {
    const uint64_t row = i / width, c = i % width;
    float y = one && c == p.rank ? 1.0f : 0.0f;
    if (c < p.rank) {
      float s = 0.0f;
      for (uint32_t z = 0; z < p.k_splits; ++z) s += p.rank_partials[z * part + row * p.rank + c];
      y = s * factor;
      out[row * p.rank + c] = from_f32<T>(y);
    }
    if (ext) ext[row * ld + base + c] = from_f32<T>(y);
  }
}

// The LoRA part of this tile of dX, mask ⊙ (v A) / (1 - p), into the (empty) accumulators.
// The mask is drawn first, while the accumulators are empty, into one bit per accumulator (bit
// 4i + k for fragment i's accumulator k). A fragment's 4 columns 4q .. 4q + 3 (its rows g and
// g + 8) lie with lanes 2q and 2q + 1 of a group: the even lane draws row g's run, the odd row
// g + 8's, and each takes the other's by a shuffle, so each run of 4 is drawn once.
template <typename T, class St>
FK_DEVICE void masked_lora_dx(Accumulators& acc, St& st, const LoraParams& p, uint32_t m0, uint32_t n0) {
  static_assert(kFragments * 4 <= 64, "a keep bit per accumulator in 64 bits");
  uint64_t keep = 0;
  const auto draw = [&](auto aligned) {
    const bool odd = threadIdx.x % 2;
    for_each_fragment(acc, [&](int i, int r, int c, float (&)[4]) {
      const uint32_t row = m0 + r + (odd ? 8 : 0), col = n0 + (c & ~3);
      const uint32_t own = dx_keep_run4<decltype(aligned)::value>(p, row, col);
      const uint32_t other = __shfl_xor_sync(kFullMask, own, 1);
      const uint32_t top = odd ? other : own, bottom = odd ? own : other;
      const int j = c % 4;  // 0 or 2
      keep |= uint64_t((top >> j & 3u) | (bottom >> j & 3u) << 2) << (4 * i);
    });
  };
  if (p.dropout > 0.0f) p.d_in % 4 == 0 ? draw(std::true_type{}) : draw(std::false_type{});
  DenseSource<T, true, kBM> v{as<T>(p.v), p.rank, m0, p.m, p.rank};
  DenseSource<T, false, kBN> a{as<T>(p.a), p.d_in, n0, p.d_in, p.rank};  // A as [rank × d_in]
  run_segment<T>(acc, st, v, a, 0, p.rank);
  if (p.dropout == 0.0f) return;
  const float scale = 1.0f / (1.0f - p.dropout);
  for_each_fragment(acc, [&](int i, int r, int c, float (&q)[4]) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const bool kept = (keep >> (4 * i + k)) & 1u && m0 + r + 8 * (k / 2) < p.m && n0 + c + k % 2 < p.d_in;
      q[k] = kept ? q[k] * scale : 0.0f;
    }
  });
}

template <typename T, bool Nf4>
FK_DEVICE void backward_dx(const LoraParams& p) {
  FK_SHARED(st, Stages<true, false>);
  const uint32_t m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  Accumulators acc = {};
  // The LoRA part first, alone in the accumulators, so the mask applies to it only.
  masked_lora_dx<T>(acc, st, p, m0, n0);
  DenseSource<T, true, kBM> dy{as<T>(p.dy), p.d_out, m0, p.m, p.d_out};
  base_segment<T, Nf4, false>(acc, st, dy, p, n0);
  store(acc, static_cast<T*>(p.dx), p.d_in, m0, n0, p.m, p.d_in);
}

// The weight gradients stream x or dY (m × in or out) against the rank-wide v or u, as
// lora_down does: narrow.cuh, K = the rows, split over blockIdx.z.
template <typename T>
FK_DEVICE void grad_a(const LoraParams& p) {
  // dAᵀ [d_in × rank] = (mask ⊙ x)ᵀ v, stored transposed into dA's partials [rank × d_in].
  auto* st = dyn_smem<narrow::Stage<false, false>>();
  const uint32_t m0 = blockIdx.y * narrow::kRows, n0 = blockIdx.x * narrow::kCols;  // over [d_in, rank]
  uint32_t k_begin, k_end;
  split_range(p.m, p.splits, &k_begin, &k_end);
  ActivationSource<T, false, narrow::kRows> xt{{as<T>(p.x), p.d_in, m0, p.d_in, p.m}, p.seed, p.dropout};
  DenseSource<T, false, narrow::kCols> v{as<T>(p.v), p.rank, n0, p.rank, p.m};
  narrow::Accumulators acc = {};
  narrow::run<T>(acc, st, xt, v, k_begin, k_end, narrow::n_tiles(p.rank, n0), stagger_start(p));
  float* out = p.partials + uint64_t(blockIdx.z) * p.rank * p.d_in;
  narrow::for_each(acc, [&](int r, int c, float a) {
    if (m0 + r < p.d_in && n0 + c < p.rank) out[uint64_t(n0 + c) * p.d_in + m0 + r] = a;
  });
}

template <typename T>
FK_DEVICE void grad_b(const LoraParams& p) {
  // [dB | dbias] [d_out × (rank + 1)] = dYᵀ [u | 1].
  auto* st = dyn_smem<narrow::Stage<false, false>>();
  const uint32_t m0 = blockIdx.y * narrow::kRows, n0 = blockIdx.x * narrow::kCols;  // over [d_out, rank + 1]
  uint32_t k_begin, k_end;
  split_range(p.m, p.splits, &k_begin, &k_end);
  DenseSource<T, false, narrow::kRows> dyt{as<T>(p.dy), p.d_out, m0, p.d_out, p.m};
  WithOnesColumn<T, narrow::kCols> u{{as<T>(p.u), p.rank, n0, p.rank, p.m}, p.rank};
  narrow::Accumulators acc = {};
  narrow::run<T>(acc, st, dyt, u, k_begin, k_end, narrow::n_tiles(p.rank + 1, n0), stagger_start(p));
  float* base = p.partials + uint64_t(da_parts(p)) * p.rank * p.d_in;
  store(acc, base + uint64_t(blockIdx.z) * p.d_out * (p.rank + 1), p.rank + 1, m0, n0, p.d_out, p.rank + 1);
}

// One thread per gradient element, summing the splits in index order.
FK_DEVICE void reduce(const LoraParams& p) {
  const uint64_t na = uint64_t(p.rank) * p.d_in, nb = uint64_t(p.d_out) * (p.rank + 1);
  const uint32_t a_splits = da_parts(p), b_splits = p.b_splits ? p.b_splits : p.splits;
  const float* pb = p.partials + uint64_t(a_splits) * na;
  for (uint64_t i = grid_start(); i < na + nb; i += grid_stride()) {
    float s = 0.0f;
    if (i < na) {
      for (uint32_t z = 0; z < a_splits; ++z) s += p.partials[z * na + i];
      p.da[i] = s * (1.0f / (1.0f - p.dropout));
    } else {
      const uint64_t j = i - na, row = j / (p.rank + 1), col = j % (p.rank + 1);
      for (uint32_t z = 0; z < b_splits; ++z) s += pb[z * nb + j];
      if (col < p.rank) p.db[row * p.rank + col] = s;
      else if (p.dbias) p.dbias[row] = s;
    }
  }
}

template <typename T>
FK_DEVICE void merge(const LoraParams& p) {
  FK_SHARED(st, Stages<true, false>);
  const uint32_t m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;  // over [d_out, d_in]
  DenseSource<T, true, kBM> b{as<T>(p.b), p.rank, m0, p.d_out, p.rank};
  DenseSource<T, false, kBN> a{as<T>(p.a), p.d_in, n0, p.d_in, p.rank};
  Accumulators acc = {};
  run_segment<T>(acc, st, b, a, 0, p.rank);
  store_sum(acc, static_cast<T*>(p.merged), p.d_in, as<T>(p.w), p.w_ld ? p.w_ld : p.d_in, m0, n0, p.d_out, p.d_in, p.scale);
}

// Bᵀ [rank, d_out] from B [d_out, rank]: the side tile of the dX kernels that make v takes
// rows of B's columns (DxSides).
template <typename T>
FK_DEVICE void transpose_b(const LoraParams& p) {
  const uint64_t n = uint64_t(p.rank) * p.d_out;
  for (uint64_t i = grid_start(); i < n; i += grid_stride())
    static_cast<T*>(p.bt)[i] = as<T>(p.b)[(i % p.d_out) * p.rank + i / p.d_out];
}

// The parts of the extended weight that change as training goes: B, bias and A, from their
// own buffers (the base W part is written once, or dequantized, by the caller).
template <typename T>
FK_DEVICE void extend_weight(const LoraParams& p) {
  T* w = static_cast<T*>(const_cast<void*>(p.w));
  const uint64_t tail = p.w_ld - p.d_in;  // B, bias, padding
  const uint64_t n_tail = uint64_t(p.d_out) * tail, n_a = uint64_t(p.rank) * p.w_ld;
  for (uint64_t i = grid_start(); i < n_tail + n_a; i += grid_stride()) {
    if (i < n_tail) {
      const uint64_t row = i / tail, c = i % tail;
      const T* bias = as<T>(p.bias);
      const float v = c < p.rank ? to_f32(as<T>(p.b)[row * p.rank + c]) : (c == p.rank && bias ? to_f32(bias[row]) : 0.0f);
      w[row * p.w_ld + p.d_in + c] = from_f32<T>(v);
    } else {
      const uint64_t j = i - n_tail, row = j / p.w_ld, c = j % p.w_ld;
      w[(p.d_out + row) * p.w_ld + c] = c < p.d_in ? as<T>(p.a)[row * p.d_in + c] : from_f32<T>(0.0f);
    }
  }
}

// dX += mask ⊙ (v A) / (1 - p), when dX = dY W came from a GEMM that could not mask its
// low-rank term (under dropout: cuBLAS on the extended path, whose K the mask cannot ride
// along; the wgmma kernel, whose accumulators are not to be touched mid-pipeline):
// backward_dx's LoRA segment, added to dX in the epilogue.
template <typename T>
FK_DEVICE void dx_fixup(const LoraParams& p) {
  FK_SHARED(st, Stages<true, false>);
  const uint32_t m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  Accumulators acc = {};
  masked_lora_dx<T>(acc, st, p, m0, n0);
  store_sum(acc, static_cast<T*>(p.dx), p.d_in, static_cast<const T*>(p.dx), p.d_in, m0, n0, p.m, p.d_in, 1.0f);
}

}  // namespace

#define FK_LORA_ENTRIES(T, t)                                                                    \
  FK_KERNEL_BOUNDS(lora_down_##t, LoraParams, kThreads) { down<T, kBK>(p); }                     \
  FK_KERNEL_BOUNDS(lora_down_k64_##t, LoraParams, kThreads) { down<T, narrow::kWideK>(p); }        \
  FK_KERNEL_BOUNDS(lora_forward_##t, LoraParams, kThreads) { forward<T, false>(p); }             \
  FK_KERNEL_BOUNDS(lora_forward_nf4_##t, LoraParams, kThreads) { forward<T, true>(p); }          \
  FK_KERNEL_TMA(lora_forward_wgmma_##t, LoraParams, wgmma::kThreads) { forward_wgmma<T, false>(p); } \
  FK_KERNEL_TMA(lora_forward_nf4_wgmma_##t, LoraParams, wgmma::kThreads) { forward_wgmma<T, true>(p); } \
  FK_KERNEL_TMA(lora_forward_down16_wgmma_##t, LoraParams, wgmma::kThreads) { forward_down_wgmma<T, false, 16>(p); } \
  FK_KERNEL_TMA(lora_forward_down32_wgmma_##t, LoraParams, wgmma::kThreads) { forward_down_wgmma<T, false, 32>(p); } \
  FK_KERNEL_TMA(lora_forward_down16_nf4_wgmma_##t, LoraParams, wgmma::kThreads) { forward_down_wgmma<T, true, 16>(p); } \
  FK_KERNEL_TMA(lora_forward_down32_nf4_wgmma_##t, LoraParams, wgmma::kThreads) { forward_down_wgmma<T, true, 32>(p); } \
  FK_KERNEL_TMA(lora_backward_dx_wgmma_##t, LoraParams, wgmma::kThreads) { backward_dx_wgmma<T, false>(p); } \
  FK_KERNEL_TMA(lora_backward_dx_nf4_wgmma_##t, LoraParams, wgmma::kThreads) { backward_dx_wgmma<T, true>(p); } \
  FK_KERNEL_TMA(lora_backward_dx_v16_wgmma_##t, LoraParams, wgmma::kThreads) { backward_dx_v_wgmma<T, false, 16>(p); } \
  FK_KERNEL_TMA(lora_backward_dx_v32_wgmma_##t, LoraParams, wgmma::kThreads) { backward_dx_v_wgmma<T, false, 32>(p); } \
  FK_KERNEL_TMA(lora_backward_dx_v16_nf4_wgmma_##t, LoraParams, wgmma::kThreads) { backward_dx_v_wgmma<T, true, 16>(p); } \
  FK_KERNEL_TMA(lora_backward_dx_v32_nf4_wgmma_##t, LoraParams, wgmma::kThreads) { backward_dx_v_wgmma<T, true, 32>(p); } \
  FK_KERNEL_BOUNDS(lora_backward_v_##t, LoraParams, kThreads) { backward_v<T>(p); }              \
  FK_KERNEL_BOUNDS(lora_backward_dx_##t, LoraParams, kThreads) { backward_dx<T, false>(p); }     \
  FK_KERNEL_BOUNDS(lora_backward_dx_nf4_##t, LoraParams, kThreads) { backward_dx<T, true>(p); }  \
  FK_KERNEL_BOUNDS(lora_grad_a_##t, LoraParams, kThreads) { grad_a<T>(p); }                      \
  FK_KERNEL_BOUNDS(lora_grad_b_##t, LoraParams, kThreads) { grad_b<T>(p); }                      \
  FK_KERNEL_BOUNDS(lora_merge_##t, LoraParams, kThreads) { merge<T>(p); }                      \
  FK_KERNEL(lora_extend_weight_##t, LoraParams) { extend_weight<T>(p); }                         \
  FK_KERNEL(lora_transpose_b_##t, LoraParams) { transpose_b<T>(p); }                             \
  FK_KERNEL_BOUNDS(lora_dx_fixup_##t, LoraParams, kThreads) { dx_fixup<T>(p); }                 \
  FK_KERNEL(lora_down_reduce_##t, LoraParams) {                                                  \
    rank_reduce<T>(p, p.u, p.x_ext, p.x_ld, p.d_in, p.scale / (1.0f - p.dropout), true);         \
  }                                                                                              \
  FK_KERNEL(lora_backward_v_reduce_##t, LoraParams) {                                            \
    rank_reduce<T>(p, p.v, p.dy_ext, p.dy_ld, p.d_out, p.scale, false);                         \
  }

FK_LORA_ENTRIES(__nv_bfloat16, bf16)
FK_LORA_ENTRIES(__half, f16)

FK_KERNEL(lora_reduce, LoraParams) { reduce(p); }
