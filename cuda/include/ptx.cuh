// ptx.cuh: every inline PTX instruction the kernels use, and nowhere else (a build check
// fails on `asm(` outside this file). Under nvcc each is one asm statement; under the host
// emulator each calls the emulator's implementation of the same instruction, which follows
// the PTX ISA fragment layouts (../shared/reference/ptx-fragments.md in the design notes).
#pragma once
#include "compat.cuh"
#include "../params/gemm.h"
#include "../params/tma.h"

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

// ---- a global load issued where it is written -----------------------------------------

// *p, 16 bytes from global memory, issued here: nvcc otherwise sinks a load to its first use,
// and one whose round trip should overlap a stretch of stores (a tile's epilogue) then waits
// after them. Its value is used only later, so the load issues and the code runs on.
FK_DEVICE uint4 ld_global_early(const uint4* p) {
#if FK_PTX
  uint4 r;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p) : "memory");
  return r;
#elif FK_EMU_PTX
  return *p;
#endif
}

// ---- cache hints for global loads (no effect on the emulator) ----------------------------

// Brings the 128-byte line holding `p` into L1, writing no register (prefetch.global.L1).
FK_DEVICE void prefetch_l1(const void* p) {
#if FK_PTX
  asm volatile("prefetch.global.L1 [%0];\n" ::"l"(p));
#elif FK_EMU_PTX
  (void)p;
#endif
}

// Brings the line holding `p` into L2 (prefetch.global.L2).
FK_DEVICE void prefetch_l2(const void* p) {
#if FK_PTX
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
#elif FK_EMU_PTX
  (void)p;
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

// ---- wgmma (sm_90a): warpgroup MMA with both operands in shared memory -----------------
//
// A warpgroup (4 warps, 128 threads) computes D[64 × 256] += A[64 × 16] · B[16 × 256]ᵀ, f32
// accumulators. A comes from shared memory or registers (_rs). Shared operands are K-major
// tiles in the 128-byte swizzle (the only layout the
// kernels use): rows of 64 16-bit elements, 128 bytes, whose 16-byte chunk c is stored at
// chunk c ^ (row % 8); 8-row groups 1024 bytes apart; the tile 1024-byte aligned in the shared
// window (the swizzle is a function of address bits 4-9). `a` and `b` point at row 0 of the
// tile plus 2·k0 bytes for the 16 columns at k0 (0, 16, 32, 48).
// Accumulator d[j] of a thread is D[16·warp + lane/4 + 8·((j%4)/2)][8·(j/4) + 2·(lane%4) + j%2]
// with warp the thread's warp within its warpgroup (the m16n8 C fragment per 8 columns).
// The mma is asynchronous: d and the tiles belong to it until wgmma_wait lets the group go.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FK_HAS_WGMMA 1
#elif FK_EMU_PTX
#define FK_HAS_WGMMA 1
#endif

// Stores four 8×8 matrices of 16-bit elements, transposed: ldmatrix_x4_trans's inverse (the
// same fragments; each lane gives the 16-byte row `row` of matrix lane / 8). sm_90, used
// with the wgmma kernels (below sm_90a it traps, as they do).
FK_DEVICE void stmatrix_x4_trans(void* row, const uint32_t (&r)[4]) {
#if FK_PTX && FK_HAS_WGMMA
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(a), "r"(r[0]), "r"(r[1]),
               "r"(r[2]), "r"(r[3])
               : "memory");
#elif FK_PTX
  __trap();
#elif FK_EMU_PTX
  fk_emu_stmatrix_x4_trans(row, r);
#endif
}

