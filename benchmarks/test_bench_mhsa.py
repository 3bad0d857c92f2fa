"""pytest-benchmark suites: the full MultiHeadSelfAttention forward and the
attention core, fastattn and every peer installed here, on the same inputs.

Run: ``pytest benchmarks/ --benchmark-only [--presets small,bert,long,wide,decode]``
(all presets by default; a few minutes, most of it the NumPy peer at long)
(group = preset and part; compare the rows of a group).  The ``_bf16`` suites
time the bfloat16 paths (fastattn's where it has one, torch's and OpenVINO's).  Each peer is checked
against fastattn before it is timed.  ``python -m fastattn bench`` measures the
same cases in interleaved rounds and prints ratios.
"""

import functools
import time

import numpy as np
import pytest

import fastattn
from fastattn.tools import peers
from fastattn.tools.benchmark import PRESETS, build_cases

FULL_IMPLS = ("fastattn",) + peers.FULL_PEERS
CORE_IMPLS = ("fastattn",) + peers.CORE_PEERS
BF16_FULL_IMPLS = ("fastattn",) + peers.PEERS["bfloat16"][0]
BF16_CORE_IMPLS = ("fastattn",) + peers.PEERS["bfloat16"][1]


@functools.lru_cache(maxsize=2)
def _cases(preset, part, num_threads, dtype):
    # built (and every peer checked against fastattn) once per preset and part,
    # not once per implementation
    return build_cases(preset, num_threads, (part,), dtype)[0]


def _case(preset, part, impl, dtype="float32"):
    cases = _cases(preset, part, fastattn.get_num_threads(), dtype)
    if impl not in cases[part]:
        pytest.skip(f"{impl} has no {dtype} path here (not installed, or too old)")
    return cases[part][impl]


def _bench(benchmark, fn, group):
    fn()
    time.sleep(0.15)  # let the previous library's worker threads stop spinning
    benchmark.group = group
    benchmark.pedantic(fn, rounds=7, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("impl", FULL_IMPLS)
def test_mhsa_forward(benchmark, preset, impl):
    _bench(benchmark, _case(preset, "full", impl), f"full {preset} {PRESETS[preset]}")


@pytest.mark.parametrize("impl", CORE_IMPLS)
def test_attention_core(benchmark, preset, impl):
    _bench(benchmark, _case(preset, "core", impl), f"core {preset} {PRESETS[preset]}")


@pytest.mark.parametrize("impl", BF16_FULL_IMPLS)
def test_mhsa_forward_bf16(benchmark, preset, impl):
    _bench(benchmark, _case(preset, "full", impl, "bfloat16"),
           f"full bf16 {preset} {PRESETS[preset]}")


@pytest.mark.parametrize("impl", BF16_CORE_IMPLS)
def test_attention_core_bf16(benchmark, preset, impl):
    _bench(benchmark, _case(preset, "core", impl, "bfloat16"),
           f"core bf16 {preset} {PRESETS[preset]}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fastattn_dtypes(benchmark, dtype):
    """fastattn alone, float32 against float64 at small."""
    B, N, D, H = PRESETS["small"]
    m = fastattn.MultiHeadSelfAttention(D, H, dtype=dtype, seed=0)
    x = np.random.default_rng(0).standard_normal((B, N, D)).astype(dtype)
    _bench(benchmark, lambda: m(x), "fastattn dtype small")
