# The driver: everything of the compiled layer that does not depend on the
# instruction set, compiled once and without -m flags (setup.py):
# the Python entry points and their checks, the struct setup, ForwardPlan and
# the one OpenMP team.  Each build of the kernels (_<isa>.pyx, _kernel.pxi)
# hands its work items and layout facts over as a KernelTable in a PyCapsule;
# a Kernels object binds the entry points to one such table.

from cpython.pycapsule cimport PyCapsule_GetPointer
from cython.parallel cimport parallel, prange
from libc.stdint cimport int64_t
from libc.stdlib cimport free
from libc.string cimport memset
cimport numpy as cnp
import numpy as np

from fastattn._kernels._table cimport (KernelTable, LinearJob, Operand, PerHeadJob, Problem,
                                       MultiJob, RotateJob,
                                      fa_rotary,
                                       STORE_BF16, STORE_F16, STORE_SAME, TABLE_CAPSULE, _at, fa_out_layout, item_fn)

cnp.import_array()

cdef extern from "fa_omp.h" nogil:
    int FA_OPENMP_ENABLED

cdef extern from "fa_common.h" nogil:
    void* fa_aligned_alloc(size_t nbytes)
    int fa_cpu_has_avx512()
    int fa_cpu_has_avx2()
    int fa_cpu_has_avx512bf16()

include "_skeleton.pxi"
include "_problem.pxi"
include "_linear.pxi"
include "_ragged.pxi"


def openmp_enabled():
    """True when the kernels were built with OpenMP (the team runs here)."""
    return bool(FA_OPENMP_ENABLED)


def cpu_features():
    """Instruction-set builds the running CPU supports (checked with cpuid)."""
    return {"avx512bf16": bool(fa_cpu_has_avx512bf16()), "avx512": bool(fa_cpu_has_avx512()),
            "avx2": bool(fa_cpu_has_avx2())}


