/* Params for the fused LoRA kernels (cuda/lora.cu), PEFT's layout (DESIGN.md §6):
 *   y = x Wᵀ + bias + scale · (dropout(x) Aᵀ) Bᵀ,   A [rank, d_in], B [d_out, rank],
 * with dropout's keep-mask regenerated from (seed, flattened index into x) by Philox
 * (cuda/params/philox.h) and kept elements scaled by 1 / (1 - p). One struct for every
 * LoRA kernel; each reads the fields its comment names. Activations, W, A, B and bias are in
 * the kernel's dtype (bf16 or f16); gradients of A, B and bias are f32.
 *
 * What forward saves for backward is x (the caller's), u and the seed, where
 *   u = scale / (1 - p) · (mask ⊙ x) Aᵀ   [m, rank], the activations' dtype,
 * i.e. scale · dropout(x) Aᵀ: with it y = x Wᵀ + bias + u Bᵀ, and dB = dYᵀ u. Backward
 * computes v = scale · dY B [m, rank] first, then
 *   dX = dY W + mask ⊙ (v A) / (1 - p),  dA = vᵀ (mask ⊙ x) / (1 - p),  dB = dYᵀ u,
 *   dbias = Σ_rows dY. */
#ifndef FK_PARAMS_LORA_H
#define FK_PARAMS_LORA_H
#include <stdint.h>

#include "nf4.h"
#include "tma.h"

typedef struct LoraParams {
  uint32_t m;        /* rows of x (tokens) */
  uint32_t d_in;     /* in_features: columns of x, W and A */
  uint32_t d_out;    /* out_features: columns of y, rows of W and B */
  uint32_t rank;     /* r: columns of u, v and B, rows of A; 1 to 256 */
  const void* w;     /* [d_out, d_in] dense base (the *_nf4 kernels read `nf4` instead) */
  Nf4Weight nf4;     /* the NF4 base, [d_out, d_in], where w is NULL (params/nf4.h) */
  const void* bias;  /* [d_out], or NULL */
  const void* a;     /* [rank, d_in] */
  const void* b;     /* [d_out, rank] */
  float scale;       /* alpha / rank, or alpha / sqrt(rank) (rsLoRA) */
  float dropout;     /* p in [0, 1) */
  uint64_t seed;     /* dropout's Philox key: x's flattened element i kept as params/philox.h says */
  const void* x;     /* [m, d_in] */
  void* u;           /* [m, rank]: written by lora_down (or lora_forward_down*_wgmma),
                        read by forward and grads */
  void* y;           /* [m, d_out] */
  const void* dy;    /* [m, d_out] */
  void* v;           /* [m, rank]: written by lora_backward_v (or
                        lora_backward_dx_v*_wgmma), read by dx, lora_dx_fixup and grads */
  void* dx;          /* [m, d_in] */
  float* partials;   /* the split-row reductions: [a_splits or splits][rank·d_in] (dA), then
                        [b_splits or splits][d_out·(rank + 1)] (dB and dbias) */
  uint32_t splits;   /* how many row ranges the weight gradients are split into, at least 1 */
  uint32_t b_splits; /* nonzero: the dB partials are lora_backward_dx_v*_wgmma's, one per 128
                        rows (ceil(m / 128) of them), and lora_grad_b is not launched; 0:
                        lora_grad_b makes `splits` of them */
  uint32_t a_splits; /* the same for the dA partials (the kernel reads x), lora_grad_a not
                        launched where nonzero */
  void* bt;          /* [rank, d_out]: Bᵀ, written by lora_transpose_b for
                        lora_backward_dx_v*_wgmma (its v side tile: rows of B's columns) */
  float* da;         /* [rank, d_in] */
  float* db;         /* [d_out, rank] */
  float* dbias;      /* [d_out], or NULL */
  void* merged;      /* [d_out, d_in]: W + scale · B A (lora_merge) */
  /* Row strides (elements; 0 means dense rows) and the extended operands of the path that
   * hands the base GEMMs to cuBLAS by extending K (src/lora/mod.rs):
   *   x_ext  [m, x_ld]          = [x | u | 1 | 0...]      written by lora_down
   *   dy_ext [m, dy_ld]         = [dY | v | 0...]         written by lora_backward_v
   *   w      [d_out + rank, w_ld] = [W | B | bias | 0...] over [A | 0...]: the extended weight,
   *          whose A, B and bias parts lora_extend_weight refreshes,
   * so that y = x_ext · w[:d_out]ᵀ and dX = dy_ext[:, :d_out + rank] · w[:, :d_in]. */
  uint64_t w_ld;     /* row stride of the extended weight, elements */
  void* x_ext;
  uint64_t x_ld;     /* row stride of x_ext, elements */
  void* dy_ext;
  uint64_t dy_ld;    /* row stride of dy_ext, elements */
  /* Split-K of the two GEMMs only `rank` wide (lora_down, lora_backward_v), which alone
   * would fill a few dozen blocks: with k_splits > 1, blockIdx.z sums its range of K into
   * rank_partials [k_splits][m, rank], and lora_down_reduce / lora_backward_v_reduce add
   * the splits in order and write u or v (and the x_ext / dy_ext tail). 0 means 1. */
  float* rank_partials;
  uint32_t k_splits;
  /* The rank-wide GEMMs (lora_down, lora_backward_v, lora_grad_a, lora_grad_b): when
   * nonzero, the block of row tile blockIdx.y starts its walk along K at step blockIdx.y (mod
   * its steps) and wraps around, so that blocks at work together read different columns of
   * their rows; 0 starts every block at its range's first step. Same sums, another order. */
  uint32_t narrow_stagger;
  /* The wgmma kernels' tile order (wgmma.cuh's Schedule): above 1, each persistent block
   * walks runs of at most this many consecutive column tiles of one row tile (UINT32_MAX: as
   * long as the launch allows) instead of the tiles b, b + grid, ...; the same tiles, another
   * order. */
  uint32_t longest_column_run;
  /* TMA loads (the wgmma kernels): the maps of the operands the host could encode (16-byte
   * aligned, rows a multiple of 16 bytes apart), each flagged in `tma`; the kernel loads the
   * others through cp.async. Forward: x, dense w, u, b (boxes of 64 along K by the tile's
   * rows); backward dX: dy, v (the same), dense w and a (boxes of 64 × 64 K lines); the dX
   * kernels that make v: b_map is bt's (boxes of 64 along d_out by the side tile's rows),
   * and x_map x's as the forward's, where they make the dA partials (a_splits). */
  uint32_t tma; /* FK_LORA_TMA_* bits */
  FkTensorMap x_map, w_map, u_map, b_map, dy_map, v_map, a_map;
} LoraParams;

#define FK_LORA_TMA_X 1u
#define FK_LORA_TMA_W 2u
#define FK_LORA_TMA_U 4u
#define FK_LORA_TMA_B 8u
#define FK_LORA_TMA_DY 16u
#define FK_LORA_TMA_V 32u
#define FK_LORA_TMA_A 64u

#endif
