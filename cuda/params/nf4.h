/* Params for the NF4 kernels (cuda/nf4.cu). NF4 is bitsandbytes' layout (DESIGN.md §6):
 * blocks of `blocksize` consecutive elements of the flattened row-major weight [rows, cols],
 * one absmax per block, two 4-bit codes per byte with element 2i in the HIGH nibble.
 * With double quantization the absmaxes are stored as 8-bit codes of (absmax - offset),
 * blockwise (FK_NF4_NESTED_BLOCKSIZE) with bitsandbytes' dynamic map; a block's absmax is
 * nested_map[nested_codes[b]] * nested_absmax[b / 256] + offset, in f32. */
#ifndef FK_PARAMS_NF4_H
#define FK_PARAMS_NF4_H
#include <stdint.h>

#include "tma.h"

#define FK_NF4_NESTED_BLOCKSIZE 256
/* absmax_mean sums the absmaxes in chunks of this many, each chunk in f64 in index order,
 * then the chunk sums in index order: the reference does the same, so both agree bitwise. */
#define FK_NF4_MEAN_CHUNK 1024
/* The tensor-core GEMV (nf4_gemv_mma_*): a block of FK_NF4_GEMV_MMA_THREADS threads computes
 * FK_NF4_GEMV_MMA_ROWS weight rows (one mma tile), its warps splitting K between them. */
#define FK_NF4_GEMV_MMA_ROWS 16
#define FK_NF4_GEMV_MMA_THREADS 256
/* nf4_dequantize: a thread writes this many runs of 16 bytes of output per pass of its grid
 * stride (the launch sizes the grid by it). */
#define FK_NF4_DEQUANTIZE_RUNS 4
/* The dX GEMV (nf4_gemv_dx_*): a block of FK_NF4_GEMV_DX_THREADS threads sums one slab of
 * columns over one split of the weight's rows (its warps taking the split's rows in turn). */
#define FK_NF4_GEMV_DX_THREADS 256

typedef struct Nf4Weight {
  const uint8_t* codes;         /* [ceil(rows * cols / 2)] */
  const float* absmax;          /* [blocks], when nested == 0 */
  const uint8_t* nested_codes;  /* [blocks], when nested == 1 */
  const float* nested_absmax;   /* [ceil(blocks / 256)] */
  const float* nested_map;      /* [256] */
  float offset;
  uint32_t nested;
  uint32_t blocksize;           /* 32..4096, a power of two */
  uint32_t rows;                /* out_features */
  uint32_t cols;                /* in_features */
} Nf4Weight;

/* out[row * out_ld + col] = NF4[code(e)] * absmax(e / blocksize), rounded to out's dtype,
 * for element e = row * cols + col. out_ld >= cols (0 means cols): rows may be written into a
 * wider matrix, e.g. the LoRA layer's extended weight. */
typedef struct Nf4DequantizeParams {
  Nf4Weight w;
  void* out;
  uint64_t out_ld;
} Nf4DequantizeParams;

/* Quantizes `numel` elements of `input` (out's dtype named by the kernel) blockwise, as
 * bitsandbytes' kQuantizeBlockwise does. Sets *nonfinite to 1 if any input is NaN or Inf. */
typedef struct Nf4QuantizeParams {
  const void* input;
  uint8_t* codes;
  float* absmax;
  uint32_t* nonfinite;
  uint64_t numel;
  uint32_t blocksize;
} Nf4QuantizeParams;

/* Double quantization of `blocks` absmaxes: nf4_absmax_mean writes the offset (and the
 * chunk sums to scratch), then nf4_quantize_nested writes the nested codes and absmaxes. */
typedef struct Nf4NestedParams {
  const float* absmax;          /* [blocks] */
  double* chunk_sums;           /* scratch, [ceil(blocks / FK_NF4_MEAN_CHUNK)] */
  float* offset;                /* [1] */
  uint8_t* nested_codes;        /* [blocks] */
  float* nested_absmax;         /* [ceil(blocks / 256)] */
  const float* nested_map;      /* [256], sorted ascending */
  uint64_t blocks;
} Nf4NestedParams;

/* What the GEMVs (nf4_gemv_*, nf4_gemv_mma_*) add to each output before its one rounding, in
 * f32: a LoRA layer's bias and low-rank term over an NF4 base (QLoRA at decode sizes),
 *   out[m, n] = a[m, :] · Ŵ[n, :] + bias[n] + Σ_j u[m, j] · b[n, j],
 * bias [rows], u [m, rank] and b [rows, rank] in the activations' dtype. A null bias adds no
 * bias; a null u no low-rank term (b and rank are then not read). The GEMMs take none. */
typedef struct Nf4GemvEpilogue {
  const void* bias;
  const void* u;
  const void* b;
  uint32_t rank;
} Nf4GemvEpilogue;
/* The matmuls through the frozen weight W [rows, cols] (activations' dtype by kernel name):
 *   forward (nf4_gemv_*, nf4_gemm_*):              out[m, rows] = a[m, cols] · Wᵀ
 *   backward (nf4_gemv_dx_*, nf4_gemm_dx_*):       out[m, cols] = a[m, rows] · W
 * W is dequantized to the activations' dtype on the way in; f32 accumulation. */
typedef struct Nf4MatmulParams {
  Nf4Weight w;
  const void* a;
  void* out;
  uint32_t m;
  /* The wgmma GEMMs (nf4_gemm*_wgmma_*): a's tensor map for TMA loads where the host
   * encoded one (a_tma 1: a 16-byte aligned, rows a multiple of 16 bytes), else cp.async. */
  uint32_t a_tma;
  FkTensorMap a_map;
  Nf4GemvEpilogue epilogue;
  /* The dX GEMV (nf4_gemv_dx_*, then nf4_gemv_dx_reduce_*): f32 sums [row_splits, m, cols],
   * one per split of W's rows (split s: rows [s·c, (s + 1)·c), c = ⌈rows / row_splits⌉),
   * which the reduce adds in split order into out. The other matmuls read neither. */
  float* partials;
  uint32_t row_splits;
} Nf4MatmulParams;

#endif
