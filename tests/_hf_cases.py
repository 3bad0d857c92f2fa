"""Small Hugging Face decoder attention layers built in code, run as their models run them.

Shared by test_hf_reference.py (our float64 reference against each layer) and
test_hf.py (fastattn.from_hf against each layer).  Import this only after
``pytest.importorskip("transformers")``: it imports torch and transformers.

Each case is one attention layer with a tiny random config (hidden 64, 4 query
heads, 2 kv heads), its model's rotary embedding class and the mask its model
builds for it (``create_causal_mask`` or ``create_sliding_window_causal_mask``,
chosen the way that model's ``forward`` chooses).  ``expect`` is what we
believe the layer computes, in the arguments of ``reference.ref_mhsa``: the
reference tests check that belief against the layer itself.  Nothing is
downloaded.
"""
import copy
import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import masking_utils

D = 64  # hidden size of every case
H, HKV = 4, 2


@dataclass
class Case:
    name: str
    layer: torch.nn.Module  # float32, eval mode, random weights (sinks included)
    rotary_emb: torch.nn.Module  # the model's rotary embedding, built from the config
    sliding: bool  # whether the model gives this layer the sliding-window mask
    expect: dict = field(default_factory=dict)  # ref_mhsa keywords (rotary, scale, ...)


def _randomize(layer, seed, qk_gain=1.0):
    """Random weights, biases and sinks: a bare layer keeps torch's default init
    (sinks even uninitialised memory), and zero biases would hide a missed one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name == "sinks":
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                gain = qk_gain if name.split(".")[0] in ("q_proj", "k_proj") else 1.0
                p.copy_(gain * torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))
    return layer.eval()


def _rope(rope):
    """Config keywords for rope settings: transformers 5's rope_parameters, or
    4.x's rope_theta and rope_scaling (so the 4.x reading is tested there)."""
    import transformers
    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": dict(rope)}
    rope = dict(rope)
    out = {"rope_theta": rope.pop("rope_theta")}
    if rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = rope
    return out


def _common(**kw):
    base = dict(hidden_size=D, num_attention_heads=H, num_key_value_heads=HKV,
                num_hidden_layers=2, intermediate_size=128, vocab_size=32,
                max_position_embeddings=64, pad_token_id=None, bos_token_id=None,
                eos_token_id=None)
    if "rope" in kw:
        kw.update(_rope(kw.pop("rope")))
    base.update(kw)
    return base


def _eager(cfg):
    # the eager path is the plain math (and the one that honours softcap and sinks);
    # from_hf must not depend on which implementation the user picked
    cfg._attn_implementation = "eager"
    return cfg


def llama(scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
    if scaling == "llama3":
        # theta 100 and a 32-token original context put the 8 pairs' wavelengths
        # (6 .. 350) on all three sides of the llama3 bands (8 and 32)
        rope = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}
        bias = False
    elif scaling == "linear":
        rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
        bias = True
    else:  # yarn with DeepSeek-style mscale / mscale_all_dim, truncated ramp
        rope = {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0,
                "original_max_position_embeddings": 16, "mscale": 0.8, "mscale_all_dim": 0.5,
                "beta_fast": 8.0, "beta_slow": 1.0}
        bias = False
    cfg = _eager(LlamaConfig(**_common(attention_bias=bias, rope=rope)))
    layer = _randomize(LlamaAttention(cfg, 0), seed=1)
    scaling_dict = {k: v for k, v in rope.items() if k != "rope_theta"}
    return Case(f"llama-{scaling}", layer, LlamaRotaryEmbedding(cfg), sliding=False, expect=dict(
        rotary=dict(dim=16, theta=rope["rope_theta"], scaling=scaling_dict)))


def qwen2():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding
    cfg = _eager(Qwen2Config(**_common(rope={"rope_type": "default",
                                                        "rope_theta": 10000.0})))
    layer = _randomize(Qwen2Attention(cfg, 0), seed=2)
    return Case("qwen2", layer, Qwen2RotaryEmbedding(cfg), sliding=False, expect=dict(
        rotary=dict(dim=16, theta=10000.0)))


def mistral():
    from transformers import MistralConfig
    from transformers.models.mistral.modeling_mistral import (MistralAttention,
                                                              MistralRotaryEmbedding)
    # head_dim 32 with 4 heads: q is 128 wide, over a 64-wide model
    cfg = _eager(MistralConfig(**_common(sliding_window=4, head_dim=32,
                                         rope={"rope_theta": 1000.0})))
    layer = _randomize(MistralAttention(cfg, 0), seed=3)
    # Mistral's model masks every layer with config.sliding_window, W = 4: a query
    # sees itself and the 3 keys before it
    return Case("mistral", layer, MistralRotaryEmbedding(cfg), sliding=True, expect=dict(
        head_dim=32, rotary=dict(dim=32, theta=1000.0), window=(3, 0)))


