/* The tile GEMM's launch shape (cuda/include/gemm.cuh), which the Rust launchers of every
 * kernel built on it (src/lora, src/nf4) read from here: a block of FK_GEMM_THREADS threads
 * computes one FK_GEMM_TILE x FK_GEMM_TILE tile of the output. */
#ifndef FK_PARAMS_GEMM_H
#define FK_PARAMS_GEMM_H

#define FK_GEMM_TILE 128
#define FK_GEMM_THREADS 256

/* The Hopper GEMM (cuda/include/wgmma.cuh, sm_90a): a block of FK_WGMMA_THREADS threads (two
 * warpgroups) computes FK_WGMMA_TILE_M x FK_WGMMA_TILE_N tiles, one after another, through
 * FK_WGMMA_STAGES stages of 64 along K in FK_WGMMA_SMEM_BYTES of dynamic shared memory. */
#define FK_WGMMA_TILE_M 128
#define FK_WGMMA_TILE_N 256
#define FK_WGMMA_THREADS 256
#define FK_WGMMA_STAGES 4
/* Per stage A's tile (TILE_M rows of 64 elements, 128 bytes) and B's (TILE_N rows), then 64
 * bytes for the stages' mbarriers, plus 1 KB to align the first stage. */
#define FK_WGMMA_SMEM_BYTES (FK_WGMMA_STAGES * (FK_WGMMA_TILE_M + FK_WGMMA_TILE_N) * 128 + 64 + 1024)
/* An MN-major tile (wgmma.cuh's Columns) lies in chunks of 64 rows (A) or columns (B), each a
 * stage's 64 lines of K of 128 bytes: FK_WGMMA_MN_CHUNK_BYTES apart. */
#define FK_WGMMA_MN_CHUNK_BYTES (64 * 128)
/* A GEMM with a side product (wgmma.cuh's Side: the LoRA forward's u = x Aᵀ beside y's GEMM,
 * the backward's v = dY B beside dX's) has, after the stages, a side tile per stage of up to
 * FK_WGMMA_SIDE_ROWS rows of 128 bytes: FK_WGMMA_SIDE_SMEM_BYTES in all. The dX GEMM that
 * also makes [dB | dbias] (cuda/lora.cu's DxSides) then holds its tile's [u | 1] as an
 * MN-major tile of FK_WGMMA_TILE_M lines of 128 bytes: FK_WGMMA_SIDE_ACROSS_SMEM_BYTES. */
#define FK_WGMMA_SIDE_ROWS 32
#define FK_WGMMA_SIDE_SMEM_BYTES (FK_WGMMA_SMEM_BYTES + FK_WGMMA_STAGES * FK_WGMMA_SIDE_ROWS * 128)
#define FK_WGMMA_SIDE_ACROSS_SMEM_BYTES (FK_WGMMA_SIDE_SMEM_BYTES + FK_WGMMA_TILE_M * 128)

/* The rank-wide GEMMs (cuda/include/narrow.cuh: u = x Aᵀ, v = dY B): a block of
 * FK_GEMM_THREADS threads computes FK_NARROW_ROWS rows by FK_NARROW_COLS columns through
 * FK_NARROW_STAGES stages of FK_NARROW_STEP along K (A's rows and B's, 8 elements of padding
 * each) in FK_NARROW_SMEM_BYTES of dynamic shared memory: two blocks per SM. The _WIDE_
 * sizes are lora_down_k64's: FK_NARROW_WIDE_STAGES stages of FK_NARROW_WIDE_STEP, two blocks
 * per SM still (2 × 108 KB of the 228). */
#define FK_NARROW_ROWS 128
#define FK_NARROW_COLS 64
#define FK_NARROW_STEP 32
#define FK_NARROW_STAGES 6
#define FK_NARROW_SMEM_BYTES (FK_NARROW_STAGES * (FK_NARROW_ROWS + FK_NARROW_COLS) * (FK_NARROW_STEP + 8) * 2)
#define FK_NARROW_WIDE_STEP 64
#define FK_NARROW_WIDE_STAGES 4
#define FK_NARROW_WIDE_SMEM_BYTES \
  (FK_NARROW_WIDE_STAGES * (FK_NARROW_ROWS + FK_NARROW_COLS) * (FK_NARROW_WIDE_STEP + 8) * 2)

#endif
