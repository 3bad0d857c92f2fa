"""Shared state under threads and fork: the module's weights, its locks and a KVCache.

* A call computes with the weights of one moment, even when they change while
  it runs (another thread's load_state_dict between its projections).
* The parameter arrays handed out cannot be made writable, nor can their bases.
* A process forked while another thread held one of fastattn's locks (a
  weight change, a cache in use, a dask task starting) does not hang.  These
  run in a child process with a timeout, so that a hang fails the test.
* A KVCache is used by one call at a time: a second call finds it in use and
  raises RuntimeError; no append is ever lost.
* MultiHeadAttention(kdim != embed_dim)(x, x, x) names key and its shapes.
"""
import copy
import gc
import os
import pathlib
import subprocess
import sys
import threading
import warnings
import weakref

import numpy as np
import pytest

import fastattn
import fastattn.modules as modules
from fastattn import MultiHeadAttention, MultiHeadSelfAttention

from _util import assert_msg
from reference import params_of, ref_mhsa, ref_sdpa

TOL64 = dict(rtol=1e-11, atol=1e-12)


def ref_cross(m, query, key, value, is_causal=False):
    """float64 forward of m (any kdim/vdim) of query over key and value."""
    p = params_of(m)
    H, Hkv, E = m.num_heads, m.num_kv_heads, m.head_dim
    B, Lq, Lk = query.shape[0], query.shape[1], key.shape[1]

    def heads(x, part, n, L):
        y = np.asarray(x, np.float64) @ p["w_" + part].T + p["b_" + part]
        return y.reshape(B, L, n, E).transpose(0, 2, 1, 3)

    out, _ = ref_sdpa(heads(query, "q", H, Lq), heads(key, "k", Hkv, Lk),
                      heads(value, "v", Hkv, Lk), is_causal=is_causal)
    return out.transpose(0, 2, 1, 3).reshape(B, Lq, H * E) @ p["w_o"].T + p["b_o"]


# ---- one weight set per call ---------------------------------------------------------

def _calls(rng):
    """(name, module factory, call, reference) for each forward path."""
    x = rng.standard_normal((2, 9, 32))
    kx, vx = rng.standard_normal((2, 7, 24)), rng.standard_normal((2, 7, 40))

    def cached(m):
        cache = m.new_cache(2, 9)
        return m(x, cache=cache)

    return [
        ("plain", lambda s: MultiHeadSelfAttention(32, 4, dtype=np.float64, seed=s),
         lambda m: m(x), lambda m: ref_mhsa(x, params_of(m), 4)[0]),
        ("causal", lambda s: MultiHeadSelfAttention(32, 4, dtype=np.float64, seed=s),
         lambda m: m(x, is_causal=True), lambda m: ref_mhsa(x, params_of(m), 4, is_causal=True)[0]),
        ("cache", lambda s: MultiHeadSelfAttention(32, 4, dtype=np.float64, seed=s),
         cached, lambda m: ref_mhsa(x, params_of(m), 4, is_causal=True)[0]),
        ("cross", lambda s: MultiHeadAttention(32, 4, kdim=24, vdim=40, dtype=np.float64, seed=s),
         lambda m: m(x, kx, vx), lambda m: ref_cross(m, x, kx, vx)),
    ]


@pytest.mark.parametrize("which", ["plain", "causal", "cache", "cross"])
def test_weights_changed_during_a_call_do_not_mix_into_it(rng, monkeypatch, which):
    # The weights change between the call's first packed projection and the
    # rest (as another thread's load_state_dict would): the call computes with
    # the old ones throughout, the next call with the new ones.  The call's
    # projections used to read each weight when they got to it (Q/K/V of one
    # state, the output projection of the other).
    _, make, call, ref = next(c for c in _calls(rng) if c[0] == which)
    m, new = make(1), make(2)
    want_old, want_new = ref(m), ref(new)
    real = type(m)._packed_weight
    changed = []

    def pack_then_change(self, *args):
        entry = real(self, *args)
        if not changed:
            changed.append(True)
            self.load_state_dict(new.state_dict())
        return entry

    monkeypatch.setattr(type(m), "_packed_weight", pack_then_change)
    y = call(m)
    assert changed
    np.testing.assert_allclose(y, want_old, **TOL64)
    np.testing.assert_allclose(call(m), want_new, **TOL64)


