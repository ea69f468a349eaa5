// Host entry points of the CUDA LayerNorm/RMSNorm kernels (csrc/cuda/norm.cu), called by the
// dispatcher registrations in csrc/cuda/norm_host.cpp once the inputs are checked. Schemas and
// semantics: csrc/ops.cpp and fastattn/ops/norm.py.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fastattn::cuda {

// (out, residual_out, mean, rstd) of fastattn::norm. Expects checked inputs on one CUDA device.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool rms);

// (dx, dweight, dbias) of fastattn::norm_backward. Expects checked inputs on one CUDA device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& rstd, bool rms, bool has_bias);

}  // namespace fastattn::cuda
