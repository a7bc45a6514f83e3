/* api.h: the emulator's C ABI, called from Rust (src/device/emu.rs). bindgen generates the
 * Rust side of FkEmuOptions into src/params.rs with the kernel params. */
#ifndef FK_EMU_API_H
#define FK_EMU_API_H
#include <stdint.h>

#define FK_EMU_SCHEDULE_FORWARD 0
#define FK_EMU_SCHEDULE_REVERSE 1
#define FK_EMU_SCHEDULE_RANDOM 2

#define FK_EMU_FORMAT_BF16 0
#define FK_EMU_FORMAT_F16 1
#define FK_EMU_FORMAT_E4M3 2
#define FK_EMU_FORMAT_E5M2 3

typedef struct FkEmuOptions {
  uint32_t schedule;    /* FK_EMU_SCHEDULE_*: the order fibers (and blocks) run in */
  uint64_t seed;        /* for FK_EMU_SCHEDULE_RANDOM */
  uint32_t threads;     /* OS threads running blocks in parallel; 0 means 1 */
  uint32_t stack_bytes; /* per fiber; 0 means 256 KiB */
  /* MUFU.RCP (rcp.approx.ftz.f32) as the GPU computes it: the model in
   * src/reference/mufu.rs, one implementation for the references and the emulator. */
  float (*rcp_approx_ftz)(float);
} FkEmuOptions;

/* A tensor map as the emulator's TMA reads it, in an FkTensorMap's 128 bytes (written by
 * src/device/tma.rs, which checks what cuTensorMapEncodeTiled would): a 2-D matrix of
 * `elem_bytes`-wide elements, dims[0] along a row (contiguous), dims[1] rows, rows
 * `row_stride` bytes apart; a load copies a box[0] × box[1] tile, zeros outside the matrix,
 * in the 128-byte swizzle when `swizzle_128b`. */
#define FK_EMU_TENSOR_MAP_MAGIC 0x70616D726F736E65ull /* "ensormap" */
typedef struct FkEmuTensorMap {
  uint64_t magic; /* FK_EMU_TENSOR_MAP_MAGIC: encoded */
  uint64_t base;  /* the matrix's address */
  uint64_t dims[2];
  uint64_t row_stride;
  uint32_t box[2];
  uint32_t elem_bytes;
  uint32_t swizzle_128b;
} FkEmuTensorMap;

#ifdef __cplusplus
extern "C" {
#endif

/* Runs kernel `name` over the grid on the host, in clusters of `cluster` blocks ({1, 1, 1}:
 * no clusters), the blocks of a cluster together. Returns 0, or 1 with a message in `err`
 * (a kernel bug the emulator caught, or a launch the GPU would refuse). */
int fk_emu_launch(const char* name, const uint32_t grid[3], const uint32_t block[3], const uint32_t cluster[3],
                  uint32_t dynamic_smem, const void* params, uint64_t params_size, const FkEmuOptions* options, char* err,
                  uint64_t err_len);

/* The numeric conversions, as CUDA performs them, for the exhaustive tests. */
uint32_t fk_emu_from_f32(uint32_t format, float x);
float fk_emu_to_f32(uint32_t format, uint32_t bits);

#ifdef __cplusplus
}
#endif
#endif
