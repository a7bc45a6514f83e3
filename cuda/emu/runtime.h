// runtime.h: the emulator's internal state, shared by runtime.cpp (fibers, scheduler,
// barriers) and tensor.cpp (ldmatrix, stmatrix, mma, cp.async). Not included by kernels.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "../include/compat.cuh"
#include "api.h"

namespace fk_emu {

enum class State { ready, block_wait, cluster_wait, warp_wait, mbarrier_wait, exited };

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
  bool a_mn_major;  // a: MN-major rather than K-major
  float a_rows[2][16];
  const void* b;
  bool b_mn_major;  // b: MN-major rather than K-major
  int type;
  // A's registers where the kernel keeps them, and what they held at issue: they must not
  // change before the wait (checked then).
  const uint32_t* a_regs;
  uint32_t a_bits[4];
};

// A TMA load issued on an mbarrier, made when the barrier's phase is released (tma.cpp).
struct TmaLoad {
  unsigned char* dst;
  FkEmuTensorMap map;
  int32_t c0, c1;
};

// An mbarrier's state (PTX ISA: phase, pending arrivals, tx-count), kept beside the 8 bytes
// of shared memory that name it (which hold a pattern the emulator checks is not overwritten).
struct MBarrier {
  uint32_t expected = 0;  // arrivals per phase
  uint32_t pending = 0;   // arrivals still to come in this phase
  int64_t tx = 0;         // bytes announced and not yet landed
  uint64_t phase = 0;     // completed phases
  std::vector<TmaLoad> loads;  // issued in this phase, not landed yet
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
  // ldmatrix / stmatrix / mma operands and results.
  const void* address = nullptr;
  uint32_t regs_in[10] = {};
  uint32_t regs_out[4] = {};
  // wgmma with A from registers: the rows lane/4 and lane/4 + 8 of the warp's A, gathered.
  float wgmma_a[2][16] = {};
  // The mbarrier (in `address`) and parity it waits on, in State::mbarrier_wait.
  uint32_t parity = 0;
  // Where this thread's landed cp.async copies in dynamic shared memory are still unfenced.
  std::vector<std::pair<unsigned char*, size_t>> unfenced;
  // cp.async copies, made when a wait lets their group go; wgmmas likewise.
  AsyncGroups<AsyncCopy> copies;
  AsyncGroups<AsyncMma> mmas;
};

// The fiber running now on this OS thread.
Fiber* current_fiber();

// The running block's mbarriers by address, and whether [p, p + bytes) lies in its shared
// memory (dynamic or FK_SHARED).
std::map<const void*, MBarrier>& block_mbarriers();
bool in_block_shared(const void* p, size_t bytes);
// The async proxy (wgmma's reads) sees what a thread's cp.async wrote to dynamic shared
// memory only after that thread's fence.proxy.async: a landed copy's bytes are marked
// unfenced until the thread fences (a TMA load, itself in the async proxy, unmarks what it
// writes). Stores are not tracked.
void mark_unfenced(void* dst, size_t bytes);
void mark_fenced(void* dst, size_t bytes);
void fence_proxy_async();
// The running block's unfenced marks, looked up once for a loop over many addresses (a
// wgmma reads thousands).
struct UnfencedBytes {
  const unsigned char* smem;
  size_t size;
  const unsigned char* marks;
  // Whether any of the `bytes` at p is marked.
  bool operator()(const void* p, size_t bytes = 1) const {
    const uintptr_t at = reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(smem);  // wraps if below
    for (size_t i = 0; i < bytes && at + i < size; ++i)
      if (marks[at + i]) return true;
    return false;
  }
};
UnfencedBytes unfenced_bytes();

// The running block's cluster (one block without a cluster launch): its size, the block's
// rank (%cluster_ctarank), the address at `p`'s offset in the dynamic shared memory of the
// block of rank `rank` (null if [p, p + bytes) is not in this block's dynamic shared memory
// or there is no such rank), that block's mbarriers, and whether all its threads have exited.
unsigned cluster_size();
unsigned cluster_rank();
unsigned char* cluster_shared(const void* p, size_t bytes, unsigned rank);
std::map<const void*, MBarrier>& cluster_mbarriers(unsigned rank);
bool cluster_block_exited(unsigned rank);
// Blocks the running thread at the cluster barrier until every thread of the cluster is there.
void wait_at_cluster_barrier(Site site);

// Blocks the running thread in State::mbarrier_wait until the scheduler releases it.
void wait_for_mbarrier(const void* bar, uint32_t parity);
// Whether the phase of parity `parity` of `bar` has completed; with `land`, first lands the
// barrier's TMA loads and completes its phase if nothing else is pending (the scheduler,
// once no thread can run: a load whose destination was written since its issue is a bug,
// said in `*fault`, and nothing lands).
bool mbarrier_passed(const void* bar, uint32_t parity, bool land, std::string* fault = nullptr);

// Whether `bytes` at `p` still hold the poison an asynchronous copy put there at issue (a
// kernel that wrote them before the copy landed has a race a GPU would lose).
bool still_poisoned(const void* p, size_t bytes);

// Warp-wide computations the scheduler runs once every lane has arrived (tensor.cpp).
// `lanes[l]` is lane l's fiber.
void compute_ldmatrix(Fiber* const* lanes, int count, bool trans);
void compute_stmatrix_x4_trans(Fiber* const* lanes);
void compute_mma(Fiber* const* lanes, int type);
void compute_wgmma_a(Fiber* const* lanes, int type);

}  // namespace fk_emu
