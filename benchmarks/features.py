"""Decode steps over a KV cache and sliding-window attention, timed side by side.

    python benchmarks/features.py [--threads N] [--rounds R]

1. One decoding step (B=1, D=512, H=8) at cache lengths 1k, 4k and 16k:
   fastattn's module step (projections + cache append + attention), fastattn's
   attention core for that step, and torch's F.scaled_dot_product_attention on
   the same step (when torch is installed).
2. Attention at N = 16384 (B=1, H=8, E=64): full causal against a causal
   sliding window of 256, showing the O(N x window) cost.
3. One decoding step over 16384 cached positions (B=1, D=512, H=8) with the
   cache in float32, bfloat16 and float16 (the same float32 module): decoding
   reads the whole cache once per token, so half the bytes should show.
4. What the decoder settings cost, at the bench presets bert (8, 512, 768, 12)
   and long (1, 4096, 512, 8): the causal forward with and without rotary
   embeddings (same weights), and the causal attention core (SDPA) with and
   without soft-capping, with sinks, with the log-sum-exp returned.

Run one part with --part decode|window|cache|decoder.
"""

import argparse

import numpy as np

import fastattn
from fastattn.tools.benchmark import time_interleaved


def decode_steps(lengths, rounds, threads):
    D, H = 512, 8
    E = D // H
    rng = np.random.default_rng(0)
    m = fastattn.MultiHeadSelfAttention(D, H, seed=0)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    print(f"decode step, B=1, D={D}, H={H}, {threads} threads: median ms")
    print(f"{'cache length':>12} {'module step':>12} {'fastattn core':>14} {'torch sdpa':>11}")
    for L in lengths:
        cache = m.new_cache(1, L + 1)
        m(rng.standard_normal((1, L, D), dtype=np.float32), cache=cache)  # fill L positions
        x = rng.standard_normal((1, 1, D), dtype=np.float32)

        def step():
            m(x, cache=cache)
            cache._length -= 1  # undo the append: every round decodes position L again

        q = rng.standard_normal((1, H, 1, E), dtype=np.float32)
        k, v = cache.keys()[:, :, :L], cache.values()[:, :, :L]
        kc, vc = np.ascontiguousarray(k), np.ascontiguousarray(v)
        impls = {"step": step,
                 "core": lambda: fastattn.scaled_dot_product_attention(q, kc, vc)}
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(a) for a in (q, kc, vc))

            def torch_step():
                with torch.inference_mode():
                    return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

            ref = fastattn.scaled_dot_product_attention(q, kc, vc)
            np.testing.assert_allclose(torch_step().numpy(), ref, rtol=1e-4, atol=1e-5)
            impls["torch"] = torch_step
        t = time_interleaved(impls, rounds, 0.05)
        med = {k_: 1e3 * float(np.median(v_)) for k_, v_ in t.items()}
        tt = f"{med['torch']:11.3f}" if "torch" in med else f"{'-':>11}"
        print(f"{L:>12} {med['step']:12.3f} {med['core']:14.3f} {tt}")


def window_cost(rounds, threads, N=16384, window=256):
    H, E = 8, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, H, N, E), dtype=np.float32) for _ in range(3))
    full = lambda: fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    local = lambda: fastattn.scaled_dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, window=(window, 0))
    t = time_interleaved({"full": full, "window": local}, rounds, 0.05)
    tf, tw = (1e3 * float(np.median(t[n])) for n in ("full", "window"))
    print(f"\nN={N}, H={H}, E={E}, causal, {threads} threads: full {tf:.1f} ms, "
          f"window (left={window}) {tw:.1f} ms: {tf / tw:.1f}x faster "
          f"(keys attended per query: {(N + 1) / 2:.0f} vs {window + 1})")


