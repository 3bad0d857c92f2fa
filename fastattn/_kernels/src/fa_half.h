/*
 * Half-precision storage (bfloat16 and float16) for the float32 kernels.
 *
 * Operands held in a 16-bit type are converted to float32 where they are
 * packed (a query tile, a block of keys or values, a panel of projection
 * rows) and results are rounded back where they are stored, so every
 * product, sum and exponential runs in float32.  Where the build has
 * AVX512-BF16 (FA_HAS_DPBF16), the projections instead multiply bfloat16
 * pairs with VDPBF16PS into float32 sums, over weights packed once in pairs
 * (fa_pack_weight_pairs) and rows packed in pairs per panel.
 *
 * Storage codes (FA_STORE_*): 0 is the kernel's own element type; bf16 and
 * f16 arrays reach the kernels as 16-bit words (NumPy uint16 / float16).
 * Included once by fa_kernels.h, before the float instantiation.
 */
#ifndef FA_HALF_H
#define FA_HALF_H

#include <stdint.h>
#include <string.h>

#define FA_STORE_SAME 0
#define FA_STORE_BF16 1
#define FA_STORE_F16 2

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define FA_HAS_DPBF16 1
#else
#define FA_HAS_DPBF16 0
#endif

/* bfloat16 is the top half of a float32: widening is exact. */
static inline float fa_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest, ties to even (as ml_dtypes and torch round); a NaN stays
 * a (quiet) NaN rather than rounding into an infinity. */
static inline uint16_t fa_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40u) : (uint16_t)rounded;
}

static inline float fa_f16_to_f32(uint16_t h) {
    _Float16 x;
    memcpy(&x, &h, 2);
    return (float)x;
}

static inline uint16_t fa_f32_to_f16(float f) {
    _Float16 x = (_Float16)f; /* IEEE round to nearest even */
    uint16_t h;
    memcpy(&h, &x, 2);
    return h;
}

/* dst[r * ldd + c] = src[r * lds + c] widened to float32, for a block of a
 * 16-bit operand (strides in elements). */
static void fa_half_to_f32(float *restrict dst, int64_t ldd, const void *restrict src_,
                           int64_t lds, int64_t rows, int64_t cols, int store) {
    const uint16_t *src = (const uint16_t *)src_;
    if (store == FA_STORE_BF16) {
        for (int64_t r = 0; r < rows; r++) {
            const uint16_t *s = src + r * lds;
            float *d = dst + r * ldd;
#pragma GCC ivdep
            for (int64_t c = 0; c < cols; c++) {
                uint32_t u = (uint32_t)s[c] << 16;
                memcpy(d + c, &u, 4);
            }
        }
    } else {
        for (int64_t r = 0; r < rows; r++) {
            const _Float16 *s = (const _Float16 *)(src + r * lds);
            float *d = dst + r * ldd;
#pragma GCC ivdep
            for (int64_t c = 0; c < cols; c++) d[c] = (float)s[c];
        }
    }
}

/* The reverse: a float32 block rounded into a 16-bit operand. */
static void fa_f32_to_half(void *restrict dst_, int64_t ldd, const float *restrict src,
                           int64_t lds, int64_t rows, int64_t cols, int store) {
    uint16_t *dst = (uint16_t *)dst_;
    if (store == FA_STORE_BF16) {
        for (int64_t r = 0; r < rows; r++) {
            const float *s = src + r * lds;
            uint16_t *d = dst + r * ldd;
#pragma GCC ivdep
            for (int64_t c = 0; c < cols; c++) d[c] = fa_f32_to_bf16(s[c]);
        }
    } else {
        for (int64_t r = 0; r < rows; r++) {
            const float *s = src + r * lds;
            _Float16 *d = (_Float16 *)(dst + r * ldd);
#pragma GCC ivdep
            for (int64_t c = 0; c < cols; c++) d[c] = (_Float16)s[c];
        }
    }
}

