// AVX2 instantiation of the softmax kernels (softmax_impl.h) for fp32, bf16 and fp16 inputs.
#include "softmax_kernels.h"
#include "vec_avx2.h"

FASTATTN_BEGIN_AVX2
namespace fastattn::cpu::avx2 {
#include "softmax_impl.h"
}  // namespace fastattn::cpu::avx2
FASTATTN_END_ISA

namespace fastattn::cpu {

// Baseline code that only takes the addresses of the AVX2 functions; runs on any CPU.
SoftmaxKernels softmax_kernels_avx2(DType x, DType mask, bool mask_per_column) {
  using avx2::kernels_for;
  using avx2::Vec;
  switch (x) {
    case DType::kFloat32:
      return kernels_for<Vec, float>(mask, mask_per_column, x);
    case DType::kBFloat16:
      return kernels_for<Vec, bf16_t>(mask, mask_per_column, x);
    case DType::kFloat16:
      return kernels_for<Vec, f16_t>(mask, mask_per_column, x);
    default:
      return SoftmaxKernels{};
  }
}

}  // namespace fastattn::cpu
