/*
 * The innermost loops of the attention kernel, written once and included twice
 * by fa_kernels.h: with REAL = float (suffix _f32) and REAL = double (_f64).
 *
 * Layout conventions shared with fastattn/_attention.pxi:
 *  - packed blocks live in per-thread scratch, FA_ALIGN-aligned, and every
 *    leading dimension is a multiple of NR (so every row starts aligned);
 *  - row counts handed to gemm are multiples of FA_MR (padding rows are zero);
 *  - score rows are padded to a multiple of NR with -inf before the softmax,
 *    so the padded lanes weigh exactly zero.
 */

#define VLEN ((int64_t)(FA_VBYTES / sizeof(REAL)))
#define NR (FA_NV * VLEN)

typedef REAL FA(vec) __attribute__((vector_size(FA_VBYTES)));
typedef REAL FA(uvec) __attribute__((vector_size(FA_VBYTES), aligned(sizeof(REAL))));
typedef IREAL FA(ivec) __attribute__((vector_size(FA_VBYTES)));

#define VEC FA(vec)
#define IVEC FA(ivec)

static inline int64_t FA(col_align)(void) { return NR; }
static inline int64_t FA(row_align)(void) { return FA_MR; }

/* Broadcast; GCC and clang turn a scalar operand of a vector operation into
 * a splat (x - 0 is exact, signed zeros included). */
static inline VEC FA(vsplat)(REAL x) { return x - (VEC){0}; }

/* Lane-wise a if mask else b; mask lanes are all-ones or all-zeros. */
static inline VEC FA(vselect)(IVEC mask, VEC a, VEC b) {
    return (VEC)((mask & (IVEC)a) | (~mask & (IVEC)b));
}

/* max that lets a NaN through (as numpy's does): a NaN score then makes its
 * row NaN, as IEEE arithmetic on the plain formula would, instead of being
 * skipped or mistaken for a fully masked row. */
static inline VEC FA(vmax)(VEC x, VEC m) { return FA(vselect)((x > m) | (x != x), x, m); }

static inline REAL FA(smax)(REAL x, REAL m) { return (x > m || x != x) ? x : m; }

static inline REAL FA(hmax)(VEC v) {
    REAL m = v[0];
    for (int64_t i = 1; i < VLEN; i++) m = FA(smax)(v[i], m);
    return m;
}

static inline REAL FA(hsum)(VEC v) {
    REAL s = 0;
    for (int64_t i = 0; i < VLEN; i++) s += v[i];
    return s;
}

/*
 * exp(x) lane-wise: x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2),
 * exp(r) by its Taylor polynomial, 2^n assembled in the exponent bits.  Below
 * FA_EXP_LO the result is 0 (so exp(-inf) == 0), above FA_EXP_HI it is +inf,
 * and NaN stays NaN.  Relative error: ~1 ulp in float, ~2 ulp in double.
 */
static inline VEC FA(vexp)(VEC x) {
    const VEC lo = FA(vsplat)(FA_EXP_LO), hi = FA(vsplat)(FA_EXP_HI);
    VEC xc = FA(vselect)(x < lo, lo, x);
    xc = FA(vselect)(xc > hi, hi, xc);
    const VEC magic = FA(vsplat)(FA_EXP_MAGIC);
    VEC t = xc * FA(vsplat)(FA_LOG2E) + magic;
    VEC kf = t - magic;
    IVEC n = (IVEC)t - (IVEC)magic;
    VEC r = xc - kf * FA(vsplat)(FA_LN2_HI);
    r = r - kf * FA(vsplat)(FA_LN2_LO);
    VEC p = FA(vsplat)(FA_EXP_C[FA_EXP_DEG]);
    for (int d = FA_EXP_DEG - 1; d >= 0; d--) p = p * r + FA(vsplat)(FA_EXP_C[d]);
    IVEC bits = (n + (IREAL)FA_EXP_BIAS) << FA_MANT_BITS;
    VEC res = p * (VEC)bits;
    res = FA(vselect)(x < lo, FA(vsplat)(0), res);
    return FA(vselect)(x > hi, FA(vsplat)((REAL)INFINITY), res);
}

/* dst[r][c] = scale * src[r * srs + c] for r < rows, c < cols; zero up to
 * rows_pad x cols_pad.  Q (scaled) and V blocks go through here. */
static void FA(pack_rows)(REAL *restrict dst, int64_t ldd, const REAL *restrict src,
                          int64_t srs, int64_t rows, int64_t cols, REAL scale,
                          int64_t rows_pad, int64_t cols_pad) {
    for (int64_t r = 0; r < rows; r++) {
        const REAL *s = src + r * srs;
        REAL *d = dst + r * ldd;
        for (int64_t c = 0; c < cols; c++) d[c] = scale * s[c];
        for (int64_t c = cols; c < cols_pad; c++) d[c] = 0;
    }
    for (int64_t r = rows; r < rows_pad; r++)
        for (int64_t c = 0; c < cols_pad; c++) dst[r * ldd + c] = 0;
}

