// Launchers of the CUDA attention forward, dense (fastattn::attention) and against a paged KV
// cache (fastattn::paged_attention_forward, with its in-place append): the kernels and their
// launch plan are in attention_kernels.cuh, the schemas in csrc/ops.cpp.
// Inputs are checked in attention_host.cpp and paged_host.cpp. Both ops launch from this one
// translation unit so that nvcc compiles the forward kernels' instantiations once.
//
// float16 / bfloat16 only (tensor cores); head dims up to 256 in three compiled tiers (64, 128,
// 256; q/k and v zero-padded to the tier of the larger). The forward kernel runs once; when the
// plan splits the keys (a grid smaller than the GPU: decode), the combine kernel merges the
// partials. Light headers only: no <torch/extension.h>, no <ATen/cuda/CUDAContext.h>.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../dropout.h"
#include "attention.h"
#include "attention_kernels.cuh"
#include "common.cuh"

// IEEE semantics are relied on: -inf marks hidden keys and empty rows.
#ifdef __USE_FAST_MATH__
#error "csrc/cuda/attention.cu must not be built with --use_fast_math (inf and NaN)"
#endif

namespace fastattn::cuda {
namespace {

using OptTensor = std::optional<at::Tensor>;

// The plan's shared memory within what the device lets the tier's forward kernel opt into.
template <typename scalar_t, bool kBf16>
void check_smem(const char* op, const AttnPlan& plan, int device) {
  with_attention_kernel<scalar_t, kBf16>(plan.tier, [&](auto kernel) {
    const int limit = max_dynamic_smem(kernel, device);
    TORCH_CHECK(plan.smem <= static_cast<size_t>(limit), op, ": head_dim tier ", plan.tier,
                " needs ", plan.smem, " bytes of shared memory per block; device ", device,
                " allows ", limit);
  });
}

template <typename scalar_t, bool kBf16>
void launch(const AttnParams& p, const AttnPlan& plan, cudaStream_t stream) {
  with_attention_kernel<scalar_t, kBf16>(plan.tier, [&](auto kernel) {
    kernel<<<plan.grid, kAttnThreads, plan.smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (plan.combine_blocks > 0) {
    attention_combine_kernel<scalar_t>
        <<<static_cast<unsigned>(plan.combine_blocks), kCombineThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// p's sizes (B, H, Hkv, Sq, Sk, D, Dv; each checked < 2**31).
void set_shape(AttnParams& p, int64_t B, int64_t H, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D,
               int64_t Dv) {
  p.B = static_cast<int>(B), p.H = static_cast<int>(H), p.Hkv = static_cast<int>(Hkv);
  p.Sq = static_cast<int>(Sq), p.Sk = static_cast<int>(Sk);
  p.d = static_cast<int>(D), p.dv = static_cast<int>(Dv);
}

// p's pointers and strides of q (B, H, Sq, D), k and v (B | blocks, Hkv, Sk | page, D | Dv),
// out (B, H, Sq, Dv) (any views: strides as they are) and the contiguous lse (B, H, Sq).
void set_io(AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const at::Tensor& out, const at::Tensor& lse) {
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.out = out.data_ptr(), p.lse = lse.data_ptr<float>();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_ss = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_ss = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_ss = v.stride(2);
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_ss = out.stride(2);
}

// p's scaling and variant fields (after set_shape).
void set_variants(AttnParams& p, double scale, bool causal, int64_t window_left,
                  int64_t window_right, double softcap, const OptTensor& sinks,
                  const OptTensor& alibi) {
  p.group = p.H / p.Hkv;
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.causal = causal;
  p.window_left = window_left;
  p.window_right = window_right;
  if (sinks.has_value()) p.sinks = sinks->data_ptr<float>();
  if (alibi.has_value()) {
    p.alibi = alibi->data_ptr<float>();
    p.al_sb = alibi->stride(0), p.al_sh = alibi->stride(1);
  }
}

// The launch plan of p, refused (before anything is allocated) past the grid's y limit.
AttnPlan plan_for(const char* op, AttnParams& p, int device) {
  const AttnPlan plan = attention_plan(p, device_limits(device).sm_count);
  TORCH_CHECK(plan.grid.y <= kMaxGridY, op, ": seqlen_q ", p.Sq,
              " needs more than 65535 query tiles");
  return plan;
}

// The split-KV partials of a launch (empty without splits), held until it is queued.
struct Partials {
  at::Tensor out, lse;
};

// q, k, v and out pointers and strides set: the alignment choice, the split-KV partials and the
// shared-memory check, i.e. everything of a launch that allocates or can refuse.
Partials prepare(const char* op, AttnParams& p, const AttnPlan& plan, const at::Tensor& q) {
  p.aligned = attention_rows_aligned(p, 2);
  const int device = static_cast<int>(q.get_device());
  if (q.scalar_type() == at::kBFloat16)
    check_smem<c10::BFloat16, true>(op, plan, device);
  else
    check_smem<c10::Half, false>(op, plan, device);
  Partials part;
  if (p.splits > 1) {
    part.out = at::empty({p.splits, p.B, p.H, p.Sq, p.dv}, q.options().dtype(at::kFloat));
    part.lse = at::empty({p.splits, p.B, p.H, p.Sq}, q.options().dtype(at::kFloat));
    p.out_part = part.out.data_ptr<float>();
    p.lse_part = part.lse.data_ptr<float>();
  }
  return part;
}

// The forward (and combine) launch on q's dtype, on the current stream.
void run(const AttnParams& p, const AttnPlan& plan, const at::Tensor& q) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kBFloat16)
    launch<c10::BFloat16, true>(p, plan, stream);
  else
    launch<c10::Half, false>(p, plan, stream);
}

void check_sizes(const char* op, int64_t B, int64_t H, int64_t Sq, int64_t Sk) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(B * H <= kMax && Sq <= kMax && Sk <= kMax, op, ": batch * heads (", B * H,
              "), seqlen_q (", Sq, ") and seqlen_k (", Sk, ") must each be < 2**31");
}

// nw (B, S, Hkv, d) -> cache at each sequence's positions lens[b] .. (paged_append_kernel).
void append(const at::Tensor& cache, const at::Tensor& table, const at::Tensor& lens,
            const at::Tensor& new_rows, cudaStream_t stream) {
  if (new_rows.numel() == 0) return;  // (batch 0: no grid to launch)
  // (the kernel copies rows of the last dim: any other layout of the new tokens is made so)
  const at::Tensor nw = new_rows.stride(3) == 1 ? new_rows : new_rows.contiguous();
  PagedAppendParams a;
  a.src = static_cast<const uint16_t*>(nw.data_ptr());
  a.cache = static_cast<uint16_t*>(cache.data_ptr());
  a.table = table.data_ptr<int32_t>();
  a.lens = lens.data_ptr<int32_t>();
  a.s_sb = nw.stride(0), a.s_ss = nw.stride(1), a.s_sh = nw.stride(2);
  a.c_sb = cache.stride(0), a.c_ss = cache.stride(1), a.c_sh = cache.stride(2);
  a.bt_stride = table.stride(0);
  a.B = static_cast<int>(nw.size(0)), a.S = static_cast<int>(nw.size(1));
  a.Hkv = static_cast<int>(nw.size(2)), a.d = static_cast<int>(nw.size(3));
  a.page = static_cast<int>(cache.size(1));
  // One block per row up to the grid's reach (the kernel strides over the rest).
  const int64_t blocks = std::min<int64_t>(nw.size(0) * nw.size(1) * nw.size(2), 65535);
  paged_append_kernel<<<static_cast<unsigned>(blocks), kAppendThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void append_both(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& table,
                 const at::Tensor& lens, const at::Tensor& k_new, const at::Tensor& v_new) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  append(k_cache, table, lens, k_new, stream);
  append(v_cache, table, lens, v_new, stream);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, const OptTensor& mask,
                                                  const OptTensor& rng, double scale, bool causal,
                                                  int64_t causal_offset, double dropout_p,
                                                  int64_t window_left, int64_t window_right,
                                                  double softcap, const OptTensor& sinks,
                                                  const OptTensor& alibi) {
  const c10::cuda::CUDAGuard guard(q.device());
  constexpr const char* op = "fastattn::attention";
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), Sk = k.size(2), Dv = v.size(3);
  if (B * H * Sq * Dv == 0)
    return {new_output({B, H, Sq, Dv}, q.options()),
            new_output({B, H, Sq}, q.options().dtype(at::kFloat))};
  check_sizes(op, B, H, Sq, Sk);

  AttnParams p;
  set_shape(p, B, H, k.size(1), Sq, Sk, q.size(3), Dv);
  set_variants(p, scale, causal, window_left, window_right, softcap, sinks, alibi);
  p.causal_offset = causal_offset;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    p.mask = m.data_ptr();
    p.mask_kind = m.scalar_type() == at::kBool    ? kAttnBoolMask
                  : m.scalar_type() == at::kFloat ? kAttnF32Mask
                                                  : kAttnSameMask;
    p.m_sb = m.stride(0), p.m_sh = m.stride(1), p.m_sq = m.stride(2), p.m_sk = m.stride(3);
  }
  if (dropout_p > 0.0) {  // fastattn.reference.dropout_keep's hash and threshold
    p.rng = rng->data_ptr<int64_t>();
    p.drop_threshold = dropout_threshold(dropout_p);
    p.drop_scale = static_cast<float>(dropout_scale(dropout_p));
  }
  const AttnPlan plan = plan_for(op, p, static_cast<int>(q.get_device()));

