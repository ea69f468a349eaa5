// Interface between the torch-facing attention ops (csrc/attention.cpp) and their per-ISA kernels
// (csrc/cpu/attention_<isa>.cpp, one template in attention_impl.h): a plain argument struct and a
// table of function pointers. No torch types cross this boundary.
//
// Work layout. Forward: one call handles query rows [i0, i1) of every query head of one kv head
// (so each K/V block is read once per group) against keys [j0, j1), in tiles of kKeyBlock keys
// with an online softmax; either it writes out/lse, or (split-K, decode) it leaves a partial
// (max, sum, unnormalised out) per row that fwd_merge combines in a fixed order. Backward: one
// call handles keys [j0, j1) of one kv head against every query of its group, FA2-style
// (P recomputed from lse): it writes dk/dv of those keys and adds dS K into a per-key-chunk
// opmath dq accumulator, which bwd_dq sums over the chunks in a fixed order. Nothing is ever
// reduced in an order that depends on thread scheduling.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastattn::cpu {

constexpr int64_t kKeyBlock = 64;       // keys per backward tile (a multiple of every vector width)
constexpr int64_t kFwdKeyBlock = 128;   // keys per forward tile (a multiple of 32)
constexpr int64_t kQueryBlockBwd = 64;  // query rows per tile in the backward pass

struct AttnArgs {
  int64_t B, H, Hkv, Sq, Sk, D, Dv;  // D: q/k head_dim, Dv: v's (and out's)
  // Inputs, last dim contiguous; strides in elements for (batch, head, seq).
  const void* q;
  const void* k;
  const void* v;
  int64_t q_str[3], k_str[3], v_str[3];
  double scale;
  // Key j is visible from query i when i + causal_offset - win_left <= j (win_left >= 0) and
  // j <= i + causal_offset + win_right (win_right >= 0); -1: unbounded. Causal is win_right 0.
  int64_t causal_offset, win_left, win_right;
  double softcap;  // > 0: scores become softcap * tanh(s / softcap) before biases and masks
  // Opmath (Acc) arrays or nullptr: sinks (H,) contiguous; ALiBi slopes (B, H) via alibi_str.
  const void* sinks;
  const void* alibi;
  int64_t alibi_str[2];
  // Mask (nullptr: none) read through its 4 (b, h, i, j) strides; bool (uint8) or float.
  const void* mask;
  DType mask_dtype;
  int64_t mask_str[4];
  // Dropout (when `dropout`): keep iff (hash >> 8) >= thr, kept values scaled by 1 / (1 - p).
  bool dropout;
  uint32_t seed0, seed1, thr;
  double drop_scale;
  // Per-sequence keys (seqlen_k != nullptr, forward only): batch b has seqlen_k[b] <= Sk keys,
  // its queries the last ones (causal_offset = seqlen_k[b] - Sq). Paged K/V (block_table !=
  // nullptr, with seqlen_k): key j of batch b is row j % page of cache block
  // block_table[b * bt_stride + j / page], at k + block * k_str[0] + head * k_str[1] +
  // row * k_str[2] (v alike); page a power of two >= 16.
  const int32_t* seqlen_k;
  const int32_t* block_table;
  int64_t bt_stride, page;
  // Forward outputs: out (B, H, Sq, Dv) contiguous in q's dtype, or (B, Sq, H, Dv) when
  // out_seq_major; lse (B, H, Sq) opmath.
  void* out;
  void* lse;
  bool out_seq_major;
  // Backward inputs: grad_out and out (strided as q), lse contiguous; delta (B, H, Sq) opmath
  // scratch written by bwd_delta. Outputs dq (as q), dk (B, Hkv, Sk, D), dv (B, Hkv, Sk, Dv),
  // dmask (B, H, Sq, Sk) fp32 contiguous or nullptr.
  const void* dout;
  const void* o;
  int64_t do_str[3], o_str[3];
  const void* lse_in;
  void* delta;
  void* dq;
  void* dk;
  void* dv;
  float* dmask;
};

// Opmath element size (4 for fp32/bf16/fp16, 8 for fp64): the partial and dq buffers hold these.
// Forward: rows [i0, i1) of all heads of kv head hkv in batch b, keys [j0, j1) (j0 a multiple
// of kFwdKeyBlock). packed: nullptr (K/V blocks packed on the fly) or this (b, hkv)'s blocks
// written by fwd_pack (attn_fwd_block_bytes each). part == nullptr: write out/lse; else write
// G*(i1-i0) partial rows of (Dv + 2) opmath values (max, sum, out[Dv]).
using AttnFwdFn = void (*)(const AttnArgs&, int64_t b, int64_t hkv, int64_t i0, int64_t i1,
                           int64_t j0, int64_t j1, const void* packed, void* part, void* scratch);
