# The projection's work items, compiled per instruction set: one block of a
# projection (_linear_item), and one (batch entry, K/V head) of the plan's
# one-head-at-a-time schedule (_per_head_item), which projects and then
# attends with _attention.pxi's _tile.  The driver sets up the jobs they read
# (_linear.pxi, _plan.pxi) and runs them as teams through the table.


cdef void _linear_item(const LinearJob* J, int64_t w, floating* scratch) noexcept nogil:
    """Rows m0 .. m1 of the product against weight panels q0 .. q1."""
    cdef int64_t m0 = (w // J.panel_blocks) * J.rows_per_item
    cdef int64_t m1 = min(m0 + J.rows_per_item, J.m)
    cdef int64_t q0 = (w % J.panel_blocks) * J.panels_per_item
    cdef int64_t q1 = min(q0 + J.panels_per_item, J.panels)
    _linear_block(<const floating*>J.x, J.ldx, m0, m1, J.k, <const floating*>J.w,
                  <const floating*>J.bias, J.n_out, q0, q1, <floating*>J.y, &J.lay, J.kc,
                  scratch, <const int64_t*>NULL, J.x_store, J.y_store, J.pairs, &J.rot)


cdef void _rotate_item(const RotateJob* J, int64_t w, floating* scratch) noexcept nogil:
    """Rows of a block of J's array rotated in place, by the projection's epilogue."""
    cdef int64_t r0 = w * J.rows_per_item
    _rotate_tile(<floating*>J.x + r0 * J.n, J.n, min(J.rows_per_item, J.m - r0), r0, 0, J.n,
                 &J.rot)


cdef void _per_head_item(const PerHeadJob* J, int64_t u, floating* scratch) noexcept nogil:
    """One (batch entry u // Hkv, K/V head u % Hkv): projects that head's K and
    V and its group's queries, then runs their tiles at once, while those rows
    are still in this thread's cache (projected for the whole batch first,
    they would come back from memory)."""
    cdef const LinearJob* L = J.proj
    cdef const Problem* P = J.attn
    cdef int64_t hkv = P.heads // P.kv_group
    cdef int64_t n = P.len_q, b = u // hkv, hk = u % hkv, h, t
    _linear_block(<const floating*>L.x, L.ldx, b * n, (b + 1) * n, L.k, <const floating*>L.w,
                  <const floating*>L.bias, L.n_out, 0, J.per_unit, <floating*>L.y, &L.lay,
                  L.kc, scratch, J.panels + hk * J.per_unit, L.x_store, L.y_store, L.pairs,
                  &L.rot)
    for h in range(hk * P.kv_group, (hk + 1) * P.kv_group):
        for t in range(P.n_qblocks):
            if P.pairs:
                _tile_pairs(P, (b * P.heads + h) * P.n_qblocks + t, scratch)
            else:
                _tile(P, (b * P.heads + h) * P.n_qblocks + t, scratch)