#if FK_PTX && FK_HAS_WGMMA
// The matrix descriptor: start address >> 4 (bits 0-13), leading byte offset (16-29), stride
// byte offset 1024 >> 4 (32-45: the next 8 rows, or 8 K lines), base offset 0, swizzle mode 1 =
// 128 bytes (bits 62-63). A K-major tile leaves LBO unused (1 by convention). The same fields
// describe an MN-major operand (the PTX ISA's canonical layout ((8,8,m),(8,k)):((1,8,LBO),
// (64,SBO)) in 16-bit elements, 128-byte swizzle): 64 rows (A) or columns (B) along each
// 128-byte line, one line per K, the next 8 lines (K + 8) SBO = 1024 bytes on, the next 64
// rows or columns LBO = FK_WGMMA_MN_CHUNK_BYTES on (params/gemm.h; unused at M = 64 and at
// N <= 64).
template <bool kMnMajor = false>
FK_DEVICE uint64_t wgmma_descriptor(const void* tile) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(tile));
  constexpr uint64_t lbo = kMnMajor ? FK_WGMMA_MN_CHUNK_BYTES >> 4 : 1;
  return uint64_t((a & 0x3FFFF) >> 4) | (lbo << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

#define FK_WGMMA_D_REGS                                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "    \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "     \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "     \
  "%56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, "     \
  "%74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, "     \
  "%92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, " \
  "%109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, "     \
  "%124, %125, %126, %127}"

#define FK_WGMMA_D_OPERANDS(d)                                                                     \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),  \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),         \
  "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),       \
  "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),       \
  "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),       \
  "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),       \
  "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),       \
  "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),       \
  "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),       \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]),       \
  "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]),       \
  "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]),       \
  "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]),       \
  "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]),       \
  "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), \
  "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), \
  "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), \
  "+f"(d[127])

// Shared-memory A and B (SS): operands 128, 129 are the descriptors (`da`, `db` where the
// macro is used), 130 the scale-d flag; `trans_a`, `trans_b` the imm-trans operands (1:
// MN-major). With A from registers (RS) only B's.
#define FK_WGMMA_M64N256K16(type, trans_a, trans_b)                                                \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                                \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." type "." type " " FK_WGMMA_D_REGS             \
      ", %128, %129, p, 1, 1, " trans_a ", " trans_b ";\n}\n"                                      \
      : FK_WGMMA_D_OPERANDS(d)                                                                     \
      : "l"(da), "l"(db), "r"(1))
#define FK_WGMMA_M64N8K16(type, trans_a, trans_b)                                                  \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n"                                                  \
      "wgmma.mma_async.sync.aligned.m64n8k16.f32." type "." type                                   \
      " {%0, %1, %2, %3}, %4, %5, p, 1, 1, " trans_a ", " trans_b ";\n}\n"                         \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                             \
      : "l"(da), "l"(db), "r"(1))
#define FK_WGMMA_M64N8K16_RS(type, no_trans_a, trans_b)                                            \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"                                                  \
      "wgmma.mma_async.sync.aligned.m64n8k16.f32." type "." type                                   \
      " {%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, p, 1, 1, " trans_b ";\n}\n"                        \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                             \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1))
// The side products' shapes, N = 16 and 32 (8 and 16 accumulators): operands after d are the
// descriptors, then the scale-d flag (`scale_d`: 0 makes D = A·B, overwriting d).
#define FK_WGMMA_M64N16K16(type, trans_a, trans_b)                                                 \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n16k16.f32." type "." type                                  \
      " {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, " trans_a ", " trans_b ";\n}\n"         \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]) \
      : "l"(da), "l"(db), "r"(scale_d))
#define FK_WGMMA_M64N32K16(type, trans_a, trans_b)                                                 \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." type "." type                                  \
      " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, " \
      trans_a ", " trans_b ";\n}\n"                                                                \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),   \
        "+f"(d[15])                                                                                \
      : "l"(da), "l"(db), "r"(scale_d))
// The LoRA backward's [dB | dbias] beside dX's GEMM (lora.cu, DxSides), [u | 1] one column
// wider than a side product: N = 24 and 40 (12 and 20 accumulators).
#define FK_WGMMA_M64N24K16(type, trans_a, trans_b)                                                 \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %14, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n24k16.f32." type "." type                                  \
      " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11}, %12, %13, p, 1, 1, " trans_a ", "       \
      trans_b ";\n}\n"                                                                             \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11])                                           \
      : "l"(da), "l"(db), "r"(scale_d))
#define FK_WGMMA_M64N40K16(type, trans_a, trans_b)                                                 \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %22, 0;\n"                                                 \
      "wgmma.mma_async.sync.aligned.m64n40k16.f32." type "." type                                  \
      " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19}, " \
      "%20, %21, p, 1, 1, " trans_a ", " trans_b ";\n}\n"                                          \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),   \
        "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19])                            \
      : "l"(da), "l"(db), "r"(scale_d))
// A from registers at N = 256: operands 128-131 are A's fragment, 132 B's descriptor, 133 the
// scale-d flag.
#define FK_WGMMA_M64N256K16_RS(type, no_trans_a, trans_b)                                          \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"                                                \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." type "." type " " FK_WGMMA_D_REGS             \
      ", {%128, %129, %130, %131}, %132, p, 1, 1, " trans_b ";\n}\n"                               \
      : FK_WGMMA_D_OPERANDS(d)                                                                     \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1))