/* One element of an operand of storage `store` (FA_STORE_SAME: float32). */
static inline float fa_load_any(const void *p, int64_t i, int store) {
    if (store == FA_STORE_BF16) return fa_bf16_to_f32(((const uint16_t *)p)[i]);
    if (store == FA_STORE_F16) return fa_f16_to_f32(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

/* ---- bfloat16 pairs: the layout of the VDPBF16PS projections ----
 *
 * A 32-bit word holds elements 2p and 2p+1 of the inner dimension (low half
 * first).  Weights: panels of NR output features as in fa_pack_weight_f32,
 * each ceil(k / 2) rows of NR words.  Rows of x: FA_MR words per pair index
 * (fa_pack_rows_pairs).  An odd k pads with a zero element. */

static inline uint32_t fa_pair(float lo, float hi) {
    return (uint32_t)fa_f32_to_bf16(lo) | ((uint32_t)fa_f32_to_bf16(hi) << 16);
}

/* Panel width of the pair layout: as many float32 lanes as NR of float. */
#define FA_PAIR_NR (FA_NV * (FA_VBYTES / 4))

static inline int64_t fa_pairs_packed_len(int64_t n_out, int64_t k) {
    /* in 16-bit elements */
    return ((n_out + FA_PAIR_NR - 1) / FA_PAIR_NR) * FA_PAIR_NR * ((k + 1) / 2) * 2;
}

/* W (n_out x k, storage `store`) into pair panels (dst: 32-bit words). */
static void fa_pack_weight_pairs(void *restrict dst_, const void *restrict W, int store,
                                 int64_t n_out, int64_t k) {
    uint32_t *dst = (uint32_t *)dst_;
    int64_t panels = (n_out + FA_PAIR_NR - 1) / FA_PAIR_NR, kp = (k + 1) / 2;
    for (int64_t q = 0; q < panels; q++) {
        uint32_t *d = dst + q * kp * FA_PAIR_NR;
        for (int64_t p = 0; p < kp; p++)
            for (int64_t c = 0; c < FA_PAIR_NR; c++) {
                int64_t n = q * FA_PAIR_NR + c;
                float lo = n < n_out ? fa_load_any(W, n * k + 2 * p, store) : 0;
                float hi = n < n_out && 2 * p + 1 < k ? fa_load_any(W, n * k + 2 * p + 1, store) : 0;
                d[p * FA_PAIR_NR + c] = fa_pair(lo, hi);
            }
    }
}

/* One row of n elements (storage `store`; FA_STORE_SAME: float32) as
 * ceil(n / 2) bfloat16 pair words, an odd n padded with a zero element. */
static void fa_row_to_pairs(uint32_t *restrict dst, const void *restrict src, int store,
                            int64_t n) {
    int64_t i = 0;
    if (store == FA_STORE_BF16) {
        memcpy(dst, src, (size_t)(n / 2) * 4);
        i = n - n % 2;
    }
#if FA_HAS_DPBF16
    else if (store == FA_STORE_SAME) {
        const float *f = (const float *)src;
        for (; i + 32 <= n; i += 32)
            _mm512_storeu_si512((void *)(dst + i / 2),
                                (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(f + i + 16),
                                                             _mm512_loadu_ps(f + i)));
    }
#endif
    for (; i < n; i += 2)
        dst[i / 2] = fa_pair(fa_load_any(src, i, store), i + 1 < n ? fa_load_any(src, i + 1, store) : 0);
}

#if FA_HAS_DPBF16
/* ---- the attention tile in bfloat16 pairs (VDPBF16PS) ----
 *
 * The same transposed tile as the float kernels (fa_kernels_impl.h), with
 * the products' operands in pairs along the inner dimension:
 *   S^T = K_block . Q^T   A: rows of K in place (E even), B: Q^T in pairs
 *   O^T += V^T . P^T      A: V^T in pairs (fa_pack_v_pairs), B: P^T in pairs
 * Scores, the online softmax and O^T stay float32. */

/* A word of 16-bit data at any even byte address. */
typedef uint32_t fa_word_u __attribute__((aligned(2), may_alias));

/* fa_pack_qt_pairs, Q^T in pairs, follows the float kernels (fa_kernels.h):
 * it moves whole blocks of pairs with their in-register transpose. */
static void fa_pack_qt_pairs(uint32_t *restrict dst, int64_t ldd, const uint16_t *restrict q,
                             int64_t qs, int64_t rows, int64_t E);

/* dst[p * ev + e] = (v[2p][e], v[2p+1][e]) for pairs of a block of n value
 * rows (rows vs elements apart); an odd n pairs its last row with zero. */
static void fa_pack_v_pairs(uint32_t *restrict dst, const uint16_t *restrict v, int64_t vs,
                            int64_t n, int64_t ev) {
    for (int64_t p = 0; 2 * p < n; p++) {
        const uint16_t *a = v + 2 * p * vs;
        const uint16_t *b = 2 * p + 1 < n ? a + vs : NULL;
        uint32_t *d = dst + p * ev;
        int64_t e = 0;
        if (b)
            for (; e + 16 <= ev; e += 16) {
                __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(a + e)));
                __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(b + e)));
                _mm512_storeu_si512((void *)(d + e), _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
            }
        for (; e < ev; e++) d[e] = (uint32_t)a[e] | (b ? (uint32_t)b[e] << 16 : 0);
    }
}

