"""Independent float64 NumPy reference implementations.

Written to be obviously correct rather than fast: everything is computed in
float64 with whole-matrix operations, no blocking, no online softmax.

Contract being modelled (see the fastattn API):

* scores = (q @ k^T) * scale, scale defaults to 1/sqrt(E)
* grouped-query attention: query head h uses kv head h // (H // Hkv)
  (== np.repeat of the kv heads along the head axis)
* bool attn_mask: True = MAY attend; float attn_mask: ADDED to the scaled scores
* is_causal: query i may attend key j iff j <= i + (Lk - Lq)  (bottom-right)
* a query row with every key masked out gives all-zero weights and output
* a masked key (bool False, float -inf, outside the causal band) contributes
  nothing to a query, even a NaN or an inf in its key or value; a key the masks
  let a query attend passes its NaN/inf on, whatever its weight
"""
import numpy as np


def ref_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """Return (out, weights) in float64.

    q: (..., H, Lq, E), k: (..., Hkv, Lk, E), v: (..., Hkv, Lk, Ev)
    out: (..., H, Lq, Ev), weights: (..., H, Lq, Lk)
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    H, Lq, E = q.shape[-3:]
    Hkv, Lk = k.shape[-3], k.shape[-2]
    assert H % Hkv == 0
    group = H // Hkv

    # kv head j is repeated `group` times in a row -> query head h sees kv head h // group
    k = np.repeat(k, group, axis=-3)
    v = np.repeat(v, group, axis=-3)

    if scale is None:
        scale = 1.0 / np.sqrt(E)
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * scale  # (..., H, Lq, Lk)

    allowed = np.ones(scores.shape, dtype=bool)
    if attn_mask is not None:
        m = np.asarray(attn_mask)
        if m.dtype == np.bool_:
            allowed &= np.broadcast_to(m, scores.shape)
        else:
            fm = np.broadcast_to(m.astype(np.float64), scores.shape)
            allowed &= fm != -np.inf
            scores = scores + fm
    if is_causal:
        i = np.arange(Lq)[:, None]
        j = np.arange(Lk)[None, :]
        allowed &= j <= i + (Lk - Lq)
    scores = np.where(allowed, scores, -np.inf)

    weights = np.zeros(scores.shape, dtype=np.float64)
    if Lk > 0 and Lq > 0:
        dead = np.all(scores == -np.inf, axis=-1, keepdims=True)  # fully masked rows
        rowmax = np.where(dead, 0.0, np.max(scores, axis=-1, keepdims=True))
        e = np.exp(scores - rowmax)  # exp(-inf) == 0 for masked keys
        denom = np.sum(e, axis=-1, keepdims=True)
        weights = np.where(dead, 0.0, e / np.where(dead, 1.0, denom))
    # (..., H, Lq, Ev); zeros when Lk == 0.  Values holding a NaN or an inf are
    # added apart, to the queries allowed to attend them: in the matmul,
    # 0 * NaN would reach every query.
    bad = ~np.isfinite(v).all(axis=-1)  # (..., H, Lk)
    out = np.matmul(weights, np.where(bad[..., None], 0.0, v))
    if bad.any():
        w_seen = np.where(allowed, weights, 0.0)
        for j in np.flatnonzero(bad.any(axis=tuple(range(bad.ndim - 1)))):
            vj = v[..., j:j + 1, :]  # (..., H, 1, Ev)
            hit = allowed[..., :, j:j + 1] & bad[..., None, j:j + 1]  # (..., H, Lq, 1)
            out = out + np.where(hit, w_seen[..., :, j:j + 1] * vj, 0.0)
    return out, weights


PARAM_NAMES = ("w_q", "w_k", "w_v", "w_o", "b_q", "b_k", "b_v", "b_o")


def params_of(module):
    """The module's weights as a dict of float64 arrays (None for absent biases)."""
    out = {}
    for name in PARAM_NAMES:
        val = getattr(module, name)
        out[name] = None if val is None else np.asarray(val, dtype=np.float64)
    return out


def combine_masks(attn_mask, key_padding_mask):
    """Fold a (B, N) key_padding_mask (True = ignore) into attn_mask semantics."""
    mask = None if attn_mask is None else np.asarray(attn_mask)
    if key_padding_mask is None:
        return mask
    keep = ~np.asarray(key_padding_mask, dtype=bool)[:, None, None, :]  # (B, 1, 1, N)
    if mask is None:
        return keep
    if mask.dtype == np.bool_:
        return mask & keep
    return mask.astype(np.float64) + np.where(keep, 0.0, -np.inf)


def ref_mhsa(x, params, num_heads, num_kv_heads=None, attn_mask=None,
             key_padding_mask=None, is_causal=False):
    """Reference multi-head self-attention forward.

    x: (B, N, D) or (N, D); params: dict with w_q, w_k, w_v, w_o (out, in) and
    b_q, b_k, b_v, b_o (or None).  Returns (y, per_head_weights) where y has the
    shape of x and per_head_weights is (B, H, N, N) (or (H, N, N) unbatched).
    """
    x = np.asarray(x, dtype=np.float64)
    unbatched = x.ndim == 2
    if unbatched:
        x = x[None]
    B, N, D = x.shape
    H = num_heads
    Hkv = H if num_kv_heads is None else num_kv_heads
    hd = D // H

    def linear(inp, w, b):
        y = inp @ np.asarray(w, np.float64).T
        if b is not None:
            y = y + np.asarray(b, np.float64)
        return y

    q = linear(x, params["w_q"], params["b_q"]).reshape(B, N, H, hd).transpose(0, 2, 1, 3)
    k = linear(x, params["w_k"], params["b_k"]).reshape(B, N, Hkv, hd).transpose(0, 2, 1, 3)
    v = linear(x, params["w_v"], params["b_v"]).reshape(B, N, Hkv, hd).transpose(0, 2, 1, 3)

    mask = combine_masks(attn_mask, key_padding_mask)
    out, w = ref_sdpa(q, k, v, attn_mask=mask, is_causal=is_causal)
    out = out.transpose(0, 2, 1, 3).reshape(B, N, D)
    y = linear(out, params["w_o"], params["b_o"])
    if unbatched:
        return y[0], w[0]
    return y, w


def positional_bias(Lq, Lk, H=1, window=None, slopes=None):
    """(H, Lq, Lk) float64 additive bias for windows and ALiBi.

    Query i sits at key position i' = i + (Lk - Lq); -inf outside
    i' - left <= j <= i' + right (None = unbounded side), and
    -slope_h * |j - i'| for ALiBi slopes.
    """
    i = np.arange(Lq)[:, None] + (Lk - Lq)
    j = np.arange(Lk)[None, :]
    bias = np.zeros((H, Lq, Lk))
    if window is not None:
        left, right = window
        ok = np.ones((Lq, Lk), bool)
        far = 2 * (Lq + Lk)  # any longer side is unbounded (and keeps int64 safe)
        if left is not None:
            ok &= j >= i - min(left, far)
        if right is not None:
            ok &= j <= i + min(right, far)
        bias[:, ~ok] = -np.inf
    if slopes is not None:
        bias = bias - np.asarray(slopes)[:, None, None] * np.abs(j - i)[None]
    return bias
