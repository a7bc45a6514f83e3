// tensor.cpp: the tensor-core and async-copy instructions of ptx.cuh, emulated exactly per
// the PTX ISA fragment layouts (design notes: reference/ptx-fragments.md), and checked
// against registers dumped on real hardware (tests/data/regdump-*.txt).
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>

#include "runtime.h"
#include "../params/gemm.h"

namespace fk_emu {
namespace {

uint16_t load16(const void* row, int col) {
  uint16_t v;
  std::memcpy(&v, static_cast<const unsigned char*>(row) + 2 * col, 2);
  return v;
}

void store16(const void* row, int col, uint16_t v) {
  std::memcpy(const_cast<unsigned char*>(static_cast<const unsigned char*>(row)) + 2 * col, &v, 2);
}

// Element i of a packed register, `bits` wide, lowest bits first.
uint32_t element(uint32_t reg, int i, int bits) { return (reg >> (bits * i)) & ((1u << bits) - 1u); }

float widen(uint32_t bits, int type) {
  switch (static_cast<MmaType>(type)) {
    case MmaType::bf16: return bf16_bits_to_f32(static_cast<uint16_t>(bits));
    case MmaType::f16: return f16_bits_to_f32(static_cast<uint16_t>(bits));
    case MmaType::e4m3: return e4m3_bits_to_f32(static_cast<uint8_t>(bits));
    case MmaType::e5m2: return e5m2_bits_to_f32(static_cast<uint8_t>(bits));
  }
  return 0.0f;
}

// ilogb of a finite nonzero float, from its bits (subnormals too), and 2^e as a double:
// std::ilogb and std::ldexp took a quarter of a wgmma test's time.
int exponent_of(float x) {
  const uint32_t bits = f32_bits(x) & 0x7FFFFFFFu;
  const int field = static_cast<int>(bits >> 23);
  return field ? field - 127 : (31 - __builtin_clz(bits)) - 149;
}

// Exact for e in [-1022, 1023].
double pow2(int e) { return bit_cast<double>(static_cast<uint64_t>(1023 + e) << 52); }

}  // namespace

// Lanes 8j..8j+7 give the rows of matrix j. Without .trans, lane l's register j holds
// M_j[l/4][2(l%4)] (low half) and M_j[l/4][2(l%4)+1] (high); with .trans it holds
// M_j[2(l%4)][l/4] and M_j[2(l%4)+1][l/4].
void compute_ldmatrix(Fiber* const* lanes, int count, bool trans) {
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int j = 0; j < count; ++j) {
      uint16_t lo, hi;
      if (!trans) {
        const void* row = lanes[8 * j + g]->address;
        lo = load16(row, 2 * t);
        hi = load16(row, 2 * t + 1);
      } else {
        lo = load16(lanes[8 * j + 2 * t]->address, g);
        hi = load16(lanes[8 * j + 2 * t + 1]->address, g);
      }
      lanes[l]->regs_out[j] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
}

// stmatrix.x4.trans, ldmatrix.x4.trans's inverse (the same fragments; the one form ptx.cuh
// wraps): lane l's register j goes to M_j[2(l%4)][l/4] (low half) and M_j[2(l%4)+1][l/4]
// (high), where lanes 8j..8j+7 give the rows of matrix j. The register dump's
// regdump_stmatrix section records it on hardware from the next GPU check on (none yet).
void compute_stmatrix_x4_trans(Fiber* const* lanes) {
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int j = 0; j < 4; ++j) {
      const uint32_t reg = lanes[l]->regs_in[j];
      store16(lanes[8 * j + 2 * t]->address, g, static_cast<uint16_t>(reg));
      store16(lanes[8 * j + 2 * t + 1]->address, g, static_cast<uint16_t>(reg >> 16));
    }
  }
}

