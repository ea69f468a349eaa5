// Launchers of the CUDA kernels of fastattn::softmax and fastattn::softmax_backward (the kernels:
// softmax_kernels.cuh; schemas: csrc/ops.cpp, semantics: fastattn/reference.py). Inputs are
// checked in softmax_host.cpp before they get here.
//
// Every row of the last dim is normalised independently; the kernel is picked by row length:
//   - short rows (up to 1024 columns for fp16/bf16, 512 for fp32/fp64; see Layout): a group of
//     1..32 lanes of a warp per row, several rows per warp for tiny rows; the row lives in
//     registers, x is read once and y written once.
//   - longer rows: a block per row. While the row's fp32 logits fit in shared memory they are
//     cached there (one read of x, one write of y); beyond that an online softmax keeps a running
//     max and sum per thread (one read pass), then a second pass recomputes the logits and writes.
//     There is no length limit.
// Loads and stores are 16-byte vectors when the row pointers and length allow, element-wise
// otherwise. Math is in fp32 (fp64 for double); reductions are warp shuffles plus one shared-memory
// step per block. Light headers only: no <torch/extension.h>, no <ATen/cuda/CUDAContext.h>.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#include "common.cuh"
#include "softmax.h"
#include "softmax_kernels.cuh"

// IEEE semantics are relied on: -0.0 marks masked entries (exp_or_masked), and inf/NaN flow through
// the reductions as in the reference.
#ifdef __USE_FAST_MATH__
#error "csrc/cuda/softmax.cu must not be built with --use_fast_math (signed zeros, inf and NaN)"
#endif

