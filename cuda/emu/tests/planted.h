/* Params of the emulator's own test kernels (cuda/emu/tests/planted.cu). */
#ifndef FK_EMU_TESTS_PLANTED_H
#define FK_EMU_TESTS_PLANTED_H
#include <stdint.h>

#include "../../params/tma.h"

typedef struct EmuTestParams {
  float* out;
  const float* in;
  uint32_t n;
} EmuTestParams;

/* The TMA test kernels: one box of `map` at (c0, c1), box_elems 16-bit elements, copied
 * from shared memory as it landed (swizzled) to `out`; `second` boxes follow at c0 + 64·i,
 * each in the next phase of the same barrier (the parity flips). */
typedef struct EmuTmaTestParams {
  FkTensorMap map;
  uint16_t* out;
  int32_t c0, c1;
  uint32_t box_elems;
  uint32_t boxes;
} EmuTmaTestParams;

#endif
