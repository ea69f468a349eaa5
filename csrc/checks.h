// Named TORCH_CHECK helpers shared by every C++ entry point: each names the op and the offending
// shapes/dtypes so that a bad call fails with a message the user can act on.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace fastattn {

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating point tensor (float32, float16, bfloat16 or float64), got ",
              t.scalar_type());
}

// The data dtypes every CPU kernel takes (softmax's x, the norms' x, attention's q/k/v), math in
// fp32 (fp64 for float64). fastattn._C.build_info()["cpu_dtypes"] reports them, so that
// fastattn/dispatch.py sends any other floating dtype (float8, ...) to the reference backend.
inline constexpr at::ScalarType kCpuDataTypes[] = {at::kFloat, at::kBFloat16, at::kHalf,
                                                   at::kDouble};

inline bool is_cpu_data_type(at::ScalarType st) {
  for (const at::ScalarType t : kCpuDataTypes)
    if (st == t) return true;
  return false;
}

// `t` is floating and of a dtype the CPU kernels take.
inline void check_cpu_data(const char* op, const char* name, const at::Tensor& t) {
  check_floating(op, name, t);
  TORCH_CHECK(is_cpu_data_type(t.scalar_type()), op, ": the CPU kernels take float32, bfloat16, ",
              "float16 or float64 ", name, ", got ", t.scalar_type());
}

// The dtypes the CUDA attention kernels (dense and paged) take: tensor-core 16-bit inputs.
// fastattn._C.build_info()["cuda_attention_dtypes"] reports them to fastattn/dispatch.py.
inline constexpr at::ScalarType kCudaAttentionTypes[] = {at::kHalf, at::kBFloat16};

// q of a CUDA attention kernel has one of kCudaAttentionTypes (a TypeError otherwise).
inline void check_cuda_attention_dtype(const char* op, const at::Tensor& q) {
  bool ok = false;
  for (const at::ScalarType t : kCudaAttentionTypes) ok = ok || q.scalar_type() == t;
  TORCH_CHECK_TYPE(ok, op, ": the CUDA attention kernel takes float16 or bfloat16 q, k, v, got ",
                   q.scalar_type(), " (backend='triton' takes float32)");
}

// The CUDA kernels' inputs: `t` must live on a CUDA device.
inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name,
              " must be a CUDA tensor for the CUDA kernel, got one on ", t.device());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
              " but the input is on ", ref.device());
}

inline void check_same_shape(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& ref) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(),
              " but the input has shape ", ref.sizes());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but the input has dtype ", ref.scalar_type());
}

// A tensor that must match the input `ref` in device, shape and dtype (a residual, grad_out).
inline void check_like(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& ref) {
  check_same_device(op, name, t, ref);
  check_same_shape(op, name, t, ref);
  check_same_dtype(op, name, t, ref);
}

inline void check_min_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() >= dim, op, ": ", name, " must have at least ", dim,
              " dimension(s), got shape ", t.sizes());
}

// `mask` must broadcast to `x` (numpy rules, aligned at the trailing dims) and be bool, or a float
// mask of x's dtype or float32.
inline void check_mask(const char* op, const at::Tensor& mask, const at::Tensor& x) {
  check_same_device(op, "mask", mask, x);
  const auto st = mask.scalar_type();
  TORCH_CHECK(st == at::kBool || st == x.scalar_type() || st == at::kFloat, op,
              ": mask must be bool, float32 or the input's dtype (", x.scalar_type(), "), got ",
              st);
  TORCH_CHECK(mask.dim() <= x.dim(), op, ": mask of shape ", mask.sizes(),
              " has more dimensions than the input of shape ", x.sizes());
  for (int64_t i = 1; i <= mask.dim(); ++i) {
    const int64_t ms = mask.size(-i), xs = x.size(-i);
    TORCH_CHECK(ms == xs || ms == 1, op, ": mask of shape ", mask.sizes(),
                " is not broadcastable to the input of shape ", x.sizes());
  }
}

// A per-feature parameter (weight, bias) of a norm over the last dim of `x`: floating, on x's
// device, of shape (x.size(-1),). Any float dtype: it need not match x's.
inline void check_norm_param(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& x) {
  check_floating(op, name, t);
  check_same_device(op, name, t, x);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(-1), op, ": ", name, " must have shape (",
              x.size(-1), ",) to match the last dim of the input of shape ", x.sizes(), ", got ",
              t.sizes());
}

