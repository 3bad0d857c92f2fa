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
* softcap c: scores become c * tanh(scores / c), after the scale and before
  any mask is added
* sinks (one logit per query head): an extra column in each softmax row that
  takes weight but has no value (GPT-OSS): denominators gain exp(sink)
* rotary (RoPE): see rope_inv_freq / ref_rotary; a self-attention window
  (left, right) lets query i see keys i-left .. i+right
"""
import numpy as np


def ref_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, *, softcap=None,
             sinks=None):
    """Return (out, weights) in float64.

    q: (..., H, Lq, E), k: (..., Hkv, Lk, E), v: (..., Hkv, Lk, Ev)
    out: (..., H, Lq, Ev), weights: (..., H, Lq, Lk)
    softcap: None or c > 0 (scores -> c * tanh(scores / c), before the masks)
    sinks: None or (H,) logits, one softmax column each that holds no value;
    the weights returned leave it out, so a row sums to less than one.
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
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)

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
        if sinks is not None:
            # the sink is one more logit in the row: it joins the max and the sum
            sink = np.asarray(sinks, np.float64).reshape(H, 1, 1)
            rowmax = np.where(dead, sink, np.maximum(rowmax, sink))
        e = np.exp(scores - rowmax)  # exp(-inf) == 0 for masked keys
        denom = np.sum(e, axis=-1, keepdims=True)
        if sinks is not None:
            denom = denom + np.exp(sink - rowmax)
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
             key_padding_mask=None, is_causal=False, *, head_dim=None, rotary=None,
             positions=None, scale=None, softcap=None, sinks=None, window=None):
    """Reference multi-head self-attention forward.

    x: (B, N, D) or (N, D); params: dict with w_q, w_k, w_v, w_o (out, in) and
    b_q, b_k, b_v, b_o (or None).  Returns (y, per_head_weights) where y has the
    shape of x and per_head_weights is (B, H, N, N) (or (H, N, N) unbatched).

    The keyword-only extras model decoder attention (Llama, Gemma2, GPT-OSS):

    * head_dim: per-head width E (default D // H); w_q is (H*E, D), w_o (D, H*E)
    * rotary: None or a dict with ``dim`` and optionally ``theta``,
      ``interleaved``, ``scaling`` (the arguments of ref_rotary), applied to q
      and k after their projections at ``positions`` ((N,) or (B, N), default
      0..N-1)
    * scale, softcap, sinks: as ref_sdpa (sinks default to params["sinks"])
    * window: (left, right) or None: query i sees keys i-left .. i+right (None
      for an unbounded side), on top of the other masks
    """
    x = np.asarray(x, dtype=np.float64)
    unbatched = x.ndim == 2
    if unbatched:
        x = x[None]
    B, N, D = x.shape
    H = num_heads
    Hkv = H if num_kv_heads is None else num_kv_heads
    hd = D // H if head_dim is None else head_dim

    def linear(inp, w, b):
        y = inp @ np.asarray(w, np.float64).T
        if b is not None:
            y = y + np.asarray(b, np.float64)
        return y

    q = linear(x, params["w_q"], params["b_q"]).reshape(B, N, H, hd).transpose(0, 2, 1, 3)
    k = linear(x, params["w_k"], params["b_k"]).reshape(B, N, Hkv, hd).transpose(0, 2, 1, 3)
    v = linear(x, params["w_v"], params["b_v"]).reshape(B, N, Hkv, hd).transpose(0, 2, 1, 3)

    if rotary is not None:
        pos = np.arange(N) if positions is None else np.asarray(positions)
        if pos.ndim == 2:  # (B, N): one row of positions per sequence, shared by the heads
            pos = pos[:, None, :]
        q = ref_rotary(q, pos, **rotary)
        k = ref_rotary(k, pos, **rotary)

    mask = combine_masks(attn_mask, key_padding_mask)
    if window is not None:
        band = positional_bias(N, N, 1, window)[0]  # (N, N), -inf outside the band
        if mask is None:
            mask = band
        elif mask.dtype == np.bool_:
            mask = mask & (band == 0)
        else:
            mask = mask.astype(np.float64) + band
    if sinks is None:
        sinks = params.get("sinks")
    out, w = ref_sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                      softcap=softcap, sinks=sinks)
    out = out.transpose(0, 2, 1, 3).reshape(B, N, H * hd)
    y = linear(out, params["w_o"], params["b_o"])
    if unbatched:
        return y[0], w[0]
    return y, w


