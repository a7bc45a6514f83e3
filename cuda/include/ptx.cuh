// ptx.cuh: every inline PTX instruction the kernels use, and nowhere else (a build check
// fails on `asm(` outside this file). Under nvcc each is one asm statement; under the host
// emulator each calls the emulator's implementation of the same instruction, which follows
// the PTX ISA fragment layouts (../shared/reference/ptx-fragments.md in the design notes).
#pragma once
#include "compat.cuh"

#if defined(__CUDA_ARCH__)
#define FK_PTX 1
#elif !defined(__CUDACC__)
#define FK_EMU_PTX 1
#endif

// ---- ldmatrix: lanes 8j..8j+7 pass the addresses of rows 0..7 of matrix j -------------

FK_DEVICE void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
#if FK_PTX
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
#elif FK_EMU_PTX
  fk_emu_ldmatrix(r, 1, false, row);
#endif
}

FK_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
#if FK_PTX
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(a));
#elif FK_EMU_PTX
  fk_emu_ldmatrix(r, 2, false, row);
#endif
}

FK_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if FK_PTX
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#elif FK_EMU_PTX
  fk_emu_ldmatrix(r, 4, false, row);
#endif
}

FK_DEVICE void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row) {
#if FK_PTX
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
#elif FK_EMU_PTX
  fk_emu_ldmatrix(r, 1, true, row);
#endif
}

FK_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
#if FK_PTX
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(a));
#elif FK_EMU_PTX
  fk_emu_ldmatrix(r, 2, true, row);
#endif
}

FK_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#if FK_PTX
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#elif FK_EMU_PTX
  fk_emu_ldmatrix(r, 4, true, row);
#endif
}

// ---- mma.sync: D = A·B + C, f32 accumulate ------------------------------------------------

FK_DEVICE void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                 const float (&c)[4]) {
#if FK_PTX
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#elif FK_EMU_PTX
  fk_emu_mma(d, a, b, c, static_cast<int>(MmaType::bf16));
#endif
}

FK_DEVICE void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                const float (&c)[4]) {
#if FK_PTX
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#elif FK_EMU_PTX
  fk_emu_mma(d, a, b, c, static_cast<int>(MmaType::f16));
#endif
}

// FP8 mma.sync exists from sm_89; on sm_90 ptxas lowers it through f16 tensor-core ops.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define FK_HAS_FP8_MMA 1
#elif FK_EMU_PTX
#define FK_HAS_FP8_MMA 1
#endif

FK_DEVICE void mma_m16n8k32_e4m3(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                 const float (&c)[4]) {
#if FK_PTX && FK_HAS_FP8_MMA
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#elif FK_PTX
  __trap();
#elif FK_EMU_PTX
  fk_emu_mma(d, a, b, c, static_cast<int>(MmaType::e4m3));
#endif
}

FK_DEVICE void mma_m16n8k32_e5m2(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                 const float (&c)[4]) {
#if FK_PTX && FK_HAS_FP8_MMA
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e5m2.e5m2.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#elif FK_PTX
  __trap();
#elif FK_EMU_PTX
  fk_emu_mma(d, a, b, c, static_cast<int>(MmaType::e5m2));
#endif
}

// ---- packed conversions: the first source operand lands in the UPPER half ------------------

// cvt.rn.bf16x2.f32 d, hi, lo
FK_DEVICE uint32_t cvt_bf16x2(float hi, float lo) {
#if FK_PTX
  uint32_t d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
#elif FK_EMU_PTX
  return fk_emu_cvt_bf16x2(hi, lo);
#endif
}

// cvt.rn.satfinite.e4m3x2.f32 d, hi, lo (sm_89+)
FK_DEVICE uint16_t cvt_e4m3x2(float hi, float lo) {
#if FK_PTX && FK_HAS_FP8_MMA
  uint16_t d;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(d) : "f"(hi), "f"(lo));
  return d;
#elif FK_PTX
  __trap();
  return 0;
#elif FK_EMU_PTX
  return fk_emu_cvt_fp8x2(hi, lo, static_cast<int>(MmaType::e4m3));
