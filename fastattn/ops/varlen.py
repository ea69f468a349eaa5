"""Variable-length (packed) attention: several sequences of different lengths in one
``(total_tokens, heads, head_dim)`` tensor, delimited by cumulative lengths (``cu_seqlens``), as
FlashAttention's ``flash_attn_varlen_func``. Each sequence attends only within itself.

The op ``fastattn::varlen_attention`` (and its backward op) is opaque to ``torch.compile``: the
lengths are read inside it, so a traced graph needs no host integer (no ``max_seqlen``) and has
no graph break. Inside, each sequence runs the backend's fused attention kernel on views of the
packed tensors (no copy of q, k or v; GQA without expanding k/v) — one kernel call per
sequence, so many very short sequences pay a call each (issue 16: a kernel that walks
``cu_seqlens`` itself is the next step).
"""

from __future__ import annotations

import torch

from fastattn import _checks, dispatch
from fastattn.ops import attention as _attn
from fastattn.ops import opcall

__all__ = ["varlen_attention"]

OP = "varlen_attention"
_GOLDEN = 0x9E3779B9  # per-sequence dropout seeds: seed0 ^ (index * golden ratio) mod 2**32


def _lengths(cu: torch.Tensor, total: int, name: str) -> list[int]:
    """The start offsets of ``cu`` (host list), checked: 0 first, non-decreasing, ``total``
    last; before any kernel runs."""
    starts = [int(x) for x in cu.tolist()]
    if (
        starts[0] != 0
        or starts[-1] != total
        or any(b < a for a, b in zip(starts, starts[1:], strict=False))
    ):
        raise _checks.ShapeError(
            f"fastattn.varlen_attention: {name} must start at 0, never decrease and end at the "
            f"packed length {total}; got {starts if len(starts) <= 12 else starts[:12] + ['...']}"
        )
    return starts


def _check_max(name: str, given: int, lengths: list[int]) -> None:
    longest = max((b - a for a, b in zip(lengths, lengths[1:], strict=False)), default=0)
    if given >= 0 and given < longest:
        raise _checks.ShapeError(
            f"fastattn.varlen_attention: {name}={given} is below the longest sequence ({longest})"
        )


