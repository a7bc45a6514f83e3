// runtime.cpp: kernel registry, launch, fibers and the block scheduler (DESIGN.md §5).
//
// A cluster of blocks (one block without a cluster launch) runs on one OS thread: one fiber
// per GPU thread, switched by fk_emu_switch (switch.S) on pooled mmap'd stacks with a guard
// page. Fibers run, in an order drawn from the schedule, until each blocks at a barrier or
// collective or exits; when none can run, the scheduler releases the barrier or collective
// whose participants have all arrived, after checking they agree on call site and mask.
// Anything else is a kernel bug, reported with every thread's state; nothing hangs.
#include "runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <exception>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include "api.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define FK_EMU_ASAN 1
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

extern "C" void fk_emu_switch(void** save_sp, void* load_sp);

namespace fk_emu {
namespace {

struct KernelInfo {
  Entry entry;
  size_t params_size;
  unsigned max_threads;
};

std::map<std::string, KernelInfo>& registry() {
  static std::map<std::string, KernelInfo> kernels;
  return kernels;
}

// The fibers that can run, as a bitset: the schedule picks the lowest (forward), the
// highest (reverse) or a random one (random) at every switch.
struct ReadySet {
  std::vector<uint64_t> words;
  int count = 0;
  void reset(size_t n) {
    words.assign((n + 63) / 64, 0);
    count = 0;
  }
  void add(unsigned i) {
    uint64_t& w = words[i / 64];
    if (!((w >> (i % 64)) & 1u)) w |= 1ull << (i % 64), ++count;
  }
  void remove(unsigned i) {
    uint64_t& w = words[i / 64];
    if ((w >> (i % 64)) & 1u) w &= ~(1ull << (i % 64)), --count;
  }
  int first() const {
    for (size_t k = 0; k < words.size(); ++k)
      if (words[k]) return static_cast<int>(64 * k + __builtin_ctzll(words[k]));
    return -1;
  }
  int last() const {
    for (size_t k = words.size(); k-- > 0;)
      if (words[k]) return static_cast<int>(64 * k + 63 - __builtin_clzll(words[k]));
    return -1;
  }
  int nth(int n) const {  // the n-th set bit, 0-based
    for (size_t k = 0; k < words.size(); ++k) {
      const int c = __builtin_popcountll(words[k]);
      if (n >= c) {
        n -= c;
        continue;
      }
      uint64_t w = words[k];
      for (; n > 0; --n) w &= w - 1;
      return static_cast<int>(64 * k + __builtin_ctzll(w));
    }
    return -1;
  }
};

// A block's dynamic shared memory, 1024-byte aligned as on a GPU, where it starts at the same
// address in every block: offsets that kernels align to 1024 bytes are then the same in every
// block of a cluster, as multicast needs.
class DynamicShared {
 public:
  // Fresh memory of `bytes`, every byte `fill`; exactly that long, so that AddressSanitizer
  // sees an access past its end. False if the allocation fails.
  bool assign(size_t bytes, unsigned char fill) {
    void* p = nullptr;
    if (posix_memalign(&p, 1024, std::max<size_t>(bytes, 1)) != 0) return false;
    data_.reset(static_cast<unsigned char*>(p));
    size_ = bytes;
    std::memset(p, fill, bytes);
    return true;
  }
  unsigned char* data() { return data_.get(); }
  const unsigned char* data() const { return data_.get(); }
  size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(unsigned char* p) const { std::free(p); }
  };
  std::unique_ptr<unsigned char, Free> data_;
  size_t size_ = 0;
};

// One block in flight on this OS thread (with the rest of its cluster). A failing fiber
// records its message in `error`.
struct Block {
  uint3 idx{};        // its blockIdx
  unsigned rank = 0;  // %cluster_ctarank
  const KernelInfo* info = nullptr;
  const void* params = nullptr;
  std::vector<Fiber> fibers;
  ReadySet ready;
  void* scheduler_sp = nullptr;
  DynamicShared smem;
  std::string error;
  uint32_t schedule = FK_EMU_SCHEDULE_FORWARD;
  std::mt19937_64 rng;
  float (*rcp_approx_ftz)(float) = nullptr;
  // FK_SHARED storage, by declaration: created at first use, dropped at the next block.
  std::map<const void*, std::vector<unsigned char>> shared;
  std::map<const void*, MBarrier> mbarriers;
  std::vector<unsigned char> unfenced;  // per byte of smem: 1 while a cp.async write is unfenced
};

thread_local Block* t_block = nullptr;
thread_local Fiber* t_fiber = nullptr;
thread_local std::vector<Block>* t_cluster = nullptr;  // t_block's cluster, in rank order

// The most shared memory a block can have, static and dynamic together (Hopper's, opted into).
constexpr size_t kMaxBlockSharedBytes = 227 * 1024;

// ---- stacks -------------------------------------------------------------------------------

const size_t kPage = static_cast<size_t>(sysconf(_SC_PAGESIZE));

// Stacks are mapped once and reused by every block on every OS thread.
struct StackPool {
  std::mutex lock;
  size_t size = 0;
  std::vector<void*> free;
  // Takes n stacks of `want` bytes into `out`; false if the mapping fails.
  bool take(size_t want, size_t n, std::vector<void*>& out) {
    std::lock_guard<std::mutex> g(lock);
    if (want != size) {
      for (void* s : free) munmap(s, size + kPage);
      free.clear();
      size = want;
    }
    while (out.size() < n) {
      if (!free.empty()) {
        out.push_back(free.back());
        free.pop_back();
        continue;
      }
      void* s = mmap(nullptr, size + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (s == MAP_FAILED) return false;
      mprotect(s, kPage, PROT_NONE);  // guard page below the stack: an overflow faults
      out.push_back(s);
    }
    return true;
  }
  void give(size_t stack_size, std::vector<void*>& stacks) {
    std::lock_guard<std::mutex> g(lock);
    for (void* s : stacks) {
      if (stack_size == size) free.push_back(s);
      else munmap(s, stack_size + kPage);
    }
    stacks.clear();
  }
};
StackPool g_stacks;

// ---- switching --------------------------------------------------------------------------
// Under ASan every switch is announced (start) and completed (finish), so that ASan knows
// which stack is live; each fiber keeps its own fake-stack handle.

#if FK_EMU_ASAN
thread_local const void* t_scheduler_bottom = nullptr;
thread_local size_t t_scheduler_size = 0;
thread_local void* t_scheduler_fake = nullptr;
#endif

// Scheduler -> fiber f; returns when f yields.
void enter(Block& b, Fiber& f) {
#if FK_EMU_ASAN
  __sanitizer_start_switch_fiber(&t_scheduler_fake, static_cast<char*>(f.stack) + kPage, f.stack_size);
  fk_emu_switch(&b.scheduler_sp, f.sp);
  __sanitizer_finish_switch_fiber(t_scheduler_fake, nullptr, nullptr);
#else
  fk_emu_switch(&b.scheduler_sp, f.sp);
#endif
}

// In a fiber, just after it starts or resumes.
void resumed(Fiber& f, bool first) {
#if FK_EMU_ASAN
  __sanitizer_finish_switch_fiber(first ? nullptr : f.asan_fake, &t_scheduler_bottom, &t_scheduler_size);
#else
  (void)f, (void)first;
#endif
}

// Fiber -> scheduler. An exiting fiber never resumes.
void yield(bool exiting = false) {
  Fiber& f = *t_fiber;
#if FK_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.asan_fake, t_scheduler_bottom, t_scheduler_size);
#else
  (void)exiting;
#endif
  fk_emu_switch(&f.sp, t_block->scheduler_sp);
  resumed(f, false);
}

[[noreturn]] void fiber_main() {
  resumed(*t_fiber, true);
  t_block->info->entry(t_block->params);
  Fiber* f = t_fiber;
  if (!f->copies.empty()) fail(Site{"thread exit", 0}, "the thread exited with cp.async copies it never waited for");
  if (!f->mmas.empty()) fail(Site{"thread exit", 0}, "the thread exited with wgmmas it never waited for");
  f->state = State::exited;
  yield(true);
  __builtin_unreachable();
}

void init_fiber(Fiber& f, void* stack, size_t size) {
#if FK_EMU_ASAN
  // A reused stack still carries the redzones of the frames that lived on it.
  __asan_unpoison_memory_region(static_cast<char*>(stack) + kPage, size);
#endif
  f.stack = stack;
  f.stack_size = size;
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + kPage + size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                          // fiber_main's return address: none
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);    // where fk_emu_switch returns to
  for (int i = 0; i < 6; ++i) *--sp = 0;              // rbp rbx r12 r13 r14 r15
  *--sp = (uint64_t(0x037F) << 32) | 0x1F80;          // x87 control word, MXCSR defaults
  f.sp = sp;
}

// ---- reporting ----------------------------------------------------------------------------

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::sync: return "__syncwarp";
    case WarpOp::shfl_idx: return "__shfl_sync";
    case WarpOp::shfl_up: return "__shfl_up_sync";
    case WarpOp::shfl_down: return "__shfl_down_sync";
    case WarpOp::shfl_xor: return "__shfl_xor_sync";
    case WarpOp::ballot: return "__ballot_sync";
    case WarpOp::any: return "__any_sync";
    case WarpOp::all: return "__all_sync";
    case WarpOp::ldmatrix: return "ldmatrix";
    case WarpOp::stmatrix: return "stmatrix";
    case WarpOp::mma: return "mma.sync";
    case WarpOp::wgmma_a: return "wgmma (A from registers)";
  }
  return "?";
}

