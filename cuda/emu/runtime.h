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

// Asynchronous operations of one thread: issued, committed in groups, and completed a
// group at a time, oldest first, by a wait (cp.async's and wgmma's commit/wait_group).
template <typename Op>
struct AsyncGroups {
  std::vector<Op> uncommitted;
  std::vector<std::vector<Op>> groups;

  bool empty() const { return uncommitted.empty() && groups.empty(); }
  void commit() {
    groups.push_back(std::move(uncommitted));
    uncommitted.clear();
  }
  // Completes groups until at most `pending` remain.
  template <class Complete>
  void wait(int pending, Complete complete) {
    while (static_cast<int>(groups.size()) > pending) {
      for (const Op& op : groups.front()) complete(op);
      groups.erase(groups.begin());
    }
  }
};

// One thread's part of an issued wgmma (ptx.cuh): its accumulators, A's tile (or, from
// registers, the two rows of A this thread's accumulators need) and B's tile.
struct AsyncMma {
  float* d;
  int n;  // the mma's N
  const void* a;  // null: A came from registers, in a_rows
  float a_rows[2][16];
  const void* b;
  int type;
  // A's registers where the kernel keeps them, and what they held at issue: they must not
  // change before the wait (checked then).
  const uint32_t* a_regs;
  uint32_t a_bits[4];
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
  // wgmma with A from registers: the rows lane/4 and lane/4 + 8 of the warp's A, gathered.
  float wgmma_a[2][16] = {};
  // cp.async copies, made when a wait lets their group go; wgmmas likewise.
  AsyncGroups<AsyncCopy> copies;
  AsyncGroups<AsyncMma> mmas;
};

// The fiber running now on this OS thread.
Fiber* current_fiber();

// Warp-wide computations the scheduler runs once every lane has arrived (tensor.cpp).
// `lanes[l]` is lane l's fiber.
void compute_ldmatrix(Fiber* const* lanes, int count, bool trans);
void compute_mma(Fiber* const* lanes, int type);
void compute_wgmma_a(Fiber* const* lanes, int type);

}  // namespace fk_emu
