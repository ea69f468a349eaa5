"""LayerNorm / RMSNorm (with and without the fused residual add): parity, gradients,
determinism, bad input, compiler integration, and the drop-in modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CPU_BACKENDS,
    GPU_BACKENDS,
    ROUNDED,
    accepts_as_the_full_checks,
    assert_parity,
    finite_parts_match,
    on_devices,
    refuses_as_the_full_checks,
)

import fastattn
from fastattn import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 1 and 7: shorter than any vector; 1000: not a power of two; 5120: not a power of two and past
# one 4096 block; 65536: past the single-pass limit (looped kernels; CPU/reference only).
HIDDEN = [1, 7, 64, 768, 1000, 4096, 5120, 65536]
LEADING = [(1,), (3, 17), (2, 3, 5)]
# plain; weight only; weight + bias + residual; fp32 weight/bias under low-precision x + residual
VARIANTS = ["plain", "weight", "affine_residual", "mixed_residual"]
# The interpreter costs ~ms per block step; the eager reference backend adds little over the
# float64 oracle it is built from (as in test_softmax): both stop at this size, the cpu kernel
# goes further.
TRITON_MAX_ELEMENTS = 120_000


def make_case(variant, lead, hidden, dtype, rms, device="cpu"):
    x = torch.randn(*lead, hidden, device=device).to(dtype) * 2 + 0.5  # non-zero mean on purpose
    wdt = torch.float32 if variant == "mixed_residual" else dtype
    w = b = r = None
    if variant != "plain":
        w = (torch.randn(hidden, device=device) * 0.5 + 1).to(wdt).requires_grad_()
    if variant in ("affine_residual", "mixed_residual"):
        r = torch.randn(*lead, hidden, device=device).to(dtype)
        if not rms:
            b = torch.randn(hidden, device=device).to(wdt).requires_grad_()
    return x, w, b, r


def run(impl, x, w, b, r, rms, grads_in, opmath=None):
    """Outputs (y, h) and gradients wrt (x, w, b, r) of one implementation, in one pass."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    xs, ws, bs, rs = leaves
    if impl == "reference64":
        cast = [t.double() if t is not None else None for t in leaves]
        y, h = reference.norm(cast[0], cast[1], cast[2], 1e-5, rms, cast[3])
    elif impl == "eager":  # torch's own kernels in the input's precision (weights cast to it)
        h = xs + rs if rs is not None else None
        inp, n, dt = (h if h is not None else xs), (x.shape[-1],), x.dtype
        wd, bd = (t.to(dt) if t is not None else None for t in (ws, bs))
        f = torch.nn.functional
        y = f.rms_norm(inp, n, wd, 1e-5) if rms else f.layer_norm(inp, n, wd, bd, 1e-5)
    else:
        fn = fastattn.rms_norm if rms else fastattn.layer_norm
        args = (ws,) if rms else (ws, bs)
        out = fn(xs, x.shape[-1], *args, 1e-5, residual=rs, backend=impl)
        y, h = out if rs is not None else (out, None)
    outs = [y] + ([h] if h is not None else [])
    gouts = [g.to(o.dtype) for g, o in zip(grads_in, outs, strict=False)]
    needs = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, needs, gouts)
    return [o.detach() for o in outs] + list(grads)


def check(backend, x, w, b, r, rms):
    shape = x.shape
    grads_in = [torch.randn(shape, dtype=torch.float64, device=x.device) for _ in range(2)]
    got = run(backend, x, w, b, r, rms, grads_in)
    want = run("reference64", x, w, b, r, rms, grads_in)
    base = run("eager", x, w, b, r, rms, grads_in) if x.dtype in ROUNDED else [None] * 9
    assert len(got) == len(want)
    for i, (g, wt, bs) in enumerate(zip(got, want, base, strict=False)):
        assert_parity(g, wt, bs, f"{backend} output/grad #{i}", dtype=x.dtype)


