# The kernels compiled for the avx2 instruction set (see _build.pxi).
include "_build.pxi"
