"""LayerNorm and RMSNorm, optionally fused with the residual add of a pre-norm block.

``norm(h)`` with ``h = x + residual`` reads x and residual once and writes y and h once. Kernels
(Triton) first, then launchers, then the custom-op glue (fake kernels and autograd for every
backend), then the public functions. C++ kernels: ``csrc/norm.cpp`` (CPU) and
``csrc/cuda/norm.cu`` (CUDA); the oracle is ``fastattn.reference.norm``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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

# Rows up to this size stay in registers (one read); longer rows are streamed three times.
MAX_SINGLE_PASS = 16384
LOOP_BLOCK = 4096


# ----------------------------------------------------------------------------------- kernels
# fmt: off
@jit
def _load_h(X, R, H, row, cols, n_cols, HAS_RES: tl.constexpr, STORE_H: tl.constexpr,
            RNE_BF16: tl.constexpr):
    """h = x (+ residual) in fp32, rounded to x's dtype (and stored) when there is a residual."""
    inb = cols < n_cols
    h = tl.load(X + row * n_cols + cols, mask=inb, other=0.0).to(tl.float32)
    if HAS_RES:
        h += tl.load(R + row * n_cols + cols, mask=inb, other=0.0).to(tl.float32)
        if RNE_BF16:
            h = round_to_bf16(h)
        h = h.to(H.dtype.element_ty)
        if STORE_H:
            tl.store(H + row * n_cols + cols, h, mask=inb)
        h = h.to(tl.float32)
    return h


@jit
def _norm_fwd_kernel(X, R, W, B, Y, H, MEAN, RSTD, n_cols, eps, HAS_RES: tl.constexpr,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, RMS: tl.constexpr,
                     SINGLE: tl.constexpr, BLOCK: tl.constexpr, RNE_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    # The mean is taken about the row's first element h0: exact for a constant row (a plain
    # sum / n may be an ulp off, which rstd then scales to ~1e-5 where torch gives 0).
    if SINGLE:
        h = _load_h(X, R, H, row, offs, n_cols, HAS_RES, True, RNE_BF16)
        h0 = tl.sum(tl.where(offs == 0, h, 0.0), 0)
        mean = 0.0 if RMS else h0 + tl.sum(tl.where(offs < n_cols, h - h0, 0.0), 0) / n_cols
        d = tl.where(offs < n_cols, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 0) / n_cols + eps)
    else:
        # Pass 1 (writes h), pass 2 (centred sum of squares: no cancellation), pass 3 below.
        h = _load_h(X, R, H, row, offs, n_cols, HAS_RES, True, RNE_BF16)  # the first block
        h0 = tl.sum(tl.where(offs == 0, h, 0.0), 0)
        acc = tl.where(offs < n_cols, h - h0, 0.0)
        for start in range(BLOCK, n_cols, BLOCK):
            cols = start + offs
            h = _load_h(X, R, H, row, cols, n_cols, HAS_RES, True, RNE_BF16)
            acc += tl.where(cols < n_cols, h - h0, 0.0)
        mean = 0.0 if RMS else h0 + tl.sum(acc, 0) / n_cols
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            src = H if HAS_RES else X
            h = tl.load(src + row * n_cols + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            d = tl.where(cols < n_cols, h - mean, 0.0)
            acc += d * d
        rstd = 1.0 / tl.sqrt(tl.sum(acc, 0) / n_cols + eps)
    if not RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        inb = cols < n_cols
        if not SINGLE:
            src = H if HAS_RES else X
            h = tl.load(src + row * n_cols + cols, mask=inb, other=0.0).to(tl.float32)
        y = (h - mean) * rstd
        if HAS_W:
            y *= tl.load(W + cols, mask=inb, other=0.0).to(tl.float32)
        if HAS_B:
            y += tl.load(B + cols, mask=inb, other=0.0).to(tl.float32)
        if RNE_BF16:
            y = round_to_bf16(y)
        tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=inb)


