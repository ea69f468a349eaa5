"""A compact decoder-only Transformer, readable end to end, that runs on eager PyTorch ops
(``kernels="eager"``, the oracle), torch's SDPA (``"sdpa"``) or fastattn's kernels
(``kernels="fastattn"``). All build
the same parameters with the same names, so they load each other's ``state_dict``.

    cfg = TransformerConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2)
    model = Transformer(cfg, kernels="fastattn")
    logits, loss = model(tokens, targets)          # tokens (batch, seqlen) int64
    out = model.generate(prompt, max_new_tokens=32)  # greedy, with a KV cache

All three kernel sets share the rest of the code (the KV cache, rotary tables, projections), so a
comparison between them measures the attention and norm kernels only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fastattn
import fastattn.nn as fnn

# eager: matmul/softmax/matmul and torch's norms (the oracle); sdpa: torch's fused attention;
# fastattn: fastattn's attention and norms (each residual add fused into the norm after it).
KERNELS = ("eager", "sdpa", "fastattn")


@dataclass
class TransformerConfig:
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: multi-head; fewer than n_heads: grouped-query
    max_seq_len: int = 1024
    norm: str = "rmsnorm"  # or "layernorm"
    pos: str = "rope"  # rotary embeddings, or "learned" absolute positions
    mlp_hidden: int | None = None  # default 4 * dim
    dropout: float = 0.0  # on attention probabilities and residual branches, in training
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Sliding-window attention (Mistral / Gemma): each query sees itself and the
    # sliding_window - 1 positions before it, on the layers in window_layers (None: all).
    sliding_window: int | None = None
    window_layers: tuple[int, ...] | None = None
    softcap: float | None = None  # attention logits become softcap * tanh(s / softcap) (Gemma 2)


def _norm(cfg: TransformerConfig, fast: bool, fused_add: bool = False) -> nn.Module:
    if cfg.norm not in ("rmsnorm", "layernorm"):
        raise ValueError(f"TransformerConfig.norm must be 'rmsnorm' or 'layernorm', got {cfg.norm}")
    rms = cfg.norm == "rmsnorm"
    if not fast:
        return (nn.RMSNorm if rms else nn.LayerNorm)(cfg.dim, eps=cfg.norm_eps)
    if fused_add:
        return (fnn.FusedAddRMSNorm if rms else fnn.FusedAddLayerNorm)(cfg.dim, eps=cfg.norm_eps)
    return (fnn.RMSNorm if rms else fnn.LayerNorm)(cfg.dim, eps=cfg.norm_eps)


def rope_tables(start: int, T: int, head_dim: int, theta: float, device: torch.device):
    """``(cos, sin)`` of the rotary angles at positions ``start ... start + T - 1``, ``(T,
    head_dim/2)`` fp32; computed once per forward pass and shared by every layer."""
    return rope_at(torch.arange(start, start + T, device=device), head_dim, theta)


def rope_at(positions: torch.Tensor, head_dim: int, theta: float):
    """``(cos, sin)`` of the rotary angles at ``positions`` ``(T,)``: ``(T, head_dim/2)`` fp32."""
    dev = positions.device
    inv = theta ** (-torch.arange(0, head_dim, 2, device=dev, dtype=torch.float32) / head_dim)
    ang = positions.to(torch.float32)[:, None] * inv
    return ang.cos(), ang.sin()


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """The position of each of ``total`` packed tokens inside its document (``cu_seqlens`` int32
    ``(documents + 1,)``), on the device, without reading the lengths on the host."""
    idx = torch.arange(total, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)  # each token's document
    return idx - cu_seqlens.long()[doc]


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``(batch, heads, seqlen, head_dim)`` with the tables of
    :func:`rope_tables` (pairs (i, i + head_dim/2) rotated, in fp32)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, for decoding (inference only).

    Each layer's keys and values live in a buffer ``(batch, kv_heads, capacity, head_dim)``
    allocated on the layer's first call; every call writes its new tokens in place and gets back
    views of the filled part (any strides but a unit last one, which every kernel takes). A call
    past ``capacity`` moves the layer to a buffer twice as large, so the capacity is only a hint:
    ``generate`` passes prompt + new tokens, and then nothing is ever copied twice.
    """

    def __init__(self, capacity: int = 0) -> None:
        self.capacity = capacity
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lens: list[int] = []

    def __len__(self) -> int:  # layers that have cached tokens
        return len(self.lens)

    def seqlen(self, layer: int = 0) -> int:
        return self.lens[layer] if layer < len(self.lens) else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Appends ``k``, ``v`` ``(batch, kv_heads, T, head_dim)`` to ``layer``'s cache; returns
        all of that layer's keys and values so far."""
        if layer > len(self.lens):
            raise ValueError(f"KVCache: layer {layer} updated before layer {len(self.lens)}")
        n, T = self.seqlen(layer), k.shape[2]
        if layer == len(self.lens):  # the layer's first call
            self.k.append(_empty(k, max(self.capacity, T)))
            self.v.append(_empty(v, max(self.capacity, T)))
            self.lens.append(0)
        elif n + T > self.k[layer].shape[2]:  # full: move to buffers twice as large
            size = max(2 * self.k[layer].shape[2], n + T)
            for bufs in (self.k, self.v):
                old, bufs[layer] = bufs[layer], _empty(bufs[layer], size)
                bufs[layer][:, :, :n] = old[:, :, :n]
        self.k[layer][:, :, n : n + T] = k
        self.v[layer][:, :, n : n + T] = v
        self.lens[layer] = n + T
        return self.k[layer][:, :, : n + T], self.v[layer][:, :, : n + T]


