/* A tensor map: what a TMA load (cp.async.bulk.tensor, sm_90) reads to find a tile of a 2-D
 * matrix in global memory. On a GPU it is the 128 opaque bytes cuTensorMapEncodeTiled
 * writes; on the emulator the same bytes hold an FkEmuTensorMap (cuda/emu/api.h).
 * src/device/tma.rs encodes it for both. Kernels take it from their params struct, which
 * they receive as __grid_constant__ (compat.cuh), so the TMA instruction can name it in
 * parameter space; the PTX ISA wants it 64-byte aligned. */
#ifndef FK_PARAMS_TMA_H
#define FK_PARAMS_TMA_H
#include <stdint.h>

typedef struct __attribute__((aligned(64))) FkTensorMap {
  uint64_t opaque[16];
} FkTensorMap;

#endif
