"""The CUDA attention kernels (csrc/cuda/attention_kernels.cuh: the FlashAttention-2-style forward
and the split-KV combine) run on the CPU through the host execution layer (tools/cuda_host/,
docs/cuda-host.md), with the tensor-core primitives' portable implementation (tensor_core.h) and
attention.cu's launch plan, against the float64 reference (fastattn.reference.attention).

Passing here is not a GPU run (tests/test_cuda_device.py is): the layer does not model the
tensor cores' own rounding, timing, or the memory model beyond barriers.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch
from conftest import assert_parity
from cuda_host_lib import DTYPE_CODE, ERR_LEN, check_rc, load, ptr, race_check

from fastattn import reference

# The order of harness_attention.cpp's Int enum.
INTS = (
    "B H Hkv Sq Sk D Dv q_sb q_sh q_ss k_sb k_sh k_ss v_sb v_sh v_ss o_sb o_sh o_ss causal offset "
    "wl wr mask_kind m_sb m_sh m_sq m_sk al_sb al_sh drop_threshold sm_count splits aligned page "
    "bt_stride seqlen_added"
).split()
PLAN = "tier cols pack splits tiles_per_split aligned grid_x grid_y grid_z".split()
MASK_KIND = {None: 0, torch.bool: 1, torch.float32: 2}  # else q's own dtype: 3
LOW = (torch.float16, torch.bfloat16)


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    return load()


def run(lib, q, k, v, *, mask=None, causal=False, offset=0, window=(-1, -1), softcap=0.0,
        sinks=None, alibi=None, dropout_p=0.0, rng=None, scale=None, sm_count=1, splits=0,
        aligned=True):  # fmt: skip
    """(out, lse, plan) of the kernels on q (B, H, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv)
    with attention's options as the op takes them (csrc/ops.cpp); sm_count / splits steer the
    plan's split-KV, aligned=False forces the element-wise loads."""
    B, H, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.full((B, H, Sq, Dv), float("nan"), dtype=q.dtype)  # unwritten stays NaN
    lse = torch.full((B, H, Sq), float("nan"))
    m = None if mask is None else mask.expand(B, H, Sq, Sk)
    al = None if alibi is None else alibi.expand(B, H)
    thr = reference.dropout_threshold(dropout_p) if dropout_p > 0 else 0
    n = dict(B=B, H=H, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, Dv=Dv, causal=int(causal), offset=offset,
             wl=window[0], wr=window[1], drop_threshold=thr, sm_count=sm_count, splits=splits,
             aligned=int(aligned))  # fmt: skip
    for name, t in (("q", q), ("k", k), ("v", v), ("o", out)):
        n[f"{name}_sb"], n[f"{name}_sh"], n[f"{name}_ss"] = t.stride()[:3]
    n["mask_kind"] = 0 if m is None else MASK_KIND.get(m.dtype, 3)
    if m is not None:
        n["m_sb"], n["m_sh"], n["m_sq"], n["m_sk"] = m.stride()
    if al is not None:
        n["al_sb"], n["al_sh"] = al.stride()
    ints = (ctypes.c_int64 * len(INTS))(*(int(n.get(name, 0)) for name in INTS))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    drop_scale = 1.0 / (1.0 - dropout_p)
    reals = (ctypes.c_double * 3)(scale, softcap, drop_scale)
    ptrs = (ctypes.c_void_p * 11)(
        *(ptr(t).value for t in (q, k, v, out, lse, m, sinks, al, rng, None, None))
    )
    plan = (ctypes.c_int64 * len(PLAN))()
    err = ctypes.create_string_buffer(ERR_LEN)
    rc = lib.fa_attention_forward(DTYPE_CODE[q.dtype], ptrs, ints, reals, plan, err, ERR_LEN)
    check_rc(rc, err)
    return out, lse, dict(zip(PLAN, plan, strict=True))


