"""scaled_dot_product_attention and alibi_slopes, and attention_into, the one call into
the attention kernel (the modules use it too); the checks are fastattn._validate's.

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

from . import _policy, threads
from ._conventions import SDPA_NAMES, hide_catchall, too_many_positional, torch_names
from ._dispatch import kernels
from ._dtypes import compute_dtype, is_half, kernel_view
from ._policy import BLOCK_K, BLOCK_Q
from ._validate import (
    cast_checked,
    check_alibi_range,
    check_alibi_slopes,
    check_cu_seqlens,
    check_flag,
    check_qkv,
    check_scale,
    check_sinks,
    check_softcap,
    check_window,
    ensure_memory,
    kernel_ready,
    float_dtype,
    prepare_mask,
    shape_str,
    to_array,
    float_array,
)

__all__ = ["scaled_dot_product_attention", "alibi_slopes", "merge_attention",
           "varlen_attention"]


def _offset_table_bytes(lead: Tuple[int, ...], operands: int) -> int:
    """What the kernel allocates per call beside the arrays: with two or more
    leading axes, each operand gets a table of one int64 offset per leading
    index."""
    return 8 * math.prod(lead) * operands if len(lead) > 1 else 0


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


def resolve_alibi(alibi, slopes, num_heads: int, dtype: np.dtype) -> Optional[np.ndarray]:
    """float64 slopes per query head: ``slopes`` checked, else the paper's for
    ``alibi=True``; None when ALiBi is off."""
    alibi = check_flag(alibi, "alibi")
    if slopes is None:
        return alibi_slopes(num_heads) if alibi else None
    return check_alibi_slopes(slopes, num_heads, dtype)


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
    softcap: float = 0.0,
    sinks: Optional[np.ndarray] = None,
    lse: Optional[np.ndarray] = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    num_threads: Optional[int] = None,
) -> None:
    """Runs the kernel on already-validated operands, writing into ``out``.

    ``out`` may be any view with a unit last stride (the modules pass the
    head-merged layout, so no transpose copy follows).  Masks are the broadcast
    views of :func:`prepare_mask`; at most two bool masks.  ``softcap`` (0:
    off) and ``sinks`` (float64 per query head) as checked by _validate;
    ``lse``, a C-contiguous (*lead, H, Lq) array of the computation's dtype,
    gets each query row's log-sum-exp.
    """
    if slopes is not None:
        # here, where both lengths are known (k holds every cached key)
        check_alibi_range(slopes, q.shape[-2], k.shape[-2], compute_dtype(q.dtype))
    if lse is not None and lse.size and v.shape[-1] == 0:
        # no value columns, yet each row's log-sum-exp is asked for: the
        # kernel computes it beside one column of zeros
        v = np.zeros(v.shape[:-1] + (1,), v.dtype)
        out = np.empty(out.shape[:-1] + (1,), out.dtype)
    if out.size == 0 and (weights is None or weights.size == 0):
        return  # nothing to compute (zero batch, heads, queries or value width)
    masks = [m for m in bool_masks if m is not None]
    if len(masks) > 2:
        raise ValueError("at most two bool masks reach the kernel")
    masks += [None] * (2 - len(masks))
    num_threads = num_threads or threads.get_num_threads()
    schedule = _policy.attention_schedule(math.prod(q.shape[:-2]), q.shape[-2], k.shape[-2],
                                          weights is not None, num_threads, block_q, block_k,
                                          _policy.attention_pairs(kernels, q.dtype, k.dtype,
                                                                  q.shape[-1]))
    kernels.attention(
        kernel_view(kernel_ready(q)),
        kernel_view(kernel_ready(k)),
        kernel_view(kernel_ready(v)),
        kernel_view(out),
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
        softcap,
        sinks,
        lse,
    )


def _score_options(E: int, H: int, cdtype, scale, window, alibi, alibi_slopes, softcap,
                   sinks):
    """The functions' options on the scores, checked, as the kernels take
    them: (scale, window, ALiBi slopes, softcap, sinks)."""
    return (check_scale(scale, E, cdtype), check_window(window),
            resolve_alibi(alibi, alibi_slopes, H, cdtype), check_softcap(softcap, cdtype),
            check_sinks(sinks, H, cdtype))


def ragged_into(q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray,
                lens_q: np.ndarray, lens_k: np.ndarray, starts_q: Optional[np.ndarray],
                starts_k: Optional[np.ndarray], *, is_causal: bool, scale: float, window=None,
                slopes: Optional[np.ndarray] = None, softcap: float = 0.0,
                sinks: Optional[np.ndarray] = None, lse=None,
                num_threads: Optional[int] = None) -> None:
    """attention_into for sequences of their own lengths (checked operands):
    q, out (Lq, H, Rq, E/Ev) and k, v (Lk, Hkv, Rk, E/Ev), one lead per
    sequence, or one lead and ``starts`` (packed rows); see the kernels'
    ``attention_ragged``.  One team over every sequence's items."""
    n = len(lens_q)
    if n == 0 or out.shape[1] == 0:
        return
    if slopes is not None:
        check_alibi_range(slopes, int(lens_q.max()), int(lens_k.max()), compute_dtype(q.dtype))
    num_threads = num_threads or threads.get_num_threads()
    # one schedule for all: row mode where even the longest has few queries
    schedule = _policy.attention_schedule(
        n * q.shape[1], int(lens_q.max()), int(lens_k.max()), False, num_threads,
        pairs=_policy.attention_pairs(kernels, q.dtype, k.dtype, q.shape[-1]))
    kernels.attention_ragged(
        kernel_view(kernel_ready(q)), kernel_view(kernel_ready(k)), kernel_view(kernel_ready(v)),
        kernel_view(out), lens_q, lens_k, starts_q, starts_k, bool(is_causal), float(scale),
        schedule, num_threads, window, slopes, softcap, sinks, lse)


