"""Hugging Face decoder attention layers as fastattn modules: ``from_hf``.

Nothing here imports torch or transformers: a layer is read through its
attributes and its tensors' methods, and the one transformers object needed
(the model's rotary embedding class) is found in the module the layer's class
was defined in, which the caller has already imported.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ._dtypes import as_dtype

__all__ = ["from_hf"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class _Family:
    """How one attention class differs from Llama's, read off its source.

    window: where the sliding window comes from.
        "none"   the model masks every layer causally (Llama, Gemma, GLM ...)
        "config" the model masks every layer with config.sliding_window when it
                 is set (Mistral, Mixtral, Starcoder2)
        "layer"  the layer keeps its own ``sliding_window`` (None on full
                 layers), set from config.layer_types (Qwen2, Gemma2, GPT-OSS)
    rope: which layers rotate q and k.
        "all", "use_rope" (SmolLM3's NoPE layers: the layer's ``use_rope``),
        "sliding" (Cohere2: only its sliding-window layers)

    since: the first transformers major version whose class this describes
        (4.x's Qwen2-MoE chose its window differently)

    The pair layout is not listed: _layout measures it on the model's own code.
    """
    window: str = "none"
    rope: str = "all"
    since: int = 4


# Only classes whose forward we have read are mapped: a class that looks the
# same from outside can still do something its attributes do not show (Cohere2
# skips the rotary on its full layers, OLMo clamps q/k/v), and a silently wrong
# module is worse than a refusal.  Subclasses are found through their bases.
_FAMILIES: Dict[str, _Family] = {
    "LlamaAttention": _Family(),
    "ArceeAttention": _Family(),
    "GemmaAttention": _Family(),
    "GraniteAttention": _Family(),  # scaling = config.attention_multiplier, read as .scaling
    "HeliumAttention": _Family(),
    "OlmoAttention": _Family(),  # refused below when config.clip_qkv is set
    "SeedOssAttention": _Family(),
    "MistralAttention": _Family(window="config"),
    "MixtralAttention": _Family(window="config"),
    "Starcoder2Attention": _Family(window="config"),
    "Qwen2Attention": _Family(window="layer"),
    "Qwen2MoeAttention": _Family(window="layer", since=5),
    "MinistralAttention": _Family(window="layer"),
    "Gemma2Attention": _Family(window="layer"),
    "GptOssAttention": _Family(window="layer"),
    "SmolLM3Attention": _Family(window="layer", rope="use_rope"),
    "CohereAttention": _Family(),
    "Cohere2Attention": _Family(window="layer", rope="sliding"),
    "GlmAttention": _Family(),
    "Glm4Attention": _Family(),
}

# rope types whose frequencies fastattn.Rotary computes; the others ("dynamic",
# "longrope", ...) change with the sequence length or need per-pair tables
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _transformers_major() -> int:
    # the layer exists, so transformers is imported already: nothing new is loaded
    version = getattr(sys.modules.get("transformers"), "__version__", "5")
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 5


def _family(layer) -> Tuple[str, _Family]:
    for klass in type(layer).__mro__:
        if klass.__name__ in _FAMILIES:
            fam = _FAMILIES[klass.__name__]
            if _transformers_major() < fam.since:
                raise TypeError(f"from_hf: {klass.__name__} is supported from transformers "
                                f"{fam.since} on; this is "
                                f"{sys.modules['transformers'].__version__}")
            return klass.__name__, fam
    name = type(layer).__name__
    raise TypeError(
        f"from_hf: {name} is not a supported attention layer; from_hf maps only classes "
        f"whose forward it knows: {', '.join(sorted(_FAMILIES))}, and their subclasses")


def _check_structure(layer) -> None:
    """Refuse what the four projections and the read settings cannot express.

    Run before the class is looked up, so that a layer of the right shape with
    one step too many (Qwen3's q_norm) is told about that step.
    """
    cls_name = type(layer).__name__
    children = dict(layer.named_children()) if hasattr(layer, "named_children") else {}
    missing = [p for p in _PROJECTIONS if p not in children]
    if missing or getattr(layer, "config", None) is None:
        raise TypeError(
            f"from_hf: {cls_name} is not a transformers decoder attention layer (one with "
            "q_proj, k_proj, v_proj, o_proj and a config); pass the layer, e.g. "
            "model.model.layers[i].self_attn, not the model or the decoder layer")
    # transformers 4.x's Qwen2-MoE attention kept a rotary_emb of its own that its
    # forward never calls (the model passes position_embeddings): harmless
    extra = sorted(set(children) - set(_PROJECTIONS) - {"rotary_emb"})
    if extra:
        # q_norm / k_norm (Qwen3, OLMo2, Gemma3, Cohere with use_qk_norm) normalise
        # each head's q and k before the rotary: a step fastattn does not have
        raise ValueError(
            f"from_hf: {cls_name} has submodule(s) {', '.join(map(repr, extra))} beside "
            "q/k/v/o_proj (e.g. q_norm/k_norm: per-head query/key normalisation, as in "
            "Qwen3 or OLMo2); fastattn has no such step, so this layer is not supported")
    own = sorted(n for n, _ in layer.named_parameters(recurse=False) if n != "sinks")
    if own:
        raise ValueError(f"from_hf: {cls_name} has parameter(s) {', '.join(map(repr, own))} "
                         "that fastattn has no place for")
    for p in _PROJECTIONS:
        lin = children[p]
        w = getattr(lin, "weight", None)
        if w is None or len(tuple(w.shape)) != 2 or not w.is_floating_point():
            raise TypeError(f"from_hf: {cls_name}.{p} is not a plain linear layer with a "
                            f"floating-point (out, in) weight ({type(lin).__name__}); "
                            "quantized layers are not supported")
        if getattr(w, "is_meta", False):
            raise ValueError(f"from_hf: {cls_name}.{p}'s weight is on the meta device (a model "
                             "made without its weights); load the weights first")
    cfg = layer.config
    if not getattr(layer, "is_causal", True):
        raise ValueError(f"from_hf: this {cls_name} is bidirectional "
                         "(config.use_bidirectional_attention); from_hf maps causal decoder "
                         "attention only")
    if getattr(cfg, "clip_qkv", None) is not None:
        raise ValueError(f"from_hf: {cls_name} clamps q, k and v to +-config.clip_qkv "
                         f"({cfg.clip_qkv}); fastattn has no such clamp")


def _window(layer, fam: _Family) -> Optional[Tuple[int, int]]:
    if fam.window == "layer":
        w = getattr(layer, "sliding_window", None)
    elif fam.window == "config":
        w = getattr(layer.config, "sliding_window", None)
    else:
        w = None
    if not w:  # None, or Qwen2-MoE's 0 for "no sliding window"
        return None
    # transformers' sliding mask keeps key j for query i when i - W < j <= i:
    # the query and the W - 1 keys before it
    return (int(w) - 1, 0)


def _rope_parameters(cfg, layer) -> Dict[str, Any]:
    """The layer's rope settings as one flat dict with rope_type and rope_theta.

    transformers 5 keeps them in config.rope_parameters (flat, or one dict per
    layer type); 4.x in config.rope_theta, config.rope_scaling and
    config.partial_rotary_factor.
    """
    rp = getattr(cfg, "rope_parameters", None)
    if rp:
        layer_type = getattr(layer, "layer_type", None)
        idx = getattr(layer, "layer_idx", None)
        if layer_type is None and getattr(cfg, "layer_types", None) and idx is not None:
            layer_type = cfg.layer_types[idx]
        if layer_type in rp and isinstance(rp[layer_type], dict):
            rp = rp[layer_type]
        out = dict(rp)
    else:
        out = dict(getattr(cfg, "rope_scaling", None) or {})
        out.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        prf = getattr(cfg, "partial_rotary_factor", None)
        if prf is not None:
            out.setdefault("partial_rotary_factor", prf)
    out["rope_type"] = out.get("rope_type", out.get("type", "default"))
    return out


def _rotary_embedding(layer, cls_name: str):
    """The model's own rotary embedding, built from the layer's config.

    Its inv_freq settles the rotary width (Llama-family default rope rotates the
    whole head whatever partial_rotary_factor says; GLM rotates that fraction)
    and its attention_scaling is YaRN's factor on cos and sin, as the model
    computes them.
    """
    module = sys.modules.get(type(layer).__module__)
    prefix = cls_name[: -len("Attention")]
    klass = getattr(module, f"{prefix}RotaryEmbedding", None)
    if klass is None:
        raise ValueError(f"from_hf: cannot find {prefix}RotaryEmbedding beside {cls_name} in "
                         f"{type(layer).__module__}")
    return klass(layer.config)


def _layout(layer, cls_name: str, emb, head_dim: int, dim: int) -> bool:
    """Whether the model pairs features (2i, 2i+1) (True) or (i, i + dim/2).

    Measured, not looked up: the layouts hide in each modeling file's
    rotate_half and in how its rotary embedding lays out cos and sin (Llama
    concatenates two copies of the angles, Cohere interleaves them, GLM and
    Helium re-interleave Llama-style ones, GPT-OSS rotates halves from one
    copy).  Feature 0 turned by the model's own code at position 1 lands on
    its pair partner, and only there.
    """
    import torch

    apply = getattr(sys.modules.get(type(layer).__module__), "apply_rotary_pos_emb", None)
    if apply is None:
        raise ValueError(f"from_hf: cannot find apply_rotary_pos_emb beside {cls_name} in "
                         f"{type(layer).__module__}")
    e0 = torch.zeros(1, 1, 1, head_dim, dtype=torch.float64)
    e0[..., 0] = 1.0
    with torch.no_grad():
        cos, sin = emb(e0, torch.ones(1, 1, dtype=torch.long))
        turned, _ = apply(e0, e0, cos, sin)
    moved = sorted(set(torch.nonzero(turned.reshape(-1).abs() > 1e-12).flatten().tolist())
                   - {0})
    if moved == [dim // 2]:
        return False
    if moved == [1]:
        return True
    raise ValueError(f"from_hf: {cls_name}'s rotary embedding moves feature 0 onto "
                     f"feature(s) {moved}; fastattn's Rotary pairs (i, i + {dim // 2}) or "
                     "(2i, 2i + 1)")


def _rotary(layer, cls_name: str, fam: _Family, head_dim: int):
    if fam.rope == "use_rope" and not getattr(layer, "use_rope", True):
        return None
    if fam.rope == "sliding" and getattr(layer, "sliding_window", None) is None:
        return None
    cfg = layer.config
    rp = _rope_parameters(cfg, layer)
    kind = rp["rope_type"]
    if kind not in _ROPE_TYPES:
        raise ValueError(f"from_hf: {cls_name} uses rope_type {kind!r}; fastattn's Rotary "
                         f"supports {', '.join(map(repr, _ROPE_TYPES))}")
    emb = _rotary_embedding(layer, cls_name)
    dim = 2 * int(emb.inv_freq.numel())
    if dim > head_dim:
        raise ValueError(f"from_hf: {cls_name}'s rotary embedding is {dim} wide, more than "
                         f"head_dim {head_dim}")
    att = float(getattr(emb, "attention_scaling", 1.0))
    scaling: Optional[Dict[str, Any]] = None
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(rp["factor"])}
    elif kind == "llama3":
        scaling = {"rope_type": "llama3", "factor": float(rp["factor"]),
                   "low_freq_factor": float(rp["low_freq_factor"]),
                   "high_freq_factor": float(rp["high_freq_factor"]),
                   "original_max_position_embeddings":
                       int(rp["original_max_position_embeddings"])}
    elif kind == "yarn":
        orig = int(rp["original_max_position_embeddings"])
        factor = rp.get("factor")
        if factor is None:  # DeepSeek-style: the ratio of the two context lengths
            factor = cfg.max_position_embeddings / orig
        # Every default resolved here, as transformers resolves it (beta_fast 32
        # and beta_slow 1 also replace a 0; truncate is read from the top-level
        # rope_parameters), and the attention factor taken from the model's own
        # rotary embedding: fastattn then needs none of transformers' defaults.
        top = getattr(cfg, "rope_parameters", None) or rp
        scaling = {"rope_type": "yarn", "factor": float(factor),
                   "original_max_position_embeddings": orig,
                   "beta_fast": float(rp.get("beta_fast") or 32),
                   "beta_slow": float(rp.get("beta_slow") or 1),
                   "truncate": bool(top.get("truncate", True)),
                   "attention_factor": att}
    elif att != 1.0:
        raise ValueError(f"from_hf: {cls_name}'s rotary embedding scales cos and sin by "
                         f"{att} with rope_type {kind!r}; fastattn applies such a factor "
                         "only for 'yarn'")
    interleaved = _layout(layer, cls_name, emb, head_dim, dim)
    from . import Rotary  # late: every refusal above works without it

    return Rotary(dim, theta=float(rp["rope_theta"]), interleaved=interleaved,
                  scaling=scaling)


def _numpy(t) -> np.ndarray:
    t = t.detach().cpu()
    # float64 stays as it is; the rest widen to float32 (bfloat16 and float16
    # exactly so) and load_state_dict casts to the module's dtype
    return t.numpy() if str(t.dtype) == "torch.float64" else t.float().numpy()


def _layer_dtype(layer) -> np.dtype:
    name = str(layer.q_proj.weight.dtype).replace("torch.", "")
    return as_dtype(name if name in ("float32", "float64", "bfloat16", "float16") else "float32")


def from_hf(layer, *, dtype: Any = None):
    """Build a :class:`fastattn.MultiHeadSelfAttention` equal to a Hugging Face
    decoder attention layer.

    The module computes what the layer computes inside its model: ``m(x,
    is_causal=True)`` equals the layer fed with the model's rotary embeddings
    at positions 0..N-1 and the mask the model gives that layer (causal, or
    causal with the sliding window on the layers that have one), followed by
    its ``o_proj``; decoding one token at a time through ``m.new_cache`` gives
    the same outputs.  torch is needed for the layer only; neither torch nor
    transformers is imported by fastattn.

    Parameters
    ----------
    layer : transformers attention module
        One layer's attention, e.g. ``model.model.layers[i].self_attn``.
        Supported classes (and their subclasses): LlamaAttention,
        MistralAttention, MixtralAttention, Qwen2Attention, Qwen2MoeAttention,
        Gemma2Attention, GemmaAttention, GptOssAttention, GraniteAttention,
        GlmAttention, Glm4Attention, CohereAttention, Cohere2Attention,
        Starcoder2Attention, MinistralAttention, SmolLM3Attention,
        HeliumAttention, OlmoAttention, SeedOssAttention, ArceeAttention.
    dtype : optional
        The module's dtype; default the layer's (float32, float64, bfloat16
        or float16).

    Returns
    -------
    MultiHeadSelfAttention

    Raises
    ------
    TypeError
        ``layer`` is not one of the supported classes, or a projection is not
        a plain floating-point linear layer (quantized).
    ValueError
        The layer does something fastattn cannot express: per-head q/k norms
        (``q_norm``/``k_norm``, as in Qwen3, OLMo2, Gemma3, Cohere with
        ``use_qk_norm``), q/k/v clamping (OLMo ``clip_qkv``), bidirectional
        attention, or a rope type other than default, linear, llama3 and yarn
        (e.g. dynamic, longrope).

    Notes
    -----
    What is read, and from where:

    * heads: ``config.num_attention_heads``, ``config.num_key_value_heads``
      (grouped-query), ``layer.head_dim`` (may differ from hidden/heads, as in
      Gemma2 and Mistral's ``head_dim``); the projections' weights and biases.
      fastattn has one ``bias`` flag: a layer with some biases (Qwen2: q, k, v
      but not o) gets zeros for the others.
    * scale: ``layer.scaling`` (head_dim**-0.5; Gemma2
      ``query_pre_attn_scalar**-0.5``; Granite ``attention_multiplier``).
    * soft-cap: ``layer.attn_logit_softcapping`` (Gemma2), applied to the
      scaled scores before the mask.  transformers' "sdpa" implementation
      skips it; the module always applies it, as "eager" does.
    * sinks: ``layer.sinks`` (GPT-OSS), one logit per query head added to
      each softmax's denominator.
    * sliding window: ``layer.sliding_window`` where the class keeps one
      (layers of type "sliding_attention" in ``config.layer_types``: Qwen2,
      Gemma2, GPT-OSS), else ``config.sliding_window`` for every layer where
      the model masks them all (Mistral, Mixtral, Starcoder2).  A window of W
      keeps a query and the W-1 keys before it: ``window=(W-1, 0)``.
    * rotary: ``config.rope_parameters`` (transformers 5; per layer type when
      nested) or ``config.rope_theta``/``rope_scaling`` (4.x): theta and a
      "default", "linear", "llama3" or "yarn" scaling; the rotary width is the
      model's rotary embedding's (``2 * len(inv_freq)``: the whole head for
      Llama-like models, ``partial_rotary_factor`` of it for GLM) and YaRN's
      attention factor is that embedding's ``attention_scaling``.  The pair
      layout is measured by turning one feature with the model's own
      ``apply_rotary_pos_emb``: half-split (rotate_half's (i, i + dim/2)) for
      Llama, Qwen2, Mistral, Gemma, GPT-OSS and most others, interleaved
      (2i, 2i+1) for GLM, Cohere and Helium.  SmolLM3's NoPE layers and
      Cohere2's full layers have no rotary.

    Works with transformers 4.57 and later (Qwen2MoeAttention: 5 and later,
    4.x windowed it differently).

    Dropout is not modelled (the layer in eval mode is what is reproduced),
    nor a 2-D padding mask, position ids other than 0..N-1 (pass
    ``positions=`` to the module), or cache-position offsets beyond a
    fastattn cache.
    """
    from .modules import MultiHeadSelfAttention

    _check_structure(layer)
    cls_name, fam = _family(layer)
    cfg = layer.config
    H = int(cfg.num_attention_heads)
    Hkv = int(getattr(cfg, "num_key_value_heads", None) or H)
    E = int(layer.head_dim)
    D = int(layer.q_proj.weight.shape[1])
    shapes = {"q_proj": (H * E, D), "k_proj": (Hkv * E, D), "v_proj": (Hkv * E, D),
              "o_proj": (D, H * E)}
    for p, want in shapes.items():
        got = tuple(getattr(layer, p).weight.shape)
        if got != want:
            raise ValueError(f"from_hf: {cls_name}.{p}.weight is {got}, expected {want} for "
                             f"{H} heads, {Hkv} kv heads of width {E} over {D} features")

    dt = _layer_dtype(layer) if dtype is None else as_dtype(dtype)
    sinks = getattr(layer, "sinks", None)
    softcap = getattr(layer, "attn_logit_softcapping", None)
    bias = any(getattr(layer, p).bias is not None for p in _PROJECTIONS)
    m = MultiHeadSelfAttention(
        D, H, num_kv_heads=Hkv, head_dim=E, bias=bias, dtype=dt,
        rotary=_rotary(layer, cls_name, fam, E),
        scale=float(getattr(layer, "scaling", E ** -0.5)),
        softcap=None if softcap is None else float(softcap),
        sinks=sinks is not None, window=_window(layer, fam))

    state = {}
    for p in "qkvo":
        lin = getattr(layer, f"{p}_proj")
        state[f"w_{p}"] = _numpy(lin.weight)
        if bias:
            rows = shapes[f"{p}_proj"][0]
            state[f"b_{p}"] = (np.zeros(rows, np.float32) if lin.bias is None
                               else _numpy(lin.bias))
    if sinks is not None:
        state["sinks"] = _numpy(sinks)
    m.load_state_dict(state)
    return m
