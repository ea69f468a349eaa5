// CPU kernels of fastattn::softmax and fastattn::softmax_backward (schemas in csrc/ops.cpp).
// This file is the torch-facing half: input checks, output allocation, the mask's strides,
// picking the kernel table for the dtype and the CPU's ISA, and OpenMP over rows. The kernels
// themselves (one template per direction, instantiated per ISA) are in csrc/cpu/.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <optional>
#include <vector>

#include "checks.h"
#include "cpu/softmax_kernels.h"
#include "cpu_dispatch.h"
#include "output_pool.h"

namespace fastattn {
namespace {

using cpu::DType;
using cpu::RowStats;
using cpu::SoftmaxKernels;

constexpr const char* kFwd = "fastattn::softmax";
constexpr const char* kBwd = "fastattn::softmax_backward";

// The kernel table of the best ISA path in use; float64 always takes the scalar (fp64 math) path.
SoftmaxKernels kernels_for(const char* op, DType x, DType mask, bool per_column) {
  static constexpr SoftmaxKernels (*kGet[])(DType, DType, bool) = {
      cpu::softmax_kernels_scalar, cpu::softmax_kernels_avx2, cpu::softmax_kernels_avx512,
      cpu::softmax_kernels_avx512bf16};
  const auto serves = [](const SoftmaxKernels& t) { return t.fwd_rows != nullptr; };
  const SoftmaxKernels k = best_kernels(kGet, x == DType::kFloat64, serves, x, mask, per_column);
  TORCH_CHECK(k.fwd_rows != nullptr, op, ": no CPU kernel for this input/mask dtype pair");
  return k;
}

constexpr int64_t kSerialBelow = 16384;   // elements: smaller inputs are not worth a thread team
constexpr int64_t kBlockElems = 32768;    // causal rows go to threads in blocks of >= this
constexpr int64_t kSplitRowMin = 131072;  // split a row across threads when rows < threads
// Outputs at least this large (half the L3 here) are written with non-temporal stores, see
// cpu::SoftmaxFwdArgs. FASTATTN_CPU_STREAM_BYTES overrides it (tuning and tests; 0: always).
int64_t stream_min_bytes() {
  static const int64_t v = [] {
    const char* e = std::getenv("FASTATTN_CPU_STREAM_BYTES");
    return e ? std::atoll(e) : int64_t(16) << 20;
  }();
  return v;
}

// A 64-byte aligned per-thread scratch of cpu::kScratchBytes, allocated once per thread (the
// OpenMP pool threads persist, so this is not paid per call).
void* thread_scratch() {
  static thread_local std::unique_ptr<char[]> buf;
  if (!buf) buf.reset(new char[cpu::kScratchBytes + 64]);
  const auto p = reinterpret_cast<uintptr_t>(buf.get());
  return reinterpret_cast<void*>((p + 63) & ~uintptr_t(63));
}

// Describes how row r of x finds its mask data, without materialising the broadcast: the outer
// dims of x, with the mask's stride for each (0 where the mask has size 1 or lacks the dim),
// coalesced and stripped of size-1 dims. Returns the mask tensor actually read (kept alive by
// the caller), which differs from `mask` only in rare layouts.
at::Tensor setup_mask(cpu::SoftmaxFwdArgs& a, at::Tensor mask, const at::Tensor& x) {
  const int64_t nd = x.dim(), off = nd - mask.dim();
  auto aligned_strides = [&](const at::Tensor& m) {
    std::vector<int64_t> st(nd, 0);
    for (int64_t d = 0; d < m.dim(); ++d) st[off + d] = m.size(d) == 1 ? 0 : m.stride(d);
    return st;
  };
  std::vector<int64_t> st = aligned_strides(mask);
  if (st[nd - 1] != 0 && st[nd - 1] != 1) {
    // Strided last dim: copy the mask's own (un-broadcast) data into a contiguous tensor.
    std::vector<int64_t> sizes(mask.sizes().begin(), mask.sizes().end());
    for (int64_t d = 0; d < mask.dim(); ++d)
      if (mask.stride(d) == 0) sizes[d] = 1;
    mask = mask.as_strided(sizes, mask.strides(), mask.storage_offset()).contiguous();
    st = aligned_strides(mask);
  }
  // Coalesce the outer dims, innermost first: dim d folds into the next one when its stride is
  // that dim's stride times its size (this includes runs of broadcast dims with stride 0).
  std::vector<int64_t> sizes, strides;  // innermost first
  for (int64_t d = nd - 2; d >= 0; --d) {
    if (x.size(d) == 1) continue;
    if (!sizes.empty() && st[d] == strides.back() * sizes.back()) {
      sizes.back() *= x.size(d);  // the merged dim keeps the inner stride
    } else {
      sizes.push_back(x.size(d));
      strides.push_back(st[d]);
    }
  }
  if (sizes.size() > size_t(cpu::kMaxMaskDims)) {  // pathological rank: read a full-size copy
    return setup_mask(a, mask.expand(x.sizes()).contiguous(), x);
  }
  a.mask = mask.data_ptr();
  a.mask_dtype = dtype_of(kFwd, mask.scalar_type());
  a.mask_per_column = st[nd - 1] == 1;
  a.mask_ndim = static_cast<int>(sizes.size());
  for (size_t k = 0; k < sizes.size(); ++k) {  // outermost first for the kernels
    a.mask_sizes[k] = sizes[sizes.size() - 1 - k];
    a.mask_strides[k] = strides[strides.size() - 1 - k];
  }
  return mask;
}

// Runs body(r0, r1) over the rows on the OpenMP team. Rows of equal cost: one contiguous range
// per thread, so each thread streams through memory and prefetches row after row. Causal rows
// differ in cost: blocks of >= kBlockElems elements, dynamically scheduled. Small inputs stay on
// the calling thread.
// Every call of body runs with subnormals flushed (FlushDenormals: exp of masked entries).
template <class Body>
void for_rows(int64_t rows, int64_t cols, bool balanced, const Body& body) {
  const int64_t per = std::max<int64_t>(1, kBlockElems / std::max<int64_t>(cols, 1));
  const int64_t blocks = (rows + per - 1) / per;
  if (blocks <= 1 || rows * cols < kSerialBelow || omp_in_parallel()) {
    const FlushDenormals ftz;
    return body(0, rows);
  }
  if (balanced) {
#pragma omp parallel
    {
      const FlushDenormals ftz;
      const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
      const int64_t r0 = rows * t / team, r1 = rows * (t + 1) / team;
      if (r0 < r1) body(r0, r1);
    }
    return;
  }
#pragma omp parallel
  {
    const FlushDenormals ftz;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) body(b * per, std::min(rows, (b + 1) * per));
  }
}

// Few long rows: every thread takes one column segment of each row. Segment statistics are
// merged per row (the team needs one barrier), then each thread writes its segment.
RowStats merge(const RowStats* s, int n) {
  RowStats m{-INFINITY, 0.0, false};
  for (int t = 0; t < n; ++t) {
    m.nan = m.nan || s[t].nan;
    m.max = std::max(m.max, s[t].max);
  }
  for (int t = 0; t < n; ++t)
    if (s[t].max != -INFINITY) m.sum += s[t].sum * std::exp(s[t].max - m.max);
  return m;
}

at::Tensor softmax_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& mask_in,
                       double scale, bool causal, bool log) {
  check_min_dim(kFwd, "x", x_in, 1);
  check_cpu_data(kFwd, "x", x_in);
  if (mask_in.has_value()) check_mask(kFwd, *mask_in, x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = new_output(x.sizes(), x.options());
  const int64_t cols = x.size(-1), rows = cols == 0 ? 0 : x.numel() / cols;
  if (rows == 0) return y;

  cpu::SoftmaxFwdArgs a{};
  a.x = x.data_ptr();
  a.y = y.data_ptr();
  a.cols = cols;
  a.scale = scale;
  a.log = log;
  a.stream = int64_t(y.nbytes()) >= stream_min_bytes();
  a.causal = causal;
  a.causal_rows = x.dim() >= 2 ? x.size(-2) : 1;
  at::Tensor mask;  // keeps the tensor the kernels read alive
  if (mask_in.has_value()) mask = setup_mask(a, *mask_in, x);
  const DType xdt = dtype_of(kFwd, x.scalar_type());
  const SoftmaxKernels k = kernels_for(kFwd, xdt, a.mask ? a.mask_dtype : xdt, a.mask_per_column);

  const int nt = omp_in_parallel() ? 1 : omp_get_max_threads();
  if (rows < nt && cols >= kSplitRowMin) {
    std::vector<RowStats> stats(rows * nt);
#pragma omp parallel num_threads(nt)
    {
      const FlushDenormals ftz;
      const int t = omp_get_thread_num(), team = omp_get_num_threads();
      const int64_t seg = (cols + 64 * team - 1) / (64 * team) * 64, c0 = std::min(cols, t * seg),
                    c1 = std::min(cols, c0 + seg);
      void* scratch = thread_scratch();
      for (int64_t r = 0; r < rows; ++r) stats[r * team + t] = k.fwd_stats(a, r, c0, c1, scratch);
#pragma omp barrier
      for (int64_t r = 0; r < rows; ++r) k.fwd_write(a, r, c0, c1, merge(&stats[r * team], team));
    }
    return y;
  }
  for_rows(rows, cols, !causal,
           [&](int64_t r0, int64_t r1) { k.fwd_rows(a, r0, r1, thread_scratch()); });
  return y;
}

at::Tensor softmax_backward_cpu(const at::Tensor& grad_in, const at::Tensor& out_in, double scale,
                                bool log) {
  check_min_dim(kBwd, "out", out_in, 1);
  check_cpu_data(kBwd, "out", out_in);
  check_same_device(kBwd, "grad_out", grad_in, out_in);
  check_same_shape(kBwd, "grad_out", grad_in, out_in);
  check_same_dtype(kBwd, "grad_out", grad_in, out_in);
  const at::Tensor g = grad_in.contiguous(), y = out_in.contiguous();
  at::Tensor dx = new_output(y.sizes(), y.options());
  const int64_t cols = y.size(-1), rows = cols == 0 ? 0 : y.numel() / cols;
  if (rows == 0) return dx;

  const cpu::SoftmaxBwdArgs a{g.data_ptr(),
                              y.data_ptr(),
                              dx.data_ptr(),
                              cols,
                              scale,
                              log,
                              int64_t(dx.nbytes()) >= stream_min_bytes()};
  const DType dt = dtype_of(kBwd, y.scalar_type());
  const SoftmaxKernels k = kernels_for(kBwd, dt, dt, false);

  const int nt = omp_in_parallel() ? 1 : omp_get_max_threads();
  if (rows < nt && cols >= kSplitRowMin) {
    std::vector<double> dots(rows * nt);
#pragma omp parallel num_threads(nt)
    {
      const FlushDenormals ftz;
      const int t = omp_get_thread_num(), team = omp_get_num_threads();
      const int64_t seg = (cols + 64 * team - 1) / (64 * team) * 64, c0 = std::min(cols, t * seg),
                    c1 = std::min(cols, c0 + seg);
      for (int64_t r = 0; r < rows; ++r) dots[r * team + t] = k.bwd_dot(a, r, c0, c1);
#pragma omp barrier
      for (int64_t r = 0; r < rows; ++r) {
        double dot = 0;  // same summation order in every thread
        for (int u = 0; u < team; ++u) dot += dots[r * team + u];
        k.bwd_write(a, r, c0, c1, dot);
      }
    }
    return dx;
  }
  for_rows(rows, cols, true, [&](int64_t r0, int64_t r1) { k.bwd_rows(a, r0, r1); });
  return dx;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("softmax", &fastattn::softmax_cpu);
  m.impl("softmax_backward", &fastattn::softmax_backward_cpu);
}