def varlen_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    cu_seqlens_q,
    cu_seqlens_k=None,
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    window: Optional[Tuple[Optional[int], Optional[int]]] = None,
    alibi: bool = False,
    alibi_slopes: Optional[np.ndarray] = None,
    softcap: Optional[float] = None,
    sinks: Optional[np.ndarray] = None,
    return_lse: bool = False,
) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Attention over a packed batch of sequences of different lengths, with
    no padding: each sequence attends only its own keys.

    Sequence ``s`` is rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` of ``q`` and
    ``cu_seqlens_k[s]:cu_seqlens_k[s+1]`` of ``k`` and ``v`` (the layout of
    FlashAttention's varlen functions).  Work is split over sequences x heads
    x query blocks in one team, longest sequences first, so a mix of long and
    short ones keeps every thread busy.

    Parameters
    ----------
    q : ndarray, shape (total_q, H, E)
        Packed queries: float32, float64, bfloat16 or float16.
    k, v : ndarray, shape (total_k, Hkv, E) and (total_k, Hkv, Ev)
        Packed keys and values, q's dtype; ``Hkv`` divides ``H``.
    cu_seqlens_q : int array (n + 1,)
        ``[0, len_0, len_0 + len_1, ..., total_q]``.
    cu_seqlens_k : int array (n + 1,), optional
        The same for keys (``total_k``); defaults to ``cu_seqlens_q``.
    is_causal : bool
        Per sequence, aligned at its end: query ``i`` of a sequence with
        ``Lq`` queries and ``Lk`` keys attends keys ``j <= i + Lk - Lq``.
    scale, window, alibi, alibi_slopes, softcap, sinks
        As for :func:`scaled_dot_product_attention`, per sequence.
    return_lse : bool
        Also return the log-sum-exp of each query row, shape (H, total_q),
        float32 (float64 for float64).

    Returns
    -------
    out : ndarray, shape (total_q, H, Ev), q's dtype (and lse with return_lse).
    """
    arrays = []
    for name, a in (("q", q), ("k", k), ("v", v)):
        a = float_array(a, name)
        if a.ndim != 3:
            raise ValueError(f"{name} must be packed as (total, heads, width), got shape "
                             f"{shape_str(a.shape)}")
        arrays.append(a)
    q, k, v = arrays
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    (Tq, H, E), (Tk, Hkv, Ek), Ev = q.shape, k.shape, v.shape[2]
    if Ek != E or v.shape[:2] != (Tk, Hkv):
        raise ValueError(f"k must be (total_k, Hkv, {E}) and v (total_k, Hkv, Ev) with k's "
                         f"rows and heads, got q {shape_str(q.shape)}, k {shape_str(k.shape)}, "
                         f"v {shape_str(v.shape)}")
    if H < 1 or Hkv < 1 or H % Hkv:
        raise ValueError(f"q and k need at least one head each, and k's heads must divide q's: "
                         f"got {H} and {Hkv}")
    cu_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", Tq, "q")
    if cu_seqlens_k is None:
        if Tk != Tq:
            raise ValueError(f"cu_seqlens_k is needed when k holds other rows than q "
                             f"({Tk} against {Tq})")
        cu_k = cu_q
    else:
        cu_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", Tk, "k")
        if len(cu_k) != len(cu_q):
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must count as many sequences, got "
                             f"{len(cu_q) - 1} and {len(cu_k) - 1}")
    cdtype = compute_dtype(q.dtype)
    is_causal = check_flag(is_causal, "is_causal")
    return_lse = check_flag(return_lse, "return_lse")
    scale, window, slopes, softcap, sinks = _score_options(
        E, H, cdtype, scale, window, alibi, alibi_slopes, softcap, sinks)
    ensure_memory([(Tq, H, Ev)] + ([(H, Tq)] if return_lse else []), cdtype.itemsize,
                  "the output")
    out = np.zeros((Tq, H, Ev), dtype=q.dtype)
    lse = np.full((H, Tq), -np.inf, dtype=cdtype) if return_lse else None
    lens_q, lens_k = np.diff(cu_q), np.diff(cu_k)
    if Tq and Ev == 0 and return_lse:
        # (no value columns: the kernel computes the lse beside a zero column)
        v = np.zeros((Tk, Hkv, 1), v.dtype)
        out_k = np.empty((Tq, H, 1), q.dtype)
    else:
        out_k = out
    ragged_into(q.transpose(1, 0, 2)[None], k.transpose(1, 0, 2)[None],
                v.transpose(1, 0, 2)[None], out_k.transpose(1, 0, 2)[None], lens_q, lens_k,
                cu_q[:-1], cu_k[:-1], is_causal=is_causal, scale=scale, window=window,
                slopes=slopes, softcap=softcap, sinks=sinks,
                lse=None if lse is None else (lse, cu_q[:-1], Tq))
    return (out, lse) if return_lse else out


@hide_catchall
def scaled_dot_product_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    attn_mask: Optional[np.ndarray] = None,
    *torch_args,
    is_causal: bool = False,
    scale: Optional[float] = None,
    need_weights: bool = False,
    window: Optional[Tuple[Optional[int], Optional[int]]] = None,
    alibi: bool = False,
    alibi_slopes: Optional[np.ndarray] = None,
    precision=None,
    softcap: Optional[float] = None,
    sinks: Optional[np.ndarray] = None,
    return_lse: bool = False,
    **torch_kwargs,
) -> Union[np.ndarray, Tuple[np.ndarray, ...]]:
    """Scaled dot-product attention, ``softmax(q k^T * scale + mask) v``, per head.

    Parameters
    ----------
    q : ndarray, shape (..., H, Lq, E)
        Queries: float32, float64, bfloat16 (``ml_dtypes.bfloat16``) or
        float16.  bfloat16 and float16 are computed with float32 sums, the
        softmax in float32 (see docs/numerics.md for the errors).
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
    precision : "bfloat16", "float16" or None
        Mixed precision for float32 inputs (as OpenVINO's precision hint or
        torch's autocast): q, k and v are rounded to this type for the
        products, the result is returned in q's dtype.  None: the inputs'
        own type.
    softcap : float > 0, optional
        Logit soft-capping (Gemma 2): the scaled scores ``s`` become
        ``softcap * tanh(s / softcap)`` before masks, ALiBi and the softmax.
    sinks : array of shape (H,), optional
        Attention sinks (GPT-OSS): one logit per query head that joins each
        row's softmax denominator, ``exp(sinks[h])``, with no value; the
        weights then sum to less than 1.  ``-inf``: no sink for that head.
    return_lse : bool
        Also return each query row's log-sum-exp of its scaled, capped,
        masked scores (the log of the softmax's denominator, sink included):
        ``-inf`` for a row that may attend no key (and has no sink).  With
        it, results over disjoint key sets merge exactly
        (:func:`merge_attention`).

    Other torch arguments: ``dropout_p=0`` and ``enable_gqa`` (True or False:
    grouped-query heads are taken whenever k has fewer heads) are accepted
    and change nothing; ``dropout_p`` > 0 (no dropout: inference only) and
    torch's names ``query``, ``key``, ``value`` raise TypeError saying so.
    Arguments after ``attn_mask`` are keyword-only.

    Returns
    -------
    out : ndarray, shape (..., H, Lq, Ev)
        Same dtype as ``q``.
    weights : ndarray, shape (..., H, Lq, Lk)
        Only with ``need_weights=True``, in q's dtype.  Rows sum to 1, or are
        all zero for a query that may attend no key.
    lse : ndarray, shape (..., H, Lq)
        Only with ``return_lse=True``: float32 (float64 for float64 inputs).
        Returned last: ``(out, lse)`` or ``(out, weights, lse)``.

    Raises
    ------
    TypeError
        Non-float inputs, mixed dtypes, a mask that is neither bool nor float;
        torch arguments fastattn has no use for (the message says why).
    ValueError
        Shapes that do not fit together; the message names the argument and
        both shapes.

    Warns
    -----
    MaskConventionWarning
        A bool ``attn_mask`` that blocks every key of every query, or that is
        torch's causal mask with True above the diagonal: most likely a mask
        in ``torch.nn.MultiheadAttention``'s convention (True = blocked);
        ``~attn_mask`` is fastattn's.
    """
    if torch_args:
        too_many_positional("scaled_dot_product_attention", ("q", "k", "v", "attn_mask"),
                            4 + len(torch_args),
                            "torch's next ones are dropout_p, is_causal and scale: pass "
                            "is_causal=... and scale=... by name; there is no dropout")
    if torch_kwargs:
        torch_names("scaled_dot_product_attention", torch_kwargs, SDPA_NAMES)
    q, k, v = check_qkv(q, k, v)
    out_dtype = q.dtype
    if precision is not None:
        precision = float_dtype(precision, "precision")
        if not is_half(precision):
            raise ValueError(f"precision must be 'bfloat16' or 'float16' (or None), "
                             f"got {precision}")
        if q.dtype != np.float32 and q.dtype != precision:
            raise TypeError(f"precision={precision.name} is for float32 inputs, got q, k, v "
                            f"of dtype {q.dtype}")
        q, k, v = (cast_checked(a, precision, name) for a, name in ((q, "q"), (k, "k"), (v, "v")))
    cdtype = compute_dtype(q.dtype)
    is_causal = check_flag(is_causal, "is_causal")
    need_weights = check_flag(need_weights, "need_weights")
    return_lse = check_flag(return_lse, "return_lse")
    alibi = check_flag(alibi, "alibi")
    lead = q.shape[:-3]
    H, Lq, E = q.shape[-3:]
    Lk, Ev = k.shape[-2], v.shape[-1]
    full = lead + (H, Lq, Lk)
    bmask, fmask = prepare_mask(attn_mask, "attn_mask", full, cdtype)
    scale, window, slopes, softcap, sinks = _score_options(
        E, H, cdtype, scale, window, alibi, alibi_slopes, softcap, sinks)
    tables = _offset_table_bytes(lead, 4 + need_weights + (attn_mask is not None))
    ensure_memory([lead + (H, Lq, Ev)] + ([full] if need_weights else []), cdtype.itemsize,
                  "the output" + (" and attention weights" if need_weights else "")
                  + (" and the kernel's offset tables" if tables else ""), tables)
    out = np.empty(lead + (H, Lq, Ev), dtype=q.dtype)
    # the kernels hand weights back in the type they compute in
    weights = np.empty(full, dtype=cdtype) if need_weights else None
    lse = np.empty(lead + (H, Lq), dtype=cdtype) if return_lse else None
    attention_into(
        q, k, v, out,
        bool_masks=(bmask,), float_mask=fmask, is_causal=is_causal, scale=scale,
        weights=weights, window=window, slopes=slopes, softcap=softcap, sinks=sinks, lse=lse,
    )
    if out.dtype != out_dtype:
        out = out.astype(out_dtype)
    result = (out,)
    if need_weights:
        result += (weights.astype(out_dtype, copy=False),)
    if return_lse:
        result += (lse,)
    return result[0] if len(result) == 1 else result


def merge_attention(outs: Sequence[np.ndarray], lses: Sequence[np.ndarray]
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """Merges attention results over disjoint key sets into the result over
    their union, exactly (up to rounding).

    Each part ``s`` is ``(out_s, lse_s)`` from
    ``scaled_dot_product_attention(..., return_lse=True)`` over its own keys
    (a chunk of a long prompt, a shared prefix and a suffix, keys held on
    another machine).  With ``w_s = exp(lse_s - max_s lse_s)``, the merged
    output is ``sum_s w_s out_s / sum_s w_s`` and its log-sum-exp
    ``log(sum_s exp(lse_s))``.  A part whose row attended no key
    (``lse = -inf``) weighs nothing; a row no part attended gets zeros and
    ``-inf``.  Attention sinks belong in the denominator once: give them to
    one part only.

    Parameters
    ----------
    outs : sequence of ndarray, each (..., H, Lq, Ev)
        Partial outputs, one dtype and shape.
    lses : sequence of ndarray, each (..., H, Lq)
        Their log-sum-exps, real arrays of the outputs' leading shape.

    Returns
    -------
    out : ndarray (..., H, Lq, Ev)
        In the parts' dtype (computed in float32, float64 for float64).
    lse : ndarray (..., H, Lq)
        float32 (float64 for float64 parts).
    """
    if (isinstance(outs, np.ndarray) or isinstance(lses, np.ndarray)
            or not isinstance(outs, (list, tuple)) or not isinstance(lses, (list, tuple))):
        raise TypeError(f"merge_attention takes sequences (a list or tuple) of outputs and of "
                        f"log-sum-exps, one entry per part, got {type(outs).__name__} and "
                        f"{type(lses).__name__}")
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(f"merge_attention needs as many outs as lses, at least one: got "
                         f"{len(outs)} outs and {len(lses)} lses")
    outs = [float_array(o, f"outs[{i}]") for i, o in enumerate(outs)]
    dtype = outs[0].dtype
    cdtype = compute_dtype(dtype)
    arrays = []
    for i, (o, l) in enumerate(zip(outs, lses)):
        if o.ndim < 3:
            raise ValueError(f"outs[{i}] must be (..., H, Lq, Ev), at least 3 axes, got shape "
                             f"{shape_str(o.shape)}")
        if o.dtype != dtype:
            raise TypeError(f"outs[{i}] is {o.dtype} beside outs[0]'s {dtype}: every part "
                            f"must have one dtype")
        if o.shape != outs[0].shape:
            raise ValueError(f"outs[{i}] has shape {shape_str(o.shape)} beside outs[0]'s "
                             f"{shape_str(outs[0].shape)}: every part must have one shape")
        if l is None:
            raise TypeError(f"lses[{i}] is None: each part needs its log-sum-exp "
                            f"(return_lse=True)")
        l = to_array(l, f"lses[{i}]")
        if l.dtype.kind != "f" and not is_half(l.dtype):
            raise TypeError(f"lses[{i}] must be a float array, got dtype {l.dtype}")
        if l.shape != o.shape[:-1]:
            raise ValueError(f"lses[{i}] must have shape {shape_str(o.shape[:-1])} (outs[{i}] "
                             f"without its last axis), got {shape_str(l.shape)}")
        arrays.append((o.astype(cdtype, copy=False), l.astype(cdtype, copy=False)))
    stacked = np.stack([l for _, l in arrays])
    if np.any(stacked == np.inf):
        raise ValueError("lses hold +inf: a log-sum-exp is finite, -inf or NaN")
    top = stacked.max(axis=0)
    shift = np.where(top == -np.inf, 0, top)
    total = np.zeros(top.shape, cdtype)
    out = np.zeros(outs[0].shape, cdtype)
    with np.errstate(invalid="ignore", divide="ignore"):
        for o, l in arrays:
            w = np.exp(l - shift)
            total += w
            # a part of weight 0 is left out, not multiplied: its out may be 0 * inf
            out += np.where(w[..., None] == 0, 0, w[..., None] * o)
        out = np.where(total[..., None] == 0, 0, out / total[..., None])
        lse = shift + np.log(total)
    return out.astype(dtype, copy=False), lse.astype(cdtype, copy=False)
