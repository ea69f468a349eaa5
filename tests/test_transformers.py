"""HuggingFace transformers models on fastattn (random weights from configs, no downloads):
logits, loss gradients and greedy generation against the models' own eager attention."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import assert_parity, count_calls  # noqa: E402

import fastattn  # noqa: E402
from fastattn.integrations import transformers as fa_hf  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64)  # fmt: skip


def build(name):
    """(model, is_causal, number of norm modules) for a tiny random model of each family."""
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97,
                                      n_positions=64, bos_token_id=0, eos_token_id=0)  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg), True, 5
    if name == "llama":  # grouped-query attention, RMSNorm
        cfg = transformers.LlamaConfig(num_key_value_heads=2, **SMALL)
        return transformers.LlamaForCausalLM(cfg), True, 5
    if name == "qwen2":  # GQA with biased q/k/v projections
        cfg = transformers.Qwen2Config(num_key_value_heads=1, **SMALL)
        return transformers.Qwen2ForCausalLM(cfg), True, 5
    if name == "bert":  # bidirectional encoder, padding mask
        cfg = transformers.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=128,
                                      max_position_embeddings=64)  # fmt: skip
        return transformers.BertModel(cfg, add_pooling_layer=False), False, 5
    raise AssertionError(name)


def inputs(causal, pad):
    ids = torch.randint(1, 97, (2, 14))
    mask = torch.ones(2, 14, dtype=torch.long)
    if pad:  # left padding for decoders (as in batched generation), right for encoders
        if causal:
            mask[1, :4] = 0
        else:
            mask[1, -4:] = 0
    return ids, mask


def outputs(model, ids, mask, causal):
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if causal else out.last_hidden_state


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the fastattn attention calls the integration makes (so a model that silently kept
    its own attention would fail the tests)."""
    return count_calls(
        monkeypatch, fa_hf, "attention", lambda *a, **kw: kw.get("attn_mask") is not None
    )


@pytest.mark.parametrize("pad", [False, True], ids=["no_pad", "pad"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "bert"])
def test_model_matches_its_eager_attention(name, pad, kernel_calls):
    torch.manual_seed(0)
    model, causal, n_norms = build(name)
    model.set_attn_implementation("eager")
    model.eval()
    # The float64 oracle: the same weights on torch's SDPA (in float64 the eager path turns the
    # padded rows into NaN, which then leak into every row through P @ V).
    ref = copy.deepcopy(model).double()
    ref.set_attn_implementation("sdpa")
    fast = copy.deepcopy(model)
    report = fa_hf.apply(fast)
    assert len(report.replaced) == 1 + n_norms, str(report)
    assert fast.config._attn_implementation == "fastattn"
    ids, mask = inputs(causal, pad)
    got = outputs(fast, ids, mask, causal)
    assert len(kernel_calls) == 2  # one per layer
    assert all(kernel_calls) == pad or not causal  # the padding mask reached the kernel
    want = outputs(ref, ids, mask, causal)
    keep = mask.bool()  # padded positions' outputs are not defined by either model
    assert_parity(got[keep], want[keep].detach())
    eager = outputs(model, ids, mask, causal)  # and the model's own eager attention, in fp32
    torch.testing.assert_close(got[keep], eager[keep], rtol=1e-4, atol=1e-5)
    # Loss gradients of every parameter.
    w = torch.randn_like(got)[keep]
    g_fast = torch.autograd.grad((got[keep] * w).sum(), list(fast.parameters()), allow_unused=True)
    g_ref = torch.autograd.grad((want[keep] * w.double()).sum(), list(ref.parameters()),
                                allow_unused=True)  # fmt: skip
    for (n, _), a, b in zip(fast.named_parameters(), g_fast, g_ref, strict=True):
        assert (a is None) == (b is None), n
        if a is not None:
            assert_parity(a, b, what=n)


def _eager_and_fast(name, **apply_kw):
    """A tiny model of ``name`` on eager attention, in eval mode, and a copy switched by apply()."""
    torch.manual_seed(0)
    model, causal, _ = build(name)
    model.set_attn_implementation("eager")
    model.eval()
    fast = copy.deepcopy(model)
    fa_hf.apply(fast, **apply_kw)
    return model, fast, causal


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_gives_the_same_greedy_tokens(name, kernel_calls):
    model, fast, causal = _eager_and_fast(name)
    ids, mask = inputs(causal, pad=True)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(fast.generate(ids, **kw), model.generate(ids, **kw))
    assert len(kernel_calls) == 2 * 8  # prefill + 7 decode steps over the KV cache, 2 layers


def test_attn_implementation_at_construction():
    fa_hf.register()
    cfg = transformers.LlamaConfig(num_key_value_heads=2, **SMALL)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="fastattn")
    assert model.config._attn_implementation == "fastattn"
    ids, mask = inputs(True, pad=True)
    ref = copy.deepcopy(model).double()
    ref.set_attn_implementation("sdpa")
    keep = mask.bool()
    got = model(input_ids=ids, attention_mask=mask).logits[keep]
    assert_parity(got, ref(input_ids=ids, attention_mask=mask).logits[keep].detach())


