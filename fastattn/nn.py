"""Drop-in ``torch.nn`` modules backed by fastattn kernels.

Each subclasses its torch counterpart, so constructor signatures, defaults, ``repr``,
``state_dict`` keys and ``isinstance`` checks stay exactly torch's; the extra keywords are
keyword-only and default to torch's behaviour.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from fastattn.ops.attention import attention
from fastattn.ops.norm import layer_norm, rms_norm
from fastattn.ops.softmax import softmax

__all__ = [
    "FusedAddLayerNorm",
    "FusedAddRMSNorm",
    "LayerNorm",
    "MultiheadAttention",
    "RMSNorm",
    "RMSNormAdapter",
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


class RMSNormAdapter(torch.nn.Module):
    """Runs a third-party RMSNorm module (e.g. transformers' ``LlamaRMSNorm``: a ``weight`` and
    an epsilon attribute) on ``fastattn.rms_norm``. It holds the same ``weight`` parameter (so
    the ``state_dict`` keys are unchanged) and keeps the original module, unregistered, for
    :func:`fastattn.unpatch`. Built by :func:`fastattn.patch` after checking on a probe input that
    the original computes ``x * rsqrt(mean(x^2) + eps) * weight``."""

    def __init__(self, module: torch.nn.Module, eps_attr: str) -> None:
        super().__init__()
        self.weight: torch.nn.Parameter = module.weight  # type: ignore[assignment]
        self.eps_attr = eps_attr
        setattr(self, eps_attr, getattr(module, eps_attr))
        self.__dict__["original"] = module  # not a child: no state_dict entries
        self.backend = "auto"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, tuple(self.weight.shape), self.weight,
                        float(getattr(self, self.eps_attr)), backend=self.backend)  # fmt: skip

    def extra_repr(self) -> str:
        name = type(self.__dict__["original"]).__name__
        return f"{name}, {tuple(self.weight.shape)}, eps={getattr(self, self.eps_attr)}"


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


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose attention runs in ``fastattn.attention``.

    Same constructor, parameters, initialisation and ``state_dict`` as torch's. Calls with
    ``need_weights=False`` (what ``nn.TransformerEncoderLayer``/``DecoderLayer`` pass) take the
    fused kernel, which never forms the ``(L, S)`` weights; ``need_weights=True`` returns torch's
    result, weights included (the slow path). Unlike torch, a query that may attend to no key
    gets zeros rather than NaN on the fused path. Set ``module.backend`` to pin a backend.
    """

    backend: str = "auto"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if need_weights:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)  # fmt: skip
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "fastattn.nn.MultiheadAttention: is_causal is a hint that attn_mask is causal; "
                "pass the causal attn_mask too (as torch.nn.MultiheadAttention requires)"
            )
        batched = query.dim() == 3
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        N, L, E = query.shape
        H, hd = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q)
        k = F.linear(key, w_k, b_k)
        v = F.linear(value, w_v, b_v)
        # As torch: without a padding mask the is_causal hint replaces attn_mask by a top-left
        # causal mask over all keys (appended bias/zero keys included).
        causal = is_causal and key_padding_mask is None
        if causal:
            attn_mask = None
        mask = _merged_mask(key_padding_mask, attn_mask, N, H, L, key.shape[1], q.dtype)
        extra = []  # columns appended to the keys: the learned bias_k/v, then a zero key
        if self.bias_k is not None and self.bias_v is not None:
            extra.append((self.bias_k.expand(N, 1, E), self.bias_v.expand(N, 1, E)))
        if self.add_zero_attn:
            zero = q.new_zeros(N, 1, E)
            extra.append((zero, zero))
        for kx, vx in extra:
            k, v = torch.cat([k, kx], dim=1), torch.cat([v, vx], dim=1)
            if mask is not None:  # the new key is visible to every query
                pad = mask.new_ones(()) if mask.dtype == torch.bool else mask.new_zeros(())
                mask = torch.cat([mask, pad.expand(*mask.shape[:-1], 1)], dim=-1)
        q, k, v = (t.unflatten(-1, (H, hd)).transpose(1, 2) for t in (q, k, v))  # (N, H, T, hd)
        p = self.dropout if self.training else 0.0
        o = attention(q, k, v, attn_mask=mask, dropout_p=p, backend=self.backend,
                      causal="top_left" if causal else False)  # fmt: skip
        assert isinstance(o, torch.Tensor)
        out = self.out_proj(o.transpose(1, 2).flatten(2))  # (N, L, E)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def _merged_mask(
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    N: int,
    H: int,
    L: int,
    S: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """torch's MHA masks (bool True = masked out, or additive float) as one fastattn mask
    broadcastable to ``(N, H, L, S)``: bool True = keep when both are bool, else additive."""
    parts = []
    if key_padding_mask is not None:
        parts.append(key_padding_mask.reshape(N, 1, 1, S))
    if attn_mask is not None:
        parts.append(attn_mask.reshape(N, H, L, S) if attn_mask.dim() == 3 else attn_mask)
    if not parts:
        return None
    if all(m.dtype == torch.bool for m in parts):
        keep = ~parts[0]
        return keep if len(parts) == 1 else keep & ~parts[1]
    add = [
        torch.zeros((), dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        if m.dtype == torch.bool
        else m.to(dtype)
        for m in parts
    ]
    return add[0] if len(add) == 1 else add[0] + add[1]


def _converted(cls: type[torch.nn.Module], module: torch.nn.Module) -> torch.nn.Module:
    # Re-class a copy of the module: every attribute, hook and parameter object is shared (so
    # optimizer state, device and dtype carry over), and no new storage is allocated.
    new = cls.__new__(cls)
    new.__dict__ = module.__dict__.copy()
    for key in ("_parameters", "_buffers", "_modules"):
        new.__dict__[key] = dict(module.__dict__[key])
    return new


def from_torch(module: torch.nn.Module, *, fused_add: bool = False) -> torch.nn.Module:
    """The fastattn module equivalent to a ``torch.nn`` LayerNorm, RMSNorm, Softmax or
    MultiheadAttention.

    The result shares the original's parameters (same ``nn.Parameter`` objects, so devices,
    dtypes, ``requires_grad`` and optimizer state carry over); ``fused_add=True`` gives the
    ``FusedAdd*`` variant of a norm. Raises ``TypeError`` for other modules.
    """
    if isinstance(module, torch.nn.LayerNorm):
        return _converted(FusedAddLayerNorm if fused_add else LayerNorm, module)
    if isinstance(module, torch.nn.RMSNorm):
        return _converted(FusedAddRMSNorm if fused_add else RMSNorm, module)
    if isinstance(module, torch.nn.MultiheadAttention) and not fused_add:
        return _converted(MultiheadAttention, module)
    if isinstance(module, torch.nn.Softmax) and not fused_add:
        return Softmax.from_torch(module)
    raise TypeError(f"fastattn.nn.from_torch: no fastattn equivalent for {type(module).__name__}")
