// The device code of fastattn's CUDA softmax (csrc/cuda/softmax.cu, which launches it): the kernel
// arguments, the kernels and their device helpers, and the launch plan (which kernel and shape
// a row length takes), so that the host execution layer (tools/cuda_host/, tests/test_cuda_host.py)
// runs the same kernels with the same plan. Only device.cuh and <ATen/OpMathType.h>: no CUDA
// runtime, no tensors. Included by softmax.cu alone (and the host harness): an anonymous
// namespace, as the kernels had in the .cu.
#pragma once
#include <ATen/OpMathType.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "device.cuh"

namespace fastattn::cuda {
namespace {

constexpr int kWarpKernelThreads = 128;  // 4 warps, each serving 1..32 rows at a time

enum MaskKind : int { kNoMask = 0, kBoolMask = 1, kFloatMask = 2, kInputDtypeMask = 3 };

// ------------------------------------------------------------------------------ device helpers

template <typename T>
__host__ __device__ constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Max ignores NaN (fmax, as MaxOp); a NaN reaches the row's sum instead, and from there every
// output.
template <typename T>
__device__ __forceinline__ T fa_max(T a, T b) {
  return MaxOp{}(a, b);
}
__device__ __forceinline__ float fa_exp(float v) { return expf(v); }
__device__ __forceinline__ double fa_exp(double v) { return exp(v); }
__device__ __forceinline__ float fa_log(float v) { return logf(v); }
__device__ __forceinline__ double fa_log(double v) { return log(v); }

// exp(z - shift), except that a masked logit (z == -inf) gives -0.0 instead of +0.0, so that the
// output pass can tell masked entries (output exactly 0, even in a NaN row) from ones that merely
// underflowed. -0.0 adds nothing to a sum.
template <typename T>
__device__ __forceinline__ T exp_or_masked(T z, T shift) {
  return z == neg_inf<T>() ? T(-0.0) : fa_exp(z - shift);
}
template <typename T>
__device__ __forceinline__ bool is_masked(T e) {
  return e == T(0) && signbit(e);
}

// v[e] = p[(col + e) * stride] as Acc for the N columns from `col`, `fill` past `cols`. One pack
// access when `vec` (then stride == 1 and p + col is aligned for Pack<T, N>: packs_fit) and all N
// are in range; element-wise otherwise, so a row's tail needs no padding.
template <int N, typename Acc, typename T>
__device__ __forceinline__ void load_cols(Acc (&v)[N], const T* __restrict__ p, int64_t col,
                                          int64_t cols, int64_t stride, bool vec, Acc fill) {
  if (vec && col + N <= cols) {
    load_pack(v, p + col);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e)
      v[e] = col + e < cols ? static_cast<Acc>(p[(col + e) * stride]) : fill;
  }
}

template <int N, typename Acc, typename T>
__device__ __forceinline__ void store_cols(T* __restrict__ p, int64_t col, int64_t cols, bool vec,
                                           const Acc (&v)[N]) {
  if (vec && col + N <= cols) {
    store_pack(p + col, v);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (col + e < cols) p[col + e] = static_cast<T>(v[e]);
  }
}

// ------------------------------------------------------------------------------------ forward

template <typename Acc>
struct FwdArgs {
  int64_t rows, cols;
  Acc scale;
  bool log, causal;
  bool vec;             // x and y 16-byte aligned and cols % VEC == 0: vector loads/stores
  int64_t causal_rows;  // x.size(-2) (1 for 1-D x): row r is query r % causal_rows
  // Mask broadcast to x, read through strides: row r = (i0, i1, i2) with sizes (., d1, d2) starts
  // at i0*s0 + i1*s1 + i2*s2 elements, and its columns are sc apart.
  const void* mask;
  int mask_kind;
  bool mask_vec;  // sc == 1, s0/s1/s2 multiples of VEC, base aligned: vector loads of the mask
  int64_t s0, s1, s2, sc, d1, d2;
};

template <typename Acc>
__device__ __forceinline__ int64_t mask_offset(int64_t row, const FwdArgs<Acc>& a) {
  if (a.mask_kind == kNoMask) return 0;
  const int64_t i2 = row % a.d2, r = row / a.d2;
  return (r / a.d1) * a.s0 + (r % a.d1) * a.s1 + i2 * a.s2;
}

// z = x * scale + mask for the N columns from `col` of one row (a bool mask adds 0 or -inf), then
// -inf where causally masked or past the end of the row. `moff`: the row's mask offset; `q`: its
// causal row index.
template <int N, typename scalar_t, typename Acc>
__device__ __forceinline__ void load_logits(Acc (&z)[N], const scalar_t* __restrict__ xrow,
                                            int64_t moff, int64_t q, int64_t col,
                                            const FwdArgs<Acc>& a) {
  load_cols(z, xrow, col, a.cols, 1, a.vec, Acc(0));
#pragma unroll
  for (int e = 0; e < N; ++e) z[e] *= a.scale;
  if (a.mask_kind != kNoMask) {
    Acc m[N];
    if (a.mask_kind == kBoolMask) {
      load_cols(m, static_cast<const uint8_t*>(a.mask) + moff, col, a.cols, a.sc, a.mask_vec,
                Acc(0));
      // As the additive -inf of the reference: a masked NaN (or +inf) logit still gives NaN.
#pragma unroll
      for (int e = 0; e < N; ++e)
        if (m[e] == Acc(0)) z[e] += neg_inf<Acc>();
    } else {
      if (a.mask_kind == kFloatMask) {
        load_cols(m, static_cast<const float*>(a.mask) + moff, col, a.cols, a.sc, a.mask_vec,
                  Acc(0));
      } else {
        load_cols(m, static_cast<const scalar_t*>(a.mask) + moff, col, a.cols, a.sc, a.mask_vec,
                  Acc(0));
      }
#pragma unroll
      for (int e = 0; e < N; ++e) z[e] += m[e];
    }
  }
#pragma unroll
  for (int e = 0; e < N; ++e)
    if (col + e >= a.cols || (a.causal && col + e > q)) z[e] = neg_inf<Acc>();
}

// The output of one entry from its logit z (log) or its exp_or_masked value (softmax).
template <typename Acc>
__device__ __forceinline__ Acc finish(Acc v, bool log, Acc shift, Acc log_total, Acc inv) {
  if (log) return v == neg_inf<Acc>() ? v : v - shift - log_total;
  return is_masked(v) ? Acc(0) : v * inv;
}

// A group of 2^log2_group lanes per row, ITERS vectors of VEC columns per lane: lane l holds the
// columns [(k * group + l) * VEC, +VEC) for k < ITERS, so a warp's loads are contiguous.
template <typename scalar_t, int VEC, int ITERS>
__global__ void __launch_bounds__(kWarpKernelThreads, 4)
    softmax_fwd_warp_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                            const FwdArgs<at::opmath_type<scalar_t>> a, const int log2_group) {
  using Acc = at::opmath_type<scalar_t>;
  const int group = 1 << log2_group;
  const int lane = threadIdx.x & (group - 1);
  const int64_t rows_per_warp = kWarpSize >> log2_group;
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  const int64_t warp = blockIdx.x * warps_per_block + threadIdx.x / kWarpSize;
  const int64_t step = gridDim.x * warps_per_block * rows_per_warp;
  // `base` is the same for the whole warp, so every lane runs every shuffle below.
  for (int64_t base = warp * rows_per_warp; base < a.rows; base += step) {
    const int64_t row = base + (threadIdx.x % kWarpSize) / group;
    const bool active = row < a.rows;
    Acc z[ITERS][VEC];
    if (active) {
      const scalar_t* xrow = x + row * a.cols;
      const int64_t moff = mask_offset(row, a), q = row % a.causal_rows;
#pragma unroll
      for (int k = 0; k < ITERS; ++k)
        load_logits(z[k], xrow, moff, q, (static_cast<int64_t>(k) * group + lane) * VEC, a);
    } else {
#pragma unroll
      for (int k = 0; k < ITERS; ++k)
#pragma unroll
        for (int e = 0; e < VEC; ++e) z[k][e] = neg_inf<Acc>();
    }
    Acc m = neg_inf<Acc>();
#pragma unroll
    for (int k = 0; k < ITERS; ++k)
#pragma unroll
      for (int e = 0; e < VEC; ++e) m = fa_max(m, z[k][e]);
    m = warp_reduce(m, MaxOp{}, group);
    const Acc shift = m == neg_inf<Acc>() ? Acc(0) : m;  // fully masked row: no -inf - -inf
    Acc s = 0;
#pragma unroll
    for (int k = 0; k < ITERS; ++k)
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (a.log) {
          s += fa_exp(z[k][e] - shift);
        } else {
          z[k][e] = exp_or_masked(z[k][e], shift);
          s += z[k][e];
        }
      }
    s = warp_reduce(s, SumOp{}, group);
    if (!active) continue;
    // s == 0 only when every entry is masked: outputs 0 (log: -inf). A NaN sum propagates.
    const Acc inv = s == Acc(0) ? Acc(0) : Acc(1) / s;
    const Acc log_total = s == Acc(0) ? Acc(0) : fa_log(s);
    scalar_t* yrow = y + row * a.cols;
#pragma unroll
    for (int k = 0; k < ITERS; ++k) {
      const int64_t col = (static_cast<int64_t>(k) * group + lane) * VEC;
      if (col < a.cols) {
        Acc out[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) out[e] = finish(z[k][e], a.log, shift, log_total, inv);
        store_cols(yrow, col, a.cols, a.vec, out);
      }
    }
  }
}

