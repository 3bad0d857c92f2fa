"""KVCache: the keys and values of past positions, for incremental decoding."""

from __future__ import annotations

import numpy as np

from ._locks import ForkSafeLock
from ._dtypes import compute_dtype
from ._validate import (check_flag, ensure_memory, float_array, float_dtype, positive_int,
                        shape_str)

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

    A cache belongs to one sequence batch, so to one call at a time: a call
    (or ``append``, ``reset``) that finds it in use by another thread's call
    raises RuntimeError instead of mixing two calls' positions.
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
        self._length = 0
        self._busy = ForkSafeLock()

    def __len__(self) -> int:
        """Positions cached so far."""
        return self._length

    @property
    def capacity(self) -> int:
        """Positions the cache can hold before it is full (or grows)."""
        return self._k.shape[2]

    def reset(self) -> None:
        """Forget every cached position (the storage is kept)."""
        with self._claim():
            self._length = 0

    def keys(self) -> np.ndarray:
        """Cached keys as a (B, Hkv, len, E) view."""
        return self._k[:, :, : self._length]

    def values(self) -> np.ndarray:
        """Cached values as a (B, Hkv, len, E) view."""
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

    def _append(self, k_new: np.ndarray, v_new: np.ndarray) -> None:
        """append, for a caller that holds the cache (see _claim)."""
        B, T = k_new.shape[0], k_new.shape[1]
        end = self._length + T
        if end > self.capacity:
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
            k[:, :, : self._length] = self._k[:, :, : self._length]
            v[:, :, : self._length] = self._v[:, :, : self._length]
            self._k, self._v = k, v
        H, E = self.num_kv_heads, self.head_dim
        self._k[:, :, self._length:end] = k_new.reshape(B, T, H, E).transpose(0, 2, 1, 3)
        self._v[:, :, self._length:end] = v_new.reshape(B, T, H, E).transpose(0, 2, 1, 3)
        self._length = end

    def _truncate(self, length: int) -> None:
        """Forget the positions past ``length``: a call that appended and then
        failed leaves the cache as it found it."""
        self._length = min(self._length, length)

    def __copy__(self) -> "KVCache":
        """A copy with storage of its own: two caches sharing it would write
        each other's positions (a beam search forking a sequence, say)."""
        new = KVCache.__new__(KVCache)
        new.__setstate__({**self.__getstate__(), "_k": self._k.copy(), "_v": self._v.copy()})
        return new

    # a copy (pickle, copy.deepcopy) gets its own lock, free
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_busy"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._busy = ForkSafeLock()

    def __repr__(self) -> str:
        return (f"KVCache(batch_size={self.batch_size}, length={self._length}, "
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
