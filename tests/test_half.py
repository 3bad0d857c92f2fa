"""bfloat16 and float16: every kernel path against the float64 reference.

The reference runs on the 16-bit inputs themselves (widened exactly), so what
is measured is fastattn's own error: rounding of the output, of the
activations between kernels, and (on the pair path) of the scaled queries and
the probabilities.  Tolerances are relative to the largest reference value
(docs/numerics.md lists the measured errors).

Paths: in builds with AVX512-BF16 (``avx512bf16``) bfloat16 projections and
attention tiles multiply bfloat16 pairs (VDPBF16PS); every other build, and
float16 everywhere, widens 16-bit operands to float32 as they are packed.
Each path is tested where this CPU runs it; the module-level runs go through
one subprocess per build, which prints the build it ran.
"""
import json
import os
import pathlib
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import fastattn
from fastattn import _policy
from fastattn._dispatch import available_isas, kernels

from reference import params_of, positional_bias, ref_mhsa, ref_sdpa

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
# max |error| / max |reference|: the output's own rounding is 2^-9 (bfloat16)
# and 2^-12 (float16) of each value; the rest comes from the roundings above
REL = {BF16: 1.2e-2, F16: 2e-3}
MOD_REL = {BF16: 3e-2, F16: 5e-3}


def _close(got, want, dtype, rel=None):
    got = np.asarray(got, np.float64)
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(got - want).max()) / scale
    assert err <= (rel or REL[np.dtype(dtype)]), f"relative error {err:.3g}"
    return err


def _qkv(rng, dtype, lead=(2,), H=4, Hkv=2, Lq=37, Lk=71, E=24, Ev=None):
    q = rng.standard_normal(lead + (H, Lq, E)).astype(dtype)
    k = rng.standard_normal(lead + (Hkv, Lk, E)).astype(dtype)
    v = rng.standard_normal(lead + (Hkv, Lk, Ev or E)).astype(dtype)
    return q, k, v


