// dtype.cuh: element loads and stores through f32, one overload per storage type.
// Kernels compute in f32 and round once on store (round-to-nearest-even, as __float2bfloat16
// and __float2half do).
#pragma once
#include "compat.cuh"

FK_DEVICE float to_f32(float x) { return x; }
FK_DEVICE float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
FK_DEVICE float to_f32(__half x) { return __half2float(x); }

template <typename T> FK_DEVICE T from_f32(float x);
template <> FK_DEVICE float from_f32<float>(float x) { return x; }
template <> FK_DEVICE __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> FK_DEVICE __half from_f32<__half>(float x) { return __float2half(x); }

// The raw 16 bits of a half-precision value, and back (for 16-bit atomicCAS loops).
FK_DEVICE unsigned short bits16(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
FK_DEVICE unsigned short bits16(__half x) { return __half_as_ushort(x); }
template <typename T> FK_DEVICE T from_bits16(unsigned short b);
template <> FK_DEVICE __nv_bfloat16 from_bits16<__nv_bfloat16>(unsigned short b) { return __ushort_as_bfloat16(b); }
template <> FK_DEVICE __half from_bits16<__half>(unsigned short b) { return __ushort_as_half(b); }

// Whether a matrix of 16-bit elements whose lines are `ld` apart splits into whole 16-byte
// runs (cp.async's copies), each in or out of every line together.
FK_DEVICE bool runs_of_8(const void* ptr, uint64_t ld) { return ld % 8 == 0 && reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Two values rounded to a 16-bit O, packed as they lie in memory (the first lowest).
template <typename O>
FK_DEVICE uint32_t pack2(float a, float b) {
  return uint32_t(bits16(from_f32<O>(a))) | uint32_t(bits16(from_f32<O>(b))) << 16;
}

// Eight values rounded to a 16-bit O, packed as they lie in memory (the first lowest).
template <typename O>
FK_DEVICE uint4 pack8(const float* v) {
  return make_uint4(pack2<O>(v[0], v[1]), pack2<O>(v[2], v[3]), pack2<O>(v[4], v[5]), pack2<O>(v[6], v[7]));
}

// Two values rounded to O in one store of 2 · sizeof(O) bytes (dst aligned to that).
template <typename O>
FK_DEVICE void store_pair(O* dst, float a, float b) {
  if constexpr (sizeof(O) == 4) {
    *reinterpret_cast<float2*>(dst) = make_float2(a, b);
  } else {
    *reinterpret_cast<uint32_t*>(dst) = pack2<O>(a, b);
  }
}

// 16 / sizeof(O) values rounded to O, in one 16-byte store (dst 16-byte aligned).
template <typename O>
FK_DEVICE void store_16_bytes(O* dst, const float* v) {
  if constexpr (sizeof(O) == 4) {
    *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    *reinterpret_cast<uint4*>(dst) = pack8<O>(v);
  }
}

// Sixteen values rounded to O and stored with 16-byte stores (dst 16-byte aligned).
template <typename O>
FK_DEVICE void store16(O* dst, const float (&v)[16]) {
  for (int i = 0; i < 16; i += 16 / int(sizeof(O))) store_16_bytes(dst + i, v + i);
}
