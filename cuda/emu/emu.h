// emu.h: the CUDA names kernels use, implemented for the host emulator (DESIGN.md §5).
// compat.cuh includes this when the compiler is not nvcc; kernels are unmodified.
//
// Each block runs on one OS thread, each GPU thread as a fiber. threadIdx/blockIdx are
// thread-local and rewritten at every fiber switch. Barriers and warp collectives switch to
// the block's scheduler, which releases them once every participant has arrived and checks
// that they all arrived at the same call site with the same mask.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "numeric.h"

// ---- qualifiers -------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __constant__ static const
#define __align__(n) __attribute__((aligned(n)))

// ---- geometry ---------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
};
// Vector types with CUDA's alignment (16-byte loads and stores rely on it).
struct __attribute__((aligned(8))) uint2 {
  unsigned int x, y;
};
struct __attribute__((aligned(16))) uint4 {
  unsigned int x, y, z, w;
};
struct __attribute__((aligned(8))) float2 {
  float x, y;
};
struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace fk_emu {

// Where a barrier or collective was called from, for the checks and for error messages.
struct Site {
  const char* file;
  int line;
};
#define FK_EMU_SITE (::fk_emu::Site{__FILE__, __LINE__})

// Kernel registration: FK_KERNEL defines `name` as an entry the runtime can launch by name.
using Entry = void (*)(const void* params);
struct Registrar {
  Registrar(const char* name, Entry entry, size_t params_size, unsigned max_threads);
};

// Barriers and collectives (runtime.cpp).
enum class BarrierKind { plain, count, all, any };
int block_barrier(Site site, BarrierKind kind, int pred);
enum class WarpOp { sync, shfl_idx, shfl_up, shfl_down, shfl_xor, ballot, any, all, ldmatrix, stmatrix, mma, wgmma_a };
uint64_t warp_collective(Site site, WarpOp op, unsigned mask, uint64_t value, int arg, int width);
unsigned active_mask();
[[noreturn]] void fail(Site site, const char* what);
unsigned char* dyn_smem_base();
// The running block's storage for the FK_SHARED declaration `key` names: `bytes` on the
// heap, 16-byte aligned, filled with 0xFF (NaN in every float type) at the block's first
// use and freed with the block, so AddressSanitizer sees accesses past its end.
void* block_shared(const void* key, size_t bytes);

// One FK_SHARED declaration's storage (Tag: a lambda's type, unique to the declaration).
template <typename T, typename Tag>
T& block_shared(Tag) {
  static_assert(std::is_trivially_default_constructible<T>::value, "shared memory holds plain data");
  static char key;  // its address names the declaration (not const: never merged)
  return *static_cast<T*>(block_shared(&key, sizeof(T)));
}

// Bit casts through memcpy (no aliasing games).
template <typename To, typename From>
inline To bit_cast(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast sizes");
  To t;
  std::memcpy(&t, &f, sizeof(To));
  return t;
}

template <typename T>
inline T shfl(Site site, WarpOp op, unsigned mask, T var, int arg, int width = warpSize) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type over 8 bytes");
  uint64_t in = 0;
  std::memcpy(&in, &var, sizeof(T));
  const uint64_t out = warp_collective(site, op, mask, in, arg, width);
  T r;
  std::memcpy(&r, &out, sizeof(T));
  return r;
}

}  // namespace fk_emu

#define FK_KERNEL_BOUNDS(name, Params, threads)                                                 \
  static void name##_fk_body(const Params p);                                                   \
  static void name##_fk_entry(const void* raw) { name##_fk_body(*static_cast<const Params*>(raw)); } \
  static ::fk_emu::Registrar name##_fk_registrar(#name, &name##_fk_entry, sizeof(Params), threads); \
  static void name##_fk_body(const Params p)
#define FK_KERNEL(name, Params) FK_KERNEL_BOUNDS(name, Params, 1024)
#define FK_KERNEL_TMA(name, Params, threads) FK_KERNEL_BOUNDS(name, Params, threads)
#define FK_KERNEL_REGS(name, Params, threads, regs) FK_KERNEL_BOUNDS(name, Params, threads)

