// NF4 kernels: bitsandbytes-exact quantization (with double quantization), dequantization,
// and matmuls through the frozen NF4 weight with the dequantization fused into the load:
// GEMVs for decode-sized batches (SIMT, and on tensor cores) and a tensor-core GEMM for the
// forward (y = x·Ŵᵀ) and the backward (dX = dY·Ŵ), on mma.sync and on Hopper's wgmma.
// Reference: src/reference/nf4.rs. Wrapper: src/nf4/mod.rs. Tests: tests/nf4_kernels.rs.
//
// The GEMM uses Ŵ, the weight dequantized to the activations' dtype (exactly what
// nf4_dequantize writes), so it computes with the same operand values as "dequantize, then
// a bf16 GEMM", without materializing Ŵ; the SIMT GEMV keeps Ŵ in f32, the tensor-core one
// multiplies by the codes in the activations' dtype and scales by the f32 absmax.
#include "include/compat.cuh"
#include "include/dtype.cuh"
#include "include/epilogue.cuh"
#include "include/gemm.cuh"
#include "include/grid.cuh"
#include "include/nf4.cuh"
#include "include/ptx.cuh"
#include "params/nf4.h"

namespace {

// ---- dequantize: runs of 16 bytes of output (8 elements of bf16 or f16, 4 of f32) --------

// The codes of the run of kRun / 2 bytes from element e0 (a multiple of kRun), as they lie in
// memory: one load, or for the weight's last run, its bytes up to the last code's (elements
// past numel 0).
template <typename Codes>
FK_DEVICE Codes run_codes(const uint8_t* codes, uint64_t e0, uint64_t numel) {
  constexpr uint64_t kRun = 2 * sizeof(Codes);
  if (e0 + kRun <= numel) return *reinterpret_cast<const Codes*>(codes + e0 / 2);
  Codes c = 0;
  for (uint64_t b = e0 / 2; b < (numel + 1) / 2; ++b) c |= Codes(codes[b]) << (8 * (b - e0 / 2));
  return c;
}

// A warp's lanes take consecutive runs, so that each store instruction writes 512 contiguous
// bytes, whole sectors (runs of 16 elements wrote every other 16 bytes of 1 KB, each sector in
// two halves, two instructions apart), and each load of codes 128 (f32: 64) contiguous bytes.
// A thread takes kRuns runs per pass (r, r + the grid's stride, ...) and loads all their codes
// before their absmaxes: the codes' loads in flight together, not queued behind the absmax's
// dependent chain. The first pass's codes (and its absmaxes' bytes, into L1) go out before
// the block fills its code table and nested map in shared memory, so that those fills and
// their barriers overlap the codes' round trip (most launches give a thread one pass, and the
// block's life is that chain).
// Capped at 48 registers (the entry point), 5 blocks of 256 per SM: left alone, ptxas takes
// 50 for the codes held across the fills, and 4 blocks.
template <typename O>
FK_DEVICE void dequantize(const Nf4DequantizeParams& p) {
  constexpr int kRun = 16 / sizeof(O), kRuns = FK_NF4_DEQUANTIZE_RUNS;
  using Codes = std::conditional_t<kRun == 8, uint32_t, uint16_t>;  // a run's codes
  const uint64_t cols = p.w.cols, numel = uint64_t(p.w.rows) * cols, ld = p.out_ld ? p.out_ld : cols;
  const uint64_t runs = (numel + kRun - 1) / kRun, stride = grid_stride();
  Codes codes[kRuns];
  auto load_codes = [&](uint64_t r0) {
#pragma unroll
    for (int i = 0; i < kRuns; ++i) codes[i] = run_codes<Codes>(p.w.codes, (r0 + i * stride) * kRun, numel);
  };
  const int shift = __ffs(static_cast<int>(p.w.blocksize)) - 1;
  load_codes(grid_start());
  // The first pass's absmax bytes into L1 with its codes: their decode, after the fills,
  // finds them there rather than waiting a round trip of its own.
#pragma unroll
  for (int i = 0; i < kRuns; ++i) {
    const uint64_t r = grid_start() + i * stride;
    if (r >= runs) break;
    nf4_prefetch_absmax(p.w, (r * kRun) >> shift);
  }
  const float* table = shared_code_table();
  const Nf4Weight w = with_shared_map(p.w);
  O* out = static_cast<O*>(p.out);
  // A run stays in one row (and 16-byte aligned there) when rows are contiguous, or when both
  // the row length and the stride allow it.
  const bool whole = ld == cols || (cols % kRun == 0 && ld % kRun == 0);
  auto at = [&](uint64_t e) { return out + (e / cols) * ld + e % cols; };
  for (uint64_t r0 = grid_start(); r0 < runs; r0 += kRuns * stride) {
    if (r0 != grid_start()) load_codes(r0);
    float absmax[kRuns];
#pragma unroll
    for (int i = 0; i < kRuns; ++i) {
      const uint64_t r = r0 + i * stride;
      // kRun divides every blocksize: a run is inside one block.
      absmax[i] = r < runs ? nf4_absmax(w, (r * kRun) >> shift) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < kRuns; ++i) {
      const uint64_t e0 = (r0 + i * stride) * kRun;
      if (e0 >= numel) break;
      float v[kRun];
      nf4_values<kRun>(table, codes[i], absmax[i], v);
      if (e0 + kRun <= numel && whole) {
        store_16_bytes(ld == cols ? out + e0 : at(e0), v);
      } else {
        for (int j = 0; j < kRun && e0 + j < numel; ++j) *at(e0 + j) = from_f32<O>(v[j]);
      }
    }
  }
}

// ---- quantize: one warp per quantization block, as bitsandbytes' kQuantizeBlockwise ----
// With its fast-math arithmetic: max, reciprocal and multiply flush subnormals, and the
// reciprocal is MUFU.RCP's approximation.

template <typename T>
FK_DEVICE void quantize(const Nf4QuantizeParams& p) {
  const T* in = static_cast<const T*>(p.input);
  const uint32_t bs = p.blocksize;
  const uint64_t blocks = (p.numel + bs - 1) / bs;
  const int lane = lane_id();
  // Elements past the end read as 0, as bitsandbytes loads them.
  auto load = [&](uint64_t e) { return e < p.numel ? to_f32(in[e]) : 0.0f; };
  for (uint64_t b = warp_start(); b < blocks; b += warp_stride()) {
    const uint64_t e0 = b * bs;
    float amax = 0.0f;
    bool finite = true;
    for (uint32_t i = lane; i < bs; i += 32) {
      const float x = load(e0 + i);
      amax = max_ftz(amax, fabsf(x));
      finite = finite && is_finite(x);
    }
    amax = warp_max(amax);
    if (!__all_sync(kFullMask, finite) && lane == 0) *p.nonfinite = 1;
    if (lane == 0) p.absmax[b] = amax;
    const float inv = rcp_approx_ftz(amax);
    for (uint32_t i = 2 * lane; i < bs && e0 + i < p.numel; i += 64) {
      const uint32_t hi = nf4_index(mul_ftz(load(e0 + i), inv)), lo = nf4_index(mul_ftz(load(e0 + i + 1), inv));
      p.codes[(e0 + i) / 2] = static_cast<uint8_t>((hi << 4) | lo);
    }
  }
}

// ---- double quantization -----------------------------------------------------------------

// One block: chunk sums in f64 by index order, then their sum in index order.
FK_DEVICE void absmax_mean(const Nf4NestedParams& p) {
  const uint64_t chunks = (p.blocks + FK_NF4_MEAN_CHUNK - 1) / FK_NF4_MEAN_CHUNK;
  for (uint64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    double s = 0.0;
    const uint64_t end = (c + 1) * FK_NF4_MEAN_CHUNK < p.blocks ? (c + 1) * FK_NF4_MEAN_CHUNK : p.blocks;
    for (uint64_t i = c * FK_NF4_MEAN_CHUNK; i < end; ++i) s += static_cast<double>(p.absmax[i]);
    p.chunk_sums[c] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (uint64_t c = 0; c < chunks; ++c) total += p.chunk_sums[c];
    *p.offset = static_cast<float>(total / static_cast<double>(p.blocks));
  }
}

// One warp per 256 absmaxes: bitsandbytes' quantize_blockwise of (absmax - offset).
FK_DEVICE void quantize_nested(const Nf4NestedParams& p) {
  FK_SHARED(map, float[256]);
  for (int i = threadIdx.x; i < 256; i += blockDim.x) map[i] = p.nested_map[i];
  __syncthreads();
  const float offset = *p.offset;
  const int lane = lane_id();
  const uint64_t groups = (p.blocks + FK_NF4_NESTED_BLOCKSIZE - 1) / FK_NF4_NESTED_BLOCKSIZE;
  for (uint64_t g = warp_start(); g < groups; g += warp_stride()) {
    float v[FK_NF4_NESTED_BLOCKSIZE / 32];
    float amax = 0.0f;
    for (int j = 0; j < FK_NF4_NESTED_BLOCKSIZE / 32; ++j) {
      const uint64_t i = g * FK_NF4_NESTED_BLOCKSIZE + lane + 32 * j;
      v[j] = i < p.blocks ? p.absmax[i] - offset : 0.0f;  // torch's IEEE subtraction
      amax = max_ftz(amax, fabsf(v[j]));
    }
    amax = warp_max(amax);
    if (lane == 0) p.nested_absmax[g] = amax;
    const float inv = rcp_approx_ftz(amax);
    for (int j = 0; j < FK_NF4_NESTED_BLOCKSIZE / 32; ++j) {
      const uint64_t i = g * FK_NF4_NESTED_BLOCKSIZE + lane + 32 * j;
      if (i < p.blocks) p.nested_codes[i] = dynamic_index(map, mul_ftz(v[j], inv));
    }
  }
}

// ---- GEMV: out[m, rows] = a[m, cols] · Ŵᵀ for m <= M (decode-sized batches) ------------
//
// Memory-bound on the 4-bit weight, which it reads once. One warp per R weight rows: each
// lane walks 32-element chunks of the rows (one 16-byte load of codes per row and chunk,
// two chunks' loads in flight before any use), reuses each chunk of x across the R rows,
// and the warp sums its lanes at the end (a fixed butterfly: deterministic).
//
// A 32-element chunk lies in one quantization block, so the GEMV sums x·code over the chunk
// and multiplies by the block's absmax once: Ŵ stays in f32 and is never rounded to the
// activations' dtype (a difference from dequantize-then-multiply far below the bound).

template <typename T>
FK_DEVICE void unpack8(const uint4& v, float (&x)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = to_f32(from_bits16<T>(static_cast<unsigned short>(w[i] & 0xFFFF)));
    x[2 * i + 1] = to_f32(from_bits16<T>(static_cast<unsigned short>(w[i] >> 16)));
  }
}

