"""A small serving loop for the reference Transformer (:mod:`fastattn.models`) on a paged KV
cache: requests are admitted while blocks are free, prefilled, then decoded together in batched
one-token steps (ragged lengths, one :func:`fastattn.paged_attention` call per layer and step);
a finished request leaves and its blocks go back to the pool for the next ones.

    engine = Engine(model, num_blocks=64, block_size=16, backend="cpu")
    rid = engine.submit([3, 1, 4, 1, 5], max_new_tokens=20, eos=0)
    outputs = engine.run()  # {request id: generated token ids}, greedy

Scheduling is first come, first served and never preempts: a request is admitted only once the
pool can hold its longest possible run (prompt + max_new_tokens - 1 cached tokens) on top of
what the running requests may still grow to, so a running request never runs out of blocks.
Blocks are still taken from the free list only as a sequence grows, and returned when it ends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fastattn.models import Transformer, add_norm, rope_at

__all__ = ["BlockPool", "Engine", "Request", "paged_logits"]


class BlockPool:
    """The paged KV cache of a model: per layer, keys and values in blocks ``(num_blocks,
    block_size, kv_heads, head_dim)``; a free-block list; per sequence (an int id) its block
    table and its length (the tokens cached). Block ids are shared by all layers."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, *, dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip
        if num_blocks < 1:
            raise ValueError(f"BlockPool: num_blocks must be >= 1, got {num_blocks}")
        if block_size < 16 or block_size & (block_size - 1):  # paged_attention's block sizes
            raise ValueError(
                f"BlockPool: block_size must be a power of two >= 16, got {block_size}"
            )
        self.num_blocks, self.block_size, self.device = num_blocks, block_size, device
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        # Last in, first out: a block just freed is the next one handed out.
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        self.handed_out = 0  # blocks taken from the free list so far (a reused block again)

    def blocks_for(self, tokens: int) -> int:
        """Blocks that ``tokens`` cached tokens fill."""
        return -(-tokens // self.block_size)

    def add(self, seq: int) -> None:
        if seq in self.tables:
            raise ValueError(f"BlockPool: sequence {seq} is already in the pool")
        self.tables[seq], self.lens[seq] = [], 0

    def grow(self, seq: int, tokens: int) -> None:
        """Gives ``seq`` blocks for ``tokens`` cached tokens in all (taken from the free list)."""
        table = self.tables[seq]
        more = self.blocks_for(tokens) - len(table)
        if more > len(self.free):
            raise RuntimeError(
                f"BlockPool: sequence {seq} needs {more} more blocks of {self.block_size} for "
                f"{tokens} tokens; {len(self.free)} of {self.num_blocks} are free"
            )
        for _ in range(max(more, 0)):
            table.append(self.free.pop())
            self.handed_out += 1

    def advance(self, seqs: Sequence[int], tokens: int) -> None:
        """Counts ``tokens`` more cached tokens for each of ``seqs`` (written by the last call)."""
        for s in seqs:
            self.lens[s] += tokens

    def release(self, seq: int) -> None:
        """Returns ``seq``'s blocks to the free list and forgets the sequence."""
        self.free.extend(reversed(self.tables.pop(seq)))
        del self.lens[seq]

    def batch(self, seqs: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``block_table`` int32 ``(batch, max_blocks)`` (rows padded with block 0, never read)
        and ``cache_seqlens`` int32 ``(batch,)`` of ``seqs``, on the pool's device."""
        width = max(len(self.tables[s]) for s in seqs)
        rows = [self.tables[s] + [0] * (width - len(self.tables[s])) for s in seqs]
        table = torch.tensor(rows, dtype=torch.int32, device=self.device)
        lens = torch.tensor([self.lens[s] for s in seqs], dtype=torch.int32, device=self.device)
        return table, lens


def paged_logits(model: Transformer, idx: torch.Tensor, positions: torch.Tensor,
                  pool: BlockPool, seqs: Sequence[int],
                  backend: str = "auto") -> torch.Tensor:  # fmt: skip
    """Logits ``(batch, T, vocab)`` of tokens ``idx`` ``(batch, T)`` at ``positions`` ``(batch,
    T)``, sequence b being ``seqs[b]`` of ``pool``: each layer appends the T tokens' keys and
    values to that sequence's blocks (which must already hold them: :meth:`BlockPool.grow`) and
    attends to all its cached tokens. The caller advances the lengths afterwards."""
    B, T = idx.shape
    cfg = model.cfg
    table, lens = pool.batch(seqs)
    x = model.tok(idx)
    if model.pos is not None:
        x = x + model.pos(positions)
    rope = None
    if cfg.pos == "rope":
        cos, sin = rope_at(positions.flatten(), cfg.dim // cfg.n_heads, cfg.rope_theta)
        rope = cos.view(B, T, 1, -1), sin.view(B, T, 1, -1)  # (B, T, 1, D/2)
    m = None
    for i, block in enumerate(model.blocks):
        x, m = block(x, m, rope, paged=(pool.k[i], pool.v[i], table, lens, backend))
    return model.head(add_norm(model.norm, x, m)[0])


@dataclass
class Request:
    """One generation request; ``output`` fills with its greedy tokens."""

    id: int
    prompt: list[int]
    max_new_tokens: int
    eos: int | None = None
    need: int = 0  # blocks its longest run fills (prompt + max_new_tokens - 1 cached tokens)
    output: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        hit_eos = self.eos is not None and bool(self.output) and self.output[-1] == self.eos
        return len(self.output) >= self.max_new_tokens or hit_eos


class Engine:
    """Continuous batching of greedy generation on a :class:`BlockPool` of ``num_blocks``
    blocks of ``block_size`` tokens (see the module docstring for the policy).

    ``backend``: paged_attention's backend. ``max_batch``: most requests running at once (None:
    as many as the blocks allow). ``prefill_chunk``: prompts are prefilled in chunks of at most
    this many tokens (None: whole); newly admitted prompts of equal length prefill as one batch.
    Run the model in eval mode (dropout, if configured, would apply as in ``generate``).
    """

    def __init__(self, model: Transformer, num_blocks: int, block_size: int = 16, *,
                 backend: str = "auto", max_batch: int | None = None,
                 prefill_chunk: int | None = None) -> None:  # fmt: skip
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"Engine: max_batch must be >= 1 or None, got {max_batch}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"Engine: prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        cfg = model.cfg
        p = next(model.parameters())
        self.model, self.backend = model, backend
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        kv_heads, head_dim = cfg.n_kv_heads or cfg.n_heads, cfg.dim // cfg.n_heads
        self.pool = BlockPool(cfg.n_layers, num_blocks, block_size, kv_heads, head_dim,
                              dtype=p.dtype, device=p.device)  # fmt: skip
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished: dict[int, list[int]] = {}
        self._next_id = 0

    def submit(self, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int,
               eos: int | None = None) -> int:  # fmt: skip
        """Queues a request (``prompt`` token ids, 1-D); returns its id. Refuses one that could
        never run: empty, out-of-vocabulary tokens, past ``max_seq_len``, or needing more blocks
        than the whole pool holds."""
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1:
                raise ValueError(f"Engine.submit: prompt must be 1-D, got {tuple(prompt.shape)}")
            prompt = prompt.tolist()
        toks, cfg = [int(t) for t in prompt], self.model.cfg
        if not toks or max_new_tokens < 1:
            raise ValueError(
                f"Engine.submit: need a non-empty prompt and max_new_tokens >= 1; got a prompt "
                f"of {len(toks)} tokens and max_new_tokens {max_new_tokens}"
            )
        if not all(0 <= t < cfg.vocab_size for t in toks):
            raise ValueError(f"Engine.submit: prompt tokens must be in [0, {cfg.vocab_size})")
        total = len(toks) + max_new_tokens
        if total > cfg.max_seq_len:
            raise ValueError(
                f"Engine.submit: prompt of {len(toks)} + {max_new_tokens} new tokens exceeds "
                f"max_seq_len {cfg.max_seq_len}"
            )
        need = self.pool.blocks_for(total - 1)  # (the last token is never fed back)
        if need > self.pool.num_blocks:
            raise ValueError(
                f"Engine.submit: prompt of {len(toks)} + {max_new_tokens} new tokens needs {need} "
                f"blocks of {self.pool.block_size}; the pool holds {self.pool.num_blocks} in all"
            )
        req = Request(self._next_id, toks, max_new_tokens, eos, need)
        self._next_id += 1
        self.waiting.append(req)
        return req.id

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self) -> dict[int, list[int]]:
        """Steps until every submitted request is done; their generated tokens by id."""
        while self.busy:
            self.step()
        return self.finished

    @torch.no_grad()
    def step(self) -> list[int]:
        """Admits what fits and prefills it, then one decode step of every running request;
        returns the ids of the requests that finished in this step."""
        new = self._admit()
        before = set(self.finished)
        by_len: dict[int, list[Request]] = {}
        for r in new:
            by_len.setdefault(len(r.prompt), []).append(r)
        for group in by_len.values():
            self._prefill(group)
        if self.running:
            self._decode()
        return [i for i in self.finished if i not in before]

    def _admit(self) -> list[Request]:
        """Moves waiting requests, in order, to running while the pool can hold each one's
        longest run besides what the running ones may still take."""
        admitted: list[Request] = []
        pool = self.pool
        while self.waiting and (self.max_batch is None or len(self.running) < self.max_batch):
            owed = sum(r.need - len(pool.tables[r.id]) for r in self.running)
            if self.waiting[0].need > len(pool.free) - owed:
                break  # first come, first served: the head waits for blocks, and all behind it
            req = self.waiting.popleft()
            pool.add(req.id)
            self.running.append(req)
            admitted.append(req)
        return admitted

    def _prefill(self, group: list[Request]) -> None:
        """Prefills prompts of one length together, chunk by chunk; samples the first token."""
        dev, P = self.pool.device, len(group[0].prompt)
        ids = [r.id for r in group]
        tokens = torch.tensor([r.prompt for r in group], device=dev)  # (G, P)
        chunk = self.prefill_chunk or P
        for c in range(0, P, chunk):
            n = min(chunk, P - c)
            for i in ids:
                self.pool.grow(i, c + n)
            pos = torch.arange(c, c + n, device=dev).expand(len(group), n)
            logits = paged_logits(self.model, tokens[:, c : c + n], pos, self.pool, ids,
                                   self.backend)  # fmt: skip
            self.pool.advance(ids, n)
        self._sample(group, logits[:, -1])

    def _decode(self) -> None:
        """One token for every running request: one batched step at ragged positions."""
        group, dev = list(self.running), self.pool.device
        ids = [r.id for r in group]
        for i in ids:
            self.pool.grow(i, self.pool.lens[i] + 1)
        tokens = torch.tensor([[r.output[-1]] for r in group], device=dev)  # (B, 1)
        pos = torch.tensor([[self.pool.lens[i]] for i in ids], device=dev)  # each one's next
        logits = paged_logits(self.model, tokens, pos, self.pool, ids, self.backend)
        self.pool.advance(ids, 1)
        self._sample(group, logits[:, -1])

    def _sample(self, group: list[Request], logits: torch.Tensor) -> None:
        """Greedy next tokens ``logits`` ``(len(group), vocab)``; finished requests leave."""
        for r, t in zip(group, logits.argmax(-1).tolist(), strict=True):
            r.output.append(int(t))
            if r.done:
                self.pool.release(r.id)
                self.running.remove(r)
                self.finished[r.id] = r.output
