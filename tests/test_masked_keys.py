"""Masked keys never affect the output.

A NaN or an inf in the key or value of a position that a query may not attend
(masked by a bool or -inf float mask, the causal band, a window, a key padding
mask, or an unused cache slot) must leave that query's output exactly as if
the position held finite values, whatever the path (tiles, row by row,
split-K, weights) and whoever else shares the tile.  Queries that do attend
a NaN key still get NaN: garbage is not hidden, only kept where it belongs.
"""
import numpy as np
import pytest

import fastattn
from fastattn import scaled_dot_product_attention as sdpa

from _util import randn, tol
from reference import positional_bias, ref_sdpa

DTYPES = [np.float32, np.float64]


def _allowed(Lq, Lk, attn_mask=None, is_causal=False, window=None):
    """(Lq, Lk) bool: which keys each query may attend, worked out apart from
    the kernel (one head; the masks here do not vary by head)."""
    ok = np.ones((Lq, Lk), bool)
    if attn_mask is not None:
        m = np.broadcast_to(attn_mask, (Lq, Lk))
        ok &= m if m.dtype == np.bool_ else m != -np.inf
    if is_causal:
        ok &= np.arange(Lk)[None, :] <= np.arange(Lq)[:, None] + (Lk - Lq)
    if window is not None:
        ok &= np.isfinite(positional_bias(Lq, Lk, window=window)[0])
    return ok


def _poison(k, v, keys, kind):
    k, v = k.copy(), v.copy()
    if kind == "nan":
        k[..., keys, 0] = np.nan
        v[..., keys, :] = np.nan
    else:
        k[..., keys, 1] = np.inf
        v[..., keys, 2] = -np.inf
    return k, v


def _check(out, clean_ref, allowed, keys, kind, dtype):
    """Rows attending none of `keys` match the reference on clean data; with
    NaN poison, rows attending one of them are NaN."""
    hit = allowed[:, keys].any(axis=1)
    assert (~hit).any(), "the case must leave some rows untouched"
    np.testing.assert_allclose(out[..., ~hit, :], clean_ref[..., ~hit, :], **tol(dtype))
    if kind == "nan" and hit.any():
        assert np.isnan(out[..., hit, :]).all()


# (Lq, Lk, mask kind): Lq > 4 runs tiles, Lq <= 4 row by row
CASES = [
    (300, 300, "bool"),
    (300, 300, "float"),
    (300, 300, "causal"),
    (300, 300, "window"),
    (300, 300, "window_causal"),
    (130, 257, "bool_causal"),
    (3, 300, "bool"),
    (3, 300, "float"),
    (2, 300, "window"),
    (1, 300, "bool"),
]


