"""Attention variants (issue 15): sliding windows, logit softcapping, attention sinks, ALiBi and a
value head_dim of its own, alone and together, against the float64 oracle (fastattn.reference,
whose formulas docs/attention.md states), with every gradient (the sinks' included)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import GPU, assert_parity, reference_attention_terms

import fastattn
from fastattn import reference

# name -> attention() keyword arguments (tensors made per call by _variant_args).
VARIANTS = {
    "window-causal": {"causal": True, "window": (37, 0)},  # Mistral-style sliding window
    "window-both-sides": {"window": (20, 9)},  # local attention, bottom-right aligned
    "window-top-left": {"causal": "top_left", "window": (50, 0)},  # the other alignment
    "window-right-only": {"window": (-1, 5)},  # unbounded left, 5 keys past the diagonal
    "softcap": {"softcap": 2.5, "causal": True},  # Gemma 2: c * tanh(s / c)
    "sinks": {"sinks": True},  # gpt-oss: one more logit per head, no value
    "alibi": {"alibi": "heads", "causal": True},  # slopes per head
    "alibi-batch": {"alibi": "batch_heads"},  # slopes per (batch, head), non-causal |i - j|
    "v-head-dim": {"dv": 24},  # multi-head latent attention: v narrower than q/k
    "all": {
        "causal": True,
        "window": (30, 0),
        "softcap": 8.0,
        "sinks": True,
        "alibi": "heads",
        "dv": 72,
    },  # fmt: skip
}
# (seqlen_q, seqlen_k): one decode row against many keys; a few; odd lengths past a block on
# both axes; more queries than keys (bottom-right alignment hides every key from early rows);
# keys past the 1024 + 1 boundary.
SEQLENS = [(1, 200), (7, 7), (113, 203), (200, 113), (33, 1025)]
HEAD_DIMS = [40, 96]  # not powers of two: padded, masked head dims
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _variant_args(B, H, kw, dtype, device="cpu"):
    """attention() keywords with sinks / slopes made: fp64 values that ``dtype`` holds exactly
    (as the inputs: the oracle then sees the same numbers)."""
    kw = dict(kw)
    kw.pop("dv", None)
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(H, device=device).to(dtype).double()
    if "alibi" in kw:
        shape = (H,) if kw.pop("alibi") == "heads" else (B, H)
        slopes = torch.rand(shape, device=device) * 0.5
        kw["alibi_slopes"] = slopes.to(dtype).double()
    return kw


def _oracle(q, k, v, kw, opmath):
    """reference.attention with attention()'s keywords in its own terms."""
    causal, offset, window = reference_attention_terms(q, k, kw.get("causal", False),
                                                       kw.get("window"))  # fmt: skip
    return reference.attention(q, k, v, None, None, causal, offset, window=window,
                               softcap=kw.get("softcap", 0.0), sinks=kw.get("sinks"),
                               alibi_slopes=kw.get("alibi_slopes"), opmath=opmath)  # fmt: skip


def run(impl, q, k, v, grad, kw):
    """(out, lse, dq, dk, dv[, dsinks]): impl a backend, or "reference64" / "eager" (the oracle
    in float64 / the same math in the inputs' dtype: the rounding scale of the rule)."""
    dt = torch.float64 if impl == "reference64" else q.dtype
    leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
    kw = dict(kw)
    if "sinks" in kw:
        kw["sinks"] = kw["sinks"].to(dt).requires_grad_()
        leaves.append(kw["sinks"])
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = kw["alibi_slopes"].to(dt)
    if impl in ("reference64", "eager"):
        out, lse = _oracle(*leaves[:3], kw, dt)
    else:
        out, lse = fastattn.attention(*leaves[:3], return_lse=True, backend=impl, **kw)
    grads = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    return [out.detach(), lse.detach().float(), *grads]


