"""fastattn.nn modules are exact drop-ins for their torch.nn counterparts."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import CPU_BACKENDS, assert_parity

import fastattn


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softmax_module_matches_torch(backend, dim):
    x = torch.randn(4, 5, 6)
    ours, theirs = fastattn.nn.Softmax(dim, backend=backend), torch.nn.Softmax(dim)
    assert isinstance(ours, torch.nn.Softmax)
    assert repr(ours) == repr(theirs)
    assert ours.state_dict() == theirs.state_dict() == {}
    assert_parity(ours(x), torch.softmax(x.double(), dim))


@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
def test_softmax_module_implicit_dim_is_torchs(ndim):
    # torch.nn.Softmax(dim=None) picks dim 0 for 0/1/3-D input, else 1, with a warning.
    x = torch.randn(*[3] * ndim)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        want = torch.nn.Softmax()(x)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        got = fastattn.nn.Softmax()(x)
    assert_parity(got, want.double())


def test_softmax_module_extras_and_from_torch():
    x = torch.randn(2, 8, 8)
    mask = torch.rand(8) < 0.7
    mod = fastattn.nn.Softmax(-1, scale=0.5, causal=True, log=True)
    want = fastattn.softmax(x.double(), mask=mask, scale=0.5, causal=True, log=True)
    assert_parity(mod(x, mask), want)
    conv = fastattn.nn.Softmax.from_torch(torch.nn.Softmax(dim=1))
    assert conv.dim == 1 and isinstance(conv, fastattn.nn.Softmax)


def test_softmax_module_copies_and_pickles():
    mod = fastattn.nn.Softmax(-1, scale=2.0)
    for clone in (copy.deepcopy(mod), pickle.loads(pickle.dumps(mod))):
        assert clone.dim == -1 and clone.scale == 2.0
        x = torch.randn(3, 4)
        assert torch.equal(clone(x), mod(x))


# ------------------------------------------------------------------------------ norms
LN_ARGS = [
    dict(normalized_shape=32),
    dict(normalized_shape=(4, 8), eps=1e-6),
    dict(normalized_shape=[32], elementwise_affine=False),
    dict(normalized_shape=32, bias=False),
    dict(normalized_shape=32, dtype=torch.bfloat16),
]
RMS_ARGS = [
    dict(normalized_shape=32),
    dict(normalized_shape=(4, 8), eps=1e-6),
    dict(normalized_shape=32, elementwise_affine=False),
    dict(normalized_shape=32, dtype=torch.bfloat16),
]
NORMS = [(fastattn.nn.LayerNorm, torch.nn.LayerNorm, a) for a in LN_ARGS] + [
    (fastattn.nn.RMSNorm, torch.nn.RMSNorm, a) for a in RMS_ARGS
]


def _trained(mod: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # non-default weights, as after training
        for p in mod.parameters():
            p.copy_(torch.randn_like(p))
    return mod


@pytest.mark.parametrize(("ours", "theirs", "kwargs"), NORMS, ids=str)
def test_norm_modules_are_drop_ins(ours, theirs, kwargs):
    torch.manual_seed(1)
    a = ours(**kwargs)
    torch.manual_seed(1)
    b = theirs(**kwargs)
    assert isinstance(a, theirs) and repr(a) == repr(b)
    assert list(a.state_dict()) == list(b.state_dict())
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb) and va.dtype == vb.dtype  # same init
    _trained(b)
    a.load_state_dict(b.state_dict(), strict=True)  # torch -> fastattn
    b.load_state_dict(a.state_dict(), strict=True)  # fastattn -> torch
    shape = (3, *(a.normalized_shape))
    x = torch.randn(shape, dtype=kwargs.get("dtype", torch.float32))
    ref = theirs(**{**kwargs, "dtype": torch.float64})
    ref.load_state_dict({k: v.double() for k, v in b.state_dict().items()})
    eager = b(x) if x.dtype != torch.float32 else None
    assert_parity(a(x), ref(x.double()), eager)


@pytest.mark.parametrize("cls", [torch.nn.LayerNorm, torch.nn.RMSNorm])
def test_from_torch_shares_trained_parameters(cls):
    src = _trained(cls(16, eps=1e-6))
    mod = fastattn.nn.from_torch(src)
    assert type(mod).__name__ == cls.__name__ and mod.weight is src.weight
    x = torch.randn(5, 16)
    assert_parity(mod(x), _reference_norm(src, x))
    fused = fastattn.nn.from_torch(src, fused_add=True)
    r = torch.randn(5, 16)
    y, h = fused(x, r)
    assert_parity(h, (x + r).double())
    assert_parity(y, _reference_norm(src, x + r))
    with pytest.raises(TypeError, match="no fastattn equivalent"):
        fastattn.nn.from_torch(torch.nn.Linear(2, 2))


def _reference_norm(src: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(src).double()
    with torch.no_grad():
        return ref(x.double())


# ----------------------------------------------------------------------- MultiheadAttention
# Constructor combinations: plain; no bias + learned bias_k/v + a zero key; kdim/vdim (separate
# projection weights); batch_first.
MHA_KWARGS = [
    {},
    {"bias": False, "add_bias_kv": True, "add_zero_attn": True},
    {"kdim": 24, "vdim": 12},
    {"batch_first": True, "add_bias_kv": True},
]
# Masks as torch takes them: bool True = masked out, or additive float.
MHA_MASKS = ["none", "key_padding", "float_attn_mask", "bool_3d_and_padding", "causal_hint"]


def _mha_inputs(kw, mask_kind, N=3, L=7, S=9, E=32, H=4):
    bf = kw.get("batch_first", False)
    q = torch.randn((N, L, E) if bf else (L, N, E))
    k = torch.randn((N, S, kw.get("kdim", E)) if bf else (S, N, kw.get("kdim", E)))
    v = torch.randn((N, S, kw.get("vdim", E)) if bf else (S, N, kw.get("vdim", E)))
    args: dict = {}
    if mask_kind in ("key_padding", "bool_3d_and_padding"):
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[0, -3:] = True
        args["key_padding_mask"] = kpm
    if mask_kind == "float_attn_mask":
        args["attn_mask"] = torch.randn(L, S)
    if mask_kind == "bool_3d_and_padding":
        args["attn_mask"] = torch.rand(N * H, L, S) < 0.2
    if mask_kind == "causal_hint":
        args["attn_mask"] = torch.ones(L, S, dtype=torch.bool).triu(1)
        args["is_causal"] = True
    return q, k, v, args


@pytest.mark.parametrize("mask_kind", MHA_MASKS)
@pytest.mark.parametrize("kw", MHA_KWARGS, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_multihead_attention_is_a_drop_in(backend, kw, mask_kind):
    theirs = torch.nn.MultiheadAttention(32, 4, **kw)
    ours = fastattn.nn.MultiheadAttention(32, 4, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)  # and back, below
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.backend = backend
    ref = copy.deepcopy(theirs).double()
    q, k, v, args = _mha_inputs(kw, mask_kind)
    out, w = ours(q, k, v, need_weights=False, **args)
    assert w is None
    dargs = {n: (t.double() if t.is_floating_point() else t) for n, t in args.items()
             if isinstance(t, torch.Tensor)}  # fmt: skip
    dargs.update({n: t for n, t in args.items() if not isinstance(t, torch.Tensor)})
    want, _ = ref(q.double(), k.double(), v.double(), need_weights=False, **dargs)
    assert_parity(out, want)
    g = torch.randn_like(out)
    mine = torch.autograd.grad(out, list(ours.parameters()), g)
    theirs_g = torch.autograd.grad(want, list(ref.parameters()), g.double())
    for a, b in zip(mine, theirs_g, strict=True):
        assert_parity(a, b)
    # need_weights=True: torch's own path, weights included.
    out_w, weights = ours(q, k, v, need_weights=True, **args)
    want_w, want_weights = theirs(q, k, v, need_weights=True, **args)
    assert torch.equal(out_w, want_w) and torch.equal(weights, want_weights)


def test_multihead_attention_unbatched_and_from_torch():
    theirs = torch.nn.MultiheadAttention(16, 2)
    with torch.no_grad():  # trained, non-default weights
        theirs.out_proj.bias.normal_()
    ours = fastattn.nn.from_torch(theirs)
    assert isinstance(ours, fastattn.nn.MultiheadAttention)
    assert ours.in_proj_weight is theirs.in_proj_weight
    x = torch.randn(5, 16)  # unbatched (L, E)
    got, _ = ours(x, x, x, need_weights=False)
    want, _ = theirs(x, x, x, need_weights=False)
    assert got.shape == (5, 16)
    assert_parity(got, want.double(), eager=want)


def test_multihead_attention_inside_transformer_layers():
    torch.manual_seed(0)
    enc = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    dec = torch.nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    x, mem = torch.randn(2, 10, 32), torch.randn(2, 6, 32)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(10)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 7:] = True
    want_enc = enc(x, src_key_padding_mask=pad)
    want_dec = dec(x, mem, tgt_mask=causal, tgt_is_causal=True)
    enc.self_attn = fastattn.nn.from_torch(enc.self_attn)
    dec.self_attn = fastattn.nn.from_torch(dec.self_attn)
    dec.multihead_attn = fastattn.nn.from_torch(dec.multihead_attn)
    assert_parity(enc(x, src_key_padding_mask=pad), want_enc.double(), eager=want_enc)
    assert_parity(dec(x, mem, tgt_mask=causal, tgt_is_causal=True), want_dec.double(),
                  eager=want_dec)  # fmt: skip


# Inputs torch's module refuses or accepts with need_weights=False, beside the mask grid above:
# a 1-D attn_mask, (1, S) and (L, 1) masks, an integer mask, a 3-D mask of the wrong batch, a
# padding mask of the wrong length, a float padding mask with a bool attn_mask (torch warns and
# accepts), unbatched with a 3-D mask, key and value of different lengths.
N_, L_, S_, E_, H_ = 2, 5, 6, 8, 2
MHA_EDGE = [
    ("1-D attn_mask", {"attn_mask": torch.zeros(S_, dtype=torch.bool)}),
    ("(1, S) attn_mask", {"attn_mask": torch.zeros(1, S_, dtype=torch.bool)}),
    ("(L, 1) attn_mask", {"attn_mask": torch.zeros(L_, 1, dtype=torch.bool)}),
    ("integer attn_mask", {"attn_mask": torch.zeros(L_, S_, dtype=torch.int64)}),
    ("3-D attn_mask of N not N*H", {"attn_mask": torch.zeros(N_, L_, S_)}),
    ("4-D attn_mask", {"attn_mask": torch.zeros(N_, H_, L_, S_)}),
    ("padding mask of S+1", {"key_padding_mask": torch.zeros(N_, S_ + 1, dtype=torch.bool)}),
    ("float padding, bool attn", {"key_padding_mask": torch.zeros(N_, S_),
                                   "attn_mask": torch.zeros(L_, S_, dtype=torch.bool)}),
    ("integer padding mask", {"key_padding_mask": torch.zeros(N_, S_, dtype=torch.int32)}),
    ("value of other length", {"value": torch.randn(N_, S_ + 1, E_)}),
    ("query of other width", {"query": torch.randn(N_, L_, E_ + 2)}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "extra"), MHA_EDGE, ids=[m[0] for m in MHA_EDGE])
def test_multihead_attention_accepts_and_refuses_as_torch(name, extra):
    theirs = torch.nn.MultiheadAttention(E_, H_, batch_first=True)
    ours = fastattn.nn.from_torch(theirs)
    args = {"query": torch.randn(N_, L_, E_), "key": torch.randn(N_, S_, E_),
            "value": torch.randn(N_, S_, E_), **extra}  # fmt: skip
    try:
        want = theirs(**args, need_weights=False)[0]
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        with pytest.raises(type(e)):
            ours(**args, need_weights=False)
        return
    got = ours(**args, need_weights=False)[0]
    ref = copy.deepcopy(theirs).double()
    dargs = {n: t.double() if t.is_floating_point() else t for n, t in args.items()}
    assert_parity(got, ref(**dargs, need_weights=False)[0], eager=want)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.float64])
def test_multihead_attention_in_proj_bias_of_another_dtype(bias_dtype, batched):
    """torch's module takes an in_proj_bias of another dtype than the query where its own
    in-projection does (type promotion on its transposed layout); the same calls must work."""
    theirs = torch.nn.MultiheadAttention(E_, H_, batch_first=True)
    theirs.in_proj_bias.data = theirs.in_proj_bias.data.to(bias_dtype)
    ours = fastattn.nn.from_torch(theirs)
    x = torch.randn(N_, L_, E_) if batched else torch.randn(L_, E_)
    try:
        want = theirs(x, x, x, need_weights=False)[0]
    except RuntimeError as e:
        with pytest.raises(type(e)):
            ours(x, x, x, need_weights=False)
        return
    got = ours(x, x, x, need_weights=False)[0]
    assert got.dtype == want.dtype
    assert_parity(got, want.double(), eager=want)


def test_multihead_attention_requires_mask_with_causal_hint():
    m = fastattn.nn.MultiheadAttention(8, 2)
    x = torch.randn(3, 1, 8)
    with pytest.raises(RuntimeError, match="attn_mask"):
        m(x, x, x, need_weights=False, is_causal=True)
