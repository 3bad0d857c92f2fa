"""MultiHeadAttention (cross-attention), KV-cache decoding, windows and ALiBi in
the modules, and interop with torch both ways."""

import pickle
import re
import sys

import numpy as np
import pytest

from fastattn import MultiHeadAttention, MultiHeadSelfAttention, alibi_slopes

from reference import combine_masks, params_of, positional_bias, ref_sdpa

TOL32 = dict(rtol=2e-5, atol=2e-5)
TOL64 = dict(rtol=1e-11, atol=1e-12)


def ref_mha(query, key, value, m, attn_mask=None, key_padding_mask=None, is_causal=False,
            bias=None):
    """float64 multi-head attention of query over key/value with m's weights;
    `bias` (H, Lq, Lk) is added to the scaled scores (windows, ALiBi)."""
    p = params_of(m)
    B, Lq, _ = query.shape
    Lk = key.shape[1]
    H, Hkv, E = m.num_heads, m.num_kv_heads, m.head_dim

    def lin(x, w, b):
        y = np.asarray(x, np.float64) @ w.T
        return y if b is None else y + b

    q = lin(query, p["w_q"], p["b_q"]).reshape(B, Lq, H, E).transpose(0, 2, 1, 3)
    k = lin(key, p["w_k"], p["b_k"]).reshape(B, Lk, Hkv, E).transpose(0, 2, 1, 3)
    v = lin(value, p["w_v"], p["b_v"]).reshape(B, Lk, Hkv, E).transpose(0, 2, 1, 3)
    mask = combine_masks(attn_mask, key_padding_mask)
    if bias is not None:
        if mask is None:
            mask = bias
        elif mask.dtype == np.bool_:
            mask = np.where(mask, 0.0, -np.inf) + bias
        else:
            mask = mask + bias
    out, w = ref_sdpa(q, k, v, attn_mask=mask, is_causal=is_causal)
    y = lin(out.transpose(0, 2, 1, 3).reshape(B, Lq, H * E), p["w_o"], p["b_o"])
    return y, w


# ---- cross-attention ------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(np.float32, TOL32), (np.float64, TOL64)])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_cross_attention_matches_reference(rng, dtype, tol, kv_heads):
    m = MultiHeadAttention(32, 4, kdim=24, vdim=40, num_kv_heads=kv_heads, dtype=dtype, seed=1)
    assert m.w_k.shape == (m.kv_dim, 24) and m.w_v.shape == (m.kv_dim, 40)
    query = rng.standard_normal((2, 7, 32))
    key = rng.standard_normal((2, 11, 24))
    value = rng.standard_normal((2, 11, 40))
    kpm = rng.random((2, 11)) < 0.3
    kpm[:, 0] = False
    mask = rng.random((7, 11)) > 0.2
    y, w = m(query, key, value, attn_mask=mask, key_padding_mask=kpm, need_weights=True,
             average_attn_weights=False)
    ref_y, ref_w = ref_mha(query, key, value, m, attn_mask=mask, key_padding_mask=kpm)
    assert y.dtype == dtype and y.shape == (2, 7, 32) and w.shape == (2, 4, 7, 11)
    np.testing.assert_allclose(y, ref_y, **tol)
    np.testing.assert_allclose(w, ref_w, **tol)
    y1, w1 = m(query[1], key[1], value[1], need_weights=True)  # unbatched, averaged
    ref1, refw1 = ref_mha(query[1:], key[1:], value[1:], m)
    np.testing.assert_allclose(y1, ref1[0], **tol)
    np.testing.assert_allclose(w1, refw1[0].mean(axis=0), **tol)


def test_cross_module_shares_the_self_attention_path(rng):
    """Same weights: MultiHeadAttention(x, x, x) == MultiHeadSelfAttention(x)."""
    s = MultiHeadSelfAttention(32, 4, num_kv_heads=2, seed=3)
    c = MultiHeadAttention(32, 4, num_kv_heads=2, seed=0)
    c.load_state_dict(s.state_dict())
    x = rng.standard_normal((2, 9, 32)).astype(np.float32)
    np.testing.assert_array_equal(c(x, x, x, is_causal=True), s(x, is_causal=True))
    np.testing.assert_allclose(c(x, x.copy(), x.copy(), is_causal=True), s(x, is_causal=True),
                               rtol=1e-6, atol=1e-6)  # separate projections, same math


