"""`make gpu-check`: prove fastattn's GPU kernels on one CUDA machine, in at most 8 minutes.

Run from a clean clone on a machine with a CUDA GPU (no internet needed): the Python that runs
this script must have torch with CUDA, triton, pytest, ninja and pybind11, or the wheels for the
missing ones lie in the folder named by ``FASTATTN_WHEELS``. Steps, each with its own time limit
(cut to what is left of the total), each run even when an earlier one failed:

1. ``env``: GPU name, driver, CUDA runtime, torch, triton, compute capability, SMs, clocks;
2. ``build``: the extension with CUDA for this device's architecture only, parallel ninja;
3. ``tests``: a representative subset of the ``gpu``-marked tests (``--gpu-subset``: every op x
   backend x dtype, the odd shapes, fully-masked rows, determinism, torch.compile), in parallel,
   to ``junit.xml``; one line per op and backend;
4. ``bench``: every op on every GPU backend against its torch peer (tools/gpu_bench.py);
5. ``summary.md`` and ``summary.json`` in the output folder (``GPU_CHECK_OUT``, default
   ``gpu-check-results/``), with every step's log.

Exit status: 0 when every step ran and every test passed; 1 otherwise; 3 (``EXIT_NO_GPU``) when
this machine has no CUDA GPU, said in one line, nothing run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 3
TOTAL_S = 480  # the 8 minutes of wall time, every step included
# Each step's own limit (seconds): the build compiles two .cu files per architecture (36 s each
# for two architectures on 2 cores here, so well under a minute on 16); the tests compile every
# Triton specialisation they meet; the benchmark is what is left.
LIMITS: dict[str, float] = {"deps": 90, "env": 30, "build": 150, "tests": 210, "bench": 90}
REQUIRED = ["torch", "triton", "pytest", "ninja", "pybind11"]  # "xdist" is optional
GPU_TEST_FILES = [
    "tests/test_attention.py",
    "tests/test_norm.py",
    "tests/test_softmax.py",
    "tests/test_paged.py",
    "tests/test_cuda_device.py",  # the CUDA C++ paths only a device shows: streams, guards, 2**31
]

PROBE = r"""
import json, subprocess, torch
d = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda,
     "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count()}
try:
    import triton
    d["triton"] = triton.__version__
except Exception as e:
    d["triton"] = f"missing ({e})"
if d["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    d.update(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
             memory_gib=round(p.total_memory / 2**30, 1))
    q = "driver_version,clocks.max.sm,clocks.max.mem,clocks.sm,power.limit"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout
        vals = [v.strip() for v in out.splitlines()[0].split(",")]
        d.update(zip(["driver", "max_sm_clock", "max_mem_clock", "sm_clock", "power_limit"], vals))
    except Exception as e:
        d["driver"] = f"nvidia-smi failed ({e})"
print(json.dumps(d))
"""


@dataclass
class Step:
    """What one step did: ``status`` is ok, failed, timeout or skipped."""

    name: str
    status: str = "skipped"
    seconds: float = 0.0
    limit_s: float = 0.0
    detail: str = ""
    log: str = ""
    data: dict[str, Any] = field(default_factory=dict)


class Budget:
    """The total wall-time budget: a step gets its own limit or what is left, the lesser."""

    def __init__(self, total_s: float, clock: Any = time.monotonic) -> None:
        self.clock, self.deadline = clock, clock() + total_s

    def left(self) -> float:
        return max(0.0, self.deadline - self.clock())

    def limit(self, own_s: float) -> float:
        return min(own_s, self.left())


def run_step(step: Step, cmd: list[str], limit_s: float, log: Path, env: dict | None = None,
             cwd: Path = ROOT) -> Step:  # fmt: skip
    """Runs ``cmd`` with its output to ``log``; past ``limit_s`` its whole process group gets
    SIGINT (pytest then still writes its JUnit XML), then SIGKILL 20 s later."""
    step.limit_s, step.log = round(limit_s, 1), log.name
    if limit_s < 1:
        step.status, step.detail = "skipped", "no time left in the total budget"
        return step
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True, preexec_fn=_interruptible)  # fmt: skip
        try:
            rc = proc.wait(timeout=limit_s)
            step.status = "ok" if rc == 0 else "failed"
            step.detail = step.detail or ("" if rc == 0 else f"exit status {rc}")
        except subprocess.TimeoutExpired:
            _stop(proc)
            step.status, step.detail = "timeout", f"stopped at its {limit_s:.0f} s limit"
    step.seconds = round(time.monotonic() - t0, 1)
    return step


def _interruptible() -> None:
    """In the child before exec: SIGINT back to its default. A process started in the background
    by a non-interactive shell (or by a pytest-xdist worker) inherits SIGINT ignored, and Python
    then never raises KeyboardInterrupt: pytest would die at the SIGKILL without its JUnit XML."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGINT, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def has_gpu_device() -> bool:
    """An NVIDIA driver is present (nvidia-smi or a device node): checked before any import."""
    return shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()


