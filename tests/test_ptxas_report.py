"""tools/ptxas_report.py (`make check-cuda`'s resource-usage step) on ptxas -v output written
here: the parse, every failure rule (spills, static and dynamic shared memory, a missing kernel
or arch), the ninja log split and the per-source store, the tables and the exit status."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import ptxas_report as pr  # noqa: E402

# Real kernel names of the sm_80 build (nvcc 13: the anonymous namespace carries the file's hash).
SOFTMAX_NS = "_ZN8fastattn4cuda43_GLOBAL__N__1412a919_10_softmax_cu_3a1d325c2"
NORM_NS = "_ZN8fastattn4cuda39_GLOBAL__N__1b9ce1ac_7_norm_cu_833605a6"
FWD_ARGS = "EEEvPKT_PS3_NS1_7FwdArgsIN2at10OpMathTypeIS3_E4typeEEE"
WARP = f"{SOFTMAX_NS}3softmax_fwd_warp_kernelIfLi4ELi4{FWD_ARGS}i"
BLOCK = f"{SOFTMAX_NS}4softmax_fwd_block_kernelIdLi2{FWD_ARGS}b"
NORM = f"{NORM_NS}19norm_bwd_reg_kernelIffLi4ELi1EEEvNS1_7BwdArgsIT_T0_EE"


def entry(name, arch, regs=32, smem=0, stack=0, st=0, ld=0, cmem=True):
    """ptxas -v's lines for one kernel, in nvcc 13's format (sm_90 prints no cmem[0])."""
    used = f"Used {regs} registers, used 1 barriers, {stack} bytes cumulative stack size"
    used += f", {smem} bytes smem" if smem else ""
    used += ", 372 bytes cmem[0]" if cmem else ""
    return [
        f"ptxas info    : Compiling entry function '{name}' for '{arch}'",
        f"ptxas info    : Function properties for {name}",
        f"    {stack} bytes stack frame, {st} bytes spill stores, {ld} bytes spill loads",
        f"ptxas info    : {used}",
        "ptxas info    : Compile time = 12.345 ms",
    ]


def named(usages):
    pr.short_names(usages, ["softmax_fwd_warp_kernel", "norm_bwd_reg_kernel"])
    return usages


def test_parse_reads_every_field():
    lines = ["ptxas info    : 0 bytes gmem", *entry(WARP, "sm_80", 40, 4096, 16, 8, 24)]
    lines += [  # a called (non-entry) function's properties must not overwrite the kernel's
        "ptxas info    : Function properties for __internal_accurate_pow",
        "    72 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
    ]
    lines += entry(WARP, "sm_90a", 38, cmem=False)
    (a, b) = pr.parse(lines)
    assert (a.arch, a.registers, a.smem, a.stack, a.spill_stores, a.spill_loads, a.cc) == (
        "sm_80", 40, 4096, 16, 8, 24, 80,
    )  # fmt: skip
    assert (b.arch, b.registers, b.smem, b.stack, b.cc) == ("sm_90a", 38, 0, 0, 90)


def test_entry_without_usage_line_is_an_error():
    lines = entry(WARP, "sm_80")
    del lines[3]  # "Used N registers"
    with pytest.raises(ValueError, match="no 'Used N registers'"):
        pr.parse(lines)


def test_clean_build_passes_and_names_are_demangled():
    us = named(pr.parse(entry(WARP, "sm_80") + entry(WARP, "sm_90a") + entry(NORM, "sm_80")))
    assert pr.failures(us, ["sm_80"], ["softmax_fwd_warp_kernel", "norm_bwd_reg_kernel"]) == []
    if pr.shutil.which("c++filt"):
        assert us[0].name == "softmax_fwd_warp_kernel<float, 4, 4>"
    else:
        assert us[0].name == "softmax_fwd_warp_kernel"


@pytest.mark.parametrize("st, ld", [(4, 0), (0, 4), (128, 256)])
def test_any_spill_fails(st, ld):
    us = named(pr.parse(entry(WARP, "sm_80") + entry(WARP, "sm_90a", st=st, ld=ld, stack=8)))
    (bad,) = pr.failures(us, ["sm_80", "sm_90a"], ["softmax_fwd_warp_kernel"])
    assert "on sm_90a spills" in bad and f"{st} B stores, {ld} B loads" in bad


def test_stack_frame_without_spill_passes():
    # A local array (a stack frame) is reported, not failed: only spilled registers are.
    us = named(pr.parse(entry(WARP, "sm_80", stack=256)))
    assert pr.failures(us, ["sm_80"], []) == []


@pytest.mark.parametrize("smem, fails", [(48 * 1024, False), (48 * 1024 + 4, True)])
def test_static_smem_limit(smem, fails):
    us = named(pr.parse(entry(WARP, "sm_90a", smem=smem)))
    bad = pr.failures(us, ["sm_90a"], [], dynamic={})
    assert bool(bad) == fails and all("static shared memory" in b for b in bad)


@pytest.mark.parametrize(
    "kernel, dynamic, arch, smem, fails",
    [
        # no opt-in: static + dynamic within 48 KiB
        (NORM, (16 * 1024, False), "sm_80", 32 * 1024, False),
        (NORM, (16 * 1024, False), "sm_80", 32 * 1024 + 1, True),
        # opt-in to a fixed size: sm_80's 163 KiB, sm_90's 227 KiB
        (NORM, (160 * 1024, True), "sm_80", 3 * 1024, False),
        (NORM, (160 * 1024, True), "sm_80", 3 * 1024 + 1, True),
        (NORM, (160 * 1024, True), "sm_90a", 60 * 1024, True),  # static alone is over 48 KiB
        (NORM, (180 * 1024, True), "sm_90a", 40 * 1024, False),
        # the launcher takes what is left of the opt-in limit: only static is checked
        (BLOCK, (pr.OPTIN_REST, True), "sm_80", 4096, False),
        (BLOCK, (pr.OPTIN_REST, True), "sm_86", 4096, True),  # no opt-in limit known for sm_86
    ],
)
def test_dynamic_smem_hook(kernel, dynamic, arch, smem, fails):
    us = named(pr.parse(entry(kernel, arch, smem=smem)))
    short = "softmax_fwd_block_kernel" if kernel == BLOCK else "norm_bwd_reg_kernel"
    bad = pr.failures(us, [arch], [short], dynamic={short: dynamic})
    assert bool(bad) == fails, bad


def test_shipped_dynamic_table_is_checked():
    # The module's own DYNAMIC_SMEM: norm_bwd_reg_kernel requests 16 KiB without opt-in.
    us = named(pr.parse(entry(NORM, "sm_80", smem=40 * 1024)))
    (bad,) = pr.failures(us, ["sm_80"], ["norm_bwd_reg_kernel"])
    assert "16384 B dynamic > 49152" in bad


def test_missing_kernel_or_arch_fails():
    us = named(pr.parse(entry(WARP, "sm_80")))
    bad = pr.failures(us, ["sm_80", "sm_90a"], ["softmax_fwd_warp_kernel", "norm_bwd_reg_kernel"])
    assert sorted(bad) == sorted(
        [
            "softmax_fwd_warp_kernel has no ptxas entry for sm_90a",
            "norm_bwd_reg_kernel has no ptxas entry for sm_80",
            "norm_bwd_reg_kernel has no ptxas entry for sm_90a",
        ]
    )
    assert pr.failures([], [], []) == [
        "no ptxas entries (was the build made with FASTATTN_NVCC_VERBOSE=1?)"
    ]


def ninja_log(*steps):
    """A ninja -v log: each (source, ptxas lines) as one nvcc step; a c++ step between."""
    lines = ["[1/9] c++ -MMD -c /r/csrc/ops.cpp -o /r/t/ops.o -O3", "warning: unrelated"]
    for i, (src, body) in enumerate(steps, 2):
        lines.append(f"[{i}/9] /usr/local/cuda/bin/nvcc -I/r/csrc -c /r/csrc/cuda/{src} -o x.o")
        lines += body
    return "\n".join([*lines, "[9/9] c++ x.o -shared -o _C.so"]) + "\n"


def test_log_split_and_store(tmp_path):
    log, store = tmp_path / "build.log", tmp_path / "ptxas"
    cu = [Path("csrc/cuda/softmax.cu"), Path("csrc/cuda/norm.cu")]
    log.write_text(
        ninja_log(("softmax.cu", entry(WARP, "sm_80")), ("norm.cu", entry(NORM, "sm_80")))
    )
    us, missing = pr.collect(log, cu, store)
    assert missing == [] and [u.mangled for u in us] == [WARP, NORM]
    # An incremental build that recompiled only norm.cu (now spilling): softmax.cu's stored lines.
    log.write_text(ninja_log(("norm.cu", entry(NORM, "sm_80", st=8, ld=8))))
    us, missing = pr.collect(log, cu, store)
    assert [(u.mangled, u.spill_stores) for u in us] == [(WARP, 0), (NORM, 8)]
    # A nothing-to-do build: both from the store.
    log.write_text("ninja: no work to do.\n")
    assert len(pr.collect(log, cu, store)[0]) == 2
    # A .cu never compiled with -Xptxas -v here.
    us, missing = pr.collect(log, [*cu, Path("csrc/cuda/attention.cu")], store)
    assert len(us) == 2 and missing == [
        "attention.cu: no ptxas output recorded (remove the build's temp dir)"
    ]


def test_tables():
    us = named(
        pr.parse(
            entry(WARP, "sm_80", 30, 512) + entry(WARP.replace("Li4ELi4", "Li4ELi2"), "sm_80", 26)
            + entry(NORM, "sm_90a", 64, st=4, ld=8)
        )
    )  # fmt: skip
    summary, detail = pr.tables(us, ["softmax_fwd_warp_kernel", "norm_bwd_reg_kernel"])
    rows = summary.splitlines()
    assert rows[0].startswith("| kernel | arch | instances | registers |")
    assert rows[2:] == [
        "| norm_bwd_reg_kernel | sm_90a | 1 | 64 | 0 | 0 | 4/8 |",
        "| softmax_fwd_warp_kernel | sm_80 | 2 | 26–30 | 512 | 0 | 0/0 |",
    ]
    assert len(detail.splitlines()) == 2 + 3


def test_main_exit_status_and_table_file(tmp_path, capsys):
    log, out = tmp_path / "build.log", tmp_path / "usage.md"
    args = [str(log), "--cu", "softmax.cu", "--store", str(tmp_path / "s"), "--out", str(out)]
    args += ["--arch", "sm_80", "--kernel", "softmax_fwd_warp_kernel"]
    log.write_text(ninja_log(("softmax.cu", entry(WARP, "sm_80", 30))))
    assert pr.main(args) == 0
    assert "| softmax_fwd_warp_kernel | sm_80 | 1 | 30 |" in capsys.readouterr().out
    assert "| softmax_fwd_warp_kernel | sm_80 | 1 | 30 |" in out.read_text()
    log.write_text(ninja_log(("softmax.cu", entry(WARP, "sm_80", 30, st=4))))
    assert pr.main(args) == 1
    (fail,) = [ln for ln in capsys.readouterr().out.splitlines() if "FAIL" in ln]
    assert "softmax_fwd_warp_kernel" in fail and "on sm_80 spills: 4 B stores" in fail


def test_known_spills_pass_up_to_their_bytes_and_attention_never_spills():
    """The listed softmax / norm spills pass at their measured bytes, fail past them; the
    attention kernels have no entry, so any spill of theirs fails."""
    (name, arch), nbytes = next(iter(pr.KNOWN_SPILLS.items()))
    assert not any("attention" in n for n, _ in pr.KNOWN_SPILLS)
    for spilled, fails in ((nbytes, False), (nbytes + 4, True)):
        u = pr.Usage(mangled="_Z1k", arch=arch, name=name, spill_stores=spilled)
        assert bool(pr.failures([u], [arch], [])) == fails
    u = pr.Usage(mangled="_Z1k", arch=arch, name="attention_fwd_kernel<c10::Half, false, 64>",
                           spill_loads=4)  # fmt: skip
    assert pr.failures([u], [arch], [])
