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
    # (both operands converted: torch promotes no float8 dtype)
    h = x if residual is None else (x.to(_opmath(x.dtype)) + residual.to(_opmath(x.dtype)))
    h = h.to(x.dtype)
    dt = opmath or _opmath(x.dtype)
    hf = h.to(dt)
    if rms:
        y = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        # The mean about the row's first element: that of a constant row (any magnitude) is then
        # exact, where a plain mean of n equal values may be an ulp off, which (h - mean) / std
        # turns into outputs of 1 instead of 0. (Detached: a constant shift, so the gradient is
        # the plain mean's, without a cancelling path through the first element.)
        first = hf[..., :1].detach()
        mean = first + (hf - first).mean(-1, keepdim=True)
        var = (hf - mean).pow(2).mean(-1, keepdim=True)
        y = (hf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(dt)
    if bias is not None:
        y = y + bias.to(dt)
    return y.to(x.dtype), (None if residual is None else h)


# ------------------------------------------------------------------------------- attention
# Dropout keep-mask of attention: a counter-based hash of (seed, row, key), the same bits on every
# backend, so a backward pass regenerates the mask instead of storing it and the kernels can be
# checked exactly against this oracle. mix32 is Wellons' "lowbias32"; both multipliers are below
# 2**31, so the products of 32-bit values fit int64 here (and wrap mod 2**32 in the kernels).
_MIX_M1, _MIX_M2 = 0x21F0AAAD, 0x735A2D97
_U32 = 0xFFFFFFFF
DROPOUT_BITS = 24  # keep iff (hash >> 8) >= round(p * 2**24)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values: x ^= x>>16; x *= M1; x ^= x>>15;
    x *= M2; x ^= x>>15 (all mod 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MIX_M1) & _U32
    x = x ^ (x >> 15)
    x = (x * _MIX_M2) & _U32
    return x ^ (x >> 15)


def dropout_threshold(p: float) -> int:
    """The integer threshold of dropout probability ``p``: an entry is kept iff the top 24 bits
    of its hash are >= this."""
    return min(int(p * (1 << DROPOUT_BITS) + 0.5), 1 << DROPOUT_BITS)


def dropout_keep(
    rng: torch.Tensor, batch: int, heads: int, seqlen_q: int, seqlen_k: int, p: float
) -> torch.Tensor:
    """Bool ``(batch, heads, seqlen_q, seqlen_k)``: True where attention dropout keeps P[i, j].

    ``rng`` is int64 ``(2,)`` holding two uint32 seeds. With ``row = (b * heads + h) * seqlen_q
    + i`` (mod 2**32): ``r = mix32(mix32(row ^ seed0) ^ ((j + seed1) mod 2**32))``, kept iff
    ``(r >> 8) >= dropout_threshold(p)``.
    """
    dev = rng.device
    seed0, seed1 = (int(s) & _U32 for s in rng.tolist())
    rows = torch.arange(batch * heads * seqlen_q, device=dev, dtype=torch.int64) & _U32
    a = mix32(rows ^ seed0).view(batch, heads, seqlen_q, 1)
    cols = (torch.arange(seqlen_k, device=dev, dtype=torch.int64) + seed1) & _U32
    r = mix32(a ^ cols)
    return (r >> (32 - DROPOUT_BITS)) >= dropout_threshold(p)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    causal_offset: int = 0,
    dropout_p: float = 0.0,
    rng: torch.Tensor | None = None,
    *,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    opmath: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention, materialising the scores: returns ``(out, lse)``.

    q ``(batch, heads, seqlen_q, head_dim)``; k, v ``(batch, kv_heads, seqlen_k, head_dim)`` with
    ``heads % kv_heads == 0`` (query head h reads kv head ``h // (heads // kv_heads)``).
    ``s = scale * q @ k^T + mask`` (scale default ``head_dim ** -0.5``; mask bool, True = keep,
    or additive float, broadcastable to ``(batch, heads, seqlen_q, seqlen_k)``); ``causal`` hides
    key j from query i when ``j > i + causal_offset`` (FlashAttention's bottom-right alignment is
    ``causal_offset = seqlen_k - seqlen_q``, torch's SDPA top-left is 0). ``lse`` ``(batch, heads,
    seqlen_q)`` float32 (float64 for float64 inputs) is logsumexp of each row of s before dropout;
    ``P = exp(s - lse)``, dropped by :func:`dropout_keep` and scaled by ``1 / (1 - dropout_p)``;
    ``out = P @ v`` in q's dtype. A row with no visible key gives out 0, lse -inf, zero grads.
    v may have its own head_dim (``(batch, kv_heads, seqlen_k, head_dim_v)``; out follows it).

    The score of query i and key j, in this order (docs/attention.md):
    ``t = scale * q_i . k_j``; with ``softcap`` c > 0, ``t = c * tanh(t / c)``; with
    ``alibi_slopes`` (``(heads,)`` or ``(batch, heads)``), ``t -= slope * |i + causal_offset -
    j|``; then the mask is added. ``window = (left, right)`` (-1: unbounded) hides key j unless
    ``i + causal_offset - left <= j <= i + causal_offset + right``, as causal hides ``j > i +
    causal_offset``. ``sinks`` (``(heads,)``): one more logit per head in each row's softmax
    denominator, with no value (gpt-oss); ``lse`` then includes it and a row with no visible key
    has out 0 and lse = its sink.
    """
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dt = opmath or _opmath(q.dtype)
    group = H // Hkv
    kf = k.to(dt).repeat_interleave(group, dim=1)  # (B, H, Sk, D)
    vf = v.to(dt).repeat_interleave(group, dim=1)
    s = (q.to(dt) @ kf.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)
    if softcap > 0.0:
        s = torch.tanh(s / softcap) * softcap
    i = torch.arange(Sq, device=q.device).view(Sq, 1)
    j = torch.arange(Sk, device=q.device).view(1, Sk)
    rel = j - (i + causal_offset)  # key position relative to the query's diagonal
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dt).reshape(-1, H, 1, 1)  # (1 | B, H, 1, 1)
        s = s - slopes * rel.abs().to(dt)
    if mask is not None:
        s = s + additive_mask(mask, dt)
    left, right = window
    hidden = torch.zeros(Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:
        hidden |= rel > 0
    if left >= 0:
        hidden |= rel < -left
    if right >= 0:
        hidden |= rel > right
    if causal or left >= 0 or right >= 0:
        s = s.masked_fill(hidden, float("-inf"))
    masked = s == float("-inf")
    dead = masked.all(dim=-1, keepdim=True)  # rows with no visible key
    s = s.masked_fill(dead, 0.0)
    if sinks is not None:  # the sink joins each row as one more logit without a value
        sk = sinks.to(dt).view(1, H, 1, 1).expand(B, H, Sq, 1)
        s_all = torch.cat([s.masked_fill(masked, float("-inf")), sk], dim=-1)
        void = dead & (sk == float("-inf"))  # no key and a -inf sink: as a row without sinks
        s_all = s_all.masked_fill(void, 0.0)
        lse = torch.logsumexp(s_all, dim=-1, keepdim=True).masked_fill(void, float("-inf"))
        p = torch.softmax(s_all, dim=-1)[..., :Sk].masked_fill(masked, 0.0)
    else:
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        # softmax subtracts the row max: exp(s - lse) loses P when |s| is huge (lse = max +
        # log(n) rounds to max at |s| ~ 1e30 even in float64, and every P becomes 1).
        p = torch.softmax(s, dim=-1).masked_fill(masked, 0.0)
    if dropout_p > 0.0:
        if rng is None:
            raise ValueError("reference.attention: dropout_p > 0 needs the rng seeds")
        keep = dropout_keep(rng, B, H, Sq, Sk, dropout_p)
        p = torch.where(keep, p / (1.0 - dropout_p), 0.0)
    out = (p @ vf).to(q.dtype)
    if sinks is None:
        lse = lse.masked_fill(dead, float("-inf"))
    return out, lse.squeeze(-1)
