# The attention work items, compiled per instruction set: the walk over key
# blocks of one query tile (_tile), the row-by-row walk for a few queries
# (_row_tile) and the merge of its key splits (_merge_row), with the masks
# they apply.  The driver (_problem.pxi) sets up the Problem they read and
# runs them as a team through the table.


cdef bint _scores_block(const Problem* P, floating* ST, const floating* QT, const floating* kb,
                        int64_t ks, floating* tail, int64_t b, int64_t h, int64_t i0,
                        int64_t rows, int64_t j0, int64_t bk, floating* bmax) noexcept nogil:
    """Scaled, masked scores of one query block against keys j0 .. j0+bk, transposed.

    kb: key j0's row (rows ks elements apart).

    ST[j][i] (key j, query lane i) for j < bk; -inf wherever the key may not
    be attended.  Lanes past `rows` hold harmless zeros.  Where no mask
    touches the block and bmax is given, the GEMM also leaves each lane's max
    in bmax[0:lanes] and this returns True.
    """
    cdef int64_t L = P.lanes, r
    cdef bint clean = bmax != NULL and not _block_masked(P, i0, rows, j0, bk)
    if clean:
        for r in range(L):
            bmax[r] = -INFINITY
    # soft-capped as the GEMM makes them, before the masks
    _gemm(bk, L, P.dim, kb, ks, 1, QT, L, ST, L, 0, tail,
          bmax if clean else <floating*>NULL, <floating>P.softcap)
    # masks index (query i, key j), which sits at ST[i * 1 + j * L]
    # scores of the block as the GEMM left them: one pass tells whether a
    # float mask must take the exact (slower) route
    _mask_scores(P, ST, L, 1, b, h, i0, rows, j0, bk,
                 P.has_fmask and not _all_finite(ST, L, bk, L))
    return clean


cdef inline void _cap_scores(const Problem* P, floating* S, int64_t n,
                             floating* bmax) noexcept nogil:
    """Soft-capping of n scores (a multiple of the vector width) that no GEMM
    capped, and of the block max the GEMM took, where one was taken (tanh is
    increasing: the capped max is the max of the capped scores)."""
    if P.softcap != 0:
        _softcap(S, n, <floating>P.softcap)
        if bmax != NULL:
            _softcap(bmax, P.lanes, <floating>P.softcap)


cdef inline void _start_rows(const Problem* P, int64_t h, floating* m, floating* l,
                             int64_t n, bint sink) noexcept nogil:
    """The online softmax's state before any key: nothing seen (m = -inf,
    l = 0), or, with an attention sink, its logit seen once with a zero value
    (m = sink, l = 1), which puts exp(sink) in the denominator at no cost
    per key."""
    cdef floating s = -INFINITY
    cdef int64_t r
    if sink and P.sinks != NULL:
        s = <floating>P.sinks[h]
    for r in range(n):
        m[r] = s
        l[r] = 0 if s == -INFINITY else 1


cdef inline void _store_lse(const Problem* P, int64_t bh, int64_t i0, const floating* m,
                            const floating* l, int64_t rows) noexcept nogil:
    """Each row's log-sum-exp, from its running max and sum (l NULL: m holds
    the log-sum-exp itself), where asked for."""
    cdef floating* lse
    cdef int64_t r
    if P.lse != NULL:
        lse = (<floating*>P.lse) + bh * P.lse_s_head + i0
        for r in range(rows):
            lse[r] = m[r] if l == NULL else _lse_of(m[r], l[r])


cdef inline bint _band_cuts(const Problem* P, int64_t i0, int64_t rows, int64_t j0,
                            int64_t bk, int64_t* lo, int64_t* hi) noexcept nogil:
    """Whether the band (causal or window) leaves out some key of this block for
    some row; lo/hi get the band of the block's first row, in block columns."""
    lo[0] = i0 + P.causal_offset - P.band_left - j0
    hi[0] = i0 + P.causal_offset + P.band_right - j0
    return P.has_band and (lo[0] + rows - 1 > 0 or hi[0] < bk - 1)


