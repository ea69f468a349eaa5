// Launcher of the CUDA attention forward (the kernels and their launch plan:
// attention_kernels.cuh; schema: csrc/ops.cpp). Inputs are checked in attention_host.cpp.
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

template <typename scalar_t, bool kBf16>
void launch(AttnParams& p, const AttnPlan& plan, int device, cudaStream_t stream) {
  with_attention_kernel<scalar_t, kBf16>(plan.tier, [&](auto kernel) {
    const int limit = max_dynamic_smem(kernel, device);
    TORCH_CHECK(plan.smem <= static_cast<size_t>(limit), "fastattn::attention: head_dim tier ",
                plan.tier, " needs ", plan.smem, " bytes of shared memory per block; device ",
                device, " allows ", limit);
    kernel<<<plan.grid, kAttnThreads, plan.smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (plan.combine_blocks > 0) {
    attention_combine_kernel<scalar_t>
        <<<static_cast<unsigned>(plan.combine_blocks), kCombineThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& rng, double scale,
    bool causal, int64_t causal_offset, double dropout_p, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& alibi) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2), Dv = v.size(3);
  at::Tensor out = new_output({B, H, Sq, Dv}, q.options());
  at::Tensor lse = new_output({B, H, Sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(B * H <= kMax && Sq <= kMax && Sk <= kMax, "fastattn::attention: batch * heads (",
              B * H, "), seqlen_q (", Sq, ") and seqlen_k (", Sk, ") must each be < 2**31");

  AttnParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_ss = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_ss = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_ss = v.stride(2);
  p.o_sb = out.stride(0), p.o_sh = out.stride(1), p.o_ss = out.stride(2);
  p.B = static_cast<int>(B), p.H = static_cast<int>(H), p.Hkv = static_cast<int>(Hkv);
  p.Sq = static_cast<int>(Sq), p.Sk = static_cast<int>(Sk);
  p.d = static_cast<int>(D), p.dv = static_cast<int>(Dv);
  p.group = static_cast<int>(H / Hkv);
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.causal = causal;
  p.causal_offset = causal_offset;
  p.window_left = window_left;
  p.window_right = window_right;
  if (sinks.has_value()) p.sinks = sinks->data_ptr<float>();
  if (alibi.has_value()) {
    p.alibi = alibi->data_ptr<float>();
    p.al_sb = alibi->stride(0), p.al_sh = alibi->stride(1);
  }
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
    p.drop_scale = dropout_p < 1.0 ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 0.f;
  }
  p.aligned = attention_rows_aligned(p, 2);

  const int device = static_cast<int>(q.get_device());
  const AttnPlan plan = attention_plan(p, device_limits(device).sm_count);
  TORCH_CHECK(plan.grid.y <= kMaxGridY, "fastattn::attention: seqlen_q ", Sq,
              " needs more than 65535 query tiles");
  at::Tensor out_part, lse_part;
  if (p.splits > 1) {
    out_part = at::empty({p.splits, B, H, Sq, Dv}, q.options().dtype(at::kFloat));
    lse_part = at::empty({p.splits, B, H, Sq}, q.options().dtype(at::kFloat));
    p.out_part = out_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kBFloat16)
    launch<c10::BFloat16, true>(p, plan, device, stream);
  else
    launch<c10::Half, false>(p, plan, device, stream);
  return {out, lse};
}

}  // namespace fastattn::cuda
