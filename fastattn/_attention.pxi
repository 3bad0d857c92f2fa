# The attention kernel: parallel skeleton and block walk.  Included by one
# small .pyx per instruction set (_kernels_baseline/_avx2/_avx512), so the same
# source is compiled with different -m flags; fastattn/_dispatch.py picks one.
#
# Contract with the caller (fastattn/functional.py, which validates): every
# array has the layout (*lead, heads, rows, cols) with the same lead shape,
# element strides (itemsize divides every stride), unit stride on the last
# axis of q, k, v and out, and weights C-contiguous.  Masks come as broadcast
# views of the full (*lead, H, Lq, Lk) shape (stride 0 where broadcast).

from cython.parallel cimport parallel, prange
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport free
from libc.string cimport memcpy, memset
from libc.math cimport INFINITY
cimport numpy as cnp
import numpy as np

cnp.import_array()

cdef extern from "fa_omp.h" nogil:
    int FA_OPENMP_ENABLED
    int omp_get_max_threads()
    int omp_get_num_procs()

cdef extern from "fa_kernels.h" nogil:
    ctypedef struct fa_out_layout:
        int64_t ldy, head_dim, seq_len, g_stride, b_stride
    const char* fa_isa_name()
    void* fa_aligned_alloc(size_t nbytes)
    int fa_cpu_has_avx512()
    int fa_cpu_has_avx2()
    int64_t fa_col_align_f32()
    int64_t fa_row_align_f32()
    int64_t fa_col_align_f64()
    int64_t fa_row_align_f64()
    void fa_pack_qt_f32(float* dst, int64_t ldd, const float* src, int64_t srs, int64_t rows,
                        int64_t cols, float scale)
    void fa_pack_qt_f64(double* dst, int64_t ldd, const double* src, int64_t srs, int64_t rows,
                        int64_t cols, double scale)
    void fa_gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t rs, int64_t ps,
                     const float* B, int64_t ldb, float* C, int64_t ldc, int accumulate,
                     float* tail, float* colmax)
    void fa_gemm_f64(int64_t M, int64_t N, int64_t K, const double* A, int64_t rs, int64_t ps,
                     const double* B, int64_t ldb, double* C, int64_t ldc, int accumulate,
                     double* tail, double* colmax)
    void fa_mask_bool_f32(float* S, int64_t s_is, int64_t s_js, int64_t rows, int64_t cols,
                          const uint8_t* mask, int64_t m_is, int64_t m_js)
    void fa_mask_bool_f64(double* S, int64_t s_is, int64_t s_js, int64_t rows, int64_t cols,
                          const uint8_t* mask, int64_t m_is, int64_t m_js)
    void fa_mask_add_f32(float* S, int64_t s_is, int64_t s_js, int64_t rows, int64_t cols,
                         const float* mask, int64_t m_is, int64_t m_js)
    void fa_mask_add_f64(double* S, int64_t s_is, int64_t s_js, int64_t rows, int64_t cols,
                         const double* mask, int64_t m_is, int64_t m_js)
    void fa_mask_band_f32(float* S, int64_t s_is, int64_t s_js, int64_t rows, int64_t cols,
                          int64_t lo, int64_t hi)
    void fa_mask_band_f64(double* S, int64_t s_is, int64_t s_js, int64_t rows, int64_t cols,
                          int64_t lo, int64_t hi)
    void fa_add_alibi_f32(float* S, int64_t s_is, int64_t s_js, int64_t rows, int64_t cols,
                          float slope, int64_t rel)
    void fa_add_alibi_f64(double* S, int64_t s_is, int64_t s_js, int64_t rows, int64_t cols,
                          double slope, int64_t rel)
    int64_t fa_nonfinite_row_f32(const float* v, int64_t vs, int64_t start, int64_t n,
                                 int64_t ev)
    int64_t fa_nonfinite_row_f64(const double* v, int64_t vs, int64_t start, int64_t n,
                                 int64_t ev)
    void fa_add_into_f32(float* dst, const float* src, int64_t n)
    void fa_add_into_f64(double* dst, const double* src, int64_t n)
    void fa_merge_splits_f32(float* out, int64_t ev, const float* parts, int64_t stride, int64_t n)
    void fa_merge_splits_f64(double* out, int64_t ev, const double* parts, int64_t stride,
                             int64_t n)
    void fa_online_softmax_f32(float* ST, int64_t lds, int64_t nkeys, int64_t ncols, float* m,
                               float* l, float* OT, int64_t ldo, int64_t ev, const float* bmax)
    void fa_online_softmax_f64(double* ST, int64_t lds, int64_t nkeys, int64_t ncols, double* m,
                               double* l, double* OT, int64_t ldo, int64_t ev,
                               const double* bmax)
    void fa_finalize_f32(const float* OT, int64_t ldo, const float* l, int64_t rows, int64_t ev,
                         float* out, int64_t ors)
    void fa_finalize_f64(const double* OT, int64_t ldo, const double* l, int64_t rows,
                         int64_t ev, double* out, int64_t ors)
    void fa_copy_strided_f32(float* dst, int64_t d_rs, int64_t d_cs, const float* src,
                             int64_t s_rs, int64_t s_cs, int64_t rows, int64_t cols)
    void fa_copy_strided_f64(double* dst, int64_t d_rs, int64_t d_cs, const double* src,
                             int64_t s_rs, int64_t s_cs, int64_t rows, int64_t cols)
    int64_t fa_packed_len_f32(int64_t n_out, int64_t k)
    int64_t fa_packed_len_f64(int64_t n_out, int64_t k)
    int64_t fa_padded_bias_len_f32(int64_t n_out)
    int64_t fa_padded_bias_len_f64(int64_t n_out)
    void fa_pack_weight_f32(float* dst, const float* W, int64_t n_out, int64_t k)
    void fa_pack_weight_f64(double* dst, const double* W, int64_t n_out, int64_t k)
    void fa_linear_block_f32(const float* X, int64_t ldx, int64_t m0, int64_t m1, int64_t K,
                             const float* Wp, const float* bias, int64_t n_out, int64_t q0,
                             int64_t q1, float* Y, const fa_out_layout* lay, int64_t kc,
                             float* scratch, const int64_t* qlist)
    void fa_linear_block_f64(const double* X, int64_t ldx, int64_t m0, int64_t m1, int64_t K,
                             const double* Wp, const double* bias, int64_t n_out, int64_t q0,
                             int64_t q1, double* Y, const fa_out_layout* lay, int64_t kc,
                             double* scratch, const int64_t* qlist)
    void fa_dots_f32(float* s, const float* q, int64_t E, const float* k, int64_t ks, int64_t n)
    void fa_dots_f64(double* s, const double* q, int64_t E, const double* k, int64_t ks, int64_t n)
    void fa_row_update_f32(float* s, int64_t n_pad, float* m, float* l, float* o, int64_t ev_pad)
    void fa_row_update_f64(double* s, int64_t n_pad, double* m, double* l, double* o,
                           int64_t ev_pad)
    void fa_accum_rows_f32(float* o, int64_t ev, const float* p, int64_t n, const float* v,
                           int64_t vs)
    void fa_accum_rows_f64(double* o, int64_t ev, const double* p, int64_t n, const double* v,
                           int64_t vs)
    void fa_softmax_rows_f32(float* W, int64_t ldw, int64_t rows, int64_t n)
    void fa_softmax_rows_f64(double* W, int64_t ldw, int64_t rows, int64_t n)


