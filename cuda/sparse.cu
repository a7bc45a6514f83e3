// Sparse-delta kernels: scatter-add, gather and a fused sparse AdamW step.
// Reference: src/reference/sparse.rs. Wrapper: src/sparse.rs. Tests: tests/sparse.rs.
//
// One thread per support element, grid-stride. The sorted/unique and segmented paths write
// each target from exactly one thread, so they are deterministic and use no atomics.
#include "include/compat.cuh"
#include "include/dtype.cuh"
#include "include/grid.cuh"
#include "params/sparse.h"

namespace {

// Calls add(j, alpha · values[i]) for each support element i whose index j is in range.
template <typename V, typename I, class Add>
FK_DEVICE void for_each_delta(const ScatterAddParams& p, Add add) {
  const V* v = static_cast<const V*>(p.values);
  const I* idx = static_cast<const I*>(p.indices);
  for (uint64_t i = grid_start(); i < p.n; i += grid_stride()) {
    const uint64_t j = idx[i];
    if (j < p.numel) add(j, p.alpha * to_f32(v[i]));
  }
}

template <typename W, typename V, typename I>
FK_DEVICE void scatter_add(const ScatterAddParams& p) {
  W* w = static_cast<W*>(p.w);
  for_each_delta<V, I>(p, [&](uint64_t j, float d) { w[j] = from_f32<W>(to_f32(w[j]) + d); });
}

template <typename W, typename V, typename I>
FK_DEVICE void segmented_scatter_add(const SegmentedScatterAddParams& p) {
  W* w = static_cast<W*>(p.w);
  const V* v = static_cast<const V*>(p.values);
  const I* targets = static_cast<const I*>(p.targets);
  const I* starts = static_cast<const I*>(p.starts);
  const I* order = static_cast<const I*>(p.order);
  for (uint64_t s = grid_start(); s < p.segments; s += grid_stride()) {
    const uint64_t j = targets[s];
    if (j >= p.numel) continue;
    float sum = -0.0f;  // -0 + x is x, a -0 included: one value adds as the sorted path adds it
    for (I k = starts[s]; k < starts[s + 1]; ++k) sum += to_f32(v[order[k]]);
    w[j] = from_f32<W>(to_f32(w[j]) + p.alpha * sum);
  }
}

// Nondeterministic: the order of the additions into one target depends on timing.
FK_DEVICE void atomic_add_rounded(float* w, float x) { atomicAdd(w, x); }
template <typename W>
FK_DEVICE void atomic_add_rounded(W* w, float x) {
  // Compute in f32 and round once, as the deterministic paths do; a native bf16 atomicAdd
  // would round x to bf16 first.
  unsigned short* bits = reinterpret_cast<unsigned short*>(w);
  unsigned short old = relaxed_load(bits), seen;
  do {
    seen = old;
    const W next = from_f32<W>(to_f32(from_bits16<W>(seen)) + x);
    old = atomicCAS(bits, seen, bits16(next));
  } while (old != seen);
}

template <typename W, typename V, typename I>
FK_DEVICE void scatter_add_atomic(const ScatterAddParams& p) {
  W* w = static_cast<W*>(p.w);
  for_each_delta<V, I>(p, [&](uint64_t j, float d) { atomic_add_rounded(w + j, d); });
}

template <typename S, typename O, typename I>
FK_DEVICE void gather(const GatherParams& p) {
  O* out = static_cast<O*>(p.out);
  const S* src = static_cast<const S*>(p.src);
  const I* idx = static_cast<const I*>(p.indices);
  for (uint64_t i = grid_start(); i < p.n; i += grid_stride()) {
    const uint64_t j = idx[i];
    out[i] = from_f32<O>(j < p.numel ? to_f32(src[j]) : __int_as_float(0x7fffffff));
  }
}

template <typename W, typename G, typename I>
FK_DEVICE void sparse_adamw(const SparseAdamwParams& p) {
  W* w = static_cast<W*>(p.w);
  const G* grad = static_cast<const G*>(p.grad);
  const I* idx = static_cast<const I*>(p.indices);
  for (uint64_t i = grid_start(); i < p.n; i += grid_stride()) {
    const uint64_t j = idx[i];
    if (j >= p.numel) continue;
    // Built with -fmad=false: every operation rounds on its own, as the reference's do.
    const float g = to_f32(grad[j]);
    const float m = p.beta1 * p.exp_avg[i] + p.one_minus_beta1 * g;
    const float v = p.beta2 * p.exp_avg_sq[i] + p.one_minus_beta2 * g * g;
    const float denom = sqrtf(v) / p.sqrt_bc2 + p.eps;
    const float delta = p.delta[i] * p.decay - p.step_size * m / denom;
    p.exp_avg[i] = m;
    p.exp_avg_sq[i] = v;
    p.delta[i] = delta;
    w[j] = from_f32<W>(p.base[i] + delta);
  }
}

}  // namespace

// Entry points: <op>_<W or source dtype>_<second dtype>[_idx64].
#define FK_SPARSE_ENTRIES(W, V, w, v, I, suffix)                                              \
  FK_KERNEL(scatter_add_##w##_##v##suffix, ScatterAddParams) { scatter_add<W, V, I>(p); }     \
  FK_KERNEL(scatter_add_atomic_##w##_##v##suffix, ScatterAddParams) {                         \
    scatter_add_atomic<W, V, I>(p);                                                           \
  }                                                                                           \
  FK_KERNEL(segmented_scatter_add_##w##_##v##suffix, SegmentedScatterAddParams) {             \
    segmented_scatter_add<W, V, I>(p);                                                        \
  }                                                                                           \
  FK_KERNEL(gather_##w##_##v##suffix, GatherParams) { gather<W, V, I>(p); }                   \
  FK_KERNEL(sparse_adamw_##w##_##v##suffix, SparseAdamwParams) { sparse_adamw<W, V, I>(p); }

#define FK_SPARSE_DTYPES(I, suffix)                                  \
  FK_SPARSE_ENTRIES(__nv_bfloat16, __nv_bfloat16, bf16, bf16, I, suffix) \
  FK_SPARSE_ENTRIES(__nv_bfloat16, float, bf16, f32, I, suffix)          \
  FK_SPARSE_ENTRIES(__half, __half, f16, f16, I, suffix)                 \
  FK_SPARSE_ENTRIES(__half, float, f16, f32, I, suffix)                  \
  FK_SPARSE_ENTRIES(float, float, f32, f32, I, suffix)

FK_SPARSE_DTYPES(uint32_t, )
FK_SPARSE_DTYPES(uint64_t, _idx64)