def rope_inv_freq(dim, theta=10000.0, scaling=None):
    """(inv_freq (dim // 2,), attention_factor) of rotary embeddings, float64.

    Pair i turns by the angle position * inv_freq[i]; unscaled,
    inv_freq[i] = theta ** (-2i / dim).  ``scaling`` is None or a dict in
    Hugging Face's rope-parameters form, ``rope_type`` one of:

    * "default": no change
    * "linear" (position interpolation): every frequency divided by factor
    * "llama3": wavelengths 2*pi/f longer than L/low_freq_factor
      (L = original_max_position_embeddings) divided by factor, shorter than
      L/high_freq_factor kept, and in between a blend with the weight
      s = (L/wavelength - low) / (high - low) on the kept frequency
    * "yarn" (arXiv 2309.00071): pair i's frequency blends the interpolated
      f/factor and the original f by a ramp in i: fully original for
      i <= lo, fully interpolated for i >= hi (written here as the weight
      on the interpolated frequency, 0 below lo and 1 above hi), where lo/hi
      are the pair indices whose wavelength fits beta_fast / beta_slow turns
      into L (i(r) = dim * ln(L / (2 pi r)) / (2 ln theta); floored/ceiled
      when truncate, default True; clipped to [0, dim - 1]).  The attention
      factor multiplies cos and sin: given, or mscale(factor, mscale) /
      mscale(factor, mscale_all_dim) when both are given and non-zero, else
      mscale(factor, 1), with mscale(s, m) = 0.1 m ln s + 1 (1 for s <= 1).
      beta_fast and beta_slow default to 32 and 1.
    """
    if dim % 2:
        raise ValueError(f"rotary dim must be even, got {dim}")
    i = np.arange(dim // 2, dtype=np.float64)
    base = theta ** (-2.0 * i / dim)
    kind = "default" if scaling is None else scaling.get("rope_type", "default")
    if kind == "default":
        return base, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return base / factor, 1.0
    if kind == "llama3":
        L = float(scaling["original_max_position_embeddings"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelength = 2 * np.pi / base
        out = np.empty_like(base)
        for n, (f, wl) in enumerate(zip(base, wavelength)):
            if wl < L / high:
                out[n] = f
            elif wl > L / low:
                out[n] = f / factor
            else:
                s = (L / wl - low) / (high - low)
                out[n] = s * f + (1 - s) * f / factor
        return out, 1.0
    if kind == "yarn":
        L = float(scaling["original_max_position_embeddings"])
        beta_fast = scaling.get("beta_fast") or 32.0
        beta_slow = scaling.get("beta_slow") or 1.0

        def pair_index(turns):  # the i whose wavelength fits `turns` times into L
            return dim * np.log(L / (turns * 2 * np.pi)) / (2 * np.log(theta))

        lo, hi = pair_index(beta_fast), pair_index(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = np.floor(lo), np.ceil(hi)
        lo, hi = max(lo, 0.0), min(hi, dim - 1.0)
        if hi == lo:
            hi += 0.001  # a step, not a ramp
        w_interp = np.clip((i - lo) / (hi - lo), 0.0, 1.0)
        out = (1 - w_interp) * base + w_interp * base / factor

        def mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * np.log(s) + 1.0

        att = scaling.get("attention_factor")
        if att is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            att = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        return out, float(att)
    raise ValueError(f"unknown rope_type {kind!r}")


def ref_rotary(x, positions, dim, theta=10000.0, interleaved=False, scaling=None):
    """Rotary position embedding of the last axis of x, float64.

    x: (..., L, E) with dim <= E even; positions broadcast against (..., L).
    The first ``dim`` features form dim/2 pairs, pair i turned by the angle
    positions * inv_freq[i] (rope_inv_freq): (a, b) -> (a cos - b sin,
    b cos + a sin), both then times the attention factor.  Pairs are
    (i, i + dim/2) (the half-split "rotate_half" layout of GPT-NeoX/Llama)
    or, interleaved, (2i, 2i + 1) (GPT-J).  Features past ``dim`` pass
    unchanged (partial rotary).
    """
    x = np.array(x, dtype=np.float64)  # a copy: written below
    inv_freq, att = rope_inv_freq(dim, theta, scaling)
    angle = np.asarray(positions, np.float64)[..., None] * inv_freq  # (..., L, dim/2)
    cos, sin = np.cos(angle) * att, np.sin(angle) * att
    if interleaved:
        a_idx, b_idx = np.arange(0, dim, 2), np.arange(1, dim, 2)
    else:
        a_idx, b_idx = np.arange(dim // 2), np.arange(dim // 2, dim)
    a, b = x[..., a_idx], x[..., b_idx]
    x[..., a_idx] = a * cos - b * sin
    x[..., b_idx] = b * cos + a * sin
    return x


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
