// CPU kernel of fastattn::paged_attention_forward (schema in csrc/ops.cpp): attention of q against
// a paged KV cache, one call for the whole batch. The attention kernels walk the block table
// themselves (kv_row in csrc/cpu/attention_impl.h): no key is copied out of its cache block.
// The new keys and values, if any, are appended in place first (after every check).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "attention_forward.h"
#include "checks.h"
#include "cpu_dispatch.h"
#include "output_pool.h"

namespace fastattn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
constexpr const char* kOp = "fastattn::paged_attention_forward";

// q (B, H, Sq, D) (any strides, last dim contiguous), caches (num_blocks, block_size, Hkv, D|Dv);
// block_table (B, max_blocks) and cache_seqlens (B,) int32; k_new, v_new (B, Sq, Hkv, D | Dv)
// or neither; every sequence's keys (with the new ones) fit its row of the table, and every
// block they take exists. Returns the longest sequence's key count.
int64_t check_paged(const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& table,
                    const Tensor& lens, const OptTensor& kn, const OptTensor& vn) {
  TORCH_CHECK(q.dim() == 4 && kc.dim() == 4 && vc.dim() == 4, kOp,
              ": expected q (batch, heads, seqlen_q, head_dim) and caches (num_blocks, "
              "block_size, kv_heads, head_dim); got q ",
              q.sizes(), ", k_cache ", kc.sizes(), ", v_cache ", vc.sizes());
  check_cpu_data(kOp, "q", q);
  check_same_dtype(kOp, "k_cache", kc, q);
  check_same_dtype(kOp, "v_cache", vc, q);
  const Tensor* named[4] = {&kc, &vc, &table, &lens};
  const char* names[4] = {"k_cache", "v_cache", "block_table", "cache_seqlens"};
  for (int t = 0; t < 4; ++t) check_same_device(kOp, names[t], *named[t], q);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), bs = kc.size(1), Hkv = kc.size(2);
  TORCH_CHECK(kc.size(3) == D && vc.size(0) == kc.size(0) && vc.size(1) == bs && vc.size(2) == Hkv,
              kOp, ": k_cache must match q's head_dim and v_cache's first three dims; got q ",
              q.sizes(), ", k_cache ", kc.sizes(), ", v_cache ", vc.sizes());
  TORCH_CHECK(bs >= 16 && (bs & (bs - 1)) == 0, kOp,
              ": block_size must be a power of two >= 16, got ", bs);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, kOp, ": q's heads (", H,
              ") must be a multiple of the caches' kv_heads (", Hkv, ")");
  TORCH_CHECK(D >= 1 && D <= 256 && vc.size(3) >= 1 && vc.size(3) <= 256, kOp,
              ": head_dims must be in [1, 256], got q ", q.sizes(), ", v_cache ", vc.sizes());
  for (const Tensor* t : {&q, &kc, &vc})
    TORCH_CHECK(t->stride(3) == 1 || t->size(3) <= 1, kOp,
                ": q and the caches need a contiguous last dim, got strides ", t->strides());
  TORCH_CHECK(table.scalar_type() == at::kInt && table.dim() == 2 && table.size(0) == B, kOp,
              ": block_table must be int32 (batch=", B, ", max_blocks), got ", table.scalar_type(),
              " of shape ", table.sizes());
  TORCH_CHECK(lens.scalar_type() == at::kInt && lens.dim() == 1 && lens.size(0) == B, kOp,
              ": cache_seqlens must be int32 (batch=", B, ",), got ", lens.scalar_type(),
              " of shape ", lens.sizes());
  TORCH_CHECK(kn.has_value() == vn.has_value(), kOp, ": k_new and v_new come together");
  int64_t added = 0;
  if (kn.has_value()) {
    const std::vector<int64_t> ks{B, q.size(2), Hkv, D}, vs{B, q.size(2), Hkv, vc.size(3)};
    TORCH_CHECK(
        kn->sizes() == ks && vn->sizes() == vs, kOp,
        ": k_new / v_new must be (batch, seqlen_q, kv_heads, head_dim) = ", at::IntArrayRef(ks),
        " / ", at::IntArrayRef(vs), "; got ", kn->sizes(), ", ", vn->sizes());
    check_same_dtype(kOp, "k_new", *kn, q);
    check_same_dtype(kOp, "v_new", *vn, q);
    check_same_device(kOp, "k_new", *kn, q);
    check_same_device(kOp, "v_new", *vn, q);
    added = q.size(2);
  }
  const Tensor tc = table.contiguous(), lc = lens.contiguous();
  const int32_t* tp = tc.data_ptr<int32_t>();
  const int32_t* lp = lc.data_ptr<int32_t>();
  const int64_t mb = table.size(1), nblocks = kc.size(0);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = lp[b] + added, need = (n + bs - 1) / bs;
    // (ValueError in Python, as the Python checks of the other backends raise.)
    TORCH_CHECK_VALUE(lp[b] >= 0 && need <= mb, kOp, ": sequence ", b, " has ", lp[b], " + ", added,
                      " keys, which need ", need, " blocks of ", bs, "; block_table has ", mb,
                      " per sequence (and a length must be >= 0)");
    for (int64_t i = 0; i < need; ++i)
      TORCH_CHECK_VALUE(tp[b * mb + i] >= 0 && tp[b * mb + i] < nblocks, kOp, ": block_table[", b,
                        ", ", i, "] = ", tp[b * mb + i], " is outside the cache's ", nblocks,
                        " blocks");
    longest = std::max(longest, n);
  }
  return longest;
}

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
      check_paged(q, k_cache, v_cache, block_table, cache_seqlens, k_new, v_new);
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