ctypedef fused floating:
    float
    double


# A strided (*lead, heads, rows, cols) operand: base pointer, one element
# offset per flattened lead index, and the three inner strides in elements.
cdef struct Operand:
    char* base
    const int64_t* lead_off  # per flattened lead index; NULL: index * s_lead
    int64_t s_lead
    int64_t s_head
    int64_t s_row
    int64_t s_col


cdef struct Problem:
    Operand q, k, v, out, weights, bmask1, bmask2, fmask
    bint has_weights, has_bmask1, has_bmask2, has_fmask, causal
    int64_t lead_count, heads, kv_group, len_q, len_k, dim, dim_v
    int64_t causal_offset      # Lk - Lq: query i sits at key position i + causal_offset
    # the band of keys query i may attend: i + off - band_left <= j <= i + off + band_right
    # (causal: band_right <= 0; a sliding window sets both; BAND_OPEN = unbounded)
    bint has_band
    int64_t band_left, band_right
    const double* slopes        # ALiBi slope per query head, or NULL
    int64_t n_splits            # row mode: key splits per query row (split-K)
    char* parts                 # row mode with splits: (m, l, o[Ev]) per row and split
    int64_t parts_stride
    int64_t block_q, block_k, n_qblocks
    int64_t lanes               # query columns of the transposed tiles (block_q rounded to NR)
    int64_t tail_len            # elements of the gemm tail-panel scratch
    bint row_mode               # few queries: one row at a time (see _row_tile)
    bint is_f32                 # float32 operands (else float64)
    int64_t keys_pad, dimv_pad  # row mode: block_k and dim_v rounded to NR
    double scale


# At or below this many queries a call runs row by row (decoding).
cdef int64_t ROW_MODE_MAX_QUERIES = 4
# An unbounded side of the band (large, but far from overflowing int64 sums).
cdef int64_t BAND_OPEN = 1 << 40
# Split-K: keys per split at least this many, so the merge stays cheap.
cdef int64_t MIN_KEYS_PER_SPLIT = 512


