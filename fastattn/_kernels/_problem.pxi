# The attention problem (Problem, declared in _table.pxd): the checks of the
# operands that fill it, the layout derived from the caller's schedule and the
# build's alignments, and the team that runs it.  Compiled once, in the
# driver; the items it runs are the table's (see _attention.pxi).
#
# Contract with the caller (fastattn.functional, which validates first):
# every array has the layout (*lead, heads, rows, cols) with the same lead
# shape, element strides (itemsize divides every stride), unit stride on the
# last axis of q, k, v and out, and weights C-contiguous.  Masks come as
# broadcast views of the full (*lead, H, Lq, Lk) shape (stride 0 where
# broadcast).  The schedule (block sizes, row mode, key splits) comes from
# fastattn._policy; the checks here only refuse what the drivers cannot run.


# An unbounded side of the band (large, but far from overflowing int64 sums).
cdef int64_t BAND_OPEN = 1 << 40


cdef inline int64_t _round_up(int64_t x, int64_t m) noexcept nogil:
    return ((x + m - 1) // m) * m


cdef inline int _store_of(int typenum) noexcept nogil:
    """The storage code of a NumPy type number: 16-bit words are bfloat16
    (fastattn hands ml_dtypes.bfloat16 arrays over as uint16 views)."""
    if typenum == cnp.NPY_UINT16:
        return STORE_BF16
    if typenum == cnp.NPY_FLOAT16:
        return STORE_F16
    return STORE_SAME


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


cdef bint _attention_setup(const KernelTable* t, Problem* P_, list keep, q, k, v, out, weights, bmask1, bmask2,
                           fmask, bint causal, double scale, tuple schedule, window,
                           slopes, double softcap=0.0, sinks=None, lse=None) except -1:
    """Validates the operands and the schedule and fills P_ (arrays it points
    into go to `keep`); False when there is nothing to compute.

    schedule: (block_q, block_k, row_mode, n_splits[, pairs]), as fastattn._policy's
    attention_schedule returns it.  softcap: 0 (off) or the cap; sinks: float64,
    one per query head, or None; lse: a C-contiguous (*lead, H, Lq) array of the
    computation's dtype for each row's log-sum-exp, or None.
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
    cdef bint pairs = False
    if len(schedule) == 5:
        block_q, block_k, row_mode, n_splits, pairs = schedule
    else:
        block_q, block_k, row_mode, n_splits = schedule
    if nlead < 0:
        raise ValueError("kernel operands need at least 3 axes")
    cdef int ktyp = cnp.PyArray_TYPE(K), ctyp = typ
    if cnp.PyArray_TYPE(O) != typ or cnp.PyArray_TYPE(V) != ktyp:
        raise TypeError("kernel operands: q and out, and k and v, must share a dtype")
    P.q_store = _store_of(typ)
    P.kv_store = _store_of(ktyp)
    if P.q_store or P.kv_store:
        # 16-bit operands are widened to float32 where they are packed
        ctyp = cnp.NPY_FLOAT32
        if (not P.q_store and typ != ctyp) or (not P.kv_store and ktyp != ctyp):
            raise TypeError("kernel operands: 16-bit storage mixes with float32 only")
    elif ktyp != typ:
        raise TypeError("kernel operands must share one dtype")
    P.elem = t.elem_of(ctyp)
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
    if pairs and not (t.pairs and P.q_store == STORE_BF16 and P.kv_store == STORE_BF16
                      and not row_mode and not P.has_weights and qdims[nlead + 2] % 2 == 0):
        raise ValueError("kernel schedule: pair products need a build with AVX512-BF16, "
                         "bfloat16 q, k and v of an even head width, tiles and no weights")
    P.pairs = pairs
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
    cdef object cdtype = np.dtype(np.float32) if ctyp != typ or ktyp != typ else q.dtype
    if fmask is not None and fmask.dtype != cdtype:
        raise TypeError("kernel float mask must have the computation's dtype")
    if weights is not None and weights.dtype != cdtype:
        raise TypeError("kernel weights must have the computation's dtype")
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
    cdef object info = np.finfo(np.float32 if t.elem_size(P.elem) == 4 else np.float64)
    if not (softcap == 0 or float(info.tiny) <= softcap <= float(info.max)):
        raise ValueError("kernel softcap must be 0 (off), or positive, normal and finite in "
                         "the computation's type")
    P.softcap = softcap
    P.sinks = NULL
    if sinks is not None:
        sink_arr = np.ascontiguousarray(sinks, dtype=np.float64)
        if sink_arr.ndim != 1 or sink_arr.shape[0] != P.heads:
            raise ValueError("kernel sinks must have one entry per query head")
        keep.append(sink_arr)
        P.sinks = <const double*>cnp.PyArray_DATA(<cnp.ndarray>sink_arr)
    P.lse = NULL
    if lse is not None:
        if (lse.shape != q.shape[:nlead] + (P.heads, P.len_q) or not lse.flags.c_contiguous
                or lse.dtype != cdtype or not lse.flags.writeable):
            raise ValueError("kernel lse must be a C-contiguous (*lead, H, Lq) array of the "
                             "computation's dtype")
        P.lse = <char*>cnp.PyArray_DATA(<cnp.ndarray?>lse)
    P.lse_s_head = P.len_q
    if P.lead_count == 0 or P.heads == 0 or P.len_q == 0 or (P.dim_v == 0 and not P.has_weights):
        return False
    P.row_mode = row_mode
    P.n_splits = n_splits
    _setup_blocks(t, &P, block_q, block_k)
    if P.n_splits > 1:
        P.parts_stride = P.dim_v + 2
        parts = np.empty(P.lead_count * P.heads * P.len_q * P.n_splits * P.parts_stride,
                         dtype=cdtype)
        keep.append(parts)
        P.parts = <char*>cnp.PyArray_DATA(parts)
    P_[0] = P
    return True


cdef void _setup_blocks(const KernelTable* t, Problem* P, int64_t block_q,
                        int64_t block_k) noexcept nogil:
    """The tile layout of the requested block sizes in t's build."""
    cdef int64_t ra = t.row_align(P.elem), ca = t.col_align(P.elem)
    # queries run along vector lanes: a block is a whole number of NR lanes
    P.block_q = _round_up(min(block_q, max(P.len_q, 1)), ca)
    P.block_k = min(block_k, max(P.len_k, 1))
    P.n_qblocks = (P.len_q + P.block_q - 1) // P.block_q
    P.lanes = P.block_q
    P.tail_len = ra * max(P.dim, P.block_k)
    P.keys_pad = _round_up(P.block_k, ca)
    P.dimv_pad = _round_up(P.dim_v, ca)
    # a tile's block of widened keys or values, query block and finished
    # output rows (rows widen 16-bit keys and values as they load them)
    P.half_len = 0
    if (P.q_store or P.kv_store) and not P.row_mode:
        P.half_len = max(P.dim, P.dim_v) * max(P.block_k, P.lanes)
        if P.pairs:
            # V^T and P^T in pairs side by side (see _tile_pairs)
            P.half_len = max(P.half_len, ((P.block_k + 1) // 2) * (P.dim_v + P.lanes))


cdef inline int64_t _scratch_elems(const Problem* P) noexcept nogil:
    """Per-thread scratch, in elements: Q^T, S^T, O^T, one key block's part of
    O^T, m, l, the block max and the tail panel (row mode: scores, accumulator,
    one block's part of it, query)."""
    if P.row_mode:
        return P.keys_pad + 2 * P.dimv_pad + P.dim + 16
    return (P.dim + P.block_k + 2 * P.dim_v + 3) * P.lanes + P.tail_len + P.half_len


cdef int _attention_run(const KernelTable* t, const Problem* P, int num_threads) noexcept nogil:
    """Runs a set-up problem on t's items; 0, or -1 when a thread's scratch
    could not be had."""
    cdef Team T
    T.job = P
    T.scratch_bytes = _scratch_elems(P) * t.elem_size(P.elem)
    T.after = NULL
    T.n_after = 0
    T.item = t.attention_item(P.elem)
    if P.row_mode:
        T.n_items = P.lead_count * P.heads * P.n_splits
        if P.n_splits > 1:
            # each row's splits are merged once all are written
            T.after = t.merge_row(P.elem)
            T.n_after = P.lead_count * P.heads * P.len_q
    else:
        T.n_items = P.lead_count * P.heads * P.n_qblocks
    return run_team(&T, num_threads)
