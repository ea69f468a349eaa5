// CPU kernels of fastattn::attention and fastattn::attention_backward (schemas in csrc/ops.cpp,
// semantics in docs/attention.md and fastattn/reference.py::attention). This file is the
// torch-facing half: input checks, output allocation, the choice of the kernel table (dtype, mask
// dtype, ISA) and the OpenMP work split. The kernels (one template, instantiated per ISA and
// dtype) are in csrc/cpu/attention_impl.h; the work layout is described in
// csrc/cpu/attention_kernels.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>

#include "attention_forward.h"
#include "checks.h"
#include "cpu/attention_kernels.h"
#include "cpu_dispatch.h"
#include "dropout.h"
#include "output_pool.h"

namespace fastattn {
namespace {

using at::Tensor;
using cpu::AttnArgs;
using cpu::AttnKernels;
using cpu::DType;
using OptTensor = std::optional<Tensor>;

constexpr const char* kFwd = "fastattn::attention";
constexpr const char* kBwd = "fastattn::attention_backward";

// Below this many multiply-adds (Sq * Sk * D summed over heads) the call stays on one thread.
constexpr int64_t kSerialBelow = int64_t{1} << 18;
// Forward split-K: split the key axis when there are fewer than kFwdItemsPerThread work items per
// thread, in chunks of at least kMinSplitKeys keys.
constexpr int64_t kFwdItemsPerThread = 4;
constexpr int64_t kMinSplitKeys = 2 * cpu::kFwdKeyBlock;
// Paged decode: with the cache's (block, row, kv head, head_dim) layout one head's key rows are
// Hkv * head_dim apart (4 KiB at fp32, 8 x 128: a page each), so a sequence's heads read in turn
// over all its keys miss the TLB on every row, each time. Cut into chunks of this many keys
// taken by all heads one after another, each chunk's pages are translated once for them all.
constexpr int64_t kPagedChunk = 512;
// The packed K/V of one forward wave (see attention_cpu), when many short pairs share one.
constexpr int64_t kWaveBytes = int64_t{32} << 20;
// Backward: the key axis of each (batch, kv head) is cut into chunks when there are fewer than
// kBwdMinItems (batch, kv head) pairs. Derived from the shape only, never from the thread count,
// so the dq sums (added over chunks in a fixed order) are bitwise reproducible across runs and
// torch.set_num_threads settings.
constexpr int64_t kBwdMinItems = 8;

// A 64-byte aligned scratch buffer owned by the calling (OpenMP) thread for one call.
struct Scratch {
  std::unique_ptr<char[]> buf;
  explicit Scratch(int64_t bytes) : buf(new char[bytes + 64]) {}
  void* get() const {
    const auto p = reinterpret_cast<uintptr_t>(buf.get());
    return reinterpret_cast<void*>((p + 63) & ~uintptr_t(63));
  }
};

int team_size(int64_t work) {
  if (omp_in_parallel() || work < kSerialBelow) return 1;
  return omp_get_max_threads();
}

}  // namespace

Tensor setup_attention_args(AttnArgs& a, const Tensor& q, const Tensor& k, const Tensor& v,
                            const OptTensor& mask, const OptTensor& rng, double scale, bool causal,
                            int64_t causal_offset, double dropout_p, const AttnVariants& var) {
  a.B = q.size(0);
  a.H = q.size(1);
  a.Sq = q.size(2);
  a.D = q.size(3);
  a.Dv = v.size(3);
  a.Hkv = k.size(1);
  a.Sk = k.size(2);
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  for (int d = 0; d < 3; ++d) {
    a.q_str[d] = q.stride(d);
    a.k_str[d] = k.stride(d);
    a.v_str[d] = v.stride(d);
  }
  a.scale = scale;
  a.causal_offset = causal_offset;
  a.win_left = var.window_left;
  a.win_right = causal ? 0 : var.window_right;  // causal: nothing right of the diagonal
  a.softcap = var.softcap;
  a.sinks = var.sinks.has_value() ? var.sinks->data_ptr() : nullptr;  // (H,) contiguous
  a.alibi = var.alibi.has_value() ? var.alibi->data_ptr() : nullptr;
  if (a.alibi != nullptr)
    for (int d = 0; d < 2; ++d) a.alibi_str[d] = var.alibi->size(d) == 1 ? 0 : var.alibi->stride(d);
  Tensor m;
  if (mask.has_value()) {
    m = *mask;
    a.mask = m.data_ptr();
    a.mask_dtype = dtype_of(kFwd, m.scalar_type());
    for (int d = 0; d < 4; ++d) a.mask_str[d] = m.size(d) == 1 ? 0 : m.stride(d);
  }
  a.dropout = dropout_p > 0.0;
  if (a.dropout) {
    const Tensor r = rng->contiguous();
    const int64_t* s = r.data_ptr<int64_t>();
    a.seed0 = uint32_t(uint64_t(s[0]) & 0xffffffffu);
    a.seed1 = uint32_t(uint64_t(s[1]) & 0xffffffffu);
    a.thr = dropout_threshold(dropout_p);
    a.drop_scale = dropout_scale(dropout_p);
  } else {
    a.drop_scale = 1.0;
  }
  return m;
}

// float64 always takes the scalar (fp64 math) path.
AttnKernels attention_kernels_for(const char* op, DType x, bool has_mask, DType mask) {
  static constexpr AttnKernels (*kGet[])(DType, bool, DType) = {
      cpu::attention_kernels_scalar, cpu::attention_kernels_avx2, cpu::attention_kernels_avx512,
      cpu::attention_kernels_avx512bf16};
  const auto serves = [](const AttnKernels& t) { return t.fwd != nullptr; };
  const AttnKernels k = best_kernels(kGet, x == DType::kFloat64, serves, x, has_mask, mask);
  TORCH_CHECK(k.fwd != nullptr, op, ": no CPU kernel for this input/mask dtype pair");
  return k;
}

void fill_keyless_lse(Tensor& lse, const OptTensor& sinks) {
  if (sinks.has_value())
    lse.copy_(sinks->view({1, -1, 1}).expand_as(lse));
  else
    lse.fill_(-std::numeric_limits<double>::infinity());
}

void forward_items(const AttnArgs& a, const AttnKernels& kern, const at::TensorOptions& opts) {
  const int64_t B = a.B, H = a.H, Hkv = a.Hkv, Sq = a.Sq, Sk = a.Sk, D = a.D, Dv = a.Dv;
  const auto lse_dt = opts.dtype() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t G = H / Hkv;
  const int64_t mq = std::min(Sq, std::max<int64_t>(1, (kern.fwd_rows + G - 1) / G));
  const int64_t rows = G * mq, nqb = (Sq + mq - 1) / mq, units = B * Hkv * nqb;
  const int64_t elem = opts.dtype() == at::kDouble ? 8 : 4;
  const int nt = team_size(B * H * Sq * Sk * std::max(D, Dv));
  // Split-K (decode): too few work items for the team, and keys enough to be worth splitting.
  int64_t nsplit = 1;
  if (nt > 1 && units < kFwdItemsPerThread * nt && Sk >= 2 * kMinSplitKeys) {
    nsplit = std::min((kFwdItemsPerThread * nt + units - 1) / units, Sk / kMinSplitKeys);
  }
  constexpr int64_t NF = cpu::kFwdKeyBlock;
  int64_t chunk = (((Sk + nsplit - 1) / nsplit) + NF - 1) / NF * NF;
  // Paged, one query block: the items go chunk-major, each sequence's kv heads one after another
  // on the same kPagedChunk keys (see kPagedChunk), the chunks merged as split-K.
  const bool chunk_major = a.block_table != nullptr && nqb == 1 && Sk > kPagedChunk;
  if (chunk_major) chunk = kPagedChunk;
  nsplit = (Sk + chunk - 1) / chunk;
  const int64_t pstride = rows * (Dv + 2);
  Tensor part;
  if (nsplit > 1) part = at::empty({units * nsplit * pstride}, opts.dtype(lse_dt));
  char* part_base = nsplit > 1 ? static_cast<char*>(part.data_ptr()) : nullptr;
  // K/V blocks are packed once when several query blocks read them; otherwise (decode) each item
  // packs the blocks it reads. Packing goes a wave of (batch, kv head) pairs at a time, whose
  // query blocks then keep the team busy: as many pairs as fit in kWaveBytes of packed K/V, at
  // least one, so the packed copy is at most one head's K and V or kWaveBytes (peak memory: about
  // that of F.scaled_dot_product_attention). Each wave costs two barriers: one pair a wave made
  // short sequences of many pairs barrier-bound (2048 pairs of 16 keys: 45x slower on two threads
  // than on one while another process shared the cores).
  const int64_t nkb = (Sk + NF - 1) / NF, block_bytes = cpu::attn_fwd_block_bytes(D, Dv, elem);
  const int64_t pairs = B * Hkv;
  const int64_t wave =
      nqb > 1 ? std::clamp<int64_t>(kWaveBytes / (nkb * block_bytes), 1, pairs) : pairs;
  Tensor packed;
  if (nqb > 1) packed = at::empty({wave * nkb * block_bytes}, opts.dtype(at::kByte));
  char* pk = nqb > 1 ? static_cast<char*>(packed.data_ptr()) : nullptr;
  const int64_t scratch_bytes = cpu::attn_fwd_scratch_bytes(rows, D, Dv, elem);
  // Item t: unit u (batch, kv head, query block; the causal ones with the most keys first) and
  // key chunk c.
  auto unit_of = [&](int64_t u, int64_t& b, int64_t& hkv, int64_t& i0, int64_t& i1) {
    const int64_t qb = nqb - 1 - u % nqb, bh = u / nqb;
    b = bh / Hkv;
    hkv = bh % Hkv;
    i0 = qb * mq;
    i1 = std::min(Sq, i0 + mq);
  };
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const FlushDenormals ftz;  // exp of masked scores underflows (see cpu_dispatch.h)
    Scratch scratch(scratch_bytes);
    for (int64_t w0 = 0; w0 < pairs; w0 += wave) {  // every thread runs every wave
      const int64_t w1 = std::min(pairs, w0 + wave);
      if (pk != nullptr) {
#pragma omp for schedule(static)
        for (int64_t t = w0 * nkb; t < w1 * nkb; ++t)
          kern.fwd_pack(a, t / nkb / Hkv, t / nkb % Hkv, t % nkb,
                        pk + (t - w0 * nkb) * block_bytes);
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = w0 * nqb * nsplit; t < w1 * nqb * nsplit; ++t) {
        // (chunk-major: one wave, nqb 1, t = (b * nsplit + c) * Hkv + hkv)
        const int64_t u = chunk_major ? t / (nsplit * Hkv) * Hkv + t % Hkv : t / nsplit;
        const int64_t c = chunk_major ? t / Hkv % nsplit : t % nsplit;
        int64_t b, hkv, i0, i1;
        unit_of(u, b, hkv, i0, i1);
        void* p = part_base ? part_base + (u * nsplit + c) * pstride * elem : nullptr;
        const void* kv = pk ? pk + (b * Hkv + hkv - w0) * nkb * block_bytes : nullptr;
        kern.fwd(a, b, hkv, i0, i1, c * chunk, std::min(Sk, (c + 1) * chunk), kv, p, scratch.get());
      }  // the barrier here keeps the next wave's packing off blocks still being read
    }
    if (nsplit > 1) {
#pragma omp for schedule(static)
      for (int64_t u = 0; u < units; ++u) {
        int64_t b, hkv, i0, i1;
        unit_of(u, b, hkv, i0, i1);
        kern.fwd_merge(a, b, hkv, i0, i1, part_base + u * nsplit * pstride * elem, nsplit, pstride);
      }
    }
  }
}

