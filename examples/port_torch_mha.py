"""Porting a PyTorch model's attention to fastattn.

A small torch encoder block (nn.MultiheadAttention + LayerNorm + MLP) is
rebuilt with its attention running on fastattn: the weights carry over with
``MultiHeadSelfAttention.from_torch``, the rest stays plain NumPy, and the two
blocks' outputs are compared.  Needs torch (the CPU wheel is enough).

    python examples/port_torch_mha.py [--seq 128] [--dim 256] [--heads 8]

What changes when you port: fastattn modules are batch-first, return one
array unless ``need_weights=True``, and take bool masks as "True = may
attend" (torch's nn.MultiheadAttention uses True = blocked: pass ``~mask``).
"""

import argparse
import time

import numpy as np
import torch

import fastattn


class TorchBlock(torch.nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = torch.nn.LayerNorm(dim)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(approximate="tanh"),
                                       torch.nn.Linear(4 * dim, dim))

    def forward(self, x, blocked):
        # torch's convention: True in attn_mask = may NOT attend
        a, _ = self.attn(self.norm1(x), self.norm1(x), self.norm1(x), attn_mask=blocked,
                         need_weights=False)
        x = x + a
        return x + self.mlp(self.norm2(x))


class NumpyBlock:
    """The same block with fastattn's attention and NumPy for the rest."""

    def __init__(self, block: TorchBlock):
        self.attn = fastattn.MultiHeadSelfAttention.from_torch(block.attn)
        p = {k: v.detach().numpy() for k, v in block.state_dict().items()}
        self.p = p

    def _norm(self, x, name):
        mu = x.mean(-1, keepdims=True)
        var = x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * self.p[name + ".weight"] + self.p[name + ".bias"]

    def __call__(self, x, blocked):
        # fastattn's convention: True = may attend, so the torch mask is inverted
        x = x + self.attn(self._norm(x, "norm1"), attn_mask=~blocked)
        h = self._norm(x, "norm2") @ self.p["mlp.0.weight"].T + self.p["mlp.0.bias"]
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
        return x + h @ self.p["mlp.2.weight"].T + self.p["mlp.2.bias"]


def main():
    ap = argparse.ArgumentParser(description="Port a torch attention block to fastattn.")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    block = TorchBlock(args.dim, args.heads).eval()
    port = NumpyBlock(block)
    x = np.random.default_rng(0).standard_normal((2, args.seq, args.dim), dtype=np.float32)
    blocked = np.triu(np.ones((args.seq, args.seq), bool), 1)  # causal, torch-style
    with torch.inference_mode():
        want = block(torch.from_numpy(x), torch.from_numpy(blocked)).numpy()
    got = port(x, blocked)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"fastattn block against the torch block: max relative difference {err:.1e}")
    assert err < 1e-4, err
    # the attention alone, timed after a warm-up call each
    xa = torch.from_numpy(x)
    tmask = torch.from_numpy(blocked)
    for name, fn in (("torch nn.MultiheadAttention",
                      lambda: block.attn(xa, xa, xa, attn_mask=tmask, need_weights=False)),
                     ("fastattn", lambda: port.attn(x, attn_mask=~blocked))):
        with torch.inference_mode():
            fn()
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
        print(f"{name:>28}: {1e3 * (time.perf_counter() - t0) / 5:.2f} ms per call")


if __name__ == "__main__":
    main()
