"""fastattn against NumPy and torch (when installed), timed side by side.

Each implementation runs the same self-attention forward on the same
weights and input; their outputs are checked against each other first.
Rounds are interleaved (every implementation once per round, in a rotating
order, after a short pause so that the previous library's threads go
quiet), and each row reports the median and the spread over the rounds:
a ratio read from a wide spread is noise, run more rounds.

    python examples/benchmark_side_by_side.py [--batch 4] [--seq 256] [--dim 512]
        [--heads 8] [--rounds 7] [--threads N]

For every peer and preset (ONNX Runtime, OpenVINO, bfloat16), use
``python -m fastattn bench``.
"""

import argparse
import time

import numpy as np

import fastattn


def numpy_forward(x, p, heads):
    """The textbook formulation in NumPy: project, split heads, softmax(QK^T/sqrt(d)) V."""
    B, N, D = x.shape
    E = D // heads

    def split(t):
        return t.reshape(B, N, heads, E).transpose(0, 2, 1, 3)

    q, k, v = (split(x @ p[f"w_{n}"].T + p[f"b_{n}"]) for n in "qkv")
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(E)
    s = np.exp(s - s.max(-1, keepdims=True))
    o = (s / s.sum(-1, keepdims=True)) @ v
    return o.transpose(0, 2, 1, 3).reshape(B, N, D) @ p["w_o"].T + p["b_o"]


def main():
    ap = argparse.ArgumentParser(description="fastattn, NumPy and torch, side by side.")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=fastattn.get_num_threads())
    args = ap.parse_args()
    fastattn.set_num_threads(args.threads)
    m = fastattn.MultiHeadSelfAttention(args.dim, args.heads, seed=0)
    p = m.state_dict()
    x = np.random.default_rng(0).standard_normal((args.batch, args.seq, args.dim),
                                                 dtype=np.float32)
    impls = {"fastattn": lambda: m(x), "numpy": lambda: numpy_forward(x, p, args.heads)}
    try:
        import torch

        torch.set_num_threads(args.threads)
        t = m.to_torch()
        tx = torch.from_numpy(x)

        def torch_forward():
            with torch.inference_mode():
                return t(tx, tx, tx, need_weights=False)[0].numpy()

        impls["torch"] = torch_forward
    except ImportError:
        print("(torch is not installed: fastattn against NumPy only)")
    ref = impls["numpy"]()
    for name, fn in impls.items():
        err = float(np.abs(fn() - ref).max() / np.abs(ref).max())
        assert err < 1e-4, (name, err)
    times = {name: [] for name in impls}
    names = list(impls)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(0.05)
            impls[name]()  # untimed: wakes idle cores
            t0 = time.perf_counter()
            impls[name]()
            times[name].append(time.perf_counter() - t0)
    base = float(np.median(times["fastattn"]))
    print(f"(B, N, D, H) = ({args.batch}, {args.seq}, {args.dim}, {args.heads}), "
          f"{args.threads} threads, {args.rounds} interleaved rounds")
    for name in names:
        t = np.array(times[name]) * 1e3
        med = float(np.median(t))
        print(f"{name:>9}: median {med:8.2f} ms, spread {t.min():.2f}-{t.max():.2f} ms, "
              f"{med / (1e3 * base):5.2f}x fastattn's time")


if __name__ == "__main__":
    main()
