// AVX-512 + BF16-extension instantiation of the softmax kernels (softmax_impl.h), bf16 inputs only:
// the output conversion is one instruction instead of eight, which bf16 softmax is bound by.
#include <cstdlib>

#include "softmax_kernels.h"
#include "vec_avx512.h"

FASTATTN_BEGIN_AVX512BF16
namespace fastattn::cpu::avx512bf16 {
#include "softmax_impl.h"
}  // namespace fastattn::cpu::avx512bf16
FASTATTN_END_ISA

namespace fastattn::cpu {

// Empty unless x is bf16 and the CPU has AVX512_BF16 (callers have checked AVX-512 itself).
// FASTATTN_CPU_AVX512BF16=0 turns it off, to test the plain AVX-512 bf16 path on such a CPU.
SoftmaxKernels softmax_kernels_avx512bf16(DType x, DType mask, bool mask_per_column) {
  static const bool usable = [] {
    const char* env = std::getenv("FASTATTN_CPU_AVX512BF16");
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && !(env != nullptr && env[0] == '0');
  }();
  if (x != DType::kBFloat16 || !usable) return SoftmaxKernels{};
  return avx512bf16::kernels_for<avx512bf16::Vec, bf16_t>(mask, mask_per_column, x);
}

}  // namespace fastattn::cpu
