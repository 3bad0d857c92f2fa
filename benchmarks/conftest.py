"""Options for the pytest-benchmark suites: which presets to run."""

import pytest

from fastattn.benchmark import PRESETS


def pytest_addoption(parser):
    parser.addoption(
        "--presets",
        default="small,bert,decode",
        help="comma-separated presets to benchmark (of: " + ", ".join(PRESETS) + ")",
    )


def pytest_generate_tests(metafunc):
    if "preset" in metafunc.fixturenames:
        names = [p for p in metafunc.config.getoption("presets").split(",") if p]
        unknown = [p for p in names if p not in PRESETS]
        if unknown:
            raise pytest.UsageError(f"unknown presets {unknown}; known: {list(PRESETS)}")
        if metafunc.function.__name__ == "test_mhsa_forward":
            names = [p for p in names if p != "decode"]  # one query: a core case only
        metafunc.parametrize("preset", names)
