# What the driver (_driver.pyx, compiled once) and every instruction-set
# build of the kernels (_<isa>.pyx, see _kernel.pxi) share: the jobs a team's
# work items read, and the table of C function pointers through which the
# driver reaches one build's items and per-build facts.  Declarations only:
# cimporting this file links nothing, so each side stays its own extension.

from libc.stdint cimport int64_t

cdef extern from "fa_common.h" nogil:
    ctypedef struct fa_out_layout:
        int64_t ldy, head_dim, seq_len, g_stride, b_stride
    ctypedef struct fa_rotary:
        const void* table
        const int64_t* pos
        int64_t cols, head_dim, rot_dim


# One work item of a team (see _skeleton.pxi): job, item index, this thread's scratch.
ctypedef void (*item_fn)(const void* job, int64_t item, void* scratch) noexcept nogil


# One build's kernels as the driver sees them.  Every entry takes the element
# type's index (elem_of's answer), so the table does not change shape when an
# element type is added to _typed.pxi.tp.  Filled by that template's
# _fill_table; handed to the driver in a PyCapsule named TABLE_CAPSULE.
cdef struct KernelTable:
    const char* isa                                      # the build's instruction set
    int (*elem_of)(int typenum) noexcept nogil           # NumPy type number -> elem, or -1
    int64_t (*elem_size)(int elem) noexcept nogil
    # the work items, one trampoline per element type (see _typed.pxi.tp's ITEMS)
    item_fn (*attention_item)(int elem) noexcept nogil
    item_fn (*merge_row)(int elem) noexcept nogil
    item_fn (*linear_item)(int elem) noexcept nogil
    item_fn (*per_head_item)(int elem) noexcept nogil
    item_fn (*rotate_item)(int elem) noexcept nogil
    item_fn (*multi_attention_item)(int elem) noexcept nogil
    item_fn (*multi_merge_row)(int elem) noexcept nogil
    # the build's layout facts, which the driver's setup and checks read
    int64_t (*col_align)(int elem) noexcept nogil
    int64_t (*row_align)(int elem) noexcept nogil
    int64_t (*packed_len)(int elem, int64_t n_out, int64_t k) noexcept nogil
    int64_t (*padded_bias_len)(int elem, int64_t n_out) noexcept nogil
    void (*pack_weight)(int elem, void* dst, const void* W, int64_t n_out,
                        int64_t k) noexcept nogil
    # bfloat16 pairs (fa_half.h): whether the build multiplies them
    # (VDPBF16PS), and the packing of weights for it, in 16-bit elements
    bint pairs
    int64_t (*pairs_packed_len)(int64_t n_out, int64_t k) noexcept nogil
    void (*pack_weight_pairs)(void* dst, const void* W, int store, int64_t n_out,
                              int64_t k) noexcept nogil


# Storage of an operand (fa_half.h's FA_STORE_*).
cdef enum:
    STORE_SAME = 0
    STORE_BF16 = 1
    STORE_F16 = 2


cdef inline const char* TABLE_CAPSULE() noexcept nogil:
    """The capsule's name: the driver accepts no other object as a table."""
    return "fastattn._kernels.KernelTable"


# A strided (*lead, heads, rows, cols) operand: base pointer, one element
# offset per flattened lead index, and the three inner strides in elements.
cdef struct Operand:
    char* base
    const int64_t* lead_off  # per flattened lead index; NULL: index * s_lead
    int64_t s_lead
    int64_t s_head
    int64_t s_row
    int64_t s_col


# The attention problem, set up by _problem.pxi, read by _attention.pxi's items.
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
    # storage of q and out, and of k and v: STORE_SAME (elem itself), or a
    # 16-bit type converted to float where it is packed (elem is then float)
    int q_store, kv_store
    bint pairs                  # bfloat16 products in pairs (fa_half.h; tiles only)
    int64_t half_len            # elements of the scratch those conversions use
    int64_t keys_pad, dimv_pad  # row mode: block_k and dim_v rounded to NR
    double scale
    double softcap              # scores become softcap * tanh(s / softcap); 0: off
    const double* sinks         # one logit per query head in the softmax's denominator, or NULL
    char* lse                   # log-sum-exp per query row, or NULL: row i of (flattened
    int64_t lse_s_head          # lead x head) bh at lse[bh * lse_s_head + i]


# Attention over sequences of their own lengths (varlen, ragged caches): one
# Problem per sequence, run as one team (see _ragged.pxi).  items[2w],
# items[2w + 1]: work item w is item items[2w + 1] of problem items[2w];
# after[]: the same for the split-K merges.
cdef struct MultiJob:
    const Problem* problems
    const int64_t* items
    const int64_t* after


# A projection y = x @ W.T + bias, set up by _linear.pxi, read by _items.pxi.
cdef struct LinearJob:
    char* x
    char* y
    char* w
    char* bias
    fa_out_layout lay
    int64_t ldx, m, k, n_out, panels, row_blocks, panel_blocks
    # the caller's blocking (fastattn._policy.linear_blocking): rows and
    # weight panels per work item, and the inner-dimension chunk
    int64_t rows_per_item, panels_per_item, kc
    int elem
    # storage of x and y (STORE_SAME or a 16-bit type, elem then float), and
    # whether w holds bfloat16 pairs for the build's VDPBF16PS panels
    int x_store, y_store
    bint pairs
    fa_rotary rot               # rotary embedding of Q and K columns (table NULL: none)


# Rotary embedding of rows a user holds, in place (see fastattn.rotary.apply_rotary).
cdef struct RotateJob:
    char* x                     # (m, n) C-contiguous
    int64_t m, n, rows_per_item
    int elem
    fa_rotary rot


# The plan's one-head-at-a-time schedule (see _plan.pxi and _items.pxi).
cdef struct PerHeadJob:
    const LinearJob* proj       # the Q/K/V projection, head-major
    const Problem* attn         # the attention over its output
    const int64_t* panels       # panels[hk * per_unit ...]: K/V head hk's weight panels
    int64_t per_unit


cdef inline char* _at(const Operand* a, int64_t b, int64_t head, int64_t row, int64_t col,
                      int64_t itemsize) noexcept nogil:
    cdef int64_t lead = a.lead_off[b] if a.lead_off != NULL else b * a.s_lead
    return a.base + (lead + head * a.s_head + row * a.s_row + col * a.s_col) * itemsize