// Per-row statistics saved by a norm forward (mean, rstd): float32 (float64 for float64 x), on
// x's device, one value per row of x (x.numel() / x.size(-1) rows; none when the last dim is
// empty).
inline void check_row_stats(const char* op, const char* name, const at::Tensor& t,
                            const at::Tensor& x) {
  const int64_t n = x.size(-1), rows = n == 0 ? 0 : x.numel() / n;
  check_same_device(op, name, t, x);
  const at::ScalarType want = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", want, " for ", x.scalar_type(),
              " input, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == rows, op, ": ", name, " must hold one value per row (", rows,
              ") of the input of shape ", x.sizes(), ", got shape ", t.sizes());
}

// q (B, H, Sq, D), k and v (B, Hkv, Sk, D) of attention: 4-D, one floating dtype the kernels
// serve (CPU: kCpuDataTypes, float32, bfloat16, float16, float64; CUDA: float16, bfloat16), one
// device, H % Hkv == 0, 1 <= D <= 256, last dims contiguous. mask: bool, float32 or q's dtype, of
// shape (B, H, Sq, Sk) (an expanded view). rng: int64 with 2 elements when dropout_p > 0; 0 <=
// dropout_p <= 1.
inline void check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                   const std::optional<at::Tensor>& rng, double dropout_p) {
  const char* names[3] = {"q", "k", "v"};
  const at::Tensor* ts[3] = {&q, &k, &v};
  for (int t = 0; t < 3; ++t) {
    TORCH_CHECK(ts[t]->dim() == 4, op, ": ", names[t],
                " must be 4-D (batch, heads, seqlen, head_dim), got shape ", ts[t]->sizes());
    check_same_device(op, names[t], *ts[t], q);
  }
  const auto st = q.scalar_type();
  if (q.is_cuda()) {
    check_cuda_attention_dtype(op, q);
  } else {
    check_cpu_data(op, "q", q);
  }
  TORCH_CHECK(k.scalar_type() == st && v.scalar_type() == st, op,
              ": q, k, v must share one dtype, got ", st, ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(k.size(0) == v.size(0) && k.size(1) == v.size(1) && k.size(2) == v.size(2) &&
                  k.size(0) == q.size(0) && k.size(3) == q.size(3),
              op,
              ": expected k (batch, kv_heads, seqlen_k, head_dim) matching q's batch and head_dim, "
              "and v (batch, kv_heads, seqlen_k, head_dim_v); got q ",
              q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": q's heads (", q.size(1),
              ") must be a multiple of k/v's heads (", k.size(1), "); q ", q.sizes(), ", k ",
              k.sizes());
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= 256 && v.size(3) >= 1 && v.size(3) <= 256, op,
              ": head_dims must be in [1, 256], got q ", q.sizes(), ", v ", v.sizes());
  for (int t = 0; t < 3; ++t)
    TORCH_CHECK(ts[t]->stride(3) == 1 || ts[t]->size(3) <= 1, op, ": ", names[t],
                " must have a contiguous last dim (stride 1), got strides ", ts[t]->strides());
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_same_device(op, "mask", m, q);
    const auto ms = m.scalar_type();
    TORCH_CHECK(ms == at::kBool || ms == at::kFloat || ms == st, op,
                ": mask must be bool, float32 or q's dtype (", st, "), got ", ms);
    TORCH_CHECK(m.dim() == 4 && m.size(0) == q.size(0) && m.size(1) == q.size(1) &&
                    m.size(2) == q.size(2) && m.size(3) == k.size(2),
                op, ": mask must be expanded to (batch, heads, seqlen_q, seqlen_k) = (", q.size(0),
                ", ", q.size(1), ", ", q.size(2), ", ", k.size(2), "), got shape ", m.sizes());
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, op, ": dropout_p must be in [0, 1], got ",
              dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(rng.has_value(), op, ": dropout_p > 0 needs the rng seeds (int64 tensor of 2)");
    check_same_device(op, "rng", *rng, q);
    TORCH_CHECK(rng->scalar_type() == at::kLong && rng->numel() == 2, op,
                ": rng must be an int64 tensor of 2 seeds, got ", rng->scalar_type(), " of shape ",
                rng->sizes());
  }
}

