"""Input validation shared by the public ops: runs before any allocation, raises errors that
name the op and the offending shapes or dtypes (the C++ entry points check again)."""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import has_torch_function


class ShapeError(ValueError, RuntimeError):
    """A shape or value the op refuses: a ValueError (what fastattn documents) that is also the
    RuntimeError torch raises for the same input, so code written for either catches it."""


class DimError(IndexError, ValueError):
    """A ``dim`` out of range: the IndexError torch raises, also a ValueError."""


class DTypeError(TypeError, NotImplementedError):
    """A dtype the op refuses: a TypeError that is also what torch raises (a RuntimeError, or
    for an integer input its NotImplementedError, a RuntimeError too)."""


def floating_tensor(op: str, name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastattn.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise DTypeError(
            f"fastattn.{op}: {name} must be a floating point tensor, got {t.dtype}"
            + (" (pass dtype= to convert)" if name == "input" else "")
        )
    return t


def dim_index(op: str, x: torch.Tensor, dim: int) -> int:
    """``dim`` as a non-negative index into ``x``'s dimensions."""
    if x.dim() == 0:
        raise ShapeError(f"fastattn.{op}: input must have at least one dimension, got a scalar")
    if not -x.dim() <= dim < x.dim():
        raise DimError(
            f"fastattn.{op}: dim {dim} is out of range for input of shape {tuple(x.shape)}"
        )
    return dim % x.dim()


def number(op: str, name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise TypeError(
            f"fastattn.{op}: {name} must be a Python number, got {type(value).__name__}"
        )


def same_device(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise ShapeError(f"fastattn.{op}: {name} is on {t.device} but x is on {x.device}")


def mask(op: str, m: Any, x: torch.Tensor) -> None:
    """A bool (True = keep) or additive float mask, on x's device, broadcastable to x."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"fastattn.{op}: mask must be a tensor, got {type(m).__name__}")
    if type(m) is not torch.Tensor and has_torch_function((m,)):
        hint = " (for a causal bias, pass causal=)" if op == "attention" else ""
        raise TypeError(
            f"fastattn.{op}: mask is a {type(m).__name__}, a tensor subclass with its own "
            f"__torch_function__ that fastattn does not understand; pass a plain tensor{hint}"
        )
    if m.dtype != torch.bool and not m.is_floating_point():
        raise DTypeError(
            f"fastattn.{op}: mask must be bool (True = keep) or floating point (additive), "
            f"got {m.dtype}"
        )
    same_device(op, "mask", m, x)
    ok = m.dim() <= x.dim() and all(
        a in (1, b) for a, b in zip(reversed(m.shape), reversed(x.shape), strict=False)
    )
    if not ok:
        raise ShapeError(
            f"fastattn.{op}: mask of shape {tuple(m.shape)} is not broadcastable to x of shape "
            f"{tuple(x.shape)}"
        )
