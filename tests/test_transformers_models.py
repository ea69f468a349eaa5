"""Every causal-LM and text-encoder architecture of the pinned transformers, as a tiny random
model built from its config: under ``attn_implementation="fastattn"`` it either gives what its
own eager attention gives (logits / hidden states, with and without padding) or is refused with
``UnsupportedModelError`` naming the reason — never a silent difference.

The default run takes the fixed subset ``SUBSET`` (models of every kind: interface-based decoders
and encoders, and the ones with attention code of their own). ``FASTATTN_HF_ALL=1`` runs every
architecture (several minutes on 2 cores):
``FASTATTN_HF_ALL=1 pytest -p no:xdist tests/test_transformers_models.py``.
The architectures that cannot be built from a small config are listed in ``NOT_BUILDABLE``
with the reason; the full run fails on any other that does not build.
"""

from __future__ import annotations

import copy
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import count_calls  # noqa: E402
from transformers import PreTrainedConfig  # noqa: E402
from transformers.models.auto import configuration_auto, modeling_auto  # noqa: E402

from fastattn.integrations import transformers as fa_hf  # noqa: E402

VOCAB = 99
TINY = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, head_dim=16)  # fmt: skip
# Other names of the sizes (set where the config class has them).
ALIASES = dict(intermediate_size=128, ffn_dim=128, n_inner=128, d_ff=128, encoder_ffn_dim=128,
               decoder_ffn_dim=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, num_layers=2, num_heads=4, n_positions=64,
               embedding_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=1, sep_token_id=2, cls_token_id=1, rotary_dim=8,
               # mixture-of-experts and latent-attention sizes
               num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4,
               num_experts_per_tok=2, moe_intermediate_size=32, n_group=1, topk_group=1,
               n_shared_experts=1, shared_expert_intermediate_size=64, kv_lora_rank=16,
               q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
               global_head_dim=32)  # fmt: skip

