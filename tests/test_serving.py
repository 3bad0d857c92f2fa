"""Serving many sequences at once: packed variable-length attention
(varlen_attention, m(x, cu_seqlens=...)), caches with one length per sequence
(lengths=, reorder, reset(i)), each sequence checked against the same sequence
run alone (itself checked against the float64 reference elsewhere) and the
float64 reference."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastattn as fa
from reference import params_of, ref_mhsa, ref_sdpa

BF16 = ml_dtypes.bfloat16


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300) if b.size else 0.0


def packed(rng, lens, heads, width, dtype=np.float32):
    return rng.standard_normal((int(sum(lens)), heads, width)).astype(dtype)


def cu_of(lens):
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)


def per_sequence(q, k, v, cu_q, cu_k, **kw):
    """Each sequence through scaled_dot_product_attention on its own."""
    outs, lses = [], []
    for s in range(len(cu_q) - 1):
        qs = q[cu_q[s]:cu_q[s + 1]].transpose(1, 0, 2)
        ks = k[cu_k[s]:cu_k[s + 1]].transpose(1, 0, 2)
        vs = v[cu_k[s]:cu_k[s + 1]].transpose(1, 0, 2)
        o, l = fa.scaled_dot_product_attention(qs, ks, vs, return_lse=True, **kw)
        outs.append(o.transpose(1, 0, 2))
        lses.append(l)
    return np.concatenate(outs), np.concatenate(lses, axis=1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lens=st.lists(st.integers(0, 90), min_size=1, max_size=7),
       extra=st.lists(st.integers(0, 20), min_size=7, max_size=7),
       causal=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_each_packed_sequence_equals_it_run_alone(lens, extra, causal, seed):
    rng = np.random.default_rng(seed)
    lens_k = [n + e for n, e in zip(lens, extra)]
    q, k, v = packed(rng, lens, 4, 16), packed(rng, lens_k, 2, 16), packed(rng, lens_k, 2, 16)
    cu_q, cu_k = cu_of(lens), cu_of(lens_k)
    out, lse = fa.varlen_attention(q, k, v, cu_q, cu_k, is_causal=causal, return_lse=True)
    want, want_lse = per_sequence(q, k, v, cu_q, cu_k, is_causal=causal)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    assert rel(out, want) < 2e-6
    assert np.array_equal(np.isfinite(lse), np.isfinite(want_lse))
    finite = np.isfinite(want_lse)
    assert np.abs(lse - want_lse)[finite].max(initial=0) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-5), (np.float64, 1e-12),
                                       (BF16, 2e-2), (np.float16, 4e-3)])
def test_packed_options_against_the_reference(dtype, tol):
    rng = np.random.default_rng(1)
    lens = [1, 0, 200, 37, 5, 64]
    q, k, v = packed(rng, lens, 4, 32, dtype), packed(rng, lens, 2, 32, dtype), \
        packed(rng, lens, 2, 32, dtype)
    cu = cu_of(lens)
    sinks = rng.standard_normal(4)
    slopes = fa.alibi_slopes(4)
    kw = dict(is_causal=True, window=(30, 0), alibi_slopes=slopes, softcap=8.0, sinks=sinks)
    out = fa.varlen_attention(q, k, v, cu, **kw)
    for s in range(len(lens)):
        a, b = cu[s], cu[s + 1]
        if a == b:
            continue
        n = b - a
        i = np.arange(n)[:, None]
        j = np.arange(n)[None, :]
        bias = np.where((j <= i) & (j >= i - 30), 0.0, -np.inf)[None] - \
            slopes[:, None, None] * np.abs(j - i)[None]
        ref, _ = ref_sdpa(q[a:b].transpose(1, 0, 2), k[a:b].transpose(1, 0, 2),
                          v[a:b].transpose(1, 0, 2), bias, softcap=8.0, sinks=sinks)
        assert out.dtype == dtype
        assert rel(out[a:b].transpose(1, 0, 2), ref) < tol, s


def test_packed_thread_count_independent():
    rng = np.random.default_rng(2)
    lens = [300, 1, 77, 0, 129]
    q, k, v = (packed(rng, lens, 4, 32) for _ in range(3))
    with fa.threads.this_thread_uses(1):
        one = fa.varlen_attention(q, k, v, cu_of(lens), is_causal=True)
    with fa.threads.this_thread_uses(2):
        two = fa.varlen_attention(q, k, v, cu_of(lens), is_causal=True)
    assert np.array_equal(one, two)


@pytest.mark.parametrize("kw", [dict(), dict(rotary=fa.Rotary(16), softcap=20.0, sinks=True,
                                             num_kv_heads=2)])
def test_module_packed_forward_equals_each_sequence_alone(kw):
    rng = np.random.default_rng(3)
    m = fa.MultiHeadSelfAttention(64, 4, seed=0, **kw)
    if m.has_sinks:
        m.sinks = rng.standard_normal(4)
    lens = [5, 0, 1, 40, 12]
    cu = cu_of(lens)
    x = rng.standard_normal((cu[-1], 64)).astype(np.float32)
    for causal in (True, False):
        y = m(x, cu_seqlens=cu, is_causal=causal)
        for s in range(len(lens)):
            if lens[s]:
                alone = m(x[None, cu[s]:cu[s + 1]], is_causal=causal)[0]
                assert rel(y[cu[s]:cu[s + 1]], alone) < 2e-6, (s, causal)
    # and the float64 reference, for one sequence
    r = m.rotary
    rot = None if r is None else dict(dim=r.dim, theta=r.theta)
    ref, _ = ref_mhsa(x[cu[3]:cu[4]], params_of(m), 4, m.num_kv_heads, is_causal=True,
                      rotary=rot, softcap=m.softcap, sinks=m.sinks)
    assert rel(m(x, cu_seqlens=cu, is_causal=True)[cu[3]:cu[4]], ref) < 2e-5


def _decode_case(m, rng, prompt_lens, steps):
    """Ragged prefill in one call, then `steps` decoding calls for all
    sequences together; returns (outputs per sequence, the full inputs)."""
    B, T = len(prompt_lens), max(prompt_lens)
    seqs = [rng.standard_normal((n + steps, m.embed_dim)).astype(np.float32)
            for n in prompt_lens]
    x = np.zeros((B, T, m.embed_dim), np.float32)
    for b, n in enumerate(prompt_lens):
        x[b, :n] = seqs[b][:n]
    cache = m.new_cache(B, 4, grow=True)
    first = m(x, cache=cache, lengths=np.array(prompt_lens))
    for b, n in enumerate(prompt_lens):
        assert (first[b, n:] == 0).all()  # rows past a sequence's length
    got = [[first[b, :n]] for b, n in enumerate(prompt_lens)]
    for t in range(steps):
        step = np.stack([seqs[b][n + t] for b, n in enumerate(prompt_lens)])[:, None]
        y = m(step, cache=cache)
        for b in range(B):
            got[b].append(y[b])
    assert (cache.lengths == np.array(prompt_lens) + steps).all()
    return [np.concatenate(g) for g in got], seqs, cache


@pytest.mark.parametrize("kw", [dict(), dict(rotary=fa.Rotary(16), num_kv_heads=2, sinks=True),
                                dict(window=(5, 0), softcap=10.0)])
def test_ragged_prefill_then_decoding_equals_each_full_forward(kw):
    rng = np.random.default_rng(4)
    m = fa.MultiHeadSelfAttention(64, 4, seed=1, **kw)
    if m.has_sinks:
        m.sinks = rng.standard_normal(4)
    got, seqs, cache = _decode_case(m, rng, [7, 0, 1, 30, 12], 5)
    for b, x in enumerate(seqs):
        assert rel(got[b], m(x[None], is_causal=True)[0]) < 2e-6, b
    assert cache.capacity >= 35  # grew past 4


def test_ragged_cache_in_bfloat16():
    rng = np.random.default_rng(5)
    m = fa.MultiHeadSelfAttention(64, 4, seed=1, dtype=BF16)
    got, seqs, _ = _decode_case(m, rng, [9, 2, 20], 3)
    for b, x in enumerate(seqs):
        assert rel(got[b], m(x[None].astype(BF16), is_causal=True)[0]) < 2e-2


def test_reorder_and_reset():
    rng = np.random.default_rng(6)
    m = fa.MultiHeadSelfAttention(64, 4, seed=2, rotary=fa.Rotary(16))
    got, seqs, cache = _decode_case(m, rng, [6, 3, 11], 2)
    # beam search: keep sequence 2 twice and sequence 0
    cache.reorder([2, 0, 2])
    assert cache.lengths.tolist() == [13, 8, 13]
    nxt = rng.standard_normal((3, 1, 64)).astype(np.float32)
    y = m(nxt, cache=cache)
    for b, src in enumerate([2, 0, 2]):
        full = np.concatenate([seqs[src], nxt[b]])[None]
        assert rel(y[b, 0], m(full, is_causal=True)[0, -1]) < 2e-6
    # a freed slot takes a new request, the others go on
    cache.reset(1)
    assert cache.lengths.tolist() == [14, 0, 14]
    new = rng.standard_normal((3, 1, 64)).astype(np.float32)
    y = m(new, cache=cache)
    assert rel(y[1, 0], m(new[1:2], is_causal=True)[0, 0]) < 2e-6
    cache.reset()
    assert cache.lengths.tolist() == [0, 0, 0]


def test_a_step_that_some_sequences_skip():
    # one new position for some sequences (lengths 1), none for others (0):
    # a skipped sequence keeps its cache and gets a zero row
    rng = np.random.default_rng(11)
    m = fa.MultiHeadSelfAttention(64, 4, seed=4, rotary=fa.Rotary(16))
    got, seqs, cache = _decode_case(m, rng, [5, 8, 2, 0], 1)
    before = cache.lengths.copy()
    k_before = cache.keys()[1, :, :before[1]].copy()
    nxt = rng.standard_normal((4, 1, 64)).astype(np.float32)
    y = m(nxt, cache=cache, lengths=np.array([1, 0, 1, 1]))
    assert cache.lengths.tolist() == (before + [1, 0, 1, 1]).tolist()
    np.testing.assert_array_equal(cache.keys()[1, :, :before[1]], k_before)
    assert (y[1] == 0).all()
    for b in (0, 2, 3):
        full = np.concatenate([seqs[b], nxt[b]])[None]
        assert rel(y[b, 0], m(full, is_causal=True)[0, -1]) < 2e-6, b
    # the skipped sequence goes on from where it was
    y = m(nxt[:, :1] * 0.5, cache=cache, lengths=np.array([0, 1, 0, 0]))
    full = np.concatenate([seqs[1], nxt[1] * 0.5])[None]
    assert rel(y[1, 0], m(full, is_causal=True)[0, -1]) < 2e-6


def test_ragged_decoding_thread_count_independent():
    rng = np.random.default_rng(7)
    m = fa.MultiHeadSelfAttention(64, 4, seed=3)
    x = rng.standard_normal((3, 1, 64)).astype(np.float32)
    outs = []
    for n in (1, 2):
        cache = m.new_cache(3, 600)
        m(rng.standard_normal((3, 500, 64)).astype(np.float32) * 0 + 1, cache=cache,
          lengths=np.array([500, 3, 250]))
        with fa.threads.this_thread_uses(n):
            outs.append(m(x, cache=cache))
    assert np.array_equal(*outs)


# ---- bad input ------------------------------------------------------------------------

QP = np.zeros((10, 2, 8), np.float32)


@pytest.mark.parametrize("cu,err,match", [
    ([1, 10], ValueError, "cu_seqlens_q must start at 0"),
    ([0, 6, 4, 10], ValueError, r"must not decrease: cu_seqlens_q\[2\] = 4"),
    ([0, 4, 9], ValueError, "must end at the 10 rows of q"),
    ([0.0, 10.0], TypeError, "integer array"),
    ([[0, 10]], ValueError, "one-dimensional"),
    ([], ValueError, "at least one entry"),
])
def test_varlen_bad_cu_seqlens(cu, err, match):
    with pytest.raises(err, match=match):
        fa.varlen_attention(QP, QP, QP, cu)


def test_varlen_bad_counts_and_shapes():
    with pytest.raises(ValueError, match="count as many sequences"):
        fa.varlen_attention(QP, QP, QP, [0, 5, 10], [0, 10])
    with pytest.raises(ValueError, match="cu_seqlens_k is needed"):
        fa.varlen_attention(QP, QP[:4], QP[:4], [0, 10])
    with pytest.raises(ValueError, match=r"packed as \(total, heads, width\)"):
        fa.varlen_attention(QP[None], QP, QP, [0, 10])
    with pytest.raises(ValueError, match="must divide"):
        fa.varlen_attention(QP, np.zeros((10, 3, 8), np.float32),
                            np.zeros((10, 3, 8), np.float32), [0, 10])


def test_module_packed_refuses_what_does_not_apply():
    m = fa.MultiHeadSelfAttention(16, 2, seed=0)
    x = np.zeros((6, 16), np.float32)
    with pytest.raises(ValueError, match="cu_seqlens.*cache"):
        m(x, cu_seqlens=[0, 6], cache=m.new_cache(1, 8))
    with pytest.raises(ValueError, match="need_weights"):
        m(x, cu_seqlens=[0, 6], need_weights=True)
    with pytest.raises(ValueError, match="must end at the 6 rows of x"):
        m(x, cu_seqlens=[0, 5])
    with pytest.raises(ValueError, match=r"packed as \(total, 16\)"):
        m(x[None], cu_seqlens=[0, 6])
    with pytest.raises(ValueError, match="for MultiHeadSelfAttention"):
        ca = fa.MultiHeadAttention(16, 2, seed=0)
        ca(x, x, x, cu_seqlens=[0, 6])


@pytest.mark.parametrize("lengths,err,match", [
    (np.array([1, -1]), ValueError, r"lengths must be in \[0, 3\]"),
    (np.array([4, 1]), ValueError, r"lengths must be in \[0, 3\]"),
    (np.array([1, 1, 1]), ValueError, r"shape \(2,\)"),
    (np.array([1.0, 1.0]), TypeError, "integer"),
])
def test_bad_lengths_leave_the_cache_unchanged(lengths, err, match):
    m = fa.MultiHeadSelfAttention(16, 2, seed=0)
    cache = m.new_cache(2, 8)
    m(np.ones((2, 2, 16), np.float32), cache=cache, lengths=np.array([2, 1]))
    before = cache.lengths
    with pytest.raises(err, match=match):
        m(np.ones((2, 3, 16), np.float32), cache=cache, lengths=lengths)
    assert (cache.lengths == before).all()


def test_lengths_past_capacity_and_without_a_cache():
    m = fa.MultiHeadSelfAttention(16, 2, seed=0)
    cache = m.new_cache(2, 4)
    m(np.ones((2, 3, 16), np.float32), cache=cache, lengths=np.array([3, 1]))
    with pytest.raises(ValueError, match="cache is full"):
        m(np.ones((2, 2, 16), np.float32), cache=cache, lengths=np.array([2, 0]))
    assert cache.lengths.tolist() == [3, 1]
    with pytest.raises(ValueError, match="lengths .* needs a cache"):
        m(np.ones((2, 2, 16), np.float32), lengths=np.array([2, 1]))
    with pytest.raises(ValueError, match="take no key_padding_mask"):
        m(np.ones((2, 1, 16), np.float32), cache=cache,
          key_padding_mask=np.zeros((2, 5), bool))


@pytest.mark.parametrize("indices,err,match", [
    ([0, 2], ValueError, r"in \[0, 2\)"),
    ([-1, 0], ValueError, r"in \[0, 2\)"),
    ([0], ValueError, r"shape \(2,\)"),
    ([0.0, 1.0], TypeError, "integer"),
    ([True, False], TypeError, "integer"),
])
def test_bad_reorder_leaves_the_cache_unchanged(indices, err, match):
    m = fa.MultiHeadSelfAttention(16, 2, seed=0)
    cache = m.new_cache(2, 4)
    m(np.ones((2, 2, 16), np.float32), cache=cache, lengths=np.array([2, 1]))
    k = cache._k.copy()
    with pytest.raises(err, match=match):
        cache.reorder(indices)
    assert cache.lengths.tolist() == [2, 1] and np.array_equal(cache._k, k)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        cache.reset(5)


def test_readme_serving_section_runs_and_its_claims_hold(capsys):
    """The README's "Serving many sequences at once" example, run as written."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Serving many sequences"):text.index("## bfloat16 and float16")]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    exec(compile(block, "README.md", "exec"), {})
    assert capsys.readouterr().out.split("\n")[:2] == ["[120   7 300]", "[304   0 124]"]


