"""PyTorch habits that would give silently different results, caught: masks in
torch.nn.MultiheadAttention's convention, sequence-first torch modules, torch's
argument names, writes into a weight's read-only copy (fastattn._conventions)."""
import copy
import pickle
import tracemalloc
import warnings

import numpy as np
import pytest

import fastattn
from fastattn import (BatchFirstWarning, MaskConventionWarning, MultiHeadAttention,
                      MultiHeadSelfAttention)
from fastattn._validate import torch_convention_check

sdpa = fastattn.scaled_dot_product_attention


def qkv(rng, B=2, H=2, Lq=6, Lk=6, E=8):
    q = rng.standard_normal((B, H, Lq, E)).astype(np.float32)
    k = rng.standard_normal((B, H, Lk, E)).astype(np.float32)
    v = rng.standard_normal((B, H, Lk, E)).astype(np.float32)
    return q, k, v


def torch_causal(Lq, Lk):
    """torch.nn.MultiheadAttention's causal mask, right-aligned: True = blocked."""
    return np.arange(Lk)[None, :] > np.arange(Lq)[:, None] + (Lk - Lq)


def no_warning(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


# ---- masks ---------------------------------------------------------------------------

def test_the_warnings_are_user_warnings_exported_by_name():
    assert issubclass(MaskConventionWarning, UserWarning)
    assert issubclass(BatchFirstWarning, UserWarning)
    assert {"MaskConventionWarning", "BatchFirstWarning"} <= set(fastattn.__all__)


@pytest.mark.parametrize("shape", [(), (6,), (6, 6), (1, 1, 6, 6), (2, 2, 6, 6), (2, 1, 1, 6)])
def test_sdpa_warns_when_a_bool_mask_blocks_every_key_of_every_query(rng, shape):
    q, k, v = qkv(rng)
    with pytest.warns(MaskConventionWarning) as record:
        out = sdpa(q, k, v, np.zeros(shape, bool))
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith("attn_mask blocks every key for every query.")
    for needle in ("True = attend", "torch.nn.MultiheadAttention's attn_mask, where True = "
                   "blocked", "pass ~attn_mask"):
        assert needle in message
    # attributed to the caller's line, not to fastattn's
    assert record[0].filename == __file__
    # and computed as documented all the same: zeros
    np.testing.assert_array_equal(out, 0)


@pytest.mark.parametrize("cls", [MultiHeadSelfAttention, MultiHeadAttention])
def test_modules_warn_for_an_all_false_attn_mask(rng, cls):
    m = cls(16, 2, seed=0)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    args = (x,) if cls is MultiHeadSelfAttention else (x, x, x)
    with pytest.warns(MaskConventionWarning, match="blocks every key for every query") as rec:
        y = m(*args, attn_mask=np.zeros((5, 5), bool))
    assert rec[0].filename == __file__
    np.testing.assert_allclose(y, np.broadcast_to(m.b_o, y.shape), atol=1e-6)
    # the torch user's intent: ~mask blocks nothing
    np.testing.assert_array_equal(no_warning(lambda: m(*args, attn_mask=~np.zeros((5, 5), bool))),
                                  m(*args))


def test_module_with_a_cache_warns_too(rng):
    m = MultiHeadSelfAttention(16, 2, seed=0)
    cache = m.new_cache(1, 8)
    x = rng.standard_normal((1, 3, 16)).astype(np.float32)
    with pytest.warns(MaskConventionWarning):
        m(x, cache=cache, attn_mask=np.zeros((3, 3), bool))


@pytest.mark.parametrize("Lq,Lk", [(6, 6), (2, 2), (3, 9), (1 + 8, 9)])
@pytest.mark.parametrize("lead", [(), (1, 1), (2, 2)])
def test_torch_causal_mask_warns_and_its_inverse_is_fastattns(rng, Lq, Lk, lead):
    q, k, v = qkv(rng, Lq=Lq, Lk=Lk)
    mask = np.broadcast_to(torch_causal(Lq, Lk), lead + (Lq, Lk)).copy()
    with pytest.warns(MaskConventionWarning) as record:
        sdpa(q, k, v, mask)
    message = str(record[0].message)
    assert "looks like torch.nn.MultiheadAttention's causal mask" in message
    assert "Pass ~attn_mask, or is_causal=True and no mask" in message
    fixed = no_warning(lambda: sdpa(q, k, v, ~mask))
    np.testing.assert_allclose(fixed, sdpa(q, k, v, is_causal=True), rtol=1e-6, atol=1e-6)


def test_module_warns_for_torch_causal_mask(rng):
    m = MultiHeadSelfAttention(16, 2, seed=0)
    x = rng.standard_normal((2, 7, 16)).astype(np.float32)
    with pytest.warns(MaskConventionWarning, match="causal mask"):
        m(x, attn_mask=torch_causal(7, 7))


@pytest.mark.parametrize("make", [
    lambda L: ~torch_causal(L, L),                      # fastattn's causal mask
    lambda L: np.ones((L, L), bool),
    lambda L: np.ones((1, L), bool),
    lambda L: np.eye(L, dtype=bool),
    lambda L: np.random.default_rng(0).random((2, 2, L, L)) < 0.5,
    # padding queries (rows that attend nothing) are fastattn's own use
    lambda L: np.concatenate([np.ones((L - 2, L), bool), np.zeros((2, L), bool)]),
    lambda L: np.concatenate([np.zeros((2, L), bool), np.ones((L - 2, L), bool)]),
    # the last query attends nothing, but not as a staircase
    lambda L: np.concatenate([torch_causal(L - 1, L) | (np.arange(L) == 0), np.zeros((1, L), bool)]),
    lambda L: torch_causal(L, L) & (np.arange(L) != 3)[None, :],
    # one batch's mask is torch's causal one, another's is not
    lambda L: np.stack([torch_causal(L, L), np.ones((L, L), bool)])[:, None],
], ids=["causal", "ones", "ones-row", "eye", "random", "pad-last", "pad-first",
        "last-row-empty", "staircase-with-hole", "one-batch"])
def test_no_warning_for_masks_in_fastattns_convention(rng, make):
    q, k, v = qkv(rng)
    no_warning(lambda: sdpa(q, k, v, make(6)))


def test_no_warning_for_empty_calls_float_masks_or_partly_blocked_batches(rng):
    q, k, v = qkv(rng)
    no_warning(lambda: sdpa(q, k[:, :, :0], v[:, :, :0], np.zeros((6, 0), bool)))
    no_warning(lambda: sdpa(q[:, :, :0], k, v, np.zeros((0, 6), bool)))
    no_warning(lambda: sdpa(q, k, v, np.full((6, 6), -np.inf, np.float32)))
    # an empty sequence in a batch: its rows attend nothing, the others do
    mask = np.ones((2, 1, 1, 6), bool)
    mask[1] = False
    no_warning(lambda: sdpa(q, k, v, mask))


def test_key_padding_mask_that_pads_every_key_warns(rng):
    m = MultiHeadSelfAttention(16, 2, seed=0)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    with pytest.warns(MaskConventionWarning) as record:
        m(x, key_padding_mask=np.ones((2, 5), bool))
    message = str(record[0].message)
    assert message.startswith("key_padding_mask marks every key of every sequence as padding")
    assert "Hugging Face attention_mask" in message and "~key_padding_mask" in message
    kpm = np.zeros((2, 5), bool)
    kpm[1] = True  # one sequence empty: allowed
    no_warning(lambda: m(x, key_padding_mask=kpm))
    no_warning(lambda: m(x, key_padding_mask=np.zeros((2, 5), bool)))


def test_the_check_copies_no_large_broadcast():
    # a large mask costs the check no array of its size (nor a broadcast one)
    rng = np.random.default_rng(0)
    for mask in (rng.random((4, 8, 256, 256)) < 0.7,
                 np.broadcast_to(np.zeros((256, 256), bool), (4, 8, 256, 256))):
        mask = mask.copy()
        mask[..., -1, :] = False  # the second test's guard passes: its row checks run
        mask[..., 0, :] = True
        tracemalloc.start()
        torch_convention_check(mask, "attn_mask")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < mask.nbytes / 20, peak


# ---- from_torch ----------------------------------------------------------------------

@pytest.mark.parametrize("cls", [MultiHeadSelfAttention, MultiHeadAttention])
def test_from_torch_of_a_sequence_first_module_warns(rng, cls):
    torch = pytest.importorskip("torch")
    t = torch.nn.MultiheadAttention(16, 2).eval()  # torch's default: batch_first=False
    with pytest.warns(BatchFirstWarning) as record:
        m = cls.from_torch(t)
    message = str(record[0].message)
    assert record[0].filename == __file__
    for needle in ("batch_first=False", "(L, B, D)", "(B, L, D)", "x.transpose(1, 0, 2)"):
        assert needle in message
    # the weights are the same: the port, given batch-first inputs, is torch's
    x = rng.standard_normal((5, 3, 16)).astype(np.float32)  # (L, B, D)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        ty = t(xt, xt, xt, need_weights=False)[0].numpy()
    xb = x.transpose(1, 0, 2)
    y = m(xb) if cls is MultiHeadSelfAttention else m(xb, xb, xb)
    np.testing.assert_allclose(y.transpose(1, 0, 2), ty, rtol=1e-5, atol=2e-5)
    t.batch_first = True
    no_warning(lambda: cls.from_torch(t))


def test_add_zero_attn_is_a_sink_of_logit_zero(rng):
    # what the constructor's message for add_zero_attn claims
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    t = torch.nn.MultiheadAttention(16, 2, add_zero_attn=True, batch_first=True).eval()
    with torch.no_grad():
        t.in_proj_bias.normal_()
    m = MultiHeadSelfAttention(16, 2, sinks=True)
    m.load_state_dict({**t.state_dict(), "sinks": m.sinks})
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        ty = t(xt, xt, xt, need_weights=False)[0].numpy()
    np.testing.assert_allclose(m(x), ty, rtol=1e-5, atol=2e-5)


# ---- torch's argument names ------------------------------------------------------------

@pytest.mark.parametrize("cls", [MultiHeadSelfAttention, MultiHeadAttention])
def test_constructors_accept_torch_arguments_that_mean_the_same(cls):
    torch = pytest.importorskip("torch")
    m = cls(embed_dim=16, num_heads=2, dropout=0.0, batch_first=True, add_bias_kv=False,
            add_zero_attn=False, device=None, kdim=16, vdim=None, seed=0)
    assert m == cls(16, 2, seed=0)
    cls(16, 2, dropout=0, device="cpu")
    cls(16, 2, device=torch.device("cpu"), batch_first=np.True_)


@pytest.mark.parametrize("cls", [MultiHeadSelfAttention, MultiHeadAttention])
@pytest.mark.parametrize("kw,needles", [
    ({"dropout": 0.1}, ["does not take dropout=0.1", "inference", "no dropout",
                        "pass dropout=0 or leave it out"]),
    ({"batch_first": False}, ["does not take batch_first=False", "always batch-first",
                              "(B, L, D)", "(L, B, D)", "x.transpose(1, 0, 2)"]),
    ({"batch_first": "yes"}, ["batch_first='yes'", "always batch-first"]),
    ({"add_bias_kv": True}, ["add_bias_kv=True", "no learned bias rows"]),
    ({"add_zero_attn": True}, ["add_zero_attn=True", "sinks=True"]),
    ({"device": "cuda"}, ["device='cuda'", "CPU"]),
    ({"dropout": True}, ["dropout=True"]),
])
def test_constructors_explain_torch_arguments(cls, kw, needles):
    with pytest.raises(TypeError) as ei:
        cls(16, 2, **kw)
    message = str(ei.value)
    assert message.startswith(f"{cls.__name__}() ")
    for needle in needles:
        assert needle in message, message


def test_self_attention_explains_kdim_and_vdim():
    for kw in ({"kdim": 8}, {"vdim": 4}):
        with pytest.raises(TypeError, match=r"projects one input, whose width is embed_dim; "
                                            r"for keys and values of other widths use "
                                            r"fastattn\.MultiHeadAttention"):
            MultiHeadSelfAttention(16, 2, **kw)
    MultiHeadSelfAttention(d_model=16, num_heads=2, kdim=16, vdim=16)


@pytest.mark.parametrize("cls", [MultiHeadSelfAttention, MultiHeadAttention])
def test_constructors_explain_torchs_positional_dropout(cls):
    with pytest.raises(TypeError, match=r"takes 2 positional arguments \(embed_dim, num_heads\) "
                                        r"but 3 were given: .*third is dropout"):
        cls(16, 2, 0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_option'"):
        cls(16, 2, no_such_option=1)


def test_signatures_show_no_catch_all():
    import inspect

    for f in (MultiHeadSelfAttention, MultiHeadAttention, sdpa, MultiHeadAttention.__call__,
              MultiHeadSelfAttention.__call__):
        kinds = {p.kind for p in inspect.signature(f).parameters.values()}
        assert not kinds & {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}, f


def test_sdpa_torch_arguments(rng):
    q, k, v = qkv(rng)
    ref = sdpa(q, k, v)
    np.testing.assert_array_equal(sdpa(q, k, v, None, dropout_p=0.0, enable_gqa=True), ref)
    np.testing.assert_array_equal(sdpa(q, k[:, :1], v[:, :1], enable_gqa=False),
                                  sdpa(q, k[:, :1], v[:, :1]))
    cases = [
        ({"dropout_p": 0.1}, "scaled_dot_product_attention() does not take dropout_p=0.1: "
                             "fastattn is for inference and has no dropout"),
        ({"enable_gqa": "yes"}, "grouped-query heads are taken automatically"),
        ({"query": q}, "does not take query=<ndarray of shape (2, 2, 6, 8)>: fastattn names "
                       "the inputs q, k and v"),
        ({"nonsense": 1}, "scaled_dot_product_attention() got an unexpected keyword argument "
                          "'nonsense'"),
    ]
    for kw, needle in cases:
        with pytest.raises(TypeError) as ei:
            sdpa(q, k, v, **kw)
        assert needle in str(ei.value)
    # torch's positional dropout_p and is_causal
    with pytest.raises(TypeError) as ei:
        sdpa(q, k, v, None, 0.0, True)
    assert str(ei.value).startswith("scaled_dot_product_attention() takes 4 positional "
                                    "arguments (q, k, v, attn_mask) but 6 were given")
    assert "pass is_causal=... and scale=... by name" in str(ei.value)


@pytest.mark.parametrize("kw,needle", [
    ({"dropout_p": 0.0}, "no dropout"),
    ({"batch_first": True}, "always batch-first"),
    ({"enable_gqa": True}, "num_kv_heads"),
    ({"scale": 1.0}, "set at construction"),
])
def test_module_calls_explain_torch_and_functional_names(rng, kw, needle):
    m = MultiHeadSelfAttention(16, 2, seed=0)
    x = rng.standard_normal((1, 3, 16)).astype(np.float32)
    name = next(iter(kw))
    with pytest.raises(TypeError, match=rf"MultiHeadSelfAttention\(\) does not take {name}="):
        m(x, **kw)
    with pytest.raises(TypeError, match=needle):
        MultiHeadAttention(16, 2)(x, x, x, **kw)


def test_cross_attention_explains_torchs_positional_key_padding_mask(rng):
    m = MultiHeadAttention(16, 2, seed=0)
    x = rng.standard_normal((1, 3, 16)).astype(np.float32)
    with pytest.raises(TypeError, match="torch's fourth positional argument is "
                                        "key_padding_mask, pass key_padding_mask="):
        m(x, x, x, np.zeros((1, 3), bool))


# ---- writes into a weight's read-only copy ---------------------------------------------

WRITES = [
    lambda m: m.w_q.__setitem__(slice(None), 0),            # m.w_q[:] = 0
    lambda m: m.w_o.__setitem__((0, 0), 1.0),               # m.w_o[0, 0] = 1
    lambda m: m.b_o.__setitem__(Ellipsis, 0),               # m.b_o[...] = 0
    lambda m: m.w_q.T.__setitem__(0, 1.0),                  # through a view
    lambda m: m.w_q[0].__setitem__(0, 1.0),
    lambda m: np.add(m.w_q, 1, out=m.w_q),
]


@pytest.mark.parametrize("write", WRITES)
def test_a_write_into_a_weight_points_to_assignment(write):
    m = MultiHeadSelfAttention(16, 2, seed=0)
    before = m.state_dict()
    with pytest.raises(ValueError) as ei:
        write(m)
    message = str(ei.value)
    name = message.split()[0]
    assert name in ("w_q", "w_o", "b_o")
    assert f"{name} is a read-only copy of the module's parameter" in message
    assert f"m.{name} = new" in message and "load_state_dict" in message
    after = m.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_in_place_arithmetic_on_a_weight_points_to_assignment():
    m = MultiHeadSelfAttention(16, 2, seed=0)
    with pytest.raises(ValueError, match=r"w_k is a read-only copy.*m\.w_k = new"):
        m.w_k += 1
    m.w_k = m.w_k + 1  # what it says to do
    with pytest.raises(ValueError, match="WRITEABLE"):
        m.w_q.setflags(write=True)
    sinks = MultiHeadSelfAttention(16, 2, sinks=True).sinks
    with pytest.raises(ValueError, match=r"sinks is a read-only copy.*m\.sinks = new"):
        sinks[0] = 1.0


def test_a_weight_otherwise_behaves_as_a_plain_array():
    torch = pytest.importorskip("torch")
    m = MultiHeadSelfAttention(16, 2, seed=0)
    w = m.w_q
    plain = m.state_dict()["w_q"]
    assert isinstance(w, np.ndarray) and repr(w) == repr(plain) and str(w) == str(plain)
    # results of operations, copies and conversions are plain ndarrays
    for result in (w * 2, w + w, np.exp(w), w @ w.T, w.mean(axis=0), np.concatenate([w, w]),
                   np.where(w > 0, w, 0), w.copy(), w.astype(np.float64), np.array(w),
                   np.asarray(w), copy.copy(w), copy.deepcopy(w), w == plain):
        assert type(result) is np.ndarray
    assert type(w.sum()) is np.float32
    np.testing.assert_array_equal(w * 2, plain * 2)
    c = w.copy()
    c[0] = 1.0  # a copy is the user's to write
    m.w_q = c
    np.testing.assert_array_equal(m.w_q[0], 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: not writable
        assert torch.equal(torch.from_numpy(m.w_o), torch.from_numpy(m.state_dict()["w_o"]))
    # pickles as a plain array that names nothing of fastattn's
    data = pickle.dumps(m.w_o)
    assert b"fastattn" not in data and type(pickle.loads(data)) is np.ndarray
    # a module's pickle and state_dict hold plain arrays
    m2 = pickle.loads(pickle.dumps(m))
    assert m2 == m
    assert all(type(a) is np.ndarray for a in m2.state_dict().values())
    assert all(type(a) is np.ndarray for a in m.state_dict().values())


def test_torchs_3d_mask_layout_gets_a_reshape_hint(rng):
    m = MultiHeadSelfAttention(16, 4, seed=0)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    with pytest.raises(ValueError, match=r"attn_mask has shape \(8, 5, 5\), which does not "
                                         r"broadcast to \(\.\.\., H, Lq, Lk\) = \(2, 4, 5, 5\); "
                                         r"torch\.nn\.MultiheadAttention's 3-D mask is "
                                         r"\(B \* num_heads, Lq, Lk\): reshape it to "
                                         r"\(2, 4, 5, 5\)"):
        m(x, attn_mask=np.ones((8, 5, 5), bool))
    assert m(x, attn_mask=np.ones((8, 5, 5), bool).reshape(2, 4, 5, 5)).shape == x.shape
