"""Shared presets for the benchmark suites: (B, N, D, H), float32."""

import time

import numpy as np
import pytest

PRESETS = {
    "small": (1, 128, 512, 8),
    "bert": (8, 512, 768, 12),
    "long": (1, 4096, 512, 8),
    "wide": (1, 1024, 1024, 16),
}


def pytest_addoption(parser):
    parser.addoption(
        "--presets",
        default="small,bert",
        help="comma-separated presets to benchmark (of: " + ", ".join(PRESETS) + ")",
    )


def pytest_generate_tests(metafunc):
    if "preset" in metafunc.fixturenames:
        names = [p for p in metafunc.config.getoption("presets").split(",") if p]
        unknown = [p for p in names if p not in PRESETS]
        if unknown:
            raise pytest.UsageError(f"unknown presets {unknown}; known: {list(PRESETS)}")
        metafunc.parametrize("preset", names)


@pytest.fixture
def settle():
    """Returns a function that pauses so the previous library's BLAS/OpenMP
    threads stop spinning before the next one is timed."""
    return lambda: time.sleep(0.2)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
