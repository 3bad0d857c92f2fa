"""Attention over datasets larger than one machine, with Dask.

``fastattn.dask.apply(module, x)`` maps a :class:`~fastattn.MultiHeadSelfAttention`
over a dask array of sequences, ``(num_sequences, N, D)`` chunked along the
first axis, and returns the dask array of outputs.  The module travels to the
workers once (it pickles as its config and weights), every chunk runs the
ordinary in-process forward, and each task's fastattn thread count is chosen so
that, on every machine, worker threads x fastattn threads do not exceed its
cores.  Dask is an optional dependency (``pip install 'fastattn[dask]'``):
``import fastattn`` never imports it; ``import fastattn.dask`` does.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, Optional

import numpy as np

import dask
import dask.array as da

from . import _resources, threads
from ._validate import prepare_mask, to_array
from .modules import MultiHeadSelfAttention

__all__ = ["apply", "thread_plan"]


def _forward_block(module: MultiHeadSelfAttention, x: np.ndarray, key_padding_mask,
                   attn_mask, is_causal: bool, plan: Dict[str, int], default: int) -> np.ndarray:
    """One chunk on a worker: run the forward with this task's thread count.

    Tasks of the local scheduler run in the caller's own process, several at
    once: the count is the task thread's own, so the caller's (and what it
    sets during the compute) is never touched.
    """
    n = default
    try:
        from distributed import get_worker

        n = plan.get(get_worker().address, default)
    except (ImportError, ValueError):  # not on a distributed worker
        pass
    with threads.this_thread_uses(max(1, n), "threads_per_task"):
        return module(x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                      is_causal=is_causal)


def thread_plan(client=None, threads_per_task: Optional[int] = None) -> Dict[str, Any]:
    """fastattn threads per task, per worker: ``{"plan": {address: n}, "default": n}``.

    With a distributed client, each host's cores are shared out among the
    worker threads it runs (the cores a worker may use, as fastattn's default
    thread count counts them, // worker threads on that host, at least 1).
    Without one (dask's local schedulers run one task per core), 1.
    ``threads_per_task`` (an int or numpy int) overrides both.
    """
    if threads_per_task is not None:
        return {"plan": {}, "default": threads.valid_count(threads_per_task, "threads_per_task")}
    if client is None:
        try:
            from distributed import get_client

            client = get_client()
        except (ImportError, ValueError):
            return {"plan": {}, "default": 1}
    workers = client.scheduler_info()["workers"]
    cores = client.run(_resources.usable_cpus)  # {address: cores it may use}
    per_host: Dict[str, int] = {}
    for addr, w in workers.items():
        per_host[w["host"]] = per_host.get(w["host"], 0) + int(w["nthreads"])
    plan = {
        addr: max(1, int(cores.get(addr) or 1) // max(1, per_host[w["host"]]))
        for addr, w in workers.items()
    }
    return {"plan": plan, "default": 1}


def apply(
    module: MultiHeadSelfAttention,
    x,
    *,
    attn_mask=None,
    key_padding_mask=None,
    is_causal: bool = False,
    threads_per_task: Optional[int] = None,
    client=None,
):
    """Map ``module`` over the sequences of a dask array.

    Parameters
    ----------
    module : MultiHeadSelfAttention
        Sent to the workers once, as its config and weights at this call
        (weights assigned afterwards do not reach the returned array).
    x : dask.array.Array or ndarray, shape (S, N, D)
        Sequences, chunked along the first axis (other axes are merged into
        one chunk).  A NumPy array is wrapped with one chunk per 64 sequences.
    attn_mask : ndarray, optional
        One mask for every sequence, broadcastable to (H, N, N) (bool: True =
        may attend; float: added to the scores).
    key_padding_mask : array of bool, shape (S, N), optional
        Per-sequence padding (True = padding), NumPy or dask; chunked
        alongside ``x``.
    is_causal : bool
        Causal self-attention.
    threads_per_task : int, optional
        fastattn threads per chunk; by default each machine's cores divided
        by the worker threads it runs (see :func:`thread_plan`).
    client : distributed.Client, optional
        Defaults to the current client, if any.

    Returns
    -------
    dask.array.Array, shape (S, N, D), the module's dtype
    """
    if not isinstance(module, MultiHeadSelfAttention):
        raise TypeError(f"module must be a fastattn.MultiHeadSelfAttention, got {type(module).__name__}")
    if not isinstance(x, da.Array):
        x = da.from_array(to_array(x, "x"), chunks=(64, -1, -1))
    if x.ndim != 3 or x.shape[2] != module.d_model:
        raise ValueError(
            f"x must have shape (num_sequences, N, {module.d_model}), got {tuple(x.shape)}"
        )
    x = x.rechunk({1: -1, 2: -1})
    S, N, D = x.shape
    kpm_blocks = [None] * len(x.chunks[0])
    if key_padding_mask is not None:
        kpm = key_padding_mask
        if not isinstance(kpm, da.Array):
            kpm = to_array(kpm, "key_padding_mask")
        # a dask array's dtype and shape are known now too: both checked
        # before the graph is built, not in the middle of the compute
        if kpm.dtype != np.bool_:
            raise TypeError(f"key_padding_mask must be a bool array (True = padding), "
                            f"got dtype {kpm.dtype}")
        rows_unknown = math.isnan(S) or (kpm.ndim == 2 and math.isnan(kpm.shape[0]))
        if kpm.ndim != 2 or kpm.shape[1] != N or (kpm.shape[0] != S and not rows_unknown):
            raise ValueError(f"key_padding_mask must have shape {(S, N)}, got {tuple(kpm.shape)}")
        if rows_unknown:
            # sequences selected by a computed condition (x[keep],
            # key_padding_mask[keep]): the chunks' lengths are known only
            # when computed, so the mask's chunks are paired with x's as they
            # come, and each task checks its pair's lengths
            if not isinstance(kpm, da.Array) or kpm.numblocks[0] != x.numblocks[0]:
                raise ValueError(
                    f"x and key_padding_mask have sequences of unknown number (shapes "
                    f"{tuple(x.shape)} and {tuple(kpm.shape)}): give both as dask arrays "
                    f"of as many chunks along the first axis ({x.numblocks[0]} in x, "
                    f"{kpm.numblocks[0] if isinstance(kpm, da.Array) else 'none'} in "
                    f"key_padding_mask), or call compute_chunk_sizes() on them")
            kpm_blocks = list(kpm.rechunk({1: -1}).to_delayed().ravel())
        else:
            if not isinstance(kpm, da.Array):
                kpm = da.from_array(kpm, chunks=(x.chunks[0], -1))
            kpm_blocks = list(kpm.rechunk((x.chunks[0], -1)).to_delayed().ravel())
    if attn_mask is not None:
        # checked here, as the module would check it, so a bad mask fails now
        # rather than in the middle of the compute
        attn_mask = to_array(attn_mask, "attn_mask")
        prepare_mask(attn_mask, "attn_mask", (1, module.num_heads, N, N), module.dtype)
    plan = thread_plan(client, threads_per_task)
    # the module as it is now: the graph's keys are made from its weights
    # now, and its tasks must compute with them, not with weights assigned
    # before the compute (whose results would be kept under these keys, for
    # a later apply of these weights to be handed)
    module_d = dask.delayed(copy.copy(module), pure=True, traverse=False)
    mask_d = dask.delayed(attn_mask, pure=True, traverse=False) if attn_mask is not None else None
    out = []
    for block, kpm_block, rows in zip(x.to_delayed().ravel(), kpm_blocks, x.chunks[0]):
        y = dask.delayed(_forward_block, pure=True)(
            module_d, block, kpm_block, mask_d, is_causal, plan["plan"], plan["default"]
        )
        out.append(da.from_delayed(y, shape=(rows, N, D), dtype=module.dtype))
    return da.concatenate(out, axis=0)
