// The host harness of tests/test_cuda_host.py: a shared library (loaded with ctypes) that runs
// fastattn's CUDA kernels through the host execution layer (cuda_host.h), with the launch plan of
// the real launchers (csrc/cuda/softmax.cu), and the layer's own self-test kernels (the norm
// kernels: harness_norm.cpp, linked into the same library).
//
// Every entry point returns 0, or 1 with the layer's error message in `err`.
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda_host.h"
// clang-format off: the layer must come before the kernels
#include "harness.h"
#include "softmax_kernels.cuh"
// clang-format on

#include <cstdio>

namespace {

using namespace fastattn::cuda;  // NOLINT: the harness drives this namespace's kernels
using cuda_host_harness::dispatch;
using cuda_host_harness::fits;
using cuda_host_harness::report;

struct MaskIn {
  const void* ptr;
  int kind;  // MaskKind
  size_t elem;
  int64_t s0, s1, s2, sc, d1, d2;
};

// launch_forward of softmax.cu, with the device limits given (sm_count 1 makes the grid-stride
// loops run; a small smem_optin makes long rows take the online two-pass path). path: 0 warp
// kernel, 1 block kernel with the logits cached in shared memory, 2 block kernel online.
template <typename scalar_t>
void forward(const void* xv, void* yv, int64_t rows, int64_t cols, int64_t causal_rows,
             double scale, bool log, bool causal, const MaskIn& m, const DeviceLimits& lim,
             int* path) {
  using L = Layout<scalar_t>;
  using Acc = typename L::Acc;
  constexpr int kVec = L::kVec;
  const auto* xp = static_cast<const scalar_t*>(xv);
  auto* yp = static_cast<scalar_t*>(yv);
  FwdArgs<Acc> a{};
  a.rows = rows;
  a.cols = cols;
  a.scale = static_cast<Acc>(scale);
  a.log = log;
  a.causal = causal;
  a.causal_rows = causal_rows;
  a.vec = fits(xp, cols, sizeof(scalar_t)) && fits(yp, cols, sizeof(scalar_t));
  a.mask_kind = m.kind;
  a.mask = m.ptr;
  a.s0 = m.s0;
  a.s1 = m.s1;
  a.s2 = m.s2;
  a.sc = m.sc;
  a.d1 = m.d1;
  a.d2 = m.d2;
  if (m.kind != kNoMask) {
    const size_t pack = std::min<size_t>(m.elem * kVec, 16);
    a.mask_vec = a.sc == 1 && fits(m.ptr, a.s0, m.elem, pack) && fits(m.ptr, a.s1, m.elem, pack) &&
                 fits(m.ptr, a.s2, m.elem, pack);
  }
  const WarpLaunch w = warp_launch<scalar_t>(rows, cols, lim);
  if (w.use) {
    *path = 0;
    auto go = [&](auto iters) {
      cuda_host::launch(softmax_fwd_warp_kernel<scalar_t, kVec, decltype(iters)::value>, w.grid,
                        kWarpKernelThreads, 0, xp, yp, a, w.log2_group);
    };
    switch (w.iters) {
      case 1:
        return go(std::integral_constant<int, 1>{});
      case 2:
        return go(std::integral_constant<int, 2>{});
      case 4:
        if constexpr (L::kMaxIters >= 4) return go(std::integral_constant<int, 4>{});
        break;
      case 8:
        if constexpr (L::kMaxIters >= 8) return go(std::integral_constant<int, 8>{});
        break;
    }
    throw cuda_host::Error("harness: no warp kernel for iters " + std::to_string(w.iters));
  }
  const int64_t nvec = ceil_div(cols, kVec);
  const int threads = block_threads(nvec);
  const int64_t cache_bytes = nvec * static_cast<int64_t>(sizeof(Pack<Acc, kVec>));
  const bool cached = cache_bytes <= lim.smem_optin;
  *path = cached ? 1 : 2;
  cuda_host::launch(softmax_fwd_block_kernel<scalar_t, kVec>, grid_size(rows, threads, lim),
                    threads, cached ? static_cast<size_t>(cache_bytes) : 0, xp, yp, a, cached);
}

template <typename scalar_t>
void backward(const void* gv, const void* yv, void* dxv, int64_t rows, int64_t cols, double scale,
              bool log, const DeviceLimits& lim, int* path) {
  using L = Layout<scalar_t>;
  using Acc = typename L::Acc;
  constexpr int kVec = L::kVec;
  const auto* gp = static_cast<const scalar_t*>(gv);
  const auto* yp = static_cast<const scalar_t*>(yv);
  auto* dxp = static_cast<scalar_t*>(dxv);
  BwdArgs<Acc> a{};
  a.rows = rows;
  a.cols = cols;
  a.scale = static_cast<Acc>(scale);
  a.log = log;
  a.vec = fits(gp, cols, sizeof(scalar_t)) && fits(yp, cols, sizeof(scalar_t)) &&
          fits(dxp, cols, sizeof(scalar_t));
  const WarpLaunch w = warp_launch<scalar_t>(rows, cols, lim);
  if (w.use) {
    *path = 0;
    auto go = [&](auto iters) {
      cuda_host::launch(softmax_bwd_warp_kernel<scalar_t, kVec, decltype(iters)::value>, w.grid,
                        kWarpKernelThreads, 0, gp, yp, dxp, a, w.log2_group);
    };
    switch (w.iters) {
      case 1:
        return go(std::integral_constant<int, 1>{});
      case 2:
        return go(std::integral_constant<int, 2>{});
      case 4:
        if constexpr (L::kMaxIters >= 4) return go(std::integral_constant<int, 4>{});
        break;
      case 8:
        if constexpr (L::kMaxIters >= 8) return go(std::integral_constant<int, 8>{});
        break;
    }
    throw cuda_host::Error("harness: no warp kernel for iters " + std::to_string(w.iters));
  }
  *path = 1;
  const int threads = block_threads(ceil_div(cols, kVec));
  cuda_host::launch(softmax_bwd_block_kernel<scalar_t, kVec>, grid_size(rows, threads, lim),
                    threads, 0, gp, yp, dxp, a);
}

// ------------------------------------------------------------------ the layer's self-test kernels

// Each thread writes its slot, then reads its neighbour's after the barrier: without a real
// barrier (a thread run to completion before the next starts) thread 0 reads an unwritten slot.
__global__ void barrier_kernel(int* out) {
  __shared__ int s[256];
  const int t = threadIdx.x, n = blockDim.x;
  s[t] = t * 10 + static_cast<int>(blockIdx.x);
  __syncthreads();
  out[blockIdx.x * n + t] = s[(t + 1) % n];
  __syncthreads();  // the next block reuses s (blocks run one after another here)
}

// out[tid * 8 + k]: the lane's results of the 8 collectives below.
__global__ void warp_kernel(int* out, int width) {
  const int t = threadIdx.x, lane = t % 32;
  int* o = out + t * 8;
  o[0] = __shfl_xor_sync(0xffffffffu, t, 1, width);
  o[1] = __shfl_xor_sync(0xffffffffu, t, 16, width);
  o[2] = __shfl_down_sync(0xffffffffu, t, 3, width);
  o[3] = __shfl_up_sync(0xffffffffu, t, 2, width);
  o[4] = __shfl_sync(0xffffffffu, t, 5, width);
  o[5] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  o[6] = __any_sync(0xffffffffu, t == 40);
  o[7] = __all_sync(0xffffffffu, lane < 31);
}

__global__ void reduce_kernel(float* out) {
  const float v = block_reduce(static_cast<float>(threadIdx.x), SumOp{}, 0.0f);
  out[threadIdx.x] = v;
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void barrier_vs_shuffle_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x < 32) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = v;
}

