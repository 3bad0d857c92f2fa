/*
 * The innermost loops of the attention kernel, written once and included twice
 * by fa_kernels.h: with REAL = float (suffix _f32) and REAL = double (_f64).
 *
 * The tile works on transposed blocks, queries along the vector lanes:
 *   S^T (keys x queries)   = K_block . Q^T          (K read in place)
 *   O^T (Ev x queries)    += V_block^T . P^T        (V read in place)
 * so the online softmax is lane-wise (a running max and sum per query lane,
 * no horizontal reductions) and only Q is packed, once per tile.
 *
 * Buffers in per-thread scratch (Q^T, S^T, O^T, m, l) are FA_ALIGN-aligned
 * with leading dimensions that are multiples of NR; their query columns past
 * the real ones are zero-padded and never stored.
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

/* Lane-wise max(a, b); where a lane of b is NaN the result is NaN, where
 * only a's is, the result may drop it (callers let NaN reach the output
 * through the exponentials instead). */
static inline VEC FA(vmax)(VEC a, VEC b) {
#if defined(FA_MAX_PS)
    return FA_VMAX(a, b);
#else
    return FA(vselect)((b > a) | (b != b), b, a);
#endif
}

/* Scalar max that lets a NaN in x through (as numpy's max does). */
static inline REAL FA(smax)(REAL x, REAL m) { return (x > m || x != x) ? x : m; }

static inline REAL FA(hmax)(VEC v) {
    REAL m = v[0];
    for (int64_t i = 1; i < VLEN; i++) m = FA(smax)(v[i], m);
    return m;
}

static inline int FA(any)(IVEC mask) {
    IREAL acc = 0;
    for (int64_t i = 0; i < VLEN; i++) acc |= mask[i];
    return acc != 0;
}

static inline REAL FA(hsum)(VEC v) {
    REAL s = 0;
    for (int64_t i = 0; i < VLEN; i++) s += v[i];
    return s;
}

/*
 * 2^y lane-wise for y <= 0: no range reduction to do (r = y - round(y) is
 * exact), a polynomial for 2^r, and 2^n assembled in the exponent bits.
 * Clamping at FA_EXP2_LO makes the assembled 2^n exactly 0, so 2^-inf == 0
 * with no select; NaN stays NaN.  Relative error ~1 ulp in float and double.
 */
static inline VEC FA(vexp2)(VEC y) {
#if defined(FA_VREDUCE)
    /* AVX-512: the reduction and the scaling by 2^n are an instruction each,
     * and both handle y = -inf (r = 0, 2^-inf = 0): no clamp, no integer
     * work, 3 fewer operations per vector on the pipes the products need.
     * Unlike the path below, y just under the exponent range (-150 < y <=
     * -127 in float) gives denormals rather than 0: weights below 2^-126 of
     * the row's largest, the same to within 1e-38 */
    VEC r = FA_VREDUCE(y);
    VEC p = FA(vsplat)(FA_EXP2_C[FA_EXP2_DEG]);
    for (int d = FA_EXP2_DEG - 1; d >= 0; d--) p = p * r + FA(vsplat)(FA_EXP2_C[d]);
    return FA_VSCALEF(p, y - r);
#else
    VEC yc = FA(vmax)(FA(vsplat)(FA_EXP2_LO), y);
    const VEC magic = FA(vsplat)(FA_EXP_MAGIC);
    VEC t = yc + magic;
    VEC r = yc - (t - magic);
    IVEC n = (IVEC)t - (IVEC)magic;
    VEC p = FA(vsplat)(FA_EXP2_C[FA_EXP2_DEG]);
    for (int d = FA_EXP2_DEG - 1; d >= 0; d--) p = p * r + FA(vsplat)(FA_EXP2_C[d]);
    IVEC bits = (n + (IREAL)FA_EXP_BIAS) << FA_MANT_BITS;
    return p * (VEC)bits;
#endif
}