cdef inline bint _block_masked(const Problem* P, int64_t i0, int64_t rows, int64_t j0,
                               int64_t bk) noexcept nogil:
    """Whether _mask_scores would change any score of this block (a mask kind
    added there must be added here, or the block max taken before it is stale)."""
    cdef int64_t lo, hi
    return (P.has_fmask or P.has_bmask1 or P.has_bmask2 or P.slopes != NULL
            or _band_cuts(P, i0, rows, j0, bk, &lo, &hi))


cdef void _mask_scores(const Problem* P, floating* S, int64_t s_js, int64_t s_is, int64_t b,
                       int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t bk,
                       bint exact) noexcept nogil:
    """Applies every mask to scores S(i, j) = S[i * s_is + j * s_js] of queries
    i0 .. i0+rows against keys j0 .. j0+bk: -inf where a key may not be
    attended.  exact: some score may be NaN or inf (see fa_mask_add)."""
    cdef int64_t isz = sizeof(floating)
    if P.has_fmask:
        _mask_add(S, s_is, s_js, rows, bk, <const floating*>_at(&P.fmask, b, h, i0, j0, isz),
                  P.fmask.s_row, P.fmask.s_col, exact)
    if P.has_bmask1:
        _mask_bool(S, s_is, s_js, rows, bk, <const uint8_t*>_at(&P.bmask1, b, h, i0, j0, 1),
                   P.bmask1.s_row, P.bmask1.s_col)
    if P.has_bmask2:
        _mask_bool(S, s_is, s_js, rows, bk, <const uint8_t*>_at(&P.bmask2, b, h, i0, j0, 1),
                   P.bmask2.s_row, P.bmask2.s_col)
    if P.slopes != NULL:
        _add_alibi(S, s_is, s_js, rows, bk, <floating>P.slopes[h], j0 - i0 - P.causal_offset)
    # Only blocks that reach outside some row's band need the cut.
    cdef int64_t lo, hi
    if _band_cuts(P, i0, rows, j0, bk, &lo, &hi):
        _mask_band(S, s_is, s_js, rows, bk, lo, hi)


cdef inline void _key_range(const Problem* P, int64_t i0, int64_t rows, int64_t* lo,
                            int64_t* hi) noexcept nogil:
    """Keys [lo, hi) that some query of i0 .. i0+rows may attend (empty: lo >= hi)."""
    lo[0] = 0
    hi[0] = P.len_k
    if P.has_band:
        lo[0] = max(<int64_t>0, i0 + P.causal_offset - P.band_left)
        hi[0] = min(P.len_k, i0 + rows - 1 + P.causal_offset + P.band_right + 1)


cdef inline bint _attended(const Problem* P, int64_t b, int64_t h, int64_t i, int64_t j,
                           const floating* tag) noexcept nogil:
    """Whether query i may attend key j under every mask (the rule _mask_scores
    applies, asked for one pair)."""
    cdef int64_t pos = i + P.causal_offset
    if P.has_band and (j < pos - P.band_left or j > pos + P.band_right):
        return False
    if P.has_bmask1 and (<const uint8_t*>_at(&P.bmask1, b, h, i, j, 1))[0] == 0:
        return False
    if P.has_bmask2 and (<const uint8_t*>_at(&P.bmask2, b, h, i, j, 1))[0] == 0:
        return False
    if P.has_fmask and (<const floating*>_at(&P.fmask, b, h, i, j, sizeof(floating)))[0] == -INFINITY:
        return False
    return True


