"""Every documented error: type, and a message naming the offending argument
(and, for shape errors, the received shape)."""
import numpy as np
import pytest

import fastattn
from _util import assert_msg

sdpa = fastattn.scaled_dot_product_attention
MHSA = fastattn.MultiHeadSelfAttention


def z(*shape, dtype=np.float32):
    return np.zeros(shape, dtype)


Q = z(2, 4, 5, 8)   # B=2, H=4, Lq=5, E=8
K = z(2, 2, 6, 8)   # Hkv=2, Lk=6
V = z(2, 2, 6, 3)   # Ev=3


# ------------------------------------------------------------------- sdpa shapes

@pytest.mark.parametrize("which,arr", [
    ("q", z(5, 8)), ("q", z(8)), ("k", z(6, 8)), ("v", z(6)), ("q", z())],
    ids=["q2d", "q1d", "k2d", "v1d", "q0d"])
def test_wrong_rank(which, arr):
    args = {"q": Q, "k": K, "v": V}
    args[which] = arr
    # keep the others consistent in rank where possible
    with pytest.raises(ValueError) as ei:
        sdpa(args["q"], args["k"], args["v"])
    assert_msg(ei, names=[which], shapes=[arr.shape])


def test_mismatched_head_dim_q_k():
    k = z(2, 2, 6, 7)
    with pytest.raises(ValueError) as ei:
        sdpa(Q, k, V)
    assert_msg(ei, names=["k", "q"], shapes=[k.shape, Q.shape])


def test_mismatched_lk_k_v():
    v = z(2, 2, 7, 3)
    with pytest.raises(ValueError) as ei:
        sdpa(Q, K, v)
    assert_msg(ei, names=["v", "k"], shapes=[v.shape, K.shape])


@pytest.mark.parametrize("H,Hkv", [(6, 4), (4, 3), (2, 4), (3, 2)])
def test_heads_not_multiple(H, Hkv):
    q, k, v = z(2, H, 5, 8), z(2, Hkv, 6, 8), z(2, Hkv, 6, 3)
    with pytest.raises(ValueError) as ei:
        sdpa(q, k, v)
    assert_msg(ei, names=["k", "q"], shapes=[k.shape, q.shape])


def test_kv_head_count_mismatch_k_v():
    v = z(2, 4, 6, 3)
    with pytest.raises(ValueError) as ei:
        sdpa(Q, K, v)
    assert_msg(ei, names=["v", "k"], shapes=[v.shape, K.shape])


@pytest.mark.parametrize("qs,ks,vs,bad", [
    ((2, 4, 5, 8), (3, 2, 6, 8), (3, 2, 6, 3), ("k", "q")),
    ((2, 4, 5, 8), (2, 2, 6, 8), (1, 2, 6, 3), ("v", "q", "k")),     # no broadcasting
    ((2, 3, 4, 5, 8), (3, 2, 6, 8), (3, 2, 6, 3), ("k", "q")),       # different ranks
    ((2, 3, 4, 5, 8), (2, 1, 2, 6, 8), (2, 1, 2, 6, 3), ("k", "q")),  # no broadcasting
])
def test_leading_axes_mismatch(qs, ks, vs, bad):
    q, k, v = z(*qs), z(*ks), z(*vs)
    with pytest.raises(ValueError) as ei:
        sdpa(q, k, v)
    assert_msg(ei, names=bad, shapes=[q.shape, k.shape, v.shape])


@pytest.mark.parametrize("mshape", [(5, 7), (6, 6), (3, 5, 6), (3, 1, 1, 6), (2, 2, 4, 5, 6),
                                    (7,)], ids=str)
@pytest.mark.parametrize("mdtype", [bool, np.float32])
def test_mask_not_broadcastable(mshape, mdtype):
    mask = np.ones(mshape, mdtype)
    with pytest.raises(ValueError) as ei:
        sdpa(Q, K, V, mask)
    assert_msg(ei, names=["attn_mask"], shapes=[mshape])


