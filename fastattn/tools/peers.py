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
  ``com.microsoft.MultiHeadAttention`` op (core only).

torch and onnxruntime are imported only when their peers are built.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np

from .numpy_seed import mhsa_numpy, sdpa_numpy

FULL_PEERS = ("numpy", "torch-mha", "ort-attention")
CORE_PEERS = ("numpy", "torch-sdpa", "ort-mha")
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

def full_peer(name: str, module, x: np.ndarray, num_threads: int) -> Callable[[], np.ndarray]:
    """A callable running the full MHSA forward of ``module`` on ``x`` with peer ``name``."""
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
        t = torch.nn.MultiheadAttention(D, H, batch_first=True, dtype=torch.float32).eval()
        t.load_state_dict({
            "in_proj_weight": torch.from_numpy(w_qkv.astype(np.float32)),
            "in_proj_bias": torch.from_numpy(b_qkv.astype(np.float32)),
            "out_proj.weight": torch.from_numpy(sd["w_o"].astype(np.float32)),
            "out_proj.bias": torch.from_numpy(sd["b_o"].astype(np.float32)),
        })
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

        def run():
            with torch.inference_mode():
                return t(xt, xt, xt, need_weights=False)[0].numpy()

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
    raise ValueError(f"unknown full-forward peer {name!r}; known: {FULL_PEERS}")


# ---- attention core ----------------------------------------------------------

def core_peer(name: str, q: np.ndarray, k: np.ndarray, v: np.ndarray, num_threads: int,
              is_causal: bool = False) -> Callable[[], np.ndarray]:
    """A callable computing softmax(q k^T / sqrt(E)) v on (B, H, L, E) inputs with peer
    ``name``; its result comes back in (B, H, Lq, E) layout."""
    B, H, Lq, E = q.shape
    if name == "numpy":
        if is_causal:
            raise PeerUnavailable("the numpy formulation here has no causal mask")
        return lambda: sdpa_numpy(q, k, v)
    if name == "torch-sdpa":
        torch = _torch()
        torch.set_num_threads(num_threads)
        qt, kt, vt = (torch.from_numpy(np.ascontiguousarray(a)) for a in (q, k, v))

        def run():
            with torch.inference_mode():
                return torch.nn.functional.scaled_dot_product_attention(
                    qt, kt, vt, is_causal=is_causal).numpy()

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
    raise ValueError(f"unknown core peer {name!r}; known: {CORE_PEERS}")


def available(names, builder, *args, **kwargs) -> Tuple[Dict[str, Callable], List[str]]:
    """Build every peer that can run here: ({name: callable}, [skip reasons])."""
    built, skipped = {}, []
    for name in names:
        try:
            built[name] = builder(name, *args, **kwargs)
        except PeerUnavailable as exc:
            skipped.append(f"{name}: {exc}")
    return built, skipped
