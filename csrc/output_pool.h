// Output tensors of the CPU ops, from a small cache of freed blocks (see output_pool.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastattn {

// An uninitialised CPU tensor of `shape` (contiguous) for an op's output; NaN-filled under
// FASTATTN_POISON_OUTPUTS=1 (the tests set it), as dispatch.new_output does for the Python
// paths, so that an element a kernel fails to write shows up.
at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts);

struct OutputPoolStats {
  int64_t limit_bytes;   // FASTATTN_CPU_CACHE_BYTES (0: the cache is off)
  int64_t cached_bytes;  // freed blocks kept for reuse
  int64_t cached_blocks;
  int64_t live_bytes;  // blocks held by tensors now
  int64_t hits;        // outputs served from the cache
  int64_t misses;      // outputs that needed fresh memory from the OS
};

OutputPoolStats output_pool_stats();

// Returns every cached block to the OS; the bytes released.
int64_t output_pool_release();

}  // namespace fastattn