class OnePlusWeightRMSNorm(torch.nn.Module):
    """Gemma-style RMSNorm: same structure as Llama's but scales by (1 + weight)."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n))
        self.eps = 1e-6

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


def test_norm_recognition_checks_the_formula_and_unpatch_restores():
    model, _, _ = build("llama")
    model.model.extra = OnePlusWeightRMSNorm(64)
    report = fastattn.patch(model, ops=("rms_norm",))
    left = {n: why for n, _, why in report.left}
    assert "computes something else" in left["model.extra"]
    adapters = [m for m in model.modules() if isinstance(m, fastattn.nn.RMSNormAdapter)]
    assert len(adapters) == 5
    keys = list(model.state_dict())
    fastattn.unpatch(model)
    assert not any(isinstance(m, fastattn.nn.RMSNormAdapter) for m in model.modules())
    assert list(model.state_dict()) == keys
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"


def own_attention_model(name):
    """Models whose attention is their own code (they only take transformers' mask helpers):
    BLOOM (alibi, no sdpa support) and Falcon (its own eager/sdpa branches)."""
    if name == "bloom":
        cfg = transformers.BloomConfig(vocab_size=97, hidden_size=64, n_layer=2, n_head=4)
        return transformers.BloomForCausalLM, cfg
    if name == "falcon":
        cfg = transformers.FalconConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, new_decoder_architecture=True,
                                        num_kv_heads=2)  # fmt: skip
        return transformers.FalconForCausalLM, cfg
    if name == "codegen":
        cfg = transformers.CodeGenConfig(vocab_size=97, n_embd=64, n_layer=2, n_head=4,
                                         rotary_dim=8, n_positions=64)  # fmt: skip
        return transformers.CodeGenForCausalLM, cfg
    if name == "mpt":
        cfg = transformers.MptConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4,
                                     max_seq_len=64)  # fmt: skip
        return transformers.MptForCausalLM, cfg
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["bloom", "falcon"])
def test_apply_refuses_a_model_whose_attention_is_its_own(name):
    cls, cfg = own_attention_model(name)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    before = model.config._attn_implementation  # transformers cannot switch Falcon at run time
    why = "_supports_sdpa" if name == "bloom" else "AttentionInterface"
    with pytest.raises(fa_hf.UnsupportedModelError, match=why):
        fa_hf.apply(model)
    assert model.config._attn_implementation == before  # refused before changing anything
    assert fa_hf.unsupported_reason(model) == fa_hf.unsupported_reason(cls)
    report = fa_hf.apply(model, attention=False)  # the norms alone are still swapped
    assert report.replaced and all("Norm" in d for _, _, d in report.replaced), str(report)


# (Falcon built with attn_implementation="fastattn" already fails in transformers, with a
# KeyError: it looks its attention class up by that name.)
@pytest.mark.parametrize("name", ["bloom", "codegen", "mpt"])
def test_construction_with_fastattn_is_refused_at_the_first_forward(name, kernel_calls):
    fa_hf.register()
    cls, cfg = own_attention_model(name)
    model = cls._from_config(cfg, attn_implementation="fastattn").eval()
    ids, mask = inputs(True, pad=True)
    for m in (mask, None):  # with padding, and without (then sdpa's mask would be None)
        with pytest.raises(fa_hf.UnsupportedModelError, match="not supported for this model"):
            model(input_ids=ids, attention_mask=m)
    assert kernel_calls == []


def test_apply_reports_replaced_only_when_transformers_switched(monkeypatch):
    model, _, _ = build("llama")
    # A transformers that ignores the request (as it does, with a warning, for models it cannot
    # switch at run time) must not be reported as switched.
    monkeypatch.setattr(model, "set_attn_implementation", lambda impl: None)
    with pytest.raises(fa_hf.UnsupportedModelError, match="transformers kept LlamaForCausalLM"):
        fa_hf.apply(model)


# GPT-2 does not pass output_attentions down to its attention function: transformers' sdpa
# then returns an empty attentions tuple without a word.
@pytest.mark.parametrize("name", ["llama", "bert", "gpt2"])
def test_output_attentions_warns_and_returns_eager_weights(name, kernel_calls):
    model, fast, causal = _eager_and_fast(name, norms=False)
    ids, mask = inputs(causal, pad=True)
    want = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    with pytest.warns(UserWarning, match="does not compute attention weights"):
        got = fast(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert kernel_calls == []  # the weights came from the unfused path
    assert len(got.attentions) == 2 and all(a is not None for a in got.attentions)
    keep = mask.bool()
    for a, b in zip(got.attentions, want.attentions, strict=True):
        assert a.shape == b.shape == (2, 4, 14, 14)
        rows = a.transpose(1, 2)[keep], b.transpose(1, 2)[keep]  # the kept queries' weights
        torch.testing.assert_close(*rows, rtol=1e-4, atol=1e-6)
    key = "logits" if causal else "last_hidden_state"
    torch.testing.assert_close(got[key][keep], want[key][keep], rtol=1e-4, atol=1e-5)
    fast(input_ids=ids, attention_mask=mask)  # without it, the kernel again
    assert len(kernel_calls) == 2


@pytest.mark.parametrize("dv", [8, 40])
def test_value_head_dim_other_than_the_querys(dv):
    # Latent attention (DeepSeek-style MLA, GLM-4 MoE lite) has v's head_dim differ from q's.
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 9, 24), torch.randn(2, 2, 9, 24)
    v = torch.randn(2, 2, 9, dv)
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
    mask[1, ..., :3] = False
    module = torch.nn.Module()
    out, _ = fa_hf.attention_forward(module, q, k, v, mask, scaling=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, scale=0.3, enable_gqa=True
    )
    assert out.shape == (2, 9, 4, dv)
    assert_parity(out, want.transpose(1, 2))
