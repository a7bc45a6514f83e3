// Test kernels for the emulator (tests/emu.rs): each planted bug must be caught, and each
// correct twin must pass under every schedule. Built into the emulator only, never to PTX.
#include "include/compat.cuh"
#include "include/ptx.cuh"
#include "include/wgmma.cuh"
#include "emu/tests/planted.h"
#include "params/regdump.h"

// Bug: a thread reads a neighbour's shared-memory write with no barrier in between.
FK_KERNEL(emu_test_missing_syncthreads, EmuTestParams) {
  float* s = dyn_smem<float>();
  const unsigned t = threadIdx.x;
  s[t] = p.in[t];
  p.out[t] = s[(t + 1) % p.n];
}

FK_KERNEL(emu_test_with_syncthreads, EmuTestParams) {
  float* s = dyn_smem<float>();
  const unsigned t = threadIdx.x;
  s[t] = p.in[t];
  __syncthreads();
  p.out[t] = s[(t + 1) % p.n];
}

// Bug: two halves of the block wait at different barriers.
FK_KERNEL(emu_test_divergent_barrier, EmuTestParams) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  p.out[threadIdx.x] = 1.0f;
}

// Bug: odd threads exit while even ones wait at a barrier.
FK_KERNEL(emu_test_barrier_after_exit, EmuTestParams) {
  if (threadIdx.x % 2) return;
  __syncthreads();
  p.out[threadIdx.x] = 1.0f;
}

// Bug: every lane shuffles with a mask that names only lanes 0-15.
FK_KERNEL(emu_test_bad_shfl_mask, EmuTestParams) {
  p.out[threadIdx.x] = __shfl_sync(0x0000ffffu, p.in[threadIdx.x], 0);
}

// Bug: one lane leaves before a full-warp shuffle.
FK_KERNEL(emu_test_shfl_after_exit, EmuTestParams) {
  if (threadIdx.x == 5) return;
  p.out[threadIdx.x] = __shfl_sync(0xffffffffu, p.in[threadIdx.x], 0);
}

// Correct use of every collective; out[8 t + k] holds result k of thread t (n threads).
FK_KERNEL(emu_test_collectives, EmuTestParams) {
  const unsigned t = threadIdx.x;
  const float v = p.in[t];
  float* o = p.out + 8 * t;
  o[0] = __shfl_sync(0xffffffffu, v, (t * 7 + 3) % 32);
  o[1] = __shfl_up_sync(0xffffffffu, v, 3, 16);
  o[2] = __shfl_down_sync(0xffffffffu, v, 5, 8);
  o[3] = __shfl_xor_sync(0xffffffffu, v, 6, 32);
  o[4] = static_cast<float>(__ballot_sync(0xffffffffu, v > 0.0f) & 0xffffu);
  o[5] = static_cast<float>(__any_sync(0xffffffffu, v > 1.5f) + 2 * __all_sync(0xffffffffu, v > -2.0f));
  o[6] = static_cast<float>(__syncthreads_count(v > 0.0f));
  o[7] = static_cast<float>(__syncthreads_or(v > 1.9f) + 2 * __syncthreads_and(v > -1.99f));
}

// Bug: reads the cp.async destination before waiting for it (over values written before the
// copy, so that only poisoning at the issue, not the block's fresh poison, hides them).
FK_KERNEL(emu_test_cp_async_before_wait, EmuTestParams) {
  float* s = dyn_smem<float>();
  const unsigned t = threadIdx.x;
  for (int i = 0; i < 4; ++i) s[4 * t + i] = 7.0f;
  cp_async<16>(s + 4 * t, p.in + 4 * t);
  cp_async_commit();
  for (int i = 0; i < 4; ++i) p.out[4 * t + i] = s[4 * t + i];
  cp_async_wait_all();
}

