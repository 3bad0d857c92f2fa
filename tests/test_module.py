"""fastattn.MultiHeadSelfAttention against the float64 reference forward.

Tolerances (see _util.MOD_TOL): float32 rtol 2e-5 / atol 2e-5, float64 rtol
1e-11 / atol 1e-12.
"""
import io
import pathlib

import ml_dtypes
import numpy as np
import pytest

import fastattn
from _util import assert_msg, mod_tol, randn
from reference import PARAM_NAMES, params_of, ref_mhsa

MHSA = fastattn.MultiHeadSelfAttention
DTYPES = [np.float32, np.float64]


def ref_forward(m, x, **kw):
    return ref_mhsa(x, params_of(m), m.num_heads, m.num_kv_heads, **kw)


def check_module(m, x, tolerance=None, **kw):
    """Compare m(x) (with and without weights) with the reference."""
    dtype = np.dtype(m.dtype)
    t = mod_tol(dtype) if tolerance is None else tolerance
    ref_y, ref_w = ref_forward(m, x, **kw)

    y = m(x, **kw)
    assert isinstance(y, np.ndarray)
    assert y.shape == np.shape(x) and y.dtype == dtype
    np.testing.assert_allclose(y, ref_y, **t)

    y2, w = m(x, need_weights=True, **kw)
    np.testing.assert_allclose(y2, ref_y, **t)
    assert w.dtype == dtype
    if np.ndim(x) == 3:
        assert w.shape == (x.shape[0], x.shape[1], x.shape[1])
        np.testing.assert_allclose(w, ref_w.mean(axis=1), **t)
        y3, wh = m(x, need_weights=True, average_attn_weights=False, **kw)
        assert wh.shape == ref_w.shape
        np.testing.assert_allclose(y3, ref_y, **t)
        np.testing.assert_allclose(wh, ref_w, **t)
    return y


# ----------------------------------------------------------------- construction

@pytest.mark.parametrize("D,H,kv", [(64, 8, None), (64, 8, 2), (48, 4, 1), (32, 1, None),
                                    (30, 6, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attributes_and_weight_shapes(D, H, kv, dtype):
    m = MHSA(D, H, num_kv_heads=kv, dtype=dtype, seed=0)
    kvh = H if kv is None else kv
    hd = D // H
    assert m.d_model == D and m.num_heads == H and m.num_kv_heads == kvh and m.head_dim == hd
    assert np.dtype(m.dtype) == np.dtype(dtype)
    shapes = {"w_q": (D, D), "w_k": (kvh * hd, D), "w_v": (kvh * hd, D), "w_o": (D, D),
              "b_q": (D,), "b_k": (kvh * hd,), "b_v": (kvh * hd,), "b_o": (D,)}
    for name, shape in shapes.items():
        arr = getattr(m, name)
        assert isinstance(arr, np.ndarray), name
        assert arr.shape == shape, name
        assert arr.dtype == np.dtype(dtype), name


def test_bias_false_has_none_biases():
    m = MHSA(32, 4, bias=False, seed=0)
    for name in ("b_q", "b_k", "b_v", "b_o"):
        assert getattr(m, name) is None
    for name in ("w_q", "w_k", "w_v", "w_o"):
        assert isinstance(getattr(m, name), np.ndarray)


def test_init_like_torch_linear():
    D = 256
    m = MHSA(D, 8, seed=0)
    bound = 1 / np.sqrt(D)
    for name in PARAM_NAMES:
        a = getattr(m, name).astype(np.float64)
        assert np.all(np.abs(a) <= bound * (1 + 1e-6)), name
        assert np.abs(a).max() > 0.9 * bound, name  # actually spans the range
        if a.ndim == 2:
            # uniform(-b, b): std = b / sqrt(3)
            np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.05, err_msg=name)
            assert abs(a.mean()) < 0.05 * bound, name
    # the four matrices are not copies of each other
    assert not np.array_equal(m.w_q, m.w_k)
    assert not np.array_equal(m.w_q, m.w_o)


def test_seed_determinism():
    a = MHSA(32, 4, seed=123)
    b = MHSA(32, 4, seed=123)
    c = MHSA(32, 4, seed=124)
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.w_q, c.w_q)
    x = randn(np.random.default_rng(0), (2, 5, 32))
    np.testing.assert_array_equal(a(x), b(x))


def test_seed_none_works(rng):
    m = MHSA(16, 2)
    y = m(randn(rng, (1, 3, 16)))
    assert y.shape == (1, 3, 16) and np.isfinite(y).all()


# -------------------------------------------------------------------- forward

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,D,H,kv,bias", [
    (2, 7, 32, 4, None, True),
    (1, 1, 16, 2, None, True),
    (3, 33, 64, 8, 2, True),
    (2, 20, 48, 4, 1, False),
    (2, 65, 40, 5, None, False),
    (1, 130, 64, 2, None, True),
])
def test_forward_matches_reference(rng, B, N, D, H, kv, bias, dtype):
    m = MHSA(D, H, num_kv_heads=kv, bias=bias, dtype=dtype, seed=7)
    x = randn(rng, (B, N, D), dtype)
    check_module(m, x)
    check_module(m, x, is_causal=True)


