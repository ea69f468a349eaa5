"""The ``fastattn-bench`` command line: its arguments, and :func:`main`, which runs the cases,
prints the tables and writes the JSON (see :mod:`fastattn.bench` for examples)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from fastattn.bench import cases as C
from fastattn.bench import limits, mdsection, plot, progress, report, runner, timing

__all__ = [
    "main",
    "parse_args",
    "parse_dtypes",
    "parse_peak",
    "parse_shapes",
    "write_markdown",
]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fastattn-bench",
        description="Benchmark fastattn's fused ops against eager PyTorch and torch.compile.",
    )
    p.add_argument(
        "ops",
        nargs="*",
        metavar="OPS",
        help=f"ops to run (default: {' '.join(C.DEFAULT_OPS)}; all: {' '.join(C.REGISTRY)})",
    )
    p.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32,bf16,fp16,fp64")
    p.add_argument("--shape", help="comma-separated shapes overriding the defaults, e.g. 8192x4096")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--backend", default="auto", help="fastattn backend (auto, cpu, triton, cuda, reference)"
    )
    p.add_argument("--quick", action="store_true", help="small shapes and a short time budget")
    p.add_argument(
        "--alloc",
        choices=timing.ALLOC_MODES,
        default="fresh",
        help="fresh: glibc defaults; reuse: mallopt keeps freed blocks for reuse",
    )
    p.add_argument("--flush", action="store_true", help="evict caches before every timed call")
    p.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip torch.compile peers"
    )
    p.add_argument(
        "--no-runtimes",
        dest="runtimes",
        action="store_false",
        help="skip the onnxruntime and OpenVINO peers",
    )
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed calls per impl")
    p.add_argument(
        "-k",
        dest="keyword",
        action="append",
        default=[],
        help="only case ids containing this (A,B: either; repeated -k: all of them)",
    )
    p.add_argument(
        "--peak",
        metavar="DT=GFLOPS",
        help="the machine's peak GFLOP/s per dtype for the %% peak column, e.g. fp32=524,bf16=971"
        " (default: the measured matmul GFLOP/s, see --remeasure)",
    )
    p.add_argument(
        "--remeasure",
        action="store_true",
        help="measure this machine's limits (matmul GFLOP/s, copy and read GB/s) again instead "
        f"of reading them from {limits.cache_path()}",
    )
    p.add_argument("--json", metavar="PATH", help="write every row and the machine facts to PATH")
    p.add_argument(
        "--markdown",
        nargs="?",
        const="-",
        metavar="PATH",
        help="also print a Markdown table; with PATH: write it (and the --plot image) into a "
        "section of that Markdown file, replacing that section only",
    )
    p.add_argument(
        "--section",
        metavar="NAME",
        help="the section of --markdown PATH (default: the ops run, joined by -); it lies "
        "between <!-- fastattn-bench:NAME --> and <!-- /fastattn-bench:NAME -->",
    )
    p.add_argument(
        "--plot",
        metavar="PATH",
        help="draw each op's speed against sequence length / row size per implementation, with "
        "the machine's limit, into the image PATH (e.g. out.png; needs matplotlib)",
    )
    return p.parse_args(list(argv))


def parse_dtypes(spec: str) -> tuple[torch.dtype, ...]:
    names = [s.strip().lower() for s in spec.split(",") if s.strip()]
    alias = {
        "float32": "fp32",
        "bfloat16": "bf16",
        "float16": "fp16",
        "half": "fp16",
        "float64": "fp64",
    }
    names = [alias.get(n, n) for n in names]
    bad = [n for n in names if n not in C.DTYPES]
    if bad or not names:
        raise ValueError(f"unknown dtype(s) {bad or spec!r}; choose from {', '.join(C.DTYPES)}")
    return tuple(C.DTYPES[n] for n in names)


def parse_shapes(spec: str | None) -> tuple[tuple[int, ...], ...] | None:
    if not spec:
        return None
    try:
        shapes = tuple(tuple(int(d) for d in s.lower().split("x")) for s in spec.split(",") if s)
    except ValueError as e:
        raise ValueError(f"bad --shape {spec!r}: expected e.g. 1024x4096,32x131072") from e
    if not shapes or any(len(s) < 2 or min(s) < 1 for s in shapes):
        raise ValueError(f"bad --shape {spec!r}: each shape needs >= 2 positive dims")
    return shapes


def parse_peak(spec: str | None) -> dict[str, float]:
    if not spec:
        return {}
    peak: dict[str, float] = {}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        dt = parse_dtypes(name)[0] if name.strip() else None
        try:
            gflops = float(value)
        except ValueError:
            gflops = -1.0
        if dt is None or gflops <= 0:
            raise ValueError(f"bad --peak {spec!r}: expected e.g. fp32=524,bf16=971")
        peak[C.DTYPE_NAMES[dt]] = gflops
    return peak


def write_markdown(
    path: str, section: str, table: str, info: dict[str, Any], image: str | None
) -> None:
    """Section ``section`` of the Markdown file ``path``: the command, the ``--plot`` image
    (linked relative to ``path``) when there is one, and the table."""
    parts = [f"Made with `{info['command']}` on {info['date']}."]
    if image:
        rel = os.path.relpath(os.path.abspath(image), os.path.dirname(os.path.abspath(path)))
        parts.append(f"![fastattn-bench {section}]({rel.replace(os.sep, '/')})")
    mdsection.write_section(path, section, "\n\n".join([*parts, table]))


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fastattn-bench`` command; returns the exit status: 0 ok, 1 check failed, 2 usage."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.markdown in C.REGISTRY and not os.path.exists(args.markdown):
        args.ops.insert(0, args.markdown)  # `--markdown OP ...`: a bare --markdown, then OPS
        args.markdown = "-"
    try:
        if args.section is not None:
            mdsection.check_name(args.section)
        if args.plot:
            plot.require()
        opts = C.Options(
            quick=args.quick,
            dtypes=parse_dtypes(args.dtype),
            device=args.device,
            backend=args.backend,
            shapes=parse_shapes(args.shape),
            compile=args.compile,
            runtimes=args.runtimes,
            peak_gflops=parse_peak(args.peak),
        )
        case_list = C.build(args.ops, opts)
    except (ValueError, RuntimeError) as e:
        print(f"fastattn-bench: error: {e}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastattn-bench: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    for kw in args.keyword:  # each -k must match; its comma-separated parts are alternatives
        alts = [a.strip().lower() for a in kw.split(",") if a.strip()]
        case_list = [c for c in case_list if any(a in c.id.lower() for a in alts)]
    if not case_list:
        print(f"fastattn-bench: error: no case id contains {args.keyword}", file=sys.stderr)
        return 2
    device = torch.device(args.device)

    threads = args.threads or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    )
    torch.set_num_threads(threads)
    if device.type == "cuda":
        alloc = "n/a (CUDA caching allocator)"
        timer = "CUDA events around each call, synchronised"
    else:
        alloc = timing.set_alloc_mode(args.alloc)
        timer = "time.perf_counter around each call"
    budget = timing.Budget.quick() if args.quick else timing.Budget()
    if args.min_time is not None:
        budget.min_time_s = args.min_time
    # CPU limits only: on CUDA the % columns stay empty unless --peak is given
    lim = limits.get(threads, args.remeasure) if device.type == "cpu" else None
    peak = {**(lim.peak_gflops() if lim else {}), **opts.peak_gflops}
    for case in case_list:
        if case.flops:
            case.peak_gflops = peak.get(case.dtype_str, math.nan)
    info = report.machine_info(argv, device, threads, lim)
    compute = any(c.flops or c.tokens for c in case_list)
    for line in report.header_lines(info, alloc, args.flush, timer, compute):
        print(line)
    print()
    print(report.table_header(compute), flush=True)

    # on a terminal only, and not when the JSON file is the only output asked for
    show = sys.stderr.isatty() and not (args.json and not sys.stdout.isatty())
    bar = progress.Progress(len(case_list), sys.stderr, enabled=show)
    rows: list[report.Row] = []
    for case in case_list:
        bar.start(case.id)
        case_rows = runner.run_case(
            case, device, budget, args.flush, lim.copy_gbps if lim else math.nan
        )
        bar.finish_case()
        bar.clear()
        rows += case_rows
        print(report.table_rows(case_rows, compute), flush=True)
        for r in case_rows:
            if not r.check_ok:
                print(f"!! {case.id} {r.impl}: {r.check}", file=sys.stderr, flush=True)
    bar.close()
    bad = [r for r in rows if not r.check_ok and not r.tolerated]
    if args.markdown == "-":
        print()
        print(report.markdown(rows, info))
    if args.json:
        doc = {
            "machine": info,
            "config": {**vars(args), "alloc": alloc, "timer": timer, "budget": vars(budget)},
            "agreement": {
                "ok": not bad,
                "failures": [f"{r.variant} {r.impl}: {r.check}" for r in bad],
            },
            "rows": [r.as_dict() for r in rows],
        }
        parent = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(parent, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, default=str)
        print(f"\nwrote {len(rows)} rows to {args.json}")
    if args.plot:
        n = plot.write_plot(args.plot, rows, lim.copy_gbps if lim else math.nan, peak)
        print(f"\nwrote {n} plot panel(s) to {args.plot}")
    if args.markdown and args.markdown != "-":
        section = args.section or "-".join(dict.fromkeys(c.op for c in case_list))
        write_markdown(args.markdown, section, report.markdown(rows, info), info, args.plot)
        print(f"\nwrote section {section} of {args.markdown}")
    if bad:
        print(
            f"\n!! AGREEMENT CHECK FAILED: {len(bad)} of {len(rows)} result(s) disagree with the "
            "float64 reference or failed to run (rows marked MISMATCH / ERROR above)",
            file=sys.stderr,
        )
        return 1
    inexact = sum(r.tolerated for r in rows)
    print(
        f"\nagreement check passed: {len(rows)} results within tolerance of the float64 reference"
        if not inexact
        else f"\nagreement check passed: {len(rows) - inexact} of {len(rows)} results within "
        f"tolerance of the float64 reference; {inexact} peer result(s) known to be inexact"
    )
    return 0
