// Device code of the CUDA attention forward (FlashAttention-2 style) and its launch plan: the
// kernels of csrc/cuda/attention.cu, also compiled for the CPU by the tests' host execution layer
// (tools/cuda_host). No torch and no CUDA runtime headers.
//
// One block of 4 warps computes 64 query rows (16 per warp: one mma M tile) against the key tiles
// of its key range, with an online softmax in registers:
//   - Q, and two buffers each of K and V (cp.async double buffering: the next key tile is in
//     flight while this one is computed), live in shared memory as 16-bit elements, rows padded
//     by 16 bytes so that the 8 rows an ldmatrix reads fall in distinct banks;
//   - S = Q K^T by mma.sync m16n8k16 (Q and K fragments by ldmatrix), the scores' options applied
//     in fp32 registers (scale, softcap, ALiBi, mask, causal / window / length bounds, dropout),
//     then P (kept in registers, re-packed from the C into the A fragment layout) times V (V
//     fragments by ldmatrix.trans) into fp32 accumulators;
//   - a row's statistics are shared by the 4 lanes that hold it (two quad shuffles per tile).
// GQA: the block's rows share one kv head. When there are fewer query rows than a tile (decode)
// the query heads of a kv group are packed into the rows ("pack"), so that they share the K/V
// reads and the tile is not mostly padding. Split-KV (decode, or any grid smaller than the GPU):
// blockIdx.z takes a slice of the key tiles and writes an fp32 partial output and its lse, which
// attention_combine_kernel merges (with the sinks and the dropout scale). A paged KV cache
// (fastattn::paged_attention_forward): the same kernel walks each sequence's block table, after
// paged_append_kernel has written the new tokens into their blocks.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "device.cuh"
#include "mma.cuh"