std::string describe(const Block& b, const Fiber& f) {
  std::ostringstream o;
  switch (f.state) {
    case State::ready: o << "runnable"; break;
    case State::exited: o << "exited"; break;
    case State::block_wait: o << "waiting at __syncthreads " << f.site.file << ":" << f.site.line; break;
    case State::cluster_wait: o << "waiting at the cluster barrier " << f.site.file << ":" << f.site.line; break;
    case State::mbarrier_wait: {
      o << "waiting on the mbarrier at " << f.address << " for its phase of parity " << f.parity;
      const auto it = b.mbarriers.find(f.address);
      if (it == b.mbarriers.end()) o << " (not initialized)";
      else o << " (" << it->second.phase << " phases done; " << it->second.pending << " arrivals and "
             << it->second.tx << " bytes pending)";
      break;
    }
    case State::warp_wait:
      o << "waiting at " << op_name(f.op) << " " << f.site.file << ":" << f.site.line << " mask 0x" << std::hex << f.mask;
      break;
  }
  return o.str();
}

// Every thread's state, consecutive threads in the same state on one line.
std::string thread_table(const Block& b) {
  std::ostringstream o;
  size_t i = 0;
  while (i < b.fibers.size()) {
    std::string what = describe(b, b.fibers[i]);
    size_t j = i;
    while (j + 1 < b.fibers.size() && describe(b, b.fibers[j + 1]) == what) ++j;
    o << "\n    threads " << i << (j > i ? "-" + std::to_string(j) : "") << ": " << what;
    i = j + 1;
  }
  return o.str();
}

