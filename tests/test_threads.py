"""Thread-count control and thread safety.

Results with 1 vs 2 threads must agree to float rounding:
float32 rtol 1e-5 / atol 1e-6, float64 rtol 1e-12 / atol 1e-13.
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastattn
from _util import randn

sdpa = fastattn.scaled_dot_product_attention
ROUND = {np.dtype(np.float32): dict(rtol=1e-5, atol=1e-6),
         np.dtype(np.float64): dict(rtol=1e-12, atol=1e-13)}


@pytest.fixture(autouse=True)
def restore_threads():
    original = fastattn.get_num_threads()
    yield original
    fastattn.set_num_threads(original)
    assert fastattn.get_num_threads() == original


def test_get_returns_positive_int(restore_threads):
    n = fastattn.get_num_threads()
    assert isinstance(n, int) and not isinstance(n, bool)
    assert n >= 1


@pytest.mark.parametrize("n", [1, 2, 3])
def test_set_then_get(n):
    fastattn.set_num_threads(n)
    assert fastattn.get_num_threads() == n


@pytest.mark.parametrize("bad", [0, -1, -8])
def test_set_non_positive_raises(bad):
    fastattn.set_num_threads(2)
    with pytest.raises(ValueError):
        fastattn.set_num_threads(bad)
    assert fastattn.get_num_threads() == 2  # unchanged by the failed call


@pytest.mark.parametrize("bad", [1.5, 2.0, "2", [2], None])
def test_set_non_int_raises(bad):
    fastattn.set_num_threads(1)
    with pytest.raises((TypeError, ValueError)):
        fastattn.set_num_threads(bad)
    assert fastattn.get_num_threads() == 1


def _sdpa_cases(rng, dtype):
    q = randn(rng, (4, 8, 256, 64), dtype)
    k = randn(rng, (4, 2, 300, 64), dtype)
    v = randn(rng, (4, 2, 300, 48), dtype)
    mask = rng.random((4, 1, 256, 300)) < 0.8
    return [
        dict(q=q, k=k, v=v),
        dict(q=q, k=k, v=v, is_causal=True),
        dict(q=q, k=k, v=v, attn_mask=mask, need_weights=True),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sdpa_one_vs_two_threads(rng, dtype):
    cases = _sdpa_cases(rng, dtype)
    results = {}
    for n in (1, 2):
        fastattn.set_num_threads(n)
        results[n] = [sdpa(c["q"], c["k"], c["v"], c.get("attn_mask"),
                           is_causal=c.get("is_causal", False),
                           need_weights=c.get("need_weights", False)) for c in cases]
    for r1, r2 in zip(results[1], results[2]):
        r1 = r1 if isinstance(r1, tuple) else (r1,)
        r2 = r2 if isinstance(r2, tuple) else (r2,)
        for a, b in zip(r1, r2):
            assert a.dtype == np.dtype(dtype)
            np.testing.assert_allclose(a, b, **ROUND[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_module_one_vs_two_threads(rng, dtype):
    m = fastattn.MultiHeadSelfAttention(128, 8, num_kv_heads=4, dtype=dtype, seed=0)
    x = randn(rng, (4, 200, 128), dtype)
    kpm = np.zeros((4, 200), bool)
    kpm[1, 150:] = True
    out = {}
    for n in (1, 2):
        fastattn.set_num_threads(n)
        out[n] = (m(x), m(x, is_causal=True, key_padding_mask=kpm, need_weights=True))
    t = ROUND[np.dtype(dtype)]
    np.testing.assert_allclose(out[1][0], out[2][0], **t)
    np.testing.assert_allclose(out[1][1][0], out[2][1][0], **t)
    np.testing.assert_allclose(out[1][1][1], out[2][1][1], **t)


def test_concurrent_python_threads_shared_module(rng):
    fastattn.set_num_threads(2)
    m = fastattn.MultiHeadSelfAttention(64, 8, seed=1)
    n_threads, n_calls = 4, 10
    xs = [[randn(rng, (2, 48 + 3 * i, 64)) for i in range(n_calls)] for _ in range(n_threads)]
    expected = [[m(x, is_causal=(i % 2 == 0)) for i, x in enumerate(row)] for row in xs]
    start = threading.Barrier(n_threads)

    def work(t):
        start.wait()
        return [m(x, is_causal=(i % 2 == 0)) for i, x in enumerate(xs[t])]

    with ThreadPoolExecutor(n_threads) as ex:
        got = list(ex.map(work, range(n_threads)))
    for t in range(n_threads):
        for i in range(n_calls):
            np.testing.assert_allclose(got[t][i], expected[t][i], rtol=1e-6, atol=1e-7)


def test_concurrent_python_threads_sdpa(rng):
    fastattn.set_num_threads(2)
    n_threads, n_calls = 4, 10
    inputs = [[(randn(rng, (2, 4, 40 + i, 32)), randn(rng, (2, 2, 50, 32)),
                randn(rng, (2, 2, 50, 16))) for i in range(n_calls)] for _ in range(n_threads)]
    expected = [[sdpa(*qkv, is_causal=True) for qkv in row] for row in inputs]
    start = threading.Barrier(n_threads)

    def work(t):
        start.wait()
        return [sdpa(*qkv, is_causal=True) for qkv in inputs[t]]

    with ThreadPoolExecutor(n_threads) as ex:
        got = list(ex.map(work, range(n_threads)))
    for t in range(n_threads):
        for i in range(n_calls):
            np.testing.assert_allclose(got[t][i], expected[t][i], rtol=1e-6, atol=1e-7)


# ---- fork: GCC's OpenMP runtime cannot start threads in a forked child ----------

FORK_SCRIPT = r"""
import os, sys, warnings
import numpy as np
import fastattn

