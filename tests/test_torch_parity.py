"""Parity with PyTorch: the seed class, nn.MultiheadAttention and
F.scaled_dot_product_attention.  Everything in eval mode under no_grad.

Tolerances: float32 rtol 1e-5 / atol 1e-5 (sdpa) and rtol 1e-5 / atol 2e-5
(modules, two extra projections); float64 functional rtol 1e-10 / atol 1e-12.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastattn  # noqa: E402
from _util import randn  # noqa: E402
from reference import PARAM_NAMES  # noqa: E402
from seed_torch import MultiHeadSelfAttention as SeedMHSA  # noqa: E402

MHSA = fastattn.MultiHeadSelfAttention
F32 = dict(rtol=1e-5, atol=1e-5)
F32_MOD = dict(rtol=1e-5, atol=2e-5)
F64 = dict(rtol=1e-10, atol=1e-12)


def T(a):
    return torch.from_numpy(np.ascontiguousarray(a))


# ------------------------------------------------------------------ seed class

@pytest.fixture
def seed_model():
    torch.manual_seed(0)
    m = SeedMHSA(64, 8).eval()
    return m


@pytest.mark.parametrize("how", ["from_torch", "load_state_dict_tensors",
                                 "load_state_dict_numpy"])
def test_seed_class(rng, seed_model, how):
    if how == "from_torch":
        ours = MHSA.from_torch(seed_model)
    else:
        ours = MHSA(64, 8, seed=1)
        sd = seed_model.state_dict()
        if how == "load_state_dict_numpy":
            sd = {key: val.numpy() for key, val in sd.items()}
        ours.load_state_dict(sd)
    assert ours.d_model == 64 and ours.num_heads == 8 and ours.num_kv_heads == 8
    assert np.dtype(ours.dtype) == np.float32
    np.testing.assert_array_equal(ours.w_q, seed_model.query.weight.detach().numpy())
    np.testing.assert_array_equal(ours.b_v, seed_model.value.bias.detach().numpy())
    np.testing.assert_array_equal(ours.w_o, seed_model.fc.weight.detach().numpy())
    for N in (1, 17, 100):
        x = randn(rng, (3, N, 64))
        with torch.no_grad():
            expect = seed_model(T(x)).numpy()
        np.testing.assert_allclose(ours(x), expect, **F32_MOD)


def test_seed_class_from_torch_is_a_copy(rng, seed_model):
    ours = MHSA.from_torch(seed_model)
    x = randn(rng, (1, 5, 64))
    before = ours(x)
    with torch.no_grad():
        seed_model.query.weight.mul_(2.0)
    np.testing.assert_array_equal(ours(x), before)


# ------------------------------------------------------- nn.MultiheadAttention

def make_mha(D, H, batch_first, bias=True):
    torch.manual_seed(1)
    mha = torch.nn.MultiheadAttention(D, H, bias=bias, batch_first=batch_first).eval()
    if bias:  # torch initialises the biases to zero; make them matter
        with torch.no_grad():
            mha.in_proj_bias.normal_(0, 0.5)
            mha.out_proj.bias.normal_(0, 0.5)
    return mha


def from_torch(mha):
    """MHSA.from_torch(mha), which warns that a sequence-first module's port
    takes batch-first inputs (and only then)."""
    if mha.batch_first:
        return MHSA.from_torch(mha)
    with pytest.warns(fastattn.BatchFirstWarning, match=r"batch_first=False.*\(B, L, D\)"):
        return MHSA.from_torch(mha)


def run_mha(mha, x, **kw):
    """Run torch MHA on batch-first numpy x; returns numpy (y, w or None)."""
    xt = T(x) if mha.batch_first else T(x).transpose(0, 1)
    with torch.no_grad():
        y, w = mha(xt, xt, xt, **kw)
    if not mha.batch_first:
        y = y.transpose(0, 1)
    return y.numpy(), (None if w is None else w.numpy())


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("how", ["from_torch", "load_state_dict"])
def test_mha_plain(rng, batch_first, how):
    mha = make_mha(64, 4, batch_first)
    if how == "from_torch":
        ours = from_torch(mha)
    else:
        ours = MHSA(64, 4, seed=2)
        ours.load_state_dict(mha.state_dict())
    assert ours.num_heads == 4 and ours.d_model == 64
    x = randn(rng, (2, 23, 64))
    y_t, _ = run_mha(mha, x, need_weights=False)
    np.testing.assert_allclose(ours(x), y_t, **F32_MOD)
    y_t, w_t = run_mha(mha, x, need_weights=True)
    y, w = ours(x, need_weights=True)
    np.testing.assert_allclose(y, y_t, **F32_MOD)
    np.testing.assert_allclose(w, w_t, **F32)
    y_t, w_t = run_mha(mha, x, need_weights=True, average_attn_weights=False)
    y, w = ours(x, need_weights=True, average_attn_weights=False)
    assert w.shape == w_t.shape == (2, 4, 23, 23)
    np.testing.assert_allclose(y, y_t, **F32_MOD)
    np.testing.assert_allclose(w, w_t, **F32)


def test_mha_without_bias(rng):
    mha = make_mha(32, 4, True, bias=False)
    ours = from_torch(mha)
    assert ours.b_q is None and ours.b_o is None
    x = randn(rng, (2, 9, 32))
    np.testing.assert_allclose(ours(x), run_mha(mha, x, need_weights=False)[0], **F32_MOD)


def _kpm(B, N):
    kpm = np.zeros((B, N), bool)
    kpm[0, N - 5:] = True
    kpm[-1, :3] = True
    return kpm


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_key_padding_mask(rng, batch_first):
    mha = make_mha(32, 4, batch_first)
    ours = from_torch(mha)
    x = randn(rng, (3, 16, 32))
    kpm = _kpm(3, 16)  # same convention in torch: True = ignore
    y_t, w_t = run_mha(mha, x, key_padding_mask=T(kpm), need_weights=True)
    y, w = ours(x, key_padding_mask=kpm, need_weights=True)
    np.testing.assert_allclose(y, y_t, **F32_MOD)
    np.testing.assert_allclose(w, w_t, **F32)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("per_head", [False, True])
def test_mha_bool_attn_mask_inverted(rng, batch_first, per_head):
    B, N, D, H = 2, 14, 32, 4
    mha = make_mha(D, H, batch_first)
    ours = from_torch(mha)
    x = randn(rng, (B, N, D))
    shape = (B, H, N, N) if per_head else (N, N)
    allow = rng.random(shape) < 0.6
    allow[..., np.arange(N), np.arange(N)] = True  # no fully masked rows (torch -> NaN)
    block = ~allow                                    # torch MHA: True = NOT allowed
    torch_mask = T(block.reshape(B * H, N, N) if per_head else block)
    y_t, w_t = run_mha(mha, x, attn_mask=torch_mask, need_weights=True,
                       average_attn_weights=False)
    y, w = ours(x, attn_mask=allow, need_weights=True, average_attn_weights=False)
    np.testing.assert_allclose(y, y_t, **F32_MOD)
    np.testing.assert_allclose(w, w_t, **F32)
    # with key padding as well
    kpm = _kpm(B, N)
    allow[..., :, N - 5:] = True
    allow[..., np.arange(N), np.arange(N)] = True
    allow[..., :, 4] = True  # a key not padded in any batch: no fully masked rows
    block = ~allow
    torch_mask = T(block.reshape(B * H, N, N) if per_head else block)
    y_t, _ = run_mha(mha, x, attn_mask=torch_mask, key_padding_mask=T(kpm), need_weights=False)
    np.testing.assert_allclose(ours(x, attn_mask=allow, key_padding_mask=kpm), y_t, **F32_MOD)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_float_attn_mask_and_causal(rng, batch_first):
    B, N, D, H = 2, 19, 32, 4
    mha = make_mha(D, H, batch_first)
    ours = from_torch(mha)
    x = randn(rng, (B, N, D))
    fm = rng.standard_normal((N, N)).astype(np.float32)
    fm[rng.random((N, N)) < 0.3] = -np.inf
    fm[np.arange(N), np.arange(N)] = 0.0
    y_t, w_t = run_mha(mha, x, attn_mask=T(fm), need_weights=True)
    y, w = ours(x, attn_mask=fm, need_weights=True)
    np.testing.assert_allclose(y, y_t, **F32_MOD)
    np.testing.assert_allclose(w, w_t, **F32)
    # causal: torch MHA wants the explicit mask (True = blocked above the diagonal)
    causal_block = T(np.triu(np.ones((N, N), bool), 1))
    y_t, w_t = run_mha(mha, x, attn_mask=causal_block, need_weights=True)
    y, w = ours(x, is_causal=True, need_weights=True)
    np.testing.assert_allclose(y, y_t, **F32_MOD)
    np.testing.assert_allclose(w, w_t, **F32)
    kpm = np.zeros((B, N), bool)
    kpm[1, 10:] = True
    y_t, _ = run_mha(mha, x, attn_mask=causal_block, key_padding_mask=T(kpm), need_weights=False)
    np.testing.assert_allclose(ours(x, is_causal=True, key_padding_mask=kpm), y_t, **F32_MOD)


def test_mha_state_dict_names_match_from_torch(rng):
    mha = make_mha(48, 6, True)
    a = MHSA.from_torch(mha)
    b = MHSA(48, 6, seed=3)
    b.load_state_dict(mha.state_dict())
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    D = 48
    W = mha.in_proj_weight.detach().numpy()
    np.testing.assert_array_equal(a.w_q, W[:D])
    np.testing.assert_array_equal(a.w_k, W[D:2 * D])
    np.testing.assert_array_equal(a.w_v, W[2 * D:])
    np.testing.assert_array_equal(a.b_o, mha.out_proj.bias.detach().numpy())


# ------------------------------------------------- F.scaled_dot_product_attention

def torch_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, gqa=False):
    kw = {}
    if scale is not None:
        kw["scale"] = scale
    qt, kt, vt = T(q), T(k), T(v)
    mt = None if attn_mask is None else T(attn_mask)
    with torch.no_grad():
        if gqa:
            try:
                return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mt,
                                                      is_causal=is_causal, enable_gqa=True,
                                                      **kw).numpy()
            except TypeError:  # older torch without enable_gqa: expand kv heads by hand
                g = q.shape[-3] // k.shape[-3]
                kt = kt.repeat_interleave(g, dim=-3)
                vt = vt.repeat_interleave(g, dim=-3)
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mt, is_causal=is_causal,
                                              **kw).numpy()


@pytest.mark.parametrize("dtype,t", [(np.float32, F32), (np.float64, F64)], ids=["f32", "f64"])
@pytest.mark.parametrize("Lq,Lk,E,Ev", [(1, 1, 8, 8), (17, 17, 64, 64), (33, 70, 80, 40),
                                        (101, 101, 128, 128)])
def test_functional_plain_and_causal(rng, dtype, t, Lq, Lk, E, Ev):
    q = randn(rng, (2, 4, Lq, E), dtype)
    k = randn(rng, (2, 4, Lk, E), dtype)
    v = randn(rng, (2, 4, Lk, Ev), dtype)
    np.testing.assert_allclose(fastattn.scaled_dot_product_attention(q, k, v),
                               torch_sdpa(q, k, v), **t)
    np.testing.assert_allclose(fastattn.scaled_dot_product_attention(q, k, v, scale=0.3),
                               torch_sdpa(q, k, v, scale=0.3), **t)
    if Lq == Lk:  # torch's is_causal is top-left aligned: identical only when Lq == Lk
        np.testing.assert_allclose(fastattn.scaled_dot_product_attention(q, k, v, is_causal=True),
                                   torch_sdpa(q, k, v, is_causal=True), **t)


@pytest.mark.parametrize("dtype,t", [(np.float32, F32), (np.float64, F64)], ids=["f32", "f64"])
@pytest.mark.parametrize("mshape", [(12, 15), (1, 1, 12, 15), (2, 1, 1, 15), (2, 4, 12, 15)],
                         ids=str)
def test_functional_masks(rng, dtype, t, mshape):
    q = randn(rng, (2, 4, 12, 16), dtype)
    k = randn(rng, (2, 4, 15, 16), dtype)
    v = randn(rng, (2, 4, 15, 16), dtype)
    bm = rng.random(mshape) < 0.6
    bm[..., 0] = True  # at least one key per row (torch gives NaN for empty rows)
    np.testing.assert_allclose(fastattn.scaled_dot_product_attention(q, k, v, bm),
                               torch_sdpa(q, k, v, attn_mask=bm), **t)
    fm = rng.standard_normal(mshape).astype(dtype)
    fm[rng.random(mshape) < 0.3] = -np.inf
    fm[..., 0] = 0.0
    np.testing.assert_allclose(fastattn.scaled_dot_product_attention(q, k, v, fm),
                               torch_sdpa(q, k, v, attn_mask=fm), **t)


@pytest.mark.parametrize("Hkv", [1, 2, 4, 8])
@pytest.mark.parametrize("is_causal", [False, True])
def test_functional_gqa(rng, Hkv, is_causal):
    q = randn(rng, (2, 8, 21, 32))
    k = randn(rng, (2, Hkv, 21, 32))
    v = randn(rng, (2, Hkv, 21, 24))
    np.testing.assert_allclose(
        fastattn.scaled_dot_product_attention(q, k, v, is_causal=is_causal),
        torch_sdpa(q, k, v, is_causal=is_causal, gqa=True), **F32)


def test_functional_fused_qkv_views(rng):
    qkv = randn(rng, (2, 40, 3, 4, 32))
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    np.testing.assert_allclose(fastattn.scaled_dot_product_attention(q, k, v, is_causal=True),
                               torch_sdpa(q, k, v, is_causal=True), **F32)