def check(q, k, v, kw, backend="cpu"):
    grad = torch.randn((*q.shape[:-1], v.shape[-1]), dtype=torch.float64, device=q.device)
    got = run(backend, q, k, v, grad, kw)
    want = run("reference64", q, k, v, grad, kw)
    base = run("eager", q, k, v, grad, kw)
    names = ["out", "lse", "dq", "dk", "dv", "dsinks"]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        dt = torch.float32 if names[i] == "lse" and q.dtype != torch.float64 else q.dtype
        e = base[i] if dt == q.dtype else None
        terms = want[4].abs().max().item() if names[i] in ("dq", "dk") else 0.0
        assert_parity(g, w.double(), e, f"{backend} {names[i]}", dt, ref_scale=terms)


def grid():
    for name in VARIANTS:
        for i, (sq, sk) in enumerate(SEQLENS):
            for j, d in enumerate(HEAD_DIMS):
                for dtype in DTYPES:
                    # fp16 runs bf16's kernel code but for loads and stores: half the cells.
                    if dtype == torch.float16 and (i + j) % 2:
                        continue
                    heads = (4, 2) if (i + j) % 2 else (4, 1)  # GQA, MQA
                    yield pytest.param(name, dtype, sq, sk, d, heads, id=f"{name}-{dtype}-"
                                       f"{sq}x{sk}-d{d}-h{heads[0]}kv{heads[1]}")  # fmt: skip


def triton_grid():
    # The interpreter runs ~ms per block step: two shapes (a decode row against 200 keys, which
    # takes the split-K path and its combine, and 33 x 70), one dtype per variant in turn.
    for i, name in enumerate(VARIANTS):
        for j, (sq, sk) in enumerate([(1, 200), (33, 70)]):
            dtype = (torch.float32, torch.bfloat16)[(i + j) % 2]
            yield pytest.param(name, dtype, sq, sk, 40, (4, 2), id=f"{name}-{dtype}-{sq}x{sk}")


@pytest.mark.parametrize(("variant", "dtype", "Sq", "Sk", "D", "heads"), list(triton_grid()))
def test_triton_variants_in_the_interpreter(variant, dtype, Sq, Sk, D, heads):
    if fastattn.dispatch.unavailable_reason("triton", torch.device("cpu"), dtype) is not None:
        pytest.skip("triton cannot run here")
    test_parity_grid_variants("triton", variant, dtype, Sq, Sk, D, heads)


# A value head_dim of its own (multi-head latent attention) in the Triton kernels: narrower and
# wider than q/k's, neither a power of two nor the same block (24 -> 32 / 16, 16 / 40 -> 64),
# over odd lengths, seqlen_q != seqlen_k both ways, decode (split-K: 1 x 300, checked below),
# GQA, causal, window and sinks; v strided (test_parity_grid_variants). fp32 and bf16 in turn.
DV_KWARGS = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window": (20, 9)},
    "sinks-causal-window": {"sinks": True, "causal": True, "window": (50, 0)},
}


@pytest.mark.parametrize("kw_name", list(DV_KWARGS))
@pytest.mark.parametrize(("Sq", "Sk"), [(1, 1), (7, 113), (113, 7), (1, 300)])
@pytest.mark.parametrize(("D", "Dv"), [(24, 16), (16, 40)])
def test_triton_v_head_dim_in_the_interpreter(D, Dv, Sq, Sk, kw_name):
    if fastattn.dispatch.unavailable_reason("triton", torch.device("cpu"), torch.float32):
        pytest.skip("triton cannot run here")
    from fastattn.ops import _attention_triton_common as C

    dtype = (torch.float32, torch.bfloat16)[(Sq + Sk + D + len(kw_name)) % 2]
    if (Sq, Sk) == (1, 300):  # the decode shape does take the split-K path and its combine
        programs = 2 * 2  # batch x kv heads x one tile of the group's 4 x 1 rows
        assert C.decode_splits(torch.empty(0), programs, Sk, C.split_config(dtype, 64)[1]) > 1
    kw = {**DV_KWARGS[kw_name], "dv": Dv}
    test_parity_grid_variants("triton", kw, dtype, Sq, Sk, D, (4, 2))


