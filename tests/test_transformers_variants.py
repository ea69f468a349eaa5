"""The models of issue 15 under ``attn_implementation="fastattn"``, as tiny random models: sliding
windows smaller than the sequence (Mistral, Qwen2, Gemma 2/3, gpt-oss, ModernBERT's local
layers), logit softcapping (Gemma 2), attention sinks (gpt-oss, ``s_aux``) and a value head_dim
other than the query's (DeepSeek-V3's latent attention). Each against the same model on its own
eager attention: logits with and without padding, the loss gradients, greedy ``generate()``."""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import count_calls  # noqa: E402
from test_transformers_models import batch, model_class, tiny_config  # noqa: E402

from fastattn.integrations import transformers as fa_hf  # noqa: E402

WINDOW = 4  # keys; the test sequences have 12 tokens
# model_type -> (kind, config overrides): windows below the sequence length everywhere.
MODELS = {
    "mistral": ("causal", {"sliding_window": WINDOW}),
    "qwen2": (
        "causal",
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 0},
    ),  # fmt: skip
    "gemma2": ("causal", {"sliding_window": WINDOW, "attn_logit_softcapping": 0.3}),
    "gemma3_text": ("causal", {"sliding_window": WINDOW}),
    "gpt_oss": ("causal", {"sliding_window": WINDOW}),
    "deepseek_v3": ("causal", {"num_key_value_heads": 4}),  # q/k head_dim 16, v head_dim 16 + 8
    "modernbert": ("encoder", {"local_attention": WINDOW, "global_attn_every_n_layers": 2}),
}


def build(model_type: str, attn: str):
    kind, extra = MODELS[model_type]
    if model_type == "deepseek_v3":
        extra = {**extra, "v_head_dim": 24}  # v's head_dim other than q/k's (8 + 8 = 16)
    cfg = tiny_config(kind, model_type, extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = model_class(kind, model_type)._from_config(cfg, attn_implementation=attn)
        # Random tiny weights give scores near 0, where c tanh(s / c) ~ s: sharpened queries
        # make the softcap (and every score change) matter to the logits.
        for name, p in model.named_parameters():
            if name.endswith("q_proj.weight"):
                p.data.mul_(8.0)
    return model.eval()


def logits(model, kind, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if kind == "causal" else out.last_hidden_state


@pytest.mark.parametrize("model_type", list(MODELS))
def test_model_matches_its_eager_attention(model_type, monkeypatch):
    fa_hf.register()
    calls = count_calls(monkeypatch, fa_hf, "attention")
    kind = MODELS[model_type][0]
    eager, fast = build(model_type, "eager"), build(model_type, fa_hf.NAME)
    fast.load_state_dict(eager.state_dict())
    assert fa_hf.unsupported_reason(eager) is None
    for pad in (False, True):
        ids, mask = batch(kind, pad)
        want = logits(eager, kind, ids, mask)
        got = logits(fast, kind, ids, mask)
        keep = mask.bool()
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-5)
        # The loss gradients of every parameter (softcap, sinks and windows in the backward).
        loss_w = (want[keep] ** 2).mean()
        loss_g = (got[keep] ** 2).mean()
        gw = torch.autograd.grad(loss_w, list(eager.parameters()), allow_unused=True)
        gg = torch.autograd.grad(loss_g, list(fast.parameters()), allow_unused=True)
        for (name, _), a, b in zip(eager.named_parameters(), gg, gw, strict=True):
            if a is None or b is None:
                assert a is None and b is None, name
                continue
            torch.testing.assert_close(
                a, b, rtol=1e-3, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
            )
    assert calls, "fastattn's attention never ran"
    if kind == "causal":  # greedy decoding through the KV cache, left-padded batch
        ids, mask = batch(kind, pad=True)
        with torch.no_grad():
            kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
            want = eager.generate(input_ids=ids, attention_mask=mask, **kw)
            got = fast.generate(input_ids=ids, attention_mask=mask, **kw)
        assert torch.equal(got, want)


def test_sliding_window_reaches_the_kernel(monkeypatch):
    # Mistral's window arrives as the kernel's window (block skipping) with the key padding
    # alone, never a (batch, 1, seqlen_q, seqlen_k) mask: padded prefill, then a chunk of
    # queries after cached keys (the causal flag aligned bottom-right), then decoding.
    fa_hf.register()
    seen = []
    real = fa_hf.attention

    def spy(q, k, v, **kwargs):
        m = kwargs.get("attn_mask")
        seen.append((kwargs.get("window"), None if m is None else (*m.shape[2:], k.shape[2])))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(fa_hf, "attention", spy)
    eager, fast = build("mistral", "eager"), build("mistral", fa_hf.NAME)
    fast.load_state_dict(eager.state_dict())
    ids, mask = batch("causal", pad=True)
    from transformers import DynamicCache

    with torch.no_grad():
        for model in (eager, fast):
            cache = DynamicCache(config=model.config)
            first = model(input_ids=ids[:, :8], attention_mask=mask[:, :8], past_key_values=cache)
            rest = model(input_ids=ids[:, 8:], attention_mask=mask, past_key_values=cache)
            model.outs = (first.logits, rest.logits)
    for got, want in zip(fast.outs, eager.outs, strict=True):
        keep = torch.ones(got.shape[:2], dtype=torch.bool)
        keep[1, :4] = got.shape[1] != 8  # the padded positions of the first chunk
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-5)
    assert seen and all(w == (WINDOW - 1, 0) for w, _ in seen), seen
    # (the second chunk's keys: the 3 the sliding cache keeps, and the chunk's 4)
    assert all(form is not None and form[0] == 1 and form[1] == form[2] for _, form in seen), seen


