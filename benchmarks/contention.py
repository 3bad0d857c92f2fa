"""Latency while other processes keep cores busy: p50/p99 beside torch.

    python benchmarks/contention.py [--calls 400] [--busy 0,1,2]

The small preset's full forward (B=1, N=128, D=512, H=8) at fastattn's
default thread count, and torch.nn.MultiheadAttention on the same weights and
thread count when torch is installed, called one after the other in turns.
For each count of busy processes (pure Python loops, one per core they
occupy), the per-call latencies give the median and the 99th percentile.
A team of OpenMP threads waits for its slowest member, so a core taken by
another process shows in the tail first.
"""

import argparse
import multiprocessing as mp
import sys
import time

import numpy as np

import fastattn
from fastattn.tools.peers import PeerUnavailable, full_peer


def _spin(stop):
    while not stop.is_set():
        for _ in range(10000):
            pass


def _latencies(impls, calls):
    times = {name: [] for name in impls}
    for name, f in impls.items():  # warm-up
        for _ in range(5):
            f()
    for i in range(calls):
        for name, f in impls.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=400, help="timed calls per library and load")
    ap.add_argument("--busy", default="0,1,2", help="comma-separated counts of busy processes")
    args = ap.parse_args(argv)
    try:
        loads = [int(b) for b in args.busy.split(",")]
    except ValueError:
        ap.error(f"--busy: comma-separated ints, got {args.busy!r}")

    nt = fastattn.get_num_threads()
    m = fastattn.MultiHeadSelfAttention(512, 8, seed=0)
    x = np.random.default_rng(0).standard_normal((1, 128, 512), dtype=np.float32)
    impls = {"fastattn": lambda: m(x)}
    try:
        impls["torch"] = full_peer("torch-mha", m, x, nt)
    except PeerUnavailable as exc:
        print(f"(torch left out: {exc})")

    ctx = mp.get_context("spawn")
    print(f"small preset full forward, {nt} threads, {args.calls} calls each: ms")
    print(f"{'busy procs':>10} {'library':>9} {'p50':>8} {'p99':>8} {'max':>8}")
    for busy in loads:
        stop = ctx.Event()
        procs = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
        for p in procs:
            p.start()
        time.sleep(0.5)
        try:
            times = _latencies(impls, args.calls)
        finally:
            stop.set()
            for p in procs:
                p.join()
        for name, t in times.items():
            t = np.array(t) * 1e3
            print(f"{busy:>10} {name:>9} {np.percentile(t, 50):8.3f} "
                  f"{np.percentile(t, 99):8.3f} {t.max():8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
