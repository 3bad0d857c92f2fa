/*
 * Products for one element type: the register-tiled GEMM micro-kernel that
 * makes the attention tile's scores and output, the packing of Q for it, the
 * few-query row path's matrix-vector products, and the projections
 * (Y = X W^T + b over weights packed once per weight change).
 * No include guard: included once per element type (fa_kernels_impl.h).
 */

/* dst[e][i] = scale * src[i * srs + e]: the query block, transposed and
 * scaled once per tile; columns i >= rows (up to ldd) are zero. */
static void FA(pack_qt)(REAL *restrict dst, int64_t ldd, const REAL *restrict src, int64_t srs,
                        int64_t rows, int64_t cols, REAL scale) {
    for (int64_t e = 0; e < cols; e++)
        for (int64_t i = rows; i < ldd; i++) dst[e * ldd + i] = 0;
    int64_t rv = FA_BLOCK_TRANSPOSE ? rows - rows % VLEN : 0, cv = cols - cols % VLEN;
#if FA_BLOCK_TRANSPOSE
    VEC blk[VLEN];
    for (int64_t i0 = 0; i0 < rv; i0 += VLEN)
        for (int64_t e0 = 0; e0 < cv; e0 += VLEN) {
            FA(load_transposed)(blk, src + i0 * srs + e0, srs);
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
 * (rows < mr), while they are still in registers.  cap > 0: the results are
 * soft-capped (FA(vcap)) before they are stored and their max taken.
 */
static inline void FA(panel)(int64_t N, int64_t K, const REAL *restrict A, int64_t rs,
                             int64_t ps, const REAL *restrict B, int64_t ldb,
                             REAL *restrict C, int64_t ldc, int accumulate,
                             const REAL *restrict bias, int64_t mr, REAL *restrict colmax,
                             REAL cap) {
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
        if (cap > 0) {
            const VEC inv = FA(vsplat)((REAL)1 / cap), c = FA(vsplat)(cap);
            IVEC some = (IVEC){0}, every = ~(IVEC){0};
            for (int r = 0; r < FA_MR; r++)
                for (int v = 0; v < FA_NV; v++) FA(cap_span)(acc[r][v], inv, &some, &every);
            int side = FA(cap_side)(some, every);
            for (int r = 0; r < FA_MR; r++)
                for (int v = 0; v < FA_NV; v++) acc[r][v] = FA(vcap)(acc[r][v], inv, c, side);
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
 * (aligned, or NULL) and cap: see FA(panel).
 */
static void FA(gemm)(int64_t M, int64_t N, int64_t K, const REAL *restrict A, int64_t rs,
                     int64_t ps, const REAL *restrict B, int64_t ldb, REAL *restrict C,
                     int64_t ldc, int accumulate, REAL *restrict tail, REAL *restrict colmax,
                     REAL cap) {
    int64_t i = 0;
    if (rs == 1) {
        for (; i + FA_MR <= M; i += FA_MR)
            FA(panel)(N, K, A + i, 1, ps, B, ldb, C + i * ldc, ldc, accumulate, NULL, FA_MR,
                      colmax, cap);
    } else if (ps == 1) {
        for (; i + FA_MR <= M; i += FA_MR)
            FA(panel)(N, K, A + i * rs, rs, 1, B, ldb, C + i * ldc, ldc, accumulate, NULL, FA_MR,
                      colmax, cap);
    } else {
        for (; i + FA_MR <= M; i += FA_MR)
            FA(panel)(N, K, A + i * rs, rs, ps, B, ldb, C + i * ldc, ldc, accumulate, NULL, FA_MR,
                      colmax, cap);
    }
    if (i < M) {
        int64_t mr = M - i;
        for (int64_t p = 0; p < K; p++)
            for (int64_t r = 0; r < FA_MR; r++)
                tail[p * FA_MR + r] = r < mr ? A[(i + r) * rs + p * ps] : 0;
        FA(panel)(N, K, tail, 1, FA_MR, B, ldb, C + i * ldc, ldc, accumulate, NULL, mr, colmax,
                  cap);
    }
}

/* ---- few queries (decoding): one query row at a time, vectorised along E ---- */

/* s[j] = sum_e q[e] * k[j * ks + e] for j < n. */
static void FA(dots)(REAL *restrict s, const REAL *restrict q, int64_t E,
                     const REAL *restrict k, int64_t ks, int64_t n) {
    typedef FA(uvec) UVEC;
    int64_t ev = E - E % VLEN, j = 0;
#if FA_BLOCK_TRANSPOSE
    /* VLEN keys at a time.  Each key's lane products are summed as below;
     * their horizontal sums, transposed, then add up lane-wise in the order
     * FA(hsum) adds one vector's lanes (from 0, lane 0 first), so every score
     * keeps its bits while VLEN horizontal sums share one transpose instead
     * of extracting lanes one by one. */
    VEC blk[VLEN];
    for (; j + VLEN <= n; j += VLEN) {
        for (int64_t r = 0; r < VLEN; r++) {
            const REAL *kj = k + (j + r) * ks;
            VEC acc = FA(vsplat)(0);
            for (int64_t e = 0; e < ev; e += VLEN) acc += *(const UVEC *)(q + e) * *(const UVEC *)(kj + e);
            blk[r] = acc;
        }
        FA(transpose_block)(blk);
        VEC t = FA(vsplat)(0);
#pragma GCC unroll 16
        for (int64_t c = 0; c < VLEN; c++) t += blk[c];
        for (int64_t r = 0; r < VLEN; r++) {
            const REAL *kj = k + (j + r) * ks;
            REAL tr = t[r];
            for (int64_t e = ev; e < E; e++) tr += q[e] * kj[e];
            s[j + r] = tr;
        }
    }
#endif
    for (; j < n; j++) {
        const REAL *kj = k + j * ks;
        VEC acc = FA(vsplat)(0);
        for (int64_t e = 0; e < ev; e += VLEN) acc += *(const UVEC *)(q + e) * *(const UVEC *)(kj + e);
        REAL t = FA(hsum)(acc);
        for (int64_t e = ev; e < E; e++) t += q[e] * kj[e];
        s[j] = t;
    }
}

/* o[0:ev] += sum_j p[j] * v[j * vs + 0:ev]; o is padded to whole vectors. */
static void FA(accum_rows)(REAL *restrict o, int64_t ev, const REAL *restrict p, int64_t n,
                           const REAL *restrict v, int64_t vs) {
    typedef FA(uvec) UVEC;
    int64_t evv = ev - ev % VLEN;
    /* Four vectors of o at a time stay in registers over every key: a loop
     * over E inside the loop over keys would load and store o once per key,
     * each key's FMAs waiting on the last key's stores.  Each element still
     * takes the keys one after another, as before. */
    for (int64_t c0 = 0; c0 < evv; c0 += 4 * VLEN) {
        int64_t nv = (evv - c0) / VLEN < 4 ? (evv - c0) / VLEN : 4;
        VEC acc[4];
        for (int64_t u = 0; u < 4; u++) acc[u] = u < nv ? *(VEC *)(o + c0 + u * VLEN) : FA(vsplat)(0);
        for (int64_t j = 0; j < n; j++) {
            REAL pj = p[j];
            if (pj == 0) continue; /* masked keys, and most keys far below the max */
            const REAL *vj = v + j * vs + c0;
#pragma GCC unroll 4
            for (int64_t u = 0; u < 4; u++)
                if (u < nv) acc[u] += pj * *(const UVEC *)(vj + u * VLEN);
        }
        for (int64_t u = 0; u < nv; u++) *(VEC *)(o + c0 + u * VLEN) = acc[u];
    }
    for (int64_t j = 0; j < n; j++) {
        REAL pj = p[j];
        if (pj == 0) continue;
        const REAL *vj = v + j * vs;
        for (int64_t c = evv; c < ev; c++) o[c] += pj * vj[c];
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

/* Rotary embedding of a finished tile: rows row0 .. row0+rows of the
 * projection (ldt apart), columns col0 .. col0+nc (contiguous), as fa_rotary
 * describes.  Pairs never straddle the tile: heads have an even width and
 * tiles start on even columns.  A table row is laid out so that a vector of
 * pairs turns with two products and a lane swap: x * cc + swap(x) * ss. */
static void FA(rotate_tile)(REAL *restrict t, int64_t ldt, int64_t rows, int64_t row0,
                            int64_t col0, int64_t nc, const fa_rotary *rot) {
#if FA_BLOCK_TRANSPOSE
    typedef FA(uvec) UVEC;
    static const IREAL iota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    IVEC swap;
    memcpy(&swap, iota, sizeof swap);
    swap ^= 1; /* lane 2f <-> lane 2f + 1 */
#endif
    const REAL *table = (const REAL *)rot->table;
    int64_t end = col0 + nc < rot->cols ? col0 + nc : rot->cols;
    /* run by run of rotated columns (one per head the tile meets), each over
     * every row: the division that finds a column's place in its head is
     * done once per run, not once per row, where it would cost more than
     * the rotation */
    for (int64_t c = col0, e = col0 % rot->head_dim; c < end; c += rot->head_dim - e, e = 0) {
        if (e >= rot->rot_dim)
            continue; /* the head's unrotated rest */
        int64_t run = rot->rot_dim - e < end - c ? rot->rot_dim - e : end - c;
        for (int64_t r = 0; r < rows; r++) {
            const REAL *cc = table + rot->pos[row0 + r] * 2 * rot->rot_dim + e;
            const REAL *ss = cc + rot->rot_dim;
            REAL *x = t + r * ldt + (c - col0);
            int64_t j = 0;
#if FA_BLOCK_TRANSPOSE /* (the lane swap needs GCC's __builtin_shuffle, see fa_simd.h) */
            for (; j + VLEN <= run; j += VLEN) {
                VEC v = *(UVEC *)(x + j);
                *(UVEC *)(x + j) = v * *(const UVEC *)(cc + j) +
                                   __builtin_shuffle(v, swap) * *(const UVEC *)(ss + j);
            }
#endif
            for (; j < run; j += 2) {
                REAL a = x[j], b = x[j + 1];
                x[j] = a * cc[j] + b * ss[j];
                x[j + 1] = b * cc[j + 1] + a * ss[j + 1];
            }
        }
    }
}

/*
 * Rows [m0, m1) x output panels [q0, q1) of Y = X Wp^T (+ bias): the unit of
 * work one thread takes.  With `qlist`, the panels are qlist[q0 .. q1)
 * instead (a head's Q, K and V columns, which are not adjacent).  K is walked
 * in chunks of kc so that a panel of Wp (kc x NR) and the FA_MR rows of X it
 * meets stay in L1.  `scratch` holds
 * FA_MR * kc elements (a tail of rows, zero-padded) plus one FA_MR x NR tile
 * (a tail of output features); it must be FA_ALIGN-aligned.
 *
 * Half-precision storage (float instantiation only; see fa_half.h): X of
 * storage xstore is converted to float as its rows are packed, Y of storage
 * ystore is rounded as the tile is written (the caller then takes K whole:
 * a chunk's partial sums are not kept in 16 bits).  With `pairs` (builds
 * with VDPBF16PS), Wp holds bfloat16 pairs (fa_pack_weight_pairs), the rows
 * are packed in pairs and the panels multiply by fa_panel_pairs (fa_half.h).
 */
static void FA(linear_block)(const REAL *restrict X, int64_t ldx, int64_t m0, int64_t m1,
                             int64_t K, const REAL *restrict Wp, const REAL *restrict bias,
                             int64_t n_out, int64_t q0, int64_t q1, REAL *restrict Y,
                             const fa_out_layout *lay, int64_t kc, REAL *restrict scratch,
                             const int64_t *restrict qlist, int xstore, int ystore, int pairs,
                             const fa_rotary *rot) {
    REAL *tile = scratch;               /* FA_MR x NR, aligned */
    REAL *rows_tail = scratch + FA_MR * NR;
    /* a panel of rows is written with one row stride: in the head-major
     * layout that holds within one batch entry, so panels stop at its end */
    int64_t seg = lay->head_dim ? lay->seq_len : INT64_MAX;
    int64_t ldc = lay->head_dim ? lay->head_dim : lay->ldy;
    int64_t roff[FA_MR], coff[NR];
    int64_t kp_all = (K + 1) / 2; /* pair rows of a weight panel */
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
        int64_t kl = K - k0 < kc ? K - k0 : kc;
        int first = k0 == 0;
        for (int64_t i = m0; i < m1; ) {
            int64_t mr = m1 - i < FA_MR ? m1 - i : FA_MR;
            if (seg - i % seg < mr) mr = seg - i % seg;
            const REAL *a = X + i * ldx + k0;
            int64_t rs = ldx, ps = 1;
            /* the rows as fa_panel_pairs reads them: 16-bit elements, rows
             * ars apart, pair p at element 2 * p */
            const uint16_t *apairs = (const uint16_t *)rows_tail;
            int64_t ars = 0;
            if (pairs && mr == FA_MR && xstore == FA_STORE_BF16 && ldx % 2 == 0 && K % 2 == 0) {
                /* bfloat16 rows of even length are pairs already: read in place */
                apairs = (const uint16_t *)X + i * ldx + k0;
                ars = ldx;
            } else if (pairs) {
                /* rows in bfloat16 pairs, one packed row after another */
                uint32_t *w = (uint32_t *)rows_tail;
                int64_t kpl = (kl + 1) / 2;
                for (int64_t r = 0; r < FA_MR; r++) {
                    if (r < mr)
                        fa_row_to_pairs(w + r * kpl,
                                        (const char *)X + ((i + r) * ldx + k0) * (xstore ? 2 : sizeof(REAL)),
                                        xstore, kl);
                    else
                        memset(w + r * kpl, 0, (size_t)kpl * 4);
                }
                ars = 2 * kpl;
            } else if (xstore) {
                /* 16-bit rows widened, one after another (rows past mr zero) */
                fa_half_to_f32((float *)rows_tail, kl, (const uint16_t *)X + i * ldx + k0, ldx, mr,
                               kl, xstore);
                memset(rows_tail + mr * kl, 0, (size_t)((FA_MR - mr) * kl) * sizeof(REAL));
                a = rows_tail;
                rs = kl;
                ps = 1;
            } else if (mr < FA_MR) {
                for (int64_t p = 0; p < kl; p++)
                    for (int64_t r = 0; r < FA_MR; r++)
                        rows_tail[p * FA_MR + r] = r < mr ? a[r * ldx + p] : 0;
                a = rows_tail;
                rs = 1;
                ps = FA_MR;
            }
            (void)apairs, (void)ars;
            for (int64_t r = 0; r < mr; r++) roff[r] = fa_row_off(lay, i + r);
            for (int64_t qi = q0; qi < q1; qi++) {
                int64_t q = qlist ? qlist[qi] : qi;
                const REAL *b = Wp + q * K * NR + k0 * NR;
                const REAL *bb = (first && bias) ? bias + q * NR : NULL;
                int64_t col = q * NR;
                int64_t nr = n_out - col < NR ? n_out - col : NR;
                int within = !lay->head_dim || col % lay->head_dim + NR <= lay->head_dim;
                REAL *dst;
                int64_t ldd;
                int direct = nr == NR && within && !ystore;
                if (direct) {
                    dst = Y + roff[0] + fa_col_off(lay, col);
                    ldd = ldc;
                } else {
                    for (int64_t c = 0; c < nr; c++) coff[c] = fa_col_off(lay, col + c);
                    /* a partial panel, one that straddles two heads, or a
                     * 16-bit Y: through the tile, then element by element to
                     * the real columns */
                    if (!first)
                        for (int64_t r = 0; r < mr; r++)
                            for (int64_t c = 0; c < nr; c++) tile[r * NR + c] = Y[roff[r] + coff[c]];
                    dst = tile;
                    ldd = NR;
                }
#if FA_HAS_DPBF16
                if (pairs) {
                    const uint32_t *bw = (const uint32_t *)Wp + (q * kp_all + k0 / 2) * FA_PAIR_NR;
                    fa_panel_pairs((kl + 1) / 2, apairs, ars, 1, bw, FA_PAIR_NR, (float *)dst, ldd,
                                   !first, (const float *)bb, mr, NULL, 1.0f);
                } else
#endif
                    FA(panel)(NR, kl, a, rs, ps, b, NR, dst, ldd, !first, bb, mr, NULL, 0);
                /* the epilogue: a finished tile of Q or K columns is rotated
                 * while it is in L1, never in a pass of its own */
                if (rot && rot->table && col < rot->cols && k0 + kl >= K)
                    FA(rotate_tile)(dst, ldd, mr, i, col, nr, rot);
                if (!direct) {
                    if (ystore && nr == NR && within)
                        /* a whole panel: each row's NR columns are adjacent */
                        for (int64_t r = 0; r < mr; r++)
                            fa_f32_to_half((uint16_t *)Y + roff[r] + coff[0], 0, (const float *)tile + r * NR,
                                           0, 1, NR, ystore);
                    else if (ystore)
                        for (int64_t r = 0; r < mr; r++)
                            for (int64_t c = 0; c < nr; c++) {
                                float t = (float)tile[r * NR + c];
                                ((uint16_t *)Y)[roff[r] + coff[c]] =
                                    ystore == FA_STORE_BF16 ? fa_f32_to_bf16(t) : fa_f32_to_f16(t);
                            }
                    else
                        for (int64_t r = 0; r < mr; r++)
                            for (int64_t c = 0; c < nr; c++) Y[roff[r] + coff[c]] = tile[r * NR + c];
                }
            }
            i += mr;
        }
    }
    (void)kp_all;
}
