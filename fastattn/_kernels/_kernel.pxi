# One instruction-set build of the kernels (each _<isa>.pyx includes this
# file; setup.py sets its -m flags and the Cython directives for every build
# in one place): only nogil work items and the build's layout facts, handed
# to the driver as a table of C function pointers in a PyCapsule.  The
# entry points, checks, struct setup, ForwardPlan and the OpenMP skeleton are
# compiled once, in _driver.pyx, without instruction-set flags; this module
# re-exports them bound to its own table (see _driver.Kernels), so every
# build stays importable and callable on its own.

from cpython.pycapsule cimport PyCapsule_New
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy, memset
from libc.math cimport INFINITY
cimport numpy as cnp

from fastattn._kernels._table cimport (KernelTable, LinearJob, Operand, PerHeadJob, Problem,
                                       MultiJob, RotateJob,
                                       STORE_BF16, STORE_F16, STORE_SAME, TABLE_CAPSULE, _at, fa_out_layout, fa_rotary, item_fn)

# the generated declarations and typed wrappers first: they define the fused
# type `floating` that the items are written over
include "_typed.pxi"
include "_attention.pxi"
include "_items.pxi"

import importlib

# the driver of this module's own package, found by the package's name at
# run time: a copy of the package imported under another name (as
# benchmarks/ab_builds.py makes) then runs on its own driver, not fastattn's
_driver = importlib.import_module(__name__.rpartition(".")[0] + "._driver")

# static: the driver keeps the pointer for the life of the process, and an
# extension module is never unloaded
cdef KernelTable _table_data
_fill_table(&_table_data)

_table = PyCapsule_New(&_table_data, TABLE_CAPSULE(), NULL)
_kernels = _driver.Kernels(_table, __name__)

attention = _kernels.attention
attention_ragged = _kernels.attention_ragged
linear = _kernels.linear
rotate = _kernels.rotate
pack_weight = _kernels.pack_weight
panel_width = _kernels.panel_width
ForwardPlan = _kernels.ForwardPlan
isa = _kernels.isa
pairs = _kernels.pairs
openmp_enabled = _driver.openmp_enabled
cpu_features = _driver.cpu_features
team_started = _driver.team_started
