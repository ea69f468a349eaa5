// AVX-512 + BF16-extension instantiation of the LayerNorm/RMSNorm row kernels (norm_impl.h), bf16
// data only: every fp32 -> bf16 conversion (y, h, dx) is one instruction instead of eight.
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

// The avx512bf16 tier's table: bf16 only (empty otherwise); consulted only when the CPU runs that
// tier (cpu_isa.h).
NormKernels norm_kernels_avx512bf16(DType x, NormVariant v) {
  if (x != DType::kBFloat16) return NormKernels{};
  return avx512bf16::norm::kernels_for<avx512bf16::Vec, bf16_t>(v);
}

}  // namespace fastattn::cpu