namespace fastattn::cuda {

constexpr int kAttnRows = 64;  // query rows per block: 4 warps x one 16-row mma tile
constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * kWarpSize;
constexpr int kAttnMaxSplits = 64;  // split-KV slices (the combine kernel reads them all)
constexpr int kCombineThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

enum AttnMaskKind : int { kAttnNoMask = 0, kAttnBoolMask = 1, kAttnF32Mask = 2, kAttnSameMask = 3 };

// Everything a launch reads. Strides in elements; the last dims are contiguous.
struct AttnParams {
  const void* q = nullptr;    // (B, H, Sq, D)
  const void* k = nullptr;    // (B, Hkv, Sk, D)
  const void* v = nullptr;    // (B, Hkv, Sk, Dv)
  void* out = nullptr;        // (B, H, Sq, Dv), q's dtype
  float* lse = nullptr;       // (B, H, Sq) contiguous, natural log
  float* out_part = nullptr;  // split-KV partials: (splits, B, H, Sq, Dv) fp32 contiguous
  float* lse_part = nullptr;  // (splits, B, H, Sq)
  int64_t q_sb = 0, q_sh = 0, q_ss = 0, k_sb = 0, k_sh = 0, k_ss = 0, v_sb = 0, v_sh = 0, v_ss = 0;
  int64_t o_sb = 0, o_sh = 0, o_ss = 0;
  int B = 0, H = 0, Hkv = 0, Sq = 0, Sk = 0, d = 0, dv = 0;
  int group = 1;  // H / Hkv
  int pack = 1;   // query heads per block (1, or group: see the plan)
  float scale = 1.f, softcap = 0.f;
  bool causal = false;
  int64_t causal_offset = 0, window_left = -1, window_right = -1;
  const float* sinks = nullptr;  // (H,)
  const float* alibi = nullptr;  // (B, H) through al_sb, al_sh
  int64_t al_sb = 0, al_sh = 0;
  const void* mask = nullptr;  // (B, H, Sq, Sk) through the m_ strides
  int mask_kind = kAttnNoMask;
  int64_t m_sb = 0, m_sh = 0, m_sq = 0, m_sk = 0;
  const int64_t* rng = nullptr;  // dropout seeds (2,), when drop_threshold > 0
  uint32_t drop_threshold = 0;   // keep iff (hash >> 8) >= this (fastattn.reference.dropout_keep)
  float drop_scale = 1.f;        // 1 / (1 - dropout_p)
  int splits = 1, tiles_per_split = 0;
  bool aligned = false;  // q, k, v rows load as 16-byte cp.async chunks (else element-wise)
  // A paged KV cache (fastattn::paged_attention_forward) when block_table is set: key j of
  // sequence b is row j % page of block block_table[b * bt_stride + j / page]; k and v point at
  // the caches, whose k_sb / v_sb stride the blocks and k_ss / v_ss a block's rows. Sequence b
  // then has seqlen_k[b] + seqlen_added keys (Sk: the longest), its queries the last ones
  // (causal and the window aligned bottom-right per sequence; causal_offset unused).
  const int32_t* block_table = nullptr;
  const int32_t* seqlen_k = nullptr;  // (B,)
  int64_t bt_stride = 0;
  int page = 0, seqlen_added = 0;
};

// Key columns per tile: 64 while S (32 floats) and O (D / 2 floats) per thread fit in registers
// next to each other; 32 at head_dim 256, where O alone takes 128 floats per thread.
__host__ __device__ constexpr int attention_cols(int tier) { return tier <= 128 ? 64 : 32; }
// Q, and two buffers each of K and V, as 16-bit elements in rows of tier + 8 (16 bytes of padding).
__host__ __device__ constexpr size_t attention_smem_bytes(int tier) {
  return size_t(kAttnRows + 4 * attention_cols(tier)) * (tier + 8) * 2;
}

template <int D>
struct AttnTile {
  static constexpr int kCols = attention_cols(D);
  static constexpr int kLd = D + 8;  // shared-memory row stride (elements)
};

// The head-dim tiers compiled (q/k and v padded with zeros up to it).
__host__ __device__ constexpr int attention_tier(int d) {
  return d <= 64 ? 64 : d <= 128 ? 128 : 256;
}

// fastattn.reference.mix32 (lowbias32), mod 2**32.
__device__ __forceinline__ uint32_t attn_mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  return x ^ (x >> 15);
}

template <typename scalar_t>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return uint32_t{static_cast<scalar_t>(lo).x} | (uint32_t{static_cast<scalar_t>(hi).x} << 16);
}

template <typename scalar_t>
__device__ __forceinline__ float mask_value(const AttnParams& p, int64_t at) {
  switch (p.mask_kind) {
    case kAttnBoolMask:
      return static_cast<const bool*>(p.mask)[at] ? 0.f : -INFINITY;
    case kAttnF32Mask:
      return static_cast<const float*>(p.mask)[at];
    case kAttnSameMask:
      return static_cast<float>(static_cast<const scalar_t*>(p.mask)[at]);
  }
  return 0.f;
}

// rows [0, nrows) of a tile -> shared memory (row stride LD), `width` of the D columns (the rest
// zero); row_ptr(r) is row r's global address or nullptr (a row past the end: zeros).
template <int D, typename RowPtr>
__device__ __forceinline__ void load_rows(uint16_t* dst, int nrows, int width, bool aligned,
                                          const void* any, RowPtr row_ptr) {
  constexpr int kLd = AttnTile<D>::kLd, kChunks = D / 8;
  if (aligned) {  // width is a multiple of 8 here
    for (int c = threadIdx.x; c < nrows * kChunks; c += kAttnThreads) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      const uint16_t* src = row_ptr(r);
      const bool ok = src != nullptr && col < width;
      cp_async_16(dst + r * kLd + col, ok ? src + col : any, ok);
    }
  } else {  // a pair of columns per thread: one 4-byte shared store (no two threads per word)
    for (int e = threadIdx.x; e < nrows * D / 2; e += kAttnThreads) {
      const int r = e / (D / 2), col = e % (D / 2) * 2;
      const uint16_t* src = row_ptr(r);
      uint16_t pair[2] = {0, 0};
      for (int c = 0; c < 2; ++c)
        if (src != nullptr && col + c < width) pair[c] = src[col + c];
      *reinterpret_cast<uint32_t*>(dst + r * kLd + col) = uint32_t{pair[0]} | uint32_t{pair[1]}
                                                                                  << 16;
    }
  }
}

