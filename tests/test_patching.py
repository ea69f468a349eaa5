"""fastattn.patch / unpatch: in-place module swaps that keep parameters, modes and numbers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_parity, count_calls

import fastattn
from fastattn.ops import sdpa


class Block(torch.nn.Module):
    """A pre-norm Transformer block built from the torch modules patch() knows."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.rms = torch.nn.RMSNorm(d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(),
                                       torch.nn.Linear(2 * d, d))  # fmt: skip
        self.gate = torch.nn.Softmax(dim=-1)

    def forward(self, x, pad):
        h = self.ln(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return x + self.mlp(self.rms(x)) * self.gate(x)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])

    def forward(self, x, pad):
        for block in self.blocks:
            x = block(x, pad)
        return x


def model_and_inputs():
    torch.manual_seed(0)
    model = Model()
    with torch.no_grad():  # non-default norm weights, as after training
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm | torch.nn.RMSNorm):
                m.weight.normal_()
    x = torch.randn(2, 9, 32)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    return model, x, pad


@pytest.mark.parametrize("training", [False, True])
def test_patch_keeps_numbers_parameters_and_mode(training):
    model, x, pad = model_and_inputs()
    model.train(training)
    for m in model.modules():
        if isinstance(m, torch.nn.MultiheadAttention):
            m.dropout = 0.0  # compare deterministically
    ref = copy.deepcopy(model).double()
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    report = fastattn.patch(model)
    assert len(report.replaced) == 8, str(report)
    kinds = {type(m) for m in model.modules()}
    assert {fastattn.nn.LayerNorm, fastattn.nn.RMSNorm, fastattn.nn.Softmax,
            fastattn.nn.MultiheadAttention} <= kinds  # fmt: skip
    assert torch.nn.LayerNorm not in kinds and torch.nn.MultiheadAttention not in kinds
    assert all(p is params[n] for n, p in model.named_parameters())  # shared, not copied
    assert list(model.state_dict()) == keys
    assert all(m.training == training for m in model.modules())
    y = model(x, pad)
    want = ref(x.double(), pad)
    assert_parity(y, want)
    g = torch.randn_like(y)
    mine = torch.autograd.grad(y, list(model.parameters()), g)
    theirs = torch.autograd.grad(want, list(ref.parameters()), g.double())
    for a, b in zip(mine, theirs, strict=True):
        assert_parity(a, b)


def test_patch_twice_is_harmless_and_unpatch_restores():
    model, x, pad = model_and_inputs()
    want = model(x, pad)
    fastattn.patch(model)
    second = fastattn.patch(model)
    assert second.replaced == [] and len(second.left) == 8
    assert "already a fastattn module" in str(second)
    fastattn.unpatch(model)
    assert not any(type(m).__module__.startswith("fastattn") for m in model.modules())
    assert torch.equal(model(x, pad), want)


def test_patch_subset_reports_what_it_left():
    model, _, _ = model_and_inputs()
    report = fastattn.patch(model, ops=("layer_norm",))
    assert [n for n, _, _ in report.replaced] == ["blocks.0.ln", "blocks.1.ln"]
    assert ("blocks.0.attn", "MultiheadAttention", "op 'attention' not in ops") in report.left
    with pytest.raises(ValueError, match="unknown ops"):
        fastattn.patch(model, ops=("conv",))


class NanoAttention(torch.nn.Module):
    """nanoGPT-style causal self-attention: calls F.scaled_dot_product_attention itself."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, S, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class NanoGPT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([NanoAttention(), NanoAttention()])

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def test_patch_says_why_a_model_calling_sdpa_itself_is_left():
    model = NanoGPT()
    report = fastattn.patch(model)
    assert report.replaced == []
    left = {n: why for n, _, why in report.left}
    assert set(left) == {"blocks.0", "blocks.1"}, str(report)
    assert "scaled_dot_product_attention itself" in left["blocks.0"]
    assert "fastattn.sdpa_scope()" in str(report)


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts the calls that reach fastattn.scaled_dot_product_attention."""
    return count_calls(monkeypatch, sdpa, "scaled_dot_product_attention")


def test_sdpa_scope_routes_the_call_inside_the_block_only(sdpa_calls):
    torch.manual_seed(0)
    model = NanoGPT().eval()
    ref = copy.deepcopy(model).double()
    x = torch.randn(2, 11, 32)
    torch_sdpa = torch.nn.functional.scaled_dot_product_attention
    outside = model(x)
    assert sdpa_calls == []
    with fastattn.sdpa_scope():
        assert torch.nn.functional.scaled_dot_product_attention is not torch_sdpa
        y = model(x)
        assert len(sdpa_calls) == 2  # one per block
        with fastattn.sdpa_scope():  # nested: still routed, and still after the inner block
            model(x)
        model(x)
        assert len(sdpa_calls) == 6
    assert torch.nn.functional.scaled_dot_product_attention is torch_sdpa
    model(x)
    assert len(sdpa_calls) == 6
    want = ref(x.double())
    assert_parity(y, want, eager=outside)
    with pytest.raises(RuntimeError, match="boom"), fastattn.sdpa_scope():
        raise RuntimeError("boom")
    assert torch.nn.functional.scaled_dot_product_attention is torch_sdpa


def test_sdpa_scope_overlapping_threads_restore_torch():
    import threading

    torch_sdpa = torch.nn.functional.scaled_dot_product_attention
    entered, release = threading.Barrier(2), threading.Event()
    seen = []

    def worker(first):
        with fastattn.sdpa_scope():
            entered.wait()
            if first:  # leaves while the other thread is still inside
                return
            release.wait()
            seen.append(torch.nn.functional.scaled_dot_product_attention is not torch_sdpa)

    a = threading.Thread(target=worker, args=(True,))
    b = threading.Thread(target=worker, args=(False,))
    a.start()
    b.start()
    a.join()
    release.set()
    b.join()
    assert seen == [True]  # the second scope was still routed after the first one closed
    assert torch.nn.functional.scaled_dot_product_attention is torch_sdpa
