// The norm half of the host harness (tests/test_cuda_host_norm.py; linked into one library with
// harness.cpp): runs csrc/cuda/norm_kernels.cuh's LayerNorm / RMSNorm kernels through the host
// execution layer with the launch plan of norm.cu's launchers (fwd_plan, bwd_plan), repeating
// their argument setup. Its own translation unit: the norm and softmax headers each define
// FwdArgs and BwdArgs in an anonymous namespace.
//
// Every entry point returns 0, or 1 with the layer's error message in `err`.
#include <ATen/OpMathType.h>

#include "cuda_host.h"
// clang-format off: the layer must come before the kernels
#include "harness.h"
#include "norm_kernels.cuh"
// clang-format on

#include <limits>
#include <vector>

namespace {

using namespace fastattn::cuda;  // NOLINT: the harness drives this namespace's kernels
using cuda_host_harness::dispatch;
using cuda_host_harness::fits;
using cuda_host_harness::report;

// f(std::integral_constant<int, nv>{}) for nv in {1, 2, 4}, nv <= kMax (norm.cu: with_pow2).
template <int kMax, typename F>
void with_nv(int nv, F&& f) {
  switch (nv) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      if constexpr (kMax >= 2) return f(std::integral_constant<int, 2>{});
      break;
    case 4:
      if constexpr (kMax >= 4) return f(std::integral_constant<int, 4>{});
      break;
  }
  throw cuda_host::Error("harness: no norm kernel for nv " + std::to_string(nv));
}

struct NormIn {
  const void *x, *res, *w, *b;  // res, w, b: null when absent
  int64_t rows, n;
  bool rms;
  int sms;
};

// norm.cu's forward() and launch_forward(): path 0 warp per row, 1 block per row, 2 looped.
template <typename T, typename W, int VEC>
void launch_forward(FwdArgs<T, W> a, int sms, int* path) {
  const FwdPlan p = fwd_plan<VEC>(a.rows, a.n, sms);
  *path = p.path;
  a.warp_rows = p.path == kWarpRows;
  if (p.path == kWarpRows) {
    with_nv<kFwdNV>(p.nv, [&](auto nv) {
      cuda_host::launch(norm_fwd_reg_kernel<T, W, VEC, decltype(nv)::value>, p.grid, p.threads, 0,
                        a);
    });
  } else if (p.path == kBlockRow) {
    cuda_host::launch(norm_fwd_reg_kernel<T, W, VEC, kFwdNV>, p.grid, p.threads, 0, a);
  } else {
    cuda_host::launch(norm_fwd_loop_kernel<T, W, VEC>, p.grid, p.threads, 0, a);
  }
}

template <typename T, typename W>
void forward(const NormIn& in, void* y, void* h, void* mean, void* rstd, double eps, int* path) {
  using A = at::opmath_type<T>;
  FwdArgs<T, W> a{};
  a.x = static_cast<const T*>(in.x);
  a.res = static_cast<const T*>(in.res);
  a.w = static_cast<const W*>(in.w);
  a.b = static_cast<const W*>(in.b);
  a.y = static_cast<T*>(y);
  a.h = in.res != nullptr ? static_cast<T*>(h) : nullptr;
  a.mean = in.rms ? nullptr : static_cast<A*>(mean);
  a.rstd = static_cast<A*>(rstd);
  a.rows = in.rows;
  a.n = in.n;
  a.eps = static_cast<A>(eps);
  a.rms = in.rms;
  constexpr int kVec = 16 / sizeof(T);
  const auto rows_fit = [&](const void* p) { return fits(p, a.n, sizeof(T)); };
  const bool vec = rows_fit(a.x) && rows_fit(a.res) && rows_fit(a.y) && rows_fit(a.h) &&
                   fits(a.w, 0, 1) && fits(a.b, 0, 1);
  if (vec) {
    launch_forward<T, W, kVec>(a, in.sms, path);
  } else {
    launch_forward<T, W, 1>(a, in.sms, path);
  }
}