@pytest.mark.parametrize(("Sq", "Sk", "causal"), [(1, 300, False), (33, 70, True)])
def test_triton_deepseek_head_dims_in_the_interpreter(Sq, Sk, causal):
    # DeepSeek's 192 / 128 (BLOCK_D 256, BLOCK_DV 128; tier 256 tiles), fp32, MQA.
    if fastattn.dispatch.unavailable_reason("triton", torch.device("cpu"), torch.float32):
        pytest.skip("triton cannot run here")
    kw = {"causal": causal, "dv": 128}
    test_parity_grid_variants("triton", kw, torch.float32, Sq, Sk, 192, (2, 1))


# "parity_grid" and "cpu" in the id: tools/cpu_tiers.py runs it on every CPU tier.
@pytest.mark.parametrize("backend", ["cpu"])
@pytest.mark.parametrize(("variant", "dtype", "Sq", "Sk", "D", "heads"), list(grid()))
def test_parity_grid_variants(backend, variant, dtype, Sq, Sk, D, heads):
    kw = VARIANTS[variant] if isinstance(variant, str) else variant
    B, (H, Hkv) = 2, heads
    Dv = kw.get("dv", D)
    q = torch.randn(B, H, Sq, D).to(dtype)
    k = torch.randn(B, Hkv, Sk, D).to(dtype)
    # v stored (batch, seqlen, heads, head_dim) and viewed transposed: strided, as in HF models.
    v = torch.randn(B, Sk, Hkv, Dv).to(dtype).transpose(1, 2)
    check(q, k, v, _variant_args(B, H, kw, dtype), backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("Sq", "Sk"), [(1, 1025), (1025, 1025)])  # split-K decode; 1024 + 1
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("backend", [pytest.param(b, marks=GPU) for b in ("triton", "cuda")])
def test_parity_variants_gpu(backend, variant, Sq, Sk, D, dtype):
    # The Triton kernels compiled for the GPU (tensor cores, autotuned tiles), as on CPU above,
    # and the CUDA C++ forward (its backward: Triton's).
    kw = VARIANTS[variant]
    q = torch.randn(2, 8, Sq, D, device="cuda").to(dtype)
    k = torch.randn(2, 2, Sk, D, device="cuda").to(dtype)
    v = torch.randn(2, Sk, 2, kw.get("dv", D), device="cuda").to(dtype).transpose(1, 2)
    check(q, k, v, _variant_args(2, 8, kw, dtype, device="cuda"), backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("Sq", "Sk"), [(1, 1025), (113, 7), (1025, 1025)])
@pytest.mark.parametrize("kw_name", list(DV_KWARGS))
@pytest.mark.parametrize(("D", "Dv"), [(192, 128), (24, 16), (64, 128)])
@pytest.mark.parametrize("backend", [pytest.param(b, marks=GPU) for b in ("triton", "cuda")])
def test_parity_v_head_dim_gpu(backend, D, Dv, kw_name, Sq, Sk, dtype):
    # v's own head_dim compiled for the GPU: DeepSeek's 192 / 128, a tiny one, v wider than q.
    kw = {**DV_KWARGS[kw_name], "dv": Dv}
    q = torch.randn(2, 8, Sq, D, device="cuda").to(dtype)
    k = torch.randn(2, 2, Sk, D, device="cuda").to(dtype)
    v = torch.randn(2, Sk, 2, Dv, device="cuda").to(dtype).transpose(1, 2)
    check(q, k, v, _variant_args(2, 8, kw, dtype, device="cuda"), backend)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradcheck_float64_cpu(variant):
    B, H, Hkv, Sq, Sk, D = 1, 4, 2, 6, 9, 8
    kw = _variant_args(B, H, VARIANTS[variant], torch.float64)
    q = torch.randn(B, H, Sq, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, Sk, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, Sk, VARIANTS[variant].get("dv", D) // 8 + 3, dtype=torch.float64,
                    requires_grad=True)  # fmt: skip
    sinks = kw.pop("sinks", None)
    inputs = (q, k, v) if sinks is None else (q, k, v, sinks.requires_grad_())

    def fn(q, k, v, s=None):
        return fastattn.attention(q, k, v, sinks=s, backend="cpu", **kw)

    assert torch.autograd.gradcheck(fn, inputs)