def oracle(q, k, v, opmath, **kw):
    """reference.attention in opmath (float64: the reference; q's dtype: eager in it)."""
    return reference.attention(
        q, k, v, kw.get("mask"), kw.get("scale"), kw.get("causal", False), kw.get("offset", 0),
        kw.get("dropout_p", 0.0), kw.get("rng"), window=kw.get("window", (-1, -1)),
        softcap=kw.get("softcap", 0.0), sinks=kw.get("sinks"), alibi_slopes=kw.get("alibi"),
        opmath=opmath,
    )  # fmt: skip


def check(lib, q, k, v, **kw):
    out, lse, plan = run(lib, q, k, v, **kw)
    ref_out, ref_lse = oracle(q, k, v, torch.float64, **kw)
    eager_out, _ = oracle(q, k, v, q.dtype, **kw)
    assert_parity(out, ref_out.to(torch.float64), eager_out, "out")
    # lse: fp32 arithmetic on the fp32 scores of low-precision inputs (their products are exact
    # in fp32: only the accumulation rounds).
    assert_parity(lse.double(), ref_lse, what="lse", dtype=torch.float32)
    return plan


def qkv(B, H, Hkv, Sq, Sk, D, Dv=None, dtype=torch.float16):
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, Sq, D).to(dtype)
    k = torch.randn(B, Hkv, Sk, D).to(dtype)
    v = torch.randn(B, Hkv, Sk, Dv).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", LOW)
def test_smoke(lib, dtype):
    q, k, v = qkv(1, 2, 1, 70, 100, 64, dtype=dtype)
    plan = check(lib, q, k, v, causal=True, offset=30)
    assert plan["tier"] == 64 and plan["aligned"] == 1