DTYPES = [BF16, F16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("shape", [
    dict(Lq=70, Lk=300, E=64),                  # tiles (pairs where the build has them)
    dict(Lq=37, Lk=71, E=24, Ev=40),            # ragged tiles, Ev != E
    dict(Lq=33, Lk=7, E=63),                    # odd head width: widened, never pairs
    dict(Lq=3, Lk=1000, E=40),                  # rows (decoding)
    dict(lead=(1,), H=1, Hkv=1, Lq=1, Lk=3000, E=64),  # rows with key splits
], ids=["tiles", "ragged", "odd_e", "rows", "split_k"])
def test_kernel_builds_against_reference(rng, isa, dtype, shape):
    mod = __import__(f"fastattn._kernels._{isa}", fromlist=["attention"])
    q, k, v = _qkv(rng, dtype, **shape)
    want, _ = ref_sdpa(q, k, v, is_causal=True)
    out = np.empty(q.shape[:-1] + (v.shape[-1],), dtype)
    pairs = _policy.attention_pairs(mod, q.dtype, k.dtype, q.shape[-1])
    assert pairs == (isa == "avx512bf16" and dtype == BF16 and q.shape[-1] % 2 == 0)
    schedule = _policy.attention_schedule(int(np.prod(q.shape[:-2])), q.shape[-2], k.shape[-2],
                                          False, 2, pairs=pairs)
    view = (lambda a: a.view(np.uint16)) if dtype == BF16 else (lambda a: a)
    mod.attention(view(q), view(k), view(v), view(out), None, None, None, None, True,
                  1 / np.sqrt(q.shape[-1]), schedule, 2)
    _close(out, want, dtype)


@pytest.mark.parametrize("E", [2, 30, 32, 34, 64, 66, 96, 130, 256])
@pytest.mark.parametrize("Lq", [1 + 15, 17, 33, 64, 70])
def test_bf16_tiles_every_query_and_width_edge(rng, E, Lq):
    # the pair tiles pack Q^T in whole 16 x 16 blocks of pairs and the rest
    # pair by pair: query counts and head widths on both sides of a block
    q, k, v = _qkv(rng, BF16, lead=(1,), H=2, Hkv=1, Lq=Lq, Lk=45, E=E, Ev=24)
    want, _ = ref_sdpa(q, k, v, is_causal=True)
    _close(fastattn.scaled_dot_product_attention(q, k, v, is_causal=True), want, BF16)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("E,Ev", [(1, 1), (4, 12), (16, 17), (33, 48), (48, 80), (80, 100),
                                  (100, 64), (300, 8), (520, 530)])
def test_decode_rows_every_width(rng, isa, dtype, E, Ev):
    # the few-query path reads 16-bit keys and values in whole chunks of a
    # build's vectors, then one widened vector, then element by element, and
    # permutes the query per segment of its elements: every width boundary
    mod = __import__(f"fastattn._kernels._{isa}", fromlist=["attention"])
    q, k, v = _qkv(rng, dtype, lead=(1,), H=2, Hkv=1, Lq=2, Lk=301, E=E, Ev=Ev)
    q = q.astype(np.float32)  # as a float32 module's step over a 16-bit cache
    want, _ = ref_sdpa(q, k, v)
    out = np.empty(q.shape[:-1] + (Ev,), np.float32)
    schedule = _policy.attention_schedule(2, 2, 301, False, 2)
    assert schedule[2], "the row path"
    view = (lambda a: a.view(np.uint16)) if dtype == BF16 else (lambda a: a)
    mod.attention(q, view(k), view(v), out, None, None, None, None, False, 1 / np.sqrt(E),
                  schedule, 2)
    _close(out, want, np.float32, 2e-6)


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("y_dtype", ["same", "float32"])
def test_projection_builds_against_reference(rng, isa, dtype, y_dtype):
    mod = __import__(f"fastattn._kernels._{isa}", fromlist=["linear"])
    x = rng.standard_normal((45, 99)).astype(dtype)      # odd width: rows packed in pairs
    w = rng.standard_normal((70, 99)).astype(dtype)
    b = rng.standard_normal(70).astype(dtype)
    view = (lambda a: a.view(np.uint16)) if dtype == BF16 else (lambda a: a)
    pairs = _policy.weight_pairs(mod, dtype)
    assert pairs == (isa == "avx512bf16" and dtype == BF16)
    packed, bias = mod.pack_weight(view(w), view(b), pairs)
    assert packed.dtype == (np.uint16 if pairs else np.float32)
    ydt = dtype if y_dtype == "same" else np.dtype(np.float32)
    y = np.empty((45, 70), ydt)
    mod.linear(view(x), packed, bias, 70, view(y) if ydt == dtype else y,
               _policy.linear_blocking(99), 2)
    want = x.astype(np.float64) @ w.astype(np.float64).T + b.astype(np.float64)
    _close(y, want, dtype, 1e-5 if ydt == np.float32 else None)
    # float32 rows beside 16-bit weights (mixed precision) are rounded as the
    # pairs are packed, or kept as they are on the widening path
    y32 = np.empty((45, 70), np.float32)
    mod.linear(x.astype(np.float32), packed, bias, 70, y32, _policy.linear_blocking(99), 2)
    _close(y32, want, dtype, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16"])
def test_sdpa_options_against_reference(rng, dtype):
    q, k, v = _qkv(rng, dtype, lead=(2,), H=4, Hkv=2, Lq=50, Lk=90, E=32)
    sdpa = fastattn.scaled_dot_product_attention
    bmask = rng.random((50, 90)) < 0.7
    fmask = rng.standard_normal((4, 50, 90)).astype(np.float32)
    slopes = fastattn.alibi_slopes(4)
    cases = [
        (dict(), dict()),
        (dict(is_causal=True), dict(is_causal=True)),
        (dict(attn_mask=bmask), dict(attn_mask=bmask)),
        (dict(attn_mask=fmask), dict(attn_mask=fmask)),
        (dict(attn_mask=fmask.astype(dtype)), dict(attn_mask=fmask.astype(dtype))),
        (dict(window=(6, 2)), dict(attn_mask=positional_bias(50, 90, 4, window=(6, 2)))),
        (dict(alibi=True), dict(attn_mask=positional_bias(50, 90, 4, slopes=slopes))),
        (dict(scale=0.3), dict(scale=0.3)),
    ]
    for ours, theirs in cases:
        out = sdpa(q, k, v, **ours)
        assert out.dtype == dtype
        _close(out, ref_sdpa(q, k, v, **theirs)[0], dtype)
    out, w = sdpa(q, k, v, is_causal=True, need_weights=True)
    want, want_w = ref_sdpa(q, k, v, is_causal=True)
    assert out.dtype == w.dtype == dtype
    _close(out, want, dtype)
    _close(w, want_w, dtype)


def test_sdpa_non_contiguous_and_fully_masked_rows(rng):
    q, k, v = _qkv(rng, BF16, lead=(2,), H=2, Hkv=2, Lq=40, Lk=60, E=32)
    qt = np.swapaxes(np.swapaxes(q, 1, 2).copy(), 1, 2)     # strided heads
    kt = k[..., ::2, :]                                      # every other key
    vt = v[..., ::2, :]
    mask = np.ones((40, 30), bool)
    mask[5] = False                                          # a row with no key
    out = fastattn.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    want = ref_sdpa(qt, kt, vt, attn_mask=mask)[0]
    _close(out, want, BF16)
    assert np.all(out[:, :, 5].astype(np.float32) == 0)


def test_nonfinite_values_stay_with_the_queries_that_attend_them(rng):
    # a NaN value under a mask reaches no query that may not attend it, on
    # the pair path as on the float one
    q, k, v = _qkv(rng, BF16, lead=(1,), H=2, Hkv=2, Lq=64, Lk=128, E=32)
    v[0, 0, 10, 3] = np.nan
    mask = np.ones((64, 128), bool)
    mask[:32, 10] = False
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask).astype(np.float32)
    assert np.isfinite(out[0, 0, :32]).all()
    assert np.isnan(out[0, 0, 32:, 3]).all()
    assert np.isfinite(out[0, 1]).all()


def test_precision_keyword_on_sdpa(rng):
    q, k, v = _qkv(rng, np.float32, Lq=40, Lk=40, E=32)
    out = fastattn.scaled_dot_product_attention(q, k, v, precision="bfloat16")
    assert out.dtype == np.float32
    # the same as computing on the inputs rounded to bfloat16, output widened
    rounded = fastattn.scaled_dot_product_attention(*(a.astype(BF16) for a in (q, k, v)))
    np.testing.assert_array_equal(out, rounded.astype(np.float32))
    _close(out, ref_sdpa(q, k, v)[0], BF16)
    with pytest.raises(ValueError, match="precision must be 'bfloat16' or 'float16'"):
        fastattn.scaled_dot_product_attention(q, k, v, precision="float64")
    with pytest.raises(TypeError, match="precision=bfloat16 is for float32 inputs"):
        fastattn.scaled_dot_product_attention(*(a.astype(np.float64) for a in (q, k, v)),
                                              precision="bfloat16")


def test_bad_dtypes_name_the_argument(rng):
    q, k, v = _qkv(rng, BF16)
    sdpa = fastattn.scaled_dot_product_attention
    with pytest.raises(TypeError, match="q, k and v must share one float dtype"):
        sdpa(q, k.astype(np.float32), v)
    with pytest.raises(TypeError, match=r"k must be a float32, float64, bfloat16 or float16 "
                                        r"array, got dtype float8_e4m3fn"):
        sdpa(q, k.astype(ml_dtypes.float8_e4m3fn), v)
    with pytest.raises(TypeError, match="dtype must be one of float32, float64, bfloat16 or "
                                        "float16, got int8"):
        fastattn.MultiHeadSelfAttention(16, 2, dtype=np.int8)
    with pytest.raises(ValueError, match="precision=bfloat16 is for float32 modules"):
        fastattn.MultiHeadSelfAttention(16, 2, dtype=np.float64, precision="bfloat16")
    m = fastattn.MultiHeadSelfAttention(16, 2, dtype=np.float64)
    # refused when made, not at the first call
    with pytest.raises(ValueError, match=r"cache dtype bfloat16 does not fit a module whose "
                                         r"activations are float64 \(computed in float64\): "
                                         r"its cache holds float64"):
        m.new_cache(1, 4, dtype="bfloat16")
    mb = fastattn.MultiHeadSelfAttention(16, 2, dtype="bfloat16")
    with pytest.raises(ValueError, match=r"cache dtype float64 does not fit a module whose "
                                         r"activations are bfloat16 \(computed in float32\): "
                                         r"its cache holds float32, bfloat16 or float16"):
        mb(np.zeros((1, 1, 16), ml_dtypes.bfloat16),
           cache=fastattn.KVCache(1, 4, 2, 8, np.float64))


def _module_cases(dtype, precision=None):
    """(name, module, call, reference) for the module paths in ``dtype``."""
    rng = np.random.default_rng(3)
    x32 = rng.standard_normal((2, 40, 64)).astype(np.float32)
    xin = x32 if precision else x32.astype(dtype)
    pad = np.zeros((2, 40), bool)
    pad[1, 30:] = True

    def mhsa(**kw):
        return fastattn.MultiHeadSelfAttention(64, 4, dtype=np.float32 if precision else dtype,
                                               precision=precision, seed=5, **kw)

    def ref(m, x, **kw):
        return ref_mhsa(x, params_of(m), m.num_heads, m.num_kv_heads, **kw)[0]

    m, g = mhsa(), mhsa(num_kv_heads=2)
    yield "plain", m(xin), ref(m, xin)
    yield "causal_padding", m(xin, is_causal=True, key_padding_mask=pad), \
        ref(m, xin, is_causal=True, key_padding_mask=pad)
    yield "gqa_window", g(xin, window=(5, 0)), \
        ref(g, xin, attn_mask=positional_bias(40, 40, 4, window=(5, 0)))
    mc = fastattn.MultiHeadAttention(64, 4, kdim=24, vdim=40, dtype=m.dtype, precision=precision,
                                     seed=6)
    key = rng.standard_normal((2, 29, 24)).astype(xin.dtype)
    val = rng.standard_normal((2, 29, 40)).astype(xin.dtype)
    p = params_of(mc)
    qh = (np.asarray(xin, np.float64) @ p["w_q"].T + p["b_q"]).reshape(2, 40, 4, 16).transpose(0, 2, 1, 3)
    kh = (np.asarray(key, np.float64) @ p["w_k"].T + p["b_k"]).reshape(2, 29, 4, 16).transpose(0, 2, 1, 3)
    vh = (np.asarray(val, np.float64) @ p["w_v"].T + p["b_v"]).reshape(2, 29, 4, 16).transpose(0, 2, 1, 3)
    o = ref_sdpa(qh, kh, vh)[0].transpose(0, 2, 1, 3).reshape(2, 40, 64)
    yield "cross", mc(xin, key, val), o @ p["w_o"].T + p["b_o"]
    # decoding: a prompt, then one token at a time, as the full causal forward
    for cache_dtype in (None, "float32", "bfloat16", "float16"):
        cache = g.new_cache(2, 40, dtype=cache_dtype)
        steps = [g(xin[:, :9], cache=cache)] + [g(xin[:, i:i + 1], cache=cache)
                                                for i in range(9, 40)]
        yield f"decode_{cache_dtype}", np.concatenate(steps, 1), ref(g, xin, is_causal=True)


def _module_report(dtype, precision):
    out = {}
    for name, got, want in _module_cases(np.dtype(dtype), precision):
        err = float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())
        out[name] = [str(np.asarray(got).dtype), err]
    return out