def _took_plain_path(m):
    return m._plan is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,D,H,kv", [(2, 7, 32, 4, None), (3, 33, 64, 8, 2), (1, 130, 64, 2, 1)])
def test_plain_call_is_the_general_forward(rng, B, N, D, H, kv, dtype):
    # m(x) with no options takes a short path; any option (here an explicit
    # numpy False, which the short path does not accept) takes the general one:
    # the same kernels, so the same bits
    m = MHSA(D, H, num_kv_heads=kv, dtype=dtype, seed=3)
    x = randn(rng, (B, N, D), dtype)
    y = m(x)
    assert _took_plain_path(m)
    np.testing.assert_array_equal(y, m(x, is_causal=np.False_))
    np.testing.assert_allclose(y, ref_forward(m, x)[0], **mod_tol(dtype))


def test_plain_call_reads_byte_swapped_input_right(rng):
    # the plan checks the byte order too (its type number does not say it)
    for dtype in DTYPES:
        m = MHSA(32, 4, dtype=dtype, seed=2)
        x = randn(rng, (2, 6, 32), dtype)
        y = m(x)
        assert _took_plain_path(m)
        swapped = x.astype(np.dtype(dtype).newbyteorder(">" if np.little_endian else "<"))
        np.testing.assert_array_equal(m(swapped), y)