def test_calls_racing_weight_reloads_each_see_one_weight_set(rng):
    # Real threads: every result is that of one of the two weight sets, bit
    # for bit (the kernels give the same bits whatever the interleaving).
    # (The test above makes the same interleaving happen every time.)
    old = fastattn.get_num_threads()
    fastattn.set_num_threads(1)
    try:
        mods = [MultiHeadSelfAttention(16, 2, seed=s) for s in (1, 2)]
        sds = [m.state_dict() for m in mods]
        x = rng.standard_normal((1, 5, 16)).astype(np.float32)
        wants = [(m(x), m(x, is_causal=True)) for m in mods]
        m = MultiHeadSelfAttention(16, 2, seed=1)
        stop = threading.Event()

        def reload():
            i = 0
            while not stop.is_set():
                i += 1
                m.load_state_dict(sds[i % 2])

        t = threading.Thread(target=reload)
        t.start()
        bad = 0
        try:
            for i in range(400):
                causal = bool(i % 2)
                y = m(x, is_causal=causal)
                bad += not any(np.array_equal(y, w[causal]) for w in wants)
        finally:
            stop.set()
            t.join()
        assert bad == 0, f"{bad} of 400 calls mixed the two weight sets"
    finally:
        fastattn.set_num_threads(old)


# ---- read-only parameters ------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: MultiHeadSelfAttention(16, 2, seed=0),
    lambda: MultiHeadAttention(16, 2, kdim=8, vdim=12, seed=0),
], ids=["fused", "separate"])
def test_parameters_cannot_be_written_through_any_view(rng, make):
    m = make()
    x = rng.standard_normal((1, 4, 16)).astype(np.float32)

    def forward():
        if isinstance(m, MultiHeadAttention):
            return m(x, x[..., :m.kdim], x[..., :m.vdim])
        return m(x)

    before, y0 = m.state_dict(), forward()
    for name in ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o"):
        view = getattr(m, name)
        with pytest.raises(ValueError, match="read-only"):
            view[...] = 0
        a = view
        while isinstance(a, np.ndarray):
            # numpy would allow this on a view of writable memory; then an
            # in-place edit would reach state_dict() but not the packed copy
            with pytest.raises(ValueError, match="WRITEABLE"):
                a.setflags(write=True)
            a = a.base
        assert memoryview(a).readonly, f"{name}: the storage under it is writable"
        view.shape = (-1,)  # a view of its own: the module's parameter keeps its shape
        assert getattr(m, name).shape == before[name].shape
    after = m.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    np.testing.assert_array_equal(forward(), y0)


def test_a_weight_change_frees_the_old_weights(rng):
    m = MultiHeadSelfAttention(32, 4, seed=0)
    x = rng.standard_normal((2, 5, 32)).astype(np.float32)
    m(x)
    old = weakref.ref(m.w_o.base)
    m.w_o = m.w_o * 2
    m(x)
    gc.collect()
    assert old() is None
    np.testing.assert_allclose(m(x), ref_mhsa(x, params_of(m), 4)[0], rtol=2e-5, atol=2e-5)


# ---- KVCache: one call at a time -----------------------------------------------------

def _pause_attention(monkeypatch, holder):
    """Makes the call running in thread ``holder`` wait inside its kernel (after
    its cache append) until the returned event is set; returns (inside, go)."""
    inside, go = threading.Event(), threading.Event()
    real = modules.attention_into

    def paused(*args, **kw):
        if threading.current_thread() is holder[0]:
            inside.set()
            go.wait(10)
        return real(*args, **kw)

    monkeypatch.setattr(modules, "attention_into", paused)
    return inside, go