def _empty(like: torch.Tensor, seqlen: int) -> torch.Tensor:
    """An uninitialised ``(batch, heads, seqlen, head_dim)`` buffer of ``like``'s kind."""
    return like.new_empty((like.shape[0], like.shape[1], seqlen, like.shape[3]))


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, kernels: str, layer: int = 0) -> None:
        super().__init__()
        self.cfg, self.kernels = cfg, kernels
        sw, layers = cfg.sliding_window, cfg.window_layers
        if sw is not None and sw < 1:
            raise ValueError(f"TransformerConfig.sliding_window must be >= 1, got {sw}")
        # keys left of the diagonal this layer's queries see (None: all)
        self.left = sw - 1 if sw is not None and (layers is None or layer in layers) else None
        if cfg.softcap is not None and kernels == "sdpa":
            raise ValueError(
                "kernels='sdpa' cannot apply TransformerConfig.softcap: torch's SDPA has no "
                "logit softcapping (use 'eager' or 'fastattn')"
            )
        self.n_heads, self.n_kv = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
        if cfg.dim % cfg.n_heads or self.n_heads % self.n_kv:
            raise ValueError("dim must divide by n_heads, and n_heads by n_kv_heads")
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, layer: int,
                cu_seqlens: torch.Tensor | None = None):  # fmt: skip
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = rotary(q, *rope), rotary(k, *rope)
        if cache is not None:  # decode: append this step's keys/values to the layer's cache
            k, v = cache.update(layer, k, v)
        p = self.cfg.dropout if self.training else 0.0
        # Causal, bottom-right aligned: the T new queries follow the cached keys.
        cap = self.cfg.softcap
        o: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
        if cu_seqlens is not None:  # packed documents (B = 1): each attends within itself
            o = self._packed(q, k, v, p, cu_seqlens)
        elif self.kernels == "fastattn":
            window = None if self.left is None else (self.left, 0)
            o = fastattn.attention(q, k, v, causal=True, dropout_p=p, window=window,
                                   softcap=cap or 0.0)  # fmt: skip
        elif self.kernels == "sdpa":
            o = _sdpa_attention(q, k, v, p, self.left)
        else:
            o = _eager_attention(q, k, v, p, self.left, cap)
        assert isinstance(o, torch.Tensor)
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))

    def paged(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
              k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
              cache_seqlens: torch.Tensor, backend: str = "auto") -> torch.Tensor:  # fmt: skip
        """Serving: attention of ``x`` ``(batch, T, dim)`` (each sequence's next T tokens)
        against a paged cache ``(num_blocks, block_size, kv_heads, head_dim)``, this call's
        keys and values appended at ``cache_seqlens`` in place (see fastattn.paged_attention);
        ``rope`` ``(batch, T, 1, head_dim/2)`` tables at each token's own position."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(B, T, self.n_kv, self.head_dim)  # (B, T, Hkv, D)
        v = self.wv(x).view(B, T, self.n_kv, self.head_dim)
        if rope is not None:  # (rotary is elementwise: any layout with the tables broadcast)
            q, k = rotary(q, *rope), rotary(k, *rope)
        window = None if self.left is None else (self.left, 0)
        o = fastattn.paged_attention(q, k_cache, v_cache, block_table, cache_seqlens,
                                     k_new=k, v_new=v, causal=True, window=window,
                                     softcap=self.cfg.softcap or 0.0, backend=backend)  # fmt: skip
        assert isinstance(o, torch.Tensor)
        return self.wo(o.reshape(B, T, -1))

    def _packed(self, q, k, v, p: float, cu: torch.Tensor) -> torch.Tensor:
        """Attention of packed documents (q ``(1, H, T, D)``): fastattn's varlen kernel, or
        the eager / SDPA kernels with the block-diagonal causal mask they need instead."""
        cap, window = self.cfg.softcap, None if self.left is None else (self.left, 0)
        if self.kernels == "fastattn":
            o = fastattn.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1),
                                          v[0].transpose(0, 1), cu, cu, causal=True,
                                          dropout_p=p, window=window,
                                          softcap=cap or 0.0)  # fmt: skip
            assert isinstance(o, torch.Tensor)
            return o.transpose(0, 1)[None]  # (1, H, T, D)
        T = q.shape[2]
        pos = packed_positions(cu, T)
        start = torch.arange(T, device=q.device) - pos  # each token's document start
        keep = (start[:, None] == start[None, :]) & _visible(T, T, self.left, q.device)
        if self.kernels == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p,
                                                  enable_gqa=True)  # fmt: skip
        return _eager_attention(q, k, v, p, None, cap, keep)


def _visible(Tq: int, Tk: int, left: int | None, device: torch.device) -> torch.Tensor:
    """Bool ``(Tq, Tk)``: the keys each of the Tq new queries (the last Tq positions) sees:
    causal, and within ``left`` positions before it when ``left`` is not None."""
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(Tk - Tq)
    return keep if left is None else keep.triu(Tk - Tq - left)


def _eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    p: float,
    left: int | None = None,
    softcap: float | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """matmul, masked softmax, matmul: the textbook version the fused kernel replaces (``keep``:
    the visible keys, instead of the causal / window ones)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    Tq, Tk = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    elif Tq > 1 or left is not None:  # (one query, the last position, sees every key)
        s = s.masked_fill(~_visible(Tq, Tk, left, q.device), float("-inf"))
    return F.dropout(torch.softmax(s, dim=-1), p) @ v