def test_keys_outside_every_window_are_never_read():
    # 7 decode rows at the end of 4097 keys with a window of 100: keys below ~3990 are outside
    # every row's window. They hold NaN: a kernel that read them (even to multiply by P = 0)
    # would return NaN. The result must equal the oracle on the same inputs with them zeroed,
    # and their gradients must be exactly zero.
    B, H, Sq, Sk, D, left = 1, 2, 7, 4097, 16, 100
    q = torch.randn(B, H, Sq, D)
    k, v = torch.randn(B, H, Sk, D), torch.randn(B, H, Sk, D)
    first_seen = Sk - Sq - left
    far = slice(0, first_seen - 256)  # two forward blocks of margin below the window
    kn, vn = k.clone(), v.clone()
    kn[:, :, far], vn[:, :, far] = float("nan"), float("nan")
    kn.requires_grad_(), vn.requires_grad_()
    qn = q.clone().requires_grad_()
    out = fastattn.attention(qn, kn, vn, causal=True, window=(left, 0), backend="cpu")
    dq, dk, dv = torch.autograd.grad(out, (qn, kn, vn), torch.ones_like(out))
    want = reference.attention(q.double(), k.double(), v.double(), None, D**-0.5, True, Sk - Sq,
                               window=(left, 0))[0]  # fmt: skip
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert_parity(out, want, None, "out", torch.float32)
    assert (dk[:, :, far] == 0).all() and (dv[:, :, far] == 0).all()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_rows_without_visible_keys_with_sinks(backend):
    # Every key of the first rows is masked: out 0, lse = the head's sink, no NaN in any gradient
    # and no share of those rows in the sinks' gradient (their delta = dO . 0 = 0).
    B, H, Sq, Sk, D = 1, 2, 5, 6, 8
    q, k, v = torch.randn(B, H, Sq, D), torch.randn(B, H, Sk, D), torch.randn(B, H, Sk, D)
    keep = torch.ones(B, 1, Sq, Sk, dtype=torch.bool)
    keep[:, :, :2] = False
    sinks = torch.tensor([0.5, -1.0], requires_grad=True)
    qq = q.clone().requires_grad_()
    out, lse = fastattn.attention(qq, k, v, attn_mask=keep, sinks=sinks, return_lse=True,
                                  backend=backend)  # fmt: skip
    assert (out[:, :, :2] == 0).all()
    assert torch.equal(lse[0, :, :2], sinks.detach().view(H, 1).expand(H, 2))
    dq, ds = torch.autograd.grad(out, (qq, sinks), torch.randn_like(out))
    assert (dq[:, :, :2] == 0).all() and torch.isfinite(ds).all()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_keyless_call_with_sinks(backend):
    # No key at all (seqlen_k 0): zeros, lse = sinks.
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 0, 8)
    sinks = torch.tensor([0.25, 2.0])
    out, lse = fastattn.attention(q, k, k, sinks=sinks, return_lse=True, backend=backend)
    assert (out == 0).all() and torch.equal(lse, sinks.view(1, 2, 1).expand(1, 2, 3))


def test_causal_window_is_the_windowed_mask():
    # window=(left, 0) with causal is exactly a banded bool mask (same oracle, another route).
    q, k, v = torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16)
    i = torch.arange(50).view(50, 1)
    j = torch.arange(50).view(1, 50)
    band = (j <= i) & (j >= i - 10)
    got = fastattn.attention(q, k, v, causal=True, window=(10, 0), backend="cpu")
    want = reference.attention(q.double(), k.double(), v.double(), band)[0]
    assert_parity(got, want, None, "out", torch.float32)