// One asm per element type (its name is part of the instruction) and operand layouts (the
// imm-trans operands: "1" for an MN-major operand from shared memory), with the descriptors
// `da` (unused by RS) and `db` of `a` and `b` in those layouts.
#define FK_WGMMA_LAYOUTS(kMnA, kMnB, MACRO, type)                                                  \
  if constexpr (kMnA && kMnB) MACRO(type, "1", "1");                                               \
  else if constexpr (kMnA) MACRO(type, "1", "0");                                                  \
  else if constexpr (kMnB) MACRO(type, "0", "1");                                                  \
  else MACRO(type, "0", "0");
#define FK_WGMMA_TYPED(kMnA, kMnB, MACRO)                                                          \
  if constexpr (std::is_same<T, __half>::value) {                                                  \
    FK_WGMMA_LAYOUTS(kMnA, kMnB, MACRO, "f16")                                                     \
  } else {                                                                                         \
    FK_WGMMA_LAYOUTS(kMnA, kMnB, MACRO, "bf16")                                                    \
  }
#define FK_WGMMA_SS(kMnA, kMnB, MACRO)                                                             \
  const uint64_t da = wgmma_descriptor<kMnA>(a), db = wgmma_descriptor<kMnB>(b);                   \
  FK_WGMMA_TYPED(kMnA, kMnB, MACRO)
#define FK_WGMMA_RS(kMnB, MACRO)                                                                   \
  const uint64_t db = wgmma_descriptor<kMnB>(b);                                                   \
  FK_WGMMA_TYPED(false, kMnB, MACRO)
#endif

template <typename T>
constexpr int wgmma_type() {
  return static_cast<int>(std::is_same<T, __half>::value ? MmaType::f16 : MmaType::bf16);
}

// D += A·B, T bf16 or f16 (the `scale-d` flag is always 1: callers zero d first). SS: both
// operands are swizzled tiles; `kMnMajorA`, `kMnMajorB`: that operand is MN-major
// (wgmma_descriptor), its k0 slice at + 128·k0 bytes rather than + 2·k0.
template <typename T, bool kMnMajorA = false, bool kMnMajorB = false>
FK_DEVICE void wgmma_m64n256k16(float (&d)[128], const void* a, const void* b) {
#if FK_PTX && FK_HAS_WGMMA
  FK_WGMMA_SS(kMnMajorA, kMnMajorB, FK_WGMMA_M64N256K16)
#elif FK_PTX
  __trap();
#elif FK_EMU_PTX
  fk_emu_wgmma(d, 256, a, nullptr, b, wgmma_type<T>(), kMnMajorA, kMnMajorB);
#endif
}

// The same at N = 8 (4 accumulators a thread): the register dump's (cuda/regdump.cu), which
// records the instruction's layout and rounding on hardware at a size a dump can hold.
template <typename T, bool kMnMajorA = false, bool kMnMajorB = false>
FK_DEVICE void wgmma_m64n8k16(float (&d)[4], const void* a, const void* b) {
#if FK_PTX && FK_HAS_WGMMA
  FK_WGMMA_SS(kMnMajorA, kMnMajorB, FK_WGMMA_M64N8K16)
#elif FK_PTX
  __trap();
#elif FK_EMU_PTX
  fk_emu_wgmma(d, 8, a, nullptr, b, wgmma_type<T>(), kMnMajorA, kMnMajorB);
#endif
}

// RS: A from registers, this warp's 16 rows of the warpgroup's 64 in mma.sync's A fragment
// layout (ptx-fragments.md: a[0] rows g, k 2t..2t+1; a[1] rows g+8; a[2], a[3] the same at
// k + 8); they belong to the mma until the wait, as the accumulators do. The register dump's.
template <typename T>
FK_DEVICE void wgmma_m64n8k16_rs(float (&d)[4], const uint32_t (&a)[4], const void* b) {
#if FK_PTX && FK_HAS_WGMMA
  FK_WGMMA_RS(false, FK_WGMMA_M64N8K16_RS)
#elif FK_PTX
  __trap();
#elif FK_EMU_PTX
  fk_emu_wgmma(d, 8, nullptr, a, b, wgmma_type<T>(), false, false);
#endif
}