/*
 * exp(x) lane-wise for x <= 0 (the softmax only exponentiates score - max),
 * as 2^(x log2 e): x = s - m is exact where it matters (s near m) and the
 * product adds one relative rounding, so this is as accurate as a
 * Cody-Waite exp, while the FMA pipes (which the score and output GEMMs need
 * too) see eight operations per vector instead of eleven.
 */
static inline VEC FA(vexp)(VEC x) { return FA(vexp2)(x * FA(vsplat)(FA_LOG2E)); }

/* GCC's two-source __builtin_shuffle makes the block transposes below; clang
 * has no such builtin (and its shufflevector wants literal indices), so a
 * clang build transposes element by element, as the edges do. */
#if defined(__clang__)
#define FA_BLOCK_TRANSPOSE 0
#else
#define FA_BLOCK_TRANSPOSE 1
/*
 * Transposes a VLEN x VLEN block held in v[0..VLEN) (row r in v[r]) in
 * registers: log2(VLEN) rounds, each swapping the off-diagonal b x b
 * sub-blocks of every 2b x 2b block with one two-source shuffle per row.
 * (VLEN^2 log2 VLEN / VLEN shuffles instead of VLEN^2 scalar moves: the
 * scalar transposes of Q and O were ~5 % of a tile at short sequences.)
 */
static inline void FA(transpose_block)(VEC *v) {
    static const IREAL iota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    IVEC idx;
    memcpy(&idx, iota, sizeof idx);
    /* fully unrolled, so the block stays in registers and the masks fold to constants */
#pragma GCC unroll 16
    for (int64_t b = 1; b < VLEN; b *= 2) {
        /* new row r: lanes c with (c & b) == 0 from row r, else lane c-b of row r+b;
         * new row r+b: lanes c with (c & b) == 0 from lane c+b of row r, else row r+b */
        IVEC odd = (idx & (IREAL)b) != 0;
        IVEC lo = idx + (odd & (IREAL)(VLEN - b));
        IVEC hi = idx + (IREAL)b + (odd & (IREAL)(VLEN - b));
#pragma GCC unroll 16
        for (int64_t r = 0; r < VLEN; r++) {
            if (r & b) continue;
            VEC x = v[r], y = v[r + b];
            v[r] = __builtin_shuffle(x, y, lo);
            v[r + b] = __builtin_shuffle(x, y, hi);
        }
    }
}
#endif

/* dst[e][i] = scale * src[i * srs + e]: the query block, transposed and
 * scaled once per tile; columns i >= rows (up to ldd) are zero. */
static void FA(pack_qt)(REAL *restrict dst, int64_t ldd, const REAL *restrict src, int64_t srs,
                        int64_t rows, int64_t cols, REAL scale) {
    for (int64_t e = 0; e < cols; e++)
        for (int64_t i = rows; i < ldd; i++) dst[e * ldd + i] = 0;
    int64_t rv = FA_BLOCK_TRANSPOSE ? rows - rows % VLEN : 0, cv = cols - cols % VLEN;
#if FA_BLOCK_TRANSPOSE
    typedef FA(uvec) UVEC;
    VEC blk[VLEN];
    for (int64_t i0 = 0; i0 < rv; i0 += VLEN)
        for (int64_t e0 = 0; e0 < cv; e0 += VLEN) {
#pragma GCC unroll 16
            for (int64_t r = 0; r < VLEN; r++) blk[r] = *(const UVEC *)(src + (i0 + r) * srs + e0);
            FA(transpose_block)(blk);
#pragma GCC unroll 16
            for (int64_t c = 0; c < VLEN; c++) *(VEC *)(dst + (e0 + c) * ldd + i0) = scale * blk[c];
        }
#endif
    /* the ragged edges, element by element */
    for (int64_t i = 0; i < rows; i++)
        for (int64_t e = i < rv ? cv : 0; e < cols; e++) dst[e * ldd + i] = scale * src[i * srs + e];
}