def grid():
    for backend in CPU_BACKENDS:
        for hidden in HIDDEN:
            for i, variant in enumerate(VARIANTS):
                lead = LEADING[(i + HIDDEN.index(hidden)) % len(LEADING)]
                n = hidden * torch.Size(lead).numel()
                if backend != "cpu" and n > TRITON_MAX_ELEMENTS:
                    continue  # covered by cpu; the interpreter would take minutes
                yield backend, hidden, variant, lead


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("backend", "hidden", "variant", "lead"), list(grid()))
def test_parity_grid(backend, hidden, variant, lead, dtype, rms):
    check(backend, *make_case(variant, lead, hidden, dtype, rms), rms)


@pytest.mark.parametrize("rms", [False, True])
def test_huge_rows_cpu(rms):
    # 262144 elements a row: far past on-chip sizes (and Liger's/FlashAttention's caps).
    check("cpu", *make_case("affine_residual", (2,), 262144, torch.bfloat16, rms), rms)


# Rows whose mean dwarfs their spread, where a one-pass E[x^2] - E[x]^2 variance cancels: the CPU
# kernel takes it in one pass about a shift (the row's first element) and falls back to the exact
# second pass when the first element is far from the mean.
ROW_STATS = {
    "offset": lambda x: 3000 + x,  # mean 3000, std 1: the shift absorbs the offset
    "tiny_spread": lambda x: 1e4 + 1e-2 * x,  # std near fp32's resolution at 1e4
    "first_outlier": lambda x: torch.cat([x[..., :1] + 80, x[..., 1:]], -1),  # 80 std: fallback
    "residual_offset": lambda x: x - 500,  # with the residual's +500 below: h's mean is near 0
}


