"""``fastattn.scaled_dot_product_attention`` against torch's own, on torch's math backend: what
torch accepts gives torch's result (outputs and every gradient), what torch refuses is refused
with torch's exception type. Grids generated over torch's broadcasting rules and mask shapes,
every sample of torch's OpInfo generator, ``torch.nn.attention.bias`` objects, tensor
subclasses, argument names."""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import accepts_as_the_full_checks, assert_parity, refuses_as_the_full_checks
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right, causal_upper_left

import fastattn
from fastattn.ops import sdpa

L, S, E = 5, 7, 8  # Sq != Sk, so that a transposed or misaligned mask cannot pass


def _torch(*args, **kw):
    with sdpa_kernel(SDPBackend.MATH):  # the yardstick: torch's reference semantics
        return F.scaled_dot_product_attention(*args, **kw)


def _outcome(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - the exception's type is the result compared
        return e


def _compare(qkv, kw, dtype=torch.float64, backend="cpu"):
    """fastattn and torch on the same inputs: the same exception type, or the same output and
    gradients (float64: to rounding; lower precisions by the FlashAttention rule)."""
    q, k, v = (t.to(dtype).requires_grad_() for t in qkv)
    want = _outcome(_torch, q, k, v, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTATTN_BACKEND", backend)
        got = _outcome(fastattn.scaled_dot_product_attention, q, k, v, **kw)
    if isinstance(want, Exception):
        assert isinstance(got, type(want)), f"torch raised {want!r}, fastattn gave {got!r}"
        return
    assert not isinstance(got, Exception), f"torch accepted it, fastattn raised {got!r}"
    assert got.shape == want.shape and got.dtype == want.dtype
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw64 = {n: (m.double() if isinstance(m, torch.Tensor) and m.is_floating_point() else m)
            for n, m in kw.items()}  # fmt: skip
    want64 = _torch(q64, k64, v64, **kw64)
    assert_parity(got, want64, want, what="out")
    if got.numel() == 0:
        return
    g = torch.randn_like(got)
    mine = torch.autograd.grad(got, (q, k, v), g)
    ref = torch.autograd.grad(want64, (q64, k64, v64), g.double())
    eager = torch.autograd.grad(want, (q, k, v), g)
    # A gradient of saturated scores (OpInfo's inputs reach |9|: softmax rows one-hot) cancels
    # to ~0 from terms of size |dO| |v| |k| scale: its fp32 rounding is relative to those terms.
    terms = g.abs().max() * v.abs().max() * max(q.abs().max(), k.abs().max()) * E**-0.5
    for name, a, b, c in zip("qkv", mine, ref, eager, strict=True):
        assert_parity(a, b, c, what=f"d{name}", ref_scale=float(terms))


# Leading dims (those before seqlen, head_dim) of q and of k/v: none (2-D inputs), one (3-D:
# torch aligns it with the heads of a 4-D partner), a single broadcast 1, batch x heads with a
# 1 on either side, and a 5-D stack. Every pair is tried; the pairs that do not broadcast must
# be refused as torch refuses them.
LEADS = [(), (3,), (1,), (2, 3), (2, 1), (1, 3), (4, 3), (2, 2, 3)]


def _masks(bs: tuple[int, ...]) -> list[torch.Tensor | None]:
    """No mask, a (L, S) bool, a 1-D key mask, a full-rank float mask, the full rank with each
    leading dim set to 1 in turn, and one dim too many (refused)."""
    full = (*bs, L, S)
    masks: list[torch.Tensor | None] = [None, torch.rand(L, S) > 0.3, torch.randn(S)]
    masks.append(torch.randn(full))
    for i in range(len(bs)):
        masks.append(torch.rand(*full[:i], 1, *full[i + 1 :]) > 0.3)
    masks.append(torch.rand(2, *full) > 0.3)
    return masks


@pytest.mark.parametrize("kv_lead", LEADS, ids=str)
@pytest.mark.parametrize("q_lead", LEADS, ids=str)
def test_broadcasting_matches_torch(q_lead, kv_lead):
    qkv = (torch.randn(*q_lead, L, E), torch.randn(*kv_lead, S, E), torch.randn(*kv_lead, S, E))
    try:
        bs = tuple(torch.broadcast_shapes(q_lead, kv_lead))
    except RuntimeError:
        _compare(qkv, {})  # refused, as torch
        return
    for mask in _masks(bs):
        _compare(qkv, {"attn_mask": mask})
    _compare(qkv, {"is_causal": True})


# (q, k, v) shapes with enable_gqa: grouped heads, one kv head, k and v with different head
# counts (each repeated by its own factor), 3-D (the heads are dim 0), broadcast batch, heads
# that do not divide (refused), 2-D (no heads dim: torch raises IndexError).
GQA = [
    ((2, 6, L, E), (2, 2, S, E), (2, 2, S, E)),
    ((2, 4, L, E), (2, 1, S, E), (2, 1, S, E)),
    ((2, 4, L, E), (2, 2, S, E), (2, 1, S, E)),
    ((4, L, E), (2, S, E), (2, S, E)),
    ((2, 4, L, E), (1, 2, S, E), (1, 2, S, E)),
    ((2, 6, L, E), (2, 4, S, E), (2, 4, S, E)),
    ((L, E), (S, E), (S, E)),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shapes", GQA, ids=str)
def test_enable_gqa_matches_torch(shapes, causal):
    _compare(tuple(torch.randn(s) for s in shapes), {"enable_gqa": True, "is_causal": causal})


# k and v with different leading dims (broadcast separately), and a value head_dim other than
# the query's (the eager path): outputs (..., L, Ev).
@pytest.mark.parametrize(
    "shapes",
    [
        ((2, 3, L, E), (2, 3, S, E), (1, 3, S, E)),
        ((2, 3, L, E), (1, 3, S, E), (2, 1, S, E)),
        ((2, 3, L, E), (2, 3, S, E), (2, 3, S, 4)),
    ],
    ids=str,
)
def test_key_and_value_broadcast_separately(shapes):
    _compare(tuple(torch.randn(s) for s in shapes), {})


# 3-D q against 4-D k; one query head against four; MQA by broadcast at head dim 40.
LOW_PRECISION_SHAPES = [
    ((3, L, E), (2, 3, S, E)),
    ((2, 1, L, E), (2, 4, S, E)),
    ((2, 4, L, 40), (2, 1, S, 40)),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shapes", LOW_PRECISION_SHAPES, ids=str)
def test_broadcasting_in_low_precision(shapes, dtype, backend):
    qs, ks = shapes
    mask = torch.rand(L, S) > 0.3
    _compare((torch.randn(qs), torch.randn(ks), torch.randn(ks)), {"attn_mask": mask}, dtype,
             backend)  # fmt: skip


# ------------------------------------------------------------------- torch's own samples
def _opinfo_samples(dtype):
    from torch.testing._internal.common_methods_invocations import op_db

    (op,) = [o for o in op_db if o.name == "nn.functional.scaled_dot_product_attention"]
    return list(op.sample_inputs("cpu", dtype, requires_grad=False))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_opinfo_sample_matches_torch(dtype):
    samples = _opinfo_samples(dtype)
    assert len(samples) >= 10
    for s in samples:
        k, v = s.args[:2]
        kw = dict(s.kwargs)
        p = kw.pop("dropout_p", 0.0)
        _compare((s.input, k, v), kw, dtype)
        if p:  # torch's dropout draws other numbers: compare shape and dtype, and finite grads
            q = s.input.clone().requires_grad_()
            got = fastattn.scaled_dot_product_attention(q, k, v, dropout_p=p, **kw)
            want = F.scaled_dot_product_attention(s.input, k, v, dropout_p=p, **kw)
            assert got.shape == want.shape and got.dtype == want.dtype
            (gq,) = torch.autograd.grad(got.sum(), q)
            assert torch.isfinite(gq).all()


# ---------------------------------------------------------------------------- refusals
def _t(*s, dt=torch.float32):
    return torch.randn(*s, dtype=dt)


REFUSED = [
    # (name, (q, k, v), kwargs): each refused by torch; fastattn must raise the same type
    ("1-D inputs", (_t(E), _t(E), _t(E)), {}),
    ("mixed dtypes", (_t(2, 3, L, E), _t(2, 3, S, E, dt=torch.float64), _t(2, 3, S, E)), {}),
    ("integer inputs", tuple(torch.ones(2, 3, n, E, dtype=torch.int64) for n in (L, S, S)), {}),
    ("mask and is_causal", (_t(2, 3, L, E), _t(2, 3, S, E), _t(2, 3, S, E)),
     {"attn_mask": torch.ones(L, S, dtype=torch.bool), "is_causal": True}),
    ("mask of another S", (_t(2, 3, L, E), _t(2, 3, S, E), _t(2, 3, S, E)),
     {"attn_mask": torch.ones(L, S + 1, dtype=torch.bool)}),
    ("mask widening the batch", (_t(1, 3, L, E), _t(1, 3, S, E), _t(1, 3, S, E)),
     {"attn_mask": torch.ones(2, 3, L, S, dtype=torch.bool)}),
    ("integer mask", (_t(2, 3, L, E), _t(2, 3, S, E), _t(2, 3, S, E)),
     {"attn_mask": torch.ones(L, S, dtype=torch.int64)}),
    ("fp16 mask on fp32", (_t(2, 3, L, E), _t(2, 3, S, E), _t(2, 3, S, E)),
     {"attn_mask": torch.zeros(L, S, dtype=torch.float16)}),
    ("head_dim of k", (_t(2, 3, L, E), _t(2, 3, S, 4), _t(2, 3, S, 4)), {}),
    ("seqlen of v", (_t(2, 3, L, E), _t(2, 3, S, E), _t(2, 3, S + 1, E)), {}),
    ("batch", (_t(2, L, E), _t(3, S, E), _t(3, S, E)), {}),
    ("heads without enable_gqa", (_t(2, 4, L, E), _t(2, 2, S, E), _t(2, 2, S, E)), {}),
    ("dropout_p > 1", (_t(2, 3, L, E), _t(2, 3, S, E), _t(2, 3, S, E)), {"dropout_p": 2.0}),
    ("bias of other lengths", (_t(2, 3, L, E), _t(2, 3, S, E), _t(2, 3, S, E)),
     {"attn_mask": causal_lower_right(L - 1, S)}),
    ("bias with is_causal", (_t(2, 3, L, E), _t(2, 3, S, E), _t(2, 3, S, E)),
     {"attn_mask": causal_upper_left(L, S), "is_causal": True}),
    ("a list", ([1.0], _t(2, S, E), _t(2, S, E)), {}),
    ("a list mask", (_t(2, 3, L, E), _t(2, 3, S, E), _t(2, 3, S, E)), {"attn_mask": [1.0]}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "qkv", "kw"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_as_torch_refuses(monkeypatch, name, qkv, kw):
    want = _outcome(_torch, *qkv, **kw)
    assert isinstance(want, Exception), f"torch accepts {name}: the case is wrong"
    got = _outcome(fastattn.scaled_dot_product_attention, *qkv, **kw)
    assert isinstance(got, type(want)), f"torch raised {want!r}, fastattn gave {got!r}"
    assert str(got).startswith("fastattn.scaled_dot_product_attention:")
    refuses_as_the_full_checks(monkeypatch, sdpa, lambda: fastattn.scaled_dot_product_attention(
        *qkv, **kw), type(want))  # fmt: skip


def test_fast_path_gives_the_full_paths_bits(monkeypatch):
    q, k, v = _t(2, 3, L, E), _t(2, 3, S, E), _t(2, 3, S, E)
    calls = [
        lambda: fastattn.scaled_dot_product_attention(q, k, v),
        lambda: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3),
    ]
    accepts_as_the_full_checks(monkeypatch, sdpa, calls)


# ------------------------------------------------------- causal biases and tensor subclasses
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lengths", [(L, S), (S, S), (S, L)], ids=str)  # Sq <, =, > Sk
@pytest.mark.parametrize("make", [causal_upper_left, causal_lower_right])
def test_causal_bias_objects_match_torch(monkeypatch, make, lengths, dtype):
    """Served by the causal kernel in the bias's alignment, never materialised. The yardstick is
    torch's math on the materialised bool mask (lower right with Sq > Sk leaves the first rows
    no key: zeros there, where torch's own bias dispatch warns and gives NaN; docs/api.md)."""
    Sq, Sk = lengths
    bias = make(Sq, Sk)
    dense = bias._materialize()  # bool, True = take part  # noqa: SLF001 - torch's own helper

    def never(*_a, **_k):
        raise AssertionError("fastattn materialised the causal bias")

    monkeypatch.setattr(CausalBias, "_materialize", never)
    qkv = (torch.randn(2, 3, Sq, E), torch.randn(2, 3, Sk, E), torch.randn(2, 3, Sk, E))
    q, k, v = (t.to(dtype).requires_grad_() for t in qkv)
    got = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want64 = _torch(q64, k64, v64, attn_mask=dense)
    want = _torch(q, k, v, attn_mask=dense)
    assert_parity(got, want64, want, what="out")
    g = torch.randn_like(got)
    mine = torch.autograd.grad(got, (q, k, v), g)
    ref = torch.autograd.grad(want64, (q64, k64, v64), g.double())
    eager = torch.autograd.grad(want, (q, k, v), g)
    for name, a, b, c in zip("qkv", mine, ref, eager, strict=True):
        assert_parity(a, b, c, what=f"d{name}")


class _Odd(torch.Tensor):
    """A tensor subclass with its own __torch_function__ (like CausalBias): its storage means
    something only to its own code."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def _odd_mask(shape):
    return torch.zeros(shape).as_subclass(_Odd)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: fastattn.scaled_dot_product_attention(
            *(_t(1, 2, n, E) for n in (L, S, S)), attn_mask=m
        ),  # fmt: skip
        lambda m: fastattn.attention(*(_t(1, 2, n, E) for n in (L, S, S)), attn_mask=m),
        lambda m: fastattn.softmax(_t(1, 2, L, S), mask=m),
    ],
    ids=["sdpa", "attention", "softmax"],
)
def test_unknown_tensor_subclass_mask_is_refused(call):
    with pytest.raises(TypeError, match="_Odd, a tensor subclass"):
        call(_odd_mask((L, S)))


def test_causal_bias_in_attention_is_refused_with_a_hint():
    with pytest.raises(TypeError, match="pass causal="):
        fastattn.attention(*(_t(1, 2, n, E) for n in (L, S, S)), attn_mask=causal_upper_left(L, S))


# -------------------------------------------------------------- what else torch accepts
def test_dropout_one_gives_zeros_and_zero_grads():
    q = _t(2, 3, L, E).requires_grad_()
    out = fastattn.scaled_dot_product_attention(q, _t(2, 3, S, E), _t(2, 3, S, E), dropout_p=1.0)
    assert torch.equal(out, torch.zeros_like(out))
    (gq,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(gq, torch.zeros_like(gq))


def test_scale_may_be_a_one_element_tensor():
    q, k, v = _t(2, 3, L, E), _t(2, 3, S, E), _t(2, 3, S, E)
    got = fastattn.scaled_dot_product_attention(q, k, v, scale=torch.tensor(0.3))
    assert_parity(
        got, _torch(q.double(), k.double(), v.double(), scale=0.3), _torch(q, k, v, scale=0.3)
    )


def test_head_dim_past_the_kernels_runs_eager():
    q, k, v = _t(1, 2, L, 300), _t(1, 2, S, 300), _t(1, 2, S, 300)  # 300 > 256, the kernels' max
    got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = _torch(q.double(), k.double(), v.double(), is_causal=True)
    assert_parity(got, want, _torch(q, k, v, is_causal=True))


def test_keyword_names_are_torchs():
    ours = list(inspect.signature(fastattn.scaled_dot_product_attention).parameters)
    torch_names = [
        "query",
        "key",
        "value",
        "attn_mask",
        "dropout_p",
        "is_causal",
        "scale",
        "enable_gqa",
    ]  # fmt: skip  (torch's documented signature; a builtin)
    assert ours == torch_names
    q, k, v = _t(2, 3, L, E), _t(2, 3, S, E), _t(2, 3, S, E)
    kw = dict(query=q, key=k, value=v, attn_mask=None, dropout_p=0.0, is_causal=True, scale=0.5,
              enable_gqa=False)  # fmt: skip
    kw64 = {n: t.double() if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
    assert_parity(fastattn.scaled_dot_product_attention(**kw), _torch(**kw64), _torch(**kw))


def test_compiles_without_graph_breaks_when_broadcasting():
    q, k, v = _t(3, L, E), _t(2, 3, S, E), _t(2, 3, S, E)  # 3-D query against 4-D keys
    mask = torch.rand(L, S) > 0.3
    fn = torch.compile(fastattn.scaled_dot_product_attention, fullgraph=True)
    got = fn(q, k, v, attn_mask=mask)
    assert_parity(got, _torch(q.double(), k.double(), v.double(), attn_mask=mask),
                  _torch(q, k, v, attn_mask=mask))  # fmt: skip


def test_grid_covers_both_outcomes():
    """The broadcasting grid must exercise refusals as well as results."""
    outcomes = set()
    for a, b in itertools.product(LEADS, LEADS):
        try:
            torch.broadcast_shapes(a, b)
            outcomes.add("ok")
        except RuntimeError:
            outcomes.add("refused")
    assert outcomes == {"ok", "refused"}


# ------------------------------------------ the deviations listed in docs/api.md, as tested facts
def test_deviation_negative_dropout_is_refused():
    q, k, v = _t(2, 3, L, E), _t(2, 3, S, E), _t(2, 3, S, E)
    _torch(q, k, v, dropout_p=-0.1)  # torch's math backend takes it
    with pytest.raises(RuntimeError, match="dropout_p must be between 0 and 1"):
        fastattn.scaled_dot_product_attention(q, k, v, dropout_p=-0.1)


def test_deviation_lower_right_bias_rows_without_keys_are_zeros():
    q, k, v = _t(1, 2, S, E), _t(1, 2, L, E), _t(1, 2, L, E)  # Sq > Sk: the first rows see none
    with pytest.warns(UserWarning, match="NaN"):
        bias = causal_lower_right(S, L)
    got = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    dead = S - L  # rows 0 .. Sq - Sk - 1 see no key
    assert torch.equal(got[..., :dead, :], torch.zeros_like(got[..., :dead, :]))
    assert torch.isfinite(got).all()
