// Interface between the torch-facing softmax op (csrc/softmax.cpp) and its per-ISA kernels
// (csrc/cpu/softmax_<isa>.cpp): plain argument structs and a table of function pointers.
// No torch types cross this boundary.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastattn::cpu {

constexpr int kMaxMaskDims = 16;
// Rows with at most this many visible columns are done in one read of x: z and then exp(z - max)
// live in a per-thread fp32 scratch row, and the write pass reads them from cache while the next
// row is being computed (two such rows, double-buffered: 1 MiB in fp32). Longer rows use the
// online (two-read) path, which needs only a small block buffer.
constexpr int64_t kShortRowMax = 131072;
constexpr int64_t kScratchBytes = 2 * (kShortRowMax + 64) * sizeof(double);

struct SoftmaxFwdArgs {
  const void* x;  // (rows, cols) contiguous, dtype chosen by the kernel table
  void* y;        // same shape and dtype, written
  int64_t cols;
  double scale;
  bool log;
  bool stream;  // write y with non-temporal stores (outputs much larger than the caches)
  bool causal;
  int64_t causal_rows;  // causal row index of row r is r % causal_rows
  // Mask (nullptr: none), read in place through strides. The outer (all but last) dims of x are
  // coalesced into mask_ndim dims; row r's mask data start at sum_k idx_k * mask_strides[k].
  const void* mask;
  DType mask_dtype;
  bool mask_per_column;  // last-dim stride 1; otherwise one mask value per row (stride 0)
  int mask_ndim;
  int64_t mask_sizes[kMaxMaskDims];
  int64_t mask_strides[kMaxMaskDims];
};

// Softmax statistics of a row segment: max, sum of exp(z - max), NaN seen.
struct RowStats {
  double max;
  double sum;
  bool nan;
};

struct SoftmaxBwdArgs {
  const void* grad;  // (rows, cols) contiguous
  const void* y;     // forward output, same shape/dtype
  void* dx;          // written
  int64_t cols;
  double scale;
  bool log;
  bool stream;  // as in SoftmaxFwdArgs
};

// Whole rows [r0, r1); scratch holds kScratchBytes.
using FwdRowsFn = void (*)(const SoftmaxFwdArgs&, int64_t r0, int64_t r1, void* scratch);
// Columns [c0, c1) of one row, for splitting a long row across threads: the statistics of the
// segment, then (after the statistics of all segments are merged) the output of the segment.
using FwdStatsFn = RowStats (*)(const SoftmaxFwdArgs&, int64_t row, int64_t c0, int64_t c1,
                                void* scratch);
using FwdWriteFn = void (*)(const SoftmaxFwdArgs&, int64_t row, int64_t c0, int64_t c1,
                            const RowStats& merged);
using BwdRowsFn = void (*)(const SoftmaxBwdArgs&, int64_t r0, int64_t r1);
// Row reduction of the backward pass over [c0, c1): sum(g*y), or sum(g) where y != -inf (log).
using BwdDotFn = double (*)(const SoftmaxBwdArgs&, int64_t row, int64_t c0, int64_t c1);
using BwdWriteFn = void (*)(const SoftmaxBwdArgs&, int64_t row, int64_t c0, int64_t c1, double dot);

struct SoftmaxKernels {
  FwdRowsFn fwd_rows;
  FwdStatsFn fwd_stats;
  FwdWriteFn fwd_write;
  BwdRowsFn bwd_rows;
  BwdDotFn bwd_dot;
  BwdWriteFn bwd_write;
};

// Kernel tables per ISA for x's dtype and the mask (dtype; per-column or per-row). Entries are
// null for combinations a path does not serve (float64 is served by the scalar path only).
// Call only the table of an ISA the CPU supports (see cpu_isa.h).
SoftmaxKernels softmax_kernels_avx512(DType x, DType mask, bool mask_per_column);
// bf16 only, and only when the CPU also has AVX512_BF16 (empty otherwise).
SoftmaxKernels softmax_kernels_avx512bf16(DType x, DType mask, bool mask_per_column);
SoftmaxKernels softmax_kernels_avx2(DType x, DType mask, bool mask_per_column);
SoftmaxKernels softmax_kernels_scalar(DType x, DType mask, bool mask_per_column);

}  // namespace fastattn::cpu
