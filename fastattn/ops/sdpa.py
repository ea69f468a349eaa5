"""``fastattn.scaled_dot_product_attention``: torch's SDPA contract on fastattn's attention.

What ``torch.nn.functional.scaled_dot_product_attention`` accepts, this accepts with torch's
result (its math backend is the yardstick): the same parameter names and defaults, broadcasting
of every leading dim of query, key and value (a 3-D query against 4-D keys, one query head
against four key heads), ``enable_gqa``'s head repetition, a mask broadcastable to the scores,
``torch.nn.attention.bias`` objects (``causal_upper_left`` / ``causal_lower_right``, served by
the causal kernel in that alignment, never materialised), ``dropout_p == 1`` and a 0-dim
tensor ``scale``. What torch refuses is
refused with torch's exception type. Deviations are listed in ``docs/api.md``.

Shapes go to the kernel as ``(batch, heads, seqlen, head_dim)``: the broadcast leading dims are
flattened into ``batch`` and their last one is ``heads``; broadcast dims are views (stride 0),
so nothing is expanded in memory except where strides cannot be merged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.overrides import has_torch_function

from fastattn import _checks, reference
from fastattn.ops.attention import MAX_HEAD_DIM, attention

__all__ = ["scaled_dot_product_attention"]

_NAME = "fastattn.scaled_dot_product_attention"


def _refuse(message: str) -> RuntimeError:
    return _checks.ShapeError(f"{_NAME}: {message}")


def _dtype_error(message: str) -> RuntimeError:
    return _checks.DTypeError(f"{_NAME}: {message}")  # a TypeError, as fastattn documents


def _check_qkv(query: Any, key: Any, value: Any) -> None:
    """The checks torch makes of q, k, v, with torch's exception types."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_NAME}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise _refuse(
            "query, key and value must be at least 2-D (..., seqlen, head_dim), got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise _dtype_error(
            f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, "
            f"{value.dtype}"
        )
    if not query.is_floating_point():
        raise _dtype_error(f"query, key and value must be floating point, got {query.dtype}")
    if not (query.device == key.device == value.device):
        raise _refuse(
            f"query, key and value must be on one device, got {query.device}, {key.device}, "
            f"{value.device}"
        )
    if key.shape[-1] != query.shape[-1]:
        raise _refuse(
            f"query and key must share head_dim (the last dim), got query {tuple(query.shape)} "
            f"and key {tuple(key.shape)}"
        )
    if value.shape[-2] != key.shape[-2]:
        raise _refuse(
            f"key and value must share seqlen (dim -2), got key {tuple(key.shape)} and value "
            f"{tuple(value.shape)}"
        )


def _causal_bias(mask: torch.Tensor, L: int, S: int, is_causal: bool) -> str:
    """The causal alignment a ``torch.nn.attention.bias.CausalBias`` stands for."""
    from torch.nn.attention.bias import CausalBias, CausalVariant

    if not isinstance(mask, CausalBias):
        raise TypeError(
            f"{_NAME}: attn_mask is a {type(mask).__name__}, a tensor subclass with its own "
            "__torch_function__ that fastattn does not understand; pass a plain bool or float "
            "tensor (or a torch.nn.attention.bias causal bias)"
        )
    if is_causal:
        raise ValueError(f"{_NAME}: a CausalBias attn_mask should not be used with is_causal=True")
    if (mask.seq_len_q, mask.seq_len_kv) != (L, S):
        raise _refuse(
            f"the causal bias is for ({mask.seq_len_q}, {mask.seq_len_kv}) scores but query and "
            f"key give ({L}, {S})"
        )
    return "top_left" if mask.variant == CausalVariant.UPPER_LEFT else "bottom_right"


def _heads(t: torch.Tensor) -> int:
    return t.shape[-3] if t.dim() >= 3 else 1


