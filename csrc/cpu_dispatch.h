// Torch-facing helpers shared by the CPU ops (csrc/<op>.cpp): the kernels' dtype tag of a tensor,
// and the kernel table of the best vector path the running CPU supports (cpu_isa.h).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "cpu/common.h"
#include "cpu_isa.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace fastattn {

// Flushes subnormal fp results to zero and reads subnormal inputs as zero (MXCSR FTZ + DAZ) on
// the calling thread for the guard's lifetime, then restores the thread's previous mode. The
// softmax and attention kernels hold one in every thread that runs them: exp of a masked (-inf)
// or very negative score underflows, and on Intel CPUs every subnormal or underflowing result
// costs a microcode assist of ~100+ cycles (2026-12-02, Intel Xeon, 2 threads: softmax of
// (8, 128, 4096) fp32 under a key-padding mask with 20% -inf took 10.6 ms, unmasked 0.95 ms; a
// masked attention forward 58 ms against 16 ms). Values below FLT_MIN (1.2e-38) are far below
// what any of these ops resolves at the scale of its results, as on GPUs, which flush too.
class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtz | kDaz); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFtz = 1u << 15, kDaz = 1u << 6;
  unsigned saved_;
#endif
 public:
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

// The dtype tag the kernel tables are keyed on; other dtypes are rejected naming `op`.
inline cpu::DType dtype_of(const char* op, at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return cpu::DType::kFloat32;
    case at::kBFloat16:
      return cpu::DType::kBFloat16;
    case at::kHalf:
      return cpu::DType::kFloat16;
    case at::kDouble:
      return cpu::DType::kFloat64;
    case at::kBool:
      return cpu::DType::kBool;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", st);
  }
  return cpu::DType::kFloat32;
}

// The kernel table of the best path: `get` holds an op's table getters per tier (cpu::Isa: scalar,
// AVX2, AVX-512, AVX-512 + BF16, in that order). From the best path the CPU runs (or the scalar
// one when `scalar_only`, e.g. for float64 math) down, the first table `serves` accepts is used.
// A getter returns an empty table for dtype combinations its path does not serve.
// `get` has exactly one getter per tier: a table left short by a new tier fails to compile.
template <class Table, class Serves, class... A, class... B>
Table best_kernels(Table (*const (&get)[cpu::kIsaTiers])(A...), bool scalar_only, Serves serves,
                   B... args) {
  const int top = scalar_only ? 0 : static_cast<int>(cpu::isa());
  for (int i = top; i > 0; --i) {
    const Table k = get[i](args...);
    if (serves(k)) return k;
  }
  return get[0](args...);
}

}  // namespace fastattn