// One HMMA.16816.F32 dot product as Hopper computes it, fitted to the hardware dump
// (bit-exact on every random bf16 and f16 case recorded): the reference exponent is the
// largest of C's exponent and each nonzero product's exponent sum e(a) + e(b) (taken
// before the product is normalized); every term, C included, is truncated toward zero to a
// multiple of 2^(ref - 25); the exact sum of those is rounded toward zero to f32.
// Non-finite inputs take the IEEE path (NaN and infinities propagate). The products are
// a[i]·b[i], i < 16.
static float hmma_dot(const float* a, const float* b, float c) {
  bool finite = std::isfinite(c);
  int ref = c != 0.0f ? exponent_of(c) : INT32_MIN;
  for (int i = 0; i < 16; ++i) {
    const float x = a[i], y = b[i];
    finite = finite && std::isfinite(x) && std::isfinite(y);
    if (x != 0.0f && y != 0.0f) ref = std::max(ref, exponent_of(x) + exponent_of(y));
  }
  if (!finite) {
    double sum = c;
    for (int i = 0; i < 16; ++i) sum += static_cast<double>(a[i]) * b[i];
    return static_cast<float>(sum);
  }
  if (ref == INT32_MIN) return c;  // every term is zero
  // ref lies in [-298, 254], so both scales are normal doubles and every scaling is exact; a
  // conversion to an integer truncates toward zero. Each term is below 2^26 in units.
  const double to_units = pow2(25 - ref);
  int64_t units = static_cast<int64_t>(static_cast<double>(c) * to_units);
  for (int i = 0; i < 16; ++i) {
    const double product = static_cast<double>(a[i]) * b[i];  // exact: a double holds two floats' product
    units += static_cast<int64_t>(product * to_units);
  }
  const double v = static_cast<double>(units) * pow2(ref - 25);  // exact
  float r = static_cast<float>(v);
  if (std::fabs(static_cast<double>(r)) > std::fabs(v)) r = std::nextafter(r, 0.0f);  // toward zero
  return r;
}

// D = A·B + C for m16n8k16 (bf16, f16) and m16n8k32 (e4m3, e5m2), f32 accumulate.
// g = lane/4, t = lane%4; see reference/ptx-fragments.md for the layouts. FP8 follows
// what ptxas emits for sm_90, where FP8 mma.sync is not native: each FP8 pair is unpacked
// to f16, two HMMAs run from a zero accumulator (first the k with k%4 < 2, then the rest),
// and C is added last with an ordinary f32 add.
void compute_mma(Fiber* const* lanes, int type) {
  const bool fp8 = type == static_cast<int>(MmaType::e4m3) || type == static_cast<int>(MmaType::e5m2);
  const int K = fp8 ? 32 : 16, per = fp8 ? 4 : 2, bits = fp8 ? 8 : 16;
  // Where k sits in A's rows and B's columns: FP8 puts the k with k%4 < 2 (the first HMMA's)
  // in slots 0-15 and the rest in 16-31, so that each HMMA's dot reads 16 in a row.
  const auto slot = [fp8](int k) { return fp8 ? (k % 4 < 2 ? 0 : 16) + 2 * (k / 4) + k % 2 : k; };
  float A[16][32], Bt[8][32], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const uint32_t* in = lanes[l]->regs_in;
    for (int r = 0; r < 4; ++r) {  // A: reg r covers row g (+8 if r odd), k-half r/2
      const int row = g + 8 * (r & 1), col0 = per * t + (K / 2) * (r >> 1);
      for (int i = 0; i < per; ++i) A[row][slot(col0 + i)] = widen(element(in[r], i, bits), type);
    }
    for (int r = 0; r < 2; ++r) {  // B: reg r covers k-half r of column g
      const int k0 = per * t + (K / 2) * r;
      for (int i = 0; i < per; ++i) Bt[g][slot(k0 + i)] = widen(element(in[4 + r], i, bits), type);
    }
    for (int i = 0; i < 4; ++i) std::memcpy(&C[g + 8 * (i >> 1)][2 * t + (i & 1)], &in[6 + i], 4);
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
      float d;
      if (fp8) {
        const float first = hmma_dot(A[row], Bt[col], 0.0f);
        d = C[row][col] + hmma_dot(A[row] + 16, Bt[col] + 16, first);
      } else {
        d = hmma_dot(A[row], Bt[col], C[row][col]);
      }
      std::memcpy(&lanes[l]->regs_out[i], &d, 4);
    }
  }
}

// A warp's 16 rows of a wgmma's A from registers (mma.sync's A fragment layout, as in
// compute_mma): each lane gets the two rows its accumulators need, lane/4 and lane/4 + 8.
void compute_wgmma_a(Fiber* const* lanes, int type) {
  float A[16][16];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int r = 0; r < 4; ++r)
      for (int i = 0; i < 2; ++i) A[g + 8 * (r & 1)][2 * t + 8 * (r >> 1) + i] = widen(element(lanes[l]->regs_in[r], i, 16), type);
  }
  for (int l = 0; l < 32; ++l) {
    std::memcpy(lanes[l]->wgmma_a[0], A[l / 4], sizeof(A[0]));
    std::memcpy(lanes[l]->wgmma_a[1], A[l / 4 + 8], sizeof(A[0]));
  }
}

}  // namespace fk_emu

