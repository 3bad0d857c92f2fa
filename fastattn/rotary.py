"""Rotary position embeddings (RoPE): the settings, the cos/sin tables the
kernels read, and :func:`apply_rotary` for queries and keys a user holds.

A module with ``rotary=Rotary(...)`` rotates Q and K inside its projection
kernel, as each finished tile of the product is written (the projection's
epilogue, see ``fa_rotary`` in ``_kernels/src/fa_common.h``): no pass of its
own over Q and K.  The kernel rotates adjacent pairs ``(2f, 2f + 1)``; the
half-split layout of Llama and GPT-NeoX, which pairs ``f`` with
``f + dim/2``, is brought to that layout by permuting the rows of the Q and K
weights once, when they are packed (:func:`pair_order`).  Scores ``q . k``
do not change when q and k are permuted alike, so only the keys a KV cache
holds are in that internal order.

Angles are computed in float64 and rounded once into the table of the
computation's dtype.  (Hugging Face computes them in float32: at position p
the two differ by about ``p * 6e-8`` radians.)
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from . import _policy, threads
from ._dispatch import kernels
from ._dtypes import compute_dtype, kernel_view
from ._validate import float_array, shape_str, to_array

__all__ = ["Rotary", "apply_rotary"]

# Scaling variants and the keys each takes beside "rope_type" (Hugging Face's
# rope-parameter names, so a model's config carries over as it is written).
_SCALING_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "attention_factor", "truncate"},
}
_REQUIRED_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings"},
}
# Keys of a Hugging Face rope-parameters dict that are not about scaling.
_IGNORED_KEYS = {"rope_theta", "partial_rotary_factor", "type", "rope_type"}

# Positions the kept table does not cover, past this many rows and sparse
# (fewer than a quarter of the rows a table would need), get a table of just
# the positions a call names instead of growing the kept one.
_DENSE_ROWS = 1 << 16


def _real(value, name: str, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {value!r}")
    return v


class Rotary:
    """Rotary position embedding settings (RoPE), as current decoder models use them.

    Parameters
    ----------
    dim : int
        Features of each head that rotate (``rotary_dim``): even, at most the
        head width; smaller than it for partial rotary (the first ``dim``
        features rotate, the rest pass unchanged).
    theta : float
        The base of the frequencies: pair ``f`` turns by
        ``position * theta ** (-2f / dim)`` radians.
    interleaved : bool
        False (Llama, Qwen, Mistral, Gemma, GPT-OSS, GPT-NeoX): feature ``f``
        pairs with ``f + dim/2``.  True (GPT-J): ``2f`` pairs with ``2f + 1``.
    scaling : dict, optional
        Context-extension scaling in Hugging Face's rope-parameters form:
        ``{"rope_type": "linear", "factor": 4.0}``; ``"llama3"`` with
        ``factor``, ``low_freq_factor``, ``high_freq_factor``,
        ``original_max_position_embeddings``; ``"yarn"`` with ``factor``,
        ``original_max_position_embeddings`` and optionally ``beta_fast``
        (32), ``beta_slow`` (1), ``mscale``, ``mscale_all_dim``,
        ``attention_factor``, ``truncate`` (True).  ``"type"`` is accepted
        for ``"rope_type"``; ``rope_theta`` and ``partial_rotary_factor`` in
        the dict are ignored (pass them as ``theta`` and ``dim``).

    Attributes
    ----------
    inv_freq : ndarray, float64 (dim/2,)
        Radians per position of each pair, after scaling.
    attention_factor : float
        Factor on cos and sin (YaRN's; 1 otherwise).
    """

    def __init__(self, dim: int, *, theta: float = 10000.0, interleaved: bool = False,
                 scaling: Optional[Mapping[str, Any]] = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise TypeError(f"rotary dim must be an int, got {dim!r}")
        if dim < 2 or dim % 2:
            raise ValueError(f"rotary dim must be even and >= 2 (features rotate in pairs), "
                             f"got {dim}")
        if not isinstance(interleaved, (bool, np.bool_)):
            raise TypeError(f"interleaved must be True or False, got {interleaved!r}")
        self.dim = int(dim)
        self.theta = _real(theta, "theta")
        self.interleaved = bool(interleaved)
        self.scaling = self._check_scaling(scaling)
        with np.errstate(all="ignore"):  # (refused just below when not finite)
            self.inv_freq, self.attention_factor = self._frequencies()
        if not (np.isfinite(self.inv_freq).all() and math.isfinite(self.attention_factor)):
            raise ValueError(f"rotary settings give non-finite frequencies (theta={theta!r}, "
                             f"scaling={scaling!r}): a scaling factor too small or too large")
        self.inv_freq.flags.writeable = False
        self._tables: Dict[str, np.ndarray] = {}
        # fixed from here on: modules pack their weights and tables from them
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError(f"a Rotary's settings are fixed once it is made (modules and "
                                 f"tables depend on them); make a new Rotary instead of "
                                 f"setting {name}")
        object.__setattr__(self, name, value)

    # ---- settings --------------------------------------------------------------------

    @staticmethod
    def _check_scaling(scaling) -> Optional[Dict[str, Any]]:
        if scaling is None:
            return None
        if not isinstance(scaling, Mapping):
            raise TypeError(f"scaling must be a dict (Hugging Face's rope parameters) or None, "
                            f"got {type(scaling).__name__}")
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in _SCALING_KEYS:
            raise ValueError(f"scaling rope_type {kind!r} is not supported; fastattn has "
                             f"{sorted(_SCALING_KEYS)}")
        # a key given as None counts as not given
        given = {key for key, value in scaling.items() if value is not None} - _IGNORED_KEYS
        unknown = given - _SCALING_KEYS[kind]
        if unknown:
            raise ValueError(f"scaling of rope_type {kind!r} takes {sorted(_SCALING_KEYS[kind])}, "
                             f"got unknown keys {sorted(unknown)}")
        missing = _REQUIRED_KEYS[kind] - given
        if missing:
            raise ValueError(f"scaling of rope_type {kind!r} needs {sorted(missing)}")
        out: Dict[str, Any] = {"rope_type": kind}
        for key in sorted(given):
            value = scaling[key]
            if value is None:
                continue
            if key == "truncate":
                if not isinstance(value, (bool, np.bool_)):
                    raise TypeError(f"scaling truncate must be True or False, got {value!r}")
                out[key] = bool(value)
            else:
                # (an mscale of 0 is meaningful: it turns that factor off)
                out[key] = _real(value, f"scaling {key}", positive=not key.startswith("mscale"))
        if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
            raise ValueError("scaling high_freq_factor must exceed low_freq_factor")
        return out if kind != "default" else None

    def _frequencies(self) -> Tuple[np.ndarray, float]:
        """(inv_freq, attention_factor) in float64, after the scaling."""
        half = self.dim // 2
        exponents = np.arange(half, dtype=np.float64) * 2.0 / self.dim
        inv = self.theta ** -exponents
        s = self.scaling
        if s is None:
            return inv, 1.0
        kind, factor = s["rope_type"], s["factor"]
        if kind == "linear":
            return inv / factor, 1.0
        if kind == "llama3":
            old = s["original_max_position_embeddings"]
            lo, hi = s["low_freq_factor"], s["high_freq_factor"]
            wavelen = 2 * math.pi / inv
            # long waves (past old / lo) are interpolated by the factor, short
            # ones (under old / hi) kept, and the band between blended
            smooth = np.clip((old / wavelen - lo) / (hi - lo), 0.0, 1.0)
            return (1 - smooth) * inv / factor + smooth * inv, 1.0
        # yarn: per pair, a blend of interpolated (inv / factor) and kept
        # frequencies, by how many turns the pair makes over the original
        # context: more than beta_fast kept, fewer than beta_slow interpolated
        old = s["original_max_position_embeddings"]
        fast, slow = s.get("beta_fast", 32.0), s.get("beta_slow", 1.0)

        def pair_of_turns(turns: float) -> float:
            return self.dim * math.log(old / (turns * 2 * math.pi)) / (2 * math.log(self.theta))

        lo, hi = pair_of_turns(fast), pair_of_turns(slow)
        if s.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, self.dim - 1)
        if hi == lo:
            hi += 0.001  # a ramp of zero width would divide by zero
        ramp = np.clip((np.arange(half, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
        keep = 1 - ramp
        inv = (inv / factor) * (1 - keep) + inv * keep

        def mscale(scale: float, m: float = 1.0) -> float:
            return 0.1 * m * math.log(scale) + 1.0 if scale > 1 else 1.0

        if "attention_factor" in s:
            att = s["attention_factor"]
        elif s.get("mscale") and s.get("mscale_all_dim"):
            att = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            att = mscale(factor)
        return inv, float(att)

    def config(self) -> Dict[str, Any]:
        """The constructor arguments (``Rotary(**r.config())`` rebuilds it)."""
        return {"dim": self.dim, "theta": self.theta, "interleaved": self.interleaved,
                "scaling": None if self.scaling is None else dict(self.scaling)}

    def __eq__(self, other) -> bool:
        return isinstance(other, Rotary) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"Rotary({args})"

    def __getstate__(self):
        return self.config()

    def __setstate__(self, state):
        object.__setattr__(self, "_frozen", False)
        self.__init__(**state)

    # ---- tables ------------------------------------------------------------------------

    def _table_for(self, positions: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """(n, 2 * dim) of dtype, for each of ``positions`` (float64 angles,
        times the attention factor): cos of pair f at 2f and 2f + 1, then
        -sin and sin at dim + 2f and dim + 2f + 1 (fa_rotary's layout)."""
        angles = positions.astype(np.float64)[:, None] * self.inv_freq[None, :]
        cos, sin = np.cos(angles) * self.attention_factor, np.sin(angles) * self.attention_factor
        table = np.empty((len(positions), 2 * self.dim), dtype)
        table[:, 0:self.dim:2] = cos
        table[:, 1:self.dim:2] = cos
        table[:, self.dim::2] = -sin
        table[:, self.dim + 1::2] = sin
        return table

    def rows(self, positions: np.ndarray, dtype) -> Tuple[np.ndarray, np.ndarray]:
        """(table, index): a table in the computation's dtype and, per entry of
        ``positions`` (int64, >= 0, flattened), the table row that holds its
        angles, as the projection kernel reads them.  Tables of positions
        0..n-1 are kept (n doubling as needed); sparse large positions get a
        table of their own."""
        dtype = np.dtype(dtype)
        pos = positions.reshape(-1)
        top = int(pos.max()) + 1 if pos.size else 1
        table = self._tables.get(dtype.str)
        if table is not None and table.shape[0] >= top:
            # (each decoding step far into a long context lands here)
            return table, np.ascontiguousarray(pos, dtype=np.int64)
        if top > _DENSE_ROWS and top > 4 * pos.size:
            uniq, index = np.unique(pos, return_inverse=True)
            return self._table_for(uniq, dtype), np.ascontiguousarray(index, dtype=np.int64)
        if table is None or table.shape[0] < top:
            # (two threads growing it at once each build a whole table; the
            # one kept last serves both, so no lock is needed)
            n = 1 << max(top - 1, 1).bit_length()
            table = self._table_for(np.arange(n), dtype)
            self._tables[dtype.str] = table
        return table, np.ascontiguousarray(pos, dtype=np.int64)

    def pair_order(self, head_dim: int) -> np.ndarray:
        """The order of one head's features in which rotated pairs are
        adjacent: identity when interleaved; for the half-split layout
        ``[0, dim/2, 1, dim/2 + 1, ...]`` then the unrotated rest."""
        half = self.dim // 2
        order = np.arange(head_dim)
        if not self.interleaved:
            order[:self.dim] = np.stack([np.arange(half), np.arange(half) + half], 1).reshape(-1)
        return order


def check_rotary(rotary, head_dim: int) -> Optional[Rotary]:
    """A module's ``rotary=``: None, a :class:`Rotary`, or its config dict;
    checked against the head width."""
    if rotary is None:
        return None
    if isinstance(rotary, Mapping):
        rotary = Rotary(**rotary)
    if not isinstance(rotary, Rotary):
        raise TypeError(f"rotary must be a fastattn.Rotary (or its config dict) or None, got "
                        f"{type(rotary).__name__}")
    if head_dim % 2 or rotary.dim > head_dim:
        raise ValueError(f"rotary dim ({rotary.dim}) must be at most head_dim ({head_dim}), and "
                         f"head_dim even, to rotate pairs within each head")
    return rotary


def check_positions(positions, batch: int, length: int, start=0) -> np.ndarray:
    """The position of each of ``batch * length`` rows, int64 (B, L): 0..L-1
    after ``start`` (an int, or one per sequence) by default, else
    ``positions`` ((L,) or (B, L) ints >= 0)."""
    if positions is None:
        start = np.asarray(start, dtype=np.int64).reshape(-1, 1)
        return np.broadcast_to(start + np.arange(length, dtype=np.int64), (batch, length))
    arr = to_array(positions, "positions")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"positions must be an integer array, got dtype {arr.dtype}")
    if arr.shape not in ((length,), (batch, length), (1, length)):
        raise ValueError(f"positions must have shape ({length},) or ({batch}, {length}) (one per "
                         f"query position), got {shape_str(arr.shape)}")
    if arr.size and (arr.min() < 0 or arr.max() >= 2 ** 40):
        raise ValueError(f"positions must be in [0, 2**40), got values from {arr.min()} to "
                         f"{arr.max()}")
    return np.broadcast_to(arr.astype(np.int64, copy=False), (batch, length))


def apply_rotary(x, rotary: Rotary, positions=None) -> np.ndarray:
    """Rotates queries or keys a user holds, as a module with ``rotary`` does
    inside its projection: returns a new array.

    Parameters
    ----------
    x : ndarray, shape (..., L, E)
        Heads of queries or keys (e.g. (B, H, L, E)); float32, float64,
        bfloat16 or float16.  The first ``rotary.dim`` features rotate.
    rotary : Rotary
    positions : int array, optional
        Position of each of the L rows, shape (L,) or broadcastable to
        ``x.shape[:-1]``; default 0..L-1.
    """
    if not isinstance(rotary, Rotary):
        raise TypeError(f"rotary must be a fastattn.Rotary, got {type(rotary).__name__}")
    arr = float_array(x, "x")
    if arr.ndim < 2:
        raise ValueError(f"x must be (..., L, E), got {shape_str(arr.shape)}")
    L, E = arr.shape[-2:]
    check_rotary(rotary, E)
    if positions is None:
        pos = np.arange(L, dtype=np.int64)
    else:
        pos = to_array(positions, "positions")
        if pos.dtype.kind not in "iu":
            raise TypeError(f"positions must be an integer array, got dtype {pos.dtype}")
        if pos.size and (pos.min() < 0 or pos.max() >= 2 ** 40):
            raise ValueError(f"positions must be in [0, 2**40), got values from {pos.min()} to "
                             f"{pos.max()}")
    try:
        pos = np.broadcast_to(pos.astype(np.int64, copy=False), arr.shape[:-1])
    except ValueError:
        raise ValueError(f"positions of shape {shape_str(np.shape(positions))} do not "
                         f"broadcast to x's rows {shape_str(arr.shape[:-1])}") from None
    cdtype = compute_dtype(arr.dtype)
    order = rotary.pair_order(E)
    # pairs made adjacent (a copy in the computation's dtype, which the
    # kernel rotates in place), then the caller's feature order restored
    work = np.ascontiguousarray(arr[..., order], dtype=cdtype).reshape(-1, E)
    if work.size:
        table, index = rotary.rows(pos, cdtype)
        kernels.rotate(work, (table, index, E, E, rotary.dim), _policy.ROTATE_ROWS,
                       threads.get_num_threads())
    out = np.empty(arr.shape, cdtype)
    out[..., order] = work.reshape(arr.shape)
    return out.astype(arr.dtype, copy=False)
