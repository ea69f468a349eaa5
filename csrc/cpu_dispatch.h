// Torch-facing helpers shared by the CPU ops (csrc/<op>.cpp): the kernels' dtype tag of a tensor,
// and the kernel table of the best vector path the running CPU supports (cpu_isa.h).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "cpu/common.h"
#include "cpu_isa.h"

namespace fastattn {

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

// The kernel table of the best path: `get` holds an op's table getters for the scalar, AVX2,
// AVX-512 and AVX-512 + BF16 paths, in that order. From the best path the CPU runs (or the scalar
// one when `scalar_only`, e.g. for float64 math) down, the first table `serves` accepts is used.
// A getter returns an empty table for dtype combinations its path does not serve.
template <class Table, class Serves, class... A, class... B>
Table best_kernels(Table (*const (&get)[4])(A...), bool scalar_only, Serves serves, B... args) {
  int top = 0;
  if (!scalar_only) top = cpu::isa() == cpu::Isa::kAvx512 ? 3 : cpu::isa() == cpu::Isa::kAvx2;
  for (int i = top; i > 0; --i) {
    const Table k = get[i](args...);
    if (serves(k)) return k;
  }
  return get[0](args...);
}

}  // namespace fastattn