def test_a_cache_in_use_by_another_call_is_refused(rng, monkeypatch):
    # A second call on a cache another thread's call is using used to append
    # and attend in the middle of that call's (4 threads x 2,000 steps ended
    # at 7,981 positions); now it raises, and the first call is undisturbed.
    m = MultiHeadSelfAttention(16, 2, dtype=np.float64, seed=3)
    x = rng.standard_normal((1, 4, 16))
    full = m(x, is_causal=True)
    cache = m.new_cache(1, 8)
    m(x[:, :2], cache=cache)
    holder = [None]
    inside, go = _pause_attention(monkeypatch, holder)
    got = []
    holder[0] = threading.Thread(target=lambda: got.append(m(x[:, 2:3], cache=cache)))
    holder[0].start()
    try:
        assert inside.wait(10)
        msg = "cache is in use by another call"
        with pytest.raises(RuntimeError, match=msg):
            m(x[:, 3:4], cache=cache)
        k = np.zeros((1, 1, 16))
        with pytest.raises(RuntimeError, match=msg):
            cache.append(k, k)
        with pytest.raises(RuntimeError, match=msg):
            cache.reset()
    finally:
        go.set()
        holder[0].join()
    assert len(cache) == 3
    np.testing.assert_allclose(got[0], full[:, 2:3], **TOL64)
    np.testing.assert_allclose(m(x[:, 3:4], cache=cache), full[:, 3:4], **TOL64)