// A block per row; thread t handles the vectors t, t + blockDim.x, ... of the row. With `cached`,
// the logits go to dynamic shared memory (one Pack<Acc, VEC> per vector of the row) and x is read
// once; otherwise pass 1 keeps a running max and sum and pass 2 reads x again. Each thread only
// ever touches its own cache entries, so the cache needs no barriers.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxBlockThreads)
    softmax_fwd_block_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                             const FwdArgs<at::opmath_type<scalar_t>> a, const bool cached) {
  using Acc = at::opmath_type<scalar_t>;
  using Chunk = Pack<Acc, VEC>;
  Chunk* cache = dynamic_smem<Chunk>();
  const int64_t nvec = (a.cols + VEC - 1) / VEC;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const scalar_t* xrow = x + row * a.cols;
    const int64_t moff = mask_offset(row, a), q = row % a.causal_rows;
    Acc m = neg_inf<Acc>(), s = 0;  // this thread's max; without cache, its sum of exp(z - m)
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      Acc z[VEC];
      load_logits(z, xrow, moff, q, v * VEC, a);
      Acc cm = neg_inf<Acc>();
#pragma unroll
      for (int e = 0; e < VEC; ++e) cm = fa_max(cm, z[e]);
      if (cached) {
        Chunk c;
#pragma unroll
        for (int e = 0; e < VEC; ++e) c.v[e] = z[e];
        cache[v] = c;
        m = fa_max(m, cm);
      } else {
        const Acc m_new = fa_max(m, cm);
        const Acc sh = m_new == neg_inf<Acc>() ? Acc(0) : m_new;
        if (m_new != m) s *= fa_exp(m - sh);  // m == -inf: s is 0 (or NaN) and stays so
#pragma unroll
        for (int e = 0; e < VEC; ++e) s += fa_exp(z[e] - sh);
        m = m_new;
      }
    }
    const Acc row_max = block_reduce(m, MaxOp{}, neg_inf<Acc>());
    const Acc shift = row_max == neg_inf<Acc>() ? Acc(0) : row_max;
    if (cached) {
      for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
        Chunk c = cache[v];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (a.log) {
            s += fa_exp(c.v[e] - shift);
          } else {
            c.v[e] = exp_or_masked(c.v[e], shift);
            s += c.v[e];
          }
        }
        if (!a.log) cache[v] = c;
      }
    } else if (m != row_max) {
      s *= fa_exp(m - shift);  // from this thread's max to the row's
    }
    const Acc total = block_reduce(s, SumOp{}, Acc(0));
    const Acc inv = total == Acc(0) ? Acc(0) : Acc(1) / total;
    const Acc log_total = total == Acc(0) ? Acc(0) : fa_log(total);
    scalar_t* yrow = y + row * a.cols;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      Acc z[VEC];
      if (cached) {
        const Chunk c = cache[v];
#pragma unroll
        for (int e = 0; e < VEC; ++e) z[e] = c.v[e];
      } else {
        load_logits(z, xrow, moff, q, v * VEC, a);
        if (!a.log) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) z[e] = exp_or_masked(z[e], shift);
        }
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) z[e] = finish(z[e], a.log, shift, log_total, inv);
      store_cols(yrow, v * VEC, a.cols, a.vec, z);
    }
  }
}