@jit
def _norm_bwd_kernel(DY, DH, HIN, W, MEAN, RSTD, DX, DW, DB, n_rows, n_cols, rows_per_prog,
                     HAS_DH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     RMS: tl.constexpr, SINGLE: tl.constexpr, BLOCK: tl.constexpr,
                     RNE_BF16: tl.constexpr):
    """dx for rows [pid * rows_per_prog, ...) and this program's partial dweight/dbias row."""
    pid = tl.program_id(0).to(tl.int64)  # pid * rows_per_prog can pass 2**31
    offs = tl.arange(0, BLOCK)
    dw_acc = tl.zeros([BLOCK], tl.float32)
    db_acc = tl.zeros([BLOCK], tl.float32)
    row_end = tl.minimum((pid + 1) * rows_per_prog, n_rows)
    for r in range(pid * rows_per_prog, row_end):
        row = tl.cast(r, tl.int64)
        mean = 0.0 if RMS else tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        # Row reductions c1 = mean(xhat * w * dy), c2 = mean(w * dy).
        c1_acc = tl.zeros([BLOCK], tl.float32)
        c2_acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            inb = cols < n_cols
            h = tl.load(HIN + row * n_cols + cols, mask=inb, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * n_cols + cols, mask=inb, other=0.0).to(tl.float32)
            xhat = tl.where(inb, (h - mean) * rstd, 0.0)
            wdy = dy * tl.load(W + cols, mask=inb, other=0.0).to(tl.float32) if HAS_W else dy
            c1_acc += xhat * wdy
            c2_acc += wdy
            if SINGLE:  # the whole row is this one block: accumulate dw/db in registers
                dw_acc += dy * xhat
                db_acc += dy
        c1 = tl.sum(c1_acc, 0) / n_cols
        c2 = 0.0 if RMS else tl.sum(c2_acc, 0) / n_cols
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            inb = cols < n_cols
            h = tl.load(HIN + row * n_cols + cols, mask=inb, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * n_cols + cols, mask=inb, other=0.0).to(tl.float32)
            xhat = (h - mean) * rstd
            wdy = dy * tl.load(W + cols, mask=inb, other=0.0).to(tl.float32) if HAS_W else dy
            dx = (wdy - (xhat * c1 + c2)) * rstd
            if HAS_DH:
                dx += tl.load(DH + row * n_cols + cols, mask=inb, other=0.0).to(tl.float32)
            if RNE_BF16:
                dx = round_to_bf16(dx)
            tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=inb)
            if not SINGLE:  # this program's own partial row: read-modify-write, no races
                p = pid * n_cols + cols
                tl.store(DW + p, tl.load(DW + p, mask=inb) + dy * xhat, mask=inb)
                tl.store(DB + p, tl.load(DB + p, mask=inb) + dy, mask=inb)
    if SINGLE:
        tl.store(DW + pid * n_cols + offs, dw_acc, mask=offs < n_cols)
        tl.store(DB + pid * n_cols + offs, db_acc, mask=offs < n_cols)
# fmt: on


# --------------------------------------------------------------------------------- launchers
def launch_config(n_cols: int) -> dict[str, Any]:
    """Block size, single/looped variant and warps for rows of ``n_cols`` elements."""
    return row_launch_config(n_cols, MAX_SINGLE_PASS, LOOP_BLOCK)


def _backward_programs(n_rows: int, device: torch.device) -> int:
    # Fixed for a given device and shape, so the dweight/dbias sums are bitwise reproducible;
    # a few programs per SM fill the GPU, and each partial row costs n_cols * 8 bytes.
    if device.type == "cuda":
        return max(
            1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
        )
    return max(1, min(n_rows, 8))


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' math type for data of ``dtype``: float32, float64 for float64 data. The
    saved statistics (mean, rstd) and the weight/bias gradients of every backend have it too
    (the schemas in csrc/ops.cpp, the fake kernels below)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _triton_forward(x, residual, weight, bias, eps, rms):
    x = x.contiguous()
    n_cols = x.shape[-1]
    rows = x.numel() // n_cols if n_cols else 0
    y = opcall.new_output(x)
    h = opcall.new_output(x) if residual is not None else x.new_empty(0)
    mean = x.new_empty(rows if not rms else 0, dtype=math_dtype(x.dtype))
    rstd = x.new_empty(rows, dtype=math_dtype(x.dtype))
    if rows == 0:
        return y, h, mean, rstd
    cfg = launch_config(n_cols)
    r, w, b = (t.contiguous() if t is not None else x for t in (residual, weight, bias))
    with device_guard(x):
        _norm_fwd_kernel[checked_grid((rows,))](
            x, r, w, b, y, h, mean, rstd, n_cols, eps, HAS_RES=residual is not None,
            HAS_W=weight is not None, HAS_B=bias is not None, RMS=rms, SINGLE=cfg["SINGLE"],
            BLOCK=cfg["BLOCK"], RNE_BF16=needs_bf16_rounding(x), num_warps=cfg["num_warps"],
        )  # fmt: skip
    return y, h, mean, rstd