// ---- The GEMVs' epilogue (Nf4GemvEpilogue): a LoRA layer's bias and low-rank term ---------

// Output (m, n)'s term, bias[n] + u[m, :] · b[n, :] in f32 (0 without an epilogue): u's and
// b's rows 8 elements a load where both allow 16-byte loads, else one by one.
template <typename T>
FK_DEVICE float epilogue_term(const Nf4GemvEpilogue& e, uint32_t m, uint32_t n) {
  float s = e.bias ? to_f32(static_cast<const T*>(e.bias)[n]) : 0.0f;
  if (!e.u) return s;
  const T* u = static_cast<const T*>(e.u) + uint64_t(m) * e.rank;
  const T* b = static_cast<const T*>(e.b) + uint64_t(n) * e.rank;
  uint32_t j = 0;
  if ((reinterpret_cast<uintptr_t>(u) | reinterpret_cast<uintptr_t>(b)) % 16 == 0) {
#pragma unroll 4
    for (; j + 8 <= e.rank; j += 8) {
      float uj[8], bj[8];
      unpack8<T>(*reinterpret_cast<const uint4*>(u + j), uj);
      unpack8<T>(*reinterpret_cast<const uint4*>(b + j), bj);
#pragma unroll
      for (int i = 0; i < 8; ++i) s = fmaf(uj[i], bj[i], s);
    }
  }
  for (; j < e.rank; ++j) s = fmaf(to_f32(u[j]), to_f32(b[j]), s);
  return s;
}

