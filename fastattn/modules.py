"""MultiHeadSelfAttention and MultiHeadAttention: config, the call, the forward pass.

Each class is thin: its constructor, its call and its torch constructor.
What they share is in :class:`_MultiHeadBase`, itself made of one part per
job, each in the file that names it:

* ``_params.Parameters``: the copy-on-write parameter snapshots, their
  storage, views, staged changes, packing on first use;
* ``_fastpath.FastPath``: the plain call ``m(x)`` behind one gate, through a
  per-thread ForwardPlan;
* ``io.Persistence``: state dicts, ``.npz`` files, pickles;
* ``interop.TorchExport``: ``to_torch``.

The general forward pass (every call the fast path does not take), in order:

1. the projections: for self-attention one GEMM projects x to Q, K and V
   together, writing a head-major (B, H + 2*Hkv, N, E) buffer; cross-attention
   projects query, key and value separately, also head-major;
2. Q, K and V are views of those buffers with shape (B, heads, L, E) (or of
   the KV cache): the kernel reads them in place, no per-head copies;
3. the kernel writes its output straight into a (B, Lq, H*E) buffer (the
   merged-heads layout), so no transpose follows;
4. one GEMM applies the output projection.

The GEMMs are fastattn's own (``kernels.linear``), on weights packed once per
weight change, and run on the same OpenMP threads as the attention kernel.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from . import _policy, interop, threads
from ._dispatch import kernels
from ._conventions import (CALL_NAMES, CONSTRUCTOR_NAMES, SELF_ATTENTION_NAMES, hide_catchall,
                           too_many_positional, torch_names)
from ._fastpath import FastPath
from ._params import Params, Parameters
from ._validate import (
    CALL_DEFAULTS,
    KEYS_HINT,
    CallOptions,
    call_options,
    check_cu_seqlens,
    check_flag,
    check_lengths,
    check_scale,
    check_softcap,
    check_window,
    ensure_memory,
    float_array,
    kernel_ready,
    module_config,
    padding_mask,
    prepare_mask,
    shape_str,
    source_array,
)
from .cache import KVCache
from ._dtypes import compute_dtype, kernel_view
from .functional import attention_into, ragged_into, resolve_alibi
from .interop import TorchExport
from .rotary import Rotary, check_positions, check_rotary
from .io import Persistence

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

__all__ = ["MultiHeadSelfAttention", "MultiHeadAttention"]

_REQUIRED: Any = object()  # a parameter's default that means "not given"
Seed = Union[None, int, np.random.Generator]


def _with_options(call):
    """``call`` (a module's ``__call__``, taking ``**options``) with the
    signature introspection shows (help(), IDEs): its own parameters and each
    option of ``CALL_DEFAULTS`` as a keyword-only one with its default."""
    sig = inspect.signature(call)
    # (a *args only catches torch-style positional options, to explain them)
    own = [p for p in sig.parameters.values()
           if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    options = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
               for name, default in CALL_DEFAULTS.items()]
    call.__signature__ = sig.replace(parameters=own + options)
    return call


def _first_dim(cls_name: str, embed_dim, d_model, num_heads) -> Tuple[Any, str]:
    """(value, name) of the first constructor argument, given as ``embed_dim``
    (positionally, as torch names it) or as ``d_model`` (the tutorial name)."""
    if embed_dim is _REQUIRED and d_model is _REQUIRED:
        raise TypeError(f"{cls_name}() missing its first argument: embed_dim (or its alias "
                        f"d_model)")
    if embed_dim is not _REQUIRED and d_model is not _REQUIRED:
        raise TypeError(f"{cls_name}() got both embed_dim and its alias d_model; pass one")
    if num_heads is _REQUIRED:
        raise TypeError(f"{cls_name}() missing required argument: num_heads")
    return (d_model, "d_model") if embed_dim is _REQUIRED else (embed_dim, "embed_dim")


def _torch_arguments(cls_name: str, args: tuple, kwargs: Dict[str, Any], dim,
                     self_attention: bool) -> None:
    """Explains, with a TypeError, the constructor arguments of
    torch.nn.MultiheadAttention a fastattn constructor does not take; lets
    through those whose value means the same here (dropout=0,
    batch_first=True, ...; see fastattn._conventions)."""
    if args:
        too_many_positional(cls_name, ("embed_dim", "num_heads"), 2 + len(args),
                            "torch.nn.MultiheadAttention's third is dropout, which fastattn, "
                            "for inference, does not have")
    if self_attention:
        # kdim = vdim = embed_dim is torch's default, and the one input's width here
        kwargs = {k: v for k, v in kwargs.items()
                  if not (k in ("kdim", "vdim") and (v is None or (
                      isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                      and v == dim)))}
    torch_names(cls_name, kwargs, CONSTRUCTOR_NAMES,
                SELF_ATTENTION_NAMES if self_attention else {})


class _MultiHeadBase(Parameters, FastPath, Persistence, TorchExport):
    """The general forward pass and the parts both modules share."""

    _QUERY_ARG = ""  # set by each subclass: what its first call argument is called

    def _build(self, embed_dim, d_model, num_heads, num_kv_heads, kdim, vdim, bias, dtype,
               seed: Seed, precision=None, head_dim=None, sinks=False,
               **settings: Any) -> None:
        """The constructors' work: the first argument under either name, the
        config checked, the parameters drawn.  ``settings``: the attention
        settings (rotary, scale, softcap, window)."""
        dim, dim_name = _first_dim(type(self).__name__, embed_dim, d_model, num_heads)
        self._allocate(**module_config(dim, num_heads, num_kv_heads, kdim, vdim, bias, dtype,
                                       dim_name, precision, head_dim, sinks), **settings)
        self.reset_parameters(seed)

    def _allocate(self, embed_dim: int, num_heads: int, num_kv_heads: int, kdim: int,
                  vdim: int, bias: bool, dtype: np.dtype, precision=None, head_dim=None,
                  sinks: bool = False, rotary=None, scale=None, softcap=None,
                  window=None) -> None:
        """Config, and no parameters yet: every constructor loads a full set
        (reset_parameters or load_state_dict) before the module is used."""
        self._init_params(embed_dim, num_heads, num_kv_heads, kdim, vdim, bias, dtype,
                          precision, head_dim, sinks)
        cdtype = compute_dtype(self._act_dtype)
        # read-only (properties below): the packed weights, plans and files
        # depend on them; another setting is another module
        if rotary is not None and not isinstance(self, MultiHeadSelfAttention):
            # (a config or file could carry one here; its projections never rotate)
            raise ValueError(f"rotary embeddings are for MultiHeadSelfAttention; "
                             f"{type(self).__name__} projects queries and keys apart")
        self._rotary = check_rotary(rotary, self.head_dim)
        self._scale = None if scale is None else check_scale(scale, self.head_dim, cdtype)
        self._softcap = None if softcap is None else check_softcap(softcap, cdtype)
        self._window = check_window(window)
        self._init_fastpath()

    rotary = property(lambda self: self._rotary,
                      doc="The module's fastattn.Rotary, or None (read-only).")
    scale = property(lambda self: self._scale,
                     doc="The factor on q.k given at construction, or None for 1/sqrt(head_dim) "
                         "(read-only).")
    softcap = property(lambda self: self._softcap,
                       doc="The logit soft-cap, or None (read-only).")
    window = property(lambda self: self._window,
                      doc="The sliding window calls use by default, or None (read-only).")

    @property
    def _plannable(self) -> bool:
        """Whether a plain call m(x) may run through a ForwardPlan, which
        knows none of the decoder settings and needs head widths adding up to
        embed_dim."""
        return (self.rotary is None and self.softcap is None and not self.has_sinks
                and self.window is None and self.q_dim == self.embed_dim)

    @classmethod
    def _from_config(cls, cfg: Mapping[str, Any]):
        """A module of ``cfg``'s shapes with no parameters yet."""
        m = cls.__new__(cls)
        m._allocate(**cls._normalise_config(cfg))
        return m

    def config(self) -> Dict[str, Any]:
        """The constructor arguments that rebuild this module's shapes."""
        cfg = {"embed_dim": self.embed_dim, "num_heads": self.num_heads,
               "num_kv_heads": self.num_kv_heads}
        cfg.update({d: getattr(self, d) for d in self._DIMS[1:]})
        cfg.update(bias=self.bias, dtype=self.dtype.name)
        if self.precision is not None:
            cfg.update(precision=self.precision.name)
        # the decoder settings only where given, so older configs read the same
        if self.head_dim * self.num_heads != self.embed_dim:
            cfg.update(head_dim=self.head_dim)
        if self.has_sinks:
            cfg.update(sinks=True)
        if self.rotary is not None:
            cfg.update(rotary=self.rotary.config())
        for name in ("scale", "softcap", "window"):
            value = getattr(self, name)
            if value is not None:
                cfg[name] = list(value) if name == "window" else value
        return cfg

    @property
    def d_model(self) -> int:
        """Model width D (the same as ``embed_dim``)."""
        return self.embed_dim

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def new_cache(self, batch_size: int, max_len: int, *, grow: bool = False,
                  dtype: Any = None) -> KVCache:
        """An empty :class:`~fastattn.cache.KVCache` for incremental decoding.

        Parameters
        ----------
        batch_size : int
            Sequences decoded together.
        max_len : int
            Positions it holds; a call that would exceed it raises ValueError,
            unless ``grow=True`` (then the capacity doubles).
        dtype : optional
            What the cache holds keys and values in: by default the type the
            module computes its activations in (its dtype, or its
            ``precision``).  A bfloat16 or float16 cache halves the bytes
            decoding reads, beside a float32, bfloat16 or float16 module.
        """
        cache = KVCache(batch_size, max_len, self.num_kv_heads, self.head_dim,
                        self._act_dtype if dtype is None else dtype, grow=grow)
        cache.check(cache.batch_size, self._act_dtype, self.num_kv_heads, self.head_dim)
        return cache

    def _project(self, state: Params, x2d: np.ndarray, part: str, n_out: int,
                 out: Optional[np.ndarray] = None, num_threads: int = 1,
                 head_major: bool = False, positions: Optional[np.ndarray] = None
                 ) -> np.ndarray:
        """x2d @ W.T + b for projection ``part``; with ``positions`` (one per
        row) the Q and K heads it writes are rotated as they are written."""
        w, b = self._packed_weight(state, part)
        if out is None:
            # between kernels, activations are held in the products' type
            out = np.empty((x2d.shape[0], n_out), dtype=self._act_dtype)
        rot = None
        if positions is not None and self.rotary is not None:
            table, index = self.rotary.rows(positions, compute_dtype(self._act_dtype))
            cols = {"qkv": self.q_dim + self.kv_dim, "q": self.q_dim, "k": self.kv_dim}[part]
            rot = (table, index, cols, self.head_dim, self.rotary.dim)
        kernels.linear(kernel_view(kernel_ready(x2d)), w, b, n_out, kernel_view(out),
                       _policy.linear_blocking(x2d.shape[1]), num_threads, head_major, rot)
        return out

    def _forward(self, query, key, value, *, self_attention: bool, attn_mask, key_padding_mask,
                 is_causal: bool, need_weights: bool, average_attn_weights: bool,
                 cache: Optional[KVCache], window, alibi: bool, alibi_slopes, positions=None,
                 lengths=None, cu_seqlens=None):
        if cu_seqlens is not None:
            if not self_attention or not isinstance(self, MultiHeadSelfAttention):
                raise ValueError("cu_seqlens (a packed batch) is for MultiHeadSelfAttention")
            need_weights = check_flag(need_weights, "need_weights")
            check_flag(average_attn_weights, "average_attn_weights")
            bad = [name for name, value in (("cache", cache), ("attn_mask", attn_mask),
                                            ("key_padding_mask", key_padding_mask),
                                            ("lengths", lengths))
                   if value is not None] + (["need_weights"] if need_weights else [])
            if bad:
                raise ValueError(f"with cu_seqlens (a packed batch), {', '.join(bad)} cannot be "
                                 f"given: each sequence attends only its own rows")
            return self._forward_packed(query, cu_seqlens, is_causal, window, alibi,
                                        alibi_slopes, positions)
        qname = self._QUERY_ARG
        q_in = float_array(query, qname, self.dtype, KEYS_HINT)
        unbatched = q_in.ndim == 2
        if q_in.ndim not in (2, 3) or q_in.shape[-1] != self.embed_dim:
            raise ValueError(
                f"{qname} must have shape (B, L, {self.embed_dim}) or (L, {self.embed_dim}), "
                f"got {shape_str(q_in.shape)}"
            )
        if unbatched:
            q_in = q_in[None]
        B, Lq, D = q_in.shape
        H, Hkv, E, kv, QD = (self.num_heads, self.num_kv_heads, self.head_dim, self.kv_dim,
                             self.q_dim)
        if not self_attention:
            k_in = source_array(key, "key", self.kdim, B, unbatched, self.dtype)
            v_in = source_array(value, "value", self.vdim, B, unbatched, self.dtype)
            if k_in.shape[1] != v_in.shape[1]:
                raise ValueError(
                    f"key and value must have the same length, got key {shape_str(k_in.shape)} "
                    f"and value {shape_str(v_in.shape)}"
                )
            if cache is not None and k_in.shape[1] != Lq:
                raise ValueError(
                    f"with a cache, key and value hold the new positions of query "
                    f"({Lq}), got key {shape_str(k_in.shape)}"
                )
        is_causal = check_flag(is_causal, "is_causal")
        need_weights = check_flag(need_weights, "need_weights")
        average_attn_weights = check_flag(average_attn_weights, "average_attn_weights")
        window, slopes = self._call_settings(window, alibi, alibi_slopes, positions)
        cdtype = compute_dtype(self._act_dtype)
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be a KVCache from new_cache(), got {type(cache).__name__}")
            cache.check(B, self._act_dtype, Hkv, E)
            is_causal = True  # new positions follow every cached one
        elif lengths is not None:
            raise ValueError("lengths (how many of x's positions each sequence appends) needs "
                             "a cache; for a packed batch without one, pass cu_seqlens")
        counts = check_lengths(lengths, B, Lq) if lengths is not None else None
        nt = threads.get_num_threads()
        state = self._state  # this call's weights, whatever other threads assign
        # a cache is held from its length read to its append, or the rollback
        # of a failed call: another call in between would lose or mix positions
        with cache._claim() if cache is not None else contextlib.nullcontext():
            # whether sequences sit at different lengths, read under the claim:
            # another thread's reset(i) could change it just before
            ragged = cache is not None and (counts is not None or not cache.uniform)
            if ragged:
                counts = np.full(B, Lq, np.int64) if counts is None else counts
                bad = [name for name, value in (("attn_mask", attn_mask),
                                                ("key_padding_mask", key_padding_mask))
                       if value is not None] + (["need_weights"] if need_weights else [])
                if bad:
                    raise ValueError(f"sequences at different lengths in the cache (or "
                                     f"lengths=) take no {', '.join(bad)}: each attends its own "
                                     f"positions")
            # every buffer of the call, checked once before any is allocated
            Lk = Lq if self_attention else k_in.shape[1]
            if cache is not None:
                Lk = len(cache) + Lq
            # the cache's lengths now: a failed call goes back to them
            cached = cache.lengths if cache is not None else None
            # (the K and V projections of cross-attention are as long as key)
            Lk_new = Lq if self_attention or cache is not None else Lk
            ensure_memory([(B * Lq, QD + 2 * kv), (B * Lq, QD), (B * Lq, D), (B * Lk_new, 2 * kv)]
                          + ([(B, H, Lq, Lk)] if need_weights else []), self.dtype.itemsize,
                          "the forward pass's buffers" + (" and weights" if need_weights else ""))
            # 1. masks as broadcast views, checked before anything is computed or
            # cached: a call that raises leaves a cache as it found it
            full = (B, H, Lq, Lk)
            bmask, fmask = (None, None) if ragged else prepare_mask(attn_mask, "attn_mask", full,
                                                                    cdtype)
            pad = None if ragged else padding_mask(key_padding_mask, B, H, Lq, Lk, unbatched)
            # the position of each projected row, which rotary turns Q and K by
            pos = None
            if self.rotary is not None:
                pos = check_positions(positions, B, Lq, cached if cache is not None else 0)

            # 2. projections, straight into the head-major blocks the kernel reads
            merged = None
            src_k = q_in if self_attention else k_in
            src_v = q_in if self_attention else v_in
            if cache is None:
                if self_attention and self.fused:
                    qkv, merged = self._buffers(B, Lq)
                    self._project(state, q_in.reshape(B * Lq, D), "qkv", QD + 2 * kv, qkv, nt,
                                  head_major=True, positions=pos)
                    q, k, v = qkv[:, :H], qkv[:, H:H + Hkv], qkv[:, H + Hkv:]
                else:
                    Lk_new = src_k.shape[1]
                    act = self._act_dtype
                    q = self._project(state, q_in.reshape(B * Lq, D), "q", QD,
                                      np.empty((B, H, Lq, E), act), nt, head_major=True)
                    k = self._project(state, src_k.reshape(B * Lk_new, src_k.shape[2]), "k", kv,
                                      np.empty((B, Hkv, Lk_new, E), act), nt,
                                      head_major=True)
                    v = self._project(state, src_v.reshape(B * Lk_new, src_v.shape[2]), "v", kv,
                                      np.empty((B, Hkv, Lk_new, E), act), nt,
                                      head_major=True)
            else:
                # decoding: the new positions' K and V go into the cache's layout
                if self_attention and self.fused:
                    qkv = self._project(state, q_in.reshape(B * Lq, D), "qkv", QD + 2 * kv,
                                        num_threads=nt, positions=pos)
                    sl = self._slices()
                    q2, k2, v2 = qkv[:, sl["q"]], qkv[:, sl["k"]], qkv[:, sl["v"]]
                else:
                    q2 = self._project(state, q_in.reshape(B * Lq, D), "q", QD, num_threads=nt)
                    k2 = self._project(state, src_k.reshape(B * Lq, src_k.shape[2]), "k", kv,
                                       num_threads=nt)
                    v2 = self._project(state, src_v.reshape(B * Lq, src_v.shape[2]), "v", kv,
                                       num_threads=nt)
                q = q2.reshape(B, Lq, H, E).transpose(0, 2, 1, 3)
                cache._append(k2.reshape(B, Lq, kv), v2.reshape(B, Lq, kv), counts)
                k, v = cache.keys(), cache.values()
            try:
                if ragged:
                    return self._attend_ragged(state, q, cache, counts, cached + counts, window,
                                               slopes, unbatched, nt)
                return self._attend_and_project(state, q, k, v, merged, B, Lq, bmask, fmask, pad,
                                                is_causal, need_weights, average_attn_weights,
                                                window, slopes, unbatched, nt)
            except BaseException:
                if cache is not None:
                    cache._truncate(cached)
                raise

    def _call_settings(self, window, alibi, alibi_slopes, positions):
        """(window, ALiBi slopes) of one call, checked: the call's window or
        the module's; positions only where there is a rotary to turn by them."""
        window = check_window(window)
        if window is None:
            window = self.window
        if positions is not None and self.rotary is None:
            raise ValueError("positions are for modules with rotary embeddings (rotary=...); "
                             "this one has none")
        return window, resolve_alibi(alibi, alibi_slopes, self.num_heads,
                                     compute_dtype(self._act_dtype))

    def _output_projection(self, state, merged: np.ndarray, nt: int) -> np.ndarray:
        """The output projection of the merged heads (rows, q_dim), into a new
        (rows, embed_dim) array of the module's dtype."""
        return self._project(state, merged, "o", self.embed_dim,
                             np.empty((merged.shape[0], self.embed_dim), self.dtype),
                             num_threads=nt)

    def _attention_settings(self, state) -> Dict[str, Any]:
        """The module's scale, soft-cap and sinks as the kernels take them."""
        return dict(scale=1.0 / math.sqrt(self.head_dim) if self.scale is None else self.scale,
                    softcap=self.softcap or 0.0,
                    sinks=state.arrays["sinks"].astype(np.float64) if self.has_sinks else None)

    def _attend_ragged(self, state, q, cache, counts, lens_k, window, slopes, unbatched, nt):
        """The attention and output projection of a call whose sequences sit
        at different lengths in the cache: sequence b's counts[b] new queries
        over its lens_k[b] cached positions, all in one team; output rows past
        counts[b] are zeros."""
        B, H, T, E = q.shape
        merged = np.zeros((B * T, self.q_dim), dtype=self._act_dtype)
        out = merged.reshape(B, T, H, E).transpose(0, 2, 1, 3)
        ragged_into(q, cache._k, cache._v, out, counts, lens_k, None, None, is_causal=True,
                    window=window, slopes=slopes, num_threads=nt,
                    **self._attention_settings(state))
        y = self._output_projection(state, merged, nt).reshape(B, T, self.embed_dim)
        if counts.min() < T:
            y[np.arange(T)[None, :] >= counts[:, None]] = 0
        return y[0] if unbatched else y

    def _forward_packed(self, x, cu_seqlens, is_causal, window, alibi, alibi_slopes, positions):
        """m(x, cu_seqlens=cu): self-attention over a packed batch, x (total, D),
        sequence s being rows cu[s]:cu[s+1]; no padding anywhere."""
        x = float_array(x, "x", self.dtype, KEYS_HINT)
        if x.ndim != 2 or x.shape[1] != self.embed_dim:
            raise ValueError(f"with cu_seqlens, x must be packed as (total, {self.embed_dim}), "
                             f"got {shape_str(x.shape)}")
        total = x.shape[0]
        cu = check_cu_seqlens(cu_seqlens, "cu_seqlens", total, "x")
        lens = np.diff(cu)
        is_causal = check_flag(is_causal, "is_causal")
        window, slopes = self._call_settings(window, alibi, alibi_slopes, positions)
        H, Hkv, E, kv, QD = (self.num_heads, self.num_kv_heads, self.head_dim, self.kv_dim,
                             self.q_dim)
        pos = None
        if self.rotary is not None:
            # each sequence's positions start at 0
            pos = (np.arange(total) - np.repeat(cu[:-1], lens) if positions is None
                   else check_positions(positions, 1, total)[0])
        ensure_memory([(total, QD + 2 * kv), (total, QD), (total, self.embed_dim)],
                      self.dtype.itemsize, "the forward pass's buffers")
        nt = threads.get_num_threads()
        state = self._state
        # head-major, as one sequence of all the rows: each head's rows are
        # contiguous, and each sequence is a run of them
        qkv, merged = self._buffers(1, total)
        self._project(state, x, "qkv", QD + 2 * kv, qkv, nt, head_major=True, positions=pos)
        ragged_into(qkv[:, :H], qkv[:, H:H + Hkv], qkv[:, H + Hkv:],
                    merged.reshape(total, H, E).transpose(1, 0, 2)[None], lens, lens,
                    cu[:-1], cu[:-1], is_causal=is_causal, window=window, slopes=slopes,
                    num_threads=nt, **self._attention_settings(state))
        return self._output_projection(state, merged, nt)

    def _attend_and_project(self, state, q, k, v, merged, B, Lq, bmask, fmask, pad, is_causal,
                            need_weights, average_attn_weights, window, slopes, unbatched, nt):
        """Steps 3 and 4 of _forward: the kernel into the merged layout, then
        the output projection."""
        H, E, D = self.num_heads, self.head_dim, self.embed_dim
        full = (B, H, Lq, k.shape[2])
        if merged is None:
            merged = np.empty((B * Lq, self.q_dim), dtype=self._act_dtype)
        out = merged.reshape(B, Lq, H, E).transpose(0, 2, 1, 3)
        # the kernels hand weights back in the type they compute in
        weights = np.empty(full, dtype=compute_dtype(self._act_dtype)) if need_weights else None
        # 3. the kernel
        attention_into(
            q, k, v, out,
            bool_masks=(bmask, pad), float_mask=fmask, is_causal=is_causal,
            weights=weights, window=window, slopes=slopes, num_threads=nt,
            **self._attention_settings(state),
        )
        # 4. output projection
        y = self._output_projection(state, merged, nt).reshape(B, Lq, D)
        if unbatched:
            y = y[0]
        if not need_weights:
            return y
        if average_attn_weights:
            weights = weights.mean(axis=1, dtype=weights.dtype)
        weights = weights.astype(self.dtype, copy=False)
        return y, (weights[0] if unbatched else weights)


_FORWARD_DOC = """
        attn_mask : ndarray, optional
            Broadcastable to (B, H, Lq, Lk) (or (H, Lq, Lk) unbatched).  Bool:
            ``True`` = may attend (note: ``torch.nn.MultiheadAttention`` uses
            ``True`` = blocked; a bool mask that blocks every key of every
            query, or is torch's causal mask with True above the diagonal,
            gets a ``fastattn.MaskConventionWarning``: pass ``~attn_mask``).
            Float: added to the scaled scores.
        key_padding_mask : ndarray of bool, shape (B, Lk) or (Lk,), optional
            ``True`` marks a padding key that no query attends (as in torch;
            one that pads every key gets a MaskConventionWarning).  With a
            cache, Lk counts every cached position.
        is_causal : bool
            Query ``i`` attends keys ``j <= i + (Lk - Lq)`` only.
        need_weights : bool
            Also return the attention weights.
        average_attn_weights : bool
            With ``need_weights``: average over heads, (B, Lq, Lk), instead of
            (B, H, Lq, Lk).
        cache : KVCache, optional
            From :meth:`new_cache`: the new positions' keys and values are
            appended and the queries attend causally over every cached
            position (one token per call, or a chunk).  One call at a time:
            a call that finds it in use by another thread's call raises
            RuntimeError.
        window : (int or None, int or None), optional
            Sliding window around each query's position (see
            :func:`fastattn.scaled_dot_product_attention`).
        alibi : bool, alibi_slopes : array of shape (H,), optional
            ALiBi linear distance biases, computed inside the kernel.
        positions : int array of shape (Lq,) or (B, Lq), optional
            With rotary embeddings: the position of each query (and new key)
            row; by default 0..Lq-1, or with a cache the Lq positions after
            the cached ones (each sequence's own).
        lengths : int array of shape (B,), optional
            With a cache: sequence b appends only the first ``lengths[b]`` of
            x's Lq positions (a batch of prompts of different lengths, padded
            to Lq); output rows past ``lengths[b]`` are zeros.  Sequences
            whose cached lengths differ decode together, each at its own
            position (``cache.lengths``), with or without it.
        cu_seqlens : int array of shape (n + 1,), optional
            Self-attention over a packed batch (MultiHeadSelfAttention only):
            x is (total, D), sequence s its rows ``cu_seqlens[s]`` to
            ``cu_seqlens[s+1]``, each attending only its own rows (see
            :func:`fastattn.varlen_attention`); ``positions`` is then
            (total,), by default each sequence's own 0, 1, ...  No masks,
            cache or weights with it.
"""


class MultiHeadSelfAttention(_MultiHeadBase):
    """Multi-head self-attention over NumPy arrays, like the PyTorch class it mirrors.

    ``y = fc(attention(query(x), key(x), value(x)))`` with the heads split
    from the projections, scores scaled by ``1 / sqrt(head_dim)``, and a
    softmax over keys.

    Parameters
    ----------
    embed_dim : int
        Model (embedding) width D; ``d_model=`` is an alias.
    num_heads : int
        Query heads H; ``head_dim = embed_dim // num_heads`` must divide
        exactly, unless ``head_dim`` is given.
    num_kv_heads : int, optional
        Key/value heads (grouped-query attention); must divide ``num_heads``.
        Defaults to ``num_heads``.
    bias : bool
        Whether the four projections have biases.
    dtype : float32, float64, bfloat16 or float16
        Dtype of the weights and outputs; inputs are cast to it.  bfloat16
        (``ml_dtypes.bfloat16``, or ``"bfloat16"``) and float16 modules hold
        their weights and activations in that type and sum in float32 (on a
        CPU with AVX512-BF16 the bfloat16 projections multiply bfloat16 pairs
        in hardware); see docs/numerics.md for the errors.
    precision : "bfloat16", "float16" or None
        Mixed precision for a float32 module, as OpenVINO's precision hint or
        torch's autocast: inputs, outputs, ``state_dict`` and files stay
        float32, while the weights are packed in this type (rounded once per
        weight change) and the activations between the kernels (Q, K, V,
        the merged heads) are held in it.
    seed : int or numpy.random.Generator, optional
        Source of the initial weights, drawn like ``torch.nn.Linear``'s
        default: uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``, ``fan_in``
        the projection's input width (``embed_dim``; ``num_heads * head_dim``
        for ``w_o``; ``kdim``, ``vdim`` for a cross-attention module's ``w_k``,
        ``w_v``).
    rotary : fastattn.Rotary, optional
        Rotary position embeddings for Q and K, applied inside the Q/K/V
        projection as it writes them; each call's positions are 0..N-1, its
        ``positions=``, or, with a cache, those after the cached ones.
    head_dim : int, optional
        Features per head E; by default ``embed_dim // num_heads``.  Given,
        the Q projection is ``num_heads * head_dim`` wide, which need not be
        ``embed_dim`` (Gemma 2, GPT-OSS), and ``w_o`` maps it back to
        ``embed_dim``.
    scale : float, optional
        Factor on ``q . k``; by default ``1 / sqrt(head_dim)`` (Gemma 2 uses
        ``query_pre_attn_scalar ** -0.5``).
    softcap : float > 0, optional
        Logit soft-capping (Gemma 2): scaled scores ``s`` become
        ``softcap * tanh(s / softcap)`` before masks and the softmax.
    sinks : bool
        Give the module attention sinks (GPT-OSS): a parameter ``sinks`` of
        shape (num_heads,), one logit per head that joins the softmax's
        denominator (initially 0; assign ``m.sinks = ...`` or load it).
    window : (int or None, int or None), optional
        The sliding window every call uses unless it passes its own (see
        :func:`fastattn.scaled_dot_product_attention`); a model whose layer
        attends the last W positions takes ``window=(W - 1, 0)``.

    ``torch.nn.MultiheadAttention``'s other arguments are accepted where
    they mean the same here (``dropout=0``, ``batch_first=True``,
    ``add_bias_kv=False``, ``add_zero_attn=False``, ``device="cpu"``,
    ``kdim``/``vdim`` equal to ``embed_dim``); other values raise TypeError
    saying why and what fastattn has instead (no dropout: inference only;
    always batch-first; ``sinks=True`` for ``add_zero_attn``;
    :class:`MultiHeadAttention` for other key and value widths).  Arguments
    after ``num_heads`` are keyword-only.

    Attributes
    ----------
    w_q, w_k, w_v, w_o : ndarray
        Projection weights, ``(out_features, in_features)`` as in
        ``torch.nn.Linear``: ``w_q`` is (num_heads * head_dim, D) and ``w_o``
        (D, num_heads * head_dim), both (D, D) unless ``head_dim`` is given;
        ``w_k`` and ``w_v`` are (num_kv_heads * head_dim, D).  Read-only copies; numpy
        refuses to make them, or their bases, writable.
    b_q, b_k, b_v, b_o : ndarray or None
        Biases (None with ``bias=False``).

    Weights change only by assignment (``m.w_q = new``), :meth:`load_state_dict`
    or :meth:`reset_parameters`.  ``torch.from_numpy(m.w_q)`` warns that
    writing to the tensor is undefined behaviour; such a write reaches only the
    copy ``m.w_q`` returned, never the module.

    A module may be called from several threads at once while another thread
    changes its weights: each call computes with the weights of one moment,
    those before or those after the change.
    """

    _FORMAT = "fastattn.MultiHeadSelfAttention/1"
    _DIMS = ("embed_dim",)
    _QUERY_ARG = "x"

    @hide_catchall
    def __init__(self, embed_dim: int = _REQUIRED, num_heads: int = _REQUIRED, *torch_args,
                 d_model: int = _REQUIRED, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, bias: bool = True, dtype: Any = np.float32,
                 seed: Seed = None, precision: Any = None, rotary: Optional[Rotary] = None,
                 scale: Optional[float] = None, softcap: Optional[float] = None,
                 sinks: bool = False, window=None, **torch_kwargs) -> None:
        if torch_args or torch_kwargs:
            _torch_arguments(type(self).__name__, torch_args, torch_kwargs,
                             d_model if embed_dim is _REQUIRED else embed_dim, True)
        self._build(embed_dim, d_model, num_heads, num_kv_heads, None, None, bias, dtype, seed,
                    precision, head_dim, sinks, rotary=rotary, scale=scale, softcap=softcap,
                    window=window)

    @classmethod
    def from_torch(cls, module, *, dtype: Any = None) -> "MultiHeadSelfAttention":
        """Build from a ``torch.nn.MultiheadAttention`` (kdim == vdim == embed_dim) or
        a module with ``query``, ``key``, ``value`` and ``fc`` linears and
        ``num_heads``.  torch is needed only for the module.

        The module returned is batch-first, as every fastattn module: it takes
        (B, L, D).  A sequence-first torch module (``batch_first=False``,
        torch's default, which took (L, B, D)) is accepted, its weights being
        the same, with a :class:`fastattn.BatchFirstWarning` saying so:
        transpose its inputs with ``x.transpose(1, 0, 2)``.  Calls return
        ``y`` alone unless ``need_weights=True`` (torch returns
        ``(y, weights)`` by default), and a bool ``attn_mask`` is True where a
        query may attend (torch.nn.MultiheadAttention: True = blocked).
        """
        cfg, state = interop.torch_module_config(module)
        if cfg["kdim"] != cfg["embed_dim"] or cfg["vdim"] != cfg["embed_dim"]:
            raise ValueError(
                "from_torch: this torch.nn.MultiheadAttention has kdim/vdim != embed_dim "
                "(cross-attention); use fastattn.MultiHeadAttention.from_torch"
            )
        m = cls(cfg["embed_dim"], cfg["num_heads"], bias=cfg["bias"],
                dtype=dtype if dtype is not None else cfg["dtype"])
        m.load_state_dict(state)
        return m

    @_with_options
    def __call__(self, x, *args, **options: Unpack[CallOptions]
                 ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        if args:
            raise TypeError(
                "MultiHeadSelfAttention takes one input, m(x); for torch-style m(query, key, "
                "value) use fastattn.MultiHeadAttention (other options are keyword-only)"
            )
        y = self._plain_call(x, options)  # the fast path's one gate (fastattn._fastpath)
        if y is not None:
            return y
        return self._forward(x, None, None, self_attention=True,
                             **call_options(options, "MultiHeadSelfAttention"))

    __call__.__doc__ = """Self-attention over ``x``.

        Parameters
        ----------
        x : ndarray, shape (B, N, D) or (N, D)
            Input sequence(s); cast to the module's dtype.
""" + _FORWARD_DOC + """
        Returns
        -------
        y : ndarray, same shape as ``x``
        weights : ndarray, only with ``need_weights``
        """


class MultiHeadAttention(_MultiHeadBase):
    """Multi-head attention of queries over separate keys and values (cross-attention),
    like ``torch.nn.MultiheadAttention(batch_first=True)``.

    Parameters
    ----------
    embed_dim : int
        Width of the queries and of the output, E; ``d_model=`` is an alias.
    num_heads : int
        Query heads; ``head_dim = embed_dim // num_heads`` unless ``head_dim``
        is given.
    kdim, vdim : int, optional
        Widths of the key and value inputs (default ``embed_dim``).
    num_kv_heads : int, optional
        Key/value heads (grouped-query attention); must divide ``num_heads``.
    bias, dtype, seed, precision, head_dim, scale, softcap, sinks, window
        As for :class:`MultiHeadSelfAttention` (rotary embeddings are for
        self-attention only), and so are torch's other arguments (``dropout=0``,
        ``batch_first=True`` ... accepted; other values a TypeError saying why).

    Attributes
    ----------
    w_q (Q, E), w_k (Dkv, kdim), w_v (Dkv, vdim), w_o (E, Q), b_q ... b_o
        As in ``torch.nn.Linear``; ``Q = num_heads * head_dim`` (E unless
        ``head_dim`` is given), ``Dkv = num_kv_heads * head_dim``.
        Read-only, changed and shared across threads as for
        :class:`MultiHeadSelfAttention`.
    """

    _FORMAT = "fastattn.MultiHeadAttention/1"
    _DIMS = ("embed_dim", "kdim", "vdim")
    _QUERY_ARG = "query"

    @hide_catchall
    def __init__(self, embed_dim: int = _REQUIRED, num_heads: int = _REQUIRED, *torch_args,
                 d_model: int = _REQUIRED, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, bias: bool = True, dtype: Any = np.float32,
                 seed: Seed = None, precision: Any = None, scale: Optional[float] = None,
                 softcap: Optional[float] = None, sinks: bool = False, window=None,
                 **torch_kwargs) -> None:
        if torch_args or torch_kwargs:
            _torch_arguments(type(self).__name__, torch_args, torch_kwargs, None, False)
        self._build(embed_dim, d_model, num_heads, num_kv_heads, kdim, vdim, bias, dtype, seed,
                    precision, head_dim, sinks, scale=scale, softcap=softcap, window=window)

    @classmethod
    def from_torch(cls, module, *, dtype: Any = None) -> "MultiHeadAttention":
        """Build from a ``torch.nn.MultiheadAttention`` (any kdim/vdim) or a module
        with ``query``, ``key``, ``value`` and ``fc`` linears.

        Batch-first, with a :class:`fastattn.BatchFirstWarning` for a
        sequence-first torch module; see
        :meth:`MultiHeadSelfAttention.from_torch`.
        """
        cfg, state = interop.torch_module_config(module)
        m = cls(cfg["embed_dim"], cfg["num_heads"], kdim=cfg["kdim"], vdim=cfg["vdim"],
                bias=cfg["bias"], dtype=dtype if dtype is not None else cfg["dtype"])
        m.load_state_dict(state)
        return m

    @_with_options
    def __call__(self, query, key, value, *args, **options: Unpack[CallOptions]
                 ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        if args:
            raise TypeError(
                "MultiHeadAttention takes three inputs, m(query, key, value), and its options "
                "by name only: torch's fourth positional argument is key_padding_mask, pass "
                "key_padding_mask=... (True = padding, as in torch)"
            )
        # the same array three times is self-attention, one fused projection,
        # where the module has one (kdim == vdim == embed_dim); otherwise key
        # and value are checked against kdim and vdim like any others
        same = key is query and value is query and self.fused
        return self._forward(query, key, value, self_attention=same,
                             **call_options(options, "MultiHeadAttention"))

    __call__.__doc__ = """Attention of ``query`` over ``key`` and ``value``.

        Parameters
        ----------
        query : ndarray, shape (B, Lq, embed_dim) or (Lq, embed_dim)
        key : ndarray, shape (B, Lk, kdim) or (Lk, kdim)
        value : ndarray, shape (B, Lk, vdim) or (Lk, vdim)
""" + _FORWARD_DOC + """
        Returns
        -------
        y : ndarray, shape (B, Lq, embed_dim) (or (Lq, embed_dim))
        weights : ndarray, only with ``need_weights``
        """