template <typename scalar_t, bool kBf16, int D>
__global__ void __launch_bounds__(kAttnThreads) attention_fwd_kernel(const AttnParams p) {
  using Tile = AttnTile<D>;
  constexpr int BC = Tile::kCols, LD = Tile::kLd, NT = BC / 8, DT = D / 8;
  uint16_t* sQ = dynamic_smem<uint16_t>();
  uint16_t* sK = sQ + kAttnRows * LD;  // 2 buffers of BC rows
  uint16_t* sV = sK + 2 * BC * LD;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int head_blocks = p.H / p.pack;
  const int b = blockIdx.x / head_blocks, hb = blockIdx.x % head_blocks;
  const int hk = hb * p.pack / p.group;
  const int64_t rows = int64_t{p.Sq} * p.pack, m0 = int64_t{blockIdx.y} * kAttnRows;
  const bool paged = p.block_table != nullptr;
  const int sk = paged ? p.seqlen_k[b] + p.seqlen_added : p.Sk;  // this sequence's keys (< 2**31)
  const int64_t off = paged ? sk - p.Sq : p.causal_offset;

  // The two rows this thread holds (16 warp + g, and 8 below), as (query i, head h).
  int64_t qi[2];
  int hh[2];
  bool rv[2];
  float slope[2] = {0.f, 0.f};
  uint32_t drop_row[2] = {0u, 0u};
  for (int r = 0; r < 2; ++r) {
    const int64_t m = m0 + 16 * warp + g + 8 * r;
    rv[r] = m < rows;
    qi[r] = rv[r] ? m / p.pack : 0;
    hh[r] = hb * p.pack + (rv[r] ? static_cast<int>(m % p.pack) : 0);
    if (p.alibi != nullptr) slope[r] = p.alibi[b * p.al_sb + hh[r] * p.al_sh];
    if (p.drop_threshold > 0)
      drop_row[r] = attn_mix32(static_cast<uint32_t>((int64_t{b} * p.H + hh[r]) * p.Sq + qi[r]) ^
                               static_cast<uint32_t>(p.rng[0]));
  }

  // The block's key range: the union of its rows' visible keys, then this split's slice.
  const int64_t i_lo = m0 / p.pack, i_hi = (std::min(m0 + kAttnRows, rows) - 1) / p.pack;
  int64_t j_begin = 0, j_end = sk;
  if (p.window_left >= 0) j_begin = std::max<int64_t>(0, i_lo + off - p.window_left);
  if (p.causal) j_end = std::min(j_end, i_hi + off + 1);
  if (p.window_right >= 0) j_end = std::min(j_end, i_hi + off + p.window_right + 1);
  int64_t kb_begin = j_begin / BC, kb_end = j_end > j_begin ? ceil_div(j_end, BC) : kb_begin;
  if (p.splits > 1) {
    kb_begin = std::max<int64_t>(kb_begin, int64_t{blockIdx.z} * p.tiles_per_split);
    kb_end = std::min<int64_t>(kb_end, int64_t{blockIdx.z + 1} * p.tiles_per_split);
  }

  const auto* qp = static_cast<const uint16_t*>(p.q);
  const auto* kp = static_cast<const uint16_t*>(p.k) + hk * p.k_sh;
  const auto* vp = static_cast<const uint16_t*>(p.v) + hk * p.v_sh;
  // Key j's row of k (sb, ss: k's or v's strides) or nullptr past the sequence's end.
  auto key_row = [&](const uint16_t* base, int64_t sb, int64_t ss, int64_t j) -> const uint16_t* {
    if (j >= sk) return nullptr;
    if (!paged) return base + b * sb + j * ss;
    return base + int64_t{p.block_table[b * p.bt_stride + j / p.page]} * sb + j % p.page * ss;
  };
  auto load_kv = [&](int64_t kb, int buf) {
    const int64_t j0 = kb * BC;
    load_rows<D>(sK + buf * BC * LD, BC, p.d, p.aligned, p.k,
                 [&](int r) { return key_row(kp, p.k_sb, p.k_ss, j0 + r); });
    load_rows<D>(sV + buf * BC * LD, BC, p.dv, p.aligned, p.v,
                 [&](int r) { return key_row(vp, p.v_sb, p.v_ss, j0 + r); });
  };
  if (kb_begin < kb_end) {
    load_rows<D>(sQ, kAttnRows, p.d, p.aligned, p.q, [&](int r) -> const uint16_t* {
      const int64_t m = m0 + r;
      if (m >= rows) return nullptr;
      return qp + b * p.q_sb + (hb * p.pack + m % p.pack) * p.q_sh + m / p.pack * p.q_ss;
    });
    load_kv(kb_begin, 0);
    cp_async_commit();
  }

  float o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};  // running max (log2) and sum

  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int buf = static_cast<int>((kb - kb_begin) & 1);
    if (kb + 1 < kb_end) {
      load_kv(kb + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this tile's copies, by every thread, have landed

    // S = Q K^T (fp32), 16 rows x BC keys per warp.
    float s[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    const uint16_t* kt = sK + buf * BC * LD;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      if (kk * 16 >= p.d) break;  // zero padding of a smaller head_dim
      uint32_t a[4];
      ldmatrix_x4(a, sQ + (16 * warp + lane % 16) * LD + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int n2 = 0; n2 < NT / 2; ++n2) {
        uint32_t bk[4];
        ldmatrix_x4(
            bk, kt + (n2 * 16 + (lane / 16) * 8 + lane % 8) * LD + kk * 16 + (lane / 8) % 2 * 8);
        mma_16816<kBf16>(s[2 * n2], a, bk[0], bk[1]);
        mma_16816<kBf16>(s[2 * n2 + 1], a, bk[2], bk[3]);
      }
    }

    // The scores' options, in natural units, then to log2 units.
    const int64_t j0 = kb * BC;
    const bool edge = j0 + BC > sk || (p.causal && j0 + BC - 1 > i_lo + off) ||
                      (p.window_right >= 0 && j0 + BC - 1 > i_lo + off + p.window_right) ||
                      (p.window_left >= 0 && j0 < i_hi + off - p.window_left);
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int64_t j = j0 + n * 8 + 2 * t + (e & 1), rel = j - (qi[r] + off);
        float x = s[n][e] * p.scale;
        if (p.softcap > 0.f) x = p.softcap * tanhf(x / p.softcap);
        if (p.alibi != nullptr) x -= slope[r] * static_cast<float>(rel < 0 ? -rel : rel);
        const bool in = j < sk && rv[r];
        if (p.mask_kind != kAttnNoMask && in)
          x += mask_value<scalar_t>(p, b * p.m_sb + hh[r] * p.m_sh + qi[r] * p.m_sq + j * p.m_sk);
        if (edge &&
            (!in || (p.causal && rel > 0) || (p.window_right >= 0 && rel > p.window_right) ||
             (p.window_left >= 0 && rel < -p.window_left)))
          x = -INFINITY;
        s[n][e] = x * kLog2e;
      }

    // Online softmax: the rows' new maxima (over the quad), rescale, P = exp2(s - max).
    float mx[2] = {mrow[0], mrow[1]};
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      mx[0] = fmaxf(mx[0], fmaxf(s[n][0], s[n][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[n][2], s[n][3]));
    }
    float base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = warp_reduce(mx[r], MaxOp{}, 4);      // the quad holding the row
      base[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // nothing visible yet: every P is 0
      const float alpha = exp2f(mrow[r] - base[r]);
      mrow[r] = mx[r];
      lrow[r] *= alpha;
#pragma unroll
      for (int i = 0; i < DT; ++i) {
        o[i][2 * r] *= alpha;
        o[i][2 * r + 1] *= alpha;
      }
    }
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        float pe = exp2f(s[n][e] - base[r]);
        lrow[r] += pe;  // the softmax's denominator counts dropped entries too
        if (p.drop_threshold > 0) {
          const uint32_t col =
              static_cast<uint32_t>(j0 + n * 8 + 2 * t + (e & 1)) + static_cast<uint32_t>(p.rng[1]);
          if ((attn_mix32(drop_row[r] ^ col) >> 8) < p.drop_threshold) pe = 0.f;
        }
        s[n][e] = pe;
      }

    // O += P V: P's C fragments of two adjacent 8-key tiles are the A fragment of 16 keys.
    const uint16_t* vt = sV + buf * BC * LD;
