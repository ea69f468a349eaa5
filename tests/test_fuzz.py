"""Property-based fuzzing of every public op (issue 14): hypothesis draws a case - shapes around
every vector and block boundary (0- and 1-sized dims included), head dims 1..256, GQA ratios,
strided, transposed, expanded (stride 0) and offset storage, broadcast masks with whole rows
masked, inf/NaN/huge/subnormal values, dtypes the op takes and some it must refuse - and the op
must either agree with the float64 reference by the FlashAttention rule (outputs and, for finite
inputs, every gradient) or refuse with a clear error naming itself. Never a crash, never a wrong
number.

Profiles (``FASTATTN_FUZZ_PROFILE``): ``ci`` (default; seeded, 400 cases, part of
``make test``) and ``long`` (``make fuzz``: randomised, thousands). A case is a plain dict: when
one fails, hypothesis prints it, and it goes into ``tests/fuzz_regressions.json``, which every run
replays first (``test_regressions``).

``FASTATTN_FUZZ_STATS=PATH`` writes how many cases each (op, backend) ran and how each ended
(checked, with gradients or not; refused) to PATH as JSON when the module's tests finish (one
file per pytest-xdist worker: PATH.gwN): the figures in README's "Reliability" section."""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
from typing import Any

import pytest
import torch
from conftest import ROUNDED, assert_parity, reference_attention_terms
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import fastattn
from fastattn import reference

