"""Every conversion and check of user input, in one place.

One path turns what a user passes for an array (an ndarray, a torch tensor on
any device, a list, anything numpy reads) into a numpy array the kernels can
take: :func:`to_array`.  Every entry point (the functional API, the modules'
calls, their weights and state dicts, the cache, fastattn.dask) reads arrays
through it, so each rule holds everywhere at once: numpy masked arrays are
refused (their mask would be silently lost), byte-swapped numbers are
converted to the native order the kernels read, torch tensors are detached
and moved to the CPU.

The checks built on it name the argument, and both shapes where two disagree;
tests match these messages.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple, TypedDict

import ml_dtypes
import numpy as np

from . import _resources
from ._conventions import CALL_NAMES, MaskConventionWarning, torch_names, warn_caller

__all__ = [
    "KEYS_HINT", "to_array", "float_array", "float_param", "cast_checked", "kernel_ready",
    "shape_str", "ensure_memory", "available_memory", "check_qkv", "prepare_mask",
    "padding_mask", "source_array", "check_window", "check_alibi_slopes", "check_alibi_range",
    "check_scale", "positive_int", "float_dtype", "check_flag", "module_config",
    "CallOptions", "CALL_DEFAULTS", "plain_options", "call_options",
]

from ._dtypes import DTYPE_NAMES, FLOAT_DTYPES, HALF_DTYPES, as_dtype

# for the modules' inputs, where padding has an argument of its own
KEYS_HINT = " (keys to leave out go in attn_mask or key_padding_mask)"


def shape_str(shape: Sequence[int]) -> str:
    """A shape as Python writes a tuple: (8,) for one dimension, () for none."""
    return str(tuple(int(s) for s in shape))


# ---- the one conversion --------------------------------------------------------------

def _from_tensor(value, name: str):
    """A torch tensor (any device, bfloat16, requiring grad) as a numpy array;
    anything else as it came.  torch is never imported: a tensor is known by
    its methods."""
    if not (hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy")):
        return value
    try:
        t = value.detach().cpu()
        if str(getattr(t, "dtype", "")) == "torch.bfloat16":
            # numpy has no bfloat16 of its own: the same bits, as ml_dtypes'
            return t.contiguous().view(t.new_empty(0).short().dtype).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    except Exception as exc:  # meta, sparse, float8 ... tensors
        raise TypeError(f"{name}: cannot read this tensor as a numpy array ({exc})") from None


def to_array(value, name: str, hint: str = "") -> np.ndarray:
    """``value`` as a numpy array: torch tensors detached and copied to the
    CPU, masked arrays refused (``hint`` ends the message), byte-swapped
    numbers (">f4" from a file) in the native byte order.

    An ndarray in native order comes back as it is, with no copy: this is on
    every call's path.
    """
    if type(value) is np.ndarray and value.dtype.isnative:
        return value
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy masked array, whose mask fastattn would ignore; pass a "
            f"plain ndarray such as {name}.filled(value){hint}"
        )
    arr = value if isinstance(value, np.ndarray) else np.asarray(_from_tensor(value, name))
    if not arr.dtype.isnative and arr.dtype.kind in "fiuc":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def float_array(x, name: str, dtype: Optional[np.dtype] = None,
                hint: str = "") -> np.ndarray:
    """``x`` as a float32, float64, bfloat16 or float16 ndarray (cast to
    ``dtype`` when given).

    Raises TypeError naming ``name`` for anything that is not a real float
    array (ints, bools, complex, objects, strings, other float widths without
    ``dtype``), and ValueError for finite values the cast to ``dtype`` would
    make infinite (see :func:`cast_checked`).
    """
    if x is None:
        raise TypeError(f"{name} must be a {DTYPE_NAMES} array, got None")
    arr = to_array(x, name, hint)
    if arr.dtype not in FLOAT_DTYPES and (arr.dtype.kind != "f" or dtype is None):
        raise TypeError(
            f"{name} must be a {DTYPE_NAMES} array, got dtype {arr.dtype}"
            + (" (cast it with .astype(np.float32))" if arr.dtype.kind in "fiub" else "")
        )
    if dtype is not None and arr.dtype != dtype:
        # float32 values above 65504 would be inf in a float16 module's
        # input, and NaN in every output row that reads them
        arr = cast_checked(arr, dtype, name)
    return arr


def float_param(value, name: str) -> np.ndarray:
    """A weight or bias as given (a state dict's entry, an assignment): any
    float array, cast later by :func:`cast_checked`.  Ragged lists and the like
    raise TypeError naming ``name``."""
    if value is None:
        raise TypeError(f"{name}: expected a float array, got None")
    try:
        arr = to_array(value, name)
    except (ValueError, OverflowError) as exc:  # ragged lists and the like
        raise TypeError(f"{name}: cannot be read as an array ({exc})") from None
    if arr.dtype.kind != "f" and arr.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float array, got dtype {arr.dtype}")
    return arr


def cast_checked(arr: np.ndarray, dtype: np.dtype, name: str, *,
                 below_blocks: bool = False) -> np.ndarray:
    """``arr`` cast to ``dtype``, refusing finite values the cast would turn
    into infinities.  With ``below_blocks`` (float masks) values below the range
    may become -inf, which blocks a key as the caller meant; only values above
    it, which would give NaN outputs, are refused."""
    with np.errstate(over="ignore"):
        cast = arr.astype(dtype, copy=False)
    # by range, not width: bfloat16 and float16 are both 16 bits, and
    # bfloat16's values reach far beyond float16's
    if cast is arr or ml_dtypes.finfo(cast.dtype).max >= ml_dtypes.finfo(arr.dtype).max:
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
                f"{float(ml_dtypes.finfo(cast.dtype).max):.3g}"
            )
    return cast


def kernel_ready(a: np.ndarray) -> np.ndarray:
    """``a`` itself when the kernel can read it through its strides, else a copy.

    The kernel needs aligned elements and a unit stride on the last axis; any
    other axis may have any stride (negative, zero, or a fused projection's).
    """
    if a.flags.aligned and (a.size == 0 or a.shape[-1] <= 1 or a.strides[-1] == a.itemsize):
        return a
    # np.require copies a misaligned array too (ascontiguousarray would keep
    # one that is contiguous but misaligned)
    return np.require(a, requirements=["C", "A"])


# ---- memory ----------------------------------------------------------------------------

def available_memory() -> Optional[int]:
    """Bytes the OS could still give this process (Linux: MemAvailable, and
    what its cgroup's memory limit leaves), or None."""
    return _resources.available_memory()


# Allocations below this size are not checked against the available memory:
# reading /proc/meminfo and the cgroup files costs more than a small call.
CHECK_MEMORY_ABOVE = 256 << 20


def ensure_memory(shapes: Sequence[Tuple[int, ...]], itemsize: int, what: str,
                  extra_bytes: int = 0) -> None:
    """Raise MemoryError before allocating arrays of ``shapes`` (and
    ``extra_bytes`` more) that cannot fit.

    Sizes are computed with Python integers (no overflow); with overcommit an
    oversized allocation could otherwise succeed and be killed later, when its
    pages are touched (in a container, by its cgroup's OOM killer).
    """
    nbytes = sum(math.prod(map(int, shape)) for shape in shapes) * itemsize + extra_bytes
    if nbytes < CHECK_MEMORY_ABOVE:
        return
    avail = available_memory()
    if nbytes > 2 ** 62 or (avail is not None and nbytes > avail):
        raise MemoryError(
            f"{what} needs {nbytes / 2 ** 30:.3g} GiB, more than the "
            + (f"{avail / 2 ** 30:.3g} GiB available" if avail is not None else "addressable size")
        )


# ---- attention operands and masks ------------------------------------------------------

def check_qkv(q, k, v) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated q, k, v (see :func:`fastattn.scaled_dot_product_attention` for shapes)."""
    q = float_array(q, "q")
    k = float_array(k, "k")
    v = float_array(v, "v")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k and v must share one float dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}"
        )
    for name, a, layout in (("q", q, "H, Lq, E"), ("k", k, "Hkv, Lk, E"), ("v", v, "Hkv, Lk, Ev")):
        if a.ndim < 3:
            raise ValueError(
                f"{name} must have shape (..., {layout}) with at least 3 axes, "
                f"got shape {shape_str(a.shape)}"
            )
    lead = q.shape[:-3]
    for name, a in (("k", k), ("v", v)):
        if a.shape[:-3] != lead:
            raise ValueError(
                f"{name} must have the leading axes of q {shape_str(lead)}, "
                f"got {name} shape {shape_str(a.shape)} (leading axes are not broadcast)"
            )
    H, _, E = q.shape[-3:]
    Hkv, Lk, Ek = k.shape[-3:]
    Hv, Lv, _ = v.shape[-3:]
    if Ek != E:
        raise ValueError(
            f"k must have the head dim of q (E = {E}), got k shape {shape_str(k.shape)}"
        )
    if Hv != Hkv or Lv != Lk:
        raise ValueError(
            f"v must have the heads and length of k (Hkv = {Hkv}, Lk = {Lk}), "
            f"got v shape {shape_str(v.shape)}"
        )
    if Hkv == 0 and H == 0:
        return q, k, v
    if Hkv == 0 or H % Hkv:
        raise ValueError(
            f"k has {Hkv} heads, which must divide the {H} heads of q "
            f"(grouped-query attention), got k shape {shape_str(k.shape)}"
        )
    return q, k, v


def source_array(arr, name: str, dim: int, B: int, unbatched: bool,
                 dtype: np.dtype) -> np.ndarray:
    """A module's key or value input, (B, L, dim) (or (L, dim) unbatched),
    as a batched array of ``dtype``."""
    a = float_array(arr, name, dtype, KEYS_HINT)
    expected = f"(L, {dim})" if unbatched else f"({B}, L, {dim})"
    if a.ndim != (2 if unbatched else 3) or a.shape[-1] != dim or (not unbatched and a.shape[0] != B):
        raise ValueError(f"{name} must have shape {expected}, got {shape_str(a.shape)}")
    return a[None] if unbatched else a


def prepare_mask(mask, name: str, full_shape: Tuple[int, ...], dtype: np.dtype):
    """(bool view, float view) of ``mask`` broadcast to ``full_shape``; one is None.

    Broadcasting is a view with zero strides: no (Lq, Lk) copy per head/batch.
    """
    if mask is None:
        return None, None
    m = to_array(mask, name)
    if m.dtype != np.bool_ and m.dtype.kind != "f" and m.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a bool array (True = may attend) or a float array "
            f"(added to the scores), got dtype {m.dtype}"
        )
    # plain shape arithmetic: numpy's helpers fail on shapes of > 2**63 elements
    fits = m.ndim <= len(full_shape) and all(
        a in (1, b) for a, b in zip(m.shape[::-1], tuple(full_shape)[::-1]))
    if not fits:
        hint = ""
        if (len(full_shape) == 4 and m.ndim == 3 and m.shape[1:] == tuple(full_shape[2:])
                and m.shape[0] == full_shape[0] * full_shape[1] > 1):
            # torch.nn.MultiheadAttention's 3-D mask, batch and heads in one axis
            hint = (f"; torch.nn.MultiheadAttention's 3-D mask is (B * num_heads, Lq, Lk): "
                    f"reshape it to {shape_str(full_shape)}")
        raise ValueError(
            f"{name} has shape {shape_str(m.shape)}, which does not broadcast to "
            f"(..., H, Lq, Lk) = {shape_str(full_shape)}{hint}"
        )
    if math.prod(full_shape) >= 2 ** 63:
        raise ValueError(f"{name}: (..., H, Lq, Lk) = {shape_str(full_shape)} has more than "
                         f"2**63 elements")
    # Axes the caller already broadcast (stride 0) are collapsed first, so a
    # cast or an aligned copy touches only the distinct values.
    m = m[tuple(slice(0, 1) if st == 0 and n > 1 else slice(None)
                for st, n in zip(m.strides, m.shape))]
    if m.dtype == np.bool_:
        if math.prod(full_shape):
            torch_convention_check(m, name)
        return np.broadcast_to(m, full_shape), None
    # a float64 mask on float32 inputs: values below float32's range block
    # their key (np.finfo(np.float64).min masks mean that), values above refused
    m = np.require(cast_checked(m, dtype, name, below_blocks=True), requirements=["A"])
    return None, np.broadcast_to(m, full_shape)


def torch_convention_check(m: np.ndarray, name: str) -> None:
    """Warns (MaskConventionWarning) when bool mask ``m`` (a call's attn_mask,
    its broadcast axes collapsed, (..., Lq, Lk) or fewer axes) is most likely
    in torch.nn.MultiheadAttention's convention, True = blocked:

    * it blocks every key of every query: nobody means that, and it is what
      torch's "block nothing" (all False) reads as here;
    * it is torch's causal mask, True above the (right-aligned) diagonal:
      each query would attend only later keys and the last query none.

    Only these two.  A mask that blocks every key of *some* queries is
    fastattn's way to leave out padding queries (they get zeros), so it
    says nothing about the convention; and no cheaper test than these tells
    a torch-style padding or random mask from one of fastattn's.

    Cheap: ``any()`` stops at the first True, so a usual mask is decided
    at once and an all-False one in a single pass; the second test looks at
    the last query's row, then at three rows, and passes over the whole mask
    only for a mask that then is torch's causal one.
    """
    lead = (0,) * max(m.ndim - 1, 0)
    if not m[lead].any() and not m.any():
        warn_caller(
            f"{name} blocks every key for every query.  In fastattn a bool mask says where a "
            f"query MAY attend (True = attend, as in torch.nn.functional."
            f"scaled_dot_product_attention): the opposite of torch.nn.MultiheadAttention's "
            f"attn_mask, where True = blocked.  As given, every output row is zeros (a "
            f"module's: its output bias).  If {name} follows torch.nn.MultiheadAttention's "
            f"convention, pass ~{name}.", MaskConventionWarning)
        return
    if m.ndim < 2 or m.shape[-2] < 2 or m.shape[-1] < 2:
        return
    if m[..., -1, :].any() or not m[..., 0, :].any(axis=-1).all():
        return
    Lq, Lk = m.shape[-2:]
    # the staircase of an inverted causal mask: query i attends exactly the
    # keys from t0 + i on, t0 being the first query's first; checked on a few
    # rows first (a mask that got this far but is not one fails there), then
    # on all
    t0 = int(np.argmax(m[(0,) * (m.ndim - 2) + (0,)]))
    start = np.minimum(Lk, t0 + np.arange(Lq))[:, None]
    keys = np.arange(Lk)
    few = np.unique([1, Lq // 2, Lq - 2])
    if not (m[..., few, :] == (keys >= start[few])).all() or not (m == (keys >= start)).all():
        return
    warn_caller(
        f"{name} looks like torch.nn.MultiheadAttention's causal mask, True above the "
        f"diagonal (True = blocked).  In fastattn a bool mask says where a query MAY "
        f"attend (True = attend): as given, each query attends only later keys and the "
        f"last query none.  Pass ~{name}, or is_causal=True and no mask.",
        MaskConventionWarning)


def bool_mask(value, name: str, what: str) -> np.ndarray:
    """A bool array argument (``what`` says what True means)."""
    arr = to_array(value, name)
    if arr.dtype != np.bool_:
        raise TypeError(f"{name} must be a bool array{what}, got dtype {arr.dtype}")
    return arr


def padding_mask(key_padding_mask, B: int, H: int, Lq: int, Lk: int, unbatched: bool):
    """key_padding_mask (True = padding), (B, Lk) or (Lk,), as a broadcast
    (B, H, Lq, Lk) 'may attend' view; None when not given."""
    if key_padding_mask is None:
        return None
    kpm = bool_mask(key_padding_mask, "key_padding_mask", " (True = padding)")
    expected = (Lk,) if unbatched else (B, Lk)
    if kpm.shape != expected:
        raise ValueError(
            f"key_padding_mask must have shape {shape_str(expected)} (one entry per key), "
            f"got {shape_str(kpm.shape)}"
        )
    if kpm.size and Lq and H and kpm.all():
        # nobody pads every key of every sequence; a mask of True = keep (a
        # Hugging Face attention_mask, fastattn's attn_mask) with nothing to
        # leave out reads so
        warn_caller(
            "key_padding_mask marks every key of every sequence as padding (True = padding, "
            "as torch's key_padding_mask), so no query attends any key and every output row "
            "is the module's output bias.  If True means 'keep' in this mask (as in a Hugging "
            "Face attention_mask), pass ~key_padding_mask.", MaskConventionWarning)
    allowed = ~kpm.reshape(B, 1, 1, Lk)
    return np.broadcast_to(allowed, (B, H, Lq, Lk))


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


def _real_dtype(dtype: np.dtype) -> bool:
    """Whether a per-head setting of this dtype reads as real numbers: ints,
    floats, and the 16-bit floats numpy knows only through ml_dtypes
    (bfloat16, a model's own type, is of numpy kind 'V')."""
    return dtype.kind in "fiu" or dtype in HALF_DTYPES


def check_alibi_slopes(slopes, num_heads: int,
                       dtype: np.dtype = np.dtype(np.float64)) -> Optional[np.ndarray]:
    """Explicit ALiBi slopes as float64, one per query head; None for None."""
    if slopes is None:
        return None
    arr = to_array(slopes, "alibi_slopes")
    if not _real_dtype(arr.dtype):
        raise TypeError(f"alibi_slopes must be a real array, got dtype {arr.dtype}")
    if arr.shape != (num_heads,):
        raise ValueError(
            f"alibi_slopes must have shape ({num_heads},) (one slope per query head), "
            f"got {shape_str(arr.shape)}"
        )
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)) or np.any(np.abs(arr) > float(np.finfo(dtype).max)):
        raise ValueError(f"alibi_slopes must be finite in {np.dtype(dtype).name}")
    return arr


def check_cu_seqlens(cu, name: str, total: int, total_name: str) -> np.ndarray:
    """Cumulative sequence lengths as int64 (n + 1,): integers starting at 0,
    never decreasing, ending at ``total`` (the packed rows of
    ``total_name``)."""
    arr = to_array(cu, name)
    if arr.dtype.kind == "u" and arr.size and arr.max() >= 2 ** 63:
        raise ValueError(f"{name} holds {arr.max()}, past what any array can hold")
    if arr.dtype.kind not in "iu" and arr.size:
        raise TypeError(f"{name} must be an integer array (cumulative sequence lengths, "
                        f"[0, len_0, len_0 + len_1, ...]), got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] < 1:
        raise ValueError(f"{name} must be one-dimensional with at least one entry (0), got "
                         f"shape {shape_str(arr.shape)}")
    arr = arr.astype(np.int64)
    if arr[0] != 0:
        raise ValueError(f"{name} must start at 0, got {arr[0]}")
    steps = np.diff(arr)
    if steps.size and steps.min() < 0:
        i = int(np.argmax(steps < 0))
        raise ValueError(f"{name} must not decrease: {name}[{i + 1}] = {arr[i + 1]} < "
                         f"{name}[{i}] = {arr[i]}")
    if arr[-1] != total:
        raise ValueError(f"{name} must end at the {total} rows of {total_name}, got "
                         f"{arr[-1]}")
    return arr


def check_lengths(lengths, batch: int, length: int) -> np.ndarray:
    """How many of x's ``length`` positions each of ``batch`` sequences
    appends: int64 (batch,) in [0, length]."""
    arr = to_array(lengths, "lengths")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"lengths must be an integer array, got dtype {arr.dtype}")
    if arr.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},) (one count per sequence), got "
                         f"{shape_str(arr.shape)}")
    if arr.size and (arr.min() < 0 or arr.max() > length):
        raise ValueError(f"lengths must be in [0, {length}] (x holds {length} positions per "
                         f"sequence), got values from {arr.min()} to {arr.max()}")
    return arr.astype(np.int64)