def _triton_backward(dy, dh, inp, weight, mean, rstd, rms, has_bias):
    dy, inp = dy.contiguous(), inp.contiguous()
    n_cols = inp.shape[-1]
    rows = inp.numel() // n_cols if n_cols else 0
    dx = opcall.new_output(inp)
    progs = _backward_programs(rows, inp.device)
    acc = math_dtype(inp.dtype)  # the Triton kernels take no float64 (dispatch): float32 here
    dw_part = torch.zeros(progs, n_cols, dtype=acc, device=inp.device)
    db_part = torch.zeros(progs, n_cols, dtype=acc, device=inp.device)
    if rows > 0:
        cfg = launch_config(n_cols)
        g2, w = (t.contiguous() if t is not None else inp for t in (dh, weight))
        with device_guard(inp):
            _norm_bwd_kernel[checked_grid((progs,))](
                dy, g2, inp, w, mean if not rms else rstd, rstd, dx, dw_part, db_part, rows,
                n_cols, math.ceil(rows / progs), HAS_DH=dh is not None, HAS_W=weight is not None,
                HAS_B=has_bias, RMS=rms, SINGLE=cfg["SINGLE"], BLOCK=cfg["BLOCK"],
                RNE_BF16=needs_bf16_rounding(dx), num_warps=cfg["num_warps"],
            )  # fmt: skip
    return dx, dw_part.sum(0), db_part.sum(0) if has_bias else dw_part.new_empty(0)


# The AOT compile adds the aligned specialisation from this row tier up (below it, 4 warps over
# at most 512 columns: the same code but for the width of the loads).
ALIGNED_FROM = 1024


def aot_specs() -> Any:
    """Each kernel configuration ``launch_config`` can pick, per dtype, for ``fastattn._aot``."""
    tys = ("fp32", "fp16", "bf16")
    for cols in row_tiers(MAX_SINGLE_PASS):
        cfg = launch_config(cols)
        tiers = {"SINGLE": cfg["SINGLE"], "BLOCK": cfg["BLOCK"]}
        for t in tys:
            for rms in (False, True):  # every feature on; fp32 weights under low-precision x
                names = "X R W B Y H MEAN RSTD n_cols eps"
                types = [f"*{t}", f"*{t}", "*fp32", "*fp32", f"*{t}", f"*{t}", "*fp32", "*fp32"]
                yield {
                    "id": f"norm_fwd-{cols}-{t}-rms{int(rms)}",
                    "kernel": _norm_fwd_kernel,
                    "signature": dict(zip(names.split(), types + ["i32", "fp32"], strict=True)),
                    "constexprs": {"HAS_RES": True, "HAS_W": True, "HAS_B": not rms, "RMS": rms,
                                   **tiers, "RNE_BF16": t == "bf16"},
                    "num_warps": cfg["num_warps"],
                    "aligned_too": cols >= ALIGNED_FROM,
                }  # fmt: skip
                names = "DY DH HIN W MEAN RSTD DX DW DB n_rows n_cols rows_per_prog"
                types = [f"*{t}"] * 3 + ["*fp32"] * 6 + ["i32"] * 3
                yield {
                    "id": f"norm_bwd-{cols}-{t}-rms{int(rms)}",
                    "kernel": _norm_bwd_kernel,
                    "signature": dict(zip(names.split(), types, strict=True)),
                    "constexprs": {"HAS_DH": True, "HAS_W": True, "HAS_B": not rms, "RMS": rms,
                                   **tiers, "RNE_BF16": t == "bf16"},
                    "num_warps": cfg["num_warps"],
                    "aligned_too": cols >= ALIGNED_FROM,
                }  # fmt: skip