def test_cross_attention_errors(rng):
    m = MultiHeadAttention(16, 2, kdim=8, vdim=12, seed=0)
    q = rng.standard_normal((2, 3, 16))
    with pytest.raises(ValueError, match=r"key must have shape \(2, L, 8\)"):
        m(q, rng.standard_normal((2, 5, 9)), rng.standard_normal((2, 5, 12)))
    with pytest.raises(ValueError, match="key and value must have the same length"):
        m(q, rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 6, 12)))
    with pytest.raises(ValueError, match=r"value must have shape"):
        m(q, rng.standard_normal((2, 5, 8)), rng.standard_normal((3, 5, 12)))
    with pytest.raises(ValueError, match="kdim must be >= 1"):
        MultiHeadAttention(16, 2, kdim=0)


def test_cross_module_save_load_and_pickle(rng, tmp_path):
    m = MultiHeadAttention(16, 2, kdim=8, vdim=12, dtype=np.float64, seed=4)
    q, k, v = (rng.standard_normal((1, 3, d)) for d in (16, 8, 12))
    m.save(tmp_path / "m.npz")
    m2 = MultiHeadAttention.load(tmp_path / "m.npz")
    assert m2 == m and pickle.loads(pickle.dumps(m)) == m
    np.testing.assert_array_equal(m2(q, k, v), m(q, k, v))
    with pytest.raises(ValueError, match="format"):
        MultiHeadSelfAttention.load(tmp_path / "m.npz")


# ---- KV cache ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(np.float32, TOL32), (np.float64, TOL64)])
@pytest.mark.parametrize("kv_heads", [None, 1])
def test_decoding_token_by_token_equals_the_causal_forward(rng, dtype, tol, kv_heads):
    m = MultiHeadSelfAttention(32, 4, num_kv_heads=kv_heads, dtype=dtype, seed=5)
    x = rng.standard_normal((2, 23, 32)).astype(dtype)
    full = m(x, is_causal=True)
    cache = m.new_cache(2, 32)
    steps = [m(x[:, t:t + 1], cache=cache) for t in range(23)]
    assert len(cache) == 23
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, **tol)
    # chunks of several tokens, after a reset
    cache.reset()
    assert len(cache) == 0
    chunks = [m(x[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 17), (17, 23))]
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, **tol)


def test_cache_decoding_with_window_alibi_and_padding(rng):
    m = MultiHeadSelfAttention(32, 4, dtype=np.float64, seed=6)
    x = rng.standard_normal((2, 15, 32))
    kpm = np.zeros((2, 15), bool)
    kpm[1, 2:4] = True
    full = m(x, is_causal=True, window=(4, 0), alibi=True, key_padding_mask=kpm)
    cache = m.new_cache(2, 4, grow=True)  # grows from 4 to 16 on the way
    steps = [m(x[:, t:t + 1], cache=cache, window=(4, 0), alibi=True,
               key_padding_mask=kpm[:, :t + 1]) for t in range(15)]
    assert cache.capacity >= 15
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, **TOL64)


def test_cross_attention_cache(rng):
    m = MultiHeadAttention(16, 2, kdim=8, vdim=8, dtype=np.float64, seed=7)
    q, k, v = rng.standard_normal((1, 6, 16)), rng.standard_normal((1, 6, 8)), rng.standard_normal((1, 6, 8))
    full = m(q, k, v, is_causal=True)
    cache = m.new_cache(1, 6)
    steps = [m(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache=cache) for t in range(6)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, **TOL64)


def test_cache_errors(rng):
    m = MultiHeadSelfAttention(16, 2, seed=0)
    cache = m.new_cache(2, 3)
    m(rng.standard_normal((2, 3, 16)), cache=cache)
    with pytest.raises(ValueError, match="cache is full: it holds 3 positions"):
        m(rng.standard_normal((2, 1, 16)), cache=cache)
    with pytest.raises(ValueError, match="cache was made for batch size 2"):
        m(rng.standard_normal((1, 1, 16)), cache=m.new_cache(2, 8))
    with pytest.raises(ValueError, match=r"cache dtype float64 does not fit a module whose "
                                         r"activations are float32 \(computed in float32\): "
                                         r"its cache holds float32, bfloat16 or float16"):
        m64 = MultiHeadSelfAttention(16, 2, dtype=np.float64, seed=0)
        m(rng.standard_normal((1, 1, 16)), cache=m64.new_cache(1, 8))
    with pytest.raises(ValueError, match="cache holds 1 heads"):
        m(rng.standard_normal((1, 1, 16)),
          cache=MultiHeadSelfAttention(16, 2, num_kv_heads=1).new_cache(1, 8))
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        m(rng.standard_normal((1, 1, 16)), cache=object())
    with pytest.raises(ValueError, match="max_len must be >= 1, got 0"):
        m.new_cache(1, 0)


# ---- windows and ALiBi in the modules ----------------------------------------------