void block_error(Block& b, const std::string& what) {
  if (b.error.empty()) b.error = what + thread_table(b);
}

// One call site's lanes share the __FILE__ literal: the pointers settle almost every compare.
bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

// ---- releasing collectives ----------------------------------------------------------------

uint64_t shuffle_source(const Fiber& f, int lane, Fiber* const* lanes) {
  const int width = f.width;
  const int base = lane & ~(width - 1);
  int src = lane;
  switch (f.op) {
    case WarpOp::shfl_idx: src = base + (f.arg & (width - 1)); break;
    case WarpOp::shfl_up: src = lane - f.arg < base ? lane : lane - f.arg; break;
    case WarpOp::shfl_down: src = lane + f.arg >= base + width ? lane : lane + f.arg; break;
    case WarpOp::shfl_xor: src = (lane ^ f.arg) >= base + width ? lane : (lane ^ f.arg); break;
    default: break;
  }
  if (!((f.mask >> src) & 1u)) return ~uint64_t(0);  // an inactive source: undefined, so poison
  return lanes[src]->value;
}

// Checks the group of lanes `f` waits with and, if all have arrived consistently, computes
// and releases it. Returns false and records an error on a bug. `eager` (right after f
// arrived, while other fibers may still run) defers every inconsistency that a lane still
// on its way could resolve.
bool release_warp_group(Block& b, Fiber& f, int warp, bool* released, bool eager) {
  const int lane = f.linear % 32;
  const int lanes_here = static_cast<int>(std::min<size_t>(32, b.fibers.size() - warp * 32));
  Fiber* lanes[32] = {};
  for (int l = 0; l < lanes_here; ++l) lanes[l] = &b.fibers[warp * 32 + l];
  // Shuffles take a per-lane source or delta; ldmatrix and mma encode their shape in arg.
  const bool tensor =
      f.op == WarpOp::ldmatrix || f.op == WarpOp::stmatrix || f.op == WarpOp::mma || f.op == WarpOp::wgmma_a;
  if (tensor && lanes_here < 32) {
    block_error(b, std::string(op_name(f.op)) + " needs all 32 lanes of a warp");
    return false;
  }
  if (!((f.mask >> lane) & 1u)) {
    std::ostringstream why;
    why << op_name(f.op) << " at " << f.site.file << ":" << f.site.line << ": lane " << lane
        << " calls it with mask 0x" << std::hex << f.mask << ", which leaves itself out";
    block_error(b, why.str());
    return false;
  }
  for (int l = 0; l < 32; ++l) {
    if (!((f.mask >> l) & 1u)) continue;
    if (l >= lanes_here) {
      std::ostringstream why;
      why << op_name(f.op) << " at " << f.site.file << ":" << f.site.line << ": mask 0x" << std::hex << f.mask
          << std::dec << " names lane " << l << ", which does not exist (warp " << warp << " has " << lanes_here << " lanes)";
      block_error(b, why.str());
      return false;
    }
    const Fiber& o = *lanes[l];
    if (o.state == State::ready) return true;  // still running towards it
    if (o.state != State::warp_wait || o.op != f.op || o.mask != f.mask || !same_site(o.site, f.site) ||
        o.width != f.width || (tensor && o.arg != f.arg)) {
      if (eager) return true;
      std::ostringstream why;
      why << "lane " << lane << " of warp " << warp << " waits at " << op_name(f.op) << " " << f.site.file << ":"
          << f.site.line << " for lane " << l << ", which is " << describe(b, o) << " (divergent or mismatched collective)";
      block_error(b, why.str());
      return false;
    }
  }
  uint64_t ballot = 0;
  int votes = 0, members = 0;
  for (int l = 0; l < lanes_here; ++l) {
    if ((f.mask >> l) & 1u) {
      ++members;
      if (lanes[l]->value) {
        ballot |= 1ull << l;
        ++votes;
      }
    }
  }
  if (f.op == WarpOp::ldmatrix) compute_ldmatrix(lanes, f.arg & 7, (f.arg >> 4) & 1);
  if (f.op == WarpOp::stmatrix) compute_stmatrix_x4_trans(lanes);
  if (f.op == WarpOp::mma) compute_mma(lanes, f.arg);
  if (f.op == WarpOp::wgmma_a) compute_wgmma_a(lanes, f.arg);
  uint64_t results[32];
  for (int l = 0; l < lanes_here; ++l) {
    if (!((f.mask >> l) & 1u)) continue;
    switch (f.op) {
      case WarpOp::shfl_idx:
      case WarpOp::shfl_up:
      case WarpOp::shfl_down:
      case WarpOp::shfl_xor: results[l] = shuffle_source(*lanes[l], l, lanes); break;
      case WarpOp::ballot: results[l] = ballot; break;
      case WarpOp::any: results[l] = votes > 0; break;
      case WarpOp::all: results[l] = votes == members; break;
      default: results[l] = 0; break;
    }
  }
  for (int l = 0; l < lanes_here; ++l) {
    if (!((f.mask >> l) & 1u)) continue;
    lanes[l]->result = results[l];
    lanes[l]->state = State::ready;
    b.ready.add(lanes[l]->linear);
  }
  *released = true;
  return true;
}

