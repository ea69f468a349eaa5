"""Drop-in ``torch.nn`` modules backed by fastattn kernels.

Each subclasses its torch counterpart, so constructor signatures, defaults, ``repr``,
``state_dict`` keys and ``isinstance`` checks stay exactly torch's; the extra keywords are
keyword-only and default to torch's behaviour.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fastattn.ops.attention import attention
from fastattn.ops.norm import layer_norm, rms_norm
from fastattn.ops.softmax import implicit_dim, softmax

# torch's own MultiheadAttention checks and in-projection (names private to torch.nn.functional,
# called as torch's forward calls them; tests/test_nn.py compares acceptance with torch's module).
_TORCH_MHA: Any = F

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
        dim = self.dim if self.dim is not None else implicit_dim(input.dim())
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
        # torch's own checks and in-projection, called as its forward calls them (on its (L, N,
        # E) layout), so that what it accepts and refuses, and the dtypes it gets, are the same.
        batched = _TORCH_MHA._mha_shape_check(query, key, value, key_padding_mask, attn_mask,
                                     self.num_heads)  # fmt: skip
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
            target_type=query.dtype,
        )  # fmt: skip
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
            target_type=query.dtype, check_other=False,
        )  # fmt: skip
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "fastattn.nn.MultiheadAttention: is_causal is a hint that attn_mask is causal; "
                "pass the causal attn_mask too (as torch.nn.MultiheadAttention requires)"
            )
        # As torch: without a padding mask the hint replaces attn_mask by a top-left causal mask.
        causal = is_causal and key_padding_mask is None
        if causal:
            attn_mask = None
        if query.shape[-1] != self.embed_dim:
            raise AssertionError(
                f"was expecting embedding dimension of {self.embed_dim}, but got {query.shape[-1]}"
            )
        q, k, v = self._projected(query, key, value, batched)  # (L|S, N, E)
        L, N, E = q.shape
        S = k.shape[0]
        if attn_mask is not None:
            want = (L, S) if attn_mask.dim() == 2 else (N * self.num_heads, L, S)
            if attn_mask.dim() not in (2, 3):
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
            if tuple(attn_mask.shape) != want:
                raise RuntimeError(
                    f"The shape of the {attn_mask.dim()}D attn_mask is {attn_mask.shape}, but "
                    f"should be {want}."
                )
        if self.bias_k is not None and self.bias_v is not None:  # a learned key, seen by all
            k = torch.cat([k, self.bias_k.repeat(1, N, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, N, 1)])
            attn_mask, key_padding_mask = (F.pad(m, (0, 1)) if m is not None else None
                                           for m in (attn_mask, key_padding_mask))  # fmt: skip
        if self.add_zero_attn:  # a zero key and value, seen by all
            k = torch.cat([k, k.new_zeros(1, N, E)])
            v = torch.cat([v, v.new_zeros(1, N, E)])
            attn_mask, key_padding_mask = (F.pad(m, (0, 1)) if m is not None else None
                                           for m in (attn_mask, key_padding_mask))  # fmt: skip
        if key_padding_mask is not None:
            _TORCH_MHA._check_key_padding_mask(key_padding_mask, k.shape[0], N)
        H, hd = self.num_heads, self.head_dim
        q, k, v = (t.unflatten(-1, (H, hd)).permute(1, 2, 0, 3) for t in (q, k, v))  # (N, H, T, hd)
        mask = _merged_mask(key_padding_mask, attn_mask, N, H, L, k.shape[2])
        p = self.dropout if self.training else 0.0
        o = attention(q, k, v, attn_mask=mask, dropout_p=p, backend=self.backend,
                      causal="top_left" if causal else False)  # fmt: skip
        assert isinstance(o, torch.Tensor)
        out = self.out_proj(o.permute(2, 0, 1, 3).flatten(2))  # (L, N, E)
        if not batched:
            return out.squeeze(1), None
        return (out.transpose(0, 1) if self.batch_first else out), None

    def _projected(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batched: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v in-projected by torch's own helpers on torch's ``(seqlen, batch, embed)``
        layout (self-attention projected by one matmul when query is key is value)."""
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        elif self.batch_first:
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (t.transpose(1, 0) for t in (query, key))
                    value = key
            else:
                query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(
                    f"key shape {key.shape} does not match value shape {value.shape}"
                )
            return _TORCH_MHA._in_projection_packed(query, key, value, self.in_proj_weight,
                                           self.in_proj_bias)  # fmt: skip
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(
                f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                f"{value.shape[:2]}"
            )
        b = self.in_proj_bias
        b_q, b_k, b_v = b.chunk(3) if b is not None else (None, None, None)
        return _TORCH_MHA._in_projection(query, key, value, self.q_proj_weight, self.k_proj_weight,
                                self.v_proj_weight, b_q, b_k, b_v)  # fmt: skip


def _merged_mask(
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    N: int,
    H: int,
    L: int,
    S: int,
) -> torch.Tensor | None:
    """torch's canonical MHA masks (additive float: ``(N, S)`` padding, ``(L, S)`` or ``(N*H,
    L, S)`` attention) as one additive mask broadcastable to ``(N, H, L, S)``."""
    parts = []
    if key_padding_mask is not None:
        parts.append(key_padding_mask.view(N, 1, 1, S))
    if attn_mask is not None:
        parts.append(attn_mask.view(N, H, L, S) if attn_mask.dim() == 3 else attn_mask)
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


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
