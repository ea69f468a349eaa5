// The device code of fastattn's CUDA LayerNorm / RMSNorm (csrc/cuda/norm.cu, which launches it):
// the kernel arguments, the kernels and their device helpers, and the launch plan (which kernel and
// shape a row length takes), so that the host execution layer (tools/cuda_host/,
// tests/test_cuda_host_norm.py) runs the same kernels with the same plan. Only device.cuh and
// <ATen/OpMathType.h>: no CUDA runtime, no tensors. Included by norm.cu alone (and the host
// harness): an anonymous namespace, as the kernels had in the .cu.
//
// Kernels, picked by row length n (in vectors of VEC elements):
//   - register kernels: a warp per row (short rows, several rows per block) or a block per row;
//     each thread keeps its slice of the row in registers, so x/residual are read once and y/h
//     written once (forward), input/grad_out read once and dx written once (backward).
//   - looped kernels for longer rows (no length limit): forward streams the row three times
//     (h and its sum, centred sum of squares, output; RMSNorm skips the middle pass); backward
//     computes each row's two reductions in a first kernel and dx plus the weight/bias partial sums
//     in a second one whose blocks split the columns.
// Loads and stores are 16-byte vectors when every row pointer is 16-byte aligned and n % VEC == 0,
// element-wise otherwise. Math in fp32 (fp64 for double); reductions are warp shuffles plus one
// shared-memory step per block, in a fixed order.
//
// dweight/dbias are deterministic: block b of the backward owns the fixed rows
// [b * rows_per_block, (b + 1) * rows_per_block) and writes its own sums to row b of a
// (blocks, n) buffer (no atomics); a second kernel adds those rows in a fixed order. The block
// count depends only on the device's SM count and the shape, so repeated calls agree bitwise.
#pragma once
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "device.cuh"

namespace fastattn::cuda {
namespace {

constexpr int kMaxThreads = 512;      // register kernels: block-per-row variant, up to this
constexpr int kLoopThreads = 512;     // looped forward and backward row-reduction kernels
constexpr int kTileThreads = 256;     // looped backward: column tiles of kTileThreads * VEC
constexpr int kFwdWarpThreads = 128;  // forward warp-per-row kernel: 4 rows per block at a time
constexpr int kBwdWarpThreads = 256;  // backward warp-per-row kernel: 8 warps share a block's rows
constexpr int kBlocksPerSM = 32;      // forward grid cap (grid-stride beyond)
constexpr int kPartsPerSM = 4;        // backward: blocks (= partial rows) per SM
constexpr int kSumCols = 32, kSumRows = 16;  // partial-sum kernel block

// ------------------------------------------------------------------------------ device helpers

// weight (or bias) values for the N columns from `col`; `fill` when the parameter is absent.
template <int N, typename A, typename W>
__device__ __forceinline__ void load_param(A (&v)[N], const W* p, int64_t col, A fill) {
  if (p != nullptr) {
    load_pack(v, p + col);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) v[e] = fill;
  }
}

__device__ __forceinline__ float acc_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double acc_sqrt(double v) { return sqrt(v); }

// Sums each v[k] over the row's team: its warp, or with `block_team` the whole block (blockDim.x a
// multiple of 32, at most kMaxThreads), whose threads must then all call it. Every thread of the
// team gets the same bits (see warp_reduce, combine_warps_each).
template <int K, typename A>
__device__ __forceinline__ void team_sum(A (&v)[K], bool block_team) {
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_reduce(v[k], SumOp{});
  if (block_team) combine_warps_each(v, SumOp{}, A(0));
}

// ------------------------------------------------------------------------------------ forward

template <typename T, typename W>
struct FwdArgs {
  using A = at::opmath_type<T>;
  const T* x;
  const T* res;  // nullptr without residual
  const W* w;    // nullptr without weight
  const W* b;    // nullptr without bias
  T* y;
  T* h;     // residual_out; nullptr without residual
  A* mean;  // nullptr for RMSNorm; the statistics are saved in the math type (see ops.cpp)
  A* rstd;
  int64_t rows, n;
  at::opmath_type<T> eps;
  bool rms;
  bool warp_rows;  // register kernel: a warp per row (else the whole block)
};

// h for the VEC columns at element offset `off`: x, or x + residual in fp32 rounded to T (and
// stored to residual_out), returned in fp32.
template <int VEC, typename T, typename W, typename A>
__device__ __forceinline__ void load_h(A (&v)[VEC], const FwdArgs<T, W>& a, int64_t off) {
  T xv[VEC];
  load_pack(xv, a.x + off);
  if (a.res != nullptr) {
    T rv[VEC];
    load_pack(rv, a.res + off);
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      xv[e] = static_cast<T>(static_cast<A>(xv[e]) + static_cast<A>(rv[e]));
    store_pack(a.h + off, xv);
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) v[e] = static_cast<A>(xv[e]);
}

// y = (h - mean) * rstd * w + b for the VEC columns from `col` of the row at `row_off`.
template <int VEC, typename T, typename W, typename A>
__device__ __forceinline__ void store_y(const FwdArgs<T, W>& a, const A (&v)[VEC], int64_t row_off,
                                        int64_t col, A mean, A rstd) {
  A out[VEC], wv[VEC], bv[VEC];
  load_param(wv, a.w, col, A(1));
  load_param(bv, a.b, col, A(0));
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    out[e] = (v[e] - mean) * rstd;
    if (a.w != nullptr) out[e] *= wv[e];
    if (a.b != nullptr) out[e] += bv[e];
  }
  store_pack(a.y + row_off + col, out);
}

