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
