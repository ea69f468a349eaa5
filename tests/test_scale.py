"""64-bit indexing (issue 14): every CPU op on a tensor past 2**31 elements, in bf16 (2 bytes an
element: 4 GiB a tensor), forward and backward.

An offset computed in 32 bits wraps at 2**31 elements (or bytes): the kernel then reads or writes
the wrong row, silently. Inputs repeat a small random block with a period P that does not divide
2**31 (primes), so a wrapped read lands on other values; since every row (head, batch item) is
computed by the same code from the same values, the output must repeat with the same period
bitwise, which is checked over the whole output, and its first period is checked against the
float64 reference by the tolerance rule, with eager PyTorch run on that period as the
same-dtype yardstick (rows are independent, so eager's error there is its error on the whole).

Each test needs up to 16 GiB: the tests take a file lock so that two pytest-xdist workers never
run two of them at once, and skip (saying so) where the memory is not available. Marked ``slow``
(each runs in well under a minute here with both cores) and part of the default run."""

from __future__ import annotations

import fcntl
import math
import os
import tempfile
from collections.abc import Iterator

import pytest
import torch
from conftest import assert_parity

import fastattn

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        "cpu" not in fastattn.dispatch.cpp_kernels("softmax"), reason="needs the CPU kernels"
    ),
]

