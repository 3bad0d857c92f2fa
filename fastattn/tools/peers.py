"""The implementations fastattn is compared with, each built from the same weights.

Every builder returns a zero-argument callable that runs one forward pass on
inputs prepared in the peer's own layout (preparation is not timed), or raises
``PeerUnavailable`` when the peer's library is not installed.  Peers:

* ``numpy``: the seed's formulation in plain NumPy (always available);
* ``torch-mha``: ``torch.nn.MultiheadAttention`` (eval, inference mode,
  ``need_weights=False``: its CPU fast path); ``torch-sdpa``:
  ``F.scaled_dot_product_attention`` (core only);
* ``ort-attention``: ONNX Runtime's ``com.microsoft.Attention`` op plus the
  output projection (full forward); ``ort-mha``: its
  ``com.microsoft.MultiHeadAttention`` op (core only);
* ``ov-mhsa``: an OpenVINO graph of the forward (MatMul projections, heads
  split by Reshape/Transpose, the ScaledDotProductAttention op, heads merged,
  MatMul output projection); ``ov-sdpa``: ScaledDotProductAttention alone.

The builders take a ``dtype``: "float32" (every peer) or "bfloat16" (the
peers in ``PEERS["bfloat16"]``: torch in ``torch.bfloat16`` and OpenVINO with
bf16 inference precision).  A bfloat16 peer is handed float32 arrays holding
bfloat16 values (weights and inputs), so the conversion is exact; it takes
bfloat16 inputs and returns a bfloat16 array (``ml_dtypes.bfloat16``), the
contract of fastattn's own bfloat16 path.

torch, onnxruntime, openvino and ml_dtypes are imported only when their peers
are built.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np

from .numpy_seed import mhsa_numpy, sdpa_numpy

FULL_PEERS = ("numpy", "torch-mha", "ort-attention", "ov-mhsa")
CORE_PEERS = ("numpy", "torch-sdpa", "ort-mha", "ov-sdpa")
# (full-forward peers, core peers) of each table the bench prints; the numpy
# and ONNX Runtime peers have no bfloat16 path worth timing
PEERS = {
    "float32": (FULL_PEERS, CORE_PEERS),
    "bfloat16": (("torch-mha", "ov-mhsa"), ("torch-sdpa", "ov-sdpa")),
}
DTYPES = tuple(PEERS)
OV_PRECISION = {"float32": "f32", "bfloat16": "bf16"}  # INFERENCE_PRECISION_HINT values
ONNX_IR_VERSION = 8  # what opset 17 needs (onnx 1.12 wrote it; IR 8 came with opset 15)


class PeerUnavailable(Exception):
    """The peer's library is not installed (or cannot run this case)."""


def _torch():
    try:
        import torch
    except ImportError:
        raise PeerUnavailable("torch is not installed") from None
    return torch


def _ort():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise PeerUnavailable("onnxruntime and onnx are not installed") from None
    return onnx, onnxruntime


def _bf16():
    try:
        import ml_dtypes
    except ImportError:
        raise PeerUnavailable("ml_dtypes is not installed (numpy's bfloat16)") from None
    return ml_dtypes.bfloat16


def _check_dtype(name: str, dtype: str) -> None:
    if dtype not in PEERS:
        raise ValueError(f"unknown dtype {dtype!r}; known: {DTYPES}")
    if name not in PEERS[dtype][0] + PEERS[dtype][1]:
        raise PeerUnavailable(f"{name} has no {dtype} path here")


def _torch_input(a: np.ndarray, dtype: str):
    torch = _torch()
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return t.to(torch.bfloat16) if dtype == "bfloat16" else t


def _torch_output(t, dtype: str) -> np.ndarray:
    """A torch result as numpy without a copy; bfloat16 by reinterpreting its bits
    (numpy cannot hold torch.bfloat16)."""
    if dtype == "bfloat16":
        torch = _torch()
        return t.view(torch.int16).numpy().view(_bf16())
    return t.numpy()


def _ov():
    try:
        import openvino
    except ImportError:
        raise PeerUnavailable("openvino is not installed") from None
    try:
        from openvino import opset13  # the first opset with ScaledDotProductAttention
    except ImportError:
        try:  # where releases before the openvino.runtime namespace was retired keep it
            from openvino.runtime import opset13
        except ImportError:
            raise PeerUnavailable(f"openvino {openvino.__version__} has no opset13") from None
    return openvino, opset13


def _ov_request(params, result, num_threads: int, dtype: str):
    """An infer request for the graph params -> result, compiled for the CPU at
    the precision and thread count of the run."""
    ov, _ = _ov()
    model = ov.Model([result.output(0)], params, "fastattn_peer")
    want = OV_PRECISION[dtype]
    compiled = ov.Core().compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": want,
        "INFERENCE_NUM_THREADS": num_threads,
        # one stream and the latency hint: a call uses all its threads on one request,
        # as fastattn's does
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
    })
    # on a CPU without bf16 instructions the plugin falls back to f32 and says so
    # here: a "bf16" row would then time f32 work
    got = compiled.get_property("INFERENCE_PRECISION_HINT")
    if got != getattr(ov.Type, want):
        raise PeerUnavailable(f"OpenVINO runs {got}, not {want}, on this CPU")
    return compiled.create_infer_request()


