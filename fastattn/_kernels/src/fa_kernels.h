/*
 * Inner loops of the attention kernel for float and double, from one source:
 * each element type below defines its names (the element type, the exported
 * suffix, the exponential's constants) and includes fa_kernels_impl.h, which
 * instantiates the kernels by concern:
 *
 *   fa_vec.h      vector types and primitives, the exponential, transposes
 *   fa_gemm.h     the GEMM micro-kernel, packing, the projections
 *   fa_mask.h     masks, bands, position biases
 *   fa_softmax.h  the one online-softmax rule: tiles, rows, weights, merges
 *
 * fa_simd.h holds what depends on the instruction set (vector width, tile
 * shape, the instructions used by name).  The parallel skeleton and the walk
 * over blocks live in the Cython layer, which includes this header only.
 */
#ifndef FA_KERNELS_H
#define FA_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "fa_simd.h"

/*
 * Where the projection writes output element (row i, column c):
 * y + row_off(i) + col_off(c).  Plain row-major: i * ldy + c.  Head-major
 * (head_dim > 0): rows are (batch b, position n) with seq_len positions per
 * batch, columns are (group g, e) with head_dim e's per group, and the element
 * goes to [b][g][n][e] with the given batch and group strides, so every
 * head's (positions x head_dim) block is contiguous for the attention kernel.
 */
typedef struct {
    int64_t ldy, head_dim, seq_len, g_stride, b_stride;
} fa_out_layout;

static inline int64_t fa_row_off(const fa_out_layout *o, int64_t i) {
    if (!o->head_dim) return i * o->ldy;
    return (i / o->seq_len) * o->b_stride + (i % o->seq_len) * o->head_dim;
}
static inline int64_t fa_col_off(const fa_out_layout *o, int64_t c) {
    if (!o->head_dim) return c;
    return (c / o->head_dim) * o->g_stride + c % o->head_dim;
}

/* ---- float ---- */
#define REAL float
#define IREAL int32_t
#define FA(name) fa_##name##_f32
#define FA_LOG2E 1.44269504088896341f
#define FA_EXP_MAGIC 12582912.0f /* 1.5 * 2^23: adding it rounds to an integer */
#define FA_VMAX(a, b) FA_MAX_PS(a, b)
#if defined(FA_REDUCE_PS)
#define FA_VREDUCE(y) FA_REDUCE_PS(y)
#define FA_VSCALEF(a, b) FA_SCALEF_PS(a, b)
#endif
#define FA_EXP_BIAS 127
#define FA_MANT_BITS 23
#define FA_EXP2_LO -127.0f /* 2^n assembles to exactly 0 here */
#define FA_EXP2_DEG 6
/* 2^r on |r| <= 1/2, minimax for relative error (Lawson iteration, ~1e-8) */
static const float fa_exp2_c_f32[7] = {1.0f, 0.6931471824645996f, 0.24022646248340607f,
                                       0.05550328642129898f, 0.009618489071726799f,
                                       0.0013399930903688073f, 0.00015345810970757157f};
#define FA_EXP2_C fa_exp2_c_f32
#include "fa_kernels_impl.h"

/* ---- double ---- */
#define REAL double
#define IREAL int64_t
#define FA(name) fa_##name##_f64
#define FA_LOG2E 1.4426950408889634
#define FA_EXP_MAGIC 6755399441055744.0 /* 1.5 * 2^52 */
#define FA_VMAX(a, b) FA_MAX_PD(a, b)
#if defined(FA_REDUCE_PD)
#define FA_VREDUCE(y) FA_REDUCE_PD(y)
#define FA_VSCALEF(a, b) FA_SCALEF_PD(a, b)
#endif
#define FA_EXP_BIAS 1023
#define FA_MANT_BITS 52
#define FA_EXP2_LO -1023.0
#define FA_EXP2_DEG 13
/* 2^r on |r| <= 1/2: Taylor coefficients ln2^k / k! (truncation ~4e-18) */
static const double fa_exp2_c_f64[14] = {
    1.0, 0.6931471805599453, 0.2402265069591007, 0.055504108664821576,
    0.009618129107628477, 0.0013333558146428441, 0.00015403530393381606, 1.5252733804059838e-05,
    1.3215486790144305e-06, 1.0178086009239696e-07, 7.054911620801121e-09, 4.44553827187081e-10,
    2.5678435993488196e-11, 1.3691488853904124e-12};
#define FA_EXP2_C fa_exp2_c_f64
#include "fa_kernels_impl.h"

static const char *fa_isa_name(void) { return FA_ISA_NAME; }

static inline void *fa_aligned_alloc(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, FA_ALIGN, bytes ? bytes : FA_ALIGN) != 0) return NULL;
    return p;
}

/* Which instruction-set builds this CPU (and its OS) can run. */
#if defined(__x86_64__) || defined(__i386__)
static inline int fa_cpu_has_avx512(void) {
    __builtin_cpu_init();
    /* the AVX-512 build is compiled with F, DQ, BW and VL */
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}
static inline int fa_cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
static inline int fa_cpu_has_avx512(void) { return 0; }
static inline int fa_cpu_has_avx2(void) { return 0; }
#endif

#endif