/* dst[p * ldd + i] = (S[2p][i], S[2p+1][i]) rounded to bfloat16: the
 * probabilities of a block of n keys (rows lds apart, ncols lanes, a
 * multiple of 16), an odd n padded with zeros. */
static void fa_pack_p_pairs(uint32_t *restrict dst, int64_t ldd, const float *restrict S,
                            int64_t lds, int64_t n, int64_t ncols) {
    for (int64_t p = 0; 2 * p < n; p++) {
        const float *a = S + 2 * p * lds;
        int has_b = 2 * p + 1 < n;
        for (int64_t i = 0; i < ncols; i += 16) {
            __m512 fa = _mm512_loadu_ps(a + i);
            __m512 fb = has_b ? _mm512_loadu_ps(a + lds + i) : _mm512_setzero_ps();
            __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(fa));
            __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(fb));
            _mm512_storeu_si512((void *)(dst + p * ldd + i),
                                _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    }
}

/*
 * One FA_MR x FA_PAIR_NR panel: C[r][0:NR] = scale * sum_p A(r, p) . B[p][0:NR]
 * (+ C[r] with `accumulate`, + bias), multiplied and added by VDPBF16PS.
 * A(r, p) is the word at element offset r * rs + 2 * p * ps of `A` (16-bit
 * elements: rows of x or K in place with ps 1, or packed pairs); rows >= mr
 * must be readable and are not stored.  colmax (or NULL): as FA(panel)'s.
 * The one pair micro-kernel: the projections (fa_gemm.h's linear_block) and
 * the attention tile (fa_gemm_pairs) both run it.
 */
static inline __attribute__((always_inline)) void fa_panel_pairs(
    int64_t kp, const uint16_t *restrict A, int64_t rs, int64_t ps, const uint32_t *restrict B,
    int64_t ldb, float *restrict C, int64_t ldc, int accumulate, const float *restrict bias,
    int64_t mr, float *restrict colmax, float scale) {
    __m512 acc[FA_MR][FA_NV];
    for (int r = 0; r < FA_MR; r++)
        for (int v = 0; v < FA_NV; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < kp; p++) {
        __m512bh b[FA_NV];
        for (int v = 0; v < FA_NV; v++)
            b[v] = (__m512bh)_mm512_loadu_si512((const void *)(B + p * ldb + v * 16));
        const uint16_t *ap = A + 2 * p * ps;
        for (int r = 0; r < FA_MR; r++) {
            __m512bh ar = (__m512bh)_mm512_set1_epi32((int)*(const fa_word_u *)(ap + r * rs));
            for (int v = 0; v < FA_NV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], ar, b[v]);
        }
    }
    __m512 vscale = _mm512_set1_ps(scale);
    for (int r = 0; r < FA_MR; r++)
        for (int v = 0; v < FA_NV; v++) {
            acc[r][v] = _mm512_mul_ps(acc[r][v], vscale);
            if (accumulate && r < mr)
                acc[r][v] = _mm512_add_ps(acc[r][v], _mm512_loadu_ps(C + r * ldc + v * 16));
            else if (bias)
                acc[r][v] = _mm512_add_ps(acc[r][v], _mm512_loadu_ps(bias + v * 16));
        }
    for (int r = 0; r < FA_MR; r++) {
        if (r >= mr) break;
        for (int v = 0; v < FA_NV; v++) _mm512_storeu_ps(C + r * ldc + v * 16, acc[r][v]);
    }
    if (colmax)
        for (int v = 0; v < FA_NV; v++) {
            __m512 mx = acc[0][v];
            for (int r = 1; r < mr; r++) mx = _mm512_max_ps(mx, acc[r][v]);
            float *cm = colmax + v * 16;
            _mm512_storeu_ps(cm, _mm512_max_ps(_mm512_loadu_ps(cm), mx));
        }
}

