"""Exact (flash) attention: ``softmax(scale * q @ k^T + mask) @ v`` without the score matrix.

The kernels are the Triton ones in ``fastattn/ops/_attention_triton.py`` and the CPU C++ ones in
``csrc/attention.cpp``; the oracle is ``fastattn.reference.attention``; ``docs/attention.md`` is
the contract between them. This file holds the custom-op glue (fake kernels, autograd) shared by
both, the input checks, and the public functions ``attention`` and
``scaled_dot_product_attention``.
"""

from __future__ import annotations

from typing import Any

import torch

from fastattn import _checks, dispatch, reference
from fastattn.ops import _attention_triton as _tri
from fastattn.ops import _attention_triton_bwd as _tri_bwd
from fastattn.ops import opcall

MAX_HEAD_DIM = 256
OP = "attention"


# ------------------------------------------------------------------------- custom-op glue
@torch.library.custom_op("fastattn::attention_triton", mutates_args=())
def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    rng: torch.Tensor | None,
    scale: float,
    causal: bool,
    causal_offset: int,
    dropout_p: float,
    window_left: int,
    window_right: int,
    softcap: float,
    sinks: torch.Tensor | None,
    alibi: torch.Tensor | None,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton kernel of ``fastattn::attention`` (schema in csrc/ops.cpp), plus ``deterministic``
    for its backward pass (the C++ CPU backward is always deterministic)."""
    return _tri.triton_forward(q, k, v, mask, rng, scale, causal, causal_offset, dropout_p,
                               window_left, window_right, softcap, sinks, alibi)  # fmt: skip


@torch.library.custom_op("fastattn::attention_triton_backward", mutates_args=())
def attention_triton_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    rng: torch.Tensor | None,
    scale: float,
    causal: bool,
    causal_offset: int,
    dropout_p: float,
    window_left: int,
    window_right: int,
    softcap: float,
    sinks: torch.Tensor | None,
    alibi: torch.Tensor | None,
    deterministic: bool,
    mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _tri_bwd.triton_backward(
        grad_out, q, k, v, out, lse, mask, rng, scale, causal, causal_offset, dropout_p,
        deterministic, mask_grad, window_left, window_right, softcap, sinks, alibi,
    )  # fmt: skip


def lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fake_forward(q, k, v, *_):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))  # (B, H, Sq, Dv)
    return out, q.new_empty(q.shape[:-1], dtype=lse_dtype(q))


def _fake_backward(grad_out, q, k, v, out, lse, mask, rng, scale, causal, causal_offset,
                   dropout_p, window_left, window_right, softcap, sinks, alibi, deterministic,
                   mask_grad):  # fmt: skip
    like = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    dmask_shape = (*q.shape[:-1], k.shape[-2]) if mask_grad else (0,)
    dsinks = (
        torch.empty_like(sinks) if sinks is not None else q.new_empty((0,), dtype=torch.float32)
    )
    return (*like, q.new_empty(dmask_shape, dtype=torch.float32), dsinks)


# Positions in the ops' inputs (csrc/ops.cpp): q, k, v, mask, rng, then the scalars from scale to
# alibi, then (Triton only) deterministic.
_SINKS, _NARGS = 12, 14


def _setup_context(ctx, inputs, output):
    q, k, v, mask, rng = inputs[:5]
    sinks, alibi = inputs[_SINKS], inputs[_SINKS + 1]
    out, lse = output
    ctx.mark_non_differentiable(lse)  # lse is returned for inspection/merging, not for training
    ctx.save_for_backward(q, k, v, out, lse, mask, rng, sinks, alibi)
    ctx.args = tuple(inputs[5:_SINKS])  # scale .. softcap
    ctx.deterministic = bool(inputs[_NARGS]) if len(inputs) > _NARGS else True


def _make_backward(backward_op: Any) -> Any:
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, mask, rng, sinks, alibi = ctx.saved_tensors
        mask_grad = ctx.needs_input_grad[3]
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        dq, dk, dv, dmask, dsinks = backward_op(
            grad_out, q, k, v, out, lse, mask, rng, *ctx.args, sinks, alibi, ctx.deterministic,
            mask_grad,
        )  # fmt: skip
        dmask = dmask.to(mask.dtype) if mask_grad else None
        grads = [dq, dk, dv, dmask] + [None] * (len(ctx.needs_input_grad) - 4)
        if ctx.needs_input_grad[_SINKS]:
            grads[_SINKS] = dsinks
        return tuple(grads)

    return backward


def _register(fwd: str, bwd: str) -> None:
    opcall.register_op(fwd, bwd, _fake_forward, _fake_backward, _make_backward, _setup_context)


_register("fastattn::attention_triton", "fastattn::attention_triton_backward")
CPP_BACKENDS = dispatch.cpp_kernels(OP)  # backends of the C++ op in this build
if CPP_BACKENDS:
    _register("fastattn::attention", "fastattn::attention_backward")


def _cuda_backward(*args: Any) -> tuple[torch.Tensor, ...]:
    """The backward of the CUDA C++ forward (which has none of its own): the Triton kernels',
    on the same saved out and lse (one contract: csrc/ops.cpp); fastattn.backends() says so."""
    if dispatch.TRITON_ERROR is not None:
        raise RuntimeError(
            "fastattn.attention: the cuda backend's attention is forward-only and its backward "
            f"runs the Triton kernels, which are unavailable here ({dispatch.TRITON_ERROR}); "
            "use backend='triton' or 'reference' to train"
        )
    return torch.ops.fastattn.attention_triton_backward.default(*args)


if "cuda" in CPP_BACKENDS and "cuda" not in dispatch.cpp_kernels("attention_backward"):
    torch.library.impl("fastattn::attention_backward", "CUDA")(_cuda_backward)


# ---------------------------------------------------------------------------------- checks
def _check(q: Any, k: Any, v: Any, attn_mask: Any, dropout_p: Any, scale: Any) -> None:
    """Shapes, dtypes and devices of an attention call, before anything is allocated."""
    if _plain(q, k, v) and attn_mask is None and type(dropout_p) is float and dropout_p == 0.0:
        if scale is None or type(scale) is float:
            return  # the common call, accepted by one expression (hot in decode steps)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.floating_tensor(OP, name, t)
        if t.dim() != 4:
            raise _checks.ShapeError(
                f"fastattn.attention: {name} must be 4-D (batch, heads, seqlen, head_dim), got "
                f"shape {tuple(t.shape)}"
            )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise _checks.DTypeError(
            f"fastattn.attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise _checks.ShapeError(
                f"fastattn.attention: {name} is on {t.device} but q is on {q.device}"
            )
    B, H, _, D = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != B or k.shape[3] != D:
        raise _checks.ShapeError(
            "fastattn.attention: expected k (batch, kv_heads, seqlen_k, head_dim) matching q's "
            "batch and head_dim, and v (batch, kv_heads, seqlen_k, head_dim_v); got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    Hkv = k.shape[1]
    if Hkv == 0 or H % Hkv != 0:
        raise _checks.ShapeError(
            f"fastattn.attention: q's heads ({H}) must be a multiple of k/v's heads ({Hkv}) "
            f"(q {tuple(q.shape)}, k {tuple(k.shape)})"
        )
    for what, d in (("head_dim", D), ("v's head_dim", v.shape[3])):
        if d > MAX_HEAD_DIM:
            raise _checks.ShapeError(
                f"fastattn.attention: {what} {d} exceeds the supported maximum {MAX_HEAD_DIM}"
            )
    _checks.number(OP, "scale", scale)
    _checks.number(OP, "dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise _checks.ShapeError(
            f"fastattn.attention: dropout_p must be in [0, 1), got {dropout_p}"
        )
    if attn_mask is not None:
        _checks.mask(OP, attn_mask, q.new_empty(()).expand(*q.shape[:-1], k.shape[2]))


def check_variants(q: torch.Tensor, window: Any, softcap: Any, sinks: Any, alibi: Any) -> None:
    """The window, softcap, sinks and ALiBi arguments (docs/attention.md), before allocating."""
    if window is not None:
        if (
            not isinstance(window, tuple | list)
            or len(window) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) for w in window)
        ):
            raise TypeError(
                f"fastattn.attention: window must be a pair of ints (left, right), got {window!r}"
            )
        if min(window) < -1:
            raise _checks.ShapeError(
                f"fastattn.attention: window sizes must be >= 0, or -1 for unbounded, got {window}"
            )
    _checks.number(OP, "softcap", softcap)
    if not (0.0 <= softcap < float("inf")):
        raise _checks.ShapeError(
            f"fastattn.attention: softcap must be finite and >= 0 (0: none), got {softcap}"
        )
    B, H = q.shape[:2]
    for name, t, shapes in (("sinks", sinks, [(H,)]), ("alibi_slopes", alibi, [(H,), (B, H)])):
        if t is None:
            continue
        _checks.floating_tensor(OP, name, t)
        if tuple(t.shape) not in shapes:
            want = " or ".join(str(x) for x in shapes)
            raise _checks.ShapeError(
                f"fastattn.attention: {name} must have shape {want} for q of shape "
                f"{tuple(q.shape)}, got {tuple(t.shape)}"
            )
        if t.device != q.device:
            raise _checks.ShapeError(
                f"fastattn.attention: {name} is on {t.device} but q is on {q.device}"
            )
    if alibi is not None and alibi.requires_grad and torch.is_grad_enabled():
        raise _checks.ShapeError(
            "fastattn.attention: alibi_slopes get no gradient (fixed slopes, as FlashAttention's);"
            " pass them detached"
        )


CAUSAL_ALIGNMENTS = ("bottom_right", "top_left")


def _causal_alignment(causal: Any) -> bool:
    """True for top-left causal alignment; validates ``causal`` (a bool or an alignment name)."""
    if causal is True or causal is False:
        return False
    if isinstance(causal, str):
        if causal not in CAUSAL_ALIGNMENTS:
            raise _checks.ShapeError(
                f"fastattn.attention: causal must be True, False, 'bottom_right' or 'top_left', "
                f"got {causal!r}"
            )
        return causal == "top_left"
    raise TypeError(
        f"fastattn.attention: causal must be a bool or 'bottom_right' / 'top_left', got "
        f"{type(causal).__name__}"
    )


def _plain(q: Any, k: Any, v: Any) -> bool:
    """q, k, v are tensors that the checks below accept: what most calls pass."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)):
        return False
    qs, ks = q.shape, k.shape
    return (
        isinstance(v, torch.Tensor)
        and len(qs) == 4
        and v.shape == ks
        and len(ks) == 4
        and ks[0] == qs[0]
        and ks[3] == qs[3] <= MAX_HEAD_DIM
        and ks[1] > 0
        and qs[1] % ks[1] == 0
        and q.is_floating_point()
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and k.device == q.device
        and v.device == q.device
    )


