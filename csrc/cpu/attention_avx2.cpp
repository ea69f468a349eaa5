// AVX2 instantiation of the attention kernels (attention_impl.h) for fp32, bf16 and fp16 data.
#include "attention_kernels.h"
#include "vec_avx2.h"

FASTATTN_BEGIN_AVX2
namespace fastattn::cpu::avx2 {
#include "attention_impl.h"
}  // namespace fastattn::cpu::avx2
FASTATTN_END_ISA

namespace fastattn::cpu {

AttnKernels attention_kernels_avx2(DType x, bool has_mask, DType mask) {
  using K = avx2::Attn<avx2::Vec>;
  switch (x) {
    case DType::kFloat32:
      return K::table<float>(x, has_mask, mask);
    case DType::kBFloat16:
      return K::table<bf16_t>(x, has_mask, mask);
    case DType::kFloat16:
      return K::table<f16_t>(x, has_mask, mask);
    default:
      return AttnKernels{};
  }
}

}  // namespace fastattn::cpu
