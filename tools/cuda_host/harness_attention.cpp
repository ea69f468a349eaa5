// The attention kernels of csrc/cuda/attention_kernels.cuh (forward, split-KV combine; dense or
// against a paged KV cache, and the cache append) run through the host execution layer, with the
// tensor-core primitives of tensor_core.h and the launch plan of attention.cu (attention_plan). Its
// own translation unit (linked into the harness library with harness.cpp); loaded by
// tests/test_cuda_host_attention.py and tests/test_cuda_host_paged.py.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda_host.h"
// clang-format off: the layer, then its tensor-core primitives, before the kernels
#include "tensor_core.h"
#include "harness.h"
#include "attention_kernels.cuh"
// clang-format on

#include <cmath>
#include <limits>
#include <vector>

namespace {

using namespace fastattn::cuda;  // NOLINT: the harness drives this namespace's kernels
using cuda_host_harness::report;

// ints: the layout the test passes (tests/test_cuda_host_attention.py, INTS).
enum Int {
  kB,
  kH,
  kHkv,
  kSq,
  kSk,
  kD,
  kDv,
  kQsb,
  kQsh,
  kQss,
  kKsb,
  kKsh,
  kKss,
  kVsb,
  kVsh,
  kVss,
  kOsb,
  kOsh,
  kOss,
  kCausal,
  kOffset,
  kWl,
  kWr,
  kMaskKind,
  kMsb,
  kMsh,
  kMsq,
  kMsk,
  kAlsb,
  kAlsh,
  kDropThreshold,
  kSmCount,
  kSplits,
  kAligned,
  kPage,
  kBtStride,
  kSeqlenAdded,
  kInts
};  // clang-format: one list

template <typename scalar_t, bool kBf16>
void run(AttnParams& p, const AttnPlan& plan) {
  with_attention_kernel<scalar_t, kBf16>(plan.tier, [&](auto kernel) {
    cuda_host::launch(kernel, plan.grid, dim3(kAttnThreads), plan.smem, p);
  });
  if (plan.combine_blocks > 0)
    cuda_host::launch(attention_combine_kernel<scalar_t>,
                      dim3(static_cast<unsigned>(plan.combine_blocks)), dim3(kCombineThreads), 0,
                      p);
}

}  // namespace