def _contiguous_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides but a unit last one."""
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()


def run_forward(
    backend: str, args: tuple, deterministic: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of one attention forward on ``backend`` ("reference", "triton" or a C++
    one), ``args`` in the ops' order (csrc/ops.cpp: q, k, v, mask, rng, scale, causal,
    causal_offset, dropout_p, window_left, window_right, softcap, sinks, alibi; sinks and alibi
    in the opmath dtype). The reference is differentiable by autograd; the kernels through
    their ops' autograd formulas (``opcall.call``). Used by attention(), varlen and paged."""
    if backend == "reference":
        q, k, v, mask, rng, scale, causal, offset, p, wl, wr, softcap, sinks, alibi = args
        return reference.attention(q, k, v, mask, scale, causal, offset, p, rng, window=(wl, wr),
                                   softcap=softcap, sinks=sinks, alibi_slopes=alibi)  # fmt: skip
    if backend == "triton":
        return opcall.call(torch.ops.fastattn.attention_triton, *args, deterministic)
    return opcall.call(torch.ops.fastattn.attention, *args)


# ------------------------------------------------------------------------------ public API
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool | str = False,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention ``softmax(scale * q @ k^T + mask) @ v``, fused (memory linear in seqlen).

    Args:
        q: ``(batch, heads, seqlen_q, head_dim)``.
        k, v: ``(batch, kv_heads, seqlen_k, head_dim)``; ``heads`` a multiple of ``kv_heads``
            (grouped-query / multi-query attention; k and v are never expanded in memory). v
            may have its own head_dim (multi-head latent attention); the output follows v's.
        causal: ``True`` or ``"bottom_right"``: query i sees keys ``j <= i + seqlen_k -
            seqlen_q`` (as FlashAttention: the last query sees every key, what decoding with a
            KV cache needs); ``"top_left"``: keys ``j <= i`` (as torch's SDPA ``is_causal``);
            the two agree when the lengths are equal. ``False``: no causal mask.
        scale: multiplies ``q @ k^T`` (default ``head_dim ** -0.5``).
        attn_mask: bool (True = keep) or additive float, broadcastable to
            ``(batch, heads, seqlen_q, seqlen_k)``; broadcast dims are read with stride 0. A
            float mask that requires grad gets its gradient.
        dropout_p: attention-probability dropout, applied whenever > 0 (modules pass 0 in eval).
            The mask comes from a counter-based hash seeded from torch's generator, so it is
            reproducible under ``torch.manual_seed`` and regenerated in the backward pass.
        window: ``(left, right)`` local attention (FlashAttention's ``window_size``; -1 =
            unbounded): query i sees keys ``i + off - left <= j <= i + off + right``, with ``off``
            the causal alignment's offset (``seqlen_k - seqlen_q`` unless ``"top_left"``; also
            without causal). Key blocks outside every row's window are skipped (work
            ``seqlen * window``). With causal, ``right`` is at most 0.
        softcap: ``c > 0`` caps each score as ``c * tanh(score / c)`` before masks and biases
            (Gemma 2). 0: none.
        sinks: ``(heads,)`` learnable logits, one per head, that join every row's softmax
            denominator without a value (gpt-oss attention sinks); they get their gradient.
            ``lse`` then includes them.
        alibi_slopes: ``(heads,)`` or ``(batch, heads)``: adds ``-slope * |i + off - j|`` to the
            scores, computed in the kernel (no gradient: pass them detached).
        return_lse: also return the log-sum-exp of each query row's scores, ``(batch, heads,
            seqlen_q)`` float32 (no gradient flows through it).
        deterministic: bitwise-reproducible gradients (the CPU kernels always are).
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` (CUDA C++, float16 / bfloat16; its
            backward is Triton's), ``"cpu"`` or ``"reference"``.

    A query row that sees no key returns zeros, lse ``-inf`` and zero gradients, never NaN.
    Saved for backward: q, k, v, out and lse only.
    """
    _check(q, k, v, attn_mask, dropout_p, scale)
    variant = window is not None or softcap != 0.0 or sinks is not None or alibi_slopes is not None
    if variant:
        check_variants(q, window, softcap, sinks, alibi_slopes)
    top_left = _causal_alignment(causal)
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    scale_f = D**-0.5 if scale is None else float(scale)
    offset = 0 if top_left else Sk - Sq
    causal = causal is not False
    mask = attn_mask
    if mask is not None:
        if mask.dtype != torch.bool and mask.dtype not in (q.dtype, torch.float32):
            mask = mask.to(torch.float32)  # kernels take bool, float32 or q's own dtype
        mask = mask.expand(B, H, Sq, Sk)  # a view: stride 0 where broadcast
    rng = None
    if dropout_p > 0.0:
        rng = torch.randint(0, 2**32, (2,), dtype=torch.int64, device=q.device)
    wl, wr = (-1, -1) if window is None else (int(window[0]), int(window[1]))
    if causal and window is not None:
        wr = 0  # causal hides everything right of the diagonal
    name = dispatch.select(backend, q.device, q.dtype, OP, CPP_BACKENDS)
    if name != "reference" and (q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1):
        q, k, v = _contiguous_last(q), _contiguous_last(k), _contiguous_last(v)
    opm = lse_dtype(q)
    # (contiguous: the kernels index (H,); autograd casts dsinks back)
    sk = None if sinks is None else sinks.to(opm).contiguous()
    al = None if alibi_slopes is None else alibi_slopes.detach().to(opm).expand(B, H)
    args = (q, k, v, mask, rng, scale_f, causal, offset, float(dropout_p), wl, wr,
            float(softcap), sk, al)  # fmt: skip
    out, lse = run_forward(name, args, deterministic)
    if name == "reference":
        lse = lse.detach()
    return (out, lse) if return_lse else out
