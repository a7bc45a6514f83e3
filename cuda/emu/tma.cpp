// tma.cpp: mbarriers and TMA loads (ptx.cuh), per the PTX ISA. An mbarrier's state lives
// beside the block (runtime.cpp); its 8 bytes of shared memory hold a pattern checked at
// every use, so a kernel that overwrites a live barrier fails. A TMA load poisons its
// destination at issue and lands when the scheduler releases a wait on its barrier, once no
// thread can run: a tile read before its wait sees NaN, as a race on a GPU would show, and a
// destination written before then (the poison gone) fails the launch.
#include <algorithm>
#include <cstring>

#include "runtime.h"

namespace fk_emu {
namespace {

constexpr uint64_t kLive = 0x6D62617272696572ull;  // "mbarrier"
constexpr uint64_t kDead = ~uint64_t(0);           // invalidated: poison again

Site site(const char* what) { return Site{what, 0}; }

// The live barrier at `bar` (among `bars`: this block's or a cluster peer's), or the thread
// fails saying what was wrong.
MBarrier& live(uint64_t* bar, const char* what, std::map<const void*, MBarrier>& bars = block_mbarriers()) {
  const auto it = bars.find(bar);
  if (it == bars.end()) fail(site(what), "no mbarrier was initialized at this address (or it was invalidated)");
  if (*bar != kLive) fail(site(what), "the mbarrier's shared memory was overwritten while it was live");
  return it->second;
}

// Completes the phase if every arrival is in and every announced byte has landed.
void complete_if_done(MBarrier& m) {
  if (m.pending == 0 && m.tx == 0 && m.loads.empty()) {
    ++m.phase;
    m.pending = m.expected;
  }
}

size_t box_bytes(const FkEmuTensorMap& m) { return size_t(m.box[0]) * m.box[1] * m.elem_bytes; }

void land(const TmaLoad& t) {
  const FkEmuTensorMap& m = t.map;
  const uintptr_t dst = reinterpret_cast<uintptr_t>(t.dst);
  for (uint32_t r = 0; r < m.box[1]; ++r) {
    for (uint32_t e = 0; e < m.box[0]; ++e) {
      const int64_t x = int64_t(t.c0) + e, y = int64_t(t.c1) + r;
      const bool inside = x >= 0 && y >= 0 && uint64_t(x) < m.dims[0] && uint64_t(y) < m.dims[1];
      uintptr_t at = dst + (uintptr_t(r) * m.box[0] + e) * m.elem_bytes;
      // The 128-byte swizzle is a function of the shared address: bits 4-6 ^= bits 7-9.
      if (m.swizzle_128b) at ^= ((at >> 7) & 7) << 4;
      if (inside)
        std::memcpy(reinterpret_cast<void*>(at), reinterpret_cast<const void*>(m.base + uint64_t(y) * m.row_stride + uint64_t(x) * m.elem_bytes),
                    m.elem_bytes);
      else
        std::memset(reinterpret_cast<void*>(at), 0, m.elem_bytes);
    }
  }
}

}  // namespace

bool still_poisoned(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  return std::all_of(c, c + bytes, [](unsigned char v) { return v == 0xFF; });
}

bool mbarrier_passed(const void* bar, uint32_t parity, bool land_loads, std::string* fault) {
  auto& bars = block_mbarriers();
  const auto it = bars.find(bar);
  if (it == bars.end()) return false;  // invalidated under a waiter: the deadlock report says so
  MBarrier& m = it->second;
  if ((m.phase & 1) != parity) return true;  // the phase of that parity is the last completed
  if (!land_loads) return false;
  for (const TmaLoad& t : m.loads) {
    if (!still_poisoned(t.dst, box_bytes(t.map))) {
      if (fault)
        *fault = "a TMA load's destination in shared memory was written before the load landed (the wait on its "
                 "mbarrier): a race with the load";
      return false;
    }
  }
  for (const TmaLoad& t : m.loads) {
    land(t);
    mark_fenced(t.dst, box_bytes(t.map));
    m.tx -= int64_t(box_bytes(t.map));
  }
  m.loads.clear();
  complete_if_done(m);
  return (m.phase & 1) != parity;
}

}  // namespace fk_emu

using namespace fk_emu;

void fk_emu_mbarrier_init(uint64_t* bar, uint32_t arrivals) {
  if (reinterpret_cast<uintptr_t>(bar) % 8 || !in_block_shared(bar, 8))
    fail(site("mbarrier.init"), "the mbarrier is not 8 bytes of this block's shared memory, 8-byte aligned");
  if (arrivals == 0 || arrivals >= (1u << 20)) fail(site("mbarrier.init"), "arrival count outside [1, 2^20 - 1]");
  auto& bars = block_mbarriers();
  if (bars.count(bar)) fail(site("mbarrier.init"), "the mbarrier is live: invalidate it before initializing it again");
  MBarrier m;
  m.expected = m.pending = arrivals;
  bars[bar] = m;
  *bar = kLive;
}

