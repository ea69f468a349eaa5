// AVX-512 instantiation of the softmax kernels (softmax_impl.h) for fp32, bf16 and fp16 inputs.
#include "softmax_kernels.h"
#include "vec_avx512.h"

FASTATTN_BEGIN_AVX512
namespace fastattn::cpu::avx512 {
#include "softmax_impl.h"
}  // namespace fastattn::cpu::avx512
FASTATTN_END_ISA

namespace fastattn::cpu {

// Baseline code that only takes the addresses of the AVX-512 functions; runs on any CPU.
SoftmaxKernels softmax_kernels_avx512(DType x, DType mask, bool mask_per_column) {
  using avx512::kernels_for;
  using avx512::Vec;
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