cdef inline int64_t _round_up(int64_t x, int64_t m) noexcept nogil:
    return ((x + m - 1) // m) * m


# ---- typed wrappers: one name per C routine, the fused type picks the C twin

cdef inline void _gemm(int64_t M, int64_t N, int64_t K, const floating* A, int64_t rs,
                       int64_t ps, const floating* B, int64_t ldb, floating* C, int64_t ldc,
                       int accumulate, floating* tail, floating* colmax=NULL) noexcept nogil:
    if floating is float:
        fa_gemm_f32(M, N, K, A, rs, ps, B, ldb, C, ldc, accumulate, tail, colmax)
    else:
        fa_gemm_f64(M, N, K, A, rs, ps, B, ldb, C, ldc, accumulate, tail, colmax)


cdef inline void _add_into(floating* dst, const floating* src, int64_t n) noexcept nogil:
    if floating is float:
        fa_add_into_f32(dst, src, n)
    else:
        fa_add_into_f64(dst, src, n)


cdef inline void _copy_strided(floating* dst, int64_t d_rs, int64_t d_cs, const floating* src,
                               int64_t s_rs, int64_t s_cs, int64_t rows,
                               int64_t cols) noexcept nogil:
    if floating is float:
        fa_copy_strided_f32(dst, d_rs, d_cs, src, s_rs, s_cs, rows, cols)
    else:
        fa_copy_strided_f64(dst, d_rs, d_cs, src, s_rs, s_cs, rows, cols)


cdef inline char* _at(const Operand* a, int64_t b, int64_t head, int64_t row, int64_t col,
                      int64_t itemsize) noexcept nogil:
    cdef int64_t lead = a.lead_off[b] if a.lead_off != NULL else b * a.s_lead
    return a.base + (lead + head * a.s_head + row * a.s_row + col * a.s_col) * itemsize


cdef bint _scores_block(const Problem* P, floating* ST, const floating* QT, const floating* k,
                        floating* tail, int64_t b, int64_t h, int64_t i0, int64_t rows,
                        int64_t j0, int64_t bk, floating* bmax) noexcept nogil:
    """Scaled, masked scores of one query block against keys j0 .. j0+bk, transposed.

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
    _gemm(bk, L, P.dim, k + j0 * P.k.s_row, P.k.s_row, 1, QT, L, ST, L, 0, tail,
          bmax if clean else NULL)
    # masks index (query i, key j), which sits at ST[i * 1 + j * L]
    _mask_scores(P, ST, L, 1, b, h, i0, rows, j0, bk)
    return clean


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
                       int64_t h, int64_t i0, int64_t rows, int64_t j0,
                       int64_t bk) noexcept nogil:
    """Applies every mask to scores S(i, j) = S[i * s_is + j * s_js] of queries
    i0 .. i0+rows against keys j0 .. j0+bk: -inf where a key may not be attended."""
    cdef int64_t isz = sizeof(floating)
    if P.has_fmask:
        if floating is float:
            fa_mask_add_f32(S, s_is, s_js, rows, bk,
                            <const float*>_at(&P.fmask, b, h, i0, j0, isz),
                            P.fmask.s_row, P.fmask.s_col)
        else:
            fa_mask_add_f64(S, s_is, s_js, rows, bk,
                            <const double*>_at(&P.fmask, b, h, i0, j0, isz),
                            P.fmask.s_row, P.fmask.s_col)
    if P.has_bmask1:
        if floating is float:
            fa_mask_bool_f32(S, s_is, s_js, rows, bk,
                             <const uint8_t*>_at(&P.bmask1, b, h, i0, j0, 1),
                             P.bmask1.s_row, P.bmask1.s_col)
        else:
            fa_mask_bool_f64(S, s_is, s_js, rows, bk,
                             <const uint8_t*>_at(&P.bmask1, b, h, i0, j0, 1),
                             P.bmask1.s_row, P.bmask1.s_col)
    if P.has_bmask2:
        if floating is float:
            fa_mask_bool_f32(S, s_is, s_js, rows, bk,
                             <const uint8_t*>_at(&P.bmask2, b, h, i0, j0, 1),
                             P.bmask2.s_row, P.bmask2.s_col)
        else:
            fa_mask_bool_f64(S, s_is, s_js, rows, bk,
                             <const uint8_t*>_at(&P.bmask2, b, h, i0, j0, 1),
                             P.bmask2.s_row, P.bmask2.s_col)
    if P.slopes != NULL:
        if floating is float:
            fa_add_alibi_f32(S, s_is, s_js, rows, bk, <float>P.slopes[h],
                             j0 - i0 - P.causal_offset)
        else:
            fa_add_alibi_f64(S, s_is, s_js, rows, bk, P.slopes[h], j0 - i0 - P.causal_offset)
    # Only blocks that reach outside some row's band need the cut.
    cdef int64_t lo, hi
    if _band_cuts(P, i0, rows, j0, bk, &lo, &hi):
        if floating is float:
            fa_mask_band_f32(S, s_is, s_js, rows, bk, lo, hi)
        else:
            fa_mask_band_f64(S, s_is, s_js, rows, bk, lo, hi)


cdef inline void _key_range(const Problem* P, int64_t i0, int64_t rows, int64_t* lo,
                            int64_t* hi) noexcept nogil:
    """Keys [lo, hi) that some query of i0 .. i0+rows may attend (empty: lo >= hi)."""
    lo[0] = 0
    hi[0] = P.len_k
    if P.has_band:
        lo[0] = max(<int64_t>0, i0 + P.causal_offset - P.band_left)
        hi[0] = min(P.len_k, i0 + rows - 1 + P.causal_offset + P.band_right + 1)


cdef inline int64_t _nonfinite_row(const floating* v, int64_t vs, int64_t start, int64_t n,
                                   int64_t ev) noexcept nogil:
    if floating is float:
        return fa_nonfinite_row_f32(v, vs, start, n, ev)
    else:
        return fa_nonfinite_row_f64(v, vs, start, n, ev)


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


cdef void _accumulate_rows(const Problem* P, const floating* v, int64_t n, const floating* ST,
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
        j = _nonfinite_row(v, P.v.s_row, start, n, P.dim_v)
        if j > start:
            _gemm(P.dim_v, L, j - start, v + start * P.v.s_row, 1, P.v.s_row, ST + start * L,
                  L, T, L, 1, tail)
        if j == n:
            break
        vj = v + j * P.v.s_row
        for i in range(rows):
            if _attended(P, b, h, i0 + i, j0 + j, vj):
                p = ST[j * L + i]
                for e in range(P.dim_v):
                    T[e * L + i] += p * vj[e]
        start = j + 1


cdef inline void _accumulate_block(const Problem* P, const floating* v, int64_t bk,
                                   const floating* ST, int64_t L, floating* OT, floating* OB,
                                   floating* tail, bint first, bint masked, int64_t b,
                                   int64_t h, int64_t i0, int64_t rows,
                                   int64_t j0) noexcept nogil:
    """O^T += V_block^T P^T: the first block straight into O^T (still zero),
    later ones summed apart in OB and then added (see fa_add_into).  In a
    block that a mask touches, a key holding a NaN or an inf goes only to the
    queries that attend it (masked keys never affect the output)."""
    cdef floating* T = OT if first else OB
    if masked and _nonfinite_row(v, P.v.s_row, 0, bk, P.dim_v) < bk:
        _accumulate_rows(P, v, bk, ST, L, T, tail, first, b, h, i0, rows, j0)
    else:
        _gemm(P.dim_v, L, bk, v, 1, P.v.s_row, ST, L, T, L, first, tail)
    if not first:
        _add_into(OT, OB, P.dim_v * L)


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
    cdef bint have_max

    cdef const floating* k = <const floating*>_at(&P.k, b, hk, 0, 0, isz)
    cdef const floating* v = <const floating*>_at(&P.v, b, hk, 0, 0, isz)
    cdef floating* out = <floating*>_at(&P.out, b, h, i0, 0, isz)
    cdef floating* W

    if floating is float:
        fa_pack_qt_f32(QT, L, <const float*>_at(&P.q, b, h, i0, 0, isz), P.q.s_row, rows,
                       P.dim, <float>P.scale)
    else:
        fa_pack_qt_f64(QT, L, <const double*>_at(&P.q, b, h, i0, 0, isz), P.q.s_row, rows,
                       P.dim, P.scale)
    memset(OT, 0, P.dim_v * L * isz)
    for r in range(L):
        m[r] = -INFINITY
        l[r] = 0
    _key_range(P, i0, rows, &j_start, &j_end)

    if not P.has_weights:
        # Streaming: walk the keys once with a running max and sum per query;
        # blocks outside every row's band are never touched.
        j0 = j_start
        while j0 < j_end:
            bk = min(P.block_k, j_end - j0)
            have_max = _scores_block(P, ST, QT, k, tail, b, h, i0, rows, j0, bk, bm)
            if floating is float:
                fa_online_softmax_f32(ST, L, bk, L, m, l, OT, L, P.dim_v,
                                      bm if have_max else NULL)
            else:
                fa_online_softmax_f64(ST, L, bk, L, m, l, OT, L, P.dim_v,
                                      bm if have_max else NULL)
            # O^T += V_block^T P^T, V read in place (rows of V are E-contiguous)
            _accumulate_block(P, v + j0 * P.v.s_row, bk, ST, L, OT, OB, tail, j0 == j_start,
                              not have_max, b, h, i0, rows, j0)
            j0 += P.block_k
    else:
        # Weights requested: the scores of whole rows land in the caller's
        # buffer, are normalised there, then multiply V block by block.
        W = <floating*>_at(&P.weights, b, h, i0, 0, isz)
        j0 = 0
        while j0 < P.len_k:
            bk = min(P.block_k, P.len_k - j0)
            _scores_block(P, ST, QT, k, tail, b, h, i0, rows, j0, bk, NULL)
            _copy_strided(W + j0, P.len_k, 1, ST, 1, L, rows, bk)
            j0 += P.block_k
        if floating is float:
            fa_softmax_rows_f32(W, P.len_k, rows, P.len_k)
        else:
            fa_softmax_rows_f64(W, P.len_k, rows, P.len_k)
        memset(ST, 0, P.block_k * L * isz)  # lanes past `rows` stay zero
        j0 = j_start
        while j0 < j_end:
            bk = min(P.block_k, j_end - j0)
            _copy_strided(ST, 1, L, W + j0, P.len_k, 1, rows, bk)
            _accumulate_block(P, v + j0 * P.v.s_row, bk, ST, L, OT, OB, tail, j0 == j_start,
                              _block_masked(P, i0, rows, j0, bk), b, h, i0, rows, j0)
            j0 += P.block_k
        for r in range(rows):
            l[r] = 1
    if floating is float:
        fa_finalize_f32(OT, L, l, rows, P.dim_v, out, P.out.s_row)
    else:
        fa_finalize_f64(OT, L, l, rows, P.dim_v, out, P.out.s_row)


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
    cdef floating m, l
    cdef floating* acc
    cdef floating* part
    cdef const floating* q
    cdef const floating* k = <const floating*>_at(&P.k, b, hk, 0, 0, isz)
    cdef const floating* v = <const floating*>_at(&P.v, b, hk, 0, 0, isz)
    cdef floating* out
    span = (P.len_k + P.n_splits - 1) // P.n_splits
    s0 = split * span
    s1 = min(P.len_k, s0 + span)
    for i in range(P.len_q):
        q = <const floating*>_at(&P.q, b, h, i, 0, isz)
        for c in range(P.dim):
            qs[c] = <floating>P.scale * q[c]
        memset(o, 0, P.dimv_pad * isz)
        m = -INFINITY
        l = 0
        _key_range(P, i, 1, &j_start, &j_end)
        j0 = j_first = max(j_start, s0)
        j_end = min(j_end, s1)
        while j0 < j_end:
            bk = min(P.block_k, j_end - j0)
            if floating is float:
                fa_dots_f32(s, qs, P.dim, k + j0 * P.k.s_row, P.k.s_row, bk)
            else:
                fa_dots_f64(s, qs, P.dim, k + j0 * P.k.s_row, P.k.s_row, bk)
            _mask_scores(P, s, 1, 0, b, h, i, 1, j0, bk)
            for c in range(bk, P.keys_pad):
                s[c] = -INFINITY
            # the first block straight into o, later ones summed apart in ob
            first = j0 == j_first
            acc = o if first else ob
            if not first:
                memset(ob, 0, P.dimv_pad * isz)
            if floating is float:
                fa_row_update_f32(s, P.keys_pad, &m, &l, o, P.dimv_pad)
                fa_accum_rows_f32(acc, P.dim_v, s, bk, v + j0 * P.v.s_row, P.v.s_row)
            else:
                fa_row_update_f64(s, P.keys_pad, &m, &l, o, P.dimv_pad)
                fa_accum_rows_f64(acc, P.dim_v, s, bk, v + j0 * P.v.s_row, P.v.s_row)
            if not first:
                _add_into(o, ob, P.dim_v)
            j0 += bk
        if P.n_splits > 1:
            part = (<floating*>P.parts) + ((bh * P.len_q + i) * P.n_splits + split) * P.parts_stride
            part[0] = m
            part[1] = l
            memcpy(part + 2, o, P.dim_v * isz)
            continue
        out = <floating*>_at(&P.out, b, h, i, 0, isz)
        if floating is float:
            fa_finalize_f32(o, 1, &l, 1, P.dim_v, out, P.out.s_row)
        else:
            fa_finalize_f64(o, 1, &l, 1, P.dim_v, out, P.out.s_row)


cdef void _merge_row(const Problem* P, int64_t row, floating* tag) noexcept nogil:
    """Final output of one query row from its key splits."""
    cdef int64_t isz = sizeof(floating)
    cdef int64_t bh = row // P.len_q
    cdef int64_t i = row % P.len_q
    cdef floating* out = <floating*>_at(&P.out, bh // P.heads, bh % P.heads, i, 0, isz)
    cdef const floating* parts = (<const floating*>P.parts) + row * P.n_splits * P.parts_stride
    if floating is float:
        fa_merge_splits_f32(out, P.dim_v, parts, P.parts_stride, P.n_splits)
    else:
        fa_merge_splits_f64(out, P.dim_v, parts, P.parts_stride, P.n_splits)


cdef inline int64_t _scratch_elems(const Problem* P) noexcept nogil:
    """Per-thread scratch, in elements: Q^T, S^T, O^T, one key block's part of
    O^T, m, l, the block max and the tail panel (row mode: scores, accumulator,
    one block's part of it, query)."""
    if P.row_mode:
        return P.keys_pad + 2 * P.dimv_pad + P.dim + 16
    return (P.dim + P.block_k + 2 * P.dim_v + 3) * P.lanes + P.tail_len


cdef int _run(const Problem* P, int num_threads, floating* tag) noexcept nogil:
    """Runs every tile; returns 0, or -1 when a thread's scratch could not be had."""
    cdef int64_t n_work = (P.lead_count * P.heads) * (P.n_splits if P.row_mode else P.n_qblocks)
    cdef int64_t n_rows = P.lead_count * P.heads * P.len_q
    cdef int failed = 0
    cdef int* failed_flag = &failed  # shared: a plain int would be thread-private
    cdef int64_t w
    cdef floating* buf = NULL
    # a thread with no tile would only be woken, allocate and wait
    if n_work < num_threads:
        num_threads = <int>max(n_work, <int64_t>1)
    _note_team(num_threads)
    with parallel(num_threads=num_threads):
        buf = <floating*>fa_aligned_alloc(_scratch_elems(P) * sizeof(floating))
        if buf == NULL:
            failed_flag[0] = 1
        # dynamic: causal blocks near the bottom cost more than those on top
        for w in prange(n_work, schedule="dynamic"):
            if buf != NULL:
                if P.row_mode:
                    _row_tile(P, w, buf)
                else:
                    _tile(P, w, buf)
        # (the loop above ends with a barrier: every split is written)
        if P.row_mode and P.n_splits > 1:
            for w in prange(n_rows, schedule="static"):
                _merge_row(P, w, <floating*>NULL)
        free(buf)
    return -1 if failed else 0


# ---- Python-facing entry points ------------------------------------------

cdef int64_t[::1] _lead_offsets(cnp.ndarray a, int nlead):
    """Element offset of each flattened lead index of `a` (C order)."""
    cdef int64_t count = 1, i, rem, off
    cdef int d
    cdef cnp.npy_intp* shape = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp* strides = cnp.PyArray_STRIDES(a)
    cdef int64_t isz = cnp.PyArray_ITEMSIZE(a)
    for d in range(nlead):
        count *= shape[d]
    cdef int64_t[::1] out = np.empty(max(count, 1), dtype=np.int64)
    for i in range(count):
        rem = i
        off = 0
        for d in range(nlead - 1, -1, -1):
            off += (rem % shape[d]) * (strides[d] // isz)
            rem //= shape[d]
        out[i] = off
    return out


cdef int64_t _fill(Operand* op, object arr, int nlead, list keep) except -1:
    """Points `op` at `arr` (None: leaves it empty). Returns 1 if set."""
    if arr is None:
        return 0
    cdef cnp.ndarray a = <cnp.ndarray?>arr
    if cnp.PyArray_NDIM(a) != nlead + 3:
        raise ValueError(f"kernel operand has {a.ndim} axes, expected {nlead + 3}")
    cdef int64_t isz = cnp.PyArray_ITEMSIZE(a)
    cdef cnp.npy_intp* strides = cnp.PyArray_STRIDES(a)
    cdef int d
    for d in range(nlead + 3):
        if strides[d] % isz:
            raise ValueError("kernel operand strides must be multiples of the item size")
    cdef int64_t[::1] off_view
    op.base = <char*>cnp.PyArray_DATA(a)
    op.lead_off = NULL
    op.s_lead = strides[0] // isz if nlead == 1 else 0
    if nlead > 1:
        # (no table for zero or one lead axis: it costs microseconds per call)
        offsets = _lead_offsets(a, nlead)
        keep.append(offsets)
        off_view = offsets
        op.lead_off = &off_view[0]
    op.s_head = strides[nlead] // isz
    op.s_row = strides[nlead + 1] // isz
    op.s_col = strides[nlead + 2] // isz
    return 1


def attention(q, k, v, out, weights, bmask1, bmask2, fmask, bint causal, double scale,
              Py_ssize_t block_q, Py_ssize_t block_k, int num_threads, window=None,
              slopes=None):
    """Fills `out` (and `weights`, when given) with softmax(scale q k^T + bias + masks) v.

    window: (left, right) of the key band around each query's position (None
    on a side: unbounded); slopes: float64 ALiBi slope per query head.
    Private: fastattn.functional validates shapes, dtypes and layouts first.
    """
    cdef Problem P
    cdef list keep = []
    cdef int rc
    if not _attention_setup(&P, keep, q, k, v, out, weights, bmask1, bmask2, fmask, causal,
                            scale, block_q, block_k, num_threads, window, slopes):
        return
    with nogil:
        rc = _attention_run(&P, num_threads)
    if rc != 0:
        raise MemoryError("could not allocate the attention kernel's scratch buffers")


cdef int _attention_run(const Problem* P, int num_threads) noexcept nogil:
    """Runs a set-up problem; 0, or -1 when a thread's scratch could not be had."""
    if P.is_f32:
        return _run(P, num_threads, <float*>NULL)
    return _run(P, num_threads, <double*>NULL)


cdef bint _attention_setup(Problem* P_, list keep, q, k, v, out, weights, bmask1, bmask2,
                           fmask, bint causal, double scale, Py_ssize_t block_q,
                           Py_ssize_t block_k, int num_threads, window, slopes) except -1:
    """Validates the operands and fills P_ (arrays it points into go to `keep`);
    False when there is nothing to compute."""
    cdef Problem P
    cdef cnp.ndarray slope_arr
    # the checks read shapes, strides and dtypes through the C API: as Python
    # attribute reads they cost microseconds per call, on every forward
    cdef cnp.ndarray Q = <cnp.ndarray?>q, K = <cnp.ndarray?>k, V = <cnp.ndarray?>v
    cdef cnp.ndarray O = <cnp.ndarray?>out
    cdef cnp.ndarray A
    cdef int nlead = cnp.PyArray_NDIM(Q) - 3
    cdef int d, typ = cnp.PyArray_TYPE(Q)
    cdef cnp.npy_intp* qdims = cnp.PyArray_DIMS(Q)
    memset(&P, 0, sizeof(Problem))
    if nlead < 0:
        raise ValueError("kernel operands need at least 3 axes")
    if cnp.PyArray_TYPE(K) != typ or cnp.PyArray_TYPE(V) != typ or cnp.PyArray_TYPE(O) != typ:
        raise TypeError("kernel operands must share one dtype")
    if typ != cnp.NPY_FLOAT32 and typ != cnp.NPY_FLOAT64:
        raise TypeError(f"kernel dtype must be float32 or float64, got {q.dtype}")
    if not (cnp.PyArray_ISNOTSWAPPED(Q) and cnp.PyArray_ISNOTSWAPPED(K)
            and cnp.PyArray_ISNOTSWAPPED(V) and cnp.PyArray_ISNOTSWAPPED(O)):
        raise TypeError("kernel operands must be in native byte order")
    if block_q < 1 or block_k < 1 or num_threads < 1:
        raise ValueError("block sizes and thread count must be positive")
    _fill(&P.q, Q, nlead, keep)
    _fill(&P.k, K, nlead, keep)
    _fill(&P.v, V, nlead, keep)
    _fill(&P.out, O, nlead, keep)
    for A in (K, V, O):
        for d in range(nlead):
            if cnp.PyArray_DIMS(A)[d] != qdims[d]:
                raise ValueError("kernel operands must share their leading axes")
    for A in (Q, K, V, O):
        # the kernels step through the last axis one element at a time
        if (cnp.PyArray_SIZE(A) and cnp.PyArray_DIMS(A)[nlead + 2] > 1
                and cnp.PyArray_STRIDES(A)[nlead + 2] != cnp.PyArray_ITEMSIZE(A)):
            raise ValueError("kernel operands need a unit stride on their last axis")
    P.has_weights = _fill(&P.weights, weights, nlead, keep)
    P.has_bmask1 = _fill(&P.bmask1, bmask1, nlead, keep)
    P.has_bmask2 = _fill(&P.bmask2, bmask2, nlead, keep)
    P.has_fmask = _fill(&P.fmask, fmask, nlead, keep)
    P.lead_count = 1
    for d in range(nlead):
        P.lead_count *= qdims[d]
    P.heads = qdims[nlead]
    P.len_q = qdims[nlead + 1]
    P.dim = qdims[nlead + 2]
    P.len_k = cnp.PyArray_DIMS(K)[nlead + 1]
    P.dim_v = cnp.PyArray_DIMS(V)[nlead + 2]
    cdef int64_t kv_heads = cnp.PyArray_DIMS(K)[nlead]
    if P.heads == 0 or cnp.PyArray_SIZE(O) == 0 and weights is None:
        return False  # nothing to compute
    if (kv_heads < 1 or P.heads % kv_heads or cnp.PyArray_DIMS(V)[nlead] != kv_heads
            or cnp.PyArray_DIMS(K)[nlead + 2] != P.dim or cnp.PyArray_DIMS(V)[nlead + 1] != P.len_k
            or cnp.PyArray_DIMS(O)[nlead] != P.heads or cnp.PyArray_DIMS(O)[nlead + 1] != P.len_q
            or cnp.PyArray_DIMS(O)[nlead + 2] != P.dim_v):
        raise ValueError("kernel operand shapes disagree")
    for arr in (weights, bmask1, bmask2, fmask):
        if arr is not None and arr.shape != q.shape[:nlead] + (P.heads, P.len_q, P.len_k):
            raise ValueError("kernel weights/mask shape disagrees")
    if fmask is not None and fmask.dtype != q.dtype:
        raise TypeError("kernel float mask must have the operands' dtype")
    P.kv_group = P.heads // kv_heads
    P.causal = causal
    P.causal_offset = P.len_k - P.len_q
    P.band_left = BAND_OPEN
    P.band_right = BAND_OPEN
    if window is not None:
        left, right = window
        if left is not None:
            P.band_left = min(<int64_t>left, BAND_OPEN)
        if right is not None:
            P.band_right = min(<int64_t>right, BAND_OPEN)
    if causal:
        P.band_right = min(P.band_right, <int64_t>0)
    P.has_band = P.band_left < BAND_OPEN or P.band_right < BAND_OPEN
    P.slopes = NULL
    if slopes is not None:
        slope_arr = np.ascontiguousarray(slopes, dtype=np.float64)
        if slope_arr.ndim != 1 or slope_arr.shape[0] != P.heads:
            raise ValueError("kernel slopes must have one entry per query head")
        keep.append(slope_arr)
        P.slopes = <const double*>cnp.PyArray_DATA(slope_arr)
    P.scale = scale
    if P.lead_count == 0 or P.heads == 0 or P.len_q == 0 or (P.dim_v == 0 and not P.has_weights):
        return False
    P.is_f32 = typ == cnp.NPY_FLOAT32
    if typ == cnp.NPY_FLOAT32:
        _setup_blocks(&P, block_q, block_k, <float*>NULL)
    else:
        _setup_blocks(&P, block_q, block_k, <double*>NULL)
    P.n_splits = 1
    if P.row_mode:
        # split-K when (batch x heads) alone would leave threads idle
        busy = P.lead_count * P.heads
        if busy < 2 * num_threads:
            P.n_splits = max(1, min((2 * num_threads + busy - 1) // busy,
                                    P.len_k // MIN_KEYS_PER_SPLIT))
    if P.n_splits > 1:
        P.parts_stride = P.dim_v + 2
        parts = np.empty(P.lead_count * P.heads * P.len_q * P.n_splits * P.parts_stride,
                         dtype=q.dtype)
        keep.append(parts)
        P.parts = <char*>cnp.PyArray_DATA(parts)
    P_[0] = P
    return True


cdef void _setup_blocks(Problem* P, int64_t block_q, int64_t block_k,
                        floating* tag) noexcept nogil:
    cdef int64_t ra, ca
    if floating is float:
        ra, ca = fa_row_align_f32(), fa_col_align_f32()
    else:
        ra, ca = fa_row_align_f64(), fa_col_align_f64()
    # queries run along vector lanes: a block is a whole number of NR lanes
    P.block_q = _round_up(min(block_q, max(P.len_q, 1)), ca)
    P.block_k = min(block_k, max(P.len_k, 1))
    P.n_qblocks = (P.len_q + P.block_q - 1) // P.block_q
    P.lanes = P.block_q
    P.tail_len = ra * max(P.dim, P.block_k)
    # With this few queries most lanes of a tile would idle (the weights path
    # always uses tiles).
    P.row_mode = P.len_q <= ROW_MODE_MAX_QUERIES and not P.has_weights
    P.keys_pad = _round_up(P.block_k, ca)
    P.dimv_pad = _round_up(P.dim_v, ca)


# Set once a parallel region has run with more than one thread.  libgomp's
# thread team does not survive fork(): a child forked after that hangs in its
# next parallel region of more than one thread.  fastattn.threads reads this
# in the child and drops to one thread.
cdef int _team_started = 0


cdef inline void _note_team(int num_threads) noexcept nogil:
    global _team_started
    if num_threads > 1:
        _team_started = 1


def team_started():
    """True once a kernel of this build has run a team of more than one thread."""
    return bool(_team_started)


def isa():
    """The instruction set this build of the kernels was compiled for."""
    return fa_isa_name().decode()


def openmp_enabled():
    """True when the kernels were built with OpenMP."""
    return bool(FA_OPENMP_ENABLED)


def cpu_features():
    """Instruction-set builds the running CPU supports (checked with cpuid)."""
    return {"avx512": bool(fa_cpu_has_avx512()), "avx2": bool(fa_cpu_has_avx2())}


# ---- projections ---------------------------------------------------------

# rows x output panels per work item: a block of packed weights (K x 2
# panels: 256 KiB at K = 1024 in float32 with AVX-512, 512 KiB in float64)
# stays in L2 while the rows stream past it.  With 64 x 8 the float32 block
# was 1 MiB at K = 1024, all of a Zen 4 core's L2, and the wide preset's
# Q/K/V projection ran 10 % slower (bert's 2 %).
cdef int64_t LINEAR_ROWS = 128
cdef int64_t LINEAR_PANELS = 2


def _aligned_empty(Py_ssize_t n, dtype):
    """A 1-D array of n elements whose data starts on a 64-byte boundary."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(n + 64 // itemsize, dtype=dtype)
    skip = (-raw.ctypes.data % 64) // itemsize
    return raw[skip:skip + n]


def panel_width(dtype):
    """Output features per packed weight panel in this build (a head whose
    width is a multiple of it starts and ends on panel boundaries)."""
    if np.dtype(dtype) == np.float32:
        return fa_col_align_f32()
    if np.dtype(dtype) == np.float64:
        return fa_col_align_f64()
    raise TypeError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")


def pack_weight(w, bias):
    """Pack an nn.Linear weight (n_out, k) for :func:`linear`; pad its bias.

    Returns (packed weight, padded bias or None).  The layout depends on this
    build's vector width, so pack with the kernel module that will run it.
    """
    cdef cnp.ndarray W = np.ascontiguousarray(w)
    cdef int64_t n_out = W.shape[0], k = W.shape[1]
    if W.ndim != 2:
        raise ValueError("weight must be 2-D")
    if W.dtype == np.float32:
        packed = _aligned_empty(fa_packed_len_f32(n_out, k), np.float32)
        fa_pack_weight_f32(<float*>cnp.PyArray_DATA(packed), <const float*>cnp.PyArray_DATA(W), n_out, k)
        blen = fa_padded_bias_len_f32(n_out)
    elif W.dtype == np.float64:
        packed = _aligned_empty(fa_packed_len_f64(n_out, k), np.float64)
        fa_pack_weight_f64(<double*>cnp.PyArray_DATA(packed), <const double*>cnp.PyArray_DATA(W), n_out, k)
        blen = fa_padded_bias_len_f64(n_out)
    else:
        raise TypeError(f"weight dtype must be float32 or float64, got {W.dtype}")
    padded = None
    if bias is not None:
        padded = np.zeros(blen, dtype=W.dtype)
        padded[:n_out] = bias
    return packed, padded


def linear(x, packed, bias, Py_ssize_t n_out, out, int num_threads, bint head_major=False):
    """out[...] = x @ W.T + bias, W as packed by :func:`pack_weight`.

    x (m, k) and out (m, n_out) need a unit stride on their last axis; the
    rows are split over ``num_threads`` OpenMP threads (no BLAS involved).

    With ``head_major``, out is a C-contiguous (B, G, N, E) array with
    B * N == m and G * E == n_out: row b * N + n, column g * E + e of the
    product lands at out[b, g, n, e], so each head's rows are contiguous for
    the attention kernel (no transposing copy, no strided K/V reads).
    """
    cdef LinearJob J
    cdef int rc
    if not _linear_setup(&J, x, packed, bias, n_out, out, head_major):
        return out
    with nogil:
        rc = _linear_job_run(&J, num_threads)
    if rc != 0:
        raise MemoryError("could not allocate the projection's scratch buffers")
    return out


cdef int _linear_job_run(const LinearJob* J, int num_threads) noexcept nogil:
    if J.is_f32:
        return _linear_run(J, num_threads, <float*>NULL)
    return _linear_run(J, num_threads, <double*>NULL)


cdef bint _linear_setup(LinearJob* J_, x, packed, bias, Py_ssize_t n_out, out,
                        bint head_major) except -1:
    """Validates the operands of :func:`linear` and fills J_; False when the
    product was trivial and is already written (no rows, no columns, k == 0)."""
    cdef cnp.ndarray X = <cnp.ndarray?>x, Y = <cnp.ndarray?>out, Wp = <cnp.ndarray?>packed
    cdef cnp.ndarray Bp
    if head_major:
        if (Y.ndim != 4 or not Y.flags.c_contiguous or X.ndim != 2
                or X.shape[0] != Y.shape[0] * Y.shape[2] or Y.shape[1] * Y.shape[3] != n_out):
            raise ValueError("linear: head-major out must be C-contiguous (B, G, N, E) with "
                             "B * N == x rows and G * E == n_out")
    elif X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0] or Y.shape[1] != n_out:
        raise ValueError("linear: x must be (m, k) and out (m, n_out)")
    if X.dtype != Wp.dtype or Y.dtype != Wp.dtype or (bias is not None and bias.dtype != Wp.dtype):
        raise TypeError("linear: x, out, weight and bias must share one dtype")
    cdef int64_t isz = X.itemsize
    cdef int64_t m = X.shape[0], k = X.shape[1]
    if m == 0 or n_out == 0:
        return False  # (empty arrays may carry any strides)
    if (X.strides[1] != isz and k > 1) or (not head_major and Y.strides[1] != isz and n_out > 1):
        raise ValueError("linear: x and out need a unit stride on their last axis")
    if X.strides[0] % isz or (not head_major and Y.strides[0] % isz):
        raise ValueError("linear: strides must be multiples of the item size")
    cdef int64_t nr, need
    if X.dtype == np.float32:
        nr = fa_col_align_f32()
        need = fa_packed_len_f32(n_out, k)
    else:
        nr = fa_col_align_f64()
        need = fa_packed_len_f64(n_out, k)
    if Wp.size != need or (<size_t>cnp.PyArray_DATA(Wp)) % 64:
        raise ValueError("linear: packed weight does not match x, n_out and this build")
    if bias is not None:
        Bp = <cnp.ndarray?>bias
        if Bp.size < ((n_out + nr - 1) // nr) * nr:
            raise ValueError("linear: bias is not padded for this build")
    if k == 0:
        if bias is None:
            out[...] = 0
        elif head_major:
            out[...] = bias[:n_out].reshape(Y.shape[1], 1, Y.shape[3])
        else:
            out[...] = bias[:n_out]
        return False
    cdef LinearJob J
    J.is_f32 = X.dtype == np.float32
    J.x = <char*>cnp.PyArray_DATA(X)
    J.ldx = X.strides[0] // isz
    J.y = <char*>cnp.PyArray_DATA(Y)
    if head_major:
        J.lay.ldy = 0
        J.lay.head_dim = Y.shape[3]
        J.lay.seq_len = Y.shape[2]
        J.lay.g_stride = Y.shape[2] * Y.shape[3]
        J.lay.b_stride = Y.shape[1] * Y.shape[2] * Y.shape[3]
    else:
        J.lay.ldy = Y.strides[0] // isz
        J.lay.head_dim = 0
        J.lay.seq_len = 0
        J.lay.g_stride = 0
        J.lay.b_stride = 0
    J.w = <char*>cnp.PyArray_DATA(Wp)
    J.bias = NULL if bias is None else <char*>cnp.PyArray_DATA(Bp)
    J.m = m
    J.k = k
    J.n_out = n_out
    J.panels = (n_out + nr - 1) // nr
    J.kc = k if k <= 1024 else 512
    J.row_blocks = (m + LINEAR_ROWS - 1) // LINEAR_ROWS
    J.panel_blocks = (J.panels + LINEAR_PANELS - 1) // LINEAR_PANELS
    J_[0] = J
    return True


cdef struct LinearJob:
    char* x
    char* y
    char* w
    char* bias
    fa_out_layout lay
    int64_t ldx, m, k, n_out, panels, kc, row_blocks, panel_blocks
    bint is_f32


cdef inline int64_t _linear_scratch_elems(const LinearJob* J) noexcept nogil:
    """Per-thread scratch of fa_linear_block, in elements: one FA_MR x NR tile
    and FA_MR rows of one K chunk."""
    if J.is_f32:
        return fa_row_align_f32() * (fa_col_align_f32() + J.kc)
    return fa_row_align_f64() * (fa_col_align_f64() + J.kc)


cdef inline int64_t _itemsize(const LinearJob* J) noexcept nogil:
    return 4 if J.is_f32 else 8


cdef int _linear_run(const LinearJob* J, int num_threads, floating* tag) noexcept nogil:
    cdef int64_t n_work = J.row_blocks * J.panel_blocks
    cdef int failed = 0
    cdef int* failed_flag = &failed
    cdef int64_t w, m0, m1, q0, q1
    cdef floating* buf = NULL
    if n_work < num_threads:
        num_threads = <int>n_work
    _note_team(num_threads)
    with parallel(num_threads=num_threads):
        buf = <floating*>fa_aligned_alloc(_linear_scratch_elems(J) * sizeof(floating))
        if buf == NULL:
            failed_flag[0] = 1
        for w in prange(n_work, schedule="dynamic"):
            if buf != NULL:
                m0 = (w // J.panel_blocks) * LINEAR_ROWS
                m1 = min(m0 + LINEAR_ROWS, J.m)
                q0 = (w % J.panel_blocks) * LINEAR_PANELS
                q1 = min(q0 + LINEAR_PANELS, J.panels)
                if floating is float:
                    fa_linear_block_f32(<const float*>J.x, J.ldx, m0, m1, J.k,
                                        <const float*>J.w, <const float*>J.bias, J.n_out,
                                        q0, q1, <float*>J.y, &J.lay, J.kc, buf, NULL)
                else:
                    fa_linear_block_f64(<const double*>J.x, J.ldx, m0, m1, J.k,
                                        <const double*>J.w, <const double*>J.bias, J.n_out,
                                        q0, q1, <double*>J.y, &J.lay, J.kc, buf, NULL)
        free(buf)
    return -1 if failed else 0


# ---- one self-attention forward, prepared once per shape -------------------

cdef int _fused_run(const LinearJob* J, const Problem* P, const int64_t* panels,
                    int64_t per_unit, int num_threads, floating* tag) noexcept nogil:
    """The Q/K/V projection and the attention core, one (batch entry, K/V head)
    at a time: a thread projects that head's K and V and its group's queries,
    then runs their tiles at once, while those rows are still in its L2.
    (Projected for the whole batch first, they come back from memory: loading
    each tile's queries stalled on it for about 2 % of the core at bert.)
    panels[hk * per_unit ...]: the weight panels of K/V head hk's unit."""
    cdef int64_t hkv = P.heads // P.kv_group
    cdef int64_t n_units = P.lead_count * hkv
    cdef int64_t n = P.len_q, u, b, hk, h, t
    cdef int64_t elems = max(_linear_scratch_elems(J), _scratch_elems(P))
    cdef int failed = 0
    cdef int* failed_flag = &failed
    cdef floating* buf = NULL
    if n_units < num_threads:
        num_threads = <int>n_units
    _note_team(num_threads)
    with parallel(num_threads=num_threads):
        buf = <floating*>fa_aligned_alloc(elems * sizeof(floating))
        if buf == NULL:
            failed_flag[0] = 1
        for u in prange(n_units, schedule="dynamic"):
            if buf != NULL:
                b = u // hkv
                hk = u % hkv
                if floating is float:
                    fa_linear_block_f32(<const float*>J.x, J.ldx, b * n, (b + 1) * n, J.k,
                                        <const float*>J.w, <const float*>J.bias, J.n_out,
                                        0, per_unit, <float*>J.y, &J.lay, J.kc, buf,
                                        panels + hk * per_unit)
                else:
                    fa_linear_block_f64(<const double*>J.x, J.ldx, b * n, (b + 1) * n, J.k,
                                        <const double*>J.w, <const double*>J.bias, J.n_out,
                                        0, per_unit, <double*>J.y, &J.lay, J.kc, buf,
                                        panels + hk * per_unit)
                for h in range(hk * P.kv_group, (hk + 1) * P.kv_group):
                    for t in range(P.n_qblocks):
                        _tile(P, (b * P.heads + h) * P.n_qblocks + t, buf)
        free(buf)
    return -1 if failed else 0


from cpython.pythread cimport PyThread_get_thread_ident
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef inline bint _overlap(const char* a, const char* b, int64_t nbytes) noexcept nogil:
    """Whether two contiguous regions of nbytes each share a byte."""
    return a < b + nbytes and b < a + nbytes


cdef inline double _seconds() noexcept nogil:
    # a C clock: Python's perf_counter, called from here, cost microseconds
    # with the interpreter's code evicted by the kernels
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + 1e-9 * t.tv_nsec


cdef class ForwardPlan:
    """The three kernel calls of a self-attention forward (Q/K/V projection,
    attention, output projection) for one shape, checked and laid out once.

    A call then only checks the input and runs: at the small preset the
    Python between separate kernel calls cost tens of microseconds, its code
    and data evicted from the caches by the GEMMs before it.  The buffers
    (head-major qkv, merged heads) and packed weights are the caller's; the
    plan keeps them alive.  Not for concurrent use: one plan per thread.

    With ``fused``, the first two calls become one: each work item projects
    one (batch entry, K/V head) and attends it at once (see _fused_run).
    The results are bit for bit the same.  A call whose x shares memory with
    merged runs unfused (a unit's output would feed a later unit's input).
    """
    cdef LinearJob j_in, j_out
    cdef Problem P
    cdef list keep
    cdef const int64_t* panels   # fused: each unit's weight panels (see _fused_run), else NULL
    cdef int64_t per_unit
    cdef object packed           # the module's packed-weights dict the plan was made from
    cdef unsigned long owner     # the thread that made it
    cdef int num_threads, typ
    cdef cnp.npy_intp dims[3]
    cdef readonly double kernel_seconds
    """Seconds the last :meth:`run` spent in the kernels (the rest is its own)."""

    def __init__(self, wq, bq, Py_ssize_t n_qkv, qkv, q, k, v, out, merged, wo, bo,
                 double scale, Py_ssize_t block_q, Py_ssize_t block_k, int num_threads,
                 packed=None, bint fused=False):
        # fused is a request: shapes it cannot serve run unfused (see the
        # `fused` property)
        cdef cnp.ndarray M = <cnp.ndarray?>merged, QKV = <cnp.ndarray?>qkv
        if M.ndim != 2 or QKV.ndim != 4 or M.shape[0] != QKV.shape[0] * QKV.shape[2]:
            raise ValueError("ForwardPlan: merged must be (B * N, D) for qkv (B, G, N, E)")
        if num_threads < 1:
            raise ValueError("ForwardPlan: num_threads must be positive")
        self.keep = [wq, bq, qkv, q, k, v, out, merged, wo, bo]
        self.packed = packed
        self.owner = PyThread_get_thread_ident()
        self.num_threads = num_threads
        self.typ = cnp.PyArray_TYPE(M)
        self.dims[0] = QKV.shape[0]
        self.dims[1] = QKV.shape[2]
        self.dims[2] = M.shape[1]
        # merged stands in for x and y: the same (B * N, D) C-contiguous shape
        if not (M.flags.c_contiguous and M.shape[0] > 0 and M.shape[1] > 0
                and _linear_setup(&self.j_in, M, wq, bq, n_qkv, QKV, True)
                and _attention_setup(&self.P, self.keep, q, k, v, out, None, None, None, None,
                                     False, scale, block_q, block_k, num_threads, None, None)
                and _linear_setup(&self.j_out, M, wo, bo, M.shape[1], M, False)):
            raise ValueError("ForwardPlan: empty or mismatched operands")
        self.kernel_seconds = 0.0
        self.panels = NULL
        if fused:
            self._plan_units()

    cdef bint _reads_projected(self, Operand op, int64_t g0):
        """Whether op's head h, row n, column e is the element the Q/K/V
        projection writes for group g0 + h, for every batch entry."""
        cdef const fa_out_layout* lay = &self.j_in.lay
        cdef int64_t isz = _itemsize(&self.j_in), b
        if op.s_head != lay.g_stride or op.s_row != lay.head_dim or op.s_col != 1:
            return False
        for b in range(self.P.lead_count):
            if _at(&op, b, 0, 0, 0, isz) != self.j_in.y + (b * lay.b_stride + g0 * lay.g_stride) * isz:
                return False
        return True

    @property
    def fused(self):
        """Whether run() projects and attends one (batch entry, K/V head) at a time."""
        return self.panels != NULL

    cdef _plan_units(self):
        """Lists each K/V head's weight panels (its group's Q heads, then K,
        then V) for _fused_run, where the shape allows: no panel may straddle
        two heads, the tiles must not run row by row, and q, k and v must be
        the heads the projection writes (qkv[:, :H], [:, H:H + Hkv], the rest),
        since a unit attends right after projecting its own."""
        cdef int64_t E = self.j_in.lay.head_dim, H = self.P.heads
        cdef int64_t g = self.P.kv_group, hkv = H // g
        cdef int64_t nr = fa_col_align_f32() if self.j_in.is_f32 else fa_col_align_f64()
        if (self.P.row_mode or E % nr or self.P.len_q != self.P.len_k or self.P.dim != E
                or self.P.dim_v != E or not self._reads_projected(self.P.q, 0)
                or not self._reads_projected(self.P.k, H)
                or not self._reads_projected(self.P.v, H + hkv)):
            return
        cdef int64_t hp = E // nr, hk, j, c
        lists = []
        for hk in range(hkv):
            cols = [(hk * g + j) * E for j in range(g)]          # its queries
            cols += [(H + hk) * E, (H + hkv + hk) * E]          # its K and V
            lists.append([c // nr + j for c in cols for j in range(hp)])
        arr = np.ascontiguousarray(lists, dtype=np.int64)
        self.keep.append(arr)
        self.per_unit = arr.shape[1]
        self.panels = <const int64_t*>cnp.PyArray_DATA(arr)

    cdef bint _fits(self, x):
        if type(x) is not np.ndarray:
            return False
        cdef cnp.ndarray X = <cnp.ndarray>x
        # (the type number does not say the byte order: >f4 is NPY_FLOAT too)
        return (cnp.PyArray_TYPE(X) == self.typ and cnp.PyArray_ISNOTSWAPPED(X)
                and cnp.PyArray_NDIM(X) == 3
                and cnp.PyArray_DIMS(X)[0] == self.dims[0]
                and cnp.PyArray_DIMS(X)[1] == self.dims[1]
                and cnp.PyArray_DIMS(X)[2] == self.dims[2]
                and cnp.PyArray_IS_C_CONTIGUOUS(X) and cnp.PyArray_ISALIGNED(X))

    def run_if(self, x, packed, int num_threads):
        """:meth:`run` when x fits the plan, the weights are still those of
        ``packed`` (the module's current packed-weights dict), the thread
        count is the plan's and the calling thread made the plan; else None.
        All checked here, in C: a call's Python work stays a few operations."""
        if (self.num_threads < 1 or packed is not self.packed or num_threads != self.num_threads
                or PyThread_get_thread_ident() != self.owner or not self._fits(x)):
            return None
        return self._run(<cnp.ndarray>x)

    def run(self, x):
        """y (B, N, D), a new array, for x (B, N, D) C-contiguous of the plan's dtype."""
        if self.num_threads < 1:
            raise ValueError("ForwardPlan.run: the plan was never initialised")
        if not self._fits(x):
            raise ValueError(f"ForwardPlan.run: x must be a C-contiguous, aligned ndarray of "
                             f"shape ({self.dims[0]}, {self.dims[1]}, {self.dims[2]}) and the "
                             f"plan's dtype, got {type(x).__name__} {getattr(x, 'shape', '')} "
                             f"{getattr(x, 'dtype', '')}")
        return self._run(<cnp.ndarray>x)

    cdef cnp.ndarray _run(self, cnp.ndarray X):
        # (x already checked by the caller)
        cdef cnp.ndarray Y = cnp.PyArray_EMPTY(3, self.dims, self.typ, 0)
        cdef LinearJob* j_in = &self.j_in
        cdef LinearJob* j_out = &self.j_out
        cdef Problem* P = &self.P
        cdef int nt = self.num_threads, rc
        j_in.x = <char*>cnp.PyArray_DATA(X)
        j_out.y = <char*>cnp.PyArray_DATA(Y)
        cdef double t0, t1
        with nogil:
            t0 = _seconds()
            # a unit writes merged rows that a later unit's projection would
            # read, were x to share them (no such x comes from the module)
            if self.panels != NULL and not _overlap(j_in.x, j_out.x, j_in.m * j_in.k * _itemsize(j_in)):
                if j_in.is_f32:
                    rc = _fused_run(j_in, P, self.panels, self.per_unit, nt, <float*>NULL)
                else:
                    rc = _fused_run(j_in, P, self.panels, self.per_unit, nt, <double*>NULL)
            else:
                rc = _linear_job_run(j_in, nt)
                if rc == 0:
                    rc = _attention_run(P, nt)
            if rc == 0:
                rc = _linear_job_run(j_out, nt)
            t1 = _seconds()
        self.kernel_seconds = t1 - t0
        if rc != 0:
            raise MemoryError("could not allocate the kernels' scratch buffers")
        return Y
