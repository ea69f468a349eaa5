// Host entry points of the CUDA attention forward (csrc/cuda/attention.cu), called by the
// dispatcher registrations in csrc/cuda/attention_host.cpp and paged_host.cpp once the inputs are
// checked. Schemas and semantics: csrc/ops.cpp (fastattn::attention, paged_attention_forward) and
// fastattn/reference.py::attention.
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

// (out (B, Sq, H, Dv) seq-major in q's dtype, lse (B, H, Sq) float32) of q (B, H, Sq, D) against
// the paged caches, k_new / v_new appended in place first; checked float16 / bfloat16 inputs on
// one CUDA device, every sequence's keys within its row of block_table and the cache's blocks.
// longest: the most keys of any sequence (with the new ones).
std::tuple<at::Tensor, at::Tensor> paged_attention_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_table, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new, int64_t longest,
    double scale, bool causal, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& alibi);

}  // namespace fastattn::cuda