def _seq(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return t[a:b].transpose(0, 1).unsqueeze(0)  # (1, H, L, D): a view


def _seq_rng(rng: torch.Tensor | None, i: int) -> torch.Tensor | None:
    if rng is None:
        return None
    return rng ^ torch.tensor([(i * _GOLDEN) & 0xFFFFFFFF, 0], dtype=rng.dtype, device=rng.device)


def _seq_args(q, k, v, span, i, rng, alibi, scale, causal, p, wl, wr, softcap, sinks) -> tuple:
    """The attention ops' arguments (attention.run_forward's order) for sequence ``i`` of the
    packed tensors, ``span`` its (q0, q1, k0, k1) rows: views of q, k, v, no mask, its dropout
    seeds, the causal offset of its lengths (bottom-right), its ALiBi row."""
    q0, q1, k0, k1 = span
    al = None if alibi is None else alibi[i : i + 1]  # (1, H)
    return (_seq(q, q0, q1), _seq(k, k0, k1), _seq(v, k0, k1), None, _seq_rng(rng, i), scale,
            causal, (k1 - k0) - (q1 - q0), p, wl, wr, softcap, sinks, al)  # fmt: skip


def _bounds(cu_q, cu_k, total_q, total_k, max_q, max_k):
    sq, sk = _lengths(cu_q, total_q, "cu_seqlens_q"), _lengths(cu_k, total_k, "cu_seqlens_k")
    _check_max("max_seqlen_q", max_q, sq)
    _check_max("max_seqlen_k", max_k, sk)
    return list(zip(sq, sq[1:], sk, sk[1:], strict=False))


@torch.library.custom_op("fastattn::varlen_attention", mutates_args=())
def varlen_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    rng: torch.Tensor | None,
    scale: float,
    causal: bool,
    dropout_p: float,
    window_left: int,
    window_right: int,
    softcap: float,
    sinks: torch.Tensor | None,
    alibi: torch.Tensor | None,
    backend: str,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out ``(total_q, heads, head_dim_v)`` and lse ``(heads, total_q)`` (FlashAttention's
    layout); each sequence's causal mask and window aligned bottom-right."""
    T, H = q.shape[0], q.shape[1]
    out = opcall.new_output(q.new_empty((T, H, v.shape[-1])))
    lse = q.new_empty((H, T), dtype=_attn.lse_dtype(q))
    spans = _bounds(cu_seqlens_q, cu_seqlens_k, T, k.shape[0], max_seqlen_q, max_seqlen_k)
    for i, (q0, q1, k0, k1) in enumerate(spans):
        if q1 == q0:
            continue
        args = _seq_args(q, k, v, (q0, q1, k0, k1), i, rng, alibi, scale, causal, dropout_p,
                         window_left, window_right, softcap, sinks)  # fmt: skip
        o, s = _attn.run_forward(backend, args, deterministic)
        out[q0:q1] = o[0].transpose(0, 1)
        lse[:, q0:q1] = s[0]
    return out, lse


@torch.library.custom_op("fastattn::varlen_attention_backward", mutates_args=())
def varlen_attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    rng: torch.Tensor | None,
    scale: float,
    causal: bool,
    dropout_p: float,
    window_left: int,
    window_right: int,
    softcap: float,
    sinks: torch.Tensor | None,
    alibi: torch.Tensor | None,
    backend: str,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (packed as q, k, v) and dsinks ``(heads,)`` (empty without sinks)."""
    dq, dk, dv = (torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    dsinks = torch.zeros_like(sinks) if sinks is not None else q.new_empty((0,), dtype=lse.dtype)
    spans = _bounds(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], -1, -1)
    for i, (q0, q1, k0, k1) in enumerate(spans):
        if q1 == q0:
            continue
        args = _seq_args(q, k, v, (q0, q1, k0, k1), i, rng, alibi, scale, causal, dropout_p,
                         window_left, window_right, softcap, sinks)  # fmt: skip
        seq, rest = args[:3], args[4:]  # (q, k, v); rng .. alibi (the mask, args[3], is None)
        go = _seq(grad_out, q0, q1).contiguous()
        o = _seq(out, q0, q1)
        s = lse[:, q0:q1].unsqueeze(0)  # (1, H, L)
        g = _backward(backend, go, seq, o, s, rest, deterministic)
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = (t[0].transpose(0, 1) for t in g[:3])
        if sinks is not None:
            dsinks += g[3]
    return dq, dk, dv, dsinks


def _backward(backend, go, seq, o, s, rest, deterministic):
    mask_args = (None,)
    if backend == "triton":
        op = torch.ops.fastattn.attention_triton_backward.default
    else:
        op = torch.ops.fastattn.attention_backward.default
    dq, dk, dv, _dmask, dsinks = op(go, *seq, o, s, *mask_args, *rest, deterministic, False)
    return dq, dk, dv, dsinks


@varlen_attention_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, *_):
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))  # (T, H, Dv)
    return out, q.new_empty((q.shape[1], q.shape[0]), dtype=_attn.lse_dtype(q))


@varlen_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_q, cu_k, rng, scale, causal, p, wl, wr, cap, sinks, *_):
    like = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    dsinks = torch.empty_like(sinks) if sinks is not None else q.new_empty((0,), dtype=lse.dtype)
    return (*like, dsinks)


_SINKS = 14  # position of sinks in the forward op's inputs


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, _mq, _mk, rng = inputs[:8]
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rng, inputs[_SINKS], inputs[_SINKS + 1])
    ctx.args = tuple(inputs[8:_SINKS])  # scale .. softcap
    ctx.backend, ctx.deterministic = inputs[_SINKS + 2], inputs[_SINKS + 3]


def _backward_formula(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_q, cu_k, rng, sinks, alibi = ctx.saved_tensors
    dq, dk, dv, dsinks = torch.ops.fastattn.varlen_attention_backward(
        grad_out, q, k, v, out, lse, cu_q, cu_k, rng, *ctx.args, sinks, alibi, ctx.backend,
        ctx.deterministic,
    )  # fmt: skip
    grads: list = [dq, dk, dv] + [None] * (len(ctx.needs_input_grad) - 3)
    if ctx.needs_input_grad[_SINKS]:
        grads[_SINKS] = dsinks
    return tuple(grads)


varlen_attention_op.register_autograd(_backward_formula, setup_context=_setup_context)


def _check(q, k, v, cu_q, cu_k, sinks, alibi) -> None:
    """Shapes, dtypes and devices, before allocating (the lengths' values: inside the op)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise _checks.ShapeError(
                f"fastattn.varlen_attention: {name} must be packed (total_tokens, heads, "
                f"head_dim), got {got}"
            )
    if k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1] or k.shape[2] != q.shape[2]:
        raise _checks.ShapeError(
            f"fastattn.varlen_attention: k (total_k, kv_heads, head_dim) must match q's head_dim "
            f"and v (total_k, kv_heads, head_dim_v); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise _checks.ShapeError(
            f"fastattn.varlen_attention: heads ({q.shape[1]}) must be a multiple of kv_heads "
            f"({k.shape[1]})"
        )
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"fastattn.varlen_attention: q, k, v must share one floating dtype, got {q.dtype}, "
            f"{k.dtype}, {v.dtype}"
        )
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1:
            got = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else cu
            raise TypeError(
                f"fastattn.varlen_attention: {name} must be a 1-D int32 tensor (batch + 1,), "
                f"got {got}"
            )
        if cu.numel() == 0:
            raise _checks.ShapeError(f"fastattn.varlen_attention: {name} is empty (needs >= 1)")
    if cu_q.shape != cu_k.shape:
        raise _checks.ShapeError(
            f"fastattn.varlen_attention: cu_seqlens_q {tuple(cu_q.shape)} and cu_seqlens_k "
            f"{tuple(cu_k.shape)} must both be (batch + 1,)"
        )
    for name, t in (("k", k), ("v", v), ("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if t.device != q.device:
            raise _checks.ShapeError(
                f"fastattn.varlen_attention: {name} is on {t.device} but q is on {q.device}"
            )
    if alibi is not None and alibi.dim() == 2 and alibi.shape[0] != cu_q.numel() - 1:
        raise _checks.ShapeError(
            f"fastattn.varlen_attention: alibi_slopes (batch, heads) must have batch = "
            f"{cu_q.numel() - 1} sequences, got {tuple(alibi.shape)}"
        )


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed sequences (FlashAttention's ``flash_attn_varlen_func``).

    Args:
        q: ``(total_q, heads, head_dim)``: the sequences' queries one after another.
        k, v: ``(total_k, kv_heads, head_dim)`` (v: ``head_dim_v``); ``heads`` a multiple of
            ``kv_heads`` (GQA / MQA, never expanded).
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` cumulative lengths: sequence ``b``
            is rows ``cu[b] .. cu[b + 1] - 1``; 0 first, non-decreasing, the packed length last
            (checked before any kernel runs). A sequence may be empty.
        max_seqlen_q, max_seqlen_k: optional; checked against the lengths when given, never
            needed (``torch.compile`` traces the call without host integers).
        causal, window, softcap, sinks, alibi_slopes, scale, dropout_p, deterministic, backend:
            as :func:`fastattn.attention`, per sequence, causal and window aligned bottom-right
            (FlashAttention's varlen semantics). ``alibi_slopes`` ``(heads,)`` or ``(batch,
            heads)``. Dropout draws each sequence's mask from its own seeds.
        return_lse: also return the log-sum-exp ``(heads, total_q)`` (FlashAttention's layout).

    Returns ``out`` ``(total_q, heads, head_dim_v)``. A query that sees no key gives zeros.
    """
    for name, value in (("scale", scale), ("dropout_p", dropout_p), ("softcap", softcap)):
        _checks.number("varlen_attention", name, value)
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, sinks, alibi_slopes)
    nseq, H, D = cu_seqlens_q.numel() - 1, q.shape[1], q.shape[2]
    _attn.check_variants(q.new_empty((nseq, H, 0, D)), window, softcap, sinks, alibi_slopes)
    if not 0.0 <= dropout_p < 1.0:
        raise _checks.ShapeError(
            f"fastattn.varlen_attention: dropout_p must be in [0, 1), got {dropout_p}"
        )
    scale_f = D**-0.5 if scale is None else float(scale)
    wl, wr = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    if causal and window is not None:
        wr = 0
    rng = None
    if dropout_p > 0.0:
        rng = torch.randint(0, 2**32, (2,), dtype=torch.int64, device=q.device)
    name = dispatch.select(backend, q.device, q.dtype, "attention", _attn.CPP_BACKENDS)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = (t.contiguous() for t in (q, k, v))
    opm = _attn.lse_dtype(q)
    sk = None if sinks is None else sinks.to(opm).contiguous()  # the kernels index (H,)
    al = None if alibi_slopes is None else alibi_slopes.detach().to(opm).expand(nseq, H)
    if name == "reference":  # the oracle: eager, per sequence, its gradients by autograd
        return _reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rng,
                          scale_f, bool(causal), float(dropout_p), wl, wr, float(softcap), sk, al,
                          return_lse)  # fmt: skip
    out, lse = opcall.call(
        torch.ops.fastattn.varlen_attention, q, k, v, cu_seqlens_q, cu_seqlens_k,
        -1 if max_seqlen_q is None else int(max_seqlen_q),
        -1 if max_seqlen_k is None else int(max_seqlen_k), rng, scale_f, bool(causal),
        float(dropout_p), wl, wr, float(softcap), sk, al, name, bool(deterministic),
    )  # fmt: skip
    return (out, lse) if return_lse else out


def _reference(q, k, v, cu_q, cu_k, max_q, max_k, rng, scale, causal, p, wl, wr, cap, sinks, al,
               return_lse):  # fmt: skip
    """The reference backend: :func:`fastattn.reference.attention` per sequence (reads the
    lengths on the host, so ``torch.compile`` breaks the graph here)."""
    spans = _bounds(cu_q, cu_k, q.shape[0], k.shape[0], -1 if max_q is None else int(max_q),
                    -1 if max_k is None else int(max_k))  # fmt: skip
    outs, lses = [], []
    for i, span in enumerate(spans):
        args = _seq_args(q, k, v, span, i, rng, al, scale, causal, p, wl, wr, cap, sinks)
        o, s = _attn.run_forward("reference", args)
        outs.append(o[0].transpose(0, 1))
        lses.append(s[0])
    out = torch.cat(outs) if outs else q.new_empty((0, q.shape[1], v.shape[-1]))
    lse = torch.cat(lses, dim=1) if lses else q.new_empty((q.shape[1], 0))
    return (out, lse.detach()) if return_lse else out
