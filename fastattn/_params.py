"""A module's parameters: copy-on-write snapshots, their storage, and packing.

One :class:`Params` object holds every weight and bias of one moment, as
read-only arrays over immutable bytes (so neither they nor the views handed
out, ``m.w_q`` ..., can be made writable, and the packed copies can never fall
behind them), together with the packed copies and the plans made from them.
A call reads ``self._state`` once and uses only that object, so it computes
with one weight set, without taking a lock, while another thread changes the
weights.  A change (assignment ``m.w_q = new``, ``load_state_dict``,
``reset_parameters``) builds a new object and swaps it in with one
assignment, under the module's writer lock: the packed weights and plans of
the old state go with it, which is the whole of invalidation.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _policy
from ._dispatch import kernels
from ._dtypes import compute_dtype, kernel_view
from ._locks import ForkSafeLock
from ._validate import cast_checked, check_sinks, ensure_memory, float_param, shape_str

__all__ = ["Params", "Parameters", "param_shapes", "ReadOnlyParameter"]

# which width is each projection's input (its fan-in)
_IN_DIM = {"q": "embed_dim", "k": "kdim", "v": "vdim", "o": "q_dim"}


class Params:
    """A module's parameters at one moment; never changed, a weight change
    makes a new one.

    ``arrays`` maps storage names (``w_qkv`` or ``w_q``/``w_k``/``w_v``,
    ``w_o``, ``b_qkv``, ``b_o``) to arrays made by :func:`frozen`.
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


def frozen(parts: Sequence[np.ndarray]) -> np.ndarray:
    """``parts`` (arrays of one dtype and trailing shape) stacked along axis 0,
    in a read-only array over an immutable bytes object, the one copy made:
    numpy refuses to make it, or any view of it, writable."""
    # (through bytes views: the buffer protocol knows no bfloat16 format)
    data = b"".join([memoryview(np.ascontiguousarray(p).reshape(-1).view(np.uint8))
                     for p in parts])
    return np.frombuffer(data, parts[0].dtype).reshape((-1,) + parts[0].shape[1:])


def _plain(value):
    """``value`` with every ReadOnlyParameter in it (nested in tuples, lists
    and dicts, as NumPy functions take them) as a plain ndarray view."""
    if isinstance(value, ReadOnlyParameter):
        return value.view(np.ndarray)
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class ReadOnlyParameter(np.ndarray):
    """What ``m.w_q`` ... ``m.b_o`` and ``m.sinks`` return: a read-only copy of
    a parameter whose message, when written into, says how to change the
    parameter (numpy's own, "assignment destination is read-only", does not).

    Otherwise it is a plain ndarray: ufuncs, reductions and NumPy functions
    compute on it as on one and return plain ndarrays, as do ``copy()`` and
    ``astype()``; ``np.asarray`` and ``torch.from_numpy`` read it, it prints
    and pickles as one.  Views of it (``m.w_q[0]``, ``m.w_q.T``) stay of
    this type, so that a write through them gets the same message.
    """

    _param_name = "parameter"

    def __array_finalize__(self, obj) -> None:
        self._param_name = getattr(obj, "_param_name", "parameter")

    def _refusal(self) -> ValueError:
        name = self._param_name
        return ValueError(
            f"{name} is a read-only copy of the module's parameter: writing into it would "
            f"change nothing.  Assign a new array instead: m.{name} = new (for an edit, "
            f"new = m.{name}.copy(); new[...] = ...; m.{name} = new), or use "
            f"m.load_state_dict(...)")

    def __setitem__(self, key, value) -> None:
        if not self.flags.writeable:
            raise self._refusal()
        np.ndarray.__setitem__(self, key, value)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if out is not None:
            for o in out:
                # m.w_q += 1, np.add(a, b, out=m.w_q)
                if isinstance(o, ReadOnlyParameter) and not o.flags.writeable:
                    raise o._refusal()
            kwargs["out"] = _plain(out)
        result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
        if out is not None and method != "at":
            return out[0] if len(out) == 1 else out
        return result

    def __array_function__(self, func, types, args, kwargs):
        return func(*_plain(args), **_plain(kwargs))

    def copy(self, order="C") -> np.ndarray:
        return self.view(np.ndarray).copy(order)

    def astype(self, *args, **kwargs) -> np.ndarray:
        return self.view(np.ndarray).astype(*args, **kwargs)

    def __copy__(self) -> np.ndarray:
        return self.view(np.ndarray).copy()

    def __deepcopy__(self, memo) -> np.ndarray:
        return self.view(np.ndarray).copy()

    def __reduce__(self):
        # pickled as a plain array: a pickle names no class of fastattn's
        return self.view(np.ndarray).copy().__reduce__()

    def __repr__(self) -> str:
        return repr(self.view(np.ndarray))


