"""Run the CPU-kernel parity grids once more on every lower CPU tier this machine can run.

`make test` runs the whole suite on the best tier (fastattn's best ISA path, torch's best ATen
kernels). A tolerance or kernel assumption that holds on one tier only (torch's AVX-512 kernels
round sums differently from its AVX2 ones; our AVX2 path is not our AVX-512 path) would then pass
here and fail on another CPU. So each lower tier runs the parity grids again, with fastattn's path
and torch's lowered together to the same level (avx512 -> avx2 -> scalar/default), in a fresh
process each (both choices are read once per process):

    python tools/cpu_tiers.py [--list] [pytest args...]

Prints one line per tier and exits non-zero if any run fails. Where the machine has only one tier
(no AVX2), there is nothing to run and it says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

# fastattn's ISA path and torch's ATEN_CPU_CAPABILITY of the same level, best first.
TIERS = [("avx512", "avx512"), ("avx2", "avx2"), ("scalar", "default")]
# The parity grids of the CPU kernels, cpu backend only (the others do not depend on the tier).
TARGETS = ["tests/test_softmax.py", "tests/test_norm.py", "tests/test_attention.py"]
SELECT = "test_parity_grid and cpu"


def lower_tiers() -> list[dict[str, str]]:
    """The environments of the tiers below the best one this CPU runs."""
    import torch

    from fastattn import _extension

    best = _extension.build_info().get("cpu_isa", "scalar")
    names = [t[0] for t in TIERS]
    if best not in names:
        return []
    aten_best = torch.backends.cpu.get_cpu_capability().lower()
    envs = []
    for isa, aten in TIERS[names.index(best) + 1 :]:
        env = {"FASTATTN_CPU_ISA": isa, "ATEN_CPU_CAPABILITY": aten}
        if aten_best == aten:  # torch is already at this level; lowering it changes nothing
            env.pop("ATEN_CPU_CAPABILITY")
        envs.append(env)
    return envs


def main(argv: list[str]) -> int:
    envs = lower_tiers()
    if "--list" in argv:
        for env in envs:
            print(" ".join(f"{k}={v}" for k, v in env.items()))
        return 0
    if not envs:
        print("cpu tiers: this CPU runs one tier only; nothing more to run")
        return 0
    failed = 0
    for env in envs:
        label = " ".join(f"{k}={v}" for k, v in env.items())
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TARGETS]
        cmd += ["-k", SELECT, *argv]
        t0 = time.monotonic()
        rc = subprocess.run(cmd, env={**os.environ, **env}).returncode
        print(f"cpu tier {label}: {'ok' if rc == 0 else f'FAILED (exit {rc})'}"
              f" in {time.monotonic() - t0:.0f} s", flush=True)  # fmt: skip
        failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