__global__ void divergent_shuffle_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x % 2 == 0) v = __shfl_xor_sync(0xffffffffu, v, 2);  // odd lanes never arrive
  out[threadIdx.x] = v;
}

__global__ void mixed_collectives_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  v = threadIdx.x < 16 ? __shfl_xor_sync(0xffffffffu, v, 1) : __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void partial_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void dynamic_smem_kernel(float* out) {
  float* s = dynamic_smem<float>();
  const int t = threadIdx.x;
  s[t] = static_cast<float>(t);
  __syncthreads();
  out[t] = s[blockDim.x - 1 - t];
}

// ----------------------------------------- the race check's self-tests (racy on purpose or not)

// Threads 3 and 40 (two warps) write s[5] between the same two barriers.
__global__ void race_write_write_kernel(int* out) {
  __shared__ int s[64];
  const int t = threadIdx.x;
  if (t == 3 || t == 40) s[5] = t;
  __syncthreads();
  out[t] = s[5];
}

// After a barrier, thread 7 writes s[9] and thread 50 then reads it, no barrier between. (The
// reads index by t so that the compiler cannot hoist them out of their condition: out of bounds
// for other threads.)
__global__ void race_write_read_kernel(int* out) {
  __shared__ int s[64];
  const int t = threadIdx.x;
  s[t] = t;
  __syncthreads();
  if (t == 7) s[9] = -1;
  if (t == 50) out[t] = s[t - 41];
}