// The epilogue's operands of outputs [n0, n1) of the first M rows into L1, a line a thread
// (no loop, so nothing of it stays live): b's rows there (64 lines at rank 256) and their
// bias, then u (its first 190 lines), so that the block's stores, which read them, do not
// wait a round trip each.
template <typename T>
FK_DEVICE void prefetch_epilogue(const Nf4GemvEpilogue& e, uint32_t n0, uint32_t n1, uint32_t M) {
  const uint64_t line = 128ull * threadIdx.x;
  const uint64_t b_bytes = e.u ? uint64_t(n1 - n0) * e.rank * sizeof(T) : 0;
  const uint64_t bias_bytes = e.bias ? uint64_t(n1 - n0) * sizeof(T) : 0;
  const uint64_t u_bytes = e.u ? uint64_t(M) * e.rank * sizeof(T) : 0;
  if (line < b_bytes) {
    prefetch_l1(static_cast<const char*>(e.b) + uint64_t(n0) * e.rank * sizeof(T) + line);
  } else if (threadIdx.x == 64 && bias_bytes) {
    prefetch_l1(static_cast<const T*>(e.bias) + n0);
    prefetch_l1(static_cast<const T*>(e.bias) + n1 - 1);
  } else if (threadIdx.x >= 66 && line - 128 * 66 < u_bytes) {
    prefetch_l1(static_cast<const char*>(e.u) + (line - 128 * 66));
  }
}

template <typename T, int M>
FK_DEVICE void gemv(const Nf4MatmulParams& p) {
  constexpr int R = M <= 4 ? 4 : 2;  // weight rows per warp (fewer when x has many rows)
  constexpr int U = 2;               // chunks in flight per lane
  const float* table = shared_code_table();
  const Nf4Weight w = with_shared_map(p.w);
  const T* a = static_cast<const T*>(p.a);
  T* out = static_cast<T*>(p.out);
  const uint32_t N = w.rows, K = w.cols, chunks = K / 32;
  const int lane = lane_id();
  const bool fast = K % 32 == 0;
  for (uint64_t n0 = warp_start() * R; n0 < N; n0 += warp_stride() * R) {
    float acc[M][R] = {};
    if (fast) {
      for (uint32_t c0 = lane; c0 < chunks; c0 += 32 * U) {
        uint4 codes[U][R];
        float absmax[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const uint32_t c = c0 + 32 * u;
            const bool valid = n0 + r < N && c < chunks;
            const uint64_t e = (n0 + r) * K + 32ull * c;
            codes[u][r] = valid ? *reinterpret_cast<const uint4*>(w.codes + e / 2) : make_uint4(0, 0, 0, 0);
            absmax[u][r] = valid ? nf4_absmax(w, e / w.blocksize) : 0.0f;
          }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const uint32_t c = c0 + 32 * u;
          if (c < chunks) {
            float part[M][R] = {};
#pragma unroll
            for (int s = 0; s < 4; ++s) {  // 8 elements at a time
              float code[R][8];
#pragma unroll
              for (int r = 0; r < R; ++r) {
                const uint4& q = codes[u][r];
                const uint32_t word = s == 0 ? q.x : s == 1 ? q.y : s == 2 ? q.z : q.w;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                  code[r][2 * i] = table[(word >> (8 * i + 4)) & 0xF];
                  code[r][2 * i + 1] = table[(word >> (8 * i)) & 0xF];
                }
              }
#pragma unroll
              for (int m = 0; m < M; ++m) {
                if (m < static_cast<int>(p.m)) {
                  float x[8];
                  unpack8<T>(*reinterpret_cast<const uint4*>(a + uint64_t(m) * K + 32ull * c + 8 * s), x);
#pragma unroll
                  for (int r = 0; r < R; ++r)
#pragma unroll
                    for (int i = 0; i < 8; ++i) part[m][r] = fmaf(x[i], code[r][i], part[m][r]);
                }
              }
            }
#pragma unroll
            for (int m = 0; m < M; ++m)
#pragma unroll
              for (int r = 0; r < R; ++r) acc[m][r] = fmaf(absmax[u][r], part[m][r], acc[m][r]);
          }
        }
      }
    } else {
      for (uint32_t k = lane; k < K; k += 32) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (n0 + r >= N) continue;
          const uint64_t e = (n0 + r) * K + k;
          const float wv = nf4_value(table, nf4_code(w.codes, e), nf4_absmax(w, e / w.blocksize));
#pragma unroll
          for (int m = 0; m < M; ++m)
            if (m < static_cast<int>(p.m)) acc[m][r] = fmaf(to_f32(a[uint64_t(m) * K + k]), wv, acc[m][r]);
        }
      }
    }
    // Every lane gets every sum (a butterfly); lane m·R + r stores output (m, n0 + r), adding
    // the epilogue's term (one copy of its loop, the lanes' terms at once).
    static_assert(M * R <= 32, "a lane per output");
    float mine = 0.0f;
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float sum = warp_sum(acc[m][r]);
        if (lane == m * R + r) mine = sum;
      }
    const uint32_t m = lane / R, r = lane % R;
    if (lane < M * R && m < p.m && n0 + r < N)
      out[uint64_t(m) * N + n0 + r] = from_f32<T>(mine + epilogue_term<T>(p.epilogue, m, n0 + r));
  }
}

// ---- GEMV on tensor cores: out[m, rows] = a[m, cols] · Ŵᵀ for m <= 8·NT -------------------
//
// The same product as the GEMV above with less than half its instructions per weight element
// (about 3.5 in the sm_90a SASS of the loop: a byte extract, an address multiply-add and a
// table lookup per byte of codes; the multiply-adds go to the tensor cores), so that loading
// the 4-bit weight is what bounds it.
//
// A block computes FK_NF4_GEMV_MMA_ROWS (16) weight rows: the mma's A operand, with x as its
// B operand (NT n tiles of 8 activation rows, up to 64; rows past m are never stored). The
// weight is read once whatever m; x, all of it, by every block (from L2: x is a few hundred
// KB), which is what grows with m. In each step of K (64 elements where the blocksize is 64
// or more and K % 64 == 0, else 32) a lane loads 8 bytes of codes (else 4) for each of its two
// A rows (16 consecutive elements, else 8), and each byte, looked up in a table of code pairs,
// is one A register. Which k slot of the mma holds which element does not change the sum as
// long as A and B agree, so the lane's B registers are x at the same elements: two 16-byte
// loads (else one). A step lies inside one quantization block: its mmas' sum is scaled by the
// block's f32 absmax into f32 accumulators. The codes enter the mma rounded to T (bf16: 8
// significant bits), as bitsandbytes' GEMV rounds code × absmax to T; the absmax stays f32.
// The block's warps take interleaved groups of U steps, each warp a group's codes in registers
// while it loads the next group's into the slots they free, and sum their accumulators in
// shared memory in warp order (deterministic).
// Other K (not a multiple of 32) take a scalar loop with the same rounding of the codes.

