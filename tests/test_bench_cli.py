"""The ``fastattn-bench`` CLI: it runs, writes its JSON, and its agreement check can fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastattn import bench
from fastattn.bench import cases as C
from fastattn.bench import timing

# One thread: OpenMP barriers stall when other processes share the cores, which slows tiny runs.
FAST = ["--quick", "--dtype", "fp32", "--min-time", "0.002", "--threads", "1"]


def test_quick_run_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "res" / "bench.json"
    argv = ["softmax", *FAST, "--shape", "16x512,2x20000", "--no-compile", "--markdown"]
    assert bench.main([*argv, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["agreement"] == {"ok": True, "failures": []}
    rows = doc["rows"]
    variants = {r["variant"] for r in rows}
    assert {"softmax", "log_softmax", "scale+bias(1,C)", "scale+keypad(B,1,C)"} <= variants
    assert {"16x512", "2x20000", "8x2x512", "2x1x20000"} == {r["shape"] for r in rows}
    for r in rows:
        assert r["check_ok"] and r["error"] is None, r
        assert r["median_ms"] > 0 and r["reps"] >= 1 and r["gbps"] > 0 and r["nbytes"] > 0
        assert (r["speedup"] is None) == r["subject"]
    assert sum(r["subject"] for r in rows) == len(rows) // 2  # fastattn + one peer per case here
    m = doc["machine"]
    assert m["threads"] == 1 and m["torch"] == torch.__version__ and "backends" in m["backends"]
    text = capsys.readouterr().out
    assert "agreement check passed" in text and "| op | shape |" in text


def test_compile_peer_is_checked_and_timed(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    argv = ["softmax", *FAST, "--shape", "16x256", "-k", "scale+bias", "--json", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    impls = [r["impl"] for r in rows]
    assert "torch.compile(chain)" in impls and "eager chain" in impls
    compiled = next(r for r in rows if r["impl"] == "torch.compile(chain)")
    assert compiled["check_ok"] and compiled["median_ms"] > 0
    # the first call compiles; it is reported but not part of the timed calls
    assert compiled["first_call_ms"] > compiled["median_ms"]


def _wrong_case(opts: C.Options) -> list[C.Case]:
    """The scale+bias case plus a peer that forgets the bias and one that raises."""
    [case] = [c for c in C.softmax_cases(opts) if c.variant == "scale+bias(1,C)"]

    def boom(i: C.Inputs) -> torch.Tensor:
        raise RuntimeError("kernel exploded")

    case.impls = [
        case.impls[0],
        C.Impl("forgets the bias", lambda i: torch.softmax(i["x"] * C.SCALE, dim=-1)),
        C.Impl("raises", boom),
        case.impls[1],
    ]
    return [case]


def test_disagreement_is_flagged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(C.REGISTRY, "broken", _wrong_case)
    out = tmp_path / "b.json"
    argv = ["broken", *FAST, "--shape", "8x512", "--no-compile", "--json", str(out)]
    assert bench.main(argv) == 1
    doc = json.loads(out.read_text())
    assert not doc["agreement"]["ok"]
    status = {r["impl"]: (r["check_ok"], r["error"]) for r in doc["rows"]}
    assert status["forgets the bias"] == (False, None)
    assert status["raises"] == (False, "RuntimeError: kernel exploded")
    assert status["eager chain"] == (True, None)
    assert next(ok for name, (ok, _) in status.items() if name.startswith("fastattn["))
    err = capsys.readouterr().err
    assert "MISMATCH" in err and "AGREEMENT CHECK FAILED" in err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compare_rejects_wrong_results(dtype: torch.dtype) -> None:
    [case] = [
        c
        for c in C.softmax_cases(C.Options(dtypes=(dtype,), shapes=((8, 1024),), compile=False))
        if c.variant == "scale+bias(1,C)"
    ]
    inputs = case.make_inputs(torch.device("cpu"))
    ref = case.reference(inputs)
    assert C.compare(case.impls[1].fn(inputs), ref, dtype).ok  # the eager chain
    assert not C.compare(torch.softmax(inputs["x"] * C.SCALE, -1), ref, dtype).ok  # no bias
    assert not C.compare(torch.softmax(inputs["x"] + inputs["bias"], -1), ref, dtype).ok  # no scale
    nan = ref.clone()
    nan[0, 0] = float("nan")
    assert not C.compare(nan, ref, dtype).ok
    assert not C.compare(ref[:4], ref, dtype).ok


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["nosuchop"]) == 2
    assert bench.main(["softmax", "--dtype", "fp8"]) == 2
    assert bench.main(["softmax", "--shape", "12"]) == 2
    assert bench.main(["softmax", "-k", "no-such-case"]) == 2
    assert "unknown op" in capsys.readouterr().err


def test_module_entry_point_with_reuse_alloc() -> None:
    argv = [sys.executable, "-m", "fastattn.bench", "softmax", *FAST, "--no-compile"]
    argv += ["-k=-softmax-64x1024", "--alloc", "reuse"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "alloc: reuse (mallopt" in res.stdout and "torch.softmax" in res.stdout


def test_interleaved_timer_and_stats() -> None:
    calls = {"a": 0, "b": 0}

    def bump(k: str) -> None:
        calls[k] += 1

    budget = timing.Budget(warmup_s=0.0, min_warmup=1, min_time_s=0.0, min_reps=7)
    sa, sb = timing.time_fns([lambda: bump("a"), lambda: bump("b")], torch.device("cpu"), budget)
    assert sa.reps == sb.reps == 7 and calls == {"a": 8, "b": 8}  # 1 warm-up + 7 timed each
    st = timing.summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (st.median_ms, st.q25_ms, st.q75_ms, st.min_ms, st.iqr_ms) == (3.0, 2.0, 4.0, 1.0, 2.0)
    assert timing.gbps(2_000_000, 1.0) == 2.0
