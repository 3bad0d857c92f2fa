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
import sys
import warnings

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
    if env.isascii() and env.isdigit() and int(env) > 0:
        return int(env)
    return _cpu_count()


# More threads than this is a mistake (each one gets its own OpenMP stack and
# scratch); the OpenMP runtime would fail, or crash, trying to start them.
MAX_THREADS = 1024

_num_threads = min(default_num_threads(), MAX_THREADS)


# True in a process forked after fastattn ran a team of several threads: GCC's
# OpenMP runtime cannot start a new team there (the child would hang), so the
# child runs on one thread.
_forked_after_team = False


def _team_started() -> bool:
    return any(getattr(mod, "team_started", lambda: False)()
               for name, mod in list(sys.modules.items())
               if name.startswith("fastattn._kernels_") and mod is not None)


def _after_fork_in_child() -> None:
    global _num_threads, _forked_after_team
    if _team_started():
        _forked_after_team = True
        _num_threads = 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def set_num_threads(n: int) -> None:
    """Set the number of threads fastattn calls use (projections included).

    Parameters
    ----------
    n : int
        A positive thread count.  ``default_num_threads()`` gives the
        default: ``OMP_NUM_THREADS`` if set, else the cores this process may use.

    In a process forked (``os.fork``, multiprocessing's default 'fork'
    method on Linux) after fastattn ran on several threads, the count stays 1,
    with a RuntimeWarning: the OpenMP runtime cannot start threads there.

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
    if n > 1 and _forked_after_team:
        warnings.warn(
            f"set_num_threads({n}) in a process forked after fastattn ran on several "
            f"threads: GCC's OpenMP runtime cannot start threads there (the process would "
            f"hang), so fastattn stays on 1 thread. Start workers with the 'spawn' or "
            f"'forkserver' method to use more.", RuntimeWarning, stacklevel=2)
        n = 1
    _num_threads = int(n)


def get_num_threads() -> int:
    """The number of threads a fastattn call uses."""
    return _num_threads
