/*
 * OpenMP when the compiler has it, single-threaded stand-ins when it does not,
 * so the extension builds either way and Python can ask which one it got.
 */
#ifndef FA_OMP_H
#define FA_OMP_H

#ifdef _OPENMP
#include <omp.h>
#define FA_OPENMP_ENABLED 1
#else
#define FA_OPENMP_ENABLED 0
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_procs(void) { return 1; }
#endif

#endif