# ---- found by an adversarial probe -------------------------------------------------

def test_a_reset_between_the_uniform_read_and_the_claim_is_seen():
    """Whether sequences sit at different lengths is read under the cache's
    claim: a reset(i) from another thread just before cannot send the call
    down the uniform path over a ragged cache."""
    import threading
    import time

    rng = np.random.default_rng(30)
    m = fa.MultiHeadSelfAttention(32, 2, seed=2)
    x = rng.standard_normal((2, 1, 32)).astype(np.float32)
    c = m.new_cache(2, 64)
    m(rng.standard_normal((2, 50, 32)).astype(np.float32), cache=c)

    class Slow(fa.KVCache):  # a thread switch right after `uniform` is read
        @property
        def uniform(self):
            value = fa.KVCache.uniform.fget(self)
            time.sleep(0.05)
            return value

    refused = []

    def reset():
        time.sleep(0.01)
        try:
            c.reset(1)
        except RuntimeError:
            refused.append(True)  # the call holds the cache: the reset is refused

    c.__class__ = Slow
    t = threading.Thread(target=reset)
    t.start()
    y = m(x, cache=c)
    t.join()
    c.__class__ = fa.KVCache
    if refused:  # the reset came while the call held the cache
        assert c.lengths.tolist() == [51, 51]
    else:  # it came first: the call saw sequence 1 empty and attended only its new row
        assert c.lengths.tolist() == [51, 1]
        assert rel(y[1, 0], m(x[1:2], is_causal=True)[0, 0]) < 2e-6


