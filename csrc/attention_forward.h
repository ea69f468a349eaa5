// The CPU attention forward's torch-facing pieces, shared by fastattn::attention
// (csrc/attention.cpp, which defines them) and fastattn::paged_attention_forward (csrc/paged.cpp):
// filling the kernels' argument struct, choosing the kernel table, and running the work items.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "cpu/attention_kernels.h"

namespace fastattn {

// The window, softcap, sinks and ALiBi arguments of one call.
struct AttnVariants {
  int64_t window_left, window_right;
  double softcap;
  const std::optional<at::Tensor>& sinks;
  const std::optional<at::Tensor>& alibi;
};

// Fills a's shape, input, scaling, mask, dropout and variant fields from q (B, H, Sq, D) and k, v
// (B, Hkv, Sk, D) (strides (batch, head, seq) taken as they are); returns the mask it points at.
at::Tensor setup_attention_args(cpu::AttnArgs& a, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                const std::optional<at::Tensor>& rng, double scale, bool causal,
                                int64_t causal_offset, double dropout_p, const AttnVariants& var);

// The kernel table of the best ISA path in use for data dtype x (and the mask's dtype); raises
// naming op when no path serves the pair.
cpu::AttnKernels attention_kernels_for(const char* op, cpu::DType x, bool has_mask,
                                       cpu::DType mask);

// lse of rows with no key at all: -inf, or with sinks the row's sink.
void fill_keyless_lse(at::Tensor& lse, const std::optional<at::Tensor>& sinks);

// Runs every forward work item of a (fields, inputs and outputs set; with per-sequence lengths
// a.Sk is the longest) on kern over an OpenMP team: split-K and the merge for decode-sized calls,
// K/V packed once per wave when several query blocks read them. opts: q's tensor options.
void forward_items(const cpu::AttnArgs& a, const cpu::AttnKernels& kern,
                   const at::TensorOptions& opts);

}  // namespace fastattn