cdef void _accumulate_rows(const Problem* P, const floating* v, int64_t vs, int64_t n,
                           const floating* ST,
                           int64_t L, floating* T, floating* tail, bint accumulate, int64_t b,
                           int64_t h, int64_t i0, int64_t rows, int64_t j0) noexcept nogil:
    """T (+)= V_block^T P^T where some key of the block holds a NaN or an inf and
    some query may not attend it: P is 0 there, but 0 * NaN in the GEMM would
    reach every query of the tile.  The finite runs of keys go through the
    GEMM; each non-finite key is added only to the queries that attend it."""
    cdef int64_t start = 0, j, i, e
    cdef const floating* vj
    cdef floating p
    if not accumulate:
        memset(T, 0, P.dim_v * L * sizeof(floating))
    while start < n:
        j = _nonfinite_row(v, vs, start, n, P.dim_v)
        if j > start:
            _gemm(P.dim_v, L, j - start, v + start * vs, 1, vs, ST + start * L,
                  L, T, L, 1, tail, <floating*>NULL, 0)
        if j == n:
            break
        vj = v + j * vs
        for i in range(rows):
            if _attended(P, b, h, i0 + i, j0 + j, vj):
                p = ST[j * L + i]
                for e in range(P.dim_v):
                    T[e * L + i] += p * vj[e]
        start = j + 1


cdef inline void _accumulate_block(const Problem* P, const floating* v, int64_t vs, int64_t bk,
                                   const floating* ST, int64_t L, floating* OT, floating* OB,
                                   floating* tail, bint first, bint masked, int64_t b,
                                   int64_t h, int64_t i0, int64_t rows,
                                   int64_t j0) noexcept nogil:
    """O^T += V_block^T P^T: the first block straight into O^T (still zero),
    later ones summed apart in OB and then added (see fa_add_into).  In a
    block that a mask touches, a key holding a NaN or an inf goes only to the
    queries that attend it (masked keys never affect the output)."""
    cdef floating* T = OT if first else OB
    if masked and not _all_finite(v, vs, bk, P.dim_v):
        _accumulate_rows(P, v, vs, bk, ST, L, T, tail, first, b, h, i0, rows, j0)
    else:
        _gemm(P.dim_v, L, bk, v, 1, vs, ST, L, T, L, first, tail, <floating*>NULL, 0)
    if not first:
        _add_into(OT, OB, P.dim_v * L)


cdef inline const floating* _block(const Problem* P, const Operand* op, int store, int64_t b,
                                   int64_t hk, int64_t j0, int64_t n, int64_t cols,
                                   floating* half, int64_t* stride) noexcept nogil:
    """Rows j0 .. j0+n of a K or V head as the products read them: in place, or,
    from 16-bit storage, widened into `half` (rows `cols` apart)."""
    cdef int64_t isz = sizeof(floating)
    if store == STORE_SAME:
        stride[0] = op.s_row
        return <const floating*>_at(op, b, hk, j0, 0, isz)
    stride[0] = cols
    fa_half_to_f32(<float*><void*>half, cols, _at(op, b, hk, j0, 0, 2), op.s_row, n, cols, store)
    return half


cdef inline void _store_rows(const Problem* P, floating* out, const floating* o, int64_t ldo,
                             int64_t rows, int64_t cols) noexcept nogil:
    """Finished float rows (ldo apart) rounded into 16-bit output rows."""
    fa_f32_to_half(<void*>out, P.out.s_row, <const float*><const void*>o, ldo, rows, cols,
                   P.q_store)


