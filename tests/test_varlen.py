"""fastattn.varlen_attention (issue 16): packed sequences against the float64 reference run on
each sequence alone, outputs and every gradient, on the cpu, triton (interpreter) and reference
backends; gradcheck, opcheck, torch.compile without host lengths, dropout streams, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_parity, sequence_oracle

import fastattn

# (lengths of q, lengths of k) per packed batch, and why each is there.
LENGTHS = {
    "one-token": ([1], [1]),  # the smallest sequence
    "empty-middle": ([7, 0, 113], [7, 0, 113]),  # a length-0 sequence between odd ones
    "long-and-short": ([1025, 3], [1025, 3]),  # past a power of two (partial last tile), tiny
    "q-ne-k": ([1, 7, 5], [9, 7, 30]),  # decode / chunked prefill: fewer queries than keys
    "keys-only": ([0, 4], [6, 4]),  # a sequence with keys and no query
}
SMALL = ("one-token", "empty-middle", "q-ne-k", "keys-only")  # the interpreter's share
VARIANTS = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"causal": True, "window": (3, 0)},
    "softcap-sinks": {"softcap": 2.0, "sinks": True},
    "alibi-bidirectional-window": {"alibi": True, "window": (2, 2)},
}


def cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def make(lq, lk, H, Hkv, D, Dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), H, D, generator=g).to(dtype)
    k = torch.randn(sum(lk), Hkv, D, generator=g).to(dtype)
    v = torch.randn(sum(lk), Hkv, Dv, generator=g).to(dtype)
    return q, k, v


def extras(kw, H, nseq):
    g = torch.Generator().manual_seed(7)
    out = {key: val for key, val in kw.items() if key in ("causal", "window", "softcap")}
    if kw.get("sinks"):
        out["sinks"] = torch.randn(H, generator=g)
    if kw.get("alibi"):
        out["alibi_slopes"] = torch.rand(nseq, H, generator=g) * 0.5
    return out


def oracle(q, k, v, lq, lk, kw, opmath):
    """Each sequence alone (conftest.sequence_oracle), concatenated."""
    cq, ck = cu(lq).tolist(), cu(lk).tolist()
    parts = [sequence_oracle(q[cq[i] : cq[i + 1]], k[ck[i] : ck[i + 1]], v[ck[i] : ck[i + 1]],
                             kw, opmath, i) for i in range(len(lq))]  # fmt: skip
    return torch.cat(parts)


def run(fn, q, k, v, kw):
    """fn's output and the gradients of q, k, v (and sinks) for a fixed output gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    kw = dict(kw)
    if "sinks" in kw:
        kw["sinks"] = kw["sinks"].detach().clone().requires_grad_()
        leaves.append(kw["sinks"])
    out = fn(*leaves[:3], kw)
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(out.shape, generator=g).to(out.dtype)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad)]


def check(backend, name, variant, dtype, H=4, Hkv=2, D=16, Dv=16):
    lq, lk = LENGTHS[name]
    q, k, v = make(lq, lk, H, Hkv, D, Dv, dtype)
    kw = extras(VARIANTS[variant], H, len(lq))
    a, b = cu(lq), cu(lk)

    def fast(q, k, v, kw):
        return fastattn.varlen_attention(q, k, v, a, b, backend=backend, **kw)

    got = run(fast, q, k, v, kw)
    kw64 = {key: (t.double() if isinstance(t, torch.Tensor) else t) for key, t in kw.items()}
    want = run(lambda q, k, v, kw: oracle(q, k, v, lq, lk, kw, torch.float64),
               q.double(), k.double(), v.double(), kw64)  # fmt: skip
    eager = run(lambda q, k, v, kw: oracle(q, k, v, lq, lk, kw, dtype), q, k, v, kw)
    names = ("out", "dq", "dk", "dv", "dsinks")[: len(got)]
    for what, x, y, z in zip(names, got, want, eager, strict=True):
        assert_parity(x, y, z, f"{backend} {name} {variant} {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(LENGTHS))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_varlen_parity(backend, name, variant, dtype):
    check(backend, name, variant, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["causal", "softcap-sinks"])
@pytest.mark.parametrize("name", SMALL)
def test_varlen_triton_in_the_interpreter(name, variant, dtype):
    check("triton", name, variant, dtype, H=2, Hkv=1, D=16, Dv=8)  # MQA, v's own head_dim


def test_varlen_v_head_dim_and_mqa_cpu():
    check("cpu", "q-ne-k", "window", torch.float32, H=3, Hkv=1, D=40, Dv=24)  # head dim 40


def test_varlen_gradcheck_float64_cpu():
    lq, lk = [2, 0, 3], [4, 1, 3]
    q, k, v = (t.requires_grad_() for t in make(lq, lk, 2, 1, 8, 8, torch.float64))
    sinks = torch.randn(2, dtype=torch.float64, requires_grad=True)
    a, b = cu(lq), cu(lk)

    def fn(q, k, v, s):
        return fastattn.varlen_attention(q, k, v, a, b, causal=True, softcap=1.5, sinks=s,
                                         window=(2, 0), backend="cpu")  # fmt: skip

    assert torch.autograd.gradcheck(fn, (q, k, v, sinks))


def test_varlen_opcheck():
    lq, lk = [3, 5], [4, 5]
    q, k, v = make(lq, lk, 2, 1, 8, 8, torch.float32)
    args = (q, k, v, cu(lq), cu(lk), -1, -1, None, 0.35, True, 0.0, -1, -1, 0.0, None, None,
            "cpu", False)  # fmt: skip
    torch.library.opcheck(torch.ops.fastattn.varlen_attention.default, args)


def test_varlen_compiles_without_host_lengths():
    lq = [5, 1, 9]
    q, k, v = make(lq, lq, 2, 2, 8, 8, torch.float32)

    def f(q, k, v, a, b):
        return fastattn.varlen_attention(q, k, v, a, b, causal=True)

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, cu(lq), cu(lq)), f(q, k, v, cu(lq), cu(lq)))
    lq2 = [2, 3, 10]  # other lengths, same total: the same graph, no recompilation needed
    torch.testing.assert_close(compiled(q, k, v, cu(lq2), cu(lq2)), f(q, k, v, cu(lq2), cu(lq2)))