def test_packed_need_weights_checked_like_elsewhere():
    m = fa.MultiHeadSelfAttention(8, 2, seed=0)
    x = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="need_weights"):
        m(x, cu_seqlens=[0, 4], need_weights=np.True_)
    with pytest.raises(TypeError, match="need_weights must be True or False"):
        m(x, cu_seqlens=[0, 4], need_weights="yes")
    with pytest.raises(TypeError, match="average_attn_weights"):
        m(x, cu_seqlens=[0, 4], average_attn_weights="junk")


def test_driver_refuses_bad_ragged_arguments_without_crashing():
    # in a child process: a regression here would be a crash, not an exception
    import subprocess
    import sys

    code = """
import numpy as np
from fastattn._dispatch import kernels
q = np.zeros((1, 1, 4, 8), np.float32); out = np.zeros_like(q)
i = lambda *v: np.array(v, np.int64)
S = (64, 64, False, 1)
q2 = np.zeros((1, 2, 10, 8), np.float32); o2 = np.zeros_like(q2)
lse = np.zeros((2, 10), np.float32)
cases = [
    (q, q, q, out, i(4), i(4), i(0), i(0), True, .3, S, 1, None, None, 0., None,
     (np.zeros((1, 4), np.float32),)),
    (q, q, q, out, i(4), i(4), i(0), i(0), True, .3, (), 1, None, None, 0., None, None),
    (q2, q2, q2, o2, i(4, 6), i(4, 6), i(2**63 - 2, 4), i(0, 4), True, .3, S, 2, None, None,
     0., None, None),
    (q2, q2, q2, o2, i(4, 6), i(4, 6), i(0, 4), i(0, 4), True, .3, S, 2, None, None, 0., None,
     (lse, i(0, 2**63 - 3), 1)),
]
for args in cases:
    try:
        kernels.attention_ragged(*args)
    except (ValueError, TypeError):
        continue
    raise SystemExit("accepted: %r" % (args[6:8],))
# packed sequences that overlap, with key splits: each gets split-K room of
# its own (the buffer is sized by the sequences, not by q's rows)
q3 = np.zeros((1, 1, 64, 8), np.float32); k3 = np.zeros((1, 1, 4096, 8), np.float32)
o3 = np.zeros_like(q3)
kernels.attention_ragged(q3, k3, k3, o3, np.ones(64, np.int64), np.full(64, 4096, np.int64),
                         np.zeros(64, np.int64), np.zeros(64, np.int64), True, .3,
                         (64, 256, True, 8), 2)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_full_ragged_cache_names_the_sequence_and_small_fixes():
    m = fa.MultiHeadSelfAttention(16, 2, seed=0)
    cache = m.new_cache(2, 10)
    m(np.ones((2, 9, 16), np.float32), cache=cache, lengths=np.array([9, 0]))
    with pytest.raises(ValueError, match="sequence 0 uses 9 and cannot take 2 more"):
        m(np.ones((2, 5, 16), np.float32), cache=cache, lengths=np.array([2, 5]))
    assert cache.lengths.tolist() == [9, 0]
    cache.reset([])  # no sequence: nothing to do
    assert cache.lengths.tolist() == [9, 0]
    with pytest.raises(ValueError, match="1-D"):
        cache.reset([[0, 1]])
    with pytest.raises(ValueError, match="past what any array can hold"):
        fa.varlen_attention(QP, QP, QP, np.array([0, 2 ** 64 - 1], np.uint64))