// A team (warp or block) per row; lane l of the team holds the vectors l, l + team, ...,
// l + (NV - 1) * team of the row, so a warp's loads are contiguous. team * NV * VEC >= n.
template <typename T, typename W, int VEC, int NV>
__global__ void __launch_bounds__(kMaxThreads) norm_fwd_reg_kernel(const FwdArgs<T, W> a) {
  using A = at::opmath_type<T>;
  const int team = a.warp_rows ? kWarpSize : static_cast<int>(blockDim.x);
  const int teams = static_cast<int>(blockDim.x) / team;
  const int lane = static_cast<int>(threadIdx.x) % team;
  const int64_t step = static_cast<int64_t>(gridDim.x) * teams;
  // A team's threads share `row`, so every thread of a team (the block, for block teams) runs the
  // same iterations and reaches every team_sum.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * teams + threadIdx.x / team; row < a.rows;
       row += step) {
    const int64_t off = row * a.n;
    A v[NV][VEC];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t col = (static_cast<int64_t>(k) * team + lane) * VEC;
      if (col < a.n) {
        load_h(v[k], a, off + col);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[k][e] = A(0);
      }
    }
    A mean = A(0);
    if (!a.rms) {
      A s[1] = {A(0)};
#pragma unroll
      for (int k = 0; k < NV; ++k)
#pragma unroll
        for (int e = 0; e < VEC; ++e) s[0] += v[k][e];  // zeros past the row's end add nothing
      team_sum(s, !a.warp_rows);
      mean = s[0] / static_cast<A>(a.n);
    }
    A q[1] = {A(0)};  // centred sum of squares (RMSNorm: mean == 0)
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if ((static_cast<int64_t>(k) * team + lane) * VEC < a.n) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const A d = v[k][e] - mean;
          q[0] += d * d;
        }
      }
    }
    team_sum(q, !a.warp_rows);
    const A rstd = A(1) / acc_sqrt(q[0] / static_cast<A>(a.n) + a.eps);
    if (lane == 0) {
      if (!a.rms) a.mean[row] = mean;
      a.rstd[row] = rstd;
    }
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t col = (static_cast<int64_t>(k) * team + lane) * VEC;
      if (col < a.n) store_y(a, v[k], off, col, mean, rstd);
    }
  }
}