  at::Tensor out = new_output({B, H, Sq, Dv}, q.options());
  at::Tensor lse = new_output({B, H, Sq}, q.options().dtype(at::kFloat));
  set_io(p, q, k, v, out, lse);
  const Partials part = prepare(op, p, plan, q);
  run(p, plan, q);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> paged_attention_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_table, const at::Tensor& cache_seqlens, const OptTensor& k_new,
    const OptTensor& v_new, int64_t longest, double scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, const OptTensor& sinks, const OptTensor& alibi) {
  const c10::cuda::CUDAGuard guard(q.device());
  constexpr const char* op = "fastattn::paged_attention_forward";
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), Dv = v_cache.size(3);
  const at::Tensor table = block_table.contiguous(), lens = cache_seqlens.contiguous();
  check_sizes(op, B, H, Sq, longest);
  const bool append_new = k_new.has_value() && Sq > 0;
  // Seq-major, as the caller's q (batch, seqlen_q, heads, head_dim) and FlashAttention's output.
  if (B * H * Sq * Dv == 0) {
    if (append_new) append_both(k_cache, v_cache, table, lens, *k_new, *v_new);
    return {new_output({B, Sq, H, Dv}, q.options()),
            new_output({B, H, Sq}, q.options().dtype(at::kFloat))};
  }

