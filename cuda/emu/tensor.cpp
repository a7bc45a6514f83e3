// tensor.cpp: the tensor-core and async-copy instructions of ptx.cuh, emulated exactly per
// the PTX ISA fragment layouts (design notes: reference/ptx-fragments.md), and checked
// against registers dumped on real hardware (tests/data/regdump-*.txt).
#include <cstring>

#include "runtime.h"

namespace fk_emu {
namespace {

uint16_t load16(const void* row, int col) {
  uint16_t v;
  std::memcpy(&v, static_cast<const unsigned char*>(row) + 2 * col, 2);
  return v;
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

// D = A·B + C for m16n8k16 (bf16, f16) and m16n8k32 (e4m3, e5m2), f32 accumulate.
// g = lane/4, t = lane%4; see reference/ptx-fragments.md for the layouts.
void compute_mma(Fiber* const* lanes, int type) {
  const bool fp8 = type == static_cast<int>(MmaType::e4m3) || type == static_cast<int>(MmaType::e5m2);
  const int K = fp8 ? 32 : 16, per = fp8 ? 4 : 2, bits = fp8 ? 8 : 16;
  float A[16][32], B[32][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const uint32_t* in = lanes[l]->regs_in;
    for (int r = 0; r < 4; ++r) {       // A: reg r covers rows g (+8 if r odd), k-half r/2
      const int row = g + 8 * (r & 1), col0 = per * t + (K / 2) * (r >> 1);
      for (int i = 0; i < per; ++i) A[row][col0 + i] = widen(element(in[r], i, bits), type);
    }
    for (int r = 0; r < 2; ++r) {       // B: reg r covers k-half r, column g
      const int k0 = per * t + (K / 2) * r;
      for (int i = 0; i < per; ++i) B[k0 + i][g] = widen(element(in[4 + r], i, bits), type);
    }
    for (int i = 0; i < 4; ++i) {       // C: rows g, g+8; columns 2t, 2t+1
      std::memcpy(&C[g + 8 * (i >> 1)][2 * t + (i & 1)], &in[6 + i], 4);
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
      // Products of these inputs are exact in double; the sum is rounded once to f32.
      double acc = C[row][col];
      for (int k = 0; k < K; ++k) acc += static_cast<double>(A[row][k]) * B[k][col];
      const float d = static_cast<float>(acc);
      std::memcpy(&lanes[l]->regs_out[i], &d, 4);
    }
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
// before the wait (or before the barrier after it, from another thread) sees NaN.
void fk_emu_cp_async(void* smem, const void* gmem, int bytes) {
  Fiber* f = current_fiber();
  if (reinterpret_cast<uintptr_t>(smem) % bytes || reinterpret_cast<uintptr_t>(gmem) % bytes)
    fail(Site{"cp.async", bytes}, "cp.async addresses must be aligned to the copy size");
  std::memset(smem, 0xFF, bytes);
  f->uncommitted.push_back(AsyncCopy{smem, gmem, bytes});
}

void fk_emu_cp_async_commit() {
  Fiber* f = current_fiber();
  f->groups.push_back(std::move(f->uncommitted));
  f->uncommitted.clear();
}

void fk_emu_cp_async_wait(int pending) {
  Fiber* f = current_fiber();
  while (static_cast<int>(f->groups.size()) > pending) {
    for (const AsyncCopy& c : f->groups.front()) std::memcpy(c.dst, c.src, c.bytes);
    f->groups.erase(f->groups.begin());
  }
}
