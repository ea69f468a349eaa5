// Scalar instantiation of the softmax kernels (softmax_impl.h): every dtype on CPUs without
// AVX2, and float64 (fp64 math) everywhere.
#include "softmax_kernels.h"
#include "vec_scalar.h"

namespace fastattn::cpu::scalar {
#include "softmax_impl.h"
}  // namespace fastattn::cpu::scalar

namespace fastattn::cpu {

SoftmaxKernels softmax_kernels_scalar(DType x, DType mask, bool mask_per_column) {
  using scalar::kernels_for;
  using scalar::Vec;
  switch (x) {
    case DType::kFloat32:
      return kernels_for<Vec<float>, float>(mask, mask_per_column, x);
    case DType::kBFloat16:
      return kernels_for<Vec<float>, bf16_t>(mask, mask_per_column, x);
    case DType::kFloat16:
      return kernels_for<Vec<float>, f16_t>(mask, mask_per_column, x);
    case DType::kFloat64:
      return kernels_for<Vec<double>, double>(mask, mask_per_column, x);
    default:
      return SoftmaxKernels{};
  }
}

}  // namespace fastattn::cpu