#pragma unroll
    for (int k2 = 0; k2 < NT / 2; ++k2) {
      const uint32_t a[4] = {pack2<scalar_t>(s[2 * k2][0], s[2 * k2][1]),
                             pack2<scalar_t>(s[2 * k2][2], s[2 * k2][3]),
                             pack2<scalar_t>(s[2 * k2 + 1][0], s[2 * k2 + 1][1]),
                             pack2<scalar_t>(s[2 * k2 + 1][2], s[2 * k2 + 1][3])};
#pragma unroll
      for (int d2 = 0; d2 < DT / 2; ++d2) {
        if (d2 * 16 >= p.dv) break;
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, vt + (k2 * 16 + lane % 16) * LD + d2 * 16 + (lane / 16) * 8);
        mma_16816<kBf16>(o[2 * d2], a, bv[0], bv[1]);
        mma_16816<kBf16>(o[2 * d2 + 1], a, bv[2], bv[3]);
      }
    }
    __syncthreads();  // every warp is done with this buffer before it is refilled
  }

  // Epilogue: the rows' sums over the quad, then out (or the split's partial) and lse.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lrow[r] = warp_reduce(lrow[r], SumOp{}, 4);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // (unrolled: o's indices must be compile-time, or o spills)
    if (!rv[r]) continue;
    const int64_t i = qi[r], row = (int64_t{b} * p.H + hh[r]) * p.Sq + i;
    const float m = mrow[r], l = lrow[r];
    if (p.splits > 1) {
      const int64_t prow = int64_t{blockIdx.z} * p.B * p.H * p.Sq + row;
      p.lse_part[prow] = l > 0.f ? (m + log2f(l)) / kLog2e : -INFINITY;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      float* dst = p.out_part + prow * p.dv;
#pragma unroll
      for (int i2 = 0; i2 < DT; ++i2)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = i2 * 8 + 2 * t + e;
          if (col < p.dv) dst[col] = o[i2][2 * r + e] * inv;
        }
      continue;
    }
    float mm = m, ll = l;
    if (p.sinks != nullptr) {  // one more logit in the denominator, without a value
      const float sk = p.sinks[hh[r]] * kLog2e;
      mm = fmaxf(m, sk);
      ll = mm == -INFINITY ? 0.f : l * exp2f(m - mm) + exp2f(sk - mm);
    }
    const float w = ll > 0.f ? exp2f(m - mm) / ll * p.drop_scale : 0.f;
    p.lse[row] = ll > 0.f ? (mm + log2f(ll)) / kLog2e : -INFINITY;
    auto* dst = static_cast<scalar_t*>(p.out) + b * p.o_sb + hh[r] * p.o_sh + i * p.o_ss;
