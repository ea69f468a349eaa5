"""`make gpu-check` (tools/gpu_check.py, tools/gpu_bench.py) with the GPU parts faked: argument
handling, time limits, the summary writer, the peak table, the no-GPU exit, and the
representative subset that tests/conftest.py selects for it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gpu_bench  # noqa: E402
import gpu_check  # noqa: E402

# A stand-in for the GPU machine's Python: answers the probe as an H100 would, "builds", runs a
# "pytest" that writes a JUnit XML (one failure when FAKE_FAIL is set) and a "benchmark".
FAKE_PYTHON = textwrap.dedent(
    """\
    #!{python}
    import json, os, sys, time
    args = sys.argv[1:]
    if args[:1] == ["-c"] and "find_spec" in args[1]:
        print("")  # nothing missing
    elif args[:1] == ["-c"]:
        print(json.dumps({{"torch": "9.9+cu", "cuda_runtime": "13.0", "cuda_available": True,
                          "device_count": 1, "triton": "9.9", "name": "NVIDIA H100 80GB HBM3",
                          "capability": "9.0", "sms": 132, "memory_gib": 79.2,
                          "driver": "999.1", "max_sm_clock": "1980 MHz"}}))
    elif args[:1] == ["setup.py"]:
        print("arch", os.environ.get("TORCH_CUDA_ARCH_LIST"), "jobs", os.environ["MAX_JOBS"])
        if os.environ.get("FAKE_SLOW_BUILD"):
            time.sleep(60)
    elif args[:2] == ["-m", "pytest"]:
        path = [a.split("=", 1)[1] for a in args if a.startswith("--junitxml=")][0]
        bad = "<failure message='x'/>" if os.environ.get("FAKE_FAIL") else ""
        open(path, "w").write(
            "<testsuites><testsuite>"
            "<testcase classname='tests.test_norm' name='test_parity_gpu[cuda-cuda]'>"
            "<properties><property name='op' value='norm'/>"
            "<property name='backend' value='cuda'/></properties>" + bad + "</testcase>"
            "<testcase classname='tests.test_norm' name='test_parity_gpu[triton-cuda]'>"
            "<properties><property name='op' value='norm'/>"
            "<property name='backend' value='triton'/></properties></testcase>"
            "</testsuite></testsuites>")
    elif args and args[0].endswith("gpu_bench.py"):
        out = args[args.index("--out") + 1]
        json.dump({{"device": "x", "peaks_key": "H100", "peak_source": "s", "skipped": [],
                   "rows": [{{"op": "rms_norm", "shape": "4x8", "dtype": "bf16",
                             "variant": "fwd", "impl": "fastattn[cuda]", "ms": 0.5,
                             "gbs": 2000.0, "pct_peak": 59.7, "vs_best_peer": 1.3,
                             "check": "ok"}}]}}, open(out, "w"))
    """
)


@pytest.fixture
def fake_python(tmp_path):
    exe = tmp_path / "python"
    exe.write_text(FAKE_PYTHON.format(python=sys.executable))
    exe.chmod(0o755)
    return str(exe)


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(gpu_check, "has_gpu_device", lambda: True)
    monkeypatch.setattr(gpu_check, "cuda_home", lambda: "/opt/cuda")
    monkeypatch.setenv("GPU_CHECK_COMMIT", "abc1234")


def test_whole_run_with_a_faked_gpu_passes(tmp_path, fake_python, fake_gpu, capsys):
    out = tmp_path / "res"
    rc = gpu_check.main(["--out", str(out), "--python", fake_python])
    assert rc == gpu_check.EXIT_OK
    build_log = (out / "build.log").read_text()
    assert "arch 9.0a jobs" in build_log  # the device's own architecture, sm_90a
    md = (out / "summary.md").read_text()
    assert "H100 80GB HBM3 — PASS" in md and "commit `abc1234`" in md
    assert "| norm / cuda | 1 | 0 | 0 |" in md and "| norm / triton | 1 | 0 | 0 |" in md
    assert "| rms_norm | 4x8 | bf16 | fwd | fastattn[cuda] | 0.500 | 2000.0 GB/s | 59.7 |" in md
    doc = json.loads((out / "summary.json").read_text())
    assert doc["ok"] is True and [s["name"] for s in doc["steps"]] == [
        "env", "build", "tests", "bench"
    ]  # fmt: skip
    assert "gpu-check: tests norm / cuda: 1 passed, 0 failed" in capsys.readouterr().out


def test_a_failing_test_fails_the_run_and_is_named(tmp_path, fake_python, fake_gpu, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "1")
    out = tmp_path / "res"
    assert gpu_check.main(["--out", str(out), "--python", fake_python]) == gpu_check.EXIT_FAILED
    md = (out / "summary.md").read_text()
    assert "— FAIL" in md and "`tests.test_norm::test_parity_gpu[cuda-cuda]`" in md
    assert "| norm / cuda | 0 | 1 | 0 |" in md


def test_a_step_past_its_limit_is_stopped_and_the_next_steps_still_run(
    tmp_path, fake_python, fake_gpu, monkeypatch
):
    monkeypatch.setenv("FAKE_SLOW_BUILD", "1")
    out = tmp_path / "res"
    t0 = time.monotonic()
    rc = gpu_check.main(["--out", str(out), "--python", fake_python, "--limit", "build=2"])
    assert time.monotonic() - t0 < 40  # the 60 s "build" was cut at 2 s (SIGINT)
    steps = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["steps"]}
    assert steps["build"]["status"] == "timeout" and steps["build"]["limit_s"] == 2
    assert steps["tests"]["status"] == "ok" and steps["bench"]["status"] == "ok"
    assert rc == gpu_check.EXIT_FAILED  # a timed-out step fails the run


def test_the_total_budget_cuts_every_step():
    now = [100.0]
    budget = gpu_check.Budget(60, clock=lambda: now[0])
    assert budget.limit(150) == 60 and budget.limit(30) == 30
    now[0] = 150.0
    assert budget.limit(30) == 10
    now[0] = 170.0
    assert budget.limit(30) == 0 and budget.left() == 0


def test_a_step_with_no_time_left_is_skipped(tmp_path):
    step = gpu_check.run_step(gpu_check.Step("x"), ["false"], 0.0, tmp_path / "x.log")
    assert step.status == "skipped" and "no time left" in step.detail


def test_sigint_at_the_limit_lets_pytest_write_its_junit_xml(tmp_path):
    # 20 s: time for the child pytest to start and reach the slow test on a loaded machine; it
    # would sleep for 300. SIGINT ignored here, as in a pytest-xdist worker or a background job
    # of a non-interactive shell: the child must get it back (it ignored it, and died at the
    # SIGKILL without its XML, in `make test`).
    (tmp_path / "test_slow.py").write_text(
        "import time\ndef test_fast():\n    pass\ndef test_slow():\n    time.sleep(300)\n"
    )
    junit = tmp_path / "j.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-p", "no:benchmark", f"--junitxml={junit}", str(tmp_path / "test_slow.py")]  # fmt: skip
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        step = gpu_check.run_step(gpu_check.Step("tests"), cmd, 20, tmp_path / "t.log",
                                  cwd=tmp_path)  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, old)
    assert step.status == "timeout" and step.seconds < 60, (tmp_path / "t.log").read_text()
    got = gpu_check.summarise_junit(junit)
    assert got["passed"] == 1 and got["interrupted"] == 1 and got["failed"] == 0


def test_no_gpu_says_so_in_one_line_with_a_distinct_exit_code(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "has_gpu_device", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "r")]) == gpu_check.EXIT_NO_GPU == 3
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0]
    assert not (tmp_path / "r").exists()  # nothing run, nothing written


@pytest.mark.skipif(gpu_check.has_gpu_device(), reason="this machine has a GPU driver")
def test_make_gpu_check_here_needs_no_venv_and_stops_in_one_line():
    dry = subprocess.run(["make", "-n", "gpu-check", "GPU_PYTHON=python3"], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert dry.returncode == 0 and "pip" not in dry.stdout and "venv" not in dry.stdout
    assert "tools/gpu_check.py" in dry.stdout
    run = subprocess.run(["make", "--no-print-directory", "gpu-check",
                          f"GPU_PYTHON={sys.executable}"], cwd=ROOT, capture_output=True,
                         text=True)  # fmt: skip
    said = [ln for ln in run.stdout.splitlines() if not ln.startswith(sys.executable)]
    assert run.returncode != 0 and len(said) == 1 and "no CUDA GPU" in said[0]
    assert "Error 3" in run.stderr  # make reports the script's distinct status


def test_arguments():
    a = gpu_check.parse_args(["--limit", "tests=300", "--skip", "bench", "--subset", "4"])
    assert a.limits["tests"] == 300 and a.limits["build"] == gpu_check.LIMITS["build"]
    assert a.skip == ["bench"] and a.subset == 4 and a.out == Path("gpu-check-results")
    for bad in (["--limit", "tests"], ["--limit", "nope=3"], ["--limit", "tests=x"],
                ["--skip", "nope"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            gpu_check.parse_args(bad)
        assert e.value.code == 2


def test_output_folder_and_wheels_from_the_environment(monkeypatch):
    monkeypatch.setenv("GPU_CHECK_OUT", "/tmp/somewhere")
    monkeypatch.setenv("FASTATTN_WHEELS", "/wheels")
    a = gpu_check.parse_args([])
    assert a.out == Path("/tmp/somewhere") and a.wheels == "/wheels"


@pytest.mark.parametrize(("cap", "want"), [("8.0", "8.0"), ("9.0", "9.0a"), ("8.9", "8.9")])
def test_arch_list_is_the_device_only(cap, want):
    assert gpu_check.arch_list(cap) == want


NAMES = [
    ("NVIDIA H100 80GB HBM3", "H100"),  # SXM5
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100"),
    ("Tesla T4", None),
]


@pytest.mark.parametrize(("name", "key"), NAMES)
def test_peak_table_picks_the_most_specific_entry(name, key):
    got = gpu_bench.peaks_for(name)
    assert (got[0] if got else None) == key


def test_peak_table_entries_are_complete_and_sane():
    for key, p in gpu_bench.PEAKS:
        assert set(p) == {"bf16", "fp16", "tf32", "fp32", "gbs"}, key
        assert p["bf16"] == p["fp16"] > p["tf32"] > p["fp32"] > 0, key
        assert 1000 < p["gbs"] < 10000, key
    # the dense H100 SXM bf16 figure is half the datasheet's 1979 "with sparsity"
    assert gpu_bench.peaks_for("NVIDIA H100 80GB HBM3")[1]["bf16"] == pytest.approx(1979 / 2, 0.01)
    assert gpu_bench.percent(494.75, 989.5) == pytest.approx(50.0)
    assert gpu_bench.percent(1.0, None) is None and gpu_bench.percent(None, 1.0) is None


def test_gpu_bench_without_cuda_says_so(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_bench.py"), "--out",
                        str(tmp_path / "b.json")], capture_output=True, text=True)  # fmt: skip
    if r.returncode != 3:
        pytest.skip("CUDA is available here")  # the real benchmark is not a unit test
    assert "no CUDA device" in r.stderr


def test_the_gpu_subset_keeps_every_backend_and_dtype_and_spreads_the_rest():
    # Collection only: on a machine without CUDA the gpu tests are collected, then skipped.
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "--gpu-subset=3",
         "-p", "no:cacheprovider", "tests/test_softmax.py"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    ids = [ln for ln in r.stdout.splitlines() if "test_parity_gpu[" in ln]
    groups: dict[tuple[str, str], list[str]] = {}
    for i in ids:
        backend, dtype = re.search(r"\[(\w+)-cuda-\d+-(torch\.\w+)-", i).groups()
        groups.setdefault((backend, dtype), []).append(i)
    assert set(groups) == {
        (b, d)
        for b in ("triton", "cuda", "reference")
        for d in ("torch.float32", "torch.bfloat16", "torch.float16")
    }
    assert all(len(v) == 3 for v in groups.values())
    # first, middle and last of each group: the smallest row and the 262147-column one
    assert all("-1-" in v[0] and "-262147-" in v[-1] for v in groups.values())
    other = [ln for ln in r.stdout.splitlines() if "test_fully_masked_rows" in ln]
    assert other and len(other) <= 3 * 2 * 3  # <= 3 per (backend, dtype), two backends


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_shell_scripts_parse():
    for script in (ROOT / "tools").glob("*.sh"):
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script.name}: {r.stderr}"
