"""Thread counts, in one place.

One number bounds every busy thread of a fastattn call.  The Q/K/V and output
projections run on fastattn's own GEMM (fastattn/_src, the same micro-kernel
as the attention tiles), inside the same OpenMP thread team as the attention
kernel, so no BLAS thread pool is involved: nothing spins beside the kernel's
threads (on two cores, BLAS workers still spinning after a NumPy matmul would
make four busy threads; see shared/MEASURED.md, "Traps").
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["get_num_threads", "set_num_threads", "default_num_threads"]


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_num_threads() -> int:
    """OMP_NUM_THREADS when it is a positive integer, else the usable cores."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return _cpu_count()


# More threads than this is a mistake (each one gets its own OpenMP stack and
# scratch); the OpenMP runtime would fail, or crash, trying to start them.
MAX_THREADS = 1024

_num_threads = min(default_num_threads(), MAX_THREADS)


def set_num_threads(n: int) -> None:
    """Set the number of threads fastattn calls use (projections included).

    Parameters
    ----------
    n : int
        A positive thread count.  ``default_num_threads()`` gives the
        default: ``OMP_NUM_THREADS`` if set, else the cores this process may use.

    Raises
    ------
    TypeError
        ``n`` is not an int.
    ValueError
        ``n`` is below 1.
    """
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"set_num_threads: n must be a positive int, got {n!r}")
    if n < 1 or n > MAX_THREADS:
        raise ValueError(f"set_num_threads: n must be between 1 and {MAX_THREADS}, got {n}")
    _num_threads = int(n)


def get_num_threads() -> int:
    """The number of threads a fastattn call uses."""
    return _num_threads