constexpr int kGemvRows = FK_NF4_GEMV_MMA_ROWS, kGemvWarps = FK_NF4_GEMV_MMA_THREADS / 32;

// pairs[byte · 32 + lane] = {T(code[byte >> 4]), T(code[byte & 15])}, element 2i (the high
// nibble) in the low half as a fragment register holds k below k + 1; one copy per lane, so
// that a warp's 32 lookups fall in 32 different banks. Thread b makes byte b's pair and
// writes its 32 copies, lane l starting at copy l so that each store is conflict-free.
template <typename T>
FK_DEVICE void fill_code_pairs(uint32_t (&pairs)[256 * 32]) {
  static_assert(FK_NF4_GEMV_MMA_THREADS == 256, "a thread per byte value");
  const uint32_t byte = threadIdx.x, lane = lane_id();
  const uint32_t pair = uint32_t(bits16(from_f32<T>(kNf4Code[byte >> 4]))) |
                        uint32_t(bits16(from_f32<T>(kNf4Code[byte & 15]))) << 16;
  for (uint32_t c = 0; c < 32; ++c) pairs[byte * 32 + ((c + lane) & 31)] = pair;
  __syncthreads();
}

// The warp's part of the product over K in steps of 4·E elements (E a lane's elements of a
// row a step: 8, one 4-byte code load a row, or 16, one 8-byte load, where a step of 64 lies
// in one quantization block), into acc[j]: (row g, activation rows 8j + 2t, +1) and (row g + 8,
// the same). Wider loads halve the load instructions a byte of codes takes, and the L1
// wavefronts: each touches 8 weight rows, 16 or 32 bytes of each.
template <typename T, int NT, int E>
FK_DEVICE void gemv_mma_steps(const Nf4MatmulParams& p, uint32_t (&pairs)[256 * 32], float (&acc)[NT][4]) {
  static_assert(E == 8 || E == 16, "a lane's elements of a row a step: 8 or 16");
  constexpr int S = 4 * E;        // a step's elements of a row
  constexpr int U = 256 / S;      // steps in a warp's group (the next group's loading)
  constexpr int kWords = E / 8;   // a lane's 4-byte code words of a row a step
  constexpr int kMmas = E / 4;    // mmas a step (k16 each)
  const T* a = static_cast<const T*>(p.a);
  const uint32_t N = p.w.rows, K = p.w.cols, M = p.m, n0 = blockIdx.x * kGemvRows;
  const int warp = threadIdx.x / 32, lane = lane_id(), g = lane / 4, t = lane % 4;
  // Rows of W past N and of x past M are read as the last real ones: their products land in
  // mma rows and columns that are never stored, so no load needs a bounds check but K's.
  const uint32_t steps = K / S, stride = kGemvWarps * U;
  // Row g's codes at this lane's E elements of step 0, and how far on row g + 8's are.
  const uint8_t* code_row = p.w.codes + (uint64_t(min(n0 + g, N - 1)) * K + E * t) / 2;
  const uint64_t row_gap = uint64_t(min(n0 + g + 8, N - 1) - min(n0 + g, N - 1)) * K / 2;
  // The codes of step s into slot u, for both of this lane's rows.
  uint32_t codes[U][2][kWords];
  auto load_step = [&](uint32_t s, int u) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint8_t* at = code_row + (S / 2) * s + h * row_gap;
      if constexpr (kWords == 2) {
        const uint2 v = *reinterpret_cast<const uint2*>(at);
        codes[u][h][0] = v.x;
        codes[u][h][1] = v.y;
      } else {
        codes[u][h][0] = *reinterpret_cast<const uint32_t*>(at);
      }
    }
  };
  // A group of U steps from s0 into L1 ahead of its use: its x (256 elements of each x row:
  // 4 lines of 128 bytes), which each step reads just before its mma (a miss there would be
  // a round trip per step on the warp's critical path: x is new to each block).
  auto prefetch_x = [&](uint32_t s0) {
    for (uint32_t i = lane; i < 8 * NT * 4; i += 32) {
      const uint32_t k = S * s0 + 64 * (i % 4);
      if (k < K) prefetch_l1(a + uint64_t(min(i / 4, M - 1)) * K + k);
    }
  };
  // The lanes decode a group's 16 × U absmaxes between them: lane l those of row
  // n0 + l % 16 at steps l / 16 + 2i, and passes each to the lanes of its row.
  const int shift = __ffs(static_cast<int>(p.w.blocksize)) - 1;
  const uint64_t absmax_e0 = uint64_t(min(n0 + lane % 16, N - 1)) * K + S * (lane / 16);
  auto absmax_block = [&](uint32_t s0, int i) { return (absmax_e0 + uint64_t(S) * (s0 + 2 * i)) >> shift; };
  // The absmaxes' bytes of the group at s0 into L1 (their first and last: a run of a few
  // bytes, or floats), so that its decode at the group's start finds them there. Whole
  // groups only: a group cut short by K's end has no blocks past its last step (none past
  // the weight's last, on its last row).
  auto prefetch_absmax = [&](uint32_t s0) {
    if (s0 + U > steps) return;
    nf4_prefetch_absmax(p.w, absmax_block(s0, 0));
    nf4_prefetch_absmax(p.w, absmax_block(s0, U / 2 - 1));
  };
  // The warp's first group goes out (its codes, and its x and absmaxes into L1) before the
  // block fills its code-pair table and nested map in shared memory, so that those fills and
  // their barriers overlap the loads' round trip.
  // Each later group's codes are loaded a group ahead, slot by slot as the group before frees
  // them (group()), so that a warp always has a group's loads in flight while it computes.
  const uint32_t first = warp * U;
  prefetch_x(first);
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (first + u < steps) load_step(first + u, u);
  if (first < steps) prefetch_absmax(first);
  prefetch_epilogue<T>(p.epilogue, n0, min(n0 + kGemvRows, N), M);
  fill_code_pairs<T>(pairs);
  const Nf4Weight w = with_shared_map(p.w);
  const uint32_t* lane_pairs = pairs + lane;
  auto pair = [&](uint32_t byte) { return ld_shared_u32(lane_pairs, byte * 32); };  // this lane's copy
  const T* x_row[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) x_row[j] = a + uint64_t(min(uint32_t(8 * j + g), M - 1)) * K + E * t;
  // The group at s0, its codes in `codes`; only the last group of a warp (kTail) may pass K's
  // end. Each slot, once read, takes the same step of the group at `next`.
  auto group = [&](uint32_t s0, uint32_t next, auto tail) {
    constexpr bool kTail = decltype(tail)::value;
    auto live = [&](uint32_t s) { return !kTail || s < steps; };  // warp-uniform
    float scale[U / 2];
#pragma unroll
    for (int i = 0; i < U / 2; ++i) scale[i] = live(s0 + lane / 16 + 2 * i) ? nf4_absmax(w, absmax_block(s0, i)) : 0.0f;
    if (next < steps) {
      prefetch_x(next);
      prefetch_absmax(next);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!live(s0 + u)) break;
      const float scale_lo = __shfl_sync(kFullMask, scale[u / 2], g + 16 * (u % 2));
      const float scale_hi = __shfl_sync(kFullMask, scale[u / 2], g + 8 + 16 * (u % 2));
      // mma h takes bytes 2h (its k slots 2t, 2t+1) and 2h+1 (2t+8, 2t+9) of each row's
      // codes: elements 4h to 4h + 3 of the lane's E, which its x registers hold alike.
      uint32_t af[kMmas][4];
#pragma unroll
      for (int h = 0; h < kMmas; ++h)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int byte = 2 * h + i / 2;
          af[h][i] = pair(__byte_perm(codes[u][i % 2][byte / 4], 0, 0x4440 + byte % 4));  // zero-extended
        }
      if (next + u < steps) load_step(next + u, u);
      // A fence for ptxas's scheduler: it would otherwise put these loads, whose values only
      // the next group reads, after all of this group's mmas, and their round trip back on
      // the warp's path (it costs a NOP; the SASS keeps each step's loads in its step).
      __syncwarp();
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        uint32_t x[E / 2];
#pragma unroll
        for (int q = 0; q < E / 8; ++q) {
          const uint4 v = *reinterpret_cast<const uint4*>(x_row[j] + S * (s0 + u) + 8 * q);
          x[4 * q] = v.x, x[4 * q + 1] = v.y, x[4 * q + 2] = v.z, x[4 * q + 3] = v.w;
        }
        float part[4] = {};
