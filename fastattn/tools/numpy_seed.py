"""The seed's forward pass written in plain NumPy, as a user would write it.

This is the comparison the command line's ``demo`` (and the benchmarks) time
fastattn against: project, split heads, ``Q K^T / sqrt(d_k)``, softmax,
weighted sum of V, merge heads, output projection.  It materialises the
(B, H, N, N) scores, like the PyTorch class it transcribes.  The tests keep
their own float64 reference in ``tests/``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["mhsa_numpy", "sdpa_numpy"]


def sdpa_numpy(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """softmax(q k^T / sqrt(E)) v over (..., H, L, E) arrays, in their dtype."""
    scale = q.dtype.type(1.0 / math.sqrt(q.shape[-1]))  # a float64 scalar would upcast
    scores = (q @ np.swapaxes(k, -1, -2)) * scale
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores @ v


def mhsa_numpy(module, x: np.ndarray) -> np.ndarray:
    """The seed's MultiHeadSelfAttention.forward with ``module``'s weights.

    Supports modules with num_kv_heads == num_heads (the seed's class has no
    grouped-query attention).
    """
    if module.num_kv_heads != module.num_heads:
        raise ValueError("mhsa_numpy follows the seed's class: num_kv_heads must equal num_heads")
    B, N, D = x.shape
    H, E = module.num_heads, module.head_dim

    def linear(inp, w, b):
        y = inp @ w.T
        return y if b is None else y + b

    def split(t):
        return t.reshape(B, N, H, E).transpose(0, 2, 1, 3)

    q = split(linear(x, module.w_q, module.b_q))
    k = split(linear(x, module.w_k, module.b_k))
    v = split(linear(x, module.w_v, module.b_v))
    out = sdpa_numpy(q, k, v).transpose(0, 2, 1, 3).reshape(B, N, D)
    return linear(out, module.w_o, module.b_o)