// Thread 2 reads s[1] (written before the barrier), then thread 33 writes it.
__global__ void race_read_write_kernel(int* out) {
  __shared__ int s[64];
  const int t = threadIdx.x;
  s[t] = t;
  __syncthreads();
  if (t == 2) out[t] = s[t - 1];
  if (t == 33) s[1] = -1;
}

// Thread 1 writes s[0], thread `reader` reads it; between them (sync) nothing (0), a __syncwarp
// (1), a shuffle, which orders no memory (2).
__global__ void race_warp_kernel(int* out, int sync, int reader) {
  __shared__ int s[32];
  const int t = threadIdx.x;
  if (t == 1) s[0] = 11;
  if (sync == 1) __syncwarp();
  if (sync == 2) out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
  if (t == reader) out[t] = s[t - reader];
}

// Threads 4 and 36 write the 11th int of the dynamic shared memory.
__global__ void race_dynamic_kernel(int* out) {
  int* d = dynamic_smem<int>();
  const int t = threadIdx.x;
  if (t == 4 || t == 36) d[10] = t;
  __syncthreads();
  out[t] = d[10];
}

// Thread 5 writes the int just past `n` ints of dynamic shared memory.
__global__ void race_past_kernel(int* out, int n) {
  int* d = dynamic_smem<int>();
  const int t = threadIdx.x;
  if (t == 5) d[n] = t;
  out[t] = t;
}

// Thread 0 copies 42 into s[3] on behalf of thread 5 (smem_copy_as: as tensor_core.h's cp.async
// at its wait), thread 9 reads it after a barrier (barrier 1) or with none (0).
__global__ void race_as_kernel(int* out, int barrier) {
  __shared__ int s[8];
  const int t = threadIdx.x, v = 42;
  if (t == 0) cuda_host::detail::smem_copy_as(5, &s[3], &v, sizeof v);
  if (barrier != 0) __syncthreads();
  if (t == 9) out[t] = s[t - 6];
}

// Every thread adds 1 to s[0] atomically: not a race.
__global__ void race_atomic_kernel(int* out) {
  __shared__ int s[1];
  const int t = threadIdx.x;
  if (t == 0) s[0] = 0;
  __syncthreads();
  atomicAdd(&s[0], 1);
  __syncthreads();
  out[t] = s[0];
}

}  // namespace

