// The device side that every CUDA kernel (csrc/cuda/*_kernels.cuh) shares: the warp constants,
// vector packs, warp and block reductions, the block's dynamic shared memory, ceil_div.
//
// No torch and no CUDA runtime headers: nvcc sees it through common.cuh, and the host execution
// layer (tools/cuda_host/cuda_host.h, the tests' harness; it defines FASTATTN_CUDA_HOST and the
// built-ins) compiles it with g++.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace fastattn::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;  // the only shuffle mask: reductions use whole warps
constexpr int kMaxBlockThreads = 1024;
constexpr int64_t kMaxGridY = 65535;  // gridDim.y and gridDim.z (gridDim.x: 2^31 - 1)
constexpr int kMaxDevices = 64;       // size of the per-device caches

// ------------------------------------------------------------------------------ vector packs

// N values of T moved as one access (two for 32 bytes). Only for pointers that pass
// packs_fit: a misaligned pack access is a fault on the device ("misaligned address").
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

template <int N, typename A, typename T>
__device__ __forceinline__ void load_pack(A (&v)[N], const T* p) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int e = 0; e < N; ++e) v[e] = static_cast<A>(pk.v[e]);
}

template <int N, typename T, typename A>
__device__ __forceinline__ void store_pack(T* p, const A (&v)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int e = 0; e < N; ++e) pk.v[e] = static_cast<T>(v[e]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// ------------------------------------------------------------------------------- reductions

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

// fmax: ignores a NaN operand (a caller that must propagate NaN does so through a sum).
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    if constexpr (std::is_same_v<T, float>) {
      return fmaxf(a, b);
    } else {
      return fmax(a, b);
    }
  }
};

// Reduces v over aligned groups of `width` lanes (a power of two <= 32) by XOR shuffles. The mask
// is the whole warp, so all 32 lanes must call it, converged: callers give lanes without work an
// identity value instead of skipping the call. Every lane of a group gets the group's result with
// the same bits (each step combines the same two values on both lanes of a pair).
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op, int width = kWarpSize) {
  for (int o = width >> 1; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// The second step of a block reduction: each v[k] holds its warp's result (warp_reduce); combines
// the warps' results, in warp order, so that every thread of the block gets the same bits.
// blockDim.x a multiple of 32, at most 1024; every thread of the block must call it. It starts
// with a barrier, so that consecutive calls (and rows of a grid-stride loop) can share scratch.
template <int K, typename T, typename Op>
__device__ __forceinline__ void combine_warps_each(T (&v)[K], Op op, T identity) {
  __shared__ T scratch[kMaxBlockThreads / kWarpSize][K];
  const int warps = blockDim.x / kWarpSize;
  if (warps == 1) return;
  const int warp = threadIdx.x / kWarpSize;
  __syncthreads();  // the previous call's readers are done with scratch
  if (threadIdx.x % kWarpSize == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) scratch[warp][k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    T r = identity;
    for (int w = 0; w < warps; ++w) r = op(r, scratch[w][k]);
    v[k] = r;
  }
}

// Reduces each v[k] over the block (see combine_warps_each for the conditions).
template <int K, typename T, typename Op>
__device__ __forceinline__ void block_reduce_each(T (&v)[K], Op op, T identity) {
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_reduce(v[k], op);
  combine_warps_each(v, op, identity);
}

template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T identity) {
  T a[1] = {v};
  block_reduce_each(a, op, identity);
  return a[0];
}

// What a launch plan needs of the device (filled by common.cuh's device_limits).
struct DeviceLimits {
  int sm_count = 0;
  int smem_optin = 0;  // largest static + dynamic shared memory a block may opt in to
};

// The block's dynamic shared memory (the launch's third <<<>>> argument) as T, 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
#ifdef FASTATTN_CUDA_HOST
  return static_cast<T*>(cuda_host::dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char fastattn_dynamic_smem[];
  return reinterpret_cast<T*>(fastattn_dynamic_smem);
#endif
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace fastattn::cuda
