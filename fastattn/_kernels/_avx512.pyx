# The kernels compiled for the avx512 instruction set (see _build.pxi).
include "_build.pxi"