def test_varlen_dropout_streams_per_sequence():
    lq = [6, 6]
    q, k, v = make([6], [6], 2, 2, 8, 8, torch.float32)
    q, k, v = (torch.cat([t, t]) for t in (q, k, v))  # the same sequence twice
    a = cu(lq)
    torch.manual_seed(5)
    out = fastattn.varlen_attention(q, k, v, a, a, dropout_p=0.5, backend="cpu")
    assert not torch.equal(out[:6], out[6:]), "both sequences drew the same dropout mask"
    torch.manual_seed(5)
    ref = fastattn.varlen_attention(q, k, v, a, a, dropout_p=0.5, backend="reference")
    torch.testing.assert_close(out, ref)  # the same keep mask: the hash of docs/attention.md


def test_varlen_max_seqlen_is_checked():
    lq = [3, 8]
    q, k, v = make(lq, lq, 2, 2, 8, 8, torch.float32)
    out = fastattn.varlen_attention(q, k, v, cu(lq), cu(lq), 8, 8)
    assert out.shape == (11, 2, 8)
    with pytest.raises(ValueError, match=r"max_seqlen_q=7 is below the longest sequence \(8\)"):
        fastattn.varlen_attention(q, k, v, cu(lq), cu(lq), 7, 8)


Q, K, V = make([3, 4], [3, 4], 2, 1, 8, 8, torch.float32)
GOOD = cu([3, 4])
BAD = [
    (dict(q=Q[0]), ValueError, r"q must be packed \(total_tokens, heads, head_dim\), got \(2, 8\)"),
    (dict(k=K[:, :, :4]), ValueError, "must match q's head_dim"),
    (dict(q=Q.double()), TypeError, "share one floating dtype"),
    (dict(cu_q=GOOD.long()), TypeError, "cu_seqlens_q must be a 1-D int32 tensor"),
    (dict(cu_k=cu([3, 4, 0])), ValueError, r"cu_seqlens_q \(3,\) and cu_seqlens_k \(4,\)"),
    (dict(cu_q=torch.tensor([0, 5, 7], dtype=torch.int32)), None, None),  # other split: fine
    (dict(cu_q=torch.tensor([0, 4, 3], dtype=torch.int32)), ValueError, "never decrease"),
    (dict(cu_q=torch.tensor([1, 3, 7], dtype=torch.int32)), ValueError, "must start at 0"),
    (dict(cu_k=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError, "packed length 7"),
    (dict(cu_q=torch.tensor([], dtype=torch.int32), cu_k=torch.tensor([], dtype=torch.int32)),
     ValueError, "is empty"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "exc", "match"), BAD)
def test_varlen_bad_input_is_refused(change, exc, match):
    args = {"q": Q, "k": K, "v": V, "cu_q": GOOD, "cu_k": GOOD, **change}
    call = lambda: fastattn.varlen_attention(  # noqa: E731
        args["q"], args["k"], args["v"], args["cu_q"], args["cu_k"], backend="cpu"
    )
    if exc is None:
        assert call().shape == (7, 2, 8)
        return
    with pytest.raises(exc, match=match):
        call()


def test_varlen_one_long_sequence_among_short_ones():
    # One 8192-token sequence among short and empty ones (forward, causal): the long one runs
    # split over many tiles while the others are a tile each.
    lq = [3, 8192, 0, 1, 7]
    q, k, v = make(lq, lq, 1, 1, 16, 16, torch.float32)
    out = fastattn.varlen_attention(q, k, v, cu(lq), cu(lq), causal=True, backend="cpu")
    want = oracle(q.double(), k.double(), v.double(), lq, lq, {"causal": True}, torch.float64)
    eager = oracle(q, k, v, lq, lq, {"causal": True}, torch.float32)
    assert_parity(out, want, eager, "long among short")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"scale": torch.tensor(0.5)}, "scale must be a Python number, got Tensor"),
        ({"dropout_p": "0.1"}, "dropout_p must be a Python number, got str"),
        ({"softcap": True}, "softcap must be a Python number, got bool"),
    ],
)
def test_varlen_and_paged_take_numbers_only(kw, match):
    # A tensor or a string where a float goes is refused by name, not converted (both ops).
    with pytest.raises(TypeError, match=match):
        fastattn.varlen_attention(Q, K, V, GOOD, GOOD, **kw)
    if "dropout_p" not in kw:
        q = torch.randn(1, 1, 2, 8)
        kc = torch.randn(2, 16, 1, 8)
        table = torch.zeros(1, 1, dtype=torch.int32)
        lens = torch.ones(1, dtype=torch.int32)
        with pytest.raises(TypeError, match=match.replace("varlen", "paged")):
            fastattn.paged_attention(q, kc, kc, table, lens, **kw)
