"""The kernel builds and their tiling: every instruction-set build, block size
and thread count gives the float64 reference's answer."""

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

import fastattn
from fastattn import _policy, _validate
from fastattn._dispatch import available_isas, kernels

from reference import ref_sdpa

TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def _case(rng, dtype, lead=(2,), H=4, Hkv=2, Lq=37, Lk=71, E=24, Ev=40):
    q = rng.standard_normal(lead + (H, Lq, E)).astype(dtype)
    k = rng.standard_normal(lead + (Hkv, Lk, E)).astype(dtype)
    v = rng.standard_normal(lead + (Hkv, Lk, Ev)).astype(dtype)
    return q, k, v


def _run(mod, q, k, v, *, causal=False, mask=None, need_weights=False, block_q=64, block_k=64,
         num_threads=2):
    full = q.shape[:-1] + (k.shape[-2],)
    bmask, fmask = _validate.prepare_mask(mask, "attn_mask", full, q.dtype)
    out = np.empty(q.shape[:-1] + (v.shape[-1],), q.dtype)
    w = np.empty(full, q.dtype) if need_weights else None
    schedule = _policy.attention_schedule(int(np.prod(q.shape[:-2])), q.shape[-2], k.shape[-2],
                                          need_weights, num_threads, block_q, block_k)
    mod.attention(q, k, v, out, w, bmask, None, fmask, causal, 1 / np.sqrt(q.shape[-1]),
                  schedule, num_threads)
    return out, w


def _module(isa):
    return importlib.import_module(f"fastattn._kernels._{isa}")


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_isa_build_matches_reference(rng, isa, dtype):
    mod = _module(isa)
    assert mod.isa() == isa
    q, k, v = _case(rng, dtype)
    mask = rng.random((37, 71)) > 0.2
    for causal in (False, True):
        ref_out, ref_w = ref_sdpa(q, k, v, attn_mask=mask, is_causal=causal)
        out, w = _run(mod, q, k, v, causal=causal, mask=mask, need_weights=True)
        np.testing.assert_allclose(out, ref_out, **TOL[dtype])
        np.testing.assert_allclose(w, ref_w, **TOL[dtype])
        out2, _ = _run(mod, q, k, v, causal=causal, mask=mask)
        np.testing.assert_allclose(out2, ref_out, **TOL[dtype])


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_query_and_output_transposes_on_whole_and_ragged_blocks(rng, isa, dtype):
    """Q is transposed into the tile and O back out of it a vector-square block
    at a time, element by element at the edges: whole blocks, ragged rows and
    columns, and head-interleaved strides (the modules' layout) all agree."""
    mod = _module(isa)
    B, H = 2, 3
    for E, L in [(16, 16), (64, 64), (32, 81), (33, 100), (8, 7), (1, 20)]:
        buf = rng.standard_normal((B, L, H * E + 3)).astype(dtype)
        q = buf[:, :, : H * E].reshape(B, L, H, E).transpose(0, 2, 1, 3)
        k = rng.standard_normal((B, H, L + 5, E)).astype(dtype)
        v = rng.standard_normal((B, H, L + 5, E)).astype(dtype)
        merged = np.full((B, L, H * E + 2), 7.0, dtype)
        out = merged[:, :, : H * E].reshape(B, L, H, E).transpose(0, 2, 1, 3)
        mod.attention(q, k, v, out, None, None, None, None, False, 1 / np.sqrt(E),
                      (64, 64, False, 1), 2)
        ref_out, _ = ref_sdpa(q, k, v)
        np.testing.assert_allclose(out, ref_out, **TOL[dtype])
        assert (merged[:, :, H * E:] == 7.0).all()  # nothing written past the view