first_call = sys.argv[1] == "call"
fastattn.set_num_threads(2)
m = fastattn.MultiHeadSelfAttention(64, 8, seed=0)
x = np.random.default_rng(0).standard_normal((2, 64, 64)).astype(np.float32)
want = m(x) if first_call else None
pid = os.fork()
if pid == 0:
    n = fastattn.get_num_threads()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastattn.set_num_threads(2)
    y = m(x)
    ok = want is None or np.allclose(y, want, rtol=1e-5, atol=1e-6)
    print(n, fastattn.get_num_threads(), len(caught),
          caught[0].category.__name__ if caught else "-", ok, flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork on this platform")
@pytest.mark.parametrize("first_call", ["call", "nocall"])
def test_forked_child_runs_single_threaded_after_a_threaded_call(tmp_path, first_call):
    # A child forked after a 2-thread call used to hang in its first call; now it
    # runs on 1 thread (and says so when asked for more).  Before any threaded
    # call the child keeps its count.  A subprocess, so that a hang fails the test.
    import os
    import subprocess
    import sys

    if not fastattn.info()["openmp"]:
        pytest.skip("a build without OpenMP starts no threads")
    script = tmp_path / "fork_child.py"
    script.write_text(FORK_SCRIPT)
    # the fastattn under test, not whichever one the environment installs
    repo = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))
    r = subprocess.run([sys.executable, str(script), first_call], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=repo))
    assert r.returncode == 0, r.stderr
    if first_call == "call":
        assert r.stdout.split() == ["1", "1", "1", "RuntimeWarning", "True"], r.stdout
    else:
        assert r.stdout.split() == ["2", "2", "0", "-", "True"], r.stdout


def test_omp_num_threads_needs_ascii_digits(monkeypatch):
    from fastattn import threads

    cores = threads._resources.usable_cpus()
    for value, want in (("3", 3), ("\u00b2", cores), ("\u0663", cores), ("2,1", 2)):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert threads.default_num_threads() == want, value
