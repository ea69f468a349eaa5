// CPU kernel of fastattn::paged_attention_forward (schema in csrc/ops.cpp): attention of q against
// a paged KV cache, one call for the whole batch. The attention kernels walk the block table
// themselves (kv_row in csrc/cpu/attention_impl.h): no key is copied out of its cache block.
// The new keys and values, if any, are appended in place first (after every check).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>

#include "attention_forward.h"
#include "checks.h"
#include "cpu_dispatch.h"
#include "output_pool.h"

namespace fastattn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
constexpr const char* kOp = "fastattn::paged_attention_forward";

// Writes new (B, Sq, Hkv, Dn) into cache (num_blocks, block_size, Hkv, Dn) at each sequence's
// positions lens[b] .. lens[b] + Sq - 1 (tables checked above), row by row.
void append(const Tensor& cache, const Tensor& table, const Tensor& lens, const Tensor& nw) {
  const int64_t B = nw.size(0), S = nw.size(1), Hkv = nw.size(2), bs = cache.size(1);
  const int64_t row = nw.size(3) * nw.element_size(), es = nw.element_size();
  const int32_t* tp = table.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  const char* src = static_cast<const char*>(nw.data_ptr());
  char* dst = static_cast<char*>(cache.data_ptr());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < S; ++t) {
      const int64_t pos = lp[b] + t, blk = tp[b * table.size(1) + pos / bs];
      for (int64_t h = 0; h < Hkv; ++h)
        std::memcpy(
            dst + (blk * cache.stride(0) + pos % bs * cache.stride(1) + h * cache.stride(2)) * es,
            src + (b * nw.stride(0) + t * nw.stride(1) + h * nw.stride(2)) * es, size_t(row));
    }
}

std::tuple<Tensor, Tensor> paged_attention_forward_cpu(
    const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
    const Tensor& cache_seqlens, const OptTensor& k_new, const OptTensor& v_new, double scale,
    bool causal, int64_t window_left, int64_t window_right, double softcap, const OptTensor& sinks,
    const OptTensor& alibi) {
  const int64_t longest =
      check_paged_inputs(kOp, q, k_cache, v_cache, block_table, cache_seqlens, k_new, v_new);
  check_attention_variants(kOp, q, window_left, window_right, softcap, sinks, alibi);
  const Tensor table = block_table.contiguous(), cached = cache_seqlens.contiguous();
  if (k_new.has_value() && q.size(2) > 0) {  // all checked: append, then attend
    // (append copies rows of the last dim: make any other layout of the new tokens so)
    append(k_cache, table, cached, k_new->contiguous());
    append(v_cache, table, cached, v_new->contiguous());
  }
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), Dv = v_cache.size(3);
  const auto lse_dt = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Seq-major, as the caller's q (batch, seqlen_q, heads, head_dim) and FlashAttention's output.
  Tensor out = new_output({B, Sq, H, Dv}, q.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor lse = new_output({B, H, Sq}, q.options().dtype(lse_dt));
  if (B * H * Sq == 0) return {out, lse};
  if (longest == 0) {  // no sequence holds a key: every row is fully masked
    out.zero_();
    fill_keyless_lse(lse, sinks);
    return {out, lse};
  }
  const Tensor lens = k_new.has_value() ? cached.add(q.size(2)).to(at::kInt) : cached;
  cpu::AttnArgs a{};
  const AttnVariants var{window_left, window_right, softcap, sinks, alibi};
  // (num_blocks, kv_heads, block_size, D) views: strides (block, head, row), as kv_row reads them.
  setup_attention_args(a, q, k_cache.permute({0, 2, 1, 3}), v_cache.permute({0, 2, 1, 3}),
                       std::nullopt, std::nullopt, scale, causal, 0, 0.0, var);
  a.Sk = longest;
  a.seqlen_k = lens.data_ptr<int32_t>();
  a.block_table = table.data_ptr<int32_t>();
  a.bt_stride = table.size(1);
  a.page = k_cache.size(1);
  a.out = out.data_ptr();
  a.lse = lse.data_ptr();
  a.out_seq_major = true;
  const cpu::DType xdt = dtype_of(kOp, q.scalar_type());
  forward_items(a, attention_kernels_for(kOp, xdt, false, xdt), q.options());
  return {out, lse};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("paged_attention_forward", &fastattn::paged_attention_forward_cpu);
}