/*
 * C[M x N] (+)= scale * (A . B) over kp pairs (scale applies to the sums only,
 * not to what C held), A as fa_panel_pairs reads it, B[p][0:N] words (ldb
 * apart, N a multiple of FA_PAIR_NR).  A last panel of fewer than FA_MR rows
 * goes through `tail` (FA_MR * kp words), so no read runs past A.
 */
static void fa_gemm_pairs(int64_t M, int64_t N, int64_t kp, const uint16_t *restrict A,
                          int64_t rs, int64_t ps, const uint32_t *restrict B, int64_t ldb,
                          float *restrict C, int64_t ldc, int accumulate,
                          uint32_t *restrict tail, float *restrict colmax, float scale) {
    for (int64_t i = 0; i < M; i += FA_MR) {
        int64_t mr = M - i < FA_MR ? M - i : FA_MR;
        const uint16_t *a = A + i * rs;
        int64_t ars = rs, aps = ps;
        if (mr < FA_MR) {
            /* words [r * kp + p], rows past mr zero */
            for (int64_t r = 0; r < FA_MR; r++)
                for (int64_t p = 0; p < kp; p++)
                    tail[r * kp + p] = r < mr ? *(const fa_word_u *)(a + r * rs + 2 * p * ps) : 0;
            a = (const uint16_t *)tail;
            ars = 2 * kp;
            aps = 1;
        }
        for (int64_t j = 0; j < N; j += FA_PAIR_NR)
            fa_panel_pairs(kp, a, ars, aps, B + j, ldb, C + i * ldc + j, ldc, accumulate, NULL,
                           mr, colmax ? colmax + j : NULL, scale);
    }
}
#else
/* Builds without VDPBF16PS: the names exist so that one Cython source serves
 * every build; the driver refuses a pair schedule there (KernelTable.pairs). */
static inline void fa_no_pairs(int unused, ...) { (void)unused; }
#define fa_pack_qt_pairs(...) fa_no_pairs(0, __VA_ARGS__)
#define fa_pack_v_pairs(...) fa_no_pairs(0, __VA_ARGS__)
#define fa_pack_p_pairs(...) fa_no_pairs(0, __VA_ARGS__)
#define fa_gemm_pairs(...) fa_no_pairs(0, __VA_ARGS__)
#endif

/* Whether every element of n rows (vs apart) x ev columns of bfloat16 is finite. */
static int fa_bf16_all_finite(const uint16_t *restrict v, int64_t vs, int64_t n, int64_t ev) {
    uint16_t bad = 0;
    for (int64_t j = 0; j < n; j++)
        for (int64_t e = 0; e < ev; e++) bad |= (uint16_t)((v[j * vs + e] & 0x7f80u) == 0x7f80u);
    return !bad;
}

/* ---- few queries (decoding) over a 16-bit cache: widened as loaded ----
 *
 * Decoding reads every cached key and value once per token: these read the
 * 16-bit words straight from the cache (half the bytes of float32) and
 * widen them in registers, with no staging copy. */

typedef float fa_hv __attribute__((vector_size(FA_VBYTES)));
typedef uint32_t fa_hu __attribute__((vector_size(FA_VBYTES)));
typedef uint16_t fa_hw __attribute__((vector_size(FA_VBYTES / 2), aligned(2)));
typedef _Float16 fa_hh __attribute__((vector_size(FA_VBYTES / 2), aligned(2)));
typedef float fa_hvu __attribute__((vector_size(FA_VBYTES), aligned(4)));
#define FA_HL ((int64_t)(FA_VBYTES / 4))

static inline fa_hv fa_widen(const uint16_t *p, int store) {
    /* by the instructions themselves where the build has them (gcc converts a
     * _Float16 vector lane by lane, and may load a uint16 one in pieces) */
#if FA_VBYTES == 64
    if (store == FA_STORE_BF16)
        return (fa_hv)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
    return (fa_hv)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#else
    if (store == FA_STORE_BF16) return (fa_hv)(__builtin_convertvector(*(const fa_hw *)p, fa_hu) << 16);
#if FA_VBYTES == 32 && defined(__F16C__)
    return (fa_hv)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    return __builtin_convertvector(*(const fa_hh *)p, fa_hv);
#endif
#endif
}

