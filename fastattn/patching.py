"""``fastattn.patch(model)``: swap a model's torch modules for their fastattn twins in place, and
``fastattn.unpatch(model)`` to swap them back.

The swapped module shares the original's parameters and buffers (the same ``nn.Parameter``
objects: devices, dtypes, ``requires_grad``, optimizer state and train/eval mode carry over) and
keeps its ``state_dict`` keys, so checkpoints load either way.

A model that calls ``torch.nn.functional.scaled_dot_product_attention`` itself (nanoGPT style)
has no module to swap: ``patch`` says so in its report, and ``with fastattn.sdpa_scope():`` runs
such a model on fastattn's attention for the duration of a block.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from fastattn import nn

OPS = ("attention", "layer_norm", "rms_norm", "softmax")
# torch class -> (op name, fastattn class); the fastattn classes subclass the torch ones.
_SWAPS: dict[type[torch.nn.Module], tuple[str, type[torch.nn.Module]]] = {
    torch.nn.MultiheadAttention: ("attention", nn.MultiheadAttention),
    torch.nn.LayerNorm: ("layer_norm", nn.LayerNorm),
    torch.nn.RMSNorm: ("rms_norm", nn.RMSNorm),
    torch.nn.Softmax: ("softmax", nn.Softmax),
}
_FASTATTN = {fa: torch_cls for torch_cls, (_, fa) in _SWAPS.items()}


@dataclass
class PatchReport:
    """What :func:`patch` did: ``replaced`` and ``left`` hold ``(module name, class name,
    detail)`` triples: the new class for replaced modules, the reason for the others."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastattn.patch: replaced {len(self.replaced)}, left {len(self.left)}"]
        lines += [f"  replaced {n or '<root>'} ({c}) -> {d}" for n, c, d in self.replaced]
        lines += [f"  left {n or '<root>'} ({c}): {d}" for n, c, d in self.left]
        return "\n".join(lines)


_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")


def _rmsnorm_like(module: torch.nn.Module) -> tuple[str | None, str]:
    """``(eps attribute, "")`` when ``module`` is an RMSNorm of another library that computes
    ``x * rsqrt(mean(x^2) + eps) * weight`` (checked on a probe input), else ``(None, why)``."""
    params = dict(module.named_parameters(recurse=False))
    eps_attr = next((a for a in _EPS_ATTRS if isinstance(getattr(module, a, None), float)), None)
    if list(params) != ["weight"] or params["weight"].dim() != 1 or list(module.children()):
        return None, "an RMSNorm-named class of another structure"
    if eps_attr is None:
        return None, "no float epsilon attribute"
    candidate = nn.RMSNormAdapter(module, eps_attr)
    w = params["weight"]
    probe = torch.randn(3, w.shape[0], device=w.device, dtype=torch.float32) * 3 + 1
    with torch.no_grad():
        want, got = module(probe).float(), candidate(probe).float()
    if want.shape != got.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        return None, "computes something else than x * rsqrt(mean(x^2) + eps) * weight"
    return eps_attr, ""


SDPA_HINT = (
    "calls torch.nn.functional.scaled_dot_product_attention itself, which patch() cannot swap "
    "(no module to replace): run it inside `with fastattn.sdpa_scope():` to route that call to "
    "fastattn.scaled_dot_product_attention"
)


_SDPA_CALLERS: dict[type, bool] = {}


def _calls_sdpa(cls: type[torch.nn.Module]) -> bool:
    """Whether ``cls.forward`` (a class outside torch) names scaled_dot_product_attention."""
    if cls not in _SDPA_CALLERS:
        found = False
        if not cls.__module__.startswith(("torch.", "fastattn.")):
            try:
                found = "scaled_dot_product_attention" in inspect.getsource(cls.forward)
            except (OSError, TypeError):
                pass
        _SDPA_CALLERS[cls] = found
    return _SDPA_CALLERS[cls]


def _swap(module: torch.nn.Module, cls: type[torch.nn.Module]) -> torch.nn.Module:
    if isinstance(module, torch.nn.Softmax):  # no parameters: a fresh module, same mode
        return cls(module.dim).train(module.training)
    return nn._converted(cls, module)