@pytest.mark.parametrize("isa", available_isas())
def test_module_paths_per_build(isa):
    # one process per build (chosen at import); it prints the build it ran
    script = ("import json, sys; sys.path.insert(0, %r); import test_half as t; "
              "from fastattn._dispatch import kernels; "
              "print(json.dumps({'isa': kernels.isa(), "
              "'bf16': t._module_report('bfloat16', None), "
              "'f16': t._module_report('float16', None), "
              "'mixed': t._module_report('float32', 'bfloat16')}))"
              % str(pathlib.Path(__file__).parent))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=dict(os.environ, FASTATTN_ISA=isa), timeout=300,
                       cwd=pathlib.Path(__file__).parent)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    print(f"build {got['isa']}: " + ", ".join(
        f"{k} {name} {err:.2e}" for k in ("bf16", "f16", "mixed") for name, (_, err)
        in got[k].items()))
    assert got["isa"] == isa
    for key, dtype, want_dtype in (("bf16", BF16, "bfloat16"), ("f16", F16, "float16"),
                                   ("mixed", BF16, "float32")):
        for name, (out_dtype, err) in got[key].items():
            assert out_dtype == want_dtype, (key, name)
            assert err <= MOD_REL[dtype], (key, name, err)


def test_dtype_kept_by_state_dict_files_and_pickles(tmp_path):
    import pickle
    m = fastattn.MultiHeadSelfAttention(32, 4, dtype="bfloat16", seed=1)
    assert m.w_q.dtype == BF16 and m.state_dict()["b_o"].dtype == BF16
    m.save(tmp_path / "m")
    m2 = fastattn.MultiHeadSelfAttention.load(tmp_path / "m")
    assert m2 == m and m2.dtype == BF16
    assert pickle.loads(pickle.dumps(m)) == m
    mp = fastattn.MultiHeadAttention(32, 4, precision="bfloat16", seed=1)
    assert mp.w_q.dtype == np.float32 and mp.config()["precision"] == "bfloat16"
    mp.save(tmp_path / "mp")
    mp2 = fastattn.MultiHeadAttention.load(tmp_path / "mp")
    assert mp2 == mp and mp2.precision == BF16
    x = np.random.default_rng(0).standard_normal((1, 5, 32)).astype(np.float32)
    np.testing.assert_array_equal(mp2(x, x, x), mp(x, x, x))
    mh = fastattn.MultiHeadSelfAttention(32, 4, dtype=np.float16, seed=1)
    mh.save(tmp_path / "mh")
    assert fastattn.MultiHeadSelfAttention.load(tmp_path / "mh") == mh


