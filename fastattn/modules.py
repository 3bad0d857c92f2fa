"""MultiHeadSelfAttention: weights, initialisation, head split, projections.

The forward pass, in order:

1. one GEMM projects x to Q, K and V together, into a (B*N, D + 2*Dkv) buffer;
2. Q, K and V are strided *views* of that buffer with shape (B, heads, N, E):
   the kernel reads them in place, no per-head copies;
3. the kernel writes its output straight into a (B, N, H*E) buffer (the
   merged-heads layout), so no transpose follows;
4. one GEMM applies the output projection.

The GEMMs are fastattn's own (``_kernels.linear``), on weights packed once per
weight change, and run on the same OpenMP threads as the attention kernel.
Because the packed copy must follow the weights, the parameter arrays handed
out (``m.w_q`` ...) are read-only views: change weights by assignment
(``m.w_q = new``), ``load_state_dict`` or ``reset_parameters``.
"""

from __future__ import annotations

import json
import math
import os
import threading
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from . import interop, threads
from ._dispatch import kernels
from .functional import (
    _shape_str,
    as_float_array,
    attention_into,
    kernel_ready as kernel_rows,
    prepare_mask,
)

__all__ = ["MultiHeadSelfAttention"]

_FORMAT = "fastattn.MultiHeadSelfAttention/1"
_WEIGHT_NAMES = ("w_q", "w_k", "w_v", "w_o")
_BIAS_NAMES = ("b_q", "b_k", "b_v", "b_o")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _float_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