// Correct: two groups; after wait_group 1 the first has landed and (on the emulator) the
// second is still poison, which out[4n..8n) records; after wait_group 0 both have, and
// after a barrier each thread reads its neighbour's data into out[0..4n).
FK_KERNEL(emu_test_cp_async, EmuTestParams) {
  float* s = dyn_smem<float>();
  const unsigned t = threadIdx.x, n = blockDim.x;
  cp_async<8>(s + 4 * t, p.in + 4 * t);
  cp_async_commit();
  cp_async<8>(s + 4 * t + 2, p.in + 4 * t + 2);
  cp_async_commit();
  cp_async_wait<1>();
  for (int i = 0; i < 4; ++i) p.out[4 * n + 4 * t + i] = s[4 * t + i];
  cp_async_wait<0>();
  __syncthreads();
  const unsigned u = (t + 1) % n;
  for (int i = 0; i < 4; ++i) p.out[4 * t + i] = s[4 * u + i];
}

// Bug: writes into its cp.async destination before waiting for the copy (on a GPU the copy
// may land before or after the store).
FK_KERNEL(emu_test_cp_async_written_before_wait, EmuTestParams) {
  float* s = dyn_smem<float>();
  const unsigned t = threadIdx.x;
  cp_async<16>(s + 4 * t, p.in + 4 * t);
  cp_async_commit();
  s[4 * t + 1] = 7.0f;
  cp_async_wait_all();
  for (int i = 0; i < 4; ++i) p.out[4 * t + i] = s[4 * t + i];
}

// Bug: writes one element past the dynamic shared memory (n floats); ASan builds catch it.
FK_KERNEL(emu_test_oob_shared, EmuTestParams) {
  float* s = dyn_smem<float>();
  if (threadIdx.x == 0) s[p.n] = 1.0f;
  p.out[threadIdx.x] = 0.0f;
}

// Bug: writes one element past a static shared array; ASan builds catch it.
FK_KERNEL(emu_test_oob_static_shared, EmuTestParams) {
  FK_SHARED(s, float[32]);
  if (threadIdx.x == 0) s[16 + p.n] = 1.0f;  // the test passes n = 16
  p.out[threadIdx.x] = s[threadIdx.x % 32];
}

// Bug: 32 KB of static shared memory beside the n floats of dynamic shared memory the test
// asks for (200 KB): more than the 227 KiB a block can have, though each alone fits.
FK_KERNEL(emu_test_static_and_dynamic_shared, EmuTestParams) {
  FK_SHARED(s, float[8192]);
  float* d = dyn_smem<float>();
  s[threadIdx.x] = p.in[threadIdx.x];
  d[threadIdx.x] = s[threadIdx.x];
  p.out[threadIdx.x] = d[threadIdx.x];
}

// Bug: __syncwarp orders a warp, not the block: reading another warp's write needs
// __syncthreads. Caught only when one warp can run ahead of another.
FK_KERNEL(emu_test_cross_warp_race, EmuTestParams) {
  float* s = dyn_smem<float>();
  const unsigned t = threadIdx.x, n = blockDim.x;
  s[t] = p.in[t];
  __syncwarp();
  p.out[t] = s[(t + 32) % n];
}

// Bug: reads static shared memory before the block wrote it. The emulator must show poison,
// not what a block before it on the same OS thread left there.
FK_KERNEL(emu_test_static_shared_read_first, EmuTestParams) {
  FK_SHARED(cell, float[32]);
  const unsigned t = threadIdx.x;
  p.out[blockIdx.x * blockDim.x + t] = cell[t];
  cell[t] = 1.0f;
}

// ---- TMA and mbarriers: bugs beside cuda/regdump.cu's regdump_tma, on its params --------

// The tile (1024-byte aligned, for the swizzle) and its barrier after it.
struct TmaTestSmem {
  uint16_t* tile;
  uint64_t* bar;
};
FK_DEVICE TmaTestSmem tma_test_init(const RegdumpTmaParams& p) {
  unsigned char* smem = dyn_smem<unsigned char>();
  uint16_t* tile = reinterpret_cast<uint16_t*>(smem + shared_align_1024(smem));
  uint64_t* bar = reinterpret_cast<uint64_t*>(tile + 64 * p.box_rows);
  if (threadIdx.x == 0) {
    mbarrier_init(bar, 1);
    fence_mbarrier_init();
  }
  __syncthreads();
  return {tile, bar};
}

