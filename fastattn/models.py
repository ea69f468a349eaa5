"""A compact decoder-only Transformer, readable end to end, that runs on eager PyTorch ops
(``kernels="eager"``, the oracle), torch's SDPA (``"sdpa"``) or fastattn's kernels
(``kernels="fastattn"``). All build
the same parameters with the same names, so they load each other's ``state_dict``.

    cfg = TransformerConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2)
    model = Transformer(cfg, kernels="fastattn")
    logits, loss = model(tokens, targets)          # tokens (batch, seqlen) int64
    out = model.generate(prompt, max_new_tokens=32)  # greedy, with a KV cache
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fastattn
import fastattn.nn as fnn

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
# eager: matmul/softmax/matmul and torch's norms (the oracle); sdpa: torch's fused attention;
# fastattn: fastattn's attention and norms (the residual add fused into the second norm).
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


def _norm(cfg: TransformerConfig, fast: bool, fused_add: bool = False) -> nn.Module:
    if cfg.norm not in ("rmsnorm", "layernorm"):
        raise ValueError(f"TransformerConfig.norm must be 'rmsnorm' or 'layernorm', got {cfg.norm}")
    rms = cfg.norm == "rmsnorm"
    if not fast:
        return (nn.RMSNorm if rms else nn.LayerNorm)(cfg.dim, eps=cfg.norm_eps)
    if fused_add:
        return (fnn.FusedAddRMSNorm if rms else fnn.FusedAddLayerNorm)(cfg.dim, eps=cfg.norm_eps)
    return (fnn.RMSNorm if rms else fnn.LayerNorm)(cfg.dim, eps=cfg.norm_eps)


def rotary(x: torch.Tensor, start: int, theta: float) -> torch.Tensor:
    """Rotary position embedding of ``x`` ``(batch, heads, seqlen, head_dim)`` at positions
    ``start, start + 1, ...`` (pairs (i, i + head_dim/2) rotated, in fp32)."""
    T, D = x.shape[-2], x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = torch.arange(start, start + T, device=x.device, dtype=torch.float32)[:, None] * inv
    cos, sin = ang.cos(), ang.sin()  # (T, D/2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, kernels: str) -> None:
        super().__init__()
        self.cfg, self.kernels = cfg, kernels
        self.n_heads, self.n_kv = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
        if cfg.dim % cfg.n_heads or self.n_heads % self.n_kv:
            raise ValueError("dim must divide by n_heads, and n_heads by n_kv_heads")
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, start: int, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.cfg.pos == "rope":
            q, k = rotary(q, start, self.cfg.rope_theta), rotary(k, start, self.cfg.rope_theta)
        if cache is not None:  # decode: append this step's keys/values to the layer's cache
            if layer < len(cache):
                k = torch.cat([cache[layer][0], k], dim=2)
                v = torch.cat([cache[layer][1], v], dim=2)
                cache[layer] = (k, v)
            else:
                cache.append((k, v))
        p = self.cfg.dropout if self.training else 0.0
        # Causal, bottom-right aligned: the T new queries follow the cached keys.
        if self.kernels == "fastattn":
            o = fastattn.attention(q, k, v, causal=True, dropout_p=p)
        elif self.kernels == "sdpa":
            o = _sdpa_attention(q, k, v, p)
        else:
            o = _eager_attention(q, k, v, p)
        assert isinstance(o, torch.Tensor)
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))


def _eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
    """matmul, masked softmax, matmul: the textbook version the fused kernel replaces."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    Tq, Tk = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    hide = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(Tk - Tq + 1)
    a = torch.softmax(s.masked_fill(hide, float("-inf")), dim=-1)
    return F.dropout(a, p) @ v


def _sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
    """torch's fused SDPA (its causal flag is top-left aligned, so decode steps pass a mask)."""
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                              enable_gqa=True)  # fmt: skip
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p, enable_gqa=True)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)). With fastattn kernels the
    second residual add is fused into norm2 (one pass writes both the sum and its norm)."""

    def __init__(self, cfg: TransformerConfig, kernels: str) -> None:
        super().__init__()
        self.fast = fast = kernels == "fastattn"
        self.norm1 = _norm(cfg, fast)
        self.attn = Attention(cfg, kernels)
        self.norm2 = _norm(cfg, fast, fused_add=True)
        hidden = cfg.mlp_hidden or 4 * cfg.dim
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, start: int = 0, cache: KVCache | None = None, layer: int = 0):
        a = self.drop(self.attn(self.norm1(x), start, cache, layer))
        if self.fast:
            h, x = self.norm2(a, x)  # (norm2(x + a), x + a)
        else:
            x = x + a
            h = self.norm2(x)
        return x + self.drop(self.mlp(h))


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
        self.blocks = nn.ModuleList(Block(cfg, kernels) for _ in range(cfg.n_layers))
        self.norm = _norm(cfg, kernels == "fastattn")
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
                start: int = 0, cache: KVCache | None = None):  # fmt: skip
        """Logits ``(batch, seqlen, vocab)`` of tokens ``idx`` at positions ``start...``, and the
        cross-entropy loss when ``targets`` is given (else None)."""
        T = idx.shape[1]
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len")
        x = self.tok(idx)
        if self.pos is not None:
            x = x + self.pos(torch.arange(start, start + T, device=idx.device))
        for i, block in enumerate(self.blocks):
            x = block(x, start, cache, i)
        logits = self.head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, use_cache: bool = True):
        """Greedy continuation of ``idx`` ``(batch, seqlen)``: one prefill over the prompt, then
        one-token decode steps against the KV cache (or full recomputation without it)."""
        cache: KVCache | None = [] if use_cache else None
        logits, _ = self(idx, cache=cache)
        out = idx
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
            if use_cache:
                logits, _ = self(nxt, start=out.shape[1] - 1, cache=cache)
            else:
                logits, _ = self(out)
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
