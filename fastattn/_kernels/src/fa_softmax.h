/*
 * The softmax for one element type: one rule, written once below, and the
 * four kernels that apply it.
 *
 *   online_softmax  the tile: a block of keys for a tile of queries, the
 *                   queries along the vector lanes (no horizontal reductions)
 *   row_update      the same step for one query row (the few-query path)
 *   softmax_rows    whole rows at once (the path that returns the weights)
 *   merge_splits    the partial results of key splits of one query row
 *   finalize        o / l at the end of the tile and row paths
 *
 * The rule.  A query row carries a running max m, a sum l of its weights and
 * an output o accumulated under that max; the weights of a block of scores s
 * are exp(s - shift(m)).
 *  - shift(m) is m, or 0 while m is -inf: a row that has seen only -inf
 *    scores (masked keys) gets weights exp(-inf - 0) = 0, where -inf - -inf
 *    would give NaN, so its l and o stay 0.
 *  - When the max moves from m_old to m, l and o are rescaled by
 *    exp(m_old - shift(m)): 0 where m_old is -inf (nothing was accumulated),
 *    1 where the max did not move.
 *  - A row whose l is 0 at the end saw only -inf and its output is 0, written
 *    as 0: not o * (1 / l), and not o * 0, which is NaN where o took 0 * the
 *    inf of a masked key's value.
 *  - A NaN score makes its row NaN.  The vector max may drop a NaN (see
 *    FA(vmax)), but exp(NaN - shift) is NaN, so it reaches l and, through
 *    1 / l, every output of the row; softmax_rows, which computes no
 *    exponentials for a row whose max is -inf, looks for a dropped NaN itself.
 * No include guard: included once per element type (fa_kernels_impl.h).
 */

/* ---- the rule ---- */

/* True when every score a row has seen so far is -inf (its max is -inf). */
static inline int FA(sm_none)(REAL m) { return m == (REAL)-INFINITY; }

/* The shift for a running max m: m, or 0 while m is -inf. */
static inline REAL FA(sm_shift)(REAL m) { return FA(sm_none)(m) ? 0 : m; }

/* FA(sm_shift) lane by lane, for running maxes held one per lane. */
static inline VEC FA(sm_vshift)(VEC m) {
    return FA(vselect)(m == FA(vsplat)((REAL)-INFINITY), FA(vsplat)(0), m);
}

/* The factor exp(m_old - shift) that rescales what was accumulated under
 * the running max m_old, shift being that of the new max. */
static inline VEC FA(sm_vcorr)(VEC m_old, VEC shift) { return FA(vexp)(m_old - shift); }

/* The weights: s[j * stride + 0:VLEN] = exp(s - shift) in place for j < n,
 * returning their lane-wise sum.  s need not be aligned. */
static inline VEC FA(sm_exp_sum)(REAL *restrict s, int64_t stride, int64_t n, VEC shift) {
    typedef FA(uvec) UVEC;
    VEC sum = FA(vsplat)(0);
    for (int64_t j = 0; j < n; j++) {
        VEC p = FA(vexp)(*(UVEC *)(s + j * stride) - shift);
        *(UVEC *)(s + j * stride) = p;
        sum += p;
    }
    return sum;
}

/* A row's log-sum-exp from its running max m and its sum l under shift(m):
 * -inf for a row that saw only -inf (l = 0, log 0 = -inf), NaN for NaN. */
static inline REAL FA(lse_of)(REAL m, REAL l) {
    return l == 0 ? (REAL)-INFINITY : FA(sm_shift)(m) + (REAL)log((double)l);
}

/* 1 / l, or 0 for a row whose l is 0 (it saw only -inf). */
static inline REAL FA(sm_inv)(REAL l) { return l == 0 ? 0 : (REAL)1 / l; }

/* out[e] = o[e * os] / l for e < n, or 0 throughout where l is 0, written
 * as 0 rather than multiplied (see the rule).  out may be o (os = 1). */
static inline void FA(sm_normalize)(REAL *out, const REAL *o, int64_t os, int64_t n, REAL l) {
    if (l == 0) {
        for (int64_t e = 0; e < n; e++) out[e] = 0;
        return;
    }
    REAL inv = FA(sm_inv)(l);
    for (int64_t e = 0; e < n; e++) out[e] = o[e * os] * inv;
}

/* ---- the kernels ---- */

