// Named TORCH_CHECK helpers shared by every C++ entry point: each names the op and the offending
// shapes/dtypes so that a bad call fails with a message the user can act on.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastattn {

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating point tensor (float32, float16, bfloat16 or float64), got ",
              t.scalar_type());
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

// Per-row statistics saved by a norm forward (mean, rstd): float32, on x's device, one value per
// row of x (x.numel() / x.size(-1) rows; none when the last dim is empty).
inline void check_row_stats(const char* op, const char* name, const at::Tensor& t,
                            const at::Tensor& x) {
  const int64_t n = x.size(-1), rows = n == 0 ? 0 : x.numel() / n;
  check_same_device(op, name, t, x);
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.numel() == rows, op, ": ", name, " must hold one value per row (", rows,
              ") of the input of shape ", x.sizes(), ", got shape ", t.sizes());
}

}  // namespace fastattn