/*
 * One FA_MR-row panel: C[r][0:N] = init + sum_p A(r, p) * B[p][0:N] for r < mr,
 * A(r, p) = A[r * rs + p * ps], where init is C itself (accumulate), the row
 * vector `bias`, or zero.  N is a multiple of NR; B rows are aligned, C rows
 * need not be.  The FA_MR x FA_NV accumulator tile stays in registers for the
 * whole K loop.  Rows >= mr of A must be readable (callers pack tails).
 * With `colmax`, colmax[0:N] also takes the max of each column's results
 * (rows < mr), while they are still in registers.
 */
static inline void FA(panel)(int64_t N, int64_t K, const REAL *restrict A, int64_t rs,
                             int64_t ps, const REAL *restrict B, int64_t ldb,
                             REAL *restrict C, int64_t ldc, int accumulate,
                             const REAL *restrict bias, int64_t mr, REAL *restrict colmax) {
    typedef FA(uvec) UVEC;
    for (int64_t j = 0; j < N; j += NR) {
        VEC acc[FA_MR][FA_NV];
        for (int r = 0; r < FA_MR; r++)
            for (int v = 0; v < FA_NV; v++)
                acc[r][v] = (accumulate && r < mr) ? *(const UVEC *)(C + r * ldc + j + v * VLEN)
                            : bias ? *(const UVEC *)(bias + j + v * VLEN)
                                   : FA(vsplat)(0);
        for (int64_t p = 0; p < K; p++) {
            VEC b[FA_NV];
            for (int v = 0; v < FA_NV; v++) b[v] = *(const VEC *)(B + p * ldb + j + v * VLEN);
            const REAL *a = A + p * ps;
            for (int r = 0; r < FA_MR; r++) {
                REAL ar = a[r * rs];
                for (int v = 0; v < FA_NV; v++) acc[r][v] += ar * b[v];
            }
        }
        for (int r = 0; r < FA_MR; r++) {
            if (r >= mr) break;
            for (int v = 0; v < FA_NV; v++) *(UVEC *)(C + r * ldc + j + v * VLEN) = acc[r][v];
        }
        if (colmax)
            for (int v = 0; v < FA_NV; v++) {
                VEC mx = acc[0][v];
                for (int r = 1; r < FA_MR; r++)
                    if (r < mr) mx = FA(vmax)(mx, acc[r][v]);
                VEC *cm = (VEC *)(colmax + j + v * VLEN);
                *cm = FA(vmax)(*cm, mx);
            }
    }
}

/*
 * C[M x N] (+)= A[M x K] * B[K x N] with A read through strides (rs between
 * rows, ps between inner-dimension steps), so K and V are used in place.
 * A last panel of fewer than FA_MR rows is first copied into `tail`
 * (FA_MR * K elements), zero-padded, so no read runs past A.  colmax
 * (aligned, or NULL): see FA(panel).
 */
static void FA(gemm)(int64_t M, int64_t N, int64_t K, const REAL *restrict A, int64_t rs,
                     int64_t ps, const REAL *restrict B, int64_t ldb, REAL *restrict C,
                     int64_t ldc, int accumulate, REAL *restrict tail, REAL *restrict colmax) {
    int64_t i = 0;
    if (rs == 1) {
        for (; i + FA_MR <= M; i += FA_MR)
            FA(panel)(N, K, A + i, 1, ps, B, ldb, C + i * ldc, ldc, accumulate, NULL, FA_MR,
                      colmax);
    } else if (ps == 1) {
        for (; i + FA_MR <= M; i += FA_MR)
            FA(panel)(N, K, A + i * rs, rs, 1, B, ldb, C + i * ldc, ldc, accumulate, NULL, FA_MR,
                      colmax);
    } else {
        for (; i + FA_MR <= M; i += FA_MR)
            FA(panel)(N, K, A + i * rs, rs, ps, B, ldb, C + i * ldc, ldc, accumulate, NULL, FA_MR,
                      colmax);
    }
    if (i < M) {
        int64_t mr = M - i;
        for (int64_t p = 0; p < K; p++)
            for (int64_t r = 0; r < FA_MR; r++)
                tail[p * FA_MR + r] = r < mr ? A[(i + r) * rs + p * ps] : 0;
        FA(panel)(N, K, tail, 1, FA_MR, B, ldb, C + i * ldc, ldc, accumulate, NULL, mr, colmax);
    }
}

