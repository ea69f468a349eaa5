"""How the ops are registered, called and given outputs (the backend is chosen in dispatch.py).

Every fastattn op (a C++ op of ``csrc/ops.cpp`` or a Triton ``custom_op``) gets its fake kernels
and autograd formula through :func:`register_op`, is called through :func:`call` (which skips
the autograd layer when there is nothing to record) and allocates its outputs with
:func:`new_output`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["call", "new_output", "register_op"]


def new_output(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous output; NaN-filled when ``FASTATTN_POISON_OUTPUTS=1``.

    The tests set that variable so that any element a kernel fails to write shows up as NaN
    (the C++ kernels honour the same variable).
    """
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    if os.environ.get("FASTATTN_POISON_OUTPUTS") == "1":
        out.fill_(float("nan"))
    return out


def call(op: Any, *args: Any) -> Any:
    """``op(*args)`` for a fastattn op registered with :func:`register_op`.

    When autograd has nothing to record (grad mode off, or no input requires grad) the call
    goes straight to the backend kernel: the op's autograd kernel would do just that, after a
    detour through Python that costs more than a small kernel itself (a decode step's attention
    and norms). Under ``torch.compile`` the op is called as is, for Dynamo to trace.
    """
    # The overload itself: a packet (torch.ops.fastattn.norm) resolves it on every call.
    op = getattr(op, "default", op)
    if torch.compiler.is_dynamo_compiling() or (
        torch.is_grad_enabled() and torch._C._any_requires_grad(*args)
    ):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def register_op(
    fwd: str,
    bwd: str,
    fake_forward: Callable[..., Any],
    fake_backward: Callable[..., Any],
    make_backward: Callable[[Any], Any],
    setup_context: Callable[..., None],
) -> None:
    """Fake kernels for an op and its backward op, and the forward's autograd formula, which
    calls the backward op (``make_backward(torch.ops.fastattn.<bwd>)``). Used for the C++ op
    and the Triton custom op of each fastattn op alike."""
    torch.library.register_fake(fwd)(fake_forward)
    torch.library.register_fake(bwd)(fake_backward)
    bwd_op = getattr(torch.ops.fastattn, bwd.split("::")[1])
    torch.library.register_autograd(fwd, make_backward(bwd_op), setup_context=setup_context)