// norm.cu's backward() and launch_backward(), the partial buffers (NaN-filled: a partial element
// no block writes shows up in dweight) and the looped path's coefficients allocated here.
template <typename T, typename W, int VEC>
void launch_backward(BwdArgs<T, W> a, void* dw, void* db, int sms, int* path, int64_t* parts) {
  using A = at::opmath_type<T>;
  constexpr int kNV = bwd_nv<VEC>();
  const BwdPlan p = bwd_plan<VEC, A>(a.rows, a.n, sms);
  *path = p.path;
  *parts = p.parts;
  a.rows_per_block = p.rows_per_block;
  a.warp_rows = p.path == kWarpRows;
  const A nan = std::numeric_limits<A>::quiet_NaN();
  std::vector<A> dw_part(static_cast<size_t>(p.parts * a.n), nan);
  std::vector<A> db_part(db != nullptr ? dw_part.size() : 0, nan);
  std::vector<A> coef;
  a.dw_part = dw_part.data();
  a.db_part = db != nullptr ? db_part.data() : nullptr;
  const int blocks = static_cast<int>(p.parts);
  if (p.path == kWarpRows) {
    with_nv<kNV>(p.nv, [&](auto nv) {
      cuda_host::launch(norm_bwd_reg_kernel<T, W, VEC, decltype(nv)::value>, blocks, p.threads,
                        p.smem, a);
    });
  } else if (p.path == kBlockRow) {
    cuda_host::launch(norm_bwd_reg_kernel<T, W, VEC, kNV>, blocks, p.threads, 0, a);
  } else {
    coef.assign(static_cast<size_t>(a.rows * kCoefs), nan);
    a.coef = coef.data();
    cuda_host::launch(norm_bwd_coef_kernel<T, W, VEC>, p.coef_grid, kLoopThreads, 0, a);
    const dim3 grid(static_cast<unsigned>(p.parts), static_cast<unsigned>(p.tile_blocks));
    cuda_host::launch(norm_bwd_loop_kernel<T, W, VEC>, grid, kTileThreads, 0, a);
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(a.n, kSumCols)), db != nullptr ? 2 : 1);
  cuda_host::launch(norm_sum_partials_kernel<A>, grid, dim3(kSumCols, kSumRows), 0, a.dw_part,
                    a.db_part, static_cast<A*>(dw), static_cast<A*>(db), p.parts, a.n);
}

template <typename T, typename W>
void backward(const NormIn& in, const void* dy, const void* dh, const void* mean, const void* rstd,
              void* dx, void* dw, void* db, int* path, int64_t* parts) {
  using A = at::opmath_type<T>;
  BwdArgs<T, W> a{};
  a.dy = static_cast<const T*>(dy);
  a.dh = static_cast<const T*>(dh);
  a.x = static_cast<const T*>(in.x);
  a.w = static_cast<const W*>(in.w);
  a.mean = in.rms ? nullptr : static_cast<const A*>(mean);
  a.rstd = static_cast<const A*>(rstd);
  a.dx = static_cast<T*>(dx);
  a.rows = in.rows;
  a.n = in.n;
  a.rms = in.rms;
  constexpr int kVec = 16 / sizeof(T);
  const auto rows_fit = [&](const void* p) { return fits(p, a.n, sizeof(T)); };
  const bool vec =
      rows_fit(a.dy) && rows_fit(a.dh) && rows_fit(a.x) && rows_fit(a.dx) && fits(a.w, 0, 1);
  if (vec) {
    launch_backward<T, W, kVec>(a, dw, db, in.sms, path, parts);
  } else {
    launch_backward<T, W, 1>(a, dw, db, in.sms, path, parts);
  }
}

}  // namespace

extern "C" {

// LayerNorm (rms 0) or RMSNorm (rms 1) forward of (rows, n) x (+ residual). native_params: weight
// and bias have x's dtype (else its math type, as norm.cu's param_dtype converts them). mean and
// rstd: (rows,) in the math type (mean unused for RMSNorm).
int fa_norm_forward(int dtype, int native_params, const void* x, const void* res, const void* w,
                    const void* b, void* y, void* h, void* mean, void* rstd, int64_t rows,
                    int64_t n, double eps, int rms, int sm_count, int* path, char* err,
                    int errlen) {
  try {
    const NormIn in{x, res, w, b, rows, n, rms != 0, sm_count};
    return dispatch(dtype, [&](auto t) {
      using T = decltype(t);
      if (native_params != 0) {
        forward<T, T>(in, y, h, mean, rstd, eps, path);
      } else {
        forward<T, at::opmath_type<T>>(in, y, h, mean, rstd, eps, path);
      }
    });
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}

// The backward of the above: x is the normalised input (h with a residual), dh the gradient of
// residual_out (or null), db null without bias. dw, db: (n,) in the math type. parts: the
// partial rows of dweight/dbias the plan used.
int fa_norm_backward(int dtype, int native_params, const void* dy, const void* dh, const void* x,
                     const void* w, const void* mean, const void* rstd, void* dx, void* dw,
                     void* db, int64_t rows, int64_t n, int rms, int sm_count, int* path,
                     int64_t* parts, char* err, int errlen) {
  try {
    const NormIn in{x, nullptr, w, nullptr, rows, n, rms != 0, sm_count};
    return dispatch(dtype, [&](auto t) {
      using T = decltype(t);
      if (native_params != 0) {
        backward<T, T>(in, dy, dh, mean, rstd, dx, dw, db, path, parts);
      } else {
        backward<T, at::opmath_type<T>>(in, dy, dh, mean, rstd, dx, dw, db, path, parts);
      }
    });
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}

}  // extern "C"
