// What every CUDA kernel file (csrc/cuda/*.cu) shares: the device side of device.cuh (vector packs,
// warp and block reductions), and on the host the alignment test for vector packs, the per-device
// limits cache, the shared-memory opt-in, compile-time dispatch over small powers of two, and
// output allocation.
//
// Included by .cu files only, after their light torch headers (no <torch/extension.h>, no
// <ATen/cuda/CUDAContext.h>). Everything here is inline or a template in fastattn::cuda, so the
// host-side caches (device_limits, max_dynamic_smem) are one per process, shared by every op.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "device.cuh"

namespace fastattn::cuda {

// ---------------------------------------------------------------- vector pack alignment

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;  // nullptr is aligned
}

// Whether rows that start `stride` elements of `elem` bytes apart from `p` (and any column that
// is a multiple of bytes / elem within them) can be read as `bytes`-wide packs: the base pointer
// AND the row stride must both be multiples of `bytes`. A null pointer (an absent input) fits.
inline bool packs_fit(const void* p, int64_t stride, size_t elem, size_t bytes = 16) {
  const auto row_bytes = static_cast<uint64_t>(stride) * elem;
  return is_aligned(p, bytes) && row_bytes % bytes == 0;
}

// -------------------------------------------------------------------------------- host side

inline void check_device_index(int device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "fastattn: CUDA device index ", device,
              " out of range [0, ", kMaxDevices, ")");
}

// The device's limits, queried once per device (std::call_once: thread-safe) and kept.
inline const DeviceLimits& device_limits(int device) {
  static DeviceLimits limits[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  check_device_index(device);
  std::call_once(once[device], [device] {
    DeviceLimits l;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&l.sm_count, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&l.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    l.sm_count = l.sm_count > 0 ? l.sm_count : 1;
    limits[device] = l;
  });
  return limits[device];
}

// The most dynamic shared memory `kernel` may launch with on `device` (which must be the current
// device: callers hold a device guard), having opted it in to all of it.
//
// cudaFuncAttributeMaxDynamicSharedMemorySize is process-wide state of (kernel, device). Setting
// it before each launch to that launch's own size races: thread A sets 200 KiB, thread B sets
// 60 KiB, and A's launch then fails ("invalid argument"). Instead the first call for a (kernel,
// device) sets it, once, to the largest value the device allows (opt-in limit less the kernel's
// static shared memory, as cudaFuncGetAttributes reports it), and later calls only read that
// value back: it is never lowered, so no launch can see a smaller limit than it checked against.
// The limit does not change occupancy (that follows each launch's actual size). The map is keyed
// by the kernel's address, so each instantiation of a template kernel gets its own entry; one
// mutex-guarded lookup per launch costs nanoseconds next to the launch itself. A failed call
// throws and leaves no entry, so the next call tries again.
template <typename Kernel>
int max_dynamic_smem(Kernel* kernel, int device) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> opted_in;
  check_device_index(device);
  TORCH_INTERNAL_ASSERT(c10::cuda::current_device() == device,
                        "fastattn: max_dynamic_smem needs device ", device, " to be current");
  const std::pair<const void*, int> key{reinterpret_cast<const void*>(kernel), device};
  const std::lock_guard<std::mutex> lock(mu);
  if (const auto it = opted_in.find(key); it != opted_in.end()) return it->second;
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const int bytes = device_limits(device).smem_optin - static_cast<int>(attr.sharedSizeBytes);
  TORCH_CHECK(bytes >= 0, "fastattn: a kernel's static shared memory (", attr.sharedSizeBytes,
              " bytes) exceeds device ", device, "'s limit");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  opted_in.emplace(key, bytes);
  return bytes;
}

// Calls f(std::integral_constant<int, N>{}) for n in {1, 2, 4, 8}, N <= kMax: one kernel
// instantiation per value, picked at run time.
template <int kMax, typename F>
void with_pow2(int n, F&& f) {
  using std::integral_constant;
  switch (n) {
    case 1:
      return f(integral_constant<int, 1>{});
    case 2:
      if constexpr (kMax >= 2) return f(integral_constant<int, 2>{});
      break;
    case 4:
      if constexpr (kMax >= 4) return f(integral_constant<int, 4>{});
      break;
    case 8:
      if constexpr (kMax >= 8) return f(integral_constant<int, 8>{});
      break;
  }
  TORCH_INTERNAL_ASSERT(false, "fastattn: no kernel instantiation for ", n, " (at most ", kMax,
                        ")");
}

// An uninitialised contiguous tensor of like's shape, dtype and device, allocated on the current
// stream (callers hold a device guard); NaN-filled under FASTATTN_POISON_OUTPUTS=1 (the tests
// set it), so that an element a kernel fails to write shows up.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  const char* poison = std::getenv("FASTATTN_POISON_OUTPUTS");
  if (poison != nullptr && std::strcmp(poison, "1") == 0) out.fill_(NAN);
  return out;
}
inline at::Tensor new_output(const at::Tensor& like) {
  return new_output(like.sizes(), like.options());
}

}  // namespace fastattn::cuda