#pragma unroll
        for (int h = 0; h < kMmas; ++h) {
          const uint32_t b[2] = {x[2 * h], x[2 * h + 1]};
          gemm::mma<T>(part, af[h], b);
        }
        acc[j][0] = fmaf(scale_lo, part[0], acc[j][0]);
        acc[j][1] = fmaf(scale_lo, part[1], acc[j][1]);
        acc[j][2] = fmaf(scale_hi, part[2], acc[j][2]);
        acc[j][3] = fmaf(scale_hi, part[3], acc[j][3]);
      }
    }
  };
  for (uint32_t s0 = first; s0 < steps; s0 += stride) {
    if (s0 + U <= steps) {
      group(s0, s0 + stride, std::false_type{});
    } else {
      group(s0, s0 + stride, std::true_type{});
    }
  }
}

template <typename T, int NT>
FK_DEVICE void gemv_mma(const Nf4MatmulParams& p) {
  FK_SHARED(pairs, uint32_t[256 * 32]);
  T* out = static_cast<T*>(p.out);
  const uint32_t N = p.w.rows, K = p.w.cols, M = p.m, n0 = blockIdx.x * kGemvRows;
  const int warp = threadIdx.x / 32, lane = lane_id(), g = lane / 4, t = lane % 4;
  if (K % 32 != 0) {
    const T* a = static_cast<const T*>(p.a);
    fill_code_pairs<T>(pairs);
    const Nf4Weight w = with_shared_map(p.w);
    const uint32_t* lane_pairs = pairs + lane;
    auto pair = [&](uint32_t byte) { return ld_shared_u32(lane_pairs, byte * 32); };  // this lane's copy
    // Scalar: warp w takes rows 2w and 2w + 1 whole, 8 activation rows at a time, its
    // lanes striding over K.
    for (uint32_t i = 0; i < 2 * NT; ++i) {
      const uint32_t r = n0 + 2 * warp + i % 2, m0 = 8 * (i / 2);
      if (r >= N || m0 >= M) continue;
      float sum[8] = {};
      for (uint32_t k = lane; k < K; k += 32) {
        const uint64_t e = uint64_t(r) * K + k;
        const uint32_t code = pair(nf4_code(w.codes, e) << 4) & 0xFFFF;
        const float wv = to_f32(from_bits16<T>(static_cast<unsigned short>(code))) * nf4_absmax(w, e / w.blocksize);
#pragma unroll
        for (uint32_t m = 0; m < 8; ++m)
          if (m0 + m < M) sum[m] = fmaf(to_f32(a[uint64_t(m0 + m) * K + k]), wv, sum[m]);
      }
      // Lane m stores activation row m0 + m's output, as the SIMT GEMV's lanes do.
      float mine = 0.0f;
#pragma unroll
      for (int m = 0; m < 8; ++m) {
        const float s = warp_sum(sum[m]);
        if (lane == m) mine = s;
      }
      if (lane < 8 && m0 + lane < M)
        out[uint64_t(m0 + lane) * N + r] = from_f32<T>(mine + epilogue_term<T>(p.epilogue, m0 + lane, r));
    }
    return;
  }
  float acc[NT][4] = {};
  if (p.w.blocksize >= 64 && K % 64 == 0) {
    gemv_mma_steps<T, NT, 16>(p, pairs, acc);
  } else {
    gemv_mma_steps<T, NT, 8>(p, pairs, acc);
  }
  // The warps' sums go where the pair table was, as its words' bits, once every warp is done
  // with it (static shared memory stays under 48 KB with 64 activation rows). A warp's sums
  // lie activation row by activation row, its 16 weight rows' together, so that the reads
  // below (a thread per output, weight rows fastest) take 32 banks.
  using Partials = uint32_t[kGemvWarps][8 * NT][kGemvRows];
  static_assert(sizeof(Partials) <= sizeof(pairs), "the partial sums fit in the pair table");
  Partials& partial = *reinterpret_cast<Partials*>(&pairs);
  __syncthreads();
  // acc[j] holds (row g, activation rows 8j + 2t, +1) and (row g + 8, the same).
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][8 * j + 2 * t + i % 2][g + 8 * (i / 2)] = __float_as_uint(acc[j][i]);
  __syncthreads();
  for (int i = threadIdx.x; i < kGemvRows * 8 * NT; i += blockDim.x) {
    const uint32_t m = i / kGemvRows, r = i % kGemvRows;
    if (m < M && n0 + r < N) {
      float s = 0.0f;
      for (int v = 0; v < kGemvWarps; ++v) s += __uint_as_float(partial[v][m][r]);
      out[uint64_t(m) * N + n0 + r] = from_f32<T>(s + epilogue_term<T>(p.epilogue, m, n0 + r));
    }
  }
}

