"""Decoder-model attention: soft-capping, sinks, log-sum-exp and its merge,
rotary embeddings (function and modules), head widths apart from embed_dim,
per-module scale and window; each against the float64 references in
tests/reference.py."""

import io
import pickle

import ml_dtypes
import numpy as np
import pytest

import fastattn as fa
from reference import params_of, positional_bias, ref_mhsa, ref_rotary, ref_sdpa, rope_inv_freq

BF16 = ml_dtypes.bfloat16
TOL = {np.float32: 2e-5, np.float64: 1e-12}


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


def ref_lse(q, k, *, mask=None, is_causal=False, scale=None, softcap=None, sinks=None):
    """Each row's log-sum-exp, float64, by the definition: the log of the sum
    of exp over the keys the row may attend (and exp of its sink)."""
    q, k = (np.asarray(a, np.float64) for a in (q, k))
    H, Lq, E = q.shape[-3:]
    Lk = k.shape[-2]
    k = np.repeat(k, H // k.shape[-3], axis=-3)
    s = q @ np.swapaxes(k, -1, -2) * (1 / np.sqrt(E) if scale is None else scale)
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    if is_causal:
        s = np.where(np.arange(Lk)[None, :] <= np.arange(Lq)[:, None] + Lk - Lq, s, -np.inf)
    terms = [s]
    if sinks is not None:
        terms.append(np.broadcast_to(np.asarray(sinks, np.float64)[:, None, None],
                                     s.shape[:-1] + (1,)))
    s = np.concatenate(terms, -1)
    top = s.max(-1, keepdims=True)
    top = np.where(np.isneginf(top), 0, top)
    with np.errstate(divide="ignore"):
        return (top + np.log(np.exp(s - top).sum(-1, keepdims=True)))[..., 0]


def qkv(rng, lead, H, Hkv, Lq, Lk, E, dtype=np.float32, spread=2.0):
    q = (rng.standard_normal(lead + (H, Lq, E)) * spread).astype(dtype)
    k = (rng.standard_normal(lead + (Hkv, Lk, E)) * spread).astype(dtype)
    v = rng.standard_normal(lead + (Hkv, Lk, E)).astype(dtype)
    return q, k, v


# Shapes that reach each kernel path: query tiles, a few rows (row mode),
# one row over many keys (split-K), and Lk < Lq.
PATHS = [(2, 64, 64), (1, 100, 300), (2, 3, 40), (1, 1, 3000), (1, 40, 17)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B,Lq,Lk", PATHS)
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_softcap_sinks_lse_match_the_reference(dtype, B, Lq, Lk, need_weights):
    rng = np.random.default_rng(Lq * 7 + Lk)
    q, k, v = qkv(rng, (B,), 4, 2, Lq, Lk, 32, dtype)
    sinks = rng.standard_normal(4) * 3
    sinks[1] = -np.inf  # a head without a sink
    mask = rng.random((Lq, Lk)) > 0.2
    for kw in ({"softcap": 4.0}, {"sinks": sinks}, {"softcap": 2.5, "sinks": sinks}, {}):
        for causal in (False, True):
            res = fa.scaled_dot_product_attention(q, k, v, mask, is_causal=causal,
                                                  need_weights=need_weights, return_lse=True,
                                                  **kw)
            out, lse = res[0], res[-1]
            r_out, r_w = ref_sdpa(q, k, v, mask, is_causal=causal, **kw)
            r_lse = ref_lse(q, k, mask=mask, is_causal=causal, **kw)
            assert out.dtype == dtype and lse.dtype == dtype and lse.shape == (B, 4, Lq)
            assert rel(out, r_out) < TOL[dtype], (kw, causal)
            finite = np.isfinite(r_lse)
            assert np.array_equal(np.isfinite(lse), finite)
            assert np.array_equal(lse[~finite], r_lse[~finite])
            assert np.abs(lse - r_lse)[finite].max(initial=0) < 50 * TOL[dtype]
            if need_weights:
                assert rel(res[1], r_w) < TOL[dtype]


def test_softcap_bounds_scores_and_composes_with_alibi_window_float_mask():
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, (), 4, 4, 50, 70, 16, np.float64, spread=30.0)
    fmask = rng.standard_normal((50, 70))
    slopes = fa.alibi_slopes(4)
    out, w = fa.scaled_dot_product_attention(q, k, v, fmask, softcap=5.0, window=(9, 3),
                                             alibi_slopes=slopes, is_causal=True,
                                             need_weights=True)
    bias = positional_bias(50, 70, 4, window=(9, 3), slopes=slopes)
    # the order of the torch/Gemma layers: cap the scaled scores, then add the rest
    r_out, r_w = ref_sdpa(q, k, v, fmask + bias, is_causal=True, softcap=5.0)
    assert rel(out, r_out) < 1e-12 and rel(w, r_w) < 1e-12
    # with spread 30 the cap changes the result: it is not a no-op
    plain = fa.scaled_dot_product_attention(q, k, v, fmask, window=(9, 3), alibi_slopes=slopes,
                                            is_causal=True)
    assert rel(plain, out) > 0.1


def test_sink_row_with_no_attended_key_gets_zeros_and_its_sink_as_lse():
    q, k, v = qkv(np.random.default_rng(2), (), 2, 2, 3, 5, 8)
    mask = np.zeros((3, 5), bool)
    mask[1] = True
    out, lse = fa.scaled_dot_product_attention(q, k, v, mask, sinks=np.array([0.5, -np.inf]),
                                               return_lse=True)
    assert (out[:, [0, 2]] == 0).all()
    assert lse[0, 0] == np.float32(0.5) and lse[1, 0] == -np.inf
    assert np.isfinite(lse[:, 1]).all()


def test_sinks_lower_the_weights_as_one_more_logit():
    q, k, v = qkv(np.random.default_rng(3), (), 2, 2, 6, 9, 8, np.float64)
    _, w = fa.scaled_dot_product_attention(q, k, v, need_weights=True)
    _, ws = fa.scaled_dot_product_attention(q, k, v, need_weights=True, sinks=[1.0, 1.0])
    assert np.allclose(w.sum(-1), 1) and (ws.sum(-1) < 1).all()
    assert np.allclose(ws / ws.sum(-1, keepdims=True), w)


@pytest.mark.parametrize("dtype", [BF16, np.float16])
def test_half_types_take_softcap_sinks_and_lse(dtype):
    rng = np.random.default_rng(4)
    for Lq, Lk in ((70, 200), (1, 900)):
        q, k, v = qkv(rng, (2,), 4, 2, Lq, Lk, 64, dtype)
        sinks = rng.standard_normal(4)
        out, lse = fa.scaled_dot_product_attention(q, k, v, is_causal=True, softcap=3.0,
                                                   sinks=sinks, return_lse=True)
        r_out, _ = ref_sdpa(q, k, v, is_causal=True, softcap=3.0, sinks=sinks)
        r_lse = ref_lse(q, k, is_causal=True, softcap=3.0, sinks=sinks)
        assert out.dtype == dtype and lse.dtype == np.float32
        assert rel(out, r_out) < (1e-2 if dtype == BF16 else 2e-3)
        assert np.abs(lse - r_lse).max() < (1e-2 if dtype == BF16 else 2e-3)


def test_lse_with_no_value_columns_still_computed():
    q, k, v = qkv(np.random.default_rng(5), (), 2, 2, 4, 6, 8, np.float64)
    out, lse = fa.scaled_dot_product_attention(q, k, v[..., :0], return_lse=True)
    assert out.shape == (2, 4, 0)
    assert np.allclose(lse, ref_lse(q, k), atol=1e-12)


# ---- merge_attention ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_of_key_chunks_equals_attention_over_all_keys(dtype):
    rng = np.random.default_rng(6)
    q, k, v = qkv(rng, (2,), 4, 2, 33, 301, 16, dtype)
    sinks = rng.standard_normal(4)
    out, lse = fa.scaled_dot_product_attention(q, k, v, sinks=sinks, return_lse=True)
    cuts = [0, 1, 100, 100, 250, 301]  # an empty chunk and a one-key chunk
    outs, lses = [], []
    for n, (a, b) in enumerate(zip(cuts, cuts[1:])):
        o, l = fa.scaled_dot_product_attention(q, k[..., a:b, :], v[..., a:b, :],
                                               sinks=sinks if n == 0 else None,
                                               return_lse=True)
        outs.append(o)
        lses.append(l)
    m_out, m_lse = fa.merge_attention(outs, lses)
    assert m_out.dtype == dtype and m_lse.dtype == dtype
    assert rel(m_out, out) < 10 * TOL[dtype]
    assert np.abs(m_lse - lse).max() < 50 * TOL[dtype]


def test_merge_of_causal_prefix_and_chunk_equals_the_causal_forward():
    # chunked prefill: a chunk of new queries over the cached prefix (no mask)
    # and over itself (causal), merged
    rng = np.random.default_rng(7)
    q, k, v = qkv(rng, (1,), 2, 2, 20, 50, 16, np.float64)
    full = fa.scaled_dot_product_attention(q, k, v, is_causal=True)
    a = fa.scaled_dot_product_attention(q, k[..., :30, :], v[..., :30, :], return_lse=True)
    b = fa.scaled_dot_product_attention(q, k[..., 30:, :], v[..., 30:, :], is_causal=True,
                                        return_lse=True)
    out, _ = fa.merge_attention([a[0], b[0]], [a[1], b[1]])
    assert rel(out, full) < 1e-12


def test_merge_rows_nobody_attended_are_zero_and_minus_inf():
    out = [np.full((1, 2, 3), np.nan), np.ones((1, 2, 3))]
    lse = [np.full((1, 2), -np.inf), np.array([[-np.inf, 0.0]])]
    o, l = fa.merge_attention(out, lse)
    assert (o[0, 0] == 0).all() and l[0, 0] == -np.inf
    assert (o[0, 1] == 1).all() and l[0, 1] == 0


@pytest.mark.parametrize("outs,lses,err,match", [
    ([], [], ValueError, "at least one"),
    ([np.zeros((1, 2, 3))], [np.zeros((1, 2)), np.zeros((1, 2))], ValueError, "as many"),
    ([np.zeros((1, 2, 3))], [np.zeros((1, 3))], ValueError, r"lses\[0\] must have shape"),
    ([np.zeros((1, 2, 3)), np.zeros((1, 2, 4))], [np.zeros((1, 2))] * 2, ValueError,
     r"outs\[1\]"),
    ([np.zeros((1, 2, 3))], [np.zeros((1, 2), int)], TypeError, "float"),
    ([np.zeros((1, 2, 3))], [np.full((1, 2), np.inf)], ValueError, r"\+inf"),
    (np.zeros((2, 1, 2, 3)), [np.zeros((1, 2))] * 2, TypeError, "sequences"),
])
def test_merge_bad_input(outs, lses, err, match):
    with pytest.raises(err, match=match):
        fa.merge_attention(outs, lses)


# ---- rotary ------------------------------------------------------------------------

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 64,
     "beta_fast": 32.0, "beta_slow": 1.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
     "truncate": False, "mscale": 0.707, "mscale_all_dim": 1.0},
]


