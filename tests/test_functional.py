"""fastattn.scaled_dot_product_attention against the float64 reference.

Tolerances (see _util.TOL): float32 rtol 2e-5 / atol 1e-5, float64 rtol 1e-11 /
atol 1e-12, unless a test states otherwise.
"""
import numpy as np
import pytest

import fastattn
from _util import randn, tol
from reference import ref_sdpa

sdpa = fastattn.scaled_dot_product_attention
DTYPES = [np.float32, np.float64]


def make_qkv(rng, lead, H, Hkv, Lq, Lk, E, Ev=None, dtype=np.float32):
    Ev = E if Ev is None else Ev
    q = randn(rng, (*lead, H, Lq, E), dtype)
    k = randn(rng, (*lead, Hkv, Lk, E), dtype)
    v = randn(rng, (*lead, Hkv, Lk, Ev), dtype)
    return q, k, v


def check(q, k, v, attn_mask=None, is_causal=False, scale=None, tolerance=None):
    """Run fastattn with and without need_weights and compare with the reference."""
    dtype = q.dtype
    t = tol(dtype) if tolerance is None else tolerance
    ref_out, ref_w = ref_sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)

    out = sdpa(q, k, v, attn_mask, is_causal=is_causal, scale=scale)
    assert isinstance(out, np.ndarray)
    assert out.dtype == dtype
    assert out.shape == ref_out.shape
    np.testing.assert_allclose(out, ref_out, **t)

    res = sdpa(q, k, v, attn_mask, is_causal=is_causal, scale=scale, need_weights=True)
    assert isinstance(res, tuple) and len(res) == 2
    out2, w = res
    assert out2.dtype == dtype and w.dtype == dtype
    assert out2.shape == ref_out.shape
    assert w.shape == ref_w.shape
    np.testing.assert_allclose(out2, ref_out, **t)
    np.testing.assert_allclose(w, ref_w, **t)
    return out, w