// Packs key block kbi (keys [kbi * kFwdKeyBlock, ...)) of (b, hkv) for fwd into dst, once for
// all query blocks.
using AttnPackFn = void (*)(const AttnArgs&, int64_t b, int64_t hkv, int64_t kbi, void* dst);
// Combines nsplit partial blocks (each as written above, part_stride opmath values apart) of the
// same rows into out/lse.
using AttnMergeFn = void (*)(const AttnArgs&, int64_t b, int64_t hkv, int64_t i0, int64_t i1,
                             const void* part, int64_t nsplit, int64_t part_stride);
// delta[r] = sum_d dout[r, d] * o[r, d] (d < Dv) for flat rows r in [r0, r1) of (B, H, Sq).
using AttnDeltaFn = void (*)(const AttnArgs&, int64_t r0, int64_t r1);
// Keys [j0, j1) of kv head hkv in batch b: writes dk/dv rows, adds dS K (unscaled) into dq_acc,
// an opmath (B, H, Sq, D) contiguous buffer.
using AttnBwdFn = void (*)(const AttnArgs&, int64_t b, int64_t hkv, int64_t j0, int64_t j1,
                           void* dq_acc, void* scratch);
// dq[r] = scale * sum_c acc[c * chunk_stride + r] (c in order) for flat rows [r0, r1).
using AttnDqFn = void (*)(const AttnArgs&, const void* acc, int64_t nchunks, int64_t chunk_stride,
                          int64_t r0, int64_t r1);

struct AttnKernels {
  AttnFwdFn fwd;
  AttnMergeFn fwd_merge;
  AttnPackFn fwd_pack;
  AttnDeltaFn bwd_delta;
  AttnBwdFn bwd;
  AttnDqFn bwd_dq;
  int64_t fwd_rows;  // query rows (over all heads of a kv group) per forward work item
};

// A packed forward key block, in opmath elements: K^T (D rows) then V panels (Dv columns rounded
// up to the widest register block, 64) on every path; the bf16 pair layout needs less.
inline int64_t attn_fwd_block_elems(int64_t D, int64_t Dv) {
  return (D + (Dv + 63) / 64 * 64) * kFwdKeyBlock;
}
// Scratch bytes one thread needs for fwd (rows = query rows per call, all heads of the group)
// or bwd, in opmath elements of `elem` bytes, plus alignment slack. Tiles of q/k rows and of v
// rows are both sized for the larger head_dim.
inline int64_t attn_fwd_block_bytes(int64_t D, int64_t Dv, int64_t elem) {
  return attn_fwd_block_elems(D, Dv) * elem;
}
inline int64_t attn_fwd_scratch_bytes(int64_t rows, int64_t D, int64_t Dv, int64_t elem) {
  const int64_t Dm = D > Dv ? D : Dv;
  const int64_t Dp = (Dm + 15) / 16 * 16, rp = (rows + 15) / 16 * 16;
  return (rows * Dp * 2 + attn_fwd_block_elems(D, Dv) + rows * kFwdKeyBlock * 2 + rp * 4 + 64) *
             elem +
         256;
}
inline int64_t attn_bwd_scratch_bytes(int64_t D, int64_t Dv, int64_t elem) {
  const int64_t Dm = D > Dv ? D : Dv;
  const int64_t Dp = (Dm + 15) / 16 * 16;
  // The last tile: softcap's tanh of the scores, for the derivative.
  return (kQueryBlockBwd * Dp * 2 + Dp * kKeyBlock * 4 + kQueryBlockBwd * kKeyBlock * 2 +
          kKeyBlock * Dp * 2 + kQueryBlockBwd * kKeyBlock * 3 + 64) *
             elem +
         512;
}

// Kernel tables per ISA for the data dtype (fp32, bf16, fp16; fp64 on the scalar path only) and the
// mask's dtype (pass the data dtype when there is no mask, with has_mask false). Entries are
// null for combinations a path does not serve. Call only tables of ISAs the CPU supports.
AttnKernels attention_kernels_avx512(DType x, bool has_mask, DType mask);
// bf16 only, and only when the CPU has AVX512_BF16 (empty otherwise; FASTATTN_CPU_AVX512BF16=0).
AttnKernels attention_kernels_avx512bf16(DType x, bool has_mask, DType mask);
AttnKernels attention_kernels_avx2(DType x, bool has_mask, DType mask);
AttnKernels attention_kernels_scalar(DType x, bool has_mask, DType mask);

}  // namespace fastattn::cpu