// ---- dX GEMV: out[m, cols] = a[m, rows] · Ŵ for m <= M (a backward at decode sizes) ------
//
// dX sums over W's rows, which lie apart in memory, so no lane can own an output and walk its
// sum alone, as the forward GEMVs' lanes do. A block takes a slab of 32·C columns and one
// split of the rows (grid: slabs × p.row_splits): lane l keeps the sums of its C consecutive
// columns for each of the M activation rows, and the block's warps take the split's rows in
// turn (warp w: rows w, w + 8, ..., U at a time with their loads in flight together). A row
// is one load of the lane's C / 2 bytes of codes (all in one quantization block), its absmax
// and a[:, n]; each code's table value then goes into M sums. The warps' sums meet in shared
// memory in a fixed order and the block stores its slab of its split's f32 partial, which
// nf4_gemv_dx_reduce adds over the splits in order, rounding once: deterministic, no atomics.
// As the memory-bound 1-row case needs bytes in flight and 16 rows need registers for their
// sums, C shrinks as M grows (M·C ≤ 64 sums a lane): 16-byte code loads for M ≤ 2, 2-byte ones
// at 16. Ŵ stays in f32 (code · absmax), never rounded to T; where M < C the absmax scales
// a[m, n] once a row rather than each code. Other K (not a multiple of C) take each element's
// code and absmax on its own.

// A lane's C codes of one row (C / 2 bytes, aligned to them) as 32-bit words, as they lie in
// memory: element 2i in byte i's high nibble.
template <int C>
FK_DEVICE void load_codes(const uint8_t* src, uint32_t (&words)[(C + 7) / 8]) {
  if constexpr (C == 32) {
    const uint4 v = *reinterpret_cast<const uint4*>(src);
    words[0] = v.x, words[1] = v.y, words[2] = v.z, words[3] = v.w;
  } else if constexpr (C == 16) {
    const uint2 v = *reinterpret_cast<const uint2*>(src);
    words[0] = v.x, words[1] = v.y;
  } else if constexpr (C == 8) {
    words[0] = *reinterpret_cast<const uint32_t*>(src);
  } else {
    static_assert(C == 4, "2, 4, 8 or 16 bytes of codes");
    words[0] = *reinterpret_cast<const uint16_t*>(src);
  }
}

// The table value of code j (0..7) of a word of codes: the byte offset of its table entry,
// code · 4, taken from the word with both nibbles of each byte moved to bits 2..5 (two
// operations for the word's eight codes, which the compiler shares), then one byte extract
// and the lookup a code.
FK_DEVICE float code_value(const float* table, uint32_t word, int j) {
  const uint32_t offsets = (j % 2 ? word << 2 : word >> 2) & 0x3C3C3C3Cu;
  const uint32_t offset = (offsets >> (8 * (j / 2))) & 0xFF;
  return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(table) + offset);
}

