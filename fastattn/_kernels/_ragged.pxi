# Attention over sequences of their own lengths, in one team: packed
# variable-length batches (fastattn.varlen_attention, m(x, cu_seqlens=...))
# and caches whose sequences hold different numbers of positions.  Each
# sequence gets a Problem of its own, copied from one checked template and
# pointed at its rows; the team's items are (sequence, item) pairs, longest
# sequences first, so that one long sequence is not left for last while the
# other threads idle.  Compiled once, in the driver; the items are
# _attention.pxi's, reached through the table's multi_* trampolines.


cdef int64_t[::1] _lengths(object arr, Py_ssize_t n, str name):
    """An int64 array of n entries >= 0 (the caller, fastattn.functional,
    made it; checked again because the items read memory by it)."""
    cdef cnp.ndarray a = np.ascontiguousarray(arr, dtype=np.int64)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"attention_ragged: {name} must hold one entry per sequence")
    cdef int64_t[::1] view = a
    cdef Py_ssize_t i
    for i in range(n):
        if view[i] < 0:
            raise ValueError(f"attention_ragged: {name} must be >= 0")
    return view


cdef int _ragged_run(const KernelTable* t, q, k, v, out, lens_q, lens_k, starts_q, starts_k,
                     bint causal, double scale, tuple schedule, int num_threads, window,
                     slopes, double softcap, sinks, lse) except -1:
    cdef Problem P
    cdef list keep = []
    if len(schedule) not in (4, 5):
        raise ValueError("attention_ragged: the schedule is (block_q, block_k, row_mode, "
                         "n_splits[, pairs])")
    if lse is not None and (not isinstance(lse, tuple) or len(lse) != 3):
        raise ValueError("attention_ragged: lse is (array, offsets, elements between heads)")
    cdef Py_ssize_t block_q = schedule[0], block_k = schedule[1]
    cdef cnp.ndarray Q = <cnp.ndarray?>q, K = <cnp.ndarray?>k
    if Q.ndim != 4 or K.ndim != 4:
        raise ValueError("attention_ragged: operands need exactly one leading axis")
    cdef Py_ssize_t n = np.shape(lens_q)[0] if np.ndim(lens_q) == 1 else -1
    if n < 0:
        raise ValueError("attention_ragged: lens_q must be one-dimensional")
    cdef int64_t[::1] lq = _lengths(lens_q, n, "lens_q"), lk = _lengths(lens_k, n, "lens_k")
    cdef int64_t[::1] sq, sk
    cdef bint packed_q = starts_q is not None, packed_k = starts_k is not None
    if packed_q:
        sq = _lengths(starts_q, n, "starts_q")
    if packed_k:
        sk = _lengths(starts_k, n, "starts_k")
    # the template: dtypes, shapes, strides and the schedule, checked once
    if not _attention_setup(t, &P, keep, q, k, v, out, None, None, None, None, causal, scale,
                            schedule, window, slopes, softcap, sinks, None):
        return 0
    cdef int64_t s, b, h, w, c, total = 0, total_after = 0, part_off = 0, most = 0
    if (Q.shape[0] != (1 if packed_q else n)) or (K.shape[0] != (1 if packed_k else n)):
        raise ValueError("attention_ragged: the leading axis is 1 for packed operands (with "
                         "starts) or one entry per sequence")
    # (each bound compared without a sum that could overflow)
    for s in range(n):
        if lq[s] > P.len_q or (packed_q and sq[s] > P.len_q - lq[s]):
            raise ValueError("attention_ragged: a sequence's queries run past q's rows")
        if lk[s] > P.len_k or (packed_k and sk[s] > P.len_k - lk[s]):
            raise ValueError("attention_ragged: a sequence's keys run past k's rows")
    # lse: (array, per-sequence element offsets, elements between heads)
    cdef cnp.ndarray L_arr
    cdef int64_t[::1] l_off
    cdef int64_t l_head = 0
    if lse is not None:
        L_arr = <cnp.ndarray?>lse[0]
        l_off = _lengths(lse[1], n, "lse offsets")
        l_head = lse[2]
        if (not L_arr.flags.c_contiguous or not L_arr.flags.writeable or l_head < 0
                or cnp.PyArray_TYPE(L_arr)
                != (cnp.NPY_FLOAT32 if t.elem_size(P.elem) == 4 else cnp.NPY_FLOAT64)):
            raise ValueError("attention_ragged: lse must be C-contiguous in the computation's "
                             "dtype")
        if P.heads > 1 and l_head > (L_arr.size - 1) // (P.heads - 1):
            raise ValueError("attention_ragged: the lse's heads run past the array")
        for s in range(n):
            if lq[s] and (lq[s] > L_arr.size or l_off[s] > L_arr.size - lq[s]
                          - (P.heads - 1) * l_head):
                raise ValueError("attention_ragged: a sequence's lse runs past the array")
    cdef int64_t qsz = 2 if P.q_store else t.elem_size(P.elem)
    cdef int64_t ksz = 2 if P.kv_store else t.elem_size(P.elem)
    cdef int64_t csz = t.elem_size(P.elem)
    problems = np.empty(max(n, 1) * sizeof(Problem), dtype=np.uint8)
    cdef Problem* Ps = <Problem*>cnp.PyArray_DATA(<cnp.ndarray>problems)
    cdef int64_t[::1] n_items = np.zeros(max(n, 1), dtype=np.int64)
    cdef int64_t[::1] n_after = np.zeros(max(n, 1), dtype=np.int64)
    cdef Problem* S
    for s in range(n):
        Ps[s] = P
        S = &Ps[s]
        b = 0 if packed_q else s
        # each operand now starts at this sequence's row 0: one lead, no table
        S.q.base = _at(&P.q, b, 0, sq[s] if packed_q else 0, 0, qsz)
        S.out.base = _at(&P.out, b, 0, sq[s] if packed_q else 0, 0, qsz)
        b = 0 if packed_k else s
        S.k.base = _at(&P.k, b, 0, sk[s] if packed_k else 0, 0, ksz)
        S.v.base = _at(&P.v, b, 0, sk[s] if packed_k else 0, 0, ksz)
        S.q.lead_off = S.k.lead_off = S.v.lead_off = S.out.lead_off = NULL
        S.q.s_lead = S.k.s_lead = S.v.s_lead = S.out.s_lead = 0
        S.lead_count = 1
        S.len_q = lq[s]
        S.len_k = lk[s]
        S.causal_offset = lk[s] - lq[s]
        _setup_blocks(t, S, block_q, block_k)
        S.lse = NULL
        if lse is not None:
            S.lse = <char*>cnp.PyArray_DATA(L_arr) + l_off[s] * csz
            S.lse_s_head = l_head
        if S.len_q == 0:
            continue
        if S.row_mode:
            n_items[s] = S.heads * S.n_splits
            if S.n_splits > 1:
                # (an offset for now: the buffer is sized below, for these)
                S.parts = <char*>(part_off * csz)
                part_off += S.heads * S.len_q * S.n_splits * S.parts_stride
                n_after[s] = S.heads * S.len_q
        else:
            n_items[s] = S.heads * S.n_qblocks
        total += n_items[s]
        total_after += n_after[s]
        most = max(most, _scratch_elems(S))
    if total == 0:
        return 0
    if part_off:
        # the split-K partial results of every sequence, sized by their own
        # lengths (the template's buffer is not: packed sequences may overlap)
        parts = np.empty(part_off, dtype=np.float32 if csz == 4 else np.float64)
        keep.append(parts)
        for s in range(n):
            if n_after[s]:
                Ps[s].parts = <char*>cnp.PyArray_DATA(<cnp.ndarray>parts) + <size_t>Ps[s].parts
    # longest sequences first (by keys times queries): with items taken
    # dynamically, what is left at the end is short
    order = np.argsort(-(np.asarray(lq) * np.maximum(np.asarray(lk), 1)), kind="stable")
    items = np.empty(2 * total, dtype=np.int64)
    after = np.empty(2 * max(total_after, 1), dtype=np.int64)
    cdef int64_t[::1] it = items, af = after, od = order.astype(np.int64)
    c = 0
    w = 0
    for h in range(n):
        s = od[h]
        for b in range(n_items[s]):
            it[2 * c] = s
            it[2 * c + 1] = b
            c += 1
        for b in range(n_after[s]):
            af[2 * w] = s
            af[2 * w + 1] = b
            w += 1
    cdef MultiJob M
    M.problems = Ps
    M.items = &it[0]
    M.after = &af[0]
    cdef Team T
    T.job = &M
    T.item = t.multi_attention_item(P.elem)
    T.after = t.multi_merge_row(P.elem) if total_after else NULL
    T.n_items = total
    T.n_after = total_after
    T.scratch_bytes = most * csz
    cdef int rc
    with nogil:
        rc = run_team(&T, num_threads)
    if rc != 0:
        raise MemoryError("could not allocate the attention kernel's scratch buffers")
    return 0