// ---- synchronization --------------------------------------------------------------------
#define __syncthreads() ((void)::fk_emu::block_barrier(FK_EMU_SITE, ::fk_emu::BarrierKind::plain, 0))
#define __syncthreads_count(pred) ::fk_emu::block_barrier(FK_EMU_SITE, ::fk_emu::BarrierKind::count, (pred) ? 1 : 0)
#define __syncthreads_and(pred) ::fk_emu::block_barrier(FK_EMU_SITE, ::fk_emu::BarrierKind::all, (pred) ? 1 : 0)
#define __syncthreads_or(pred) ::fk_emu::block_barrier(FK_EMU_SITE, ::fk_emu::BarrierKind::any, (pred) ? 1 : 0)
#define __syncwarp(...) ((void)::fk_emu::warp_collective(FK_EMU_SITE, ::fk_emu::WarpOp::sync, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 0xffffffffu, 0, 0, 32))
#define __shfl_sync(mask, var, ...) ::fk_emu::shfl(FK_EMU_SITE, ::fk_emu::WarpOp::shfl_idx, mask, var, __VA_ARGS__)
#define __shfl_up_sync(mask, var, ...) ::fk_emu::shfl(FK_EMU_SITE, ::fk_emu::WarpOp::shfl_up, mask, var, __VA_ARGS__)
#define __shfl_down_sync(mask, var, ...) ::fk_emu::shfl(FK_EMU_SITE, ::fk_emu::WarpOp::shfl_down, mask, var, __VA_ARGS__)
#define __shfl_xor_sync(mask, var, ...) ::fk_emu::shfl(FK_EMU_SITE, ::fk_emu::WarpOp::shfl_xor, mask, var, __VA_ARGS__)
#define __ballot_sync(mask, pred) static_cast<unsigned>(::fk_emu::warp_collective(FK_EMU_SITE, ::fk_emu::WarpOp::ballot, mask, (pred) ? 1 : 0, 0, 32))
#define __any_sync(mask, pred) static_cast<int>(::fk_emu::warp_collective(FK_EMU_SITE, ::fk_emu::WarpOp::any, mask, (pred) ? 1 : 0, 0, 32))
#define __all_sync(mask, pred) static_cast<int>(::fk_emu::warp_collective(FK_EMU_SITE, ::fk_emu::WarpOp::all, mask, (pred) ? 1 : 0, 0, 32))
#define __activemask() ::fk_emu::active_mask()
#define __trap() ::fk_emu::fail(FK_EMU_SITE, "__trap()")
#define __threadfence() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define __threadfence_block() __atomic_thread_fence(__ATOMIC_SEQ_CST)

// ---- dynamic shared memory ----------------------------------------------------------------
// Kernels use dyn_smem<T>() on both sides (compat.cuh defines it for nvcc). Poisoned with
// 0xFF before each block.
template <typename T>
inline T* dyn_smem() {
  return reinterpret_cast<T*>(::fk_emu::dyn_smem_base());
}

// ---- half-precision types ---------------------------------------------------------------
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 x) { return fk_emu::bf16_bits_to_f32(x.bits); }
inline __nv_bfloat16 __float2bfloat16(float x) { return {fk_emu::f32_to_bf16_bits(x)}; }
inline float __half2float(__half x) { return fk_emu::f16_bits_to_f32(x.bits); }
inline __half __float2half(float x) { return {fk_emu::f32_to_f16_bits(x)}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 x) { return x.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return {b}; }
inline unsigned short __half_as_ushort(__half x) { return x.bits; }
inline __half __ushort_as_half(unsigned short b) { return {b}; }