def gemma2(layer_idx):
    from transformers import Gemma2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, Gemma2RotaryEmbedding
    cfg = _eager(Gemma2Config(**_common(head_dim=24, query_pre_attn_scalar=20,
                                        attn_logit_softcapping=1.5, sliding_window=5,
                                        rope={"rope_theta": 10000.0})))
    layer = _randomize(Gemma2Attention(cfg, layer_idx), seed=4 + layer_idx, qk_gain=2.0)
    sliding = cfg.layer_types[layer_idx] == "sliding_attention"
    return Case(f"gemma2-{'sliding' if sliding else 'full'}", layer, Gemma2RotaryEmbedding(cfg),
                sliding=sliding, expect=dict(
                    head_dim=24, rotary=dict(dim=24, theta=10000.0), scale=20 ** -0.5,
                    softcap=1.5, window=(4, 0) if sliding else None))


def gpt_oss(layer_idx):
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention, GptOssRotaryEmbedding
    # GPT-OSS's own rope settings (yarn, factor 32, no truncation, 4096-token
    # original context): with 8 pairs the ramp runs from pair 2.0 to 4.4
    rope = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
            "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096}
    cfg = _eager(GptOssConfig(**_common(head_dim=16, sliding_window=4, rope=rope,
                                        num_local_experts=2, num_experts_per_tok=1,
                                        max_position_embeddings=131072)))
    layer = _randomize(GptOssAttention(cfg, layer_idx), seed=6 + layer_idx)
    sliding = cfg.layer_types[layer_idx] == "sliding_attention"
    return Case(f"gpt_oss-{'sliding' if sliding else 'full'}", layer, GptOssRotaryEmbedding(cfg),
                sliding=sliding, expect=dict(
                    rotary=dict(dim=16, theta=150000.0,
                                scaling={k: v for k, v in rope.items() if k != "rope_theta"}),
                    window=(3, 0) if sliding else None))


def glm():
    from transformers import GlmConfig
    from transformers.models.glm.modeling_glm import GlmAttention, GlmRotaryEmbedding
    # GLM: half the head rotated (partial_rotary_factor 0.5), pairs interleaved
    cfg = _eager(GlmConfig(**_common(head_dim=16, partial_rotary_factor=0.5,
                                     rope={"rope_theta": 10000.0})))
    layer = _randomize(GlmAttention(cfg, 0), seed=8)
    return Case("glm", layer, GlmRotaryEmbedding(cfg), sliding=False, expect=dict(
        rotary=dict(dim=8, theta=10000.0, interleaved=True)))


def cohere():
    from transformers import CohereConfig
    from transformers.models.cohere.modeling_cohere import CohereAttention, CohereRotaryEmbedding
    cfg = _eager(CohereConfig(**_common(rope={"rope_theta": 10000.0})))
    layer = _randomize(CohereAttention(cfg, 0), seed=9)
    return Case("cohere", layer, CohereRotaryEmbedding(cfg), sliding=False, expect=dict(
        rotary=dict(dim=16, theta=10000.0, interleaved=True)))


def _sibling(model, prefix, idx=0, sliding=False, seed=20, **cfg_kw):
    """A layer of a family from_hf maps from reading its source (no special
    settings beyond those given); ``expect`` is filled in by the caller."""
    import importlib
    import transformers
    mod = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
    cfg = _eager(getattr(transformers, f"{prefix}Config")(**_common(**cfg_kw)))
    layer = _randomize(getattr(mod, f"{prefix}Attention")(cfg, idx), seed=seed)
    return layer, getattr(mod, f"{prefix}RotaryEmbedding")(cfg), cfg