// ----------------------------------------------------------------------------------- backward

template <typename Acc>
struct BwdArgs {
  int64_t rows, cols;
  Acc scale;
  bool log;
  bool vec;  // g, y and dx 16-byte aligned and cols % VEC == 0
};

// The row sum of the backward pass: sum(g * y), or (log) sum of g over the entries y != -inf.
template <typename Acc>
__device__ __forceinline__ Acc bwd_term(Acc g, Acc y, bool log) {
  return log ? (y == neg_inf<Acc>() ? Acc(0) : g) : g * y;
}
// scale * dz of one entry, given the row sum.
template <typename Acc>
__device__ __forceinline__ Acc bwd_out(Acc g, Acc y, Acc total, Acc scale, bool log) {
  if (log) return y == neg_inf<Acc>() ? Acc(0) : scale * (g - fa_exp(y) * total);
  return scale * (y * (g - total));
}

template <typename scalar_t, int VEC, int ITERS>
__global__ void __launch_bounds__(kWarpKernelThreads, 4)
    softmax_bwd_warp_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                            scalar_t* __restrict__ dx, const BwdArgs<at::opmath_type<scalar_t>> a,
                            const int log2_group) {
  using Acc = at::opmath_type<scalar_t>;
  const int group = 1 << log2_group;
  const int lane = threadIdx.x & (group - 1);
  const int64_t rows_per_warp = kWarpSize >> log2_group;
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  const int64_t warp = blockIdx.x * warps_per_block + threadIdx.x / kWarpSize;
  const int64_t step = gridDim.x * warps_per_block * rows_per_warp;
  for (int64_t base = warp * rows_per_warp; base < a.rows; base += step) {
    const int64_t row = base + (threadIdx.x % kWarpSize) / group;
    const bool active = row < a.rows;
    // An inactive group (past the last row) loads nothing: a row of 0 columns.
    const int64_t cols = active ? a.cols : 0, offset = active ? row * a.cols : 0;
    Acc gv[ITERS][VEC], yv[ITERS][VEC];  // zero past the row's end: adds nothing to the sum
    Acc s = 0;
#pragma unroll
    for (int k = 0; k < ITERS; ++k) {
      const int64_t col = (static_cast<int64_t>(k) * group + lane) * VEC;
      load_cols(gv[k], g + offset, col, cols, 1, a.vec, Acc(0));
      load_cols(yv[k], y + offset, col, cols, 1, a.vec, Acc(0));
#pragma unroll
      for (int e = 0; e < VEC; ++e) s += bwd_term(gv[k][e], yv[k][e], a.log);
    }
    s = warp_reduce(s, SumOp{}, group);
    if (!active) continue;
#pragma unroll
    for (int k = 0; k < ITERS; ++k) {
      const int64_t col = (static_cast<int64_t>(k) * group + lane) * VEC;
      if (col < a.cols) {
        Acc out[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) out[e] = bwd_out(gv[k][e], yv[k][e], s, a.scale, a.log);
        store_cols(dx + offset, col, a.cols, a.vec, out);
      }
    }
  }
}

