"""The Triton attention kernels (fastattn/ops/_attention_triton.py) against the fp64 oracle.

Runs the launchers directly (no custom-op glue) under the Triton interpreter on CPU tensors:
forward (out, lse) and backward (dq, dk, dv, dmask) against ``reference.attention`` in float64
with torch.autograd, over GQA, ragged lengths, causal offsets, masks, dropout, decode split-K,
the deterministic and atomic dQ paths, non-contiguous inputs and zero-size shapes.
"""

from __future__ import annotations

import contextlib
import math
import time
from functools import partial

import pytest
import torch

from fastattn import _triton as T
from fastattn import reference
from fastattn._triton import HAS_TRITON
from fastattn.ops import _attention_triton as A
from fastattn.ops import _attention_triton_aot as AOT
from fastattn.ops import _attention_triton_bwd as AB
from fastattn.ops import _attention_triton_common as C

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

RNG = torch.tensor([0x9E3779B9, 12345], dtype=torch.int64)


def _inputs(B, H, Hkv, Sq, Sk, D, dtype, transposed=False, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # (B, S, H, D) storage viewed as (B, H, S, D)
        q = torch.randn(B, Sq, H, D, generator=g).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, H, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    if dv is None:
        v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    else:  # v's own head dim, (B, S, Hkv, Dv) storage viewed as (B, Hkv, S, Dv): strided
        v = torch.randn(B, Sk, Hkv, dv, generator=g).to(dtype).transpose(1, 2)
    return q, k, v


def _mask(kind, B, H, Sq, Sk, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool":  # key padding (B, 1, 1, Sk), one query row fully masked via a (Sq, Sk) part
        keep = torch.rand(B, 1, 1, Sk, generator=g) > 0.3
        rows = torch.ones(1, 1, Sq, 1, dtype=torch.bool)
        rows[0, 0, Sq // 2] = False
        return keep & rows
    m = torch.randn(1, H, Sq, Sk, generator=g)  # float, broadcast over batch, with a dead row
    m[0, 0, Sq - 1] = float("-inf")
    return m


def _check(fast, ref, eager, dtype, name):
    ref = ref.double()
    assert not torch.isnan(fast).any(), f"{name}: NaN"
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(fast), fin), f"{name}: inf pattern differs"
    err = (fast.double() - ref).masked_fill(~fin, 0).abs().max().item() if ref.numel() else 0.0
    scale = ref.masked_fill(~fin, 0).abs().max().item() if ref.numel() else 0.0
    if dtype == torch.float32:
        tol = 1e-6 + 1e-4 * scale
    else:
        eager_err = (eager.double() - ref).masked_fill(~fin, 0).abs().max().item()
        tol = 2 * eager_err + 1e-2 * max(1.0, scale)
    assert err <= tol, f"{name}: err {err:.3g} > tol {tol:.3g}"


def _run(B, H, Hkv, Sq, Sk, D, dtype=torch.float32, causal=False, off=0, mask=None, p=0.0,
         splits=None, deterministic=True, transposed=False, dv=None):  # fmt: skip
    q, k, v = _inputs(B, H, Hkv, Sq, Sk, D, dtype, transposed, dv=dv)
    m = _mask(mask, B, H, Sq, Sk)
    rng = RNG if p > 0 else None
    scale = D**-0.5
    mk = None if m is None else m.to(dtype) if mask == "float" and dtype != torch.float32 else m
    mk_full = None if mk is None else mk.expand(B, H, Sq, Sk)
    out, lse = A.triton_forward(q, k, v, mk_full, rng, scale, causal, off, p, num_splits=splits)
    mask_grad = mask == "float"

    def oracle(dt, opmath=None):
        qr, kr, vr = (x.detach().to(dt).requires_grad_() for x in (q, k, v))
        mr = None if mk is None else mk.detach().to(dt if mask_grad else mk.dtype)
        if mask_grad:
            mr.requires_grad_()
        o, ls = reference.attention(qr, kr, vr, mr, scale, causal, off, p, rng, opmath=opmath)
        return qr, kr, vr, mr, o, ls

    qr, kr, vr, mr, ro, rl = oracle(torch.float64)
    g = torch.randn(ro.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ro.backward(g)
    eager = oracle(dtype)
    eager[4].backward(g.to(dtype))
    _check(out, ro, eager[4], dtype, "out")
    _check(lse, rl, eager[5], torch.float32, "lse")
    do = g.to(dtype)
    if transposed:  # grad_out in (B, S, H, D) storage too
        do = do.transpose(1, 2).contiguous().transpose(1, 2)
    dq, dk, dv, dm, _ = AB.triton_backward(do, q, k, v, out, lse, mk_full, rng, scale, causal,
                                          off, p, deterministic, mask_grad)  # fmt: skip
    for name, fast, ref, e in (("dq", dq, qr, eager[0]), ("dk", dk, kr, eager[1]),
                               ("dv", dv, vr, eager[2])):  # fmt: skip
        assert fast.dtype == dtype and fast.is_contiguous()
        _check(fast, ref.grad, e.grad, dtype, name)
    if mask_grad:
        assert dm.dtype == torch.float32 and dm.shape == (B, H, Sq, Sk)
        _check(dm.sum_to_size(mr.shape), mr.grad, eager[3].grad, dtype, "dmask")
    else:
        assert dm.numel() == 0
    return q, k, v, mk_full, out, lse, do, (dq, dk, dv)


CASES = [
    # B, H, Hkv, Sq, Sk, D, options
    (1, 4, 4, 1, 1, 16, {}),
    (2, 4, 2, 17, 33, 16, {}),
    (1, 4, 1, 113, 203, 40, {"causal": True, "off": 90}),
    (1, 4, 2, 200, 113, 64, {"causal": True, "off": 0}),
    (1, 2, 1, 200, 113, 64, {"causal": True, "off": -20}),  # leading rows see nothing
    (2, 4, 2, 17, 33, 96, {"mask": "bool"}),
    (1, 4, 2, 33, 47, 40, {"mask": "float", "causal": True, "off": 14}),
    (2, 4, 4, 17, 65, 16, {"p": 0.25}),
    (1, 4, 2, 40, 70, 64, {"p": 0.4, "causal": True, "off": 30, "mask": "float"}),
    (1, 4, 2, 1, 200, 64, {"splits": 3}),
    (1, 4, 1, 5, 300, 40, {"causal": True, "off": 295, "p": 0.2, "mask": "bool"}),
    (2, 4, 2, 3, 160, 96, {"mask": "float", "splits": 4}),
    # split-K packs the 4 heads of the kv group: 132 rows in 3 tiles, across head boundaries
    (1, 4, 1, 33, 150, 16, {"splits": 3, "causal": True, "off": 5, "mask": "float", "p": 0.3}),
    (1, 4, 2, 37, 29, 16, {"deterministic": False}),
    (1, 4, 1, 21, 45, 40, {"deterministic": False, "mask": "float", "causal": True, "off": 24}),
    (2, 4, 2, 19, 37, 64, {"transposed": True, "causal": True, "off": 18}),
    (1, 2, 1, 33, 65, 128, {"causal": True, "off": 32}),
    (1, 2, 2, 17, 40, 256, {"mask": "bool"}),
    # v's own head dim (multi-head latent attention; v strided): narrower, wider, DeepSeek's
    (1, 4, 2, 7, 113, 24, {"dv": 16, "causal": True, "off": 106}),
    (1, 4, 1, 1, 300, 24, {"dv": 16, "splits": 4, "mask": "float"}),
    (1, 4, 2, 113, 7, 24, {"dv": 16, "mask": "bool", "p": 0.25}),
    (2, 4, 2, 17, 33, 16, {"dv": 40, "p": 0.25, "deterministic": False}),
    (1, 2, 1, 33, 47, 40, {"dv": 24, "mask": "float", "transposed": True}),
    (1, 4, 2, 9, 70, 40, {"dv": 48, "causal": True, "off": 61}),  # one block (64) for both
    (1, 2, 1, 17, 40, 192, {"dv": 128, "causal": True, "off": 23, "deterministic": False}),
    (1, 2, 1, 3, 160, 192, {"dv": 128, "splits": 3}),
]


def _case_id(c):
    return "-".join(map(str, c[:6])) + "".join(f"-{k}={v}" for k, v in c[6].items())


# Large head dims run in fp32 only (interpreter time); bf16 at head dim 128 is in test_attention.
GRID = [(c, dt) for c in CASES for dt in (torch.float32, torch.bfloat16)
        if dt == torch.float32 or c[5] < 128]  # fmt: skip


@pytest.mark.parametrize(("case", "dtype"), GRID,
                         ids=[f"{_case_id(c)}-{str(dt)[6:]}" for c, dt in GRID])  # fmt: skip
def test_matches_reference(case, dtype):
    *shape, opts = case
    _run(*shape, dtype=dtype, **opts)


def test_fp16_and_auto_split():
    # Decode with many keys takes the split-K path on its own (interpreter: 8 pseudo-SMs).
    B, H, Sk = 1, 2, 4 * 64 + 17
    q, k, v = _inputs(B, H, 1, 2, Sk, 64, torch.float16)
    assert C.decode_splits(q, B * H, Sk, C.SPLIT_CONFIG[64][1]) > 1
    _run(B, H, 1, 2, Sk, 64, dtype=torch.float16, mask="float")


def test_deterministic_is_bitwise_reproducible():
    q, k, v, m, out, lse, do, grads = _run(1, 4, 2, 45, 70, 40, mask="bool", p=0.1)
    again = AB.triton_backward(do, q, k, v, out, lse, m, RNG, 40**-0.5, False, 0, 0.1, True, False)
    for a, b in zip(grads, again[:3], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "shape", [(0, 2, 2, 5, 7), (1, 2, 1, 0, 7), (1, 2, 1, 5, 0)], ids=["B0", "Sq0", "Sk0"]
)
@pytest.mark.parametrize("dv", [None, 24])
def test_zero_size(shape, dv):
    B, H, Hkv, Sq, Sk = shape
    q, k, v = _inputs(B, H, Hkv, Sq, Sk, 16, torch.float32, dv=dv)
    out, lse = A.triton_forward(q, k, v, None, None, 0.25, False, 0, 0.0)
    assert out.shape == (*q.shape[:3], v.shape[3]) and lse.shape == (B, H, Sq)
    assert (out == 0).all() and (lse == float("-inf")).all()
    do = torch.randn_like(out)
    dq, dk, dv, dm, _ = AB.triton_backward(do, q, k, v, out, lse, None, None, 0.25, True, 0, 0.0,
                                       True, False)  # fmt: skip
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all() and dm.numel() == 0
    assert dv.shape == v.shape


def test_zero_qk_head_dim_with_values():
    # D = 0, Dv > 0: every score is 0, out is the mean of the visible values, and dv = P^T dO
    # comes from the kernels (dq, dk are empty).
    q, k, v = torch.randn(1, 2, 5, 0), torch.randn(1, 2, 7, 0), torch.randn(1, 2, 7, 16)
    out, lse = A.triton_forward(q, k, v, None, None, 1.0, True, 2, 0.0)
    want, _ = reference.attention(q.double(), k.double(), v.double(), None, 1.0, True, 2)
    assert torch.allclose(out.double(), want, atol=1e-6)
    do = torch.randn_like(out)
    *_, dv, _, _ = AB.triton_backward(do, q, k, v, out, lse, None, None, 1.0, True, 2, 0.0, True,
                                      False)  # fmt: skip
    vr = v.double().requires_grad_()
    o = reference.attention(q.double(), k.double(), vr, None, 1.0, True, 2)[0]
    assert torch.allclose(dv.double(), torch.autograd.grad(o, vr, do.double())[0], atol=1e-6)


def test_autotuned_launch(monkeypatch):
    # The autotuned path (GPU default) with a CPU timer, as the interpreter has no GPU timer.
    def cpu_bench(fn, quantiles=None):
        t = time.perf_counter()
        fn()
        dt = (time.perf_counter() - t) * 1e3
        return [dt, dt, dt]

    monkeypatch.setattr(T, "autotuning", lambda: True)
    monkeypatch.setattr(T, "_TUNED", {})
    monkeypatch.setattr(T.triton, "autotune", partial(T.triton.autotune, do_bench=cpu_bench))
    # fp16: fp32 has a single (never tuned) config per tier.
    _run(1, 2, 1, 20, 70, 16, torch.float16, mask="float", deterministic=False)
    _run(1, 2, 1, 20, 70, 16, torch.float16, causal=True, off=50, deterministic=True)
    kernels = {"attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"}
    assert {name for name, _ in T._TUNED} == kernels
    # Sequence lengths join the key by powers of two: 20 -> 80 queries tunes again, 70 -> 90 keys
    # reuses that config, 300 keys tunes again (80 queries: no decode split-K, which is pinned).
    fwd = next(t for (name, _), t in T._TUNED.items() if name == "attn_fwd_kernel")
    tuned = len(fwd.cache)
    for sk, new in ((70, 1), (90, 1), (300, 2)):
        _run(1, 2, 1, 80, sk, 16, torch.float16, mask="float", deterministic=False)
        assert len(fwd.cache) == tuned + new


def test_autotuning_times_on_the_gpu(monkeypatch):
    # On a GPU the autotuner keeps Triton's default benchmarker (CUDA events); only this
    # module's interpreter tests pass a CPU timer. Under the interpreter nothing is tuned.
    assert not T.autotuning()
    seen = []
    real = T.triton.autotune

    def autotune(*args, **kw):
        seen.append(kw)
        return real(*args, **kw, do_bench=lambda fn, quantiles=None: (fn(), [1.0, 1.0, 1.0])[1])

    monkeypatch.setattr(T, "autotuning", lambda: True)
    monkeypatch.setattr(T, "_TUNED", {})
    monkeypatch.setattr(T.triton, "autotune", autotune)
    _run(1, 2, 1, 20, 70, 16, torch.float16)
    assert seen and all("do_bench" not in kw for kw in seen)


def test_aot_specs_cover_every_config():
    ids = [s["id"] for s in AOT.aot_specs()]
    assert len(ids) == len(set(ids))
    for kern, table in (("attn_fwd", C.FWD_CONFIGS), ("attn_bwd_dkdv", C.DKDV_CONFIGS),
                        ("attn_bwd_dq", C.DQ_CONFIGS)):  # fmt: skip
        for tier, cfgs in table.items():
            for m, n, w, s in cfgs:
                assert any(i.startswith(f"{kern}-{tier}-") and i.endswith(f"m{m}n{n}w{w}s{s}")
                           for i in ids), (kern, tier, (m, n, w, s))  # fmt: skip


GUARDED = []  # the tensors whose device_guard is entered, innermost last


@contextlib.contextmanager
def _guard(t):
    GUARDED.append(t)
    try:
        yield
    finally:
        GUARDED.pop()


class _GridSpy:
    """Stands in for a kernel: records each launch's grid and tile, runs nothing; checks that it
    is launched under the device guard of the inputs (Triton launches on the current device)."""

    def __init__(self, kernel):
        self.fn = kernel.fn
        self.launches: list[tuple[tuple[int, ...], int | None, int | None]] = []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            assert GUARDED and GUARDED[-1].device == args[0].device, "launched unguarded"
            self.launches.append((tuple(grid), kw.get("BLOCK_M"), kw.get("BLOCK_N")))

        return launch


SPIED = [(A, "attn_fwd_kernel"), (A, "attn_combine_kernel"), (AB, "attn_bwd_pre_kernel"),
         (AB, "attn_bwd_dkdv_kernel"), (AB, "attn_bwd_dq_kernel")]  # fmt: skip


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize(
    ("B", "H", "Hkv", "Sq", "Sk", "splits"),
    [(35000, 2, 1, 300, 200, None), (70000, 1, 1, 1, 512, 4), (1, 8, 8, 2**22, 2**22, None)],
    ids=["bh70000", "bh70000-split", "sq4M"],
)
def test_every_launch_fits_cuda_grid_limits(monkeypatch, B, H, Hkv, Sq, Sk, splits,
                                            deterministic):  # fmt: skip
    # batch*heads = 70,000 (over the 65,535 of grid axes 1 and 2) and 4M-token sequences, on
    # the meta device: nothing is allocated, the launchers run up to the (spied) launches.
    spies = {}
    monkeypatch.setattr(A, "device_guard", _guard)
    monkeypatch.setattr(AB, "device_guard", _guard)
    for mod, name in SPIED:
        spies[name] = _GridSpy(getattr(mod, name))
        monkeypatch.setattr(mod, name, spies[name])
    q = torch.empty(B, H, Sq, 64, dtype=torch.float16, device="meta")
    k = torch.empty(B, Hkv, Sk, 64, dtype=torch.float16, device="meta")
    out, lse = A.triton_forward(q, k, k, None, None, 0.125, True, Sk - Sq, 0.0, num_splits=splits)
    AB.triton_backward(out, q, k, k, out, lse, None, None, 0.125, True, Sk - Sq, 0.0,
                       deterministic, False)  # fmt: skip
    cdiv = lambda a, b: -(-a // b)
    expected = {  # programs per launch, from the tile each launch used
        "attn_fwd_kernel": lambda m, n: (
            cdiv(Sq, m) * B * H if not splits else cdiv(H // Hkv * Sq, m) * B * Hkv * splits
        ),
        "attn_combine_kernel": lambda m, n: B * H * Sq,
        "attn_bwd_pre_kernel": lambda m, n: cdiv(Sq, 64) * B * H,
        "attn_bwd_dkdv_kernel": lambda m, n: cdiv(Sk, n) * B * Hkv,
        "attn_bwd_dq_kernel": lambda m, n: cdiv(Sq, m) * B * H,
    }
    launched = 0
    for name, spy in spies.items():
        for grid, m, n in spy.launches:
            launched += 1
            assert all(g <= lim for g, lim in zip(grid, T.MAX_GRID, strict=False)), (name, grid)
            assert math.prod(grid) == expected[name](m, n), (name, grid)
    assert launched == 3 + (1 if splits else 0) + (1 if deterministic else 0)


def test_checked_grid():
    assert T.checked_grid((2**31 - 1, 65535, 65535)) == (2**31 - 1, 65535, 65535)
    for bad in ((2**31, 1, 1), (1, 65536, 1), (1, 1, 65536)):
        with pytest.raises(ValueError, match="exceeds CUDA's limit"):
            T.checked_grid(bad)


@pytest.mark.parametrize(
    ("usage", "kept"),
    [
        ({}, "abc"),  # unknown (the interpreter): every one is kept
        ({"a": (True, 0), "b": (True, 0), "c": (True, 0)}, "abc"),
        ({"a": (False, 0), "b": (True, 0), "c": (True, 0)}, "bc"),  # a: over shared memory
        ({"a": (True, 64), "b": (True, 0), "c": (True, 8)}, "b"),  # a and c spill
        ({"a": (True, 64), "b": (False, 0), "c": (True, 8)}, "ac"),  # all spill or overflow
        ({"a": (False, 0), "b": (False, 0), "c": (False, 0)}, "a"),  # its launch raises
    ],
)
def test_fitting_prunes_tiles_over_shared_memory_or_spilling(usage, kept):
    assert "".join(T.fitting(list("abc"), usage.get)) == kept


def test_launch_uses_only_fitting_tiles(monkeypatch):
    # The first fp16 forward tile of head dim 64 "does not fit": launches take the next, and
    # the fit is decided once per specialisation (dtypes, alignment, flags).
    first, second = C.FWD_CONFIGS[64][:2]
    asked = []

    def usage(kernel, tile, grid, args, kw):
        asked.append((kernel.fn.__name__, tile))
        return (tile != first, 0) if kernel.fn.__name__ == "attn_fwd_kernel" else (True, 0)

    spy = []
    real = A.attn_fwd_kernel

    class Recorder:
        fn = real.fn

        def __getitem__(self, grid):
            def launch(*a, **kw):
                spy.append(tuple(kw[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")))
                real[grid](*a, **kw)

            return launch

    monkeypatch.setattr(T, "tile_usage", usage)
    monkeypatch.setattr(T, "_FITTING", {})
    monkeypatch.setattr(A, "attn_fwd_kernel", Recorder())
    for _ in range(2):
        _run(1, 2, 1, 20, 70, 16, torch.float16, mask="float")
    assert spy == [second, second]
    assert asked.count(("attn_fwd_kernel", first)) == 1
