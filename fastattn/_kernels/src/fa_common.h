/*
 * What the driver extension (fastattn._kernels._driver, compiled once,
 * without instruction-set flags) shares with the kernel builds: the
 * projection's output layout, which its jobs carry; the scratch alignment and
 * allocation, done by the parallel skeleton in the driver; and the cpuid
 * checks that pick a build.  Nothing here may depend on the instruction set.
 */
#ifndef FA_COMMON_H
#define FA_COMMON_H

#include <stdint.h>
#include <stdlib.h>

/* Scratch buffers are aligned to this many bytes so that vector loads of
 * packed blocks never straddle a cache line. */
#define FA_ALIGN 64

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

/*
 * Rotary position embeddings applied where a projection writes Q and K: the
 * output columns below `cols` are heads of head_dim features whose first
 * rot_dim (even) are rotated in adjacent pairs (2f, 2f + 1) by the angle of
 * the row's position.  `table` holds, per position, 2 * rot_dim elements of
 * the projection's element type: cos of pair f at 2f and 2f + 1, then -sin
 * at rot_dim + 2f and sin at rot_dim + 2f + 1; row i of the projection uses
 * table row pos[i].  table NULL: no rotation.  (A
 * half-split layout is brought to pairs by permuting the weights' rows, see
 * fastattn/rotary.py: the scores q.k do not change when q and k are
 * permuted alike.)
 */
typedef struct {
    const void *table;
    const int64_t *pos;
    int64_t cols, head_dim, rot_dim;
} fa_rotary;

static inline void *fa_aligned_alloc(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, FA_ALIGN, bytes ? bytes : FA_ALIGN) != 0) return NULL;
    return p;
}

/* Which instruction-set builds this CPU (and its OS) can run. */
#if defined(__x86_64__) || defined(__i386__)
static inline int fa_cpu_has_avx512(void) {
    __builtin_cpu_init();
    /* the AVX-512 build is compiled with F, DQ, BW, VL and F16C */
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("f16c");
}
static inline int fa_cpu_has_avx2(void) {
    __builtin_cpu_init();
    /* F16C converts float16 (every AVX2 CPU has it) */
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}
static inline int fa_cpu_has_avx512bf16(void) {
    __builtin_cpu_init();
    return fa_cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
}
#else
static inline int fa_cpu_has_avx512bf16(void) { return 0; }
static inline int fa_cpu_has_avx512(void) { return 0; }
static inline int fa_cpu_has_avx2(void) { return 0; }
#endif

#endif
