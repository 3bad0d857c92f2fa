"""Soak: many Python threads share modules while their weights are reloaded.

    python benchmarks/soak.py [--seconds 60] [--threads 8]

Three kinds of worker share two modules for the given time:

* plain and masked calls on module A, whose weights another worker keeps
  switching between two state dicts: every output must equal the output of
  one state or the other, never a mix (one weight set per call);
* step-by-step decoding, each worker with its own KV cache, on module B,
  whose weights a worker keeps reloading with the same values (the reload
  path runs, the expected outputs stay put): the steps must equal B's full
  causal forward.

It prints calls per second per kind, the process's resident memory at the
start and at the end, and every mismatch; the exit status is 1 if any output
was wrong.
"""

import argparse
import os
import sys
import threading
import time

import numpy as np

import fastattn


def rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=8, help="Python threads in all (>= 4)")
    args = ap.parse_args(argv)
    if args.threads < 4:
        ap.error("--threads: at least 4 (one per kind of worker)")

    rng = np.random.default_rng(0)
    D, H, Hkv, N = 128, 8, 4, 40
    mod_a = fastattn.MultiHeadSelfAttention(D, H, num_kv_heads=Hkv, seed=1)
    state_1 = mod_a.state_dict()
    state_2 = fastattn.MultiHeadSelfAttention(D, H, num_kv_heads=Hkv, seed=2).state_dict()
    x = rng.standard_normal((2, N, D), dtype=np.float32)
    pad = np.zeros((2, N), bool)
    pad[1, N - 7:] = True
    calls = {
        "plain": lambda: mod_a(x),
        "masked": lambda: mod_a(x, key_padding_mask=pad, is_causal=True),
    }
    expected = {}
    for state in (state_1, state_2):
        mod_a.load_state_dict(state)
        for name, call in calls.items():
            expected.setdefault(name, []).append(call())

    mod_b = fastattn.MultiHeadSelfAttention(D, H, seed=3)
    state_b = mod_b.state_dict()
    seq = rng.standard_normal((1, 24, D), dtype=np.float32)
    want_decode = mod_b(seq, is_causal=True)

    stop = time.monotonic() + args.seconds
    counts, errors = {}, []
    lock = threading.Lock()

    def record(kind, n, err=None):
        with lock:
            counts[kind] = counts.get(kind, 0) + n
            if err:
                errors.append(err)

    def caller(name):
        n = 0
        while time.monotonic() < stop:
            y = calls[name]()
            if not any(np.array_equal(y, e) for e in expected[name]):
                record(name, 0, f"{name}: output matches neither weight set "
                                f"(max diffs {[float(np.abs(y - e).max()) for e in expected[name]]})")
            n += 1
        record(name, n)

    def decoder():
        n = 0
        while time.monotonic() < stop:
            cache = mod_b.new_cache(1, seq.shape[1])
            steps = [mod_b(seq[:, :8], cache=cache)]
            steps += [mod_b(seq[:, i:i + 1], cache=cache) for i in range(8, seq.shape[1])]
            got = np.concatenate(steps, axis=1)
            if not np.allclose(got, want_decode, rtol=2e-5, atol=2e-5):
                record("decode", 0, f"decode: steps differ from the full forward by "
                                    f"{float(np.abs(got - want_decode).max())}")
            n += 1 + seq.shape[1] - 8
        record("decode", n)

    def reloader():
        n = 0
        while time.monotonic() < stop:
            mod_a.load_state_dict(state_2 if n % 2 else state_1)
            mod_b.load_state_dict(state_b)
            n += 1
            time.sleep(0.001)
        record("reload", n)

    workers = [reloader]
    kinds = [lambda: caller("plain"), lambda: caller("masked"), decoder]
    workers += [kinds[i % len(kinds)] for i in range(args.threads - 1)]
    rss0 = rss_mib()
    t0 = time.monotonic()
    threads = [threading.Thread(target=w) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    rss1 = rss_mib()

    print(f"soak: {args.threads} Python threads, {wall:.1f} s, fastattn threads "
          f"{fastattn.get_num_threads()}, kernels {fastattn.info()['kernel_isa']}")
    for kind in ("plain", "masked", "decode", "reload"):
        print(f"  {kind:>7}: {counts.get(kind, 0):8d} calls  {counts.get(kind, 0) / wall:9.1f} /s")
    print(f"  RSS: {rss0:.1f} MiB at start, {rss1:.1f} MiB at end")
    print(f"  mismatches: {len(errors)}")
    for err in errors[:10]:
        print("   ", err)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