cdef void _tile(const Problem* P, int64_t work, floating* scratch) noexcept nogil:
    """One (batch, head, query block): the whole attention output of the block."""
    cdef int64_t isz = sizeof(floating)
    cdef int64_t bh = work // P.n_qblocks
    cdef int64_t b = bh // P.heads
    cdef int64_t h = bh % P.heads
    cdef int64_t hk = h // P.kv_group
    cdef int64_t i0 = (work % P.n_qblocks) * P.block_q
    cdef int64_t rows = min(P.block_q, P.len_q - i0)
    cdef int64_t L = P.lanes
    cdef int64_t j0, bk, j_start, j_end, r

    # regions as sized in _scratch_elems; each starts on a vector boundary
    cdef floating* QT = scratch                    # E x L: queries, transposed, scaled
    cdef floating* ST = QT + P.dim * L             # block_k x L: scores, then probabilities
    cdef floating* OT = ST + P.block_k * L         # Ev x L: output accumulator
    cdef floating* OB = OT + P.dim_v * L           # Ev x L: one key block's part of it
    cdef floating* m = OB + P.dim_v * L            # L: running max per query
    cdef floating* l = m + L                       # L: running sum per query
    cdef floating* bm = l + L                      # L: max per query of one key block
    cdef floating* tail = bm + L                   # gemm tail panel
    cdef floating* half = tail + P.tail_len        # 16-bit operands widened (half_len)
    cdef bint have_max
    cdef int64_t qsz = 2 if P.q_store else isz, ks, vs
    cdef const floating* kb
    cdef const floating* vb

    cdef floating* out = <floating*>_at(&P.out, b, h, i0, 0, qsz)
    cdef floating* W
    cdef const floating* q = <const floating*>_at(&P.q, b, h, i0, 0, qsz)
    cdef int64_t qs = P.q.s_row

    if P.q_store:
        fa_half_to_f32(<float*><void*>half, P.dim, <const void*>q, qs, rows, P.dim, P.q_store)
        q = half
        qs = P.dim
    _pack_qt(QT, L, q, qs, rows, P.dim, <floating>P.scale)
    memset(OT, 0, P.dim_v * L * isz)
    _start_rows(P, h, m, l, L, True)
    _key_range(P, i0, rows, &j_start, &j_end)

    if not P.has_weights:
        # Streaming: walk the keys once with a running max and sum per query;
        # blocks outside every row's band are never touched.
        j0 = j_start
        while j0 < j_end:
            bk = min(P.block_k, j_end - j0)
            kb = _block(P, &P.k, P.kv_store, b, hk, j0, bk, P.dim, half, &ks)
            have_max = _scores_block(P, ST, QT, kb, ks, tail, b, h, i0, rows, j0, bk, bm)
            _online_softmax(ST, L, bk, L, m, l, OT, L, P.dim_v,
                            bm if have_max else <floating*>NULL)
            # O^T += V_block^T P^T, V read in place (rows of V are E-contiguous)
            vb = _block(P, &P.v, P.kv_store, b, hk, j0, bk, P.dim_v, half, &vs)
            _accumulate_block(P, vb, vs, bk, ST, L, OT, OB, tail, j0 == j_start,
                              not have_max, b, h, i0, rows, j0)
            j0 += P.block_k
    else:
        # Weights requested: the scores of whole rows land in the caller's
        # buffer, are normalised there, then multiply V block by block.
        W = <floating*>_at(&P.weights, b, h, i0, 0, isz)
        j0 = 0
        while j0 < P.len_k:
            bk = min(P.block_k, P.len_k - j0)
            kb = _block(P, &P.k, P.kv_store, b, hk, j0, bk, P.dim, half, &ks)
            _scores_block(P, ST, QT, kb, ks, tail, b, h, i0, rows, j0, bk, NULL)
            _copy_strided(W + j0, P.len_k, 1, ST, 1, L, rows, bk)
            j0 += P.block_k
        # (m, free in this path, takes each row's log-sum-exp)
        _softmax_rows(W, P.len_k, rows, P.len_k,
                      <floating>P.sinks[h] if P.sinks != NULL else <floating>-INFINITY, m)
        memset(ST, 0, P.block_k * L * isz)  # lanes past `rows` stay zero
        j0 = j_start
        while j0 < j_end:
            bk = min(P.block_k, j_end - j0)
            _copy_strided(ST, 1, L, W + j0, P.len_k, 1, rows, bk)
            vb = _block(P, &P.v, P.kv_store, b, hk, j0, bk, P.dim_v, half, &vs)
            _accumulate_block(P, vb, vs, bk, ST, L, OT, OB, tail, j0 == j_start,
                              _block_masked(P, i0, rows, j0, bk), b, h, i0, rows, j0)
            j0 += P.block_k
        _store_lse(P, bh, i0, m, <floating*>NULL, rows)
        for r in range(rows):
            l[r] = 1
    if not P.has_weights:
        _store_lse(P, bh, i0, m, l, rows)
    if P.q_store:
        # finished rows through `half` (free now), then rounded
        _finalize(OT, L, l, rows, P.dim_v, half, P.dim_v)
        _store_rows(P, out, half, P.dim_v, rows, P.dim_v)
    else:
        _finalize(OT, L, l, rows, P.dim_v, out, P.out.s_row)