// Releases every warp group whose lanes have all arrived. False on a bug.
bool release_warps(Block& b, bool* released) {
  for (Fiber& f : b.fibers) {
    if (f.state != State::warp_wait) continue;
    if (!release_warp_group(b, f, f.linear / 32, released, false)) return false;
  }
  return true;
}

// Releases __syncthreads once every live thread waits there. False on a bug.
bool release_block_barrier(Block& b, bool* released) {
  const Fiber* first = nullptr;
  int exited = 0, waiting = 0, votes = 0;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::exited) ++exited;
    if (f.state != State::block_wait) continue;
    ++waiting;
    votes += f.value != 0;
    if (!first) first = &f;
    if (!same_site(f.site, first->site)) {
      block_error(b, "divergent __syncthreads: threads wait at different call sites");
      return false;
    }
  }
  if (!first) return true;
  if (exited > 0) {
    block_error(b, std::to_string(exited) + " thread(s) exited while others wait at __syncthreads " +
                       first->site.file + ":" + std::to_string(first->site.line));
    return false;
  }
  if (waiting + exited < static_cast<int>(b.fibers.size())) return true;  // warps still pending
  for (Fiber& f : b.fibers) {
    switch (f.barrier) {
      case BarrierKind::plain: f.result = 0; break;
      case BarrierKind::count: f.result = votes; break;
      case BarrierKind::all: f.result = votes == waiting; break;
      case BarrierKind::any: f.result = votes > 0; break;
    }
    f.state = State::ready;
    b.ready.add(f.linear);
  }
  *released = true;
  return true;
}

// Releases the cluster barrier once every thread of every block of the cluster waits there
// (one that exited instead is a bug, as at __syncthreads). False on a bug, recorded on a
// block.
bool release_cluster_barrier(std::vector<Block>& blocks, bool* released) {
  const Fiber* first = nullptr;
  size_t exited = 0, waiting = 0, threads = 0;
  for (Block& b : blocks) {
    threads += b.fibers.size();
    for (const Fiber& f : b.fibers) {
      if (f.state == State::exited) ++exited;
      if (f.state != State::cluster_wait) continue;
      ++waiting;
      if (!first) first = &f;
      if (!same_site(f.site, first->site)) {
        block_error(b, "divergent cluster barrier: threads wait at different call sites");
        return false;
      }
    }
  }
  if (!first) return true;
  if (exited > 0) {
    block_error(blocks[0], std::to_string(exited) + " thread(s) of the cluster exited while others wait at the cluster barrier " +
                               first->site.file + ":" + std::to_string(first->site.line));
    return false;
  }
  if (waiting < threads) return true;  // threads still on their way
  for (Block& b : blocks) {
    for (Fiber& f : b.fibers) {
      f.state = State::ready;
      b.ready.add(f.linear);
    }
  }
  *released = true;
  return true;
}