# ---------------------------------------------------------------- basic shapes

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E", [1, 3, 63, 64, 65, 80, 128])
@pytest.mark.parametrize("L", [1, 7, 97, 101, 130])
def test_square_lengths_and_head_dims(rng, L, E, dtype):
    q, k, v = make_qkv(rng, (2,), 2, 2, L, L, E, dtype=dtype)
    check(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq,Lk", [(1, 130), (7, 97), (101, 7), (130, 1), (64, 65), (1, 1)])
def test_rectangular_lengths(rng, Lq, Lk, dtype):
    q, k, v = make_qkv(rng, (2,), 3, 3, Lq, Lk, 32, dtype=dtype)
    check(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,Ev", [(64, 32), (16, 80), (3, 128), (128, 1), (65, 63)])
def test_value_dim_differs(rng, E, Ev, dtype):
    q, k, v = make_qkv(rng, (2,), 2, 2, 19, 23, E, Ev, dtype=dtype)
    check(q, k, v)


def test_larger_problem_multi_block(rng):
    # A few "big" shapes so any tiling/blocking path is exercised with many tiles.
    q, k, v = make_qkv(rng, (2,), 8, 8, 512, 512, 64, dtype=np.float32)
    check(q, k, v)
    check(q, k, v, is_causal=True)


# ------------------------------------------------------------------------ GQA

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("Hkv", [1, 2, 4, 8])
def test_grouped_query_attention(rng, Hkv, is_causal, dtype):
    q, k, v = make_qkv(rng, (2,), 8, Hkv, 37, 37, 16, dtype=dtype)
    check(q, k, v, is_causal=is_causal)


def test_gqa_head_mapping_is_h_div_group(rng):
    # Make every kv head's values a constant equal to its index; with a single
    # key, query head h must return exactly h // (H // Hkv).
    H, Hkv = 8, 2
    q = randn(rng, (1, H, 3, 4))
    k = randn(rng, (1, Hkv, 1, 4))
    v = np.arange(Hkv, dtype=np.float32).reshape(1, Hkv, 1, 1) * np.ones((1, Hkv, 1, 5), np.float32)
    out = sdpa(q, k, v)
    expect = (np.arange(H) // (H // Hkv)).astype(np.float32)
    np.testing.assert_allclose(out[0, :, :, 0], np.repeat(expect[:, None], 3, axis=1), rtol=1e-6)


# ---------------------------------------------------------------------- masks

B, H, LQ, LK = 2, 3, 11, 13
MASK_SHAPES = [
    (LQ, LK),
    (1, 1, LQ, LK),
    (B, 1, 1, LK),
    (B, H, LQ, LK),
    (H, LQ, LK),
    (LK,),
    (B, 1, LQ, LK),
    (1, H, 1, LK),
]


def _bool_mask(rng, shape):
    m = rng.random(shape) < 0.7
    if len(shape) >= 2 and shape[-2] == LQ:
        m[..., 0, :] = False          # a fully masked query row
        m[..., 1, :] = True           # a fully open query row
    elif len(shape) == 4 and shape[0] == B:
        m[0] = False                  # every query of batch 0 masked out
    return m


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mshape", MASK_SHAPES, ids=str)
def test_bool_mask_broadcast(rng, mshape, dtype):
    q, k, v = make_qkv(rng, (B,), H, H, LQ, LK, 16, dtype=dtype)
    mask = _bool_mask(rng, mshape)
    out, w = check(q, k, v, attn_mask=mask)
    assert np.isfinite(out).all() and np.isfinite(w).all()
    # masked-out keys get exactly zero weight
    assert np.all(w[~np.broadcast_to(mask, w.shape)] == 0)


def _float_mask(rng, shape, dtype):
    m = rng.standard_normal(shape).astype(dtype)
    m[rng.random(shape) < 0.3] = -np.inf
    if len(shape) >= 2 and shape[-2] == LQ:
        m[..., 0, :] = -np.inf        # a fully masked query row
    return m


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mshape", MASK_SHAPES, ids=str)
def test_float_mask_broadcast(rng, mshape, dtype):
    q, k, v = make_qkv(rng, (B,), H, H, LQ, LK, 16, dtype=dtype)
    mask = _float_mask(rng, mshape, dtype)
    out, w = check(q, k, v, attn_mask=mask)
    assert np.isfinite(out).all() and np.isfinite(w).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_float_mask_added_after_scaling(rng, dtype):
    q, k, v = make_qkv(rng, (2,), 2, 2, 9, 10, 8, dtype=dtype)
    mask = (3.0 * rng.standard_normal((9, 10))).astype(dtype)
    check(q, k, v, attn_mask=mask, scale=0.25)
    check(q, k, v, attn_mask=mask, scale=3.0)


def test_float_mask_constant_shift_is_invariant(rng):
    # softmax is shift invariant: a huge constant added to every score must not
    # change the result (needs max-subtraction to avoid under/overflow).
    q, k, v = make_qkv(rng, (2,), 2, 2, 9, 10, 8, dtype=np.float64)
    base = sdpa(q, k, v)
    for c in (-1e4, 1e4, -700.0, 700.0):
        shifted = sdpa(q, k, v, np.full((9, 10), c))
        assert np.isfinite(shifted).all()
        np.testing.assert_allclose(shifted, base, rtol=1e-9, atol=1e-10)


def test_mask_all_true_equals_no_mask(rng):
    q, k, v = make_qkv(rng, (2,), 2, 2, 9, 10, 8)
    np.testing.assert_allclose(sdpa(q, k, v, np.ones((9, 10), bool)), sdpa(q, k, v),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sdpa(q, k, v, np.zeros((9, 10), np.float32)), sdpa(q, k, v),
                               rtol=1e-6, atol=1e-7)


def test_bool_mask_semantics_true_means_attend(rng):
    # Only key 3 is allowed -> output is exactly v[..., 3, :] for every query.
    q, k, v = make_qkv(rng, (1,), 2, 2, 5, 6, 4, dtype=np.float64)
    mask = np.zeros(6, bool)
    mask[3] = True
    out = sdpa(q, k, v, mask)
    np.testing.assert_allclose(out, np.broadcast_to(v[..., 3:4, :], out.shape), rtol=1e-12)


# --------------------------------------------------------------------- causal

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (5, 5), (97, 97), (130, 130), (3, 10), (1, 5),
                                   (64, 130), (10, 3), (7, 1)])
def test_causal(rng, Lq, Lk, dtype):
    q, k, v = make_qkv(rng, (2,), 2, 2, Lq, Lk, 16, dtype=dtype)
    out, w = check(q, k, v, is_causal=True)
    i = np.arange(Lq)[:, None]
    j = np.arange(Lk)[None, :]
    forbidden = j > i + (Lk - Lq)
    assert np.all(w[..., forbidden] == 0)
    assert np.isfinite(out).all()


def test_causal_is_bottom_right_aligned(rng):
    # One query against 5 keys: bottom-right alignment means it sees all keys
    # (a top-left aligned mask would only allow key 0).
    q, k, v = make_qkv(rng, (1,), 1, 1, 1, 5, 4, dtype=np.float64)
    np.testing.assert_allclose(sdpa(q, k, v, is_causal=True), sdpa(q, k, v), rtol=1e-12)
    # More queries than keys: the first Lq - Lk rows see nothing -> zeros.
    q, k, v = make_qkv(rng, (1,), 1, 1, 6, 2, 4, dtype=np.float64)
    out, w = sdpa(q, k, v, is_causal=True, need_weights=True)
    assert np.all(out[..., :4, :] == 0) and np.all(w[..., :4, :] == 0)
    assert np.all(np.abs(out[..., 4:, :]) > 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq,Lk", [(12, 12), (5, 12)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_causal_combined_with_mask(rng, Lq, Lk, kind, dtype):
    q, k, v = make_qkv(rng, (2,), 2, 2, Lq, Lk, 8, dtype=dtype)
    if kind == "bool":
        mask = rng.random((2, 1, Lq, Lk)) < 0.6
    else:
        mask = rng.standard_normal((2, 1, Lq, Lk)).astype(dtype)
        mask[rng.random(mask.shape) < 0.3] = -np.inf
    check(q, k, v, attn_mask=mask, is_causal=True)


# --------------------------------------------------------------- need_weights

@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_rows_sum_to_one_or_zero(rng, dtype):
    q, k, v = make_qkv(rng, (2,), 4, 2, 17, 19, 8, dtype=dtype)
    mask = rng.random((17, 19)) < 0.5
    mask[3] = False
    out, w = sdpa(q, k, v, mask, need_weights=True)
    s = w.sum(-1)
    atol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(s[..., 3], 0.0, atol=0)
    keep = np.ones(17, bool)
    keep[3] = False
    np.testing.assert_allclose(s[..., keep], 1.0, atol=atol)
    assert np.all(w >= 0)
    # out == weights @ v (GQA: kv head repeated)
    np.testing.assert_allclose(out, w.astype(np.float64) @ np.repeat(v, 2, axis=-3), **tol(dtype))


def test_need_weights_false_returns_array_only(rng):
    q, k, v = make_qkv(rng, (2,), 2, 2, 5, 5, 4)
    out = sdpa(q, k, v, need_weights=False)
    assert isinstance(out, np.ndarray)
    assert out.shape == (2, 2, 5, 4)


# ---------------------------------------------------------------------- scale

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.37, 2.0, 1e-3, 0.0])
def test_custom_scale(rng, scale, dtype):
    q, k, v = make_qkv(rng, (2,), 2, 2, 13, 15, 16, dtype=dtype)
    check(q, k, v, scale=scale)


