/* Params for the register-dump kernels (cuda/regdump.cu): one warp records what each lane
 * holds after ldmatrix / mma / packed cvt, so that the emulator can be compared with real
 * hardware (tests/data/regdump-*.txt). */
#ifndef FK_PARAMS_REGDUMP_H
#define FK_PARAMS_REGDUMP_H
#include <stdint.h>

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

#endif