class MultiHeadSelfAttention:
    """Multi-head self-attention over NumPy arrays, like the PyTorch class it mirrors.

    ``y = fc(attention(query(x), key(x), value(x)))`` with the heads split
    from the projections, scores scaled by ``1 / sqrt(head_dim)``, and a
    softmax over keys.

    Parameters
    ----------
    d_model : int
        Model (embedding) width D.
    num_heads : int
        Query heads H; ``head_dim = d_model // num_heads`` must divide exactly.
    num_kv_heads : int, optional
        Key/value heads (grouped-query attention); must divide ``num_heads``.
        Defaults to ``num_heads``.
    bias : bool
        Whether the four projections have biases.
    dtype : float32 or float64
        Dtype of the weights and of every computation; inputs are cast to it.
    seed : int or numpy.random.Generator, optional
        Source of the initial weights, drawn like ``torch.nn.Linear``'s
        default: uniform in ``[-1/sqrt(d_model), 1/sqrt(d_model)]``.

    Attributes
    ----------
    w_q, w_k, w_v, w_o : ndarray
        Projection weights, ``(out_features, in_features)`` as in
        ``torch.nn.Linear``: ``w_q`` and ``w_o`` are (D, D), ``w_k`` and
        ``w_v`` are (num_kv_heads * head_dim, D).
    b_q, b_k, b_v, b_o : ndarray or None
        Biases (None with ``bias=False``).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        num_kv_heads: Optional[int] = None,
        bias: bool = True,
        dtype: Any = np.float32,
        seed: Union[None, int, np.random.Generator] = None,
    ) -> None:
        d_model = _positive_int(d_model, "d_model")
        num_heads = _positive_int(num_heads, "num_heads")
        if d_model % num_heads:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by num_heads ({num_heads}): "
                f"each head gets d_model // num_heads features"
            )
        num_kv_heads = num_heads if num_kv_heads is None else _positive_int(num_kv_heads, "num_kv_heads")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})"
            )
        self._allocate(d_model, num_heads, num_kv_heads, bias, _float_dtype(dtype))
        self.reset_parameters(seed)

    def _allocate(self, d_model: int, num_heads: int, num_kv_heads: int, bias: bool,
                  dtype: np.dtype) -> None:
        """Config and (uninitialised) parameter storage."""
        self.d_model = d_model
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = d_model // num_heads
        self.bias = bool(bias)
        self.dtype = dtype

        kv = self.kv_dim
        # Q, K and V weights live in one (D + 2*Dkv, D) array so the projection
        # is one GEMM; w_q, w_k and w_v are views of it, so in-place edits of
        # them are seen by the next forward call.
        self._w_qkv = np.empty((d_model + 2 * kv, d_model), dtype=self.dtype)
        self._w_o = np.empty((d_model, d_model), dtype=self.dtype)
        self._b_qkv = np.empty(d_model + 2 * kv, dtype=self.dtype) if self.bias else None
        self._b_o = np.empty(d_model, dtype=self.dtype) if self.bias else None
        self._packed = None
        self._workspace = threading.local()

    # ---- parameters ---------------------------------------------------

    @property
    def kv_dim(self) -> int:
        """Width of the K and V projections: ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    def _slices(self) -> Dict[str, slice]:
        D, kv = self.d_model, self.kv_dim
        return {"q": slice(0, D), "k": slice(D, D + kv), "v": slice(D + kv, D + 2 * kv)}

    def _param_view(self, name: str) -> Optional[np.ndarray]:
        """The writable storage of parameter ``name`` (a view of the fused arrays)."""
        kind, part = name[0], name[2]
        if part == "o":
            return self._w_o if kind == "w" else self._b_o
        fused = self._w_qkv if kind == "w" else self._b_qkv
        return None if fused is None else fused[self._slices()[part]]

    def _public_view(self, name: str) -> Optional[np.ndarray]:
        view = self._param_view(name)
        if view is None:
            return None
        view = view.view()
        view.flags.writeable = False  # the packed copy would not see in-place edits
        return view

    def _buffers(self, rows: int) -> Tuple[np.ndarray, np.ndarray]:
        """(qkv, merged) scratch of the forward pass, kept per calling thread.

        Reused while the row count stays the same: fresh pages cost a page
        fault and a zeroing pass each (about 5 ms per call at the bert preset
        on this kind of machine).  Only the last size is kept.
        """
        ws = self._workspace
        bufs = getattr(ws, "bufs", None)
        if bufs is None or bufs[0].shape[0] != rows or bufs[0].dtype != self.dtype:
            bufs = (
                np.empty((rows, self._w_qkv.shape[0]), dtype=self.dtype),
                np.empty((rows, self.d_model), dtype=self.dtype),
            )
            ws.bufs = bufs
        return bufs

    def _packed_weights(self):
        """(packed w_qkv, padded b_qkv, packed w_o, padded b_o), built once per change."""
        if self._packed is None:
            self._packed = kernels.pack_weight(self._w_qkv, self._b_qkv) + kernels.pack_weight(
                self._w_o, self._b_o
            )
        return self._packed

    def _expected_shape(self, name: str) -> Tuple[int, ...]:
        view = self._param_view(name)
        return view.shape if view is not None else ()

    def _set_param(self, name: str, value) -> None:
        view = self._param_view(name)
        if view is None:
            if value is None:
                return
            raise ValueError(f"{name}: this module was built with bias=False and has no {name}")
        arr = interop.to_numpy(value, name)
        if arr.shape != view.shape:
            raise ValueError(
                f"{name}: expected shape {_shape_str(view.shape)}, got {_shape_str(arr.shape)}"
            )
        if arr.dtype.kind != "f":
            raise TypeError(f"{name}: expected a float array, got dtype {arr.dtype}")
        view[...] = arr
        self._packed = None

    w_q = property(lambda self: self._public_view("w_q"), lambda self, v: self._set_param("w_q", v))
    w_k = property(lambda self: self._public_view("w_k"), lambda self, v: self._set_param("w_k", v))
    w_v = property(lambda self: self._public_view("w_v"), lambda self, v: self._set_param("w_v", v))
    w_o = property(lambda self: self._public_view("w_o"), lambda self, v: self._set_param("w_o", v))
    b_q = property(lambda self: self._public_view("b_q"), lambda self, v: self._set_param("b_q", v))
    b_k = property(lambda self: self._public_view("b_k"), lambda self, v: self._set_param("b_k", v))
    b_v = property(lambda self: self._public_view("b_v"), lambda self, v: self._set_param("b_v", v))
    b_o = property(lambda self: self._public_view("b_o"), lambda self, v: self._set_param("b_o", v))

    def reset_parameters(self, seed: Union[None, int, np.random.Generator] = None) -> None:
        """Draw fresh weights like ``torch.nn.Linear``: U(-1/sqrt(D), 1/sqrt(D))."""
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(self.d_model)  # every projection reads D features
        for name in _WEIGHT_NAMES + (_BIAS_NAMES if self.bias else ()):
            view = self._param_view(name)
            view[...] = rng.uniform(-bound, bound, size=view.shape)
        self._packed = None

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Copies of the parameters under this class's names (w_q, ..., b_o)."""
        names = _WEIGHT_NAMES + (_BIAS_NAMES if self.bias else ())
        return {name: self._param_view(name).copy() for name in names}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load parameters from a dict of numpy arrays or torch tensors.

        Accepts this class's names (``w_q`` ...), those of
        ``torch.nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``,
        ``out_proj.weight``, ``out_proj.bias``, or ``q_proj_weight`` ...) and
        those of the seed's PyTorch class (``query.weight`` ... ``fc.bias``).

        Raises
        ------
        ValueError
            Unknown or missing keys, or a shape that does not fit (the message
            names the key and both shapes).
        """
        params = interop.to_own_names(state, self._slices(), self.bias)
        staged = {}
        for name, value in params.items():
            view = self._param_view(name)
            if view is None:
                raise ValueError(f"{name}: this module was built with bias=False")
            arr = interop.to_numpy(value, name)
            if arr.shape != view.shape:
                raise ValueError(
                    f"{interop.source_key(state, name)}: expected shape "
                    f"{_shape_str(view.shape)}, got {_shape_str(arr.shape)}"
                )
            staged[name] = arr
        # all checked: only now overwrite, so a failed load changes nothing
        for name, arr in staged.items():
            self._param_view(name)[...] = arr
        self._packed = None

    @classmethod
    def from_torch(cls, module, *, dtype: Any = None) -> "MultiHeadSelfAttention":
        """Build from a ``torch.nn.MultiheadAttention`` or a module laid out like
        the seed's class (``query``, ``key``, ``value``, ``fc`` linears and
        ``num_heads``).  torch is needed only for the module itself.
        """
        cfg, state = interop.torch_module_config(module)
        m = cls(
            cfg["d_model"],
            cfg["num_heads"],
            bias=cfg["bias"],
            dtype=dtype if dtype is not None else cfg["dtype"],
        )
        m.load_state_dict(state)
        return m

    def config(self) -> Dict[str, Any]:
        """The constructor arguments that rebuild this module's shapes."""
        return {
            "d_model": self.d_model,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "bias": self.bias,
            "dtype": self.dtype.name,
        }

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the parameters and the config to an ``.npz`` file."""
        header = json.dumps({"format": _FORMAT, **self.config()})
        np.savez(path, __config__=np.array(header), **self.state_dict())

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "MultiHeadSelfAttention":
        """Read a module written by :meth:`save` (no pickles are ever loaded)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, KeyError) as exc:
            raise ValueError(f"{os.fspath(path)}: not a readable fastattn .npz file ({exc})") from exc
        cfg = interop.parse_config(arrays.pop("__config__", None), _FORMAT, path)
        m = cls(
            cfg["d_model"],
            cfg["num_heads"],
            num_kv_heads=cfg["num_kv_heads"],
            bias=cfg["bias"],
            dtype=cfg["dtype"],
        )
        m.load_state_dict(arrays)
        return m

    # ---- pickling: the arrays and the config, never compiled state -------

    def __getstate__(self) -> Dict[str, Any]:
        return {"config": self.config(), "state": self.state_dict()}

    def __setstate__(self, data: Dict[str, Any]) -> None:
        cfg = data["config"]
        # packed weights and per-thread scratch start empty in the new process
        self._allocate(cfg["d_model"], cfg["num_heads"], cfg["num_kv_heads"], cfg["bias"],
                       _float_dtype(cfg["dtype"]))
        self.load_state_dict(data["state"])

    def __eq__(self, other: object) -> bool:
        """Same config and bit-identical parameters."""
        if not isinstance(other, MultiHeadSelfAttention):
            return NotImplemented
        if self.config() != other.config():
            return False
        a, b = self.state_dict(), other.state_dict()
        return all(np.array_equal(a[k], b[k]) for k in a)

    __hash__ = None  # mutable (weights can be reassigned)

    def __repr__(self) -> str:
        return (
            f"MultiHeadSelfAttention(d_model={self.d_model}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, bias={self.bias}, dtype={self.dtype.name})"
        )

    # ---- forward ------------------------------------------------------

    def __call__(
        self,
        x,
        *,
        attn_mask=None,
        key_padding_mask=None,
        is_causal: bool = False,
        need_weights: bool = False,
        average_attn_weights: bool = True,
    ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """Self-attention over ``x``.

        Parameters
        ----------
        x : ndarray, shape (B, N, D) or (N, D)
            Input sequence(s); cast to the module's dtype.
        attn_mask : ndarray, optional
            Broadcastable to (B, H, N, N) (or (H, N, N) unbatched).  Bool:
            ``True`` = may attend (note: ``torch.nn.MultiheadAttention`` uses
            ``True`` = blocked).  Float: added to the scaled scores.
        key_padding_mask : ndarray of bool, shape (B, N) or (N,), optional
            ``True`` marks a padding key that no query attends (as in torch).
        is_causal : bool
            Query ``i`` attends keys ``j <= i`` only.
        need_weights : bool
            Also return the attention weights.
        average_attn_weights : bool
            With ``need_weights``: average the weights over heads, (B, N, N),
            instead of returning them per head, (B, H, N, N).

        Returns
        -------
        y : ndarray, same shape as ``x``
        weights : ndarray, only with ``need_weights``
        """
        x = as_float_array(x, "x", self.dtype)
        unbatched = x.ndim == 2
        if x.ndim not in (2, 3) or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have shape (B, N, {self.d_model}) or (N, {self.d_model}), "
                f"got {_shape_str(x.shape)}"
            )
        if unbatched:
            x = x[None]
        B, N, D = x.shape
        H, Hkv, E = self.num_heads, self.num_kv_heads, self.head_dim
        full = (B, H, N, N)
        bmask, fmask = prepare_mask(attn_mask, "attn_mask", full, self.dtype)
        pad = self._padding_mask(key_padding_mask, B, N, unbatched)

        nt = threads.get_num_threads()
        w_qkv, b_qkv, w_o, b_o = self._packed_weights()
        n_qkv = self._w_qkv.shape[0]
        qkv, merged = self._buffers(B * N)
        kernels.linear(kernel_rows(x.reshape(B * N, D)), w_qkv, b_qkv, n_qkv, qkv, nt)
        sl = self._slices()
        q = qkv[:, sl["q"]].reshape(B, N, H, E).transpose(0, 2, 1, 3)
        k = qkv[:, sl["k"]].reshape(B, N, Hkv, E).transpose(0, 2, 1, 3)
        v = qkv[:, sl["v"]].reshape(B, N, Hkv, E).transpose(0, 2, 1, 3)

        out = merged.reshape(B, N, H, E).transpose(0, 2, 1, 3)
        weights = np.empty(full, dtype=self.dtype) if need_weights else None
        attention_into(
            q, k, v, out,
            bool_masks=(bmask, pad), float_mask=fmask, is_causal=is_causal,
            scale=1.0 / math.sqrt(E), weights=weights, num_threads=nt,
        )
        y = np.empty((B * N, D), dtype=self.dtype)
        kernels.linear(merged, w_o, b_o, D, y, nt)
        y = y.reshape(B, N, D)
        if unbatched:
            y = y[0]
        if not need_weights:
            return y
        if average_attn_weights:
            weights = weights.mean(axis=1, dtype=self.dtype)
        return y, (weights[0] if unbatched else weights)

    def _padding_mask(self, key_padding_mask, B: int, N: int, unbatched: bool):
        """key_padding_mask (True = padding) as a broadcast 'may attend' view."""
        if key_padding_mask is None:
            return None
        kpm = np.asarray(key_padding_mask)
        expected = (N,) if unbatched else (B, N)
        if kpm.dtype != np.bool_:
            raise TypeError(
                f"key_padding_mask must be a bool array (True = padding), got dtype {kpm.dtype}"
            )
        if kpm.shape != expected:
            raise ValueError(
                f"key_padding_mask must have shape {_shape_str(expected)}, "
                f"got {_shape_str(kpm.shape)}"
            )
        allowed = ~kpm.reshape(B, 1, 1, N)
        return np.broadcast_to(allowed, (B, self.num_heads, N, N))