def test_scale_zero_gives_uniform_average(rng):
    # scale=0.0 is a real value (not "use the default").
    q, k, v = make_qkv(rng, (1,), 2, 2, 4, 6, 8, dtype=np.float64)
    out = sdpa(q, k, v, scale=0.0)
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(-2, keepdims=True), out.shape),
                               rtol=1e-12)


def test_default_scale_is_inverse_sqrt_e(rng):
    for E in (1, 16, 80):
        q, k, v = make_qkv(rng, (2,), 2, 2, 7, 9, E, dtype=np.float64)
        np.testing.assert_allclose(sdpa(q, k, v), sdpa(q, k, v, scale=1 / np.sqrt(E)),
                                   rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------- numerical extremes

def _big_score_inputs(rng, dtype):
    # q, k ~ N(0, 100^2) with E=64 -> scaled scores have std ~1e4.
    q, k, v = make_qkv(rng, (2,), 2, 2, 33, 40, 64, dtype=np.float64)
    return (100 * q).astype(dtype), (100 * k).astype(dtype), v.astype(dtype)


def test_huge_scores_float64(rng):
    q, k, v = _big_score_inputs(rng, np.float64)
    s = (q @ np.swapaxes(k, -1, -2)) / 8.0
    assert np.abs(s).max() > 1e4
    # relative rounding of scores ~1e4 is ~1e-12 absolute -> loosened to 1e-8.
    out, w = check(q, k, v, tolerance=dict(rtol=1e-8, atol=1e-8))
    assert np.isfinite(out).all() and np.isfinite(w).all()


def test_huge_scores_float32(rng):
    q, k, v = _big_score_inputs(rng, np.float32)
    out, w = sdpa(q, k, v, need_weights=True)
    assert np.isfinite(out).all() and np.isfinite(w).all()
    ref_out, ref_w = ref_sdpa(q, k, v)
    # float32 scores of magnitude 1e4 carry ~1e-3 absolute rounding error, so
    # near-tied weights can move by ~1e-3: tolerance atol 5e-3.
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=5e-3)
    np.testing.assert_allclose(w, ref_w, rtol=0, atol=5e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_scores_hugely_negative(rng, dtype):
    # every score ~ -1e4: without max subtraction exp underflows to 0/0.
    q, k, v = make_qkv(rng, (1,), 2, 2, 8, 9, 16, dtype=np.float64)
    q = np.abs(q) * 30 + 30
    k = -(np.abs(k) * 30 + 30)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    out = sdpa(q, k, v)
    assert np.isfinite(out).all()
    ref_out, _ = ref_sdpa(q, k, v)
    t = dict(rtol=0, atol=5e-3) if dtype == np.float32 else dict(rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(out, ref_out, **t)


# ---------------------------------------------------------- fully masked rows

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", ["bool", "float_-inf", "causal"])
def test_fully_masked_rows_are_zero_not_nan(rng, how, dtype):
    Lq, Lk = 6, 4
    q, k, v = make_qkv(rng, (2,), 2, 2, Lq, Lk, 8, dtype=dtype)
    dead = np.zeros(Lq, bool)
    if how == "bool":
        mask = np.ones((Lq, Lk), bool)
        mask[[1, 4]] = False
        dead[[1, 4]] = True
        kw = dict(attn_mask=mask)
    elif how == "float_-inf":
        mask = np.zeros((Lq, Lk), dtype)
        mask[[0, 5]] = -np.inf
        dead[[0, 5]] = True
        kw = dict(attn_mask=mask)
    else:
        kw = dict(is_causal=True)  # Lq > Lk: first Lq - Lk rows see nothing
        dead[: Lq - Lk] = True
    out, w = sdpa(q, k, v, need_weights=True, **kw)
    assert not np.isnan(out).any() and not np.isnan(w).any()
    assert np.all(out[..., dead, :] == 0)
    assert np.all(w[..., dead, :] == 0)
    check(q, k, v, **kw)


def test_everything_masked(rng):
    q, k, v = make_qkv(rng, (2,), 2, 2, 5, 7, 8)
    # (computed as documented, with a warning that torch's convention is the
    # other: tests/test_torch_habits.py)
    with pytest.warns(fastattn.MaskConventionWarning):
        out, w = sdpa(q, k, v, np.zeros((2, 1, 1, 7), bool), need_weights=True)
    assert out.shape == (2, 2, 5, 8) and w.shape == (2, 2, 5, 7)
    assert np.all(out == 0) and np.all(w == 0)


# ------------------------------------------------------------ strided inputs

@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_qkv_transposed_views(rng, dtype):
    Bn, N, Hn, E = 2, 37, 4, 16
    qkv = randn(rng, (Bn, N, 3, Hn, E), dtype)
    q = qkv[:, :, 0].transpose(0, 2, 1, 3)  # (B, H, N, E), non-contiguous
    k = qkv[:, :, 1].transpose(0, 2, 1, 3)
    v = qkv[:, :, 2].transpose(0, 2, 1, 3)
    assert not q.flags.c_contiguous
    out, _ = check(q, k, v)
    out_c, _ = check(*(np.ascontiguousarray(a) for a in (q, k, v)))
    np.testing.assert_allclose(out, out_c, rtol=1e-6 if dtype == np.float32 else 1e-13,
                               atol=1e-7 if dtype == np.float32 else 1e-14)
    check(q, k, v, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_strides(rng, dtype):
    q, k, v = make_qkv(rng, (2,), 2, 2, 21, 23, 16, dtype=dtype)
    check(q[:, :, ::-1], k[..., ::-1, :], v[:, ::-1, ::-1, ::-1])
    check(q[..., ::-1], k[..., ::-1], v, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_last_axis_and_slices(rng, dtype):
    qb = randn(rng, (2, 4, 19, 32), dtype)
    kb = randn(rng, (2, 4, 40, 48), dtype)
    vb = randn(rng, (3, 4, 25, 20), dtype)
    q = qb[:, ::2, :, ::2]          # (2, 2, 19, 16), stride 2 on last axis
    k = kb[:, 1::2, ::2, 5:37:2]    # (2, 2, 20, 16)
    v = vb[1:, ::2, 3:23, ::3]      # (2, 2, 20, 7)
    assert q.shape == (2, 2, 19, 16) and k.shape == (2, 2, 20, 16) and v.shape == (2, 2, 20, 7)
    check(q, k, v)
    check(q, k, v, attn_mask=(rng.random((40, 19)) < 0.6).T[:, ::2])


def test_fortran_order_and_broadcast_views(rng):
    q, k, v = make_qkv(rng, (2,), 2, 2, 9, 11, 8)
    check(np.asfortranarray(q), np.asfortranarray(k), np.asfortranarray(v))
    # zero-stride (read-only) views from broadcast_to, for inputs and the mask
    q1 = np.broadcast_to(q[:1], q.shape)
    mask = np.broadcast_to(rng.random((1, 1, 9, 11)) < 0.7, (2, 2, 9, 11))
    assert not q1.flags.writeable
    check(q1, k, v, attn_mask=mask)


def test_inputs_not_modified(rng):
    q, k, v = make_qkv(rng, (2,), 4, 2, 9, 11, 8)
    mask = rng.standard_normal((9, 11)).astype(np.float32)
    copies = [a.copy() for a in (q, k, v, mask)]
    sdpa(q, k, v, mask, is_causal=True, need_weights=True)
    for a, c in zip((q, k, v, mask), copies):
        np.testing.assert_array_equal(a, c)


# --------------------------------------------------------------- leading dims

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(), (1,), (2, 3), (2, 1, 2)], ids=str)
def test_leading_dims(rng, lead, dtype):
    q, k, v = make_qkv(rng, lead, 4, 2, 10, 12, 8, dtype=dtype)
    check(q, k, v)
    check(q, k, v, is_causal=True)
    check(q, k, v, attn_mask=rng.random((10, 12)) < 0.7)
    check(q, k, v, attn_mask=rng.random((4, 1, 12)) < 0.7)
    # batched call equals a loop over the flattened leading axes
    out = sdpa(q, k, v)
    flat = [sdpa(a, b, c) for a, b, c in zip(q.reshape(-1, 4, 10, 8), k.reshape(-1, 2, 12, 8),
                                             v.reshape(-1, 2, 12, 8))]
    np.testing.assert_allclose(out.reshape(-1, 4, 10, 8), np.stack(flat), **tol(dtype))


# ------------------------------------------------------------ empty sequences

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq,Lk", [(0, 5), (4, 0), (0, 0)])
def test_empty_sequences(rng, Lq, Lk, dtype):
    q, k, v = make_qkv(rng, (2,), 2, 2, Lq, Lk, 8, Ev=6, dtype=dtype)
    out = sdpa(q, k, v)
    assert out.shape == (2, 2, Lq, 6) and out.dtype == dtype
    assert np.all(out == 0)
    out, w = sdpa(q, k, v, need_weights=True)
    assert out.shape == (2, 2, Lq, 6) and w.shape == (2, 2, Lq, Lk)
    assert np.all(out == 0) and np.all(w == 0)
    out = sdpa(q, k, v, is_causal=True)
    assert out.shape == (2, 2, Lq, 6) and np.all(out == 0)
    out = sdpa(q, k, v, np.ones((Lq, Lk), bool))
    assert out.shape == (2, 2, Lq, 6) and np.all(out == 0)


# ---------------------------------------------------------------- NaN / Inf

@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_query_row_propagates_to_that_row_only(rng, dtype):
    q, k, v = make_qkv(rng, (2,), 2, 2, 9, 11, 8, dtype=dtype)
    q[1, 0, 4, 2] = np.nan
    out, w = sdpa(q, k, v, need_weights=True)
    assert np.isnan(out[1, 0, 4]).all()
    assert np.isnan(w[1, 0, 4]).all()
    bad = np.zeros(out.shape[:-1], bool)
    bad[1, 0, 4] = True
    ref_out, ref_w = ref_sdpa(q, k, v)
    np.testing.assert_allclose(out[~bad], ref_out[~bad], **tol(dtype))
    np.testing.assert_allclose(w[~bad], ref_w[~bad], **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_key_propagates(rng, dtype):
    q, k, v = make_qkv(rng, (1,), 2, 2, 5, 6, 4, dtype=dtype)
    k[0, 1, 2, 0] = np.nan
    out = sdpa(q, k, v)
    assert np.isnan(out[0, 1]).all()  # every query of head 1 sees key 2
    np.testing.assert_allclose(out[0, 0], ref_sdpa(q, k, v)[0][0, 0], **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_value_propagates(rng, dtype):
    q, k, v = make_qkv(rng, (1,), 2, 2, 5, 6, 4, dtype=dtype)
    v[0, 0, 3, 1] = np.nan
    out = sdpa(q, k, v)
    assert np.isnan(out[0, 0, :, 1]).all()
    np.testing.assert_allclose(out[0, 1], ref_sdpa(q, k, v)[0][0, 1], **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_inf_input_does_not_crash_or_spread(rng, dtype):
    q, k, v = make_qkv(rng, (1,), 2, 2, 5, 6, 4, dtype=dtype)
    q[0, 0, 2, :] = np.inf
    out = sdpa(q, k, v)
    assert out.shape == (1, 2, 5, 4)
    with np.errstate(invalid="ignore"):  # inf * 0 inside the reference's matmul
        ref_out, _ = ref_sdpa(q, k, v)
    rows = [0, 1, 3, 4]
    np.testing.assert_allclose(out[0, 0, rows], ref_out[0, 0, rows], **tol(dtype))
    np.testing.assert_allclose(out[0, 1], ref_out[0, 1], **tol(dtype))