def sibling(name):
    """Families whose attention differs from the five above only in the
    settings from_hf reads (see fastattn/hf.py's table)."""
    rot16 = dict(dim=16, theta=10000.0)
    if name == "mixtral":  # the model masks every layer with config.sliding_window
        layer, emb, _ = _sibling("mixtral", "Mixtral", sliding_window=4,
                                 rope={"rope_theta": 10000.0})
        return Case(name, layer, emb, True, dict(rotary=rot16, window=(3, 0)))
    if name == "starcoder2":  # biases everywhere (use_bias), config window
        layer, emb, _ = _sibling("starcoder2", "Starcoder2", sliding_window=5)
        return Case(name, layer, emb, True, dict(rotary=rot16, window=(4, 0)))
    if name == "ministral":  # every layer a "sliding_attention" layer
        layer, emb, _ = _sibling("ministral", "Ministral", sliding_window=4, head_dim=16)
        return Case(name, layer, emb, True, dict(rotary=rot16, window=(3, 0)))
    if name == "qwen2_moe-sliding":  # q/k/v biases (qkv_bias), window on layer 0 only
        layer, emb, _ = _sibling("qwen2_moe", "Qwen2Moe", use_sliding_window=True,
                                 sliding_window=4, max_window_layers=2, qkv_bias=True)
        return Case(name, layer, emb, True, dict(rotary=rot16, window=(3, 0)))
    if name == "gemma":
        layer, emb, _ = _sibling("gemma", "Gemma", head_dim=16)
        return Case(name, layer, emb, False, dict(rotary=rot16))
    if name == "granite":  # scale = config.attention_multiplier
        layer, emb, _ = _sibling("granite", "Granite", attention_multiplier=0.4)
        return Case(name, layer, emb, False, dict(rotary=rot16, scale=0.4))
    if name == "glm4":  # half the head rotated, pairs interleaved
        layer, emb, _ = _sibling("glm4", "Glm4", head_dim=16)
        return Case(name, layer, emb, False, dict(rotary=dict(dim=8, theta=10000.0,
                                                              interleaved=True)))
    if name == "cohere2-sliding":  # rotary (interleaved) on sliding layers only
        layer, emb, _ = _sibling("cohere2", "Cohere2", idx=0, sliding_window=4,
                                 num_hidden_layers=4)
        return Case(name, layer, emb, True, dict(rotary=dict(rot16, interleaved=True),
                                                 window=(3, 0)))
    if name == "cohere2-full":  # ... and none on its full layers
        layer, emb, _ = _sibling("cohere2", "Cohere2", idx=3, sliding_window=4,
                                 num_hidden_layers=4)
        return Case(name, layer, emb, False, dict(rotary=None))
    if name == "smollm3-nope":  # no_rope_layers[3] == 0: a NoPE layer
        layer, emb, _ = _sibling("smollm3", "SmolLM3", idx=3, num_hidden_layers=4)
        return Case(name, layer, emb, False, dict(rotary=None))
    if name == "olmo":  # clip_qkv unset
        layer, emb, _ = _sibling("olmo", "Olmo")
        return Case(name, layer, emb, False, dict(rotary=rot16))
    if name == "helium":
        layer, emb, _ = _sibling("helium", "Helium", head_dim=16)
        # Helium's pairs are interleaved, like GLM's (re-interleaved Llama-style cos/sin)
        return Case(name, layer, emb, False, dict(rotary=dict(dim=16, theta=100000.0,
                                                              interleaved=True)))
    if name == "seed_oss":  # q/k/v biases, no o bias (attention_out_bias)
        layer, emb, _ = _sibling("seed_oss", "SeedOss", head_dim=16)
        return Case(name, layer, emb, False, dict(rotary=rot16))
    if name == "arcee":
        layer, emb, _ = _sibling("arcee", "Arcee")
        return Case(name, layer, emb, False, dict(rotary=rot16))
    raise KeyError(name)


SIBLINGS = ("mixtral", "starcoder2", "ministral", "qwen2_moe-sliding", "gemma", "granite",
            "glm4", "cohere2-sliding", "cohere2-full", "smollm3-nope", "olmo", "helium",
            "seed_oss", "arcee")

BUILDERS = {
    "llama-llama3": lambda: llama("llama3"),
    "llama-linear": lambda: llama("linear"),
    "llama-yarn": lambda: llama("yarn"),
    "qwen2": qwen2,
    "mistral": mistral,
    "gemma2-sliding": lambda: gemma2(0),
    "gemma2-full": lambda: gemma2(1),
    "gpt_oss-sliding": lambda: gpt_oss(0),
    "gpt_oss-full": lambda: gpt_oss(1),
    "glm": glm,
    "cohere": cohere,
}
BUILDERS.update({name: (lambda name=name: sibling(name)) for name in SIBLINGS})


def build(name):
    case = BUILDERS[name]()
    assert case.name == name
    return case


def hf_params(layer):
    """The layer's weights in fastattn's names, float64 (None for absent biases)."""
    def get(lin, what):
        t = getattr(lin, what)
        return None if t is None else t.detach().double().numpy()
    out = {f"w_{p}": get(getattr(layer, f"{p}_proj"), "weight") for p in "qkvo"}
    out.update({f"b_{p}": get(getattr(layer, f"{p}_proj"), "bias") for p in "qkvo"})
    sinks = getattr(layer, "sinks", None)
    out["sinks"] = None if sinks is None else sinks.detach().double().numpy()
    return out


def hf_forward(case, x):
    """The layer's output for x (B, N, D) at positions 0..N-1, computed in float64,
    fed as its model feeds it: the model's cos/sin and the model's 4-D mask."""
    layer = copy.deepcopy(case.layer).double()
    rotary = copy.deepcopy(case.rotary_emb).double()
    xt = torch.from_numpy(np.asarray(x, np.float64))
    B, N, _ = xt.shape
    pos = torch.arange(N)[None].expand(B, N)
    make = (masking_utils.create_sliding_window_causal_mask if case.sliding
            else masking_utils.create_causal_mask)
    # the mask builders' keywords were renamed over the versions (input_embeds ->
    # inputs_embeds, past_key_values -> cache; 4.x needs cache_position)
    names = inspect.signature(make).parameters
    kw = {"config": layer.config, "attention_mask": None, "position_ids": pos,
          "inputs_embeds" if "inputs_embeds" in names else "input_embeds": xt,
          "cache" if "cache" in names else "past_key_values": None}
    if "cache_position" in names:
        kw["cache_position"] = torch.arange(N)
    mask = make(**kw)
    with torch.no_grad():
        cos, sin = rotary(xt, pos)
        y, _ = layer(xt, position_embeddings=(cos, sin), attention_mask=mask)
    return y.numpy()
