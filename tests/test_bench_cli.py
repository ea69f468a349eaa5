"""The ``fastattn-bench`` CLI: it runs, writes its JSON, and its agreement check can fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import quick_limits

import fastattn
from fastattn import bench
from fastattn.bench import cases as C
from fastattn.bench import limits, timing

# One thread: OpenMP barriers stall when other processes share the cores, which slows tiny runs.
FAST = ["--quick", "--dtype", "fp32", "--min-time", "0.002", "--threads", "1"]


@pytest.fixture(scope="module")
def _limits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(autouse=True)
def _own_limits_cache(_limits_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's machine limits go to a cache of this module (measured once per thread count),
    not the user's ~/.cache. Measured small (see quick_limits): what the CLI does with them is
    under test here; the measurement itself is test_machine_limits_are_measured_then_cached's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(_limits_cache))
    quick_limits(monkeypatch)


def test_quick_run_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "res" / "bench.json"
    argv = ["softmax", *FAST, "--shape", "16x512,2x20000", "--no-compile", "--no-runtimes"]
    argv += ["--markdown"]
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


def test_keyword_alternatives_select_either_and_repeats_select_all(tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    argv = ["softmax", *FAST, "--shape", "16x512", "--no-compile", "--no-runtimes"]
    argv += ["-k=-softmax-,-log_softmax-", "-k", "fp32", "--json", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["variant"] for r in rows} == {"softmax", "log_softmax"}
    assert {r["dtype"] for r in rows} == {"fp32"}


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


NORM_OPS = ["layernorm", "rmsnorm", "add-layernorm", "add-rmsnorm"]


def test_norm_ops_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "norm.json"
    argv = [*NORM_OPS, *FAST, "--dtype", "fp32,bf16", "--shape", "16x200", "--no-compile"]
    argv += ["--no-runtimes"]
    assert bench.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == set(NORM_OPS)
    assert {(r["variant"], r["dtype"]) for r in rows} == {
        (v, d) for v in ("fwd", "fwd+bwd") for d in ("fp32", "bf16")
    }
    impls = {r["op"]: set() for r in rows}
    for r in rows:
        impls[r["op"]].add(r["impl"])
        assert r["error"] is None and r["median_ms"] > 0 and r["gbps"] > 0, r
        # eager F.layer_norm's bf16 weight/bias gradients are known to be inexact (cases.py)
        known = r["impl"].endswith("F.layer_norm") and r["dtype"] == "bf16"
        assert r["check_ok"] or (known and r["tolerated"] and r["variant"] == "fwd+bwd"), r
        assert (r["speedup"] is None) == r["subject"]
    assert impls["rmsnorm"] == {"fastattn[cpu]", "F.rms_norm", "Llama RMSNorm"}
    assert impls["add-rmsnorm"] == {"fastattn[cpu]", "add+F.rms_norm", "add+Llama RMSNorm"}
    assert impls["add-layernorm"] == {"fastattn[cpu]", "add+F.layer_norm"}
    fwd = next(r for r in rows if r["op"] == "add-layernorm" and r["variant"] == "fwd")
    assert fwd["nbytes"] == C.norm_bytes(16, 200, 4, residual=True, params=2, bwd=False)


def test_norm_bytes_model() -> None:
    # forward: x read, y written, weight and bias read; fp32
    assert C.norm_bytes(4, 8, 4, residual=False, params=2, bwd=False) == (2 * 32 + 16) * 4
    # + residual read and h written; backward reads dy, dh, h, writes dx, reads w, writes dw
    full = (4 * 32 + 8) + (4 * 32 + 2 * 8)
    assert C.norm_bytes(4, 8, 2, residual=True, params=1, bwd=True) == full * 2


def _norm_case(op: str, variant: str, dtype: torch.dtype) -> C.Case:
    opts = C.Options(dtypes=(dtype,), shapes=((8, 256),), compile=False)
    return next(c for c in C.build([op], opts) if c.variant == variant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_oracle_rejects_wrong_results(dtype: torch.dtype) -> None:
    F = torch.nn.functional
    case = _norm_case("rmsnorm", "fwd", dtype)
    i = case.make_inputs(torch.device("cpu"))
    ref = case.reference(i)
    for impl in case.impls:  # fastattn, F.rms_norm, the Llama RMSNorm
        assert C.compare(impl.fn(i), ref, dtype).ok, impl.name
    x, w = i["x"], i["w"]
    assert not C.compare(F.layer_norm(x, (256,), w, None, C.RMS_EPS), ref, dtype).ok  # centred
    assert not C.compare(F.rms_norm(x, (256,), None, C.RMS_EPS), ref, dtype).ok  # no weight

    case = _norm_case("add-layernorm", "fwd", dtype)
    i = case.make_inputs(torch.device("cpu"))
    ref = case.reference(i)
    y, h = case.impls[0].fn(i)
    assert C.compare((y, h), ref, dtype).ok
    assert not C.compare((y, i["x"]), ref, dtype).ok  # h must be x + residual
    assert not C.compare(y, ref, dtype).ok  # both outputs are required

    case = _norm_case("add-rmsnorm", "fwd+bwd", dtype)
    i = case.make_inputs(torch.device("cpu"))
    ref = case.reference(i)
    grads = case.impls[0].fn(i)  # dx, dresidual, dweight
    assert isinstance(grads, tuple) and len(grads) == 3
    assert C.compare(grads, ref, dtype).ok
    assert not C.compare((*grads[:2], torch.zeros_like(grads[2])), ref, dtype).ok
    chk = C.compare((grads[0], grads[1] * 2, grads[2]), ref, dtype)
    assert not chk.ok and "result #1 of 3" in chk.message


def test_llama_rms_norm_rounds_like_the_model() -> None:
    # normalised in fp32, cast to bf16, then times the bf16 weight: two bf16 roundings
    x = torch.randn(4, 64).bfloat16()
    w = (torch.rand(64) + 0.5).bfloat16()
    xf = x.float()
    want = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + C.RMS_EPS)).bfloat16()
    got = C.llama_rms_norm(x, w)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_known_inexact_peer_does_not_fail_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cases(opts: C.Options) -> list[C.Case]:
        [case] = [c for c in C.softmax_cases(opts) if c.variant == "softmax"]
        off = C.Impl("off by 10%", lambda i: torch.softmax(i["x"], -1) * 1.1, inexact="test")
        case.impls = [case.impls[0], off]
        return [case]

    monkeypatch.setitem(C.REGISTRY, "inexact", cases)
    out = tmp_path / "b.json"
    argv = ["inexact", *FAST, "--shape", "8x256", "--json", str(out)]
    assert bench.main(argv) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["off by 10%"]["tolerated"] and not rows["off by 10%"]["check_ok"]
    assert "(known: test)" in rows["off by 10%"]["check"]
    # fastattn's own result is never excused
    monkeypatch.setitem(C.REGISTRY, "inexact", lambda o: _subject_inexact(cases(o)))
    assert bench.main(argv) == 1


def _subject_inexact(cases: list[C.Case]) -> list[C.Case]:
    [case] = cases
    case.impls = [C.Impl("fastattn[bad]", case.impls[1].fn, subject=True, inexact="no")]
    return cases


def test_attention_quick_run_reports_flops_and_memory(tmp_path: Path) -> None:
    out = tmp_path / "attn.json"
    argv = ["attention", *FAST, "--shape", "1x2x48x16,1x4x2x1x96x16", "--no-compile"]
    argv += ["--no-runtimes"]
    assert bench.main([*argv, "--peak", "fp32=2", "--markdown", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    variants = {r["variant"] for r in rows}
    assert variants == {"fwd", "fwd causal", "fwd+bwd", "fwd+bwd causal", "decode fwd GQA 4/2"}
    assert {r["impl"] for r in rows} >= {"eager", "F.sdpa"}
    for r in rows:
        assert r["check_ok"] and r["error"] is None, r
        b, h, hkv, sq, sk, d = C.attention_dims(tuple(int(x) for x in r["shape"].split("x")))
        causal, bwd = "causal" in r["variant"], "bwd" in r["variant"]
        assert r["flops"] == C.attention_flops((b, h, hkv, sq, sk, d), causal, bwd)
        assert r["gflops"] == pytest.approx(r["flops"] / r["median_ms"] / 1e6)
        assert r["peak_pct"] == pytest.approx(100 * r["gflops"] / 2)  # --peak fp32=2
        # at least the result (o; or dq, dk, dv) is allocated during the call
        result = 4 * (b * h * sq * d + (2 * b * hkv * sk * d if bwd else 0))
        assert r["mem_bytes"] >= result, r
    assert (
        C.attention_flops((1, 8, 1024, 64), causal=True, bwd=True) == 4 * 8 * 1024**2 * 64 * 7 // 4
    )
    eager = next(r for r in rows if r["impl"] == "eager" and r["variant"] == "fwd")
    assert eager["mem_bytes"] >= 4 * 2 * 48 * 48  # the (B, H, S, S) scores, at least once


def test_attention_oracle_rejects_wrong_results() -> None:
    opts = C.Options(dtypes=(torch.bfloat16,), shapes=((1, 2, 64, 32),), compile=False)
    case = next(c for c in C.build(["attention"], opts) if c.variant == "fwd causal")
    i = case.make_inputs(torch.device("cpu"))
    ref = case.reference(i)
    q, k, v = i["q"], i["k"], i["v"]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert C.compare(C.eager_attention(q, k, v, causal=True), ref, torch.bfloat16).ok
    assert C.compare(sdpa(q, k, v, is_causal=True), ref, torch.bfloat16).ok
    assert not C.compare(sdpa(q, k, v), ref, torch.bfloat16).ok  # not causal
    assert not C.compare(sdpa(q, k, v, is_causal=True, scale=1.0), ref, torch.bfloat16).ok


def test_attention_is_not_in_the_default_suite() -> None:
    assert "attention" in C.REGISTRY and "attention" not in C.DEFAULT_OPS
    ops = {c.op for c in C.build(None, C.Options(quick=True, compile=False))}
    assert ops == {"softmax", "layernorm", "rmsnorm", "add-layernorm", "add-rmsnorm"}
    assert bench.main(["attention", "--peak", "fp32=fast"]) == 2


def test_model_quick_run_reports_tokens_per_second(tmp_path: Path) -> None:
    out = tmp_path / "model.json"
    argv = ["model", *FAST, "--dtype", "fp32", "--no-compile", "-k", "transformer"]
    assert bench.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["variant"], r["impl"]) for r in rows} == {
        (v, i) for v in ("train step", "generate 32") for i in ("fastattn", "eager", "sdpa")
    }
    for r in rows:
        assert r["check_ok"] and r["error"] is None and r["tokens"] > 0 and r["mem_bytes"] >= 0, r
    assert "model" not in C.DEFAULT_OPS


def test_machine_limits_are_measured_then_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert limits._l3_bytes() >= 0  # this machine's, read from sysfs (0: not known)
    quick_limits(monkeypatch, l3_mib=40)  # buffers of 8 x L3 = 320 MiB > the 256 MiB minimum
    measured = []
    real = limits.measure
    monkeypatch.setattr(limits, "measure", lambda *a: measured.append(a) or real(*a))
    first = limits.get(1)
    assert not first.cached and measured == [(1,)]
    assert first.matmul_gflops["fp32"] > 0 and first.copy_gbps > 0 and first.read_gbps > 0
    assert first.buffer_mib == 320 and first.threads == 1 and first.matmul_n == 512
    assert Path(limits.cache_path()).is_relative_to(tmp_path)
    again = limits.get(1)
    assert again.cached and again == first and len(measured) == 1  # read back, not measured
    assert not limits.get(1, remeasure=True).cached and len(measured) == 2
    assert len(json.loads(Path(limits.cache_path()).read_text())) == 1  # one key: one entry
    peak = first.peak_gflops()
    assert set(peak) == {"fp32", "bf16", "fp16"}
    if fastattn.backends()["extension"]["cpu_isa"] in ("avx2", "avx512", "avx512bf16"):
        # the vector FMA peak: above what a matmul (loads, stores, packing) reaches
        assert peak["fp32"] == first.fma_gflops > 0.5 * first.matmul_gflops["fp32"]
    else:
        assert first.fma_gflops == 0 and peak["fp32"] == first.matmul_gflops["fp32"]


def test_header_and_json_name_the_machine_and_its_limits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "b.json"
    argv = ["softmax", *FAST, "--shape", "8x512", "-k=-softmax-", "--no-compile"]
    assert bench.main([*argv, "--no-runtimes", "--markdown", "--json", str(out)]) == 0
    m = json.loads(out.read_text())["machine"]
    isa = fastattn.backends()["extension"].get("cpu_isa", "none")
    assert m["cpu"] == limits.cpu_model() != "" and m["cpu_isa"].startswith(isa)
    assert m["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    lim = m["limits"]
    assert lim["threads"] == 1 and lim["copy_gbps"] > 0 and lim["peak_gflops"]["fp32"] > 0
    text = capsys.readouterr().out
    head, _, table = text.partition("| op |")
    line = f"cpu: {m['cpu']}; fastattn CPU ISA: {m['cpu_isa']}; ATen CPU capability: "
    assert line in head.split("\n\n")[0] and f"*{line}" in head  # text header, Markdown lead
    assert f"copy {lim['copy_gbps']:.1f} GB/s" in head and "% BW |" in table
    rows = json.loads(out.read_text())["rows"]
    for r in rows:
        assert r["bw_pct"] == pytest.approx(100 * r["gbps"] / lim["copy_gbps"])


def _peer_run(ops: list[str], shape: str, keyword: str, tmp_path: Path, dtype: str) -> dict:
    out = tmp_path / "peers.json"
    argv = [*ops, *FAST, "--dtype", dtype, "--shape", shape, "--no-compile", "-k", keyword]
    assert bench.main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


# family -> (ops, shape, a keyword selecting the cases with peers: forward, plain and log softmax)
PEER_FAMILIES = {
    "attention": (["attention"], "1x2x32x16,1x4x2x1x64x16", "fwd"),
    "softmax": (["softmax"], "8x256", "softmax-8x256"),
    "norm": (NORM_OPS, "8x256", "fwd"),
}
EXPECTED_PEERS = {
    "onnxruntime": {
        "attention": {"ORT MultiHeadAttention", "ORT GroupQueryAttention"},
        "softmax": {"ORT Softmax", "ORT LogSoftmax"},
        "norm": {"ORT LayerNormalization", "ORT RMSNormalization", "ORT SkipLayerNormalization",
                 "ORT SkipSimplifiedLN"},
    },
    "openvino": {
        "attention": {"OV SDPA", "OV SDPA (K/V broadcast)"},
        "softmax": {"OV softmax", "OV log_softmax"},
        "norm": {"OV mvn+affine", "OV RMS graph", "OV add+mvn+affine", "OV add+RMS graph"},
    },
}  # fmt: skip


@pytest.mark.parametrize("family", PEER_FAMILIES)
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_runtime_peers_run_and_agree(runtime: str, family: str, tmp_path: Path) -> None:
    pytest.importorskip(runtime, reason=f"{runtime} not installed (pip install fastattn[bench])")
    ops, shape, keyword = PEER_FAMILIES[family]
    # bf16 for the norms: OpenVINO converts it at the graph's boundary, ORT has no bf16 kernels
    dtype = "fp32,bf16" if family == "norm" else "fp32"
    doc = _peer_run(ops, shape, keyword, tmp_path, dtype)
    prefix = "ORT " if runtime == "onnxruntime" else "OV "
    peer_rows = [r for r in doc["rows"] if r["impl"].startswith(prefix)]
    assert {r["impl"] for r in peer_rows} == EXPECTED_PEERS[runtime][family]
    for r in peer_rows:
        assert r["check_ok"] and r["error"] is None and r["median_ms"] > 0, r
        assert "bwd" not in r["variant"] and r["speedup"] > 0
    if runtime == "onnxruntime" and family == "norm":
        assert not any(r["dtype"] == "bf16" for r in peer_rows)
    if runtime == "openvino" and family == "norm":
        assert {r["dtype"] for r in peer_rows} == {"fp32", "bf16"}
    if runtime == "onnxruntime" and family == "norm":  # no bf16 kernels: absent, with a note
        assert "onnxruntime peers: none for bf16" in " ".join(doc["machine"]["peer_notes"])
    if family == "attention":  # GQA only in the decode case; MHA only where heads match
        gqa = {r["impl"] for r in peer_rows if "GQA" in r["variant"]}
        assert gqa & {"ORT MultiHeadAttention", "OV SDPA"} == set()


def test_runtime_peer_that_disagrees_is_flagged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from fastattn.bench import peers

    def cases(opts: C.Options) -> list[C.Case]:
        [case] = [c for c in C.softmax_cases(opts) if c.variant == "scale+bias(1,C)"]
        # a plain Softmax ignores the scale and the bias: its check must fail
        case.impls = [case.impls[0], *peers.softmax_peers(False, torch.float32, "cpu")[:1]]
        return [case]

    monkeypatch.setitem(C.REGISTRY, "wrong-peer", cases)
    out = tmp_path / "b.json"
    argv = ["wrong-peer", *FAST, "--shape", "8x256", "--no-compile", "--json", str(out)]
    assert bench.main(argv) == 1
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert not rows["ORT Softmax"]["check_ok"] and rows["ORT Softmax"]["error"] is None
    assert "MISMATCH" in rows["ORT Softmax"]["check"]


def test_cli_runs_without_the_peer_runtimes() -> None:
    hide = "import sys; sys.modules.update(onnxruntime=None, onnx=None, openvino=None); "
    run = "from fastattn import bench; sys.exit(bench.main(sys.argv[1:]))"
    argv = [sys.executable, "-c", hide + run, "layernorm", *FAST, "--shape", "8x256"]
    res = subprocess.run([*argv, "--no-compile", "-k", "fwd"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "peer note: onnxruntime not importable (ModuleNotFoundError" in res.stdout
    assert "peer note: openvino not importable (ModuleNotFoundError" in res.stdout
    assert "F.layer_norm" in res.stdout and "ORT " not in res.stdout and "OV " not in res.stdout
