// fastattn::norm / norm_backward on CPU (LayerNorm and RMSNorm, optionally fused with the residual
// add): input checks, output allocation, the choice of row kernels (dtype, ISA, variant; written
// once in csrc/cpu/norm_impl.h), and the OpenMP driver. Semantics: fastattn/reference.py::norm.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "checks.h"
#include "cpu/norm_kernels.h"
#include "cpu_dispatch.h"
#include "output_pool.h"

namespace fastattn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The widest supported ISA's kernels for this dtype (float64: the scalar path's).
cpu::NormKernels kernels_for(at::ScalarType st, cpu::NormVariant v) {
  static constexpr cpu::NormKernels (*kGet[])(cpu::DType, cpu::NormVariant) = {
      cpu::norm_kernels_scalar, cpu::norm_kernels_avx2, cpu::norm_kernels_avx512,
      cpu::norm_kernels_avx512bf16};
  const cpu::DType dt = dtype_of("fastattn::norm", st);
  const auto serves = [](const cpu::NormKernels& t) { return t.fwd != nullptr; };
  return best_kernels(kGet, dt == cpu::DType::kFloat64, serves, dt, v);
}

// Below this many elements per thread, waking another thread costs more than it saves.
constexpr int64_t kGrainElems = int64_t{1} << 15;
// dweight/dbias partial sums: chunks of at least kMinChunkRows rows, at most kMaxChunks chunks
// and kMaxPartialBytes of partials. Derived from (rows, n) only, never from the thread count,
// so the sums are bitwise reproducible across runs and torch.set_num_threads settings.
constexpr int64_t kMinChunkRows = 32;
constexpr int64_t kMaxChunks = 256;
constexpr int64_t kMaxPartialBytes = int64_t{16} << 20;

// Outputs (y and h together; dx) of at least this size are written with non-temporal stores:
// they would not stay cached anyway, and skipping the read-for-ownership of their lines saves up
// to a third of the memory traffic. FASTATTN_CPU_STREAM_BYTES (bytes, read once; 0: always)
// overrides it, as for softmax, so that tests can reach that path with small inputs.
constexpr int64_t kStreamMinBytes = int64_t{8} << 20;
size_t stream_min_bytes() {
  static const size_t v = [] {
    const char* e = std::getenv("FASTATTN_CPU_STREAM_BYTES");
    return static_cast<size_t>(e != nullptr && e[0] != '\0' ? std::atoll(e) : kStreamMinBytes);
  }();
  return v;
}

// Rows of a (..., n) tensor; none when n == 0 (as the fake kernels in fastattn/ops/norm.py).
int64_t rows_of(const Tensor& t) {
  const int64_t n = t.size(-1);
  return n == 0 ? 0 : t.numel() / n;
}

// Threads for `work` elements split into at most `parts` pieces (torch's setting, which OpenMP
// regions here follow since torch and this extension share one libgomp).
int threads_for(int64_t work, int64_t parts) {
  if (at::in_parallel_region()) return 1;
  const int64_t by_work = std::max<int64_t>(1, work / kGrainElems);
  return static_cast<int>(std::min<int64_t>({int64_t{at::get_num_threads()}, by_work, parts}));
}

// The kernels' math type for data of type x_type: float32, float64 for float64 data. The
// statistics (mean, rstd) and the weight/bias gradients are returned in it too.
at::ScalarType math_type(at::ScalarType x_type) {
  return x_type == at::kDouble ? at::kDouble : at::kFloat;
}

// weight/bias in the kernels' math type, contiguous. A copy only when the dtype differs: fp32
// weights under bf16 x (mixed precision) are used in place.
OptTensor in_math_type(const OptTensor& t, at::ScalarType x_type) {
  if (!t.has_value()) return std::nullopt;
  return t->to(math_type(x_type)).contiguous();
}

OptTensor contiguous(const OptTensor& t) {
  return t.has_value() ? OptTensor(t->contiguous()) : std::nullopt;
}