def _ov_run(request, arrays, dtype: str) -> Callable[[], np.ndarray]:
    """A callable running ``request`` on ``arrays`` (float32, holding bfloat16
    values for "bfloat16"), which it reads in place: prepared once, here."""
    if dtype == "float32":
        feed = [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]
        return lambda: request.infer(feed, share_inputs=True, share_outputs=True)[0]
    ov, _ = _ov()
    bf16 = _bf16()
    # an ov.Tensor made over a numpy array shares its memory: bf16 inputs in place,
    # from the bits of ml_dtypes' bfloat16 (openvino knows no ml_dtypes type)
    tensors = [ov.Tensor(np.ascontiguousarray(a, dtype=np.float32).astype(bf16).view(np.uint16),
                         list(np.shape(a)), ov.Type.bf16) for a in arrays]

    def run():
        out = request.infer(tensors, share_inputs=True, share_outputs=True)[0]
        # openvino hands bf16 outputs to numpy as a 2-byte dtype of its choosing
        # (float16 today): the bits are bfloat16's
        return out.view(np.uint16).view(bf16)

    return run


def _ort_session(model, num_threads: int):
    onnx, ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = num_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(
        model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )


def _onnx_model(nodes, inputs, outputs, initializers):
    onnx, _ = _ort()
    from onnx import helper

    graph = helper.make_graph(nodes, "fastattn_peer", inputs, outputs, initializer=initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    # make_model stamps the installed onnx's newest IR version, which an older
    # onnxruntime refuses (onnx 1.23 writes 14, onnxruntime 1.30 reads up to 13).
    # Opset 17 only needs IR 8, which every onnxruntime we accept (>= 1.16) reads.
    model.ir_version = ONNX_IR_VERSION
    return model


# ---- full forward ----------------------------------------------------------

def full_peer(name: str, module, x: np.ndarray, num_threads: int,
              dtype: str = "float32") -> Callable[[], np.ndarray]:
    """A callable running the full MHSA forward of ``module`` on ``x`` with peer ``name``,
    computing in ``dtype``."""
    if name not in FULL_PEERS:
        raise ValueError(f"unknown full-forward peer {name!r}; known: {FULL_PEERS}")
    _check_dtype(name, dtype)
    if name == "numpy":
        return lambda: mhsa_numpy(module, x)
    if module.num_kv_heads != module.num_heads or not module.bias:
        raise PeerUnavailable(f"{name} compares modules with biases and no grouped-query heads")
    sd = module.state_dict()  # one weight set, in torch's stacked layout below
    w_qkv = np.concatenate([sd["w_q"], sd["w_k"], sd["w_v"]])
    b_qkv = np.concatenate([sd["b_q"], sd["b_k"], sd["b_v"]])
    if name == "torch-mha":
        torch = _torch()
        torch.set_num_threads(num_threads)
        D, H = module.d_model, module.num_heads
        t_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        t = torch.nn.MultiheadAttention(D, H, batch_first=True, dtype=t_dtype).eval()
        t.load_state_dict({  # copied into t_dtype parameters
            "in_proj_weight": torch.from_numpy(w_qkv.astype(np.float32)),
            "in_proj_bias": torch.from_numpy(b_qkv.astype(np.float32)),
            "out_proj.weight": torch.from_numpy(sd["w_o"].astype(np.float32)),
            "out_proj.bias": torch.from_numpy(sd["b_o"].astype(np.float32)),
        })
        xt = _torch_input(x, dtype)

        def run():
            with torch.inference_mode():
                return _torch_output(t(xt, xt, xt, need_weights=False)[0], dtype)

        return run
    if name == "ort-attention":
        onnx, _ = _ort()
        from onnx import TensorProto, helper, numpy_helper

        D, H = module.d_model, module.num_heads
        inits = [
            numpy_helper.from_array(np.ascontiguousarray(w_qkv.T, np.float32), "w_qkv"),
            numpy_helper.from_array(b_qkv.astype(np.float32), "b_qkv"),
            numpy_helper.from_array(np.ascontiguousarray(sd["w_o"].T, np.float32), "w_o"),
            numpy_helper.from_array(sd["b_o"].astype(np.float32), "b_o"),
        ]
        nodes = [
            helper.make_node("Attention", ["x", "w_qkv", "b_qkv"], ["attn"], domain="com.microsoft",
                             num_heads=H),
            helper.make_node("MatMul", ["attn", "w_o"], ["proj"]),
            helper.make_node("Add", ["proj", "b_o"], ["y"]),
        ]
        model = _onnx_model(
            nodes,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "N", D])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "N", D])],
            inits,
        )
        sess = _ort_session(model, num_threads)
        feed = {"x": np.ascontiguousarray(x, dtype=np.float32)}
        return lambda: sess.run(None, feed)[0]
    if name == "ov-mhsa":
        return _ov_mhsa(module, sd, x, num_threads, dtype)
    raise AssertionError(name)  # a name in FULL_PEERS without a builder


