"""fastattn.paged_attention (issue 16): attention against a paged KV cache, against the float64
reference on each sequence's keys laid out densely; the in-place append of new keys; the checks
of block tables and lengths; opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_parity, sequence_oracle

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


def make_cache(lengths, new, bs, H, Hkv, D, dtype, seed=0, Dv=None):
    """Dense per-sequence keys/values (each sequence's cache_seqlens + new tokens), scattered
    into shuffled blocks of a paged cache with spare blocks; q and the new keys/values."""
    g = torch.Generator().manual_seed(seed)
    B, Dv = len(lengths), Dv or D
    dense_k = [torch.randn(n + new, Hkv, D, generator=g).to(dtype) for n in lengths]
    dense_v = [torch.randn(n + new, Hkv, Dv, generator=g).to(dtype) for n in lengths]
    need = [-(-(n + new) // bs) for n in lengths]
    max_blocks = max(need) + 1
    nblocks = sum(need) + 3
    perm = torch.randperm(nblocks, generator=g)
    k_cache = torch.randn(nblocks, bs, Hkv, D, generator=g).to(dtype)  # garbage where unused
    v_cache = torch.randn(nblocks, bs, Hkv, Dv, generator=g).to(dtype)
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


def check_sequences(out, q, dense_k, dense_v, kw, dtype, what):
    """Each sequence of ``out`` against the float64 reference on its dense keys alone
    (conftest.sequence_oracle; the keys are ragged: one sequence at a time)."""
    kw64 = {k: (t.double() if isinstance(t, torch.Tensor) else t) for k, t in kw.items()}
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
    lengths = [0, 300, 1, 113, 7]  # empty, one block and more, one token, odd lengths
    q, kc, vc, table, seqlens, kn, vn, dk, dv = make_cache(lengths, new, bs, H, Hkv, D, dtype,
                                                           Dv=Dv)  # fmt: skip
    kw = extras(VARIANTS[variant], H, len(lengths))
    out = fastattn.paged_attention(q, kc, vc, table, seqlens, k_new=kn, v_new=vn,
                                   backend="cpu", **kw)  # fmt: skip
    assert out.shape == (len(lengths), new, H, Dv) and out.is_contiguous()
    check_sequences(out, q, dk, dv, kw, dtype, f"cpu {shape} {variant} bs {bs} new {new}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["causal", "sinks-alibi"])
def test_paged_cpu_split_keys(variant, dtype):
    """Two sequences, one kv head, one query each: too few work items for two threads, so the
    kernel splits the 2100 keys into chunks and merges them (attention.cpp's split-K)."""
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
    torch.library.opcheck(op.default, (q.transpose(1, 2), kc, vc, table, seqlens, *args))


@pytest.mark.parametrize("variant", ["causal", "sinks-alibi"])
def test_paged_triton_in_the_interpreter(variant):
    lengths = [0, 5, 40]
    q, kc, vc, table, seqlens, kn, vn, dk, dv = make_cache(lengths, 1, 16, 2, 1, 16, torch.float32)
    kw = extras(VARIANTS[variant], 2, 3)
    out = fastattn.paged_attention(q, kc, vc, table, seqlens, k_new=kn, v_new=vn,
                                   backend="triton", **kw)  # fmt: skip
    check_sequences(out, q, dk, dv, kw, torch.float32, f"triton {variant}")


def test_paged_opcheck_and_compile():
    q, kc, vc, table, seqlens, kn, vn, _, _ = make_cache([3, 20], 1, 16, 2, 2, 8, torch.float32)
    args = (q, kc, vc, table, seqlens, kn, vn, 0.35, True, -1, -1, 0.0, None, None, "cpu")
    torch.library.opcheck(torch.ops.fastattn.paged_attention.default, args)
    kc2, vc2 = kc.clone(), vc.clone()
    f = torch.compile(fastattn.paged_attention, fullgraph=True)
    got = f(q, kc, vc, table, seqlens, k_new=kn, v_new=vn, causal=True)
    want = fastattn.paged_attention(q, kc2, vc2, table, seqlens, k_new=kn, v_new=vn, causal=True)
    torch.testing.assert_close(got, want)
    assert torch.equal(kc, kc2)  # the compiled call appended in place too


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
