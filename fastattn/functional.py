"""scaled_dot_product_attention: argument checks, masks, and the call into the kernel.

Mask convention (the one convention of the whole library):

* a **bool** mask says where a query *may* attend: ``True`` = attend.  This is
  the convention of ``torch.nn.functional.scaled_dot_product_attention`` and
  the opposite of ``torch.nn.MultiheadAttention``'s ``attn_mask`` (where
  ``True`` blocks);
* a **float** mask is *added* to the scaled scores; ``-inf`` blocks;
* ``is_causal`` lets query ``i`` attend key ``j`` when ``j <= i + (Lk - Lq)``:
  the usual lower triangle when ``Lq == Lk``, and the right alignment for a
  block of new queries at the end of a longer key sequence (decoding).

A query row that may attend no key at all gets zeros (and zero weights).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from . import _policy, _resources, threads
from ._dispatch import kernels
from ._policy import BLOCK_K, BLOCK_Q

__all__ = ["scaled_dot_product_attention", "alibi_slopes"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def available_memory() -> Optional[int]:
    """Bytes the OS could still give this process (Linux: MemAvailable, and
    what its cgroup's memory limit leaves), or None."""
    return _resources.available_memory()


# Allocations below this size are not checked against the available memory.
_CHECK_MEMORY_ABOVE = 256 << 20


def ensure_memory(shapes: Sequence[Tuple[int, ...]], itemsize: int, what: str,
                  extra_bytes: int = 0) -> None:
    """Raise MemoryError before allocating arrays of ``shapes`` (and
    ``extra_bytes`` more) that cannot fit.

    Sizes are computed with Python integers (no overflow); with overcommit an
    oversized allocation could otherwise succeed and be killed later, when its
    pages are touched (in a container, by its cgroup's OOM killer).
    """
    nbytes = sum(math.prod(int(d) for d in shape) for shape in shapes) * itemsize + extra_bytes
    if nbytes < _CHECK_MEMORY_ABOVE:
        return  # reading /proc/meminfo and the cgroup files costs more than a small call
    avail = available_memory()
    if nbytes > 2 ** 62 or (avail is not None and nbytes > avail):
        raise MemoryError(
            f"{what} needs {nbytes / 2 ** 30:.3g} GiB, more than the "
            + (f"{avail / 2 ** 30:.3g} GiB available" if avail is not None else "addressable size")
        )


def _offset_table_bytes(lead: Tuple[int, ...], operands: int) -> int:
    """What the kernel allocates per call beside the arrays: with two or more
    leading axes, each operand gets a table of one int64 offset per leading
    index."""
    return 8 * math.prod(lead) * operands if len(lead) > 1 else 0


def _shape_str(shape: Sequence[int]) -> str:
    """A shape as Python writes a tuple: (8,) for one dimension, () for none."""
    return str(tuple(int(s) for s in shape))


def refuse_masked(x, name: str, hint: str = "") -> None:
    """numpy masked arrays are refused: their mask would be silently ignored."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy masked array, whose mask fastattn would ignore; pass a "
            f"plain ndarray such as {name}.filled(value){hint}"
        )


# for the modules' inputs, where padding has an argument of its own
KEYS_HINT = " (keys to leave out go in attn_mask or key_padding_mask)"


def tensor_to_numpy(value, name: str):
    """A torch tensor (any device, bfloat16, requiring grad) as a numpy array;
    anything else is returned as it came."""
    if not (hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy")):
        return value
    try:
        t = value.detach().cpu()
        if str(getattr(t, "dtype", "")) == "torch.bfloat16":
            t = t.float()  # numpy has no bfloat16; float32 holds it exactly
        return t.numpy()
    except Exception as exc:  # meta, sparse, float8 ... tensors
        raise TypeError(f"{name}: cannot read this tensor as a numpy array ({exc})") from None


def array_from(value, name: str, hint: str = "") -> np.ndarray:
    """``value`` as a numpy array: torch tensors read as ``tensor_to_numpy``
    does, masked arrays refused (their mask would be lost)."""
    if isinstance(value, np.ndarray) and not isinstance(value, np.ma.MaskedArray):
        return value
    refuse_masked(value, name, hint)
    return np.asarray(tensor_to_numpy(value, name))


def cast_checked(arr: np.ndarray, dtype: np.dtype, name: str, *,
                 below_blocks: bool = False) -> np.ndarray:
    """``arr`` cast to ``dtype``, refusing finite values the cast would turn
    into infinities.  With ``below_blocks`` (float masks) values below the range
    may become -inf, which blocks a key as the caller meant; only values above
    it, which would give NaN outputs, are refused."""
    with np.errstate(over="ignore"):
        cast = arr.astype(dtype, copy=False)
    if cast is arr or cast.dtype.itemsize >= arr.dtype.itemsize:
        return cast
    grown = np.isposinf(cast) if below_blocks else np.isinf(cast)
    if grown.any():
        lost = grown & np.isfinite(arr)
        if lost.any():
            worst = np.max(arr[lost]) if below_blocks else np.max(np.abs(arr[lost]))
            what = ("above", "largest", "give NaN outputs") if below_blocks else \
                ("beyond", "largest magnitude", "become infinite")
            raise ValueError(
                f"{name}: finite values {what[0]} {cast.dtype}'s range ({what[1]} {worst!s}), "
                f"which would {what[2]}; keep them within "
                f"{float(np.finfo(cast.dtype).max):.3g}"
            )
    return cast


def as_float_array(x, name: str, dtype: Optional[np.dtype] = None,
                   hint: str = "") -> np.ndarray:
    """``x`` as a float32/float64 ndarray (cast to ``dtype`` when given).

    Raises TypeError naming ``name`` for anything that is not a real float
    array (ints, bools, complex, objects, strings).
    """
    if x is None:
        raise TypeError(f"{name} must be a float32 or float64 array, got None")
    arr = array_from(x, name, hint)
    # a byte-swapped float32/float64 (">f4" from a file) is that dtype in
    # another byte order: converted to the native one the kernels read
    native = arr.dtype.newbyteorder("=") if arr.dtype.kind == "f" else arr.dtype
    if arr.dtype.kind != "f" or (dtype is None and native not in _FLOAT_DTYPES):
        raise TypeError(
            f"{name} must be a float32 or float64 array, got dtype {arr.dtype}"
            + (" (cast it with .astype(np.float32))" if arr.dtype.kind in "fiub" else "")
        )
    target = native if dtype is None else dtype
    if arr.dtype != target:
        arr = arr.astype(target)
    return arr


def kernel_ready(a: np.ndarray) -> np.ndarray:
    """``a`` itself when the kernel can read it through its strides, else a copy.

    The kernel needs aligned elements and a unit stride on the last axis; any
    other axis may have any stride (negative, zero, or a stacked Q/K/V projection's).
    """
    if a.flags.aligned and (a.size == 0 or a.shape[-1] <= 1 or a.strides[-1] == a.itemsize):
        return a
    # np.require copies a misaligned array too (ascontiguousarray would keep
    # one that is contiguous but misaligned)
    return np.require(a, requirements=["C", "A"])


def prepare_mask(mask, name: str, full_shape: Tuple[int, ...], dtype: np.dtype):
    """(bool view, float view) of ``mask`` broadcast to ``full_shape``; one is None.

    Broadcasting is a view with zero strides: no (Lq, Lk) copy per head/batch.
    """
    if mask is None:
        return None, None
    m = array_from(mask, name)
    if m.dtype != np.bool_ and m.dtype.kind != "f":
        raise TypeError(
            f"{name} must be a bool array (True = may attend) or a float array "
            f"(added to the scores), got dtype {m.dtype}"
        )
    # plain shape arithmetic: numpy's helpers fail on shapes of > 2**63 elements
    fits = m.ndim <= len(full_shape) and all(
        a in (1, b) for a, b in zip(m.shape[::-1], tuple(full_shape)[::-1]))
    if not fits:
        raise ValueError(
            f"{name} has shape {_shape_str(m.shape)}, which does not broadcast to "
            f"(..., H, Lq, Lk) = {_shape_str(full_shape)}"
        )
    if math.prod(full_shape) >= 2 ** 63:
        raise ValueError(f"{name}: (..., H, Lq, Lk) = {_shape_str(full_shape)} has more than "
                         f"2**63 elements")
    # Axes the caller already broadcast (stride 0) are collapsed first, so a
    # cast or an aligned copy touches only the distinct values.
    m = m[tuple(slice(0, 1) if st == 0 and n > 1 else slice(None)
                for st, n in zip(m.strides, m.shape))]
    if m.dtype == np.bool_:
        return np.broadcast_to(m, full_shape), None
    # a float64 mask on float32 inputs: values below float32's range block
    # their key (np.finfo(np.float64).min masks mean that), values above refused
    m = np.require(cast_checked(m, dtype, name, below_blocks=True), requirements=["A"])
    return None, np.broadcast_to(m, full_shape)


def check_qkv(q, k, v) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated q, k, v (see :func:`scaled_dot_product_attention` for shapes)."""
    q = as_float_array(q, "q")
    k = as_float_array(k, "k")
    v = as_float_array(v, "v")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k and v must share one float dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    for name, a, layout in (("q", q, "H, Lq, E"), ("k", k, "Hkv, Lk, E"), ("v", v, "Hkv, Lk, Ev")):
        if a.ndim < 3:
            raise ValueError(
                f"{name} must have shape (..., {layout}) with at least 3 axes, "
                f"got shape {_shape_str(a.shape)}"
            )
    lead = q.shape[:-3]
    for name, a in (("k", k), ("v", v)):
        if a.shape[:-3] != lead:
            raise ValueError(
                f"{name} must have the leading axes of q {_shape_str(lead)}, "
                f"got {name} shape {_shape_str(a.shape)} (leading axes are not broadcast)"
            )
    H, _, E = q.shape[-3:]
    Hkv, Lk, Ek = k.shape[-3:]
    Hv, Lv, _ = v.shape[-3:]
    if Ek != E:
        raise ValueError(
            f"k must have the head dim of q (E = {E}), got k shape {_shape_str(k.shape)}"
        )
    if Hv != Hkv or Lv != Lk:
        raise ValueError(
            f"v must have the heads and length of k (Hkv = {Hkv}, Lk = {Lk}), "
            f"got v shape {_shape_str(v.shape)}"
        )
    if Hkv == 0 and H == 0:
        return q, k, v
    if Hkv == 0 or H % Hkv:
        raise ValueError(
            f"k has {Hkv} heads, which must divide the {H} heads of q "
            f"(grouped-query attention), got k shape {_shape_str(k.shape)}"
        )
    return q, k, v


def alibi_slopes(num_heads: int) -> np.ndarray:
    """The ALiBi paper's head slopes: 2^(-8k/n) for k = 1..n when n is a power
    of two; otherwise those of the largest power of two below, followed by
    every other slope of the next power of two."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")

    def power_of_two(n: int) -> list:
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

    n = 1 << (int(num_heads).bit_length() - 1)
    slopes = power_of_two(n)
    if n < num_heads:
        slopes += power_of_two(2 * n)[0::2][: num_heads - n]
    return np.array(slopes, dtype=np.float64)


def check_window(window):
    """``window`` as (left, right) with None for an unbounded side, or None."""
    if window is None:
        return None
    try:
        left, right = window
    except (TypeError, ValueError):
        raise ValueError(f"window must be a (left, right) pair, got {window!r}") from None
    for side, value in (("left", left), ("right", right)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"window {side} side must be an int >= 0 or None, got {value!r}")
        if value < 0:
            raise ValueError(f"window {side} side must be >= 0 (or None), got {value}")
    # any side longer than 2**40 keys is as good as unbounded (and fits int64)
    return tuple(None if v is None else min(int(v), 2 ** 40) for v in (left, right))


def check_alibi(alibi: bool, slopes, num_heads: int,
                dtype: np.dtype = np.dtype(np.float64)) -> Optional[np.ndarray]:
    """float64 slopes per query head, or None when ALiBi is off."""
    if slopes is None:
        return alibi_slopes(num_heads) if alibi else None
    arr = array_from(slopes, "alibi_slopes")
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"alibi_slopes must be a real array, got dtype {arr.dtype}")
    if arr.shape != (num_heads,):
        raise ValueError(
            f"alibi_slopes must have shape ({num_heads},) (one slope per query head), "
            f"got {_shape_str(arr.shape)}"
        )
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)) or np.any(np.abs(arr) > float(np.finfo(dtype).max)):
        raise ValueError(f"alibi_slopes must be finite in {np.dtype(dtype).name}")
    return arr


# ALiBi's bias may take at most this fraction of the dtype's range; the rest
# is left to the scores (and a float mask) it is added to, so a score plus
# its bias overflows only when the score is already beyond three quarters of
# the range.
_ALIBI_RANGE_SHARE = 0.25


def check_alibi_range(slopes: np.ndarray, len_q: int, len_k: int, dtype: np.dtype) -> None:
    """Refuse slopes whose bias ``-slope * |j - i'|`` would leave ``dtype``'s range.

    The largest distance of a call is ``max(Lq, Lk) - 1`` (``Lk`` counts every
    cached key); an infinite bias would give NaN rows (``inf - inf`` in the
    softmax) or block keys the slope only meant to penalise.
    """
    distance = max(int(len_q), int(len_k)) - 1
    if distance < 1:
        return
    name = np.dtype(dtype).name
    limit = _ALIBI_RANGE_SHARE * float(np.finfo(dtype).max)
    too_far = np.abs(slopes) * distance > limit
    if too_far.any():
        h = int(np.argmax(too_far))
        raise ValueError(
            f"alibi_slopes[{h}] = {slopes[h]:.6g}: times the largest query-key distance of "
            f"this call ({distance}) it leaves {name}'s range (largest value "
            f"{float(np.finfo(dtype).max):.3g}) once added to the scores; |slope| * distance "
            f"must stay within a quarter of it, {limit:.3g} (|slope| <= "
            f"{limit / distance:.3g} here)"
        )


def positive_int(value, name: str) -> int:
    """A size argument: a Python or NumPy int >= 1 (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def float_dtype(dtype) -> np.dtype:
    """float32 or float64, from anything numpy.dtype reads."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def check_flag(value, name: str) -> bool:
    """A bool argument; strings and other objects are refused, not read as truthy."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def resolve_scale(scale, head_dim: int, dtype: np.dtype = np.dtype(np.float64)) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"scale must be a real number or None, got {scale!r}")
    try:
        value = float(scale)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value) or abs(value) > float(np.finfo(dtype).max):
        raise ValueError(f"scale must be finite in {np.dtype(dtype).name}, got {scale!r}")
    return value


def attention_into(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    *,
    bool_masks: Sequence[Optional[np.ndarray]] = (),
    float_mask: Optional[np.ndarray] = None,
    is_causal: bool = False,
    scale: float,
    weights: Optional[np.ndarray] = None,
    window=None,
    slopes: Optional[np.ndarray] = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    num_threads: Optional[int] = None,
) -> None:
    """Runs the kernel on already-validated operands, writing into ``out``.

    ``out`` may be any view with a unit last stride (the modules pass the
    head-merged layout, so no transpose copy follows).  Masks are the broadcast
    views of :func:`prepare_mask`; at most two bool masks.
    """
    if slopes is not None:
        # here, where both lengths are known (k holds every cached key)
        check_alibi_range(slopes, q.shape[-2], k.shape[-2], q.dtype)
    if out.size == 0 and (weights is None or weights.size == 0):
        return  # nothing to compute (zero batch, heads, queries or value width)
    masks = [m for m in bool_masks if m is not None]
    if len(masks) > 2:
        raise ValueError("at most two bool masks reach the kernel")
    masks += [None] * (2 - len(masks))
    num_threads = num_threads or threads.get_num_threads()
    schedule = _policy.attention_schedule(math.prod(q.shape[:-2]), q.shape[-2], k.shape[-2],
                                          weights is not None, num_threads, block_q, block_k)
    kernels.attention(
        kernel_ready(q),
        kernel_ready(k),
        kernel_ready(v),
        out,
        weights,
        masks[0],
        masks[1],
        float_mask,
        bool(is_causal),
        float(scale),
        schedule,
        num_threads,
        window,
        slopes,
    )


def scaled_dot_product_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    attn_mask: Optional[np.ndarray] = None,
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    need_weights: bool = False,
    window: Optional[Tuple[Optional[int], Optional[int]]] = None,
    alibi: bool = False,
    alibi_slopes: Optional[np.ndarray] = None,
) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Scaled dot-product attention, ``softmax(q k^T * scale + mask) v``, per head.

    Parameters
    ----------
    q : ndarray, shape (..., H, Lq, E)
        Queries, float32 or float64.
    k : ndarray, shape (..., Hkv, Lk, E)
        Keys, same dtype and leading axes as ``q``.  ``Hkv`` must divide
        ``H``: query head ``h`` reads key/value head ``h // (H // Hkv)``
        (grouped-query and multi-query attention, without copying K/V).
    v : ndarray, shape (..., Hkv, Lk, Ev)
        Values.
    attn_mask : ndarray, optional
        Broadcastable to ``(..., H, Lq, Lk)``.  Bool: ``True`` = may attend.
        Float: added to the scaled scores (``-inf`` blocks).
    is_causal : bool
        Query ``i`` attends key ``j`` only when ``j <= i + (Lk - Lq)``.
        Combines with ``attn_mask``.
    scale : float, optional
        Factor on ``q k^T``; defaults to ``1 / sqrt(E)``.
    need_weights : bool
        Also return the attention probabilities (this materialises them; the
        default path streams over keys and never holds an ``Lq x Lk`` matrix).
    window : (int or None, int or None), optional
        Sliding window: query ``i`` attends keys ``j`` with
        ``i' - left <= j <= i' + right``, ``i' = i + Lk - Lq``.
    alibi : bool
        Add ALiBi's linear distance penalty ``-slope_h * |j - i'|``, with the
        paper's slopes for H heads (see :func:`alibi_slopes`).
    alibi_slopes : array of shape (H,), optional
        Explicit ALiBi slopes (implies ``alibi``); ``|slope| * (max(Lq, Lk) - 1)``
        must stay within a quarter of the dtype's largest value.

    Returns
    -------
    out : ndarray, shape (..., H, Lq, Ev)
        Same dtype as ``q``.
    weights : ndarray, shape (..., H, Lq, Lk)
        Only with ``need_weights=True``.  Rows sum to 1, or are all zero for
        a query that may attend no key.

    Raises
    ------
    TypeError
        Non-float inputs, mixed dtypes, a mask that is neither bool nor float.
    ValueError
        Shapes that do not fit together; the message names the argument and
        both shapes.
    """
    q, k, v = check_qkv(q, k, v)
    is_causal = check_flag(is_causal, "is_causal")
    need_weights = check_flag(need_weights, "need_weights")
    alibi = check_flag(alibi, "alibi")
    lead = q.shape[:-3]
    H, Lq, E = q.shape[-3:]
    Lk, Ev = k.shape[-2], v.shape[-1]
    full = lead + (H, Lq, Lk)
    bmask, fmask = prepare_mask(attn_mask, "attn_mask", full, q.dtype)
    scale = resolve_scale(scale, E, q.dtype)
    window = check_window(window)
    slopes = check_alibi(alibi, alibi_slopes, H, q.dtype)
    tables = _offset_table_bytes(lead, 4 + need_weights + (attn_mask is not None))
    ensure_memory([lead + (H, Lq, Ev)] + ([full] if need_weights else []), q.dtype.itemsize,
                  "the output" + (" and attention weights" if need_weights else "")
                  + (" and the kernel's offset tables" if tables else ""), tables)
    out = np.empty(lead + (H, Lq, Ev), dtype=q.dtype)
    weights = np.empty(full, dtype=q.dtype) if need_weights else None
    attention_into(
        q, k, v, out,
        bool_masks=(bmask,), float_mask=fmask, is_causal=is_causal, scale=scale,
        weights=weights, window=window, slopes=slopes,
    )
    if need_weights:
        return out, weights
    return out