// Releases every thread waiting on an mbarrier whose phase can complete, landing its TMA
// loads: only now, when no thread can run, so that a tile read before its wait is poison.
// False on a bug (a load's destination written before it landed).
bool release_mbarriers(Block& b, bool* released) {
  for (Fiber& f : b.fibers) {
    if (f.state != State::mbarrier_wait) continue;
    std::string fault;
    const bool passed = mbarrier_passed(f.address, f.parity, true, &fault);
    if (!fault.empty()) {
      block_error(b, "thread " + std::to_string(f.linear) + " waits on an mbarrier: " + fault);
      return false;
    }
    if (!passed) continue;
    f.state = State::ready;
    b.ready.add(f.linear);
    *released = true;
  }
  return true;
}

// Whether every thread of `b` has exited.
bool all_exited(const Block& b) {
  return std::all_of(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return f.state == State::exited; });
}

// Makes `b` the running block (its fibers reach their block's state through t_block).
void select(Block& b) {
  t_block = &b;
  blockIdx = b.idx;
}

// Releases what block b's threads wait on, once none of them can run: a warp collective,
// else its __syncthreads, else its mbarriers (landing their loads). False on a bug.
bool release_block(Block& b, bool* released) {
  select(b);
  if (!release_warps(b, released)) return false;
  if (!*released && !release_block_barrier(b, released)) return false;
  if (!*released) return release_mbarriers(b, released);
  return true;
}

// The next fiber to run per the schedule, its block selected; null if none can (or on a bug:
// *ok false). Forward and reverse take the cluster's blocks in rank order (or reversed) and
// release what a block's threads wait on as soon as none of them can run, before a later
// block runs: a block runs ahead of its peers as far as it can, so that a missing cluster
// barrier shows. Random draws among every thread that can run.
Fiber* pick(std::vector<Block>& blocks, bool* ok) {
  Block& first = blocks[0];
  if (first.schedule == FK_EMU_SCHEDULE_RANDOM) {
    int ready = 0;
    for (const Block& b : blocks) ready += b.ready.count;
    if (ready == 0) return nullptr;
    int n = static_cast<int>(first.rng() % ready);
    for (Block& b : blocks) {
      if (n < b.ready.count) return select(b), &b.fibers[b.ready.nth(n)];
      n -= b.ready.count;
    }
  }
  const bool forward = first.schedule == FK_EMU_SCHEDULE_FORWARD;
  for (size_t i = 0; i < blocks.size(); ++i) {
    Block& b = blocks[forward ? i : blocks.size() - 1 - i];
    bool released = false;
    if (b.ready.count == 0 && !release_block(b, &released)) return *ok = false, nullptr;
    if (b.ready.count > 0) return select(b), &b.fibers[forward ? b.ready.first() : b.ready.last()];
  }
  return nullptr;
}

// The first block with an error, or null.
Block* failed_block(std::vector<Block>& blocks) {
  for (Block& b : blocks)
    if (!b.error.empty()) return &b;
  return nullptr;
}

// Runs one cluster's blocks to completion. Returns false with the error set on a block on a
// kernel bug.
bool run_cluster(std::vector<Block>& blocks, size_t stack_size) {
  size_t fibers = 0;
  for (const Block& b : blocks) fibers += b.fibers.size();
  std::vector<void*> stacks;
  if (!g_stacks.take(stack_size, fibers, stacks)) {
    g_stacks.give(stack_size, stacks);
    blocks[0].error = "could not map the fiber stacks";
    return false;
  }
  size_t next_stack = 0;
  for (Block& b : blocks) {
    for (Fiber& f : b.fibers) init_fiber(f, stacks[next_stack++], stack_size);
    b.ready.reset(b.fibers.size());
    for (const Fiber& f : b.fibers) b.ready.add(f.linear);
  }
  t_cluster = &blocks;
  bool ok = true;
  for (;;) {
    if (Fiber* f = pick(blocks, &ok)) {
      // A warp collective releases as soon as its lanes are in, so under a forward or
      // reverse schedule one warp runs far ahead of the others up to the next
      // __syncthreads: races between warps show, not only races within one.
      Block& b = *t_block;
      t_fiber = f;
      threadIdx = f->tid;
      enter(b, *f);
      b.ready.remove(f->linear);  // it blocked or exited
      bool released = false;
      if (b.error.empty() && f->state == State::warp_wait) release_warp_group(b, *f, f->linear / 32, &released, true);
      if (!b.error.empty()) {
        ok = false;
        break;
      }
      continue;
    }
    if (!ok) break;
    if (std::all_of(blocks.begin(), blocks.end(), all_exited)) {
      for (Block& b : blocks)
        for (const auto& [bar, m] : b.mbarriers)
          if (!m.loads.empty()) block_error(b, "the block ended with TMA loads no thread waited for");
      ok = !failed_block(blocks);
      break;
    }
    bool released = false;
    for (size_t r = 0; ok && !released && r < blocks.size(); ++r) ok = release_block(blocks[r], &released);
    if (ok && !released) ok = release_cluster_barrier(blocks, &released);
    if (ok && !released) {
      std::string what = "deadlock: no thread can run and no barrier can release";
      for (const Block& b : blocks) {
        if (blocks.size() > 1)
          what += "\n  block (" + std::to_string(b.idx.x) + ", " + std::to_string(b.idx.y) + ", " +
                  std::to_string(b.idx.z) + ") of the cluster:";
        what += thread_table(b);
      }
      blocks[0].error = what;
      ok = false;
    }
    if (!ok) break;
  }
  t_fiber = nullptr;
  t_cluster = nullptr;
  g_stacks.give(stack_size, stacks);
  return ok;
}

