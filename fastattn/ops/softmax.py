"""Fused softmax: ``softmax(x * scale + mask)`` (or log-softmax) in one pass over memory.

Kernels (Triton) first, then their launchers, then the custom-op glue that registers fake kernels
and autograd for every backend, then the public function. The C++ kernels live in
``csrc/softmax.cpp`` (CPU) and ``csrc/cuda/softmax.cu`` (CUDA); the oracle is
``fastattn.reference.softmax``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from fastattn import _checks, dispatch, reference
from fastattn._triton import (
    checked_grid,
    device_guard,
    jit,
    needs_bf16_rounding,
    round_to_bf16,
    row_launch_config,
    row_tiers,
    tl,
)
from fastattn.ops import opcall

# Rows up to this many columns are held in registers and read once; longer rows are streamed
# twice (online max/sum, then normalise). 16K fp32 over 16 warps is 32 registers a thread.
MAX_SINGLE_PASS = 16384
LOOP_BLOCK = 4096


# ----------------------------------------------------------------------------------- kernels
# fmt: off
@jit
def _row_logits(X, M, row, cols, n_cols, q_idx, scale, m_s0, m_s1, m_s2, m_d1, m_d2, m_sc,
                HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr):
    """z = x * scale + mask for columns ``cols`` of ``row`` (int64) in fp32; -inf where masked or
    outside. Offsets are int64: a mask's column stride times the column can pass 2**31."""
    inb = cols < n_cols
    z = tl.load(X + row * n_cols + cols, mask=inb, other=0.0).to(tl.float32) * scale
    if HAS_MASK:
        # The mask is read through strides (0 where broadcast): row -> (i0, i1, i2).
        i2 = row % m_d2
        i1 = (row // m_d2) % m_d1
        i0 = row // (m_d2 * m_d1)
        m_ptr = M + i0 * m_s0 + i1 * m_s1 + i2 * m_s2 + cols.to(tl.int64) * m_sc
        if MASK_BOOL:
            # Added as 0 / -inf like a float mask, so a NaN logit still poisons its row.
            keep = tl.load(m_ptr, mask=inb, other=0).to(tl.int32) != 0
            z = z + tl.where(keep, 0.0, float("-inf"))
        else:
            z = z + tl.load(m_ptr, mask=inb, other=0.0).to(tl.float32)
    if CAUSAL:
        z = tl.where(cols <= q_idx, z, float("-inf"))
    return tl.where(inb, z, float("-inf"))


@jit
def _row_out(z, e, shift, inv, log_total, LOG: tl.constexpr):
    """The outputs of logits z (e = exp(z - shift)). A masked (-inf) logit is a constant of the
    output, 0 (log: -inf), even in a row whose max is +inf or NaN, where exp(z - shift) and the
    row's sum are NaN (the reference's rule)."""
    if LOG:
        return tl.where(z == float("-inf"), float("-inf"), z - shift - log_total)
    return e * tl.where(z == float("-inf"), 0.0, inv)


@jit
def _softmax_fwd_kernel(X, Y, M, n_cols, causal_rows, scale, m_s0, m_s1, m_s2, m_d1, m_d2, m_sc,
                        HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
                        LOG: tl.constexpr, SINGLE: tl.constexpr, BLOCK: tl.constexpr,
                        RNE_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    q_idx = row % causal_rows
    offs = tl.arange(0, BLOCK)
    if SINGLE:
        z = _row_logits(X, M, row, offs, n_cols, q_idx, scale, m_s0, m_s1, m_s2, m_d1, m_d2, m_sc,
                        HAS_MASK, MASK_BOOL, CAUSAL)
        row_max = tl.max(z, 0)
    else:
        # Online pass: per-lane running max and sum, merged once at the end.
        m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
        s_vec = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            z = _row_logits(X, M, row, start + offs, n_cols, q_idx, scale, m_s0, m_s1, m_s2, m_d1,
                            m_d2, m_sc, HAS_MASK, MASK_BOOL, CAUSAL)
            m_new = tl.maximum(m_vec, z)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # avoids -inf - -inf = NaN
            s_vec = s_vec * tl.exp(m_vec - m_ref) + tl.exp(z - m_ref)
            m_vec = m_new
        row_max = tl.max(m_vec, 0)
    # A fully masked row has max -inf: shift by 0 instead so exp gives 0, not NaN.
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    if SINGLE:
        e = tl.exp(z - shift)
        total = tl.sum(e, 0)
    else:
        total = tl.sum(s_vec * tl.exp(m_vec - shift), 0)
    # total == 0 only for a fully masked row (-> 0, or -inf = z for log); NaN propagates.
    inv = tl.where(total == 0.0, 0.0, 1.0 / total)
    log_total = tl.where(total == 0.0, 0.0, tl.log(total))
    if SINGLE:
        y = _row_out(z, e, shift, inv, log_total, LOG)  # e from the sum above: no second exp
        if RNE_BF16:
            y = round_to_bf16(y)
        tl.store(Y + row * n_cols + offs, y.to(Y.dtype.element_ty), mask=offs < n_cols)
    else:
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            z = _row_logits(X, M, row, cols, n_cols, q_idx, scale, m_s0, m_s1, m_s2, m_d1, m_d2,
                            m_sc, HAS_MASK, MASK_BOOL, CAUSAL)
            y = _row_out(z, tl.exp(z - shift), shift, inv, log_total, LOG)  # unused (DCE) if LOG
            if RNE_BF16:
                y = round_to_bf16(y)
            tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=cols < n_cols)


@jit
def _softmax_bwd_kernel(G, Y, DX, n_cols, scale, LOG: tl.constexpr, BLOCK: tl.constexpr,
                        RNE_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    # Row sum: sum(g * y) for softmax; sum of g over unmasked (y != -inf) entries for log.
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        inb = cols < n_cols
        g = tl.load(G + row * n_cols + cols, mask=inb, other=0.0).to(tl.float32)
        y = tl.load(Y + row * n_cols + cols, mask=inb, other=0.0).to(tl.float32)
        acc += tl.where(y == float("-inf"), 0.0, g) if LOG else g * y
    total = tl.sum(acc, 0)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        inb = cols < n_cols
        # A row of one block re-reads these from cache, not memory.
        g = tl.load(G + row * n_cols + cols, mask=inb, other=0.0).to(tl.float32)
        y = tl.load(Y + row * n_cols + cols, mask=inb, other=0.0).to(tl.float32)
        if LOG:
            dz = tl.where(y == float("-inf"), 0.0, g - tl.exp(y) * total)
        else:
            dz = y * (g - total)
        dx = dz * scale
        if RNE_BF16:
            dx = round_to_bf16(dx)
        tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=inb)
# fmt: on


# --------------------------------------------------------------------------------- launchers
def launch_config(n_cols: int) -> dict[str, Any]:
    """Block size, single/looped variant and warps for a row of ``n_cols`` columns."""
    return row_launch_config(n_cols, MAX_SINGLE_PASS, LOOP_BLOCK)


def mask_strides(mask: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, list[int]]:
    """Strides to read ``mask`` broadcast to ``shape`` without materialising it.

    Returns the mask tensor and ``[s0, s1, s2, d1, d2, sc]``: a flat row index r of ``shape``
    splits as (i0, i1, i2) with sizes (., d1, d2) and the mask row starts at i0*s0 + i1*s1 + i2*s2;
    sc is the column stride. Leading dims that cannot be coalesced into three fall back to a copy.
    """
    full = mask.expand(shape)
    dims = [(s, st) for s, st in zip(full.shape[:-1], full.stride()[:-1], strict=True) if s != 1]
    merged: list[tuple[int, int]] = []
    for size, stride in dims:  # outer to inner; merge when the outer dim steps over the inner
        if merged and merged[-1][1] == stride * size:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    if len(merged) > 3:
        full = full.contiguous()
        merged = [(full.numel() // max(shape[-1], 1), shape[-1])]
    merged = [(1, 0)] * (3 - len(merged)) + merged
    (_, s0), (d1, s1), (d2, s2) = merged
    return full, [s0, s1, s2, d1, d2, full.stride(-1)]


def _triton_forward(
    x: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool, log: bool
) -> torch.Tensor:
    x = x.contiguous()
    y = opcall.new_output(x)
    n_cols = x.shape[-1]
    rows = x.numel() // n_cols if n_cols else 0
    if rows == 0:
        return y
    if mask is None:
        m_arg, strides = x, [0, 0, 0, 1, 1, 0]
    else:
        m_arg, strides = mask_strides(mask, x.shape)
        if m_arg.dtype == torch.bool:
            m_arg = m_arg.view(torch.uint8)  # Triton loads bool pointers as int1; bytes are safer
    cfg = launch_config(n_cols)
    with device_guard(x):
        _softmax_fwd_kernel[checked_grid((rows,))](
            x, y, m_arg, n_cols, x.shape[-2] if x.dim() >= 2 else 1, scale, *strides,
            HAS_MASK=mask is not None, MASK_BOOL=mask is not None and mask.dtype == torch.bool,
            CAUSAL=causal, LOG=log, SINGLE=cfg["SINGLE"], BLOCK=cfg["BLOCK"],
            RNE_BF16=needs_bf16_rounding(y), num_warps=cfg["num_warps"],
        )  # fmt: skip
    return y


def _triton_backward(grad: torch.Tensor, y: torch.Tensor, scale: float, log: bool) -> torch.Tensor:
    grad, y = grad.contiguous(), y.contiguous()
    dx = opcall.new_output(y)
    n_cols = y.shape[-1]
    rows = y.numel() // n_cols if n_cols else 0
    if rows == 0:
        return dx
    cfg = launch_config(n_cols)
    with device_guard(y):
        _softmax_bwd_kernel[checked_grid((rows,))](
            grad, y, dx, n_cols, scale, LOG=log, BLOCK=cfg["BLOCK"],
            RNE_BF16=needs_bf16_rounding(dx), num_warps=cfg["num_warps"],
        )  # fmt: skip
    return dx


_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# The AOT compile adds the aligned specialisation from this row tier up (below it, 4 warps over
# at most 512 columns: the same code but for the width of the loads).
ALIGNED_FROM = 1024


def aot_specs() -> Any:
    """Each kernel configuration ``launch_config`` can pick, per dtype, for ``fastattn._aot``."""
    for cols in row_tiers(MAX_SINGLE_PASS):
        cfg = launch_config(cols)
        for t in _TRITON_TYPE.values():
            # Every feature on: an additive mask of x's dtype, then a bool mask with log.
            for mask_t, log in ((t, False), ("u8", True)):
                yield {
                    "id": f"softmax_fwd-{cols}-{t}-mask_{mask_t}-log{int(log)}",
                    "kernel": _softmax_fwd_kernel,
                    "signature": {
                        "X": f"*{t}",
                        "Y": f"*{t}",
                        "M": f"*{mask_t}",
                        "n_cols": "i32",
                        "causal_rows": "i32",
                        "scale": "fp32",
                        "m_s0": "i64",
                        "m_s1": "i64",
                        "m_s2": "i64",
                        "m_d1": "i32",
                        "m_d2": "i32",
                        "m_sc": "i32",
                    },
                    "constexprs": {
                        "HAS_MASK": True,
                        "MASK_BOOL": mask_t == "u8",
                        "CAUSAL": True,
                        "LOG": log,
                        "SINGLE": cfg["SINGLE"],
                        "BLOCK": cfg["BLOCK"],
                        "RNE_BF16": False,
                    },
                    "num_warps": cfg["num_warps"],
                    "aligned_too": cols >= ALIGNED_FROM,
                }
            for log in (False, True):
                yield {
                    "id": f"softmax_bwd-{cols}-{t}-log{int(log)}",
                    "kernel": _softmax_bwd_kernel,
                    "signature": {
                        "G": f"*{t}",
                        "Y": f"*{t}",
                        "DX": f"*{t}",
                        "n_cols": "i32",
                        "scale": "fp32",
                    },
                    # RNE_BF16 (interpreter-only rounding) must stay valid GPU code too.
                    "constexprs": {"LOG": log, "BLOCK": cfg["BLOCK"], "RNE_BF16": t == "bf16"},
                    "num_warps": cfg["num_warps"],
                    "aligned_too": cols >= ALIGNED_FROM,
                }


# ------------------------------------------------------------------------- custom-op glue
@torch.library.custom_op("fastattn::softmax_triton", mutates_args=())
def softmax_triton(
    x: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool, log: bool
) -> torch.Tensor:
    """Triton kernel of ``fastattn::softmax`` (same schema); see that op in csrc/ops.cpp."""
    return _triton_forward(x, mask, scale, causal, log)


@torch.library.custom_op("fastattn::softmax_triton_backward", mutates_args=())
def softmax_triton_backward(
    grad_out: torch.Tensor, out: torch.Tensor, scale: float, log: bool
) -> torch.Tensor:
    return _triton_backward(grad_out, out, scale, log)


def _fake_forward(x, mask, scale, causal, log):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_backward(grad_out, out, scale, log):
    return torch.empty_like(out, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, mask, scale, causal, log = inputs
    ctx.scale, ctx.log = scale, log
    ctx.mask_shape = None if mask is None else mask.shape
    ctx.mask_dtype = None if mask is None else mask.dtype
    ctx.save_for_backward(output)


def _make_backward(backward_op: Any) -> Any:
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        need_mask_grad = ctx.needs_input_grad[1]
        # d(x*scale + mask): dx = scale * dz and dmask = dz summed over the broadcast dims.
        dz = backward_op(grad, y, 1.0 if need_mask_grad else ctx.scale, ctx.log)
        if not need_mask_grad:
            return dz, None, None, None, None
        dmask = dz.sum_to_size(ctx.mask_shape).to(ctx.mask_dtype)
        return dz * ctx.scale, dmask, None, None, None

    return backward


def _register(fwd: str, bwd: str) -> None:
    opcall.register_op(fwd, bwd, _fake_forward, _fake_backward, _make_backward, _setup_context)


_register("fastattn::softmax_triton", "fastattn::softmax_triton_backward")
_CPP = dispatch.cpp_kernels("softmax")  # backends of the C++ op in this build
if _CPP:
    _register("fastattn::softmax", "fastattn::softmax_backward")  # the C++ op (CPU and CUDA)

_KERNELS = {"triton": "softmax_triton", "cpu": "softmax", "cuda": "softmax"}


# ------------------------------------------------------------------------------ public API
def implicit_dim(ndim: int, stacklevel: int = 3) -> int:
    """The dim torch's softmax picks when given ``dim=None`` (0 for 0-, 1- and 3-D inputs, else
    1), with torch's deprecation warning: kept identical for the drop-ins."""
    warnings.warn(
        "Implicit dimension choice for softmax has been deprecated. Change the call to include "
        "dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if ndim in (0, 1, 3) else 1


def softmax(
    input: torch.Tensor,
    dim: int | None = -1,
    _stacklevel: int | torch.dtype = 3,
    dtype: torch.dtype | None = None,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    log: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax (or log-softmax) of ``x * scale + mask`` along ``dim``, fused in one kernel.

    The positional forms of ``F.softmax(input, dim, _stacklevel, dtype)`` and
    ``torch.softmax(input, dim, dtype)`` both work; the fastattn options are keyword-only.

    Args:
        input: any shape (a 0-dim tensor too), e.g. attention scores ``(batch, heads,
            seqlen_q, seqlen_k)``.
        dim: the dimension to normalise; must be the last one when ``causal``. ``None`` picks
            torch's deprecated implicit dim, with its warning (unlike ``F.softmax``, the default
            is the last dim).
        scale: multiplies ``x`` before the mask is added (default 1).
        mask: bool (True = keep) or additive float tensor broadcastable to ``x``; broadcast dims
            are read with stride 0, never expanded in memory. A float mask that requires grad
            gets its gradient.
        causal: mask column j > row i of the last two dims (top-left aligned, as
            ``F.scaled_dot_product_attention(is_causal=True)``).
        log: return log-softmax.
        dtype: cast ``x`` to this dtype first (as ``torch.softmax``); the result has it.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

    A row whose entries are all masked returns zeros (log-softmax: -inf) and a zero gradient,
    never NaN; NaN inputs propagate. Math is in fp32 (fp64 for float64 inputs).
    """
    if isinstance(_stacklevel, torch.dtype):  # torch.softmax(input, dim, dtype)
        dtype, _stacklevel = _stacklevel, 3
    x = input
    if dtype is not None and isinstance(x, torch.Tensor):
        x = x.to(dtype)  # as torch: cast first (integer and bool inputs too)
    x = _checks.floating_tensor("softmax", "input", x)
    if dim is None:
        dim = implicit_dim(x.dim(), _stacklevel + 1)
    if x.dim() == 0:  # torch: the softmax of a scalar is 1 (log: 0), for dim 0 or -1
        if dim not in (-1, 0):
            raise _checks.DimError(
                f"fastattn.softmax: dim {dim} is out of range for input of shape () (a scalar "
                "takes dim 0 or -1)"
            )
        y0 = softmax(x.reshape(1), 0, scale=scale, mask=mask, log=log, backend=backend)
        return y0.reshape(())
    d = _checks.dim_index("softmax", x, dim)
    _checks.number("softmax", "scale", scale)
    if causal and d != x.dim() - 1:
        raise _checks.ShapeError(
            "fastattn.softmax: causal=True masks the last two dims, so dim must be the last "
            f"({x.dim() - 1} or -1), got {dim}"
        )
    if mask is not None:
        _checks.mask("softmax", mask, x)
    scale_f = 1.0 if scale is None else float(scale)
    last = x.dim() - 1
    if mask is not None:
        if mask.dtype != torch.bool and mask.dtype not in (x.dtype, torch.float32):
            mask = mask.to(torch.float32)  # kernels take bool, float32 or x's own dtype
        if d != last:
            mask = mask[(None,) * (x.dim() - mask.dim())].movedim(d, last)
    xt = x.movedim(d, last) if d != last else x  # the kernels normalise the last dim
    name = dispatch.select(backend, x.device, x.dtype, "softmax", _CPP)
    if name == "reference":
        y = reference.softmax(xt, mask, scale_f, causal, log)
    else:
        kernel = getattr(torch.ops.fastattn, _KERNELS[name])
        y = opcall.call(kernel, xt, mask, scale_f, causal, log)
    return y.movedim(last, d) if d != last else y