# ------------------------------------------------------------------------- custom-op glue
@torch.library.custom_op("fastattn::norm_triton", mutates_args=())
def norm_triton(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton kernel of ``fastattn::norm`` (same schema; see csrc/ops.cpp)."""
    return _triton_forward(x, residual, weight, bias, eps, rms)


@torch.library.custom_op("fastattn::norm_triton_backward", mutates_args=())
def norm_triton_backward(
    grad_out: torch.Tensor,
    grad_residual_out: torch.Tensor | None,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    rms: bool,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_backward(grad_out, grad_residual_out, input, weight, mean, rstd, rms, has_bias)


def _fake_forward(x, residual, weight, bias, eps, rms):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = torch.empty_like(y) if residual is not None else x.new_empty(0)
    stat = x.new_empty(rows, dtype=math_dtype(x.dtype))
    return y, h, (stat.new_empty(0) if rms else stat), torch.empty_like(stat)


def _fake_backward(grad_out, grad_residual_out, input, weight, mean, rstd, rms, has_bias):
    dx = torch.empty_like(input, memory_format=torch.contiguous_format)
    dw = input.new_empty(input.shape[-1], dtype=math_dtype(input.dtype))
    return dx, dw, torch.empty_like(dw) if has_bias else dw.new_empty(0)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, rms = inputs
    y, h, mean, rstd = output
    ctx.rms, ctx.has_res = rms, residual is not None
    ctx.w_dtype = None if weight is None else weight.dtype
    ctx.b_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)


def _make_backward(backward_op: Any) -> Any:
    def backward(ctx, grad_out, grad_h, grad_mean, grad_rstd):
        inp, weight, mean, rstd = ctx.saved_tensors
        dh = grad_h if ctx.has_res else None
        has_bias = ctx.b_dtype is not None
        dx, dw, db = backward_op(grad_out, dh, inp, weight, mean, rstd, ctx.rms, has_bias)
        dw = dw.to(ctx.w_dtype) if ctx.w_dtype is not None else None
        db = db.to(ctx.b_dtype) if has_bias else None
        # h = x + residual: both receive the same gradient.
        return dx, (dx if ctx.has_res else None), dw, db, None, None

    return backward


def _register(fwd: str, bwd: str) -> None:
    opcall.register_op(fwd, bwd, _fake_forward, _fake_backward, _make_backward, _setup_context)


_register("fastattn::norm_triton", "fastattn::norm_triton_backward")
_CPP = dispatch.cpp_kernels("norm")  # backends of the C++ op in this build
if _CPP:
    _register("fastattn::norm", "fastattn::norm_backward")  # the C++ op (CPU and CUDA)

_KERNELS = {"triton": "norm_triton", "cpu": "norm", "cuda": "norm"}


def _check(
    op: str,
    x: Any,
    shape: tuple[int, ...],
    weight: Any,
    bias: Any,
    eps: Any,
    residual: Any,
) -> None:
    """The arguments of a norm call, before anything is allocated."""
    x = _checks.floating_tensor(op, "input", x)
    k = len(shape)
    if k == 0 or k > x.dim() or x.shape[x.dim() - k :] != shape:
        raise _checks.ShapeError(
            f"fastattn.{op}: normalized_shape {list(shape)} does not match the trailing "
            f"dimensions of x of shape {tuple(x.shape)}"
        )
    _checks.number(op, "eps", eps)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _checks.floating_tensor(op, name, t)
            _checks.same_device(op, name, t, x)
            if t.shape != shape:
                raise _checks.ShapeError(
                    f"fastattn.{op}: {name} has shape {tuple(t.shape)} but normalized_shape is "
                    f"{list(shape)}"
                )
            if op == "layer_norm" and not _layer_norm_param_dtype(x.dtype, t.dtype):
                # torch's layer_norm takes x's dtype, or float32 for a bf16/fp16 x (rms_norm
                # takes any float dtype): refuse the rest as it does.
                raise _checks.DTypeError(
                    f"fastattn.layer_norm: {name} is {t.dtype} but input is {x.dtype}; the "
                    "parameters must have input's dtype, or float32 for a bfloat16/float16 input"
                )
    if residual is not None:
        _checks.floating_tensor(op, "residual", residual)
        _checks.same_device(op, "residual", residual, x)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise _checks.ShapeError(
                f"fastattn.{op}: residual ({tuple(residual.shape)}, {residual.dtype}) must have "
                f"x's shape and dtype ({tuple(x.shape)}, {x.dtype})"
            )


def _layer_norm_param_dtype(x: torch.dtype, p: torch.dtype) -> bool:
    return p == x or (p == torch.float32 and x in (torch.bfloat16, torch.float16))


# ------------------------------------------------------------------------------ public API
def _plain(x: Any, shape: tuple, weight: Any, bias: Any, eps: Any, residual: Any) -> bool:
    """The common call (tensors that agree with each other), accepted by one expression as calls
    are hot (decode steps); any other goes through _check, which accepts it as well or raises the
    error that names the problem. tests/test_norm.py pins it to _check on the bad-input corpus."""
    return (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and len(shape) == 1
        and x.shape[-1:] == shape
        and (eps is None or type(eps) is float)
        and isinstance(weight, torch.Tensor)
        and weight.shape == shape
        and (weight.dtype == x.dtype or weight.dtype == torch.float32 and x.element_size() == 2)
        and (bias is None or isinstance(bias, torch.Tensor) and bias.shape == shape)
        and (bias is None or bias.dtype == weight.dtype and bias.device == weight.device)
        and (residual is None or isinstance(residual, torch.Tensor) and residual.shape == x.shape)
        and (residual is None or residual.dtype == x.dtype and residual.device == x.device)
        and weight.device == x.device
    )


def _normalize(
    op: str,
    x: Any,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: Any,
    residual: torch.Tensor | None,
    backend: str,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not _plain(x, shape, weight, bias, eps, residual):
        _check(op, x, shape, weight, bias, eps, residual)
    k = len(shape)
    rms = op == "rms_norm"
    eps_f = float(eps) if eps is not None else torch.finfo(x.dtype).eps
    x2, r2, w, b = x, residual, weight, bias  # every kernel takes (..., N) rows as they are
    if k > 1:  # (rows, N): the normalised dims flattened into one
        n = math.prod(shape)
        x2 = x.reshape(-1, n)
        r2 = residual.reshape(-1, n) if residual is not None else None
        w = weight.reshape(n) if weight is not None else None
        b = bias.reshape(n) if bias is not None else None
    name = dispatch.select(backend, x.device, x.dtype, op, _CPP)
    if name == "reference":
        y, h = reference.norm(x2, w, b, eps_f, rms, r2)
    else:
        kernel = getattr(torch.ops.fastattn, _KERNELS[name])
        y, h, _, _ = opcall.call(kernel, x2, r2, w, b, eps_f, rms)
    if residual is None:
        return y.view_as(x) if k > 1 else y
    assert h is not None
    return (y.view_as(x), h.view_as(x)) if k > 1 else (y, h)


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
) -> Any:
    """``F.layer_norm`` over the trailing ``normalized_shape`` dims of ``input``, fused.

    With ``residual`` (input's shape and dtype) it computes ``h = input + residual`` and returns
    ``(layer_norm(h), h)`` in one pass: the add-and-normalise of a pre-norm Transformer block.
    ``weight``/``bias``: input's dtype, or float32 for a bf16/fp16 input (as torch); statistics
    are fp32 (float64 for float64 input). Shapes: input ``(*, *normalized_shape)``.
    """
    return _normalize("layer_norm", input, normalized_shape, weight, bias, eps, residual, backend)


def rms_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
) -> Any:
    """``F.rms_norm`` (``eps=None`` means ``torch.finfo(input.dtype).eps``), optionally fused with
    a residual add like :func:`layer_norm`."""
    return _normalize("rms_norm", input, normalized_shape, weight, None, eps, residual, backend)
