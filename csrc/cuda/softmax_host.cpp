// CUDA kernels of fastattn::softmax and fastattn::softmax_backward, torch-facing half: input
// checks and the dispatcher registration; the kernels and their launchers are in softmax.cu (kept
// apart so that the .cu compiles against light headers only).
#include <torch/library.h>

#include <optional>

#include "../checks.h"
#include "softmax.h"

namespace fastattn::cuda {
namespace {

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
  check_like(op, "grad_out", grad_out, out);
  return softmax_backward_cuda(grad_out, out, scale, log);
}

}  // namespace
}  // namespace fastattn::cuda

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("softmax", &fastattn::cuda::softmax);
  m.impl("softmax_backward", &fastattn::cuda::softmax_backward);
}