# Head dims: 64 / 128 fill their tiers; 40 and 96 are padded (a partial k-step of the 16-wide
# mma); 17 takes the element-wise loads (rows not 16-byte chunks); Dv != D shares the tier of the
# larger. Lengths: 1 (decode), 7 and 113 (tails of the 64-row and the key tiles), 130 (three query
# tiles), seqlen_q != seqlen_k both ways. fp16 and bf16 alternate over the cells (each dtype
# meets every head dim and every length pair; the kernels differ only in the mma's input type),
# and so do causal and not (each head dim gets both; test_forward_variants has the rest).
DIMS = [(64, 64, 64), (40, 40, 64), (96, 96, 128), (128, 128, 128), (17, 17, 64), (64, 128, 128)]
LENGTHS = [(1, 113), (7, 7), (113, 70), (130, 200)]
SHAPES = [(LOW[(i + j) % 2], *dims, *lens, (i + j // 2) % 2 == 1) for i, dims in enumerate(DIMS)
          for j, lens in enumerate(LENGTHS)]  # fmt: skip


@pytest.mark.parametrize(("dtype", "D", "Dv", "tier", "Sq", "Sk", "causal"), SHAPES)
def test_forward_shapes(lib, dtype, D, Dv, tier, Sq, Sk, causal):
    q, k, v = qkv(1, 2, 2, Sq, Sk, D, Dv, dtype)
    plan = check(lib, q, k, v, causal=causal, offset=Sk - Sq)
    assert plan["tier"] == tier
    assert plan["aligned"] == int(D % 8 == 0 and Dv % 8 == 0)
    assert plan["grid_y"] == math.ceil(Sq / 64) and plan["splits"] == 1


# The 256 tier (32-key tiles) on one shape with tails each way (~1 s a case through the layer).
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("D,Dv", [(256, 256), (192, 128)])
def test_forward_tier_256(lib, dtype, D, Dv):
    q, k, v = qkv(1, 1, 1, 70, 113, D, Dv, dtype)
    plan = check(lib, q, k, v, causal=True, offset=113 - 70)
    assert (plan["tier"], plan["cols"]) == (256, 32)


def variant_kw(name: str, H: int, Sq: int, Sk: int, dtype: torch.dtype) -> dict:
    """attention's options for the named variant, as the op takes them."""
    if name == "plain":
        return {}
    if name == "top_left":  # causal with offset 0 and seqlen_q > seqlen_k: rows with no key
        return {"causal": True, "offset": 0}
    if name == "bottom_right_short_k":  # offset < 0: the first queries see nothing
        return {"causal": True, "offset": Sk - Sq}
    if name == "window":
        return {"window": (17, 5), "offset": Sk - Sq}
    if name == "causal_window":
        return {"causal": True, "window": (40, 0), "offset": Sk - Sq}
    if name == "softcap":
        return {"softcap": 2.5, "scale": 1.0}  # scores well past the cap
    if name == "alibi":
        return {"alibi": torch.rand(1, H) * 0.3, "causal": True, "offset": Sk - Sq}
    if name == "sinks":
        return {"sinks": torch.randn(H) * 2}
    if name == "sinks_dead_rows":  # rows without keys get lse = sink (and a -inf sink: -inf)
        return {"sinks": torch.tensor([1.5, float("-inf")][:H]), "causal": True, "offset": -20}
    if name == "bool_mask":  # key padding, broadcast over heads and queries, one dead row
        m = torch.rand(1, 1, Sq, Sk) > 0.3
        m[..., 3, :] = False
        return {"mask": m}
    if name == "float_mask":  # additive fp32, broadcast over batch and heads, with -inf
        m = torch.randn(1, 1, Sq, Sk)
        m[..., 5, ::2] = float("-inf")
        return {"mask": m}
    if name == "own_dtype_mask":
        return {"mask": torch.randn(1, H, 1, Sk).to(dtype)}
    if name == "dropout":
        return {"dropout_p": 0.3, "rng": torch.tensor([12345, 987654321], dtype=torch.int64)}
    raise AssertionError(name)


VARIANTS = ["plain", "top_left", "bottom_right_short_k", "window", "causal_window", "softcap",
            "alibi", "sinks", "sinks_dead_rows", "bool_mask", "float_mask", "own_dtype_mask",
            "dropout"]  # fmt: skip


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("split", [False, True])
def test_forward_variants(lib, dtype, variant, split):
    """Every option of the scores, each without and with split-KV (the combine applies the sinks
    and the dropout scale); 70 x 150: a partial query tile, three key tiles."""
    Sq, Sk, H = 70, 150, 2
    q, k, v = qkv(1, H, 1, Sq, Sk, 64, dtype=dtype)
    kw = variant_kw(variant, H, Sq, Sk, dtype)
    plan = check(lib, q, k, v, splits=3 if split else 0, **kw)
    assert plan["splits"] == (3 if split else 1)


# GQA and the plan's two decode devices: the kv group's heads packed into a tile's rows when
# seqlen_q < 64 (pack), and split-KV when the grid is smaller than the GPU (sm_count 132, as an
# H100 SXM, makes the plan split; 1 never does). Sk 1025: a tail past a power of two.
@pytest.mark.parametrize(
    "dtype,B,H,Hkv,Sq,Sk",
    [(torch.float16, 2, 8, 2, 1, 1025), (torch.bfloat16, 1, 4, 1, 3, 300),
     (torch.float16, 2, 4, 4, 1, 200), (torch.bfloat16, 1, 6, 2, 70, 130),
     (torch.bfloat16, 1, 32, 4, 1, 77)],
)  # fmt: skip
@pytest.mark.parametrize("sm_count", [1, 132])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_gqa_decode(lib, dtype, B, H, Hkv, Sq, Sk, sm_count, causal):
    q, k, v = qkv(B, H, Hkv, Sq, Sk, 64, dtype=dtype)
    plan = check(lib, q, k, v, causal=causal, offset=Sk - Sq, sm_count=sm_count)
    group = H // Hkv
    assert plan["pack"] == (group if Sq < 64 and group > 1 else 1)
    blocks = B * (H // plan["pack"]) * math.ceil(Sq * plan["pack"] / 64)
    tiles = math.ceil(Sk / 64)
    assert (plan["splits"] > 1) == (sm_count > blocks and tiles > 1)
    assert plan["splits"] <= min(tiles, 64)


# Layouts: (B, S, H, D) storage seen as (B, H, S, D) (strided heads, as from a QKV projection),
# a storage offset of one element (rows no longer 16-byte aligned: element-wise loads), and the
# element-wise path forced on aligned inputs.
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("layout", ["seq_major", "offset", "forced_elementwise"])
def test_forward_layouts(lib, dtype, layout):
    B, H, Hkv, Sq, Sk, D = 2, 4, 2, 33, 90, 64
    aligned = True
    if layout == "seq_major":
        q = torch.randn(B, Sq, H, D).to(dtype).transpose(1, 2)
        k = torch.randn(B, Sk, Hkv, D).to(dtype).transpose(1, 2)
        v = torch.randn(B, Sk, Hkv, D).to(dtype).transpose(1, 2)
    elif layout == "offset":
        q, k, v = (torch.randn(t.numel() + 1).to(dtype)[1:].view(t.shape)
                   for t in qkv(B, H, Hkv, Sq, Sk, D, dtype=dtype))  # fmt: skip
    else:
        q, k, v = qkv(B, H, Hkv, Sq, Sk, D, dtype=dtype)
        aligned = False
    out, lse, plan = run(lib, q, k, v, causal=True, offset=Sk - Sq, aligned=aligned)
    assert plan["aligned"] == int(layout == "seq_major")
    ref_out, ref_lse = oracle(q, k, v, torch.float64, causal=True, offset=Sk - Sq)
    eager_out, _ = oracle(q, k, v, dtype, causal=True, offset=Sk - Sq)
    assert_parity(out, ref_out, eager_out, "out")
    assert_parity(lse.double(), ref_lse, what="lse", dtype=torch.float32)


@pytest.mark.parametrize("dtype", LOW)
def test_large_scores_and_dead_rows(lib, dtype):
    """Scores of magnitude ~1e3 (the online max must rescale, not overflow exp2), and a window
    that leaves whole query tiles without keys (the block skips its loop: out 0, lse -inf)."""
    q, k, v = qkv(1, 1, 1, 130, 64, 64, dtype=dtype)
    check(lib, q * 8, k * 8, v, scale=1.0)
    out, lse, _ = run(lib, q, k, v, causal=True, offset=-70)  # queries 0..69 see no key
    assert torch.equal(out[..., :70, :], torch.zeros_like(out[..., :70, :]))
    assert torch.isneginf(lse[..., :70]).all() and torch.isfinite(lse[..., 70:]).all()


# The shared-memory race check (docs/cuda-host.md) on the attention kernels: one query tile and
# two key tiles (both K/V buffers, the refill of the first after the loop's closing barrier),
# element-wise and cp.async loads, and split-KV with the combine kernel (~20 us a shared access:
# small shapes only).
@pytest.mark.parametrize(("aligned", "splits"), [(True, 0), (False, 2)])
def test_attention_kernels_pass_the_race_check(lib, aligned, splits):
    q, k, v = qkv(1, 1, 1, 16, 100, 64, dtype=torch.bfloat16)
    with race_check(lib) as recorded:
        out, lse, plan = run(lib, q, k, v, causal=True, offset=84, aligned=aligned, splits=splits)
        assert recorded() > 0  # the check saw the kernels' shared accesses
    assert plan["aligned"] == int(aligned) and plan["splits"] == max(splits, 1)
    ref_out, ref_lse = oracle(q, k, v, torch.float64, causal=True, offset=84)
    eager_out, _ = oracle(q, k, v, q.dtype, causal=True, offset=84)
    assert_parity(out, ref_out, eager_out, "out")
    assert_parity(lse.double(), ref_lse, what="lse", dtype=torch.float32)
