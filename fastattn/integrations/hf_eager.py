"""The unfused attention that transformers' ``output_attentions=True`` asks for: it returns the
attention weights, which a fused kernel never forms. :func:`model_eager` finds the model's own
eager attention (the weights are then the model's, whatever its convention: gpt-oss gives a
sink its share of each row, Granite-SWA rescales the output instead) and :func:`additive_mask`
gives it the mask it expects; :func:`attention_with_weights` is the generic one, for a model
without its own. Masking is that of transformers' eager path (masked scores at the dtype's
minimum, so a fully masked row is uniform, not NaN)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["additive_mask", "attention_with_weights", "model_eager"]


def model_eager(module: torch.nn.Module) -> Callable[..., Any] | None:
    """The ``eager_attention_forward`` of the modeling module that defines ``module``'s class
    (transformers' convention: the default its attention passes the interface), or None."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn if callable(fn) else None


def additive_mask(
    mask: torch.Tensor | None,
    seqlen_q: int,
    seqlen_k: int,
    causal: bool | str,
    window: tuple[int, int] | None,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """The additive ``(batch, 1, seqlen_q, seqlen_k)`` mask of transformers' eager path (0, or the
    dtype's minimum where hidden) for ``mask`` (bool, True = attend; or additive) combined with
    the causal flag and window as :func:`fastattn.attention` applies them."""
    device = mask.device if mask is not None else torch.device("cpu")
    keep = _visible(seqlen_q, seqlen_k, causal, window, device)
    if mask is None and keep is None:
        return None
    low = torch.finfo(dtype).min
    if mask is None or mask.dtype == torch.bool:
        keep = keep if mask is None else mask if keep is None else mask & keep
        assert keep is not None
        keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))  # (B | 1, 1, Sq, Sk)
        return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, low)
    out = mask.to(dtype)
    if keep is not None:
        out = out.masked_fill(~keep, low)
    return out.clamp_min(low)


def _visible(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool | str,
    window: tuple[int, int] | None,
    device: torch.device,
) -> torch.Tensor | None:
    """The ``(seqlen_q, seqlen_k)`` bool visibility of the causal flag and the window, aligned as
    :func:`fastattn.attention` aligns them (bottom-right; top-left for ``"top_left"``)."""
    if not causal and window is None:
        return None
    offset = 0 if causal == "top_left" else seqlen_k - seqlen_q
    i = torch.arange(seqlen_q, device=device)[:, None] + offset
    j = torch.arange(seqlen_k, device=device)[None, :]
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    left, right = window if window is not None else (-1, -1)
    if causal:  # (a window's right side is then 0)
        right = 0
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def attention_with_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool | str = False,
    dropout: float = 0.0,
    scaling: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``(batch, heads, seqlen_q, head_dim)``, k ``(batch, kv_heads, seqlen_k, head_dim)``, v
    ``(batch, kv_heads, seqlen_k, head_dim_v)``; returns ``(out (batch, seqlen_q, heads,
    head_dim_v), weights (batch, heads, seqlen_q, seqlen_k))``. ``causal``, ``window``,
    ``softcap`` and ``sinks`` ``(heads,)`` as in :func:`fastattn.attention` (the weights of the
    keys; a sink takes its share of each row and has no column)."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, k.transpose(2, 3)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    keep = _visible(query.shape[2], k.shape[2], causal, window, query.device)
    if keep is not None:
        if mask is None or mask.dtype == torch.bool:
            mask = keep if mask is None else mask & keep
        else:
            mask = mask.masked_fill(~keep, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:  # -inf (a bias hidden by the mask) as eager's minimum: no NaN rows
            scores = (scores + mask).clamp_min(torch.finfo(scores.dtype).min)
    if sinks is not None:  # one more logit per row, in the denominator only
        sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        weights = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=torch.float32)
        weights = weights[..., :-1].to(query.dtype)
    else:
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout > 0:
        weights = torch.nn.functional.dropout(weights, p=dropout)
    out = torch.matmul(weights, v)
    return out.transpose(1, 2).contiguous(), weights