  AttnParams p;
  set_shape(p, B, H, k_cache.size(2), Sq, longest, q.size(3), Dv);
  set_variants(p, scale, causal, window_left, window_right, softcap, sinks, alibi);
  p.block_table = table.data_ptr<int32_t>();
  p.bt_stride = table.stride(0);
  p.seqlen_k = lens.data_ptr<int32_t>();
  p.seqlen_added = k_new.has_value() ? static_cast<int>(Sq) : 0;
  p.page = static_cast<int>(k_cache.size(1));
  const AttnPlan plan = plan_for(op, p, static_cast<int>(q.get_device()));

  at::Tensor out = new_output({B, Sq, H, Dv}, q.options());
  at::Tensor lse = new_output({B, H, Sq}, q.options().dtype(at::kFloat));
  // The caches (num_blocks, page, Hkv, D) as (num_blocks, Hkv, page, D): a block, a head, a row
  // of the block; out (B, Sq, H, Dv) as (B, H, Sq, Dv).
  set_io(p, q, k_cache.transpose(1, 2), v_cache.transpose(1, 2), out.transpose(1, 2), lse);
  const Partials part = prepare(op, p, plan, q);
  // Everything that allocates or can refuse is done: append, then attend (one stream: in order).
  if (append_new) append_both(k_cache, v_cache, table, lens, *k_new, *v_new);
  run(p, plan, q);
  return {out, lse};
}

}  // namespace fastattn::cuda