// A block per row, any n. Pass 1 reads x (+ residual), writes h and sums h (RMSNorm: h^2); pass 2
// (LayerNorm) sums (h - mean)^2; pass 3 writes y. Passes 2 and 3 read h back from residual_out:
// each thread only the columns it wrote itself in pass 1 (same start and stride), and the
// barriers of team_sum lie in between.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kLoopThreads) norm_fwd_loop_kernel(const FwdArgs<T, W> a) {
  using A = at::opmath_type<T>;
  const int64_t start = static_cast<int64_t>(threadIdx.x) * VEC;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * VEC;
  const T* src = a.res != nullptr ? a.h : a.x;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t off = row * a.n;
    A s[1] = {A(0)};
    for (int64_t col = start; col < a.n; col += stride) {
      A v[VEC];
      load_h(v, a, off + col);
#pragma unroll
      for (int e = 0; e < VEC; ++e) s[0] += a.rms ? v[e] * v[e] : v[e];
    }
    team_sum(s, true);
    A mean = A(0), var = s[0] / static_cast<A>(a.n);  // RMSNorm: the mean square
    if (!a.rms) {
      mean = s[0] / static_cast<A>(a.n);
      A q[1] = {A(0)};
      for (int64_t col = start; col < a.n; col += stride) {
        A v[VEC];
        load_pack(v, src + off + col);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const A d = v[e] - mean;
          q[0] += d * d;
        }
      }
      team_sum(q, true);
      var = q[0] / static_cast<A>(a.n);
    }
    const A rstd = A(1) / acc_sqrt(var + a.eps);
    if (threadIdx.x == 0) {
      if (!a.rms) a.mean[row] = mean;
      a.rstd[row] = rstd;
    }
    for (int64_t col = start; col < a.n; col += stride) {
      A v[VEC];
      load_pack(v, src + off + col);
      store_y(a, v, off, col, mean, rstd);
    }
  }
}

// ----------------------------------------------------------------------------------- backward

template <typename T, typename W>
struct BwdArgs {
  using A = at::opmath_type<T>;
  const T* dy;
  const T* dh;    // grad_residual_out; nullptr when absent
  const T* x;     // the normalised input (h, or x without residual)
  const W* w;     // nullptr without weight
  const A* mean;  // nullptr for RMSNorm
  const A* rstd;
  T* dx;
  A* dw_part;  // (blocks, n): block b's sums of dy * xhat over its rows
  A* db_part;  // (blocks, n) sums of dy; nullptr without bias
  A* coef;     // looped path: (rows, kCoefs) per row: c1 = mean(xhat * wdy), c2 = mean(wdy), mean
  int64_t rows, n, rows_per_block;
  bool rms;
  bool warp_rows;  // register kernel: a warp per row (else the whole block)
};

constexpr int kCoefs = 3;  // BwdArgs::coef entries per row

// xhat = (h - mean) * rstd in place of h, and wdy = dy * w, for VEC columns: the one expression
// every backward kernel uses, so that c1/c2 and dx see the same bits.
template <int VEC, typename A>
__device__ __forceinline__ void to_xhat(A (&xh)[VEC], A (&wdy)[VEC], const A (&g)[VEC],
                                        const A (&wv)[VEC], A mean, A rstd) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    xh[e] = (xh[e] - mean) * rstd;
    wdy[e] = g[e] * wv[e];  // wv == 1 without weight: exact
  }
}

// xhat, dy and wdy = dy * w for the VEC columns from `col` of the row at `off`.
template <int VEC, typename T, typename W, typename A>
__device__ __forceinline__ void load_grad(A (&xh)[VEC], A (&g)[VEC], A (&wdy)[VEC],
                                          const BwdArgs<T, W>& a, int64_t off, int64_t col,
                                          const A (&wv)[VEC], A mean, A rstd) {
  load_pack(xh, a.x + off + col);
  load_pack(g, a.dy + off + col);
  to_xhat(xh, wdy, g, wv, mean, rstd);
}

// dx = (wdy - (xhat * c1 + c2)) * rstd (+ grad_residual_out) for the VEC columns from `col`.
template <int VEC, typename T, typename W, typename A>
__device__ __forceinline__ void store_dx(const BwdArgs<T, W>& a, int64_t off, int64_t col,
                                         const A (&xh)[VEC], const A (&wdy)[VEC], A c1, A c2,
                                         A rstd) {
  A out[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = (wdy[e] - (xh[e] * c1 + c2)) * rstd;
  if (a.dh != nullptr) {
    A d[VEC];
    load_pack(d, a.dh + off + col);
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] += d[e];
  }
  store_pack(a.dx + off + col, out);
}