// The window, softcap, sinks and ALiBi arguments of attention: window sizes >= -1 (-1:
// unbounded), softcap finite >= 0, sinks (H,) and alibi (B, H) (any strides) in the opmath dtype
// (float32; float64 for float64 q) on q's device.
inline void check_attention_variants(const char* op, const at::Tensor& q, int64_t window_left,
                                     int64_t window_right, double softcap,
                                     const std::optional<at::Tensor>& sinks,
                                     const std::optional<at::Tensor>& alibi) {
  TORCH_CHECK(window_left >= -1 && window_right >= -1, op,
              ": window sizes must be >= 0 or -1 (unbounded), got (", window_left, ", ",
              window_right, ")");
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), op,
              ": softcap must be finite and >= 0 (0: none), got ", softcap);
  const auto opm = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (sinks.has_value()) {
    check_same_device(op, "sinks", *sinks, q);
    TORCH_CHECK(sinks->scalar_type() == opm, op, ": sinks must be ", opm, " for ", q.scalar_type(),
                " q, got ", sinks->scalar_type());
    TORCH_CHECK(sinks->dim() == 1 && sinks->size(0) == q.size(1), op,
                ": sinks must have shape (heads,) = (", q.size(1), "), got ", sinks->sizes());
    TORCH_CHECK(sinks->is_contiguous(), op, ": sinks must be contiguous (the kernels index them), ",
                "got strides ", sinks->strides());
  }
  if (alibi.has_value()) {
    check_same_device(op, "alibi", *alibi, q);
    TORCH_CHECK(alibi->scalar_type() == opm, op, ": alibi slopes must be ", opm, " for ",
                q.scalar_type(), " q, got ", alibi->scalar_type());
    TORCH_CHECK(alibi->dim() == 2 && alibi->size(0) == q.size(0) && alibi->size(1) == q.size(1), op,
                ": alibi slopes must be expanded to (batch, heads) = (", q.size(0), ", ", q.size(1),
                "), got ", alibi->sizes());
  }
}

// Saved forward results and the incoming gradient of the attention backward: grad_out and out of
// shape (B, H, Sq, Dv) in q's dtype with contiguous last dims, lse (B, H, Sq) float32 (float64 for
// float64 q).
inline void check_attention_saved(const char* op, const at::Tensor& grad_out, const at::Tensor& out,
                                  const at::Tensor& lse, const at::Tensor& q, const at::Tensor& v) {
  check_same_device(op, "grad_out", grad_out, q);
  check_same_device(op, "out", out, q);
  check_same_device(op, "lse", lse, q);
  const std::vector<int64_t> want_shape{q.size(0), q.size(1), q.size(2), v.size(3)};
  TORCH_CHECK(grad_out.sizes() == want_shape && out.sizes() == want_shape, op,
              ": grad_out and out must have shape (batch, heads, seqlen_q, head_dim_v) = ",
              at::IntArrayRef(want_shape), ", got ", grad_out.sizes(), " and ", out.sizes());
  check_same_dtype(op, "grad_out", grad_out, q);
  check_same_dtype(op, "out", out, q);
  const auto want = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lse.scalar_type() == want, op, ": lse must be ", want, " for ", q.scalar_type(),
              " inputs, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2),
              op, ": lse must have shape (batch, heads, seqlen_q) = (", q.size(0), ", ", q.size(1),
              ", ", q.size(2), "), got ", lse.sizes());
}