def _ov_mhsa(module, sd, x: np.ndarray, num_threads: int, dtype: str):
    """OpenVINO's MHSA forward as a graph of its own ops, holding ``sd``'s weights."""
    ov, ops = _ov()
    B, N, D = x.shape
    H = module.num_heads
    E = D // H
    et = getattr(ov.Type, OV_PRECISION[dtype])

    def const(name):
        c = ops.constant(np.ascontiguousarray(sd[name], dtype=np.float32))
        # constant folding makes this a bf16 constant: no conversion runs per call
        return c if dtype == "float32" else ops.convert(c, et)

    def linear(inp, w, b):  # inp @ w.T + b, w in the (out, in) layout
        return ops.add(ops.matmul(inp, const(w), False, True), const(b))

    def heads(t):  # (B, N, D) -> (B, H, N, E)
        return ops.transpose(ops.reshape(t, np.array([B, N, H, E], np.int64), False),
                             np.array([0, 2, 1, 3], np.int64))

    xp = ops.parameter([B, N, D], et, name="x")
    q, k, v = (heads(linear(xp, f"w_{c}", f"b_{c}")) for c in "qkv")
    attn = ops.scaled_dot_product_attention(q, k, v)  # scale defaults to 1/sqrt(E)
    merged = ops.reshape(ops.transpose(attn, np.array([0, 2, 1, 3], np.int64)),
                         np.array([B, N, D], np.int64), False)
    y = linear(merged, "w_o", "b_o")
    return _ov_run(_ov_request([xp], y, num_threads, dtype), [x], dtype)


# ---- attention core ----------------------------------------------------------

def core_peer(name: str, q: np.ndarray, k: np.ndarray, v: np.ndarray, num_threads: int,
              is_causal: bool = False, dtype: str = "float32") -> Callable[[], np.ndarray]:
    """A callable computing softmax(q k^T / sqrt(E)) v on (B, H, L, E) inputs with peer
    ``name`` in ``dtype``; its result comes back in (B, H, Lq, E) layout."""
    if name not in CORE_PEERS:
        raise ValueError(f"unknown core peer {name!r}; known: {CORE_PEERS}")
    _check_dtype(name, dtype)
    B, H, Lq, E = q.shape
    if name == "numpy":
        if is_causal:
            raise PeerUnavailable("the numpy formulation here has no causal mask")
        return lambda: sdpa_numpy(q, k, v)
    if name == "torch-sdpa":
        torch = _torch()
        torch.set_num_threads(num_threads)
        qt, kt, vt = (_torch_input(a, dtype) for a in (q, k, v))

        def run():
            with torch.inference_mode():
                return _torch_output(torch.nn.functional.scaled_dot_product_attention(
                    qt, kt, vt, is_causal=is_causal), dtype)

        return run
    if name == "ort-mha":
        onnx, _ = _ort()
        from onnx import TensorProto, helper

        if is_causal:
            raise PeerUnavailable("ort-mha is compared without masks")
        # MultiHeadAttention takes (B, L, H*E) inputs: lay them out before timing
        def bsd(a):
            return np.ascontiguousarray(a.transpose(0, 2, 1, 3).reshape(a.shape[0], a.shape[2], -1))

        node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"],
                                domain="com.microsoft", num_heads=H)
        model = _onnx_model(
            [node],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", "L", H * E])
             for n in ("q", "k", "v")],
            [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["B", "L", H * E])],
            [],
        )
        sess = _ort_session(model, num_threads)
        feed = {"q": bsd(q), "k": bsd(k), "v": bsd(v)}

        def run():
            o = sess.run(None, feed)[0]
            return o.reshape(B, Lq, H, E).transpose(0, 2, 1, 3)

        return run
    if name == "ov-sdpa":
        ov, ops = _ov()
        Lk = k.shape[2]
        if is_causal and Lq != Lk:
            # its causal mask is aligned top-left, fastattn's bottom-right: they
            # agree only on square score matrices
            raise PeerUnavailable("ov-sdpa is compared causal only with as many queries as keys")
        et = getattr(ov.Type, OV_PRECISION[dtype])
        params = [ops.parameter(list(a.shape), et, name=n) for n, a in zip("qkv", (q, k, v))]
        o = ops.scaled_dot_product_attention(*params, causal=is_causal)
        return _ov_run(_ov_request(params, o, num_threads, dtype), (q, k, v), dtype)
    raise AssertionError(name)  # a name in CORE_PEERS without a builder


def available(names, builder, *args, **kwargs) -> Tuple[Dict[str, Callable], List[str]]:
    """Build every peer that can run here: ({name: callable}, [skip reasons])."""
    built, skipped = {}, []
    for name in names:
        try:
            built[name] = builder(name, *args, **kwargs)
        except PeerUnavailable as exc:
            skipped.append(f"{name}: {exc}")
    return built, skipped
