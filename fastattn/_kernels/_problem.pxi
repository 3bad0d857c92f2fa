# The attention problem: its description (Problem), the checks of the
# operands that fill it, and the layout derived from the caller's schedule.
#
# Contract with the caller (fastattn.functional, which validates first):
# every array has the layout (*lead, heads, rows, cols) with the same lead
# shape, element strides (itemsize divides every stride), unit stride on the
# last axis of q, k, v and out, and weights C-contiguous.  Masks come as
# broadcast views of the full (*lead, H, Lq, Lk) shape (stride 0 where
# broadcast).  The schedule (block sizes, row mode, key splits) comes from
# fastattn._policy; the checks here only refuse what the drivers cannot run.


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
    bint row_mode               # one query row at a time (see _row_tile)
    int elem                    # element type (index into the template's list)
    int64_t keys_pad, dimv_pad  # row mode: block_k and dim_v rounded to NR
    double scale


# An unbounded side of the band (large, but far from overflowing int64 sums).
cdef int64_t BAND_OPEN = 1 << 40


cdef inline int64_t _round_up(int64_t x, int64_t m) noexcept nogil:
    return ((x + m - 1) // m) * m


cdef inline char* _at(const Operand* a, int64_t b, int64_t head, int64_t row, int64_t col,
                      int64_t itemsize) noexcept nogil:
    cdef int64_t lead = a.lead_off[b] if a.lead_off != NULL else b * a.s_lead
    return a.base + (lead + head * a.s_head + row * a.s_row + col * a.s_col) * itemsize


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


cdef bint _attention_setup(Problem* P_, list keep, q, k, v, out, weights, bmask1, bmask2,
                           fmask, bint causal, double scale, tuple schedule, window,
                           slopes) except -1:
    """Validates the operands and the schedule and fills P_ (arrays it points
    into go to `keep`); False when there is nothing to compute.

    schedule: (block_q, block_k, row_mode, n_splits), as fastattn._policy's
    attention_schedule returns it.
    """
    cdef Problem P
    cdef cnp.ndarray slope_arr
    cdef Py_ssize_t block_q, block_k, n_splits
    cdef bint row_mode
    # the checks read shapes, strides and dtypes through the C API: as Python
    # attribute reads they cost microseconds per call, on every forward
    cdef cnp.ndarray Q = <cnp.ndarray?>q, K = <cnp.ndarray?>k, V = <cnp.ndarray?>v
    cdef cnp.ndarray O = <cnp.ndarray?>out
    cdef cnp.ndarray A
    cdef int nlead = cnp.PyArray_NDIM(Q) - 3
    cdef int d, typ = cnp.PyArray_TYPE(Q)
    cdef cnp.npy_intp* qdims = cnp.PyArray_DIMS(Q)
    memset(&P, 0, sizeof(Problem))
    block_q, block_k, row_mode, n_splits = schedule
    if nlead < 0:
        raise ValueError("kernel operands need at least 3 axes")
    if cnp.PyArray_TYPE(K) != typ or cnp.PyArray_TYPE(V) != typ or cnp.PyArray_TYPE(O) != typ:
        raise TypeError("kernel operands must share one dtype")
    P.elem = _elem_of(typ)
    if P.elem < 0:
        raise TypeError(f"kernel dtype must be float32 or float64, got {q.dtype}")
    if not (cnp.PyArray_ISNOTSWAPPED(Q) and cnp.PyArray_ISNOTSWAPPED(K)
            and cnp.PyArray_ISNOTSWAPPED(V) and cnp.PyArray_ISNOTSWAPPED(O)):
        raise TypeError("kernel operands must be in native byte order")
    if block_q < 1 or block_k < 1 or n_splits < 1:
        raise ValueError("block sizes and split count must be positive")
    if n_splits > 1 and not row_mode:
        raise ValueError("kernel schedule: key splits need row mode")
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
    if row_mode and P.has_weights:
        # a row keeps no scores to hand back
        raise ValueError("kernel schedule: the weights path has no row mode")
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
    P.row_mode = row_mode
    P.n_splits = n_splits
    _setup_blocks(&P, block_q, block_k)
    if P.n_splits > 1:
        P.parts_stride = P.dim_v + 2
        parts = np.empty(P.lead_count * P.heads * P.len_q * P.n_splits * P.parts_stride,
                         dtype=q.dtype)
        keep.append(parts)
        P.parts = <char*>cnp.PyArray_DATA(parts)
    P_[0] = P
    return True


cdef void _setup_blocks(Problem* P, int64_t block_q, int64_t block_k) noexcept nogil:
    """The tile layout of the requested block sizes in this build."""
    cdef int64_t ra = _row_align(P.elem), ca = _col_align(P.elem)
    # queries run along vector lanes: a block is a whole number of NR lanes
    P.block_q = _round_up(min(block_q, max(P.len_q, 1)), ca)
    P.block_k = min(block_k, max(P.len_k, 1))
    P.n_qblocks = (P.len_q + P.block_q - 1) // P.block_q
    P.lanes = P.block_q
    P.tail_len = ra * max(P.dim, P.block_k)
    P.keys_pad = _round_up(P.block_k, ca)
    P.dimv_pad = _round_up(P.dim_v, ca)
