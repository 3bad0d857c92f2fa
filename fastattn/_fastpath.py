"""The plain call's fast path: ``m(x)`` with no options, behind one gate.

:meth:`FastPath._plain_call` alone decides whether a call can take a
:class:`ForwardPlan` (the kernels' object that runs the Q/K/V projection, the
attention and the output projection on buffers laid out once), finds the
calling thread's plan or makes one, and runs it.  It returns None for every
call it does not take; the general forward then runs, which handles every
other case and raises every error.

A plan holds what depends only on the shape, the thread count and the packed
weights (buffers, head views, the kernels' checked arguments), so a call's
Python work is a few checks.  Plans live in the parameter snapshot
(``_params.Params``) they were made from, one per calling thread: a weight
change swaps the snapshot, and its plans go with it.
"""

from __future__ import annotations

import math
import threading
from typing import Optional, Tuple

import numpy as np

from . import _policy
from ._dispatch import kernels
from ._dtypes import BFLOAT16, is_half, kernel_view
from ._params import Params
from ._validate import ensure_memory, plain_options
from .threads import get_num_threads

__all__ = ["FastPath"]


class FastPath:
    """The fast path's half of a module: per-thread buffers and plans."""

    def _init_fastpath(self) -> None:
        self._workspace = threading.local()

    @property
    def _plan(self):
        """The last ForwardPlan made from the current weights, or None."""
        return self._state.plan

    def _plain_call(self, x, options) -> Optional[np.ndarray]:
        """``m(x, **options)`` through this thread's plan, or None (see
        _plain_call_words)."""
        if type(x) is np.ndarray and x.dtype == BFLOAT16:
            # the kernels take bfloat16 as its 16-bit words (see _dtypes)
            y = self._plain_call_words(x.view(np.uint16), options)
            return None if y is None else y.view(BFLOAT16)
        return self._plain_call_words(x, options)

    def _plain_call_words(self, x, options) -> Optional[np.ndarray]:
        """``m(x, **options)`` through this thread's plan, or None when the
        call cannot take one: it has options (other than their defaults), or
        x is not a C-contiguous, aligned (B, N, embed_dim) ndarray of the
        module's dtype, or the module has no stacked Q/K/V weight.

        The last plan made checks, in C, that it fits this call (the thread
        that made it, the thread count, the weights it was made from, x's
        dtype, shape and layout): after the GEMMs each Python operation costs
        microseconds, its code and data gone from the caches, so the common
        case does no more than that.
        """
        if options and not plain_options(options):
            return None
        state = self._state  # this call's weights, whatever other threads assign
        nt = get_num_threads()
        tid = threading.get_ident()
        plan = state.plan
        if plan is not None:
            y = plan.run_if(x, state.packed, tid, nt)
            if y is not None:
                return y
        mine = state.plans.get(tid)
        if mine is not None and mine is not plan:
            y = mine.run_if(x, state.packed, tid, nt)
            if y is not None:
                return y
        # no plan of this thread fits: can x take a new one?
        # (mixed precision, whose x and activations differ in type, takes the
        # general forward)
        words = np.dtype(np.uint16) if self.dtype == BFLOAT16 else self.dtype
        if (type(x) is not np.ndarray or x.dtype != words or x.ndim != 3
                or self._act_dtype != self.dtype or not self._plannable
                or not self.fused or not x.flags.c_contiguous or not x.flags.aligned):
            return None
        B, N, D = x.shape
        if D != self.embed_dim or B * N == 0:
            return None
        ensure_memory([(B * N, D + 2 * self.kv_dim), (B * N, D), (B * N, D)],
                      self.dtype.itemsize, "the forward pass's buffers")
        plan = self._plain_plan(state, B, N, nt, tid)
        # plans of threads that have ended go (and their buffers with them);
        # list() copies the keys at once, while other threads may add theirs
        alive = {t.ident for t in threading.enumerate()}
        for t in list(state.plans):
            if t not in alive:
                state.plans.pop(t, None)
        state.plans[tid] = plan
        state.plan = plan
        return plan.run(x)

    def _buffers(self, B: int, L: int) -> Tuple[np.ndarray, np.ndarray]:
        """(qkv, merged) scratch of a self-attention pass, kept per calling
        thread; the general forward's self-attention uses them too.

        qkv is head-major, (B, H + 2 Hkv, L, E): the projection writes each
        head's rows contiguously, so the kernel streams K and V instead of
        gathering rows ``(H + 2 Hkv) * E`` elements apart.  Reused while the
        shape stays the same, because fresh pages cost a page fault and a
        zeroing pass each (docs/performance.md, "Layouts and buffers").  Only the last
        shape is kept.
        """
        ws = self._workspace
        bufs = getattr(ws, "bufs", None)
        groups = self.num_heads + 2 * self.num_kv_heads
        if bufs is None or bufs[0].shape != (B, groups, L, self.head_dim):
            bufs = (
                np.empty((B, groups, L, self.head_dim), dtype=self._act_dtype),
                np.empty((B * L, self.q_dim), dtype=self._act_dtype),
            )
            ws.bufs = bufs
        return bufs

    def _plain_plan(self, state: Params, B: int, N: int, nt: int, tid: int):
        H, Hkv, E = self.num_heads, self.num_kv_heads, self.head_dim
        wq, bq = self._packed_weight(state, "qkv")
        wo, bo = self._packed_weight(state, "o")
        qkv, merged = self._buffers(B, N)
        out = merged.reshape(B, N, H, E).transpose(0, 2, 1, 3)
        # the plan runs for the token state.packed (compared by identity: it
        # fits while state is the module's current one) and the calling thread
        qkv, out, merged = kernel_view(qkv), kernel_view(out), kernel_view(merged)
        pairs = _policy.attention_pairs(kernels, self._act_dtype, self._act_dtype, E)
        return kernels.ForwardPlan(
            wq, bq, self.embed_dim + 2 * self.kv_dim, qkv, qkv[:, :H], qkv[:, H:H + Hkv],
            qkv[:, H + Hkv:], out, merged, wo, bo,
            1.0 / math.sqrt(E) if self.scale is None else self.scale,
            _policy.attention_schedule(B * H, N, N, False, nt, pairs=pairs),
            _policy.linear_blocking(self.embed_dim), nt, state.packed, tid,
            _policy.per_head(B, Hkv, nt, is_half(self._act_dtype)))
