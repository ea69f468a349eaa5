"""Parity, gradients, special values, bad input and compiler integration of fastattn.softmax."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ATOL,
    CPU_BACKENDS,
    GPU_BACKENDS,
    ROUNDED,
    assert_parity,
    on_devices,
)

import fastattn
from fastattn import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROWS = [1, 3, 64]
# 1 and 7: tails shorter than any vector; 1000: not a power of two; 1024: exact blocks;
# 1025 and 4097: one element past a block; 65537: past the single-pass limit (looped kernels).
COLS = [1, 7, 1000, 1024, 1025, 4097, 65537]
VARIANTS = ["plain", "scale", "bool_mask", "float_mask", "causal", "log", "log_causal_mask"]
# The Triton interpreter costs ~ms per block step, and the eager reference backend adds little
# over the float64 oracle it is built from: both stop at this size; the cpu kernel goes further.
TRITON_MAX_ELEMENTS = 300_000
# The Triton kernels run one program per row, the same code for every row (its index only picks
# the causal limit and the mask row): 64 rows cost the interpreter ~20x 3 rows and reach no other
# path, so triton runs them at one length only (1025: one past a block); the rest at 1 and 3 rows.
TRITON_ROWS_ONCE = 64


def make_case(variant: str, rows: int, cols: int, dtype: torch.dtype, device: str = "cpu"):
    """(x, mask, kwargs) for one grid cell; x holds fresh random logits of varied magnitude."""
    x = (torch.randn(rows, cols, device=device) * 4).to(dtype)
    mask, kw = None, {}
    if variant == "scale":
        kw["scale"] = 0.37
    elif variant == "bool_mask":  # key-padding style: one keep pattern broadcast over rows
        mask = torch.rand(cols, device=device) < 0.8
        kw["scale"] = 1.7
    elif variant in ("float_mask", "log_causal_mask"):  # additive bias with some -inf, learnable
        mask = torch.randn(1, cols, device=device) * 2
        mask[torch.rand_like(mask) < 0.1] = float("-inf")
        mask.requires_grad_(variant == "float_mask")
    if variant in ("causal", "log_causal_mask"):
        kw["causal"] = True
    if variant in ("log", "log_causal_mask"):
        kw["log"] = True
    return x, mask, kw


def forward_backward(fn, x, mask, kw, grad):
    """Output and gradients (dx, and dmask when the mask requires grad) of one implementation."""
    x = x.detach().clone().requires_grad_()
    m = mask.detach().clone().requires_grad_(mask.requires_grad) if mask is not None else None
    y = fn(x, m, kw)
    inputs = [x] + ([m] if m is not None and m.requires_grad else [])
    grads = torch.autograd.grad(y, inputs, grad.to(y.dtype))
    return [y.detach(), *grads]


def check_against_reference(backend: str, x, mask, kw) -> None:
    def fast(x, m, kw):
        return fastattn.softmax(x, mask=m, backend=backend, **kw)

    def ref64(x, m, kw):
        return fastattn.softmax(x.double(), mask=m, backend="reference", **kw)

    def eager(x, m, kw):  # same computation, in the input's own low precision
        sc, causal, log = kw.get("scale", 1.0), kw.get("causal", False), kw.get("log", False)
        m = m.to(x.dtype) if m is not None and m.is_floating_point() else m
        return reference.softmax(x, m, sc, causal, log, opmath=x.dtype)

    grad = torch.randn(x.shape, dtype=torch.float64, device=x.device)
    got = forward_backward(fast, x, mask, kw, grad)
    want = forward_backward(ref64, x, mask, kw, grad)
    base = forward_backward(eager, x, mask, kw, grad) if x.dtype in ROUNDED else [None] * 3
    for name, g, w, b in zip(["out", "dx", "dmask"], got, want, base, strict=False):
        assert g.dtype == (x.dtype if name != "dmask" else mask.dtype)
        assert_parity(g, w, b, f"{backend} {name}", dtype=x.dtype)


def grid():
    for backend in CPU_BACKENDS:
        for rows in ROWS:
            for cols in COLS:
                if backend != "cpu" and rows * cols > TRITON_MAX_ELEMENTS:
                    continue  # the cpu kernel covers it; the interpreter would take minutes
                if backend == "triton" and rows == TRITON_ROWS_ONCE and cols != 1025:
                    continue  # one program a row, each the same code: see TRITON_ROWS_ONCE
                yield backend, rows, cols


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("backend", "rows", "cols"), list(grid()))
def test_parity_grid(backend, rows, cols, dtype, variant):
    x, mask, kw = make_case(variant, rows, cols, dtype)
    check_against_reference(backend, x, mask, kw)


# Leading shapes with the mask broadcasts attention uses: key padding (B,1,1,T), a per-head bias
# (H,T,T), a 2-D (T,T) mask, and a 5-D input whose mask strides cannot be coalesced to three.
MASK_SHAPES = [
    ((2, 3, 5, 33), (2, 1, 1, 33), torch.bool),
    ((2, 3, 5, 33), (3, 5, 33), torch.float32),
    ((2, 3, 33, 33), (33, 33), torch.bool),
    ((2, 3, 4, 5, 17), (2, 1, 4, 1, 17), torch.float32),
    ((4, 6, 9), (4, 1, 1), torch.float32),  # broadcast along the softmax dim itself
]
# The GPU rows of the feature tests: both GPU backends (reference is covered by the parity grid).
GPU_FEATURES = ["triton", "cuda"]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("shape", "mshape", "mdtype"), MASK_SHAPES, ids=str)
@pytest.mark.parametrize(("backend", "device"), on_devices(CPU_BACKENDS, GPU_FEATURES))
def test_broadcast_masks(backend, device, shape, mshape, mdtype, causal):
    x = torch.randn(shape, device=device)
    m = torch.rand(mshape, device=device)
    mask = m < 0.7 if mdtype == torch.bool else torch.randn_like(m)
    check_against_reference(
        backend, x, mask.requires_grad_(mdtype != torch.bool), {"causal": causal}
    )


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("backend", "device"), on_devices(CPU_BACKENDS, GPU_FEATURES))
def test_fully_masked_rows_give_zeros_not_nan(backend, device, dtype, log):
    dev = {"device": device}
    x = torch.randn(4, 10, dtype=dtype, requires_grad=True, **dev)
    mask = torch.ones(4, 10, dtype=torch.bool, **dev)
    mask[1] = False  # row 1 sees nothing through a bool mask
    fmask = torch.zeros(4, 10, **dev)
    fmask[2] = float("-inf")  # row 2 sees nothing through an additive mask
    y = fastattn.softmax(x, mask=mask, log=log, backend=backend)
    y2 = fastattn.softmax(x, mask=fmask, log=log, backend=backend)
    dead = torch.full((10,), float("-inf") if log else 0.0, dtype=dtype, **dev)
    assert torch.equal(y[1], dead) and torch.equal(y2[2], dead)
    assert torch.isfinite(y[0]).all() and torch.isfinite(y2[3]).all()
    (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert torch.equal(dx[1], torch.zeros(10, dtype=dtype, **dev)) and torch.isfinite(dx).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_causal_first_row_and_1d_input(backend):
    x = torch.randn(5, 8)
    y = fastattn.softmax(x, causal=True, backend=backend)
    assert y[0, 0] == 1 and (y[0, 1:] == 0).all()  # row 0 sees only key 0
    v = torch.randn(9)
    check_against_reference(backend, v, None, {"causal": True})  # one row, i = 0


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize(("backend", "device"), on_devices(CPU_BACKENDS, GPU_FEATURES))
def test_nan_propagates_and_large_logits_stay_finite(backend, device, log):
    # |logits| ~ 1e4: exp overflows unless the max is subtracted
    x = torch.randn(3, 50, device=device) * 1e4
    x[1, 7] = float("nan")
    y = fastattn.softmax(x, scale=2.0, log=log, backend=backend)
    assert torch.isnan(y[1]).all(), "a NaN logit must poison its row"
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()
    assert_parity(y[[0, 2]], reference.softmax(x[[0, 2]].double(), None, 2.0, False, log))
    # A bool mask acts as an additive 0 / -inf mask: a NaN under a masked entry still poisons.
    mask = torch.ones(3, 50, dtype=torch.bool, device=device)
    mask[1, 7] = False
    y = fastattn.softmax(x, mask=mask, log=log, backend=backend)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()


# fp16 holds at most 65504, so logits near it times a scale, and their sums, exist in fp32 only:
# the kernels scale and sum in fp32 as the reference does. Judged against the float64 result
# rounded to fp16 (the best an fp16 output can be; torch's fp16 chain would overflow x * scale).
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize(("backend", "device"), on_devices(CPU_BACKENDS, GPU_FEATURES))
def test_float16_extremes_stay_finite(backend, device, log):
    x = torch.randn(4, 300, device=device) * 3
    x[0] = 65504 - (x[0] * 20).abs()  # every logit near fp16's max
    x[1] = -x[0]  # and near its min
    if not log:  # (log-softmax outputs x - max would leave fp16's range: -131008)
        x[2, :2] = torch.tensor([65504.0, -65504.0], device=device)
    x[2, 7] = float("-inf")  # an entry that drops out (as a masked one)
    x[3, 11] = float("nan")  # poisons its row
    x = x.half().requires_grad_()
    scale = 1.0 if log else 3.0  # 3 * 65504 is past fp16's range, well within fp32's
    y = fastattn.softmax(x, scale=scale, log=log, backend=backend)
    ref = reference.softmax(x.detach().double(), None, scale, False, log)
    assert torch.isnan(y[3]).all()
    assert_parity(y[:3], ref[:3], ref[:3].half(), "out")
    g = torch.randn(3, 300, device=device, dtype=torch.float64)
    (dx,) = torch.autograd.grad(y[:3], x, g.half())
    x64 = x.detach()[:3].double().requires_grad_()
    (dx64,) = torch.autograd.grad(reference.softmax(x64, None, scale, False, log), x64, g)
    assert_parity(dx[:3], dx64, dx64.half(), "dx")


def test_float16_subnormal_outputs_are_kept_cpu():
    # Probabilities below fp16's smallest normal (6.1e-5) are fp16 subnormals, which torch keeps;
    # the kernels run with subnormal fp32 flushed (far below these) but must round these exactly.
    x = torch.tensor([[0.0, -10.0, -12.0, -15.0, -16.5]] * 3, dtype=torch.float16)
    y = fastattn.softmax(x, backend="cpu")
    want = torch.softmax(x.double(), -1)
    assert (want[:, 1:] < 6.1e-5).all()
    assert (y[:, 1:] > 0).all()
    # rounded to the nearest unit of fp16's subnormals (2**-24), not flushed to 0
    assert (y[:, 1:].double() - want[:, 1:]).abs().max().item() <= 2**-24


@pytest.mark.parametrize("dim", [0, 1, -2])
@pytest.mark.parametrize(("backend", "device"), on_devices(CPU_BACKENDS, GPU_FEATURES))
def test_other_dims_and_noncontiguous(backend, device, dim):
    base = torch.randn(6, 5, 40, device=device)
    x = base.transpose(0, 2)  # non-contiguous view (40, 5, 6)
    mask = torch.rand(5, 1, device=device) < 0.8  # broadcast along dims 0 and 2
    y = fastattn.softmax(x, dim, mask=mask, backend=backend)
    z = x.double().masked_fill(~mask, float("-inf"))
    ref = torch.softmax(z, dim).nan_to_num(0.0)
    assert_parity(y, ref)


@pytest.mark.parametrize(("backend", "device"), on_devices(CPU_BACKENDS, GPU_FEATURES))
def test_empty_inputs(backend, device):
    for shape in [(0, 7), (3, 0), (2, 0, 5)]:  # batch 0, zero columns, zero rows in the middle
        x = torch.randn(shape, device=device, requires_grad=True)
        y = fastattn.softmax(x, backend=backend)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape


def test_dtype_argument_converts_first():
    x = torch.randint(-5, 5, (4, 9))
    y = fastattn.softmax(x, dtype=torch.float32)
    assert y.dtype == torch.float32
    assert_parity(y, torch.softmax(x.double(), -1))


def test_huge_row_cpu():
    # One row far past any on-chip size (and apex's 16384 / Liger's 65536 caps).
    x = torch.randn(1, 262147, dtype=torch.float32) * 3
    mask = torch.rand(262147) < 0.9
    check_against_reference("cpu", x, mask, {"scale": 0.5})
    check_against_reference("cpu", x.bfloat16(), None, {"log": True})


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64_cpu(causal, log):
    x = torch.randn(3, 4, 11, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(3, 1, 11, dtype=torch.float64, requires_grad=True)

    def fn(x, mask):
        y = fastattn.softmax(x, scale=0.8, mask=mask, causal=causal, log=log, backend="cpu")
        return y.masked_fill(y == float("-inf"), 0.0)  # finite differences of -inf are NaN

    assert torch.autograd.gradcheck(fn, (x, mask))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", COLS + [262147])
@pytest.mark.parametrize(("backend", "device"), on_devices([], GPU_BACKENDS))
def test_parity_gpu(backend, device, cols, dtype, variant):
    x, mask, kw = make_case(variant, 64, cols, dtype, device)
    check_against_reference(backend, x, mask, kw)


def test_tolerance_rule_can_fail():
    ref = torch.rand(10, dtype=torch.float64)
    with pytest.raises(AssertionError):
        assert_parity((ref + 100 * ATOL[torch.float32]).float(), ref)
    with pytest.raises(AssertionError):  # a NaN where the reference is finite
        assert_parity(torch.where(ref > 0.5, float("nan"), ref).float(), ref)


# ------------------------------------------------------------------------- bad input
BAD_INPUTS = [
    (lambda: fastattn.softmax(torch.arange(6).view(2, 3)), TypeError, "floating point"),
    (lambda: fastattn.softmax([1.0, 2.0]), TypeError, "torch.Tensor"),
    (lambda: fastattn.softmax(torch.tensor(1.0), 1), IndexError, r"dim 1 .*\(\)"),
    (lambda: fastattn.softmax(torch.randn(2, 3), dim=2), ValueError, r"dim 2 .*\(2, 3\)"),
    (
        lambda: fastattn.softmax(torch.randn(2, 3), mask=torch.ones(4, dtype=torch.bool)),
        ValueError,
        r"mask of shape \(4,\) is not broadcastable to x of shape \(2, 3\)",
    ),
    (
        lambda: fastattn.softmax(torch.randn(2, 3), mask=torch.ones(1, 2, 3, dtype=torch.bool)),
        ValueError,
        "not broadcastable",
    ),
    (
        lambda: fastattn.softmax(torch.randn(2, 3), mask=torch.ones(3, dtype=torch.int32)),
        TypeError,
        "torch.int32",
    ),
    (
        lambda: fastattn.softmax(torch.randn(2, 3), mask=torch.ones(3, device="meta")),
        ValueError,
        "mask is on meta",
    ),
    (lambda: fastattn.softmax(torch.randn(2, 3), dim=0, causal=True), ValueError, "causal"),
    (lambda: fastattn.softmax(torch.randn(2, 3), scale="2"), TypeError, "scale"),
    (
        lambda: fastattn.softmax(torch.randn(2, 3), backend="cuda"),
        RuntimeError,
        "backend 'cuda' cannot run this call",
    ),
    (lambda: fastattn.softmax(torch.randn(2, 3), backend="tpu"), RuntimeError, "unknown backend"),
]


@pytest.mark.parametrize(("call", "exc", "match"), BAD_INPUTS, ids=[b[2] for b in BAD_INPUTS])
def test_bad_input_is_rejected_in_python(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# The C++ entry checks again (TORCH_CHECK) for callers that use torch.ops directly.
CPP_BAD_INPUTS = [
    (
        lambda: torch.ops.fastattn.softmax(torch.arange(6).view(2, 3), None, 1.0, False, False),
        "floating",
    ),
    (
        lambda: torch.ops.fastattn.softmax(
            torch.randn(2, 3), torch.ones(4, dtype=torch.bool), 1.0, False, False
        ),
        "broadcastable",
    ),
    (
        lambda: torch.ops.fastattn.softmax(
            torch.randn(2, 3), torch.ones(3, dtype=torch.int64), 1.0, False, False
        ),
        "mask",
    ),
    (
        lambda: torch.ops.fastattn.softmax(
            torch.randn(2, 3), torch.ones(3, dtype=torch.float16), 1.0, False, False
        ),
        "mask",
    ),
    (
        lambda: torch.ops.fastattn.softmax_backward(
            torch.randn(2, 3), torch.randn(2, 4), 1.0, False
        ),
        "shape",
    ),
    (
        lambda: torch.ops.fastattn.softmax_backward(
            torch.randn(2, 3), torch.randn(2, 3).double(), 1.0, False
        ),
        "dtype",
    ),
]


@pytest.mark.parametrize(("call", "match"), CPP_BAD_INPUTS)
def test_bad_input_is_rejected_in_cpp(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# -------------------------------------------------------------- torch.library / compile
def opcheck_samples():
    x = torch.randn(3, 5, 17)
    yield (x, None, 1.0, False, False)
    yield (x.requires_grad_(), torch.randn(3, 1, 17, requires_grad=True), 0.5, True, False)
    yield (torch.randn(2, 9), torch.rand(9) < 0.5, 2.0, False, True)


@pytest.mark.parametrize("op", ["softmax", "softmax_triton"])
def test_opcheck(op):
    for args in opcheck_samples():
        torch.library.opcheck(getattr(torch.ops.fastattn, op), args)
    y = torch.softmax(torch.randn(4, 13), -1)
    bwd = getattr(torch.ops.fastattn, op + "_backward")
    torch.library.opcheck(bwd, (torch.randn(4, 13), y, 0.5, False))
    torch.library.opcheck(bwd, (torch.randn(4, 13), y.log(), 1.0, True))


@pytest.mark.parametrize(("backend", "device"), on_devices(["cpu", "triton"], GPU_FEATURES))
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()

    def block(x, mask, backend=backend):  # a masked attention-probability step with ops around
        return fastattn.softmax(x * 2, mask=mask, scale=0.5, causal=True, backend=backend) + 1

    x = torch.randn(2, 3, 16, 16, device=device, requires_grad=True)
    mask = torch.randn(2, 1, 1, 16, device=device, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    y = compiled(x, mask)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, mask), g)
    x64, m64 = x.double(), mask.double()
    want = torch.autograd.grad(block(x64, m64, "reference"), (x, mask), g.double())
    assert_parity(y, block(x64, m64, "reference"))
    for a, b in zip(got, want, strict=True):
        assert_parity(a, b.double())