@pytest.mark.parametrize("scaling", SCALINGS)
def test_frequencies_match_the_reference(scaling):
    r = fa.Rotary(32, theta=150000.0, scaling=scaling)
    inv, att = rope_inv_freq(32, 150000.0, scaling)
    assert np.allclose(r.inv_freq, inv, rtol=1e-14, atol=0) and r.attention_factor == pytest.approx(att)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, BF16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dim", [8, 24])
def test_apply_rotary_matches_the_reference(dtype, interleaved, dim):
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((2, 3, 11, 24)).astype(dtype)
    for positions in (None, np.arange(100, 111), rng.integers(0, 5000, (2, 3, 11))):
        r = fa.Rotary(dim, theta=1000.0, interleaved=interleaved, scaling=SCALINGS[3])
        y = fa.apply_rotary(x, r, positions)
        pos = np.arange(11) if positions is None else positions
        ref = ref_rotary(x, pos, dim, 1000.0, interleaved, SCALINGS[3])
        assert y.dtype == x.dtype and y.shape == x.shape
        assert rel(y, ref) < {np.float32: 1e-6, np.float64: 1e-13}.get(dtype, 1e-2)
        assert np.array_equal(y[..., dim:], x[..., dim:])


def test_apply_rotary_far_sparse_positions():
    # positions far past any dense table get a table of their own
    r = fa.Rotary(16)
    x = np.random.default_rng(8).standard_normal((4, 16))
    pos = np.array([0, 3, 10 ** 9, 2 ** 39])
    assert rel(fa.apply_rotary(x, r, pos), ref_rotary(x, pos, 16)) < 1e-6


