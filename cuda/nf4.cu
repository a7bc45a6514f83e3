// NF4 kernels: bitsandbytes-exact quantization (with double quantization), dequantization,
// and matmuls through the frozen NF4 weight with the dequantization fused into the load:
// a GEMV for decode-sized batches and a tensor-core GEMM for the forward (y = x·Ŵᵀ) and
// the backward (dX = dY·Ŵ).
// Reference: src/reference/nf4.rs. Wrapper: src/nf4/mod.rs. Tests: tests/nf4_kernels.rs.
//
// Ŵ is the weight dequantized to the activations' dtype (exactly what nf4_dequantize
// writes), so every matmul here computes with the same operand values as "dequantize, then
// a bf16 GEMM", without materializing Ŵ.
#include "include/compat.cuh"
#include "include/dtype.cuh"
#include "include/grid.cuh"
#include "include/nf4.cuh"
#include "include/ptx.cuh"
#include "params/nf4.h"

namespace {

// The code table in shared memory: lookups by divergent indices would serialize on the
// constant cache.
FK_DEVICE float* shared_code_table() {
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = kNf4Code[threadIdx.x];
  __syncthreads();
  return table;
}

// ---- dequantize: 16 elements per thread (one 8-byte load; 16 divides every blocksize) ----

template <typename O>
FK_DEVICE void store16(O* dst, const float (&v)[16]) {
  if constexpr (sizeof(O) == 4) {
    for (int i = 0; i < 16; i += 4)
      *reinterpret_cast<float4*>(dst + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
  } else {
    uint32_t packed[8];
    for (int i = 0; i < 8; ++i)
      packed[i] = uint32_t(bits16(from_f32<O>(v[2 * i]))) | (uint32_t(bits16(from_f32<O>(v[2 * i + 1]))) << 16);
    *reinterpret_cast<uint4*>(dst) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    *reinterpret_cast<uint4*>(dst + 8) = make_uint4(packed[4], packed[5], packed[6], packed[7]);
  }
}

template <typename O>
FK_DEVICE void dequantize(const Nf4DequantizeParams& p) {
  const float* table = shared_code_table();
  const uint64_t numel = uint64_t(p.w.rows) * p.w.cols;
  O* out = static_cast<O*>(p.out);
  for (uint64_t g = grid_start(); g < (numel + 15) / 16; g += grid_stride()) {
    const uint64_t e0 = g * 16;
    const float absmax = nf4_absmax(p.w, e0 / p.w.blocksize);
    if (e0 + 16 <= numel) {
      const uint2 bytes = *reinterpret_cast<const uint2*>(p.w.codes + e0 / 2);
      float v[16];
      for (int i = 0; i < 8; ++i) {
        const uint32_t byte = ((i < 4 ? bytes.x : bytes.y) >> (8 * (i % 4))) & 0xFF;
        v[2 * i] = nf4_value(table, byte >> 4, absmax);
        v[2 * i + 1] = nf4_value(table, byte & 0xF, absmax);
      }
      store16(out + e0, v);
    } else {
      for (uint64_t e = e0; e < numel; ++e) out[e] = from_f32<O>(nf4_value(table, nf4_code(p.w.codes, e), absmax));
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
  __shared__ float map[256];
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

// The nested map in shared memory (absmax lookups by divergent index), when nested.
FK_DEVICE Nf4Weight with_shared_map(Nf4Weight w) {
  __shared__ float map[256];
  if (w.nested) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) map[i] = w.nested_map[i];
    __syncthreads();
    w.nested_map = map;
  }
  return w;
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
          const float wv = table[nf4_code(w.codes, e)] * nf4_absmax(w, e / w.blocksize);
#pragma unroll
          for (int m = 0; m < M; ++m)
            if (m < static_cast<int>(p.m)) acc[m][r] = fmaf(to_f32(a[uint64_t(m) * K + k]), wv, acc[m][r]);
        }
      }
    }
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float sum = warp_sum(acc[m][r]);
        if (lane == 0 && m < static_cast<int>(p.m) && n0 + r < N) out[uint64_t(m) * N + n0 + r] = from_f32<T>(sum);
      }
  }
}

// ---- GEMM on tensor cores --------------------------------------------------------------
//
// out[M, Nout] = a[M, Kr] · B[Kr, Nout] with B = Ŵᵀ (forward: Nout = rows, Kr = cols) or
// B = Ŵ (Dx, the backward: Nout = cols, Kr = rows). A 128×128 output tile per block of 8
// warps (each 64×32), K in steps of 32, two shared-memory stages: the next A tile streams
// in with cp.async and the next W codes are loaded to registers while the current stage
// is multiplied; the codes are dequantized into shared memory after.

constexpr int kBM = 128, kBN = 128, kBK = 32, kThreads = 256, kPad = 8;