# ------------------------------------------------------------------- sdpa dtypes

@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64, np.complex128,
                                   object], ids=lambda d: np.dtype(d).name)
def test_non_float_dtype(which, dtype):
    args = {"q": Q, "k": K, "v": V}
    args[which] = args[which].astype(dtype)
    with pytest.raises(TypeError) as ei:
        sdpa(args["q"], args["k"], args["v"])
    assert_msg(ei, names=[which])


def test_all_int_inputs():
    with pytest.raises(TypeError):
        sdpa(Q.astype(np.int64), K.astype(np.int64), V.astype(np.int64))


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_mixed_float_dtypes(which):
    args = {"q": Q, "k": K, "v": V}
    args[which] = args[which].astype(np.float64)
    with pytest.raises((TypeError, ValueError)) as ei:
        sdpa(args["q"], args["k"], args["v"])
    assert_msg(ei, names=[which])


# ------------------------------------------------------------------- module

def test_module_input_last_dim():
    m = MHSA(16, 4, seed=0)
    x = z(2, 5, 15)
    with pytest.raises(ValueError) as ei:
        m(x)
    assert_msg(ei, names=["x"], shapes=[x.shape])
    x = z(5, 17)
    with pytest.raises(ValueError) as ei:
        m(x)
    assert_msg(ei, names=["x"], shapes=[x.shape])


@pytest.mark.parametrize("shape", [(16,), (1, 2, 5, 16), ()], ids=str)
def test_module_input_rank(shape):
    m = MHSA(16, 4, seed=0)
    x = z(*shape)
    with pytest.raises(ValueError) as ei:
        m(x)
    assert_msg(ei, names=["x"], shapes=[shape])


@pytest.mark.parametrize("kshape", [(2, 6), (2,), (3, 5), (5,), (2, 5, 1)], ids=str)
def test_key_padding_mask_wrong_shape(kshape):
    m = MHSA(16, 4, seed=0)
    with pytest.raises(ValueError) as ei:
        m(z(2, 5, 16), key_padding_mask=np.zeros(kshape, bool))
    assert_msg(ei, names=["key_padding_mask"], shapes=[kshape])


@pytest.mark.parametrize("kdtype", [np.float32, np.int64])
def test_key_padding_mask_wrong_dtype(kdtype):
    m = MHSA(16, 4, seed=0)
    with pytest.raises((TypeError, ValueError)) as ei:
        m(z(2, 5, 16), key_padding_mask=np.zeros((2, 5), kdtype))
    assert_msg(ei, names=["key_padding_mask"])


@pytest.mark.parametrize("mshape", [(5, 6), (3, 5, 5), (2, 3, 5, 5), (3, 1, 5, 5)], ids=str)
def test_module_attn_mask_not_broadcastable(mshape):
    m = MHSA(16, 4, seed=0)
    with pytest.raises(ValueError) as ei:
        m(z(2, 5, 16), attn_mask=np.ones(mshape, bool))
    assert_msg(ei, names=["attn_mask"], shapes=[mshape])


@pytest.mark.parametrize("H", [0, -1, -4])
def test_bad_num_heads(H):
    with pytest.raises(ValueError) as ei:
        MHSA(16, H)
    assert_msg(ei, names=["num_heads"])


@pytest.mark.parametrize("D,H", [(10, 3), (16, 5)])
def test_d_model_not_multiple_of_heads(D, H):
    with pytest.raises(ValueError) as ei:
        MHSA(D, H)
    assert_msg(ei, numbers=[D, H])


@pytest.mark.parametrize("kv", [0, -2, 3])
def test_bad_num_kv_heads(kv):
    with pytest.raises(ValueError) as ei:
        MHSA(16, 4, num_kv_heads=kv)
    assert_msg(ei, names=["num_kv_heads"])