def _module(dtype=np.float32, **kw):
    cfg = dict(num_kv_heads=2, seed=3)
    cfg.update(kw)
    return fa.MultiHeadSelfAttention(64, 4, dtype=dtype, **cfg)


def _set_sinks(m, seed=9):
    if m.has_sinks:
        m.sinks = np.random.default_rng(seed).standard_normal(m.num_heads)


MODULE_CASES = [
    dict(rotary=fa.Rotary(16)),
    dict(rotary=fa.Rotary(8, theta=500.0, interleaved=True), bias=False),
    dict(rotary=fa.Rotary(32, scaling=SCALINGS[2]), head_dim=32),
    dict(rotary=fa.Rotary(16, scaling=SCALINGS[4]), softcap=20.0, scale=0.2, head_dim=24,
         window=(6, 0)),
    dict(rotary=fa.Rotary(16), sinks=True, window=(4, 0)),
    dict(softcap=5.0, sinks=True, head_dim=8),
]


def _ref_of(m, x, positions=None, **call):
    r = m.rotary
    rot = None if r is None else dict(dim=r.dim, theta=r.theta, interleaved=r.interleaved,
                                      scaling=r.scaling)
    return ref_mhsa(x, params_of(m), m.num_heads, m.num_kv_heads, head_dim=m.head_dim,
                    rotary=rot, positions=positions, scale=m.scale, softcap=m.softcap,
                    window=m.window, sinks=m.sinks, **call)[0]