using namespace fk_emu;

void fk_emu_ldmatrix(uint32_t* regs, int count, bool trans, const void* row) {
  Fiber* f = current_fiber();
  const Site site{trans ? "ldmatrix.trans" : "ldmatrix", count};
  if (reinterpret_cast<uintptr_t>(row) % 16) fail(site, "ldmatrix row address is not 16-byte aligned");
  f->address = row;
  warp_collective(site, WarpOp::ldmatrix, 0xffffffffu, 0, count | (trans ? 16 : 0), 32);
  for (int j = 0; j < count; ++j) regs[j] = f->regs_out[j];
}

void fk_emu_stmatrix_x4_trans(void* row, const uint32_t* regs) {
  Fiber* f = current_fiber();
  const Site site{"stmatrix.x4.trans", 4};
  if (reinterpret_cast<uintptr_t>(row) % 16) fail(site, "stmatrix row address is not 16-byte aligned");
  f->address = row;
  for (int j = 0; j < 4; ++j) f->regs_in[j] = regs[j];
  warp_collective(site, WarpOp::stmatrix, 0xffffffffu, 0, 0, 32);
}

void fk_emu_mma(float* d, const uint32_t* a, const uint32_t* b, const float* c, int type) {
  Fiber* f = current_fiber();
  for (int i = 0; i < 4; ++i) f->regs_in[i] = a[i];
  f->regs_in[4] = b[0];
  f->regs_in[5] = b[1];
  std::memcpy(&f->regs_in[6], c, 16);
  warp_collective(Site{"mma.sync", type}, WarpOp::mma, 0xffffffffu, 0, type, 32);
  std::memcpy(d, f->regs_out, 16);
}

uint32_t fk_emu_cvt_bf16x2(float hi, float lo) {
  return (uint32_t(f32_to_bf16_bits(hi)) << 16) | f32_to_bf16_bits(lo);
}

uint16_t fk_emu_cvt_fp8x2(float hi, float lo, int type) {
  auto cvt = type == static_cast<int>(MmaType::e4m3) ? f32_to_e4m3_bits : f32_to_e5m2_bits;
  return static_cast<uint16_t>((cvt(hi) << 8) | cvt(lo));
}

// cp.async: the destination is poisoned at issue and filled at the matching wait, so a read
// before the wait (or before the barrier after it, from another thread) sees NaN, and a write
// before the wait (the poison gone) fails.
void fk_emu_cp_async(void* smem, const void* gmem, int bytes, int src_bytes) {
  Fiber* f = current_fiber();
  if (reinterpret_cast<uintptr_t>(smem) % bytes || reinterpret_cast<uintptr_t>(gmem) % bytes)
    fail(Site{"cp.async", bytes}, "cp.async addresses must be aligned to the copy size");
  if (src_bytes < 0 || src_bytes > bytes) fail(Site{"cp.async", bytes}, "cp.async source size outside [0, copy size]");
  if (!in_block_shared(smem, bytes))
    fail(Site{"cp.async", bytes}, "the destination is not this block's shared memory (launched with too little dynamic shared memory?)");
  std::memset(smem, 0xFF, bytes);
  f->copies.uncommitted.push_back(AsyncCopy{smem, gmem, bytes, src_bytes});
}

void fk_emu_cp_async_commit() { current_fiber()->copies.commit(); }

void fk_emu_cp_async_wait(int pending) {
  current_fiber()->copies.wait(pending, [](const AsyncCopy& c) {
    if (!still_poisoned(c.dst, c.bytes))
      fail(Site{"cp.async.wait_group", c.bytes},
           "a cp.async's destination in shared memory was written before the copy landed: a race with the copy");
    std::memcpy(c.dst, c.src, c.src_bytes);
    std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
    mark_unfenced(c.dst, c.bytes);
  });
}

void fk_emu_fence_proxy_async() { fence_proxy_async(); }

