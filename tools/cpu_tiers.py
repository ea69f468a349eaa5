"""Run the CPU-kernel parity grids on every CPU tier this machine can run, at full thread count.

`make test` runs the whole suite on the best tier (fastattn's best ISA path, torch's best ATen
kernels), one pytest worker per core with one torch thread each. A tolerance or kernel assumption
that holds on one tier only (torch's AVX-512 kernels round sums differently from its AVX2 ones; our
AVX2 path is not our AVX-512 path) would then pass here and fail on another CPU, and a bug of the
multi-threaded split would not show. So the parity grids run again on the best tier with all
threads, then on each lower tier, with fastattn's path and torch's lowered together to the same
level (avx512 -> avx2 -> scalar/default), in a fresh process each (both choices are read once per
process). On a CPU with AVX512_BF16 the best tier (avx512bf16) runs with every one of its kernels
on (FASTATTN_CPU_AVX512BF16=1: by default the attention one is off on Intel, where it is slower),
then the avx512 tier below it is the plain AVX-512 path that an AVX-512 CPU without them takes:

    python tools/cpu_tiers.py [--list] [pytest args...]

Prints one line per tier and exits non-zero if any run fails.

Not every tier runs the whole selection (`make test` has 15 minutes; these runs took 5 of them):
- the best tier runs all of it: it is where the parity grids run at all in `make test`, whose
  suite run leaves them out (--no-tier-grids: they ran there twice, at one thread per worker);
- the avx512 tier below avx512bf16 runs the bf16 cases (and the fuzz profile): the avx512bf16
  kernel tables serve bf16 only, so every fp32 and fp16 case of the tier above already ran the
  avx512 kernels, with the same ATen and thread count; a second run would be bit for bit the same;
- the tiers below AVX-512 (avx2, scalar) run one half of each parity grid (--grid-half,
  tests/conftest.py: the cases whose parameter indices sum to an even, or odd, number), avx2 the
  even half and scalar the odd one. In the softmax, norm and attention grids each half has
  every value of every parameter (length, row count, head dim, GQA layout, batch, dtype, mask
  variant, causal) and every pair of two (checked when this was written), so each ISA path meets
  every tail and block boundary in every dtype; the fp32 flash-rule grid is one list of cases,
  of which each half has every other one (every length pair, head dim and kind, not every
  pairing). Between them the two tiers run every case below AVX-512; their fp16 special values,
  subnormal outputs and the fuzz profile run whole.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

# fastattn's ISA path and torch's ATEN_CPU_CAPABILITY of the same level, best first.
TIERS = [("avx512bf16", "avx512"), ("avx512", "avx512"), ("avx2", "avx2"), ("scalar", "default")]
# The parity grids of the CPU kernels (fp32, bf16, fp16; attention's variants too) and fp16's
# special values (values near its max, subnormal outputs: converted by F16C on the vector tiers,
# in software on the scalar one), cpu backend only (the others do not depend on the tier); and
# the seeded fuzz profile with its regressions (tests/test_fuzz.py); the paged-cache grid of the
# CPU kernels' block-table walk (tests/test_paged.py).
TARGETS = [
    "tests/test_softmax.py",
    "tests/test_norm.py",
    "tests/test_attention.py",
    "tests/test_attention_variants.py",
    "tests/test_fuzz.py",
    "tests/test_paged.py",
]
SELECT = (
    "(test_parity_grid and cpu) or (test_float16_ and cpu-cpu) or test_float16_subnormal"
    " or test_fuzz or test_regressions or test_paged_cpu_kernel_paths or test_paged_cpu_split"
)


def tiers() -> list[dict[str, str]]:
    """The environments of the best tier this CPU runs (empty: the defaults) and those below."""
    import torch

    from fastattn import _extension

    best = _extension.build_info().get("cpu_isa", "scalar")
    names = [t[0] for t in TIERS]
    if best not in names:
        return [{}]
    aten_best = torch.backends.cpu.get_cpu_capability().lower()
    envs: list[dict[str, str]] = [{}]
    if best == "avx512bf16":
        envs = [{"FASTATTN_CPU_AVX512BF16": "1"}]
    for isa, aten in TIERS[names.index(best) + 1 :]:
        # The fuzz cases of the other backends do not depend on the CPU tier: cpu only below.
        env = {
            "FASTATTN_CPU_ISA": isa,
            "ATEN_CPU_CAPABILITY": aten,
            "FASTATTN_FUZZ_BACKENDS": "cpu",
        }
        if aten_best == aten:  # torch is already at this level; lowering it changes nothing
            env.pop("ATEN_CPU_CAPABILITY")
        envs.append(env)
    return envs


def selections(envs: list[dict[str, str]]) -> list[list[str]]:
    """The pytest arguments that choose each tier's cases (see the module docstring)."""
    out: list[list[str]] = []
    half = 0
    for i, env in enumerate(envs):
        isa = env.get("FASTATTN_CPU_ISA")
        if i == 0 or isa is None:
            out.append(["-k", SELECT])
        elif isa == "avx512":
            above = envs[i - 1].get("FASTATTN_CPU_ISA", "avx512bf16")
            if above == "avx512bf16":
                out.append(["-k", f"({SELECT}) and (bfloat16 or test_fuzz or test_regressions)"])
            else:
                out.append(["-k", SELECT])
        else:
            out.append(["-k", SELECT, "--grid-half", str(half)])
            half ^= 1
    return out


def main(argv: list[str]) -> int:
    envs = tiers()
    chosen = selections(envs)
    if "--list" in argv:
        for env, sel in zip(envs, chosen, strict=True):
            label = " ".join(f"{k}={v}" for k, v in env.items()) or "(best tier: defaults)"
            print(f"{label}: {' '.join(sel)}")
        return 0
    failed = 0
    for env, sel in zip(envs, chosen, strict=True):
        label = " ".join(f"{k}={v}" for k, v in env.items()) or "best (defaults)"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TARGETS]
        cmd += [*sel, *argv]
        t0 = time.monotonic()
        rc = subprocess.run(cmd, env={**os.environ, **env}).returncode
        print(f"cpu tier {label}: {'ok' if rc == 0 else f'FAILED (exit {rc})'}"
              f" in {time.monotonic() - t0:.0f} s", flush=True)  # fmt: skip
        failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