@pytest.mark.parametrize("model_type", ["mistral", "gemma2"])  # sliding only; and full layers
def test_static_cache_generate_matches_eager(model_type, monkeypatch):
    # A static cache: whatever form each call's mask takes (window-sized sliding layers are
    # aligned and get the key form; a full layer's unwritten slots the dense mask), the same
    # tokens as eager.
    fa_hf.register()
    calls = count_calls(monkeypatch, fa_hf, "attention")
    eager, fast = build(model_type, "eager"), build(model_type, fa_hf.NAME)
    fast.load_state_dict(eager.state_dict())
    ids, mask = batch("causal", pad=True)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        want = eager.generate(input_ids=ids, attention_mask=mask, **kw)
        got = fast.generate(input_ids=ids, attention_mask=mask, **kw)
    assert calls and torch.equal(got, want)


@pytest.mark.parametrize("model_type", list(MODELS))
def test_output_attentions_are_the_models_own(model_type):
    # Windows, softcap and sinks in the weights too, in each model's own convention (gpt-oss
    # gives a sink its share of a row; the others' rows sum to one).
    fa_hf.register()
    kind = MODELS[model_type][0]
    eager, fast = build(model_type, "eager"), build(model_type, fa_hf.NAME)
    fast.load_state_dict(eager.state_dict())
    ids, mask = batch(kind, pad=True)
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        with pytest.warns(UserWarning, match="does not compute attention weights"):
            got = fast(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert len(got) == len(want) > 0
    keep = mask.bool()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.transpose(1, 2)[keep], b.transpose(1, 2)[keep])


PACKED = [6, 4, 2]  # documents of one packed row (the window, 4 keys, matters in the first)


# (gpt-oss's model does not hand transformers' mask its position ids: packing is not detected
# there, by eager or sdpa either)
@pytest.mark.parametrize("model_type", ["mistral", "gemma2", "qwen2", "deepseek_v3"])
def test_packed_documents_attend_within_themselves(model_type, monkeypatch):
    # DataCollatorWithFlattening's form: one row, position ids restarting per document. Each
    # document's logits equal the eager model run on that document alone; the kernel gets the
    # documents' lengths (varlen), never a (1, 1, 12, 12) mask; the loss gradients equal eager's
    # on the same packed row.
    fa_hf.register()
    varlen = count_calls(monkeypatch, fa_hf.hf_packed, "varlen_attention")
    dense = count_calls(monkeypatch, fa_hf, "attention")
    eager, fast = build(model_type, "eager"), build(model_type, fa_hf.NAME)
    fast.load_state_dict(eager.state_dict())
    ids = torch.randint(3, 60, (1, sum(PACKED)), generator=torch.Generator().manual_seed(2))
    pos = torch.cat([torch.arange(n) for n in PACKED])[None]
    # (use_cache=False: transformers detects packing only without a cache, training-style)
    got = fast(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert varlen and not dense, (len(varlen), len(dense))
    start = 0
    with torch.no_grad():
        for n in PACKED:
            alone = eager(input_ids=ids[:, start : start + n]).logits
            torch.testing.assert_close(got[:, start : start + n], alone, rtol=1e-4, atol=1e-5)
            start += n
    want = eager(input_ids=ids, position_ids=pos, use_cache=False).logits
    gw = torch.autograd.grad((want**2).mean(), list(eager.parameters()), allow_unused=True)
    gg = torch.autograd.grad((got**2).mean(), list(fast.parameters()), allow_unused=True)
    for (name, _), a, b in zip(eager.named_parameters(), gg, gw, strict=True):
        if a is not None or b is not None:
            torch.testing.assert_close(
                a, b, rtol=1e-3, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
            )
