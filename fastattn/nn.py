"""Drop-in ``torch.nn`` modules backed by fastattn kernels.

Each subclasses its torch counterpart, so constructor signatures, defaults, ``repr``,
``state_dict`` keys and ``isinstance`` checks stay exactly torch's; the extra keywords are
keyword-only and default to torch's behaviour.
"""

from __future__ import annotations

import warnings

import torch

from fastattn.ops.norm import layer_norm, rms_norm
from fastattn.ops.softmax import softmax

__all__ = [
    "FusedAddLayerNorm",
    "FusedAddRMSNorm",
    "LayerNorm",
    "RMSNorm",
    "Softmax",
    "from_torch",
]


def _legacy_softmax_dim(ndim: int) -> int:
    # torch.nn.Softmax(dim=None) picks this dim (with a deprecation warning); keep it identical.
    warnings.warn(
        "Implicit dimension choice for softmax has been deprecated. Change the call to include "
        "dim=X as an argument.",
        stacklevel=3,
    )
    return 0 if ndim in (0, 1, 3) else 1


class Softmax(torch.nn.Softmax):
    """``torch.nn.Softmax(dim)`` computed by ``fastattn.softmax``.

    Extra keyword-only options: ``scale``, ``causal``, ``log`` and ``backend`` (see
    :func:`fastattn.softmax`), and ``forward(input, mask=None)`` takes an optional mask.
    """

    def __init__(
        self,
        dim: int | None = None,
        *,
        scale: float | None = None,
        causal: bool = False,
        log: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__(dim)
        self.scale, self.causal, self.log, self.backend = scale, causal, log, backend

    def forward(self, input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        dim = self.dim if self.dim is not None else _legacy_softmax_dim(input.dim())
        return softmax(
            input,
            dim,
            scale=self.scale,
            mask=mask,
            causal=self.causal,
            log=self.log,
            backend=self.backend,
        )

    @classmethod
    def from_torch(cls, module: torch.nn.Softmax) -> Softmax:
        """The fastattn module equivalent to an existing ``torch.nn.Softmax``."""
        return cls(module.dim)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by ``fastattn.layer_norm``: same constructor, parameters,
    initialisation, ``repr`` and ``state_dict``. Set ``module.backend`` to pin a backend."""

    backend: str = "auto"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                          backend=self.backend)  # fmt: skip


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by ``fastattn.rms_norm`` (``eps=None`` means
    ``torch.finfo(x.dtype).eps``, as in torch)."""

    backend: str = "auto"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return rms_norm(input, self.normalized_shape, self.weight, self.eps, backend=self.backend)


class FusedAddLayerNorm(LayerNorm):
    """LayerNorm's parameters; ``forward(x, residual) -> (layer_norm(x + residual), x + residual)``
    in one pass (the pre-norm block's add-and-normalise)."""

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                          residual=residual, backend=self.backend)  # fmt: skip


class FusedAddRMSNorm(RMSNorm):
    """RMSNorm's parameters; ``forward(x, residual) -> (rms_norm(x + residual), x + residual)``."""

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rms_norm(input, self.normalized_shape, self.weight, self.eps, residual=residual,
                        backend=self.backend)  # fmt: skip


def _converted(cls: type[torch.nn.Module], module: torch.nn.Module) -> torch.nn.Module:
    # Re-class a copy of the module: every attribute, hook and parameter object is shared (so
    # optimizer state, device and dtype carry over), and no new storage is allocated.
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()
    for key in ("_parameters", "_buffers", "_modules"):
        new.__dict__[key] = dict(module.__dict__[key])
    return new


def from_torch(module: torch.nn.Module, *, fused_add: bool = False) -> torch.nn.Module:
    """The fastattn module equivalent to a ``torch.nn`` LayerNorm, RMSNorm or Softmax.

    The result shares the original's parameters (same ``nn.Parameter`` objects, so devices,
    dtypes, ``requires_grad`` and optimizer state carry over); ``fused_add=True`` gives the
    ``FusedAdd*`` variant of a norm. Raises ``TypeError`` for other modules.
    """
    if isinstance(module, torch.nn.LayerNorm):
        return _converted(FusedAddLayerNorm if fused_add else LayerNorm, module)
    if isinstance(module, torch.nn.RMSNorm):
        return _converted(FusedAddRMSNorm if fused_add else RMSNorm, module)
    if isinstance(module, torch.nn.Softmax) and not fused_add:
        return Softmax.from_torch(module)
    raise TypeError(f"fastattn.nn.from_torch: no fastattn equivalent for {type(module).__name__}")
