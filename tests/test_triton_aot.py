"""Every Triton kernel configuration compiles ahead of time for real GPUs (sm_80 and sm_90).

No GPU is needed: ``triton.compile`` lowers to PTX and cubin for a named target. This catches what
the interpreter cannot: type errors in the compiled path, shared-memory overflows (the launch
would fail with OutOfResources), register spills (a stack frame: local-memory traffic in the
inner loop) and layouts the backend rejects. Each configuration is compiled twice: as is, and
with the 16-byte alignment hints Triton's JIT adds for the usual run-time arguments (aligned
pointers and strides vectorise loads and stage tiles with cp.async: more shared memory, other
registers). The compiles run in one subprocess without TRITON_INTERPRET (``python -m
fastattn._aot``), each checked here. One run serves every pytest-xdist worker (a file lock; the
first worker compiles, the others read its output) and later sessions while fastattn's sources
and Triton's version are unchanged (.cache/aot, keyed by their hash): two workers each compiling
every configuration on a 2-core machine took past the 15-minute limit.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastattn import _aot

SPEC_IDS = [spec["id"] for spec in _aot.all_specs()]
ALIGNED_IDS = [spec["id"] for spec in _aot.all_specs() if spec.get("aligned_too", True)]
COMPILES = [(i, False) for i in SPEC_IDS] + [(i, True) for i in ALIGNED_IDS]
TARGETS = [80, 90]


ROOT = Path(__file__).resolve().parent.parent


def _aot_output() -> Path:
    """The AOT run's output for the current sources, compiled by the first process to ask."""
    import triton

    key = hashlib.sha256(f"{triton.__version__} {TARGETS}".encode())
    for path in sorted((ROOT / "fastattn").rglob("*.py")):
        key.update(path.read_bytes())
    out = ROOT / ".cache" / "aot" / f"aot-{key.hexdigest()[:16]}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker compiling: wait for its output
        if out.exists():
            return out
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run(
            [sys.executable, "-m", "fastattn._aot", "--canary", "--cc", *map(str, TARGETS)],
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(proc.stdout)
        os.replace(tmp, out)
    return out


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, int, bool], dict]:
    lines = _aot_output().read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    return {(r["id"], r["cc"], r["aligned"]): r for r in rows}


def _group(spec_id: str) -> str:
    """The launch a spec belongs to: its id less the tile (one group per tile list)."""
    return re.sub(r"-m\d+n\d+w\d+s\d+$", "", spec_id)


# fp32 attention (tf32x3 dots: operands split in two) spills even at 16x16 tiles on sm_80/sm_90
# at these (kernel, head-dim tier) pairs; the least-spilling tiles ship. Known, not fixed. The
# prefixes also take the fp32 specs of v's own head dim in those tiers ("-fp32-d256v128-",
# "-fp32-d32v16-"), measured to spill the same way; those of no listed pair must not spill.
FP32_SPILLS = (
    "attn_fwd-256-fp32",
    "attn_bwd_dkdv-64-fp32",
    "attn_bwd_dkdv-128-fp32",
    "attn_bwd_dkdv-256-fp32",
    "attn_bwd_dq-128-fp32",
    "attn_bwd_dq-256-fp32",
)
FP32_SPILLS_UNALIGNED = (
    *FP32_SPILLS,
    "attn_fwd-64-fp32",
    "attn_fwd-128-fp32",
    "attn_bwd_dq-64-fp32",
    "attn_fwd_split-256-fp32",
    # every fp32 tier-256 paged tile spills unaligned (16 x 16 at 4 or 8 warps; v 256 or 128)
    "paged_fwd-256-fp32",
    "paged_fwd_split-256-fp32",
    "paged_fwd-256-d256v128-fp32",
    "paged_fwd_split-256-d256v128-fp32",
)
KNOWN = "fp32 attention tiles spill on sm_80/sm_90 (tf32x3); known, not fixed"
# The one-program-per-row softmax/norm kernels leave small stack frames (8-64 B; the norm
# backward at 16384 columns 200-700 B: its single pass holds six fp32 row slices) at these row
# tiers. Known, not fixed (e.g. a lower single-pass limit for the norm backward).
ROW_SPILLS = ("softmax_fwd-16385-fp32-", "norm_bwd-16384-")
ROW_SPILLS_UNALIGNED = (*ROW_SPILLS, "softmax_fwd-16384-", "softmax_fwd-4096-bf16-mask_bf16",
                        "softmax_fwd-4096-fp16-mask_fp16", "norm_fwd-16384-")  # fmt: skip
