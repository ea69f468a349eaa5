// AVX-512 + BF16-extension instantiation of the softmax kernels (softmax_impl.h), bf16 inputs only:
// the output conversion is one instruction instead of eight, which bf16 softmax is bound by.
#include "softmax_kernels.h"
#include "vec_avx512.h"

FASTATTN_BEGIN_AVX512BF16
namespace fastattn::cpu::avx512bf16 {
#include "softmax_impl.h"
}  // namespace fastattn::cpu::avx512bf16
FASTATTN_END_ISA

namespace fastattn::cpu {

// The avx512bf16 tier's table: bf16 only (empty otherwise); consulted only when the CPU runs that
// tier (cpu_isa.h).
SoftmaxKernels softmax_kernels_avx512bf16(DType x, DType mask, bool mask_per_column) {
  if (x != DType::kBFloat16) return SoftmaxKernels{};
  return avx512bf16::kernels_for<avx512bf16::Vec, bf16_t>(mask, mask_per_column, x);
}

}  // namespace fastattn::cpu