uint64_t splitmix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

const char* schedule_name(uint32_t s) {
  return s == FK_EMU_SCHEDULE_FORWARD ? "forward" : s == FK_EMU_SCHEDULE_REVERSE ? "reverse" : "random";
}

}  // namespace

Registrar::Registrar(const char* name, Entry entry, size_t params_size, unsigned max_threads) {
  registry()[name] = KernelInfo{entry, params_size, max_threads};
}

Fiber* current_fiber() { return t_fiber; }

unsigned char* dyn_smem_base() { return t_block->smem.data(); }

void* block_shared(const void* key, size_t bytes) {
  std::vector<unsigned char>& s = t_block->shared[key];
  if (s.empty()) {
    s.assign(bytes, 0xFF);  // operator new: 16-byte aligned on x86-64
    // A block's static and dynamic shared memory together (the static as its declarations
    // are first used: each kernel touches all of its own).
    size_t total = t_block->smem.size();
    for (const auto& [k, v] : t_block->shared) total += v.size();
    if (total > kMaxBlockSharedBytes)
      fail(Site{"FK_SHARED", 0}, "static and dynamic shared memory together exceed the 227 KiB a block can have");
  }
  return s.data();
}

[[noreturn]] void fail(Site site, const char* what) {
  Block& b = *t_block;
  Fiber& f = *t_fiber;
  {  // destroyed before the fiber leaves for good (its frames never unwind)
    std::ostringstream o;
    o << "thread " << f.linear << " at " << site.file << ":" << site.line << ": " << what;
    block_error(b, o.str());
  }
  f.state = State::exited;
  yield(true);
  __builtin_unreachable();
}

std::map<const void*, MBarrier>& block_mbarriers() { return t_block->mbarriers; }

bool in_block_shared(const void* p, size_t bytes) {
  const auto inside = [&](const auto& s) {
    const auto* c = static_cast<const unsigned char*>(p);
    return c >= s.data() && c + bytes <= s.data() + s.size();
  };
  if (inside(t_block->smem)) return true;
  for (const auto& [key, s] : t_block->shared)
    if (inside(s)) return true;
  return false;
}

// The byte offset of [p, p + bytes) in the dynamic shared memory, or -1 if it is not there.
static ptrdiff_t smem_offset(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  const DynamicShared& s = t_block->smem;
  return c >= s.data() && c + bytes <= s.data() + s.size() ? c - s.data() : -1;
}

void mark_unfenced(void* dst, size_t bytes) {
  const ptrdiff_t at = smem_offset(dst, bytes);
  if (at < 0) return;
  std::memset(&t_block->unfenced[at], 1, bytes);
  t_fiber->unfenced.emplace_back(static_cast<unsigned char*>(dst), bytes);
}

void mark_fenced(void* dst, size_t bytes) {
  const ptrdiff_t at = smem_offset(dst, bytes);
  if (at >= 0) std::memset(&t_block->unfenced[at], 0, bytes);
}

void fence_proxy_async() {
  for (const auto& [dst, bytes] : t_fiber->unfenced) mark_fenced(dst, bytes);
  t_fiber->unfenced.clear();
}

UnfencedBytes unfenced_bytes() {
  return {t_block->smem.data(), t_block->smem.size(), t_block->unfenced.data()};
}

void wait_for_mbarrier(const void* bar, uint32_t parity) {
  Fiber* f = t_fiber;
  f->state = State::mbarrier_wait;
  f->address = bar;
  f->parity = parity;
  yield();
}

int block_barrier(Site site, BarrierKind kind, int pred) {
  Fiber* f = t_fiber;
  f->state = State::block_wait;
  f->site = site;
  f->barrier = kind;
  f->value = static_cast<uint64_t>(pred != 0);
  yield();
  return static_cast<int>(f->result);
}

