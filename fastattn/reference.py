"""Eager PyTorch implementations of every fastattn op: the ``reference`` backend and test oracle.

Written for clarity, not speed: math in float32 (float64 for float64 inputs, which is what the
tests use as ground truth), result cast back to the input dtype. Semantics here define the op;
the kernels must match them.
"""

from __future__ import annotations

import torch


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = keep) as 0 / -inf in ``dtype``; a float mask as is, in ``dtype``."""
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, float("-inf"))
    return mask.to(dtype)


def causal_mask(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """Bool ``(rows, cols)``, True where column j <= row i (top-left aligned, as torch's SDPA)."""
    return torch.ones(rows, cols, dtype=torch.bool, device=device).tril()


def softmax(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float = 1.0,
    causal: bool = False,
    log: bool = False,
    *,
    opmath: torch.dtype | None = None,
) -> torch.Tensor:
    """``softmax(x * scale + mask)`` (or log-softmax) over the last dim of ``x``.

    ``mask`` is bool (True = keep) or additive float, broadcastable to ``x``; ``causal`` masks
    column j > row i of the last two dims. A row with every entry masked gives zeros (log-softmax:
    -inf) and a zero gradient, never NaN; a NaN input gives NaN in its row.
    """
    dt = _opmath(x.dtype)
    z = x.to(dt) * scale
    if mask is not None:
        z = z + additive_mask(mask, dt)
    if causal:
        rows = x.shape[-2] if x.dim() >= 2 else 1
        keep = causal_mask(rows, x.shape[-1], x.device)
        z = z.masked_fill(~keep if x.dim() >= 2 else ~keep[0], float("-inf"))
    # Masked entries are constants of the output (0, or -inf for log): masked_fill also stops
    # their gradient, so they neither receive one nor enter the row sums of the backward pass.
    masked = z == float("-inf")
    dead = masked.all(dim=-1, keepdim=True)  # rows with nothing visible
    z = z.masked_fill(dead, 0.0)
    if log:
        y = torch.log_softmax(z, dim=-1).masked_fill(masked, float("-inf"))
    else:
        y = torch.softmax(z, dim=-1).masked_fill(masked, 0.0)
    return y.to(x.dtype)


def norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    rms: bool = False,
    residual: torch.Tensor | None = None,
    *,
    opmath: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LayerNorm (or RMSNorm when ``rms``) over the last dim of ``h = x (+ residual)``.

    Returns ``(y, h)``, with ``h`` None when there is no residual. ``h`` is rounded to x's dtype
    before it is normalised, so ``y`` is exactly the norm of the ``h`` returned. Statistics in
    fp32 (fp64 for float64 inputs); weight and bias may have another float dtype than x.
    """
    h = x if residual is None else (x.to(_opmath(x.dtype)) + residual).to(x.dtype)
    dt = opmath or _opmath(x.dtype)
    hf = h.to(dt)
    if rms:
        y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        mean = hf.mean(-1, keepdim=True)
        var = (hf - mean).pow(2).mean(-1, keepdim=True)
        y = (hf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(dt)
    if bias is not None:
        y = y + bias.to(dt)
    return y.to(x.dtype), (None if residual is None else h)
