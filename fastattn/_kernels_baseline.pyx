# The attention kernels compiled for the baseline instruction set; setup.py sets
# the -m flags and the Cython directives for every build in one place.
include "_attention.pxi"
