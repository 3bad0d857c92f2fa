"""What this install runs on: kernel build, OpenMP, threads, BLAS."""

from __future__ import annotations

import platform
from typing import Any, Dict

import numpy as np

from . import threads
from ._dispatch import available_isas, kernels


def info() -> Dict[str, Any]:
    """A dict describing the running configuration (printed by ``python -m fastattn info``).

    Keys: ``version``, ``kernel_isa`` (the instruction-set build in use),
    ``available_isas``, ``openmp``, ``num_threads``, ``numpy``, ``blas``
    (the libraries NumPy loaded, from threadpoolctl), ``python``, ``machine``.
    """
    from . import __version__

    return {
        "version": __version__,
        "kernel_isa": kernels.isa(),
        "available_isas": available_isas(),
        "openmp": kernels.openmp_enabled(),
        "num_threads": threads.get_num_threads(),
        "numpy": np.__version__,
        "blas": threads.blas_info(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