def _sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float,
                    left: int | None = None) -> torch.Tensor:  # fmt: skip
    """torch's fused SDPA (its causal flag is top-left aligned, so chunked prefill passes a mask;
    a one-query decode step sees every key and needs none; a window needs a mask)."""
    Tq, Tk = q.shape[2], k.shape[2]
    if left is not None:
        keep = _visible(Tq, Tk, left, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p,
                                              enable_gqa=True)  # fmt: skip
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, enable_gqa=True)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                              enable_gqa=True)  # fmt: skip
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p, enable_gqa=True)


_FUSED_ADD = (fnn.FusedAddRMSNorm, fnn.FusedAddLayerNorm)


def add_norm(norm: nn.Module, x: torch.Tensor, a: torch.Tensor | None):
    """``(norm(x + a), x + a)``: the residual add and the norm after it, in one pass with
    fastattn's fused norms; ``a`` None: ``(norm(x), x)``."""
    if a is None:
        return norm(x), x
    if isinstance(norm, _FUSED_ADD):
        return norm(a, x)
    x = x + a
    return norm(x), x


class Block(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)). Each branch's output is added
    to the residual stream ``x`` by the norm after it (norm2, or the next block's norm1, or the
    final norm), so that with fastattn kernels every residual add is fused into its norm (one
    pass writes both the sum and its norm)."""

    def __init__(self, cfg: TransformerConfig, kernels: str, layer: int = 0) -> None:
        super().__init__()
        fast = kernels == "fastattn"
        self.norm1 = _norm(cfg, fast, fused_add=layer > 0)  # the first block has nothing to add
        self.attn = Attention(cfg, kernels, layer)
        self.norm2 = _norm(cfg, fast, fused_add=True)
        hidden = cfg.mlp_hidden or 4 * cfg.dim
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, m: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0,
                cu_seqlens: torch.Tensor | None = None,
                paged: tuple | None = None):  # fmt: skip
        """``x`` the residual stream and ``m`` the previous block's output, not yet added to it
        (None in the first block); returns that pair after this block. ``paged``: the
        arguments of :meth:`Attention.paged` after ``rope`` (serving, instead of ``cache``)."""
        h, x = add_norm(self.norm1, x, m)
        if paged is None:
            a = self.drop(self.attn(h, rope, cache, layer, cu_seqlens))
        else:
            a = self.drop(self.attn.paged(h, rope, *paged))
        h, x = add_norm(self.norm2, x, a)
        return x, self.drop(self.mlp(h))


class Transformer(nn.Module):
    """Decoder-only language model; ``kernels`` (see ``KERNELS``) picks the attention and norm
    implementations; all three have the same parameters."""

    def __init__(self, cfg: TransformerConfig, kernels: str = "eager") -> None:
        super().__init__()
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, kernels, i) for i in range(cfg.n_layers))
        self.norm = _norm(cfg, kernels == "fastattn", fused_add=cfg.n_layers > 0)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied output head
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                start: int = 0, cache: KVCache | None = None,
                cu_seqlens: torch.Tensor | None = None):  # fmt: skip
        """Logits ``(batch, seqlen, vocab)`` of tokens ``idx`` at positions ``start...``, and the
        cross-entropy loss when ``targets`` is given (else None; -100 targets are ignored).

        ``cu_seqlens`` (int32 ``(documents + 1,)``, training / scoring without a cache): ``idx``
        ``(1, total)`` holds documents packed one after another, each attending only within
        itself at positions from 0 (FlashAttention's varlen convention)."""
        T = idx.shape[1]
        cfg = self.cfg
        if cu_seqlens is not None and (idx.shape[0] != 1 or cache is not None or start != 0):
            raise ValueError(
                f"packed documents (cu_seqlens) take idx of shape (1, total) without a cache or "
                f"start; got idx {tuple(idx.shape)}, start {start}, cache {cache is not None}"
            )
        if start + T > cfg.max_seq_len and cu_seqlens is None:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len")
        if cache is not None and cache.seqlen() != start:
            raise ValueError(f"start {start} but the cache holds {cache.seqlen()} tokens")
        pos = torch.arange(start, start + T, device=idx.device)
        if cu_seqlens is not None:
            pos = packed_positions(cu_seqlens, T)
        x = self.tok(idx)
        if self.pos is not None:
            x = x + self.pos(pos)
        rope = None
        if cfg.pos == "rope":
            rope = rope_at(pos, cfg.dim // cfg.n_heads, cfg.rope_theta)
        m = None
        for i, block in enumerate(self.blocks):
            x, m = block(x, m, rope, cache, i, cu_seqlens)
        logits = self.head(add_norm(self.norm, x, m)[0])
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, use_cache: bool = True):
        """Greedy continuation of ``idx`` ``(batch, seqlen)``: one prefill over the prompt, then
        one-token decode steps against the KV cache (or full recomputation without it)."""
        B, T = idx.shape
        cache = KVCache(T + max_new_tokens) if use_cache else None
        out = idx.new_empty(B, T + max_new_tokens)
        out[:, :T] = idx
        logits, _ = self(idx, cache=cache)
        for t in range(T, T + max_new_tokens):
            out[:, t] = logits[:, -1].argmax(-1)
            if t + 1 == T + max_new_tokens:
                break  # (the last token's logits are not needed)
            if cache is not None:
                logits, _ = self(out[:, t : t + 1], start=t, cache=cache)
            else:
                logits, _ = self(out[:, : t + 1])
        return out


def tiny_corpus(n_chars: int = 20000, seed: int = 0) -> str:
    """Generated text for the tiny training runs (no downloads): sentences from a small grammar,
    so a character model has real structure to learn."""
    g = torch.Generator().manual_seed(seed)
    subj = ["the cat", "a dog", "my friend", "the old man", "she", "we"]
    verb = ["sees", "likes", "finds", "wants", "draws", "reads"]
    obj = ["the moon", "a red ball", "some bread", "the river", "a small book", "them"]
    words: list[str] = []
    while sum(len(w) + 2 for w in words) < n_chars:
        pick = [int(torch.randint(len(c), (1,), generator=g)) for c in (subj, verb, obj)]
        words.append(f"{subj[pick[0]]} {verb[pick[1]]} {obj[pick[2]]}.")
    return " ".join(words)[:n_chars]
