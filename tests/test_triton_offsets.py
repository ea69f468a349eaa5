"""Element offsets past 2**31 in the Triton kernels, run in the interpreter without the memory.

Each input is a small view whose one spread dimension steps ``BIG`` = 2**31 - 2**16 elements
(an int32 value, as Triton passes it), so that its third entry lies 2**32 - 2**17 elements in:
an int32 index * stride product wraps there, and the kernel reads ``2**17`` elements *before* the
view (mapped memory: another input, or zeros) instead of the entry. All views share one storage
of ~2**32 fp16 elements (8 GiB) that is never touched past the few pages written: allocation is
lazy. Results must equal, bit for bit, those of the same inputs made contiguous.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastattn._triton import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

BIG = 2**31 - 2**16
BASE = 2**17  # where the views start: a wrapped read (2**17 before an entry) stays in storage
RNG = torch.tensor([0x9E3779B9, 12345], dtype=torch.int64)


class _Spread:
    """Lays out views in one lazily allocated storage, one dimension of each at stride BIG."""

    def __init__(self, dtype: torch.dtype, slab: int = 2**16):
        self.storage = torch.empty(2 * BIG + BASE + slab, dtype=dtype)
        self.next = BASE

    def view(self, t: torch.Tensor, dim: int | None) -> torch.Tensor:
        """``t`` copied into a view whose ``dim`` has stride BIG (``t.shape[dim]`` <= 3), the
        other dims packed (contiguous among themselves)."""
        if dim is None:
            return t.clone()
        assert t.shape[dim] <= 3
        strides = [0] * t.dim()
        step = 1
        for d in reversed(range(t.dim())):
            if d != dim:
                strides[d], step = step, step * t.shape[d]
        strides[dim] = BIG
        v = self.storage.as_strided(t.shape, strides, self.next)
        self.next += step
        assert self.next <= BASE + 2**16
        v.copy_(t)
        return v


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("spread", ["batch", "head", "row", "mask_col"])
def test_attention_offsets_past_2_31(spread, deterministic):
    from fastattn.ops import _attention_triton as A
    from fastattn.ops import _attention_triton_bwd as AB

    B, H, S, D = (3, 3, 3, 16) if spread != "mask_col" else (1, 2, 3, 16)
    dim = {"batch": 0, "head": 1, "row": 2, "mask_col": None}[spread]
    dt = torch.float16
    q, k, v, do = (_rand(B, H, S, D, seed=i).to(dt) for i in range(4))
    mask = _rand(B, H, S, S, seed=5).to(dt)
    lay = _Spread(dt)
    views = [lay.view(t, dim) for t in (q, k, v, do)]
    views.append(lay.view(mask, 3 if spread == "mask_col" else dim))
    far = views[-1] if dim is None else views[0]  # its last entry along the spread dim
    d = 3 if dim is None else dim
    assert far.storage_offset() + (far.shape[d] - 1) * far.stride(d) >= 2**32 - 2**17
    compact = [x.contiguous() for x in views]
    results = []
    for qq, kk, vv, dd, mm in (views, compact):
        out, lse = A.triton_forward(qq, kk, vv, mm, RNG, D**-0.5, True, 1, 0.25)
        grads = AB.triton_backward(dd, qq, kk, vv, out, lse, mm, RNG, D**-0.5, True, 1, 0.25,
                                   deterministic, True)  # fmt: skip
        results.append((out, lse, *grads[:4]))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dmask"), *results, strict=True):
        assert torch.isfinite(b).all(), name
        assert torch.equal(a, b), f"{name}: max diff {(a.float() - b.float()).abs().max()}"


def test_softmax_mask_column_stride_past_2_31():
    from fastattn.ops import softmax as sm

    x = _rand(2, 3)
    lay = _Spread(torch.uint8)
    mask = lay.view(torch.ones(2, 3, dtype=torch.uint8), 1).view(torch.bool)
    assert mask.stride(1) * 2 + mask.storage_offset() >= 2**32 - 2**17
    y = sm._triton_forward(x, mask, 1.0, False, False)
    ref = sm._triton_forward(x, mask.contiguous(), 1.0, False, False)
    assert torch.equal(y, ref) and torch.allclose(y, torch.softmax(x, -1)), (y, ref)
    assert math.isclose(y.sum().item(), 2.0, rel_tol=1e-6)
