"""Memory: thousands of calls settle, and no call allocates more than it says.

* ``test_rss_settles``: 2000 rounds (8000 forward calls: the module with
  weights requested, bool / float / padding masks, causal, per-head weights;
  sdpa with weights, unaligned inputs, few-query split-K decoding; weight
  reloads; errors raised in the middle of each round, caught with
  pytest.raises; a short-lived Python thread now and then, whose per-thread
  workspace must go with it).  VmRSS (``/proc/self/status``) after the second
  half may exceed VmRSS after the first half by less than 4 MiB.
* Reference counts of the arrays passed in do not grow (a leaked reference in
  the Cython layer would show there first).
* A float mask given as a broadcast view is not materialised in full.
"""
import gc
import os
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest

import fastattn

sdpa = fastattn.scaled_dot_product_attention
MHSA = fastattn.MultiHeadSelfAttention

UNDER_ASAN = "asan" in os.environ.get("LD_PRELOAD", "")
rss_test = pytest.mark.skipif(
    not os.path.exists("/proc/self/status") or UNDER_ASAN,
    reason="reads VmRSS from /proc/self/status (Linux); meaningless under AddressSanitizer, "
           "whose quarantine keeps freed memory")


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def unaligned(a):
    buf = bytearray(a.nbytes + 1)
    u = np.frombuffer(buf, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    u[...] = a
    return u


class Workload:
    def __init__(self, tmp_path):
        rng = np.random.default_rng(0)
        f32 = np.float32
        self.m = MHSA(64, 8, num_kv_heads=2, seed=0)
        self.sd = [MHSA(64, 8, num_kv_heads=2, seed=s).state_dict() for s in (1, 2)]
        self.x = rng.standard_normal((2, 48, 64)).astype(f32)
        self.pad = rng.random((2, 48)) < 0.2
        self.bmask = rng.random((48, 48)) < 0.8
        self.qmask = rng.random((40, 50)) < 0.8
        self.fmask = np.where(rng.random((48, 48)) < 0.8, rng.standard_normal((48, 48)), -np.inf)
        self.q = rng.standard_normal((2, 4, 40, 32)).astype(f32)
        self.k = rng.standard_normal((2, 2, 50, 32)).astype(f32)
        self.v = rng.standard_normal((2, 2, 50, 16)).astype(f32)
        self.qu, self.ku, self.vu = unaligned(self.q), unaligned(self.k), unaligned(self.v)
        self.dq = rng.standard_normal((1, 1, 1, 32)).astype(f32)
        self.dk = rng.standard_normal((1, 1, 2048, 32)).astype(f32)
        self.bad_file = tmp_path / "bad.npz"
        self.bad_file.write_bytes(b"PK\x03\x04" + bytes(100))
        self.arrays = [self.x, self.pad, self.bmask, self.fmask, self.q, self.k, self.v,
                       self.qu, self.dq, self.dk]

    def round(self, i):
        m = self.m
        y, w = m(self.x, attn_mask=self.bmask, key_padding_mask=self.pad, need_weights=True)
        y, w = m(self.x, attn_mask=self.fmask, is_causal=True, need_weights=True,
                 average_attn_weights=False)
        sdpa(self.q, self.k, self.v, self.qmask, need_weights=True)
        sdpa(self.qu, self.ku, self.vu, is_causal=True)
        sdpa(self.dq, self.dk, self.dk)  # split-K decoding
        with pytest.raises(ValueError):
            m(self.x[..., :-1])
        with pytest.raises(ValueError):
            m(self.x, attn_mask=np.ones((3, 4), bool))
        with pytest.raises(TypeError):
            m(self.x, key_padding_mask=self.pad.astype(int))
        with pytest.raises(ValueError):
            sdpa(self.q, self.k[..., :-1], self.v)
        with pytest.raises(ValueError):
            m.load_state_dict({**self.sd[0], "w_q": np.zeros((3, 3), np.float32)})
        if i % 10 == 0:
            with pytest.raises(ValueError):
                MHSA.load(self.bad_file)
            m.load_state_dict(self.sd[(i // 10) % 2])
        if i % 50 == 0:
            # a short-lived thread: its workspace (thread-local buffers) must go with it
            t = threading.Thread(target=lambda: m(self.x[:1]))
            t.start()
            t.join()


@rss_test
def test_rss_settles(tmp_path):
    w = Workload(tmp_path)
    refs = [sys.getrefcount(a) for a in w.arrays]
    for i in range(200):  # warm up: workspaces, allocator arenas, thread pool
        w.round(i)
    gc.collect()
    t0 = time.perf_counter()
    r0 = rss_bytes()
    for i in range(1000):
        w.round(i)
    gc.collect()
    r1 = rss_bytes()
    for i in range(1000, 2000):
        w.round(i)
    gc.collect()
    r2 = rss_bytes()
    elapsed = time.perf_counter() - t0
    mib = 1 << 20
    assert r2 - r1 < 4 * mib, (
        f"RSS grew by {(r2 - r1) / mib:.1f} MiB over the second 1000 rounds "
        f"(first 1000: {(r1 - r0) / mib:+.1f} MiB; {elapsed:.1f} s)")
    assert [sys.getrefcount(a) for a in w.arrays] == refs, "references to the inputs leaked"


@rss_test
def test_many_short_lived_threads_release_workspaces():
    """Each calling thread gets scratch buffers; they must be freed with the thread."""
    m = MHSA(256, 8, seed=0)
    x = np.random.default_rng(1).standard_normal((4, 256, 256)).astype(np.float32)  # ~3 MiB of scratch

    def one():
        m(x)

    def short_lived_threads(n):
        for _ in range(n):
            t = threading.Thread(target=one)
            t.start()
            t.join()
        gc.collect()
        return rss_bytes()

    r1 = short_lived_threads(10)
    r2 = short_lived_threads(60)
    assert r2 - r1 < 16 << 20, f"RSS grew by {(r2 - r1) / 2**20:.1f} MiB over 60 threads"


def _traced_peak(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_broadcast_float32_mask_is_not_materialised():
    q = np.random.default_rng(2).standard_normal((8, 8, 256, 16)).astype(np.float32)
    mask = np.broadcast_to(np.zeros((256, 256), np.float32), (8, 8, 256, 256))  # 16 MiB if copied
    peak = _traced_peak(lambda: sdpa(q, q, q, mask))
    assert peak < q.nbytes + (4 << 20), f"traced {peak / 2**20:.1f} MiB"


# Regression test (bug found, fixed since): BUG: prepare_mask casts a float attn_mask to the inputs' dtype (astype) and copies  an unaligned one (np.require) as the caller passed it: a mask the ...
@pytest.mark.parametrize("kind", ["float64", "unaligned-float32"])
def test_broadcast_mask_cast_is_not_materialised(kind):
    q = np.random.default_rng(2).standard_normal((8, 8, 256, 16)).astype(np.float32)
    base = np.zeros((256, 256), np.float64 if kind == "float64" else np.float32)
    if kind != "float64":
        base = unaligned(base)
    mask = np.broadcast_to(base, (8, 8, 256, 256))
    peak = _traced_peak(lambda: sdpa(q, q, q, mask))
    assert peak < q.nbytes + (4 << 20), f"traced {peak / 2**20:.1f} MiB"
