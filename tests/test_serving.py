"""fastattn.serving (issue 16): the serving loop on a paged cache gives each request exactly the
tokens of the dense-cache ``generate`` on that request alone, while requests wait for blocks,
leave, and hand their blocks on; the pool's bookkeeping holds at every step."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fastattn.models import Transformer, TransformerConfig
from fastattn.serving import Engine

_BASE = TransformerConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, max_seq_len=128)
_GQA = replace(_BASE, n_kv_heads=2)
# (config, prefill chunk), and why: MHA + rotary with whole-prompt prefill; GQA + LayerNorm +
# learned positions prefilled in block-sized chunks; GQA with a window of 8 on layer 0 and
# softcapping, prefilled in chunks of 5 (a chunk shorter than the window, across block edges).
CASES = {
    "mha-rope": (_BASE, None),
    "gqa-ln-learned-chunk16": (replace(_GQA, norm="layernorm", pos="learned"), 16),
    "gqa-window-softcap-chunk5": (
        replace(_GQA, sliding_window=8, window_layers=(0,), softcap=1.5),
        5,
    ),
}
# Ragged prompts: one token, under a block, the same length again (both admitted at once: one
# batched prefill), past two blocks, exactly one block, a one-new-token request (done at
# prefill), a long decode (crosses block edges while others come and go).
PROMPTS = [1, 7, 7, 33, 16, 20, 2]
NEW = [5, 12, 3, 9, 17, 1, 25]
BS = 16
NUM_BLOCKS = 6  # the requests need 13 blocks at their longest: most must wait for freed ones


def tiny_model(cfg):
    """A random fp32 model whose attention decides its tokens: at the 0.02-std init the scores
    are near zero (uniform attention) and the residual stream drowns the attention's output, so
    a key at a wrong position could leave the greedy tokens unchanged."""
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            for w in (block.attn.wq, block.attn.wk, block.attn.wv, block.attn.wo):
                w.weight.mul_(8.0)
    return model


def dense(model, prompt, n):
    """The oracle: ``generate`` on the request alone, with the dense KV cache."""
    return model.generate(torch.tensor([prompt]), n)[0, len(prompt) :].tolist()


def check_pool(engine):
    """Every block is free or owned by exactly one running request, which holds just the
    blocks its cached tokens fill (prompt + generated tokens but the last)."""
    pool = engine.pool
    owned = [b for r in engine.running for b in pool.tables[r.id]]
    assert sorted(owned + pool.free) == list(range(NUM_BLOCKS))
    for r in engine.running:
        cached = len(r.prompt) + len(r.output) - 1
        assert pool.lens[r.id] == cached
        assert len(pool.tables[r.id]) == -(-cached // BS)
    assert set(pool.tables) == {r.id for r in engine.running}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("case", list(CASES))
def test_engine_matches_dense_generate(case, backend):
    cfg, chunk = CASES[case]
    torch.manual_seed(0)
    model = tiny_model(cfg)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in PROMPTS]
    want = [dense(model, p, n) for p, n in zip(prompts, NEW, strict=True)]
    # Request 1 stops at an eos: its 4th dense token (it ends at that token's first occurrence).
    eos = want[1][3]
    want[1] = want[1][: want[1].index(eos) + 1]

    engine = Engine(model, NUM_BLOCKS, BS, backend=backend, prefill_chunk=chunk)
    ids = [engine.submit(p, n, eos if i == 1 else None)
           for i, (p, n) in enumerate(zip(prompts, NEW, strict=True))]  # fmt: skip
    waited, owners, steps, most = False, {}, 0, 0
    while engine.busy:
        engine.step()
        steps += 1
        check_pool(engine)
        waited |= bool(engine.waiting) and bool(engine.running)
        most = max(most, len(engine.running))
        for r in engine.running:
            for b in engine.pool.tables[r.id]:
                owners.setdefault(b, set()).add(r.id)
        assert steps < 200, "the engine makes no progress"
    for i, w in zip(ids, want, strict=True):
        assert engine.finished[i] == w, f"request {i} (prompt {PROMPTS[i]}, {NEW[i]} new)"
    assert waited, "no request had to wait for blocks"
    assert any(len(s) > 1 for s in owners.values()), "no block was reused by another request"
    assert sorted(engine.pool.free) == list(range(NUM_BLOCKS)) and not engine.pool.tables
    used = sum(-(-(n + len(w) - 1) // BS) for n, w in zip(PROMPTS, want, strict=True))
    assert engine.pool.handed_out == used > NUM_BLOCKS
    assert most >= 3, "the requests ran (nearly) one after another, not batched"


def test_max_batch_and_a_second_run_on_the_freed_pool():
    # max_batch=1 serves the requests one at a time; the same engine then serves a second wave
    # on the blocks the first left free, with the same results.
    torch.manual_seed(0)
    model = tiny_model(_GQA)
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (3, 18, 1)]
    want = [dense(model, p, 6) for p in prompts]
    engine = Engine(model, 4, BS, backend="cpu", max_batch=1)
    for wave in range(2):
        ids = [engine.submit(p, 6) for p in prompts]
        while engine.busy:
            engine.step()
            assert len(engine.running) <= 1
        assert [engine.finished[i] for i in ids] == want, f"wave {wave}"
        assert sorted(engine.pool.free) == list(range(4))


def test_requests_that_can_never_run_are_refused():
    model = tiny_model(_BASE)
    engine = Engine(model, num_blocks=2, block_size=BS, backend="cpu")
    # 30 + 5 new tokens cache 34, which fill 3 blocks of 16; the pool has 2 in all.
    with pytest.raises(ValueError, match="needs 3 blocks of 16; the pool holds 2 in all"):
        engine.submit(list(range(30)), 5)
    with pytest.raises(ValueError, match="exceeds max_seq_len 128"):
        Engine(model, 64, BS).submit(list(range(60)) * 2, 9)
    with pytest.raises(ValueError, match="non-empty prompt and max_new_tokens >= 1"):
        engine.submit([], 4)
    with pytest.raises(ValueError, match="non-empty prompt and max_new_tokens >= 1"):
        engine.submit([1], 0)
    with pytest.raises(ValueError, match=r"in \[0, 64\)"):
        engine.submit([64], 1)
    with pytest.raises(ValueError, match="prompt must be 1-D"):
        engine.submit(torch.zeros(1, 3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="block_size must be a power of two >= 16"):
        Engine(model, 4, block_size=24)
    assert not engine.busy  # nothing refused was queued
    # 17 + 16 new tokens cache 32: exactly the two blocks, accepted and served.
    rid = engine.submit(list(range(17)), 16)
    assert engine.run()[rid] == dense(model, list(range(17)), 16)
