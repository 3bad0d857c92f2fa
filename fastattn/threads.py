"""Thread counts, in one place.

One number bounds every busy thread of a fastattn call: the OpenMP threads of
the attention kernel and the threads that run the Q/K/V and output projections.
The projections are NumPy matmuls whose rows are split over the same OpenMP
threads while the BLAS underneath is held to one thread, so BLAS worker
threads never spin beside the kernel's (on two cores that would be four busy
threads: see ``shared/MEASURED.md``, "Traps").
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np

from ._dispatch import kernels

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


_num_threads = default_num_threads()


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
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    _num_threads = int(n)


def get_num_threads() -> int:
    """The number of threads a fastattn call uses."""
    return _num_threads


# ---- BLAS held to one thread while fastattn runs -------------------------

_blas_lock = threading.Lock()
_blas_depth = 0
_blas_saved: list = []
_blas_libs: Optional[list] = None


def _blas_controllers() -> list:
    global _blas_libs
    if _blas_libs is None:
        from threadpoolctl import ThreadpoolController

        _blas_libs = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    return _blas_libs


def blas_info() -> list[dict]:
    """The BLAS libraries NumPy loaded: name, version, architecture, threads."""
    return [
        {
            "library": lib.internal_api,
            "version": lib.version,
            "architecture": getattr(lib, "architecture", None),
            "num_threads": lib.num_threads,
            "filepath": lib.filepath,
        }
        for lib in _blas_controllers()
    ]


@contextmanager
def blas_single_threaded() -> Iterator[None]:
    """Hold NumPy's BLAS to one thread; nested and concurrent uses share one hold.

    The first caller in saves the libraries' thread counts and sets them to 1;
    the last one out restores them, so user code outside fastattn calls keeps
    its own BLAS threading.
    """
    global _blas_depth, _blas_saved
    with _blas_lock:
        if _blas_depth == 0:
            libs = _blas_controllers()
            _blas_saved = [(lib, lib.num_threads) for lib in libs]
            for lib, count in _blas_saved:
                if count != 1:
                    lib.set_num_threads(1)
        _blas_depth += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_depth -= 1
            if _blas_depth == 0:
                for lib, count in _blas_saved:
                    if count != 1:
                        lib.set_num_threads(count)
                _blas_saved = []


def matmul_into(a: np.ndarray, b: np.ndarray, out: np.ndarray, num_threads: int) -> np.ndarray:
    """``out[...] = a @ b`` (2-D) on ``num_threads`` threads, BLAS held to one.

    Call inside :func:`blas_single_threaded`.  Small products run on the
    calling thread: splitting them costs more than it saves.
    """
    rows = a.shape[0]
    work = rows * a.shape[1] * b.shape[1]
    threads = num_threads if work >= _SPLIT_MIN_WORK else 1
    threads = max(1, min(threads, rows))
    kernels.parallel_matmul(a, b, out, threads)
    return out


# Below ~64^3 multiply-adds per thread, fork/join costs more than the split saves.
_SPLIT_MIN_WORK = 2 * 64 * 64 * 64