@pytest.mark.parametrize("window", [(3, 3), (None, 0), (5, None)])
def test_module_window_and_alibi_match_reference(rng, window):
    m = MultiHeadSelfAttention(32, 4, dtype=np.float64, seed=8)
    x = rng.standard_normal((2, 20, 32))
    bias = positional_bias(20, 20, 4, window, alibi_slopes(4))
    y, w = m(x, window=window, alibi=True, need_weights=True, average_attn_weights=False)
    ref_y, ref_w = ref_mha(x, x, x, m, bias=bias)
    np.testing.assert_allclose(y, ref_y, **TOL64)
    np.testing.assert_allclose(w, ref_w, **TOL64)


def test_module_feature_errors(rng):
    m = MultiHeadSelfAttention(16, 2, seed=0)
    x = rng.standard_normal((1, 4, 16))
    with pytest.raises(ValueError, match="window left side must be >= 0"):
        m(x, window=(-2, 0))
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(2,\)"):
        m(x, alibi_slopes=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, alibi=True, attn_mask=np.zeros((3, 4, 4)))


# ---- torch interop both ways --------------------------------------------------------

def test_to_torch_without_torch_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="to_torch needs PyTorch"):
        MultiHeadSelfAttention(16, 2, seed=0).to_torch()


def test_to_torch_round_trip(rng):
    torch = pytest.importorskip("torch")
    for m in (MultiHeadSelfAttention(32, 4, seed=9),
              MultiHeadAttention(32, 4, kdim=20, vdim=28, seed=9),
              MultiHeadAttention(32, 4, bias=False, dtype=np.float64, seed=9)):
        t = m.to_torch()
        assert isinstance(t, torch.nn.MultiheadAttention) and t.batch_first and not t.training
        q = rng.standard_normal((2, 5, 32))
        k = rng.standard_normal((2, 7, m.kdim))
        v = rng.standard_normal((2, 7, m.vdim))
        tq, tk, tv = (torch.from_numpy(a.astype(m.dtype)) for a in (q, k, v))
        with torch.no_grad():
            ty = t(tq, tk, tv, need_weights=False)[0].numpy()
        ours = m(q) if isinstance(m, MultiHeadSelfAttention) else m(q, k, v)
        if isinstance(m, MultiHeadSelfAttention):
            with torch.no_grad():
                ty = t(tq, tq, tq, need_weights=False)[0].numpy()
        np.testing.assert_allclose(ours, ty, rtol=1e-4, atol=1e-5)
        back = type(m).from_torch(t)
        assert back.config() == m.config()
        np.testing.assert_array_equal(back.w_o, m.w_o)
    with pytest.raises(ValueError, match="grouped-query"):
        MultiHeadSelfAttention(32, 4, num_kv_heads=2).to_torch()


def test_from_torch_cross_attention_with_kdim_vdim(rng):
    torch = pytest.importorskip("torch")
    t = torch.nn.MultiheadAttention(16, 4, kdim=6, vdim=10, batch_first=True).eval()
    with torch.no_grad():
        t.in_proj_bias.normal_()
        t.out_proj.bias.normal_()
    m = MultiHeadAttention.from_torch(t)
    assert (m.kdim, m.vdim) == (6, 10)
    q, k, v = (rng.standard_normal((2, n, d)).astype(np.float32) for n, d in ((3, 16), (5, 6), (5, 10)))
    pad = np.array([[False] * 4 + [True], [False] * 5])
    with torch.no_grad():
        ty, tw = t(*(torch.from_numpy(a) for a in (q, k, v)),
                   key_padding_mask=torch.from_numpy(pad))
    y, w = m(q, k, v, key_padding_mask=pad, need_weights=True)
    np.testing.assert_allclose(y, ty.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w, tw.numpy(), rtol=1e-4, atol=1e-5)
    sd = {k_: v_ for k_, v_ in t.state_dict().items()}
    m2 = MultiHeadAttention(16, 4, kdim=6, vdim=10)
    m2.load_state_dict(sd)  # q_proj_weight / k_proj_weight / v_proj_weight names
    assert m2 == m
    with pytest.raises(ValueError, match="cross-attention"):
        MultiHeadSelfAttention.from_torch(t)


# ---- a failed call leaves the cache as it was ---------------------------------------