uint64_t warp_collective(Site site, WarpOp op, unsigned mask, uint64_t value, int arg, int width) {
  Fiber* f = t_fiber;
  if (width < 1 || width > 32 || (width & (width - 1))) fail(site, "shuffle width must be a power of two in [1, 32]");
  f->state = State::warp_wait;
  f->site = site;
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->arg = arg;
  f->width = width;
  yield();
  return f->result;
}

void wait_at_cluster_barrier(Site site) {
  Fiber* f = t_fiber;
  f->state = State::cluster_wait;
  f->site = site;
  yield();
}

unsigned cluster_size() { return static_cast<unsigned>(t_cluster->size()); }
unsigned cluster_rank() { return t_block->rank; }

unsigned char* cluster_shared(const void* p, size_t bytes, unsigned rank) {
  const ptrdiff_t at = smem_offset(p, bytes);
  if (at < 0 || rank >= t_cluster->size()) return nullptr;
  return (*t_cluster)[rank].smem.data() + at;
}

std::map<const void*, MBarrier>& cluster_mbarriers(unsigned rank) { return (*t_cluster)[rank].mbarriers; }

bool cluster_block_exited(unsigned rank) { return all_exited((*t_cluster)[rank]); }

unsigned active_mask() {
  const Block& b = *t_block;
  const unsigned warp = t_fiber->linear / 32;
  unsigned m = 0;
  for (unsigned l = 0; l < 32 && warp * 32 + l < b.fibers.size(); ++l)
    if (b.fibers[warp * 32 + l].state != State::exited) m |= 1u << l;
  return m;
}

}  // namespace fk_emu

using namespace fk_emu;

// MUFU.RCP depends on a 1 MiB table recorded on a GPU; the model lives in Rust.
float fk_emu_rcp_approx_ftz(float x) { return t_block->rcp_approx_ftz(x); }

static int launch(const char* name, const uint32_t grid[3], const uint32_t block[3], const uint32_t cluster[3],
                  uint32_t dynamic_smem, const void* params, uint64_t params_size, const FkEmuOptions* options, char* err,
                  uint64_t err_len) {
  auto fail_launch = [&](const std::string& msg) {
    std::snprintf(err, err_len, "%s", msg.c_str());
    return 1;
  };
  auto it = registry().find(name);
  if (it == registry().end()) return fail_launch(std::string("no emulated kernel named ") + name);
  const KernelInfo& info = it->second;
  if (params_size != info.params_size)
    return fail_launch(std::string(name) + ": params struct is " + std::to_string(params_size) + " bytes, the kernel takes " +
                       std::to_string(info.params_size));
  // CUDA's grid, block and cluster limits are checked before any launch, on every backend
  // (LaunchConfig::check, src/device/mod.rs); what is left needs the kernel or the emulator.
  const uint64_t threads = uint64_t(block[0]) * block[1] * block[2];
  std::ostringstream bad;
  if (threads > info.max_threads)
    bad << "block of " << threads << " threads exceeds the kernel's __launch_bounds__ of " << info.max_threads;
  else if (dynamic_smem > kMaxBlockSharedBytes)
    bad << "dynamic shared memory " << dynamic_smem << " bytes exceeds the 227 KiB a block can opt into";
  if (!bad.str().empty()) return fail_launch(std::string(name) + ": " + bad.str());
  if (!options->rcp_approx_ftz) return fail_launch("FkEmuOptions.rcp_approx_ftz is null");

  const FkEmuOptions opt = *options;
  const size_t stack_size = opt.stack_bytes ? (opt.stack_bytes + kPage - 1) / kPage * kPage : size_t(256) << 10;
  const uint32_t cluster_grid[3] = {grid[0] / cluster[0], grid[1] / cluster[1], grid[2] / cluster[2]};
  const uint64_t clusters = uint64_t(cluster_grid[0]) * cluster_grid[1] * cluster_grid[2];
  const uint32_t cluster_blocks = cluster[0] * cluster[1] * cluster[2];
  std::vector<uint64_t> order(clusters);
  for (uint64_t i = 0; i < clusters; ++i) order[i] = i;
  if (opt.schedule == FK_EMU_SCHEDULE_REVERSE) std::reverse(order.begin(), order.end());
  if (opt.schedule == FK_EMU_SCHEDULE_RANDOM) std::shuffle(order.begin(), order.end(), std::mt19937_64(opt.seed));

  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_lock;
  std::string first_error;
  auto work = [&]() {
    std::vector<Block> blocks(cluster_blocks);
    gridDim = dim3{grid[0], grid[1], grid[2]};
    blockDim = dim3{block[0], block[1], block[2]};
    for (uint64_t k; !failed.load() && (k = next.fetch_add(1)) < clusters;) {
      const uint64_t id = order[k];
      const uint64_t cx = id % cluster_grid[0], cy = id / cluster_grid[0] % cluster_grid[1], cz = id / cluster_grid[0] / cluster_grid[1];
      for (uint32_t r = 0; r < cluster_blocks; ++r) {  // %cluster_ctarank: x fastest
        Block& b = blocks[r];
        b.info = &info;
        b.params = params;
        b.schedule = opt.schedule;
        b.rcp_approx_ftz = opt.rcp_approx_ftz;
        b.rank = r;
        b.idx = uint3{unsigned(cx * cluster[0] + r % cluster[0]), unsigned(cy * cluster[1] + r / cluster[0] % cluster[1]),
                      unsigned(cz * cluster[2] + r / cluster[0] / cluster[1])};
        b.fibers.assign(threads, Fiber{});
        for (unsigned t = 0; t < threads; ++t)
          b.fibers[t].tid = uint3{t % block[0], t / block[0] % block[1], t / block[0] / block[1]}, b.fibers[t].linear = t;
        if (!b.smem.assign(dynamic_smem, 0xFF)) {  // poison: NaN in every float type
          std::lock_guard<std::mutex> g(error_lock);
          if (!failed.exchange(true)) first_error = std::string(name) + ": could not allocate the blocks' shared memory";
          break;
        }
        b.shared.clear();  // FK_SHARED storage: fresh poison at first use
        b.mbarriers.clear();
        b.unfenced.assign(dynamic_smem, 0);
        b.error.clear();
        b.rng.seed(splitmix(opt.seed ^ splitmix(b.idx.x + uint64_t(grid[0]) * (b.idx.y + uint64_t(grid[1]) * b.idx.z))));
      }
      if (failed.load()) break;  // an allocation above failed
      if (!run_cluster(blocks, stack_size)) {
        std::lock_guard<std::mutex> g(error_lock);
        const Block* b = failed_block(blocks);
        if (!b) b = &blocks[0];
        if (!failed.exchange(true)) {
          std::ostringstream o;
          o << name << " block (" << b->idx.x << ", " << b->idx.y << ", " << b->idx.z << "), schedule "
            << schedule_name(opt.schedule) << " seed " << opt.seed << ": " << b->error;
          first_error = o.str();
        }
      }
    }
    t_block = nullptr;
  };
  // An exception (the host out of memory, say) ends this worker's launch with an error: one
  // escaping a thread would end the process.
  auto worker = [&]() {
    try {
      work();
    } catch (const std::exception& e) {
      t_block = nullptr;
      std::lock_guard<std::mutex> g(error_lock);
      if (!failed.exchange(true)) first_error = std::string(name) + ": the emulator failed: " + e.what();
    }
  };
  const unsigned workers = std::max(1u, std::min<unsigned>(opt.threads, static_cast<unsigned>(std::min<uint64_t>(clusters, 64))));
  if (workers == 1) {
    worker();
  } else {
    std::vector<std::thread> pool;
    for (unsigned i = 0; i < workers; ++i) pool.emplace_back(worker);
    for (auto& t : pool) t.join();
  }
  return failed.load() ? fail_launch(first_error) : 0;
}