const void* ptr(const OptTensor& t) { return t.has_value() ? t->const_data_ptr() : nullptr; }

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_cpu(const Tensor& x_in, const OptTensor& residual,
                                                    const OptTensor& weight, const OptTensor& bias,
                                                    double eps, bool rms) {
  constexpr const char* op = "fastattn::norm";
  check_cpu_data(op, "x", x_in);
  check_min_dim(op, "x", x_in, 1);
  if (residual.has_value()) {
    check_same_device(op, "residual", *residual, x_in);
    check_same_shape(op, "residual", *residual, x_in);
    check_same_dtype(op, "residual", *residual, x_in);
  }
  if (weight.has_value()) check_norm_param(op, "weight", *weight, x_in);
  if (bias.has_value()) check_norm_param(op, "bias", *bias, x_in);

  const Tensor x = x_in.contiguous();
  const OptTensor res = contiguous(residual);
  const OptTensor w = in_math_type(weight, x.scalar_type());
  const OptTensor b = in_math_type(bias, x.scalar_type());
  const int64_t rows = rows_of(x), n = x.size(-1);
  const auto mt = x.options().dtype(math_type(x.scalar_type()));
  Tensor y = new_output(x.sizes(), x.options());
  Tensor h = res.has_value() ? new_output(x.sizes(), x.options()) : at::empty({0}, x.options());
  Tensor mean = new_output({rms ? 0 : rows}, mt);  // statistics in the math type (see ops.cpp)
  Tensor rstd = new_output({rows}, mt);
  if (rows == 0) return {y, h, mean, rstd};

  // affine 2 reads w and b: a bias without a weight gets w = 1 (a rare case, not worth a variant).
  const int affine = b.has_value() ? 2 : w.has_value() ? 1 : 0;
  const Tensor w_ = b.has_value() && !w.has_value() ? at::ones({n}, mt) : w.value_or(Tensor());
  const cpu::NormVariant v{rms, res.has_value(), affine, false, false};
  const cpu::NormFwdFn fwd = kernels_for(x.scalar_type(), v).fwd;
  cpu::NormFwdArgs a{};
  a.x = x.const_data_ptr();
  a.res = ptr(res);
  a.w = affine > 0 ? w_.const_data_ptr() : nullptr;
  a.b = ptr(b);
  a.y = y.mutable_data_ptr();
  a.h = res.has_value() ? h.mutable_data_ptr() : nullptr;
  a.mean = rms ? nullptr : mean.mutable_data_ptr();
  a.rstd = rstd.mutable_data_ptr();
  a.n = n;
  a.eps = eps;
  const size_t out_bytes = y.nbytes() + h.nbytes();
  a.stream = out_bytes >= stream_min_bytes();
  const int nt = threads_for(rows * n, rows);
  // Per-thread scratch row for a streamed h (which then cannot be re-read from cache).
  const Tensor scratch = res.has_value() && a.stream ? at::empty({nt, n}, mt) : Tensor();
  char* sp = scratch.defined() ? static_cast<char*>(scratch.mutable_data_ptr()) : nullptr;
  const int64_t sstride = n * int64_t{x.scalar_type() == at::kDouble ? 8 : 4};
  if (nt == 1) {
    fwd(a, 0, rows, sp);
  } else {
#pragma omp parallel num_threads(nt)
    {  // one contiguous block of rows per thread: each streams its own part of memory
      const int64_t t = omp_get_thread_num(), k = omp_get_num_threads();
      fwd(a, rows * t / k, rows * (t + 1) / k, sp != nullptr ? sp + t * sstride : nullptr);
    }
  }
  return {y, h, mean, rstd};
}

// out[j] = sum over chunks c = 0, 1, ... (in that order) of part[c][j], in the math type Acc.
template <class Acc>
void sum_partials(const Tensor& part, int64_t chunks, int64_t n, Acc* out) {
  constexpr int64_t kCols = 1024;  // a column block's running sums stay in L1
  const Acc* p = part.const_data_ptr<Acc>();
  const int64_t blocks = (n + kCols - 1) / kCols;
  const int nt = threads_for(chunks * n, blocks);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t j0 = blk * kCols, len = std::min(kCols, n - j0);
    Acc acc[kCols] = {};
    for (int64_t c = 0; c < chunks; ++c) {
      const Acc* row = p + c * n + j0;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) acc[j] += row[j];
    }
    for (int64_t j = 0; j < len; ++j) out[j0 + j] = acc[j];
  }
}