namespace fastattn::cuda {
namespace {

// The mask read in place through strides (see FwdArgs); a copy only when its leading dims cannot
// be coalesced into three (size, stride) pairs.
template <typename Acc>
at::Tensor set_mask_args(FwdArgs<Acc>& a, const at::Tensor& mask, const at::Tensor& x, int vec) {
  at::Tensor full = mask.expand(x.sizes());  // a view: stride 0 along broadcast dims
  int64_t size[3], stride[3];
  int n = 0;
  bool fits = true;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) {  // outer to inner; size-1 dims drop out
    const int64_t sz = full.size(d), st = full.stride(d);
    if (sz == 1) continue;
    if (n > 0 && stride[n - 1] == st * sz) {  // the outer dim steps exactly over this one: merge
      size[n - 1] *= sz;
      stride[n - 1] = st;
    } else if (n < 3) {
      size[n] = sz;
      stride[n++] = st;
    } else {
      fits = false;
      break;
    }
  }
  if (!fits) {
    full = full.contiguous();
    n = 1;
    size[0] = a.rows;
    stride[0] = a.cols;
  }
  int64_t s[3] = {0, 0, 0}, d[3] = {1, 1, 1};  // padded at the outer end with (1, 0)
  for (int i = 0; i < n; ++i) {
    s[3 - n + i] = stride[i];
    d[3 - n + i] = size[i];
  }
  a.s0 = s[0];
  a.s1 = s[1];
  a.s2 = s[2];
  a.d1 = d[1];
  a.d2 = d[2];
  a.sc = full.stride(-1);
  a.mask = full.const_data_ptr();
  size_t elem = 1;
  if (mask.scalar_type() == at::kBool) {
    a.mask_kind = kBoolMask;
  } else if (mask.scalar_type() == at::kFloat) {
    a.mask_kind = kFloatMask;
    elem = sizeof(float);
  } else {
    TORCH_INTERNAL_ASSERT(mask.scalar_type() == x.scalar_type());
    a.mask_kind = kInputDtypeMask;
    elem = x.element_size();
  }
  // Packs of `vec` mask values: the base and every row stride (s0, s1, s2) must keep them aligned.
  const size_t pack = std::min<size_t>(elem * vec, 16);
  a.mask_vec = a.sc == 1 && packs_fit(a.mask, a.s0, elem, pack) &&
               packs_fit(a.mask, a.s1, elem, pack) && packs_fit(a.mask, a.s2, elem, pack);
  return full;
}

template <typename scalar_t>
void launch_forward(const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& mask,
                    double scale, bool causal, bool log) {
  using L = Layout<scalar_t>;
  using Acc = typename L::Acc;
  constexpr int kVec = L::kVec;
  FwdArgs<Acc> a{};
  a.cols = x.size(-1);
  a.rows = x.numel() / a.cols;
  a.scale = static_cast<Acc>(scale);
  a.log = log;
  a.causal = causal;
  a.causal_rows = x.dim() >= 2 ? x.size(-2) : 1;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  // Row r starts at r * cols elements (contiguous x and y): packs need cols * elem % 16 == 0 too.
  a.vec = packs_fit(xp, a.cols, sizeof(scalar_t)) && packs_fit(yp, a.cols, sizeof(scalar_t));
  a.mask_kind = kNoMask;
  a.d1 = a.d2 = 1;
  at::Tensor mask_view;  // keeps a contiguous fallback copy alive until the launch
  if (mask.has_value()) mask_view = set_mask_args(a, *mask, x, kVec);

  const int device = x.get_device();
  const DeviceLimits& lim = device_limits(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const WarpLaunch w = warp_launch<scalar_t>(a.rows, a.cols, lim);
  if (w.use) {
    with_pow2<L::kMaxIters>(w.iters, [&](auto iters) {
      softmax_fwd_warp_kernel<scalar_t, kVec, decltype(iters)::value>
          <<<w.grid, kWarpKernelThreads, 0, stream>>>(xp, yp, a, w.log2_group);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  const int64_t nvec = ceil_div(a.cols, kVec);
  const int threads = block_threads(nvec);
  const int64_t cache_bytes = nvec * static_cast<int64_t>(sizeof(Pack<Acc, kVec>));
  auto* kernel = softmax_fwd_block_kernel<scalar_t, kVec>;
  // The logits are cached while they fit in what the kernel may have (opted in to once per device,
  // thread-safely: see max_dynamic_smem); longer rows take the online two-pass path.
  const bool cached = cache_bytes <= max_dynamic_smem(kernel, device);
  const int smem = cached ? static_cast<int>(cache_bytes) : 0;
  kernel<<<grid_size(a.rows, threads, lim), threads, smem, stream>>>(xp, yp, a, cached);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_backward(const at::Tensor& g, const at::Tensor& y, const at::Tensor& dx, double scale,
                     bool log) {
  using L = Layout<scalar_t>;
  using Acc = typename L::Acc;
  constexpr int kVec = L::kVec;
  BwdArgs<Acc> a{};
  a.cols = y.size(-1);
  a.rows = y.numel() / a.cols;
  a.scale = static_cast<Acc>(scale);
  a.log = log;
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  a.vec = packs_fit(gp, a.cols, sizeof(scalar_t)) && packs_fit(yp, a.cols, sizeof(scalar_t)) &&
          packs_fit(dxp, a.cols, sizeof(scalar_t));

  const DeviceLimits& lim = device_limits(static_cast<int>(y.get_device()));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const WarpLaunch w = warp_launch<scalar_t>(a.rows, a.cols, lim);
  if (w.use) {
    with_pow2<L::kMaxIters>(w.iters, [&](auto iters) {
      softmax_bwd_warp_kernel<scalar_t, kVec, decltype(iters)::value>
          <<<w.grid, kWarpKernelThreads, 0, stream>>>(gp, yp, dxp, a, w.log2_group);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  const int threads = block_threads(ceil_div(a.cols, kVec));
  softmax_bwd_block_kernel<scalar_t, kVec>
      <<<grid_size(a.rows, threads, lim), threads, 0, stream>>>(gp, yp, dxp, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor softmax_cuda(const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale,
                        bool causal, bool log) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = new_output(xc);
  if (xc.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, xc.scalar_type(), "fastattn_softmax",
      [&] { launch_forward<scalar_t>(xc, y, mask, scale, causal, log); });
  return y;
}

at::Tensor softmax_backward_cuda(const at::Tensor& grad_out, const at::Tensor& out, double scale,
                                 bool log) {
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor g = grad_out.contiguous(), y = out.contiguous();
  at::Tensor dx = new_output(y);
  if (y.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                  "fastattn_softmax_backward",
                                  [&] { launch_backward<scalar_t>(g, y, dx, scale, log); });
  return dx;
}

}  // namespace fastattn::cuda
