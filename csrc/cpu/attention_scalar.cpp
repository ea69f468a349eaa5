// Scalar instantiation of the attention kernels (attention_impl.h): every dtype on CPUs without
// AVX2, and float64 (fp64 math, used by gradcheck) everywhere.
#include "attention_kernels.h"
#include "vec_scalar.h"

namespace fastattn::cpu::scalar {
#include "attention_impl.h"
}  // namespace fastattn::cpu::scalar

namespace fastattn::cpu {

AttnKernels attention_kernels_scalar(DType x, bool has_mask, DType mask) {
  switch (x) {
    case DType::kFloat32:
      return scalar::Attn<scalar::Vec<float>>::table<float>(x, has_mask, mask);
    case DType::kBFloat16:
      return scalar::Attn<scalar::Vec<float>>::table<bf16_t>(x, has_mask, mask);
    case DType::kFloat16:
      return scalar::Attn<scalar::Vec<float>>::table<f16_t>(x, has_mask, mask);
    case DType::kFloat64:
      return scalar::Attn<scalar::Vec<double>>::table<double>(x, has_mask, mask);
    default:
      return AttnKernels{};
  }
}

}  // namespace fastattn::cpu