// ptrs: q, k, v, out, lse, mask, sinks, alibi, rng, block_table, seqlen_k (the last two set: a
// paged cache, k / v the caches with k_sb / v_sb their block strides). reals: scale, softcap,
// drop_scale. plan_out: tier, cols, pack, splits, tiles_per_split, aligned, grid x, y, z.
extern "C" int fa_attention_forward(int dtype, const void* const* ptrs, const int64_t* n,
                                    const double* reals, int64_t* plan_out, char* err, int errlen) {
  try {
    AttnParams p;
    p.q = ptrs[0];
    p.k = ptrs[1];
    p.v = ptrs[2];
    p.out = const_cast<void*>(ptrs[3]);
    p.lse = static_cast<float*>(const_cast<void*>(ptrs[4]));
    p.mask = ptrs[5];
    p.sinks = static_cast<const float*>(ptrs[6]);
    p.alibi = static_cast<const float*>(ptrs[7]);
    p.rng = static_cast<const int64_t*>(ptrs[8]);
    p.block_table = static_cast<const int32_t*>(ptrs[9]);
    p.seqlen_k = static_cast<const int32_t*>(ptrs[10]);
    p.page = static_cast<int>(n[kPage]);
    p.bt_stride = n[kBtStride];
    p.seqlen_added = static_cast<int>(n[kSeqlenAdded]);
    p.B = static_cast<int>(n[kB]);
    p.H = static_cast<int>(n[kH]);
    p.Hkv = static_cast<int>(n[kHkv]);
    p.Sq = static_cast<int>(n[kSq]);
    p.Sk = static_cast<int>(n[kSk]);
    p.d = static_cast<int>(n[kD]);
    p.dv = static_cast<int>(n[kDv]);
    p.group = p.H / p.Hkv;
    p.q_sb = n[kQsb], p.q_sh = n[kQsh], p.q_ss = n[kQss];
    p.k_sb = n[kKsb], p.k_sh = n[kKsh], p.k_ss = n[kKss];
    p.v_sb = n[kVsb], p.v_sh = n[kVsh], p.v_ss = n[kVss];
    p.o_sb = n[kOsb], p.o_sh = n[kOsh], p.o_ss = n[kOss];
    p.causal = n[kCausal] != 0;
    p.causal_offset = n[kOffset];
    p.window_left = n[kWl];
    p.window_right = n[kWr];
    p.mask_kind = static_cast<int>(n[kMaskKind]);
    p.m_sb = n[kMsb], p.m_sh = n[kMsh], p.m_sq = n[kMsq], p.m_sk = n[kMsk];
    p.al_sb = n[kAlsb], p.al_sh = n[kAlsh];
    p.drop_threshold = static_cast<uint32_t>(n[kDropThreshold]);
    p.scale = static_cast<float>(reals[0]);
    p.softcap = static_cast<float>(reals[1]);
    p.drop_scale = static_cast<float>(reals[2]);
    p.aligned = attention_rows_aligned(p, 2) && n[kAligned] != 0;
    AttnPlan plan = attention_plan(p, static_cast<int>(n[kSmCount]));
    if (n[kSplits] > 0) set_attention_splits(p, plan, n[kSplits]);  // a test's own count
    const size_t rows = size_t(p.B) * p.H * p.Sq;
    std::vector<float> out_part, lse_part;
    if (p.splits > 1) {  // NaN: a partial the kernel fails to write shows up
      out_part.assign(rows * p.splits * p.dv, std::numeric_limits<float>::quiet_NaN());
      lse_part.assign(rows * p.splits, std::numeric_limits<float>::quiet_NaN());
      p.out_part = out_part.data();
      p.lse_part = lse_part.data();
    }
    const int64_t facts[] = {plan.tier, plan.cols,   p.pack,      p.splits,   p.tiles_per_split,
                             p.aligned, plan.grid.x, plan.grid.y, plan.grid.z};
    for (size_t i = 0; i < sizeof(facts) / sizeof(facts[0]); ++i) plan_out[i] = facts[i];
    if (dtype == 2)
      run<c10::Half, false>(p, plan);
    else if (dtype == 3)
      run<c10::BFloat16, true>(p, plan);
    else
      throw cuda_host::Error("harness: the attention kernels take float16 or bfloat16 (code " +
                             std::to_string(dtype) + ")");
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}

// paged_append_kernel: ptrs src, cache, table, lens; n: B, S, Hkv, d, page, bt_stride, then
// src's (batch, token, head) and the cache's (block, row, head) strides; blocks: the grid
// (fewer blocks than rows: the grid-stride loop).
extern "C" int fa_paged_append(const void* const* ptrs, const int64_t* n, int64_t blocks, char* err,
                               int errlen) {
  try {
    PagedAppendParams a;
    a.src = static_cast<const uint16_t*>(ptrs[0]);
    a.cache = static_cast<uint16_t*>(const_cast<void*>(ptrs[1]));
    a.table = static_cast<const int32_t*>(ptrs[2]);
    a.lens = static_cast<const int32_t*>(ptrs[3]);
    a.B = static_cast<int>(n[0]), a.S = static_cast<int>(n[1]);
    a.Hkv = static_cast<int>(n[2]), a.d = static_cast<int>(n[3]), a.page = static_cast<int>(n[4]);
    a.bt_stride = n[5];
    a.s_sb = n[6], a.s_ss = n[7], a.s_sh = n[8];
    a.c_sb = n[9], a.c_ss = n[10], a.c_sh = n[11];
    cuda_host::launch(paged_append_kernel, dim3(static_cast<unsigned>(blocks)),
                      dim3(kAppendThreads), 0, a);
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}
