"""Benchmark cases: inputs, the float64 oracle, the bytes moved, fastattn and its peers.

Shared by the ``fastattn-bench`` CLI and the pytest-benchmark suite (``benchmarks/``). To add an
op, write a builder ``def <op>_cases(opts: Options) -> list[Case]`` and decorate it with
``@register("<op>")``: the CLI's positional ``OPS`` and the default suite pick it up.

Building cases is cheap (no tensors, no compilation): inputs are made by ``Case.make_inputs``
and ``torch.compile`` peers compile on their first call, which the runners exclude from timing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Inputs = dict[str, torch.Tensor]
Fn = Callable[[Inputs], torch.Tensor]

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Error bound of a result against the float64 oracle, per dtype: on every finite entry
# |out - ref| <= ATOL_REL * max|ref| + RTOL * |ref|, and NaN/±inf in the same places.
# The eager bf16 chain, which rounds x*scale and x*scale+mask to bf16, uses ~30% of the bf16
# bound on the default cases (1.5% relative error); a dropped mask or scale is far outside it.
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 5e-2),
}


@dataclass(frozen=True)
class Options:
    """What the runner asked for; each builder turns it into its own cases."""

    quick: bool = False
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
    device: str = "cpu"
    backend: str = "auto"
    shapes: tuple[tuple[int, ...], ...] | None = None  # overrides the builder's shapes
    compile: bool = True  # include torch.compile peers


@dataclass
class Impl:
    """An implementation: ``fn(inputs)`` returns the tensor that is checked against the oracle."""

    name: str
    fn: Fn
    subject: bool = False  # fastattn's own implementation; peers are compared with it


@dataclass
class Case:
    op: str
    variant: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make_inputs: Callable[[torch.device], Inputs]
    reference: Fn  # float64 result on the same inputs
    nbytes: int  # bytes of the fused op: each input read once, each output written once
    impls: list[Impl] = field(default_factory=list)

    @property
    def shape_str(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def dtype_str(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype).removeprefix("torch."))

    @property
    def id(self) -> str:
        return f"{self.op}-{self.variant}-{self.shape_str}-{self.dtype_str}".replace(" ", "_")


@dataclass
class Check:
    """Outcome of comparing one result with the float64 oracle."""

    ok: bool
    max_err: float
    worst_ratio: float  # max over entries of error / bound; <= 1 passes
    message: str


def compare(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> Check:
    """Check ``out`` against the float64 ``ref`` with the tolerance of ``dtype``."""
    if tuple(out.shape) != tuple(ref.shape):
        return Check(False, math.inf, math.inf, f"shape {tuple(out.shape)} != {tuple(ref.shape)}")
    o = out.detach().to(torch.float64)
    for what, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        if not torch.equal(test(o), test(ref)):
            n = int((test(o) != test(ref)).sum())
            return Check(False, math.inf, math.inf, f"{what} pattern differs at {n} entries")
    fin = torch.isfinite(ref)
    if not bool(fin.any()):
        return Check(True, 0.0, 0.0, "ok (no finite entries)")
    atol_rel, rtol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    r = ref[fin]
    err = (o[fin] - r).abs()
    bound = atol_rel * float(r.abs().max()) + rtol * r.abs()
    ratio = torch.where(bound > 0, err / bound.clamp_min(1e-300), err * math.inf)
    ratio = torch.nan_to_num(ratio, nan=0.0)  # 0 * inf where err == 0
    worst, max_err = float(ratio.max()), float(err.max())
    ok = worst <= 1.0
    msg = (
        f"max err {max_err:.3e} = {worst:.2f} x bound (atol {atol_rel:g}*max|ref| + rtol {rtol:g})"
    )
    return Check(ok, max_err, worst, ("ok: " if ok else "MISMATCH: ") + msg)


# ------------------------------------------------------------------------------- registry
Builder = Callable[[Options], list[Case]]
REGISTRY: dict[str, Builder] = {}


def register(op: str) -> Callable[[Builder], Builder]:
    def deco(builder: Builder) -> Builder:
        REGISTRY[op] = builder
        return builder

    return deco


def build(ops: list[str] | None, opts: Options) -> list[Case]:
    """Cases of ``ops`` (all registered ops when None or empty), in registry order."""
    names = list(REGISTRY) if not ops else ops
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; registered: {', '.join(REGISTRY)}")
    return [case for name in names for case in REGISTRY[name](opts)]


# ---------------------------------------------------------------------------------- helpers
def compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``torch.compile(fn)`` for one static shape per case; compiles lazily on the first call."""
    cfg = torch._dynamo.config
    for knob in ("recompile_limit", "cache_size_limit"):  # one entry per case shares fn's code
        if hasattr(cfg, knob):
            setattr(cfg, knob, max(int(getattr(cfg, knob)), 512))
    return torch.compile(fn, dynamic=False)


