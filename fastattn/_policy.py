"""Every tuning decision of fastattn, in one place.

The kernels (fastattn._kernels) make no choices: each call receives the
decisions made here as arguments.  What is measured behind each number is in
docs/performance.md.

- Attention: query rows x keys per tile (BLOCK_Q, BLOCK_K); the few-queries
  row mode; how many key splits (split-K) one row mode call uses.
- Projection: rows and weight panels per work item, and the inner-dimension
  chunk kc.
- The module's forward: whether it runs one (batch entry, K/V head) at a time.

Thread counts themselves are fastattn.threads'; a kernel never starts more
threads than it has work items.
"""

from __future__ import annotations

from typing import Tuple

# Query rows x keys per attention tile; multiples of every build's register
# tile.  256 keys per step rather than 64: fewer online-softmax passes and
# output rescales per tile (the score block outgrows L1 but streams from L2).
BLOCK_Q = 64
BLOCK_K = 256

# At or below this many queries a call runs row by row (decoding): queries
# along vector lanes would leave most lanes of a tile empty.
ROW_MODE_MAX_QUERIES = 4

# Split-K: each split gets at least this many keys, so the merge of the
# splits stays cheap next to the splits themselves.
MIN_KEYS_PER_SPLIT = 512

# Rows x output panels per projection work item: a block of packed weights
# (K x 2 panels) stays in L2 while the rows stream past it.
LINEAR_ROWS = 128
# Rows of one work item of apply_rotary's pass (a few microseconds of work each).
ROTATE_ROWS = 256
LINEAR_PANELS = 2
# The inner dimension is taken whole up to KC_WHOLE, else in chunks of KC, so
# that one panel's chunk and the rows reading it stay in L1/L2.
KC_WHOLE = 1024
KC = 512


def attention_schedule(batch_heads: int, len_q: int, len_k: int, need_weights: bool,
                       num_threads: int, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
                       pairs: bool = False) -> Tuple[int, int, bool, int, bool]:
    """(block_q, block_k, row_mode, n_splits, pairs) of one attention call over
    ``batch_heads`` (batch x query heads) sequences: the ``schedule`` argument
    of the kernels' ``attention`` and ``ForwardPlan``.

    Row mode for few queries (not with weights: a row keeps no scores); in
    row mode, split each row's keys when batch x heads alone would leave
    threads idle, two splits' worth of work per thread.  ``pairs`` (the
    caller's :func:`attention_pairs`) asks for the tiles' bfloat16 pair
    products; row mode reads the keys once per query, bound by memory, and
    keeps the widening path.
    """
    if len_q > ROW_MODE_MAX_QUERIES or need_weights:
        return (block_q, block_k, False, 1, bool(pairs) and not need_weights)
    n_splits = 1
    busy = batch_heads
    if 0 < busy < 2 * num_threads:
        n_splits = max(1, min((2 * num_threads + busy - 1) // busy,
                              len_k // MIN_KEYS_PER_SPLIT))
    return (block_q, block_k, True, n_splits, False)


def attention_pairs(kernels, q_dtype, kv_dtype, head_dim: int) -> bool:
    """Whether attention over these operands multiplies bfloat16 pairs
    (VDPBF16PS): a build that has them, bfloat16 q, k and v, and an even head
    width (rows of K are read in place, a pair at a time).  Otherwise 16-bit
    operands are widened to float32 as they are packed."""
    from ._dtypes import BFLOAT16
    return (kernels.pairs() and q_dtype == BFLOAT16 and kv_dtype == BFLOAT16
            and head_dim % 2 == 0)


def weight_pairs(kernels, dtype) -> bool:
    """Whether weights of ``dtype`` are packed in bfloat16 pairs for the
    projections (a build with VDPBF16PS and bfloat16 weights)."""
    from ._dtypes import BFLOAT16
    return kernels.pairs() and dtype == BFLOAT16


def linear_blocking(k: int) -> Tuple[int, int, int]:
    """(rows, panels, kc) of a projection whose inner dimension is ``k``: the
    ``blocking`` argument of the kernels' ``linear`` and ``ForwardPlan``."""
    return (LINEAR_ROWS, LINEAR_PANELS, k if k <= KC_WHOLE else KC)


def per_head(batch: int, kv_heads: int, num_threads: int, half: bool = False) -> bool:
    """Whether the module's forward projects and attends one (batch entry, K/V
    head) at a time, keeping each head's Q, K and V in its thread's cache from
    projection to attention.  The items are coarse: with fewer than two per
    thread, one slow item would leave the other threads idle.  Not with
    16-bit activations (``half``): their Q, K and V are half the bytes, and
    the schedule measured no faster at bert and wide and slower at long."""
    return not half and batch * kv_heads >= 2 * num_threads
