"""Sliding windows, ALiBi and split-K decoding against the float64 reference."""

import numpy as np
import pytest

import fastattn
from fastattn import _validate, functional
from fastattn.functional import alibi_slopes

from reference import positional_bias, ref_sdpa

TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-11, atol=1e-12)}


def qkv(rng, dtype, B=2, H=4, Hkv=2, Lq=70, Lk=90, E=16):
    return (rng.standard_normal((B, H, Lq, E)).astype(dtype),
            rng.standard_normal((B, Hkv, Lk, E)).astype(dtype),
            rng.standard_normal((B, Hkv, Lk, E)).astype(dtype))


def test_alibi_slopes_follow_the_paper():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -k for k in range(1, 9)])
    np.testing.assert_allclose(alibi_slopes(4), [2.0 ** (-2 * k) for k in range(1, 5)])
    # 6 heads: the 4 of n=4, then every other of n=8 (2^-0.5 ... ) -> 2^-1, 2^-3
    np.testing.assert_allclose(alibi_slopes(6), [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8,
                                                 2.0 ** -1, 2.0 ** -3])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("window", [(5, 5), (0, 0), (10, None), (None, 3), (200, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_window_matches_reference(rng, dtype, window, causal):
    q, k, v = qkv(rng, dtype)
    mask = rng.random((70, 90)) > 0.2
    bias = positional_bias(70, 90, 1, window)
    allowed = mask & np.isfinite(bias[0])
    ref, ref_w = ref_sdpa(q, k, v, attn_mask=allowed, is_causal=causal)
    out, w = fastattn.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, window=window,
                                                   need_weights=True)
    np.testing.assert_allclose(out, ref, **TOL[dtype])
    np.testing.assert_allclose(w, ref_w, **TOL[dtype])
    for bq, bk in ((7, 5), (64, 64)):  # blocks that start inside and outside the band
        o = np.empty_like(out)
        bm, _ = _validate.prepare_mask(mask, "m", out.shape[:-1] + (90,), q.dtype)
        functional.attention_into(q, k, v, o, bool_masks=(bm,), is_causal=causal,
                                  scale=1 / 4, window=window, block_q=bq, block_k=bk)
        np.testing.assert_allclose(o, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Lq", [1, 3, 70])
def test_alibi_matches_reference(rng, dtype, causal, Lq):
    q, k, v = qkv(rng, dtype, Lq=Lq)
    fmask = np.where(rng.random((Lq, 90)) > 0.1, rng.standard_normal((Lq, 90)), -np.inf)
    bias = positional_bias(Lq, 90, 4, slopes=alibi_slopes(4)) + fmask
    ref, _ = ref_sdpa(q, k, v, attn_mask=bias, is_causal=causal)
    out = fastattn.scaled_dot_product_attention(q, k, v, fmask, is_causal=causal, alibi=True)
    np.testing.assert_allclose(out, ref, **TOL[dtype])
    slopes = np.array([0.5, 0.1, 0.0, 2.0])
    ref2, ref_w2 = ref_sdpa(q, k, v, attn_mask=positional_bias(Lq, 90, 4, (20, 20), slopes),
                            is_causal=causal)
    out2, w2 = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, window=(20, 20),
                                                     alibi_slopes=slopes, need_weights=True)
    np.testing.assert_allclose(out2, ref2, **TOL[dtype])
    np.testing.assert_allclose(w2, ref_w2, **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_split_k_decoding_matches_reference(rng, dtype, threads):
    """One query over many keys with B*H smaller than the thread count: the
    keys are split across threads and merged by log-sum-exp."""
    q = rng.standard_normal((1, 1, 1, 32)).astype(dtype)
    k = rng.standard_normal((1, 1, 5000, 32)).astype(dtype)
    v = rng.standard_normal((1, 1, 5000, 24)).astype(dtype)
    mask = rng.random((1, 5000)) > 0.5
    mask[0, 1024:2048] = False  # a split with nothing to attend
    ref, _ = ref_sdpa(q, k, v, attn_mask=mask)
    o = np.empty((1, 1, 1, 24), dtype)
    bm, _ = _validate.prepare_mask(mask, "m", (1, 1, 1, 5000), q.dtype)
    functional.attention_into(q, k, v, o, bool_masks=(bm,), scale=1 / np.sqrt(32),
                              num_threads=threads)
    np.testing.assert_allclose(o, ref, **TOL[dtype])
    # all keys masked in every split: zeros, not NaN
    functional.attention_into(q, k, v, o, bool_masks=(np.zeros((1, 1, 1, 5000), bool),),
                              scale=1.0, num_threads=threads)
    assert np.array_equal(o, np.zeros_like(o))


def test_window_and_alibi_errors(rng):
    q, k, v = qkv(rng, np.float32)
    with pytest.raises(ValueError, match="window left side must be >= 0"):
        fastattn.scaled_dot_product_attention(q, k, v, window=(-1, 2))
    with pytest.raises(ValueError, match="window must be a"):
        fastattn.scaled_dot_product_attention(q, k, v, window=5)
    with pytest.raises(TypeError, match="window right"):
        fastattn.scaled_dot_product_attention(q, k, v, window=(1, 2.5))
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(4,\)"):
        fastattn.scaled_dot_product_attention(q, k, v, alibi_slopes=np.ones(3))
    with pytest.raises(ValueError, match="attn_mask"):
        fastattn.scaled_dot_product_attention(q, k, v, np.zeros((3, 70, 90)), alibi=True)