@pytest.mark.parametrize("block_q,block_k", [(1, 1), (7, 5), (16, 200), (200, 16), (64, 64)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_result_does_not_depend_on_block_sizes(rng, block_q, block_k, dtype):
    q, k, v = _case(rng, dtype, Lq=97, Lk=101)
    fmask = np.where(rng.random((1, 4, 97, 101)) > 0.1, rng.standard_normal((1, 4, 97, 101)), -np.inf)
    for causal in (False, True):
        ref_out, _ = ref_sdpa(q, k, v, attn_mask=fmask, is_causal=causal)
        out, _ = _run(kernels, q, k, v, causal=causal, mask=fmask, block_q=block_q, block_k=block_k)
        np.testing.assert_allclose(out, ref_out, **TOL[dtype])


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_max_from_the_score_gemm_equals_the_softmax_pass(rng, isa, dtype):
    """Unmasked key blocks take each query's block max in the score GEMM's
    epilogue; masked ones (here by a mask that keeps every key) find it in a
    pass over the scores.  Both are the exact max, so the outputs are the same
    bits: over whole and ragged key blocks, ragged query tiles and scores
    wide enough that the running max moves from block to block.  Every score
    is negative, so a max that counted the zero rows padding a ragged panel
    would differ."""
    mod = _module(isa)
    q, k, v = _case(rng, dtype, Lq=70, Lk=300, E=32, Ev=24)
    q = np.abs(q) * 8  # scores of minus tens: exp(s - max) spans the float range
    k = -np.abs(k)
    k[:, :, 150:] *= 0.3  # later keys score higher: the max moves after the first block
    keep = np.ones((70, 300), bool)
    for block_k in (64, 100, 256):
        plain, _ = _run(mod, q, k, v, block_k=block_k)
        masked, _ = _run(mod, q, k, v, mask=keep, block_k=block_k)
        np.testing.assert_array_equal(plain, masked)
        ref_out, _ = ref_sdpa(q, k, v)
        np.testing.assert_allclose(plain, ref_out, rtol=TOL[dtype]["rtol"] * 50,
                                   atol=TOL[dtype]["atol"] * 50)


def test_threads_give_identical_bits(rng):
    """Each tile is computed the same way whichever thread runs it."""
    q, k, v = _case(rng, np.float32, lead=(3,), H=8, Hkv=8, Lq=130, Lk=130)
    one, _ = _run(kernels, q, k, v, causal=True, num_threads=1)
    for n in (2, 3, 5):
        many, _ = _run(kernels, q, k, v, causal=True, num_threads=n)
        np.testing.assert_array_equal(many, one)


def test_kernel_rejects_inconsistent_operands(rng):
    q, k, v = _case(rng, np.float32)
    out = np.empty(q.shape[:-1] + (v.shape[-1],), np.float32)
    with pytest.raises(ValueError, match="shapes disagree"):
        kernels.attention(q, k[..., :5, :], v, out, None, None, None, None, False, 1.0,
                          (64, 64, False, 1), 1)
    with pytest.raises(TypeError, match="dtype"):
        kernels.attention(q, k.astype(np.float64), v, out, None, None, None, None, False, 1.0,
                          (64, 64, False, 1), 1)
    with pytest.raises(ValueError, match="unit stride"):
        kernels.attention(q[..., ::2], k[..., ::2], v, out, None, None, None, None, False, 1.0,
                          (64, 64, False, 1), 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 33, 50), (97, 64, 130), (130, 200, 64), (64, 1100, 40),
                                   (300, 70, 200)])
