// compat.cuh: the one include every kernel starts with.
//
// Under nvcc it pulls in CUDA's own headers and nothing else. Under a host compiler it
// pulls in the emulator runtime (cuda/emu/), which provides the same names on the CPU.
// FK_KERNEL declares an entry point that takes one params struct by value (DESIGN.md §3):
//   FK_KERNEL(scatter_add_bf16_f32, ScatterAddParams) { ... use p ... }
#pragma once

// FK_SHARED(name, Type) declares static shared memory, `Type name` (an array as
// `float[256]`), 16-byte aligned. Kernels use it instead of `__shared__` (which the emulator
// does not define): there each declaration gets per-block storage, poisoned at the block's
// first use, so a read before any write sees garbage as on a GPU, not the previous block's.
template <typename T>
using fk_type = T;

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#define FK_KERNEL(name, Params) extern "C" __global__ void name(const Params p)
#define FK_KERNEL_BOUNDS(name, Params, threads) \
  extern "C" __global__ void __launch_bounds__(threads) name(const Params p)
// FK_KERNEL_BOUNDS for a kernel whose params hold TMA tensor maps: __grid_constant__, read in
// place in parameter space, so a map's address is a parameter-space one, as TMA wants. (Not
// on every kernel: a kernel that passes a params field by reference then reads it through a
// generic pointer, which cost the NF4 GEMV a spill.)
#define FK_KERNEL_TMA(name, Params, threads) \
  extern "C" __global__ void __launch_bounds__(threads) name(const __grid_constant__ Params p)
// A kernel with an explicit register budget instead (CUDA allows __maxnreg__ or
// __launch_bounds__, not both): under __launch_bounds__(256) ptxas may squeeze a tile GEMM
// into 128 registers for a second block per SM, spilling to get there.
#define FK_KERNEL_REGS(name, Params, threads, regs) extern "C" __global__ void __maxnreg__(regs) name(const Params p)
// Dynamic shared memory, one helper on both sides (the emulator poisons it per block).
template <typename T>
__device__ __forceinline__ T* dyn_smem() {
  extern __shared__ __align__(16) unsigned char fk_dyn_smem[];
  return reinterpret_cast<T*>(fk_dyn_smem);
}
#define FK_SHARED(name, ...) __shared__ __align__(16) fk_type<__VA_ARGS__> name
// The first read of a word other threads change atomically (the start of a CAS loop): a
// plain load on the GPU; among the emulator's host threads an atomic one, since a plain read
// racing with their CAS is a data race in C++.
template <typename T>
__device__ __forceinline__ T relaxed_load(const T* p) {
  return *p;
}
#else
#include "../emu/emu.h"
#define FK_SHARED(name, ...) fk_type<__VA_ARGS__>& name = ::fk_emu::block_shared<fk_type<__VA_ARGS__>>([] {})
template <typename T>
inline T relaxed_load(const T* p) {
  return __atomic_load_n(p, __ATOMIC_RELAXED);
}
#endif

#define FK_DEVICE __device__ __forceinline__

// The element types of mma.sync (ptx.cuh) and their emulation (cuda/emu/tensor.cpp).
enum class MmaType { bf16, f16, e4m3, e5m2 };
