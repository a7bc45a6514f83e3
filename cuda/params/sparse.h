/* Params for the sparse-delta kernels (cuda/sparse.cu). The only ABI between Rust and the
 * kernels: Rust's side is generated from this file by bindgen (src/params.rs).
 *
 * Indices are flattened row-major offsets into the dense tensor, u32 or u64 as the kernel
 * name says (`_idx64`). Kernels skip an index (the segmented kernel: a target) >= numel
 * rather than touch memory out of bounds; the segmented kernel's starts and order are used
 * as given. The safe Rust API rejects bad indices before any launch. */
#ifndef FK_PARAMS_SPARSE_H
#define FK_PARAMS_SPARSE_H
#include <stdint.h>

/* w[indices[i]] += alpha * values[i], for i < n. */
typedef struct ScatterAddParams {
  void* w;             /* [numel], W's dtype */
  const void* values;  /* [n], V's dtype */
  const void* indices; /* [n] */
  uint64_t n;
  uint64_t numel;
  float alpha;
} ScatterAddParams;

/* The deterministic path for unsorted or repeated indices: a host-built plan groups the
 * values by target. For segment s: w[targets[s]] += alpha * sum(values[order[k]]) over
 * k in [starts[s], starts[s+1]), summed in that order in f32. */
typedef struct SegmentedScatterAddParams {
  void* w;             /* [numel], W's dtype */
  const void* values;  /* [n], V's dtype */
  const void* targets; /* [segments], sorted, unique */
  const void* starts;  /* [segments + 1], into order */
  const void* order;   /* [n], positions into values */
  uint64_t segments;
  uint64_t numel;
  float alpha;
} SegmentedScatterAddParams;

/* out[i] = src[indices[i]], converted to out's dtype. */
typedef struct GatherParams {
  void* out;           /* [n] */
  const void* src;     /* [numel] */
  const void* indices; /* [n] */
  uint64_t n;
  uint64_t numel;
} GatherParams;

/* One AdamW step over the support (PyTorch's, with the decoupled weight decay applied to
 * the delta: it pulls the weight toward base, not toward zero), fused with the gather of
 * the gradient and the write-back into W:
 *   g = grad[idx];  m = beta1*m + (1-beta1)*g;  v = beta2*v + (1-beta2)*g*g
 *   delta = delta * decay - step_size * m / (sqrt(v) / sqrt_bc2 + eps)
 *   w[idx] = base + delta
 * with decay = 1 - lr*weight_decay, step_size = lr / (1 - beta1^t),
 * sqrt_bc2 = sqrt(1 - beta2^t), computed on the host. */
typedef struct SparseAdamwParams {
  void* w;             /* [numel], W's dtype */
  const void* grad;    /* [numel], G's dtype */
  const void* indices; /* [n] */
  const float* base;   /* [n] W at the support before training */
  float* delta;        /* [n] */
  float* exp_avg;      /* [n] */
  float* exp_avg_sq;   /* [n] */
  uint64_t n;
  uint64_t numel;
  float beta1;
  float beta2;
  float one_minus_beta1;
  float one_minus_beta2;
  float eps;
  float decay;
  float step_size;
  float sqrt_bc2;
} SparseAdamwParams;

#endif
