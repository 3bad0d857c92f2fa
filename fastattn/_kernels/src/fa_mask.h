/*
 * Masks, bands and position biases for one element type: what turns a block
 * of scores into the scores the softmax sees, and the scan for value rows
 * holding a NaN or an inf, which a block that a mask touches must keep away
 * from the queries that do not attend them (0 * inf is NaN).
 * No include guard: included once per element type (fa_kernels_impl.h).
 */

/* Scores S(i, j) = S[i * s_is + j * s_js] of keys that may not be attended
 * become -inf; i runs over `rows` queries, j over `cols` keys. */
static void FA(mask_bool_loops)(REAL *restrict S, int64_t s_is, int64_t s_js, int64_t i0,
                                int64_t i1, int64_t j0, int64_t j1,
                                const uint8_t *restrict mask, int64_t m_is, int64_t m_js) {
    for (int64_t i = i0; i < i1; i++)
        for (int64_t j = j0; j < j1; j++)
            if (!mask[i * m_is + j * m_js]) S[i * s_is + j * s_js] = (REAL)-INFINITY;
}

static void FA(mask_bool)(REAL *restrict S, int64_t s_is, int64_t s_js, int64_t rows,
                          int64_t cols, const uint8_t *restrict mask, int64_t m_is,
                          int64_t m_js) {
    int64_t rv = 0, cv = 0;
#if FA_BLOCK_TRANSPOSE
    /* As in FA(mask_add): VLEN x VLEN blocks of the mask, widened to the
     * element type and transposed in registers, clear whole vectors of the
     * transposed scores. */
    if (s_is == 1 && m_js == 1) {
        typedef FA(uvec) UVEC;
        typedef uint8_t U8V __attribute__((vector_size(VLEN)));
        const VEC ninf = FA(vsplat)((REAL)-INFINITY), zero = FA(vsplat)(0);
        VEC blk[VLEN];
        rv = rows - rows % VLEN;
        cv = cols - cols % VLEN;
        for (int64_t i0 = 0; i0 < rv; i0 += VLEN)
            for (int64_t j0 = 0; j0 < cv; j0 += VLEN) {
#pragma GCC unroll 16
                for (int64_t r = 0; r < VLEN; r++) {
                    U8V m;
                    memcpy(&m, mask + (i0 + r) * m_is + j0, sizeof m);
                    blk[r] = __builtin_convertvector(m, VEC);
                }
                FA(transpose_block)(blk);
#pragma GCC unroll 16
                for (int64_t c = 0; c < VLEN; c++) {
                    UVEC *sp = (UVEC *)(S + (j0 + c) * s_js + i0);
                    *sp = FA(vselect)(blk[c] == zero, ninf, *sp);
                }
            }
    }
#endif
    /* what the blocks left: the last rows, then the last columns */
    FA(mask_bool_loops)(S, s_is, s_js, rv, rows, 0, cols, mask, m_is, m_js);
    FA(mask_bool_loops)(S, s_is, s_js, 0, rv, cv, cols, mask, m_is, m_js);
}

/* Float masks add to the scores.  A -inf entry must block its key outright,
 * but NaN + -inf is NaN: where a score may be NaN or inf (exact, a NaN or inf
 * in a key or query), a -inf entry replaces the score instead.  Finite scores
 * plus -inf are -inf already, so the plain sum serves every other block. */
static inline REAL FA(mask_add_one)(REAL s, REAL a, int exact) {
    return exact && a == (REAL)-INFINITY ? a : s + a;
}

static void FA(mask_add_loops)(REAL *restrict S, int64_t s_is, int64_t s_js, int64_t i0,
                               int64_t i1, int64_t j0, int64_t j1, const REAL *restrict mask,
                               int64_t m_is, int64_t m_js, int exact) {
    for (int64_t i = i0; i < i1; i++)
        for (int64_t j = j0; j < j1; j++) {
            REAL *s = S + i * s_is + j * s_js;
            *s = FA(mask_add_one)(*s, mask[i * m_is + j * m_js], exact);
        }
}

static void FA(mask_add)(REAL *restrict S, int64_t s_is, int64_t s_js, int64_t rows,
                         int64_t cols, const REAL *restrict mask, int64_t m_is, int64_t m_js,
                         int exact) {
    int64_t rv = 0, cv = 0;
#if FA_BLOCK_TRANSPOSE
    /* The tile's scores are transposed (queries along contiguous lanes) and a
     * mask's rows run along keys: VLEN x VLEN blocks of the mask, transposed
     * in registers, add to whole vectors of scores instead of one score at a
     * time through two strides. */
    if (s_is == 1 && m_js == 1) {
        typedef FA(uvec) UVEC;
        const VEC ninf = FA(vsplat)((REAL)-INFINITY);
        VEC blk[VLEN];
        rv = rows - rows % VLEN;
        cv = cols - cols % VLEN;
        for (int64_t i0 = 0; i0 < rv; i0 += VLEN)
            for (int64_t j0 = 0; j0 < cv; j0 += VLEN) {
                FA(load_transposed)(blk, mask + i0 * m_is + j0, m_is);
#pragma GCC unroll 16
                for (int64_t c = 0; c < VLEN; c++) {
                    UVEC *sp = (UVEC *)(S + (j0 + c) * s_js + i0);
                    VEC sum = *sp + blk[c];
                    *sp = exact ? FA(vselect)(blk[c] == ninf, blk[c], sum) : sum;
                }
            }
    }
#endif
    /* what the blocks left: the last rows, then the last columns */
    FA(mask_add_loops)(S, s_is, s_js, rv, rows, 0, cols, mask, m_is, m_js, exact);
    FA(mask_add_loops)(S, s_is, s_js, 0, rv, cv, cols, mask, m_is, m_js, exact);
}