@pytest.mark.parametrize("case", range(len(MODULE_CASES)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_module_forward_and_decoding_match_the_reference(case, dtype):
    m = _module(dtype, **MODULE_CASES[case])
    _set_sinks(m)
    x = np.random.default_rng(case).standard_normal((2, 19, 64)).astype(dtype)
    y = m(x, is_causal=True)
    ref = _ref_of(m, x, is_causal=True)
    assert y.shape == x.shape and rel(y, ref) < TOL[dtype]
    # token by token, then in chunks: the same as the full forward
    c = m.new_cache(2, 19)
    steps = np.concatenate([m(x[:, t:t + 1], cache=c) for t in range(19)], axis=1)
    assert rel(steps, ref) < TOL[dtype]
    c = m.new_cache(2, 8, grow=True)
    chunks = np.concatenate([m(x[:, :7], cache=c), m(x[:, 7:8], cache=c),
                             m(x[:, 8:], cache=c)], axis=1)
    assert rel(chunks, ref) < TOL[dtype]


def test_module_explicit_positions_per_sequence():
    m = _module(rotary=fa.Rotary(16))
    x = np.random.default_rng(10).standard_normal((2, 7, 64)).astype(np.float32)
    pos = np.array([[5, 6, 7, 8, 9, 10, 11], [0, 2, 4, 6, 8, 10, 12]])
    y = m(x, is_causal=True, positions=pos)
    assert rel(y, _ref_of(m, x, positions=pos, is_causal=True)) < 2e-5
    # (N,) positions apply to every sequence; with a cache they name the new rows
    c = m.new_cache(2, 7)
    m(x[:, :3], cache=c, positions=np.arange(3) + 5)
    y2 = m(x[:, 3:], cache=c, positions=np.arange(3, 7) + 5)
    assert rel(y2, _ref_of(m, x, positions=np.arange(5, 12), is_causal=True)[:, 3:]) < 2e-5


def test_rotary_is_relative_shifting_every_position_changes_nothing():
    m = _module(np.float64, rotary=fa.Rotary(16))
    x = np.random.default_rng(11).standard_normal((1, 9, 64))
    a = m(x, is_causal=True)
    b = m(x, is_causal=True, positions=np.arange(9) + 1000)
    assert rel(a, b) < 1e-10


@pytest.mark.parametrize("dtype,tol", [(BF16, 2e-2), (np.float16, 4e-3)])
def test_half_modules_with_decoder_settings(dtype, tol):
    m = _module(dtype, rotary=fa.Rotary(16), softcap=10.0, sinks=True)
    _set_sinks(m)
    x = np.random.default_rng(12).standard_normal((2, 40, 64)).astype(dtype)
    y = m(x, is_causal=True)
    assert y.dtype == dtype and rel(y, _ref_of(m, x, is_causal=True)) < tol
    c = m.new_cache(2, 40)
    steps = np.concatenate([m(x[:, t:t + 1], cache=c) for t in range(40)], axis=1)
    assert rel(steps, y) < tol


def test_mixed_precision_module_with_rotary():
    m = _module(rotary=fa.Rotary(16), precision="bfloat16")
    x = np.random.default_rng(13).standard_normal((1, 30, 64)).astype(np.float32)
    y = m(x, is_causal=True)
    assert y.dtype == np.float32 and rel(y, _ref_of(m, x, is_causal=True)) < 2e-2


def test_decoder_settings_independent_of_thread_count():
    m = _module(rotary=fa.Rotary(16), softcap=8.0, sinks=True)
    _set_sinks(m)
    x = np.random.default_rng(14).standard_normal((3, 50, 64)).astype(np.float32)
    with fa.threads.this_thread_uses(1):
        one = m(x, is_causal=True)
    with fa.threads.this_thread_uses(2):
        two = m(x, is_causal=True)
    assert np.array_equal(one, two)


@pytest.mark.parametrize("case", [0, 3, 4, 5])
def test_settings_survive_files_pickles_and_state_dicts(case):
    m = _module(**MODULE_CASES[case])
    _set_sinks(m)
    x = np.random.default_rng(15).standard_normal((1, 12, 64)).astype(np.float32)
    y = m(x, is_causal=True)
    f = io.BytesIO()
    m.save(f)
    f.seek(0)
    for other in (fa.MultiHeadSelfAttention.load(f), pickle.loads(pickle.dumps(m))):
        assert other == m and other.config() == m.config()
        assert np.array_equal(other(x, is_causal=True), y)
    state = m.state_dict()
    assert ("sinks" in state) == m.has_sinks
    fresh = fa.MultiHeadSelfAttention(**{**m.config(), "seed": 0})
    fresh.load_state_dict(state)
    assert np.array_equal(fresh(x, is_causal=True), y)


def test_module_window_default_and_call_override():
    m = _module(np.float64, window=(3, 0))
    x = np.random.default_rng(16).standard_normal((1, 10, 64))
    assert rel(m(x, is_causal=True), _ref_of(m, x, is_causal=True)) < 1e-12
    wide = m(x, is_causal=True, window=(None, None))
    plain = fa.MultiHeadSelfAttention(**{**m.config(), "window": None})
    plain.load_state_dict(m.state_dict())
    assert rel(wide, _ref_of(plain, x, is_causal=True)) < 1e-12
    for name, value in (("window", None), ("rotary", fa.Rotary(8)), ("scale", 1.0),
                        ("softcap", 2.0)):
        with pytest.raises(AttributeError):
            setattr(m, name, value)


def test_cross_attention_module_takes_scale_softcap_sinks_head_dim():
    rng = np.random.default_rng(17)
    m = fa.MultiHeadAttention(32, 4, kdim=12, vdim=20, head_dim=6, scale=0.5, softcap=3.0,
                              sinks=True, dtype=np.float64, seed=0)
    m.sinks = rng.standard_normal(4)
    q = rng.standard_normal((2, 5, 32))
    k, v = rng.standard_normal((2, 9, 12)), rng.standard_normal((2, 9, 20))
    y = m(q, k, v)
    p = params_of(m)
    Q = (q @ p["w_q"].T + p["b_q"]).reshape(2, 5, 4, 6).transpose(0, 2, 1, 3)
    K = (k @ p["w_k"].T + p["b_k"]).reshape(2, 9, 4, 6).transpose(0, 2, 1, 3)
    V = (v @ p["w_v"].T + p["b_v"]).reshape(2, 9, 4, 6).transpose(0, 2, 1, 3)
    o, _ = ref_sdpa(Q, K, V, scale=0.5, softcap=3.0, sinks=m.sinks)
    ref = o.transpose(0, 2, 1, 3).reshape(2, 5, 24) @ p["w_o"].T + p["b_o"]
    assert rel(y, ref) < 1e-12


def test_plain_calls_of_decoder_modules_take_the_general_forward():
    # the fast path's plan knows none of these settings: m(x) must still apply them
    for case in MODULE_CASES:
        m = _module(**case)
        _set_sinks(m)
        x = np.random.default_rng(18).standard_normal((2, 9, 64)).astype(np.float32)
        assert rel(m(x), _ref_of(m, x)) < 2e-5


# ---- bad values ----------------------------------------------------------------------

Q, K, V = qkv(np.random.default_rng(0), (), 4, 2, 3, 5, 8)


@pytest.mark.parametrize("kw,err,match", [
    ({"softcap": 0.0}, ValueError, "softcap must be > 0"),
    ({"softcap": -1.0}, ValueError, "softcap must be > 0"),
    ({"softcap": float("nan")}, ValueError, "softcap"),
    ({"softcap": float("inf")}, ValueError, "softcap"),
    ({"softcap": "3"}, TypeError, "softcap"),
    ({"sinks": np.zeros(3)}, ValueError, r"sinks must have shape \(4,\)"),
    ({"sinks": np.array([0, np.nan, 0, 0])}, ValueError, "sinks must be finite"),
    ({"sinks": np.array([0, np.inf, 0, 0])}, ValueError, "sinks must be finite"),
    ({"sinks": np.array(["a"] * 4)}, TypeError, "sinks must be a real array"),
    ({"return_lse": 1}, TypeError, "return_lse"),
])
def test_sdpa_bad_values(kw, err, match):
    with pytest.raises(err, match=match):
        fa.scaled_dot_product_attention(Q, K, V, **kw)


@pytest.mark.parametrize("make,err,match", [
    (lambda: fa.Rotary(7), ValueError, "even"),
    (lambda: fa.Rotary(0), ValueError, "even"),
    (lambda: fa.Rotary(8.0), TypeError, "int"),
    (lambda: fa.Rotary(8, theta=-1.0), ValueError, "theta"),
    (lambda: fa.Rotary(8, scaling={"rope_type": "ntk"}), ValueError, "not supported"),
    (lambda: fa.Rotary(8, scaling={"rope_type": "linear"}), ValueError, "needs"),
    (lambda: fa.Rotary(8, scaling={"rope_type": "linear", "factor": 2, "beta": 1}),
     ValueError, "unknown keys"),
    (lambda: fa.Rotary(8, scaling=[("factor", 2)]), TypeError, "dict"),
    (lambda: _module(rotary=fa.Rotary(32)), ValueError, r"rotary dim \(32\) must be at most"),
    (lambda: _module(rotary=fa.Rotary(4), head_dim=5), ValueError, "head_dim even"),
    (lambda: _module(rotary="rope"), TypeError, "rotary must be"),
    (lambda: _module(softcap=0), ValueError, "softcap"),
    (lambda: _module(sinks=1), TypeError, "sinks must be True or False"),
    (lambda: _module(head_dim=0), ValueError, "head_dim"),
    (lambda: _module(scale=float("nan")), ValueError, "scale"),
    (lambda: _module(window=(-1, 0)), ValueError, "window"),
])
def test_module_and_rotary_bad_settings(make, err, match):
    with pytest.raises(err, match=match):
        make()


@pytest.mark.parametrize("positions,err,match", [
    (np.arange(4), ValueError, r"positions must have shape \(5,\) or \(2, 5\)"),
    (np.zeros((5, 2), int), ValueError, "positions must have shape"),
    (np.arange(5.0), TypeError, "integer"),
    (np.arange(5) - 1, ValueError, r"\[0, 2\*\*40\)"),
])
def test_bad_positions(positions, err, match):
    m = _module(rotary=fa.Rotary(16))
    x = np.zeros((2, 5, 64), np.float32)
    with pytest.raises(err, match=match):
        m(x, positions=positions)
    c = m.new_cache(2, 8)
    with pytest.raises(err, match=match):
        m(x, cache=c, positions=positions)
    assert len(c) == 0  # the cache is left as it was


def test_positions_without_rotary_and_sinks_without_the_setting():
    m = _module()
    with pytest.raises(ValueError, match="positions are for modules with rotary"):
        m(np.zeros((1, 3, 64), np.float32), positions=np.arange(3))
    with pytest.raises(ValueError, match="built with sinks=False"):
        m.sinks = np.zeros(4)
    s = _module(sinks=True)
    with pytest.raises(ValueError, match=r"sinks: expected shape \(4,\)"):
        s.sinks = np.zeros(3)
    with pytest.raises(ValueError, match="missing parameters.*sinks"):
        s.load_state_dict(m.state_dict())


def test_apply_rotary_bad_input():
    r = fa.Rotary(8)
    with pytest.raises(ValueError, match="at most head_dim"):
        fa.apply_rotary(np.zeros((3, 6)), r)
    with pytest.raises(ValueError, match="do not broadcast"):
        fa.apply_rotary(np.zeros((3, 8)), r, np.arange(4))
    with pytest.raises(TypeError, match="integer"):
        fa.apply_rotary(np.zeros((3, 8)), r, np.arange(3.0))
    with pytest.raises(TypeError, match="fastattn.Rotary"):
        fa.apply_rotary(np.zeros((3, 8)), {"dim": 8})


def test_to_torch_refuses_what_torch_cannot_express():
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match="cannot express.*rotary"):
        fa.MultiHeadSelfAttention(64, 4, rotary=fa.Rotary(16)).to_torch()


# ---- found by an adversarial probe -------------------------------------------------

def test_module_scale_holds_on_the_plain_call_path():
    x = np.random.default_rng(20).standard_normal((2, 6, 16)).astype(np.float32)
    m = fa.MultiHeadSelfAttention(16, 2, scale=3.0, seed=0)
    ref, _ = ref_mhsa(x, params_of(m), 2, scale=3.0)
    assert rel(m(x), ref) < 2e-5  # m(x) takes the plan
    assert rel(m(x, is_causal=False, need_weights=False), ref) < 2e-5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cap", [1e-3, 0.5, 5.0, 50.0, 1e3, 1e5, 1e8, 1e30])
def test_softcap_accurate_for_every_cap(dtype, cap):
    # a cap far above the scores leaves them as they are: no 1 - e cancellation
    r = np.random.default_rng(21)
    q, k, v = qkv(r, (1,), 2, 2, 70, 300, 16, dtype, spread=3.0)
    for Lq in (70, 1):
        out = fa.scaled_dot_product_attention(q[..., :Lq, :], k, v, softcap=cap)
        ref, _ = ref_sdpa(q[..., :Lq, :], k, v, softcap=cap)
        assert rel(out, ref) < TOL[dtype] / 2, (cap, Lq)


def test_tiny_softcap_refused_not_nan():
    with pytest.raises(ValueError, match="softcap must be > 0 and finite in float32"):
        fa.scaled_dot_product_attention(Q, K, V, softcap=1e-39)
    out = fa.scaled_dot_product_attention(Q, K, V, softcap=2e-38)
    assert np.isfinite(out).all()


def test_module_sinks_refuse_nan_and_inf():
    m = fa.MultiHeadSelfAttention(16, 2, sinks=True, seed=0)
    for bad in ([np.inf, 0.0], [np.nan, 0.0]):
        with pytest.raises(ValueError, match="sinks must be finite in float32 or -inf"):
            m.sinks = np.array(bad)
        with pytest.raises(ValueError, match="sinks must be finite in float32 or -inf"):
            m.load_state_dict({**m.state_dict(), "sinks": np.array(bad)})
    m.sinks = np.array([-np.inf, 0.0])  # no sink for head 0
    assert np.isfinite(m(np.ones((1, 3, 16), np.float32))).all()


def test_bfloat16_sinks_taken_by_the_function():
    q, k, v = qkv(np.random.default_rng(22), (), 2, 2, 5, 7, 8)
    a = fa.scaled_dot_product_attention(q, k, v, sinks=np.array([0.5, 1.0], BF16))
    b = fa.scaled_dot_product_attention(q, k, v, sinks=np.array([0.5, 1.0]))
    assert np.array_equal(a, b)


def test_rotary_is_immutable_and_checks_its_frequencies():
    r = fa.Rotary(8)
    with pytest.raises(AttributeError, match="fixed once it is made"):
        r.theta = 500.0
    with pytest.raises(ValueError):
        r.inv_freq[0] = 1.0
    assert pickle.loads(pickle.dumps(r)) == r
    with pytest.raises(ValueError, match="non-finite frequencies"):
        fa.Rotary(8, scaling={"rope_type": "linear", "factor": 1e-320})
    with pytest.raises(ValueError, match=r"needs \['factor'\]"):
        fa.Rotary(8, scaling={"rope_type": "yarn", "factor": None,
                              "original_max_position_embeddings": 64})


def test_positions_bounds_and_broadcast():
    r = fa.Rotary(8)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*40\)"):
        fa.apply_rotary(np.zeros((2, 8)), r, np.array([1, 2 ** 63], np.uint64))
    m = _module(rotary=fa.Rotary(16))
    x = np.random.default_rng(23).standard_normal((2, 5, 64)).astype(np.float32)
    pos = np.arange(5)[None] + 3
    assert np.array_equal(m(x, positions=pos), m(x, positions=pos[0]))