// The launch, with any C++ exception (a grid too large to order in host memory, threads the
// host will not start) made an error: none may cross into the Rust caller.
extern "C" int fk_emu_launch(const char* name, const uint32_t grid[3], const uint32_t block[3], const uint32_t cluster[3],
                             uint32_t dynamic_smem, const void* params, uint64_t params_size, const FkEmuOptions* options,
                             char* err, uint64_t err_len) {
  try {
    return launch(name, grid, block, cluster, dynamic_smem, params, params_size, options, err, err_len);
  } catch (const std::exception& e) {
    std::snprintf(err, err_len, "%s: the emulator failed: %s", name, e.what());
    return 1;
  }
}

extern "C" uint32_t fk_emu_from_f32(uint32_t format, float x) {
  switch (format) {
    case FK_EMU_FORMAT_BF16: return f32_to_bf16_bits(x);
    case FK_EMU_FORMAT_F16: return f32_to_f16_bits(x);
    case FK_EMU_FORMAT_E4M3: return f32_to_e4m3_bits(x);
    case FK_EMU_FORMAT_E5M2: return f32_to_e5m2_bits(x);
  }
  return 0;
}

extern "C" float fk_emu_to_f32(uint32_t format, uint32_t bits) {
  switch (format) {
    case FK_EMU_FORMAT_BF16: return bf16_bits_to_f32(static_cast<uint16_t>(bits));
    case FK_EMU_FORMAT_F16: return f16_bits_to_f32(static_cast<uint16_t>(bits));
    case FK_EMU_FORMAT_E4M3: return e4m3_bits_to_f32(static_cast<uint8_t>(bits));
    case FK_EMU_FORMAT_E5M2: return e5m2_bits_to_f32(static_cast<uint8_t>(bits));
  }
  return 0.0f;
}