def test_linear_matches_float64_matmul(rng, dtype, m, k, n):
    x = rng.standard_normal((m, k)).astype(dtype)
    w = rng.standard_normal((n, k)).astype(dtype)
    b = rng.standard_normal(n).astype(dtype)
    packed, bias = kernels.pack_weight(w, b)
    expected = x.astype(np.float64) @ w.T.astype(np.float64) + b
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-11)
    for nt in (1, 2, 3):
        out = np.full((m, n), np.nan, dtype)
        kernels.linear(x, packed, bias, n, out, _policy.linear_blocking(k), nt)
        np.testing.assert_allclose(out, expected, **tol)
    # strided rows in and out (a column slice of a wider buffer), no bias
    wide_x = np.zeros((m, k + 5), dtype)
    wide_x[:, 2:2 + k] = x
    wide_out = np.full((m, n + 3), 7.0, dtype)
    packed, _ = kernels.pack_weight(w, None)
    kernels.linear(wide_x[:, 2:2 + k], packed, None, n, wide_out[:, 1:1 + n],
                   _policy.linear_blocking(k), 2)
    np.testing.assert_allclose(wide_out[:, 1:1 + n], expected - b, **tol)
    assert (wide_out[:, 0] == 7).all() and (wide_out[:, 1 + n:] == 7).all()


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B,N,G,E,k", [(1, 64, 3, 64, 32), (3, 13, 5, 24, 17), (2, 9, 4, 40, 1100),
                                       (2, 1, 2, 1, 3), (2, 150, 3, 64, 40)])
def test_linear_head_major_output_matches_float64_matmul(rng, isa, dtype, B, N, G, E, k):
    """Row b * N + n, column g * E + e lands at out[b, g, n, e]: heads whose
    width is not a multiple of the panel (24, 40, 1), row panels cut at the end
    of each batch entry (N = 13, 9, 1), and an inner dimension split in two."""
    mod = _module(isa)
    x = rng.standard_normal((B * N, k)).astype(dtype)
    w = rng.standard_normal((G * E, k)).astype(dtype)
    b = rng.standard_normal(G * E).astype(dtype)
    expected = (x.astype(np.float64) @ w.T.astype(np.float64) + b).reshape(B, N, G, E)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-11)
    packed, bias = mod.pack_weight(w, b)
    for nt in (1, 3):
        out = np.full((B, G, N, E), np.nan, dtype)
        mod.linear(x, packed, bias, G * E, out, _policy.linear_blocking(k), nt, True)
        np.testing.assert_allclose(out, expected.transpose(0, 2, 1, 3), **tol)


def test_linear_head_major_rejects_wrong_layouts(rng):
    x = rng.standard_normal((6, 8)).astype(np.float32)
    packed, _ = kernels.pack_weight(rng.standard_normal((12, 8)).astype(np.float32), None)
    for bad in (np.empty((6, 12), np.float32), np.empty((2, 2, 3, 4), np.float32),
                np.empty((2, 3, 3, 8), np.float32)[..., :4]):
        with pytest.raises(ValueError, match="head-major"):
            kernels.linear(x, packed, None, 12, bad, _policy.linear_blocking(8), 1, True)


def test_linear_rejects_mismatched_packing(rng):
    x = rng.standard_normal((4, 8)).astype(np.float32)
    packed, _ = kernels.pack_weight(rng.standard_normal((6, 9)).astype(np.float32), None)
    with pytest.raises(ValueError, match="packed weight"):
        kernels.linear(x, packed, None, 6, np.empty((4, 6), np.float32),
                       _policy.linear_blocking(8), 1)


def test_module_parameters_are_read_only_views_and_assignment_repacks(rng):
    m = fastattn.MultiHeadSelfAttention(16, 2, seed=0)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="read-only"):
        m.w_q[0, 0] = 1.0
    before = m(x)
    m.w_q = m.w_q * 2  # assignment goes through, and the packed copy follows
    after = m(x)
    assert not np.allclose(before, after)
    fresh = fastattn.MultiHeadSelfAttention(16, 2, seed=0)
    fresh.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(fresh(x), after)


def test_omp_num_threads_sets_the_default():
    code = "import fastattn; print(fastattn.get_num_threads())"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert res.stdout.strip() == "1"


@pytest.mark.parametrize("isa", available_isas())
def test_fastattn_isa_env_forces_a_build(isa):
    code = "from fastattn._dispatch import kernels; print(kernels.isa())"
    env = dict(os.environ, FASTATTN_ISA=isa)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert res.stdout.strip() == isa