@pytest.mark.parametrize("kw", ["is_causal", "need_weights", "alibi"])
def test_flags_must_be_bools_not_truthy_objects(kw):
    q = np.zeros((1, 2, 3, 4), np.float32)
    with pytest.raises(TypeError, match=f"{kw} must be True or False"):
        fastattn.scaled_dot_product_attention(q, q, q, **{kw: "no"})


def test_module_flags_must_be_bools():
    with pytest.raises(TypeError, match="bias must be True or False"):
        fastattn.MultiHeadSelfAttention(8, 2, bias="no")
    m = fastattn.MultiHeadSelfAttention(8, 2, seed=0)
    with pytest.raises(TypeError, match="is_causal must be True or False"):
        m(np.zeros((1, 3, 8), np.float32), is_causal="yes")


def test_one_dimensional_shapes_print_as_tuples():
    m = MHSA(8, 2)
    with pytest.raises(ValueError, match=r"got \(8,\)$"):
        m(z(8))


# ------------------------------------------------------------ masked arrays, mask range

@pytest.mark.parametrize("where", ["q", "attn_mask", "x", "key_padding_mask", "weight",
                                   "alibi_slopes"])
def test_numpy_masked_arrays_are_refused(where):
    # their mask would be ignored: silent garbage rather than an error
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 4, 8)).astype(np.float32)
    m = MHSA(8, 2)
    x = rng.standard_normal((1, 4, 8)).astype(np.float32)
    with pytest.raises(TypeError, match=f"{where if where != 'weight' else 'w_q'} is a numpy "
                                        f"masked array"):
        if where == "q":
            sdpa(np.ma.masked_array(q, mask=q > 0), q, q)
        elif where == "attn_mask":
            sdpa(q, q, q, attn_mask=np.ma.masked_array(np.ones((4, 4), bool)))
        elif where == "x":
            m(np.ma.masked_array(x))
        elif where == "key_padding_mask":
            m(x, key_padding_mask=np.ma.masked_array(np.zeros((1, 4), bool)))
        elif where == "alibi_slopes":
            sdpa(q, q, q, alibi_slopes=np.ma.masked_array([0.5, 0.25], mask=[True, False]))
        else:
            m.w_q = np.ma.masked_array(np.eye(8, dtype=np.float32))


def test_float_mask_beyond_the_inputs_range():
    # a float64 mask on float32 inputs: values above float32's range would be
    # +inf and NaN outputs, so they are refused; values below it block their
    # key, as -inf does (masks built with np.finfo(np.float64).min mean that)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 4, 8)).astype(np.float32)
    mask = np.zeros((4, 4))
    mask[1, 2] = 1e39
    with pytest.raises(ValueError, match=r"attn_mask: finite values above float32's "
                                         r"range \(largest 1e\+39\), which would give NaN"):
        sdpa(q, q, q, attn_mask=mask)
    q64 = q.astype(np.float64)

    def ref(mask):
        s = q64 @ q64.swapaxes(-1, -2) / np.sqrt(8) + mask
        w = np.exp(s - s.max(-1, keepdims=True))
        return (w / w.sum(-1, keepdims=True)) @ q64

    causal = np.where(np.tril(np.ones((4, 4), bool)), 0.0, -np.inf)
    for block in (np.finfo(np.float64).min, -1e39):
        mask = np.where(np.isinf(causal), block, 0.0)
        mask[2, 0] = -3.0e38  # float32's own extreme is kept as it is
        want = ref(np.where(np.isinf(causal), -np.inf, mask))
        np.testing.assert_allclose(sdpa(q, q, q, attn_mask=mask), want, rtol=1e-5, atol=1e-5)
        # float64 inputs keep a float64 mask as it is
        np.testing.assert_allclose(sdpa(q64, q64, q64, attn_mask=mask), ref(mask),
                                   rtol=1e-12, atol=1e-12)
