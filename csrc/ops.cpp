// Every fastattn dispatcher op is declared here, once. Kernels register per dispatch key in the
// op's own file (CPU: csrc/<op>.cpp, CUDA: csrc/cuda/<op>.cpp); fake (meta) kernels and autograd
// formulas are registered from Python (fastattn/ops/<op>.py).
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
  // bias are (N,) of any float dtype. mean (empty for RMSNorm) and rstd are fp32 per row, saved
  // for the backward pass. See fastattn/ops/norm.py.
  m.def(
      "norm(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms) -> "
      "(Tensor out, Tensor residual_out, Tensor mean, Tensor rstd)");
  // Gradients of the above, from the normalised input (h, or x without residual). grad_residual_out
  // (the gradient reaching h directly) is added to dx. dweight/dbias are (N,) fp32 sums reduced
  // deterministically (fixed partial sums, no atomics); dbias is empty unless has_bias.
  m.def(
      "norm_backward(Tensor grad_out, Tensor? grad_residual_out, Tensor input, Tensor? weight, "
      "Tensor mean, Tensor rstd, bool rms, bool has_bias) -> (Tensor dx, Tensor dweight, "
      "Tensor dbias)");
}
