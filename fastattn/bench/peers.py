"""onnxruntime and OpenVINO peers: the same ops as whole-graph runtimes run them, forward only.

Each peer builds its graph in memory (``onnx.helper`` / ``openvino.opset*``) and compiles it on
its first call with the case's inputs, which the runner leaves out of the timing (as it does
for ``torch.compile``), at torch's thread count at that moment (onnxruntime
``intra_op_num_threads``, one inter-op thread; OpenVINO ``INFERENCE_NUM_THREADS``, one stream),
fp32 inference precision. Results are checked against the float64 oracle like every other
implementation. A runtime that is not importable, a device other than the CPU, or a dtype a
runtime lacks leaves the peer out, with a reason kept once in :func:`notes`.

Shapes: attention (batch, heads, seqlen, head_dim); softmax and norms (..., cols), last dim
normalised.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import torch

from fastattn.bench.framework import DTYPE_NAMES, Fn, Impl, Inputs, Out

__all__ = ["attention_peers", "norm_peers", "notes", "runtime_versions", "softmax_peers"]

_NOTES: dict[str, None] = {}  # an ordered set: each reason once
_MODULES: dict[str, ModuleType | None] = {}
# Compiled graphs kept alive at once: an older peer drops its graph (and the runtime's buffers)
# and rebuilds it if it is called again, so a long suite does not hold every case's memory.
KEEP_COMPILED = 6
_LIVE: list[_Lazy] = []
ORT_OPSET = 23  # RMSNormalization is an ONNX op from opset 23
# onnxruntime's CPU provider has fp32 and fp16 kernels for these ops, no bf16 ones (its bf16
# Softmax is expanded into ReduceMax etc., which have no bf16 CPU kernel either).
ORT_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}
OV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def notes() -> list[str]:
    """Why peers are absent, and their caveats; each once, in the order first met."""
    return list(_NOTES)


def _note(msg: str) -> None:
    _NOTES.setdefault(msg)


def _module(name: str) -> ModuleType | None:
    if name not in _MODULES:
        try:
            _MODULES[name] = importlib.import_module(name)
        except ImportError as e:  # optional: `pip install fastattn[bench]`
            _MODULES[name] = None
            _note(f"{name} not importable ({type(e).__name__}: {e}): its peers are skipped")
    return _MODULES[name]


def runtime_versions() -> dict[str, str | None]:
    """Versions of the peer runtimes (None: not importable)."""
    out: dict[str, str | None] = {}
    for name in ("onnxruntime", "onnx", "openvino"):
        mod = _module(name)
        # OpenVINO's version carries its build hash after a "-"
        out[name] = None if mod is None else str(getattr(mod, "__version__", "?")).split("-")[0]
    return out


class _Lazy:
    """Compiles on the first call with a given set of inputs, then runs the compiled graph."""

    def __init__(self, build: Callable[[Inputs], Fn]) -> None:
        self._build = build
        self._fn: Fn | None = None
        self._key: tuple[Any, ...] = ()

    def drop(self) -> None:
        self._fn = None

    def __call__(self, inp: Inputs) -> Out:
        key = tuple((k, t.data_ptr(), tuple(t.shape), t.dtype) for k, t in inp.items())
        if self._fn is None or key != self._key:
            self._fn, self._key = self._build(inp), key
            if self in _LIVE:
                _LIVE.remove(self)
            _LIVE.append(self)
            while len(_LIVE) > KEEP_COMPILED:
                _LIVE.pop(0).drop()
        return self._fn(inp)


def _usable(runtime: str, dt: torch.dtype, device: str, dtypes: Any) -> bool:
    """The runtime is importable, the case is on the CPU and the runtime takes ``dt``."""
    mods = ("onnxruntime", "onnx") if runtime == "onnxruntime" else ("openvino",)
    if device != "cpu":
        _note(f"{runtime} peers: CPU only, none for --device {device}")
        return False
    if any(_module(m) is None for m in mods):
        return False
    if dt not in dtypes:
        why = " (its CPU kernels are fp32/fp16)" if runtime == "onnxruntime" else ""
        _note(f"{runtime} peers: none for {DTYPE_NAMES.get(dt, dt)}{why}")
        return False
    return True


# ------------------------------------------------------------------------------ onnxruntime
def _ort_peer(
    name: str,
    dt: torch.dtype,
    graph: Callable[[Inputs, Any], tuple[list[Any], list[tuple[str, tuple[int, ...]]]]],
    keys: tuple[str, ...],
    post: Callable[[list[torch.Tensor], Inputs], Out] = lambda outs, i: (
        outs[0] if len(outs) == 1 else tuple(outs)
    ),
    shared: dict[str, str] | None = None,
) -> Impl:
    """``graph(inputs, elem) -> (nodes, [(output, shape)])`` over inputs named ``keys``.

    Inputs and outputs are bound in place (IOBinding): no copies at the boundary; each output
    is a fresh torch tensor, as torch's ops return, except those ``shared`` with an input
    (output name -> input key: the runtime writes into that input's buffer).
    """
    ort, onnx = _module("onnxruntime"), _module("onnx")
    assert ort is not None and onnx is not None
    h, elem = onnx.helper, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(ORT_DTYPES[dt]))
    npdt, shared = ORT_DTYPES[dt], shared or {}

    def build(inp: Inputs) -> Fn:
        nodes, outs = graph(inp, elem)
        ins = [h.make_tensor_value_info(k, elem, list(inp[k].shape)) for k in keys]
        outs_vi = [h.make_tensor_value_info(n, elem, list(s)) for n, s in outs]
        opsets = [h.make_opsetid("", ORT_OPSET), h.make_opsetid("com.microsoft", 1)]
        model = h.make_model(h.make_graph(nodes, name, ins, outs_vi), opset_imports=opsets)
        model.ir_version = 10  # what this onnxruntime reads; onnx 1.23 would write 11
        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # the impls are timed in turns: spinning workers would steal the cores of the next one
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(
            model.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )

        def run(i: Inputs) -> Out:
            bind = sess.io_binding()
            for k in keys:
                t = i[k].detach()
                if not t.is_contiguous():
                    raise ValueError(f"{name}: input {k} is not contiguous")
                bind.bind_input(k, "cpu", 0, npdt, list(t.shape), t.data_ptr())
            results = []
            for n, shape in outs:
                t = i[shared[n]] if n in shared else torch.empty(shape, dtype=dt)
                results += [] if n in shared else [t]
                bind.bind_output(n, "cpu", 0, npdt, list(shape), t.data_ptr())
            sess.run_with_iobinding(bind)
            return post(results, i)

        return run

    return Impl(name, _Lazy(build))


def _const(h: Any, name: str, vals: list[int], elem: int = 7) -> Any:
    """A Constant node of int64 (elem 7) or int32 (elem 6) values."""
    return h.make_node("Constant", [], [name], value=h.make_tensor(name, elem, [len(vals)], vals))


def _ort_attention(dims: tuple[int, ...], causal: bool, dt: torch.dtype) -> list[Impl]:
    onnx = _module("onnx")
    assert onnx is not None
    h = onnx.helper
    b, nh, hkv, sq, sk, d = dims
    # fastattn's q is (batch, heads, seqlen, head_dim); both ops take it as (B, S, H*D)
    q_nodes = [
        h.make_node("Transpose", ["q"], ["qt"], perm=[0, 2, 1, 3]),
        _const(h, "qshape", [b, sq, nh * d]),
        h.make_node("Reshape", ["qt", "qshape"], ["q3"]),
    ]

    def bhsd(outs: list[torch.Tensor], i: Inputs) -> Out:  # (B, S, H*D) seen as (B, H, S, D)
        return outs[0].view(b, sq, nh, d).transpose(1, 2)

    if nh == hkv:

        def mha(inp: Inputs, elem: Any) -> tuple[list[Any], list[tuple[str, tuple[int, ...]]]]:
            # k, v as (batch, heads, seqlen, head_dim) are taken as they are (BNSH)
            op = h.make_node(
                "MultiHeadAttention", ["q3", "k", "v"], ["o"], domain="com.microsoft",
                num_heads=nh, unidirectional=int(causal),
            )  # fmt: skip
            return [*q_nodes, op], [("o", (b, sq, nh * d))]

        if dt == torch.float16:
            _note("onnxruntime MultiHeadAttention fp16: no fp16 CPU kernel, ORT casts to fp32")
        return [_ort_peer("ORT MultiHeadAttention", dt, mha, ("q", "k", "v"), bhsd)]
    if sq != 1:  # GroupQueryAttention is always causal: it only matches the decode step
        _note("onnxruntime GroupQueryAttention: decode steps (seqlen_q 1) only")
        return []

    def gqa(inp: Inputs, elem: Any) -> tuple[list[Any], list[tuple[str, tuple[int, ...]]]]:
        # The KV cache is k, v themselves (past_key/past_value, BNSH, all Sk positions) and the
        # new token their last position: seqlens_k = Sk - 1 and total_sequence_length = Sk.
        nodes = [*q_nodes, _const(h, "start", [sk - 1]), _const(h, "end", [sk])]
        nodes += [_const(h, "axis", [2]), _const(h, "kvshape", [b, 1, hkv * d])]
        for t in ("k", "v"):
            nodes += [
                h.make_node("Slice", [t, "start", "end", "axis"], [f"{t}1"]),
                h.make_node("Transpose", [f"{t}1"], [f"{t}t"], perm=[0, 2, 1, 3]),
                h.make_node("Reshape", [f"{t}t", "kvshape"], [f"{t}new"]),
            ]
        nodes.append(_const(h, "seqlens_k", [sk - 1] * b, elem=6))
        nodes.append(h.make_node("Constant", [], ["total"], value=h.make_tensor("t", 6, [], [sk])))
        nodes.append(
            h.make_node(
                "GroupQueryAttention",
                ["q3", "knew", "vnew", "k", "v", "seqlens_k", "total"],
                ["o", "present_k", "present_v"],
                domain="com.microsoft",
                num_heads=nh,
                kv_num_heads=hkv,
            )  # fmt: skip
        )
        cache = (b, hkv, sk, d)
        return nodes, [("o", (b, sq, nh * d)), ("present_k", cache), ("present_v", cache)]

    # present shares past's buffer (ORT's in-place KV cache): it writes the new token, which is
    # k's and v's own last position, back where it came from; without it ORT copies the cache.
    _note("onnxruntime GroupQueryAttention: present_key/value bound to past_key/value (in place)")
    shared = {"present_k": "k", "present_v": "v"}
    return [_ort_peer("ORT GroupQueryAttention", dt, gqa, ("q", "k", "v"), bhsd, shared)]


def _ort_one(op: str, ins: list[str], outs: list[str], domain: str = "", **attrs: Any) -> Any:
    """A graph builder of one node whose outputs have x's shape."""

    def graph(inp: Inputs, elem: Any) -> tuple[list[Any], list[tuple[str, tuple[int, ...]]]]:
        onnx = _module("onnx")
        assert onnx is not None
        node = onnx.helper.make_node(op, ins, outs, domain=domain, **attrs)
        return [node], [(n, tuple(inp["x"].shape)) for n in outs if n]

    return graph


# --------------------------------------------------------------------------------- OpenVINO
def _ov_peer(
    name: str,
    dt: torch.dtype,
    graph: Callable[[list[Any], Inputs], list[Any]],
    keys: tuple[str, ...],
    post: Callable[[list[torch.Tensor]], Out] = lambda outs: (
        outs[0] if len(outs) == 1 else tuple(outs)
    ),
) -> Impl:
    """``graph([fp32 input nodes], inputs) -> [fp32 result nodes]`` over the inputs ``keys``.

    Other dtypes are converted to fp32 at the graph's inputs and back at its outputs (inside
    the graph). Inputs are shared with the runtime; outputs are views of its output buffers,
    which the next call overwrites (OpenVINO's own way of returning them).
    """
    ov = _module("openvino")
    assert ov is not None
    et = {torch.float32: ov.Type.f32, torch.bfloat16: ov.Type.bf16, torch.float16: ov.Type.f16}
    op = importlib.import_module("openvino.opset13")

    def build(inp: Inputs) -> Fn:
        params = [op.parameter(list(inp[k].shape), et[dt], name=k) for k in keys]
        f32 = [p if dt == torch.float32 else op.convert(p, ov.Type.f32) for p in params]
        results = [r if dt == torch.float32 else op.convert(r, et[dt]) for r in graph(f32, inp)]
        config = {
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            # explicit: on a CPU with bf16 arithmetic the default precision would be bf16
            "INFERENCE_PRECISION_HINT": "f32",
        }
        compiled = ov.Core().compile_model(ov.Model(results, params, name), "CPU", config)
        req = compiled.create_infer_request()

        def tensor(t: torch.Tensor) -> Any:
            t = t.detach()
            if t.dtype == torch.bfloat16:  # numpy has no bf16: hand over the bits
                return ov.Tensor(t.view(torch.int16).numpy(), list(t.shape), ov.Type.bf16)
            return ov.Tensor(t.numpy(), shared_memory=True)

        def out(j: int) -> torch.Tensor:
            a = req.get_output_tensor(j).data
            if dt == torch.bfloat16:
                return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(a)

        def run(i: Inputs) -> Out:
            req.infer([tensor(i[k]) for k in keys], share_inputs=True, share_outputs=True)
            return post([out(j) for j in range(len(results))])

        return run

    return Impl(name, _Lazy(build))


def _ov_ops() -> Any:
    return importlib.import_module("openvino.opset13")


def _ov_scalar(v: float) -> Any:
    return _ov_ops().constant(np.array(v, dtype=np.float32))


def _ov_const(t: torch.Tensor) -> Any:
    return _ov_ops().constant(t.detach().float().numpy())


def _ov_attention(dims: tuple[int, ...], causal: bool, dt: torch.dtype) -> list[Impl]:
    b, nh, hkv, sq, sk, d = dims
    op = _ov_ops()

    def rep(t: Any) -> Any:  # (B, Hkv, S, D) -> (B, H, S, D): each KV head for its group
        u = op.unsqueeze(t, op.constant(np.array([2], np.int64)))
        u = op.broadcast(u, op.constant(np.array([b, hkv, nh // hkv, sk, d], np.int64)))
        return op.reshape(u, op.constant(np.array([b, nh, sk, d], np.int64)), False)

    def graph(x: list[Any], inp: Inputs) -> list[Any]:
        q, k, v = x
        if nh != hkv:
            k, v = rep(k), rep(v)
        return [op.scaled_dot_product_attention(q, k, v, causal=causal)]

    name = "OV SDPA" if nh == hkv else "OV SDPA (K/V broadcast)"
    if nh != hkv:
        _note("OpenVINO SDPA GQA: K/V heads broadcast to the query heads in the graph")
    return [_ov_peer(name, dt, graph, ("q", "k", "v"))]


def _ov_norm(op_name: str, eps: float, dt: torch.dtype) -> Impl:
    op = _ov_ops()
    rms, residual = "rms" in op_name, op_name.startswith("add-")
    keys = ("x", "r") if residual else ("x",)

    def graph(x: list[Any], inp: Inputs) -> list[Any]:
        # the weights as constants, as in a compiled model: OpenVINO fuses them into MVN / RMS
        hh = op.add(x[0], x[1]) if residual else x[0]
        axis = op.constant(np.array([-1], np.int64))
        if rms:  # the pattern OpenVINO's RMS fusion matches
            ms = op.reduce_mean(op.power(hh, _ov_scalar(2.0)), axis, True)
            inv = op.divide(_ov_scalar(1.0), op.sqrt(op.add(ms, _ov_scalar(eps))))
            y = op.multiply(op.multiply(hh, inv), _ov_const(inp["w"]))
        else:
            y = op.mvn(hh, axis, True, eps, "inside_sqrt")
            y = op.add(op.multiply(y, _ov_const(inp["w"])), _ov_const(inp["b"]))
        return [y, hh] if residual else [y]

    name = ("OV add+" if residual else "OV ") + ("RMS graph" if rms else "mvn+affine")
    return _ov_peer(name, dt, graph, keys)


# ------------------------------------------------------------------------------ public API
def _ov_dtype_note(dt: torch.dtype) -> None:
    if dt != torch.float32:
        _note("OpenVINO bf16/fp16: converted to fp32 at the graph's inputs and back at its outputs")


def attention_peers(
    dims: tuple[int, ...], causal: bool, dt: torch.dtype, device: str
) -> list[Impl]:
    """Forward attention peers for ``dims`` = (B, H, Hkv, Sq, Sk, D) (``cases.attention_dims``);
    q (batch, heads, seqlen_q, head_dim), k and v (batch, kv_heads, seqlen_k, head_dim)."""
    impls: list[Impl] = []
    if _usable("onnxruntime", dt, device, ORT_DTYPES):
        impls += _ort_attention(dims, causal, dt)
    if _usable("openvino", dt, device, OV_DTYPES):
        _ov_dtype_note(dt)
        impls += _ov_attention(dims, causal, dt)
    return impls


def softmax_peers(log: bool, dt: torch.dtype, device: str) -> list[Impl]:
    """Softmax (or log-softmax) over the last dim of ``x``."""
    impls: list[Impl] = []
    op = "LogSoftmax" if log else "Softmax"
    if _usable("onnxruntime", dt, device, ORT_DTYPES):
        impls.append(_ort_peer(f"ORT {op}", dt, _ort_one(op, ["x"], ["y"], axis=-1), ("x",)))
    if _usable("openvino", dt, device, OV_DTYPES):
        _ov_dtype_note(dt)
        fn = _ov_ops().log_softmax if log else importlib.import_module("openvino.opset8").softmax
        name = "OV log_softmax" if log else "OV softmax"
        impls.append(_ov_peer(name, dt, lambda x, i: [fn(x[0], -1)], ("x",)))
    return impls


# norm op -> (ONNX op, its domain, its inputs, its outputs: y, and h = x + residual last)
_ORT_NORMS: dict[str, tuple[str, str, list[str], list[str]]] = {
    "layernorm": ("LayerNormalization", "", ["x", "w", "b"], ["y"]),
    "rmsnorm": ("RMSNormalization", "", ["x", "w"], ["y"]),
    "add-layernorm": ("SkipLayerNormalization", "com.microsoft", ["x", "r", "w", "b"],
                      ["y", "", "", "h"]),
    "add-rmsnorm": ("SkipSimplifiedLayerNormalization", "com.microsoft", ["x", "r", "w"],
                    ["y", "", "", "h"]),
}  # fmt: skip
_ORT_SHORT = {"SkipSimplifiedLayerNormalization": "SkipSimplifiedLN"}


def norm_peers(op: str, eps: float, dt: torch.dtype, device: str) -> list[Impl]:
    """Forward peers of ``op`` (layernorm, rmsnorm, add-layernorm, add-rmsnorm): inputs x,
    residual r, weight w, bias b; outputs y, or (y, h = x + r)."""
    impls: list[Impl] = []
    if _usable("onnxruntime", dt, device, ORT_DTYPES):
        node, domain, ins, outs = _ORT_NORMS[op]
        attrs: dict[str, Any] = {"epsilon": eps} | ({} if domain else {"axis": -1})
        graph = _ort_one(node, ins, outs, domain, **attrs)
        impls.append(_ort_peer(f"ORT {_ORT_SHORT.get(node, node)}", dt, graph, tuple(ins)))
    if _usable("openvino", dt, device, OV_DTYPES):
        _ov_dtype_note(dt)
        impls.append(_ov_norm(op, eps, dt))
    return impls