// Thread 0 arrives announcing `bytes` and loads the box at (c0, c1).
FK_DEVICE void tma_test_load(const RegdumpTmaParams& p, TmaTestSmem s, uint32_t bytes) {
  if (threadIdx.x == 0) {
    mbarrier_arrive_expect_tx(s.bar, bytes);
    tma_load_2d(s.tile, &p.map, p.c0, p.c1, s.bar);
  }
}

// Bug: reads the tile before waiting on the barrier.
FK_KERNEL_TMA(emu_test_tma_before_wait, RegdumpTmaParams, FK_REGDUMP_TMA_THREADS) {
  const TmaTestSmem s = tma_test_init(p);
  tma_test_load(p, s, 128 * p.box_rows);
  for (uint32_t e = threadIdx.x; e < 64 * p.box_rows; e += blockDim.x) p.out[e] = s.tile[e];
  mbarrier_wait(s.bar, 0);
}

// Bug: a store into the tile while its load is in flight (staging something in a stage still
// being filled).
FK_KERNEL_TMA(emu_test_tma_written_before_wait, RegdumpTmaParams, FK_REGDUMP_TMA_THREADS) {
  const TmaTestSmem s = tma_test_init(p);
  tma_test_load(p, s, 128 * p.box_rows);
  if (threadIdx.x == 1) s.tile[5] = 0;
  mbarrier_wait(s.bar, 0);
}

// Bug: announces two bytes fewer than the load brings; the phase never completes.
FK_KERNEL_TMA(emu_test_tma_short_expect, RegdumpTmaParams, FK_REGDUMP_TMA_THREADS) {
  const TmaTestSmem s = tma_test_init(p);
  tma_test_load(p, s, 128 * p.box_rows - 2);
  mbarrier_wait(s.bar, 0);
}

// Bug: no thread waits for the load before the block ends.
FK_KERNEL_TMA(emu_test_tma_never_waited, RegdumpTmaParams, FK_REGDUMP_TMA_THREADS) {
  tma_test_load(p, tma_test_init(p), 128 * p.box_rows);
}

// Bug: initializes a live barrier again.
FK_KERNEL_TMA(emu_test_mbarrier_reinit, RegdumpTmaParams, FK_REGDUMP_TMA_THREADS) {
  const TmaTestSmem s = tma_test_init(p);
  if (threadIdx.x == 0) mbarrier_init(s.bar, 1);
}

// Bug: a store over a live barrier's shared memory.
FK_KERNEL_TMA(emu_test_mbarrier_overwritten, RegdumpTmaParams, FK_REGDUMP_TMA_THREADS) {
  const TmaTestSmem s = tma_test_init(p);
  if (threadIdx.x == 0) {
    *reinterpret_cast<uint16_t*>(s.bar) = 0;
    mbarrier_arrive_expect_tx(s.bar, 0);
  }
}

// ---- the async proxy: wgmma sees a thread's cp.async writes only after its fence --------

// One warpgroup: cp.async fills A (64 rows) and B (8 rows) of 128 bytes from p.in, in the
// 128-byte swizzle, then one m64n8k16; kFence: with fence.proxy.async after the wait.
template <bool kFence>
FK_DEVICE void wgmma_after_cp_async(const EmuTestParams& p) {
  unsigned char* smem = dyn_smem<unsigned char>();
  uint4* tile = reinterpret_cast<uint4*>(smem + shared_align_1024(smem));
  for (int c = threadIdx.x; c < 72 * 8; c += blockDim.x)
    cp_async<16>(&tile[wgmma::swizzled(c / 8, c % 8)], p.in + 4 * c);
  cp_async_wait_all();
  if (kFence) fence_proxy_async_shared();
  __syncthreads();
  float d[4] = {};
  wgmma_fence();
  wgmma_m64n8k16<__nv_bfloat16>(d, reinterpret_cast<const char*>(tile), reinterpret_cast<const char*>(tile + 64 * 8));
  wgmma_commit();
  wgmma_wait<0>();
  for (int i = 0; i < 4; ++i) p.out[4 * threadIdx.x + i] = d[i];
}