namespace {

std::tuple<Tensor, Tensor> attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const OptTensor& mask, const OptTensor& rng, double scale,
                                         bool causal, int64_t causal_offset, double dropout_p,
                                         int64_t window_left, int64_t window_right, double softcap,
                                         const OptTensor& sinks, const OptTensor& alibi) {
  check_attention_inputs(kFwd, q, k, v, mask, rng, dropout_p);
  check_attention_variants(kFwd, q, window_left, window_right, softcap, sinks, alibi);
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), Dv = v.size(3);
  const int64_t Sk = k.size(2);
  const auto lse_dt = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor out = new_output({B, H, Sq, Dv}, q.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor lse = new_output({B, H, Sq}, q.options().dtype(lse_dt));
  if (B * H * Sq == 0) return {out, lse};
  if (Sk == 0) {  // no key at all: every row is fully masked
    out.zero_();
    fill_keyless_lse(lse, sinks);
    return {out, lse};
  }
  AttnArgs a{};
  const AttnVariants var{window_left, window_right, softcap, sinks, alibi};
  const Tensor m =
      setup_attention_args(a, q, k, v, mask, rng, scale, causal, causal_offset, dropout_p, var);
  a.out = out.data_ptr();
  a.lse = lse.data_ptr();
  const DType xdt = dtype_of(kFwd, q.scalar_type());
  const AttnKernels kern =
      attention_kernels_for(kFwd, xdt, mask.has_value(), mask.has_value() ? a.mask_dtype : xdt);
  forward_items(a, kern, q.options());
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_backward_cpu(
    const Tensor& grad_in, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out_in,
    const Tensor& lse_in, const OptTensor& mask, const OptTensor& rng, double scale, bool causal,
    int64_t causal_offset, double dropout_p, int64_t window_left, int64_t window_right,
    double softcap, const OptTensor& sinks, const OptTensor& alibi, bool deterministic,
    bool mask_grad) {
  (void)deterministic;  // the CPU backward is always deterministic
  check_attention_inputs(kBwd, q, k, v, mask, rng, dropout_p);
  check_attention_variants(kBwd, q, window_left, window_right, softcap, sinks, alibi);
  check_attention_saved(kBwd, grad_in, out_in, lse_in, q, v);
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), Dv = v.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  const auto opts = q.options().memory_format(at::MemoryFormat::Contiguous);
  Tensor dq = new_output({B, H, Sq, D}, opts);
  Tensor dk = new_output({B, Hkv, Sk, D}, opts);
  Tensor dv = new_output({B, Hkv, Sk, Dv}, opts);
  Tensor dmask = mask_grad ? at::zeros({B, H, Sq, Sk}, q.options().dtype(at::kFloat))
                           : at::empty({0}, q.options().dtype(at::kFloat));
  Tensor dsinks = sinks.has_value() ? at::zeros_like(*sinks) : at::empty({0}, dmask.options());
  if (B * H * Sq == 0 || Sk == 0) {  // nothing attends to anything: all gradients are zero
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dmask, dsinks};
  }
  const Tensor g = grad_in.stride(-1) == 1 ? grad_in : grad_in.contiguous();
  const Tensor o = out_in.stride(-1) == 1 ? out_in : out_in.contiguous();
  const Tensor lse = lse_in.contiguous();
  AttnArgs a{};
  const AttnVariants var{window_left, window_right, softcap, sinks, alibi};
  const Tensor m =
      setup_attention_args(a, q, k, v, mask, rng, scale, causal, causal_offset, dropout_p, var);
  const auto op_dt = lse.scalar_type();
  Tensor delta = at::empty({B, H, Sq}, q.options().dtype(op_dt));
  a.dout = g.data_ptr();
  a.o = o.data_ptr();
  for (int d = 0; d < 3; ++d) {
    a.do_str[d] = g.stride(d);
    a.o_str[d] = o.stride(d);
  }
  a.lse_in = lse.data_ptr();
  a.delta = delta.data_ptr();
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  a.dmask = mask_grad ? dmask.data_ptr<float>() : nullptr;
  const DType xdt = dtype_of(kFwd, q.scalar_type());
  const AttnKernels kern =
      attention_kernels_for(kBwd, xdt, mask.has_value(), mask.has_value() ? a.mask_dtype : xdt);

  const int64_t nkb = (Sk + cpu::kKeyBlock - 1) / cpu::kKeyBlock;
  const int64_t pairs = B * Hkv;
  const int64_t nchunks =
      pairs >= kBwdMinItems ? 1 : std::min(nkb, (kBwdMinItems + pairs - 1) / pairs);
  const int64_t chunk = (nkb + nchunks - 1) / nchunks * cpu::kKeyBlock;
  const int64_t rows = B * H * Sq, cstride = rows * D;
  Tensor dq_acc = at::zeros({nchunks * cstride}, q.options().dtype(op_dt));
  const int64_t elem = op_dt == at::kDouble ? 8 : 4;
  char* acc = static_cast<char*>(dq_acc.data_ptr());
  const int64_t scratch_bytes = cpu::attn_bwd_scratch_bytes(D, Dv, elem);
  const int64_t tasks = pairs * nchunks;
  const int nt = team_size(B * H * Sq * Sk * std::max(D, Dv));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const FlushDenormals ftz;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t r0 = rows * t / nt, r1 = rows * (t + 1) / nt;
      kern.bwd_delta(a, r0, r1);
    }
    Scratch scratch(scratch_bytes);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t c = t % nchunks, bh = t / nchunks;
      const int64_t j0 = c * chunk, j1 = std::min(Sk, j0 + chunk);
      if (j0 < j1) kern.bwd(a, bh / Hkv, bh % Hkv, j0, j1, acc + c * cstride * elem, scratch.get());
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t r0 = rows * t / nt, r1 = rows * (t + 1) / nt;
      kern.bwd_dq(a, acc, nchunks, cstride, r0, r1);
    }
  }
  if (sinks.has_value()) {
    // d loss / d sink_h = -sum over (b, i) of p_sink * delta, p_sink = exp(sink_h - lse) the
    // sink's share of the row (out = sum_j P_j v_j and every P_j scales by 1 - p_sink).
    // (A row without keys whose sink is -inf has lse -inf: no share, not NaN.)
    const Tensor p_sink = sinks->view({1, H, 1}).sub(lse).exp().masked_fill(lse.isneginf(), 0.0);
    dsinks.copy_(p_sink.mul(delta).sum({0, 2}).neg());
  }
  return {dq, dk, dv, dmask, dsinks};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("attention", &fastattn::attention_cpu);
  m.impl("attention_backward", &fastattn::attention_backward_cpu);
}