// Warp-per-row blocks: each warp summed its own rows; add the warps' sums column by column in warp
// order through shared memory s (teams * n values) and write the block's partial row `out`.
template <int NV, int VEC, typename A>
__device__ __forceinline__ void combine_warps(const A (&acc)[NV][VEC], A* s, A* out, int64_t n,
                                              int lane, int team_id, int teams) {
  __syncthreads();  // the previous call's readers are done with s
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t col = (static_cast<int64_t>(k) * kWarpSize + lane) * VEC;
    if (col < n) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) s[team_id * n + col + e] = acc[k][e];
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < n; c += blockDim.x) {
    A t = 0;
    for (int w = 0; w < teams; ++w) t += s[w * n + c];
    out[c] = t;
  }
}

// Block b owns rows [b * rows_per_block, min(rows, (b + 1) * rows_per_block)): one team (warp or
// block) per row as in the forward, the row in registers, dx written once; each thread adds
// dy * xhat and dy of its columns over the rows its team handled, then the block writes row b of
// the partial buffers. Warp teams take the block's rows round-robin.
template <typename T, typename W, int VEC, int NV>
__global__ void __launch_bounds__(kMaxThreads) norm_bwd_reg_kernel(const BwdArgs<T, W> a) {
  using A = at::opmath_type<T>;
  const int team = a.warp_rows ? kWarpSize : static_cast<int>(blockDim.x);
  const int teams = static_cast<int>(blockDim.x) / team;
  const int lane = static_cast<int>(threadIdx.x) % team;
  const int team_id = static_cast<int>(threadIdx.x) / team;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * a.rows_per_block;
  const int64_t r1 = std::min(a.rows, r0 + a.rows_per_block);
  A dw[NV][VEC], db[NV][VEC];
#pragma unroll
  for (int k = 0; k < NV; ++k)
#pragma unroll
    for (int e = 0; e < VEC; ++e) dw[k][e] = db[k][e] = A(0);

  for (int64_t row = r0 + team_id; row < r1; row += teams) {
    const int64_t off = row * a.n;
    const A rstd = a.rstd[row];
    A xh[NV][VEC], wdy[NV][VEC];  // h first, then xhat in place; zeros past the row's end
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t col = (static_cast<int64_t>(k) * team + lane) * VEC;
      if (col < a.n) {
        load_pack(xh[k], a.x + off + col);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) xh[k][e] = wdy[k][e] = A(0);
      }
    }
    const A mean = a.rms ? A(0) : a.mean[row];
    A c[2] = {A(0), A(0)};
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t col = (static_cast<int64_t>(k) * team + lane) * VEC;
      if (col < a.n) {
        A wv[VEC], g[VEC];
        load_param(wv, a.w, col, A(1));
        load_pack(g, a.dy + off + col);
        to_xhat(xh[k], wdy[k], g, wv, mean, rstd);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          c[0] += xh[k][e] * wdy[k][e];
          c[1] += wdy[k][e];
          dw[k][e] += g[e] * xh[k][e];
          db[k][e] += g[e];
        }
      }
    }
    team_sum(c, !a.warp_rows);
    const A c1 = c[0] / static_cast<A>(a.n);
    const A c2 = a.rms ? A(0) : c[1] / static_cast<A>(a.n);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t col = (static_cast<int64_t>(k) * team + lane) * VEC;
      if (col < a.n) store_dx(a, off, col, xh[k], wdy[k], c1, c2, rstd);
    }
  }

  A* dw_out = a.dw_part + static_cast<int64_t>(blockIdx.x) * a.n;
  A* db_out = a.db_part != nullptr ? a.db_part + static_cast<int64_t>(blockIdx.x) * a.n : nullptr;
  if (!a.warp_rows) {  // one team: the block's threads own disjoint columns
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t col = (static_cast<int64_t>(k) * team + lane) * VEC;
      if (col < a.n) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          dw_out[col + e] = dw[k][e];
          if (db_out != nullptr) db_out[col + e] = db[k][e];
        }
      }
    }
    return;
  }
  A* s = dynamic_smem<A>();  // warp teams: (teams, n) of A, the launch's dynamic smem
  combine_warps(dw, s, dw_out, a.n, lane, team_id, teams);
  if (db_out != nullptr) combine_warps(db, s, db_out, a.n, lane, team_id, teams);
}