// The same at N = 16 or 32 (N / 2 accumulators a thread), both K-major: a side product beside
// the m64n256 ones from the same A tile (wgmma.cuh's Side: the LoRA forward's u = x Aᵀ, the
// backward's v = dY B); at N = 24 or 40 both MN-major, the same A tile read across its rows
// (the LoRA backward's [dB | dbias] = dYᵀ [u | 1], lora.cu's DxSides). `accumulate` false: D =
// A·B, d's values not read (its first k16 slice of a product, with no zeroing of d between).
template <typename T, int N, bool kMnMajorA = false, bool kMnMajorB = false>
FK_DEVICE void wgmma_m64nNk16(float (&d)[N / 2], const void* a, const void* b, bool accumulate = true) {
  static_assert(N == 16 || N == 24 || N == 32 || N == 40, "the side products' widths");
#if FK_PTX && FK_HAS_WGMMA
  const uint32_t scale_d = accumulate;
  if constexpr (N == 16) {
    FK_WGMMA_SS(kMnMajorA, kMnMajorB, FK_WGMMA_M64N16K16)
  } else if constexpr (N == 24) {
    FK_WGMMA_SS(kMnMajorA, kMnMajorB, FK_WGMMA_M64N24K16)
  } else if constexpr (N == 32) {
    FK_WGMMA_SS(kMnMajorA, kMnMajorB, FK_WGMMA_M64N32K16)
  } else {
    FK_WGMMA_SS(kMnMajorA, kMnMajorB, FK_WGMMA_M64N40K16)
  }
#elif FK_PTX
  __trap();
#elif FK_EMU_PTX
  if (!accumulate)
    for (int i = 0; i < N / 2; ++i) d[i] = 0.0f;  // what scale-d 0 reads of d, at the wait
  fk_emu_wgmma(d, N, a, nullptr, b, wgmma_type<T>(), kMnMajorA, kMnMajorB);
#endif
}

// RS at N = 256: A from registers as wgmma_m64n8k16_rs's (this warp's 16 rows, mma.sync's A
// fragment layout), B a swizzled tile (MN-major: `kMnMajorB`). `a` belongs to the mma until
// the wait that lets its group go.
template <typename T, bool kMnMajorB = false>
FK_DEVICE void wgmma_m64n256k16_rs(float (&d)[128], const uint32_t (&a)[4], const void* b) {
#if FK_PTX && FK_HAS_WGMMA
  FK_WGMMA_RS(kMnMajorB, FK_WGMMA_M64N256K16_RS)
#elif FK_PTX
  __trap();
#elif FK_EMU_PTX
  fk_emu_wgmma(d, 256, nullptr, a, b, wgmma_type<T>(), false, kMnMajorB);
#endif
}

// Orders this thread's register accesses to the accumulators before the wgmmas that follow.
FK_DEVICE void wgmma_fence() {
#if FK_PTX && FK_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

FK_DEVICE void wgmma_commit() {
#if FK_PTX && FK_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#elif FK_EMU_PTX
  fk_emu_wgmma_commit();
#endif
}

// Waits until at most `Pending` committed groups are in flight; their accumulators and
// tiles are the caller's again.
template <int Pending>
FK_DEVICE void wgmma_wait() {
#if FK_PTX && FK_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
#elif FK_EMU_PTX
  fk_emu_wgmma_wait(Pending);
#endif
}

// Keeps the compiler from moving accesses to the accumulators across a wgmma_wait (which
// does not name them): each register passes through an empty asm.
template <int N>
FK_DEVICE void wgmma_hold(float (&d)[N]) {
#if FK_PTX && FK_HAS_WGMMA
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
  (void)d;
#endif
}

// Orders this thread's generic-proxy accesses to shared memory (stores, cp.async that has
// landed, loads) before the async proxy's that follow: wgmma's reads, TMA's writes; a barrier
// follows.
FK_DEVICE void fence_proxy_async_shared() {
#if FK_PTX && FK_HAS_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#elif FK_EMU_PTX
  fk_emu_fence_proxy_async();
#endif
}

// The byte offset that brings `p` (shared memory) to the next 1024-byte boundary of the
// shared window, where a swizzled wgmma tile must start.
FK_DEVICE uint32_t shared_align_1024(const void* p) {
#if FK_PTX
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
#else
  const uint32_t a = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p));
#endif
  return (1024 - (a & 1023)) & 1023;
}

