// The attention dropout's integer threshold and scale, shared by the CPU (csrc/attention.cpp) and
// CUDA (csrc/cuda/attention.cu) launchers: an entry is kept iff the top 24 bits of its hash are
// >= the threshold (fastattn.reference.dropout_threshold). No torch headers: nvcc compiles it too.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace fastattn {

inline uint32_t dropout_threshold(double p) {
  const double t = std::floor(p * double(1 << 24) + 0.5);
  return static_cast<uint32_t>(std::min(t, double(1 << 24)));
}

// The kept entries' scale 1 / (1 - p); 0 at p == 1 (the op's schema allows it; the public
// functions refuse it), where nothing is kept and the output is zeros, not 0 * inf.
inline double dropout_scale(double p) { return p < 1.0 ? 1.0 / (1.0 - p) : 0.0; }

}  // namespace fastattn
