"""fastattn.paged_attention (issue 16): attention against a paged KV cache, against the float64
reference on each sequence's keys laid out densely; the in-place append of new keys; the checks
of block tables and lengths; opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch
from conftest import GPU, assert_parity, sequence_oracle

import fastattn

# cache lengths per batch, and why: empty, one token, odd lengths past a block, a long one.
LENGTHS = {
    "decode-mixed": [0, 1, 113, 40],
    "long": [1025, 7],
}
VARIANTS = {
    "plain": {},
    "causal": {"causal": True},
    "window-softcap": {"causal": True, "window": (20, 0), "softcap": 3.0},
    "sinks-alibi": {"sinks": True, "alibi": True},
}


def make_cache(lengths, new, bs, H, Hkv, D, dtype, seed=0, dv=None):
    """Dense per-sequence keys/values (each sequence's cache_seqlens + new tokens), scattered
    into shuffled blocks of a paged cache with spare blocks; q and the new keys/values.
    ``dv``: v's own head dim (default D)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    dense_k = [torch.randn(n + new, Hkv, D, generator=g).to(dtype) for n in lengths]
    dense_v = [torch.randn(n + new, Hkv, dv or D, generator=g).to(dtype) for n in lengths]
    need = [-(-(n + new) // bs) for n in lengths]
    max_blocks = max(need) + 1
    nblocks = sum(need) + 3
    perm = torch.randperm(nblocks, generator=g)
    k_cache = torch.randn(nblocks, bs, Hkv, D, generator=g).to(dtype)  # garbage where unused
    v_cache = torch.randn(nblocks, bs, Hkv, dv or D, generator=g).to(dtype)
    table = torch.full((B, max_blocks), nblocks - 1, dtype=torch.int32)  # unused: a valid id
    used = 0
    for b, n in enumerate(lengths):
        ids = perm[used : used + need[b]]
        used += need[b]
        table[b, : need[b]] = ids.to(torch.int32)
        for t in range(n):  # only the cached part; the new tokens are the op's to write
            k_cache[ids[t // bs], t % bs] = dense_k[b][t]
            v_cache[ids[t // bs], t % bs] = dense_v[b][t]
    q = torch.randn(B, max(new, 1) if new else 1, H, D, generator=g).to(dtype)
    k_new = torch.stack([k[n:] for k, n in zip(dense_k, lengths, strict=True)]) if new else None
    v_new = torch.stack([v[n:] for v, n in zip(dense_v, lengths, strict=True)]) if new else None
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    return q, k_cache, v_cache, table, seqlens, k_new, v_new, dense_k, dense_v


def as64(kw):
    """The public functions' keyword arguments with their tensors in float64."""
    return {k: (t.double() if isinstance(t, torch.Tensor) else t) for k, t in kw.items()}


def check_lse(lse, q, dense_k, kw, what, opmath=torch.float32):
    """Each sequence's lse ``(heads, seqlen_q)`` against the float64 reference (lse_oracle)."""
    for b in range(q.shape[0]):
        assert_parity(lse[b], lse_oracle(q[b], dense_k[b], as64(kw), b), None, f"{what} lse {b}",
                      opmath)  # fmt: skip


def check_sequences(out, q, dense_k, dense_v, kw, dtype, what):
    """Each sequence of ``out`` against the float64 reference on its dense keys alone
    (conftest.sequence_oracle; the keys are ragged: one sequence at a time)."""
    kw64 = as64(kw)
    for b in range(q.shape[0]):
        want = sequence_oracle(q[b].double(), dense_k[b].double(), dense_v[b].double(), kw64,
                               torch.float64, b)  # fmt: skip
        eager = sequence_oracle(q[b], dense_k[b], dense_v[b], kw, dtype, b)
        assert_parity(out[b], want, eager, f"{what} seq {b}")


def extras(kw, H, B):
    g = torch.Generator().manual_seed(9)
    out = {k: v for k, v in kw.items() if k in ("causal", "window", "softcap")}
    if kw.get("sinks"):
        out["sinks"] = torch.randn(H, generator=g)
    if kw.get("alibi"):
        out["alibi_slopes"] = torch.rand(B, H, generator=g) * 0.3
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("new", [0, 1, 7])  # attend to the cache; decode; a chunk of 7
@pytest.mark.parametrize("bs", [16, 64])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(LENGTHS))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_paged_parity(backend, name, variant, bs, new, dtype):
    lengths = LENGTHS[name]
    H, Hkv, D = 4, 2, 16
    q, kc, vc, table, seqlens, kn, vn, dk, dv = make_cache(lengths, new, bs, H, Hkv, D, dtype)
    kw = extras(VARIANTS[variant], H, len(lengths))
    before_k = kc.clone()
    out = fastattn.paged_attention(q, kc, vc, table, seqlens, k_new=kn, v_new=vn,
                                   backend=backend, **kw)  # fmt: skip
    check_sequences(out, q, dk, dv, kw, dtype, f"{backend} {name} {variant}")
    if new:  # the new keys were written at each sequence's length, nothing else changed
        for b, n in enumerate(lengths):
            for t in range(n, n + new):
                blk, off = int(table[b, t // bs]), t % bs
                assert torch.equal(kc[blk, off], kn[b, t - n])
                before_k[blk, off] = kn[b, t - n]
        assert torch.equal(kc, before_k)
    else:
        assert torch.equal(kc, before_k)


# The CPU kernel's own paths (csrc/paged.cpp walks the block table inside the attention kernels):
# queries per sequence 1 (decode: K/V read in place, G * Sq <= 8 rows; bf16 with AVX512_BF16
# packs instead), 3 (a small chunk: tiles packed per item) and 40 (G * 40 rows > one work item:
# K/V packed once per wave); block sizes 16 and 32 (several cache blocks per 128-key tile) and
# 256 (a tile at an offset inside one block); head dims 40 and 96 (not vector multiples), a v
# head dim of its own; fp64 takes the scalar path.
SHAPES = {"gqa4-d40": (8, 2, 40, 40), "mha-d96-dv64": (2, 2, 96, 64)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("new", [1, 3, 40])
@pytest.mark.parametrize("bs", [16, 32, 256])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant", ["plain", "window-softcap", "sinks-alibi"])
def test_paged_cpu_kernel_paths(variant, shape, bs, new, dtype):
    H, Hkv, D, Dv = SHAPES[shape]
    # empty, one block and more, one token, odd lengths; 600: past one 512-key chunk of the
    # chunk-major decode items (merged as split-K), across blocks of 256
    lengths = [0, 300, 1, 113, 7, 600]
    q, kc, vc, table, seqlens, kn, vn, dk, dv = make_cache(lengths, new, bs, H, Hkv, D, dtype,
                                                           dv=Dv)  # fmt: skip
    kw = extras(VARIANTS[variant], H, len(lengths))
    out, lse = fastattn.paged_attention(q, kc, vc, table, seqlens, k_new=kn, v_new=vn,
                                        backend="cpu", return_lse=True, **kw)  # fmt: skip
    assert out.shape == (len(lengths), new, H, Dv) and out.is_contiguous()
    what = f"cpu {shape} {variant} bs {bs} new {new}"
    check_sequences(out, q, dk, dv, kw, dtype, what)
    check_lse(lse, q, dk, kw, what, torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["causal", "sinks-alibi"])
def test_paged_cpu_split_keys(variant, dtype):
    """Two sequences, one kv head, one query each: the 2100 keys are cut into chunks (the
    chunk-major decode items; at two threads split-K's rule would cut them too) merged in a
    fixed order (attention.cpp)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, kc, vc, table, seqlens, kn, vn, dk, dv = make_cache([2100, 0], 1, 16, 4, 1, 64, dtype)
        kw = extras(VARIANTS[variant], 4, 2)
        out = fastattn.paged_attention(q, kc, vc, table, seqlens, k_new=kn, v_new=vn,
                                       backend="cpu", **kw)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    check_sequences(out, q, dk, dv, kw, dtype, f"cpu split-K {variant}")


def test_paged_cpu_op_refuses_bad_tables_in_cpp():
    """The C++ entry checks lengths and block ids itself (TORCH_CHECK), before reading keys."""
    q, kc, vc, table, seqlens, *_ = make_cache([5, 17], 0, 16, 2, 1, 8, torch.float32)
    op = torch.ops.fastattn.paged_attention_forward
    args = (None, None, 1.0, False, -1, -1, 0.0, None, None)
    bad = table.clone()
    bad[1, 1] = 10_000
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 10000 is outside"):
        op(q.transpose(1, 2), kc, vc, bad, seqlens, *args)
    with pytest.raises(ValueError, match=r"sequence 0 has 999 \+ 0 keys, which need 63 blocks"):
        op(q.transpose(1, 2), kc, vc, table, torch.tensor([999, 1], dtype=torch.int32), *args)
    with pytest.raises(RuntimeError, match="block_size must be a power of two"):
        op(q.transpose(1, 2), kc[:, :12], vc[:, :12], table, seqlens, *args)
    sinks = torch.zeros(4)[::2]  # (heads,) but strided: the kernels index it as contiguous
    with pytest.raises(RuntimeError, match="sinks must be contiguous"):
        op(q.transpose(1, 2), kc, vc, table, seqlens, None, None, 1.0, False, -1, -1, 0.0, sinks,
           None)  # fmt: skip
    torch.library.opcheck(op.default, (q.transpose(1, 2), kc, vc, table, seqlens, *args))


@pytest.mark.parametrize("variant", ["causal", "sinks-alibi"])
def test_paged_triton_in_the_interpreter(variant):
    lengths = [0, 5, 40]
    q, kc, vc, table, seqlens, kn, vn, dk, dv = make_cache(lengths, 1, 16, 2, 1, 16, torch.float32)
    kw = extras(VARIANTS[variant], 2, 3)
    out = fastattn.paged_attention(q, kc, vc, table, seqlens, k_new=kn, v_new=vn,
                                   backend="triton", **kw)  # fmt: skip
    check_sequences(out, q, dk, dv, kw, torch.float32, f"triton {variant}")


# ------------------------------------------------ the Triton kernel that walks the block table
# (fastattn/ops/paged_triton.py), in the interpreter. Its pinned tiles here (paged_tiles): fp32
# 16 rows x 32 keys, bf16 16 x 64 (decode) or 64 x 64 (prefill); so block size 16 and 32 put
# several cache blocks in one key tile, 64 one block over two fp32 tiles. Lengths: empty (no
# key at all when nothing is appended), one token, under one block, many blocks, ragged end.
T_LENGTHS = [0, 1, 7, 113]
T_HEADS = {"gqa4-2-d40": (4, 2, 40), "mha2-d64": (2, 2, 64)}  # 40: a head dim padded to 64
T_VARIANTS = {**VARIANTS, "window-both": {"window": (9, 4)}}  # a window with no causal limit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", list(T_VARIANTS))
@pytest.mark.parametrize("heads", list(T_HEADS))
# seqlen_q: 1 with nothing appended (attend to the cache); decode; a small chunked prefill; 17
# rows per head, a chunk past one 16-row query tile (fp32; with GQA 34 rows: 3 tiles)
@pytest.mark.parametrize("new", [0, 1, 3, 17])
@pytest.mark.parametrize("bs", [16, 32, 64])
def test_paged_triton_kernel(bs, new, heads, variant, dtype):
    H, Hkv, D = T_HEADS[heads]
    q, kc, vc, table, seqlens, kn, vn, dk, dv = make_cache(T_LENGTHS, new, bs, H, Hkv, D, dtype)
    kw = extras(T_VARIANTS[variant], H, len(T_LENGTHS))
    before = kc.clone()
    out = fastattn.paged_attention(q, kc, vc, table, seqlens, k_new=kn, v_new=vn,
                                   backend="triton", **kw)  # fmt: skip
    check_sequences(out, q, dk, dv, kw, dtype, f"triton {variant}")
    for b, n in enumerate(T_LENGTHS):  # the append wrote each new token at its place only
        for t in range(n, n + new):
            before[int(table[b, t // bs]), t % bs] = kn[b, t - n]
    assert torch.equal(kc, before)


def lse_oracle(q, k, kw64, seq):
    """float64 lse ``(heads, seqlen_q)`` of one sequence (as conftest.sequence_oracle)."""
    from conftest import reference_attention_terms

    from fastattn import reference

    qs, ks = (t.double().transpose(0, 1)[None] for t in (q, k))  # (1, H, L, D)
    al = kw64.get("alibi_slopes")
    causal, off, win = reference_attention_terms(qs, ks, bool(kw64.get("causal")),
                                                 kw64.get("window"))  # fmt: skip
    _, lse = reference.attention(
        qs, ks, ks, None, None, causal, off, window=win, softcap=kw64.get("softcap", 0.0),
        sinks=kw64.get("sinks"), alibi_slopes=None if al is None else al[seq : seq + 1],
        opmath=torch.float64,
    )  # fmt: skip
    return lse[0]


def direct_call(lengths, new, bs, H, Hkv, D, dtype, kw, dv=None, **force):
    """paged_triton.paged_forward on a cache holding every token (new ones written here)."""
    from fastattn.ops.paged_triton import paged_forward

    q, kc, vc, table, seqlens, kn, vn, dk, dvs = make_cache(lengths, new, bs, H, Hkv, D, dtype,
                                                            dv=dv)  # fmt: skip
    for b, n in enumerate(lengths):
        for t in range(n, n + new):
            kc[table[b, t // bs], t % bs], vc[table[b, t // bs], t % bs] = dk[b][t], dvs[b][t]
    wl, wr = kw.get("window", (-1, -1))
    wr = 0 if kw.get("causal") and "window" in kw else wr
    al = kw.get("alibi_slopes")
    al = None if al is None else al.expand(len(lengths), H)
    causal, softcap = bool(kw.get("causal")), kw.get("softcap", 0.0)
    out, lse = paged_forward(q, kc, vc, table, seqlens + new, D**-0.5, causal, wl, wr, softcap,
                             kw.get("sinks"), al, **force)  # fmt: skip
    return q, out, lse, dk, dvs


@pytest.mark.parametrize("variant", ["plain", "window-softcap", "sinks-alibi"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [2, 5])  # 113 keys: 5 splits of 32 leave empty splits
@pytest.mark.parametrize("new", [1, 3])
def test_paged_triton_split_k(new, splits, dtype, variant):
    # Forced key splits: fp32 partials of each split merged by the combine kernel (the sinks
    # join there once); out and lse against the float64 reference.
    H, Hkv, D = 4, 2, 40
    kw = extras(VARIANTS[variant], H, len(T_LENGTHS))
    q, out, lse, dk, dv = direct_call(T_LENGTHS, new, 16, H, Hkv, D, dtype, kw, num_splits=splits)
    check_sequences(out, q, dk, dv, kw, dtype, f"split {splits}")
    check_lse(lse, q, dk, kw, f"split {splits}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
# (D, Dv): the smallest; 96 (padded to 128); v's own head dim (padded apart: 64 / 32); a
# 192 / 128 latent-attention pair and 256 (the largest tier)
@pytest.mark.parametrize("dims", [(16, 16), (96, 96), (40, 24), (192, 128), (256, 256)])
def test_paged_triton_head_dims(dims, dtype):
    D, Dv = dims
    kw = extras(VARIANTS["sinks-alibi"], 4, 2) | {"causal": True}
    q, out, lse, dk, dv = direct_call([5, 70], 3, 32, 4, 1, D, dtype, kw, dv=Dv)
    check_sequences(out, q, dk, dv, kw, dtype, f"head dims {dims}")


@pytest.mark.parametrize(
    "tile",
    [(16, 16, 4, 1), (32, 16, 4, 1)],  # one 64-token block over four key tiles; 17 x 2 rows
)  # fmt: skip
def test_paged_triton_tiles_inside_a_block(tile):
    kw = {"causal": True, "window": (30, 0)}
    q, out, _, dk, dv = direct_call(T_LENGTHS, 17, 64, 2, 1, 40, torch.bfloat16, kw, tile=tile)
    check_sequences(out, q, dk, dv, kw, torch.bfloat16, f"tile {tile}")


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("new", [0, 3])
def test_paged_shared_blocks_and_garbage_table(new, backend):
    # Prefix sharing: sequence 1 reads sequence 0's first two blocks (ids out of order), then
    # its own; entries past a sequence's blocks hold ids outside the cache, never read.
    g = torch.Generator().manual_seed(3)
    bs, Hkv, H, D, n0, n1 = 16, 2, 4, 32, 40, 56
    kc = torch.randn(9, bs, Hkv, D, generator=g)
    vc = torch.randn(9, bs, Hkv, D, generator=g)
    table = torch.tensor([[7, 2, 5, 10**6, -1], [7, 2, 0, 4, 10**6]], dtype=torch.int32)
    k_new = torch.randn(2, new, Hkv, D, generator=g)
    v_new = torch.randn(2, new, Hkv, D, generator=g)
    q = torch.randn(2, max(new, 1), H, D, generator=g)
    dense = []
    for b, n in enumerate((n0, n1)):
        ids = table[b, : -(-(n + new) // bs)].long()
        k, v = (c[ids].reshape(-1, Hkv, D)[:n] for c in (kc, vc))  # (n, Hkv, D)
        dense.append((torch.cat([k, k_new[b]]), torch.cat([v, v_new[b]])))
    kw = {"causal": True}
    kn, vn = (k_new, v_new) if new else (None, None)
    out = fastattn.paged_attention(q, kc, vc, table, torch.tensor([n0, n1], dtype=torch.int32),
                                   k_new=kn, v_new=vn, backend=backend, **kw)  # fmt: skip
    check_sequences(out, q, [d[0] for d in dense], [d[1] for d in dense], kw, torch.float32,
                    "shared blocks")  # fmt: skip


def strided_views(D, dtype, device="cpu"):
    """Every tensor as a view with its own strides: caches with K and V side by side in one
    storage (transformers' layout) over a head-major block layout, new tokens with a
    transposed last two dims, a block table that is every other column of a wider one, a
    strided length vector (37 and 5 tokens) and sinks (float32). Returns (q, k_cache, v_cache,
    block_table, cache_seqlens, k_new, v_new, sinks); 4 heads over 2 kv heads, blocks of 16."""
    g = torch.Generator().manual_seed(5)
    bs, Hkv, H = 16, 2, 4
    # (blocks, heads, k|v, rows, D)
    kv = torch.randn(6, Hkv, 2, bs, D, generator=g).to(device, dtype)
    kc, vc = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (6, bs, Hkv, D)
    wide = torch.full((2, 8), 10**6, dtype=torch.int32)
    wide[0, 0:6:2] = torch.tensor([4, 1, 3], dtype=torch.int32)
    wide[1, 0:4:2] = torch.tensor([0, 5], dtype=torch.int32)
    table = wide.to(device)[:, ::2]
    lens = torch.tensor([37, 99, 5, 99], dtype=torch.int32).to(device)[::2]
    # (2, 2, Hkv, D), strided
    k_new = torch.randn(2, 2, D, Hkv, generator=g).to(device, dtype).transpose(2, 3)
    v_new = torch.randn(2, 2, D, Hkv, generator=g).to(device, dtype).transpose(2, 3)
    sinks = torch.randn(2 * H, generator=g).to(device)[::2]
    q = torch.randn(2, 2, H, D, generator=g).to(device, dtype)
    return q, kc, vc, table, lens, k_new, v_new, sinks


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_paged_strided_layouts(backend):
    # strided_views (fp32) against the same call on contiguous copies.
    q, kc, vc, table, lens, k_new, v_new, sinks = strided_views(32, torch.float32)
    kw = {"causal": True, "sinks": sinks}
    kc2, vc2 = kc.contiguous(), vc.contiguous()
    want = fastattn.paged_attention(
        q,
        kc2,
        vc2,
        table.contiguous(),
        lens.contiguous(),
        k_new=k_new.contiguous(),
        v_new=v_new.contiguous(),
        causal=True,
        sinks=sinks.contiguous(),
        backend="reference",
    )
    got = fastattn.paged_attention(q, kc, vc, table, lens, k_new=k_new, v_new=v_new,
                                   backend=backend, **kw)  # fmt: skip
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(kc, kc2, atol=0, rtol=0)  # the same rows written, nothing else
    torch.testing.assert_close(vc, vc2, atol=0, rtol=0)


def test_paged_triton_long_context_splits_by_itself(monkeypatch):
    # Few (sequence, kv head) programs and a long context: the launcher's heuristic splits the
    # keys by itself (the combine kernel runs); against the oracle, as one forced split.
    from fastattn.ops import paged_triton

    combines = []
    real = paged_triton.paged_combine_kernel

    class Spy:
        def __getitem__(self, grid):
            combines.append(grid)
            return real[grid]

    monkeypatch.setattr(paged_triton, "paged_combine_kernel", Spy())
    kw = extras(VARIANTS["sinks-alibi"], 2, 2)
    q, out, lse, dk, dv = direct_call([1025, 7], 1, 32, 2, 1, 16, torch.float32, kw)
    assert combines, "a 1025-key context over 2 programs was not split"
    check_sequences(out, q, dk, dv, kw, torch.float32, "auto split")
    _, out1, _, _, _ = direct_call([1025, 7], 1, 32, 2, 1, 16, torch.float32, kw, num_splits=1)
    assert len(combines) == 1, "num_splits=1 still combined"
    check_sequences(out1, q, dk, dv, kw, torch.float32, "one split")


def check_compiled(q, kc, vc, table, seqlens, kn, vn, backend, eager_backend):
    """A fullgraph compile of paged_attention on ``backend`` matches the eager call on
    ``eager_backend`` (fresh cache copies), appending in place the same."""
    kc2, vc2 = kc.clone(), vc.clone()
    f = torch.compile(fastattn.paged_attention, fullgraph=True)
    got = f(q, kc, vc, table, seqlens, k_new=kn, v_new=vn, causal=True, backend=backend)
    want = fastattn.paged_attention(q, kc2, vc2, table, seqlens, k_new=kn, v_new=vn, causal=True,
                                    backend=eager_backend)  # fmt: skip
    torch.testing.assert_close(got, want)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_paged_triton_opcheck_and_compile():
    # The op on the Triton branch (its vectorised append, then the kernel): opcheck, and a
    # fullgraph compile against the C++ backend, appending in place the same.
    q, kc, vc, table, seqlens, kn, vn, _, _ = make_cache([3, 20], 1, 16, 2, 2, 8, torch.float32)
    args = (q, kc, vc, table, seqlens, kn, vn, 0.35, True, -1, -1, 0.0, None, None, "triton")
    torch.library.opcheck(torch.ops.fastattn.paged_attention.default, args)
    check_compiled(q, kc, vc, table, seqlens, kn, vn, "triton", "cpu")


def test_paged_opcheck_and_compile():
    q, kc, vc, table, seqlens, kn, vn, _, _ = make_cache([3, 20], 1, 16, 2, 2, 8, torch.float32)
    args = (q, kc, vc, table, seqlens, kn, vn, 0.35, True, -1, -1, 0.0, None, None, "cpu")
    torch.library.opcheck(torch.ops.fastattn.paged_attention.default, args)
    check_compiled(q, kc, vc, table, seqlens, kn, vn, "auto", "auto")


def _base():
    return make_cache([5, 17], 1, 16, 2, 1, 8, torch.float32)


BAD = [
    ("block out of range", lambda a: a[3].__setitem__((0, 0), 99), ValueError, "outside the cache"),
    ("too few blocks", lambda a: a[4].__setitem__(1, 60), ValueError, "need 4 blocks of 16"),
    ("negative length", lambda a: a[4].__setitem__(0, -1), ValueError, "must be >= 0"),
]  # fmt: skip


@pytest.mark.parametrize("backend", ["cpu", "reference"])  # C++ checks / Python checks
@pytest.mark.parametrize(("what", "mutate", "exc", "match"), BAD, ids=[b[0] for b in BAD])
def test_paged_bad_values_are_refused_before_the_cache_is_touched(what, mutate, exc, match,
                                                                  backend):  # fmt: skip
    a = list(_base())
    mutate(a)
    kc = a[1].clone()
    with pytest.raises(exc, match=match):
        fastattn.paged_attention(a[0], a[1], a[2], a[3], a[4], k_new=a[5], v_new=a[6],
                                 backend=backend)  # fmt: skip
    assert torch.equal(a[1], kc), "the cache was written before the check"


@pytest.mark.parametrize(
    ("change", "exc", "match"),
    [
        (lambda a: {"block_table": a[3].long()}, TypeError, "block_table must be an int32"),
        (lambda a: {"k_cache": a[1][:, :12], "v_cache": a[2][:, :12]}, ValueError,
         "block_size must be a power of two >= 16, got 12"),
        (lambda a: {"cache_seqlens": a[4][:1]}, ValueError, r"cache_seqlens must be \(batch=2,\)"),
        (lambda a: {"v_new": None}, ValueError, "k_new and v_new come together"),
        (lambda a: {"q": a[0].double()}, TypeError, "share one floating dtype"),
        (lambda a: {"q": a[0].clone().requires_grad_()}, RuntimeError, "forward-only"),
    ],
)  # fmt: skip
def test_paged_bad_arguments_are_refused(change, exc, match):
    a = _base()
    kw = dict(q=a[0], k_cache=a[1], v_cache=a[2], block_table=a[3], cache_seqlens=a[4],
              k_new=a[5], v_new=a[6])  # fmt: skip
    kw.update(change(a))
    with pytest.raises(exc, match=match):
        fastattn.paged_attention(kw.pop("q"), kw.pop("k_cache"), kw.pop("v_cache"),
                                 kw.pop("block_table"), kw.pop("cache_seqlens"), **kw)  # fmt: skip


# ------------------------------------------------------------ on a GPU: the CUDA C++ kernels
# (csrc/cuda/paged_host.cpp, attention.cu) and Triton's on CUDA tensors. The CUDA kernels run
# on the CPU in every CI run too, through the host layer (tests/test_cuda_host_paged.py).
# Lengths as LENGTHS, with a long one past the split-KV threshold; block sizes 16 (several per
# key tile) and 256 (a tile inside a block); GQA 8/2 (decode packs 4 heads a tile) and MQA.
GPU_BACKENDS = [pytest.param(b, marks=GPU) for b in ("cuda", "triton")]


def to_cuda(*ts):
    return [t if not isinstance(t, torch.Tensor) else t.cuda() for t in ts]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("new", [0, 1, 7])
@pytest.mark.parametrize("bs", [16, 256])
# head_dim 128 with GQA 8/2; 17 with MQA 4/1: rows not 16-byte chunks (element-wise loads)
@pytest.mark.parametrize("heads", [(8, 2, 128), (4, 1, 17)], ids=["gqa-d128", "mqa-d17"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_paged_gpu(backend, heads, bs, new, variant, dtype):
    lengths = [0, 1, 113, 4097, 40]
    H, Hkv, D = heads
    q, kc, vc, table, seqlens, kn, vn, dk, dv = make_cache(lengths, new, bs, H, Hkv, D, dtype)
    kw = extras(VARIANTS[variant], H, len(lengths))
    want_k = kc.clone()
    for b, n in enumerate(lengths):
        for t in range(n, n + new):
            want_k[int(table[b, t // bs]), t % bs] = dk[b][t]
    qd, kcd, vcd, td, sd, knd, vnd = to_cuda(q, kc, vc, table, seqlens, kn, vn)
    kwd = dict(zip(kw, to_cuda(*kw.values()), strict=True))
    out, lse = fastattn.paged_attention(qd, kcd, vcd, td, sd, k_new=knd, v_new=vnd,
                                        backend=backend, return_lse=True, **kwd)  # fmt: skip
    check_sequences(out.cpu(), q, dk, dv, kw, dtype, f"{backend} {variant}")
    check_lse(lse.cpu(), q, dk, kw, f"{backend} {variant}")
    assert torch.equal(kcd.cpu(), want_k)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_paged_gpu_strided_layouts(backend):
    # strided_views on CUDA tensors in fp16 (no sinks), against the float64 reference on
    # contiguous copies.
    q, kc, vc, table, lens, k_new, v_new, _ = strided_views(64, torch.float16, "cuda")
    kc2, vc2 = kc.double(), vc.double()  # contiguous float64 copies
    want = fastattn.paged_attention(q.double(), kc2, vc2, table.contiguous(), lens.contiguous(),
                                    k_new=k_new.double(), v_new=v_new.double(), causal=True,
                                    backend="reference")  # fmt: skip
    got = fastattn.paged_attention(q, kc, vc, table, lens, k_new=k_new, v_new=v_new, causal=True,
                                   backend=backend)  # fmt: skip
    torch.testing.assert_close(got.double(), want, atol=4e-3, rtol=4e-3)
    assert torch.equal(kc.double(), kc2) and torch.equal(vc.double(), vc2)  # same rows written


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_paged_cuda_op_checks_opcheck_and_compile():
    # The CUDA C++ op itself: float32 refused by its own check (TypeError naming the dtype) and
    # a block id outside the cache (ValueError), both before the cache is touched; opcheck; a
    # fullgraph compile appending in place as the eager call does.
    q, kc, vc, table, seqlens, kn, vn, _, _ = make_cache([3, 20], 1, 16, 2, 2, 64, torch.float16)
    q, kc, vc, table, seqlens, kn, vn = to_cuda(q, kc, vc, table, seqlens, kn, vn)
    op = torch.ops.fastattn.paged_attention_forward
    args = (0.125, True, -1, -1, 0.0, None, None)
    before = kc.clone()
    with pytest.raises(TypeError, match="float16 or bfloat16 .* got Float"):
        op(q.float().transpose(1, 2), kc.float(), vc.float(), table, seqlens, kn.float(),
           vn.float(), *args)  # fmt: skip
    bad = table.clone()
    bad[1, 0] = kc.shape[0]
    with pytest.raises(ValueError, match="outside the cache"):
        op(q.transpose(1, 2), kc, vc, bad, seqlens, kn, vn, *args)
    assert torch.equal(kc, before)
    torch.library.opcheck(op.default, (q.transpose(1, 2), kc, vc, table, seqlens, None, None,
                                       *args))  # fmt: skip
    check_compiled(q, kc, vc, table, seqlens, kn, vn, "cuda", "cuda")