#pragma unroll
    for (int i2 = 0; i2 < DT; ++i2)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = i2 * 8 + 2 * t + e;
        if (col < p.dv) dst[col] = static_cast<scalar_t>(o[i2][2 * r + e] * w);
      }
  }
}

// Merges the split-KV partials of each (b, h, i) row (a block per row, grid-stride): out =
// sum_s exp(lse_s - lse) out_s, lse = log(sum_s exp(lse_s) + exp(sink)).
template <typename scalar_t>
__global__ void __launch_bounds__(kCombineThreads) attention_combine_kernel(const AttnParams p) {
  const int64_t rows = int64_t{p.B} * p.H * p.Sq, per_split = rows;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t i = row % p.Sq, h = row / p.Sq % p.H, b = row / (int64_t{p.Sq} * p.H);
    float mm = p.sinks != nullptr ? p.sinks[h] : -INFINITY;
    for (int s = 0; s < p.splits; ++s) mm = fmaxf(mm, p.lse_part[s * per_split + row]);
    float ll = 0.f;
    if (mm != -INFINITY) {
      for (int s = 0; s < p.splits; ++s) ll += expf(p.lse_part[s * per_split + row] - mm);
      if (p.sinks != nullptr) ll += expf(p.sinks[h] - mm);
    }
    const float lse = ll > 0.f ? mm + logf(ll) : -INFINITY;
    if (threadIdx.x == 0) p.lse[row] = lse;
    auto* dst = static_cast<scalar_t*>(p.out) + b * p.o_sb + h * p.o_sh + i * p.o_ss;
    for (int col = threadIdx.x; col < p.dv; col += kCombineThreads) {
      float acc = 0.f;
      if (lse != -INFINITY)
        for (int s = 0; s < p.splits; ++s) {
          const float ls = p.lse_part[s * per_split + row];
          if (ls != -INFINITY)
            acc += expf(ls - lse) * p.out_part[(s * per_split + row) * p.dv + col];
        }
      dst[col] = static_cast<scalar_t>(acc * p.drop_scale);
    }
  }
}

