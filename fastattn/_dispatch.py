"""Loads the widest build of the kernels that this CPU runs.

setup.py compiles the same kernel source for several instruction sets; the
baseline build is always importable and tells, through cpuid, which of the
others the CPU (and its OS) supports.  FASTATTN_ISA=baseline|avx2|avx512
forces a build, for testing and for comparing them.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from . import _kernels_baseline

ISA_ORDER = ("avx512", "avx2", "baseline")


def available_isas() -> list[str]:
    """Builds that are both compiled into this install and runnable on this CPU."""
    features = _kernels_baseline.cpu_features()
    found = []
    for isa in ISA_ORDER:
        if isa != "baseline" and not features.get(isa, False):
            continue
        try:
            importlib.import_module(f"fastattn._kernels_{isa}")
        except ImportError:
            continue
        found.append(isa)
    return found


def _select() -> ModuleType:
    forced = os.environ.get("FASTATTN_ISA", "").strip().lower()
    runnable = available_isas()
    if forced:
        if forced not in runnable:
            raise ImportError(
                f"FASTATTN_ISA={forced!r} is not available here; this install and CPU "
                f"offer {runnable}"
            )
        isa = forced
    else:
        isa = runnable[0]
    return importlib.import_module(f"fastattn._kernels_{isa}")


kernels: ModuleType = _select()
"""The kernel module in use (``kernels.isa()`` names its instruction set)."""