KNOWN_ROWS = "small stack frames in single-pass softmax/norm rows; known, not fixed"


@pytest.mark.parametrize("cc", TARGETS)
@pytest.mark.parametrize(
    ("spec_id", "aligned"), COMPILES, ids=[f"{i}-{'al' if a else 'unal'}igned" for i, a in COMPILES]
)
def test_kernel_compiles_and_fits(compiled, spec_id, cc, aligned):
    res = compiled.get((spec_id, cc, aligned))
    assert res is not None, f"{spec_id} was not compiled for sm_{cc}"
    assert "error" not in res, res.get("error")
    assert res["cubin_bytes"] > 0
    assert res["shared"] <= res["smem_limit"], f"{res['shared']} B of shared memory on sm_{cc}"


@pytest.mark.parametrize("cc", TARGETS)
@pytest.mark.parametrize("spec_id", ALIGNED_IDS)
def test_aligned_tile_does_not_spill(compiled, spec_id, cc):
    # Aligned (the usual launch): no tile of any list spills, so autotuning never times one.
    if spec_id.startswith(FP32_SPILLS) or spec_id.startswith(ROW_SPILLS):
        pytest.xfail(KNOWN if spec_id.startswith("attn") else KNOWN_ROWS)
    res = compiled[(spec_id, cc, True)]
    assert res["stack"] == 0, f"{res['regs']} registers and a {res['stack']} B stack (spills)"


# bf16 attention lists compile their first tile only: fp16's lists (every tile) stand for them.
GROUPS = sorted({_group(i) for i in SPEC_IDS if not re.match(r"attn_\w+-\d+-bf16-.*-m\d+", i)})


@pytest.mark.parametrize("cc", TARGETS)
@pytest.mark.parametrize("group", GROUPS)
def test_unaligned_launch_has_a_tile_that_does_not_spill(compiled, group, cc):
    # Unaligned (no vector loads: more registers), the launcher drops the tiles that spill and
    # takes the first that does not: each list must hold one.
    if group.startswith(FP32_SPILLS_UNALIGNED) or group.startswith(ROW_SPILLS_UNALIGNED):
        pytest.xfail(KNOWN if group.startswith(("attn", "paged")) else KNOWN_ROWS)
    rows = [compiled[(i, cc, False)] for i in SPEC_IDS if _group(i) == group]
    assert any(r["stack"] == 0 for r in rows), [(r["id"], r["regs"], r["stack"]) for r in rows]


@pytest.mark.parametrize("cc", TARGETS)
def test_spill_check_sees_a_spill(compiled, cc):
    # A kernel that keeps 512 fp32 values per thread live: the stack check above can fail.
    res = compiled[(_aot.CANARY["id"], cc, False)]
    assert "error" not in res, res.get("error")
    assert res["stack"] > 0, res


def test_every_launch_tier_is_covered():
    # The launcher's tiers (see launch_config) must all appear among the compiled specs.
    from fastattn.ops import softmax as sm

    tiers = {tuple(sm.launch_config(c).values()) for c in range(1, 3 * sm.MAX_SINGLE_PASS, 7)}
    covered = {
        tuple(sm.launch_config(int(i.split("-")[1])).values())
        for i in SPEC_IDS
        if i.startswith("softmax_")
    }
    assert tiers <= covered


def test_aligned_specialisation_marks_pointers_and_strides():
    spec = next(s for s in _aot.all_specs() if s["id"].startswith("attn_fwd-128-fp16"))
    marked = set(_aot.aligned_args(spec))
    assert {"Q", "K", "V", "Out", "LSE", "s_qm", "s_kn", "s_vh", "D", "Sq", "Sk"} <= marked
    # a contiguous mask row is the constexpr stride 1, as the JIT specialises it
    assert "s_mn" not in marked and spec["aligned_constexprs"] == {"s_mn": 1}
    assert not {"H", "GROUP", "causal_offset", "qk_scale"} & marked
