"""Input validation shared by the public ops: runs before any allocation, raises errors that
name the op and the offending shapes or dtypes (the C++ entry points check again)."""

from __future__ import annotations

from typing import Any

import torch


def floating_tensor(op: str, name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastattn.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"fastattn.{op}: {name} must be a floating point tensor, got {t.dtype}"
            + (" (pass dtype= to convert)" if name == "x" else "")
        )
    return t


def dim_index(op: str, x: torch.Tensor, dim: int) -> int:
    """``dim`` as a non-negative index into ``x``'s dimensions."""
    if x.dim() == 0:
        raise ValueError(f"fastattn.{op}: x must have at least one dimension, got a scalar")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"fastattn.{op}: dim {dim} is out of range for x of shape {tuple(x.shape)}"
        )
    return dim % x.dim()


def number(op: str, name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise TypeError(
            f"fastattn.{op}: {name} must be a Python number, got {type(value).__name__}"
        )


def same_device(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"fastattn.{op}: {name} is on {t.device} but x is on {x.device}")


def mask(op: str, m: Any, x: torch.Tensor) -> None:
    """A bool (True = keep) or additive float mask, on x's device, broadcastable to x."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"fastattn.{op}: mask must be a tensor, got {type(m).__name__}")
    if m.dtype != torch.bool and not m.is_floating_point():
        raise TypeError(
            f"fastattn.{op}: mask must be bool (True = keep) or floating point (additive), "
            f"got {m.dtype}"
        )
    same_device(op, "mask", m, x)
    ok = m.dim() <= x.dim() and all(
        a in (1, b) for a, b in zip(reversed(m.shape), reversed(x.shape), strict=False)
    )
    if not ok:
        raise ValueError(
            f"fastattn.{op}: mask of shape {tuple(m.shape)} is not broadcastable to x of shape "
            f"{tuple(x.shape)}"
        )
