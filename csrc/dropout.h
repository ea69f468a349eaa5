// The attention dropout's integer threshold, shared by the CPU (csrc/attention.cpp) and CUDA
// (csrc/cuda/attention.cu) launchers: an entry is kept iff the top 24 bits of its hash are >= it
// (fastattn.reference.dropout_threshold). No torch headers: nvcc compiles it too.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace fastattn {

inline uint32_t dropout_threshold(double p) {
  const double t = std::floor(p * double(1 << 24) + 0.5);
  return static_cast<uint32_t>(std::min(t, double(1 << 24)));
}

}  // namespace fastattn