template <typename T, int M>
FK_DEVICE void gemv_dx(const Nf4MatmulParams& p) {
  constexpr int C = M <= 2 ? 32 : 64 / M;  // columns a lane
  constexpr int U = M >= 16 ? 1 : M >= 8 ? 2 : 4;  // rows a warp loads into registers at once
  constexpr int kWarps = FK_NF4_GEMV_DX_THREADS / 32, kSlab = 32 * C;
  constexpr bool kFold = M < C;  // absmax into a[m, n] (M multiplies a row), not into each code
  static_assert(kWarps == 8, "the warps' sums meet in two rounds of four");
  const float* table = shared_code_table();
  const Nf4Weight w = with_shared_map(p.w);
  const T* a = static_cast<const T*>(p.a);
  const uint32_t N = w.rows, K = w.cols;
  const int lane = lane_id(), warp = threadIdx.x / 32;
  const uint32_t col0 = blockIdx.x * kSlab + lane * C;
  const uint32_t per_split = (N + p.row_splits - 1) / p.row_splits;
  const uint32_t n_begin = blockIdx.y * per_split, n_end = min(N, n_begin + per_split);
  const int shift = __ffs(static_cast<int>(w.blocksize)) - 1;
  float acc[M][C] = {};
  auto row_of_a = [&](uint32_t n, bool valid, float (&dy)[M]) {
#pragma unroll
    for (int m = 0; m < M; ++m) dy[m] = valid && m < static_cast<int>(p.m) ? to_f32(a[uint64_t(m) * N + n]) : 0.0f;
  };
  if (K % C == 0) {
    // The rows kAhead iterations on go into L1 (their codes' lines, a line a lane, and the
    // lanes' absmax bytes) while this one's load: at 8 and 16 activation rows a lane loads 4
    // or 2 bytes of codes for each of only two rows at once (their sums fill the registers),
    // too few bytes in flight on their own to keep DRAM busy.
    constexpr int kAhead = 16 / U, kLines = C >= 8 ? C / 8 : 1;  // a warp's row: 16·C bytes
    const uint32_t slab0 = blockIdx.x * kSlab;
    auto prefetch_rows = [&](uint32_t first) {
      const uint32_t n = first + kWarps * (lane / kLines), col = slab0 + 256 * (lane % kLines);
      if (lane < U * kLines && n < n_end && col < K) prefetch_l1(w.codes + (uint64_t(n) * K + col) / 2);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const uint32_t row = first + kWarps * u;
        if (row < n_end && col0 < K) nf4_prefetch_absmax(w, (uint64_t(row) * K + col0) >> shift);
      }
    };
    for (int d = 0; d < kAhead; ++d) prefetch_rows(n_begin + warp + kWarps * U * d);
    for (uint32_t n0 = n_begin + warp; col0 < K && n0 < n_end; n0 += kWarps * U) {
      // Every row's codes in flight before any absmax's dependent loads; rows past the split
      // read row n0's bytes again (no branch to keep the loads apart) and count for 0.
      uint32_t codes[U][(C + 7) / 8];
      float absmax[U], dy[U][M];
      uint64_t e[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const uint32_t n = n0 + kWarps * u;
        e[u] = uint64_t(n < n_end ? n : n0) * K + col0;
        load_codes<C>(w.codes + e[u] / 2, codes[u]);
      }
      // (Without the prefetches between them, ptxas issued each absmax's chain, its code
      // byte then the nested map, ahead of the code loads above, a DRAM round trip before
      // them; with them, the SASS has the code loads first, and the chains find L1.)
      prefetch_rows(n0 + kWarps * U * kAhead);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const uint32_t n = n0 + kWarps * u;
        const float s = nf4_absmax(w, e[u] >> shift);
        absmax[u] = n < n_end ? s : 0.0f;
        row_of_a(n, n < n_end, dy[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (kFold) {
#pragma unroll
          for (int m = 0; m < M; ++m) dy[u][m] *= absmax[u];
        }
#pragma unroll
        for (int i = 0; i < C; ++i) {
          const float code = code_value(table, codes[u][i / 8], i % 8);
          const float v = kFold ? code : mul_ftz(code, absmax[u]);
#pragma unroll
          for (int m = 0; m < M; ++m) acc[m][i] = fmaf(dy[u][m], v, acc[m][i]);
        }
      }
    }
  } else {
    // Rows need not start on a byte, nor a lane's columns lie in one block: each element's
    // own code and absmax, a row at a time.
    for (uint32_t n = n_begin + warp; col0 < K && n < n_end; n += kWarps) {
      float dy[M];
      row_of_a(n, true, dy);
#pragma unroll
      for (int i = 0; i < C; ++i) {
        if (col0 + i >= K) continue;
        const uint64_t e = uint64_t(n) * K + col0 + i;
        const float v = nf4_value(table, nf4_code(w.codes, e), nf4_absmax(w, e >> shift));
#pragma unroll
        for (int m = 0; m < M; ++m) acc[m][i] = fmaf(dy[m], v, acc[m][i]);
      }
    }
  }
  // The eight warps' sums: warp w + 4's added into warp w's, then (0 + 1) + (2 + 3).
  FK_SHARED(sums, float[4][M * kSlab]);
  auto move = [&](int slot, bool add) {
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int i = 0; i < C; i += 4) {
        float4* s = reinterpret_cast<float4*>(&sums[slot][m * kSlab + lane * C + i]);
        if (add) {
          const float4 o = *s;
          acc[m][i] += o.x, acc[m][i + 1] += o.y, acc[m][i + 2] += o.z, acc[m][i + 3] += o.w;
        }
        *s = make_float4(acc[m][i], acc[m][i + 1], acc[m][i + 2], acc[m][i + 3]);
      }
  };
  if (warp >= 4) move(warp - 4, false);
  __syncthreads();
  if (warp < 4) move(warp, true);
  __syncthreads();
  float* partial = p.partials + uint64_t(blockIdx.y) * p.m * K;
  for (int o = threadIdx.x; o < M * kSlab; o += FK_NF4_GEMV_DX_THREADS) {
    const uint32_t m = o / kSlab, col = blockIdx.x * kSlab + o % kSlab;
    if (m < p.m && col < K) partial[uint64_t(m) * K + col] = (sums[0][o] + sums[1][o]) + (sums[2][o] + sums[3][o]);
  }
}

// The dX GEMV's splits added in split order and rounded once: out[m, cols] = Σ_s partials[s].
template <typename T>
FK_DEVICE void gemv_dx_reduce(const Nf4MatmulParams& p) {
  const uint64_t numel = uint64_t(p.m) * p.w.cols;
  T* out = static_cast<T*>(p.out);
  for (uint64_t i = grid_start(); i < numel; i += grid_stride()) {
    float sum = 0.0f;
    for (uint32_t s = 0; s < p.row_splits; ++s) sum += p.partials[s * numel + i];
    out[i] = from_f32<T>(sum);
  }
}

// ---- GEMM on tensor cores (gemm.cuh) ------------------------------------------------------
//
// out[M, Nout] = a[M, Kr] · B[Kr, Nout] with B = Ŵᵀ (forward: Nout = rows, Kr = cols) or
// B = Ŵ (Dx, the backward: Nout = cols, Kr = rows): the weight is dequantized on its way
// into shared memory (Nf4Source, nf4.cuh) and never materialized.

template <typename T, bool Dx>
FK_DEVICE void gemm_kernel(const Nf4MatmulParams& p) {
  using namespace gemm;
  FK_SHARED(st, Stages<true, !Dx>);
  const float* table = shared_code_table();
  const uint32_t M = p.m, Nout = Dx ? p.w.cols : p.w.rows, Kr = Dx ? p.w.rows : p.w.cols;
  const uint32_t m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  DenseSource<T, true, kBM> a{static_cast<const T*>(p.a), Kr, m0, M, Kr};
  Nf4Source<T, !Dx> b{p.w, table, n0};
  Accumulators acc = {};
  run_segment<T>(acc, st, a, b, 0, Kr);
  store(acc, static_cast<T*>(p.out), Nout, m0, n0, M, Nout);
}

// ---- GEMM on wgmma (wgmma.cuh, Hopper) ----------------------------------------------------
//
// The same products with Ŵ an Nf4Operand (nf4.cuh), dequantized into each stage while an
// earlier stage's wgmmas run: the forward's tile is y's (a's rows by W's), Ŵ wgmma's B; the
// backward's is dXᵀ's (W's columns by dY's rows), so that W is read as it lies as wgmma's A.
// The activations come in by TMA where the host encoded their map.