def test_info_reports_the_build():
    data = fastattn.info()
    expected = os.environ.get("FASTATTN_ISA") or available_isas()[0]
    assert data["kernel_isa"] == kernels.isa() == expected
    assert isinstance(data["openmp"], bool)
    assert data["num_threads"] == fastattn.get_num_threads()


@pytest.mark.parametrize("Lq", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_few_queries_row_path_matches_reference(rng, Lq, dtype):
    """Up to 4 queries run row by row (decoding); 5 goes back to tiles."""
    q, k, v = _case(rng, dtype, H=8, Hkv=2, Lq=Lq, Lk=300, E=40, Ev=21)
    bmask = rng.random((2, 1, Lq, 300)) > 0.3
    fmask = np.where(rng.random((Lq, 300)) > 0.1, rng.standard_normal((Lq, 300)), -np.inf)
    for mask in (None, bmask, fmask):
        for causal in (False, True):
            ref_out, _ = ref_sdpa(q, k, v, attn_mask=mask, is_causal=causal)
            for block_k in (7, 64):
                out, _ = _run(kernels, q, k, v, causal=causal, mask=mask, block_k=block_k)
                np.testing.assert_allclose(out, ref_out, **TOL[dtype])


def _plan_operands(mod, rng, B, N, H, Hkv, E, dtype):
    D, kv = H * E, Hkv * E
    # weights ~ 1/sqrt(fan in), as nn.Linear's: activations stay O(1)
    w_qkv = (rng.standard_normal((D + 2 * kv, D)) / np.sqrt(D)).astype(dtype)
    b_qkv = rng.standard_normal(D + 2 * kv).astype(dtype)
    w_o = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(dtype)
    b_o = rng.standard_normal(D).astype(dtype)
    wq, bq = mod.pack_weight(w_qkv, b_qkv)
    wo, bo = mod.pack_weight(w_o, b_o)
    qkv = np.empty((B, H + 2 * Hkv, N, E), dtype)
    merged = np.empty((B * N, D), dtype)
    out = merged.reshape(B, N, H, E).transpose(0, 2, 1, 3)
    ops = (wq, bq, D + 2 * kv, qkv, qkv[:, :H], qkv[:, H:H + Hkv], qkv[:, H + Hkv:], out,
           merged, wo, bo, 1 / np.sqrt(E), _policy.attention_schedule(B * H, N, N, False, 1),
           _policy.linear_blocking(D))

    def reference(x):
        x64 = x.astype(np.float64).reshape(B * N, D)
        p = x64 @ w_qkv.T.astype(np.float64) + b_qkv
        q = p[:, :D].reshape(B, N, H, E).transpose(0, 2, 1, 3)
        k = p[:, D:D + kv].reshape(B, N, Hkv, E).transpose(0, 2, 1, 3)
        v = p[:, D + kv:].reshape(B, N, Hkv, E).transpose(0, 2, 1, 3)
        o = ref_sdpa(q, k, v)[0].transpose(0, 2, 1, 3).reshape(B * N, D)
        return (o @ w_o.T.astype(np.float64) + b_o).reshape(B, N, D)

    return ops, reference


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B,N,H,Hkv,E", [(2, 37, 4, 2, 16), (1, 3, 2, 2, 8), (1, 130, 8, 8, 64),
                                         (3, 70, 6, 2, 32), (2, 16, 2, 1, 48)])