def backend_label(op: str, opts: Options, dtype: torch.dtype) -> str:
    """``fastattn[<backend that will run>]``, e.g. ``fastattn[cpu]``."""
    from fastattn import dispatch

    try:
        return f"fastattn[{dispatch.select(opts.backend, torch.device(opts.device), dtype, op)}]"
    except RuntimeError:  # the backend cannot run here: the call itself will say why
        return f"fastattn[{opts.backend}?]"


def randn(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def call_with(f: Callable[..., torch.Tensor], *keys: str) -> Fn:
    """``inputs -> f(inputs[keys[0]], inputs[keys[1]], ...)``."""
    return lambda i: f(*(i[k] for k in keys))


def fwd_bwd(forward: Callable[[torch.Tensor], torch.Tensor]) -> Fn:
    """Forward then backward with the upstream gradient ``inputs["g"]``; returns ``x.grad``."""

    def run(inp: Inputs) -> torch.Tensor:
        x = inp["x"]
        x.grad = None
        forward(x).backward(inp["g"])
        assert x.grad is not None
        return x.grad

    return run


# ---------------------------------------------------------------------------------- softmax
SOFTMAX_SHAPES: tuple[tuple[int, ...], ...] = ((1024, 4096), (32, 131072))
SOFTMAX_QUICK_SHAPES: tuple[tuple[int, ...], ...] = ((64, 1024), (4, 32768))
SCALE = 0.125  # 1/sqrt(head_dim 64)


def _bias_chain(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x * SCALE + bias, dim=-1)


def _keypad_chain(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.softmax((x * SCALE).masked_fill(~keep, float("-inf")), dim=-1)


def _x_inputs(dev: torch.device, shape: tuple[int, ...], dt: torch.dtype) -> Inputs:
    return {"x": randn(shape, dt, dev, seed=0)}


def _bias_inputs(dev: torch.device, shape: tuple[int, ...], dt: torch.dtype) -> Inputs:
    """An additive float mask (1, C) broadcast over rows, as an attention bias."""
    return {"x": randn(shape, dt, dev, seed=0), "bias": randn((1, shape[-1]), dt, dev, seed=1)}


def _keypad_inputs(dev: torch.device, shape: tuple[int, ...], dt: torch.dtype) -> Inputs:
    """x (B, L, C) and a bool key-padding mask (B, 1, C): batch b keeps its first len_b keys."""
    b, _, c = shape
    lengths = torch.randint(c // 2, c + 1, (b, 1, 1), generator=torch.Generator().manual_seed(2))
    return {"x": randn(shape, dt, dev, seed=0), "keep": (torch.arange(c) < lengths).to(dev)}


def _grad_inputs(dev: torch.device, shape: tuple[int, ...], dt: torch.dtype) -> Inputs:
    return {"x": randn(shape, dt, dev, seed=0).requires_grad_(), "g": randn(shape, dt, dev, 3)}


def _ref_softmax(inp: Inputs) -> torch.Tensor:
    return torch.softmax(inp["x"].detach().double(), dim=-1)


def _ref_log_softmax(inp: Inputs) -> torch.Tensor:
    return torch.log_softmax(inp["x"].double(), dim=-1)


def _ref_bias(inp: Inputs) -> torch.Tensor:
    return torch.softmax(inp["x"].double() * SCALE + inp["bias"].double(), dim=-1)


def _ref_keypad(inp: Inputs) -> torch.Tensor:
    z = (inp["x"].double() * SCALE).masked_fill(~inp["keep"], float("-inf"))
    return torch.softmax(z, dim=-1)


def _ref_softmax_bwd(inp: Inputs) -> torch.Tensor:
    y, g = _ref_softmax(inp), inp["g"].double()
    return y * (g - (g * y).sum(-1, keepdim=True))


@register("softmax")
def softmax_cases(opts: Options) -> list[Case]:
    """Plain, log, scale + additive bias, scale + bool key padding, and forward+backward."""
    import fastattn

    be = opts.backend
    cases: list[Case] = []
    for shape in opts.shapes or (SOFTMAX_QUICK_SHAPES if opts.quick else SOFTMAX_SHAPES):
        rows, cols = math.prod(shape[:-1]), shape[-1]
        n = rows * cols
        nb = math.gcd(rows, 8)  # key-padding batches: x seen as (nb, rows / nb, cols)
        pad_shape = (nb, rows // nb, cols)
        for dt in opts.dtypes:
            es = torch.empty((), dtype=dt).element_size()
            fa = backend_label("softmax", opts, dt)

            def case(
                variant: str,
                shp: tuple[int, ...],
                make: Callable[..., Inputs],
                ref: Fn,
                nbytes: int,
                impls: list[Impl],
                dt: torch.dtype = dt,
            ) -> None:
                inputs = functools.partial(make, shape=shp, dt=dt)
                cases.append(Case("softmax", variant, shp, dt, inputs, ref, nbytes, impls))

            def fast(mask: str | None = None, fa: str = fa, **kw: Any) -> Impl:
                def fn(i: Inputs) -> torch.Tensor:
                    m = None if mask is None else i[mask]
                    return fastattn.softmax(i["x"], mask=m, backend=be, **kw)

                return Impl(fa, fn, subject=True)

            plain = [fast(), Impl("torch.softmax", lambda i: torch.softmax(i["x"], dim=-1))]
            case("softmax", shape, _x_inputs, _ref_softmax, 2 * n * es, plain)
            lg = [
                fast(log=True),
                Impl("torch.log_softmax", lambda i: torch.log_softmax(i["x"], -1)),
            ]
            case("log_softmax", shape, _x_inputs, _ref_log_softmax, 2 * n * es, lg)
            bias = [
                fast("bias", scale=SCALE),
                Impl("eager chain", call_with(_bias_chain, "x", "bias")),
            ]
            pad = [
                fast("keep", scale=SCALE),
                Impl("eager chain", call_with(_keypad_chain, "x", "keep")),
            ]
            if opts.compile:
                cb, cp = compiled(_bias_chain), compiled(_keypad_chain)
                bias.append(Impl("torch.compile(chain)", call_with(cb, "x", "bias")))
                pad.append(Impl("torch.compile(chain)", call_with(cp, "x", "keep")))
            case("scale+bias(1,C)", shape, _bias_inputs, _ref_bias, 2 * n * es + cols * es, bias)
            pad_bytes = 2 * n * es + nb * cols  # the bool mask: one byte per (batch, key)
            case("scale+keypad(B,1,C)", pad_shape, _keypad_inputs, _ref_keypad, pad_bytes, pad)
            # Forward reads x and writes y; backward reads dy and y and writes dx.
            grad = [
                Impl(fa, fwd_bwd(lambda x: fastattn.softmax(x, backend=be)), subject=True),
                Impl("torch.softmax", fwd_bwd(lambda x: torch.softmax(x, dim=-1))),
            ]
            case("softmax fwd+bwd", shape, _grad_inputs, _ref_softmax_bwd, 5 * n * es, grad)
    return cases