def test_bfloat16_weights_beyond_float16_range_are_refused():
    # bfloat16 and float16 are both 16 bits wide, but bfloat16 reaches 3.4e38
    # and float16 only 65504: such weights would become inf in a float16
    # module, as float32 ones beyond its range are refused
    m = fastattn.MultiHeadSelfAttention(16, 2, dtype=np.float16, seed=0)
    before = m.state_dict()
    big = np.full((16, 16), 1e5).astype(BF16)
    with pytest.raises(ValueError, match=r"w_o: finite values beyond float16's range "
                                         r"\(largest magnitude 99840\b"):
        m.w_o = big
    with pytest.raises(ValueError, match=r"w_q: finite values beyond float16's range"):
        m.load_state_dict({**{k: v.astype(BF16) for k, v in before.items()}, "w_q": big})
    assert m == fastattn.MultiHeadSelfAttention(16, 2, dtype=np.float16, seed=0)
    # in range, bfloat16 weights load (rounded to float16); float16 into a
    # bfloat16 module cannot overflow
    m.w_o = np.full((16, 16), 6e4).astype(BF16)
    assert np.isfinite(m.w_o).all()
    mb = fastattn.MultiHeadSelfAttention(16, 2, dtype=BF16, seed=0)
    mb.w_o = np.full((16, 16), 6e4, np.float16)
    assert np.isfinite(mb.w_o.astype(np.float32)).all()