def _replace(model: torch.nn.Module, name: str, new: torch.nn.Module) -> torch.nn.Module:
    """Puts ``new`` at dotted path ``name`` of ``model``; returns the root (``new`` itself when
    ``name`` is empty)."""
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model


def patch(model: torch.nn.Module, ops: Iterable[str] = OPS) -> PatchReport:
    """Replaces, in place, every ``torch.nn.MultiheadAttention``, ``LayerNorm``, ``RMSNorm`` and
    ``Softmax`` of ``model`` whose op is in ``ops`` by its ``fastattn.nn`` twin, and reports what
    it replaced and what it left and why. Patching twice is harmless (the second call replaces
    nothing). The root module itself is not swapped (wrap it in a container to do so)."""
    wanted = set(ops)
    unknown = wanted - set(OPS)
    if unknown:
        raise ValueError(f"fastattn.patch: unknown ops {sorted(unknown)}; choose from {OPS}")
    report = PatchReport()
    for name, module in list(model.named_modules()):
        cls = type(module)
        if cls in _FASTATTN or cls is nn.RMSNormAdapter:
            report.left.append((name, cls.__name__, "already a fastattn module"))
            continue
        if cls not in _SWAPS:
            if "attention" in wanted and _calls_sdpa(cls):
                report.left.append((name, cls.__name__, SDPA_HINT))
            if "rms_norm" in wanted and "rmsnorm" in cls.__name__.lower() and name:
                eps_attr, why = _rmsnorm_like(module)  # e.g. transformers' LlamaRMSNorm
                if eps_attr is None:
                    report.left.append((name, cls.__name__, why))
                else:
                    _replace(model, name, nn.RMSNormAdapter(module, eps_attr))
                    report.replaced.append((name, cls.__name__, "fastattn.nn.RMSNormAdapter"))
            continue  # other subclasses of the torch modules may change forward: left alone
        op, fa_cls = _SWAPS[cls]
        if op not in wanted:
            report.left.append((name, cls.__name__, f"op {op!r} not in ops"))
            continue
        if not name:
            report.left.append((name, cls.__name__, "the root module is not swapped in place"))
            continue
        _replace(model, name, _swap(module, fa_cls))
        report.replaced.append((name, cls.__name__, f"fastattn.nn.{fa_cls.__name__}"))
    return report


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Swaps every fastattn module of ``model`` back to its torch class (sharing parameters), in
    place; returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.RMSNormAdapter) and name:
            _replace(model, name, module.__dict__["original"])
            continue
        torch_cls = _FASTATTN.get(type(module))
        if torch_cls is not None and name:
            _replace(model, name, _swap(module, torch_cls))
    return model


_scope_lock = threading.Lock()
_scope_depth = 0
_scope_saved: object = None


@contextlib.contextmanager
def sdpa_scope() -> Iterator[None]:
    """Inside the block, ``torch.nn.functional.scaled_dot_product_attention`` is
    ``fastattn.scaled_dot_product_attention`` (the same signature and semantics); on leaving it,
    torch's function is back. For models that call ``F.scaled_dot_product_attention`` themselves
    (nanoGPT style), which :func:`patch` cannot reach. Scopes nest; the swap is of the module
    attribute, so it is process-wide while any scope is open: other threads calling
    ``F.scaled_dot_product_attention`` meanwhile get fastattn's too, and code that imported the
    function by name (``from torch.nn.functional import scaled_dot_product_attention``) before
    the block keeps torch's."""
    global _scope_depth, _scope_saved
    import torch.nn.functional as F

    from fastattn.ops.sdpa import scaled_dot_product_attention

    with _scope_lock:
        if _scope_depth == 0:
            _scope_saved = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = scaled_dot_product_attention
        _scope_depth += 1
    try:
        yield
    finally:
        with _scope_lock:
            _scope_depth -= 1
            if _scope_depth == 0:
                F.scaled_dot_product_attention = _scope_saved  # type: ignore[assignment]
                _scope_saved = None