// ---- bit casts and math -----------------------------------------------------------------
inline float __int_as_float(int x) { return fk_emu::bit_cast<float>(x); }
inline int __float_as_int(float x) { return fk_emu::bit_cast<int>(x); }
inline float __uint_as_float(unsigned x) { return fk_emu::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return fk_emu::bit_cast<unsigned>(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
// CUDA's 1-based index of the least significant set bit (0 for 0).
inline int __ffs(int x) { return x == 0 ? 0 : __builtin_ctz(static_cast<unsigned>(x)) + 1; }
// CUDA's __byte_perm: byte n of the result is input byte s<4n+2:4n> of the eight {x, y}
// (x bytes 0-3, y bytes 4-7). The selector's bit 3 (prmt's sign replication) is not modelled:
// kernels leave it 0.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long bytes = (static_cast<unsigned long long>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((bytes >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
}
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }

// ---- atomics: real host atomics (blocks may run in parallel) ------------------------------
template <typename T>
inline T atomicCAS(T* p, T compare, T value) {
  static_assert(std::is_integral<T>::value, "atomicCAS on an integer type");
  __atomic_compare_exchange_n(p, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}
template <typename T, typename std::enable_if<std::is_integral<T>::value, int>::type = 0>
inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline float atomicAdd(float* p, float v) {
  uint32_t* u = reinterpret_cast<uint32_t*>(p);
  uint32_t old = __atomic_load_n(u, __ATOMIC_SEQ_CST);
  while (!__atomic_compare_exchange_n(u, &old, fk_emu::f32_bits(fk_emu::f32_from_bits(old) + v), false,
                                      __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return fk_emu::f32_from_bits(old);
}
template <typename T>
inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
template <typename T>
inline T atomicMax(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old > v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}

// ---- the instructions ptx.cuh wraps (tensor.cpp) ------------------------------------------
void fk_emu_ldmatrix(uint32_t* regs, int count, bool trans, const void* row);
void fk_emu_stmatrix_x4_trans(void* row, const uint32_t* regs);
void fk_emu_mma(float* d, const uint32_t* a, const uint32_t* b, const float* c, int type);
uint32_t fk_emu_cvt_bf16x2(float hi, float lo);
uint16_t fk_emu_cvt_fp8x2(float hi, float lo, int type);
void fk_emu_cp_async(void* smem, const void* gmem, int bytes, int src_bytes);
float fk_emu_rcp_approx_ftz(float x);
// A subnormal becomes a zero of the same sign (.ftz).
inline float fk_emu_flush(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x; }
void fk_emu_cp_async_commit();
void fk_emu_fence_proxy_async();
void fk_emu_cp_async_wait(int pending);
// wgmma (ptx.cuh): deferred to the wait that lets its group go, so the tiles are read then.
// A from shared memory (`a`, K-major or `a_mn_major`) or registers (`a_regs`, this warp's
// fragment; `a` null); B from shared memory, K-major or `b_mn_major`.
void fk_emu_wgmma(float* d, int n, const void* a, const uint32_t* a_regs, const void* b, int type, bool a_mn_major,
                  bool b_mn_major);
void fk_emu_wgmma_commit();
void fk_emu_wgmma_wait(int pending);
// mbarrier and TMA (tma.cpp): a TMA load lands when a wait on its barrier's phase finds no
// thread left to run, so a read of its tile before that wait sees the poison put there at issue.
void fk_emu_mbarrier_init(uint64_t* bar, uint32_t arrivals);
void fk_emu_mbarrier_inval(uint64_t* bar);
void fk_emu_mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes);
void fk_emu_mbarrier_wait(uint64_t* bar, uint32_t parity);
void fk_emu_tma_load_2d(void* dst, const void* map, int32_t c0, int32_t c1, uint64_t* bar);
// Clusters (runtime.cpp, tma.cpp): a multicast load lands at dst's offset in the shared memory
// of every block of the cluster in `mask`, counted off the barrier at bar's offset in each.
void fk_emu_tma_load_2d_multicast(void* dst, const void* map, int32_t c0, int32_t c1, uint64_t* bar, uint16_t mask);
unsigned fk_emu_cluster_ctarank();
unsigned fk_emu_cluster_nctarank();
void fk_emu_cluster_sync();
