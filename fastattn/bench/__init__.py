"""``fastattn-bench``: time fastattn's ops against their PyTorch peers on the same inputs.

For every case (op, shape, dtype, variant) each implementation (fastattn; eager PyTorch,
torch.compile, and onnxruntime and OpenVINO when installed) runs once and is checked against
a float64 oracle; a disagreement is reported and makes the exit code 1. Then each is warmed up
and timed call by call (median and IQR). Cases are defined in :mod:`fastattn.bench.cases`.

Examples::

    fastattn-bench                              # the default suite (softmax, norms), fp32+bf16
    fastattn-bench softmax --quick --markdown   # small shapes, plus a Markdown table
    fastattn-bench softmax --shape 8192x4096 --dtype fp32 --alloc reuse -k bias
    fastattn-bench add-rmsnorm -k fwd+bwd       # fused residual add + RMSNorm, with backward
    fastattn-bench attention --shape 1x8x2048x64,1x32x8x1x8192x128 --peak fp32=524,bf16=971
    fastattn-bench layernorm --no-runtimes      # without the onnxruntime / OpenVINO peers
    fastattn-bench softmax --remeasure          # measure the machine's limits again
    fastattn-bench softmax --plot out.png --markdown docs/results.md   # a plot; a file section
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fastattn-bench`` command (:func:`fastattn.bench.cli.main`): exit status 0 ok, 1 a
    check failed, 2 usage. Imported on call, so that importing a submodule of fastattn.bench
    loads only what that submodule needs."""
    from fastattn.bench.cli import main as cli_main

    return cli_main(argv)