def check_softcap(softcap, dtype: np.dtype = np.dtype(np.float64)) -> float:
    """Logit soft-capping: None (off, returned as 0.0) or a finite cap > 0."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float, np.integer, np.floating)):
        raise TypeError(f"softcap must be a positive real number or None, got {softcap!r}")
    value = float(softcap)
    info = np.finfo(dtype)
    # (at least the smallest normal number, so that 1 / softcap is finite)
    if not (float(info.tiny) <= value <= float(info.max)):
        raise ValueError(f"softcap must be > 0 and finite in {np.dtype(dtype).name}, from "
                         f"{float(info.tiny):.3g} up (or None for no capping), got {softcap!r}")
    return value


def check_sinks(sinks, num_heads: int,
                dtype: np.dtype = np.dtype(np.float64)) -> Optional[np.ndarray]:
    """Attention sinks as float64, one logit per query head; None for None.
    -inf is allowed (that head has no sink); NaN and +inf are not."""
    if sinks is None:
        return None
    arr = to_array(sinks, "sinks")
    if not _real_dtype(arr.dtype):
        raise TypeError(f"sinks must be a real array, got dtype {arr.dtype}")
    if arr.shape != (num_heads,):
        raise ValueError(f"sinks must have shape ({num_heads},) (one logit per query head), "
                         f"got {shape_str(arr.shape)}")
    arr = arr.astype(np.float64)
    if np.any(np.isnan(arr)) or np.any(arr > float(np.finfo(dtype).max)):
        raise ValueError(f"sinks must be finite in {np.dtype(dtype).name} or -inf (no sink), "
                         f"got {arr[np.isnan(arr) | (arr > float(np.finfo(dtype).max))][0]}")
    return arr


# ALiBi's bias may take at most this fraction of the dtype's range; the rest
# is left to the scores (and a float mask) it is added to, so a score plus
# its bias overflows only when the score is already beyond three quarters of
# the range.
ALIBI_RANGE_SHARE = 0.25


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
    limit = ALIBI_RANGE_SHARE * float(np.finfo(dtype).max)
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


def check_scale(scale, head_dim: int, dtype: np.dtype = np.dtype(np.float64)) -> float:
    """The factor on q.k: ``scale``, or ``1 / sqrt(head_dim)`` for None."""
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


# ---- scalar arguments and module configs -----------------------------------------------

def positive_int(value, name: str) -> int:
    """A size argument: a Python or NumPy int >= 1 (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def float_dtype(dtype, name: str = "dtype") -> np.dtype:
    """float32, float64, bfloat16 or float16, from anything numpy.dtype reads,
    ml_dtypes' and torch's types, or their names."""
    if dtype is None:
        raise TypeError(f"{name} must be one of {DTYPE_NAMES}, got None")
    return as_dtype(dtype, name)


def check_flag(value, name: str) -> bool:
    """A bool argument; strings and other objects are refused, not read as truthy."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def module_config(embed_dim, num_heads, num_kv_heads, kdim, vdim, bias, dtype,
                  dim_name: str = "embed_dim", precision=None, head_dim=None,
                  sinks=False) -> dict:
    """A module's constructor arguments, checked, with the defaults filled in
    (``num_kv_heads = num_heads``, ``kdim = vdim = embed_dim``,
    ``head_dim = embed_dim // num_heads``); ``dim_name`` is what messages call
    the first argument."""
    embed_dim = positive_int(embed_dim, dim_name)
    num_heads = positive_int(num_heads, "num_heads")
    if head_dim is not None:
        head_dim = positive_int(head_dim, "head_dim")
    elif embed_dim % num_heads:
        raise ValueError(
            f"{dim_name} ({embed_dim}) must be divisible by num_heads ({num_heads}): "
            f"each head gets {dim_name} // num_heads features (or give head_dim)"
        )
    else:
        head_dim = embed_dim // num_heads
    num_kv_heads = num_heads if num_kv_heads is None else positive_int(num_kv_heads, "num_kv_heads")
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})"
        )
    bias = check_flag(bias, "bias")
    kdim = embed_dim if kdim is None else positive_int(kdim, "kdim")
    vdim = embed_dim if vdim is None else positive_int(vdim, "vdim")
    dtype = float_dtype(dtype)
    return dict(embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
                kdim=kdim, vdim=vdim, bias=bool(bias), dtype=dtype,
                precision=check_precision(precision, dtype), head_dim=head_dim,
                sinks=check_flag(sinks, "sinks"))


def check_precision(precision, dtype: np.dtype) -> Optional[np.dtype]:
    """The mixed-precision keyword: None, or bfloat16 / float16 beside float32
    parameters and inputs (a module of a 16-bit dtype computes in it anyway)."""
    if precision is None:
        return None
    p = float_dtype(precision, "precision")
    if p not in HALF_DTYPES:
        raise ValueError(f"precision must be 'bfloat16' or 'float16' (or None), got {p}")
    if dtype != np.float32 and dtype != p:
        raise ValueError(f"precision={p.name} is for float32 modules, this one has dtype {dtype}")
    return None if dtype == p else p


# ---- the modules' call options -----------------------------------------------------------

class CallOptions(TypedDict, total=False):
    """The keyword options of both modules' calls (documented on them)."""

    attn_mask: Any
    key_padding_mask: Any
    is_causal: bool
    need_weights: bool
    average_attn_weights: bool
    cache: Any
    window: Optional[Tuple[Optional[int], Optional[int]]]
    alibi: bool
    alibi_slopes: Any
    positions: Any
    lengths: Any
    cu_seqlens: Any


# Their defaults.  A call that passes none of them, or only these very
# objects, is a plain call (fastattn._fastpath takes it).
CALL_DEFAULTS: Dict[str, Any] = {
    "attn_mask": None, "key_padding_mask": None, "is_causal": False, "need_weights": False,
    "average_attn_weights": True, "cache": None, "window": None, "alibi": False,
    "alibi_slopes": None, "positions": None, "lengths": None, "cu_seqlens": None,
}
_UNSET = object()


def plain_options(options: Dict[str, Any]) -> bool:
    """True when every option given is its default (the object itself)."""
    return all(CALL_DEFAULTS.get(k, _UNSET) is v for k, v in options.items())


def call_options(options: Dict[str, Any], caller: str) -> Dict[str, Any]:
    """Every option, the defaults filled in; TypeError for a name that is not
    one (as Python's own message for a function ``caller``, with the reason
    for a torch name: see fastattn._conventions.CALL_NAMES)."""
    unknown = {k: v for k, v in options.items() if k not in CALL_DEFAULTS}
    if unknown:
        # (a torch name, or the functional API's, gets its reason)
        torch_names(caller, unknown, CALL_NAMES)
    return {**CALL_DEFAULTS, **options}
