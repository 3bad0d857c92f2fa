# The projection y = x @ W.T + bias on weights packed once (pack_weight, in
# _driver.pyx): its checks (_linear_setup) and the team that runs it.
# Compiled once, in the driver; its work item (_linear_item: a block of rows
# against a block of weight panels) is the table's (see _items.pxi).


def _aligned_empty(Py_ssize_t n, dtype):
    """A 1-D array of n elements whose data starts on a 64-byte boundary."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(n + 64 // itemsize, dtype=dtype)
    skip = (-raw.ctypes.data % 64) // itemsize
    return raw[skip:skip + n]


cdef int _dtype_elem(const KernelTable* t, dtype) except -1:
    cdef int elem = t.elem_of(np.dtype(dtype).num)
    if elem < 0 or not np.dtype(dtype).isnative:
        raise TypeError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
    return elem


cdef inline int64_t _linear_scratch_elems(const KernelTable* t,
                                          const LinearJob* J) noexcept nogil:
    """Per-thread scratch of fa_linear_block, in elements: one FA_MR x NR tile
    and FA_MR rows of one K chunk."""
    return t.row_align(J.elem) * (t.col_align(J.elem) + J.kc)


cdef int _linear_run(const KernelTable* t, const LinearJob* J, int num_threads) noexcept nogil:
    cdef Team T
    T.job = J
    T.item = t.linear_item(J.elem)
    T.after = NULL
    T.n_items = J.row_blocks * J.panel_blocks
    T.n_after = 0
    T.scratch_bytes = _linear_scratch_elems(t, J) * t.elem_size(J.elem)
    return run_team(&T, num_threads)


cdef int _rotary_setup(fa_rotary* R, rotary, int64_t m, int64_t n_out, int wtyp) except -1:
    """Fills R from ``rotary`` = (table, positions, cols, head_dim, rot_dim), as
    fa_rotary describes, or empties it for None.  Every table row the
    positions name is checked to exist: the epilogue reads them unchecked."""
    memset(R, 0, sizeof(fa_rotary))
    if rotary is None:
        return 0
    table, pos, cols, head_dim, rot_dim = rotary
    cdef cnp.ndarray T = <cnp.ndarray?>table, Pn = <cnp.ndarray?>pos
    if (T.ndim != 2 or not T.flags.c_contiguous or cnp.PyArray_TYPE(T) != wtyp
            or T.shape[1] != 2 * rot_dim or not T.flags.aligned):
        raise ValueError("linear: the rotary table must be a C-contiguous (positions, "
                         "2 * rot_dim) array of the weights' dtype")
    if (Pn.ndim != 1 or Pn.shape[0] != m or not Pn.flags.c_contiguous
            or cnp.PyArray_TYPE(Pn) != cnp.NPY_INT64 or not Pn.flags.aligned):
        raise ValueError("linear: rotary positions must be one int64 table row per x row")
    if (head_dim < 2 or head_dim % 2 or rot_dim < 2 or rot_dim % 2 or rot_dim > head_dim
            or cols < 0 or cols > n_out or cols % head_dim):
        raise ValueError("linear: rotary needs even head and rotary widths and whole heads")
    cdef const int64_t* p = <const int64_t*>cnp.PyArray_DATA(Pn)
    cdef int64_t i, n = T.shape[0]
    for i in range(m):
        if p[i] < 0 or p[i] >= n:
            raise ValueError("linear: a rotary position names no table row")
    R.table = cnp.PyArray_DATA(T)
    R.pos = p
    R.cols = cols
    R.head_dim = head_dim
    R.rot_dim = rot_dim
    return 0


cdef bint _linear_setup(const KernelTable* t, LinearJob* J_, x, packed, bias,
                        Py_ssize_t n_out, out, bint head_major, tuple blocking,
                        rotary=None) except -1:
    """Validates the operands of :func:`linear` and fills J_; False when the
    product was trivial and is already written (no rows, no columns, k == 0).
    rotary: see _rotary_setup."""
    cdef cnp.ndarray X = <cnp.ndarray?>x, Y = <cnp.ndarray?>out, Wp = <cnp.ndarray?>packed
    cdef cnp.ndarray Bp
    cdef Py_ssize_t rows_per_item, panels_per_item, kc
    rows_per_item, panels_per_item, kc = blocking
    if rows_per_item < 1 or panels_per_item < 1 or kc < 1:
        raise ValueError("linear: the blocking must be positive")
    if head_major:
        if (Y.ndim != 4 or not Y.flags.c_contiguous or X.ndim != 2
                or X.shape[0] != Y.shape[0] * Y.shape[2] or Y.shape[1] * Y.shape[3] != n_out):
            raise ValueError("linear: head-major out must be C-contiguous (B, G, N, E) with "
                             "B * N == x rows and G * E == n_out")
    elif X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0] or Y.shape[1] != n_out:
        raise ValueError("linear: x must be (m, k) and out (m, n_out)")
    # weights packed in bfloat16 pairs (uint16) multiply in float32 sums; x and
    # out may each be float32 or 16-bit beside float32 weights or pairs
    cdef bint pairs = cnp.PyArray_TYPE(Wp) == cnp.NPY_UINT16
    cdef int wtyp = cnp.NPY_FLOAT32 if pairs else cnp.PyArray_TYPE(Wp)
    cdef int x_store = _store_of(cnp.PyArray_TYPE(X)), y_store = _store_of(cnp.PyArray_TYPE(Y))
    if pairs and not t.pairs:
        raise TypeError("linear: weights packed in bfloat16 pairs need a build with AVX512-BF16")
    if ((not x_store and cnp.PyArray_TYPE(X) != wtyp) or (not y_store and cnp.PyArray_TYPE(Y) != wtyp)
            or ((x_store or y_store) and wtyp != cnp.NPY_FLOAT32)
            or (bias is not None and cnp.PyArray_TYPE(bias) != wtyp)):
        raise TypeError("linear: x, out, weight and bias must share one dtype (x and out "
                        "may be 16-bit beside float32)")
    cdef int elem = t.elem_of(wtyp)
    if elem < 0:
        raise TypeError(f"linear: dtype must be float32 or float64, got {Wp.dtype}")
    cdef int64_t isz = X.itemsize, ysz = Y.itemsize
    cdef int64_t m = X.shape[0], k = X.shape[1]
    if m == 0 or n_out == 0:
        return False  # (empty arrays may carry any strides)
    if (X.strides[1] != isz and k > 1) or (not head_major and Y.strides[1] != ysz and n_out > 1):
        raise ValueError("linear: x and out need a unit stride on their last axis")
    if X.strides[0] % isz or (not head_major and Y.strides[0] % ysz):
        raise ValueError("linear: strides must be multiples of the item size")
    cdef int64_t nr = t.col_align(elem)
    if (Wp.size != (t.pairs_packed_len(n_out, k) if pairs else t.packed_len(elem, n_out, k))
            or (<size_t>cnp.PyArray_DATA(Wp)) % 64):
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
    _rotary_setup(&J.rot, rotary, m, n_out, wtyp)
    J.elem = elem
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
        J.lay.ldy = Y.strides[0] // ysz
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
    J.rows_per_item = rows_per_item
    J.panels_per_item = panels_per_item
    J.kc = kc
    J.x_store = x_store
    J.y_store = y_store
    J.pairs = pairs
    if y_store:
        # a chunk's partial sums would be rounded to 16 bits between chunks
        J.kc = k
    elif pairs and kc % 2:
        # chunks start on whole pairs
        J.kc = kc + 1
    J.row_blocks = (m + rows_per_item - 1) // rows_per_item
    J.panel_blocks = (J.panels + panels_per_item - 1) // panels_per_item
    J_[0] = J
    return True
