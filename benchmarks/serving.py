"""Serving many sequences at once, timed side by side (interleaved rounds).

    python benchmarks/serving.py [--threads N] [--rounds R] [--seed S]

16 sequences with lengths drawn from 32..2048 (fixed seed), H = 8, E = 64
(D = 512 for the module):

1. Prefill, causal: the packed batch (``varlen_attention``, and the module's
   ``m(x, cu_seqlens=cu)``) against padding every sequence to the longest
   plus ``key_padding_mask`` (the only way before), and against one call per
   sequence (the sum of their times).
2. One decoding step for the 16 sequences, each at its own cache length (the
   lengths above): one call over a cache with per-sequence lengths against 16
   separate calls, one per sequence's own cache.
"""

import argparse

import numpy as np

import fastattn
from fastattn.tools.benchmark import time_interleaved

H, E, D = 8, 64, 512


def _summary(t, base):
    med = {k: float(np.median(v)) for k, v in t.items()}
    low = {k: float(np.min(v)) for k, v in t.items()}
    return med, low, ", ".join(
        f"{k} {1e3 * med[k]:.1f} ms ({med[k] / med[base]:.2f}x {base}'s time; quiet-round "
        f"{low[k] / low[base]:.2f}x)" for k in t)


def prefill(lengths, rounds, threads):
    rng = np.random.default_rng(1)
    n, top, total = len(lengths), int(lengths.max()), int(lengths.sum())
    cu = np.concatenate([[0], np.cumsum(lengths)])
    sdpa = fastattn.scaled_dot_product_attention
    # the function: packed q, k, v (total, H, E)
    q, k, v = (rng.standard_normal((total, H, E), dtype=np.float32) for _ in range(3))
    pad = lambda a: np.stack([np.pad(a[cu[s]:cu[s + 1]], ((0, top - lengths[s]), (0, 0), (0, 0)))  # noqa: E731
                              for s in range(n)]).transpose(0, 2, 1, 3).copy()
    qp, kp, vp = pad(q), pad(k), pad(v)
    keep = (np.arange(top)[None, :] < lengths[:, None])[:, None, None, :]  # True = may attend
    # each sequence's rows of the same packed arrays, as views
    per = [tuple(a[cu[s]:cu[s + 1]].transpose(1, 0, 2) for a in (q, k, v)) for s in range(n)]
    t = time_interleaved({
        "packed": lambda: fastattn.varlen_attention(q, k, v, cu, is_causal=True),
        "padded": lambda: sdpa(qp, kp, vp, keep, is_causal=True),
        "one call each": lambda: [sdpa(*p, is_causal=True) for p in per],
    }, rounds, 0.05)
    _, _, line = _summary(t, "packed")
    print(f"prefill, attention core (varlen_attention), {threads} threads: {line}")
    # the module
    m = fastattn.MultiHeadSelfAttention(D, H, seed=0)
    x = rng.standard_normal((total, D), dtype=np.float32)
    xp = np.stack([np.pad(x[cu[s]:cu[s + 1]], ((0, top - lengths[s]), (0, 0)))
                   for s in range(n)])
    padding = np.arange(top)[None, :] >= lengths[:, None]  # True = padding (torch's sense)
    xs = [x[None, cu[s]:cu[s + 1]].copy() for s in range(n)]
    t = time_interleaved({
        "packed": lambda: m(x, cu_seqlens=cu, is_causal=True),
        "padded": lambda: m(xp, key_padding_mask=padding, is_causal=True),
        "one call each": lambda: [m(a, is_causal=True) for a in xs],
    }, rounds, 0.05)
    _, _, line = _summary(t, "packed")
    print(f"prefill, module forward (m(x, cu_seqlens=cu)), {threads} threads: {line}")


def decode(lengths, rounds, threads):
    rng = np.random.default_rng(2)
    n = len(lengths)
    m = fastattn.MultiHeadSelfAttention(D, H, seed=0)
    top = int(lengths.max())
    prompts = np.zeros((n, top, D), np.float32)
    for s in range(n):
        prompts[s, :lengths[s]] = rng.standard_normal((lengths[s], D), dtype=np.float32)
    together = m.new_cache(n, top + 1)
    m(prompts, cache=together, lengths=lengths)
    apart = []
    for s in range(n):
        c = m.new_cache(1, int(lengths[s]) + 1)
        m(prompts[s:s + 1, :lengths[s]], cache=c)
        apart.append(c)
    x = rng.standard_normal((n, 1, D), dtype=np.float32)
    out = {}

    def one_call():
        out["together"] = m(x, cache=together)
        together._truncate(lengths)  # every round decodes the same positions again

    def separate():
        out["apart"] = [m(x[s:s + 1], cache=c) for s, c in enumerate(apart)]
        for s, c in enumerate(apart):
            c._truncate(int(lengths[s]))

    t = time_interleaved({"one call": one_call, "16 calls": separate}, rounds, 0.05)
    err = max(float(np.abs(out["together"][s] - out["apart"][s][0]).max()) for s in range(n))
    med, low, line = _summary(t, "one call")
    print(f"decode step, {n} sequences at their own lengths, {threads} threads: {line}; "
          f"16 calls / one call = {med['16 calls'] / med['one call']:.2f}x (quiet-round "
          f"{low['16 calls'] / low['one call']:.2f}x); outputs agree to {err:.1e}")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=fastattn.get_num_threads())
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    fastattn.set_num_threads(args.threads)
    lengths = np.random.default_rng(args.seed).integers(32, 2049, 16)
    print(f"lengths: {sorted(lengths.tolist())} (total {lengths.sum()}, padded "
          f"{len(lengths) * lengths.max()})")
    prefill(lengths, args.rounds, args.threads)
    decode(lengths, args.rounds, args.threads)


if __name__ == "__main__":
    main()
