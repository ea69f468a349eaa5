"""The CUDA kernels of fastattn::paged_attention_forward run on the CPU through the host execution
layer (tools/cuda_host/, docs/cuda-host.md): csrc/cuda/attention_kernels.cuh's
paged_append_kernel writes the new keys and values into their blocks, then attention_fwd_kernel
walks the block table (AttnParams' paged fields), with attention.cu's launch plan and
its split-KV combine; each sequence against the float64 reference on its keys laid out densely.

Passing here is not a GPU run (the gpu-marked tests of tests/test_paged.py are).
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from cuda_host_lib import DTYPE_CODE, ERR_LEN, check_rc, load, ptr, race_check
from test_cuda_host_attention import INTS, LOW, PLAN
from test_paged import check_lse, check_sequences, extras, make_cache


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    return load()


def append(lib, cache, table, lens, new, blocks=None):
    """paged_append_kernel: new (B, S, Hkv, d) into cache at positions lens[b] .. (in place)."""
    B, S, Hkv, d = new.shape
    n = [B, S, Hkv, d, cache.shape[1], table.stride(0), new.stride(0), new.stride(1),
         new.stride(2), cache.stride(0), cache.stride(1), cache.stride(2)]  # fmt: skip
    ints = (ctypes.c_int64 * len(n))(*n)
    ptrs = (ctypes.c_void_p * 4)(*(ptr(t).value for t in (new, cache, table, lens)))
    err = ctypes.create_string_buffer(ERR_LEN)
    check_rc(lib.fa_paged_append(ptrs, ints, blocks or B * S * Hkv, err, ERR_LEN), err)


def forward(lib, q, kc, vc, table, lens, added, kw, sm_count=1, splits=0):
    """(out (B, Sq, H, Dv), lse (B, H, Sq), plan) of the forward on q (B, Sq, H, D) and the
    caches, as paged_attention's options (kw: the public keyword arguments) reach the kernel."""
    B, Sq, H, D = q.shape
    qh = q.transpose(1, 2)  # (B, H, Sq, D): the op's layout
    Dv = vc.shape[3]
    out = torch.full((B, Sq, H, Dv), float("nan"), dtype=q.dtype)  # unwritten stays NaN
    lse = torch.full((B, H, Sq), float("nan"))
    wl, wr = kw.get("window", (-1, -1))
    wr = 0 if kw.get("causal") and "window" in kw else wr
    al = kw.get("alibi_slopes")
    al = None if al is None else al.float().expand(B, H)
    sinks = kw.get("sinks")
    sinks = None if sinks is None else sinks.float().contiguous()
    n = dict(B=B, H=H, Hkv=kc.shape[2], Sq=Sq, Sk=int(lens.max()) + added, D=D, Dv=Dv,
             causal=int(bool(kw.get("causal"))), wl=wl, wr=wr, sm_count=sm_count,
             splits=splits, aligned=1, page=kc.shape[1], bt_stride=table.stride(0),
             seqlen_added=added)  # fmt: skip
    n["q_sb"], n["q_sh"], n["q_ss"] = qh.stride()[:3]
    n["k_sb"], n["k_sh"], n["k_ss"] = kc.stride(0), kc.stride(2), kc.stride(1)
    n["v_sb"], n["v_sh"], n["v_ss"] = vc.stride(0), vc.stride(2), vc.stride(1)
    n["o_sb"], n["o_sh"], n["o_ss"] = out.stride(0), out.stride(2), out.stride(1)
    if al is not None:
        n["al_sb"], n["al_sh"] = al.stride()
    ints = (ctypes.c_int64 * len(INTS))(*(int(n.get(name, 0)) for name in INTS))
    reals = (ctypes.c_double * 3)(D**-0.5, kw.get("softcap", 0.0), 1.0)
    ts = (qh, kc, vc, out, lse, None, sinks, al, None, table, lens)
    ptrs = (ctypes.c_void_p * 11)(*(ptr(t).value for t in ts))
    plan = (ctypes.c_int64 * len(PLAN))()
    err = ctypes.create_string_buffer(ERR_LEN)
    rc = lib.fa_attention_forward(DTYPE_CODE[q.dtype], ptrs, ints, reals, plan, err, ERR_LEN)
    check_rc(rc, err)
    return out, lse, dict(zip(PLAN, plan, strict=True))