#endif
}

// cvt.rn.satfinite.e5m2x2.f32 d, hi, lo (sm_89+)
FK_DEVICE uint16_t cvt_e5m2x2(float hi, float lo) {
#if FK_PTX && FK_HAS_FP8_MMA
  uint16_t d;
  asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;\n" : "=h"(d) : "f"(hi), "f"(lo));
  return d;
#elif FK_PTX
  __trap();
  return 0;
#elif FK_EMU_PTX
  return fk_emu_cvt_fp8x2(hi, lo, static_cast<int>(MmaType::e5m2));
#endif
}

// ---- fast-math arithmetic, for bit-exactness with code built with --use_fast_math ---------
// (bitsandbytes' kernels: src/reference/nf4.rs). Subnormal inputs and results flush to zero.

// rcp.approx.ftz.f32 (SASS MUFU.RCP): within an ulp of 1/x, not always correctly rounded.
FK_DEVICE float rcp_approx_ftz(float x) {
#if FK_PTX
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
#elif FK_EMU_PTX
  return fk_emu_rcp_approx_ftz(x);
#endif
}

FK_DEVICE float mul_ftz(float a, float b) {
#if FK_PTX
  float r;
  asm("mul.rn.ftz.f32 %0, %1, %2;\n" : "=f"(r) : "f"(a), "f"(b));
  return r;
#elif FK_EMU_PTX
  return fk_emu_flush(fk_emu_flush(a) * fk_emu_flush(b));
#endif
}

FK_DEVICE float max_ftz(float a, float b) {
#if FK_PTX
  float r;
  asm("max.ftz.f32 %0, %1, %2;\n" : "=f"(r) : "f"(a), "f"(b));
  return r;
#elif FK_EMU_PTX
  return fmaxf(fk_emu_flush(a), fk_emu_flush(b));
#endif
}

// ---- ld.shared with the address formed in the shared window -------------------------------

// base[index] for `base` in shared memory. nvcc turns a generic pointer into a shared address
// at each load (an add per load); with the conversion of a loop-invariant base hoisted, a
// table lookup is one multiply-add and the load.
FK_DEVICE uint32_t ld_shared_u32(const uint32_t* base, uint32_t index) {
#if FK_PTX
  uint32_t r;
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(base)) + 4 * index;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(r) : "r"(a));
  return r;
#elif FK_EMU_PTX
  return base[index];
#endif
}

// ---- cp.async: global -> shared, completed by wait_group ----------------------------------

template <int Bytes>
FK_DEVICE void cp_async(void* smem, const void* gmem) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
#if FK_PTX
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  if constexpr (Bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(s), "l"(gmem), "n"(Bytes));
  }
#elif FK_EMU_PTX
  fk_emu_cp_async(smem, gmem, Bytes, Bytes);
#endif
}

// 16 bytes of which the first `src_bytes` (0..16) come from gmem and the rest are zero:
// tiles past a matrix edge load as zeros. gmem must be a valid address even when
// src_bytes is 0 (nothing is read then).
FK_DEVICE void cp_async_zfill16(void* smem, const void* gmem, int src_bytes) {
#if FK_PTX
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
#elif FK_EMU_PTX
  fk_emu_cp_async(smem, gmem, 16, src_bytes);
#endif
}

FK_DEVICE void cp_async_commit() {
#if FK_PTX
  asm volatile("cp.async.commit_group;\n" ::);
#elif FK_EMU_PTX
  fk_emu_cp_async_commit();
#endif
}

template <int Pending>
FK_DEVICE void cp_async_wait() {
#if FK_PTX
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
#elif FK_EMU_PTX
  fk_emu_cp_async_wait(Pending);
#endif
}

// wait_all = commit_group + wait_group 0: it also completes uncommitted copies.
FK_DEVICE void cp_async_wait_all() {
#if FK_PTX
  asm volatile("cp.async.wait_all;\n" ::);
#elif FK_EMU_PTX
  fk_emu_cp_async_commit();
  fk_emu_cp_async_wait(0);
#endif
}