def test_threads_sharing_a_cache_lose_no_append(rng):
    # Threads decoding into one cache at once: each call either runs or is
    # refused, and the cache holds exactly the positions of the calls that ran
    # (they used to lose some, 7,981 of 8,000 say, and some calls failed in
    # the kernel).  A short switch interval makes the threads' calls interleave.
    old, interval = fastattn.get_num_threads(), sys.getswitchinterval()
    fastattn.set_num_threads(1)
    sys.setswitchinterval(1e-6)
    try:
        m = MultiHeadSelfAttention(16, 2, seed=0)
        steps, n = 2000, 4
        cache = m.new_cache(1, steps * n)
        x = rng.standard_normal((1, 1, 16)).astype(np.float32)
        done, errors = [0] * n, []
        start = threading.Barrier(n)

        def decode(i):
            start.wait()
            for _ in range(steps):
                try:
                    m(x, cache=cache)
                    done[i] += 1
                except RuntimeError as e:
                    if "in use by another call" not in str(e):
                        errors.append(e)
                except BaseException as e:
                    errors.append(e)

        workers = [threading.Thread(target=decode, args=(i,)) for i in range(n)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert not errors, errors[:3]
        assert len(cache) == sum(done) > 0
    finally:
        sys.setswitchinterval(interval)
        fastattn.set_num_threads(old)


def test_a_copied_cache_is_free_and_independent(rng):
    import copy
    import pickle

    m = MultiHeadSelfAttention(16, 2, dtype=np.float64, seed=1)
    x = rng.standard_normal((1, 3, 16))
    cache = m.new_cache(1, 4)
    m(x[:, :2], cache=cache)
    for c in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        np.testing.assert_array_equal(m(x[:, 2:], cache=c), m(x, is_causal=True)[:, 2:])
        assert len(c) == 3 and len(cache) == 2


# ---- fork while another thread holds a lock ------------------------------------------

FORK_SCRIPT = r"""
import os, sys, threading, time, traceback
import numpy as np
import fastattn
import fastattn.modules as modules
from reference import params_of, ref_mhsa

what = sys.argv[1]
fastattn.set_num_threads(1)
m = fastattn.MultiHeadSelfAttention(16, 2, dtype=np.float64, seed=0)
x = np.random.default_rng(0).standard_normal((1, 4, 16))
cache = m.new_cache(1, 8)
held, release = threading.Event(), threading.Event()

def hold():
    if what == "module":        # inside a weight change (or a packing)
        with m._lock:
            held.set()
            release.wait()
    elif what == "cache":       # inside a decoding call, after its append
        m(x[:, :1], cache=cache)

holder = threading.Thread(target=hold)
real = modules.attention_into
def paused(*a, **kw):
    if threading.current_thread() is holder:
        held.set()
        release.wait()
    return real(*a, **kw)
modules.attention_into = paused
holder.start()
held.wait()

pid = os.fork()
if pid == 0:
    try:
        modules.attention_into = real
        y = m(x) if what != "cache" else m(x[:, 1:], cache=cache)
        m.w_o = m.w_o * 2               # takes the module's writer lock
        y2 = m(x)
        want = ref_mhsa(x, params_of(m), 2)[0]
        ok = np.allclose(y2, want, rtol=1e-11, atol=1e-12) and np.isfinite(y).all()
        print("ok" if ok else "wrong", flush=True)
        os._exit(0 if ok else 3)
    except BaseException:
        traceback.print_exc()
        os._exit(4)
release.set()
holder.join()
deadline = time.monotonic() + 15
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    time.sleep(0.02)
os.kill(pid, 9)
os.waitpid(pid, 0)
print("the child hung", flush=True)
sys.exit(5)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
@pytest.mark.parametrize("what", ["module", "cache"])
def test_child_forked_while_another_thread_holds_a_lock_does_not_hang(tmp_path, what):
    # The child's first call (a packing), a weight assignment and a cache
    # call each take a lock that was held, in the parent, by a thread the
    # child does not have.  With threading.Lock the child waited forever.
    script = tmp_path / "fork_lock.py"
    script.write_text(FORK_SCRIPT)
    here = pathlib.Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(pathlib.Path(fastattn.__file__).resolve().parent.parent), str(here)]))
    r = subprocess.run([sys.executable, str(script), what], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["ok"], r.stdout


def test_every_lock_fastattn_makes_is_free_in_a_forked_child():
    from fastattn._locks import ForkSafeLock

    lock = ForkSafeLock()
    assert isinstance(MultiHeadSelfAttention(8, 2)._lock, ForkSafeLock)
    assert isinstance(MultiHeadSelfAttention(8, 2).new_cache(1, 2)._busy, ForkSafeLock)
    # and no other kind of lock is made anywhere in the package
    pkg = pathlib.Path(fastattn.__file__).resolve().parent
    for src in pkg.rglob("*.py"):
        if src.name != "_locks.py":
            text = src.read_text()
            for kind in ("Lock(", "RLock(", "Condition(", "Semaphore("):
                assert f"threading.{kind}" not in text, f"{src.name} makes a threading.{kind}"
    held, release = threading.Event(), threading.Event()

    def hold():
        with lock:
            held.set()
            release.wait()

    t = threading.Thread(target=hold)
    t.start()
    held.wait()
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if lock.acquire(timeout=5) else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        t.join()
    assert os.waitstatus_to_exitcode(status) == 0


# ---- errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("dims, name, width", [(dict(kdim=8), "key", 8),
                                               (dict(vdim=12), "value", 12)])
def test_one_array_three_times_is_checked_against_kdim_and_vdim(rng, dims, name, width):
    # x, x, x used to take the self-attention path (one fused projection)
    # even without a fused weight, and failed inside the kernel
    m = MultiHeadAttention(16, 4, **dims)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    with pytest.raises(ValueError) as e:
        m(x, x, x)
    assert_msg(e, names=(name,), shapes=((2, 5, 16),), numbers=(width,))


def test_cross_attention_names_query_when_given_one_array_three_times(rng):
    # the self-attention shortcut used to name the query argument "x"
    m = fastattn.MultiHeadAttention(16, 4)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    with pytest.raises(ValueError) as exc:
        m(x, x, x)
    assert_msg(exc, names=["query"], shapes=[(2, 5, 8)])


def test_kvcache_append_checks_its_arguments():
    # the public append took anything numpy could broadcast or cast
    m = MultiHeadSelfAttention(16, 2)
    c = m.new_cache(2, 8)
    for bad, error, needle in [
        (np.ones((1, 1, 16)), ValueError, r"k_new must have shape \(2, T, 16\), got \(1, 1, 16\)"),
        (np.ones((2, 1, 15)), ValueError, r"k_new must have shape \(2, T, 16\), got \(2, 1, 15\)"),
        (np.ones((2, 1, 16), np.int64), TypeError, "k_new must be a float32, float64, bfloat16"),
        (np.full((2, 1, 16), "a"), TypeError, "k_new must be a float32, float64, bfloat16"),
    ]:
        with pytest.raises(error, match=needle):
            c.append(bad, bad)
        assert len(c) == 0
    with pytest.raises(ValueError, match="as many positions"):
        c.append(np.ones((2, 2, 16)), np.ones((2, 1, 16)))
    c.append(np.ones((2, 3, 16)), np.zeros((2, 3, 16)))
    assert len(c) == 3 and c.keys().dtype == np.float32


def test_a_shallow_copy_of_a_cache_has_storage_of_its_own(rng):
    # beam search forks a sequence: the branches must not write each other's keys
    m = MultiHeadSelfAttention(16, 2, seed=1)
    x = rng.standard_normal((1, 3, 16)).astype(np.float32)
    c = m.new_cache(1, 8)
    m(x[:, :2], cache=c)
    c2 = copy.copy(c)
    m(x[:, 2:], cache=c2)
    kept = c2.keys().copy()
    m(-x[:, 2:], cache=c)
    np.testing.assert_array_equal(c2.keys(), kept)


def test_a_write_that_ignores_the_read_only_flag_cannot_split_the_module(rng):
    # torch.from_numpy(m.w_o).mul_(2) writes through numpy's flag (torch warns
    # that it is undefined behaviour): it may change what it was handed, never
    # what state_dict, save and the forward use
    torch = pytest.importorskip("torch")
    m = MultiHeadSelfAttention(16, 2, seed=3)
    x = rng.standard_normal((1, 5, 16)).astype(np.float32)
    before, y0 = m.state_dict(), m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(m.w_o).mul_(2)
    after = m.state_dict()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    np.testing.assert_array_equal(m(x), y0)
    np.testing.assert_allclose(y0, ref_mhsa(x, params_of(m), 2)[0], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_a_pickled_cache_carries_its_positions_not_its_unwritten_capacity(rng, dtype):
    import copy
    import pickle

    m = MultiHeadSelfAttention(16, 2, seed=1)
    x = rng.standard_normal((2, 4, 16)).astype(np.float32)
    empty = m.new_cache(2, 100_000, dtype=dtype)
    assert len(pickle.dumps(empty)) < 4096  # 6.4 MB of storage never written
    cache = m.new_cache(2, 50, dtype=dtype)
    m(x[:, :3], cache=cache, lengths=[3, 1])
    for c in (pickle.loads(pickle.dumps(cache)), copy.deepcopy(cache), copy.copy(cache)):
        assert c.capacity == 50 and c.dtype == cache.dtype and c.lengths.tolist() == [3, 1]
        np.testing.assert_array_equal(c.keys()[0], cache.keys()[0])
        np.testing.assert_array_equal(c.values()[1, :, :1], cache.values()[1, :, :1])
        np.testing.assert_array_equal(m(x[:, 3:], cache=c), m(x[:, 3:], cache=copy.copy(cache)))
        assert cache.lengths.tolist() == [3, 1]


def test_a_pickled_ragged_cache_carries_zeros_past_each_length(rng):
    # positions a sequence no longer holds (after reset) keep their old keys
    # and values in storage: a pickle or copy carries zeros there instead
    import copy
    import pickle

    m = MultiHeadSelfAttention(16, 2, seed=1)
    x = rng.standard_normal((2, 4, 16)).astype(np.float32)
    cache = m.new_cache(2, 8)
    m(x[:, :3], cache=cache)
    cache.reset(1)
    m(x[:, 3:], cache=cache, lengths=[0, 1])
    assert cache.lengths.tolist() == [3, 1] and cache.keys()[1, :, 1:].any()
    for c in (pickle.loads(pickle.dumps(cache)), copy.copy(cache)):
        assert not c.keys()[1, :, 1:].any() and not c.values()[1, :, 1:].any()
        np.testing.assert_array_equal(c.keys()[0], cache.keys()[0])
        np.testing.assert_array_equal(c.keys()[1, :, :1], cache.keys()[1, :, :1])
        np.testing.assert_array_equal(m(x[:, 3:], cache=c), m(x[:, 3:], cache=copy.copy(cache)))
