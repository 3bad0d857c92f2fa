# Everything one instruction-set build of the kernels compiles, in the order
# Cython needs: the generated declarations and typed wrappers first (they
# define the fused type `floating`), then the skeleton, the problem, and the
# drivers.  Each _<isa>.pyx includes this file; setup.py sets the -m flags
# and the Cython directives for every build in one place.

from cython.parallel cimport parallel, prange
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport free
from libc.string cimport memcpy, memset
from libc.math cimport INFINITY
cimport numpy as cnp
import numpy as np

cnp.import_array()

include "_typed.pxi"
include "_skeleton.pxi"
include "_problem.pxi"
include "_attention.pxi"
include "_linear.pxi"
include "_plan.pxi"


def isa():
    """The instruction set this build of the kernels was compiled for."""
    return fa_isa_name().decode()


def openmp_enabled():
    """True when the kernels were built with OpenMP."""
    return bool(FA_OPENMP_ENABLED)


def cpu_features():
    """Instruction-set builds the running CPU supports (checked with cpuid)."""
    return {"avx512": bool(fa_cpu_has_avx512()), "avx2": bool(fa_cpu_has_avx2())}
