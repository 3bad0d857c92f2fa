# The kernels compiled for the avx512 instruction set (see _kernel.pxi).
include "_kernel.pxi"
