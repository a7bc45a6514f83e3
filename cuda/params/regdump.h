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

typedef struct RegdumpParams {
  uint32_t* out;      /* ldmatrix: [variant][lane][4]; mma: [lane][4]; cvt: [lane][3] */
  const uint32_t* in; /* mma: [lane][FK_REGDUMP_MMA_IN]; cvt: [lane][FK_REGDUMP_CVT_IN] */
} RegdumpParams;

#endif