def param_shapes(cfg: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Parameter shapes (w_q ... b_o, as torch.nn.Linear lays them out) of a
    checked config (``fastattn._validate.module_config``); allocates nothing."""
    D, E = cfg["embed_dim"], cfg["head_dim"]
    qd, kv = cfg["num_heads"] * E, cfg["num_kv_heads"] * E
    shapes = {"w_q": (qd, D), "w_k": (kv, cfg["kdim"]), "w_v": (kv, cfg["vdim"]), "w_o": (D, qd)}
    if cfg["bias"]:
        shapes.update({"b_q": (qd,), "b_k": (kv,), "b_v": (kv,), "b_o": (D,)})
    if cfg.get("sinks"):
        shapes["sinks"] = (cfg["num_heads"],)
    return shapes


def _param_property(name: str) -> property:
    return property(lambda self: self._public_view(name),
                    lambda self, value: self._set_param(name, value),
                    doc=f"The {name} parameter: a read-only copy (writing into it raises "
                        f"ValueError); assign to replace it, m.{name} = new.")


class Parameters:
    """The parameter half of a module: config attributes, storage layout,
    views, staged changes, packing on first use."""

    def _init_params(self, embed_dim: int, num_heads: int, num_kv_heads: int, kdim: int,
                     vdim: int, bias: bool, dtype: np.dtype,
                     precision: Optional[np.dtype] = None, head_dim: Optional[int] = None,
                     sinks: bool = False) -> None:
        """Config, and no parameters yet: every constructor loads a full set
        (reset_parameters or load_state_dict) before the module is used."""
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads if head_dim is None else head_dim
        self.has_sinks = bool(sinks)
        self.kdim = kdim
        self.vdim = vdim
        self.bias = bool(bias)
        self.dtype = np.dtype(dtype)
        self.precision = precision
        # the products' operands: the projections' inputs, the weights as
        # packed, and the activations between the kernels (Q, K, V, merged)
        self._act_dtype = precision if precision is not None else self.dtype
        self._shapes = param_shapes(dict(embed_dim=embed_dim, num_heads=num_heads,
                                         num_kv_heads=num_kv_heads, kdim=kdim, vdim=vdim,
                                         bias=bias, head_dim=self.head_dim,
                                         sinks=self.has_sinks))
        ensure_memory(list(self._shapes.values()), self.dtype.itemsize,
                      "the module's parameters")
        self._state: Optional[Params] = None
        # serialises weight changes, each of which reads the current state
        # and builds the next; calls never take it
        self._lock = ForkSafeLock()

    @property
    def q_dim(self) -> int:
        """Width of the Q projection and of the merged heads: ``num_heads * head_dim``
        (``embed_dim`` unless ``head_dim`` was given)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the K and V projections: ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    @property
    def fused(self) -> bool:
        """True when kdim == vdim == embed_dim: one stacked Q/K/V weight."""
        return self.kdim == self.embed_dim and self.vdim == self.embed_dim

    def _slices(self) -> Dict[str, slice]:
        D, kv = self.q_dim, self.kv_dim
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
        if self.has_sinks:
            layout["sinks"] = ("sinks",)
        return layout

    def _param_view(self, name: str, state: Params) -> Optional[np.ndarray]:
        """Parameter (w_q ...) or storage array (w_qkv ...) ``name`` of
        ``state``; None for a bias the module lacks."""
        arrays = state.arrays
        if name in arrays:
            return arrays[name]
        if name not in self._shapes:
            return None
        return arrays[name[0] + "_qkv"][self._slices()[name[2]]]

    def _public_view(self, name: str) -> Optional[np.ndarray]:
        # A read-only copy of its own: numpy refuses to make it writable, and
        # a writer that ignores the flag (torch.from_numpy(m.w_o).mul_(2))
        # changes only this copy, never the storage that state_dict, save and
        # the packed weights share.  Its type makes a write into it
        # (m.w_q[:] = 0) point to assignment.
        view = self._param_view(name, self._state)
        if view is None:
            return None
        public = frozen([view]).view(ReadOnlyParameter)
        public._param_name = name
        return public

    def _staged_param(self, name: str, value, key: str) -> np.ndarray:
        """``value`` checked against parameter ``name`` and cast to the module's
        dtype, so that building the new state cannot fail half-way; ``key``
        is what messages call it (a torch name, say)."""
        shape = self._shapes[name]
        arr = float_param(value, key)
        if arr.shape != shape:
            raise ValueError(
                f"{key}: expected shape {shape_str(shape)}, got {shape_str(arr.shape)}"
            )
        if name == "sinks":
            # as the function refuses them: a NaN or +inf sink makes every output NaN
            check_sinks(arr, shape[0], compute_dtype(self.dtype))
        cast = cast_checked(arr, self.dtype, key)
        if name.startswith("w_") and self._act_dtype != self.dtype:
            # with a precision, weights are rounded to it when packed
            # (_packed_weight): refused here, as the module's own dtype
            # would refuse them, rather than packed as infinities
            cast_checked(cast, self._act_dtype,
                         f"{key} in precision={self._act_dtype.name}")
        return cast

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
                    arrays[key] = frozen([staged[n] if n in staged else self._param_view(n, old)
                                          for n in names])
            self._state = Params(arrays)

    def _set_param(self, name: str, value) -> None:
        if name not in self._shapes:
            if value is None:
                return
            built = "sinks=False" if name == "sinks" else "bias=False"
            raise ValueError(f"{name}: this module was built with {built} and has no {name}")
        self._store_params({name: self._staged_param(name, value, name)})

    w_q = _param_property("w_q")
    w_k = _param_property("w_k")
    w_v = _param_property("w_v")
    w_o = _param_property("w_o")
    b_q = _param_property("b_q")
    b_k = _param_property("b_k")
    b_v = _param_property("b_v")
    b_o = _param_property("b_o")
    sinks = _param_property("sinks")

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
            if name == "sinks":
                # a sink of logit 0 weighs as one key of score 0
                staged[name] = np.zeros(shape, self.dtype)
                continue
            bound = 1.0 / math.sqrt(getattr(self, _IN_DIM[name[2]]))
            staged[name] = rng.uniform(-bound, bound, size=shape).astype(self.dtype, copy=False)
        self._store_params(staged)

    def _rotary_rows(self, part: str) -> Optional[np.ndarray]:
        """The order of projection ``part``'s output rows as packed: Q and K
        heads in rotary pair order where the module rotates a half-split
        layout, else None (as given)."""
        rotary = getattr(self, "rotary", None)
        if rotary is None or rotary.interleaved or part not in ("qkv", "q", "k"):
            return None
        E = self.head_dim
        heads = {"qkv": self.num_heads + self.num_kv_heads, "q": self.num_heads,
                 "k": self.num_kv_heads}[part]
        order = (np.arange(heads)[:, None] * E + rotary.pair_order(E)[None, :]).reshape(-1)
        if part == "qkv":
            order = np.concatenate([order, np.arange(heads * E, self.q_dim + 2 * self.kv_dim)])
        return order

    def _packed_weight(self, state: Params, part: str):
        """(packed weight, padded bias) of projection ``part`` ("qkv", "q", "k",
        "v" or "o") of ``state``, packed on first use."""
        entry = state.packed.get(part)
        if entry is None:
            w = self._param_view("w_" + part, state)
            b = self._param_view("b_" + part, state)
            order = self._rotary_rows(part)
            if order is not None:
                # rotated pairs made adjacent (see fastattn.rotary)
                w = w[order]
                b = None if b is None else b[order]
            if w.dtype != self._act_dtype:
                w = w.astype(self._act_dtype)  # mixed precision: rounded once, here
            entry = kernels.pack_weight(kernel_view(np.ascontiguousarray(w)),
                                        kernel_view(None if b is None else np.ascontiguousarray(b)),
                                        _policy.weight_pairs(kernels, w.dtype))
            entry = state.packed.setdefault(part, entry)
        return entry