def _batch_dims(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool
) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor, bool]:
    """The broadcast leading dims ``(..., heads)``, k and v (repeated only where their heads
    differ from each other), and whether the kernel's native grouped-query path serves them."""
    qb, kb, vb = tuple(query.shape[:-2]), tuple(key.shape[:-2]), tuple(value.shape[:-2])
    grouped = False
    if enable_gqa:
        if min(query.dim(), key.dim(), value.dim()) < 3:
            raise IndexError(
                f"{_NAME}: enable_gqa=True needs a heads dim (dim -3) in query, key and value, "
                f"got shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        Hq, Hk, Hv = qb[-1], kb[-1], vb[-1]
        if Hk == 0 or Hv == 0 or Hq % Hk or Hq % Hv:
            raise _refuse(
                f"with enable_gqa the heads of key ({Hk}) and value ({Hv}) must divide the heads "
                f"of query ({Hq})"
            )
        if Hk != Hv:  # rare: a different repetition per tensor; repeat each (as torch does)
            key, value = key.repeat_interleave(Hq // Hk, -3), value.repeat_interleave(Hq // Hv, -3)
        grouped = Hk == Hv != Hq
        kb, vb = (*kb[:-1], Hq), (*vb[:-1], Hq)  # the heads after repetition
    try:
        bs = tuple(torch.broadcast_shapes(qb, kb, vb))
    except RuntimeError as e:
        hq, hk = _heads(query), _heads(key)
        hint = "; pass enable_gqa=True for grouped-query attention" if hk and hq % hk == 0 else ""
        raise _refuse(
            f"the leading dims of query {tuple(query.shape)}, key {tuple(key.shape)} and value "
            f"{tuple(value.shape)} do not broadcast{hint}"
        ) from e
    return bs, key, value, grouped


def _as4d(t: torch.Tensor, lead: tuple[int, ...], heads: int) -> torch.Tensor:
    """``t`` expanded to ``(*lead, heads, a, b)`` (its own last two dims) and flattened to
    ``(prod(lead), heads, a, b)``: a view unless broadcast strides cannot be merged."""
    t = t.reshape((1,) * max(0, len(lead) + 3 - t.dim()) + t.shape)  # pad the rank with 1s
    return t.expand(*lead, heads, *t.shape[-2:]).reshape(-1, heads, *t.shape[-2:])


def _mask4d(mask: torch.Tensor, bs: tuple[int, ...], L: int, S: int) -> torch.Tensor:
    """The mask as a 4-D tensor broadcastable to the kernel's ``(batch, heads, L, S)``."""
    full = (*bs, L, S)
    try:
        ok = mask.dim() <= len(full) and torch.broadcast_shapes(mask.shape, full) == full
    except RuntimeError:
        ok = False
    if not ok:
        raise _refuse(
            f"attn_mask of shape {tuple(mask.shape)} does not broadcast to the scores' shape {full}"
        )
    if not bs:
        return mask.reshape(1, 1, *mask.shape[-2:]) if mask.dim() else mask.reshape(1, 1, 1, 1)
    m = mask.reshape((1,) * (len(full) - mask.dim()) + mask.shape)
    lead, mh = m.shape[: len(bs) - 1], m.shape[len(bs) - 1]
    if math.prod(lead) == 1:  # the common masks: (L, S), (1, H, L, S), (B, 1, 1, S) in 4-D
        return m.reshape(1, mh, *m.shape[-2:])
    return _as4d(m, bs[:-1], mh)


def _plain(q: Any, k: Any, v: Any, attn_mask: Any, enable_gqa: bool) -> bool:
    """Plain 4-D q, k, v of matching batch and heads: what most calls pass, for attention()."""
    return (
        attn_mask is None
        and not enable_gqa
        and type(q) is torch.Tensor
        and type(k) is torch.Tensor
        and type(v) is torch.Tensor
        and q.dim() == 4
        and k.shape == v.shape
        and k.dim() == 4
        and q.shape[:2] == k.shape[:2]
        and q.shape[3] == k.shape[3] <= MAX_HEAD_DIM
        and q.is_floating_point()
        and q.dtype == k.dtype == v.dtype
        and q.device == k.device == v.device
    )


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` on fastattn's kernels: the same
    signature and semantics, so it can replace it by assignment.

    Args:
        query: ``(..., heads, seqlen_q, head_dim)`` (``(..., seqlen_q, head_dim)`` works too).
        key, value: ``(..., kv_heads, seqlen_k, head_dim)``; leading dims broadcast against
            query's (with ``enable_gqa``, ``kv_heads`` divides ``heads`` instead).
        attn_mask: bool (True = take part) or additive float (float32 or query's dtype),
            broadcastable to ``(..., heads, seqlen_q, seqlen_k)``; or a causal bias of
            ``torch.nn.attention.bias``.
        is_causal: top-left causal mask (``j <= i``); not together with ``attn_mask``.
        scale: multiplies ``q @ k^T`` (default ``head_dim ** -0.5``).

    Returns ``(..., heads, seqlen_q, value_head_dim)`` (v's head_dim may differ from q's). A
    head_dim over 256 runs the eager reference (same result, not fused).
    """
    if _plain(query, key, value, attn_mask, enable_gqa) and type(dropout_p) is float:
        if 0.0 <= dropout_p < 1.0 and (scale is None or type(scale) is float):
            res = attention(query, key, value, causal="top_left" if is_causal else False,
                            scale=scale, dropout_p=dropout_p)  # fmt: skip
            assert isinstance(res, torch.Tensor)
            return res
    _check_qkv(query, key, value)
    L, E = query.shape[-2:]
    S, Ev = key.shape[-2], value.shape[-1]
    causal: bool | str = "top_left" if is_causal else False
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"{_NAME}: attn_mask must be a tensor, got {type(attn_mask).__name__}")
        if type(attn_mask) is not torch.Tensor and has_torch_function((attn_mask,)):
            causal, attn_mask = _causal_bias(attn_mask, L, S, is_causal), None
        elif is_causal:  # torch's documented refusal (its math backend raises it)
            raise _refuse("pass either attn_mask or is_causal=True, not both (as torch)")
        elif attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise _dtype_error(
                f"attn_mask must be bool, float32 or query's dtype ({query.dtype}), got "
                f"{attn_mask.dtype}"
            )
        elif attn_mask.device != query.device:
            raise _refuse(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, int | float):
        raise TypeError(f"{_NAME}: dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise _refuse(f"dropout_p must be between 0 and 1, got {dropout_p}")
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = float(scale)  # torch's argument parser takes a 1-element tensor as a float
    elif scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)):
        raise TypeError(f"{_NAME}: scale must be a float or None, got {type(scale).__name__}")
    bs, key, value, grouped = _batch_dims(query, key, value, enable_gqa)
    mask4 = None if attn_mask is None else _mask4d(attn_mask, bs, L, S)
    lead, H = bs[:-1], (bs[-1] if bs else 1)
    q4 = _as4d(query, lead, H)  # (B, H, L, E)
    # k/v heads in the kernel: their own count under GQA, one when broadcast over q's heads.
    Hkv = _heads(key) if grouped or _heads(key) == _heads(value) == 1 else H
    k4, v4 = _as4d(key, lead, Hkv), _as4d(value, lead, Hkv)  # (B, Hkv, S, E|Ev)
    s = E**-0.5 if scale is None else float(scale)
    p = float(dropout_p) if dropout_p < 1.0 else 0.0  # p == 1 drops everything: zeros, as torch
    if max(E, Ev) > MAX_HEAD_DIM:  # the kernels take head_dims up to 256
        offset = 0 if causal in (False, "top_left") else S - L
        rng = torch.randint(0, 2**32, (2,), dtype=torch.int64, device=q4.device) if p else None
        out = reference.attention(q4, k4, v4, mask4, s, causal is not False, offset, p, rng)[0]
    else:
        res = attention(q4, k4, v4, causal=causal, scale=s, attn_mask=mask4, dropout_p=p)
        assert isinstance(res, torch.Tensor)
        out = res
    if dropout_p == 1.0:
        out = out * 0.0  # keeps the graph: zero gradients, as torch's
    return out.reshape(*bs, L, Ev)  # back to the broadcast rank
