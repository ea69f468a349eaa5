"""``fastattn-bench varlen`` (issue 16): a training step of the reference Transformer on packed
documents — fastattn's varlen attention — against the same documents padded to the longest and
run with torch's SDPA (and fastattn's own padded path), and packed under SDPA with the
block-diagonal mask a packed batch otherwise needs. Reports tokens/s (real tokens only) and each
call's peak extra memory. The oracle is the float64 eager model run on each document alone; every
impl's loss (mean cross-entropy over the same real tokens) is checked against it."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastattn.bench.framework import DTYPE_NAMES, Case, Impl, Inputs, Options, Out, register
from fastattn.models import Transformer, TransformerConfig

__all__ = ["DOCS", "varlen_cases"]

# The model of `fastattn-bench model` (4 layers of width 256, 8 heads over 4 kv heads).
CFG = dict(vocab_size=256, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=4096)
DOCS, DOC_RANGE, QUICK_RANGE = 8, (64, 2048), (8, 64)  # documents, their lengths drawn in range


def _lengths(quick: bool) -> list[int]:
    lo, hi = QUICK_RANGE if quick else DOC_RANGE
    g = torch.Generator().manual_seed(16)
    return torch.randint(lo, hi + 1, (DOCS,), generator=g).tolist()


def _inputs(dev: torch.device, lengths: list[int]) -> Inputs:
    """The documents packed (idx ``(1, total)``, cu_seqlens) and padded to the longest (``(docs,
    longest)``), with next-token targets inside each document (-100: none, ignored)."""
    g = torch.Generator().manual_seed(17)
    docs = [torch.randint(0, 256, (n,), generator=g) for n in lengths]
    tgts = [torch.cat([d[1:], d.new_tensor([-100])]) for d in docs]
    longest = max(lengths)
    pad = torch.zeros(len(docs), longest, dtype=torch.long)
    pad_t = torch.full((len(docs), longest), -100, dtype=torch.long)
    for i, (d, t) in enumerate(zip(docs, tgts, strict=True)):
        pad[i, : len(d)], pad_t[i, : len(t)] = d, t
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"idx": torch.cat(docs)[None].to(dev), "tgt": torch.cat(tgts)[None].to(dev),
            "cu": cu.to(dev), "pad": pad.to(dev), "pad_tgt": pad_t.to(dev)}  # fmt: skip


def _step(model: torch.nn.Module, idx, tgt, cu=None) -> torch.Tensor:
    for p in model.parameters():
        p.grad = None
    _, loss = model(idx, tgt, cu_seqlens=cu)
    loss.backward()
    return loss.detach().double()


def _oracle(model: torch.nn.Module, inp: Inputs) -> torch.Tensor:
    """Mean cross-entropy of the real tokens, each document alone, in float64 (no backward)."""
    cu, total, count = inp["cu"].tolist(), 0.0, 0
    with torch.no_grad():
        for a, b in zip(cu, cu[1:], strict=False):
            logits, _ = model(inp["idx"][:, a:b])
            t = inp["tgt"][0, a:b]
            total += float(F.cross_entropy(logits[0], t, ignore_index=-100, reduction="sum"))
            count += int((t != -100).sum())
    return torch.tensor(total / count, dtype=torch.float64)


def _train(models: Callable[[], dict], kind: str, packed: bool) -> Callable[[Inputs], Out]:
    """A training step of ``models()[kind]`` on the packed or the padded documents."""

    def fn(i: Inputs) -> Out:
        if packed:
            return _step(models()[kind], i["idx"], i["tgt"], i["cu"])
        return _step(models()[kind], i["pad"], i["pad_tgt"])

    return fn


@register("varlen", default=False)
def varlen_cases(opts: Options) -> list[Case]:
    """The packed training step (8 documents of 64-2048 tokens) in fp32 and bf16."""
    lengths = _lengths(opts.quick)
    cases = []
    for dt in opts.dtypes:
        if dt not in (torch.float32, torch.bfloat16):
            continue

        @functools.lru_cache(maxsize=1)
        def models(dt: torch.dtype = dt) -> dict[str, torch.nn.Module]:
            torch.manual_seed(0)
            base = Transformer(TransformerConfig(**CFG))  # type: ignore[arg-type]
            out: dict[str, torch.nn.Module] = {}
            for kind in ("fastattn", "sdpa"):
                m = Transformer(TransformerConfig(**CFG), kernels=kind)  # type: ignore[arg-type]
                m.load_state_dict(base.state_dict())
                out[kind] = m.to(dt)
            out["oracle"] = base.double()
            return out

        impls = [
            Impl("fastattn packed (varlen)", _train(models, "fastattn", True), subject=True),
            Impl("sdpa padded to the longest", _train(models, "sdpa", False)),
            Impl("fastattn padded to the longest", _train(models, "fastattn", False)),
            Impl("sdpa packed (block-diagonal mask)", _train(models, "sdpa", True)),
        ]
        make = functools.partial(_inputs, lengths=lengths)
        variant = f"train step, {DOCS} docs {min(lengths)}-{max(lengths)} tokens"

        def oracle(i: Inputs, m: Callable[[], dict] = models) -> torch.Tensor:
            return _oracle(m()["oracle"], i)

        case = Case("transformer", variant, (1, sum(lengths)), dt, make, oracle, 0, impls,
                    memory=True)  # fmt: skip
        case.tokens = sum(lengths)
        case.peak_gflops = opts.peak_gflops.get(DTYPE_NAMES.get(dt, ""), float("nan"))
        cases.append(case)
    return cases
