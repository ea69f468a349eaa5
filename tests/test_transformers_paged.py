"""transformers' continuous batching (``model.generate_batch``: its paged KV cache) on fastattn:
greedy tokens against one-by-one ``model.generate`` with the model's own eager attention (tiny
random fp32 models from configs, no downloads)."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import count_calls  # noqa: E402
from transformers import ContinuousBatchingConfig, GenerationConfig  # noqa: E402

from fastattn.integrations import hf_paged  # noqa: E402
from fastattn.integrations import transformers as fa_hf  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=128)  # fmt: skip
NEW = 8  # generated tokens per prompt
# 1: a lone token; 7: inside one 16-token page; 17: crosses a page; 33: three pages, and longer
# than the sliding window (8) and than a 16-token batch (chunked prefill beside decodes).
LENGTHS = (1, 7, 17, 33)


def build(name: str) -> transformers.PreTrainedModel:
    if name == "llama_gqa":  # 4 query heads on 2 kv heads
        cfg = transformers.LlamaConfig(num_key_value_heads=2, **SMALL)
        return transformers.LlamaForCausalLM(cfg)
    if name == "qwen2_mqa":  # one kv head, biased q/k/v projections
        cfg = transformers.Qwen2Config(num_key_value_heads=1, **SMALL)
        return transformers.Qwen2ForCausalLM(cfg)
    if name == "mistral_sliding":  # every layer a sliding window of 8 (a ring buffer in the cache)
        cfg = transformers.MistralConfig(num_key_value_heads=2, sliding_window=8, **SMALL)
        return transformers.MistralForCausalLM(cfg)
    if name == "qwen2_hybrid":  # layer 0 full attention, layer 1 a sliding window of 8
        cfg = transformers.Qwen2Config(num_key_value_heads=2, use_sliding_window=True,
                                       sliding_window=8, max_window_layers=1, **SMALL)  # fmt: skip
        return transformers.Qwen2ForCausalLM(cfg)
    raise AssertionError(name)


def models(name: str):
    """The eager model and a copy on fastattn (same weights), in eval mode."""
    torch.manual_seed(0)
    model = build(name).eval()
    with torch.no_grad():  # sharper, stronger attention: at the default init (std 0.02) a key
        for n, p in model.named_parameters():  # misplaced can leave the greedy tokens as they are
            if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
                p.mul_(6.0)
    model.set_attn_implementation("eager")
    fast = copy.deepcopy(model)
    fa_hf.register()
    fast.set_attn_implementation("fastattn")
    return model, fast


def prompts() -> list[list[int]]:
    return [torch.randint(1, 97, (n,)).tolist() for n in LENGTHS]


def one_by_one(model, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of each prompt alone, with the eager model's own generate()."""
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones_like(ids))  # fmt: skip
        out.append(gen[0, len(p) :].tolist())
    return out


def batched(model, prompts: list[list[int]], max_batch_tokens: int, page_size: int = 16):
    gc = GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(page_size=page_size, num_blocks=32,
                                  max_batch_tokens=max_batch_tokens)  # fmt: skip
    results = model.generate_batch(prompts, generation_config=gc, continuous_batching_config=cb)
    return list(results.values())


@pytest.fixture
def calls(monkeypatch):
    """(paged_attention calls as (batch, seqlen_q), varlen_attention calls): the fastattn ops the
    continuous-batching path runs, so a model that silently kept another attention fails."""
    paged = count_calls(monkeypatch, hf_paged, "paged_attention", lambda q, *a, **kw: q.shape[:2])
    varlen = count_calls(monkeypatch, hf_paged, "varlen_attention")
    return paged, varlen


# max_batch_tokens 64: every prompt prefilled in the first batch, then decode-only batches;
# 16: the 33-token prompt is prefilled in chunks beside the others' decoding (mixed lengths).
@pytest.mark.parametrize("max_batch_tokens", [64, 16])
@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_mqa", "mistral_sliding", "qwen2_hybrid"])
def test_generate_batch_matches_one_by_one_eager(name, max_batch_tokens, calls):
    model, fast = models(name)
    ps = prompts()
    want = one_by_one(model, ps)
    got = batched(fast, ps, max_batch_tokens)
    assert [r.error for r in got] == [None] * len(ps)
    assert [r.generated_tokens for r in got] == want
    paged, varlen = calls
    full = {"llama_gqa": 2, "qwen2_mqa": 2, "mistral_sliding": 0, "qwen2_hybrid": 1}[name]
    # Each forward runs every layer once: the full-attention ones on paged_attention (the
    # cache's pages), the sliding ones on varlen_attention (the window the cache reads back).
    steps = (len(paged) // full) if full else len(varlen) // 2
    assert steps >= NEW and len(paged) == full * steps and len(varlen) == (2 - full) * steps
    if full and max_batch_tokens == 16:  # queries of different lengths shared one call
        assert any(b > 1 and sq > 1 for b, sq in paged)
    assert fast.config._attn_implementation == "fastattn"  # left as it was


@pytest.mark.parametrize("max_batch_tokens", [64, 16])
def test_shared_prefix_pages(max_batch_tokens, calls, monkeypatch):
    """Prompts that repeat a cached prompt's first two pages start past them (transformers'
    prefix sharing): their block tables name the other request's pages."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    matched: list[int] = []  # tokens each admitted request found in the cache
    real = PagedAttentionCache.search_prefix_match
    monkeypatch.setattr(PagedAttentionCache, "search_prefix_match",
                        lambda self, *a: matched.append(real(self, *a)) or matched[-1])  # fmt: skip
    model, fast = models("llama_gqa")
    p = torch.randint(1, 97, (40,)).tolist()
    ps = [p, [3], p[:36] + [5, 6], p]  # the third and fourth share 32 tokens with the first
    got = batched(fast, ps, max_batch_tokens)
    assert [r.generated_tokens for r in got] == one_by_one(model, ps)
    assert 32 in matched and calls[0]


def test_other_implementations_keep_transformers_switch():
    """The wrapped switch still moves an eager model to transformers' own paged|eager (and
    back), which gives the same tokens."""
    model, _ = models("llama_gqa")
    ps = prompts()
    got = batched(model, ps, 64)
    assert [r.generated_tokens for r in got] == one_by_one(model, ps)
    assert model.config._attn_implementation == "eager"


def test_page_size_fastattn_cannot_read_is_refused(calls):
    """A page size that is not a power of two >= 16 fails each request with a message naming it
    (transformers reports a failed batch per request), not a silent other attention."""
    _, fast = models("llama_gqa")
    got = batched(fast, prompts()[:2], 64, page_size=24)
    assert all(r.error is not None and "page_size is 24" in r.error for r in got), got
    assert calls[0] == []


@pytest.mark.parametrize(
    "bad, match",
    [(dict(dropout=0.1), "dropout"), (dict(position_bias=torch.zeros(1)), "position_bias"),
     (dict(weights_requested=True), "attention weights")],
)  # fmt: skip
def test_paged_path_refuses_what_it_cannot_serve(bad, match):
    """Dropout, a position bias and attention weights are refused by name, before the cache is
    touched (none is given here)."""
    q = torch.randn(1, 4, 3, 16)
    with pytest.raises(ValueError, match=match):
        hf_paged.paged_attention_forward(None, q, q, q, {}, scaling=None, causal=True,
                                         window=None, softcap=None, sinks=None, **bad)  # fmt: skip
