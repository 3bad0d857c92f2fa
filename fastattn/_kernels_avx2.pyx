# The attention kernels compiled for the avx2 instruction set; setup.py sets
# the -m flags and the Cython directives for every build in one place.
include "_attention.pxi"
