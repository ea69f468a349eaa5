// AVX2 instantiation of the LayerNorm/RMSNorm row kernels (norm_impl.h) for fp32, bf16
// and fp16 data.
#include "norm_kernels.h"
#include "vec_avx2.h"

FASTATTN_BEGIN_AVX2
namespace fastattn::cpu::avx2::norm {
// Non-temporal store of h (p aligned to 32 bytes for fp32, 16 for 16-bit types), returning the
// value as stored: the conversion to T is done once, for both (see first_pass in norm_impl.h).
inline Vec::R stream_round(float* p, Vec::R v) { return Vec::stream(p, v), v; }
inline Vec::R stream_round(bf16_t* p, Vec::R v) {
  const __m128i b = Vec::to_bf16(v);
  _mm_stream_si128((__m128i*)p, b);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}
inline Vec::R stream_round(f16_t* p, Vec::R v) {
  const __m128i b = Vec::to_f16(v);
  _mm_stream_si128((__m128i*)p, b);
  return _mm256_cvtph_ps(b);
}
#include "norm_impl.h"
}  // namespace fastattn::cpu::avx2::norm
FASTATTN_END_ISA

namespace fastattn::cpu {

// Baseline code that only takes the addresses of the AVX2 functions; runs on any CPU.
NormKernels norm_kernels_avx2(DType x, NormVariant v) {
  using avx2::Vec;
  switch (x) {
    case DType::kFloat32:
      return avx2::norm::kernels_for<Vec, float>(v);
    case DType::kBFloat16:
      return avx2::norm::kernels_for<Vec, bf16_t>(v);
    case DType::kFloat16:
      return avx2::norm::kernels_for<Vec, f16_t>(v);
    default:
      return NormKernels{};
  }
}

}  // namespace fastattn::cpu
