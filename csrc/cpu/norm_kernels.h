// Interface between the torch-facing LayerNorm/RMSNorm op (csrc/norm.cpp) and its per-ISA row
// kernels (csrc/cpu/norm_<isa>.cpp, written once in norm_impl.h): plain argument structs and a
// pair of function pointers. No torch types cross this boundary.
//
// Per row of n elements (semantics of fastattn/reference.py::norm):
//   h = res ? T(x + res) : x      (x's dtype T: h is rounded before it is normalised)
//   LayerNorm: mean = sum(h)/n, rstd = 1/sqrt(sum((h - mean)^2)/n + eps)   (centred)
//   RMSNorm:   mean = 0,        rstd = 1/sqrt(sum(h^2)/n + eps)
//   y = (h - mean) * rstd * w + b
// Backward, from the normalised input h: xhat = (h - mean) * rstd, g = dy * w,
//   dx = (g - (xhat * mean_row(xhat * g) + (rms ? 0 : mean_row(g)))) * rstd + dh,
//   dw += dy * xhat, db += dy   (into the caller's partial rows, summed in a fixed order).
// Math in fp32 (in float64 for float64 data); the statistics are stored in the math type.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastattn::cpu {

// Row-major (rows, n) data of dtype T. w and b, mean and rstd have the math type (float, or
// double for float64 data). Nullable: res and h (no residual), w and b (unused by the variant),
// mean (RMSNorm).
struct NormFwdArgs {
  const void* x;
  const void* res;
  const void* w;
  const void* b;
  void* y;
  void* h;  // written: the rounded x + res
  void* mean;
  void* rstd;
  int64_t n;
  double eps;
  bool stream;  // write y with non-temporal stores (outputs too large to stay cached)
};

// Nullable: dh (no residual gradient), mean (RMSNorm). w is never null (ones if absent).
struct NormBwdArgs {
  const void* dy;
  const void* dh;
  const void* h;
  const void* w;
  const void* mean;
  const void* rstd;
  void* dx;
  int64_t n;
  bool stream;  // write dx with non-temporal stores
};

// Rows [r0, r1). The backward adds into dw / db (math type, n each; db unused without bias).
// scratch: n values of the math type, per thread (the forward keeps a streamed h there).
using NormFwdFn = void (*)(const NormFwdArgs&, int64_t r0, int64_t r1, void* scratch);
using NormBwdFn = void (*)(const NormBwdArgs&, int64_t r0, int64_t r1, void* dw, void* db);

// Compile-time variants. Forward: rms, res, and affine (0: none; 1: y * w; 2: y * w + b, with
// w = 1 standing in for a missing weight). Backward: rms, dh, and bias (db wanted).
struct NormVariant {
  bool rms, res;
  int affine;
  bool dh, bias;
};

struct NormKernels {
  NormFwdFn fwd;
  NormBwdFn bwd;
};

// Kernels of one ISA for data of dtype x; null where the path does not serve x (float64 is
// served by the scalar path only). Call only the table of an ISA the CPU supports (cpu_isa.h).
NormKernels norm_kernels_avx512(DType x, NormVariant v);
NormKernels norm_kernels_avx512bf16(DType x, NormVariant v);  // bf16 only, if the CPU has it
NormKernels norm_kernels_avx2(DType x, NormVariant v);
NormKernels norm_kernels_scalar(DType x, NormVariant v);

}  // namespace fastattn::cpu
