"""Our float64 reference (tests/reference.py) against Hugging Face's layers.

The from_hf parity tests (test_hf.py) trust ref_rotary / ref_mhsa's model of
each layer; these tests check that model against the layers themselves, as
their models run them (eager attention, the model's rotary embedding at
positions 0..N-1, the model's causal or sliding-window mask), in float64.
What is left is Hugging Face computing its angles in float32.
"""
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import _hf_cases as hf  # noqa: E402
from reference import ref_mhsa, ref_rotary, rope_inv_freq  # noqa: E402

CASES = sorted(hf.BUILDERS)


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", CASES)
def test_reference_matches_hf_layer(name):
    case = hf.build(name)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 12, hf.D))
    want = hf.hf_forward(case, x)
    got, _ = ref_mhsa(x, hf.hf_params(case.layer), hf.H, hf.HKV, is_causal=True, **case.expect)
    assert _rel(got, want) < 1e-5, name


# (the layers that rotate nothing, Cohere2's full layers and SmolLM3's NoPE
# ones, have no frequencies to compare: their forward is checked above)
ROTATING = [name for name in CASES if name not in ("cohere2-full", "smollm3-nope")]


@pytest.mark.parametrize("name", ROTATING)
def test_rope_inv_freq_matches_hf_rotary(name):
    """The frequencies and attention factor themselves (float32 in Hugging Face)."""
    case = hf.build(name)
    rot = case.expect["rotary"]
    assert rot is not None, name
    inv_freq, att = rope_inv_freq(rot["dim"], rot["theta"], rot.get("scaling"))
    np.testing.assert_allclose(inv_freq, case.rotary_emb.inv_freq.double().numpy(), rtol=2e-6)
    assert att == pytest.approx(case.rotary_emb.attention_scaling, rel=1e-12)


def test_reference_bands_differ():
    """The cases would notice a wrong band: each scaling moves some pair."""
    base, _ = rope_inv_freq(16, 100.0)
    l3 = rope_inv_freq(16, 100.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 32})[0]
    assert l3[0] == base[0] and l3[-1] == base[-1] / 8 and base[1] / 8 < l3[1] < base[1]
    x = np.random.default_rng(1).standard_normal((3, 8))
    half = ref_rotary(x, np.arange(3), 8)
    inter = ref_rotary(x, np.arange(3), 8, interleaved=True)
    assert np.allclose(half[0], x[0]) and not np.allclose(half[1:], inter[1:])
    part = ref_rotary(x, np.arange(3), 4)
    assert np.array_equal(part[:, 4:], x[:, 4:])