// wgmma m64nNk16 with operands in the 128-byte swizzle (ptx.cuh): element (row, k) of a
// K-major tile whose k0 slice starts at `p` sits at the address p + 1024·(row/8) +
// 128·(row%8) + 2k, of an MN-major one at p + FK_WGMMA_MN_CHUNK_BYTES·(row/64) + 128·k +
// 2·(row%64) (a 128-byte line per k, the next 8 lines 1024 bytes on, the next 64 rows or
// columns of B a chunk on: the descriptor's LBO), with address bits 4-6 XORed with bits 7-9,
// as the hardware applies the swizzle to the address. This thread's accumulators follow
// ptx.cuh's layout; each k16 dot product rounds as one HMMA does (hmma_dot: HGMMA's own
// rounding is not dumped yet). A byte a cp.async wrote that its thread has not fenced since is
// a bug (runtime.h: mark_unfenced).
static const void* swizzled(const UnfencedBytes& unfenced, uintptr_t logical, size_t bytes) {
  const void* at = reinterpret_cast<const void*>(logical ^ (((logical >> 7) & 7) << 4));
  if (unfenced(at, bytes))
    fail(Site{"wgmma", 0}, "wgmma reads shared memory that a thread's cp.async wrote, with no fence.proxy.async after it");
  return at;
}

// Row `row` of an operand tile (a row of A, a column of B) at its 16 k, widened. A K-major
// row's k lie in two 16-byte chunks, which the swizzle moves whole (bits 0-3 stay): two
// reads; an MN-major row's, 128 bytes apart, one element each.
static void swizzled_row(const UnfencedBytes& unfenced, const void* p, int row, bool mn_major, int type, float (&out)[16]) {
  const uintptr_t base = reinterpret_cast<uintptr_t>(p);
  if (mn_major) {
    for (int k = 0; k < 16; ++k)
      out[k] = widen(load16(swizzled(unfenced, base + FK_WGMMA_MN_CHUNK_BYTES * (row / 64) + 128 * k + 2 * (row % 64), 2), 0), type);
    return;
  }
  for (int half = 0; half < 2; ++half) {
    const void* chunk = swizzled(unfenced, base + 1024 * (row / 8) + 128 * (row % 8) + 16 * half, 16);
    for (int i = 0; i < 8; ++i) out[8 * half + i] = widen(load16(chunk, i), type);
  }
}

static void compute_wgmma(const Fiber& f, const AsyncMma& m) {
  const int warp = (f.linear / 32) % 4, lane = f.linear % 32;
  // This thread's two rows of A and N/4 columns of B (see ptx.cuh's accumulator layout).
  const UnfencedBytes unfenced = unfenced_bytes();
  float a[2][16], b[128][16];
  for (int half = 0; half < 2; ++half) {
    if (m.a) swizzled_row(unfenced, m.a, 16 * warp + lane / 4 + 8 * half, m.a_mn_major, m.type, a[half]);
    else std::memcpy(a[half], m.a_rows[half], sizeof(a[half]));
  }
  for (int c = 0; c < m.n / 4; ++c) swizzled_row(unfenced, m.b, 8 * (c / 2) + 2 * (lane % 4) + c % 2, m.b_mn_major, m.type, b[c]);
  for (int j = 0; j < m.n / 2; ++j) m.d[j] = hmma_dot(a[(j % 4) / 2], b[2 * (j / 4) + j % 2], m.d[j]);
}

void fk_emu_wgmma(float* d, int n, const void* a, const uint32_t* a_regs, const void* b, int type, bool a_mn_major,
                  bool b_mn_major) {
  Fiber* f = current_fiber();
  const Site site{"wgmma", n};
  const auto misplaced = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 || reinterpret_cast<uintptr_t>(p) % 1024 > 96; };
  if ((a && misplaced(a)) || misplaced(b))
    fail(site, "wgmma 128-byte-swizzled tile does not start on a 1024-byte boundary (plus 2·k0)");
  AsyncMma m{d, n, a, a_mn_major, {}, b, b_mn_major, type, a_regs, {}};
  if (!a) {
    for (int r = 0; r < 4; ++r) f->regs_in[r] = m.a_bits[r] = a_regs[r];
    warp_collective(site, WarpOp::wgmma_a, 0xffffffffu, 0, type, 32);
    std::memcpy(m.a_rows, f->wgmma_a, sizeof(m.a_rows));
  }
  f->mmas.uncommitted.push_back(m);
}

void fk_emu_wgmma_commit() { current_fiber()->mmas.commit(); }

void fk_emu_wgmma_wait(int pending) {
  Fiber* f = current_fiber();
  f->mmas.wait(pending, [f](const AsyncMma& m) {
    if (!m.a && std::memcmp(m.a_regs, m.a_bits, sizeof(m.a_bits)) != 0)
      fail(Site{"wgmma.wait_group", m.n}, "a wgmma's A registers changed before the wait that completes it");
    compute_wgmma(*f, m);
  });
}
