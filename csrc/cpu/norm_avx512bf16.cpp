// AVX-512 + BF16-extension instantiation of the LayerNorm/RMSNorm row kernels (norm_impl.h), bf16
// data only: every fp32 -> bf16 conversion (y, h, dx) is one instruction instead of eight.
#include <cstdlib>

#include "norm_kernels.h"
#include "vec_avx512.h"

FASTATTN_BEGIN_AVX512BF16
namespace fastattn::cpu::avx512bf16::norm {
// Non-temporal store of h (p 32-byte aligned), returning the value as stored (see first_pass).
inline Vec::R stream_round(bf16_t* p, Vec::R v) {
  const __m256i b = Vec::to_bf16(v);
  _mm256_stream_si256((__m256i*)p, b);
  return Vec::cvt_bf16(b);
}
#include "norm_impl.h"
}  // namespace fastattn::cpu::avx512bf16::norm
FASTATTN_END_ISA

namespace fastattn::cpu {

// Empty unless x is bf16 and the CPU has AVX512_BF16 (callers have checked AVX-512 itself).
// FASTATTN_CPU_AVX512BF16=0 turns it off, as for softmax (to test the plain AVX-512 bf16 path).
NormKernels norm_kernels_avx512bf16(DType x, NormVariant v) {
  static const bool usable = [] {
    const char* env = std::getenv("FASTATTN_CPU_AVX512BF16");
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && !(env != nullptr && env[0] == '0');
  }();
  if (x != DType::kBFloat16 || !usable) return NormKernels{};
  return avx512bf16::norm::kernels_for<avx512bf16::Vec, bf16_t>(v);
}

}  // namespace fastattn::cpu