def arch_list(capability: str) -> str:
    """``TORCH_CUDA_ARCH_LIST`` for one device: its own architecture, with the ``a`` suffix on
    sm_90 (what `make check-cuda` builds and checks: sm_90a)."""
    major, minor = capability.split(".")
    return f"{major}.{minor}{'a' if major == '9' else ''}"


def cuda_home() -> str | None:
    """The CUDA toolkit: CUDA_HOME, else the TOP that ``nvcc --dryrun`` reports (the nvcc on PATH
    may be a wrapper outside the toolkit, whose parent torch would wrongly take)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    if shutil.which("nvcc") is None:
        return None
    out = subprocess.run(["nvcc", "--dryrun", "-c", "x.cu", "-o", "x.o"], capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return os.path.realpath(line.split("=", 1)[1].strip())
    return None


def git_commit() -> str:
    """The commit measured (a copy of the tree without .git: set GPU_CHECK_COMMIT instead)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=ROOT, timeout=10)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], capture_output=True,
                               text=True, cwd=ROOT, timeout=10).stdout.strip()  # fmt: skip
        return (out.stdout.strip() + ("+changes" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def missing_modules(python: str) -> list[str]:
    code = "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] " \
           "if u.find_spec(m) is None))"  # fmt: skip
    out = subprocess.run([python, "-c", code, *REQUIRED, "xdist"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    return out.stdout.split()


def summarise_junit(path: Path) -> dict[str, Any]:
    """Counts per (op, backend) from the JUnit XML (the properties tests/conftest.py records),
    and the names of the failed cases."""
    groups: dict[str, dict[str, int]] = {}
    failed: list[str] = []
    totals = {"passed": 0, "failed": 0, "skipped": 0, "interrupted": 0}
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.get("name") is None:  # the test running when SIGINT came: neither pass nor fail
            totals["interrupted"] += 1
            continue
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        key = f"{props.get('op', case.get('classname', '?'))} / {props.get('backend', '-')}"
        outcome = "passed"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
            failed.append(f"{case.get('classname')}::{case.get('name')}")
        elif case.find("skipped") is not None:
            outcome = "skipped"
        groups.setdefault(key, {"passed": 0, "failed": 0, "skipped": 0})[outcome] += 1
        totals[outcome] += 1
    return {"groups": dict(sorted(groups.items())), "failed_cases": failed, **totals}


def _fmt(v: Any, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def write_summary(out: Path, steps: list[Step], meta: dict[str, Any]) -> tuple[str, dict]:
    """summary.md (a table read at a glance) and summary.json, from the steps' results."""
    by = {s.name: s for s in steps}
    env = by["env"].data if "env" in by else {}
    tests = by["tests"].data if "tests" in by else {}
    bench = by["bench"].data if "bench" in by else {}
    ok = exit_status(steps) == EXIT_OK
    lines = [
        f"# gpu-check {meta.get('date', '')}: {env.get('name', 'no GPU')} — "
        f"{'PASS' if ok else 'FAIL'}",
        "",
        f"commit `{meta.get('commit', '?')}`; torch {env.get('torch', '?')} (CUDA "
        f"{env.get('cuda_runtime', '?')}), triton {env.get('triton', '?')}, driver "
        f"{env.get('driver', '?')}; sm_{env.get('capability', '?').replace('.', '')}, "
        f"{env.get('sms', '?')} SMs, {env.get('memory_gib', '?')} GiB, max SM clock "
        f"{env.get('max_sm_clock', '?')}; total {meta.get('seconds', '?')} s",
        "",
        "| step | status | seconds | limit | detail |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {s.name} | {s.status} | {s.seconds} | {s.limit_s} | {s.detail} |"
              for s in steps]  # fmt: skip
    if tests.get("groups"):
        lines += ["", "## Tests (gpu-marked, representative subset)", "",
                  "| op / backend | passed | failed | skipped |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v['passed']} | {v['failed']} | {v['skipped']} |"
                  for k, v in tests["groups"].items()]  # fmt: skip
        if tests.get("failed_cases"):
            lines += ["", "Failed:", *[f"- `{n}`" for n in tests["failed_cases"][:40]]]
    if bench.get("rows"):
        lines += [
            "",
            f"## Speed (median; peaks: {bench.get('peaks_key')}, {bench.get('peak_source')})",
            "",
            "| op | shape | dtype | variant | impl | ms | TFLOP/s or GB/s | % peak | "
            "vs best peer | check |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in bench["rows"]:
            rate = r.get("tflops", r.get("gbs"))
            unit = " TF/s" if "tflops" in r else " GB/s" if "gbs" in r else ""
            lines.append(
                f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['variant']} | {r['impl']} | "
                f"{_fmt(r.get('ms'), 3)} | {_fmt(rate)}{unit if rate is not None else ''} | "
                f"{_fmt(r.get('pct_peak'))} | {_fmt(r.get('vs_best_peer'), 2)} | "
                f"{r.get('check')}{' ' + r['error'] if r.get('error') else ''} |"
            )
        if bench.get("skipped"):
            lines += ["", f"Not measured (time budget): {len(bench['skipped'])} cases."]
    md = "\n".join(lines) + "\n"
    doc = {"meta": meta, "ok": ok, "steps": [asdict(s) for s in steps]}
    (out / "summary.md").write_text(md)
    (out / "summary.json").write_text(json.dumps(doc, indent=1, default=str))
    return md, doc


def exit_status(steps: list[Step]) -> int:
    """0 only when every step ran to success and the tests ran, none failing."""
    by = {s.name: s for s in steps}
    tests = by.get("tests")
    if tests is None or not tests.data.get("passed") or tests.data.get("failed"):
        return EXIT_FAILED
    return EXIT_OK if all(s.status == "ok" for s in steps) else EXIT_FAILED


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("GPU_CHECK_OUT",
                   "gpu-check-results")), help="output folder (env GPU_CHECK_OUT)")  # fmt: skip
    p.add_argument("--python", default=sys.executable, help="the Python with CUDA torch")
    p.add_argument(
        "--wheels",
        default=os.environ.get("FASTATTN_WHEELS"),
        help="folder of wheels for missing dependencies (env FASTATTN_WHEELS)",
    )
    p.add_argument("--total", type=float, default=TOTAL_S, help="total seconds, all steps")
    p.add_argument(
        "--subset",
        type=int,
        default=12,
        help="cases per gpu test, backend and dtype (0: every gpu test)",
    )
    p.add_argument("--workers", type=int, default=0, help="pytest workers (0: cores / 2, <= 8)")
    p.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="STEP=S",
        help=f"override one step's limit, e.g. tests=300 (steps: {', '.join(LIMITS)})",
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=list(LIMITS),
        help="leave a step out (reported as skipped)",
    )
    args = p.parse_args(argv)
    limits = dict(LIMITS)
    for item in args.limit:
        name, _, val = item.partition("=")
        if name not in limits or not val.replace(".", "", 1).isdigit():
            p.error(f"--limit {item!r}: expected STEP=SECONDS with STEP one of {list(limits)}")
        limits[name] = float(val)
    args.limits = limits
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start, budget = time.monotonic(), Budget(args.total)
    if not has_gpu_device():
        print("gpu-check: no CUDA GPU on this machine (no nvidia-smi, no /dev/nvidia0); "
              f"nothing run (exit {EXIT_NO_GPU})")  # fmt: skip
        return EXIT_NO_GPU
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps: list[Step] = []
    py = args.python

    def limited(name: str) -> float:
        return 0.0 if name in args.skip else budget.limit(args.limits[name])

    # 0. Dependencies from the wheel folder, only for what is missing.
    missing = missing_modules(py)
    if args.wheels and [m for m in missing if m != "xdist"]:
        names = {"xdist": "pytest-xdist"}
        pkgs = [names.get(m, m) for m in missing]
        cmd = [py, "-m", "pip", "install", "--no-index", "--find-links", args.wheels, *pkgs]
        steps.append(run_step(Step("deps"), cmd, limited("deps"), out / "deps.log"))
        missing = missing_modules(py)

    # 1. The environment.
    env_step = run_step(Step("env"), [py, "-c", PROBE], limited("env"), out / "env.log")
    try:
        env_step.data = json.loads((out / "env.log").read_text().splitlines()[-1])
    except (ValueError, IndexError):
        env_step.status, env_step.detail = "failed", "the probe printed no JSON (see env.log)"
    steps.append(env_step)
    info = env_step.data
    if env_step.status == "ok" and not info.get("cuda_available"):
        print(f"gpu-check: torch {info.get('torch')} sees no CUDA GPU here; nothing run "
              f"(exit {EXIT_NO_GPU})")  # fmt: skip
        return EXIT_NO_GPU
    print(f"gpu-check: {json.dumps(info)}", flush=True)
    if missing:
        print(f"gpu-check: missing Python modules: {', '.join(missing)}", flush=True)

    # 2. The build, for this device only.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cores = os.cpu_count() or 2
    env.update(FASTATTN_BUILD_CUDA="1", MAX_JOBS=str(cores))
    if info.get("capability"):
        env["TORCH_CUDA_ARCH_LIST"] = arch_list(info["capability"])
    home = cuda_home()
    if home:
        env["CUDA_HOME"] = home
    build = Step("build", detail=f"TORCH_CUDA_ARCH_LIST={env.get('TORCH_CUDA_ARCH_LIST')}, "
                 f"MAX_JOBS={cores}, CUDA_HOME={home}")  # fmt: skip
    build = run_step(build, [py, "setup.py", "build_ext", "--inplace"], limited("build"),
                     out / "build.log", env)  # fmt: skip
    if build.status == "ok":
        build.detail += f"; built in {build.seconds} s"
    steps.append(build)

    # 3. The representative subset of the gpu tests, in parallel.
    junit = out / "junit.xml"
    workers = args.workers or max(1, min(8, cores // 2))
    cmd = [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           f"--junitxml={junit}", f"--gpu-subset={args.subset}", *GPU_TEST_FILES]  # fmt: skip
    if "xdist" not in missing:
        cmd += ["-n", str(workers)]
    tests = run_step(Step("tests"), cmd, limited("tests"), out / "tests.log", env)
    if junit.exists():
        tests.data = summarise_junit(junit)
        tests.detail = (
            f"{tests.data['passed']} passed, {tests.data['failed']} failed, "
            f"{tests.data['skipped']} skipped, {tests.data['interrupted']} interrupted; "
            f"{tests.detail}"
        ).rstrip("; ")
    steps.append(tests)
    for key, v in tests.data.get("groups", {}).items():
        print(f"gpu-check: tests {key}: {v['passed']} passed, {v['failed']} failed, "
              f"{v['skipped']} skipped")  # fmt: skip

    # 4. Speed against the torch peers.
    bench_json = out / "bench.json"
    left = limited("bench")
    cmd = [py, str(ROOT / "tools" / "gpu_bench.py"), "--out", str(bench_json),
           "--budget", str(max(0.0, left - 20))]  # fmt: skip
    bench = run_step(Step("bench"), cmd, left, out / "bench.log", env)
    if bench_json.exists():
        bench.data = json.loads(bench_json.read_text())
    steps.append(bench)

    commit = os.environ.get("GPU_CHECK_COMMIT") or git_commit()
    meta = {"date": datetime.date.today().isoformat(), "commit": commit,
            "seconds": round(time.monotonic() - t_start, 1), "argv": sys.argv[1:]}  # fmt: skip
    md, _ = write_summary(out, steps, meta)
    print(md)
    return exit_status(steps)


if __name__ == "__main__":
    sys.exit(main())
