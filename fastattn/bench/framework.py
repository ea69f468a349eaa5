"""The benchmark framework: case and implementation types, the float64 check, the registry of
case builders and the helpers the builders share.

A builder ``def <op>_cases(opts: Options) -> list[Case]`` lives in its own module
(``cases_<family>.py``) and is decorated with ``@register("<op>")``; :mod:`fastattn.bench.cases`
imports every builder module (which fills :data:`REGISTRY`) and builds the cases. This module
imports none of them, so the modules form a DAG: framework <- cases_* <- cases <- cli.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "DEFAULT_OPS",
    "DTYPES",
    "DTYPE_NAMES",
    "REGISTRY",
    "TOLERANCE",
    "Builder",
    "Case",
    "Check",
    "Fn",
    "Impl",
    "Inputs",
    "Options",
    "Out",
    "backend_label",
    "call_with",
    "compare",
    "compiled",
    "float64",
    "fwd_bwd",
    "oracle",
    "randn",
    "register",
]


Inputs = dict[str, torch.Tensor]
Out = torch.Tensor | tuple[torch.Tensor, ...]  # one result, or several each checked on its own
Fn = Callable[[Inputs], Out]

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
    runtimes: bool = True  # include the onnxruntime / OpenVINO peers (forward only; peers.py)
    # GFLOP/s of this machine per dtype name, for the "% peak" column (the CLI measures it,
    # limits.py; --peak overrides it); without a figure the column is empty
    peak_gflops: dict[str, float] = field(default_factory=dict)


@dataclass
class Impl:
    """An implementation: ``fn(inputs)`` returns the tensor(s) checked against the oracle."""

    name: str
    fn: Fn
    subject: bool = False  # fastattn's own implementation; peers are compared with it
    # A peer whose result is known to exceed the tolerance, and why: its check is still run and
    # shown ("inexact" with the error), but does not fail the run. Never set on fastattn's own.
    inexact: str = ""


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
    flops: int = 0  # arithmetic of the op (compute-bound ops): GFLOP/s and % of peak reported
    peak_gflops: float = math.nan  # the machine's peak for this dtype
    memory: bool = False  # also measure each impl's peak extra memory (one more, untimed call)
    tokens: int = 0  # tokens one call processes (model cases): tokens/s reported
    # Replaces ``compare`` as the check of each result (e.g. greedy tokens in low precision).
    check: Callable[[Out, Out, torch.dtype], Check] | None = None

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


def compare(out: Out, ref: Out, dtype: torch.dtype) -> Check:
    """Check ``out`` against the float64 ``ref`` with the tolerance of ``dtype``.

    A tuple (e.g. a fused op's two outputs, or the gradients of every input) is checked element
    by element, each against its own scale; the worst element decides.
    """
    if not isinstance(out, tuple) and not isinstance(ref, tuple):
        return _compare_one(out, ref, dtype)
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    if len(outs) != len(refs):
        return Check(False, math.inf, math.inf, f"{len(outs)} results, expected {len(refs)}")
    checks = [_compare_one(o, r, dtype) for o, r in zip(outs, refs, strict=True)]
    k = max(range(len(checks)), key=lambda j: (not checks[j].ok, checks[j].worst_ratio))
    worst = checks[k]
    head, _, rest = worst.message.partition(": ")
    msg = f"{head}: result #{k} of {len(checks)}: {rest}" if rest else worst.message
    return Check(worst.ok, max(c.max_err for c in checks), worst.worst_ratio, msg)


def _compare_one(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> Check:
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
DEFAULT_OPS: list[str] = []  # the default suite (``fastattn-bench`` without OPS, ``make bench``)


def register(op: str, default: bool = True) -> Callable[[Builder], Builder]:
    def deco(builder: Builder) -> Builder:
        REGISTRY[op] = builder
        if default and op not in DEFAULT_OPS:
            DEFAULT_OPS.append(op)
        return builder

    return deco


# ---------------------------------------------------------------------------------- helpers
def compiled(fn: Callable[..., Out]) -> Callable[..., Out]:
    """``torch.compile(fn)`` for one static shape per case; compiles lazily on the first call."""
    cfg = torch._dynamo.config
    for knob in ("recompile_limit", "cache_size_limit"):  # one entry per case shares fn's code
        if hasattr(cfg, knob):
            setattr(cfg, knob, max(int(getattr(cfg, knob)), 512))
    return torch.compile(fn, dynamic=False)


def backend_label(op: str, opts: Options, dtype: torch.dtype, kernel: str | None = None) -> str:
    """``fastattn[<backend that will run>]``, e.g. ``fastattn[cpu]``; ``kernel``: the C++ op
    behind ``op`` when its name differs (``norm`` for ``layer_norm``)."""
    from fastattn import dispatch

    cpp = dispatch.cpp_kernels(kernel or op)
    try:
        name = dispatch.select(opts.backend, torch.device(opts.device), dtype, op, cpp)
        return f"fastattn[{name}]"
    except RuntimeError:  # the backend cannot run here: the call itself will say why
        return f"fastattn[{opts.backend}?]"


def randn(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def call_with(f: Callable[..., Out], *keys: str) -> Fn:
    """``inputs -> f(inputs[keys[0]], inputs[keys[1]], ...)``."""
    return lambda i: f(*(i[k] for k in keys))


def fwd_bwd(forward: Fn, wrt: Sequence[str] = ("x",), upstream: Sequence[str] = ("g",)) -> Fn:
    """Forward, then backward of its output(s) with the upstream gradients ``inputs[upstream]``;
    returns the gradients of ``inputs[wrt]`` (a tensor when there is one)."""

    def run(inp: Inputs) -> Out:
        outs = forward(inp)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = torch.autograd.grad(outs, [inp[k] for k in wrt], [inp[k] for k in upstream])
        return grads[0] if len(grads) == 1 else tuple(grads)

    return run


def float64(inp: Inputs, wrt: Sequence[str] = ()) -> Inputs:
    """Detached float64 copies of the floating-point inputs (``wrt`` requiring grad)."""
    return {
        k: v.detach().double().requires_grad_(k in wrt) if v.is_floating_point() else v
        for k, v in inp.items()
    }


def oracle(fn: Fn, wrt: Sequence[str] | None = None, upstream: Sequence[str] = ("g",)) -> Fn:
    """``fn`` on float64 copies of the inputs; with ``wrt``, its gradients (see fwd_bwd)."""
    if wrt is None:
        return lambda i: fn(float64(i))
    grads = fwd_bwd(fn, wrt, upstream)
    return lambda i: grads(float64(i, wrt))
