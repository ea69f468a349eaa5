"""Step 4 of `make gpu-check`: every fastattn op on every GPU backend against its torch peer.

Each case checks every implementation's output against a float32 (attention: float64-accumulated
SDPA math) reference first, then times it with ``triton.testing.do_bench`` (median; CUDA events
when Triton is missing) and reports TFLOP/s (attention) or GB/s (the row ops: bytes read once and
written once; the paged decode: its keys and values read once) with the percentage of the
device's peak from ``PEAKS``. Peers: SDPA on its flash and efficient backends (the paged decode:
SDPA on the dense padded cache), ``F.layer_norm``, ``F.rms_norm``, ``torch.softmax``, eager
add + norm, and flash-attn (its ``flash_attn_with_kvcache`` for the paged decode), Liger-Kernel
and xformers when importable.

Rows are written to ``--out`` after every case, so a run stopped by its time limit keeps what it
measured. Usage: ``python tools/gpu_bench.py --out DIR/bench.json --budget 90``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

# Dense (no structured sparsity) tensor-core and CUDA-core peaks, TFLOP/s, and memory bandwidth,
# GB/s, per device name as torch reports it. Source: NVIDIA's datasheets (H200: "NVIDIA H200
# Tensor Core GPU" datasheet, 2024; H100: "NVIDIA H100 Tensor Core GPU" datasheet, 2023; A100:
# "NVIDIA A100 Tensor Core GPU" datasheet, 2021): their bf16/fp16 figures are quoted with sparsity,
# halved here. The most specific name comes first (a "H100 PCIe" must not match "H100").
PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0, "gbs": 4800}),
    ("H200", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0, "gbs": 4800}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0, "gbs": 3900}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0, "gbs": 2000}),
    ("H100", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0, "gbs": 3350}),
    ("A100 80GB PCIe", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5, "gbs": 1935}),
    ("A100-SXM4-80GB", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5, "gbs": 2039}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5, "gbs": 1555}),
]
PEAK_SOURCE = "NVIDIA datasheets (dense: the sparsity figures halved); see tools/gpu_bench.py"


def peaks_for(name: str) -> tuple[str, dict[str, float]] | None:
    """The ``PEAKS`` entry whose key occurs in the device name ``name``, most specific first."""
    for key, peaks in PEAKS:
        if key.lower() in name.lower():
            return key, peaks
    return None


def flop_peak(peaks: dict[str, float] | None, dtype: str) -> float | None:
    """Peak TFLOP/s for attention in ``dtype`` (fp32 matmuls run on the CUDA cores: no TF32)."""
    return None if peaks is None else peaks.get(dtype)


def percent(value: float | None, peak: float | None) -> float | None:
    if value is None or not peak:
        return None
    return 100.0 * value / peak


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def _timer() -> Callable[[Callable[[], Any]], float]:
    """Median milliseconds of one call: triton's do_bench, else CUDA events around 50 calls."""
    import torch

    testing = _optional("triton.testing")
    if testing is not None:
        return lambda fn: float(testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))

    def events(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(50):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]

    return events


