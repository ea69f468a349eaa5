"""Chooses the backend of each call: ``backend=`` argument, else ``FASTATTN_BACKEND``, else auto.

(Registering ops, calling them and allocating their outputs is ``fastattn/ops/opcall.py``.)

``auto`` takes the first backend that can serve the call: for CUDA tensors ``triton`` then
``cuda``; for CPU tensors ``cpu``; ``reference`` (eager PyTorch) last. Every backend computes the
same function within the tolerances the tests check, so ``auto`` never changes results. A backend
named explicitly that cannot serve the call raises a ``RuntimeError`` saying why.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from fastattn import _extension
from fastattn._triton import interpreting

BACKENDS = ("triton", "cuda", "cpu", "reference")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def _probe_triton() -> str | None:
    """None when Triton is importable, else the reason it is not."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e})"
    return None


# Resolved once at import, so that dispatch reads plain constants (cheap, and traceable by Dynamo).
TRITON_ERROR = _probe_triton()  # None, or why Triton cannot be imported
_EXTENSION_ERROR = None if _extension.load() is not None else _extension.error()
_CUDA_BUILT = bool(_extension.build_info().get("cuda", False))


def _dtypes(names: str) -> frozenset[torch.dtype]:
    """The torch dtypes of a comma-separated list of their names ("float32,float16")."""
    found = (getattr(torch, n.strip(), None) for n in names.split(","))
    return frozenset(d for d in found if isinstance(d, torch.dtype))


# The data dtypes each compiled backend's kernels take; under auto any other floating dtype
# (float8, ...) goes on to the next backend, the reference last. The CPU kernels report theirs
# (csrc/checks.h kCpuDataTypes); the CUDA C++ kernels dispatch over float32, float64, float16 and
# bfloat16 (csrc/cuda/*.cu); the Triton kernels take float32, float16 and bfloat16.
_CPU_DTYPES = _dtypes(str(_extension.build_info().get("cpu_dtypes", "")))
_CUDA_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})
_TRITON_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


def _names(dtypes: frozenset[torch.dtype]) -> str:
    return ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes)) or "no dtype"


def cpp_kernels(op: str) -> frozenset[str]:
    """The backends ("cpu", "cuda") for which ``fastattn._C`` registered a kernel of ``op``."""
    if _EXTENSION_ERROR is not None or not hasattr(torch.ops.fastattn, op):
        return frozenset()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(b for b in ("cpu", "cuda") if has(f"fastattn::{op}", b.upper()))


# Ops whose CUDA C++ kernels take fewer dtypes than the others: the attention kernels use tensor
# cores on 16-bit inputs (csrc/checks.h kCudaAttentionTypes, reported by the build).
_CUDA_OP_DTYPES = dict.fromkeys(
    ("attention", "paged_attention"),
    _dtypes(str(_extension.build_info().get("cuda_attention_dtypes", ""))),
)


def unavailable_reason(
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    cpp: frozenset[str] = frozenset({"cpu", "cuda"}),
    op: str = "",
) -> str | None:
    """Why ``backend`` cannot run on tensors of this device and dtype, or None if it can.

    ``cpp`` names the C++ backends that have a kernel for the op in question (``op``).
    """
    if backend == "reference":
        return None
    if backend == "triton":
        if TRITON_ERROR is not None:
            return TRITON_ERROR
        if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
            return (
                f"Triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got {device}"
            )
        if dtype not in _TRITON_DTYPES:
            return f"the Triton kernels take {_names(_TRITON_DTYPES)}, not {dtype}"
        return None
    if backend in ("cpu", "cuda"):
        if _EXTENSION_ERROR is not None:
            return f"the compiled extension is unavailable ({_EXTENSION_ERROR})"
        if device.type != backend:
            return f"the {backend} backend needs {backend} tensors, got {device}"
        if backend == "cuda" and not _CUDA_BUILT:
            return "fastattn._C was built without CUDA kernels"
        if backend not in cpp:
            return f"fastattn._C has no {backend} kernel for this op"
        served = _CPU_DTYPES if backend == "cpu" else _CUDA_OP_DTYPES.get(op, _CUDA_DTYPES)
        if dtype not in served:
            return f"the {backend} kernels of fastattn._C take {_names(served)}, not {dtype}"
        return None
    return f"unknown backend {backend!r}; choose one of 'auto', {', '.join(map(repr, BACKENDS))}"


def select(
    backend: str | None,
    device: torch.device,
    dtype: torch.dtype,
    op: str,
    cpp: frozenset[str] = frozenset({"cpu", "cuda"}),
) -> str:
    """The backend that will run ``op`` on tensors of ``device``/``dtype`` (``cpp``: the C++
    backends with a kernel for it, see :func:`cpp_kernels`)."""
    requested = backend if backend not in (None, "auto") else os.environ.get("FASTATTN_BACKEND")
    if requested not in (None, "", "auto"):
        assert requested is not None
        why = unavailable_reason(requested, device, dtype, cpp, op)
        if why is not None:
            raise RuntimeError(f"fastattn.{op}: backend {requested!r} cannot run this call: {why}")
        return requested
    if torch.compiler.is_dynamo_compiling():
        # Traced once per graph: Dynamo folds it to a constant. It would trace through the cache
        # wrapper below too, with a warning on every compile ("silent incorrectness").
        return _first_available(device.type, dtype, cpp, op)
    return _auto(device.type, dtype, cpp, op)


def _first_available(
    device_type: str, dtype: torch.dtype, cpp: frozenset[str], op: str = ""
) -> str:
    """The first backend of the auto order that can serve the call: a function of the device
    type, the dtype and facts fixed at import only."""
    for name in _AUTO_ORDER.get(device_type, ("reference",)):
        if unavailable_reason(name, torch.device(device_type), dtype, cpp, op) is None:
            return name
    return "reference"


# Eager calls are hot (a decode step's norms): the choice is worked out once per key.
_auto = functools.lru_cache(maxsize=64)(_first_available)


def backends() -> dict[str, Any]:
    """Reports which backends are usable here, and why not for the others.

    Returns a dict: ``{"backends": {name: {"available": bool, "reason": str | None}}, "extension":
    build facts of fastattn._C (version, cpu_isa, cpu_isas_compiled, cpu_dtypes, cuda, cuda_archs),
    "torch": version, "triton": version or None, "cuda_device": name or None,
    "cuda_attention_backward": what runs the backward of the CUDA C++ attention ("triton"; None
    without CUDA kernels)}``.
    """
    gpu_or_cpu = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict[str, Any] = {"backends": {}}
    for name in BACKENDS:
        probe = torch.device(name if name in ("cpu", "cuda") else gpu_or_cpu)
        why = unavailable_reason(name, probe, torch.float32)
        report["backends"][name] = {"available": why is None, "reason": why}
    # The CUDA C++ attention is forward-only; autograd runs the Triton backward after it.
    report["cuda_attention_backward"] = (
        None if not _CUDA_BUILT else "triton" if TRITON_ERROR is None else f"none ({TRITON_ERROR})"
    )
    report["extension"] = _extension.build_info() or {"error": _extension.error()}
    report["torch"] = torch.__version__
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    report["triton_interpret"] = interpreting()
    report["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return report
