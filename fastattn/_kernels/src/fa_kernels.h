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
 * shape, the instructions used by name).  fa_common.h holds what does not
 * (the projection's output layout, aligned allocation, cpuid), which the
 * driver extension, compiled once without instruction-set flags, includes
 * alone.  The walk over blocks lives in the Cython layer of each build, which
 * includes this header only.
 */
#ifndef FA_KERNELS_H
#define FA_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "fa_common.h"
#include "fa_simd.h"
#include "fa_half.h"

/* ---- float ---- */
#define REAL float
#define IREAL int32_t
#define FA(name) fa_##name##_f32
#define FA_LOG2E 1.44269504088896341f
#define FA_EXP_MAGIC 12582912.0f /* 1.5 * 2^23: adding it rounds to an integer */
#define FA_VMAX(a, b) FA_MAX_PS(a, b)
#if defined(FA_ANY_PS)
#define FA_ANY_LANE(m) FA_ANY_PS(m)
#endif
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
/* tanh(a) = a + a^3 (c0 + c1 a^2 + ...) below FA_TANH_SMALL: Taylor
 * coefficients to a^15; the first omitted term is under 1e-8 relative there.
 * Scores within half the cap, most of them at the caps models use, take this
 * side alone (see FA(vcap)). */
#define FA_TANH_SMALL 0.5f
#define FA_TANH_DEG 6
static const float fa_tanh_c_f32[7] = {-1.0f / 3, 2.0f / 15, -17.0f / 315, 62.0f / 2835,
                                       -1382.0f / 155925, 21844.0f / 6081075,
                                       -929569.0f / 638512875};
#define FA_TANH_C fa_tanh_c_f32
#include "fa_kernels_impl.h"

#if FA_HAS_DPBF16
/* dst[p * ldd + i] = (q[i][2p], q[i][2p+1]) for the rows < rows of the block,
 * zero past them (up to ldd lanes).  Unscaled: scale * q would round again
 * unless the scale is a power of two; fa_gemm_pairs scales the float32 sums.
 * A row's pairs are its 32-bit words, so whole square blocks of them go
 * through the float kernels' block transpose as float lanes (shuffles move
 * the bits as they are); the edges go word by word. */
static void fa_pack_qt_pairs(uint32_t *restrict dst, int64_t ldd, const uint16_t *restrict q,
                             int64_t qs, int64_t rows, int64_t E) {
    const int64_t w = FA_VBYTES / 4; /* words a block has per side */
    int64_t kp = (E + 1) / 2, pf = 0, rf = 0;
#if FA_BLOCK_TRANSPOSE
    pf = E / 2 - (E / 2) % w;
    rf = rows - rows % w;
    fa_vec_f32 blk[FA_VBYTES / 4];
    for (int64_t i0 = 0; i0 < rf; i0 += w)
        for (int64_t p0 = 0; p0 < pf; p0 += w) {
            for (int64_t t = 0; t < w; t++) memcpy(&blk[t], q + (i0 + t) * qs + 2 * p0, FA_VBYTES);
            fa_transpose_block_f32(blk);
            for (int64_t t = 0; t < w; t++) memcpy(dst + (p0 + t) * ldd + i0, &blk[t], FA_VBYTES);
        }
#endif
    for (int64_t p = 0; p < kp; p++) {
        for (int64_t i = p < pf ? rf : 0; i < rows; i++) {
            const uint16_t *qi = q + i * qs + 2 * p;
            dst[p * ldd + i] = (uint32_t)qi[0] | (2 * p + 1 < E ? (uint32_t)qi[1] << 16 : 0);
        }
        for (int64_t i = rows; i < ldd; i++) dst[p * ldd + i] = 0;
    }
}
#endif

/* ---- double ---- */
#define REAL double
#define IREAL int64_t
#define FA(name) fa_##name##_f64
#define FA_LOG2E 1.4426950408889634
#define FA_EXP_MAGIC 6755399441055744.0 /* 1.5 * 2^52 */
#define FA_VMAX(a, b) FA_MAX_PD(a, b)
#if defined(FA_ANY_PD)
#define FA_ANY_LANE(m) FA_ANY_PD(m)
#endif
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
/* as for float, below 0.125: the first omitted term is under 2e-18 relative */
#define FA_TANH_SMALL 0.125
#define FA_TANH_DEG 6
static const double fa_tanh_c_f64[7] = {-1.0 / 3, 2.0 / 15, -17.0 / 315, 62.0 / 2835,
                                        -1382.0 / 155925, 21844.0 / 6081075,
                                        -929569.0 / 638512875};
#define FA_TANH_C fa_tanh_c_f64
#include "fa_kernels_impl.h"

static const char *fa_isa_name(void) { return FA_ISA_NAME; }

#endif