void fk_emu_mbarrier_inval(uint64_t* bar) {
  MBarrier& m = live(bar, "mbarrier.inval");
  if (!m.loads.empty() || m.tx != 0) fail(site("mbarrier.inval"), "the mbarrier is invalidated with TMA bytes pending");
  block_mbarriers().erase(bar);
  *bar = kDead;
}

void fk_emu_mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  MBarrier& m = live(bar, "mbarrier.arrive.expect_tx");
  if (m.pending == 0) fail(site("mbarrier.arrive.expect_tx"), "more arrivals than the mbarrier expects in a phase");
  m.tx += bytes;
  --m.pending;
  complete_if_done(m);
}

void fk_emu_mbarrier_wait(uint64_t* bar, uint32_t parity) {
  live(bar, "mbarrier.try_wait.parity");
  if (parity > 1) fail(site("mbarrier.try_wait.parity"), "parity is 0 or 1");
  if (!mbarrier_passed(bar, parity, false)) wait_for_mbarrier(bar, parity);
}

namespace {

// The checks of a TMA load's map, box and destination, common to its forms; the map's copy.
FkEmuTensorMap checked_map(void* dst, const void* map, int32_t c0, const Site& s) {
  FkEmuTensorMap m;
  std::memcpy(&m, map, sizeof m);
  if (reinterpret_cast<uintptr_t>(map) % 64) fail(s, "the tensor map is not 64-byte aligned");
  if (m.magic != FK_EMU_TENSOR_MAP_MAGIC) fail(s, "the tensor map was not encoded");
  // Measured: an H200 faults (illegal instruction) on a box whose first column is not a
  // 16-byte multiple along the row, at every box size, in or out of bounds, with multicast or
  // without (bench/results/2026-11-27T0501-h200's test-device failure, probed case by case).
  if ((int64_t(c0) * m.elem_bytes) % 16) fail(s, "the box's first column c0 is not a 16-byte multiple along the row");
  const uintptr_t d = reinterpret_cast<uintptr_t>(dst);
  if (d % (m.swizzle_128b ? 1024 : 128)) fail(s, "the destination is not 128-byte aligned (1024 for a swizzled map)");
  if (!in_block_shared(dst, box_bytes(m))) fail(s, "the box does not fit in this block's shared memory");
  return m;
}

// Poisons the box at `dst` and queues its load on barrier `b`, to land at the next release.
void queue(MBarrier& b, void* dst, const FkEmuTensorMap& m, int32_t c0, int32_t c1) {
  std::memset(dst, 0xFF, box_bytes(m));
  b.loads.push_back(TmaLoad{static_cast<unsigned char*>(dst), m, c0, c1});
}

}  // namespace

void fk_emu_tma_load_2d(void* dst, const void* map, int32_t c0, int32_t c1, uint64_t* bar) {
  const Site s = site("cp.async.bulk.tensor.2d");
  const FkEmuTensorMap m = checked_map(dst, map, c0, s);
  queue(live(bar, "cp.async.bulk.tensor.2d"), dst, m, c0, c1);
}

void fk_emu_tma_load_2d_multicast(void* dst, const void* map, int32_t c0, int32_t c1, uint64_t* bar, uint16_t mask) {
  const Site s = site("cp.async.bulk.tensor.2d.multicast::cluster");
  const FkEmuTensorMap m = checked_map(dst, map, c0, s);
  live(bar, s.file);
  if (mask == 0) fail(s, "the multicast mask names no block");
  if (mask >> cluster_size()) fail(s, "the multicast mask names a block outside the cluster");
  for (unsigned r = 0; r < cluster_size(); ++r) {
    if (!((mask >> r) & 1u)) continue;
    unsigned char* to = cluster_shared(dst, box_bytes(m), r);
    uint64_t* peer_bar = reinterpret_cast<uint64_t*>(cluster_shared(bar, 8, r));
    if (!to || !peer_bar) fail(s, "a multicast box and its mbarrier must be in dynamic shared memory");
    if (cluster_block_exited(r)) fail(s, "the multicast writes to a block of the cluster that has exited");
    queue(live(peer_bar, "cp.async.bulk.tensor.2d.multicast::cluster (the mbarrier of a block it writes to)", cluster_mbarriers(r)),
          to, m, c0, c1);
  }
}

unsigned fk_emu_cluster_ctarank() { return cluster_rank(); }
unsigned fk_emu_cluster_nctarank() { return cluster_size(); }
void fk_emu_cluster_sync() { wait_at_cluster_barrier(site("barrier.cluster")); }
