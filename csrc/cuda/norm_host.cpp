// CUDA kernels of fastattn::norm and fastattn::norm_backward, torch-facing half: input checks and
// the dispatcher registration; the kernels and their launchers are in norm.cu (kept apart so that
// the .cu compiles against light headers only).
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../checks.h"
#include "norm.h"

namespace fastattn::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool rms) {
  constexpr const char* op = "fastattn::norm";
  check_cuda(op, "x", x);
  check_min_dim(op, "x", x, 1);
  check_floating(op, "x", x);
  if (residual.has_value()) check_like(op, "residual", *residual, x);
  if (weight.has_value()) check_norm_param(op, "weight", *weight, x);
  if (bias.has_value()) check_norm_param(op, "bias", *bias, x);
  return norm_forward_cuda(x, residual, weight, bias, eps, rms);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& rstd, bool rms, bool has_bias) {
  constexpr const char* op = "fastattn::norm_backward";
  check_cuda(op, "input", input);
  check_min_dim(op, "input", input, 1);
  check_floating(op, "input", input);
  check_like(op, "grad_out", grad_out, input);
  if (grad_residual_out.has_value()) {
    check_like(op, "grad_residual_out", *grad_residual_out, input);
  }
  if (weight.has_value()) check_norm_param(op, "weight", *weight, input);
  if (!rms) check_row_stats(op, "mean", mean, input);  // RMSNorm: mean is unused (empty)
  check_row_stats(op, "rstd", rstd, input);
  return norm_backward_cuda(grad_out, grad_residual_out, input, weight, mean, rstd, rms, has_bias);
}

}  // namespace
}  // namespace fastattn::cuda

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("norm", &fastattn::cuda::norm);
  m.impl("norm_backward", &fastattn::cuda::norm_backward);
}
