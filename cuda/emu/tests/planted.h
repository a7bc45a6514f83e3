/* Params of the emulator's own test kernels (cuda/emu/tests/planted.cu). */
#ifndef FK_EMU_TESTS_PLANTED_H
#define FK_EMU_TESTS_PLANTED_H
#include <stdint.h>

typedef struct EmuTestParams {
  float* out;
  const float* in;
  uint32_t n;
} EmuTestParams;

#endif