std::tuple<Tensor, Tensor, Tensor> norm_backward_cpu(const Tensor& grad_out,
                                                     const OptTensor& grad_residual_out,
                                                     const Tensor& input, const OptTensor& weight,
                                                     const Tensor& mean, const Tensor& rstd,
                                                     bool rms, bool has_bias) {
  constexpr const char* op = "fastattn::norm_backward";
  check_cpu_data(op, "input", input);
  check_min_dim(op, "input", input, 1);
  check_same_device(op, "grad_out", grad_out, input);
  check_same_shape(op, "grad_out", grad_out, input);
  check_same_dtype(op, "grad_out", grad_out, input);
  if (grad_residual_out.has_value()) {
    check_same_device(op, "grad_residual_out", *grad_residual_out, input);
    check_same_shape(op, "grad_residual_out", *grad_residual_out, input);
    check_same_dtype(op, "grad_residual_out", *grad_residual_out, input);
  }
  if (weight.has_value()) check_norm_param(op, "weight", *weight, input);
  check_row_stats(op, "rstd", rstd, input);
  if (!rms) check_row_stats(op, "mean", mean, input);

  const Tensor h = input.contiguous(), dy = grad_out.contiguous();
  const OptTensor dh = contiguous(grad_residual_out);
  const int64_t rows = rows_of(h), n = h.size(-1);
  const bool f64 = h.scalar_type() == at::kDouble;  // math (and partial sum) type: double
  const auto mt = h.options().dtype(math_type(h.scalar_type()));
  const Tensor w = weight.has_value() ? *in_math_type(weight, h.scalar_type()) : at::ones({n}, mt);
  const Tensor mean_c = rms ? mean : mean.contiguous(), rstd_c = rstd.contiguous();
  Tensor dx = new_output(h.sizes(), h.options());
  Tensor dw = at::zeros({n}, mt);  // the math type, as the partial sums (see ops.cpp)
  Tensor db = has_bias ? at::zeros({n}, mt) : at::empty({0}, mt);
  if (rows == 0) return {dx, dw, db};

  const int64_t per_row_bytes = n * int64_t{f64 ? 8 : 4} * (has_bias ? 2 : 1);
  int64_t chunk_rows = std::max(kMinChunkRows, (rows + kMaxChunks - 1) / kMaxChunks);
  chunk_rows = std::max(chunk_rows, rows * per_row_bytes / kMaxPartialBytes);
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  const Tensor dw_part = new_output({chunks, n}, mt);  // each chunk writes its own row
  const Tensor db_part = has_bias ? new_output({chunks, n}, mt) : Tensor();

  const cpu::NormVariant v{rms, false, 0, dh.has_value(), has_bias};
  const cpu::NormBwdFn bwd = kernels_for(h.scalar_type(), v).bwd;
  cpu::NormBwdArgs a{};
  a.dy = dy.const_data_ptr();
  a.dh = ptr(dh);
  a.h = h.const_data_ptr();
  a.w = w.const_data_ptr();
  a.mean = rms ? nullptr : mean_c.const_data_ptr();
  a.rstd = rstd_c.const_data_ptr();
  a.dx = dx.mutable_data_ptr();
  a.n = n;
  a.stream = dx.nbytes() >= stream_min_bytes();
  char* pw = static_cast<char*>(dw_part.mutable_data_ptr());
  char* pb = has_bias ? static_cast<char*>(db_part.mutable_data_ptr()) : nullptr;
  const int64_t stride = n * int64_t{f64 ? 8 : 4};
  const int nt = threads_for(rows * n, chunks);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    bwd(a, c * chunk_rows, std::min(rows, (c + 1) * chunk_rows), pw + c * stride,
        pb != nullptr ? pb + c * stride : nullptr);
  }
  if (f64) {
    sum_partials<double>(dw_part, chunks, n, dw.mutable_data_ptr<double>());
    if (has_bias) sum_partials<double>(db_part, chunks, n, db.mutable_data_ptr<double>());
  } else {
    sum_partials<float>(dw_part, chunks, n, dw.mutable_data_ptr<float>());
    if (has_bias) sum_partials<float>(db_part, chunks, n, db.mutable_data_ptr<float>());
  }
  return {dx, dw, db};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("norm", &fastattn::norm_cpu);
  m.impl("norm_backward", &fastattn::norm_backward_cpu);
}
