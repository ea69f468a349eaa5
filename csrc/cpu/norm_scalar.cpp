// Scalar instantiation of the LayerNorm/RMSNorm row kernels (norm_impl.h): every dtype on CPUs
// without AVX2, and float64 (float64 math, as gradcheck needs) everywhere.
#include "norm_kernels.h"
#include "vec_scalar.h"

namespace fastattn::cpu::scalar::norm {
// One lane at a time, streaming buys nothing: a plain store, read back as rounded.
template <class T, class R>
inline R stream_round(T* p, R v) {
  Vec<R>::store(p, v);
  return Vec<R>::load(p);
}
#include "norm_impl.h"
}  // namespace fastattn::cpu::scalar::norm

namespace fastattn::cpu {

NormKernels norm_kernels_scalar(DType x, NormVariant v) {
  using scalar::Vec;
  switch (x) {
    case DType::kFloat32:
      return scalar::norm::kernels_for<Vec<float>, float>(v);
    case DType::kBFloat16:
      return scalar::norm::kernels_for<Vec<float>, bf16_t>(v);
    case DType::kFloat16:
      return scalar::norm::kernels_for<Vec<float>, f16_t>(v);
    case DType::kFloat64:
      return scalar::norm::kernels_for<Vec<double>, double>(v);
    default:
      return NormKernels{};
  }
}

}  // namespace fastattn::cpu
