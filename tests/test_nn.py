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