// A block per row, two passes over g and y (the second mostly hits L2).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kMaxBlockThreads)
    softmax_bwd_block_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                             scalar_t* __restrict__ dx,
                             const BwdArgs<at::opmath_type<scalar_t>> a) {
  using Acc = at::opmath_type<scalar_t>;
  const int64_t nvec = (a.cols + VEC - 1) / VEC;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const scalar_t* grow = g + row * a.cols;
    const scalar_t* yrow = y + row * a.cols;
    Acc s = 0;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      Acc gv[VEC], yv[VEC];
      load_cols(gv, grow, v * VEC, a.cols, 1, a.vec, Acc(0));
      load_cols(yv, yrow, v * VEC, a.cols, 1, a.vec, Acc(0));
#pragma unroll
      for (int e = 0; e < VEC; ++e) s += bwd_term(gv[e], yv[e], a.log);
    }
    const Acc total = block_reduce(s, SumOp{}, Acc(0));
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      Acc gv[VEC], yv[VEC], out[VEC];
      load_cols(gv, grow, v * VEC, a.cols, 1, a.vec, Acc(0));
      load_cols(yv, yrow, v * VEC, a.cols, 1, a.vec, Acc(0));
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] = bwd_out(gv[e], yv[e], total, a.scale, a.log);
      store_cols(dx + row * a.cols, v * VEC, a.cols, a.vec, out);
    }
  }
}

