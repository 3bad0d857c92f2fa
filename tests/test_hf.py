"""fastattn.from_hf against Hugging Face's decoder attention layers.

Each case (tests/_hf_cases.py) is a small random layer run as its model runs
it, in float64; the module from_hf builds runs in float32.  Full forwards and
token-by-token decoding through a cache must both reproduce the layer.  The
reference itself is checked against the same layers in test_hf_reference.py.
"""
import copy
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fastattn  # noqa: E402
import _hf_cases as hf  # noqa: E402

CASES = sorted(hf.BUILDERS)
B, N = 2, 12
TOL = 2e-5  # float32 against the float64 layer, relative to the output's largest entry


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name == "qwen2_moe-sliding" and int(transformers.__version__.split(".")[0]) < 5:
            pytest.skip("from_hf maps Qwen2MoeAttention as transformers 5 defines it")
        if name not in cache:
            case = hf.build(name)
            x = np.random.default_rng(0).standard_normal((B, N, hf.D)).astype(np.float32)
            cache[name] = (case, x, hf.hf_forward(case, x))
        return cache[name]
    return get


@pytest.mark.parametrize("name", CASES)
def test_from_hf_full_forward(built, name):
    case, x, want = built(name)
    m = fastattn.from_hf(case.layer)
    assert m.dtype == np.float32
    y = m(x, is_causal=True)
    assert y.shape == want.shape and y.dtype == np.float32
    assert _rel(y, want) < TOL, name


@pytest.mark.parametrize("name", CASES)
def test_from_hf_decoding_matches_full_forward(built, name):
    case, x, want = built(name)
    m = fastattn.from_hf(case.layer)
    c = m.new_cache(B, N)
    steps = np.concatenate([m(x[:, t:t + 1], cache=c) for t in range(N)], axis=1)
    assert _rel(steps, want) < TOL, name
    assert _rel(steps, m(x, is_causal=True).astype(np.float64)) < 1e-5, name


def test_from_hf_float64_layer_is_float64_and_tight(built):
    """A float64 layer gives a float64 module: only the angles (float32 in
    transformers) are left between the two."""
    case, x, want = built("gpt_oss-sliding")
    m = fastattn.from_hf(copy.deepcopy(case.layer).double())
    assert m.dtype == np.float64
    assert _rel(m(x.astype(np.float64), is_causal=True), want) < 1e-6


def test_from_hf_bfloat16_layer_keeps_its_dtype():
    layer = hf.build("qwen2").layer.to(torch.bfloat16)
    m = fastattn.from_hf(layer)
    assert m.dtype == np.dtype(fastattn._dtypes.BFLOAT16)
    assert fastattn.from_hf(layer, dtype=np.float32).dtype == np.float32


def test_from_hf_qwen3_qk_norm_is_refused():
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention
    cfg = Qwen3Config(**hf._common(head_dim=16))
    with pytest.raises(ValueError, match="q_norm"):
        fastattn.from_hf(Qwen3Attention(cfg, 0))


def test_from_hf_other_modules_are_refused():
    with pytest.raises(TypeError, match="not a transformers decoder attention layer"):
        fastattn.from_hf(torch.nn.MultiheadAttention(8, 2))

    class LooksLikeLlama(torch.nn.Module):  # the right parts, a forward nobody has read
        def __init__(self):
            super().__init__()
            self.config = object()
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(self, p, torch.nn.Linear(8, 8))

    with pytest.raises(TypeError, match="LooksLikeLlama is not a supported attention layer"):
        fastattn.from_hf(LooksLikeLlama())
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    with pytest.raises(TypeError, match="self_attn"):
        fastattn.from_hf(LlamaDecoderLayer(LlamaConfig(**hf._common()), 0))


def test_from_hf_unsupported_settings_are_refused():
    from transformers import Gemma2Config, LlamaConfig, OlmoConfig
    from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.olmo.modeling_olmo import OlmoAttention
    dyn = LlamaConfig(**hf._common(rope={"rope_type": "dynamic", "factor": 2.0,
                                         "rope_theta": 10000.0}))
    with pytest.raises(ValueError, match="'dynamic'"):
        fastattn.from_hf(LlamaAttention(dyn, 0))
    with pytest.raises(ValueError, match="clip_qkv"):
        fastattn.from_hf(OlmoAttention(OlmoConfig(**hf._common(clip_qkv=8.0)), 0))
    bidir = Gemma2Attention(Gemma2Config(**hf._common(head_dim=16,
                                                      use_bidirectional_attention=True)), 0)
    if not bidir.is_causal:  # transformers 5: 4.x's Gemma2 has no such setting
        with pytest.raises(ValueError, match="bidirectional"):
            fastattn.from_hf(bidir)


def test_importing_fastattn_imports_neither_torch_nor_transformers():
    code = ("import sys, fastattn; fastattn.from_hf; "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_readme_llama_section_runs_and_its_claims_hold(capsys):
    """The README's "Running a Llama-style attention layer" examples, run as
    written; the differences they print are the ones the comments state."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Running a Llama-style"):text.index("## Serving many")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    printed = [float(v) for v in capsys.readouterr().out.split()]
    assert len(printed) == 2 and printed[0] < 1e-6 and printed[1] < 1e-6