// f(the forward kernel of head-dim tier `tier`): the launcher and the host harness both launch
// through it, so the tier -> instantiation map is written once.
template <typename scalar_t, bool kBf16, typename F>
void with_attention_kernel(int tier, F&& f) {
  switch (tier) {
    case 64:
      f(attention_fwd_kernel<scalar_t, kBf16, 64>);
      break;
    case 128:
      f(attention_fwd_kernel<scalar_t, kBf16, 128>);
      break;
    default:
      f(attention_fwd_kernel<scalar_t, kBf16, 256>);
  }
}

// ------------------------------------------------------------ paged KV cache: the append
// fastattn::paged_attention_forward's in-place append, launched before the forward (with
// AttnParams' paged fields) on the same stream: the new keys (or values) of every sequence
// written at their positions of the cache.

constexpr int kAppendThreads = 128;

// src (B, S, Hkv, d) -> cache (num_blocks, page, Hkv, d): token t of sequence b goes to position
// lens[b] + t, i.e. row (lens[b] + t) % page of block table[b * bt_stride + (lens[b] + t) / page]
// (the tables and lengths checked on the host first). Strides in elements; last dims contiguous.
struct PagedAppendParams {
  const uint16_t* src = nullptr;
  uint16_t* cache = nullptr;
  const int32_t* table = nullptr;
  const int32_t* lens = nullptr;
  int64_t s_sb = 0, s_ss = 0, s_sh = 0;  // src's batch, token, head strides
  int64_t c_sb = 0, c_ss = 0, c_sh = 0;  // the cache's block, row, head strides
  int64_t bt_stride = 0;
  int B = 0, S = 0, Hkv = 0, d = 0, page = 0;
};