// ---- mbarrier and TMA (sm_90): tiles copied by the tensor memory accelerator ------------
//
// An mbarrier (8 bytes of shared memory) completes a phase once its expected arrivals have
// arrived and the bytes announced with them (expect_tx) have landed; a TMA load counts its
// bytes off the barrier it names as they land. Phases are told apart by parity: waiting on
// parity p returns once the phase of that parity has completed.

FK_DEVICE void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
#if FK_PTX && FK_HAS_WGMMA
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(b), "r"(arrivals) : "memory");
#elif FK_EMU_PTX
  fk_emu_mbarrier_init(bar, arrivals);
#endif
}

// Ends the barrier's life: required before its memory is initialized again.
FK_DEVICE void mbarrier_inval(uint64_t* bar) {
#if FK_PTX && FK_HAS_WGMMA
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.inval.shared::cta.b64 [%0];\n" ::"r"(b) : "memory");
#elif FK_EMU_PTX
  fk_emu_mbarrier_inval(bar);
#endif
}

// Makes initialized barriers visible to the async proxy (the TMA unit); a barrier follows.
FK_DEVICE void fence_mbarrier_init() {
#if FK_PTX && FK_HAS_WGMMA
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// One arrival, announcing `bytes` more to land in the current phase.
FK_DEVICE void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if FK_PTX && FK_HAS_WGMMA
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(b), "r"(bytes) : "memory");
#elif FK_EMU_PTX
  fk_emu_mbarrier_arrive_expect_tx(bar, bytes);
#endif
}

// Waits until the phase of parity `parity` has completed; what landed in it is visible after.
// (A timeout that traps, on clock64, made ptxas serialize the NF4 GEMMs' wgmmas: C7518. A
// phase that never completes hangs the kernel; the GPU check's per-step timeouts end it.)
FK_DEVICE void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#if FK_PTX && FK_HAS_WGMMA
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(b), "r"(parity) : "memory");
  }
#elif FK_EMU_PTX
  fk_emu_mbarrier_wait(bar, parity);
#endif
}

// Copies the box at coordinates (c0 along a row, c1 rows) of the matrix `map` describes
// (zeros outside it) to `dst` (shared memory, 128-byte aligned; 1024 for a swizzled map),
// counting its bytes off `bar`. `map` is in parameter space (a __grid_constant__ params
// struct's field).
FK_DEVICE void tma_load_2d(void* dst, const FkTensorMap* map, int32_t c0, int32_t c1, uint64_t* bar) {
#if FK_PTX && FK_HAS_WGMMA
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(d),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(b)
      : "memory");
#elif FK_EMU_PTX
  fk_emu_tma_load_2d(dst, map, c0, c1, bar);
#elif FK_PTX
  __trap();
#endif
}

// ---- clusters (sm_90): blocks launched together, on SMs of one GPC ----------------------
//
// A launch without clusters is a cluster of one block: rank 0 of 1.

FK_DEVICE uint32_t cluster_ctarank() {
#if FK_PTX && FK_HAS_WGMMA
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
#elif FK_EMU_PTX
  return fk_emu_cluster_ctarank();
#else
  return 0;
#endif
}

FK_DEVICE uint32_t cluster_nctarank() {
#if FK_PTX && FK_HAS_WGMMA
  uint32_t n;
  asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n));
  return n;
#elif FK_EMU_PTX
  return fk_emu_cluster_nctarank();
#else
  return 1;
#endif
}

// Every thread of every block of the cluster arrives (release) and waits (acquire): what each
// did to shared memory before it, its own or (multicast) a peer's, is ordered before what any
// does after.
FK_DEVICE void cluster_sync() {
#if FK_PTX && FK_HAS_WGMMA
  asm volatile("barrier.cluster.arrive.aligned;\nbarrier.cluster.wait.aligned;\n" ::: "memory");
#elif FK_EMU_PTX
  fk_emu_cluster_sync();
#else
  __syncthreads();
#endif
}

// tma_load_2d into every block of the cluster in `mask`: the box lands at dst's offset in each
// one's shared memory, counted off the mbarrier at bar's offset in each.
FK_DEVICE void tma_load_2d_multicast(void* dst, const FkTensorMap* map, int32_t c0, int32_t c1, uint64_t* bar,
                                     uint16_t mask) {
#if FK_PTX && FK_HAS_WGMMA
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  const uint32_t b = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(d),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(b), "h"(mask)
      : "memory");
#elif FK_EMU_PTX
  fk_emu_tma_load_2d_multicast(dst, map, c0, c1, bar, mask);
#elif FK_PTX
  __trap();
#endif
}
