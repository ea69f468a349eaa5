"""``fastattn-bench model``: whole-model cases — a training step (forward, loss, backward) and a
greedy generation run of the reference Transformer (``fastattn.models``) and of a small
HuggingFace Llama, with eager attention, torch's SDPA, ``torch.compile`` of the SDPA model and
fastattn, on the same weights and inputs. Reports tokens/s and each call's peak extra memory.

The oracle is the eager model in float64. A training step is checked by its loss (the gradients
are the same computation's backward, checked op by op in the tests); a generation by its tokens:
in fp32 they must be the oracle's; in bf16, where greedy decoding may legitimately pick another
token at a near tie, each token must be a greedy choice of the oracle, fed the tokens before it,
within the dtype's tolerance on the logits.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch

from fastattn.bench.framework import (
    DTYPE_NAMES,
    TOLERANCE,
    Case,
    Check,
    Impl,
    Inputs,
    Options,
    Out,
    compare,
    register,
)
from fastattn.models import Transformer, TransformerConfig

__all__ = ["MODEL_CFG", "NEW_TOKENS", "PROMPT", "QUICK_SEQ", "TRAIN_SEQ", "model_cases"]

# A small Llama-shaped model: 4 layers of width 256, 8 heads over 4 kv heads (GQA), RMSNorm, RoPE.
MODEL_CFG = dict(vocab_size=256, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=4096)
TRAIN_SEQ, QUICK_SEQ = 2048, 128
PROMPT, NEW_TOKENS = 128, 32


def _train_flops(params: int, cfg: TransformerConfig, tokens: int, seq: int) -> int:
    """Model FLOPs of a training step: 6 per parameter per token for the matmuls, plus the
    causal attention (2*T^2*D forward per layer and head dim total, x3.5 with the backward)."""
    return 6 * params * tokens + int(3.5 * 2 * seq * seq * cfg.dim * cfg.n_layers) * (tokens // seq)


def _train_step(model: torch.nn.Module, inp: Inputs) -> torch.Tensor:
    for p in model.parameters():
        p.grad = None
    _, loss = model(inp["idx"], inp["tgt"])
    loss.backward()
    return loss.detach().float()


def _hf_train_step(model: torch.nn.Module, inp: Inputs) -> torch.Tensor:
    for p in model.parameters():
        p.grad = None
    loss = model(input_ids=inp["idx"], labels=inp["idx"]).loss
    loss.backward()
    return loss.detach().float()


def _models(
    make: Callable[[str], torch.nn.Module], dt: torch.dtype, kinds: tuple[str, ...]
) -> dict[str, torch.nn.Module]:
    """One model per kind, all with the weights of the first (built once, seeded)."""
    torch.manual_seed(0)
    base = make("eager")
    out = {}
    for kind in kinds:
        m = copy.deepcopy(base) if kind == "eager" else make(kind)
        m.load_state_dict(base.state_dict())
        out[kind] = m.to(dt)
    out["oracle"] = copy.deepcopy(base).double()
    return out


def _reference_model(kind: str) -> torch.nn.Module:
    return Transformer(TransformerConfig(**MODEL_CFG), kernels=kind)  # type: ignore[arg-type]


def _hf_llama(kind: str) -> torch.nn.Module:
    import transformers

    from fastattn.integrations import transformers as fa_hf

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688,
                                   num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=4, max_position_embeddings=4096)  # fmt: skip
    impl = "sdpa" if kind == "fastattn" else kind
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=impl)
    if kind == "fastattn":
        fa_hf.apply(model)
    return model


def _gen(model: Any, inp: Inputs, hf: bool) -> torch.Tensor:
    with torch.no_grad():
        if hf:
            out = model.generate(inp["idx"], max_new_tokens=NEW_TOKENS, do_sample=False,
                                 min_new_tokens=NEW_TOKENS, pad_token_id=0)  # fmt: skip
        else:
            out = model.generate(inp["idx"], NEW_TOKENS)
    return out.double()


def _greedy_check(oracle: Callable[[], torch.nn.Module], hf: bool):
    """The check of a generation: the oracle's tokens, or (low precision) tokens each of which is
    the oracle's greedy choice given the tokens before it, up to the dtype's logit tolerance."""

    def check(out: Out, ref: Out, dtype: torch.dtype) -> Check:
        exact = compare(out, ref, dtype)  # (on tokens, it passes only when all are equal)
        if exact.ok or dtype == torch.float32:
            return exact
        if not (isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor)):
            return exact
        if out.shape != ref.shape:
            return exact
        differ = int((out != ref).sum())
        tokens = out.long()
        with torch.no_grad():  # teacher-forced: the logits that chose each generated token
            m = oracle()
            logits = m(input_ids=tokens).logits if hf else m(tokens)[0]
        logits = logits[:, PROMPT - 1 : -1].double()
        best = logits.max(-1).values
        gap = best - logits.gather(-1, tokens[:, PROMPT:, None]).squeeze(-1)
        atol_rel, rtol = TOLERANCE[dtype]
        ratio = float((gap / (atol_rel * float(best.abs().max()) + rtol * best.abs())).max())
        ok = ratio <= 1.0
        msg = (f"{differ} of {NEW_TOKENS} tokens differ from the oracle's, each within "
               f"{ratio:.2f} x the logit bound of its greedy choice")  # fmt: skip
        return Check(ok, float(gap.max()), ratio, ("ok: " if ok else "MISMATCH: ") + msg)

    return check


def _inputs(dev: torch.device, seq: int) -> Inputs:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 256, (1, seq + 1), generator=g)
    return {"idx": idx[:, :-1].to(dev), "tgt": idx[:, 1:].to(dev)}


def _prompt(dev: torch.device) -> Inputs:
    g = torch.Generator().manual_seed(2)
    return {"idx": torch.randint(0, 256, (1, PROMPT), generator=g).to(dev)}


def _family_cases(
    name: str, make: Callable[[str], torch.nn.Module], hf: bool, dt: torch.dtype, opts: Options
) -> list[Case]:
    """The training-step case and the generation case of one model family."""
    seq = QUICK_SEQ if opts.quick else TRAIN_SEQ
    step = _hf_train_step if hf else _train_step

    @functools.lru_cache(maxsize=1)  # built on first use, shared by the cases' impls
    def models() -> dict[str, torch.nn.Module]:
        return _models(make, dt, ("eager", "sdpa", "fastattn"))

    def train(kind: str, compile_: bool = False) -> Callable[[Inputs], torch.Tensor]:
        def fn(inp: Inputs) -> torch.Tensor:
            m = models()[kind]
            return step(_compiled(m) if compile_ else m, inp)

        return fn

    impls = [Impl("fastattn", train("fastattn"), subject=True), Impl("eager", train("eager")),
             Impl("sdpa", train("sdpa"))]  # fmt: skip
    if opts.compile:
        impls.append(Impl("compile(sdpa)", train("sdpa", compile_=True)))
    make_inputs = functools.partial(_inputs, seq=seq)
    case = Case(name, "train step", (1, seq), dt, make_inputs, train("oracle"), 0, impls,
                memory=True)  # fmt: skip
    cfg = TransformerConfig(**MODEL_CFG)  # type: ignore[arg-type]
    params = sum(p.numel() for p in _reference_model("eager").parameters())
    case.flops = _train_flops(params, cfg, seq, seq)
    case.peak_gflops = opts.peak_gflops.get(DTYPE_NAMES.get(dt, ""), float("nan"))
    case.tokens = seq

    def gen(kind: str) -> Callable[[Inputs], torch.Tensor]:
        return lambda inp: _gen(models()[kind], inp, hf)

    gen_impls = [Impl("fastattn", gen("fastattn"), subject=True), Impl("eager", gen("eager")),
                 Impl("sdpa", gen("sdpa"))]  # fmt: skip
    generation = Case(name, f"generate {NEW_TOKENS}", (1, PROMPT), dt, _prompt, gen("oracle"), 0,
                      gen_impls, memory=True)  # fmt: skip
    generation.tokens = NEW_TOKENS
    generation.check = _greedy_check(lambda: models()["oracle"], hf)
    return [case, generation]


@register("model", default=False)  # minutes per case here: `make bench-model`
def model_cases(opts: Options) -> list[Case]:
    """Training step (seqlen 2048, batch 1) and greedy generation (128-token prompt, 32 new
    tokens) of the reference Transformer and of a HF Llama: eager, SDPA, compile(SDPA), fastattn."""
    cases: list[Case] = []
    for name, make, hf in (("transformer", _reference_model, False), ("hf-llama", _hf_llama, True)):
        for dt in opts.dtypes:
            if dt in (torch.float32, torch.bfloat16):
                cases += _family_cases(name, make, hf, dt, opts)
    return cases


@functools.lru_cache(maxsize=8)
def _compiled(model: torch.nn.Module) -> Any:
    return torch.compile(model, dynamic=False)
