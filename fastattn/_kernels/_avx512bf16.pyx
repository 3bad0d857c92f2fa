# The kernels compiled for AVX-512 with AVX512-BF16 (see _kernel.pxi).
include "_kernel.pxi"