@pytest.mark.parametrize("bad", ["key_padding_mask", "attn_mask", "kernel"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_failed_call_does_not_grow_the_cache(rng, monkeypatch, bad, cross):
    D, H = 16, 2
    if cross:
        m = MultiHeadAttention(D, H, kdim=12, vdim=10, dtype=np.float64, seed=3)
    else:
        m = MultiHeadSelfAttention(D, H, dtype=np.float64, seed=3)
    x = rng.standard_normal((1, 5, D))
    kx, vx = rng.standard_normal((1, 5, 12)), rng.standard_normal((1, 5, 10))

    def call(sl, **kw):
        return m(x[:, sl], kx[:, sl], vx[:, sl], **kw) if cross else m(x[:, sl], **kw)

    full = call(slice(None), is_causal=True)
    cache = m.new_cache(1, 8)
    call(slice(0, 3), cache=cache)
    step = slice(3, 5)
    if bad == "key_padding_mask":
        kwargs, error = dict(key_padding_mask=np.zeros((1, 2), bool)), ValueError
    elif bad == "attn_mask":
        kwargs, error = dict(attn_mask=np.zeros((2, 3), bool)), ValueError
    else:
        def fail(*args, **kw):
            raise MemoryError("injected after the cache append")
        monkeypatch.setattr(m, "_attend_and_project", fail)
        kwargs, error = {}, MemoryError
    with pytest.raises(error):
        call(step, cache=cache, **kwargs)
    assert len(cache) == 3
    monkeypatch.undo()
    # the retry sees the same cache as a first try would: the uncached result
    np.testing.assert_allclose(call(step, cache=cache), full[:, step], **TOL64)
    assert len(cache) == 5


@pytest.mark.parametrize("kwargs, error, needle", [
    (dict(grow="no"), TypeError, "grow must be True or False, got 'no'"),
    (dict(max_len=8.0), TypeError, "max_len must be a positive int, got 8.0"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1, got 0"),
])
def test_new_cache_checks_its_arguments(kwargs, error, needle):
    m = MultiHeadSelfAttention(16, 2)
    args = dict(batch_size=1, max_len=8)
    args.update(kwargs)
    with pytest.raises(error, match=re.escape(needle)):
        m.new_cache(**args)


@pytest.mark.parametrize("kwargs, error, needle", [
    (dict(num_kv_heads=2.5), TypeError, "num_kv_heads must be a positive int, got 2.5"),
    (dict(num_kv_heads=-1), ValueError, "num_kv_heads must be >= 1, got -1"),
    (dict(head_dim=0), ValueError, "head_dim must be >= 1, got 0"),
    (dict(dtype=int), TypeError, "dtype must be one of float32, float64, bfloat16 or float16, got int64"),
])
def test_kvcache_checks_its_arguments(kwargs, error, needle):
    from fastattn.cache import KVCache

    args = dict(batch_size=1, max_len=4, num_kv_heads=2, head_dim=8, dtype=np.float32)
    args.update(kwargs)
    with pytest.raises(error, match=re.escape(needle)):
        KVCache(**args)


def test_cache_growth_that_fails_leaves_the_cache_usable(rng, monkeypatch):
    # growing allocates both arrays before replacing either: an allocation
    # that fails half-way leaves K and V the same length
    import fastattn.cache as cache_mod

    m = MultiHeadSelfAttention(16, 2, dtype=np.float64, seed=4)
    x = rng.standard_normal((1, 5, 16))
    full = m(x, is_causal=True)
    cache = m.new_cache(1, 3, grow=True)
    m(x[:, :3], cache=cache)
    calls = []
    real_empty = np.empty

    def empty(*args, **kw):
        calls.append(args)
        if len(calls) == 2:
            raise MemoryError("injected: the second array of a growth")
        return real_empty(*args, **kw)

    monkeypatch.setattr(cache_mod.np, "empty", empty)
    with pytest.raises(MemoryError):
        m(x[:, 3:], cache=cache)
    monkeypatch.undo()
    assert len(cache) == 3 and cache.capacity == 3
    assert cache.keys().shape == cache.values().shape
    np.testing.assert_allclose(m(x[:, 3:], cache=cache), full[:, 3:], **TOL64)
    assert len(cache) == 5 and cache.capacity == 6


def test_cache_append_checks_and_converts_its_inputs():
    from fastattn.cache import KVCache
    c = KVCache(2, 8, 2, 4, np.float32)
    k = np.ones((2, 3, 8))  # float64: cast to the cache's dtype
    c.append(k.tolist(), k)
    assert len(c) == 3 and c.keys().dtype == np.float32
    with pytest.raises(ValueError, match=r"k_new must have shape \(2, T, 8\), got \(2, 3, 7\)"):
        c.append(np.ones((2, 3, 7)), np.ones((2, 3, 7)))
    with pytest.raises(ValueError, match="k_new and v_new"):
        c.append(np.ones((2, 3, 8)), np.ones((2, 2, 8)))
    with pytest.raises(TypeError, match="k_new is a numpy masked array"):
        c.append(np.ma.masked_array(k), k)
    assert len(c) == 3
