"""The mask function registered as "fastattn" gives the kernel the structured form (issue 15):
for transformers' plain causal / bidirectional / sliding-window patterns and queries that are the
last keys, the key padding alone (or nothing), the attention adding the module's causal flag and
window; for anything else transformers' dense SDPA mask. Each form, through the registered
attention function, must give what transformers' own dense mask gives."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The models' classes too: a config is judged by the model classes built on it.
from transformers import DogeConfig, DogeModel, MistralConfig, MistralModel  # noqa: E402, F401
from transformers import masking_utils as mu  # noqa: E402

import fastattn  # noqa: E402
from fastattn.integrations import hf_eager, hf_masks  # noqa: E402
from fastattn.integrations import transformers as fa_hf  # noqa: E402

P = hf_masks.MaskPattern
# factory -> (the pattern read from it, the module's sliding_window kwarg for it: transformers'
# models pass the causal window as is and ModernBERT's bidirectional half-window plus one).
PATTERNS = {
    "causal": (lambda: mu.causal_mask_function, P(True), None),
    "sliding-3": (lambda: mu.sliding_window_causal_mask_function(3), P(True, 3), 3),
    "sliding-1": (lambda: mu.sliding_window_causal_mask_function(1), P(True, 1), 1),  # self only
    "bidirectional": (lambda: mu.bidirectional_mask_function, P(False), None),
    "bi-sliding-2": (lambda: mu.sliding_window_bidirectional_mask_function(2), P(False, 2), 3),
}
# (q_length, kv_length, q_offset, kv_offset) as transformers' caches give them.
ALIGNED = {
    "prefill": (7, 7, 0, 0),  # odd length: not a multiple of any tile
    "decode": (1, 9, 8, 0),  # dynamic cache, one new token
    "chunk": (3, 10, 7, 0),  # chunked prefill / speculative tokens after 7 cached keys
    "sliding-cache": (2, 5, 10, 7),  # a sliding layer's cache keeps the last keys only
}
STATIC = {
    "static-decode": (1, 12, 4, 0),  # static cache: slots past the query are unwritten
    "static-prefill": (4, 12, 0, 0),
}


def padding(kind: str, q_length: int, q_offset: int) -> torch.Tensor | None:
    """transformers' 2D mask over the seen tokens (batch 2), with row 1 padded ("ones": none
    padded, as generate() passes it)."""
    if kind == "none":
        return None
    mask = torch.ones(2, q_offset + q_length, dtype=torch.long)
    if kind == "ones":
        return mask
    if kind == "left":
        mask[1, :3] = 0
    else:
        mask[1, -2:] = 0
    return mask


def mask_kwargs(factory, geometry, pad, config, causal=True):
    """The arguments transformers' create_causal_mask (``causal``) or create_bidirectional_mask
    pass the mask function."""
    q_length, kv_length, q_offset, kv_offset = geometry
    am = padding(pad, q_length, q_offset)
    return dict(
        batch_size=2, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=factory(),
        attention_mask=None if am is None else am.bool(), allow_is_causal_skip=causal,
        allow_is_bidirectional_skip=not causal, dtype=torch.float32, config=config,
        use_vmap=False, device="cpu",
    )  # fmt: skip


class Module(torch.nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.is_causal = causal


def run_attention(form, pattern, sliding, geometry, seed=0):
    q_length, kv_length, _, _ = geometry
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, q_length, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, kv_length, 8, generator=g, dtype=torch.float64)  # GQA 4 / 2
    v = torch.randn(2, 2, kv_length, 8, generator=g, dtype=torch.float64)
    out, _ = fa_hf.attention_forward(
        Module(pattern.causal), q, k, v, form, scaling=None, sliding_window=sliding
    )
    return (q, k, v), out.transpose(1, 2)  # (B, H, Sq, D)


def dense_reference(qkv, dense):
    q, k, v = qkv
    k, v = (t.repeat_interleave(2, dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~dense, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("pad", ["none", "left", "right"])
@pytest.mark.parametrize("geometry", list(ALIGNED) + list(STATIC))
@pytest.mark.parametrize("name", list(PATTERNS))
def test_the_form_gives_transformers_dense_mask(name, geometry, pad):
    fa_hf.register()
    factory, pattern, sliding = PATTERNS[name]
    geo = {**ALIGNED, **STATIC}[geometry]
    # A static cache comes with generate()'s 2D mask, which hides the unwritten slots (without
    # one transformers itself returns no mask and attends to them).
    pad = "ones" if geometry in STATIC and pad == "none" else pad
    kw = mask_kwargs(factory, geo, pad, MistralConfig(num_hidden_layers=1), pattern.causal)
    dense_kw = {"allow_is_causal_skip": False, "allow_is_bidirectional_skip": False}
    want = mu.sdpa_mask(**{**kw, **dense_kw})  # (B, 1, Sq, Sk), True = attend
    form = fa_hf.fastattn_mask(**kw)
    if geometry in ALIGNED:  # never a (B, 1, Sq, Sk) tensor: the key padding or nothing
        assert form is None or form.shape == (2, geo[1]), None if form is None else form.shape
    else:  # a static cache's unwritten slots: transformers' own SDPA mask (None, the
        # causal flag, for a prefill from an empty cache)
        same = mu.sdpa_mask(**kw)
        assert (form is None and same is None) or torch.equal(form, same)
    qkv, got = run_attention(form, pattern, sliding, geo)
    ref = dense_reference(qkv, want)
    rows = want.any(-1, keepdim=True).expand_as(ref[..., :1])  # fully masked rows: unspecified
    torch.testing.assert_close(got[rows.expand_as(got)], ref[rows.expand_as(ref)])


@pytest.mark.parametrize("pad", ["none", "left"])
@pytest.mark.parametrize("geometry", list(ALIGNED) + list(STATIC))
@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_expands_as_sdpa_mask(name, geometry, pad):
    # hf_masks.dense (the structure read back) is transformers' dense mask, for every geometry.
    factory, pattern, _ = PATTERNS[name]
    assert hf_masks.pattern_of(factory()) == pattern
    q_length, kv_length, q_offset, kv_offset = geo = {**ALIGNED, **STATIC}[geometry]
    kw = mask_kwargs(factory, geo, pad, None, pattern.causal)
    want = mu.sdpa_mask(
        **{**kw, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False}
    )
    keys = hf_masks.key_padding(kw["attention_mask"], kv_length, kv_offset)
    got = hf_masks.dense(pattern, keys, 2, q_length, kv_length, q_offset, kv_offset)
    assert torch.equal(got, want)


OTHERS = {
    "chunked": lambda: mu.chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long)),
    "or-image": lambda: mu.or_masks(mu.causal_mask_function, lambda b, h, q, kv: kv < 2),
    "and-extra": lambda: mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: kv != 1),
    "sliding-on-bidirectional": lambda: mu.and_masks(
        mu.sliding_window_overlay(3), mu.bidirectional_mask_function
    ),
    "two-bases": lambda: mu.and_masks(mu.causal_mask_function, mu.bidirectional_mask_function),
    "nested": lambda: mu.and_masks(mu.sliding_window_causal_mask_function(3)),
    "lambda": lambda: lambda b, h, q, kv: kv <= q,
    "packed": lambda: mu.packed_sequence_mask_function(torch.zeros(2, 7, dtype=torch.long)),
}


@pytest.mark.parametrize("name", list(OTHERS))
def test_other_mask_functions_keep_the_dense_mask(name):
    fa_hf.register()
    fn = OTHERS[name]
    assert hf_masks.pattern_of(fn()) is None
    kw = mask_kwargs(fn, ALIGNED["prefill"], "left", MistralConfig(num_hidden_layers=1))
    form = fa_hf.fastattn_mask(**kw)
    assert form is not None and torch.equal(form, mu.sdpa_mask(**kw))


@pytest.mark.parametrize(
    "config",
    [
        DogeConfig(num_hidden_layers=1),  # served by transformers' SDPA path only, not flash
        MistralConfig(num_hidden_layers=1, is_causal=False),  # transformers' bidirectional override
    ],
    ids=["sdpa-only", "is_causal-false"],
)
def test_models_outside_the_flash_contract_keep_the_dense_mask(config):
    fa_hf.register()
    kw = mask_kwargs(PATTERNS["sliding-3"][0], ALIGNED["prefill"], "left", config)
    form = fa_hf.fastattn_mask(**kw)
    assert form is not None and torch.equal(form, mu.sdpa_mask(**kw))


def test_key_padding_of_the_wrong_length_is_refused():
    fa_hf.register()
    q = k = v = torch.randn(1, 2, 5, 8)
    with pytest.raises(
        ValueError, match=r"key padding \(batch, seqlen_k\) = \(1, 5\); got \(1, 4\)"
    ):
        fa_hf.attention_forward(Module(True), q, k, v, torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("softcap", [None, 0.7])
@pytest.mark.parametrize(("causal", "window"), [
    (False, None), (True, None), ("top_left", None), (True, (2, 0)), (False, (1, 2)),
    ("top_left", (3, 0)),
])  # fmt: skip
@pytest.mark.parametrize(("sq", "sk"), [(5, 5), (3, 7)])  # seqlen_q < seqlen_k: both alignments
def test_generic_weights_attention_is_fastattn_attention(sq, sk, causal, window, softcap, sinks):
    # The weights path of a model without an eager function of its own: its output is
    # fastattn.attention's (float64 reference), its rows the visible keys' probabilities.
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, sq, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, sk, 8, generator=g, dtype=torch.float64) for _ in range(2))
    s = torch.randn(4, generator=g, dtype=torch.float64) if sinks else None
    pad = torch.ones(2, 1, 1, sk, dtype=torch.bool)
    pad[1, ..., -1] = False  # (the last key: no row is left without a key)
    out, weights = hf_eager.attention_with_weights(
        q, k, v, pad, causal, 0.0, None, window, softcap, s
    )
    want = fastattn.attention(q, k, v, causal=causal, attn_mask=pad, window=window,
                              softcap=softcap or 0.0, sinks=s, backend="reference")  # fmt: skip
    torch.testing.assert_close(out.transpose(1, 2), want)
    kv = torch.repeat_interleave(v, 2, dim=1)
    torch.testing.assert_close(weights @ kv, want)
    if not sinks:
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights.sum(-1)))


@pytest.mark.parametrize("name", ["causal", "sliding-3", "sliding-1"])
def test_packed_form_gives_transformers_dense_mask(name):
    # Documents packed in rows (two rows, other splits; a one-token document): the mask function
    # gives their segment ids, the attention runs them as varlen; equal to transformers' mask.
    fa_hf.register()
    factory, pattern, sliding = PATTERNS[name]
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6, 7]])
    segments = mu.find_packed_sequence_indices(pos)
    fn = lambda: mu.packed_sequence_compatibility_function(factory(), pos, segments)  # noqa: E731
    assert hf_masks.packed_pattern_of(fn()) == (pattern, segments)
    kw = mask_kwargs(fn, (9, 9, 0, 0), "none", MistralConfig(num_hidden_layers=1))
    want = mu.sdpa_mask(**{**kw, "allow_is_causal_skip": False})
    form = fa_hf.fastattn_mask(**kw)
    assert form.dtype == torch.int64 and torch.equal(form, segments)
    qkv, got = run_attention(form, pattern, sliding, (9, 9, 0, 0))
    torch.testing.assert_close(got, dense_reference(qkv, want))