def test_merge_messages():
    with pytest.raises(TypeError, match="sequences"):
        fa.merge_attention(None, None)
    with pytest.raises(TypeError, match="one dtype"):
        fa.merge_attention([np.zeros((1, 2, 3)), np.zeros((1, 2, 3), np.float32)],
                           [np.zeros((1, 2))] * 2)
    with pytest.raises(ValueError, match="at least 3 axes"):
        fa.merge_attention([np.zeros((2, 3))], [np.zeros(2)])
    with pytest.raises(TypeError, match="return_lse"):
        fa.merge_attention([np.zeros((1, 2, 3))], [None])


def test_load_names_the_file_for_bad_settings(tmp_path):
    import json
    import zipfile

    m = _module(softcap=5.0, window=(3, 0))
    path = tmp_path / "m.npz"
    m.save(path)
    for field, value in (("softcap", -1.0), ("window", 4), ("rotary", {"dim": 7})):
        data = dict(np.load(path))
        cfg = json.loads(str(data["__config__"]))
        cfg[field] = value
        data["__config__"] = np.array(json.dumps(cfg))
        bad = tmp_path / f"bad_{field}.npz"
        np.savez(bad, **data)
        with pytest.raises(ValueError, match=f"bad_{field}.npz"):
            fa.MultiHeadSelfAttention.load(bad)
    assert zipfile.is_zipfile(path)


def test_rotary_table_kept_for_positions_it_covers():
    # decoding far into a long context reuses the kept table, step after step
    r = fa.Rotary(16)
    big, _ = r.rows(np.arange(100_000), np.float32)
    again, index = r.rows(np.array([99_999]), np.float32)
    assert again is big and index.tolist() == [99_999]


def test_cross_attention_refuses_rotary_from_a_config():
    cfg = {"embed_dim": 16, "num_heads": 2, "num_kv_heads": 2, "kdim": 16, "vdim": 16,
           "bias": True, "dtype": "float32", "rotary": {"dim": 8}}
    with pytest.raises(ValueError, match="rotary embeddings are for MultiHeadSelfAttention"):
        fa.MultiHeadAttention._from_config(cfg)