@pytest.mark.parametrize("hidden", [7, 768, 5120])
@pytest.mark.parametrize("rows", list(ROW_STATS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layer_norm_rows_far_from_zero(backend, rows, hidden):
    x = ROW_STATS[rows](torch.randn(9, hidden, dtype=torch.float64)).float()
    r = torch.full_like(x, 500.0) if rows == "residual_offset" else None
    out = fastattn.layer_norm(x, hidden, None, None, 1e-5, residual=r, backend=backend)
    y = out[0] if r is not None else out
    h = x + r if r is not None else x
    ref = torch.nn.functional.layer_norm(h.double(), (hidden,), eps=1e-5)
    # fp32 itself errs here (x - mean loses the low bits of x): judged against eager fp32's error
    eager = torch.nn.functional.layer_norm(h, (hidden,), eps=1e-5)
    assert_parity(y, ref, eager, f"layer_norm {rows}")


# The GPU rows of the feature tests: both GPU backends (reference is covered by the parity grid).
GPU_FEATURES = ["triton", "cuda"]


# fp16 holds at most 65504: rows near it have sums of squares (here ~4e12) that exist in fp32 only;
# the kernels sum in fp32, as torch's fp16 norms do. Judged against the float64 result rounded to
# fp16, the best an fp16 output can be.
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize(("backend", "device"), on_devices(CPU_BACKENDS, GPU_FEATURES))
def test_float16_extremes_stay_finite(backend, device, rms):
    fn = fastattn.rms_norm if rms else fastattn.layer_norm
    x = torch.randn(3, 1000, device=device) * 3
    x[0] = x[0].sign() * 60000 + x[0]  # every |value| near fp16's max
    x[1] = 65504 - (x[1] * 10).abs()  # all near the max, small spread: the mean dwarfs it
    x[2, :3] = torch.tensor([65504.0, -65504.0, 65504.0], device=device)
    x = x.half().requires_grad_()
    w = (torch.rand(1000, device=device) + 0.5).half().requires_grad_()
    y = fn(x, 1000, w, eps=1e-5, backend=backend)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    want = reference.norm(x64, w64, None, 1e-5, rms)[0]
    assert_parity(y, want, want.half(), "y")
    g = torch.randn(3, 1000, dtype=torch.float64, device=device)
    got = torch.autograd.grad(y, (x, w), g.half())
    for name, a, b in zip(["dx", "dw"], got, torch.autograd.grad(want, (x64, w64), g), strict=True):
        assert_parity(a, b, b.half(), name)
    # x + residual past 65504 rounds h to inf, as torch's fp16 add does: that row's y is NaN
    # (RMSNorm: where h is inf), never a finite value from an unrounded h; the other row is intact.
    x2 = torch.randn(2, 1000, device=device).half()
    x2[0] += 65000
    r = torch.zeros_like(x2)
    r[0, ::2] = 1000
    y2, h2 = fn(x2, 1000, w.detach(), eps=1e-5, residual=r, backend=backend)
    want_y, want_h = reference.norm(x2, w.detach(), None, 1e-5, rms, r)
    assert torch.isinf(want_h[0, ::2]).all() and torch.equal(h2, want_h)
    finite_parts_match(y2, want_y)
    in_range = reference.norm(x2[1:].double(), w.detach().double(), None, 1e-5, rms, r[1:].double())
    assert_parity(y2[1:], in_range[0], want_y[1:], "y, the row in range")


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize(("backend", "device"), on_devices(CPU_BACKENDS, GPU_FEATURES))
def test_noncontiguous_and_multidim_normalized_shape(backend, device, rms):
    x = torch.randn(6, 4, 5, device=device).transpose(0, 1)  # (4, 6, 5), non-contiguous
    w = torch.randn(6, 10, device=device)[:, ::2].requires_grad_()  # non-contiguous weight too
    fn = fastattn.rms_norm if rms else fastattn.layer_norm
    ref = torch.nn.functional.rms_norm if rms else torch.nn.functional.layer_norm
    y = fn(x, (6, 5), w, eps=1e-5, backend=backend)
    assert_parity(y, ref(x.double(), (6, 5), w.double(), eps=1e-5))


@pytest.mark.parametrize(("backend", "device"), on_devices(CPU_BACKENDS, GPU_FEATURES))
def test_empty_batch(backend, device):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    y = fastattn.layer_norm(x, 16, w, backend=backend)
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(w.grad, torch.zeros(16, device=device))


def test_rms_norm_default_eps_is_dtype_eps():
    x = torch.randn(4, 8) * 1e-4  # tiny values: eps matters
    eps = torch.finfo(torch.float32).eps
    assert_parity(fastattn.rms_norm(x, 8), torch.nn.functional.rms_norm(x.double(), (8,), eps=eps))


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize(("backend", "device"), on_devices(["cpu", "triton"], GPU_FEATURES))
def test_weight_gradients_are_deterministic(backend, device, rms):
    x, w, b, r = make_case("affine_residual", (37, 3), 1000, torch.float32, rms, device)
    g = [torch.randn(37, 3, 1000, dtype=torch.float64, device=device)] * 2
    first = run(backend, x, w, b, r, rms, g)
    second = run(backend, x, w, b, r, rms, g)
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c), "two identical backward passes must agree bitwise"


@pytest.mark.parametrize("rms", [False, True])
def test_gradcheck_float64_cpu(rms):
    x = torch.randn(3, 4, 9, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)

    def fn(x, r, w, b):
        if rms:
            return fastattn.rms_norm(x, 9, w, 1e-5, residual=r, backend="cpu")
        return fastattn.layer_norm(x, 9, w, b, 1e-5, residual=r, backend="cpu")

    assert torch.autograd.gradcheck(fn, (x, r, w, b))


# float64 is float64 throughout: the saved mean/rstd and the dweight/dbias sums too. An fp32 rstd
# or fp32 weight-gradient sum (the old contract) costs ~6e-8 relative, which these bounds catch.
F64_RTOL = 1e-12


def _float64_case(rms, lead, hidden, offset):
    x = (torch.randn(*lead, hidden, dtype=torch.float64) + offset).requires_grad_()
    r = torch.randn(*lead, hidden, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(hidden, dtype=torch.float64) * 0.5 + 1).requires_grad_()
    b = None if rms else torch.randn(hidden, dtype=torch.float64, requires_grad=True)
    return x, r, w, b


def _float64_impl(impl, x, r, w, b, rms):
    """(y, h) and the gradients of y.sum-like losses wrt (x, r, w[, b]), of one implementation."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, r, w, b) if t is not None]
    xs, rs, ws = leaves[:3]
    bs = leaves[3] if b is not None else None
    n = (x.shape[-1],)
    if impl == "torch":  # torch's own float64 kernels
        h = xs + rs
        y = F.rms_norm(h, n, ws, 1e-5) if rms else F.layer_norm(h, n, ws, bs, 1e-5)
    elif impl == "reference":
        y, h = reference.norm(xs, ws, bs, 1e-5, rms, rs)
    else:
        fn = fastattn.rms_norm if rms else fastattn.layer_norm
        y, h = fn(xs, n[0], ws, *(() if rms else (bs,)), 1e-5, residual=rs, backend=impl)
    return y, h, leaves


@pytest.mark.parametrize("offset", [0.0, 1e3])  # 1e3: a mean that dwarfs the spread
@pytest.mark.parametrize("hidden", [4096, 8192])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_float64_gradients_are_float64_throughout_cpu(rms, hidden, offset):
    x, r, w, b = _float64_case(rms, (3, 5), hidden, offset)
    gy, gh = torch.randn_like(x), torch.randn_like(x)
    results = {}
    for impl in ("cpu", "torch", "reference"):
        y, h, leaves = _float64_impl(impl, x, r, w, b, rms)
        grads = torch.autograd.grad((y, h), leaves, (gy, gh))
        results[impl] = [y.detach(), *grads]
    names = ["y", "dx", "dresidual", "dweight", "dbias"]
    for want_impl in ("torch", "reference"):
        for name, got, want in zip(names, results["cpu"], results[want_impl], strict=False):
            err = (got - want).abs().max().item()
            bound = F64_RTOL * want.abs().max().item()
            assert err <= bound, f"{name} vs {want_impl}: max error {err:.3e} > {bound:.3e}"
            assert got.dtype == torch.float64, name
    bd = None if b is None else b.detach()
    _, _, mean, rstd = torch.ops.fastattn.norm(x.detach(), r.detach(), w.detach(), bd, 1e-5, rms)
    assert rstd.dtype == torch.float64 and (rms or mean.dtype == torch.float64)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_gradcheck_float64_tight_cpu(rms):
    # Tolerances 1e-9 (the default is 1e-5 absolute): central differences at eps = 1e-5 are good to
    # ~1e-10 here, a float32 statistic or gradient sum is off by ~6e-8.
    x, r, w, b = _float64_case(rms, (4,), 48, 100.0)
    args = (x, r, w) if rms else (x, r, w, b)

    def fn(x, r, w, b=None):
        if rms:
            return fastattn.rms_norm(x, 48, w, 1e-5, residual=r, backend="cpu")
        return fastattn.layer_norm(x, 48, w, b, 1e-5, residual=r, backend="cpu")

    assert torch.autograd.gradcheck(fn, args, eps=1e-5, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", HIDDEN + [262144])
@pytest.mark.parametrize(("backend", "device"), on_devices([], GPU_BACKENDS))
def test_parity_gpu(backend, device, hidden, dtype, rms):
    check(backend, *make_case("mixed_residual", (3, 17), hidden, dtype, rms, device), rms)


# ------------------------------------------------------------------------- bad input
def _ln(*a, **k):
    return fastattn.layer_norm(*a, **k)


def _X(device="cpu"):  # noqa: N802 - (rows, hidden) input of the bad-input corpus
    return torch.randn(2, 8, device=device)


def _W(device="cpu"):  # noqa: N802 - a (hidden,) weight or bias
    return torch.randn(8, device=device)


BAD_INPUTS = [
    (lambda: _ln(torch.randn(2, 8), 7), ValueError, r"normalized_shape \[7\] does not match"),
    (lambda: _ln(torch.randn(2, 8), (2, 8, 1)), ValueError, "does not match"),
    (lambda: _ln(torch.randn(2, 8), 8, torch.randn(7)), ValueError, r"weight has shape \(7,\)"),
    (lambda: _ln(torch.randn(2, 8), 8, None, torch.randn(2, 8)), ValueError, "bias has shape"),
    (lambda: _ln(torch.randn(2, 8), 8, residual=torch.randn(2, 7)), ValueError, "residual"),
    (lambda: _ln(torch.randn(2, 8), 8, residual=torch.randn(2, 8).double()), ValueError,
     "residual"),
    (lambda: _ln(torch.randn(2, 8), 8, torch.randn(8, device="meta")), ValueError,
     "weight is on meta"),
    (lambda: _ln(torch.ones(2, 8, dtype=torch.int64), 8), TypeError, "floating point"),
    (lambda: _ln(torch.randn(2, 8), 8, torch.ones(8, dtype=torch.int32)), TypeError, "weight"),
    (lambda: fastattn.rms_norm(torch.randn(2, 8), 8, eps="1e-6"), TypeError, "eps"),
    # Calls that differ from the common (fast-accepted) one in exactly one respect: weight given.
    (lambda: _ln(_X(), 8, _W(), _W(), residual=_X().double()), ValueError, "residual.*float64"),
    (lambda: fastattn.rms_norm(_X(), 8, _W(), residual=torch.randn(1, 8)), ValueError,
     r"residual \(\(1, 8\)"),
    (lambda: fastattn.rms_norm(_X(), 8, _W(), residual=_X("meta")), ValueError,
     "residual is on meta"),
    (lambda: fastattn.rms_norm(_X(), 8, torch.randn(7)), ValueError, r"weight has shape \(7,\)"),
    (lambda: _ln(_X(), 8, _W().int(), _W()), TypeError, "weight must be a floating point"),
    (lambda: _ln(_X(), 8, _W("meta"), _W()), ValueError, "weight is on meta"),
    (lambda: _ln(_X(), 8, _W(), torch.randn(2, 8)), ValueError, r"bias has shape \(2, 8\)"),
    (lambda: _ln(_X(), 8, _W(), _W().long()), TypeError, "bias must be a floating point"),
    (lambda: _ln(_X(), 8, _W(), _W("meta")), ValueError, "bias is on meta"),
    (lambda: _ln(_X(), 8, _W(), _W(), "1e-5"), TypeError, "eps must be a Python number"),
    (lambda: _ln(_X().long(), 8, _W(), _W()), TypeError, "input must be a floating point"),
    (lambda: _ln(_X(), 7, torch.randn(7), _W()), ValueError, r"normalized_shape \[7\]"),
    # torch's layer_norm refuses parameters of another dtype, but float32 ones for bf16/fp16.
    (lambda: _ln(_X().double(), 8, _W(), _W()), TypeError, "weight is torch.float32 but input"),
    (lambda: _ln(_X(), 8, _W().bfloat16(), _W().bfloat16()), TypeError, "weight is torch.bfloat16"),
    (lambda: _ln(_X(), 8, _W(), _W().double()), TypeError, "bias is torch.float64"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "exc", "match"), BAD_INPUTS, ids=[b[2] for b in BAD_INPUTS])
def test_bad_input_is_rejected_in_python(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# The fast accept path restates the checks for the common call (hot in decode steps): pinned here
# to the full checks, on the whole bad-input corpus and on good calls.
@pytest.mark.parametrize(("call", "exc", "match"), BAD_INPUTS, ids=[b[2] for b in BAD_INPUTS])
def test_fast_accept_path_refuses_exactly_what_the_full_checks_refuse(monkeypatch, call, exc,
                                                                      match):  # fmt: skip
    import fastattn.ops.norm as ops

    refuses_as_the_full_checks(monkeypatch, ops, call, exc)


def test_fast_accept_path_accepts_the_common_call_as_the_full_checks_do(monkeypatch):
    import fastattn.ops.norm as ops

    x, r = torch.randn(3, 8), torch.randn(3, 8)
    w, b = torch.randn(8), torch.randn(8)
    calls = [
        lambda: fastattn.layer_norm(x, 8, w, b),
        lambda: fastattn.rms_norm(x, 8, w, residual=r),
    ]
    assert ops._plain(x, (8,), w, b, None, r)  # the common call does take the fast path
    accepts_as_the_full_checks(monkeypatch, ops, calls)


CPP_BAD_INPUTS = [
    ((torch.randn(2, 8), None, torch.randn(7), None, 1e-5, False), "weight"),
    ((torch.randn(2, 8), torch.randn(2, 7), None, None, 1e-5, False), "residual"),
    ((torch.ones(2, 8, dtype=torch.int32), None, None, None, 1e-5, True), "floating"),
    ((torch.randn(2, 8), None, None, torch.randn(8).long(), 1e-5, False), "bias"),
]


@pytest.mark.parametrize(("args", "match"), CPP_BAD_INPUTS)
def test_bad_input_is_rejected_in_cpp(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastattn.norm(*args)


# -------------------------------------------------------------- torch.library / compile
@pytest.mark.parametrize("op", ["norm", "norm_triton"])
def test_opcheck(op):
    x, r = torch.randn(5, 33), torch.randn(5, 33)
    w, b = torch.randn(33, requires_grad=True), torch.randn(33, requires_grad=True)
    fwd = getattr(torch.ops.fastattn, op)
    samples = [
        (x, None, None, None, 1e-5, False),
        (x.requires_grad_(), r.requires_grad_(), w, b, 1e-5, False),
        (x, r, w, None, 1e-6, True),
    ]
    dtypes = [torch.float32] + ([torch.float64] if op == "norm" else [])  # Triton: no float64
    if op == "norm":  # float64: statistics and parameter gradients in float64 (the fake's too)
        samples.append(tuple(t.double() if isinstance(t, torch.Tensor) else t for t in samples[1]))
    for args in samples:
        torch.library.opcheck(fwd, args)
    bwd = getattr(torch.ops.fastattn, op + "_backward")
    for dt in dtypes:
        xd, rd, wd, bd = (t.detach().to(dt) for t in (x, r, w, b))
        y, h, mean, rstd = (t.detach() for t in fwd(xd, rd, wd, bd, 1e-5, False))
        assert mean.dtype == rstd.dtype == dt
        g = (torch.randn(5, 33, dtype=dt) for _ in range(2))
        torch.library.opcheck(bwd, (*g, h, wd, mean, rstd, False, True))


@pytest.mark.parametrize(("backend", "device"), on_devices(["cpu", "triton"], GPU_FEATURES))
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    ln = fastattn.nn.FusedAddLayerNorm(64, device=device)
    rms = fastattn.nn.RMSNorm(64, eps=1e-6, device=device)
    ln.backend = rms.backend = backend

    def block(x, r):  # pre-norm residual stream: add + LN, then an RMSNorm
        y, h = ln(x * 2, r)
        return rms(y) + h

    x, r = (torch.randn(4, 7, 64, device=device, requires_grad=True) for _ in range(2))
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x, r)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, r, ln.weight, ln.bias, rms.weight), g)
    ln.backend = rms.backend = "reference"
    want_out = block(x, r)
    want = torch.autograd.grad(want_out, (x, r, ln.weight, ln.bias, rms.weight), g)
    assert_parity(out, want_out.double())
    for a, b in zip(got, want, strict=True):
        assert_parity(a, b.double())