/* dst[c][r] = src[r * srs + c]: a block of keys, transposed so the score
 * micro-kernel reads NR consecutive keys per vector.  Columns r >= rows
 * (keys past the end) are zero. */
static void FA(pack_transposed)(REAL *restrict dst, int64_t ldd, const REAL *restrict src,
                                int64_t srs, int64_t rows, int64_t cols, int64_t rows_pad) {
    for (int64_t c = 0; c < cols; c++)
        for (int64_t r = rows; r < rows_pad; r++) dst[c * ldd + r] = 0;
    /* Walk the keys in groups so each group's source rows stay in L1 while
     * their columns are scattered into the transposed block. */
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
        int64_t r1 = r0 + 8 < rows ? r0 + 8 : rows;
        for (int64_t c = 0; c < cols; c++) {
            REAL *d = dst + c * ldd;
            for (int64_t r = r0; r < r1; r++) d[r] = src[r * srs + c];
        }
    }
}

/*
 * C[M x N] (+)= A[M x K] * B[K x N], M a multiple of FA_MR, N of NR, B and C
 * rows aligned.  The micro-tile (FA_MR rows x FA_NV vectors) stays in
 * registers across the whole K loop: this is where the FLOPs are.
 */
static void FA(gemm)(int64_t M, int64_t N, int64_t K, const REAL *restrict A, int64_t lda,
                     const REAL *restrict B, int64_t ldb, REAL *restrict C, int64_t ldc,
                     int accumulate) {
    for (int64_t i = 0; i < M; i += FA_MR) {
        for (int64_t j = 0; j < N; j += NR) {
            VEC acc[FA_MR][FA_NV];
            for (int r = 0; r < FA_MR; r++)
                for (int v = 0; v < FA_NV; v++)
                    acc[r][v] = accumulate ? *(const VEC *)(C + (i + r) * ldc + j + v * VLEN)
                                           : FA(vsplat)(0);
            const REAL *a = A + i * lda;
            for (int64_t p = 0; p < K; p++) {
                VEC b[FA_NV];
                for (int v = 0; v < FA_NV; v++) b[v] = *(const VEC *)(B + p * ldb + j + v * VLEN);
                for (int r = 0; r < FA_MR; r++) {
                    REAL ar = a[r * lda + p];
                    for (int v = 0; v < FA_NV; v++) acc[r][v] += ar * b[v];
                }
            }
            for (int r = 0; r < FA_MR; r++)
                for (int v = 0; v < FA_NV; v++)
                    *(VEC *)(C + (i + r) * ldc + j + v * VLEN) = acc[r][v];
        }
    }
}

/* Scores of keys that may not be attended become -inf. */
static void FA(mask_bool)(REAL *restrict S, int64_t lds, int64_t rows, int64_t cols,
                          const uint8_t *restrict mask, int64_t m_rs, int64_t m_cs) {
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *m = mask + r * m_rs;
        REAL *s = S + r * lds;
        for (int64_t c = 0; c < cols; c++)
            if (!m[c * m_cs]) s[c] = (REAL)-INFINITY;
    }
}

static void FA(mask_add)(REAL *restrict S, int64_t lds, int64_t rows, int64_t cols,
                         const REAL *restrict mask, int64_t m_rs, int64_t m_cs) {
    for (int64_t r = 0; r < rows; r++) {
        const REAL *m = mask + r * m_rs;
        REAL *s = S + r * lds;
        for (int64_t c = 0; c < cols; c++) s[c] += m[c * m_cs];
    }
}

/* Row r may attend columns c <= first_limit + r; the rest become -inf. */
static void FA(mask_causal)(REAL *restrict S, int64_t lds, int64_t rows, int64_t cols,
                            int64_t first_limit) {
    for (int64_t r = 0; r < rows; r++) {
        int64_t c0 = first_limit + r + 1;
        if (c0 < 0) c0 = 0;
        REAL *s = S + r * lds;
        for (int64_t c = c0; c < cols; c++) s[c] = (REAL)-INFINITY;
    }
}

/* Pads each score row from cols to cols_pad with -inf. */
static void FA(pad_neg_inf)(REAL *restrict S, int64_t lds, int64_t rows, int64_t cols,
                            int64_t cols_pad) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = cols; c < cols_pad; c++) S[r * lds + c] = (REAL)-INFINITY;
}

/* Largest value of a row of n_pad (a multiple of VLEN) aligned entries. */
static inline REAL FA(row_max)(const REAL *restrict s, int64_t n_pad) {
    VEC m = FA(vsplat)((REAL)-INFINITY);
    for (int64_t c = 0; c < n_pad; c += VLEN) m = FA(vmax)(*(const VEC *)(s + c), m);
    return FA(hmax)(m);
}