CAUSAL = dict(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
ENCODERS = {t: modeling_auto.MODEL_MAPPING_NAMES[t]
            for t in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
            if t in modeling_auto.MODEL_MAPPING_NAMES
            and not configuration_auto.CONFIG_MAPPING[t]().is_encoder_decoder}  # fmt: skip
CASES = [("causal", t) for t in sorted(CAUSAL)] + [("encoder", t) for t in sorted(ENCODERS)]

# Architectures that a small flat config does not build into a model taking input_ids, and why.
# (Maintained by hand from FASTATTN_HF_ALL=1 runs: a new transformers may fix or add some.)
_NO_ATTENTION_LAYER = ("hybrid: with 2 or 8 layers its default layer pattern has no attention "
                       "layer (the cache holds only linear-attention layers)")  # fmt: skip
_COMPOSITE = ("composite vision/audio-language config without the top-level text attributes "
              "a flat tiny config sets ({}); {}")  # fmt: skip
_LARGE = "over 20M parameters from the tiny config ({})"
NOT_BUILDABLE: dict[tuple[str, str], str] = {
    ("causal", "bamba"): _NO_ATTENTION_LAYER,
    ("causal", "granitemoehybrid"): _NO_ATTENTION_LAYER,
    ("causal", "blt"): _LARGE.format(
        "byte latent transformer: patcher, encoder, decoder and global sub-configs sized apart"
    ),
    ("causal", "cohere_compass_text"): "KeyError 'full_attention' building it (layer types)",
    ("causal", "dbrx"): "its attn_config sub-config, built apart, has no rope_theta",
    ("causal", "dots3_note"): "its sub-configs reject the tiny sizes (num_key_value_heads must "
    "match num_attention_heads); dots3_note_text is enumerated",
    ("causal", "emu3"): _COMPOSITE.format("pad_token_id", "a VQ image tokenizer beside the text"),
    ("causal", "llama4"): _COMPOSITE.format("pad_token_id", "llama4_text is enumerated"),
    ("causal", "musicgen"): _COMPOSITE.format("dropout", "text encoder, audio codec, decoder"),
    ("causal", "musicgen_melody"): _COMPOSITE.format("dropout", "as musicgen"),
    ("causal", "qwen3_5"): _COMPOSITE.format("vocab_size", "qwen3_5_text is enumerated"),
    ("causal", "qwen3_5_moe"): _COMPOSITE.format("vocab_size", "qwen3_5_moe_text is enumerated"),
    ("causal", "qwen4_exp"): _COMPOSITE.format("vocab_size", "as qwen4_exp_text"),
    ("causal", "qwen4_exp_text"): "TypeError building it (sizes derived from unset fields)",
    ("causal", "gemma3n"): "its vision tower is a timm model (timm is not installed)",
    ("causal", "gemma3n_text"): "its KV-sharing layer pattern does not fit 2 or 8 layers",
    ("causal", "gemma4_unified_assistant"): "its KV-sharing layer pattern does not fit 2 or 8 "
    "layers",
    ("causal", "gemma4"): _LARGE.format("per-layer input embeddings"),
    ("causal", "gemma4_text"): _LARGE.format("per-layer input embeddings"),
    ("causal", "gemma4_assistant"): "config validation: hidden_size_per_layer_input must be 0",
    ("causal", "gpt_neo"): "config validation: its attention_layers list must have num_layers "
    "entries",
    ("causal", "lfm2_moe"): "TypeError building it (no layer pattern for the tiny sizes)",
    ("causal", "longcat_flash"): "a shape mismatch in its MoE/latent attention at the tiny sizes",
    ("causal", "mamba2"): "config validation: hidden_size * expand must be num_heads * head_dim "
    "(and it has no attention)",
    ("causal", "reformer"): "config validation: axial position factors must sum to hidden_size",
    ("causal", "xlnet"): "config validation: d_head must be d_model // n_head",
    ("causal", "xlstm"): "its mLSTM state shapes do not fit the tiny sizes (it has no attention)",
    ("causal", "xmod"): "needs set_default_language() before a forward (language adapters)",
    ("causal", "zamba2"): "config validation: its layer types must list num_hidden_layers",
    ("causal", "zaya"): "config validation: supports num_experts_per_tok=1 only",
    ("encoder", "luke"): _LARGE.format("entity vocabulary"),
    ("encoder", "perceiver"): _LARGE.format("latent array and byte inputs"),
    ("encoder", "reformer"): "config validation: axial position factors must sum to hidden_size",
    ("encoder", "xmod"): "needs set_default_language() before a forward (language adapters)",
}

# Models whose padded outputs depend on what a fully masked attention row gives (eager: the mean
# of the values; transformers' sdpa and fastattn: zeros): with padding they are compared with
# their sdpa path instead of eager.
MASKED_ROWS_MATTER = {
    "recurrent_gemma": "its recurrent blocks carry the left-padding positions' states (the "
    "output of their fully masked attention rows) into the tokens after them",
}

# The default run: interface-based decoders and encoders (GQA, biases, alibi-free and RoPE), the
# ones with attention code of their own that the issue found misreading the mask (BLOOM, CodeGen,
# XGLM, RoFormer, MegatronBERT, MPT), Falcon and GPT-J (their own sdpa / flash branches).
SUBSET = {("causal", t) for t in ("bloom", "codegen", "xglm", "mpt", "falcon", "gptj", "gpt2",
                                  "llama", "gpt_neox", "opt", "qwen2", "megatron-bert")} | {
    ("encoder", t) for t in ("bert", "roformer", "distilbert", "roberta")
}  # fmt: skip
FULL = os.environ.get("FASTATTN_HF_ALL", "0") not in ("", "0")


def tiny(cls, **extra):
    """A config of class ``cls`` with the TINY sizes wherever it has them, its sub-configs (text,
    vision, ... towers) made tiny the same way."""
    fields = set(getattr(cls, "__dataclass_fields__", {})) | set(cls.attribute_map)
    kw = {k: v for k, v in TINY.items() if k in fields}
    kw.update({k: v for k, v in ALIASES.items() if k in fields})
    default = cls()
    for key, sub in (cls.sub_configs or {}).items():
        if isinstance(getattr(default, key, None), PreTrainedConfig) and isinstance(sub, type):
            kw[key] = tiny(type(getattr(default, key)))
    return cls(**{**kw, **extra})


def tiny_config(kind: str, model_type: str, variant: dict | None = None):
    extra = dict(variant or {})
    if kind == "causal" and model_type in ENCODERS:
        extra["is_decoder"] = True  # an encoder family's LM head, used as a decoder
    return tiny(configuration_auto.CONFIG_MAPPING[model_type], **extra)


def model_class(kind: str, model_type: str):
    name = (CAUSAL if kind == "causal" else ENCODERS)[model_type]
    return getattr(transformers, name if isinstance(name, str) else name[0])


MAX_PARAMS = 20_000_000  # a tiny config that builds a larger model did not shrink it
# Tried in turn until one builds and runs: the TINY config, then as multi-head attention (latent
# attention, or no GQA), then with 8 layers (hybrids whose first attention layer comes later).
VARIANTS = ({}, {"num_key_value_heads": 4}, {"num_hidden_layers": 8},
            {"num_key_value_heads": 4, "num_hidden_layers": 8})  # fmt: skip


def build(kind: str, model_type: str, attn: str, variant: dict | None = None):
    cfg = tiny_config(kind, model_type, variant)
    cls = model_class(kind, model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if attn == "eager":  # sized on the meta device first: never allocate a large model
            with torch.device("meta"):
                n = sum(p.numel() for p in cls._from_config(cfg).parameters())
            if n > MAX_PARAMS:
                raise ValueError(f"{n / 1e6:.0f}M parameters from the tiny config")
        torch.manual_seed(0)
        model = cls._from_config(cfg, attn_implementation=attn)
    return model.eval()


def batch(kind: str, pad: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    if pad:  # left padding for decoders (as in batched generation), right for encoders
        if kind == "causal":
            mask[1, :4] = 0
        else:
            mask[1, -4:] = 0
    return ids, mask


def run(model, kind: str, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if kind == "causal" else out.last_hidden_state


@pytest.fixture
def kernel_calls(monkeypatch):
    return count_calls(monkeypatch, fa_hf, "attention")


def check(kind: str, model_type: str, calls: list) -> str:
    """Builds the architecture with eager and with fastattn attention (same weights) and returns
    what happened: "equal" (fastattn ran and matched eager), "equal-eager" (matched, but its
    attention never reached fastattn), or "refused: <reason>"; fails on any silent difference."""
    fa_hf.register()
    for variant in VARIANTS:
        try:
            eager = build(kind, model_type, "eager", variant)
            run(eager, kind, *batch(kind, pad=True))
            break
        except Exception as e:  # noqa: BLE001 - the next variant, then a failure
            error = e
    else:
        pytest.fail(f"{kind} {model_type} does not build or run from a tiny config "
                    f"({type(error).__name__}: {str(error)[:300]}): list it in NOT_BUILDABLE "
                    "with the reason")  # fmt: skip
    reason = fa_hf.unsupported_reason(eager)
    try:
        fast = build(kind, model_type, fa_hf.NAME, variant)
    except KeyError as e:  # Falcon, GIT: transformers looks their attention class up by name
        assert reason is not None, f"{model_type} does not build under 'fastattn': {e!r}"
        with pytest.raises(fa_hf.UnsupportedModelError, match="not supported for this model"):
            fa_hf.apply(eager)
        return f"refused: {reason} (transformers fails to build it: KeyError {e})"
    fast.load_state_dict(eager.state_dict())
    if reason is not None:
        # Refused both ways: apply() before changing anything, and a model constructed with
        # attn_implementation="fastattn" at its first forward (or it never reaches fastattn's
        # mask or attention at all and is eager, checked below).
        with pytest.raises(fa_hf.UnsupportedModelError, match="not supported for this model"):
            fa_hf.apply(copy.deepcopy(eager))
    results = []
    for pad in (False, True):
        ids, mask = batch(kind, pad)
        if pad and model_type in MASKED_ROWS_MATTER:
            sdpa = build(kind, model_type, "sdpa", variant)
            sdpa.load_state_dict(eager.state_dict())
            want = run(sdpa, kind, ids, mask)
        else:
            want = run(eager, kind, ids, mask)
        before = len(calls)
        try:
            got = run(fast, kind, ids, mask)
        except fa_hf.UnsupportedModelError as e:
            assert reason is not None, f"{model_type} refused at run time only: {e}"
            results.append("refused")
            continue
        except ValueError as e:  # a shape fastattn's kernels do not take: said, not wrong
            if not str(e).startswith("fastattn."):
                raise
            results.append(f"kernel refuses: {e}")
            continue
        keep = mask.bool()
        where = f"{model_type} pad={pad}"
        torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, where=where: f"{where}: {m}")  # fmt: skip
        results.append("equal" if len(calls) > before else "equal-eager")
    if any(r.startswith("kernel refuses") for r in results):
        return results[-1]
    if reason is not None:  # (a composite model may run fastattn in its parts that support it)
        return f"refused: {reason}" if "refused" in results else f"{results[0]} (apply refuses)"
    assert results == ["equal", "equal"], (model_type, results)
    # output_attentions=True: a warning and eager's weights, never None in silence.
    ids, mask = batch(kind, pad=model_type not in MASKED_ROWS_MATTER)
    with torch.no_grad():
        out = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
        want = getattr(out, "attentions", None)
        with pytest.warns(UserWarning, match="does not compute attention weights"):
            out = fast(input_ids=ids, attention_mask=mask, output_attentions=True)
        got = getattr(out, "attentions", None)
    if want is None or any(w is None for w in want):
        return "equal"  # its eager attention returns no weights either
    assert got is not None and len(got) == len(want), model_type
    keep = mask.bool()
    for a, b in zip(got, want, strict=True):
        assert a is not None and b is not None and a.shape == b.shape, model_type
        if a.dim() == 4 and a.shape[2] == keep.shape[1]:  # the kept queries' weights
            a, b = a.transpose(1, 2)[keep], b.transpose(1, 2)[keep]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    return "equal"


@pytest.mark.parametrize(("kind", "model_type"), [
    pytest.param(k, t, id=f"{k}-{t}") for k, t in CASES if FULL or (k, t) in SUBSET
])  # fmt: skip
def test_architecture_matches_eager_or_is_refused(kind, model_type, kernel_calls):
    if (kind, model_type) in NOT_BUILDABLE:
        pytest.skip(f"cannot be built from a small config: {NOT_BUILDABLE[kind, model_type]}")
    outcome = check(kind, model_type, kernel_calls)
    print(f"{kind} {model_type}: {outcome}")
