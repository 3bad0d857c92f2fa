# One self-attention forward (Q/K/V projection, attention, output
# projection) prepared once per shape: ForwardPlan, and the team of the
# one-head-at-a-time schedule it may run (its item, _per_head_item, is the
# table's: see _items.pxi).  Compiled once, in the driver; a plan runs the
# items of the build whose ForwardPlan made it (Kernels.ForwardPlan).

from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef int _per_head_run(const KernelTable* t, const PerHeadJob* J, int num_threads) noexcept nogil:
    cdef Team T
    T.job = J
    T.item = t.per_head_item(J.attn.elem)
    T.after = NULL
    T.n_items = J.attn.lead_count * (J.attn.heads // J.attn.kv_group)
    T.n_after = 0
    T.scratch_bytes = (max(_linear_scratch_elems(t, J.proj), _scratch_elems(J.attn))
                       * t.elem_size(J.attn.elem))
    return run_team(&T, num_threads)


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

    A call then only checks the input and runs: the Python between separate
    kernel calls would run with its code and data evicted from the caches by
    the GEMMs before it.  The buffers (head-major qkv, merged heads) and
    packed weights are the caller's; the plan keeps them alive.  Not for
    concurrent use.

    schedule is the attention's (fastattn._policy.attention_schedule),
    blocking both projections' (fastattn._policy.linear_blocking; both read
    rows of merged's width).  With ``per_head``, the first two calls become
    one: each work item projects one (batch entry, K/V head) and attends it
    at once (see _per_head_item).  The results are bit for bit the same.  A
    call whose x shares memory with merged runs the three calls apart (a
    unit's output would feed a later unit's input).

    token and owner are the caller's: :meth:`run_if` runs only for the same
    token (compared by identity) and an equal owner.

    Made through a build's subclass (``fastattn._kernels._<isa>.ForwardPlan``,
    see Kernels), whose ``_kernels`` names the table the plan runs on.
    """
    cdef const KernelTable* table
    cdef LinearJob j_in, j_out
    cdef Problem P
    cdef PerHeadJob units
    cdef list keep
    cdef bint by_head            # per_head granted (see _plan_units)
    cdef object token, owner
    cdef int num_threads, typ
    cdef cnp.npy_intp dims[3]
    cdef readonly double kernel_seconds
    """Seconds the last :meth:`run` spent in the kernels (the rest is its own)."""

    def __init__(self, wq, bq, Py_ssize_t n_qkv, qkv, q, k, v, out, merged, wo, bo,
                 double scale, tuple schedule, tuple blocking, int num_threads, token=None,
                 owner=None, bint per_head=False):
        # per_head is a request: shapes it cannot serve run the three calls
        # apart (see the `per_head` property)
        cdef cnp.ndarray M = <cnp.ndarray?>merged, QKV = <cnp.ndarray?>qkv
        cdef Kernels kern = getattr(type(self), "_kernels", None)
        if kern is None:
            raise TypeError("ForwardPlan: make plans with a kernel build's ForwardPlan "
                            "(fastattn._kernels._<isa>.ForwardPlan)")
        self.table = kern.table
        if M.ndim != 2 or QKV.ndim != 4 or M.shape[0] != QKV.shape[0] * QKV.shape[2]:
            raise ValueError("ForwardPlan: merged must be (B * N, D) for qkv (B, G, N, E)")
        if num_threads < 1:
            raise ValueError("ForwardPlan: num_threads must be positive")
        self.keep = [wq, bq, qkv, q, k, v, out, merged, wo, bo]
        self.token = token
        self.owner = owner
        self.num_threads = num_threads
        self.typ = cnp.PyArray_TYPE(M)
        self.dims[0] = QKV.shape[0]
        self.dims[1] = QKV.shape[2]
        self.dims[2] = M.shape[1]
        # merged stands in for x and y: the same (B * N, D) C-contiguous shape
        cdef const KernelTable* t = self.table
        if not (M.flags.c_contiguous and M.shape[0] > 0 and M.shape[1] > 0
                and _linear_setup(t, &self.j_in, M, wq, bq, n_qkv, QKV, True, blocking)
                and _attention_setup(t, &self.P, self.keep, q, k, v, out, None, None, None, None,
                                     False, scale, schedule, None, None)
                and _linear_setup(t, &self.j_out, M, wo, bo, M.shape[1], M, False, blocking)):
            raise ValueError("ForwardPlan: empty or mismatched operands")
        self.kernel_seconds = 0.0
        self.by_head = False
        if per_head:
            self._plan_units()

    cdef bint _reads_projected(self, Operand op, int64_t g0):
        """Whether op's head h, row n, column e is the element the Q/K/V
        projection writes for group g0 + h, for every batch entry."""
        cdef const fa_out_layout* lay = &self.j_in.lay
        cdef int64_t isz = 2 if self.j_in.y_store else self.table.elem_size(self.j_in.elem), b
        if op.s_head != lay.g_stride or op.s_row != lay.head_dim or op.s_col != 1:
            return False
        for b in range(self.P.lead_count):
            if _at(&op, b, 0, 0, 0, isz) != self.j_in.y + (b * lay.b_stride + g0 * lay.g_stride) * isz:
                return False
        return True

    @property
    def per_head(self):
        """Whether run() projects and attends one (batch entry, K/V head) at a time."""
        return self.by_head

    cdef _plan_units(self):
        """Lists each K/V head's weight panels (its group's Q heads, then K,
        then V) for _per_head_item, where the shape allows: no panel may
        straddle two heads, the tiles must not run row by row, and q, k and v
        must be the heads the projection writes (qkv[:, :H], [:, H:H + Hkv],
        the rest), since a unit attends right after projecting its own."""
        cdef int64_t E = self.j_in.lay.head_dim, H = self.P.heads
        cdef int64_t g = self.P.kv_group, hkv = H // g
        cdef int64_t nr = self.table.col_align(self.j_in.elem)
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
        self.units.proj = &self.j_in
        self.units.attn = &self.P
        self.units.per_unit = arr.shape[1]
        self.units.panels = <const int64_t*>cnp.PyArray_DATA(arr)
        self.by_head = True

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

    def run_if(self, x, token, owner, int num_threads):
        """:meth:`run` when x fits the plan, ``token`` is the plan's (the same
        object), ``owner`` equals the plan's and the thread count is the
        plan's; else None.  All checked here, in C: a call's Python work
        stays a few operations."""
        if (self.num_threads < 1 or token is not self.token or num_threads != self.num_threads
                or not self._fits(x) or owner != self.owner):
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
        cdef int nt = self.num_threads, rc
        cdef const KernelTable* t = self.table
        j_in.x = <char*>cnp.PyArray_DATA(X)
        j_out.y = <char*>cnp.PyArray_DATA(Y)
        cdef double t0, t1
        with nogil:
            t0 = _seconds()
            # a unit writes merged rows that a later unit's projection would
            # read, were x to share them (no such x comes from the module)
            if self.by_head and not _overlap(j_in.x, j_out.x, j_in.m * j_in.k * (
                    2 if j_in.x_store else t.elem_size(j_in.elem))):
                rc = _per_head_run(t, &self.units, nt)
            else:
                rc = _linear_run(t, j_in, nt)
                if rc == 0:
                    rc = _attention_run(t, &self.P, nt)
            if rc == 0:
                rc = _linear_run(t, j_out, nt)
            t1 = _seconds()
        self.kernel_seconds = t1 - t0
        if rc != 0:
            raise MemoryError("could not allocate the kernels' scratch buffers")
        return Y