// ------------------------------------------------------------------ launch plan (host side)

int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

int log2_exact(int v) {
  int l = 0;
  while ((1 << l) < v) ++l;
  return l;
}

// Enough blocks for a few waves; the kernels loop over any rows beyond (grid-stride).
int grid_size(int64_t blocks_needed, int threads, const DeviceLimits& lim) {
  const int64_t cap = static_cast<int64_t>(lim.sm_count) * std::max(1, 2048 / threads) * 4;
  return static_cast<int>(std::max<int64_t>(1, std::min(blocks_needed, cap)));
}

// ~4 vectors per thread, 128..1024 threads.
int block_threads(int64_t nvec) {
  int t = 128;
  while (t < kMaxBlockThreads && t * 4 < nvec) t *= 2;
  return t;
}

// Row-length split between the kernels, per dtype: VEC columns per 16-byte vector, and at most
// 32 row values per lane for 16-bit types, 16 otherwise, in the warp kernels (ptxas -v: <= 128
// registers, no spills; fp32 with 32 values spills). So rows of up to 1024 (fp16, bf16) or 512
// (fp32, fp64) columns take the warp kernels.
template <typename scalar_t>
struct Layout {
  using Acc = at::opmath_type<scalar_t>;
  static constexpr int kVec = 16 / sizeof(scalar_t);
  static constexpr int kMaxIters = (sizeof(scalar_t) == 2 ? 32 : 16) / kVec;
};

struct WarpLaunch {
  bool use;  // row short enough for the warp kernels
  int iters, log2_group, grid;
};

template <typename scalar_t>
WarpLaunch warp_launch(int64_t rows, int64_t cols, const DeviceLimits& lim) {
  using L = Layout<scalar_t>;
  const int64_t nvec = ceil_div(cols, L::kVec);
  if (nvec > int64_t{kWarpSize} * L::kMaxIters) return {false, 0, 0, 0};
  const int group = nvec >= kWarpSize ? kWarpSize : next_pow2(nvec);
  const int iters = next_pow2(ceil_div(nvec, group));
  const int64_t rows_per_block = (kWarpKernelThreads / kWarpSize) * (kWarpSize / group);
  return {true, iters, log2_exact(group),
          grid_size(ceil_div(rows, rows_per_block), kWarpKernelThreads, lim)};
}

}  // namespace
}  // namespace fastattn::cuda
