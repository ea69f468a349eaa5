// CUDA kernel of fastattn::attention (the forward), torch-facing half: input checks and the
// dispatcher registration; the kernels and their launcher are in attention.cu. The backward of
// CUDA tensors is the Triton kernel's (fastattn/ops/attention.py registers it for the CUDA key).
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../checks.h"
#include "attention.h"

namespace fastattn::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> attention(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v,
                                             const std::optional<at::Tensor>& mask,
                                             const std::optional<at::Tensor>& rng, double scale,
                                             bool causal, int64_t causal_offset, double dropout_p,
                                             int64_t window_left, int64_t window_right,
                                             double softcap, const std::optional<at::Tensor>& sinks,
                                             const std::optional<at::Tensor>& alibi) {
  constexpr const char* op = "fastattn::attention";
  check_cuda(op, "q", q);
  check_attention_inputs(op, q, k, v, mask, rng, dropout_p);
  check_attention_variants(op, q, window_left, window_right, softcap, sinks, alibi);
  return attention_cuda(q, k, v, mask, rng, scale, causal, causal_offset, dropout_p, window_left,
                        window_right, softcap, sinks, alibi);
}

}  // namespace
}  // namespace fastattn::cuda

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) { m.impl("attention", &fastattn::cuda::attention); }
