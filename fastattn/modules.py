"""MultiHeadSelfAttention and MultiHeadAttention: weights, head split, projections.

Both classes share one implementation (:class:`_MultiHeadBase`).  A forward
pass, in order:

1. the projections: for self-attention one GEMM projects x to Q, K and V
   together, writing a head-major (B, H + 2*Hkv, N, E) buffer; cross-attention
   projects query, key and value separately, also head-major;
2. Q, K and V are views of those buffers with shape (B, heads, L, E) (or of
   the KV cache): the kernel reads them in place, no per-head copies;
3. the kernel writes its output straight into a (B, Lq, H*E) buffer (the
   merged-heads layout), so no transpose follows;
4. one GEMM applies the output projection.

The GEMMs are fastattn's own (``_kernels.linear``), on weights packed once per
weight change, and run on the same OpenMP threads as the attention kernel.

Parameters are copy-on-write.  One :class:`_Params` object holds every weight
and bias of one moment, as read-only arrays over immutable bytes (so neither
they nor the views handed out, ``m.w_q`` ..., can be made writable, and the
packed copies can never fall behind them), together with the packed copies and
the plans made from them.  A call reads ``self._state`` once and uses only
that object, so it computes with one weight set, without taking a lock, while
another thread changes the weights.  A change (assignment ``m.w_q = new``,
``load_state_dict``, ``reset_parameters``) builds a new object and swaps it in
with one assignment, under the module's writer lock.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _policy, interop, threads
from ._dispatch import kernels
from ._locks import ForkSafeLock
from .cache import KVCache
from .functional import (
    KEYS_HINT,
    _shape_str,
    array_from,
    as_float_array,
    attention_into,
    cast_checked,
    check_alibi,
    check_flag,
    check_window,
    ensure_memory,
    float_dtype,
    kernel_ready,
    positive_int,
    prepare_mask,
)

__all__ = ["MultiHeadSelfAttention", "MultiHeadAttention"]

_IN_DIM = {"q": "embed_dim", "k": "kdim", "v": "vdim", "o": "embed_dim"}


def _param_property(name: str) -> property:
    return property(lambda self: self._public_view(name),
                    lambda self, value: self._set_param(name, value),
                    doc=f"The {name} parameter (a read-only view; assign to replace it).")


class _Params:
    """A module's parameters at one moment; never changed, a weight change
    makes a new one.

    ``arrays`` maps storage names (``w_qkv`` or ``w_q``/``w_k``/``w_v``,
    ``w_o``, ``b_qkv``, ``b_o``) to arrays made by :func:`_frozen`.
    ``packed`` holds the packed copies of its weights, made on first use,
    ``plans`` the ForwardPlans made from them (one per calling thread) and
    ``plan`` the last one made.  Calls fill these without a lock: an entry
    two threads make at once is made twice, the same, and one is kept.
    """

    __slots__ = ("arrays", "packed", "plans", "plan")

    def __init__(self, arrays: Dict[str, np.ndarray]) -> None:
        self.arrays = arrays
        self.packed: Dict[str, tuple] = {}
        self.plans: Dict[int, Any] = {}
        self.plan = None


def _frozen(parts: Sequence[np.ndarray]) -> np.ndarray:
    """``parts`` (arrays of one dtype and trailing shape) stacked along axis 0,
    in a read-only array over an immutable bytes object, the one copy made:
    numpy refuses to make it, or any view of it, writable."""
    data = b"".join([memoryview(np.ascontiguousarray(p)) for p in parts])
    return np.frombuffer(data, parts[0].dtype).reshape((-1,) + parts[0].shape[1:])


class _MultiHeadBase:
    """Parameters, packing, persistence and the forward pass shared by both modules."""

    _FORMAT = ""  # set by each subclass: the .npz format name
    _QUERY_ARG = ""  # set by each subclass: what its first argument is called

    @staticmethod
    def _init_config(embed_dim, num_heads, num_kv_heads, kdim, vdim, bias, dtype,
                     dim_name: str) -> Dict[str, Any]:
        embed_dim = positive_int(embed_dim, dim_name)
        num_heads = positive_int(num_heads, "num_heads")
        if embed_dim % num_heads:
            raise ValueError(
                f"{dim_name} ({embed_dim}) must be divisible by num_heads ({num_heads}): "
                f"each head gets {dim_name} // num_heads features"
            )
        num_kv_heads = num_heads if num_kv_heads is None else positive_int(num_kv_heads, "num_kv_heads")
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})"
            )
        bias = check_flag(bias, "bias")
        kdim = embed_dim if kdim is None else positive_int(kdim, "kdim")
        vdim = embed_dim if vdim is None else positive_int(vdim, "vdim")
        return dict(embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
                    kdim=kdim, vdim=vdim, bias=bool(bias), dtype=float_dtype(dtype))

    def _allocate(self, embed_dim: int, num_heads: int, num_kv_heads: int, kdim: int,
                  vdim: int, bias: bool, dtype: np.dtype) -> None:
        """Config, and no parameters yet: every constructor loads a full set
        (reset_parameters or load_state_dict) before the module is used."""
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim
        self.vdim = vdim
        self.bias = bool(bias)
        self.dtype = np.dtype(dtype)
        self._shapes = self._param_shapes(self.config())
        ensure_memory(list(self._shapes.values()), self.dtype.itemsize,
                      "the module's parameters")
        self._state: Optional[_Params] = None
        # serialises weight changes, each of which reads the current state
        # and builds the next; calls never take it
        self._lock = ForkSafeLock()
        self._workspace = threading.local()

    @property
    def kv_dim(self) -> int:
        """Width of the K and V projections: ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    @property
    def fused(self) -> bool:
        """True when kdim == vdim == embed_dim: one stacked Q/K/V weight."""
        return self.kdim == self.embed_dim and self.vdim == self.embed_dim

    @property
    def _plan(self):
        """The last ForwardPlan made from the current weights, or None."""
        return self._state.plan

    def _slices(self) -> Dict[str, slice]:
        D, kv = self.embed_dim, self.kv_dim
        return {"q": slice(0, D), "k": slice(D, D + kv), "v": slice(D + kv, D + 2 * kv)}

    def _storage(self) -> Dict[str, Tuple[str, ...]]:
        """Storage array name -> the parameters it stacks.  With kdim == vdim
        == D the Q, K and V weights are one (D + 2*Dkv, D) array, so that a
        self-attention projection is one GEMM; otherwise each has its own.
        Biases are always stacked (as torch's in_proj_bias)."""
        layout = ({"w_qkv": ("w_q", "w_k", "w_v")} if self.fused
                  else {"w_q": ("w_q",), "w_k": ("w_k",), "w_v": ("w_v",)})
        layout["w_o"] = ("w_o",)
        if self.bias:
            layout.update(b_qkv=("b_q", "b_k", "b_v"), b_o=("b_o",))
        return layout

    def _param_view(self, name: str, state: _Params) -> Optional[np.ndarray]:
        """Parameter (w_q ...) or storage array (w_qkv ...) ``name`` of
        ``state``; None for a bias the module lacks."""
        arrays = state.arrays
        if name in arrays:
            return arrays[name]
        if name not in self._shapes:
            return None
        return arrays[name[0] + "_qkv"][self._slices()[name[2]]]

    def _public_view(self, name: str) -> Optional[np.ndarray]:
        view = self._param_view(name, self._state)
        # a view of its own: a caller setting its shape leaves the storage alone
        return None if view is None else view.view()

    def _staged_param(self, name: str, value, key: str) -> np.ndarray:
        """``value`` checked against parameter ``name`` and cast to the module's
        dtype, so that building the new state cannot fail half-way; ``key``
        is what messages call it (a torch name, say)."""
        shape = self._shapes[name]
        arr = interop.to_numpy(value, key)
        if arr.shape != shape:
            raise ValueError(
                f"{key}: expected shape {_shape_str(shape)}, got {_shape_str(arr.shape)}"
            )
        return cast_checked(arr, self.dtype, key)

    def _store_params(self, staged: Mapping[str, np.ndarray]) -> None:
        """Swaps in a new state: the current parameters with ``staged`` ones
        (checked and cast) in their place.  Storage none of them is in is
        shared with the old state, which calls running meanwhile keep using."""
        with self._lock:
            old = self._state
            arrays = {}
            for key, names in self._storage().items():
                if old is not None and not any(n in staged for n in names):
                    arrays[key] = old.arrays[key]
                else:
                    arrays[key] = _frozen([staged[n] if n in staged else self._param_view(n, old)
                                           for n in names])
            self._state = _Params(arrays)

    def _set_param(self, name: str, value) -> None:
        if name not in self._shapes:
            if value is None:
                return
            raise ValueError(f"{name}: this module was built with bias=False and has no {name}")
        self._store_params({name: self._staged_param(name, value, name)})

    w_q = _param_property("w_q")
    w_k = _param_property("w_k")
    w_v = _param_property("w_v")
    w_o = _param_property("w_o")
    b_q = _param_property("b_q")
    b_k = _param_property("b_k")
    b_v = _param_property("b_v")
    b_o = _param_property("b_o")

    def _packed_weight(self, state: _Params, part: str):
        """(packed weight, padded bias) of projection ``part`` ("qkv", "q", "k",
        "v" or "o") of ``state``, packed on first use."""
        entry = state.packed.get(part)
        if entry is None:
            entry = kernels.pack_weight(self._param_view("w_" + part, state),
                                        self._param_view("b_" + part, state))
            entry = state.packed.setdefault(part, entry)
        return entry

    def _project(self, state: _Params, x2d: np.ndarray, part: str, n_out: int,
                 out: Optional[np.ndarray] = None, num_threads: int = 1,
                 head_major: bool = False) -> np.ndarray:
        w, b = self._packed_weight(state, part)
        if out is None:
            out = np.empty((x2d.shape[0], n_out), dtype=self.dtype)
        kernels.linear(kernel_ready(x2d), w, b, n_out, out, _policy.linear_blocking(x2d.shape[1]),
                       num_threads, head_major)
        return out

    def _buffers(self, B: int, L: int) -> Tuple[np.ndarray, np.ndarray]:
        """(qkv, merged) scratch of a self-attention pass, kept per calling thread.

        qkv is head-major, (B, H + 2 Hkv, L, E): the projection writes each
        head's rows contiguously, so the kernel streams K and V instead of
        gathering 256-byte rows 6 KB apart (the long preset's attention core
        ran 8-11 % slower on the row-major (B * L, 3 D) buffer).  Reused while
        the shape stays the same: fresh pages cost a page fault and a zeroing
        pass each (about 5 ms per call at the bert preset on this kind of
        machine).  Only the last shape is kept.
        """
        ws = self._workspace
        bufs = getattr(ws, "bufs", None)
        groups = self.num_heads + 2 * self.num_kv_heads
        if bufs is None or bufs[0].shape != (B, groups, L, self.head_dim):
            bufs = (
                np.empty((B, groups, L, self.head_dim), dtype=self.dtype),
                np.empty((B * L, self.embed_dim), dtype=self.dtype),
            )
            ws.bufs = bufs
        return bufs

    def _plain_forward(self, x) -> Optional[np.ndarray]:
        """m(x) with no options, on a C-contiguous (B, N, D) array of the module's
        dtype: one call into a :class:`ForwardPlan` of the kernels, or None
        (then _forward, which handles every other case and every error, runs).

        The plan, one per calling thread, holds what depends only on the
        shape, the thread count and the packed weights (buffers, head views,
        the kernels' checked arguments), so a call's Python work is a few
        checks.  Between three separate kernel calls that work cost 10-50 us
        at the small preset on this kind of machine (its code and data evicted
        by the GEMMs each time), 0.5-2 % of the call.
        """
        state = self._state  # this call's weights, whatever other threads assign
        nt = threads.get_num_threads()
        tid = threading.get_ident()
        plan = state.plans.get(tid)
        if plan is not None:
            # the plan itself says whether it fits (shape, weights, thread count)
            y = plan.run_if(x, state.packed, tid, nt)
            if y is not None:
                return y
        if (type(x) is not np.ndarray or x.dtype != self.dtype or x.ndim != 3
                or not self.fused or not x.flags.c_contiguous or not x.flags.aligned):
            return None
        B, N, D = x.shape
        if D != self.embed_dim or B * N == 0:
            return None
        ensure_memory([(B * N, D + 2 * self.kv_dim), (B * N, D), (B * N, D)],
                      self.dtype.itemsize, "the forward pass's buffers")
        plan = self._plain_plan(state, B, N, nt)
        # plans of threads that have ended go (and their buffers with them);
        # list() copies the keys at once, while other threads may add theirs
        alive = {t.ident for t in threading.enumerate()}
        for t in list(state.plans):
            if t not in alive:
                state.plans.pop(t, None)
        state.plans[tid] = plan
        state.plan = plan
        return plan.run(x)

    def _plain_plan(self, state: _Params, B: int, N: int, nt: int):
        H, Hkv, E = self.num_heads, self.num_kv_heads, self.head_dim
        wq, bq = self._packed_weight(state, "qkv")
        wo, bo = self._packed_weight(state, "o")
        qkv, merged = self._buffers(B, N)
        out = merged.reshape(B, N, H, E).transpose(0, 2, 1, 3)
        # the plan runs for the token state.packed (compared by identity: it
        # fits while state is the module's current one) and the calling thread
        return kernels.ForwardPlan(
            wq, bq, self.embed_dim + 2 * self.kv_dim, qkv, qkv[:, :H], qkv[:, H:H + Hkv],
            qkv[:, H + Hkv:], out, merged, wo, bo, 1.0 / math.sqrt(E),
            _policy.attention_schedule(B * H, N, N, False, nt),
            _policy.linear_blocking(self.embed_dim), nt, state.packed, threading.get_ident(),
            _policy.per_head(B, Hkv, nt))

    def reset_parameters(self, seed: Union[None, int, np.random.Generator] = None) -> None:
        """Draw fresh weights like ``torch.nn.Linear``: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        if isinstance(seed, np.random.Generator):
            rng = seed
        else:
            try:
                rng = np.random.default_rng(seed)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"seed must be None, a non-negative int (or sequence of them) "
                                f"or a numpy Generator, got {seed!r} ({exc})") from None
        staged = {}
        for name, shape in self._shapes.items():
            bound = 1.0 / math.sqrt(getattr(self, _IN_DIM[name[2]]))
            staged[name] = rng.uniform(-bound, bound, size=shape).astype(self.dtype, copy=False)
        self._store_params(staged)

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Copies of the parameters under this class's names (w_q, ..., b_o)."""
        state = self._state  # one moment's weights, whatever other threads assign
        return {name: self._param_view(name, state).copy() for name in self._shapes}

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
            names the key and both shapes).  A failed load changes nothing.
        """
        params = interop.to_own_names(state, self._slices(), self.bias, self.embed_dim)
        staged = {}
        for name, value in params.items():
            if name not in self._shapes:
                raise ValueError(f"{name}: this module was built with bias=False")
            staged[name] = self._staged_param(name, value, interop.source_key(state, name))
        self._store_params(staged)

    def to_torch(self):
        """A ``torch.nn.MultiheadAttention`` (batch_first=True, eval mode) with these
        weights, which gives the same outputs (with torch's mask conventions).

        Raises ImportError without torch, and ValueError for grouped-query
        modules, which torch's class cannot express.
        """
        try:
            import torch
        except ImportError:
            raise ImportError("to_torch needs PyTorch (on a CPU-only machine, its CPU wheel: "
                              "see the README)") from None
        if self.num_kv_heads != self.num_heads:
            raise ValueError(
                f"to_torch: torch.nn.MultiheadAttention has no grouped-query attention "
                f"(num_kv_heads {self.num_kv_heads} != num_heads {self.num_heads})"
            )
        tdtype = torch.float64 if self.dtype == np.float64 else torch.float32
        t = torch.nn.MultiheadAttention(self.embed_dim, self.num_heads, bias=self.bias,
                                        kdim=self.kdim, vdim=self.vdim, batch_first=True,
                                        dtype=tdtype)
        # copies: torch tensors over read-only arrays are not to be written
        arrays = self._state.arrays
        state = {"out_proj.weight": torch.from_numpy(arrays["w_o"].copy())}
        if self.fused:
            state["in_proj_weight"] = torch.from_numpy(arrays["w_qkv"].copy())
        else:
            for part in "qkv":
                state[f"{part}_proj_weight"] = torch.from_numpy(arrays["w_" + part].copy())
        if self.bias:
            state["in_proj_bias"] = torch.from_numpy(arrays["b_qkv"].copy())
            state["out_proj.bias"] = torch.from_numpy(arrays["b_o"].copy())
        t.load_state_dict(state)
        return t.eval()

    def new_cache(self, batch_size: int, max_len: int, *, grow: bool = False) -> KVCache:
        """An empty :class:`~fastattn.cache.KVCache` for incremental decoding.

        Parameters
        ----------
        batch_size : int
            Sequences decoded together.
        max_len : int
            Positions it holds; a call that would exceed it raises ValueError,
            unless ``grow=True`` (then the capacity doubles).
        """
        return KVCache(batch_size, max_len, self.num_kv_heads, self.head_dim, self.dtype,
                       grow=grow)

    def config(self) -> Dict[str, Any]:  # pragma: no cover - each subclass names its own
        raise NotImplementedError

    @classmethod
    def _from_config(cls, cfg: Dict[str, Any]):
        raise NotImplementedError

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the parameters and the config to an ``.npz`` file, or a binary
        file object.  As with ``numpy.savez``, a path (str, bytes or
        os.PathLike) without the suffix gets ``.npz`` added; :meth:`load`
        with the same path reads that file."""
        header = json.dumps({"format": self._FORMAT, **self.config()})
        np.savez(interop.saved_name(path), __config__=np.array(header), **self.state_dict())

    @classmethod
    def load(cls, path: Union[str, os.PathLike]):
        """Read a module written by :meth:`save`, from a path or a binary file
        object (no pickles are ever loaded).

        ``load(path)`` reads the file ``save(path)`` writes: ``path`` with
        ``.npz`` added when missing, or ``path`` itself when only it exists; a
        ValueError naming both when both exist.

        Member names and array headers are checked against the stored config
        before any array is read; a file that is not such a module raises
        ValueError with the reason.
        """
        cfg, arrays = interop.read_module_file(path, cls._FORMAT, cls._param_shapes)
        m = cls._from_config(cfg)
        m.load_state_dict(arrays)
        return m

    @classmethod
    def _param_shapes(cls, cfg: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
        """Parameter shapes a config implies (validating it, allocating nothing)."""
        c = cls._normalise_config(cfg)
        D, kv = c["embed_dim"], c["num_kv_heads"] * (c["embed_dim"] // c["num_heads"])
        shapes = {"w_q": (D, D), "w_k": (kv, c["kdim"]), "w_v": (kv, c["vdim"]), "w_o": (D, D)}
        if c["bias"]:
            shapes.update({"b_q": (D,), "b_k": (kv,), "b_v": (kv,), "b_o": (D,)})
        return shapes

    # ---- pickling: the arrays and the config, never compiled state -------

    def __getstate__(self) -> Dict[str, Any]:
        return {"config": self.config(), "state": self.state_dict()}

    def __setstate__(self, data: Dict[str, Any]) -> None:
        template = type(self)._from_config(data["config"], initialise=False)
        self.__dict__.update(template.__dict__)
        self.load_state_dict(data["state"])

    def __eq__(self, other: object) -> bool:
        """Same class, config and bit-identical parameters."""
        if type(other) is not type(self):
            return NotImplemented
        if self.config() != other.config():
            return False
        a, b = self.state_dict(), other.state_dict()
        return all(np.array_equal(a[k], b[k]) for k in a)

    __hash__ = None  # mutable (weights can be reassigned)

    # ---- forward --------------------------------------------------------

    def _forward(self, query, key, value, *, self_attention: bool, attn_mask, key_padding_mask,
                 is_causal: bool, need_weights: bool, average_attn_weights: bool,
                 cache: Optional[KVCache], window, alibi: bool, alibi_slopes):
        qname = self._QUERY_ARG
        q_in = as_float_array(query, qname, self.dtype, KEYS_HINT)
        unbatched = q_in.ndim == 2
        if q_in.ndim not in (2, 3) or q_in.shape[-1] != self.embed_dim:
            raise ValueError(
                f"{qname} must have shape (B, L, {self.embed_dim}) or (L, {self.embed_dim}), "
                f"got {_shape_str(q_in.shape)}"
            )
        if unbatched:
            q_in = q_in[None]
        B, Lq, D = q_in.shape
        H, Hkv, E, kv = self.num_heads, self.num_kv_heads, self.head_dim, self.kv_dim
        if not self_attention:
            k_in = self._check_source(key, "key", self.kdim, B, unbatched)
            v_in = self._check_source(value, "value", self.vdim, B, unbatched)
            if k_in.shape[1] != v_in.shape[1]:
                raise ValueError(
                    f"key and value must have the same length, got key {_shape_str(k_in.shape)} "
                    f"and value {_shape_str(v_in.shape)}"
                )
            if cache is not None and k_in.shape[1] != Lq:
                raise ValueError(
                    f"with a cache, key and value hold the new positions of query "
                    f"({Lq}), got key {_shape_str(k_in.shape)}"
                )
        is_causal = check_flag(is_causal, "is_causal")
        need_weights = check_flag(need_weights, "need_weights")
        average_attn_weights = check_flag(average_attn_weights, "average_attn_weights")
        window = check_window(window)
        slopes = check_alibi(check_flag(alibi, "alibi"), alibi_slopes, H, self.dtype)
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be a KVCache from new_cache(), got {type(cache).__name__}")
            cache.check(B, self.dtype, Hkv, E)
            is_causal = True  # new positions follow every cached one
        nt = threads.get_num_threads()
        state = self._state  # this call's weights, whatever other threads assign
        # a cache is held from its length read to its append, or the rollback
        # of a failed call: another call in between would lose or mix positions
        with cache._claim() if cache is not None else contextlib.nullcontext():
            # every buffer of the call, checked once before any is allocated
            Lk = Lq if self_attention else k_in.shape[1]
            if cache is not None:
                Lk = len(cache) + Lq
            ensure_memory([(B * Lq, D + 2 * kv), (B * Lq, D), (B * Lq, D)]
                          + ([(B, H, Lq, Lk)] if need_weights else []), self.dtype.itemsize,
                          "the forward pass's buffers" + (" and weights" if need_weights else ""))
            # 1. masks as broadcast views, checked before anything is computed or
            # cached: a call that raises leaves a cache as it found it
            full = (B, H, Lq, Lk)
            bmask, fmask = prepare_mask(attn_mask, "attn_mask", full, self.dtype)
            pad = self._padding_mask(key_padding_mask, B, Lq, Lk, unbatched)

            # 2. projections, straight into the head-major blocks the kernel reads
            merged = None
            src_k = q_in if self_attention else k_in
            src_v = q_in if self_attention else v_in
            if cache is None:
                if self_attention and self.fused:
                    qkv, merged = self._buffers(B, Lq)
                    self._project(state, q_in.reshape(B * Lq, D), "qkv", D + 2 * kv, qkv, nt,
                                  head_major=True)
                    q, k, v = qkv[:, :H], qkv[:, H:H + Hkv], qkv[:, H + Hkv:]
                else:
                    Lk_new = src_k.shape[1]
                    q = self._project(state, q_in.reshape(B * Lq, D), "q", D,
                                      np.empty((B, H, Lq, E), self.dtype), nt, head_major=True)
                    k = self._project(state, src_k.reshape(B * Lk_new, src_k.shape[2]), "k", kv,
                                      np.empty((B, Hkv, Lk_new, E), self.dtype), nt,
                                      head_major=True)
                    v = self._project(state, src_v.reshape(B * Lk_new, src_v.shape[2]), "v", kv,
                                      np.empty((B, Hkv, Lk_new, E), self.dtype), nt,
                                      head_major=True)
            else:
                # decoding: the new positions' K and V go into the cache's layout
                if self_attention and self.fused:
                    qkv = self._project(state, q_in.reshape(B * Lq, D), "qkv", D + 2 * kv,
                                        num_threads=nt)
                    sl = self._slices()
                    q2, k2, v2 = qkv[:, sl["q"]], qkv[:, sl["k"]], qkv[:, sl["v"]]
                else:
                    q2 = self._project(state, q_in.reshape(B * Lq, D), "q", D, num_threads=nt)
                    k2 = self._project(state, src_k.reshape(B * Lq, src_k.shape[2]), "k", kv,
                                       num_threads=nt)
                    v2 = self._project(state, src_v.reshape(B * Lq, src_v.shape[2]), "v", kv,
                                       num_threads=nt)
                q = q2.reshape(B, Lq, H, E).transpose(0, 2, 1, 3)
                cached = len(cache)
                cache._append(k2.reshape(B, Lq, kv), v2.reshape(B, Lq, kv))
                k, v = cache.keys(), cache.values()
            try:
                return self._attend_and_project(state, q, k, v, merged, B, Lq, bmask, fmask, pad,
                                                is_causal, need_weights, average_attn_weights,
                                                window, slopes, unbatched, nt)
            except BaseException:
                if cache is not None:
                    cache._truncate(cached)
                raise

    def _attend_and_project(self, state, q, k, v, merged, B, Lq, bmask, fmask, pad, is_causal,
                            need_weights, average_attn_weights, window, slopes, unbatched, nt):
        """Steps 3 and 4 of _forward: the kernel into the merged layout, then
        the output projection."""
        H, E, D = self.num_heads, self.head_dim, self.embed_dim
        full = (B, H, Lq, k.shape[2])
        if merged is None:
            merged = np.empty((B * Lq, D), dtype=self.dtype)
        out = merged.reshape(B, Lq, H, E).transpose(0, 2, 1, 3)
        weights = np.empty(full, dtype=self.dtype) if need_weights else None
        # 3. the kernel
        attention_into(
            q, k, v, out,
            bool_masks=(bmask, pad), float_mask=fmask, is_causal=is_causal,
            scale=1.0 / math.sqrt(E), weights=weights, window=window, slopes=slopes,
            num_threads=nt,
        )
        # 4. output projection
        y = self._project(state, merged, "o", D, num_threads=nt).reshape(B, Lq, D)
        if unbatched:
            y = y[0]
        if not need_weights:
            return y
        if average_attn_weights:
            weights = weights.mean(axis=1, dtype=self.dtype)
        return y, (weights[0] if unbatched else weights)

    def _check_source(self, arr, name: str, dim: int, B: int, unbatched: bool) -> np.ndarray:
        a = as_float_array(arr, name, self.dtype, KEYS_HINT)
        expected = f"(L, {dim})" if unbatched else f"({B}, L, {dim})"
        if a.ndim != (2 if unbatched else 3) or a.shape[-1] != dim or (not unbatched and a.shape[0] != B):
            raise ValueError(f"{name} must have shape {expected}, got {_shape_str(a.shape)}")
        return a[None] if unbatched else a

    def _padding_mask(self, key_padding_mask, B: int, Lq: int, Lk: int, unbatched: bool):
        """key_padding_mask (True = padding) as a broadcast 'may attend' view."""
        if key_padding_mask is None:
            return None
        kpm = array_from(key_padding_mask, "key_padding_mask")
        expected = (Lk,) if unbatched else (B, Lk)
        if kpm.dtype != np.bool_:
            raise TypeError(
                f"key_padding_mask must be a bool array (True = padding), got dtype {kpm.dtype}"
            )
        if kpm.shape != expected:
            raise ValueError(
                f"key_padding_mask must have shape {_shape_str(expected)} (one entry per key), "
                f"got {_shape_str(kpm.shape)}"
            )
        allowed = ~kpm.reshape(B, 1, 1, Lk)
        return np.broadcast_to(allowed, (B, self.num_heads, Lq, Lk))


_FORWARD_DOC = """
        attn_mask : ndarray, optional
            Broadcastable to (B, H, Lq, Lk) (or (H, Lq, Lk) unbatched).  Bool:
            ``True`` = may attend (note: ``torch.nn.MultiheadAttention`` uses
            ``True`` = blocked).  Float: added to the scaled scores.
        key_padding_mask : ndarray of bool, shape (B, Lk) or (Lk,), optional
            ``True`` marks a padding key that no query attends (as in torch).
            With a cache, Lk counts every cached position.
        is_causal : bool
            Query ``i`` attends keys ``j <= i + (Lk - Lq)`` only.
        need_weights : bool
            Also return the attention weights.
        average_attn_weights : bool
            With ``need_weights``: average over heads, (B, Lq, Lk), instead of
            (B, H, Lq, Lk).
        cache : KVCache, optional
            From :meth:`new_cache`: the new positions' keys and values are
            appended and the queries attend causally over every cached
            position (one token per call, or a chunk).  One call at a time:
            a call that finds it in use by another thread's call raises
            RuntimeError.
        window : (int or None, int or None), optional
            Sliding window around each query's position (see
            :func:`fastattn.scaled_dot_product_attention`).
        alibi : bool, alibi_slopes : array of shape (H,), optional
            ALiBi linear distance biases, computed inside the kernel.
"""


class MultiHeadSelfAttention(_MultiHeadBase):
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
        ``w_v`` are (num_kv_heads * head_dim, D).  Read-only views; numpy
        refuses to make them, or their bases, writable.
    b_q, b_k, b_v, b_o : ndarray or None
        Biases (None with ``bias=False``).

    Weights change only by assignment (``m.w_q = new``), :meth:`load_state_dict`
    or :meth:`reset_parameters`.  ``torch.from_numpy(m.w_q)`` warns that
    writing to the tensor is undefined behaviour, and it is: the module would
    not see the write.  ``torch.tensor(m.w_q)`` is a copy to write to.

    A module may be called from several threads at once while another thread
    changes its weights: each call computes with the weights of one moment,
    those before or those after the change.
    """

    _FORMAT = "fastattn.MultiHeadSelfAttention/1"
    _QUERY_ARG = "x"

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
        cfg = self._init_config(d_model, num_heads, num_kv_heads, None, None, bias, dtype,
                                "d_model")
        self._allocate(**cfg)
        self.reset_parameters(seed)

    @property
    def d_model(self) -> int:
        """Model width D (the same as ``embed_dim``)."""
        return self.embed_dim

    def config(self) -> Dict[str, Any]:
        """The constructor arguments that rebuild this module's shapes."""
        return {"d_model": self.embed_dim, "num_heads": self.num_heads,
                "num_kv_heads": self.num_kv_heads, "bias": self.bias, "dtype": self.dtype.name}

    @classmethod
    def _normalise_config(cls, cfg: Dict[str, Any]) -> Dict[str, Any]:
        return cls._init_config(cfg["d_model"], cfg["num_heads"], cfg["num_kv_heads"],
                                None, None, cfg["bias"], cfg["dtype"], "d_model")

    @classmethod
    def _from_config(cls, cfg: Dict[str, Any], initialise: bool = True) -> "MultiHeadSelfAttention":
        m = cls.__new__(cls)
        m._allocate(**cls._normalise_config(cfg))
        return m

    @classmethod
    def from_torch(cls, module, *, dtype: Any = None) -> "MultiHeadSelfAttention":
        """Build from a ``torch.nn.MultiheadAttention`` (kdim == vdim == embed_dim) or
        a module laid out like the seed's class (``query``, ``key``, ``value``,
        ``fc`` linears and ``num_heads``).  torch is needed only for the module.
        """
        cfg, state = interop.torch_module_config(module)
        if cfg["kdim"] != cfg["d_model"] or cfg["vdim"] != cfg["d_model"]:
            raise ValueError(
                "from_torch: this torch.nn.MultiheadAttention has kdim/vdim != embed_dim "
                "(cross-attention); use fastattn.MultiHeadAttention.from_torch"
            )
        m = cls(cfg["d_model"], cfg["num_heads"], bias=cfg["bias"],
                dtype=dtype if dtype is not None else cfg["dtype"])
        m.load_state_dict(state)
        return m

    def __repr__(self) -> str:
        return (
            f"MultiHeadSelfAttention(d_model={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, bias={self.bias}, dtype={self.dtype.name})"
        )

    def __call__(
        self,
        x,
        *args,
        attn_mask=None,
        key_padding_mask=None,
        is_causal: bool = False,
        need_weights: bool = False,
        average_attn_weights: bool = True,
        cache: Optional[KVCache] = None,
        window=None,
        alibi: bool = False,
        alibi_slopes=None,
    ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        if args:
            raise TypeError(
                "MultiHeadSelfAttention takes one input, m(x); for torch-style m(query, key, "
                "value) use fastattn.MultiHeadAttention (other options are keyword-only)"
            )
        if (attn_mask is None and key_padding_mask is None and is_causal is False
                and need_weights is False and average_attn_weights is True and cache is None
                and window is None and alibi is False and alibi_slopes is None):
            # the last plan checks, in C, that it fits this call (thread, thread
            # count, weights, x); after the GEMMs each Python operation here
            # costs microseconds, its code and data gone from the caches
            state = self._state
            plan = state.plan
            if plan is not None:
                y = plan.run_if(x, state.packed, threading.get_ident(),
                                threads.get_num_threads())
                if y is not None:
                    return y
            y = self._plain_forward(x)
            if y is not None:
                return y
        return self._forward(
            x, None, None, self_attention=True, attn_mask=attn_mask,
            key_padding_mask=key_padding_mask, is_causal=is_causal, need_weights=need_weights,
            average_attn_weights=average_attn_weights, cache=cache, window=window,
            alibi=alibi, alibi_slopes=alibi_slopes,
        )

    __call__.__doc__ = """Self-attention over ``x``.

        Parameters
        ----------
        x : ndarray, shape (B, N, D) or (N, D)
            Input sequence(s); cast to the module's dtype.
""" + _FORWARD_DOC + """
        Returns
        -------
        y : ndarray, same shape as ``x``
        weights : ndarray, only with ``need_weights``
        """


class MultiHeadAttention(_MultiHeadBase):
    """Multi-head attention of queries over separate keys and values (cross-attention),
    like ``torch.nn.MultiheadAttention(batch_first=True)``.

    Parameters
    ----------
    embed_dim : int
        Width of the queries and of the output, E.
    num_heads : int
        Query heads; ``head_dim = embed_dim // num_heads``.
    kdim, vdim : int, optional
        Widths of the key and value inputs (default ``embed_dim``).
    num_kv_heads : int, optional
        Key/value heads (grouped-query attention); must divide ``num_heads``.
    bias, dtype, seed
        As for :class:`MultiHeadSelfAttention`.

    Attributes
    ----------
    w_q (E, E), w_k (Dkv, kdim), w_v (Dkv, vdim), w_o (E, E), b_q ... b_o
        As in ``torch.nn.Linear``; ``Dkv = num_kv_heads * head_dim``.
        Read-only, changed and shared across threads as for
        :class:`MultiHeadSelfAttention`.
    """

    _FORMAT = "fastattn.MultiHeadAttention/1"
    _QUERY_ARG = "query"

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        num_kv_heads: Optional[int] = None,
        bias: bool = True,
        dtype: Any = np.float32,
        seed: Union[None, int, np.random.Generator] = None,
    ) -> None:
        cfg = self._init_config(embed_dim, num_heads, num_kv_heads, kdim, vdim, bias, dtype,
                                "embed_dim")
        self._allocate(**cfg)
        self.reset_parameters(seed)

    def config(self) -> Dict[str, Any]:
        """The constructor arguments that rebuild this module's shapes."""
        return {"embed_dim": self.embed_dim, "num_heads": self.num_heads,
                "num_kv_heads": self.num_kv_heads, "kdim": self.kdim, "vdim": self.vdim,
                "bias": self.bias, "dtype": self.dtype.name}

    @classmethod
    def _normalise_config(cls, cfg: Dict[str, Any]) -> Dict[str, Any]:
        return cls._init_config(cfg["embed_dim"], cfg["num_heads"], cfg["num_kv_heads"],
                                cfg["kdim"], cfg["vdim"], cfg["bias"], cfg["dtype"], "embed_dim")

    @classmethod
    def _from_config(cls, cfg: Dict[str, Any], initialise: bool = True) -> "MultiHeadAttention":
        m = cls.__new__(cls)
        m._allocate(**cls._normalise_config(cfg))
        return m

    @classmethod
    def from_torch(cls, module, *, dtype: Any = None) -> "MultiHeadAttention":
        """Build from a ``torch.nn.MultiheadAttention`` (any kdim/vdim) or a module
        laid out like the seed's class."""
        cfg, state = interop.torch_module_config(module)
        m = cls(cfg["d_model"], cfg["num_heads"], kdim=cfg["kdim"], vdim=cfg["vdim"],
                bias=cfg["bias"], dtype=dtype if dtype is not None else cfg["dtype"])
        m.load_state_dict(state)
        return m

    def __repr__(self) -> str:
        return (
            f"MultiHeadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"kdim={self.kdim}, vdim={self.vdim}, num_kv_heads={self.num_kv_heads}, "
            f"bias={self.bias}, dtype={self.dtype.name})"
        )

    def __call__(
        self,
        query,
        key,
        value,
        *,
        attn_mask=None,
        key_padding_mask=None,
        is_causal: bool = False,
        need_weights: bool = False,
        average_attn_weights: bool = True,
        cache: Optional[KVCache] = None,
        window=None,
        alibi: bool = False,
        alibi_slopes=None,
    ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        # the same array three times is self-attention, one fused projection,
        # where the module has one (kdim == vdim == embed_dim); otherwise key
        # and value are checked against kdim and vdim like any others
        same = key is query and value is query and self.fused
        return self._forward(
            query, key, value, self_attention=same, attn_mask=attn_mask,
            key_padding_mask=key_padding_mask, is_causal=is_causal, need_weights=need_weights,
            average_attn_weights=average_attn_weights, cache=cache, window=window,
            alibi=alibi, alibi_slopes=alibi_slopes,
        )

    __call__.__doc__ = """Attention of ``query`` over ``key`` and ``value``.

        Parameters
        ----------
        query : ndarray, shape (B, Lq, embed_dim) or (Lq, embed_dim)
        key : ndarray, shape (B, Lk, kdim) or (Lk, kdim)
        value : ndarray, shape (B, Lk, vdim) or (Lk, vdim)
""" + _FORWARD_DOC + """
        Returns
        -------
        y : ndarray, shape (B, Lq, embed_dim) (or (Lq, embed_dim))
        weights : ndarray, only with ``need_weights``
        """