// Looped path, step 1: c1, c2 and the mean of every row (a block per row, any n) into coef.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kLoopThreads) norm_bwd_coef_kernel(const BwdArgs<T, W> a) {
  using A = at::opmath_type<T>;
  const int64_t start = static_cast<int64_t>(threadIdx.x) * VEC;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * VEC;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t off = row * a.n;
    const A mean = a.rms ? A(0) : a.mean[row];
    const A rstd = a.rstd[row];
    A c[2] = {A(0), A(0)};
    for (int64_t col = start; col < a.n; col += stride) {
      A wv[VEC], xh[VEC], g[VEC], wdy[VEC];
      load_param(wv, a.w, col, A(1));
      load_grad(xh, g, wdy, a, off, col, wv, mean, rstd);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        c[0] += xh[e] * wdy[e];
        c[1] += wdy[e];
      }
    }
    team_sum(c, true);
    if (threadIdx.x == 0) {
      a.coef[kCoefs * row] = c[0] / static_cast<A>(a.n);
      a.coef[kCoefs * row + 1] = a.rms ? A(0) : c[1] / static_cast<A>(a.n);
      a.coef[kCoefs * row + 2] = mean;
    }
  }
}

// Looped path, step 2: block (b, t) takes block b's rows (as in norm_bwd_reg_kernel) and the column
// tiles t, t + gridDim.y, ... of kTileThreads * VEC columns; each thread runs down its VEC columns
// over the rows in order, writing dx and adding dy * xhat and dy, then writes them to row b of the
// partial buffers. Every partial element has exactly one writer.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kTileThreads) norm_bwd_loop_kernel(const BwdArgs<T, W> a) {
  using A = at::opmath_type<T>;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * a.rows_per_block;
  const int64_t r1 = std::min(a.rows, r0 + a.rows_per_block);
  const int64_t tile = static_cast<int64_t>(blockDim.x) * VEC;
  for (int64_t col = static_cast<int64_t>(blockIdx.y) * tile + threadIdx.x * VEC; col < a.n;
       col += static_cast<int64_t>(gridDim.y) * tile) {
    A wv[VEC], dw[VEC], db[VEC];
    load_param(wv, a.w, col, A(1));
#pragma unroll
    for (int e = 0; e < VEC; ++e) dw[e] = db[e] = A(0);
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t off = row * a.n;
      const A* cf = a.coef + kCoefs * row;  // c1, c2, mean (as norm_bwd_coef_kernel used it)
      const A rstd = a.rstd[row];
      A xh[VEC], g[VEC], wdy[VEC];
      load_grad(xh, g, wdy, a, off, col, wv, cf[2], rstd);
      store_dx(a, off, col, xh, wdy, cf[0], cf[1], rstd);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        dw[e] += g[e] * xh[e];
        db[e] += g[e];
      }
    }
    const int64_t p = static_cast<int64_t>(blockIdx.x) * a.n + col;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      a.dw_part[p + e] = dw[e];
      if (a.db_part != nullptr) a.db_part[p + e] = db[e];
    }
  }
}

// out[c] = sum over p of part[p, c] (blockIdx.y: 0 -> dweight, 1 -> dbias), in a fixed order:
// thread row y adds p = y, y + kSumRows, ... in turn, then the kSumRows sums in order.
template <typename A>
__global__ void __launch_bounds__(kSumCols* kSumRows)
    norm_sum_partials_kernel(const A* dw_part, const A* db_part, A* dw, A* db, int64_t parts,
                             int64_t n) {
  __shared__ A s[kSumRows][kSumCols + 1];
  const A* part = blockIdx.y == 0 ? dw_part : db_part;
  A* out = blockIdx.y == 0 ? dw : db;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kSumCols + threadIdx.x;
  A t = 0;
  if (col < n) {
    for (int64_t p = threadIdx.y; p < parts; p += kSumRows) t += part[p * n + col];
  }
  s[threadIdx.y][threadIdx.x] = t;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    A u = 0;
    for (int r = 0; r < kSumRows; ++r) u += s[r][threadIdx.x];
    out[col] = u;
  }
}

// ------------------------------------------------------------------ launch plan (host side)

int round_up_warp(int64_t v) { return static_cast<int>(ceil_div(v, kWarpSize) * kWarpSize); }

int warp_nv(int64_t vecs) { return vecs <= kWarpSize ? 1 : vecs <= 2 * kWarpSize ? 2 : 4; }

// Forward register kernels: up to 4 vectors per thread (32 fp32 values for 16-bit inputs).
constexpr int kFwdNV = 4;