cdef void _tile_pairs(const Problem* P, int64_t work, floating* scratch) noexcept nogil:
    """_tile for bfloat16 q, k and v whose products run in pairs (VDPBF16PS, see
    fa_half.h): the same walk over key blocks, masks, online softmax and
    finish in float32; Q^T, V^T and P^T in pairs, K read in place.  Only
    float builds with pairs get here (the driver checks)."""
    cdef int64_t bh = work // P.n_qblocks
    cdef int64_t b = bh // P.heads
    cdef int64_t h = bh % P.heads
    cdef int64_t hk = h // P.kv_group
    cdef int64_t i0 = (work % P.n_qblocks) * P.block_q
    cdef int64_t rows = min(P.block_q, P.len_q - i0)
    cdef int64_t L = P.lanes
    cdef int64_t j0, bk, j_start, j_end, r, kp = (P.dim + 1) // 2
    # the regions of _tile (see _scratch_elems), as float
    cdef float* QT = <float*><void*>scratch
    cdef float* ST = QT + P.dim * L
    cdef float* OT = ST + P.block_k * L
    cdef float* OB = OT + P.dim_v * L
    cdef float* m = OB + P.dim_v * L
    cdef float* l = m + L
    cdef float* bm = l + L
    cdef float* tail = bm + L
    cdef float* half = tail + P.tail_len
    cdef uint32_t* QP = <uint32_t*>QT                      # ceil(E/2) x L: Q^T in pairs
    cdef uint32_t* VP = <uint32_t*>half                    # ceil(bk/2) x Ev: V^T in pairs
    cdef uint32_t* PP = VP + ((P.block_k + 1) // 2) * P.dim_v   # ceil(bk/2) x L: P^T
    cdef bint clean
    cdef const uint16_t* k = <const uint16_t*>_at(&P.k, b, hk, 0, 0, 2)
    cdef const uint16_t* v = <const uint16_t*>_at(&P.v, b, hk, 0, 0, 2)
    cdef const uint16_t* vb
    cdef void* out = _at(&P.out, b, h, i0, 0, 2)

    fa_pack_qt_pairs(QP, L, <const uint16_t*>_at(&P.q, b, h, i0, 0, 2), P.q.s_row, rows,
                     P.dim)
    memset(OT, 0, P.dim_v * L * sizeof(float))
    _start_rows(P, h, m, l, L, True)
    _key_range(P, i0, rows, &j_start, &j_end)
    j0 = j_start
    while j0 < j_end:
        bk = min(P.block_k, j_end - j0)
        clean = not _block_masked(P, i0, rows, j0, bk)
        if clean:
            for r in range(L):
                bm[r] = -INFINITY
        # the scale multiplies the float32 sums (the query stays as given)
        fa_gemm_pairs(bk, L, kp, k + j0 * P.k.s_row, P.k.s_row, 1, QP, L, ST, L, 0,
                      <uint32_t*>tail, bm if clean else <float*>NULL, <float>P.scale)
        _cap_scores(P, ST, bk * L, bm if clean else <float*>NULL)
        _mask_scores(P, ST, L, 1, b, h, i0, rows, j0, bk,
                     P.has_fmask and not _all_finite(ST, L, bk, L))
        _online_softmax(ST, L, bk, L, m, l, OT, L, P.dim_v, bm if clean else <float*>NULL)
        vb = v + j0 * P.v.s_row
        if not clean and not fa_bf16_all_finite(vb, P.v.s_row, bk, P.dim_v):
            # a NaN or inf value in a masked block: the float path keeps it
            # from the queries that may not attend it
            fa_half_to_f32(half, P.dim_v, vb, P.v.s_row, bk, P.dim_v, STORE_BF16)
            _accumulate_block(P, half, P.dim_v, bk, ST, L, OT, OB, tail, j0 == j_start, True,
                              b, h, i0, rows, j0)
        else:
            fa_pack_v_pairs(VP, vb, P.v.s_row, bk, P.dim_v)
            fa_pack_p_pairs(PP, L, ST, L, bk, L)
            fa_gemm_pairs(P.dim_v, L, (bk + 1) // 2, <const uint16_t*>VP, 2, P.dim_v, PP, L,
                          OT, L, 1, <uint32_t*>tail, <float*>NULL, 1.0)
        j0 += P.block_k
    _store_lse(P, bh, i0, m, l, rows)
    _finalize(OT, L, l, rows, P.dim_v, half, P.dim_v)
    fa_f32_to_half(out, P.out.s_row, half, P.dim_v, rows, P.dim_v, STORE_BF16)


cdef void _row_tile(const Problem* P, int64_t work, floating* scratch) noexcept nogil:
    """One (batch, head, key split) when there are only a few queries (decoding).

    Queries along vector lanes would leave most lanes empty; here each query
    row streams over the keys on its own, vectorised along E.  With several
    splits (split-K, so that one sequence still uses every core), each split
    leaves its (max, sum, unnormalised output) for _merge_row.
    """
    cdef int64_t isz = sizeof(floating)
    cdef int64_t split = work % P.n_splits
    cdef int64_t bh = work // P.n_splits
    cdef int64_t b = bh // P.heads
    cdef int64_t h = bh % P.heads
    cdef int64_t hk = h // P.kv_group
    cdef int64_t i, j0, j_first, bk, c, j_start, j_end, s0, s1, span
    cdef bint first
    cdef floating* s = scratch                  # keys_pad scores
    cdef floating* o = s + P.keys_pad           # dimv_pad accumulator
    cdef floating* ob = o + P.dimv_pad          # dimv_pad: one key block's part of it
    cdef floating* qs = ob + P.dimv_pad         # dim: the scaled query
    cdef int64_t qsz = 2 if P.q_store else isz
    cdef floating m, l
    cdef floating* acc
    cdef floating* part
    cdef const floating* q
    cdef floating* out
    span = (P.len_k + P.n_splits - 1) // P.n_splits
    s0 = split * span
    s1 = min(P.len_k, s0 + span)
    for i in range(P.len_q):
        q = <const floating*>_at(&P.q, b, h, i, 0, qsz)
        if P.q_store:
            for c in range(P.dim):
                qs[c] = <floating>P.scale * <floating>fa_load_any(<const void*>q, c, P.q_store)
        else:
            for c in range(P.dim):
                qs[c] = <floating>P.scale * q[c]
        memset(o, 0, P.dimv_pad * isz)
        # (one split holds the sink, or the merge would count it once per split)
        _start_rows(P, h, &m, &l, 1, split == 0)
        _key_range(P, i, 1, &j_start, &j_end)
        j0 = j_first = max(j_start, s0)
        j_end = min(j_end, s1)
        while j0 < j_end:
            bk = min(P.block_k, j_end - j0)
            if P.kv_store:
                fa_dots_half(<float*><void*>s, <const float*><void*>qs, P.dim,
                             <const uint16_t*>_at(&P.k, b, hk, j0, 0, 2), P.k.s_row, bk,
                             P.kv_store)
            else:
                _dots(s, qs, P.dim, <const floating*>_at(&P.k, b, hk, j0, 0, isz), P.k.s_row, bk)
            _cap_scores(P, s, P.keys_pad, <floating*>NULL)
            _mask_scores(P, s, 1, 0, b, h, i, 1, j0, bk, True)
            for c in range(bk, P.keys_pad):
                s[c] = -INFINITY
            # the first block straight into o, later ones summed apart in ob
            first = j0 == j_first
            acc = o if first else ob
            if not first:
                memset(ob, 0, P.dimv_pad * isz)
            _row_update(s, P.keys_pad, &m, &l, o, P.dimv_pad)
            if P.kv_store:
                fa_accum_rows_half(<float*><void*>acc, P.dim_v, <const float*><void*>s, bk,
                                   <const uint16_t*>_at(&P.v, b, hk, j0, 0, 2), P.v.s_row,
                                   P.kv_store)
            else:
                _accum_rows(acc, P.dim_v, s, bk, <const floating*>_at(&P.v, b, hk, j0, 0, isz),
                            P.v.s_row)
            if not first:
                _add_into(o, ob, P.dim_v)
            j0 += bk
        if P.n_splits > 1:
            part = (<floating*>P.parts) + ((bh * P.len_q + i) * P.n_splits + split) * P.parts_stride
            part[0] = m
            part[1] = l
            memcpy(part + 2, o, P.dim_v * isz)
            continue
        _store_lse(P, bh, i, &m, &l, 1)
        out = <floating*>_at(&P.out, b, h, i, 0, qsz)
        if P.q_store:
            _finalize(o, 1, &l, 1, P.dim_v, ob, 1)
            _store_rows(P, out, ob, P.dim_v, 1, P.dim_v)
        else:
            _finalize(o, 1, &l, 1, P.dim_v, out, P.out.s_row)


cdef void _merge_row(const Problem* P, int64_t row, floating* scratch) noexcept nogil:
    """Final output of one query row from its key splits (16-bit output
    through the thread's scratch)."""
    cdef int64_t isz = 2 if P.q_store else sizeof(floating)
    cdef int64_t bh = row // P.len_q
    cdef int64_t i = row % P.len_q
    cdef floating* out = <floating*>_at(&P.out, bh // P.heads, bh % P.heads, i, 0, isz)
    cdef const floating* parts = (<const floating*>P.parts) + row * P.n_splits * P.parts_stride
    cdef floating* lse = ((<floating*>P.lse) + bh * P.lse_s_head + i if P.lse != NULL
                          else <floating*>NULL)
    if P.q_store:
        _merge_splits(scratch, P.dim_v, parts, P.parts_stride, P.n_splits, lse)
        _store_rows(P, out, scratch, P.dim_v, 1, P.dim_v)
    else:
        _merge_splits(out, P.dim_v, parts, P.parts_stride, P.n_splits, lse)


cdef void _attention_item(const Problem* P, int64_t work, floating* scratch) noexcept nogil:
    """One work item of attention: a key split of a few query rows, or a query tile."""
    if P.row_mode:
        _row_tile(P, work, scratch)
    elif P.pairs:
        _tile_pairs(P, work, scratch)
    else:
        _tile(P, work, scratch)


cdef void _multi_attention_item(const MultiJob* J, int64_t w, floating* scratch) noexcept nogil:
    """Work item w of a team over many sequences: an item of one's Problem."""
    _attention_item(&J.problems[J.items[2 * w]], J.items[2 * w + 1], scratch)


cdef void _multi_merge_row(const MultiJob* J, int64_t w, floating* scratch) noexcept nogil:
    """The split-K merge of one query row of one sequence's Problem."""
    _merge_row(&J.problems[J.after[2 * w]], J.after[2 * w + 1], scratch)