// Bug: no fence between the copies and the wgmma that reads them.
FK_KERNEL(emu_test_wgmma_unfenced, EmuTestParams) { wgmma_after_cp_async<false>(p); }
// Correct.
FK_KERNEL(emu_test_wgmma_fenced, EmuTestParams) { wgmma_after_cp_async<true>(p); }

// ---- clusters: regdump_tma_multicast (cuda/regdump.cu) with one bug each ------------------

enum class ClusterBug { no_init_sync, no_reuse_sync, mask_outside, exit_early, load_to_exited };

// regdump_tma_multicast's loop, on its params, with `kBug` planted.
template <ClusterBug kBug>
FK_DEVICE void multicast_with(const RegdumpTmaParams& p) {
  unsigned char* smem = dyn_smem<unsigned char>();
  uint16_t* tile = reinterpret_cast<uint16_t*>(smem + shared_align_1024(smem));
  const uint32_t n = cluster_nctarank(), rank = cluster_ctarank(), part = 64 * p.box_rows, elems = n * part;
  uint64_t* bar = reinterpret_cast<uint64_t*>(tile + elems);
  if ((kBug == ClusterBug::exit_early || kBug == ClusterBug::load_to_exited) && rank == 1) return;
  if (threadIdx.x == 0) {
    mbarrier_init(bar, 1);
    fence_mbarrier_init();
  }
  kBug == ClusterBug::no_init_sync || kBug == ClusterBug::load_to_exited ? __syncthreads() : cluster_sync();
  const uint16_t mask = kBug == ClusterBug::mask_outside ? uint16_t((1u << (n + 1)) - 1) : uint16_t((1u << n) - 1);
  for (uint32_t i = 0; i < p.boxes; ++i) {
    if (threadIdx.x == 0) {
      mbarrier_arrive_expect_tx(bar, elems * 2);
      tma_load_2d_multicast(tile + rank * part, &p.map, p.c0 + 64 * int32_t(i), p.c1 + int32_t(rank * p.box_rows), bar, mask);
    }
    mbarrier_wait(bar, i % 2);
    uint16_t* out = p.out + (uint64_t(blockIdx.x) * p.boxes + i) * elems;
    for (uint32_t e = threadIdx.x; e < elems; e += blockDim.x) out[e] = tile[e];
    kBug == ClusterBug::no_reuse_sync ? __syncthreads() : cluster_sync();
  }
  if (threadIdx.x == 0) mbarrier_inval(bar);
}

// Bug: a block-wide barrier after the mbarrier's init: a peer's load may name it before it is.
FK_KERNEL_TMA(emu_test_multicast_no_init_sync, RegdumpTmaParams, FK_REGDUMP_TMA_THREADS) {
  multicast_with<ClusterBug::no_init_sync>(p);
}
// Bug: a block-wide barrier between phases: a peer's next load may overwrite a tile being read.
FK_KERNEL_TMA(emu_test_multicast_no_reuse_sync, RegdumpTmaParams, FK_REGDUMP_TMA_THREADS) {
  multicast_with<ClusterBug::no_reuse_sync>(p);
}
// Bug: the multicast mask names a block past the cluster's last.
FK_KERNEL_TMA(emu_test_multicast_mask_outside, RegdumpTmaParams, FK_REGDUMP_TMA_THREADS) {
  multicast_with<ClusterBug::mask_outside>(p);
}
// Bug: a block of the cluster exits while the others wait for it at the cluster barrier.
FK_KERNEL_TMA(emu_test_cluster_exit_early, RegdumpTmaParams, FK_REGDUMP_TMA_THREADS) {
  multicast_with<ClusterBug::exit_early>(p);
}
// Bug: a block of the cluster exits at once, and a peer's load writes to it.
FK_KERNEL_TMA(emu_test_multicast_to_exited, RegdumpTmaParams, FK_REGDUMP_TMA_THREADS) {
  multicast_with<ClusterBug::load_to_exited>(p);
}
