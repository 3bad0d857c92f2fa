# The kernels compiled for the baseline instruction set (see _kernel.pxi).
include "_kernel.pxi"