// A tile: [kBM][kBK] of a[M][Kr], zero past the edges.
template <typename T>
FK_DEVICE void load_a_tile(uint16_t (*As)[kBK + kPad], const T* a, uint32_t M, uint32_t Kr, uint32_t m0,
                           uint32_t k0) {
  if (Kr % 8 == 0) {  // rows are 16-byte aligned: cp.async in 16-byte chunks
    for (int c = threadIdx.x; c < kBM * kBK / 8; c += kThreads) {
      const int r = c / (kBK / 8), col = (c % (kBK / 8)) * 8;
      const bool in = m0 + r < M && k0 + col < Kr;
      const T* src = in ? a + uint64_t(m0 + r) * Kr + k0 + col : a;
      cp_async_zfill16(&As[r][col], src, in ? 16 : 0);
    }
  } else {
    for (int i = threadIdx.x; i < kBM * kBK; i += kThreads) {
      const int r = i / kBK, col = i % kBK;
      const bool in = m0 + r < M && k0 + col < Kr;
      As[r][col] = in ? bits16(a[uint64_t(m0 + r) * Kr + k0 + col]) : 0;
    }
  }
}

// 16 consecutive weight elements of one W row, fetched ahead of their dequantization.
struct WeightChunk {
  uint2 codes;
  float absmax;
  bool valid;
};

// Which W row and column chunk thread t covers in the B tile: forward tiles are
// [kBN rows of W][kBK cols], backward tiles [kBK rows of W][kBN cols].
template <bool Dx>
FK_DEVICE void chunk_of_thread(int t, int* tile_row, int* tile_col) {
  if (Dx) {
    *tile_row = t / (kBN / 16);
    *tile_col = (t % (kBN / 16)) * 16;
  } else {
    *tile_row = t / (kBK / 16);
    *tile_col = (t % (kBK / 16)) * 16;
  }
}

// W rows/cols of the tile's origin: forward (n0 over rows, k0 over cols), backward
// (k0 over rows, n0 over cols).
template <bool Dx>
FK_DEVICE void weight_origin(uint32_t n0, uint32_t k0, uint32_t* row0, uint32_t* col0) {
  *row0 = Dx ? k0 : n0;
  *col0 = Dx ? n0 : k0;
}

template <bool Dx>
FK_DEVICE WeightChunk fetch_weight_chunk(const Nf4Weight& w, uint32_t n0, uint32_t k0) {
  int tr, tc;
  chunk_of_thread<Dx>(threadIdx.x, &tr, &tc);
  uint32_t row0, col0;
  weight_origin<Dx>(n0, k0, &row0, &col0);
  const uint32_t row = row0 + tr, col = col0 + tc;
  WeightChunk c{make_uint2(0, 0), 0.0f, row < w.rows && col < w.cols};
  if (c.valid) {
    const uint64_t e = uint64_t(row) * w.cols + col;  // cols % 16 == 0: one block, 8-byte aligned
    c.codes = *reinterpret_cast<const uint2*>(w.codes + e / 2);
    c.absmax = nf4_absmax(w, e / w.blocksize);
  }
  return c;
}

template <typename T, bool Dx, typename BTile>
FK_DEVICE void store_weight_chunk(BTile Bs, const float* table, const WeightChunk& c) {
  int tr, tc;
  chunk_of_thread<Dx>(threadIdx.x, &tr, &tc);
  uint32_t packed[8] = {};
  if (c.valid) {
    for (int i = 0; i < 8; ++i) {
      const uint32_t byte = ((i < 4 ? c.codes.x : c.codes.y) >> (8 * (i % 4))) & 0xFF;
      const unsigned short first = bits16(from_f32<T>(nf4_value(table, byte >> 4, c.absmax)));
      const unsigned short second = bits16(from_f32<T>(nf4_value(table, byte & 0xF, c.absmax)));
      packed[i] = uint32_t(first) | (uint32_t(second) << 16);
    }
  }
  *reinterpret_cast<uint4*>(&Bs[tr][tc]) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  *reinterpret_cast<uint4*>(&Bs[tr][tc + 8]) = make_uint4(packed[4], packed[5], packed[6], packed[7]);
}

// Any shape: element by element.
template <typename T, bool Dx, typename BTile>
FK_DEVICE void load_weight_tile_generic(BTile Bs, const float* table, const Nf4Weight& w, uint32_t n0, uint32_t k0) {
  uint32_t row0, col0;
  weight_origin<Dx>(n0, k0, &row0, &col0);
  constexpr int rows = Dx ? kBK : kBN, cols = Dx ? kBN : kBK;
  for (int i = threadIdx.x; i < rows * cols; i += kThreads) {
    const int tr = i / cols, tc = i % cols;
    const uint32_t row = row0 + tr, col = col0 + tc;
    unsigned short v = 0;
    if (row < w.rows && col < w.cols) {
      const uint64_t e = uint64_t(row) * w.cols + col;
      v = bits16(from_f32<T>(nf4_value(table, nf4_code(w.codes, e), nf4_absmax(w, e / w.blocksize))));
    }
    Bs[tr][tc] = v;
  }
}