/*
 * One step of the online softmax over a block of transposed scores ST
 * (nkeys rows, ncols query lanes, ncols a multiple of VLEN).  Per query lane:
 * new running max m, scores -> weights in place, running sum l rescaled and
 * extended, and the accumulated output O^T (ev rows) rescaled.
 * `bmax` (or NULL): the block's max per lane, already taken by the GEMM
 * that made the scores (FA(gemm)'s colmax), which saves a pass over ST.
 */
static void FA(online_softmax)(REAL *restrict ST, int64_t lds, int64_t nkeys, int64_t ncols,
                               REAL *restrict m, REAL *restrict l, REAL *restrict OT,
                               int64_t ldo, int64_t ev, const REAL *restrict bmax) {
    const VEC ninf = FA(vsplat)((REAL)-INFINITY);
    for (int64_t c = 0; c < ncols; c += VLEN) {
        VEC mx = *(VEC *)(m + c);
        if (bmax) {
            mx = FA(vmax)(mx, *(const VEC *)(bmax + c));
        } else {
            /* four independent chains: a single dependent chain of maxes
             * is latency-bound */
            VEC m1 = ninf, m2 = ninf, m3 = ninf;
            int64_t j = 0;
            for (; j + 4 <= nkeys; j += 4) {
                mx = FA(vmax)(mx, *(const VEC *)(ST + j * lds + c));
                m1 = FA(vmax)(m1, *(const VEC *)(ST + (j + 1) * lds + c));
                m2 = FA(vmax)(m2, *(const VEC *)(ST + (j + 2) * lds + c));
                m3 = FA(vmax)(m3, *(const VEC *)(ST + (j + 3) * lds + c));
            }
            for (; j < nkeys; j++) mx = FA(vmax)(mx, *(const VEC *)(ST + j * lds + c));
            mx = FA(vmax)(FA(vmax)(mx, m1), FA(vmax)(m2, m3));
        }
        VEC shift = FA(sm_vshift)(mx);
        VEC corr = FA(sm_vcorr)(*(VEC *)(m + c), shift);
        VEC sum = FA(sm_exp_sum)(ST + c, lds, nkeys, shift);
        *(VEC *)(l + c) = *(VEC *)(l + c) * corr + sum;
        /* once the running max has settled (most blocks), corr is all ones */
        IVEC moved = mx != *(VEC *)(m + c);
        *(VEC *)(m + c) = mx;
        if (FA(any)(moved))
            for (int64_t e = 0; e < ev; e++) *(VEC *)(OT + e * ldo + c) *= corr;
    }
}

/*
 * The online-softmax step for one query row over n scores (s padded with -inf
 * to n_pad, a multiple of VLEN): s -> weights in place, running max m and sum
 * l updated, accumulated output o (ev_pad entries) rescaled.
 */
static void FA(row_update)(REAL *restrict s, int64_t n_pad, REAL *restrict m, REAL *restrict l,
                           REAL *restrict o, int64_t ev_pad) {
    VEC vm = FA(vsplat)((REAL)-INFINITY);
    for (int64_t c = 0; c < n_pad; c += VLEN) vm = FA(vmax)(vm, *(const VEC *)(s + c));
    REAL mx = FA(smax)(*m, FA(hmax)(vm));
    VEC shift = FA(vsplat)(FA(sm_shift)(mx));
    VEC sum = FA(sm_exp_sum)(s, VLEN, n_pad / VLEN, shift);
    if (mx != *m) {
        VEC corr = FA(sm_vcorr)(FA(vsplat)(*m), shift);
        *l *= corr[0];
        for (int64_t c = 0; c < ev_pad; c += VLEN) *(VEC *)(o + c) *= corr;
    }
    *l += FA(hsum)(sum);
    *m = mx;
}

/* Full softmax of `rows` rows of length n (any stride, any alignment), in
 * place.  `sink` (-inf: none) is one more logit in every row's denominator
 * whose weight is not kept (attention sinks: the row's weights then sum to
 * less than 1).  lse (or NULL) gets each row's log-sum-exp, sink included:
 * -inf for a row that saw only -inf and no sink. */
