# The one parallel skeleton: every kernel call (attention, projection, and
# the plan's one-head-at-a-time forward) describes its work as a Team and
# runs it here.  A team is a list of independent work items, each using one
# per-thread scratch buffer, and optionally a second list run after a
# barrier (the split-K merge reads what every item of the first list wrote).


# What one work item of a team is; _item maps it to its driver.
cdef enum:
    ITEM_TILE = 0       # one (batch, head, query block) of attention: _tile
    ITEM_ROW = 1        # one (batch, head, key split) of few-query attention: _row_tile
    ITEM_LINEAR = 2     # one (row block, panel block) of a projection: _linear_item
    ITEM_PER_HEAD = 3   # one (batch entry, K/V head), projected then attended: _per_head_item


cdef struct Team:
    int elem                # element type (index into the template's list)
    int kind                # ITEM_*: what `job` points to and what an item does
    const void* job         # Problem (ITEM_TILE, ITEM_ROW), LinearJob or PerHeadJob
    int64_t n_items         # work items of the first phase
    int64_t n_after         # items of the second phase (ITEM_ROW: merged rows), or 0
    int64_t scratch_elems   # per-thread scratch, in elements


cdef inline void _item(const Team* T, int64_t w, floating* scratch) noexcept nogil:
    if T.kind == ITEM_TILE:
        _tile(<const Problem*>T.job, w, scratch)
    elif T.kind == ITEM_ROW:
        _row_tile(<const Problem*>T.job, w, scratch)
    elif T.kind == ITEM_LINEAR:
        _linear_item(<const LinearJob*>T.job, w, scratch)
    else:
        _per_head_item(<const PerHeadJob*>T.job, w, scratch)


cdef inline void _after(const Team* T, int64_t w, floating* scratch) noexcept nogil:
    # only split-K has a second phase
    _merge_row(<const Problem*>T.job, w, scratch)


cdef int _team(const Team* T, int num_threads, floating* tag) noexcept nogil:
    """Runs every item of T on up to num_threads threads (run_team picks the
    element type); 0, or -1 when a thread's scratch could not be had."""
    cdef int failed = 0
    cdef int* failed_flag = &failed  # shared: a plain int would be thread-private
    cdef int64_t w
    cdef floating* buf = NULL
    # a thread with no item would only be woken, allocate and wait
    if T.n_items < num_threads:
        num_threads = <int>max(T.n_items, <int64_t>1)
    _note_team(num_threads)
    with parallel(num_threads=num_threads):
        # each thread's scratch is its own, allocated once for all its items
        buf = <floating*>fa_aligned_alloc(T.scratch_elems * sizeof(floating))
        if buf == NULL:
            failed_flag[0] = 1
        # dynamic: items differ in cost (causal blocks near the bottom do more
        # work than those on top; a ragged last block less)
        for w in prange(T.n_items, schedule="dynamic"):
            if buf != NULL:
                _item(T, w, buf)
        # (the loop above ends with a barrier: every item is written)
        if T.n_after > 0:
            for w in prange(T.n_after, schedule="static"):
                _after(T, w, buf)
        free(buf)
    return -1 if failed else 0


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
