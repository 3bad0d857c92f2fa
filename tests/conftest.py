"""Shared pytest configuration for the fastattn test suite.

The helper modules (reference.py, _util.py, seed_torch.py) live next to the
tests; make them importable regardless of pytest's import mode.
"""
import os
import sys

import numpy as np
import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture
def rng():
    """A fixed-seed generator; every test gets the same stream."""
    return np.random.default_rng(20240601)