cdef class Kernels:
    """The entry points of one build of the kernels: its module (``module``,
    e.g. fastattn._kernels._avx2) re-exports these bound methods, and
    ``ForwardPlan``, a subclass whose plans run on the same table.

    table: the build's KernelTable in a PyCapsule named TABLE_CAPSULE (the
    build keeps the struct itself, static, for the life of the process).
    """
    cdef const KernelTable* table
    cdef object capsule
    cdef readonly object ForwardPlan

    def __init__(self, table, str module):
        self.table = <const KernelTable*>PyCapsule_GetPointer(table, TABLE_CAPSULE())
        self.capsule = table
        # a class per build, so that kernels.ForwardPlan(...) keeps its
        # signature; no __dict__, as the base has none
        self.ForwardPlan = type("ForwardPlan", (ForwardPlan,),
                                {"__slots__": (), "_kernels": self, "__module__": module,
                                 "__doc__": ForwardPlan.__doc__})

    def isa(self):
        """The instruction set this build of the kernels was compiled for."""
        return self.table.isa.decode()

    def attention(self, q, k, v, out, weights, bmask1, bmask2, fmask, bint causal, double scale,
                      tuple schedule, int num_threads, window=None, slopes=None,
                      double softcap=0.0, sinks=None, lse=None):
        """Fills `out` (and `weights`, when given) with softmax(scale q k^T + bias + masks) v.

        schedule: (block_q, block_k, row_mode, n_splits) from
        fastattn._policy.attention_schedule; window: (left, right) of the key band
        around each query's position (None on a side: unbounded); slopes: float64
        ALiBi slope per query head; softcap: 0 or the cap on the scaled scores;
        sinks: float64 logit per query head added to each row's denominator;
        lse: (*lead, H, Lq) array that gets each row's log-sum-exp.
        Private: fastattn.functional validates shapes, dtypes and layouts first.
        """
        cdef Problem P
        cdef list keep = []
        cdef int rc
        if num_threads < 1:
            raise ValueError("the thread count must be positive")
        if not _attention_setup(self.table, &P, keep, q, k, v, out, weights, bmask1, bmask2,
                                fmask, causal, scale, schedule, window, slopes, softcap,
                                sinks, lse):
            return
        with nogil:
            rc = _attention_run(self.table, &P, num_threads)
        if rc != 0:
            raise MemoryError("could not allocate the attention kernel's scratch buffers")

    def attention_ragged(self, q, k, v, out, lens_q, lens_k, starts_q, starts_k, bint causal,
                         double scale, tuple schedule, int num_threads, window=None,
                         slopes=None, double softcap=0.0, sinks=None, lse=None):
        """:func:`attention` over n sequences of their own lengths, in one team.

        q and out are (Lq, H, Rq, E/Ev), k and v (Lk, Hkv, Rk, E/Ev): with
        ``starts_q`` None, Lq is n and sequence s's lens_q[s] queries are rows
        0.. of lead s; with ``starts_q`` (n,), Lq is 1 and they are rows
        starts_q[s].. (a packed batch).  The same for keys.  Causal attention
        is aligned at each sequence's end.  lse: None, or (array, element
        offset of each sequence's (head 0, row 0), elements between heads).
        Rows of out outside every sequence are not written.
        """
        if num_threads < 1:
            raise ValueError("the thread count must be positive")
        _ragged_run(self.table, q, k, v, out, lens_q, lens_k, starts_q, starts_k, causal,
                    scale, schedule, num_threads, window, slopes, softcap, sinks, lse)

    def panel_width(self, dtype):
        """Output features per packed weight panel in this build (a head whose
        width is a multiple of it starts and ends on panel boundaries)."""
        return self.table.col_align(_dtype_elem(self.table, dtype))

    def pack_weight(self, w, bias, pairs=None):
        """Pack an nn.Linear weight (n_out, k) for :func:`linear`; pad its bias.

        Returns (packed weight, padded bias or None).  The layout depends on this
        build's vector width, so pack with the kernel module that will run it.
        pairs: bfloat16 weights packed in pairs for VDPBF16PS (see
        fastattn._policy.weight_pairs); None: whenever this build can.  Other
        16-bit weights are widened to float32 once, here.
        """
        cdef cnp.ndarray W = np.ascontiguousarray(w)
        if W.ndim != 2:
            raise ValueError("weight must be 2-D")
        cdef int64_t n_out = W.shape[0], k = W.shape[1]
        cdef int store = _store_of(cnp.PyArray_TYPE(W))
        if pairs is None:
            pairs = store == STORE_BF16 and self.table.pairs
        if pairs and not (store == STORE_BF16 and self.table.pairs):
            raise ValueError("pack_weight: pairs need bfloat16 weights and a build with "
                             "AVX512-BF16")
        if pairs:
            # bfloat16 weights stay bfloat16, in the pairs VDPBF16PS multiplies
            packed = _aligned_empty(self.table.pairs_packed_len(n_out, k), np.uint16)
            self.table.pack_weight_pairs(cnp.PyArray_DATA(packed), cnp.PyArray_DATA(W), store,
                                         n_out, k)
            return packed, _padded_bias(bias, self.table.padded_bias_len(
                self.table.elem_of(cnp.NPY_FLOAT32), n_out), n_out, np.float32)
        if store != STORE_SAME:
            # other builds multiply 16-bit weights widened to float32 once, here
            W = _widened(W, store)
        cdef int elem = self.table.elem_of(cnp.PyArray_TYPE(W))
        if elem < 0 or not cnp.PyArray_ISNOTSWAPPED(W):
            raise TypeError(f"weight dtype must be float32 or float64, got {W.dtype}")
        packed = _aligned_empty(self.table.packed_len(elem, n_out, k), W.dtype)
        self.table.pack_weight(elem, cnp.PyArray_DATA(packed), cnp.PyArray_DATA(W), n_out, k)
        return packed, _padded_bias(bias, self.table.padded_bias_len(elem, n_out), n_out, W.dtype)

    def pairs(self):
        """Whether this build multiplies bfloat16 pairs (VDPBF16PS): then
        :meth:`pack_weight` keeps bfloat16 weights in pairs."""
        return bool(self.table.pairs)


    def rotate(self, x, rotary, Py_ssize_t rows_per_item, int num_threads):
        """Rotates the rows of x (m, n), C-contiguous float32 or float64, in
        place, as the projection's epilogue does (``rotary`` as for
        :func:`linear`, its columns and head width within n)."""
        cdef cnp.ndarray X = <cnp.ndarray?>x
        cdef RotateJob J
        cdef Team T
        cdef int rc
        if num_threads < 1 or rows_per_item < 1:
            raise ValueError("rotate: the thread count and rows per item must be positive")
        if X.ndim != 2 or not X.flags.c_contiguous or not X.flags.writeable:
            raise ValueError("rotate: x must be a writeable C-contiguous (m, n) array")
        J.elem = _dtype_elem(self.table, X.dtype)
        _rotary_setup(&J.rot, rotary, X.shape[0], X.shape[1], cnp.PyArray_TYPE(X))
        if X.shape[0] == 0 or J.rot.table == NULL:
            return
        J.x = <char*>cnp.PyArray_DATA(X)
        J.m = X.shape[0]
        J.n = X.shape[1]
        J.rows_per_item = rows_per_item
        T.job = &J
        T.item = self.table.rotate_item(J.elem)
        T.after = NULL
        T.n_items = (J.m + rows_per_item - 1) // rows_per_item
        T.n_after = 0
        T.scratch_bytes = 64
        with nogil:
            rc = run_team(&T, num_threads)
        if rc != 0:
            raise MemoryError("could not allocate the rotation's scratch")

    def linear(self, x, packed, bias, Py_ssize_t n_out, out, tuple blocking, int num_threads,
                   bint head_major=False, rotary=None):
        """out[...] = x @ W.T + bias, W as packed by :func:`pack_weight`.

        x (m, k) and out (m, n_out) need a unit stride on their last axis; the
        work items, blocked as ``blocking`` = (rows, panels, kc) says (see
        fastattn._policy.linear_blocking), are split over ``num_threads`` OpenMP
        threads (no BLAS involved).

        With ``head_major``, out is a C-contiguous (B, G, N, E) array with
        B * N == m and G * E == n_out: row b * N + n, column g * E + e of the
        product lands at out[b, g, n, e], so each head's rows are contiguous for
        the attention kernel (no transposing copy, no strided K/V reads).

        ``rotary`` = (table, positions, cols, head_dim, rot_dim) rotates the
        first ``cols`` output columns as they are written (see fa_rotary in
        fa_common.h; fastattn.rotary builds these).
        """
        cdef LinearJob J
        cdef int rc
        if num_threads < 1:
            raise ValueError("the thread count must be positive")
        if not _linear_setup(self.table, &J, x, packed, bias, n_out, out, head_major, blocking,
                             rotary):
            return out
        with nogil:
            rc = _linear_run(self.table, &J, num_threads)
        if rc != 0:
            raise MemoryError("could not allocate the projection's scratch buffers")
        return out


def _widened(cnp.ndarray W, int store):
    """A 16-bit weight (bfloat16 as uint16 words, or float16) as float32."""
    if store == STORE_BF16:
        return (W.astype(np.uint32) << 16).view(np.float32)
    return W.astype(np.float32)


def _padded_bias(bias, Py_ssize_t length, Py_ssize_t n_out, dtype):
    """The bias in the weights' computing dtype, zero-padded to whole panels;
    None stays None."""
    if bias is None:
        return None
    b = np.asarray(bias)
    store = _store_of(cnp.PyArray_TYPE(b))
    if store != STORE_SAME:
        b = _widened(b.reshape(1, -1), store).reshape(-1)
    padded = np.zeros(length, dtype=dtype)
    padded[:n_out] = b
    return padded


include "_plan.pxi"