def cache_dtypes(rounds, threads, L=16384):
    D, H = 512, 8
    rng = np.random.default_rng(0)
    m = fastattn.MultiHeadSelfAttention(D, H, seed=0)
    prompt = rng.standard_normal((1, L, D), dtype=np.float32)
    x = rng.standard_normal((1, 1, D), dtype=np.float32)
    impls, outs = {}, {}
    for dt in ("float32", "bfloat16", "float16"):
        cache = m.new_cache(1, L + 1, dtype=dt)
        m(prompt, cache=cache)

        def step(cache=cache, dt=dt):
            outs[dt] = m(x, cache=cache)
            cache._length -= 1  # undo the append: every round decodes position L again

        impls[dt] = step
    t = time_interleaved(impls, rounds, 0.05)
    med = {k: 1e3 * float(np.median(v)) for k, v in t.items()}
    err = float(np.abs(outs["bfloat16"] - outs["float32"]).max() / np.abs(outs["float32"]).max())
    print(f"\ndecode step over {L} cached positions, B=1, D={D}, H={H}, {threads} threads: "
          + ", ".join(f"{k} cache {v:.3f} ms" for k, v in med.items())
          + f"; bfloat16 {med['float32'] / med['bfloat16']:.2f}x, float16 "
          f"{med['float32'] / med['float16']:.2f}x the float32 cache's speed "
          f"(bfloat16 output within {err:.1e} of float32's, relative)")


def _cost_line(label, t, base):
    """Median and quiet-round (minimum) overheads of each entry of t over t[base]."""
    med = {k: float(np.median(v)) for k, v in t.items()}
    low = {k: float(np.min(v)) for k, v in t.items()}
    parts = [f"{base} {1e3 * med[base]:.2f} ms"]
    for k in t:
        if k != base:
            parts.append(f"{k} {100 * (med[k] / med[base] - 1):+.1f}% "
                         f"(min {100 * (low[k] / low[base] - 1):+.1f}%)")
    print(f"{label:<34} " + ", ".join(parts))


def decoder_costs(rounds, threads):
    print(f"\ndecoder settings, {threads} threads: median over {rounds} interleaved rounds, "
          f"overhead against the plain run")
    rng = np.random.default_rng(0)
    for name, (B, N, D, H) in (("bert", (8, 512, 768, 12)), ("long", (1, 4096, 512, 8))):
        E = D // H
        plain = fastattn.MultiHeadSelfAttention(D, H, seed=0)
        rope = fastattn.MultiHeadSelfAttention(D, H, seed=0, rotary=fastattn.Rotary(E))
        rope.load_state_dict(plain.state_dict())
        x = rng.standard_normal((B, N, D), dtype=np.float32)
        t = time_interleaved({"forward": lambda: plain(x, is_causal=True),
                              "rotary": lambda: rope(x, is_causal=True)}, rounds, 0.05)
        _cost_line(f"{name} causal forward", t, "forward")
        q, k, v = (rng.standard_normal((B, H, N, E), dtype=np.float32) for _ in range(3))
        sinks = rng.standard_normal(H)
        sdpa = fastattn.scaled_dot_product_attention
        t = time_interleaved({
            "core": lambda: sdpa(q, k, v, is_causal=True),
            "softcap": lambda: sdpa(q, k, v, is_causal=True, softcap=30.0),
            "sinks": lambda: sdpa(q, k, v, is_causal=True, sinks=sinks),
            "lse": lambda: sdpa(q, k, v, is_causal=True, return_lse=True),
        }, rounds, 0.05)
        _cost_line(f"{name} causal core (SDPA)", t, "core")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=fastattn.get_num_threads())
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--part", choices=("decode", "window", "cache", "decoder"), default=None)
    args = p.parse_args()
    fastattn.set_num_threads(args.threads)
    if args.part in (None, "decode"):
        decode_steps((1024, 4096, 16384), args.rounds, args.threads)
    if args.part in (None, "window"):
        window_cost(max(3, args.rounds // 2), args.threads)
    if args.part in (None, "cache"):
        cache_dtypes(args.rounds, args.threads)
    if args.part in (None, "decoder"):
        decoder_costs(args.rounds, args.threads)


if __name__ == "__main__":
    main()