// The inputs of fastattn::paged_attention_forward (CPU and CUDA):
// q (B, H, Sq, D) (any strides, last dim contiguous), caches (num_blocks, block_size, Hkv, D|Dv);
// block_table (B, max_blocks) and cache_seqlens (B,) int32; k_new, v_new (B, Sq, Hkv, D | Dv)
// or neither; every sequence's keys (with the new ones) fit its row of the table, and every
// block they take exists. Returns the longest sequence's key count. op: the op named in errors.
inline int64_t check_paged_inputs(const char* op, const at::Tensor& q, const at::Tensor& kc,
                                  const at::Tensor& vc, const at::Tensor& table,
                                  const at::Tensor& lens, const std::optional<at::Tensor>& kn,
                                  const std::optional<at::Tensor>& vn) {
  TORCH_CHECK(q.dim() == 4 && kc.dim() == 4 && vc.dim() == 4, op,
              ": expected q (batch, heads, seqlen_q, head_dim) and caches (num_blocks, "
              "block_size, kv_heads, head_dim); got q ",
              q.sizes(), ", k_cache ", kc.sizes(), ", v_cache ", vc.sizes());
  if (q.is_cuda()) {
    check_cuda_attention_dtype(op, q);
  } else {
    check_cpu_data(op, "q", q);
  }
  check_same_dtype(op, "k_cache", kc, q);
  check_same_dtype(op, "v_cache", vc, q);
  const at::Tensor* named[4] = {&kc, &vc, &table, &lens};
  const char* names[4] = {"k_cache", "v_cache", "block_table", "cache_seqlens"};
  for (int t = 0; t < 4; ++t) check_same_device(op, names[t], *named[t], q);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), bs = kc.size(1), Hkv = kc.size(2);
  TORCH_CHECK(kc.size(3) == D && vc.size(0) == kc.size(0) && vc.size(1) == bs && vc.size(2) == Hkv,
              op, ": k_cache must match q's head_dim and v_cache's first three dims; got q ",
              q.sizes(), ", k_cache ", kc.sizes(), ", v_cache ", vc.sizes());
  TORCH_CHECK(bs >= 16 && (bs & (bs - 1)) == 0, op,
              ": block_size must be a power of two >= 16, got ", bs);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, op, ": q's heads (", H,
              ") must be a multiple of the caches' kv_heads (", Hkv, ")");
  TORCH_CHECK(D >= 1 && D <= 256 && vc.size(3) >= 1 && vc.size(3) <= 256, op,
              ": head_dims must be in [1, 256], got q ", q.sizes(), ", v_cache ", vc.sizes());
  for (const at::Tensor* t : {&q, &kc, &vc})
    TORCH_CHECK(t->stride(3) == 1 || t->size(3) <= 1, op,
                ": q and the caches need a contiguous last dim, got strides ", t->strides());
  TORCH_CHECK(table.scalar_type() == at::kInt && table.dim() == 2 && table.size(0) == B, op,
              ": block_table must be int32 (batch=", B, ", max_blocks), got ", table.scalar_type(),
              " of shape ", table.sizes());
  TORCH_CHECK(lens.scalar_type() == at::kInt && lens.dim() == 1 && lens.size(0) == B, op,
              ": cache_seqlens must be int32 (batch=", B, ",), got ", lens.scalar_type(),
              " of shape ", lens.sizes());
  TORCH_CHECK(kn.has_value() == vn.has_value(), op, ": k_new and v_new come together");
  int64_t added = 0;
  if (kn.has_value()) {
    const std::vector<int64_t> ks{B, q.size(2), Hkv, D}, vs{B, q.size(2), Hkv, vc.size(3)};
    TORCH_CHECK(
        kn->sizes() == ks && vn->sizes() == vs, op,
        ": k_new / v_new must be (batch, seqlen_q, kv_heads, head_dim) = ", at::IntArrayRef(ks),
        " / ", at::IntArrayRef(vs), "; got ", kn->sizes(), ", ", vn->sizes());
    check_same_dtype(op, "k_new", *kn, q);
    check_same_dtype(op, "v_new", *vn, q);
    check_same_device(op, "k_new", *kn, q);
    check_same_device(op, "v_new", *vn, q);
    added = q.size(2);
  }
  // Read on the host: CUDA tensors are copied (two small blocking copies; the stream drains at
  // the first, as at the Python checks' one sync), so the op cannot be captured in a CUDA graph.
  const at::Tensor tc = table.cpu().contiguous(), lc = lens.cpu().contiguous();
  const int32_t* tp = tc.data_ptr<int32_t>();
  const int32_t* lp = lc.data_ptr<int32_t>();
  const int64_t mb = table.size(1), nblocks = kc.size(0);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = lp[b] + added, need = (n + bs - 1) / bs;
    // (ValueError in Python, as the Python checks of the other backends raise.)
    TORCH_CHECK_VALUE(lp[b] >= 0 && need <= mb, op, ": sequence ", b, " has ", lp[b], " + ", added,
                      " keys, which need ", need, " blocks of ", bs, "; block_table has ", mb,
                      " per sequence (and a length must be >= 0)");
    for (int64_t i = 0; i < need; ++i)
      TORCH_CHECK_VALUE(tp[b * mb + i] >= 0 && tp[b * mb + i] < nblocks, op, ": block_table[", b,
                        ", ", i, "] = ", tp[b * mb + i], " is outside the cache's ", nblocks,
                        " blocks");
    longest = std::max(longest, n);
  }
  return longest;
}

}  // namespace fastattn