/* ---- projections: Y = X W^T + b with W packed once per weight change ---- */

/* Elements of W (n_out x k, row-major as in nn.Linear) once packed: panels of
 * NR output features, each k rows of NR (zero-padded past n_out). */
static inline int64_t FA(packed_len)(int64_t n_out, int64_t k) {
    return ((n_out + NR - 1) / NR) * NR * k;
}

static void FA(pack_weight)(REAL *restrict dst, const REAL *restrict W, int64_t n_out,
                            int64_t k) {
    int64_t panels = (n_out + NR - 1) / NR;
    for (int64_t q = 0; q < panels; q++) {
        REAL *d = dst + q * k * NR;
        for (int64_t p = 0; p < k; p++)
            for (int64_t c = 0; c < NR; c++) {
                int64_t n = q * NR + c;
                d[p * NR + c] = n < n_out ? W[n * k + p] : 0;
            }
    }
}

/* Bias padded to whole panels (so the last panel's vector loads stay inside). */
static inline int64_t FA(padded_bias_len)(int64_t n_out) { return ((n_out + NR - 1) / NR) * NR; }

/*
 * Rows [m0, m1) x output panels [q0, q1) of Y = X Wp^T (+ bias): the unit of
 * work one thread takes.  With `qlist`, the panels are qlist[q0 .. q1)
 * instead (a head's Q, K and V columns, which are not adjacent).  K is walked
 * in chunks of kc so that a panel of Wp (kc x NR) and the FA_MR rows of X it
 * meets stay in L1.  `scratch` holds
 * FA_MR * kc elements (a tail of rows, zero-padded) plus one FA_MR x NR tile
 * (a tail of output features); it must be FA_ALIGN-aligned.
 */
