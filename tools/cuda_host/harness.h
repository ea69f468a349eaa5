// What the harness's translation units (harness.cpp, harness_norm.cpp) share: error reporting,
// the vector-pack alignment test and the dtype dispatch of their ctypes entry points. After
// cuda_host.h.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>

namespace cuda_host_harness {

inline int report(const std::exception& e, char* err, int errlen) {
  std::snprintf(err, static_cast<size_t>(errlen), "%s", e.what());
  return 1;
}

// As common.cuh's packs_fit (host code the harness does not compile: it needs torch's tensors).
inline bool fits(const void* p, int64_t stride, size_t elem, size_t bytes = 16) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0 &&
         (static_cast<uint64_t>(stride) * elem) % bytes == 0;
}

// f(T{}) for the tests' dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16.
template <typename F>
int dispatch(int dtype, F&& f) {
  switch (dtype) {
    case 0:
      f(float{});
      return 0;
    case 1:
      f(double{});
      return 0;
    case 2:
      f(c10::Half{});
      return 0;
    case 3:
      f(c10::BFloat16{});
      return 0;
  }
  throw cuda_host::Error("harness: unknown dtype code " + std::to_string(dtype));
}

}  // namespace cuda_host_harness
