# The kernels compiled for the avx2 instruction set (see _kernel.pxi).
include "_kernel.pxi"
