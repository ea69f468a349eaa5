"""The reference Transformer: eager and fastattn kernels agree on logits, gradients, a training
run and generation, and load each other's weights."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import assert_parity

from fastattn.models import KVCache, Transformer, TransformerConfig, tiny_corpus

# MHA + RMSNorm + rotary; GQA + LayerNorm + learned positions; a sliding window of 8 (shorter
# than the sequences) on layer 0 only, with GQA; that window on every layer with logit
# softcapping (Gemma 2).
_BASE = TransformerConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, max_seq_len=128)
_GQA = replace(_BASE, n_kv_heads=2)
CONFIGS = [
    _BASE,
    replace(_GQA, norm="layernorm", pos="learned"),
    replace(_GQA, sliding_window=8, window_layers=(0,)),
    replace(_GQA, sliding_window=8, softcap=1.5),
]
IDS = ["mha-rms-rope", "gqa-ln-learned", "gqa-window-layer0", "gqa-window-softcap"]


def pair(cfg):
    torch.manual_seed(0)
    eager = Transformer(cfg, kernels="eager")
    fast = Transformer(cfg, kernels="fastattn")
    assert list(fast.state_dict()) == list(eager.state_dict())
    fast.load_state_dict(eager.state_dict(), strict=True)
    return eager, fast


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_logits_and_gradients_match_eager(cfg):
    eager, fast = pair(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 50))
    tgt = torch.randint(0, cfg.vocab_size, (3, 50))
    ref = Transformer(cfg).double()
    ref.load_state_dict(eager.state_dict())
    logits, loss = fast(idx, tgt)
    want, want_loss = ref(idx, tgt)
    assert_parity(logits, want.detach())
    mine = torch.autograd.grad(loss, list(fast.parameters()))
    theirs = torch.autograd.grad(want_loss, list(ref.parameters()))
    for a, b in zip(mine, theirs, strict=True):
        assert_parity(a, b)


def test_training_loss_curves_agree():
    # 50 AdamW steps on generated text: the two kernel sets follow the same trajectory.
    cfg = CONFIGS[0]
    text = tiny_corpus(8000)
    data = torch.tensor([ord(c) % cfg.vocab_size for c in text])
    curves = []
    for model in pair(cfg):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(50):
            starts = torch.randint(0, len(data) - 65, (8,), generator=g)
            batch = torch.stack([data[s : s + 65] for s in starts])
            _, loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    eager, fast = curves
    assert eager[-5:].mean() < eager[:5].mean() - 1.0  # it learns
    assert torch.allclose(fast, eager, rtol=1e-3, atol=1e-3), (fast - eager).abs().max()


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_generation_with_kv_cache(cfg):
    eager, fast = pair(cfg)
    models = [eager, fast]
    if cfg.softcap is None:  # (torch's SDPA has no softcap: refused below)
        sdpa = Transformer(cfg, kernels="sdpa")
        sdpa.load_state_dict(eager.state_dict(), strict=True)
        models.append(sdpa)
    prompt = torch.randint(0, cfg.vocab_size, (2, 9))
    got = fast.generate(prompt, 12)
    assert got.shape == (2, 21)
    assert torch.equal(got, fast.generate(prompt, 12, use_cache=False))  # decode path == prefill
    for model in models[::2]:
        assert torch.equal(got, model.generate(prompt, 12))
    # Chunked prefill: 4 queries against 9 cached keys (bottom-right causal) == the full pass.
    for model in models:
        cache = KVCache()
        model(prompt[:, :5], cache=cache)
        chunk, _ = model(prompt[:, 5:], start=5, cache=cache)
        torch.testing.assert_close(chunk, model(prompt)[0][:, 5:], rtol=1e-4, atol=1e-5)


def test_kv_cache_grows_and_checks_positions():
    cfg = CONFIGS[1]
    _, fast = pair(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        want, _ = fast(prompt)
        cache = KVCache(capacity=2)  # too small: every layer's buffers move (twice) as it fills
        got = [fast(prompt[:, :3], cache=cache)[0]]
        got += [fast(prompt[:, t : t + 1], start=t, cache=cache)[0] for t in range(3, 9)]
    assert cache.seqlen() == 9 and len(cache) == cfg.n_layers
    assert cache.k[0].shape[2] >= 9
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="the cache holds 9 tokens"):
        fast(prompt[:, :1], start=3, cache=cache)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="kernels"):
        Transformer(CONFIGS[0], kernels="tpu")
    with pytest.raises(ValueError, match="n_kv_heads"):
        Transformer(TransformerConfig(n_heads=4, n_kv_heads=3))
    with pytest.raises(ValueError, match="sliding_window must be >= 1"):
        Transformer(TransformerConfig(sliding_window=0))
    with pytest.raises(ValueError, match="SDPA has no logit softcapping"):
        Transformer(TransformerConfig(softcap=2.0), kernels="sdpa")


DOCS = [13, 1, 30, 6]  # packed documents: a one-token one, one past the window of 8


# (torch's SDPA has no softcap: the model refuses that pair, test_bad_config_is_rejected)
PACKED_CASES = [
    pytest.param(c, k, id=f"{i}-{k}")
    for c, i in zip(CONFIGS, IDS, strict=True)
    for k in ("fastattn", "sdpa", "eager")
    if not (k == "sdpa" and c.softcap)
]


@pytest.mark.parametrize(("cfg", "kernels"), PACKED_CASES)
def test_packed_documents_match_each_document_alone(cfg, kernels):
    # A packed training step: each document's logits are the float64 model's on that document
    # alone, and the loss gradients those of the documents run one by one (summed).
    torch.manual_seed(0)
    model = Transformer(cfg, kernels=kernels)
    ref = Transformer(cfg).double()
    ref.load_state_dict(model.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (1, sum(DOCS)))
    tgt = torch.randint(0, cfg.vocab_size, (1, sum(DOCS)))
    cu = torch.tensor([0, *torch.tensor(DOCS).cumsum(0).tolist()], dtype=torch.int32)
    logits, loss = model(idx, tgt, cu_seqlens=cu)
    parts, total = [], 0.0
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        lg, _ = ref(idx[:, a:b])
        parts.append(lg)
        total = total + torch.nn.functional.cross_entropy(lg[0], tgt[0, a:b], reduction="sum")
    assert_parity(logits, torch.cat(parts, dim=1).detach(), what=kernels)
    mine = torch.autograd.grad(loss, list(model.parameters()))
    theirs = torch.autograd.grad(total / sum(DOCS), list(ref.parameters()))
    for a, b in zip(mine, theirs, strict=True):
        assert_parity(a, b, what=kernels)


def test_packed_input_is_checked():
    model = Transformer(_BASE, kernels="fastattn")
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"take idx of shape \(1, total\).*got idx \(2, 4\)"):
        model(torch.zeros(2, 4, dtype=torch.long), cu_seqlens=cu)