settings.register_profile(
    "ci", max_examples=400, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
settings.register_profile(
    "long", max_examples=2000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
settings.load_profile(os.environ.get("FASTATTN_FUZZ_PROFILE", "ci"))

REGRESSIONS = pathlib.Path(__file__).with_name("fuzz_regressions.json")
# Lengths around the vector widths (8 fp32 lanes in ymm, 16 in zmm, 32 bf16) and the kernels'
# blocks (64 / 128 / 256 rows or keys), 1 included; 0 is put in the middle where a length may
# be 0. Hypothesis favours both ends of a list it samples from (and of an integer range): the
# lists below start and end with ordinary values, so that empty tensors, refused dtypes and
# special values stay occasional (FASTATTN_FUZZ_STATS counts how the cases ended).
SIZES = [17, 1, 2, 3, 7, 8, 9, 15, 16, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257]
LONG_ROWS = [511, 512, 513, 1023, 1024, 1025, 4095, 4096, 4097]  # rows past a tile / a page
HEAD_DIMS = [
    64,
    1,
    2,
    3,
    7,
    8,
    15,
    16,
    17,
    31,
    32,
    33,
    40,
    63,
    65,
    96,
    127,
    128,
    129,
    160,
    255,
    256,
]
ACCEPTED = ["float32", "bfloat16", "float16", "float64"]
REFUSED = ["int32", "int64", "bool", "complex64"]  # must be refused, never read as floats
LAYOUTS = ["contiguous", "offset", "sliced", "transposed", "expanded"]
VALUES = ["normal"] * 3 + ["specials", "huge", "subnormal"] + ["normal"] * 3
# triton: under the interpreter without CUDA; left out where it cannot run (tools/sanitize.sh).
_TRITON = fastattn.dispatch.unavailable_reason("triton", torch.device("cpu"), torch.float32)
BACKENDS = ["cpu", "cpu", "reference"] + (["triton"] if _TRITON is None else [])
# FASTATTN_FUZZ_BACKENDS=cpu (tools/cpu_tiers.py, on each lower CPU tier): draw that backend only,
# since the others do not depend on the tier.
if os.environ.get("FASTATTN_FUZZ_BACKENDS"):
    BACKENDS = [b for b in os.environ["FASTATTN_FUZZ_BACKENDS"].split(",") if b in BACKENDS]
MAX_ELEMENTS = 1 << 15  # per tensor: keeps a case to milliseconds on the CPU kernels
TRITON_MAX_ELEMENTS = 1 << 11  # the interpreter costs ~ms per block step


# ------------------------------------------------------------------------------- strategies
@st.composite
def _shape(draw: Any, rank_min: int, rank_max: int, last: list[int], cap: int) -> list[int]:
    rank = draw(st.integers(rank_min, rank_max))
    dims = [draw(st.sampled_from([2, 1, 0, 5, 3])) for _ in range(rank - 1)]
    dims.append(draw(st.sampled_from(last)))
    while math.prod(dims) > cap:  # halve the largest dim until the case is small
        i = max(range(len(dims)), key=lambda j: dims[j])
        dims[i] //= 2
    return dims


def _tensor_spec(draw: Any, shape: list[int]) -> dict[str, Any]:
    return {"shape": shape, "layout": draw(st.sampled_from(LAYOUTS)),
            "values": draw(st.sampled_from(VALUES))}  # fmt: skip


def _mask_spec(draw: Any, target: list[int], k: int) -> dict[str, Any] | None:
    """None, or a bool / float mask broadcastable to ``target``'s last ``k`` dims (each dim full
    or 1) with, sometimes, whole rows masked."""
    kind = draw(st.sampled_from(["none", "none", "bool", "float"]))
    if kind == "none":
        return None
    dims = [d if draw(st.booleans()) else 1 for d in target[len(target) - k :]]
    return {"kind": kind, "shape": dims, "dead_rows": draw(st.booleans())}


@st.composite
def cases(draw: Any) -> dict[str, Any]:
    op = draw(st.sampled_from(["softmax", "log_softmax", "layer_norm", "rms_norm", "attention",
                               "sdpa"]))  # fmt: skip
    refused = draw(st.sampled_from([False] * 5 + [True] + [False] * 4))  # a dtype to refuse
    case: dict[str, Any] = {
        "op": op,
        "dtype": draw(st.sampled_from(REFUSED if refused else ACCEPTED)),
        "backend": draw(st.sampled_from(BACKENDS)),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "grad": draw(st.booleans()),
    }
    cap = TRITON_MAX_ELEMENTS if case["backend"] == "triton" else MAX_ELEMENTS
    if op in ("softmax", "log_softmax"):
        shape = draw(_shape(1, 4, SIZES + [0] + LONG_ROWS, cap))
        case["x"] = _tensor_spec(draw, shape)
        case["dim"] = draw(st.integers(-len(shape), len(shape) - 1))
        case["scale"] = draw(st.sampled_from([None, 0.125, 3.0]))
        case["mask"] = (
            _mask_spec(draw, shape, len(shape)) if case["dim"] in (-1, len(shape) - 1) else None
        )
    elif op in ("layer_norm", "rms_norm"):
        shape = draw(_shape(1, 3, SIZES + [0] + LONG_ROWS, cap))
        case["x"] = _tensor_spec(draw, shape)
        case["affine"] = draw(st.sampled_from(["none", "weight", "weight+bias"]))
        case["residual"] = draw(st.booleans())
        case["eps"] = draw(st.sampled_from([1e-5, 1e-6, 0.1]))
    else:
        B, Hkv = draw(st.sampled_from([1, 2, 0, 1, 2])), draw(st.sampled_from([1, 2]))
        H = Hkv * draw(st.sampled_from([1, 2, 3]))  # MHA, GQA 2:1, 3:1 (MQA when Hkv = 1)
        Sq, Sk = draw(st.sampled_from(SIZES)), draw(st.sampled_from(SIZES))
        D = draw(st.sampled_from(HEAD_DIMS))
        # The variants (issue 15), v's own head_dim among them: attention() on every backend.
        variants = op == "attention"
        Dv = draw(st.sampled_from([D] * 3 + HEAD_DIMS)) if variants else D
        while B * H * max(Sq, Sk) * max(D, Dv) > cap:
            Sq, Sk = max(1, Sq // 2), max(1, Sk // 2)
        case["q"] = _tensor_spec(draw, [B, H, Sq, D])
        case["k"] = _tensor_spec(draw, [B, Hkv, Sk, D])
        case["v"] = _tensor_spec(draw, [B, Hkv, Sk, Dv])
        case["causal"] = draw(st.sampled_from([False, "top_left", "bottom_right"]))
        case["mask"] = _mask_spec(draw, [B, H, Sq, Sk], 4)
        if variants:
            sizes = st.sampled_from([-1, -1, 0, 1, 5, 37, 130])  # -1: unbounded
            case["window"] = [draw(sizes), draw(sizes)] if draw(st.booleans()) else None
            case["softcap"] = draw(st.sampled_from([0.0, 0.0, 0.5, 30.0]))
            case["sinks"] = draw(st.sampled_from([False, False, True]))
            case["alibi"] = draw(st.sampled_from([None, None, "heads", "batch_heads"]))
        if op == "sdpa":
            case["causal"] = draw(st.sampled_from([False, "top_left"]))
            if case["causal"]:
                case["mask"] = None  # torch refuses the two together
    return case


# ------------------------------------------------------------------------- materialising
def _make(spec: dict[str, Any], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A tensor of ``spec``'s shape, values and memory layout (its values in ``dtype``)."""
    shape, layout = spec["shape"], spec["layout"]
    logical = torch.randn(shape, generator=gen, dtype=torch.float64)
    kind = spec["values"]
    n = logical.numel()
    if n and kind == "specials":  # a few inf, -inf and NaN
        flat = logical.view(-1)
        idx = torch.randint(0, n, (3,), generator=gen)
        flat[idx[0]], flat[idx[1]], flat[idx[2]] = math.inf, -math.inf, math.nan
    elif kind == "huge":  # large, yet squares stay finite (1e30 < fp32 max), as a norm needs
        logical = logical * (1e150 if dtype == torch.float64 else 1e15)
    elif kind == "subnormal":
        logical = logical * 1e-39  # below fp32's smallest normal 1.2e-38
    if not dtype.is_floating_point:
        logical = (logical * 3).round()
    logical = logical.to(dtype)
    if layout == "offset" and n:
        buf = torch.empty(n + 3, dtype=dtype)
        return buf[3:].view(shape).copy_(logical)
    if layout == "sliced" and n:
        d = int(torch.randint(0, len(shape), (1,), generator=gen))
        big = torch.empty([s * 2 if i == d else s for i, s in enumerate(shape)], dtype=dtype)
        view = big.narrow(d, 0, shape[d] * 2)[(slice(None),) * d + (slice(None, None, 2),)]
        return view.copy_(logical)
    if layout == "transposed" and len(shape) >= 2:
        return logical.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "expanded" and n:
        wide = [i for i, s in enumerate(shape) if s > 1]
        if wide:
            d = wide[int(torch.randint(0, len(wide), (1,), generator=gen))]
            return logical.narrow(d, 0, 1).clone().expand(shape)
    return logical.clone()


def _mask(spec: dict[str, Any] | None, gen: torch.Generator) -> torch.Tensor | None:
    if spec is None:
        return None
    keep = torch.rand(spec["shape"], generator=gen) > 0.3
    if spec["dead_rows"] and keep.numel():  # a whole row hidden (a 1-D mask: all of it)
        if keep.dim() >= 2:
            keep[..., 0, :] = False
        else:
            keep[:] = False
    if spec["kind"] == "bool":
        return keep
    return torch.where(keep, torch.randn(spec["shape"], generator=gen), -math.inf)


def _build(case: dict[str, Any]) -> tuple[dict[str, torch.Tensor | None], torch.dtype]:
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = getattr(torch, case["dtype"])
    names = ("x",) if "x" in case else ("q", "k", "v")
    t: dict[str, torch.Tensor | None] = {n: _make(case[n], dtype, gen) for n in names}
    if case["op"] in ("layer_norm", "rms_norm"):
        n = case["x"]["shape"][-1]
        wdt = torch.float32 if dtype == torch.bfloat16 else dtype  # fp32 params for bf16, as HF
        t["weight"] = (
            (torch.randn(n, generator=gen) * 0.5 + 1).to(wdt)
            if "weight" in case["affine"]
            else None
        )
        has_bias = "bias" in case["affine"] and case["op"] == "layer_norm"  # rms_norm has none
        t["bias"] = torch.randn(n, generator=gen).to(wdt) if has_bias else None
        t["residual"] = (
            _make({**case["x"], "values": "normal"}, dtype, gen) if case["residual"] else None
        )
    t["mask"] = _mask(case.get("mask"), gen)
    if case.get("sinks"):  # per-head logits (a -inf one: a head without a sink)
        sk = torch.randn(case["q"]["shape"][1], generator=gen) * 2
        if sk.numel() > 1:
            sk[0] = -math.inf
        t["sinks"] = sk.to(dtype)
    if case.get("alibi"):  # fixed slopes, no gradient
        B, H = case["q"]["shape"][:2]
        t["alibi"] = torch.rand((H,) if case["alibi"] == "heads" else (B, H), generator=gen)
    if case["backend"] == "cpu" and "norm" not in case["op"] and dtype.is_floating_point:
        # The CPU softmax and attention kernels run with subnormals flushed to zero (FTZ/DAZ,
        # docs/api.md): what they compute on is the input flushed, so the oracle gets that too.
        tiny = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny
        for n, v in t.items():
            sub = isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 0
            if sub and ((v.double().abs() < tiny) & (v != 0)).any():  # keeps the layout if none
                t[n] = torch.where(v.double().abs() < tiny, torch.zeros((), dtype=v.dtype), v)
    return t, dtype


def _run(case: dict[str, Any], t: dict[str, Any], backend: str, opmath: torch.dtype | None):
    """The op on ``t`` through fastattn (``opmath`` None) or the eager reference in ``opmath``."""
    op = case["op"]
    if op in ("softmax", "log_softmax"):
        log, dim = op == "log_softmax", case["dim"]
        if opmath is None:
            return fastattn.softmax(t["x"], dim, scale=case["scale"], mask=t["mask"], log=log,
                                    backend=backend)  # fmt: skip
        x, m = t["x"].movedim(dim, -1), t["mask"]
        y = reference.softmax(x, m, 1.0 if case["scale"] is None else case["scale"], False, log,
                              opmath=opmath)  # fmt: skip
        return y.movedim(-1, dim)
    if op in ("layer_norm", "rms_norm"):
        n = t["x"].shape[-1]
        if opmath is None:
            fn = fastattn.layer_norm if op == "layer_norm" else fastattn.rms_norm
            args = (t["weight"], t["bias"]) if op == "layer_norm" else (t["weight"],)
            return fn(t["x"], n, *args, case["eps"], residual=t["residual"], backend=backend)
        y, h = reference.norm(t["x"], t["weight"], t["bias"], case["eps"], op == "rms_norm",
                              t["residual"], opmath=opmath)  # fmt: skip
        return y if h is None else (y, h)
    q, k, v, m = t["q"], t["k"], t["v"], t["mask"]
    causal = case["causal"]
    window = tuple(case["window"]) if case.get("window") else None
    var = {"softcap": case.get("softcap", 0.0), "sinks": t.get("sinks")}
    alibi = t.get("alibi")
    if opmath is None and op == "attention":
        return fastattn.attention(q, k, v, causal=causal if causal else False, attn_mask=m,
                                  backend=backend, window=window, alibi_slopes=alibi,
                                  **var)  # fmt: skip
    if opmath is None:  # sdpa: k/v heads repeated by enable_gqa
        os.environ["FASTATTN_BACKEND"] = backend
        try:
            return fastattn.scaled_dot_product_attention(
                q, k, v, attn_mask=m, is_causal=bool(causal), enable_gqa=True
            )
        finally:
            del os.environ["FASTATTN_BACKEND"]
    is_causal, offset, win = reference_attention_terms(q, k, causal, window)
    if alibi is not None:
        alibi = alibi.to(opmath)
    return reference.attention(q, k, v, m, None, is_causal, offset, window=win,
                               alibi_slopes=alibi, opmath=opmath, **var)[0]  # fmt: skip


def _leaves(t: dict[str, Any]) -> list[str]:
    return [n for n in ("x", "q", "k", "v", "weight", "bias", "residual", "sinks")
            if isinstance(t.get(n), torch.Tensor) and t[n].numel()]  # fmt: skip


# (op, backend, outcome) -> cases that ended so (FASTATTN_FUZZ_STATS); counted once passed.
STATS: collections.Counter[tuple[str, str, str]] = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _write_stats():
    yield
    path = os.environ.get("FASTATTN_FUZZ_STATS")
    if path:
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        rows = [{"op": o, "backend": b, "outcome": r, "cases": n} for (o, b, r), n in STATS.items()]
        pathlib.Path(f"{path}.{worker}" if worker else path).write_text(json.dumps(rows, indent=1))


def _norm_dx_terms(case: dict[str, Any], t64: dict[str, Any], g: torch.Tensor) -> float:
    """The scale of the terms a norm's dx sums, rstd * |w * dy|: dx = rstd * (w dy - mean(w dy)
    - xhat * mean(xhat w dy)) cancels to ~0 in short rows (a 2-element row's output is +-1
    whatever its input), where every fp32 evaluation, torch's included, errs at that scale."""
    h = t64["x"].detach()
    if t64.get("residual") is not None:
        h = h + t64["residual"].detach()
    ms = h.pow(2).mean(-1) if case["op"] == "rms_norm" else h.var(-1, unbiased=False)
    rstd = (ms + case["eps"]).rsqrt()
    w = t64.get("weight")
    wmax = float(w.detach().abs().max()) if isinstance(w, torch.Tensor) and w.numel() else 1.0
    return float(rstd.max()) * float(g.abs().max()) * wmax if rstd.numel() else 0.0


def _yardstick(eager: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor | None:
    """Eager's result as the rounding scale, except where its own low-precision math overflows
    (fp16 outputs past 65504; the gradient of a constant fp16 row, where rsqrt(var + eps)' is
    -1.6e7): the reference's value stands in there."""
    if eager is None:
        return None
    odd = torch.isfinite(eager.double()) != torch.isfinite(ref)
    return torch.where(odd, ref.to(eager.dtype), eager)


def check(case: dict[str, Any]) -> None:
    """``case`` through fastattn: refused cleanly, or equal to the float64 oracle by the rule."""
    if currently_in_test_context():
        note(f"case (for {REGRESSIONS.name}): {json.dumps(case)}")
    outcome = _check(case)
    STATS[(case["op"], case["backend"], outcome)] += 1


def _check(case: dict[str, Any]) -> str:
    t, dtype = _build(case)
    if not dtype.is_floating_point:
        with pytest.raises((TypeError, ValueError, RuntimeError), match=r"^fastattn\."):
            _run(case, t, case["backend"], None)
        return f"refused ({dtype})"
    if case["backend"] == "triton" and dtype == torch.float64:  # named, so it must say why not
        with pytest.raises(RuntimeError, match="backend 'triton' cannot run this call"):
            _run(case, t, "triton", None)
        return "refused (triton: float64)"
    finite = all(torch.isfinite(v.double()).all() for v in t.values() if isinstance(v, torch.Tensor)
                 and v.is_floating_point() and v is not t.get("mask"))  # fmt: skip
    # Gradients of moderate inputs only: at |x| ~ 1e15 a gradient that cancels (dS = P (dP -
    # delta) with P one-hot) keeps rounding at the scale of its terms, which no rule bounds.
    moderate = all(case[n]["values"] == "normal" for n in ("x", "q", "k", "v") if n in case)
    leaves = _leaves(t) if case["grad"] and finite and moderate else []
    t64 = {n: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point()
               and n != "mask" else v) for n, v in t.items()}  # fmt: skip
    for n in leaves:
        t[n] = t[n].detach().requires_grad_()
        t64[n] = t64[n].requires_grad_()
    got = _run(case, t, case["backend"], None)
    want = _run(case, t64, "reference", torch.float64)
    eager = _run(case, t, "reference", dtype) if dtype in ROUNDED else None
    outs = lambda r: r if isinstance(r, tuple) else (r,)  # noqa: E731
    # inf/NaN in the value of a key a query cannot see: unspecified (docs/attention.md). The
    # reference's P @ V gives 0 * inf = NaN there; a kernel that skips the key gives a number.
    # ALiBi's bias hides far keys the same way: their P underflows in fp32 (0 * inf = NaN), not
    # in the float64 oracle (tiny * inf = inf).
    hides = case.get("mask") or case.get("causal") or case.get("window") or case.get("alibi")
    hidden_v = "v" in t and hides and not torch.isfinite(t["v"].double()).all()
    # Subnormal scores' inputs beside inf/NaN ones: whether a kernel flushes a subnormal to 0
    # (the CPU kernels always do, the oracle then sees them flushed; GPU tensor cores and the
    # Triton interpreter may, value by value) decides whether subnormal * inf is inf or NaN:
    # unspecified (docs/attention.md), the finite rest is checked.
    flushed = case["backend"] == "triton" and not finite and any(
        case[n]["values"] == "subnormal" for n in ("q", "k") if n in case)  # fmt: skip
    for i, (a, b) in enumerate(zip(outs(got), outs(want), strict=True)):
        e = outs(eager)[i] if eager is not None else None
        if hidden_v or flushed:
            fin = torch.isfinite(b) & (torch.isfinite(a) if flushed else True)
            a, b, e = a[fin], b[fin], (e[fin] if e is not None else None)
        assert_parity(a, b, _yardstick(e, b), what=f"output {i}")
    if not any(o.numel() for o in outs(got)):
        return "checked: empty outputs"
    if not leaves:
        return "checked: outputs"
    gs = [torch.randn_like(o) for o in outs(got)]
    mine = torch.autograd.grad(outs(got), [t[n] for n in leaves], gs, allow_unused=True)
    ref = torch.autograd.grad(outs(want), [t64[n] for n in leaves], [g.double() for g in gs],
                              allow_unused=True)  # fmt: skip
    eg: tuple[torch.Tensor | None, ...] = (None,) * len(leaves)
    if dtype in ROUNDED:  # the gradients' rounding scale: eager in the same dtype
        te = {m: (v.detach().requires_grad_() if m in leaves else v) for m, v in t.items()}
        eo = outs(_run(case, te, "reference", dtype))
        eg = torch.autograd.grad(eo, [te[n] for n in leaves], gs, allow_unused=True)
    dv = dict(zip(leaves, ref, strict=True)).get("v")
    for n, a, b, e in zip(leaves, mine, ref, eg, strict=True):
        if a is None or b is None:
            assert a is None or not a.any(), f"d{n}: nonzero where the reference has none"
            continue
        # dq, dk sum dS terms that cancel to ~0 when one key takes all the weight: their
        # rounding is at the scale of dv (as tests/test_attention.py judges them).
        terms = float(dv.abs().max()) if n in ("q", "k") and dv is not None and dv.numel() else 0.0
        if n in ("x", "residual") and case["op"] in ("layer_norm", "rms_norm"):
            terms = _norm_dx_terms(case, t64, gs[0])
        assert_parity(a, b, _yardstick(e, b), what=f"d{n}", dtype=a.dtype, ref_scale=terms)
    return "checked: outputs and gradients"


# ----------------------------------------------------------------------------------- tests
def _regressions() -> list[dict[str, Any]]:
    return json.loads(REGRESSIONS.read_text()) if REGRESSIONS.exists() else []


@pytest.mark.parametrize(
    "case", _regressions(), ids=[f"{i}-{c['op']}" for i, c in enumerate(_regressions())]
)
def test_regressions(case):
    """Every case that once failed, replayed before the fuzzing (its "why" says what it found)."""
    if case["backend"] == "triton" and _TRITON is not None:
        pytest.skip(f"triton cannot run here: {_TRITON}")
    check({k: v for k, v in case.items() if k != "why"})


@given(case=cases())
def test_fuzz(case):
    check(case)
