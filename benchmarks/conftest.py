"""Options for the pytest-benchmark suites: which presets to run (default: all;
``--presets small`` for a quick look), and NumPy's BLAS held to fastattn's
thread count, as the bench command holds it."""

import pytest

import fastattn
from fastattn.tools.benchmark import DEFAULT_SHAPES, PRESETS


@pytest.fixture(scope="session", autouse=True)
def _blas_threads():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the numpy peer then uses its BLAS's own default
        yield
        return
    with threadpool_limits(limits=fastattn.get_num_threads(), user_api="blas"):
        yield


def pytest_addoption(parser):
    parser.addoption(
        "--presets",
        default=",".join(DEFAULT_SHAPES),
        help="comma-separated presets to benchmark (of: " + ", ".join(PRESETS) + ")",
    )


def pytest_generate_tests(metafunc):
    if "preset" in metafunc.fixturenames:
        names = [p for p in metafunc.config.getoption("presets").split(",") if p]
        unknown = [p for p in names if p not in PRESETS]
        if unknown:
            raise pytest.UsageError(f"unknown presets {unknown}; known: {list(PRESETS)}")
        if metafunc.function.__name__.startswith("test_mhsa_forward"):
            names = [p for p in names if p != "decode"]  # one query: a core case only
        metafunc.parametrize("preset", names)
