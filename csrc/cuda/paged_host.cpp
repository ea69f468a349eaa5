// CUDA kernel of fastattn::paged_attention_forward, torch-facing half: the input checks (the
// block table and lengths read on the host, as on the CPU: csrc/checks.h) and the dispatcher
// registration; the append and attention kernels and their launcher are in attention.cu.
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../checks.h"
#include "attention.h"

namespace fastattn::cuda {
namespace {

using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> paged_attention_forward(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_table, const at::Tensor& cache_seqlens, const OptTensor& k_new,
    const OptTensor& v_new, double scale, bool causal, int64_t window_left, int64_t window_right,
    double softcap, const OptTensor& sinks, const OptTensor& alibi) {
  constexpr const char* op = "fastattn::paged_attention_forward";
  check_cuda(op, "q", q);
  const int64_t longest =
      check_paged_inputs(op, q, k_cache, v_cache, block_table, cache_seqlens, k_new, v_new);
  check_attention_variants(op, q, window_left, window_right, softcap, sinks, alibi);
  return paged_attention_cuda(q, k_cache, v_cache, block_table, cache_seqlens, k_new, v_new,
                              longest, scale, causal, window_left, window_right, softcap, sinks,
                              alibi);
}

}  // namespace
}  // namespace fastattn::cuda

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("paged_attention_forward", &fastattn::cuda::paged_attention_forward);
}
