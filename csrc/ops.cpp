// Every fastattn dispatcher op is declared here, once. Kernels register per dispatch key in the
// op's own file (CPU: csrc/<op>.cpp, CUDA: csrc/cuda/<op>_host.cpp); fake (meta) kernels and
// autograd formulas are registered from Python (fastattn/ops/<op>.py).
#include <torch/library.h>

TORCH_LIBRARY(fastattn, m) {
  // softmax(x * scale + mask) over the last dim; `causal` masks column j > row i of the last two
  // dims (top-left aligned). A fully masked row gives 0 (log: -inf). See fastattn/ops/softmax.py.
  m.def("softmax(Tensor x, Tensor? mask, float scale, bool causal, bool log) -> Tensor");
  // Gradient of the above from its output: scale * dz, with dz = y * (g - sum(g * y)) or, for
  // log, dz = g - exp(y) * sum(g) taken over the unmasked (y != -inf) entries only.
  m.def("softmax_backward(Tensor grad_out, Tensor out, float scale, bool log) -> Tensor");

  // LayerNorm (rms=false) or RMSNorm (rms=true) over the last dim of x, optionally of
  // h = x + residual (returned as residual_out, x's dtype; otherwise an empty tensor). weight and
  // bias are (N,) of any float dtype. mean (empty for RMSNorm) and rstd are per row in the math
  // type (float32; float64 for float64 x), saved for the backward pass. See fastattn/ops/norm.py.
  m.def(
      "norm(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms) -> "
      "(Tensor out, Tensor residual_out, Tensor mean, Tensor rstd)");
  // Gradients of the above, from the normalised input (h, or x without residual). grad_residual_out
  // (the gradient reaching h directly) is added to dx. dweight/dbias are (N,) sums in the math
  // type (float32; float64 for float64 input) reduced deterministically (fixed partial sums, no
  // atomics); dbias is empty unless has_bias.
  m.def(
      "norm_backward(Tensor grad_out, Tensor? grad_residual_out, Tensor input, Tensor? weight, "
      "Tensor mean, Tensor rstd, bool rms, bool has_bias) -> (Tensor dx, Tensor dweight, "
      "Tensor dbias)");

  // Exact (flash) attention; semantics in fastattn.reference.attention and docs/attention.md.
  // q (B, H, Sq, D); k, v (B, Hkv, Sk, D), H % Hkv == 0; last dims contiguous, other strides free.
  // mask: bool (True = keep) or additive float (fp32 or q's dtype), already expanded to
  // (B, H, Sq, Sk) as a stride-0 view where broadcast. rng: int64 (2,) uint32 seeds on q's device,
  // needed when dropout_p > 0. Key j is hidden from query i when causal and j > i + causal_offset,
  // and unless i + causal_offset - window_left <= j <= i + causal_offset + window_right (-1:
  // unbounded). softcap > 0: scores c * tanh(s / c) before biases and masks. sinks (H,) and alibi
  // slopes (B, H, any strides) in the opmath dtype (float32; float64 for float64 q). v may have
  // its own head_dim Dv. Returns out (B, H, Sq, Dv) contiguous in q's dtype and lse (B, H, Sq)
  // float32 (float64 for float64 q; -inf: no visible key and no sink), sinks included.
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? rng, float scale, "
      "bool causal, int causal_offset, float dropout_p, int window_left, int window_right, "
      "float softcap, Tensor? sinks, Tensor? alibi) -> (Tensor out, Tensor lse)");
  // Gradients of the above from q, k, v, out and lse (nothing of size Sq x Sk is saved). dq, dk,
  // dv are contiguous in their inputs' dtypes. dmask is the float32 gradient of the scores
  // (B, H, Sq, Sk) when mask_grad, else an empty tensor; dsinks (H,) the sinks' gradient (empty
  // without sinks). deterministic: bitwise-reproducible.
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? mask, Tensor? rng, float scale, bool causal, int causal_offset, float dropout_p, "
      "int window_left, int window_right, float softcap, Tensor? sinks, Tensor? alibi, "
      "bool deterministic, bool mask_grad) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask, "
      "Tensor dsinks)");
  // The above against a paged KV cache, forward only: q (B, H, Sq, D) (any strides, last dim
  // contiguous); k_cache, v_cache (num_blocks, block_size, Hkv, D | Dv), block_size a power of two
  // >= 16; sequence b's key j is row j % block_size of block block_table[b, j / block_size]
  // (block_table int32 (B, max_blocks)). k_new, v_new (B, Sq, Hkv, D | Dv) (or None) are first
  // written in place at positions cache_seqlens[b] .. (int32 (B,)); sequence b then has
  // cache_seqlens[b] (+ Sq) keys, its queries the last ones (causal and the window aligned
  // bottom-right per sequence). Options as above. Returns out (B, Sq, H, Dv) contiguous
  // (seq-major) and lse (B, H, Sq). Lengths and block ids are checked before any key is touched.
  m.def(
      "paged_attention_forward(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor block_table, Tensor cache_seqlens, Tensor? k_new, Tensor? v_new, float scale, "
      "bool causal, int window_left, int window_right, "
      "float softcap, Tensor? sinks, Tensor? alibi) -> (Tensor out, Tensor lse)");
}
