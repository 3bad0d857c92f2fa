/*
 * Masks, bands and position biases for one element type: what turns a block
 * of scores into the scores the softmax sees, and the scan for value rows
 * holding a NaN or an inf, which a block that a mask touches must keep away
 * from the queries that do not attend them (0 * inf is NaN).
 * No include guard: included once per element type (fa_kernels_impl.h).
 */

/* Scores S(i, j) = S[i * s_is + j * s_js] of keys that may not be attended
 * become -inf; i runs over `rows` queries, j over `cols` keys. */
static void FA(mask_bool)(REAL *restrict S, int64_t s_is, int64_t s_js, int64_t rows,
                          int64_t cols, const uint8_t *restrict mask, int64_t m_is,
                          int64_t m_js) {
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j++)
            if (!mask[i * m_is + j * m_js]) S[i * s_is + j * s_js] = (REAL)-INFINITY;
}

/* Float masks add to the scores; a -inf entry blocks its key outright, so a
 * NaN score there (a NaN or inf in a masked key) stays out of the softmax. */
static void FA(mask_add)(REAL *restrict S, int64_t s_is, int64_t s_js, int64_t rows,
                         int64_t cols, const REAL *restrict mask, int64_t m_is, int64_t m_js) {
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j++) {
            REAL a = mask[i * m_is + j * m_js];
            REAL *s = S + i * s_is + j * s_js;
            *s = a == (REAL)-INFINITY ? a : *s + a;
        }
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
