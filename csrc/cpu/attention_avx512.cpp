// AVX-512 instantiation of the attention kernels (attention_impl.h) for fp32, bf16 and fp16 data.
#include "attention_kernels.h"
#include "vec_avx512.h"

FASTATTN_BEGIN_AVX512
namespace fastattn::cpu::avx512 {
#include "attention_vec512.h"
using AVec = AttnVec512<Vec, false>;
#include "attention_impl.h"
}  // namespace fastattn::cpu::avx512
FASTATTN_END_ISA

namespace fastattn::cpu {

// Baseline code that only takes the addresses of the AVX-512 functions; runs on any CPU.
AttnKernels attention_kernels_avx512(DType x, bool has_mask, DType mask) {
  using K = avx512::Attn<avx512::AVec>;
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
