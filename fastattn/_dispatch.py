"""Loads the widest build of the kernels that this CPU runs.

setup.py compiles the same kernel source for several instruction sets
(fastattn._kernels._baseline, _avx2, _avx512, _avx512bf16: the work items, each module
re-exporting the driver's entry points bound to its own items, see
fastattn/_kernels/__init__.py); the baseline build is always
importable and tells, through cpuid, which of the others the CPU (and its OS)
supports.  FASTATTN_ISA=baseline|avx2|avx512|avx512bf16 forces a build, for testing and
for comparing them.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from types import ModuleType
from typing import Optional

ISA_ORDER = ("avx512bf16", "avx512", "avx2", "baseline")


def _module_name(isa: str) -> str:
    return f"{__package__}._kernels._{isa}"


def _unbuilt(err: ImportError) -> ImportError:
    """The error for a package whose kernels were never compiled: what to do
    rather than Python's own message (from a source checkout, a bare
    'cannot import name' that reads like a circular import)."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if os.path.exists(os.path.join(root, "setup.py")):
        how = (f"This is the source checkout at {root}: build the kernels in place with "
               f"`pip install -e .` or `python setup.py build_ext --inplace` there, or run "
               f"Python from outside the checkout to use an installed fastattn.")
    else:
        how = "The installation is incomplete: reinstall fastattn (pip install fastattn)."
    return ImportError(f"fastattn's compiled kernels are missing from {here} "
                       f"({err}). {how}", name=err.name, path=err.path)


# How the dynamic loader says that a library an extension needs is absent:
# glibc, musl, macOS's dyld.  Group 1 is the library as the extension names it.
_LOADER_MISSING = (
    re.compile(r"([^\s:()]+): cannot open shared object file"),
    re.compile(r"Error loading shared library ([^\s:()]+)"),
    re.compile(r"Library not loaded: ([^\s]+)"),
)
_OPENMP_RUNTIME = re.compile(r"^lib(gomp|omp|iomp5)\b")


def _missing_library(err: ImportError) -> Optional[str]:
    """The file name of the shared library whose absence made ``err``, or
    None when ``err`` is about something else."""
    text = str(err)
    for pattern in _LOADER_MISSING:
        found = pattern.search(text)
        if found:
            return found.group(1).rsplit("/", 1)[-1]
    return None


def _missing_runtime(err: ImportError, library: str) -> ImportError:
    """The error for kernels that are there but cannot load because a shared
    library they link is not installed (the usual case: libgomp.so.1, GCC's
    OpenMP runtime, absent from slim container images): which library, and
    how to get it, rather than the loader's bare 'cannot open shared object
    file'."""
    here = os.path.dirname(os.path.abspath(__file__))
    if _OPENMP_RUNTIME.match(library):
        if sys.platform == "darwin":
            how = ("Install LLVM's OpenMP runtime (`brew install libomp`), or install a "
                   "fastattn wheel built for macOS, which bundles it.")
        else:
            how = ("Install the system's OpenMP runtime, GCC's libgomp (Debian/Ubuntu: "
                   "`apt install libgomp1`; Fedora/RHEL: `dnf install libgomp`; Alpine: "
                   "`apk add libgomp`), or install fastattn's manylinux wheel, which "
                   "bundles its own copy (`pip install --force-reinstall "
                   "--only-binary=fastattn fastattn`, or the repaired .whl file; see "
                   "docs/install.md).")
        what = f"the OpenMP runtime {library}, which is not installed here"
    else:
        how = ("Install the system package that provides it, or install a fastattn wheel "
               "repaired to bundle it (see docs/install.md).")
        what = f"the shared library {library}, which the dynamic loader cannot find"
    return ImportError(f"fastattn's compiled kernels in {here} need {what} "
                       f"({err}). {how}", name=err.name, path=err.path)


def _import_baseline() -> ModuleType:
    try:
        return importlib.import_module(_module_name("baseline"))
    except ModuleNotFoundError as err:
        if err.name != _module_name("baseline"):
            raise
        raise _unbuilt(err) from None
    except ImportError as err:
        # every build imports the driver, the one extension that links the
        # OpenMP runtime: a missing library shows up here first
        library = _missing_library(err)
        if library is None:
            raise
        raise _missing_runtime(err, library) from None


_baseline = _import_baseline()


def available_isas() -> list[str]:
    """Builds that are both compiled into this install and runnable on this CPU."""
    features = _baseline.cpu_features()
    found = []
    for isa in ISA_ORDER:
        if isa != "baseline" and not features.get(isa, False):
            continue
        try:
            importlib.import_module(_module_name(isa))
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
    return importlib.import_module(_module_name(isa))


kernels: ModuleType = _select()
"""The kernel module in use (``kernels.isa()`` names its instruction set)."""