def _case(Lq, Lk, kind, rng):
    """(attn_mask, is_causal, window, poisoned keys) for one case."""
    mask, causal, window = None, False, None
    if kind.startswith("bool"):
        mask = rng.random((Lq, Lk)) < 0.9
        keys = [5, 70, 71, Lk - 1]
        mask[:, keys] = False
        if kind == "bool_causal":
            causal = True
            keys = keys + [Lk - 3]  # a future key of every row but the last few
    elif kind == "float":
        mask = rng.standard_normal((Lq, Lk))
        keys = [0, 70, Lk - 2]
        mask[:, keys] = -np.inf
    elif kind == "causal":
        causal, keys = True, [200]
    elif kind == "window":
        window, keys = (2, 2), [70]
    else:
        window, causal, keys = (5, None), True, [150, 151]
    return mask, causal, window, keys


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind_poison", ["nan", "inf"])
@pytest.mark.parametrize("Lq,Lk,kind", CASES)
@pytest.mark.parametrize("need_weights", [False, True])
def test_masked_keys_never_reach_other_queries(Lq, Lk, kind, kind_poison, need_weights, dtype):
    rng = np.random.default_rng(Lq * 1000 + Lk)
    H, E = 2, 64
    q = randn(rng, (1, H, Lq, E), dtype)
    k = randn(rng, (1, H, Lk, E), dtype)
    v = randn(rng, (1, H, Lk, E), dtype)
    mask, causal, window, keys = _case(Lq, Lk, kind, rng)
    fmask = None if mask is None else (mask.astype(dtype) if mask.dtype != np.bool_ else mask)
    allowed = _allowed(Lq, Lk, fmask, causal, window)
    ref_mask = fmask
    if window is not None:
        bias = positional_bias(Lq, Lk, window=window)
        ref_mask = bias if ref_mask is None else ref_mask + bias
    clean_ref, _ = ref_sdpa(q, k, v, attn_mask=ref_mask, is_causal=causal)
    kp, vp = _poison(k, v, keys, kind_poison)
    res = sdpa(q, kp, vp, fmask, is_causal=causal, window=window, need_weights=need_weights)
    out = res[0] if need_weights else res
    _check(out, clean_ref, allowed, keys, kind_poison, dtype)
    if need_weights:
        w = res[1]
        hit = allowed[:, keys].any(axis=1)
        assert (w[..., ~hit, :][..., keys] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nt", [1, 2])
def test_split_k_rows_ignore_masked_keys(dtype, nt):
    """Few queries over many keys split the keys over threads (split-K); a
    split whose keys are all masked must add nothing, not NaN."""
    rng = np.random.default_rng(7)
    Lq, Lk, E = 2, 2048, 32
    q = randn(rng, (1, 1, Lq, E), dtype)
    k = randn(rng, (1, 1, Lk, E), dtype)
    v = randn(rng, (1, 1, Lk, E), dtype)
    mask = np.ones((Lq, Lk), bool)
    keys = list(range(1024, 2048))  # a whole split's worth
    mask[:, keys] = False
    mask[1, 2000] = True  # row 1 attends one poisoned key
    clean_ref, _ = ref_sdpa(q, k, v, attn_mask=mask)
    kp, vp = _poison(k, v, keys, "nan")
    old = fastattn.get_num_threads()
    fastattn.set_num_threads(nt)
    try:
        out = sdpa(q, kp, vp, mask)
    finally:
        fastattn.set_num_threads(old)
    np.testing.assert_allclose(out[..., 0, :], clean_ref[..., 0, :], **tol(dtype))
    assert np.isnan(out[..., 1, :]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [3, 5, 40, 200])
def test_module_padding_with_nan_leaves_valid_rows_exact(dtype, N):
    """Padded positions of x hold NaN (uninitialised buffers): the valid rows
    of a key_padding_mask call equal those of the same call on zeros there."""
    rng = np.random.default_rng(N)
    m = fastattn.MultiHeadSelfAttention(64, 4, dtype=dtype, seed=1)
    x = randn(rng, (2, N, 64), dtype)
    valid = [N - 2, N // 2 + 1]
    pad = np.zeros((2, N), bool)
    for b, n in enumerate(valid):
        pad[b, n:] = True
    clean = np.where(pad[..., None], 0, x).astype(dtype)
    dirty = np.where(pad[..., None], np.nan, x).astype(dtype)
    for causal in (False, True):
        want = m(clean, key_padding_mask=pad, is_causal=causal)
        got = m(dirty, key_padding_mask=pad, is_causal=causal)
        for b, n in enumerate(valid):
            np.testing.assert_allclose(got[b, :n], want[b, :n], **tol(dtype))
            assert np.isfinite(got[b, :n]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_unused_cache_slots_are_never_read(dtype):
    """A cache's storage past its length (np.empty: whatever memory held)
    never reaches a decoding step."""
    rng = np.random.default_rng(3)
    m = fastattn.MultiHeadSelfAttention(32, 2, dtype=dtype, seed=2)
    x = randn(rng, (1, 12, 32), dtype)
    full = m(x, is_causal=True)
    cache = m.new_cache(1, 64)
    cache._k[...] = np.nan  # the slots a step has not written yet
    cache._v[...] = np.inf
    steps = [m(x[:, :5], cache=cache)] + [m(x[:, i:i + 1], cache=cache) for i in range(5, 12)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_float_mask_minus_inf_blocks_nan_scores(dtype):
    """A -inf float mask entry blocks the key even where its score is NaN
    (NaN + -inf would be NaN)."""
    rng = np.random.default_rng(11)
    q = randn(rng, (1, 1, 8, 16), dtype)
    k = randn(rng, (1, 1, 8, 16), dtype)
    v = randn(rng, (1, 1, 8, 16), dtype)
    mask = np.zeros((8, 8), dtype)
    mask[:, 3] = -np.inf
    want, _ = ref_sdpa(q, k, v, attn_mask=mask)
    k[..., 3, :] = np.nan
    np.testing.assert_allclose(sdpa(q, k, v, mask), want, **tol(dtype))
