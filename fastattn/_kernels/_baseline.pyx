# The kernels compiled for the baseline instruction set (see _build.pxi).
include "_build.pxi"