def test_softcap_bounds_the_scores():
    # Huge scores: with softcap c every score lies in (-c, c), so lse <= c + log(seqlen_k).
    q, k, v = torch.randn(1, 1, 4, 8) * 100, torch.randn(1, 1, 9, 8) * 100, torch.randn(1, 1, 9, 8)
    _, lse = fastattn.attention(q, k, v, softcap=3.0, return_lse=True, backend="cpu")
    assert (lse <= 3.0 + torch.log(torch.tensor(9.0)) + 1e-5).all()


BAD = [
    ({"window": (-2, 0)}, ValueError, r"window sizes must be >= 0, or -1"),
    ({"window": 5}, TypeError, "window must be a pair of ints"),
    ({"window": (1.5, 0)}, TypeError, "window must be a pair of ints"),
    ({"window": (True, 0)}, TypeError, "window must be a pair of ints"),
    ({"softcap": -1.0}, ValueError, "softcap must be finite and >= 0"),
    ({"softcap": float("inf")}, ValueError, "softcap must be finite and >= 0"),
    ({"softcap": "1"}, TypeError, "softcap must be a Python number"),
    ({"sinks": torch.zeros(3)}, ValueError, r"sinks must have shape \(4,\)"),
    ({"sinks": torch.zeros(4, dtype=torch.int32)}, TypeError, "sinks must be a floating point"),
    ({"alibi_slopes": torch.zeros(3)}, ValueError, r"alibi_slopes must have shape \(4,\) or"),
    ({"alibi_slopes": torch.zeros(4, requires_grad=True)}, ValueError, "get no gradient"),
    ({"sinks": torch.zeros(4, device="meta")}, ValueError, "sinks is on meta"),
]


@pytest.mark.parametrize(("kw", "exc", "match"), BAD, ids=[b[2] for b in BAD])
def test_bad_variant_arguments_are_rejected(kw, exc, match):
    q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 10, 16)
    with pytest.raises(exc, match=match):
        fastattn.attention(q, k, k, **kw)


def test_bad_v_head_dim_is_rejected():
    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="v's head_dim 300 exceeds"):
        fastattn.attention(q, k, torch.randn(1, 2, 4, 300))


def test_triton_serves_other_v_head_dim(monkeypatch):
    # Named, the Triton backend runs a value head_dim of its own (it used to refuse it): its
    # kernels run (not the reference behind them), without a warning, output (..., Dv).
    from fastattn.ops import _attention_triton as tri

    q = torch.randn(1, 2, 4, 16)
    if fastattn.dispatch.unavailable_reason("triton", q.device, q.dtype) is not None:
        pytest.skip("triton cannot run here")
    launched = []
    real = tri.triton_forward
    monkeypatch.setattr(
        tri, "triton_forward", lambda *a, **kw: launched.append(1) or real(*a, **kw)
    )
    v = torch.randn(1, 2, 4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fastattn.attention(q, q, v, backend="triton")
    assert launched and out.shape == (1, 2, 4, 8)
    want = reference.attention(q.double(), q.double(), v.double(), None, 0.25, False, 0)[0]
    assert_parity(out, want, None, "out", torch.float32)


@pytest.mark.real_default
def test_torch_compile_fullgraph_variants():
    torch._dynamo.reset()
    sinks = torch.randn(4, requires_grad=True)
    slopes = torch.rand(4)

    def f(q, k, v, backend="cpu"):
        return fastattn.attention(q, k, v, causal=True, window=(5, 0), softcap=4.0, sinks=sinks,
                                  alibi_slopes=slopes, backend=backend)  # fmt: skip

    q = torch.randn(2, 4, 12, 8, requires_grad=True)
    k, v = torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 6)
    y = torch.compile(f, fullgraph=True)(q, k, v)
    g = torch.randn_like(y)
    dq, ds = torch.autograd.grad(y, (q, sinks), g)
    want = f(q, k, v, "reference")
    wq, ws = torch.autograd.grad(want, (q, sinks), g)
    for a, b in ((y, want), (dq, wq), (ds, ws)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