/* Query row i may attend the columns c with lo + i <= c <= hi + i (a band:
 * causal masks and sliding windows); the rest become -inf. */
static void FA(mask_band)(REAL *restrict S, int64_t s_is, int64_t s_js, int64_t rows,
                          int64_t cols, int64_t lo, int64_t hi) {
    /* two runs of stores per row, left and right of the band, instead of a
     * test per score; an empty band (the runs meet or cross) clears the row */
    for (int64_t i = 0; i < rows; i++) {
        int64_t left = lo + i, right = hi + i + 1;
        left = left < 0 ? 0 : (left > cols ? cols : left);
        right = right < 0 ? 0 : (right > cols ? cols : right);
        REAL *row = S + i * s_is;
        for (int64_t j = 0; j < left; j++) row[j * s_js] = (REAL)-INFINITY;
        for (int64_t j = right; j < cols; j++) row[j * s_js] = (REAL)-INFINITY;
    }
}

/* Logit soft-capping of the n scores at s (n a multiple of VLEN, s aligned),
 * before any mask (FA(vcap)), for scores no GEMM capped as it made them
 * (FA(panel)'s cap): the few-query rows and the bfloat16 pair tiles. */
static void FA(softcap)(REAL *restrict s, int64_t n, REAL cap) {
    const VEC inv = FA(vsplat)((REAL)1 / cap), c = FA(vsplat)(cap);
    /* blocks of 16 vectors, one choice of side each (see FA(vcap)) */
    for (int64_t j = 0; j < n; j += 16 * VLEN) {
        int64_t end = j + 16 * VLEN < n ? j + 16 * VLEN : n;
        IVEC some = (IVEC){0}, every = ~(IVEC){0};
        for (int64_t i = j; i < end; i += VLEN) FA(cap_span)(*(VEC *)(s + i), inv, &some, &every);
        int side = FA(cap_side)(some, every);
        for (int64_t i = j; i < end; i += VLEN) *(VEC *)(s + i) = FA(vcap)(*(VEC *)(s + i), inv, c, side);
    }
}

/* ALiBi: S(i, j) -= slope * |rel + j - i|, rel the key-minus-query distance
 * of (0, 0); a linear penalty on distance, no bias matrix in memory. */
static void FA(add_alibi)(REAL *restrict S, int64_t s_is, int64_t s_js, int64_t rows,
                          int64_t cols, REAL slope, int64_t rel) {
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j++) {
            int64_t d = rel + j - i;
            S[i * s_is + j * s_js] -= slope * (REAL)(d < 0 ? -d : d);
        }
}

/* 1 when the n rows of v (vs apart, ev long) hold only finite values: x - x
 * is 0 for finite x and NaN otherwise, and one vector sums them all. */
static int FA(all_finite)(const REAL *restrict v, int64_t vs, int64_t n, int64_t ev) {
    typedef FA(uvec) UVEC;
    int64_t evv = ev - ev % VLEN;
    VEC acc = FA(vsplat)(0);
    REAL tail = 0;
    for (int64_t j = 0; j < n; j++) {
        const REAL *vj = v + j * vs;
        for (int64_t c = 0; c < evv; c += VLEN) {
            VEC x = *(const UVEC *)(vj + c);
            acc += x - x;
        }
        for (int64_t c = evv; c < ev; c++) tail += vj[c] - vj[c];
    }
    return FA(hsum)(acc) + tail == 0;
}

/* The first row j in [from, n) of v (rows vs apart, ev long) holding a NaN or
 * an inf, or n.  x - x is 0 for finite x and NaN otherwise, so one vector
 * sum per row tells. */
static int64_t FA(nonfinite_row)(const REAL *restrict v, int64_t vs, int64_t from, int64_t n,
                                 int64_t ev) {
    typedef FA(uvec) UVEC;
    int64_t evv = ev - ev % VLEN;
    for (int64_t j = from; j < n; j++) {
        const REAL *vj = v + j * vs;
        VEC acc = FA(vsplat)(0);
        for (int64_t c = 0; c < evv; c += VLEN) {
            VEC x = *(const UVEC *)(vj + c);
            acc += x - x;
        }
        REAL tail = 0;
        for (int64_t c = evv; c < ev; c++) tail += vj[c] - vj[c];
        if (FA(hsum)(acc) + tail != 0) return j;
    }
    return n;
}