// Backward register kernels: at most 16 values per thread (xhat, wdy, and the dweight and dbias
// sums are each that long: 64 registers).
template <int VEC>
constexpr int bwd_nv() {
  return VEC >= 8 ? 2 : 4;
}

// The kernel a launch takes: a warp per row, a block per row (both register kernels), or the
// looped kernels.
enum NormPath : int { kWarpRows = 0, kBlockRow = 1, kLooped = 2 };

struct FwdPlan {
  NormPath path;
  int nv;  // register kernels: vectors per thread (the NV template argument)
  int grid, threads;
};

// Forward: rows of n elements in vectors of VEC, on a device of `sms` SMs.
template <int VEC>
FwdPlan fwd_plan(int64_t rows, int64_t n, int sms) {
  const int64_t vecs = ceil_div(n, VEC);
  const int64_t cap = static_cast<int64_t>(sms) * kBlocksPerSM;
  if (vecs <= int64_t{kWarpSize} * kFwdNV) {
    constexpr int kRowsPerBlock = kFwdWarpThreads / kWarpSize;
    const int grid = static_cast<int>(std::min(ceil_div(rows, kRowsPerBlock), cap));
    return {kWarpRows, warp_nv(vecs), grid, kFwdWarpThreads};
  }
  const int grid = static_cast<int>(std::min(rows, cap));
  if (vecs <= int64_t{kMaxThreads} * kFwdNV) {
    return {kBlockRow, kFwdNV, grid, round_up_warp(ceil_div(vecs, kFwdNV))};  // 64..kMaxThreads
  }
  return {kLooped, 0, grid, kLoopThreads};
}

struct BwdPlan {
  NormPath path;
  int nv;                         // register kernels: vectors per thread (the NV template argument)
  int threads;                    // register kernels
  int64_t parts, rows_per_block;  // partial rows of dweight/dbias, and the rows each block owns
  size_t smem;                    // warp per row: the warps' column sums (teams, n) of A
  int coef_grid;                  // looped: norm_bwd_coef_kernel's blocks
  int64_t tile_blocks;            // looped: norm_bwd_loop_kernel's gridDim.y
};

// Backward: rows of n elements in vectors of VEC, math type A, on a device of `sms` SMs.
template <int VEC, typename A>
BwdPlan bwd_plan(int64_t rows, int64_t n, int sms) {
  constexpr int kNV = bwd_nv<VEC>();
  const int64_t vecs = ceil_div(n, VEC);
  const bool in_registers = vecs <= int64_t{kMaxThreads} * kNV;
  BwdPlan p{};
  // Partial rows: register kernels get their parallelism from the blocks (one per partial row);
  // the looped kernel's blocks also split the columns, so it takes >= 8 rows per partial row to
  // keep the (parts, n) buffers small next to the input.
  int64_t parts = std::min<int64_t>(rows, int64_t{kPartsPerSM} * sms);
  if (!in_registers) parts = std::max<int64_t>(1, std::min(parts, rows / 8));
  p.rows_per_block = ceil_div(rows, parts);
  p.parts = ceil_div(rows, p.rows_per_block);  // every block has >= 1 row
  if (in_registers && vecs <= int64_t{kWarpSize} * kNV) {
    constexpr int kTeams = kBwdWarpThreads / kWarpSize;
    p.path = kWarpRows;
    p.nv = warp_nv(vecs);
    p.threads = kBwdWarpThreads;
    p.smem = static_cast<size_t>(kTeams) * n * sizeof(A);  // <= 16 KiB
  } else if (in_registers) {
    p.path = kBlockRow;
    p.nv = kNV;
    p.threads = round_up_warp(ceil_div(vecs, kNV));  // 64..kMaxThreads
  } else {
    p.path = kLooped;
    const int64_t cap = static_cast<int64_t>(sms) * kBlocksPerSM;
    p.coef_grid = static_cast<int>(std::min(rows, cap));
    // Column tiles per partial row: enough blocks in all to fill the GPU (grid-stride beyond).
    const int64_t tiles = ceil_div(n, int64_t{kTileThreads} * VEC);
    p.tile_blocks = std::min({tiles, std::max<int64_t>(1, cap / p.parts), kMaxGridY});
  }
  return p;
}

}  // namespace
}  // namespace fastattn::cuda
