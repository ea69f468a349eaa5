"""Drop-in ``torch.nn`` modules backed by fastattn kernels.

Each subclasses its torch counterpart, so constructor signatures, defaults, ``repr``,
``state_dict`` keys and ``isinstance`` checks stay exactly torch's; the extra keywords are
keyword-only and default to torch's behaviour.
"""

from __future__ import annotations

import warnings

import torch

from fastattn.ops.softmax import softmax

__all__ = ["Softmax"]


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
