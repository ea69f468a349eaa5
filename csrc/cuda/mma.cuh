// The tensor-core and asynchronous-copy primitives of the CUDA attention kernels: mma.sync
// m16n8k16 (fp16 / bf16 inputs, fp32 accumulators), ldmatrix (x4, plain and transposed) and
// cp.async (16 bytes, zero-filling, in commit groups), as small device functions over inline PTX
// (sm_80 and later).
//
// Under the host execution layer (FASTATTN_CUDA_HOST: the tests' harness), the same functions come
// from tools/cuda_host/tensor_core.h, a portable implementation that follows the PTX ISA's
// fragment layouts, included before this header.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"; g = lane / 4, t = lane % 4):
//   A (16 x 16, row-major), 4 registers of 2 elements: a0 = (g, 2t..2t+1), a1 = (g + 8, 2t..),
//     a2 = (g, 2t + 8..), a3 = (g + 8, 2t + 8..);
//   B (16 x 8, "col"), 2 registers: b0 = (k = 2t..2t+1, n = g), b1 = (k = 2t + 8.., n = g);
//   C / D (16 x 8, fp32), 4 floats: c0, c1 = (g, 2t..2t+1), c2, c3 = (g + 8, 2t..2t+1).
// ldmatrix .x4: lanes 8i..8i+7 give the row addresses (16 bytes each) of matrix i; lane l gets,
// of each matrix, row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (.trans: the transposed
// matrix's, i.e. rows 2 (l % 4) and 2 (l % 4) + 1 of column l / 4).
#pragma once
#include <cstdint>

#ifndef FASTATTN_CUDA_HOST
namespace fastattn::cuda {

// d += a * b for one m16n8k16 tile; kBf16 picks the bf16 (else fp16) input type.
template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 matrices of 16-bit elements from shared memory (see the layout above); `row` is this
// lane's row address.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

// 16 bytes global -> shared, asynchronously (L2 only: .cg); zeros when !valid (nothing is read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src),
               "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace fastattn::cuda
#endif
