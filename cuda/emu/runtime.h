// runtime.h: the emulator's internal state, shared by runtime.cpp (fibers, scheduler,
// barriers) and tensor.cpp (ldmatrix, mma, cp.async). Not included by kernels.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "../include/compat.cuh"

namespace fk_emu {

enum class State { ready, block_wait, warp_wait, exited };

struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes;      // written at the destination
  int src_bytes;  // read from the source; the rest of `bytes` is zero-filled
};

// One GPU thread.
struct Fiber {
  void* sp = nullptr;   // saved stack pointer while switched out
  void* stack = nullptr; // mmap'd region: guard page, then the stack
  size_t stack_size = 0;
  void* asan_fake = nullptr;  // ASan's fake-stack handle while switched out
  uint3 tid{};
  unsigned linear = 0;
  State state = State::ready;
  Site site{"", 0};
  // The barrier or collective it waits at, and what the release hands back.
  BarrierKind barrier = BarrierKind::plain;
  WarpOp op = WarpOp::sync;
  unsigned mask = 0;
  uint64_t value = 0;
  int arg = 0;
  int width = 32;
  uint64_t result = 0;
  // ldmatrix / mma operands and results.
  const void* address = nullptr;
  uint32_t regs_in[10] = {};
  uint32_t regs_out[4] = {};
  // cp.async: issued but uncommitted copies, then committed groups, oldest first.
  std::vector<AsyncCopy> uncommitted;
  std::vector<std::vector<AsyncCopy>> groups;
};

// The fiber running now on this OS thread.
Fiber* current_fiber();

// Warp-wide computations the scheduler runs once every lane has arrived (tensor.cpp).
// `lanes[l]` is lane l's fiber.
void compute_ldmatrix(Fiber* const* lanes, int count, bool trans);
void compute_mma(Fiber* const* lanes, int type);

}  // namespace fk_emu
