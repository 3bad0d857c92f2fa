"""Thread counts, in one place.

One number bounds every busy thread of a fastattn call.  The Q/K/V and output
projections run on fastattn's own GEMM (fastattn/_kernels/src, the same micro-kernel
as the attention tiles), inside the same OpenMP thread team as the attention
kernel, so no BLAS thread pool is involved: nothing spins beside the kernel's
threads (on two cores, BLAS workers still spinning after a NumPy matmul would
make four busy threads, each kernel thread sharing its core with a spinner).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings

import numpy as np

from . import _resources

__all__ = ["get_num_threads", "set_num_threads", "default_num_threads"]


def default_num_threads() -> int:
    """OMP_NUM_THREADS when it is a positive integer, else the usable cores
    (affinity mask and cgroup CPU quota, see fastattn._resources)."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isascii() and env.isdigit() and int(env) > 0:
        return int(env)
    return _resources.usable_cpus()


# More threads than this is a mistake (each one gets its own OpenMP stack and
# scratch); the OpenMP runtime would fail, or crash, trying to start them.
MAX_THREADS = 1024

_num_threads = min(default_num_threads(), MAX_THREADS)


# Set by fastattn.dask's tasks, through this_thread_uses: a count for the
# calls of one thread that leaves _num_threads, the caller's, alone.
class _ThreadCount(threading.local):
    # a class default: reading an unset count is a plain attribute hit, not a
    # caught AttributeError, on every call's path
    n = None


_this_thread = _ThreadCount()


# True in a process forked after an OpenMP team of several threads ran, in
# fastattn or in another library on the same libgomp: GCC's OpenMP runtime
# keeps the forking thread's pool, whose threads do not exist in the child, and
# its next team of several threads waits for them forever.  The child runs on
# one thread.  Sticky: a grandchild inherits the stale pool too.
_forked_after_team = False


def _team_started() -> bool:
    return any(getattr(mod, "team_started", lambda: False)()
               for name, mod in list(sys.modules.items())
               if name.startswith("fastattn._kernels._") and mod is not None)


# threading lists a foreign thread that once called into Python (a ctypes
# callback from an OpenMP worker, say) as a dummy entry for good: such a
# thread was not started by Python and still counts as foreign.
_DummyThread = getattr(threading, "_DummyThread", ())


def _native_threads_python_does_not_know() -> set:
    """Thread ids of this process that Python did not start (Linux; else empty)."""
    try:
        tids = {int(t) for t in os.listdir("/proc/self/task")}
    except (OSError, ValueError):
        return set()
    return tids - {t.native_id for t in threading.enumerate()
                   if not isinstance(t, _DummyThread)}


def _libgomp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return any("libgomp" in line for line in f)
    except OSError:
        return False


# libgomp does not say whether the forking thread has a pool, so any native
# thread Python did not start counts as one of its pool's, except those that
# existed before libgomp was loaded (numpy's OpenBLAS starts its threads on
# import; this module is imported before the kernels, which load libgomp).
_threads_before_libgomp = frozenset() if _libgomp_loaded() else \
    frozenset(_native_threads_python_does_not_know())
_foreign_threads_at_fork = False


def _before_fork() -> None:
    global _foreign_threads_at_fork
    try:
        _foreign_threads_at_fork = bool(_native_threads_python_does_not_know()
                                        - _threads_before_libgomp)
    except Exception:  # a fork hook must not raise: assume a pool, the safe side
        _foreign_threads_at_fork = True


def _after_fork_in_child() -> None:
    global _num_threads, _forked_after_team
    if _forked_after_team or _foreign_threads_at_fork or _team_started():
        _forked_after_team = True
        _num_threads = 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def valid_count(n, name: str) -> int:
    """``n`` as a thread count: an int or numpy int from 1 to MAX_THREADS."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be an int from 1 to {MAX_THREADS}, got {n!r}")
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"{name} must be an int from 1 to {MAX_THREADS}, got {n}")
    return int(n)


def _count_for_this_process(n, name: str) -> int:
    """A valid ``n``, or 1, with a RuntimeWarning, in a process forked after a
    team of several threads."""
    n = valid_count(n, name)
    if n > 1 and _forked_after_team:
        warnings.warn(
            f"{name} = {n} in a process forked after an OpenMP thread team ran (fastattn's "
            f"or another library's): GCC's OpenMP runtime cannot start threads there (a "
            f"call would hang), so fastattn stays on 1 thread. Start workers with the "
            f"'spawn' or 'forkserver' method to use more.", RuntimeWarning, stacklevel=3)
        return 1
    return n


@contextlib.contextmanager
def this_thread_uses(n: int, name: str = "n"):
    """Within the block, fastattn calls made from this thread use ``n`` threads;
    other threads, and the count set_num_threads sets, are left alone."""
    n = _count_for_this_process(n, name)
    outer = _this_thread.n
    _this_thread.n = n
    try:
        yield
    finally:
        _this_thread.n = outer


def set_num_threads(n: int) -> None:
    """Set the number of threads fastattn calls use (projections included).

    Parameters
    ----------
    n : int
        A positive thread count.  ``fastattn.threads.default_num_threads()``
        gives the default: ``OMP_NUM_THREADS`` if set, else the cores this
        process may use.

    In a process forked (``os.fork``, multiprocessing's default 'fork'
    method on Linux) after an OpenMP team of several threads ran (fastattn's,
    or another library's on the same OpenMP runtime), the count stays 1, with a
    RuntimeWarning: the OpenMP runtime cannot start threads there.

    Raises
    ------
    TypeError
        ``n`` is not an int.
    ValueError
        ``n`` is not between 1 and ``fastattn.threads.MAX_THREADS`` (1024).
    """
    global _num_threads
    _num_threads = _count_for_this_process(n, "set_num_threads: n")


def get_num_threads() -> int:
    """The number of threads a fastattn call made from this thread uses."""
    n = _this_thread.n
    return _num_threads if n is None or _forked_after_team else n