GiB = 2**30
BIG = 2**31
BF16 = torch.bfloat16
fa = torch.ops.fastattn


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.fixture
def big_memory(request: pytest.FixtureRequest) -> Iterator[None]:
    """One of these tests at a time on the machine, and only where its memory is free."""
    need = request.node.get_closest_marker("needs_gib").args[0] * GiB
    path = os.path.join(tempfile.gettempdir(), "fastattn-test-scale.lock")
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _available_bytes() < need + GiB:
                pytest.skip(f"needs {need / GiB:.0f} GiB free, {_available_bytes() / GiB:.1f} here")
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def periodic(base: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` items along dim 0 repeating ``base`` (contiguous): item i is ``base[i % p]``."""
    reps = -(-n // base.shape[0])
    return base.repeat(reps, *([1] * (base.dim() - 1)))[:n]


def assert_periodic(t: torch.Tensor, p: int, what: str) -> None:
    """Every item along dim 0 equals item ``i % p``, bitwise (a wrapped offset breaks that)."""
    n = t.shape[0]
    full = n // p * p
    head = t[:p]
    assert torch.equal(
        t[:full].view(full // p, *head.shape), head.expand(full // p, *head.shape)
    ), f"{what}: an item past the first period differs from its period's copy"
    assert torch.equal(t[full:], t[: n - full]), f"{what}: the last, partial period differs"


def softmax_grads64(x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, dx) of softmax over the last dim, in float64."""
    x = x.double().requires_grad_()
    y = torch.softmax(x, -1)
    (dx,) = torch.autograd.grad(y, x, dy.double())
    return y.detach(), dx


def softmax_grads_eager(x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = torch.softmax(x, -1)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y.detach(), dx


# 2**21 + 1 rows of 1024: the last row starts past element 2**31 (and byte 2**32).
@pytest.mark.needs_gib(13)
def test_softmax_rows_past_2_31(big_memory):
    p, cols = 4099, 1024
    rows = BIG // cols + 1
    base, gbase = torch.randn(p, cols).to(BF16), torch.randn(p, cols).to(BF16)
    x = periodic(base, rows)
    y = fa.softmax(x, None, 1.0, False, False)
    assert_periodic(y, p, "softmax")
    dy = periodic(gbase, rows)
    del x
    dx = fa.softmax_backward(dy, y, 1.0, False)
    assert_periodic(dx, p, "softmax dx")
    ref_y, ref_dx = softmax_grads64(base, gbase)
    eager_y, eager_dx = softmax_grads_eager(base, gbase)
    assert_parity(y[:p], ref_y, eager_y, "softmax")
    assert_parity(dx[:p], ref_dx, eager_dx, "softmax dx")


# One row of more than 2**31 elements: the row's max, sum and (backward) dot product run over all
# of it, split across threads. The expected values follow from the period: the row is m copies
# of a random block b, so y = softmax(b) / m in each copy. The rule's atol (1e-2) is far above
# probabilities of 1e-9, and eager torch needs ~25 s for this one row, so the bound here is
# relative: bf16 rounds y to 8 bits (2**-9 relative), and fp32 sums over 2**31 terms stay near
# 1e-6 relative only when they are blocked (one fp32 accumulator stops growing at 2**24 terms of
# this size: off by 100x); 2**-7 allows 4 roundings.
@pytest.mark.needs_gib(13)
def test_softmax_one_row_past_2_31(big_memory):
    p = 4099
    m = BIG // p + 1
    base, gbase = torch.randn(p).to(BF16), torch.randn(p).to(BF16)
    x = periodic(base[None], m).view(1, m * p)  # one row: m copies of base
    y = fa.softmax(x, None, 1.0, False, False)
    del x
    assert_periodic(y.view(m, p), 1, "softmax row")
    y0 = y.view(m, p)[0].double()
    ref = torch.softmax(base.double(), -1) / m
    err = (y0 - ref).abs().max().item()
    assert err <= 2**-7 * ref.abs().max().item(), f"softmax row: relative error {err:.3e}"
    dy = periodic(gbase[None], m).view(1, m * p)
    dx = fa.softmax_backward(dy, y, 1.0, False).view(m, p)
    assert_periodic(dx, 1, "softmax row dx")
    # dx = y * (g - sum(g * y)) from the kernel's y; the row's sum is m times one copy's.
    ref_dx = y0 * (gbase.double() - m * (gbase.double() * y0).sum())
    err = (dx[0].double() - ref_dx).abs().max().item()
    assert err <= 2**-7 * ref_dx.abs().max().item(), f"softmax row dx: relative error {err:.3e}"


def torch_norm(h, w, b, rms: bool):
    """torch's RMSNorm (weight w) or LayerNorm (w, b) over the last dim, eps 1e-5."""
    n = h.shape[-1]
    if rms:
        return torch.nn.functional.rms_norm(h, (n,), w, 1e-5)
    return torch.nn.functional.layer_norm(h, (n,), w, b, 1e-5)


def norm64(x, residual, w, b, rms: bool):
    """(y, h) in float64: y = norm(h), h = x + residual (x without one)."""
    h = x.double() + residual.double() if residual is not None else x.double()
    return torch_norm(h, w.double(), b.double(), rms), h


# 2**21 + 1 rows of 1024 (bf16; weight and bias bf16, as in bf16 checkpoints): LayerNorm, and
# RMSNorm with the fused residual (x, residual, y and h: four 4 GiB tensors). Backward from the
# kernels' own saved statistics; dw and db sum over all 2**21 + 1 rows, so their reference is the
# per-period sum times the number of whole periods plus the partial one. They are float32 sums
# of bf16-exact products over 2**21 rows: blocked sums keep the error near 1e-6 relative.
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm_residual"])
@pytest.mark.needs_gib(17)
def test_norm_past_2_31(big_memory, rms):
    p, n = 4099, 1024
    rows = BIG // n + 1
    base, gbase = torch.randn(p, n).to(BF16), torch.randn(p, n).to(BF16)
    rbase = (torch.randn(p, n) * 2).to(BF16) if rms else None
    w, b = (torch.rand(n) + 0.5).to(BF16), (torch.randn(n) * 0.1).to(BF16)
    x = periodic(base, rows)
    r = periodic(rbase, rows) if rbase is not None else None
    y, h, mean, rstd = fa.norm(x, r, w, None if rms else b, 1e-5, rms)
    del x, r
    assert_periodic(y, p, "y")
    if rms:
        assert_periodic(h, p, "h")
    else:
        h = periodic(base, rows)  # the normalised input, for the backward pass
    ref_y, ref_h = norm64(base, rbase, w, b, rms)
    eager_h = base + rbase if rbase is not None else base
    eager = torch_norm(eager_h, w, b, rms)
    assert_parity(y[:p], ref_y, eager, "y")
    if rms:
        assert_parity(h[:p], ref_h, eager_h, "h")
    del y
    dy = periodic(gbase, rows)
    dx, dw, db = fa.norm_backward(dy, None, h, w, mean, rstd, rms, not rms)
    assert_periodic(dx, p, "dx")
    # float64 gradients of one period (from h rounded to bf16: the kernel's input)
    h64 = h[:p].double().requires_grad_()
    w64, b64 = w.double().requires_grad_(), b.double().requires_grad_()
    y64 = torch_norm(h64, w64, b64, rms)
    g = torch.autograd.grad(y64, [h64, w64] if rms else [h64, w64, b64], gbase.double())
    he = h[:p].clone().requires_grad_()
    ye = torch_norm(he, w, b, rms)
    (dx_eager,) = torch.autograd.grad(ye, he, gbase)
    assert_parity(dx[:p], g[0], dx_eager, "dx")
    # Whole periods, then the partial one (its rows are the first rows - p * whole of a period).
    whole, tail = divmod(rows, p)
    for i, name in enumerate(["dw"] + ([] if rms else ["db"])):
        got = (dw, db)[i]
        yt = torch_norm(h64[:tail].detach(), w64, b64, rms)
        (gt,) = torch.autograd.grad(yt, [w64, b64][i], gbase[:tail].double())
        ref = whole * g[i + 1] + gt
        err = (got.double() - ref).abs().max().item()
        bound = 1e-5 * ref.abs().max().item()
        assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e} over {rows} rows"


def attention64(q, k, v, mask, do):
    """(out, dq, dk, dv) of masked attention in float64."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return (out.detach(), *torch.autograd.grad(out, [q, k, v], do.double()))


def attention_eager(q, k, v, mask, do):
    """The same in q's dtype: torch's math path (the same-dtype yardstick)."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5
    s = (q @ k.transpose(-1, -2)).float() * scale
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).to(q.dtype)
    out = p @ v
    return (out.detach(), *torch.autograd.grad(out, [q, k, v], do))


# One head whose (32768, 65537) scores pass 2**31: a bool mask of that shape (a strided view of a
# repeated random tile: 2 GiB) is read at offsets past 2**31 in both passes. The reference needs
# only some query rows: rows are independent in the forward pass, and the backward pass gets an
# output gradient that is zero outside those rows, so dk and dv come from them alone (the kernel
# still walks every row: its dq must be exactly zero elsewhere). The rows include the last ones,
# whose mask offsets are the largest. Head dim 8: the cost is in the score count.
@pytest.mark.needs_gib(5)
def test_attention_scores_past_2_31(big_memory):
    sq, sk, d = 32768, 65537, 8
    assert sq * sk > BIG
    q, k, v = (torch.randn(1, 1, s, d).to(BF16) for s in (sq, sk, sk))
    tile = torch.rand(61, 67) < 0.9
    mask = tile.repeat(sq // 61 + 1, sk // 67 + 1)[:sq, :sk][None, None]  # (1, 1, Sq, Sk) view
    scale = d**-0.5
    plain = (-1, -1, 0.0, None, None)  # no window, softcap, sinks or ALiBi
    out, lse = fa.attention(q, k, v, mask, None, scale, False, 0, 0.0, *plain)
    rows = torch.tensor([0, 1, 4097, sq // 2 + 3, sq - 7, sq - 2, sq - 1])
    do = torch.zeros_like(q)
    do[:, :, rows] = torch.randn(1, 1, len(rows), d).to(BF16)
    dq, dk, dv, _, _ = fa.attention_backward(
        do, q, k, v, out, lse, mask, None, scale, False, 0, 0.0, *plain, False, False
    )
    sub = (q[:, :, rows], k, v, mask[:, :, rows], do[:, :, rows])
    ref, eager = attention64(*sub), attention_eager(*sub)
    for name, g, r, e in zip(
        ["out", "dq", "dk", "dv"],
        [out[:, :, rows], dq[:, :, rows], dk, dv],
        ref,
        eager,
        strict=True,
    ):
        assert_parity(g, r, e, name)
    others = torch.ones(sq, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(dq[:, :, others], torch.zeros_like(dq[:, :, others])), (
        "dq of rows with do = 0"
    )


# q and out past 2**31 elements: 32769 batch items of 8 query heads, 64 rows, head dim 128, over
# one kv head (MQA) of 16 keys given as a stride-0 expansion along the batch (never copied). The
# batch items repeat with period 7.
@pytest.mark.needs_gib(10)
def test_attention_q_past_2_31(big_memory):
    p, h, sq, sk, d = 7, 8, 64, 16, 128
    batch = BIG // (h * sq * d) + 1
    base = torch.randn(p, h, sq, d).to(BF16)
    q = periodic(base, batch)
    assert q.numel() > BIG
    k, v = (torch.randn(1, 1, sk, d).to(BF16) for _ in range(2))
    out = fastattn.attention(q, k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1),
                             backend="cpu")  # fmt: skip
    assert_periodic(out, p, "out")
    kp, vp = k.expand(p, h, sk, d), v.expand(p, h, sk, d)
    ref = torch.nn.functional.scaled_dot_product_attention(base.double(), kp.double(), vp.double())
    eager = torch.softmax((base @ kp.transpose(-1, -2)).float() * d**-0.5, -1).to(BF16) @ vp
    assert_parity(out[:p], ref, eager, "out")
    assert math.prod(out.shape) == q.numel()