@pytest.mark.parametrize("per_head", [False, True])
def test_forward_plan_matches_reference(rng, isa, dtype, B, N, H, Hkv, E, per_head):
    mod = _module(isa)
    ops, reference = _plan_operands(mod, rng, B, N, H, Hkv, E, dtype)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-12)
    # per head where asked and a head's columns are whole weight panels (and not row by row)
    expect_per_head = per_head and E % mod.panel_width(dtype) == 0 and N > 4
    for nt in (1, 3):
        nt_ops = ops[:-2] + (_policy.attention_schedule(B * H, N, N, False, nt), ops[-1])
        plan = mod.ForwardPlan(*nt_ops, nt, None, None, per_head)
        assert plan.per_head == expect_per_head
        for _ in range(2):  # the same plan again, on new inputs: a new output each time
            x = rng.standard_normal((B, N, H * E)).astype(dtype)
            y = plan.run(x)
            assert y.shape == x.shape and y.dtype == dtype and y.flags.c_contiguous
            np.testing.assert_allclose(y, reference(x), **tol)
            assert plan.kernel_seconds > 0
            if per_head:
                # the same sums in the same order, only scheduled differently
                y = y.copy()
                np.testing.assert_array_equal(mod.ForwardPlan(*nt_ops, nt).run(x), y)


def test_per_head_plan_only_where_it_reads_what_it_projects(rng):
    ops, reference = _plan_operands(kernels, rng, 2, 40, 4, 2, 64, np.float32)
    assert kernels.ForwardPlan(*ops, 2, None, None, True).per_head
    # q, k or v not the heads the projection writes: not per head (and still right)
    qkv = ops[3]
    for i, other in ((4, qkv[:, :4].copy()), (5, qkv[:, 6:]), (6, qkv[:, 4:6])):
        plan = kernels.ForwardPlan(*ops[:i], other, *ops[i + 1:], 2, None, None, True)
        assert not plan.per_head
    # x sharing memory with merged: that call runs the three calls apart, so a
    # unit's output never feeds a later unit's projection
    plan = kernels.ForwardPlan(*ops, 1, None, None, True)
    x = rng.standard_normal((2, 40, 256)).astype(np.float32)
    merged = ops[8]
    shared = merged.reshape(2, 40, 256)
    shared[...] = x
    np.testing.assert_allclose(plan.run(shared), reference(x), rtol=2e-5, atol=2e-5)
    shared[...] = x
    np.testing.assert_array_equal(plan.run(shared), plan.run(x))


def test_forward_plan_checks_its_input_and_its_conditions(rng):
    import threading

    ops, _ = _plan_operands(kernels, rng, 2, 5, 2, 2, 8, np.float32)
    token = {}
    me = threading.get_ident()
    plan = kernels.ForwardPlan(*ops, 2, token, me)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    bad = [x[:, :4], x.astype(np.float64), x[:, :, ::-1], x.tolist(), x[0], None,
           np.asfortranarray(x)]
    for b in bad:
        with pytest.raises(ValueError, match="x must be"):
            plan.run(b)
        assert plan.run_if(b, token, me, 2) is None
    # only for the token (by identity), owner and thread count it was made for
    assert plan.run_if(x, {}, me, 2) is None
    assert plan.run_if(x, token, me, 1) is None
    got = []
    t = threading.Thread(target=lambda: got.append(plan.run_if(x, token, threading.get_ident(), 2)))
    t.start()
    t.join()
    assert got == [None]
    np.testing.assert_array_equal(plan.run_if(x, token, me, 2), plan.run(x))
    with pytest.raises(ValueError, match="ForwardPlan"):
        kernels.ForwardPlan(*ops[:8], ops[8][:4], *ops[9:], 1)
    with pytest.raises(ValueError, match="num_threads"):
        kernels.ForwardPlan(*ops, 0)
    # byte-swapped input is not the plan's (its type number is the same)
    with pytest.raises(ValueError, match="x must be"):
        plan.run(x.astype(x.dtype.newbyteorder()))
    blank = kernels.ForwardPlan.__new__(kernels.ForwardPlan)
    with pytest.raises(ValueError, match="never initialised"):
        blank.run(x)
    assert blank.run_if(x, None, None, 0) is None


def test_kernel_refuses_byte_swapped_operands(rng):
    q = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    with pytest.raises(TypeError, match="byte order"):
        kernels.attention(q.astype(q.dtype.newbyteorder()), q, q, np.empty_like(q), None, None,
                          None, None, False, 0.5, (64, 256, False, 1), 1)
