"""KVCache: the keys and values of past positions, for incremental decoding."""

from __future__ import annotations

import numpy as np

from ._locks import ForkSafeLock
from ._dtypes import compute_dtype
from ._validate import (cast_checked, check_flag, ensure_memory, float_array, float_dtype,
                        positive_int, shape_str)

__all__ = ["KVCache"]


class KVCache:
    """Projected keys and values of the positions decoded so far.

    Made by ``module.new_cache(batch_size, max_len)``; a module called with
    ``cache=`` appends the keys and values of its new positions and attends
    causally over every cached one.  Storage is (B, Hkv, capacity, E) per
    tensor: a decoding step streams each head's keys from one contiguous run
    of memory, where a (B, capacity, Hkv * E) layout would make it gather one
    short row per position (docs/performance.md, "Layouts and buffers").

    Parameters
    ----------
    batch_size, max_len : int
        Sequences decoded together, and positions the cache holds.
    num_kv_heads, head_dim : int
        Of the module the cache belongs to.
    dtype : float32, float64, bfloat16 or float16
        What keys and values are held in (a module's ``new_cache`` passes the
        type its activations are in unless told otherwise).
    grow : bool
        When full, double the capacity instead of raising.

    Each sequence has a length of its own (``lengths``): a call with
    ``lengths=`` appends a different number of positions to each (ragged
    prompts), ``reset(i)`` frees one sequence's slot for a new request, and
    ``reorder`` permutes or duplicates sequences (beam search).  Sequences at
    different lengths decode together, each at its own position.

    A cache belongs to one sequence batch, so to one call at a time: a call
    (or ``append``, ``reset``, ``reorder``) that finds it in use by another
    thread's call raises RuntimeError instead of mixing two calls' positions.
    """

    def __init__(self, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype, grow: bool = False) -> None:
        self.batch_size = positive_int(batch_size, "batch_size")
        max_len = positive_int(max_len, "max_len")
        self.num_kv_heads = positive_int(num_kv_heads, "num_kv_heads")
        self.head_dim = positive_int(head_dim, "head_dim")
        self.dtype = float_dtype(dtype)
        self.grow = check_flag(grow, "grow")
        shape = (self.batch_size, self.num_kv_heads, max_len, self.head_dim)
        ensure_memory([shape, shape], self.dtype.itemsize, "the cache")
        self._k = np.empty(shape, dtype=self.dtype)
        self._v = np.empty_like(self._k)
        self._lengths = np.zeros(self.batch_size, dtype=np.int64)
        self._busy = ForkSafeLock()

    def __len__(self) -> int:
        """Positions cached so far: the longest sequence's (see ``lengths``)."""
        return int(self._lengths.max())

    @property
    def _length(self) -> int:
        return int(self._lengths.max())

    @_length.setter
    def _length(self, value: int) -> None:
        self._lengths[:] = value

    @property
    def lengths(self) -> np.ndarray:
        """Positions each sequence holds, int64 (batch_size,) (a copy)."""
        return self._lengths.copy()

    @property
    def uniform(self) -> bool:
        """Whether every sequence holds as many positions."""
        return bool((self._lengths == self._lengths[0]).all())

    @property
    def capacity(self) -> int:
        """Positions the cache can hold before it is full (or grows)."""
        return self._k.shape[2]

    def reset(self, index=None) -> None:
        """Forget the cached positions of every sequence, or of sequence(s)
        ``index`` (an int or ints: a freed slot for a new request); the
        storage is kept."""
        rows = self._batch_indices(index, "index") if index is not None else slice(None)
        with self._claim():
            self._lengths[rows] = 0

    def reorder(self, indices) -> None:
        """Sequence b becomes what sequence ``indices[b]`` was, for every b
        (a permutation, or duplicates: beam search keeping its best beams).

        Only the positions each kept sequence holds are copied, once; the
        cache is unchanged when ``indices`` is out of range or not
        ``batch_size`` long (ValueError naming it)."""
        idx = self._batch_indices(indices, "indices")
        if idx.shape != (self.batch_size,):
            raise ValueError(f"indices must hold one source sequence per sequence, shape "
                             f"({self.batch_size},), got {shape_str(idx.shape)}")
        with self._claim():
            if (idx == np.arange(self.batch_size)).all():
                return
            lengths = self._lengths[idx]
            # new storage, filled with each kept sequence's positions only:
            # in place, a duplicate would read a row already overwritten
            k, v = np.empty_like(self._k), np.empty_like(self._v)
            for b, (src, n) in enumerate(zip(idx, lengths)):
                k[b, :, :n] = self._k[src, :, :n]
                v[b, :, :n] = self._v[src, :, :n]
            self._k, self._v, self._lengths = k, v, lengths

    def _batch_indices(self, index, name: str) -> np.ndarray:
        """``index`` as int64 sequence numbers in range, or a ValueError /
        TypeError naming ``name``."""
        arr = np.asarray(index)
        if arr.size == 0 and arr.ndim == 1:
            return arr.astype(np.int64)  # no sequence: nothing to do
        if arr.ndim > 1:
            raise ValueError(f"{name} must be an int or a 1-D array of sequence numbers, got "
                             f"shape {arr.shape}")
        if arr.dtype == np.bool_ or arr.dtype.kind not in "iu":
            raise TypeError(f"{name} must be an int or an integer array of sequence numbers, "
                            f"got {index!r}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.batch_size):
            raise ValueError(f"{name} must be in [0, {self.batch_size}) (the cache holds "
                             f"{self.batch_size} sequences), got {index!r}")
        return arr.astype(np.int64)

    def keys(self) -> np.ndarray:
        """Cached keys as a (B, Hkv, len, E) view (len the longest sequence's:
        past its own length, a sequence's rows are unused).

        A module with half-split rotary embeddings (``Rotary(interleaved=
        False)``) keeps each head's features in the kernel's pair order,
        ``rotary.pair_order(head_dim)``: keys read here, or given to
        ``append``, are in that order (the scores do not depend on it)."""
        return self._k[:, :, : self._length]

    def values(self) -> np.ndarray:
        """Cached values as a (B, Hkv, len, E) view (as ``keys``)."""
        return self._v[:, :, : self._length]

    def check(self, batch_size: int, dtype: np.dtype, num_kv_heads: int, head_dim: int) -> None:
        """Raise ValueError naming ``cache`` if it does not fit this call."""
        if (num_kv_heads, head_dim) != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"cache holds {self.num_kv_heads} heads of {self.head_dim}, the module has "
                f"{num_kv_heads} of {head_dim}: make it with this module's new_cache()"
            )
        if batch_size != self.batch_size:
            raise ValueError(
                f"cache was made for batch size {self.batch_size}, got input of batch size "
                f"{batch_size}"
            )
        # a 16-bit cache is widened to float32 as its blocks are read: it
        # serves modules that compute in float32, as a float32 cache does
        dtype = np.dtype(dtype)
        if compute_dtype(self.dtype) != compute_dtype(dtype):
            fits = ("float32, bfloat16 or float16" if compute_dtype(dtype) == np.float32
                    else dtype.name)
            raise ValueError(f"cache dtype {self.dtype} does not fit a module whose activations "
                             f"are {dtype} (computed in {compute_dtype(dtype)}): its cache "
                             f"holds {fits}")

    def _claim(self) -> "_Claim":
        """Holds the cache for one call (``with cache._claim():``): its length
        read, its append, its attention over the keys and a rollback on error
        must not interleave with another call's, which would lose or mix
        positions.  Refuses rather than waits: two calls on one cache at once
        are a mistake, and the order they would run in is not the sequence's."""
        return _Claim(self._busy)

    def append(self, k_new: np.ndarray, v_new: np.ndarray) -> None:
        """Store T new positions; k_new and v_new are float arrays of shape
        (B, T, Hkv * E), cast to the cache's dtype.

        Raises TypeError or ValueError, naming the argument, for anything else
        (no broadcasting: one sequence's keys never fill another's rows)."""
        width = self.num_kv_heads * self.head_dim
        arrays = []
        for name, a in (("k_new", k_new), ("v_new", v_new)):
            a = float_array(a, name, self.dtype)
            if a.ndim != 3 or a.shape[0] != self.batch_size or a.shape[2] != width:
                raise ValueError(f"{name} must have shape ({self.batch_size}, T, {width}), "
                                 f"got {shape_str(a.shape)}")
            arrays.append(a)
        if arrays[0].shape[1] != arrays[1].shape[1]:
            raise ValueError(f"k_new and v_new must hold as many positions, got "
                             f"{shape_str(arrays[0].shape)} and {shape_str(arrays[1].shape)}")
        with self._claim():
            self._append(*arrays)

    def _reserve(self, end: int, T: int) -> None:
        """Room for ``end`` positions: grows (or raises, naming the shortfall)."""
        if end <= self.capacity:
            return
        if not self.grow:
            raise ValueError(
                f"cache is full: it holds {self.capacity} positions, {self._length} used, "
                f"and cannot take {T} more (make it with a larger max_len, or grow=True)"
            )
        capacity = max(end, 2 * self.capacity)
        shape = self._k.shape[:2] + (capacity, self._k.shape[3])
        ensure_memory([shape, shape], self.dtype.itemsize, "the grown cache")
        # both allocated before either replaces the old: a failure leaves
        # the cache as it was
        k, v = np.empty(shape, self.dtype), np.empty(shape, self.dtype)
        used = self._length
        k[:, :, :used] = self._k[:, :, :used]
        v[:, :, :used] = self._v[:, :, :used]
        self._k, self._v = k, v

    def _append(self, k_new: np.ndarray, v_new: np.ndarray, counts=None) -> None:
        """append, for a caller that holds the cache (see _claim): all T
        positions of k_new and v_new (B, T, Hkv * E) to every sequence, or,
        with ``counts`` (B,), the first counts[b] of them to sequence b.

        A module's keys and values may be of a wider type than the cache's:
        a finite one the cache would hold as inf (float32 above 65504 in a
        float16 cache) raises ValueError before anything is stored."""
        where = f"for the {self.dtype.name} cache"
        k_new = cast_checked(k_new, self.dtype, f"keys {where}")
        v_new = cast_checked(v_new, self.dtype, f"values {where}")
        B, T = k_new.shape[0], k_new.shape[1]
        H, E = self.num_kv_heads, self.head_dim
        k4 = k_new.reshape(B, T, H, E).transpose(0, 2, 1, 3)
        v4 = v_new.reshape(B, T, H, E).transpose(0, 2, 1, 3)
        if counts is None and self.uniform:
            start = self._length
            self._reserve(start + T, T)
            self._k[:, :, start:start + T] = k4
            self._v[:, :, start:start + T] = v4
            self._lengths += T
            return
        counts = np.full(B, T, np.int64) if counts is None else counts
        ends = self._lengths + counts
        if ends.max() > self.capacity and not self.grow:
            b = int(np.argmax(ends))
            raise ValueError(
                f"cache is full: it holds {self.capacity} positions, sequence {b} uses "
                f"{self._lengths[b]} and cannot take {counts[b]} more (make it with a larger "
                f"max_len, or grow=True)")
        self._reserve(int(ends.max()), int(counts.max()))
        if T == 1:
            # a decoding step: one position for each sequence that takes
            # one, written by one indexed assignment per array rather than
            # two slice assignments per sequence
            rows = np.flatnonzero(counts)
            pos = self._lengths[rows]
            self._k[rows, :, pos] = k4[rows, :, 0]
            self._v[rows, :, pos] = v4[rows, :, 0]
        else:
            for b in range(B):
                a, n = self._lengths[b], counts[b]
                self._k[b, :, a:a + n] = k4[b, :, :n]
                self._v[b, :, a:a + n] = v4[b, :, :n]
        self._lengths = ends

    def _truncate(self, lengths) -> None:
        """Back to ``lengths`` (an int, or one per sequence, as read before an
        append): a call that appended and then failed leaves the cache as it
        found it."""
        self._lengths = np.minimum(self._lengths, lengths)

    def __copy__(self) -> "KVCache":
        """A copy with storage of its own: two caches sharing it would write
        each other's positions (a beam search forking a sequence, say)."""
        new = KVCache.__new__(KVCache)
        new.__setstate__({**self.__getstate__(), "_lengths": self._lengths.copy()})
        return new

    # a copy (pickle, copy.deepcopy) gets its own lock, free
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_busy"]
        # the positions held, and the capacity as a number: past them the
        # storage was never written (np.empty), and a pickle would carry that
        # memory's stale bytes, as many as the capacity, however few are used
        used = self._length
        k, v = self._k[:, :, :used], self._v[:, :, :used]
        if not self.uniform:
            # nor were a shorter sequence's positions past its own length
            # (or they hold what reset or reorder left there): zeros instead
            k, v = k.copy(), v.copy()
            for b, n in enumerate(self._lengths):
                k[b, :, n:] = 0
                v[b, :, n:] = 0
        state["_k"], state["_v"] = k, v
        state["_capacity"] = self.capacity
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        if "_length" in state:  # a pickle from before per-sequence lengths
            state["_lengths"] = np.full(state["_k"].shape[0], state.pop("_length"), np.int64)
        # (pickles from before it held the whole storage)
        capacity = state.pop("_capacity", state["_k"].shape[2])
        for name in ("_k", "_v"):
            held = state[name]
            storage = np.empty(held.shape[:2] + (capacity, held.shape[3]), held.dtype)
            storage[:, :, :held.shape[2]] = held
            state[name] = storage
        self.__dict__.update(state)
        self._busy = ForkSafeLock()

    def __repr__(self) -> str:
        shown = (f"length={self._length}" if self.uniform
                 else f"lengths={self._lengths.tolist()}")
        return (f"KVCache(batch_size={self.batch_size}, {shown}, "
                f"capacity={self.capacity}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, dtype={self.dtype.name}, grow={self.grow})")


class _Claim:
    """KVCache._claim's context manager: a class, not a generator, since a
    decoding step is short enough for a generator's setup to show."""

    __slots__ = ("_lock",)

    def __init__(self, lock: ForkSafeLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                "cache is in use by another call (in another thread): a KVCache belongs "
                "to one sequence batch; use one cache per thread"
            )

    def __exit__(self, *exc) -> None:
        self._lock.release()