static inline float fa_hsum_h(fa_hv v) {
#if FA_VBYTES == 64
    return _mm512_reduce_add_ps((__m512)v); /* a shuffle tree, not 16 extracts */
#else
    float t = 0;
    for (int64_t i = 0; i < FA_HL; i++) t += v[i];
    return t;
#endif
}

/* s[j] = sum_e q[e] * k[j * ks + e] for j < n, k 16-bit (inlined once per
 * storage type, so the inner loops hold no test of it). */
static inline __attribute__((always_inline)) void fa_dots_half_impl(
    float *restrict s, const float *restrict q, int64_t E, const uint16_t *restrict k, int64_t ks,
    int64_t n, const int store) {
    int64_t ev = E - E % FA_HL, j = 0;
    /* four keys at a time share each load of q */
    for (; j + 4 <= n; j += 4) {
        fa_hv acc[4] = {{0}, {0}, {0}, {0}};
        for (int64_t e = 0; e < ev; e += FA_HL) {
            fa_hv qv = *(const fa_hvu *)(q + e);
            for (int u = 0; u < 4; u++) acc[u] += qv * fa_widen(k + (j + u) * ks + e, store);
        }
        for (int u = 0; u < 4; u++) {
            float t = fa_hsum_h(acc[u]);
            for (int64_t e = ev; e < E; e++) t += q[e] * fa_load_any(k, (j + u) * ks + e, store);
            s[j + u] = t;
        }
    }
    for (; j < n; j++) {
        fa_hv acc = {0};
        for (int64_t e = 0; e < ev; e += FA_HL) acc += *(const fa_hvu *)(q + e) * fa_widen(k + j * ks + e, store);
        float t = fa_hsum_h(acc);
        for (int64_t e = ev; e < E; e++) t += q[e] * fa_load_any(k, j * ks + e, store);
        s[j] = t;
    }
}

static void fa_dots_half(float *restrict s, const float *restrict q, int64_t E,
                         const uint16_t *restrict k, int64_t ks, int64_t n, int store) {
    if (store == FA_STORE_BF16)
        fa_dots_half_impl(s, q, E, k, ks, n, FA_STORE_BF16);
    else
        fa_dots_half_impl(s, q, E, k, ks, n, FA_STORE_F16);
}

/* o[0:ev] += sum_j p[j] * v[j * vs + 0:ev], v 16-bit; o is padded to whole vectors. */
static inline __attribute__((always_inline)) void fa_accum_rows_half_impl(
    float *restrict o, int64_t ev, const float *restrict p, int64_t n, const uint16_t *restrict v,
    int64_t vs, const int store) {
    int64_t evv = ev - ev % FA_HL;
    for (int64_t c0 = 0; c0 < evv; c0 += 4 * FA_HL) {
        int64_t nv = (evv - c0) / FA_HL < 4 ? (evv - c0) / FA_HL : 4;
        fa_hv acc[4];
        for (int64_t u = 0; u < 4; u++) acc[u] = u < nv ? *(fa_hvu *)(o + c0 + u * FA_HL) : (fa_hv){0};
        for (int64_t j = 0; j < n; j++) {
            float pj = p[j];
            if (pj == 0) continue; /* masked keys, and most keys far below the max */
            const uint16_t *vj = v + j * vs + c0;
            for (int64_t u = 0; u < 4; u++)
                if (u < nv) acc[u] += pj * fa_widen(vj + u * FA_HL, store);
        }
        for (int64_t u = 0; u < nv; u++) *(fa_hvu *)(o + c0 + u * FA_HL) = acc[u];
    }
    for (int64_t j = 0; j < n; j++) {
        float pj = p[j];
        if (pj == 0) continue;
        for (int64_t c = evv; c < ev; c++) o[c] += pj * fa_load_any(v, j * vs + c, store);
    }
}

static void fa_accum_rows_half(float *restrict o, int64_t ev, const float *restrict p, int64_t n,
                               const uint16_t *restrict v, int64_t vs, int store) {
    if (store == FA_STORE_BF16)
        fa_accum_rows_half_impl(o, ev, p, n, v, vs, FA_STORE_BF16);
    else
        fa_accum_rows_half_impl(o, ev, p, n, v, vs, FA_STORE_F16);
}

#endif
