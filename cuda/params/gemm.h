/* The tile GEMM's launch shape (cuda/include/gemm.cuh), which the Rust launchers of every
 * kernel built on it (src/lora, src/nf4) read from here: a block of FK_GEMM_THREADS threads
 * computes one FK_GEMM_TILE x FK_GEMM_TILE tile of the output. */
#ifndef FK_PARAMS_GEMM_H
#define FK_PARAMS_GEMM_H

#define FK_GEMM_TILE 128
#define FK_GEMM_THREADS 256

#endif