def test_precision_module_refuses_weights_its_products_cannot_hold():
    # a float32 module with precision="float16" multiplies float16 weights:
    # one beyond 65504 would be inf in every product, so it is refused when
    # given, as a float16 module refuses it, not rounded to inf when packed
    m = fastattn.MultiHeadSelfAttention(16, 2, precision="float16", seed=0)
    x = np.random.default_rng(0).standard_normal((1, 3, 16)).astype(np.float32)
    y = m(x)
    with pytest.raises(ValueError, match=r"w_v in precision=float16: finite values "
                                         r"beyond float16's range \(largest magnitude 100000\.0\)"):
        m.w_v = np.full((16, 16), 1e5, np.float32)
    with pytest.raises(ValueError, match=r"in_proj_weight \(part q\) in precision=float16: "):
        m.load_state_dict({"in_proj_weight": np.full((48, 16), -7e4, np.float32),
                           "in_proj_bias": np.zeros(48, np.float32),
                           "out_proj.weight": np.eye(16, dtype=np.float32),
                           "out_proj.bias": np.zeros(16, np.float32)})
    np.testing.assert_array_equal(m(x), y)  # unchanged
    # biases stay float32 (added to the float32 sums): any float32 value goes
    m.b_v = np.full(16, 1e5, np.float32)
    mb = fastattn.MultiHeadSelfAttention(16, 2, precision="bfloat16", seed=0)
    mb.w_v = np.full((16, 16), 1e30, np.float32)  # within bfloat16's range


