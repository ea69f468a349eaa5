// Host entry point of the CUDA attention forward (csrc/cuda/attention.cu), called by the
// dispatcher registration in csrc/cuda/attention_host.cpp once the inputs are checked. Schema and
// semantics: csrc/ops.cpp (fastattn::attention) and fastattn/reference.py::attention.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fastattn::cuda {

// (out (B, H, Sq, Dv) in q's dtype, lse (B, H, Sq) float32) for checked float16 / bfloat16
// inputs on one CUDA device.
std::tuple<at::Tensor, at::Tensor> attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& rng, double scale,
    bool causal, int64_t causal_offset, double dropout_p, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& alibi);

}  // namespace fastattn::cuda