static void FA(linear_block)(const REAL *restrict X, int64_t ldx, int64_t m0, int64_t m1,
                             int64_t K, const REAL *restrict Wp, const REAL *restrict bias,
                             int64_t n_out, int64_t q0, int64_t q1, REAL *restrict Y,
                             const fa_out_layout *lay, int64_t kc, REAL *restrict scratch,
                             const int64_t *restrict qlist) {
    REAL *tile = scratch;               /* FA_MR x NR, aligned */
    REAL *rows_tail = scratch + FA_MR * NR;
    /* a panel of rows is written with one row stride: in the head-major
     * layout that holds within one batch entry, so panels stop at its end */
    int64_t seg = lay->head_dim ? lay->seq_len : INT64_MAX;
    int64_t ldc = lay->head_dim ? lay->head_dim : lay->ldy;
    int64_t roff[FA_MR], coff[NR];
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
        int64_t kl = K - k0 < kc ? K - k0 : kc;
        int first = k0 == 0;
        for (int64_t i = m0; i < m1; ) {
            int64_t mr = m1 - i < FA_MR ? m1 - i : FA_MR;
            if (seg - i % seg < mr) mr = seg - i % seg;
            const REAL *a = X + i * ldx + k0;
            int64_t rs = ldx, ps = 1;
            if (mr < FA_MR) {
                for (int64_t p = 0; p < kl; p++)
                    for (int64_t r = 0; r < FA_MR; r++)
                        rows_tail[p * FA_MR + r] = r < mr ? a[r * ldx + p] : 0;
                a = rows_tail;
                rs = 1;
                ps = FA_MR;
            }
            for (int64_t r = 0; r < mr; r++) roff[r] = fa_row_off(lay, i + r);
            for (int64_t qi = q0; qi < q1; qi++) {
                int64_t q = qlist ? qlist[qi] : qi;
                const REAL *b = Wp + q * K * NR + k0 * NR;
                const REAL *bb = (first && bias) ? bias + q * NR : NULL;
                int64_t col = q * NR;
                int64_t nr = n_out - col < NR ? n_out - col : NR;
                int within = !lay->head_dim || col % lay->head_dim + NR <= lay->head_dim;
                if (nr == NR && within) {
                    FA(panel)(NR, kl, a, rs, ps, b, NR, Y + roff[0] + fa_col_off(lay, col), ldc,
                              !first, bb, mr, NULL);
                } else {
                    for (int64_t c = 0; c < nr; c++) coff[c] = fa_col_off(lay, col + c);
                    /* a partial panel, or one that straddles two heads: through
                     * the tile, then element by element to the real columns */
                    if (!first)
                        for (int64_t r = 0; r < mr; r++)
                            for (int64_t c = 0; c < nr; c++) tile[r * NR + c] = Y[roff[r] + coff[c]];
                    FA(panel)(NR, kl, a, rs, ps, b, NR, tile, NR, !first, bb, mr, NULL);
                    for (int64_t r = 0; r < mr; r++)
                        for (int64_t c = 0; c < nr; c++) Y[roff[r] + coff[c]] = tile[r * NR + c];
                }
            }
            i += mr;
        }
    }
}

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
    for (int64_t i = 0; i < rows; i++) {
        int64_t a = lo + i, b = hi + i;
        for (int64_t j = 0; j < cols; j++)
            if (j < a || j > b) S[i * s_is + j * s_js] = (REAL)-INFINITY;
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

/*
 * One step of the online softmax over a block of transposed scores ST
 * (nkeys rows, ncols query lanes, ncols a multiple of VLEN).  Per query lane:
 * new running max m, scores -> exp(score - m) in place, running sum l
 * rescaled and extended, and the accumulated output O^T (ev rows) rescaled.
 * A lane that has seen only -inf keeps m = -inf and l = 0 and contributes
 * zeros (shift 0 instead of -inf - -inf), so fully masked queries end as 0.
 * `bmax` (or NULL): the block's max per lane, already taken by the GEMM
 * that made the scores (FA(gemm)'s colmax), which saves a pass over ST.
 */
static void FA(online_softmax)(REAL *restrict ST, int64_t lds, int64_t nkeys, int64_t ncols,
                               REAL *restrict m, REAL *restrict l, REAL *restrict OT,
                               int64_t ldo, int64_t ev, const REAL *restrict bmax) {
    const VEC ninf = FA(vsplat)((REAL)-INFINITY), zero = FA(vsplat)(0);
    for (int64_t c = 0; c < ncols; c += VLEN) {
        VEC mx = *(VEC *)(m + c);
        if (bmax) {
            mx = FA(vmax)(mx, *(const VEC *)(bmax + c));
        } else {
            /* four independent chains: one chain of dependent maxes would be
             * latency-bound (~2% of a tile's time) */
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
        VEC shift = FA(vselect)(mx == ninf, zero, mx);
        VEC corr = FA(vexp)(*(VEC *)(m + c) - shift);
        VEC sum = zero;
        for (int64_t j = 0; j < nkeys; j++) {
            VEC p = FA(vexp)(*(VEC *)(ST + j * lds + c) - shift);
            *(VEC *)(ST + j * lds + c) = p;
            sum += p;
        }
        *(VEC *)(l + c) = *(VEC *)(l + c) * corr + sum;
        /* once the running max has settled (most blocks), corr is all ones */
        IVEC moved = mx != *(VEC *)(m + c);
        *(VEC *)(m + c) = mx;
        if (FA(any)(moved))
            for (int64_t e = 0; e < ev; e++) *(VEC *)(OT + e * ldo + c) *= corr;
    }
}

/* ---- few queries (decoding): one query row at a time, vectorised along E ---- */

/* s[j] = sum_e q[e] * k[j * ks + e] for j < n. */
static void FA(dots)(REAL *restrict s, const REAL *restrict q, int64_t E,
                     const REAL *restrict k, int64_t ks, int64_t n) {
    typedef FA(uvec) UVEC;
    int64_t ev = E - E % VLEN;
    for (int64_t j = 0; j < n; j++) {
        const REAL *kj = k + j * ks;
        VEC acc = FA(vsplat)(0);
        for (int64_t e = 0; e < ev; e += VLEN) acc += *(const UVEC *)(q + e) * *(const UVEC *)(kj + e);
        REAL t = FA(hsum)(acc);
        for (int64_t e = ev; e < E; e++) t += q[e] * kj[e];
        s[j] = t;
    }
}

/*
 * Online-softmax step for one query row over n scores (s padded with -inf to
 * n_pad, a multiple of VLEN): s -> exp(s - shift), running max m and sum l
 * updated, accumulated output o (ev_pad entries) rescaled.  As in the tiled
 * path, a row with only -inf so far uses shift 0 and stays at zero.
 */
static void FA(row_update)(REAL *restrict s, int64_t n_pad, REAL *restrict m, REAL *restrict l,
                           REAL *restrict o, int64_t ev_pad) {
    VEC vm = FA(vsplat)((REAL)-INFINITY);
    for (int64_t c = 0; c < n_pad; c += VLEN) vm = FA(vmax)(vm, *(const VEC *)(s + c));
    REAL mx = FA(hmax)(vm);
    mx = FA(smax)(*m, mx) ;
    REAL shift = mx == (REAL)-INFINITY ? 0 : mx;
    VEC sh = FA(vsplat)(shift), sum = FA(vsplat)(0);
    for (int64_t c = 0; c < n_pad; c += VLEN) {
        VEC p = FA(vexp)(*(VEC *)(s + c) - sh);
        *(VEC *)(s + c) = p;
        sum += p;
    }
    if (mx != *m) {
        VEC corr = FA(vexp)(FA(vsplat)(*m - shift));
        *l *= corr[0];
        for (int64_t c = 0; c < ev_pad; c += VLEN) *(VEC *)(o + c) *= corr;
    }
    *l += FA(hsum)(sum);
    *m = mx;
}

/* o[0:ev] += sum_j p[j] * v[j * vs + 0:ev]; o is padded to whole vectors. */
static void FA(accum_rows)(REAL *restrict o, int64_t ev, const REAL *restrict p, int64_t n,
                           const REAL *restrict v, int64_t vs) {
    typedef FA(uvec) UVEC;
    int64_t evv = ev - ev % VLEN;
    for (int64_t j = 0; j < n; j++) {
        REAL pj = p[j];
        if (pj == 0) continue; /* masked keys, and most keys far below the max */
        const REAL *vj = v + j * vs;
        for (int64_t c = 0; c < evv; c += VLEN) *(VEC *)(o + c) += pj * *(const UVEC *)(vj + c);
        for (int64_t c = evv; c < ev; c++) o[c] += pj * vj[c];
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

/* dst[0:n] += src[0:n].  The output accumulators take each block of keys as
 * a separately summed partial: a running sum fed one product at a time would
 * round once per key (error growing with the sequence length, ~Lk * eps at
 * worst); block by block it grows with block_k + Lk / block_k. */
static void FA(add_into)(REAL *restrict dst, const REAL *restrict src, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] += src[i];
}

/* Merges the partial results of key splits of one query row: each part is
 * (m, l, o[0:ev]) over its keys; out = sum_s o_s e^(m_s - m) / sum_s l_s e^(m_s - m). */
static void FA(merge_splits)(REAL *restrict out, int64_t ev, const REAL *restrict parts,
                             int64_t stride, int64_t n) {
    REAL m = (REAL)-INFINITY;
    for (int64_t s = 0; s < n; s++) m = FA(smax)(parts[s * stride], m);
    REAL shift = m == (REAL)-INFINITY ? 0 : m, l = 0;
    for (int64_t c = 0; c < ev; c++) out[c] = 0;
    for (int64_t s = 0; s < n; s++) {
        const REAL *p = parts + s * stride;
        REAL w = p[1] == 0 ? 0 : (REAL)exp((double)(p[0] - shift));
        l += w * p[1];
        for (int64_t c = 0; c < ev; c++) out[c] += w * p[2 + c];
    }
    if (l == 0) {
        for (int64_t c = 0; c < ev; c++) out[c] = 0;
    } else {
        REAL inv = (REAL)1 / l;
        for (int64_t c = 0; c < ev; c++) out[c] *= inv;
    }
}

/* out[i * ors + e] = O^T[e][i] / l[i] for i < rows, e < ev; a query with
 * l == 0 (nothing attended) gets 0, and a NaN in l reaches the output. */
static void FA(finalize)(const REAL *restrict OT, int64_t ldo, const REAL *restrict l,
                         int64_t rows, int64_t ev, REAL *restrict out, int64_t ors) {
    int64_t rv = FA_BLOCK_TRANSPOSE ? rows - rows % VLEN : 0, cv = ev - ev % VLEN;
#if FA_BLOCK_TRANSPOSE
    typedef FA(uvec) UVEC;
    VEC blk[VLEN];
    for (int64_t i0 = 0; i0 < rv; i0 += VLEN) {
        VEC inv;
        for (int64_t c = 0; c < VLEN; c++) inv[c] = l[i0 + c] == 0 ? 0 : (REAL)1 / l[i0 + c];
        for (int64_t e0 = 0; e0 < cv; e0 += VLEN) {
#pragma GCC unroll 16
            for (int64_t c = 0; c < VLEN; c++) blk[c] = *(const VEC *)(OT + (e0 + c) * ldo + i0) * inv;
            FA(transpose_block)(blk);
#pragma GCC unroll 16
            for (int64_t r = 0; r < VLEN; r++) *(UVEC *)(out + (i0 + r) * ors + e0) = blk[r];
        }
    }
#endif
    for (int64_t i = 0; i < rows; i++) {
        REAL *d = out + i * ors;
        /* a query that saw no key is 0 (not 0 * an inf or NaN value) */
        int64_t e = (i < rv && l[i] != 0) ? cv : 0;
        if (l[i] == 0) {
            for (; e < ev; e++) d[e] = 0;
        } else {
            REAL inv = (REAL)1 / l[i];
            for (; e < ev; e++) d[e] = OT[e * ldo + i] * inv;
        }
    }
}

/* dst(r, c) = src(r, c) through strides, r < rows, c < cols. */
static void FA(copy_strided)(REAL *restrict dst, int64_t d_rs, int64_t d_cs,
                             const REAL *restrict src, int64_t s_rs, int64_t s_cs, int64_t rows,
                             int64_t cols) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) dst[r * d_rs + c * d_cs] = src[r * s_rs + c * s_cs];
}

/* Full softmax of `rows` rows of length n (any stride, any alignment), in
 * place.  Rows that are entirely -inf become zeros. */
static void FA(softmax_rows)(REAL *restrict W, int64_t ldw, int64_t rows, int64_t n) {
    int64_t nv = n - n % VLEN;
    for (int64_t r = 0; r < rows; r++) {
        REAL *w = W + r * ldw;
        VEC vm = FA(vsplat)((REAL)-INFINITY);
        for (int64_t c = 0; c < nv; c += VLEN) vm = FA(vmax)(vm, *(const FA(uvec) *)(w + c));
        REAL mx = FA(hmax)(vm);
        for (int64_t c = nv; c < n; c++) mx = FA(smax)(w[c], mx);
        if (mx == (REAL)-INFINITY) {
            /* nothing to attend, unless the fast max dropped a NaN */
            REAL fill = 0;
            for (int64_t c = 0; c < n; c++)
                if (w[c] != w[c]) fill = w[c];
            for (int64_t c = 0; c < n; c++) w[c] = fill;
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