// One (b, t, head) row per block iteration (grid-stride), its d elements over the threads. Rows
// of distinct (b, t) never share a cache position: each sequence's new positions are its own
// (two sequences naming one block for them would be the caller's race, as in FlashAttention).
__global__ void __launch_bounds__(kAppendThreads) paged_append_kernel(const PagedAppendParams a) {
  const int64_t rows = int64_t{a.B} * a.S * a.Hkv;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t h = row % a.Hkv, t = row / a.Hkv % a.S, b = row / (int64_t{a.Hkv} * a.S);
    const int64_t pos = int64_t{a.lens[b]} + t;
    const int64_t blk = a.table[b * a.bt_stride + pos / a.page];
    const uint16_t* src = a.src + b * a.s_sb + t * a.s_ss + h * a.s_sh;
    uint16_t* dst = a.cache + blk * a.c_sb + pos % a.page * a.c_ss + h * a.c_sh;
    for (int c = threadIdx.x; c < a.d; c += kAppendThreads) dst[c] = src[c];
  }
}

// ------------------------------------------------------------------------------ launch plan

struct AttnPlan {
  int tier = 64, cols = 64;
  dim3 grid{1, 1, 1};
  size_t smem = 0;
  int64_t combine_blocks = 0;  // 0: no combine step
};

// Whether q, k and v load as 16-byte cp.async chunks: every base pointer and row stride a
// multiple of 16 bytes, and both head dims multiples of 8 elements (else element-wise loads).
inline bool attention_rows_aligned(const AttnParams& p, int64_t elem) {
  const int64_t strides[] = {p.q_sb, p.q_sh, p.q_ss, p.k_sb, p.k_sh,
                             p.k_ss, p.v_sb, p.v_sh, p.v_ss};
  bool ok = p.d % 8 == 0 && p.dv % 8 == 0;
  for (const void* ptr : {p.q, p.k, p.v}) ok = ok && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  for (const int64_t s : strides) ok = ok && (s * elem) % 16 == 0;
  return ok;
}

// Splits the key tiles into at most `splits` slices of whole tiles (p.splits, p.tiles_per_split,
// the grid's z and the combine step follow).
inline void set_attention_splits(AttnParams& p, AttnPlan& plan, int64_t splits) {
  const int64_t tiles = ceil_div(p.Sk, plan.cols);
  p.tiles_per_split = static_cast<int>(ceil_div(tiles, splits));
  p.splits = static_cast<int>(tiles > 0 ? ceil_div(tiles, p.tiles_per_split) : 1);
  plan.grid.z = static_cast<unsigned>(p.splits);
  plan.combine_blocks = p.splits > 1 ? std::min<int64_t>(int64_t{p.B} * p.H * p.Sq, 65535) : 0;
}

// Fills p.pack, p.splits, p.tiles_per_split and returns the launch. sm_count: the device's.
inline AttnPlan attention_plan(AttnParams& p, int sm_count) {
  AttnPlan plan;
  plan.tier = attention_tier(p.d > p.dv ? p.d : p.dv);
  plan.cols = attention_cols(plan.tier);
  plan.smem = attention_smem_bytes(plan.tier);
  // Fewer query rows than a tile (decode): the kv group's heads fill the tile's rows instead.
  p.pack = p.group > 1 && p.Sq < kAttnRows ? p.group : 1;
  const int64_t m_blocks = ceil_div(int64_t{p.Sq} * p.pack, kAttnRows);
  const int64_t blocks = int64_t{p.B} * (p.H / p.pack) * m_blocks;
  const int64_t tiles = ceil_div(p.Sk, plan.cols);
  plan.grid = dim3(static_cast<unsigned>(int64_t{p.B} * (p.H / p.pack)),
                   static_cast<unsigned>(m_blocks), 1);
  // Split the keys when the grid would leave SMs idle: about two blocks per SM in all.
  int64_t splits = 1;
  if (blocks < sm_count && tiles > 1)
    splits = std::min<int64_t>({tiles, ceil_div(2 * int64_t{sm_count}, blocks), kAttnMaxSplits});
  set_attention_splits(p, plan, splits);
  return plan;
}

}  // namespace fastattn::cuda
