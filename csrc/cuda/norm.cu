// Launchers of the CUDA kernels of fastattn::norm and fastattn::norm_backward: LayerNorm / RMSNorm
// over the last dim, optionally of h = x + residual (the kernels and their launch plan:
// norm_kernels.cuh; schemas: csrc/ops.cpp; semantics: fastattn/ops/norm.py and
// fastattn/reference.py::norm). Inputs are checked in norm_host.cpp before they get here.
//
// Register kernels (a warp or a block per row, the row in registers) for rows that fit, looped
// kernels beyond (no length limit); the backward's dweight/dbias are per-block partial rows added
// in a fixed order by a second kernel, so repeated calls agree bitwise (see norm_kernels.cuh).
//
// Light headers only: no <torch/extension.h>, no <ATen/cuda/CUDAContext.h>.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common.cuh"
#include "norm.h"
#include "norm_kernels.cuh"

namespace fastattn::cuda {
namespace {

// -------------------------------------------------------------------------------- host side

// The math type of data of type st (at::opmath_type's): float32, float64 for float64 data.
at::ScalarType math_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// weight/bias are read as x's dtype when both (where given) have it, else as x's opmath type
// (converted here; small (n,) tensors): two kernel variants per input dtype, not one per pair.
at::ScalarType param_dtype(at::ScalarType st, const std::optional<at::Tensor>& w,
                           const std::optional<at::Tensor>& b) {
  const bool native =
      (!w.has_value() || w->scalar_type() == st) && (!b.has_value() || b->scalar_type() == st);
  return native ? st : (st == at::kDouble ? at::kDouble : at::kFloat);
}

at::Tensor as_param(const std::optional<at::Tensor>& t, at::ScalarType st) {
  return t.has_value() ? t->to(st).contiguous() : at::Tensor();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T, typename W, int VEC>
void launch_forward(FwdArgs<T, W> a, int sms, cudaStream_t stream) {
  const FwdPlan p = fwd_plan<VEC>(a.rows, a.n, sms);
  a.warp_rows = p.path == kWarpRows;
  if (p.path == kWarpRows) {
    with_pow2<kFwdNV>(p.nv, [&](auto nv) {
      norm_fwd_reg_kernel<T, W, VEC, decltype(nv)::value><<<p.grid, p.threads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else if (p.path == kBlockRow) {
    norm_fwd_reg_kernel<T, W, VEC, kFwdNV><<<p.grid, p.threads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    norm_fwd_loop_kernel<T, W, VEC><<<p.grid, p.threads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, typename W>
void forward(const at::Tensor& x, const at::Tensor& r, const at::Tensor& w, const at::Tensor& b,
             const at::Tensor& y, const at::Tensor& h, const at::Tensor& mean,
             const at::Tensor& rstd, double eps, bool rms) {
  FwdArgs<T, W> a{};
  a.x = x.const_data_ptr<T>();
  a.res = ptr_or_null<T>(r);
  a.w = ptr_or_null<W>(w);
  a.b = ptr_or_null<W>(b);
  a.y = y.mutable_data_ptr<T>();
  a.h = r.defined() ? h.mutable_data_ptr<T>() : nullptr;
  a.mean = rms ? nullptr : mean.mutable_data_ptr<at::opmath_type<T>>();
  a.rstd = rstd.mutable_data_ptr<at::opmath_type<T>>();
  a.n = x.size(-1);
  a.rows = x.numel() / a.n;
  a.eps = static_cast<at::opmath_type<T>>(eps);
  a.rms = rms;
  constexpr int kVec = 16 / sizeof(T);
  // Rows are n elements apart in x, residual, y and h (contiguous): packs need aligned bases and
  // n * sizeof(T) % 16 == 0; weight and bias are one row each. Absent (null) pointers fit.
  const auto rows_fit = [&](const T* p) { return packs_fit(p, a.n, sizeof(T)); };
  const bool vec = rows_fit(a.x) && rows_fit(a.res) && rows_fit(a.y) && rows_fit(a.h) &&
                   is_aligned(a.w, 16) && is_aligned(a.b, 16);
  const int sms = device_limits(x.get_device()).sm_count;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vec) {
    launch_forward<T, W, kVec>(a, sms, stream);
  } else {
    launch_forward<T, W, 1>(a, sms, stream);
  }
}

template <typename T, typename W, int VEC>
void launch_backward(BwdArgs<T, W> a, const at::Tensor& dw, const at::Tensor& db, int sms,
                     cudaStream_t stream) {
  using A = at::opmath_type<T>;
  constexpr int kNV = bwd_nv<VEC>();
  const BwdPlan p = bwd_plan<VEC, A>(a.rows, a.n, sms);
  const bool has_bias = db.numel() > 0;
  a.rows_per_block = p.rows_per_block;
  a.warp_rows = p.path == kWarpRows;
  const auto acc_opts = dw.options().dtype(c10::CppTypeToScalarType<A>::value);
  const at::Tensor dw_part = at::empty({p.parts, a.n}, acc_opts);
  const at::Tensor db_part = has_bias ? at::empty({p.parts, a.n}, acc_opts) : at::Tensor();
  a.dw_part = dw_part.mutable_data_ptr<A>();
  a.db_part = has_bias ? db_part.mutable_data_ptr<A>() : nullptr;
  at::Tensor coef;  // looped path only; lives until the launches are queued (stream-ordered reuse)
  const int parts = static_cast<int>(p.parts);
  if (p.path == kWarpRows) {
    with_pow2<kNV>(p.nv, [&](auto nv) {
      norm_bwd_reg_kernel<T, W, VEC, decltype(nv)::value><<<parts, p.threads, p.smem, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else if (p.path == kBlockRow) {
    norm_bwd_reg_kernel<T, W, VEC, kNV><<<parts, p.threads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    coef = at::empty({a.rows, kCoefs}, acc_opts);
    a.coef = coef.mutable_data_ptr<A>();
    norm_bwd_coef_kernel<T, W, VEC><<<p.coef_grid, kLoopThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned>(p.parts), static_cast<unsigned>(p.tile_blocks));
    norm_bwd_loop_kernel<T, W, VEC><<<grid, kTileThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t col_blocks = ceil_div(a.n, kSumCols);
  TORCH_CHECK(col_blocks <= std::numeric_limits<int>::max(), "fastattn::norm_backward: rows of ",
              a.n, " elements are too long");
  const dim3 grid(static_cast<unsigned>(col_blocks), has_bias ? 2 : 1);
  norm_sum_partials_kernel<A><<<grid, dim3(kSumCols, kSumRows), 0, stream>>>(
      a.dw_part, a.db_part, dw.mutable_data_ptr<A>(), has_bias ? db.mutable_data_ptr<A>() : nullptr,
      p.parts, a.n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename W>
void backward(const at::Tensor& dy, const at::Tensor& dh, const at::Tensor& x, const at::Tensor& w,
              const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& dx,
              const at::Tensor& dw, const at::Tensor& db, bool rms) {
  BwdArgs<T, W> a{};
  a.dy = dy.const_data_ptr<T>();
  a.dh = ptr_or_null<T>(dh);
  a.x = x.const_data_ptr<T>();
  a.w = ptr_or_null<W>(w);
  a.mean = rms ? nullptr : mean.const_data_ptr<at::opmath_type<T>>();
  a.rstd = rstd.const_data_ptr<at::opmath_type<T>>();
  a.dx = dx.mutable_data_ptr<T>();
  a.n = x.size(-1);
  a.rows = x.numel() / a.n;
  a.rms = rms;
  constexpr int kVec = 16 / sizeof(T);
  const auto rows_fit = [&](const T* p) { return packs_fit(p, a.n, sizeof(T)); };
  const bool vec = rows_fit(a.dy) && rows_fit(a.dh) && rows_fit(a.x) && rows_fit(a.dx) &&
                   is_aligned(a.w, 16);  // as in forward()
  const int sms = device_limits(x.get_device()).sm_count;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vec) {
    launch_backward<T, W, kVec>(a, dw, db, sms, stream);
  } else {
    launch_backward<T, W, 1>(a, dw, db, sms, stream);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_forward_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool rms) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(-1);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  const auto mt = x.options().dtype(math_type(x.scalar_type()));  // statistics: the math type
  at::Tensor y = new_output(x);
  at::Tensor h = residual.has_value() ? new_output(x) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({rms ? 0 : rows}, mt);
  at::Tensor rstd = at::empty({rows}, mt);
  if (rows == 0) return {y, h, mean, rstd};
  const at::Tensor r = residual.has_value() ? residual->contiguous() : at::Tensor();
  const at::ScalarType st = x.scalar_type(), pt = param_dtype(st, weight, bias);
  const at::Tensor w = as_param(weight, pt), b = as_param(bias, pt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "fastattn_norm", [&] {
    if (pt == st) {
      forward<scalar_t, scalar_t>(x, r, w, b, y, h, mean, rstd, eps, rms);
    } else {
      forward<scalar_t, at::opmath_type<scalar_t>>(x, r, w, b, y, h, mean, rstd, eps, rms);
    }
  });
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& rstd, bool rms, bool has_bias) {
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const int64_t n = x.size(-1);
  const int64_t rows = n == 0 ? 0 : x.numel() / n;
  const auto mt = x.options().dtype(math_type(x.scalar_type()));  // dweight/dbias: the math type
  at::Tensor dx = new_output(x);
  if (rows == 0) {  // no rows: zero weight/bias gradients, nothing to launch
    return {dx, at::zeros({n}, mt), has_bias ? at::zeros({n}, mt) : at::empty({0}, mt)};
  }
  at::Tensor dw = at::empty({n}, mt);
  at::Tensor db = at::empty({has_bias ? n : 0}, mt);
  const at::Tensor dy = grad_out.contiguous();
  const at::Tensor dh =
      grad_residual_out.has_value() ? grad_residual_out->contiguous() : at::Tensor();
  const at::ScalarType st = x.scalar_type(), pt = param_dtype(st, weight, std::nullopt);
  const at::Tensor w = as_param(weight, pt);
  const at::Tensor m = rms ? at::Tensor() : mean.contiguous();
  const at::Tensor s = rstd.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "fastattn_norm_backward", [&] {
    if (pt == st) {
      backward<scalar_t, scalar_t>(dy, dh, x, w, m, s, dx, dw, db, rms);
    } else {
      backward<scalar_t, at::opmath_type<scalar_t>>(dy, dh, x, w, m, s, dx, dw, db, rms);
    }
  });
  return {dx, dw, db};
}

}  // namespace fastattn::cuda
