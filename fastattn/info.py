"""What this install runs on: kernel build, OpenMP, threads, CPU and memory limits, BLAS."""

from __future__ import annotations

import platform
from typing import Any, Dict

import numpy as np

from . import _resources, threads
from ._dispatch import available_isas, kernels


def numpy_blas() -> Dict[str, Any]:
    """The BLAS NumPy was built against (used by the NumPy comparison only:
    fastattn's projections run on its own GEMM)."""
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        return {"name": blas.get("name"), "version": blas.get("version")}
    except Exception:  # older NumPy, or a build without the config
        return {"name": "unknown", "version": None}


def info() -> Dict[str, Any]:
    """A dict describing the running configuration (printed by ``python -m fastattn info``).

    Keys: ``version``, ``kernel_isa`` (the instruction-set build in use),
    ``available_isas``, ``openmp``, ``num_threads``, ``limits`` (the CPUs and
    memory this process may use: affinity mask, cgroup CPU quota and memory
    limit, see ``fastattn._resources.limits``), ``projections`` (what runs the
    Q/K/V and output GEMMs), ``bfloat16`` (how bfloat16 products run in this
    build: ``"VDPBF16PS pairs"`` or ``"widened to float32"``; float16 is always
    widened), ``numpy``, ``numpy_blas``, ``python``, ``machine``.
    """
    from . import __version__

    return {
        "version": __version__,
        "kernel_isa": kernels.isa(),
        "available_isas": available_isas(),
        "openmp": kernels.openmp_enabled(),
        "num_threads": threads.get_num_threads(),
        "limits": _resources.limits(),
        "numpy": np.__version__,
        "projections": f"fastattn GEMM ({kernels.isa()}, "
                       + ("OpenMP)" if kernels.openmp_enabled() else "single-threaded)"),
        "bfloat16": "VDPBF16PS pairs" if kernels.pairs() else "widened to float32",
        "numpy_blas": numpy_blas(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