# --------------------------------------------------------------------------------- the cases
def attention_cases(torch: Any, F: Any, fastattn: Any) -> list[dict[str, Any]]:
    """(batch, heads, seqlen, head_dim) forward and forward+backward, causal and not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flash_attn, xops = _optional("flash_attn"), _optional("xformers.ops")
    cases = []
    for B, H, S, D in [(4, 16, 2048, 64), (2, 16, 4096, 128)]:
        for dtype in ("bf16", "fp16"):
            for causal in (False, True):
                for bwd in (False, True):
                    dt = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype])
                    mk = lambda dt=dt, B=B, H=H, S=S, D=D: torch.randn(  # noqa: E731
                        B, H, S, D, device="cuda", dtype=dt
                    )
                    q, k, v = mk(), mk(), mk()

                    def sdpa(b: Any, causal: bool = causal) -> Callable[..., Any]:
                        def run(*qkv: Any) -> Any:
                            with sdpa_kernel(b):
                                return F.scaled_dot_product_attention(*qkv, is_causal=causal)

                        return run

                    impls: dict[str, Callable[..., Any]] = {
                        **{
                            f"fastattn[{be}]": (
                                lambda q, k, v, c=causal, be=be: fastattn.attention(
                                    q, k, v, causal=c, backend=be
                                )
                            )
                            for be in ("triton", "cuda")
                        },
                        "SDPA flash": sdpa(SDPBackend.FLASH_ATTENTION),
                        "SDPA efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
                    }
                    if flash_attn is not None:  # (B, S, H, D) layout
                        impls["flash-attn"] = lambda q, k, v, c=causal: flash_attn.flash_attn_func(
                            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=c
                        ).transpose(1, 2)
                    if xops is not None and not causal:
                        impls["xformers"] = lambda q, k, v: xops.memory_efficient_attention(
                            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                        ).transpose(1, 2)
                    flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0) * (3.5 if bwd else 1)
                    cases.append({
                        "op": "attention", "shape": f"{B}x{H}x{S}x{D}", "dtype": dtype,
                        "variant": ("causal " if causal else "") + ("fwd+bwd" if bwd else "fwd"),
                        "inputs": (q, k, v), "impls": impls, "bwd": bwd, "flops": flops,
                        "ref": lambda q, k, v, c=causal: F.scaled_dot_product_attention(
                            q.float(), k.float(), v.float(), is_causal=c),
                    })  # fmt: skip
    return cases


def paged_cases(torch: Any, F: Any, fastattn: Any) -> list[dict[str, Any]]:
    """A decode step on a paged KV cache (the CPU bench's shape: 32 sequences of 256-8192 keys,
    GQA 32/8, head_dim 128), blocks of 256 (flash-attn's kvcache needs a multiple of 256), vs
    SDPA over the same keys as a dense cache padded to the longest (GB/s: K and V read once)."""
    flash_attn = _optional("flash_attn")
    B, H, Hkv, D, bs = 32, 32, 8, 128, 256
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(256, 8193, (B,), generator=g).to(torch.int32)
    need = (lens + bs - 1) // bs
    table = torch.randperm(int(need.sum()), generator=g).to(torch.int32)
    rows = torch.zeros(B, int(need.max()), dtype=torch.int32)
    start = 0
    for b, n in enumerate(need.tolist()):
        rows[b, :n] = table[start : start + n]
        start += n
    cases = []
    for dtype in ("bf16", "fp16"):
        dt = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype])
        kc = torch.randn(start, bs, Hkv, D, device="cuda", dtype=dt)
        vc = torch.randn(start, bs, Hkv, D, device="cuda", dtype=dt)
        q = torch.randn(B, 1, H, D, device="cuda", dtype=dt)
        bt, sl = rows.cuda(), lens.cuda()
        L = int(lens.max())
        # The dense padded cache (B, Hkv, L, D) and its key padding: built once, outside timing.
        dk = kc[bt.long()].flatten(1, 2)[:, :L].transpose(1, 2).contiguous()
        dv = vc[bt.long()].flatten(1, 2)[:, :L].transpose(1, 2).contiguous()
        pad = (torch.arange(L, device="cuda") < sl[:, None])[:, None, None]  # (B, 1, 1, L)
        impls: dict[str, Callable[..., Any]] = {
            f"fastattn[{be}]": (lambda q, kc, vc, bt, sl, be=be: fastattn.paged_attention(
                q, kc, vc, bt, sl, backend=be))
            for be in ("triton", "cuda")
        }  # fmt: skip

        def dense(q: Any, *_: Any, dk: Any = dk, dv: Any = dv, pad: Any = pad) -> Any:
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), dk, dv, attn_mask=pad, enable_gqa=True
            ).transpose(1, 2)

        impls["SDPA (dense padded)"] = dense
        if flash_attn is not None:
            impls["flash-attn kvcache"] = lambda q, kc, vc, bt, sl: (
                flash_attn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=sl, block_table=bt)
            )
        cases.append({
            "op": "paged_attention", "shape": f"{B}x{H}/{Hkv}x{L}x{D} bs{bs}", "dtype": dtype,
            "variant": "decode", "inputs": (q, kc, vc, bt, sl), "impls": impls, "bwd": False,
            "bytes": int(lens.sum()) * Hkv * D * 2 * kc.element_size(),
            "ref": lambda q, *_, f=dense, k=dk, v=dv: f(q.float(), dk=k.float(), dv=v.float()),
        })  # fmt: skip
    return cases


def row_cases(torch: Any, F: Any, fastattn: Any) -> list[dict[str, Any]]:
    """softmax, LayerNorm, RMSNorm and add+RMSNorm on (rows, hidden), forward and fwd+bwd."""
    liger = _optional("liger_kernel.transformers.functional")
    cases = []
    for rows, n in [(16384, 4096), (4096, 32768)]:
        for dtype in ("bf16", "fp16"):
            dt = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype])
            x = torch.randn(rows, n, device="cuda", dtype=dt)
            r = torch.randn(rows, n, device="cuda", dtype=dt)
            w = torch.rand(n, device="cuda", dtype=dt) + 0.5
            b = torch.randn(n, device="cuda", dtype=dt)
            for op, inputs, impls, ref, passes in _row_specs(torch, F, fastattn, liger, x, r, w, b):
                for bwd in (False, True):
                    # bytes: `passes` row-sized tensors read or written once (x3 more with the
                    # backward: dy read, x read again, dx written); weights are negligible.
                    nbytes = rows * n * x.element_size() * (passes + (3 if bwd else 0))
                    cases.append({
                        "op": op, "shape": f"{rows}x{n}", "dtype": dtype,
                        "variant": "fwd+bwd" if bwd else "fwd", "inputs": inputs,
                        "impls": impls, "bwd": bwd, "bytes": nbytes, "ref": ref,
                    })  # fmt: skip
    return cases


RowSpec = tuple[str, tuple, dict[str, Callable[..., Any]], Callable[..., Any], int]


def _row_specs(torch: Any, F: Any, fastattn: Any, liger: Any, *xrwb: Any) -> list[RowSpec]:
    """(op, inputs, impls, fp32 reference, row-sized tensors moved) of each row op."""
    x, r, w, b = xrwb
    n = x.shape[-1]
    specs: list[RowSpec] = [
        ("softmax", (x,), {
            "torch.softmax": lambda x: torch.softmax(x, -1),
            **{f"fastattn[{be}]": (lambda x, be=be: fastattn.softmax(x, backend=be))
               for be in ("triton", "cuda")},
        }, lambda x: torch.softmax(x.float(), -1), 2),
        ("layer_norm", (x, w, b), {
            "F.layer_norm": lambda x, w, b: F.layer_norm(x, (n,), w, b),
            **{f"fastattn[{be}]": (lambda x, w, b, be=be: fastattn.layer_norm(
                x, n, w, b, backend=be)) for be in ("triton", "cuda")},
        }, lambda x, w, b: F.layer_norm(x.float(), (n,), w.float(), b.float()), 2),
        ("rms_norm", (x, w), {
            "F.rms_norm": lambda x, w: F.rms_norm(x, (n,), w),
            **{f"fastattn[{be}]": (lambda x, w, be=be: fastattn.rms_norm(
                x, n, w, backend=be)) for be in ("triton", "cuda")},
        }, lambda x, w: F.rms_norm(x.float(), (n,), w.float()), 2),
        ("add_rms_norm", (x, r, w), {
            "eager add + F.rms_norm": lambda x, r, w: F.rms_norm(x + r, (n,), w),
            **{f"fastattn[{be}]": (lambda x, r, w, be=be: fastattn.rms_norm(
                x, n, w, residual=r, backend=be)[0]) for be in ("triton", "cuda")},
        }, lambda x, r, w: F.rms_norm((x + r).float(), (n,), w.float()), 4),
    ]  # fmt: skip
    if liger is not None and hasattr(liger, "liger_rms_norm"):
        specs[2][2]["Liger rms_norm"] = lambda x, w: liger.liger_rms_norm(x, w, 1e-6)
    if liger is not None and hasattr(liger, "liger_layer_norm"):
        specs[1][2]["Liger layer_norm"] = lambda x, w, b: liger.liger_layer_norm(x, w, b, 1e-5)
    return specs


# ------------------------------------------------------------------------------ measurement
def measure(case: dict[str, Any], time_ms: Callable[..., float], peaks: Any) -> list[dict]:
    """One row per implementation: the check against the reference, then the median time."""
    import torch

    inputs, rows = case["inputs"], []
    want = case["ref"](*inputs)
    tol = 2e-2 if case["dtype"] in ("bf16", "fp16") else 1e-4
    for impl, fn in case["impls"].items():
        row = {k: case[k] for k in ("op", "shape", "dtype", "variant")} | {"impl": impl}
        try:
            got = fn(*inputs)
            err = (got.float() - want).abs().max().item()
            scale = want.abs().max().item()
            row["max_err"] = err
            row["check"] = "ok" if err <= tol * max(1.0, scale) else "FAIL"
            if case["bwd"]:
                leaves = [t.detach().clone().requires_grad_() for t in inputs]
                g = torch.randn_like(got)
                ms = time_ms(lambda fn=fn, xs=leaves, g=g: torch.autograd.grad(fn(*xs), xs, g))
            else:
                ms = time_ms(lambda fn=fn: fn(*inputs))
            row["ms"] = ms
            if "flops" in case:
                row["tflops"] = case["flops"] / ms / 1e9
                row["pct_peak"] = percent(row["tflops"], flop_peak(peaks, case["dtype"]))
            else:
                row["gbs"] = case["bytes"] / ms / 1e6
                row["pct_peak"] = percent(row["gbs"], peaks.get("gbs") if peaks else None)
        except Exception as exc:  # noqa: BLE001 - a failing impl is a row, not the end
            row["check"], row["error"] = "ERROR", f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
    ours = [r for r in rows if r["impl"].startswith("fastattn")]
    peers = [r for r in rows if not r["impl"].startswith("fastattn") and r.get("ms")]
    best_peer = min((r["ms"] for r in peers), default=None)
    for r in ours:
        if r.get("ms") and best_peer:
            r["vs_best_peer"] = best_peer / r["ms"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file written after every case")
    p.add_argument("--budget", type=float, default=90.0, help="seconds: no case starts later")
    p.add_argument(
        "--ops", default="attention,paged,row", help="comma-separated: attention,paged,row"
    )
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    import fastattn

    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device", file=sys.stderr)
        return 3
    name = torch.cuda.get_device_name()
    match = peaks_for(name)
    peaks = match[1] if match else None
    doc: dict[str, Any] = {
        "device": name, "peaks_key": match[0] if match else None, "peaks": peaks,
        "peak_source": PEAK_SOURCE, "rows": [], "skipped": [],
    }  # fmt: skip
    t0, time_ms = time.monotonic(), _timer()
    builders = {"attention": attention_cases, "paged": paged_cases, "row": row_cases}
    for group in args.ops.split(","):
        for case in builders[group](torch, F, fastattn):
            label = f"{case['op']} {case['shape']} {case['dtype']} {case['variant']}"
            if time.monotonic() - t0 > args.budget:
                doc["skipped"].append(label)
                continue
            print(f"gpu_bench: {label}", flush=True)
            doc["rows"].extend(measure(case, time_ms, peaks))
            with open(args.out, "w") as f:
                json.dump(doc, f, indent=1, default=str)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    bad = [r for r in doc["rows"] if r["impl"].startswith("fastattn") and r["check"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