static void FA(softmax_rows)(REAL *restrict W, int64_t ldw, int64_t rows, int64_t n, REAL sink,
                             REAL *restrict lse) {
    int64_t nv = n - n % VLEN;
    for (int64_t r = 0; r < rows; r++) {
        REAL *w = W + r * ldw;
        VEC vm = FA(vsplat)((REAL)-INFINITY);
        for (int64_t c = 0; c < nv; c += VLEN) vm = FA(vmax)(vm, *(const FA(uvec) *)(w + c));
        REAL mx = FA(hmax)(vm);
        for (int64_t c = nv; c < n; c++) mx = FA(smax)(w[c], mx);
        if (FA(sm_none)(mx)) {
            /* a row that saw only -inf is 0, unless the fast max dropped a NaN */
            REAL fill = 0;
            for (int64_t c = 0; c < n; c++)
                if (w[c] != w[c]) fill = w[c];
            for (int64_t c = 0; c < n; c++) w[c] = fill;
            if (lse) lse[r] = fill != fill ? fill : sink;
            continue;
        }
        mx = FA(smax)(sink, mx);
        VEC shift = FA(vsplat)(FA(sm_shift)(mx));
        REAL sum = FA(hsum)(FA(sm_exp_sum)(w, VLEN, nv / VLEN, shift));
        if (nv < n) {
            /* the tail goes through one vector padded with -inf lanes */
            VEC t = FA(vsplat)((REAL)-INFINITY);
            for (int64_t c = nv; c < n; c++) t[c - nv] = w[c];
            t = FA(vexp)(t - shift);
            for (int64_t c = nv; c < n; c++) {
                w[c] = t[c - nv];
                sum += t[c - nv];
            }
        }
        if (sink != (REAL)-INFINITY) sum += (REAL)exp((double)(sink - mx));
        FA(sm_normalize)(w, w, 1, n, sum);
        if (lse) lse[r] = mx + (REAL)log((double)sum);
    }
}

/*
 * Merges the partial results of key splits of one query row: each part is
 * (m, l, o[0:ev]) over its keys; out = sum_s o_s c_s / sum_s l_s c_s with
 * c_s = exp(m_s - shift(max_s m_s)), the rule's correction factor.  It is
 * computed here with libm's exp in double on a scalar, not FA(sm_vcorr): a
 * handful of parts per row, and the split path's outputs are kept as they
 * were.  A part with l = 0 (it saw only -inf) weighs 0.  lse (or NULL) gets
 * the row's log-sum-exp.
 */
static void FA(merge_splits)(REAL *restrict out, int64_t ev, const REAL *restrict parts,
                             int64_t stride, int64_t n, REAL *restrict lse) {
    REAL m = (REAL)-INFINITY;
    for (int64_t s = 0; s < n; s++) m = FA(smax)(parts[s * stride], m);
    REAL shift = FA(sm_shift)(m), l = 0;
    for (int64_t c = 0; c < ev; c++) out[c] = 0;
    for (int64_t s = 0; s < n; s++) {
        const REAL *p = parts + s * stride;
        REAL w = p[1] == 0 ? 0 : (REAL)exp((double)(p[0] - shift));
        l += w * p[1];
        for (int64_t c = 0; c < ev; c++) out[c] += w * p[2 + c];
    }
    FA(sm_normalize)(out, out, 1, ev, l);
    if (lse) *lse = FA(lse_of)(m, l);
}

/* out[i * ors + e] = O^T[e][i] / l[i] for i < rows, e < ev, by the rule's
 * normalisation (a query with l == 0 gets 0; a NaN in l reaches the output). */
static void FA(finalize)(const REAL *restrict OT, int64_t ldo, const REAL *restrict l,
                         int64_t rows, int64_t ev, REAL *restrict out, int64_t ors) {
    int64_t rv = FA_BLOCK_TRANSPOSE ? rows - rows % VLEN : 0, cv = ev - ev % VLEN;
#if FA_BLOCK_TRANSPOSE
    typedef FA(uvec) UVEC;
    VEC blk[VLEN];
    for (int64_t i0 = 0; i0 < rv; i0 += VLEN) {
        VEC inv;
        for (int64_t c = 0; c < VLEN; c++) inv[c] = FA(sm_inv)(l[i0 + c]);
        for (int64_t e0 = 0; e0 < cv; e0 += VLEN) {
#pragma GCC unroll 16
            for (int64_t c = 0; c < VLEN; c++) blk[c] = *(const VEC *)(OT + (e0 + c) * ldo + i0) * inv;
            FA(transpose_block)(blk);
#pragma GCC unroll 16
            for (int64_t r = 0; r < VLEN; r++) *(UVEC *)(out + (i0 + r) * ors + e0) = blk[r];
        }
    }
#endif
    /* the ragged edges, and again in full the rows with l == 0, whose
     * products with inv = 0 above may be NaN */
    for (int64_t i = 0; i < rows; i++) {
        int64_t e = (i < rv && l[i] != 0) ? cv : 0;
        FA(sm_normalize)(out + i * ors + e, OT + e * ldo + i, ldo, ev - e, l[i]);
    }
}
