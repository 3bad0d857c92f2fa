"""Full MultiHeadSelfAttention forward and the attention core, fastattn vs peers.

Run: ``pytest benchmarks/ --benchmark-only [--presets small,bert,long,wide]``.
Every comparison is checked against fastattn before it is timed; pytest-benchmark's
table then gives each implementation's time side by side (group = preset).
"""

import numpy as np
import pytest

import fastattn
from fastattn.reference import mhsa_numpy, sdpa_numpy

from conftest import PRESETS

torch = None
try:  # optional peer
    import torch  # noqa: F811
except ImportError:
    pass

IMPLS = ["fastattn", "numpy"] + (["torch"] if torch is not None else [])


def _module_and_input(preset, rng):
    B, N, D, H = PRESETS[preset]
    m = fastattn.MultiHeadSelfAttention(D, H, seed=0)
    x = rng.standard_normal((B, N, D)).astype(np.float32)
    return m, x


@pytest.mark.parametrize("impl", IMPLS)
def test_mhsa_forward(benchmark, preset, impl, rng, settle):
    m, x = _module_and_input(preset, rng)
    expected = m(x)
    if impl == "fastattn":
        fn = lambda: m(x)  # noqa: E731
    elif impl == "numpy":
        fn = lambda: mhsa_numpy(m, x)  # noqa: E731
    else:
        B, N, D, H = PRESETS[preset]
        t = torch.nn.MultiheadAttention(D, H, batch_first=True).eval()
        t.load_state_dict({
            "in_proj_weight": torch.from_numpy(np.concatenate([m.w_q, m.w_k, m.w_v])),
            "in_proj_bias": torch.from_numpy(np.concatenate([m.b_q, m.b_k, m.b_v])),
            "out_proj.weight": torch.from_numpy(m.w_o.copy()),
            "out_proj.bias": torch.from_numpy(m.b_o.copy()),
        })
        xt = torch.from_numpy(x)

        def fn():
            with torch.inference_mode():
                return t(xt, xt, xt, need_weights=False)[0]
    np.testing.assert_allclose(np.asarray(fn()), expected, rtol=2e-4, atol=2e-5)
    settle()
    benchmark.group = f"mhsa {preset}"
    benchmark.pedantic(fn, rounds=7, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("impl", IMPLS)
def test_attention_core(benchmark, preset, impl, rng, settle):
    B, N, D, H = PRESETS[preset]
    E = D // H
    q, k, v = (rng.standard_normal((B, H, N, E)).astype(np.float32) for _ in range(3))
    expected = fastattn.scaled_dot_product_attention(q, k, v)
    if impl == "fastattn":
        fn = lambda: fastattn.scaled_dot_product_attention(q, k, v)  # noqa: E731
    elif impl == "numpy":
        fn = lambda: sdpa_numpy(q, k, v)  # noqa: E731
    else:
        qt, kt, vt = (torch.from_numpy(a) for a in (q, k, v))

        def fn():
            with torch.inference_mode():
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
    np.testing.assert_allclose(np.asarray(fn()), expected, rtol=2e-4, atol=2e-5)
    settle()
    benchmark.group = f"core {preset}"
    benchmark.extra_info["gflop"] = 4 * B * H * N * N * E / 1e9
    benchmark.pedantic(fn, rounds=7, warmup_rounds=1, iterations=1)