/* s[c] = exp(s[c] - shift) in place; returns the sum. */
static inline REAL FA(exp_shift_sum)(REAL *restrict s, int64_t n_pad, REAL shift) {
    VEC acc = FA(vsplat)(0), sh = FA(vsplat)(shift);
    for (int64_t c = 0; c < n_pad; c += VLEN) {
        VEC p = FA(vexp)(*(VEC *)(s + c) - sh);
        *(VEC *)(s + c) = p;
        acc += p;
    }
    return FA(hsum)(acc);
}

/*
 * One step of the online (streaming) softmax over a block of scores.  For each
 * of the first `rows` rows: new running max, scores -> exp(score - max) in
 * place, running sum rescaled and extended, accumulated output rescaled.  A
 * row that has seen only -inf so far keeps max = -inf, sum = 0 and gets an
 * all-zero block, so fully masked rows end as zeros, never as NaN.
 */
static void FA(online_softmax)(REAL *restrict S, int64_t lds, int64_t rows, int64_t cols_pad,
                               REAL *restrict m, REAL *restrict l, REAL *restrict O,
                               int64_t ldo, int64_t ocols_pad) {
    for (int64_t r = 0; r < rows; r++) {
        REAL *s = S + r * lds;
        REAL mx = FA(row_max)(s, cols_pad);
        REAL m_new = FA(smax)(mx, m[r]);
        if (m_new == (REAL)-INFINITY) {
            for (int64_t c = 0; c < cols_pad; c++) s[c] = 0;
            continue;
        }
        REAL rs = FA(exp_shift_sum)(s, cols_pad, m_new);
        if (m_new != m[r]) {
            REAL corr = FA_SCALAR_EXP(m[r] - m_new);
            l[r] *= corr;
            VEC vc = FA(vsplat)(corr);
            REAL *o = O + r * ldo;
            for (int64_t c = 0; c < ocols_pad; c += VLEN) *(VEC *)(o + c) *= vc;
        }
        l[r] += rs;
        m[r] = m_new;
    }
}

/* out[r * ors + c] = O[r][c] / l[r]; a row with l == 0 (nothing attended) is
 * 0, and a NaN in l reaches the output as NaN. */
static void FA(finalize)(const REAL *restrict O, int64_t ldo, const REAL *restrict l,
                         int64_t rows, REAL *restrict out, int64_t ors, int64_t cols) {
    for (int64_t r = 0; r < rows; r++) {
        const REAL *o = O + r * ldo;
        REAL *d = out + r * ors;
        if (l[r] == 0) {
            for (int64_t c = 0; c < cols; c++) d[c] = 0;
        } else {
            REAL inv = (REAL)1 / l[r];
            for (int64_t c = 0; c < cols; c++) d[c] = o[c] * inv;
        }
    }
}

/* Copies rows x cols of S into W (row stride ldw).  The weights path keeps
 * the scaled, masked scores of a whole query block in the caller's buffer. */
static void FA(copy_block)(REAL *restrict W, int64_t ldw, const REAL *restrict S, int64_t lds,
                           int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) W[r * ldw + c] = S[r * lds + c];
}

/* Full softmax of `rows` rows of length n (any stride, any alignment), in
 * place.  Rows that are entirely -inf become zeros. */
static void FA(softmax_rows)(REAL *restrict W, int64_t ldw, int64_t rows, int64_t n) {
    int64_t nv = n - n % VLEN;
    for (int64_t r = 0; r < rows; r++) {
        REAL *w = W + r * ldw;
        VEC vm = FA(vsplat)((REAL)-INFINITY);
        for (int64_t c = 0; c < nv; c += VLEN) vm = FA(vmax)(*(const FA(uvec) *)(w + c), vm);
        REAL mx = FA(hmax)(vm);
        for (int64_t c = nv; c < n; c++) mx = FA(smax)(w[c], mx);
        if (mx == (REAL)-INFINITY) {
            for (int64_t c = 0; c < n; c++) w[c] = 0;
            continue;
        }
        VEC sh = FA(vsplat)(mx), acc = FA(vsplat)(0);
        for (int64_t c = 0; c < nv; c += VLEN) {
            VEC p = FA(vexp)(*(const FA(uvec) *)(w + c) - sh);
            *(FA(uvec) *)(w + c) = p;
            acc += p;
        }
        REAL sum = FA(hsum)(acc);
        if (nv < n) {
            /* the tail goes through one vector padded with -inf lanes */
            VEC t = FA(vsplat)((REAL)-INFINITY);
            for (int64_t c = nv; c < n; c++) t[c - nv] = w[c];
            t = FA(vexp)(t - sh);
            for (int64_t c = nv; c < n; c++) {
                w[c] = t[c - nv];
                sum += t[c - nv];
            }
        }
        REAL inv = (REAL)1 / sum;
        for (int64_t c = 0; c < n; c++) w[c] *= inv;
    }
}

#undef VEC
#undef IVEC
#undef VLEN
#undef NR