def test_plans_do_not_keep_old_weights_or_ended_threads_buffers(rng):
    import gc
    import threading
    import weakref

    m = MHSA(32, 4, seed=1)
    x = randn(rng, (2, 6, 32))
    m(x)
    old = weakref.ref(m._state.packed["qkv"][0])

    together = threading.Barrier(3)

    def call():
        m(x)
        together.wait()  # alive until all three have planned

    workers = [threading.Thread(target=call) for _ in range(3)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert len(m._state.plans) == 4
    # a plan made after those threads ended drops theirs
    x2 = randn(rng, (1, 3, 32))
    m(x2)
    assert list(m._state.plans) == [threading.get_ident()]
    m.reset_parameters(5)  # the plans held the old packed weights
    gc.collect()
    assert old() is None and m._plan is None and not m._state.plans
    np.testing.assert_allclose(m(x), ref_forward(m, x)[0], **mod_tol(np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plain_call_runs_per_head_when_each_thread_has_a_head(rng, dtype):
    # one (batch entry, K/V head) per work item, while each thread gets two
    # or more of them; either way the same result
    old = fastattn.get_num_threads()
    try:
        for B, H, Hkv, nt, per_head in ((4, 2, 1, 2, True), (1, 4, 2, 3, False), (3, 4, 4, 1, True), (1, 2, 2, 1, True)):
            fastattn.set_num_threads(nt)
            m = MHSA(4 * 64, H, num_kv_heads=Hkv, seed=2, dtype=dtype)
            x = randn(rng, (B, 40, 4 * 64), dtype)
            y = m(x)
            assert m._plan.per_head == per_head
            np.testing.assert_allclose(y, ref_forward(m, x)[0], **mod_tol(dtype))
    finally:
        fastattn.set_num_threads(old)


def test_plain_call_follows_weights_shapes_and_threads(rng):
    m = MHSA(32, 4, seed=1)
    x = randn(rng, (2, 9, 32))
    y0 = m(x)
    # a weight change (assignment, state dict, re-initialisation) is seen
    m.w_q = randn(rng, (32, 32))
    np.testing.assert_allclose(m(x), ref_forward(m, x)[0], **mod_tol(np.float32))
    m.load_state_dict({**m.state_dict(), "w_o": randn(rng, (32, 32))})
    np.testing.assert_allclose(m(x), ref_forward(m, x)[0], **mod_tol(np.float32))
    m.reset_parameters(1)
    np.testing.assert_array_equal(m(x), y0)
    # another shape, back again, another thread count: each output its own array
    x2 = randn(rng, (1, 17, 32))
    y2 = m(x2)
    np.testing.assert_allclose(y2, ref_forward(m, x2)[0], **mod_tol(np.float32))
    keep = y2.copy()
    old = fastattn.get_num_threads()
    try:
        fastattn.set_num_threads(1)
        np.testing.assert_array_equal(m(x), y0)
    finally:
        fastattn.set_num_threads(old)
    np.testing.assert_array_equal(y2, keep)
    assert m(x2) is not y2


@pytest.mark.parametrize("dtype", DTYPES)
def test_unbatched_input(rng, dtype):
    m = MHSA(32, 4, dtype=dtype, seed=1)
    x = randn(rng, (9, 32), dtype)
    y = check_module(m, x)
    assert y.shape == (9, 32)
    np.testing.assert_allclose(y, m(x[None])[0], rtol=1e-6, atol=1e-7)
    yc = m(x, is_causal=True)
    np.testing.assert_allclose(yc, ref_forward(m, x, is_causal=True)[0], **mod_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_key_padding_mask(rng, dtype):
    B, N, D = 3, 10, 32
    m = MHSA(D, 4, dtype=dtype, seed=2)
    x = randn(rng, (B, N, D), dtype)
    kpm = np.zeros((B, N), bool)
    kpm[0, 7:] = True   # last 3 keys of batch 0 are padding
    kpm[1, :2] = True
    kpm[2, :] = True    # batch 2 fully padded -> attention output zero, y == b_o
    y = check_module(m, x, key_padding_mask=kpm)
    np.testing.assert_allclose(y[2], np.broadcast_to(m.b_o, (N, D)), **mod_tol(dtype))
    _, w = m(x, key_padding_mask=kpm, need_weights=True, average_attn_weights=False)
    assert np.all(w[0, :, :, 7:] == 0) and np.all(w[1, :, :, :2] == 0)
    # padded keys really are ignored: changing x at padded positions of batch 0
    # must not change the outputs at its unpadded positions
    x2 = x.copy()
    x2[0, 7:] = randn(rng, (3, D), dtype)
    y2 = m(x2, key_padding_mask=kpm)
    np.testing.assert_allclose(y2[0, :7], y[0, :7], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_key_padding_mask_with_causal_and_attn_mask(rng, dtype):
    B, N, D, H = 2, 12, 32, 4
    m = MHSA(D, H, dtype=dtype, seed=3)
    x = randn(rng, (B, N, D), dtype)
    kpm = np.zeros((B, N), bool)
    kpm[0, 9:] = True
    kpm[1, 0] = True   # with causal, query 0 of batch 1 sees nothing
    check_module(m, x, key_padding_mask=kpm, is_causal=True)
    am = rng.random((N, N)) < 0.7
    check_module(m, x, key_padding_mask=kpm, attn_mask=am)
    check_module(m, x, key_padding_mask=kpm, attn_mask=am, is_causal=True)
    fm = rng.standard_normal((B, H, N, N)).astype(dtype)
    fm[rng.random(fm.shape) < 0.2] = -np.inf
    check_module(m, x, key_padding_mask=kpm, attn_mask=fm)
    check_module(m, x, key_padding_mask=kpm, attn_mask=fm, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mshape", [(12, 12), (2, 1, 12, 12), (2, 4, 12, 12), (1, 4, 12, 12),
                                    (2, 1, 1, 12)], ids=str)
def test_attn_mask_shapes(rng, mshape, dtype):
    m = MHSA(32, 4, dtype=dtype, seed=4)
    x = randn(rng, (2, 12, 32), dtype)
    check_module(m, x, attn_mask=rng.random(mshape) < 0.7)
    fm = rng.standard_normal(mshape).astype(dtype)
    fm[rng.random(mshape) < 0.2] = -np.inf
    check_module(m, x, attn_mask=fm)


def test_need_weights_shapes_and_sums(rng):
    m = MHSA(32, 4, num_kv_heads=2, seed=5)
    x = randn(rng, (2, 9, 32))
    y, w = m(x, need_weights=True)
    assert w.shape == (2, 9, 9)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    y2, wh = m(x, need_weights=True, average_attn_weights=False)
    assert wh.shape == (2, 4, 9, 9)
    np.testing.assert_allclose(wh.mean(axis=1), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, m(x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-7)


def test_bias_false_forward(rng):
    m = MHSA(32, 4, bias=False, seed=6)
    x = randn(rng, (2, 8, 32))
    check_module(m, x)
    # with no biases a zero input must give exactly zero output
    np.testing.assert_array_equal(m(np.zeros((1, 3, 32), np.float32)), 0)


@pytest.mark.parametrize("kv", [1, 2, 4, 8])
def test_gqa_module(rng, kv):
    m = MHSA(64, 8, num_kv_heads=kv, seed=8)
    assert m.w_k.shape == (kv * 8, 64) and m.w_v.shape == (kv * 8, 64)
    x = randn(rng, (2, 11, 64))
    check_module(m, x)
    check_module(m, x, is_causal=True)


# -------------------------------------------------------------- dtype / casting

def test_float64_module(rng):
    m = MHSA(32, 4, dtype=np.float64, seed=9)
    x = rng.standard_normal((2, 10, 32))
    y = check_module(m, x)
    assert y.dtype == np.float64


def test_input_cast_to_module_dtype(rng):
    m32 = MHSA(32, 4, dtype=np.float32, seed=10)
    x64 = rng.standard_normal((2, 6, 32))
    y = m32(x64)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, m32(x64.astype(np.float32)), rtol=1e-6, atol=1e-7)
    _, w = m32(x64, need_weights=True)
    assert w.dtype == np.float32

    m64 = MHSA(32, 4, dtype=np.float64, seed=10)
    x32 = x64.astype(np.float32)
    y64 = m64(x32)
    assert y64.dtype == np.float64
    np.testing.assert_allclose(y64, m64(x32.astype(np.float64)), rtol=1e-13, atol=1e-14)


def test_module_strided_input(rng):
    m = MHSA(32, 4, seed=11)
    big = randn(rng, (4, 20, 64))
    x = big[::2, ::-2, 1::2]          # (2, 10, 32), all axes strided
    check_module(m, x)
    np.testing.assert_allclose(m(x), m(np.ascontiguousarray(x)), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ state_dict

def test_state_dict_contents():
    m = MHSA(32, 4, num_kv_heads=2, seed=12)
    sd = m.state_dict()
    assert set(sd) == set(PARAM_NAMES)
    for name in PARAM_NAMES:
        assert isinstance(sd[name], np.ndarray)
        np.testing.assert_array_equal(sd[name], getattr(m, name))
    sd_nb = MHSA(32, 4, bias=False, seed=12).state_dict()
    assert {"w_q", "w_k", "w_v", "w_o"} <= set(sd_nb)
    assert all(isinstance(a, np.ndarray) for a in sd_nb.values())


@pytest.mark.parametrize("kw", [dict(), dict(num_kv_heads=2), dict(bias=False),
                                dict(dtype=np.float64)], ids=str)
def test_state_dict_round_trip(rng, kw):
    a = MHSA(32, 4, seed=13, **kw)
    b = MHSA(32, 4, seed=99, **kw)
    x = randn(rng, (2, 7, 32), np.dtype(a.dtype))
    assert not np.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    for name in PARAM_NAMES:
        if getattr(a, name) is None:
            assert getattr(b, name) is None
        else:
            np.testing.assert_array_equal(getattr(b, name), getattr(a, name))
    np.testing.assert_array_equal(b(x), a(x))


def _torch_names(sd):
    return {
        "in_proj_weight": np.concatenate([sd["w_q"], sd["w_k"], sd["w_v"]], axis=0),
        "in_proj_bias": np.concatenate([sd["b_q"], sd["b_k"], sd["b_v"]], axis=0),
        "out_proj.weight": sd["w_o"],
        "out_proj.bias": sd["b_o"],
    }


def _seed_names(sd):
    return {
        "query.weight": sd["w_q"], "query.bias": sd["b_q"],
        "key.weight": sd["w_k"], "key.bias": sd["b_k"],
        "value.weight": sd["w_v"], "value.bias": sd["b_v"],
        "fc.weight": sd["w_o"], "fc.bias": sd["b_o"],
    }


@pytest.mark.parametrize("scheme", ["own", "torch", "seed"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_load_state_dict_naming_schemes(rng, scheme, dtype):
    src = MHSA(32, 4, dtype=dtype, seed=14)
    sd = src.state_dict()
    d = {"own": dict(sd), "torch": _torch_names(sd), "seed": _seed_names(sd)}[scheme]
    # values given in float64 must be accepted and stored in the module's dtype
    d = {key: np.asarray(val, np.float64) for key, val in d.items()}
    dst = MHSA(32, 4, dtype=dtype, seed=15)
    dst.load_state_dict(d)
    for name in PARAM_NAMES:
        assert getattr(dst, name).dtype == np.dtype(dtype)
        np.testing.assert_allclose(getattr(dst, name), sd[name], rtol=0, atol=0)
    x = randn(rng, (2, 6, 32), dtype)
    np.testing.assert_allclose(dst(x), src(x), rtol=1e-7, atol=1e-7)


def test_load_torch_names_without_bias(rng):
    src = MHSA(32, 4, bias=False, seed=16)
    sd = src.state_dict()
    d = {"in_proj_weight": np.concatenate([sd["w_q"], sd["w_k"], sd["w_v"]]),
         "out_proj.weight": sd["w_o"]}
    dst = MHSA(32, 4, bias=False, seed=17)
    dst.load_state_dict(d)
    x = randn(rng, (1, 5, 32))
    np.testing.assert_array_equal(dst(x), src(x))


@pytest.mark.parametrize("key,bad_shape,good_shape", [
    ("w_q", (32, 31), (32, 32)),
    ("w_k", (32, 32), (16, 32)),      # num_kv_heads=2 -> (16, 32)
    ("b_o", (31,), (32,)),
    ("w_o", (32,), (32, 32)),
])
def test_load_state_dict_wrong_shape_own_names(key, bad_shape, good_shape):
    m = MHSA(32, 4, num_kv_heads=2, seed=18)
    sd = m.state_dict()
    before = {n: getattr(m, n).copy() for n in PARAM_NAMES}
    sd[key] = np.zeros(bad_shape, np.float32)
    with pytest.raises(ValueError) as ei:
        m.load_state_dict(sd)
    assert_msg(ei, names=[key], shapes=[bad_shape])
    assert_msg(ei, shapes=[good_shape])
    for n in PARAM_NAMES:  # a failed load changes nothing
        np.testing.assert_array_equal(getattr(m, n), before[n])


@pytest.mark.parametrize("scheme,key,bad_shape,good_shape", [
    ("torch", "in_proj_weight", (96, 31), (96, 32)),
    ("torch", "in_proj_bias", (95,), (96,)),
    ("torch", "out_proj.weight", (32, 33), (32, 32)),
    ("seed", "query.weight", (31, 32), (32, 32)),
    ("seed", "fc.bias", (33,), (32,)),
])
def test_load_state_dict_wrong_shape_foreign_names(scheme, key, bad_shape, good_shape):
    m = MHSA(32, 4, seed=19)
    sd = m.state_dict()
    d = _torch_names(sd) if scheme == "torch" else _seed_names(sd)
    d[key] = np.zeros(bad_shape, np.float32)
    with pytest.raises(ValueError) as ei:
        m.load_state_dict(d)
    # the key as the caller spelled it, and the shape the caller passed
    assert_msg(ei, names=[key], shapes=[bad_shape])
    if len(good_shape) == 1:
        # for a vector, "expected length 96" is as good as "(96,)"
        assert_msg(ei, numbers=[good_shape[0]])
    else:
        assert_msg(ei, shapes=[good_shape])


# ------------------------------------------------------------------ save / load

@pytest.mark.parametrize("kw", [dict(), dict(num_kv_heads=2, bias=False, dtype=np.float64)],
                         ids=["default", "gqa_nobias_f64"])
def test_save_load_round_trip(rng, tmp_path, kw):
    m = MHSA(48, 6, seed=20, **kw)
    path = tmp_path / "model.npz"
    m.save(str(path))
    assert path.exists()
    m2 = MHSA.load(str(path))
    assert isinstance(m2, MHSA)
    for attr in ("d_model", "num_heads", "num_kv_heads", "head_dim"):
        assert getattr(m2, attr) == getattr(m, attr)
    assert np.dtype(m2.dtype) == np.dtype(m.dtype)
    for name in PARAM_NAMES:
        if getattr(m, name) is None:
            assert getattr(m2, name) is None
        else:
            np.testing.assert_array_equal(getattr(m2, name), getattr(m, name))
    x = randn(rng, (2, 9, 48), np.dtype(m.dtype))
    np.testing.assert_array_equal(m2(x), m(x))
    np.testing.assert_array_equal(m2(x, is_causal=True), m(x, is_causal=True))
    # it is a .npz archive holding the weights
    with np.load(str(path)) as z:
        assert len(z.files) >= 4


def test_modules_are_equal_when_their_parameters_are_the_same_bits(tmp_path):
    import copy
    import pickle

    m = MHSA(16, 2, seed=23)
    w = m.w_q.copy()
    w[0, 0] = np.nan  # a NaN weight is still the weight the copies hold
    m.w_q = w
    m.save(tmp_path / "nan.npz")
    for other in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m), MHSA.load(tmp_path / "nan.npz")):
        assert other == m
    m.b_o = np.zeros(16, np.float32)
    other = copy.deepcopy(m)
    other.b_o = -np.zeros(16, np.float32)  # equal numbers, other bits
    assert other != m


def test_save_load_pathlib(rng, tmp_path):
    m = MHSA(16, 2, seed=21)
    path = pathlib.Path(tmp_path) / "m.npz"
    m.save(path)
    m2 = MHSA.load(path)
    x = randn(rng, (1, 4, 16))
    np.testing.assert_array_equal(m2(x), m(x))


def test_save_load_without_suffix_and_file_objects(rng, tmp_path):
    # numpy's savez adds ".npz" to a bare name; load finds the file under the
    # name save was given, and both take binary file objects
    m = MHSA(16, 2, seed=22)
    x = randn(rng, (1, 4, 16))
    m.save(str(tmp_path / "model"))
    assert (tmp_path / "model.npz").exists() and not (tmp_path / "model").exists()
    np.testing.assert_array_equal(MHSA.load(str(tmp_path / "model"))(x), m(x))
    np.testing.assert_array_equal(MHSA.load(tmp_path / "model")(x), m(x))
    buf = io.BytesIO()
    m.save(buf)
    buf.seek(0)
    np.testing.assert_array_equal(MHSA.load(buf)(x), m(x))
    with pytest.raises(ValueError, match="<BytesIO>: not a fastattn .npz archive"):
        MHSA.load(io.BytesIO(b"not a zip file"))
    with pytest.raises(FileNotFoundError):
        MHSA.load(str(tmp_path / "missing"))


# ---------------------------------------------------------------- constructor errors

@pytest.mark.parametrize("D,H", [(10, 3), (64, 7), (30, 4)])
def test_d_model_not_divisible(D, H):
    with pytest.raises(ValueError) as ei:
        MHSA(D, H)
    assert_msg(ei, numbers=[D, H])


@pytest.mark.parametrize("H,kv", [(4, 3), (8, 3), (2, 4)])
def test_num_heads_not_multiple_of_kv_heads(H, kv):
    with pytest.raises(ValueError) as ei:
        MHSA(8 * H, H, num_kv_heads=kv)
    assert_msg(ei, numbers=[H, kv])


# ---------------------------------------------------------------- weights beyond the dtype

def test_weights_beyond_float32_range_are_refused_and_change_nothing(rng):
    m = MHSA(16, 2, seed=30)
    x = randn(rng, (1, 4, 16))
    before = m(x)
    state = {k: v.astype(np.float64) for k, v in MHSA(16, 2, seed=31).state_dict().items()}
    state["w_o"][0, 0] = 1e39
    with pytest.raises(ValueError, match=r"w_o: finite values beyond float32's range "
                                         r"\(largest magnitude 1e\+39\)"):
        m.load_state_dict(state)
    # nothing was written: neither the earlier keys nor the plans
    np.testing.assert_array_equal(m(x), before)
    fresh = MHSA(16, 2, seed=0)
    fresh.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(fresh(x), before)
    with pytest.raises(ValueError, match=r"w_q: finite values beyond float32's range"):
        m.w_q = np.full((16, 16), 1e300)
    np.testing.assert_array_equal(m(x), before)
    # torch's stacked name is the one the message gives
    state = {k: v.astype(np.float64) for k, v in m.state_dict().items()}
    stacked = {"in_proj_weight": np.concatenate([state.pop("w_q"), state.pop("w_k"),
                                                 state.pop("w_v")])}
    stacked["in_proj_weight"][20, 3] = -1e39
    with pytest.raises(ValueError, match=r"in_proj_weight \(part k\): finite values beyond"):
        m.load_state_dict({**state, **stacked})
    # float64 modules take them
    m64 = MHSA(16, 2, seed=30, dtype=np.float64)
    m64.w_q = np.full((16, 16), 1e300)
    assert m64.w_q[0, 0] == 1e300


def test_state_dict_with_two_names_for_one_parameter_is_refused():
    m = MHSA(16, 2, seed=32)
    state = m.state_dict()
    state["in_proj_weight"] = np.zeros((48, 16), np.float32)
    with pytest.raises(ValueError, match="state dict gives w_q twice: as 'w_q' and as "
                                         "'in_proj_weight'"):
        m.load_state_dict(state)


def test_unreadable_tensors_name_the_argument():
    # what a meta or sparse torch tensor does on .cpu() (a stand-in: a real one
    # throws a C++ exception, which AddressSanitizer's runtime cannot pass
    # through when tests/sanitize.sh preloads it)
    class Unreadable:
        def detach(self):
            return self

        def cpu(self):
            raise RuntimeError("Cannot copy out of meta tensor; no data!")

        def numpy(self):  # pragma: no cover - never reached
            raise AssertionError

    m = MHSA(16, 2, seed=34)
    with pytest.raises(TypeError, match=r"x: cannot read this tensor as a numpy array "
                                        r"\(Cannot copy out of meta tensor"):
        m(Unreadable())
    with pytest.raises(TypeError, match=r"w_q: cannot read this tensor as a numpy array"):
        m.w_q = Unreadable()


def test_torch_tensors_as_inputs():
    torch = pytest.importorskip("torch")
    m = MHSA(16, 2, seed=33)
    x = torch.randn(1, 4, 16)
    want = m(x.numpy())
    # requires_grad and bfloat16 tensors are read as numpy arrays (bfloat16 as
    # ml_dtypes.bfloat16, cast to the module's float32 exactly)
    np.testing.assert_array_equal(m(x.clone().requires_grad_(True)), want)
    np.testing.assert_array_equal(m(x.bfloat16()), m(x.bfloat16().float().numpy()))
    # masks too: float (bfloat16, requiring grad) and bool
    fmask = torch.triu(torch.full((4, 4), -1.5), 1)
    want_masked = m(x.numpy(), attn_mask=fmask.numpy())
    np.testing.assert_array_equal(m(x, attn_mask=fmask.clone().requires_grad_(True)), want_masked)
    np.testing.assert_array_equal(m(x, attn_mask=fmask.bfloat16()),
                                  m(x.numpy(), attn_mask=fmask.bfloat16().float().numpy()))
    pad = torch.tensor([[False, False, True, False]])
    np.testing.assert_array_equal(m(x, key_padding_mask=pad),
                                  m(x.numpy(), key_padding_mask=pad.numpy()))
    q = torch.randn(1, 2, 4, 8)
    # the functional API keeps bfloat16 tensors' type: bfloat16 in, bfloat16 out
    got = fastattn.scaled_dot_product_attention(q.bfloat16(), q.bfloat16(), q.bfloat16())
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        got.astype(np.float32),
        fastattn.scaled_dot_product_attention(*[q.bfloat16().float().numpy().astype(
            ml_dtypes.bfloat16)] * 3).astype(np.float32))


# ---- embed_dim, and d_model as its alias, on both classes ------------------------------

@pytest.mark.parametrize("cls", [fastattn.MultiHeadSelfAttention, fastattn.MultiHeadAttention])
def test_first_argument_is_embed_dim_with_d_model_as_alias(cls):
    import inspect
    assert list(inspect.signature(cls).parameters)[:2] == ["embed_dim", "num_heads"]
    a, b, c = cls(16, 4, seed=0), cls(embed_dim=16, num_heads=4, seed=0), cls(d_model=16,
                                                                               num_heads=4,
                                                                               seed=0)
    assert a == b == c and a.d_model == a.embed_dim == 16
    assert a.config()["embed_dim"] == 16 and cls(**a.config()).config() == a.config()
    with pytest.raises(TypeError, match="embed_dim.*d_model"):
        cls(16, 4, d_model=16)
    with pytest.raises(TypeError, match="embed_dim.*d_model"):
        cls(num_heads=4)
    with pytest.raises(TypeError, match="num_heads"):
        cls(16)
    with pytest.raises(TypeError, match="num_heads"):
        cls(d_model=16)
    # messages name the argument as the caller spelled it
    with pytest.raises(ValueError, match="d_model"):
        cls(d_model=10, num_heads=3)
    with pytest.raises(ValueError, match="embed_dim"):
        cls(10, 3)
