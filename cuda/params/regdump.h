/* Params for the register-dump kernels (cuda/regdump.cu): one warp records what each lane
 * holds after ldmatrix / mma / packed cvt, so that the emulator can be compared with real
 * hardware (tests/data/regdump-*.txt). */
#ifndef FK_PARAMS_REGDUMP_H
#define FK_PARAMS_REGDUMP_H
#include <stdint.h>

#include "tma.h"

#define FK_REGDUMP_LDMATRIX_VARIANTS 6 /* x1, x2, x4, then the same .trans */
#define FK_REGDUMP_MMA_IN 10           /* per lane: A[4], B[2], C[4] (f32 bits) */
#define FK_REGDUMP_CVT_IN 2            /* per lane: hi, lo (f32 bits) */
#define FK_REGDUMP_CVT_OUT 3           /* per lane: bf16x2, e4m3x2, e5m2x2 */
#define FK_REGDUMP_RCP_WORDS 262144    /* 2^23 mantissas, one bit each */
#define FK_REGDUMP_RCP_SAMPLES 1024
/* wgmma (sm_90a), one warpgroup: A [64][64] and B [8][64] 16-bit elements, row-major, two
 * per word, then C [thread][4] (f32 bits); four m64n8k16 along K accumulate into C. */
#define FK_REGDUMP_WGMMA_THREADS 128
#define FK_REGDUMP_WGMMA_IN ((64 * 64 + 8 * 64) / 2 + FK_REGDUMP_WGMMA_THREADS * 4)

typedef struct RegdumpParams {
  uint32_t* out;      /* ldmatrix: [variant][lane][4]; mma, wgmma: [thread][4]; cvt: [lane][3];
                         rcp_table: [FK_REGDUMP_RCP_WORDS]; rcp: [FK_REGDUMP_RCP_SAMPLES] */
  const uint32_t* in; /* mma: [lane][FK_REGDUMP_MMA_IN]; wgmma: FK_REGDUMP_WGMMA_IN words;
                         cvt: [lane][FK_REGDUMP_CVT_IN];
                         rcp: [FK_REGDUMP_RCP_SAMPLES] */
} RegdumpParams;

/* regdump_tma (sm_90a), one block of FK_REGDUMP_TMA_THREADS: `boxes` TMA loads of `map`'s
 * box of 64 × box_rows 16-bit elements at (c0 + 64·i, c1), one phase of one mbarrier each,
 * each tile copied out as it landed in shared memory (swizzled, when the map is) to
 * out[i · 64 · box_rows ...]. regdump_tma_multicast (clusters along x) the same, each
 * block of a cluster loading its box rows below the previous one's into all of them. The
 * emulator's planted-bug kernels (cuda/emu/tests) take the same params. */
#define FK_REGDUMP_TMA_THREADS 128
typedef struct RegdumpTmaParams {
  FkTensorMap map;
  uint16_t* out;
  int32_t c0, c1;
  uint32_t box_rows;
  uint32_t boxes;
} RegdumpTmaParams;

#endif