template <typename T>
FK_DEVICE void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (sizeof(T) == 2 && std::is_same<T, __half>::value) {
    mma_m16n8k16_f16(d, a, b, d);
  } else {
    mma_m16n8k16_bf16(d, a, b, d);
  }
}

template <typename T, bool Dx>
FK_DEVICE void gemm(const Nf4MatmulParams& p) {
  __shared__ __align__(16) uint16_t As[2][kBM][kBK + kPad];
  __shared__ __align__(16) uint16_t Bs[2][Dx ? kBK : kBN][(Dx ? kBN : kBK) + kPad];
  const float* table = shared_code_table();
  const T* a = static_cast<const T*>(p.a);
  T* out = static_cast<T*>(p.out);
  const uint32_t M = p.m, Nout = Dx ? p.w.cols : p.w.rows, Kr = Dx ? p.w.rows : p.w.cols;
  const uint32_t m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  const int lane = lane_id(), warp = threadIdx.x / 32, wm = warp / 4, wn = warp % 4;
  const bool fast_w = p.w.cols % 16 == 0;
  const int ktiles = (Kr + kBK - 1) / kBK;

  auto load_stage = [&](int stage, uint32_t k0) {
    load_a_tile(As[stage], a, M, Kr, m0, k0);
    if (fast_w) store_weight_chunk<T, Dx>(Bs[stage], table, fetch_weight_chunk<Dx>(p.w, n0, k0));
    else load_weight_tile_generic<T, Dx>(Bs[stage], table, p.w, n0, k0);
  };

  float acc[4][4][4] = {};
  load_stage(0, 0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  for (int kt = 0; kt < ktiles; ++kt) {
    const int cur = kt & 1, nxt = cur ^ 1;
    const bool more = kt + 1 < ktiles;
    WeightChunk ahead{};
    if (more) {
      load_a_tile(As[nxt], a, M, Kr, m0, (kt + 1) * kBK);
      if (fast_w) ahead = fetch_weight_chunk<Dx>(p.w, n0, (kt + 1) * kBK);
    }
    cp_async_commit();
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[4][4], bf[4][2];
      for (int mt = 0; mt < 4; ++mt)
        ldmatrix_x4(af[mt], &As[cur][wm * 64 + mt * 16 + lane % 16][kk + (lane / 16) * 8]);
      for (int np = 0; np < 2; ++np) {
        uint32_t r[4];
        if (Dx) {
          ldmatrix_x4_trans(r, &Bs[cur][kk + ((lane / 8) % 2) * 8 + lane % 8][wn * 32 + np * 16 + (lane / 16) * 8]);
        } else {
          ldmatrix_x4(r, &Bs[cur][wn * 32 + np * 16 + (lane / 16) * 8 + lane % 8][kk + ((lane / 8) % 2) * 8]);
        }
        bf[2 * np][0] = r[0];
        bf[2 * np][1] = r[1];
        bf[2 * np + 1][0] = r[2];
        bf[2 * np + 1][1] = r[3];
      }
      for (int mt = 0; mt < 4; ++mt)
        for (int nt = 0; nt < 4; ++nt) mma<T>(acc[mt][nt], af[mt], bf[nt]);
    }
    if (more) {
      if (fast_w) store_weight_chunk<T, Dx>(Bs[nxt], table, ahead);
      else load_weight_tile_generic<T, Dx>(Bs[nxt], table, p.w, n0, (kt + 1) * kBK);
    }
    cp_async_wait<0>();
    __syncthreads();
  }

  const int g = lane / 4, t = lane % 4;
  for (int mt = 0; mt < 4; ++mt)
    for (int nt = 0; nt < 4; ++nt)
      for (int half = 0; half < 2; ++half) {
        const uint32_t row = m0 + wm * 64 + mt * 16 + g + 8 * half;
        const uint32_t col = n0 + wn * 32 + nt * 8 + 2 * t;
        if (row >= M) continue;
        T* dst = out + uint64_t(row) * Nout + col;
        if (col < Nout) dst[0] = from_f32<T>(acc[mt][nt][2 * half]);
        if (col + 1 < Nout) dst[1] = from_f32<T>(acc[mt][nt][2 * half + 1]);
      }
}

}  // namespace

// ---- entry points: <op>_<dtype> -----------------------------------------------------------

#define FK_NF4_DTYPE_ENTRIES(T, t)                                                          \
  FK_KERNEL(nf4_dequantize_##t, Nf4DequantizeParams) { dequantize<T>(p); }                  \
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
  FK_KERNEL_BOUNDS(nf4_gemm_##t, Nf4MatmulParams, kThreads) { gemm<T, false>(p); }          \
  FK_KERNEL_BOUNDS(nf4_gemm_dx_##t, Nf4MatmulParams, kThreads) { gemm<T, true>(p); }

FK_NF4_MATMUL_ENTRIES(__nv_bfloat16, bf16)
FK_NF4_MATMUL_ENTRIES(__half, f16)