template <typename T, bool Dx>
FK_DEVICE void gemm_wgmma(const Nf4MatmulParams& p) {
  const Nf4Weight w = with_shared_map(p.w);
  const float* table = shared_code_table();
  const T* a = static_cast<const T*>(p.a);
  T* out = static_cast<T*>(p.out);
  const uint32_t M = p.m, Kr = Dx ? w.rows : w.cols;
  const FkTensorMap* a_map = p.a_tma ? &p.a_map : nullptr;
  unsigned char* smem = dyn_smem<unsigned char>();
  wgmma::Accumulators acc = {};
  if constexpr (Dx) {
    // dXᵀ's tiles (W's columns by dY's rows), those along dX's columns first (sharing dY's
    // rows).
    const wgmma::Schedule tiles(w.cols, M, false);
    auto seg = wgmma::segment(Nf4Operand<T, false>{w, table, 0, Kr}, wgmma::Rows<T>{{a, Kr, 0, M, Kr, a_map}});
    wgmma::run_tiles<T>(acc, smem, tiles, [&](int i, wgmma::Accumulators& tile, const wgmma::Staging& st) {
      const uint2 o = tiles.origin(i);
      wgmma::store_tile<T, true>(tile, st, out, w.cols, o.y, o.x, M, w.cols);
    }, seg);
  } else {
    // y's tiles (a's rows by W's), those along y's columns first (sharing a's rows).
    const wgmma::Schedule tiles(M, w.rows, true);
    auto seg = wgmma::segment(wgmma::Rows<T>{{a, Kr, 0, M, Kr, a_map}}, Nf4Operand<T, true>{w, table, 0, Kr});
    wgmma::run_tiles<T>(acc, smem, tiles, [&](int i, wgmma::Accumulators& tile, const wgmma::Staging& st) {
      const uint2 o = tiles.origin(i);
      wgmma::store_tile<T, false>(tile, st, out, w.rows, o.x, o.y, M, w.rows);
    }, seg);
  }
}

}  // namespace

// ---- entry points: <op>_<dtype> -----------------------------------------------------------

#define FK_NF4_DTYPE_ENTRIES(T, t)                                                          \
  FK_KERNEL_REGS(nf4_dequantize_##t, Nf4DequantizeParams, 256, 48) { dequantize<T>(p); }     \
  FK_KERNEL(nf4_quantize_##t, Nf4QuantizeParams) { quantize<T>(p); }

FK_NF4_DTYPE_ENTRIES(__nv_bfloat16, bf16)
FK_NF4_DTYPE_ENTRIES(__half, f16)
FK_NF4_DTYPE_ENTRIES(float, f32)

FK_KERNEL(nf4_absmax_mean, Nf4NestedParams) { absmax_mean(p); }
FK_KERNEL(nf4_quantize_nested, Nf4NestedParams) { quantize_nested(p); }

#define FK_NF4_MATMUL_ENTRIES(T, t)                                                         \
  FK_KERNEL(nf4_gemv_##t##_m1, Nf4MatmulParams) { gemv<T, 1>(p); }                          \
  FK_KERNEL(nf4_gemv_##t##_m2, Nf4MatmulParams) { gemv<T, 2>(p); }                          \
  FK_KERNEL(nf4_gemv_##t##_m4, Nf4MatmulParams) { gemv<T, 4>(p); }                          \
  FK_KERNEL(nf4_gemv_##t##_m8, Nf4MatmulParams) { gemv<T, 8>(p); }                          \
  FK_KERNEL(nf4_gemv_##t##_m16, Nf4MatmulParams) { gemv<T, 16>(p); }                        \
  FK_KERNEL_REGS(nf4_gemv_mma_##t##_m8, Nf4MatmulParams, FK_NF4_GEMV_MMA_THREADS, 80) { gemv_mma<T, 1>(p); } \
  FK_KERNEL_REGS(nf4_gemv_mma_##t##_m16, Nf4MatmulParams, FK_NF4_GEMV_MMA_THREADS, 128) { gemv_mma<T, 2>(p); } \
  FK_KERNEL_BOUNDS(nf4_gemv_mma_##t##_m32, Nf4MatmulParams, FK_NF4_GEMV_MMA_THREADS) { gemv_mma<T, 4>(p); } \
  FK_KERNEL_BOUNDS(nf4_gemv_mma_##t##_m64, Nf4MatmulParams, FK_NF4_GEMV_MMA_THREADS) { gemv_mma<T, 8>(p); } \
  FK_KERNEL_REGS(nf4_gemv_dx_##t##_m1, Nf4MatmulParams, FK_NF4_GEMV_DX_THREADS, 128) { gemv_dx<T, 1>(p); } \
  FK_KERNEL_REGS(nf4_gemv_dx_##t##_m2, Nf4MatmulParams, FK_NF4_GEMV_DX_THREADS, 128) { gemv_dx<T, 2>(p); } \
  FK_KERNEL_REGS(nf4_gemv_dx_##t##_m4, Nf4MatmulParams, FK_NF4_GEMV_DX_THREADS, 128) { gemv_dx<T, 4>(p); } \
  FK_KERNEL_REGS(nf4_gemv_dx_##t##_m8, Nf4MatmulParams, FK_NF4_GEMV_DX_THREADS, 128) { gemv_dx<T, 8>(p); } \
  FK_KERNEL_REGS(nf4_gemv_dx_##t##_m16, Nf4MatmulParams, FK_NF4_GEMV_DX_THREADS, 128) { gemv_dx<T, 16>(p); } \
  FK_KERNEL(nf4_gemv_dx_reduce_##t, Nf4MatmulParams) { gemv_dx_reduce<T>(p); }               \
  FK_KERNEL_BOUNDS(nf4_gemm_##t, Nf4MatmulParams, gemm::kThreads) { gemm_kernel<T, false>(p); } \
  FK_KERNEL_BOUNDS(nf4_gemm_dx_##t, Nf4MatmulParams, gemm::kThreads) { gemm_kernel<T, true>(p); } \
  FK_KERNEL_TMA(nf4_gemm_wgmma_##t, Nf4MatmulParams, wgmma::kThreads) { gemm_wgmma<T, false>(p); } \
  FK_KERNEL_TMA(nf4_gemm_dx_wgmma_##t, Nf4MatmulParams, wgmma::kThreads) { gemm_wgmma<T, true>(p); }

FK_NF4_MATMUL_ENTRIES(__nv_bfloat16, bf16)
FK_NF4_MATMUL_ENTRIES(__half, f16)
