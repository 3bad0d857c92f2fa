# The one parallel skeleton: every kernel call (attention, projection, and
# the plan's one-head-at-a-time forward) describes its work as a Team and
# runs it here.  A team is a list of independent work items, each using one
# per-thread scratch buffer, and optionally a second list run after a
# barrier (the split-K merge reads what every item of the first list wrote).
# Compiled once, in the driver: an item is one build's function over one
# element type, taken from that build's KernelTable (see _table.pxd), so the
# parallel region never depends on the instruction set.


cdef struct Team:
    const void* job         # what the items read (a Problem, LinearJob or PerHeadJob)
    item_fn item            # one item of the first phase (from a KernelTable)
    item_fn after           # one item of the second phase, or NULL
    int64_t n_items         # items of the first phase
    int64_t n_after         # items of the second phase
    int64_t scratch_bytes   # per-thread scratch


cdef int run_team(const Team* T, int num_threads) noexcept nogil:
    """Runs every item of T on up to num_threads threads; 0, or -1 when a
    thread's scratch could not be had."""
    cdef int failed = 0
    cdef int* failed_flag = &failed  # shared: a plain int would be thread-private
    cdef int64_t w
    cdef void* buf = NULL
    # a thread with no item would only be woken, allocate and wait
    if T.n_items < num_threads:
        num_threads = <int>max(T.n_items, <int64_t>1)
    _note_team(num_threads)
    with parallel(num_threads=num_threads):
        # each thread's scratch is its own, allocated once for all its items
        buf = fa_aligned_alloc(T.scratch_bytes)
        if buf == NULL:
            failed_flag[0] = 1
        # dynamic: items differ in cost (causal blocks near the bottom do more
        # work than those on top; a ragged last block less)
        for w in prange(T.n_items, schedule="dynamic"):
            if buf != NULL:
                T.item(T.job, w, buf)
        # (the loop above ends with a barrier: every item is written)
        if T.after != NULL:
            for w in prange(T.n_after, schedule="static"):
                T.after(T.job, w, buf)
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
    """True once a kernel has run a team of more than one thread (every build's
    teams run here, in the driver)."""
    return bool(_team_started)
