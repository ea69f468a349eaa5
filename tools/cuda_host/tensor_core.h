// Portable implementations of csrc/cuda/mma.cuh's primitives for the host execution layer
// (cuda_host.h, included first): mma.sync m16n8k16, ldmatrix .x4 (plain and .trans) and cp.async,
// following the PTX ISA's documented fragment layouts (restated in mma.cuh). Test tooling only.
//
// - mma and ldmatrix are warp collectives: every lane deposits its operands (or row address),
//   and once all 32 have arrived each lane computes its own result from everyone's; a second
//   (internal) collective keeps any lane from changing its operands before the others have read
//   them. mma accumulates in fp32 in k order 0..15: the device's tensor cores may round and order
//   their sums differently (docs/cuda-host.md).
// - ldmatrix rows and cp.async destinations must be 16-byte aligned and lie inside the launch's
//   dynamic shared memory (the attention kernels keep all their tiles there): anything else is a
//   reported error, as is a misaligned cp.async source.
// - cp.async is deferred, as on the device: a copy lands only when its thread's
//   cp_async_wait<N> retires its commit group, so a kernel that reads a tile before waiting for it
//   reads the poison (0xff bytes) of the block's fresh shared memory, or the previous tile.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace cuda_host::tc {

inline detail::Launch& state() { return detail::launch_state(); }

template <bool kBf16>
float to_float(uint16_t bits) {
  if constexpr (kBf16) {
    return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
  } else {
    return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
  }
}

inline uint16_t half_of(uint32_t reg, int which) {
  return static_cast<uint16_t>(which == 0 ? reg & 0xffffu : reg >> 16);
}

inline void check_smem(const void* p, size_t bytes, const char* what) {
  detail::Launch& l = state();
  const auto* c = static_cast<const unsigned char*>(p);
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    detail::fail(std::string("cuda_host: ") + what + " address not 16-byte aligned at " +
                 detail::where(l, *l.current));
  if (l.dyn == nullptr || c < l.dyn || c + bytes > l.dyn + l.dyn_bytes)
    detail::fail(std::string("cuda_host: ") + what +
                 " outside the launch's dynamic shared memory (" + std::to_string(l.dyn_bytes) +
                 " bytes) at " + detail::where(l, *l.current));
}

// The operands every lane deposited (pointers, one per lane) once the whole warp arrived.
inline const detail::WarpBuf& gather(const void* mine) {
  return detail::warp_collective(detail::Op::kBallot, 0xffffffffu,
                                 reinterpret_cast<uintptr_t>(mine), false, 32);
}
// Every lane has computed its result: operands may change again.
inline void release() { detail::warp_collective(detail::Op::kBallot, 0xffffffffu, 0, false, 32); }

struct MmaArgs {
  const uint32_t* a;
  uint32_t b0, b1;
};

template <bool kBf16>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const MmaArgs mine{a, b0, b1};
  const detail::WarpBuf& buf = gather(&mine);
  const MmaArgs* lanes[32];
  for (int i = 0; i < 32; ++i) lanes[i] = reinterpret_cast<const MmaArgs*>(buf.slot[i]);
  const int lane = detail::self().lane, g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) {
      // A(row, k): lane 4 (row % 8) + (k % 8) / 2, register (row / 8) + 2 (k / 8), half k % 2.
      const MmaArgs& la = *lanes[4 * (row % 8) + (k % 8) / 2];
      const float av = to_float<kBf16>(half_of(la.a[row / 8 + 2 * (k / 8)], k % 2));
      // B(k, col): lane 4 col + (k % 8) / 2, register k / 8, half k % 2.
      const MmaArgs& lb = *lanes[4 * col + (k % 8) / 2];
      const float bv = to_float<kBf16>(half_of(k < 8 ? lb.b0 : lb.b1, k % 2));
      acc += av * bv;
    }
    d[e] = acc;
  }
  release();
}

template <bool kTrans>
void ldmatrix(uint32_t (&r)[4], const void* row) {
  check_smem(row, 16, kTrans ? "ldmatrix.trans row" : "ldmatrix row");
  const detail::WarpBuf& buf = gather(row);
  const int lane = detail::self().lane;
  uint16_t e[2];
  for (int m = 0; m < 4; ++m) {
    for (int h = 0; h < 2; ++h) {
      const int src_row = kTrans ? 2 * (lane % 4) + h : lane / 4;
      const int src_col = kTrans ? lane / 4 : 2 * (lane % 4) + h;
      const auto* p = reinterpret_cast<const uint16_t*>(buf.slot[8 * m + src_row]);
      std::memcpy(&e[h], p + src_col, 2);
    }
    r[m] = uint32_t{e[0]} | (uint32_t{e[1]} << 16);
  }
  release();
}

// A thread's cp.async copies not yet landed, per commit group.
struct Pending {
  void* dst;
  const void* src;  // nullptr: zero fill
  uint64_t group;
};
struct AsyncState {
  uint64_t serial = ~uint64_t{0};  // the block these belong to (detail::block_serial)
  std::vector<std::vector<Pending>> pending;
  std::vector<uint64_t> committed;
};

inline AsyncState& async_state() {
  static AsyncState s;
  detail::Launch& l = state();
  if (s.serial != detail::block_serial()) {  // a new block: its threads start with nothing
    s.serial = detail::block_serial();
    s.pending.assign(l.fibers.size(), {});
    s.committed.assign(l.fibers.size(), 0);
  }
  return s;
}

inline void cp_async_16(void* dst, const void* src, bool valid) {
  check_smem(dst, 16, "cp.async destination");
  if (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0)
    detail::fail("cuda_host: cp.async source not 16-byte aligned at " +
                 detail::where(state(), *state().current));
  AsyncState& s = async_state();
  const int me = detail::self().linear;
  s.pending[me].push_back({dst, valid ? src : nullptr, s.committed[me]});
}

inline void cp_async_commit() {
  AsyncState& s = async_state();
  ++s.committed[detail::self().linear];
}

inline void cp_async_wait(int n) {
  AsyncState& s = async_state();
  const int me = detail::self().linear;
  std::vector<Pending>& q = s.pending[me];
  const uint64_t done = s.committed[me] >= static_cast<uint64_t>(n) ? s.committed[me] - n : 0;
  size_t kept = 0;
  for (const Pending& c : q) {
    if (c.group < done) {
      if (c.src != nullptr)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
    } else {
      q[kept++] = c;
    }
  }
  q.resize(kept);
}

}  // namespace cuda_host::tc

namespace fastattn::cuda {

template <bool kBf16>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  cuda_host::tc::mma_16816<kBf16>(d, a, b0, b1);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  cuda_host::tc::ldmatrix<false>(r, row);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  cuda_host::tc::ldmatrix<true>(r, row);
}
inline void cp_async_16(void* dst, const void* src, bool valid) {
  cuda_host::tc::cp_async_16(dst, src, valid);
}
inline void cp_async_commit() { cuda_host::tc::cp_async_commit(); }
template <int N>
void cp_async_wait() {
  cuda_host::tc::cp_async_wait(N);
}

}  // namespace fastattn::cuda