def test_values_cast_beyond_float16_range_are_refused(rng):
    # float32 values above 65504 cast into float16 (a float16 module's input,
    # precision="float16", a float16 cache under a float32 module) would be
    # inf there and NaN in every output that reads them: refused, naming them
    big = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    big[0, 1, 2, 3] = 1e5
    small = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"k: finite values beyond float16's range \(largest "
                                         r"magnitude 100000\.0\)"):
        fastattn.scaled_dot_product_attention(small, big, small, precision="float16")
    m = fastattn.MultiHeadSelfAttention(8, 2, dtype=np.float16, seed=0)
    with pytest.raises(ValueError, match=r"x: finite values beyond float16's range"):
        m(big[0])
    mc = fastattn.MultiHeadAttention(8, 2, kdim=8, vdim=8, dtype=np.float16, seed=0)
    with pytest.raises(ValueError, match=r"value: finite values beyond float16's range"):
        mc(small[0], small[0], big[0])
    cache = fastattn.KVCache(1, 8, 2, 4, np.float16)
    with pytest.raises(ValueError, match=r"k_new: finite values beyond float16's range"):
        cache.append(big[:, 1], small[:, 1])
    assert len(cache) == 0
    # a float32 module whose projected values outgrow its float16 cache
    m32 = fastattn.MultiHeadSelfAttention(8, 2, seed=0)
    m32.w_v = 3e4 * np.eye(8, dtype=np.float32)
    x = np.full((1, 3, 8), 4.0, np.float32)
    cache = m32.new_cache(1, 8, dtype="float16")
    with pytest.raises(ValueError, match=r"values for the float16 cache: finite values beyond "
                                         r"float16's range"):
        m32(x, cache=cache)
    assert len(cache) == 0
    # within range, and in a bfloat16 cache, the same values go through
    y = m32(x, cache=m32.new_cache(1, 8, dtype="bfloat16"))
    assert np.isfinite(y).all()
    assert np.isfinite(m(small[0].astype(np.float64))).all()


def test_torch_bf16_modules_round_trip():
    torch = pytest.importorskip("torch")
    tm = torch.nn.MultiheadAttention(32, 4, batch_first=True).bfloat16()
    m = fastattn.MultiHeadSelfAttention.from_torch(tm)
    assert m.dtype == BF16
    x = torch.randn(2, 7, 32).bfloat16()
    with torch.no_grad():
        want = tm(x, x, x, need_weights=False)[0].float().numpy()
    got = m(x).astype(np.float32)
    assert np.abs(got - want).max() <= 3e-2 * np.abs(want).max()
    back = m.to_torch()
    assert back.in_proj_weight.dtype == torch.bfloat16
    assert torch.equal(back.in_proj_weight, tm.in_proj_weight)


def test_accuracy_no_worse_than_torch_bf16(rng):
    # the same bfloat16 inputs through torch's bfloat16 SDPA and ours: our
    # error against the float64 reference is no larger than torch's (within
    # a quarter: the roundings differ in where they fall)
    torch = pytest.importorskip("torch")
    for causal in (False, True):
        q, k, v = _qkv(rng, BF16, lead=(2,), H=8, Hkv=8, Lq=256, Lk=256, E=64)
        want = ref_sdpa(q, k, v, is_causal=causal)[0]
        ours = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal)
        tq, tk, tv = (torch.from_numpy(a.astype(np.float32)).bfloat16() for a in (q, k, v))
        theirs = torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv, is_causal=causal).float().numpy()

        def rms(a):
            return float(np.sqrt(np.mean((np.asarray(a, np.float64) - want) ** 2)))

        assert rms(ours) <= 1.25 * rms(theirs), (rms(ours), rms(theirs))


def test_info_names_the_bf16_path():
    info = fastattn.info()
    assert info["bfloat16"] == ("VDPBF16PS pairs" if kernels.pairs() else "widened to float32")


@pytest.mark.parametrize("E,scale", [(128, None), (100, None), (64, 0.3)])
def test_scale_is_not_rounded_into_the_queries(rng, E, scale):
    # scores of a few units with a scale that is no power of two: rounding
    # scale * q to bfloat16 (as a first version of the pair path did) moved
    # every score and broke the bound, where torch stays within it
    q = (4 * rng.standard_normal((1, 2, 256, E))).astype(BF16)
    k = (4 * rng.standard_normal((1, 2, 256, E))).astype(BF16)
    v = rng.standard_normal((1, 2, 256, E)).astype(BF16)
    out = fastattn.scaled_dot_product_attention(q, k, v, scale=scale)
    _close(out, ref_sdpa(q, k, v, scale=scale)[0], BF16, 5e-3)