def attend(lib, lengths, new, bs, H, Hkv, D, dtype, variant, **plan_kw):
    """Append (when new), attend, check every sequence and the cache; returns the plan."""
    q, kc, vc, table, lens, kn, vn, dk, dv = make_cache(lengths, new, bs, H, Hkv, D, dtype)
    kw = extras(VARIANTS[variant], H, len(lengths))
    want_k, want_v = kc.clone(), vc.clone()
    for b, n in enumerate(lengths):  # where each new token belongs, and nowhere else
        for t in range(n, n + new):
            want_k[int(table[b, t // bs]), t % bs] = dk[b][t]
            want_v[int(table[b, t // bs]), t % bs] = dv[b][t]
    if new:
        append(lib, kc, table, lens, kn)
        append(lib, vc, table, lens, vn)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    out, lse, plan = forward(lib, q, kc, vc, table, lens, new, kw, **plan_kw)
    what = f"cuda-host {variant} bs={bs} new={new}"
    check_sequences(out, q, dk, dv, kw, dtype, what)
    check_lse(lse, q, dk, kw, what)
    return plan


VARIANTS = {
    "plain": {},
    "causal": {"causal": True},
    "window-softcap": {"causal": True, "window": (20, 0), "softcap": 3.0},
    "sinks-alibi": {"sinks": True, "alibi": True},
}
# Cache lengths: empty (no key at all with nothing appended), one token, under one block, odd
# lengths past a key tile (64, or 32 at tier 256) and across blocks.
LENGTHS = [0, 1, 7, 113]
# Heads: MHA; GQA 4/2 (decode packs the group's 2 heads into the tile's rows); head_dim 40 is
# padded to the 64 tier, 17 takes the element-wise loads (rows not 16-byte chunks).
HEADS = {"mha2-d64": (2, 2, 64), "gqa4-2-d40": (4, 2, 40), "mha1-d17": (1, 1, 17)}


# seqlen_q: 1 with nothing appended (attend to the cache); decode; a chunked prefill of 3.
# Block sizes: 16, several blocks per 64-key tile; 64, one block per tile. fp16 and bf16 on a
# checkerboard of the other four parameters (each dtype meets every value and every pair of
# values; the kernels differ only in the mma's input type).
CELLS = [(LOW[(i + j + k + m) % 2], bs, new, heads, variant)
         for i, bs in enumerate([16, 64]) for j, new in enumerate([0, 1, 3])
         for k, heads in enumerate(HEADS) for m, variant in enumerate(VARIANTS)]  # fmt: skip


@pytest.mark.parametrize(("dtype", "bs", "new", "heads", "variant"), CELLS)
def test_paged_forward(lib, bs, new, heads, variant, dtype):
    H, Hkv, D = HEADS[heads]
    attend(lib, LENGTHS, new, bs, H, Hkv, D, dtype, variant)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("variant", ["causal", "sinks-alibi"])
def test_paged_split_kv(lib, dtype, variant):
    """Split-KV over the longest sequence's tiles (a one-SM plan would not split: the forced
    counts leave the short sequences' later splits empty, which the combine must skip)."""
    for splits in (2, 5):
        plan = attend(lib, [1025, 7, 0], 1, 32, 4, 2, 64, dtype, variant, splits=splits)
        assert plan["splits"] == splits and plan["pack"] == 2


@pytest.mark.parametrize("dtype", LOW)
def test_paged_tier_256(lib, dtype):
    """Head dim 256 (32-key tiles, so a 16-row block spans half a tile) and a 70-token chunk
    (more rows than one 64-row query tile)."""
    attend(lib, [5, 40], 70, 16, 2, 1, 256, dtype, "causal")


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_paged_append_grid_stride(lib, layout):
    """Fewer blocks than rows: each block strides over several (b, t, head) rows. "strided": the
    new tokens a view whose heads and tokens are strided (the last dim contiguous, as the
    launcher passes any such view as it is)."""
    q, kc, _, table, lens, kn, _, dk, _ = make_cache([3, 30], 5, 16, 2, 2, 24, torch.float16)
    if layout == "strided":
        wide = torch.zeros(2, 5, 2, 3 * 24, dtype=kn.dtype)
        wide[..., 24:48] = kn
        kn = wide[..., 24:48]  # strides (720, 144, 72, 1)
    want = kc.clone()
    for b, n in enumerate([3, 30]):
        for t in range(n, n + 5):
            want[int(table[b, t // 16]), t % 16] = dk[b][t]
    append(lib, kc, table, lens, kn, blocks=3)
    assert torch.equal(kc, want)


@pytest.mark.parametrize("dtype", LOW)
def test_paged_more_queries_than_keys(lib, dtype):
    """4 query rows against sequences of 0, 2, 5 and 40 cached keys (nothing appended), causal
    bottom-right: the first rows of the short sequences see no key (out 0, lse -inf)."""
    lengths = [0, 2, 5, 40]
    _, kc, vc, table, lens, _, _, dk, dv = make_cache(lengths, 0, 16, 4, 2, 64, dtype)
    q = torch.randn(4, 4, 4, 64).to(dtype)
    kw = {"causal": True}
    out, lse, _ = forward(lib, q, kc, vc, table, lens, 0, kw)
    check_sequences(out, q, dk, dv, kw, dtype, "more queries than keys")
    check_lse(lse, q, dk, kw, "more queries than keys")
    assert torch.equal(out[1, :2], torch.zeros_like(out[1, :2]))
    assert torch.isneginf(lse[1, :, :2]).all() and torch.isneginf(lse[0]).all()


def test_paged_kernels_pass_the_race_check(lib):
    """The shared-memory race check (docs/cuda-host.md) on a paged decode (two key tiles from
    blocks of 16) with split-KV and the combine."""
    with race_check(lib) as recorded:
        plan = attend(lib, [100, 3], 1, 16, 4, 2, 64, torch.float16, "causal", splits=2)
        assert recorded() > 0  # the check saw the kernels' shared accesses
    assert plan["splits"] == 2