extern "C" {

int fa_softmax_forward(int dtype, const void* x, void* y, int64_t rows, int64_t cols,
                       int64_t causal_rows, double scale, int log, int causal, const void* mask,
                       int mask_kind, int64_t mask_elem, const int64_t* mask_strides, int sm_count,
                       int smem_optin, int* path, char* err, int errlen) {
  try {
    const MaskIn m{mask,
                   mask_kind,
                   static_cast<size_t>(mask_elem),
                   mask_strides[0],
                   mask_strides[1],
                   mask_strides[2],
                   mask_strides[3],
                   mask_strides[4],
                   mask_strides[5]};
    const DeviceLimits lim{sm_count, smem_optin};
    return dispatch(dtype, [&](auto t) {
      forward<decltype(t)>(x, y, rows, cols, causal_rows, scale, log != 0, causal != 0, m, lim,
                           path);
    });
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}

int fa_softmax_backward(int dtype, const void* g, const void* y, void* dx, int64_t rows,
                        int64_t cols, double scale, int log, int sm_count, int* path, char* err,
                        int errlen) {
  try {
    const DeviceLimits lim{sm_count, 0};
    return dispatch(dtype, [&](auto t) {
      backward<decltype(t)>(g, y, dx, rows, cols, scale, log != 0, lim, path);
    });
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}

// Self-tests by name; out: ints (floats for "reduce", "dynamic_smem").
int fa_selftest(const char* name, int blocks, int threads, int arg, void* out, char* err,
                int errlen) {
  try {
    const std::string n = name;
    auto* o = static_cast<int*>(out);
    if (n == "barrier") {
      cuda_host::launch(barrier_kernel, blocks, threads, 0, o);
    } else if (n == "warp") {
      cuda_host::launch(warp_kernel, blocks, threads, 0, o, arg);
    } else if (n == "reduce") {
      cuda_host::launch(reduce_kernel, blocks, threads, 0, static_cast<float*>(out));
    } else if (n == "dynamic_smem") {
      cuda_host::launch(dynamic_smem_kernel, blocks, threads,
                        static_cast<size_t>(arg) * sizeof(float), static_cast<float*>(out));
    } else if (n == "divergent_barrier") {
      cuda_host::launch(divergent_barrier_kernel, blocks, threads, 0, o);
    } else if (n == "barrier_vs_shuffle") {
      cuda_host::launch(barrier_vs_shuffle_kernel, blocks, threads, 0, o);
    } else if (n == "divergent_shuffle") {
      cuda_host::launch(divergent_shuffle_kernel, blocks, threads, 0, o);
    } else if (n == "mixed_collectives") {
      cuda_host::launch(mixed_collectives_kernel, blocks, threads, 0, o);
    } else if (n == "partial_mask") {
      cuda_host::launch(partial_mask_kernel, blocks, threads, 0, o);
    } else if (n == "race_write_write") {
      cuda_host::launch(race_write_write_kernel, blocks, threads, 0, o);
    } else if (n == "race_write_read") {
      cuda_host::launch(race_write_read_kernel, blocks, threads, 0, o);
    } else if (n == "race_read_write") {
      cuda_host::launch(race_read_write_kernel, blocks, threads, 0, o);
    } else if (n == "race_warp") {  // arg: sync + 4 * reader
      cuda_host::launch(race_warp_kernel, blocks, threads, 0, o, arg % 4, arg / 4);
    } else if (n == "race_dynamic") {
      cuda_host::launch(race_dynamic_kernel, blocks, threads, threads * sizeof(int), o);
    } else if (n == "race_past") {  // arg: the ints of dynamic shared memory
      cuda_host::launch(race_past_kernel, blocks, threads, static_cast<size_t>(arg) * sizeof(int),
                        o, arg);
    } else if (n == "race_as") {
      cuda_host::launch(race_as_kernel, blocks, threads, 0, o, arg);
    } else if (n == "race_atomic") {
      cuda_host::launch(race_atomic_kernel, blocks, threads, 0, o);
    } else {
      throw cuda_host::Error("harness: no self-test " + n);
    }
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}

// The shared-memory race check on (1) or off (0) for the launches that follow; *recorded: the
// shared-memory accesses it recorded since the previous call.
int fa_set_race_check(int on, int64_t* recorded, char* err, int errlen) {
  try {
    *recorded = static_cast<int64_t>(cuda_host::race_check_recorded());
    cuda_host::set_race_check(on != 0);
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}

}  // extern "C"
