// CUDA kernels of fastattn::softmax and fastattn::softmax_backward: input checks, then the kernels
// in softmax.cu (kept apart so that the .cu compiles against light headers only).
#include <torch/library.h>

#include <optional>

#include "../checks.h"

namespace fastattn::cuda {

// softmax.cu
at::Tensor softmax_cuda(const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale,
                        bool causal, bool log);
at::Tensor softmax_backward_cuda(const at::Tensor& grad_out, const at::Tensor& out, double scale,
                                 bool log);

namespace {

void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name,
              " must be a CUDA tensor for the CUDA kernel, got one on ", t.device());
}

at::Tensor softmax(const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale,
                   bool causal, bool log) {
  constexpr const char* op = "fastattn::softmax";
  check_cuda(op, "x", x);
  check_min_dim(op, "x", x, 1);
  check_floating(op, "x", x);
  if (mask.has_value()) check_mask(op, *mask, x);
  return softmax_cuda(x, mask, scale, causal, log);
}

at::Tensor softmax_backward(const at::Tensor& grad_out, const at::Tensor& out, double scale,
                            bool log) {
  constexpr const char* op = "fastattn::softmax_backward";
  check_cuda(op, "out", out);
  check_min_dim(op, "out", out, 1);
  check_floating(op, "out", out);
  check_same_device(op, "grad_out", grad_out, out);
  check_same_shape(op, "grad_out", grad_out, out);
  check_same_dtype(op, "grad_out", grad_out, out);
  return softmax_backward_cuda(grad_out, out, scale, log);
}

}  // namespace
}  // namespace fastattn::cuda

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("softmax", &fastattn::cuda::softmax);
  m.impl("softmax_backward", &fastattn::cuda::softmax_backward);
}
