"""Small helpers shared by the tests."""
import re

import numpy as np

# Tolerances used against the float64 reference.
#   float32: rtol 2e-5 / atol 1e-5  (inputs ~N(0,1), outputs O(1); a float32
#            implementation is typically within ~1e-6 of exact)
#   float64: rtol 1e-11 / atol 1e-12
TOL = {
    np.dtype(np.float32): dict(rtol=2e-5, atol=1e-5),
    np.dtype(np.float64): dict(rtol=1e-11, atol=1e-12),
}
# Module forward has two extra projections: slightly looser for float32.
MOD_TOL = {
    np.dtype(np.float32): dict(rtol=2e-5, atol=2e-5),
    np.dtype(np.float64): dict(rtol=1e-11, atol=1e-12),
}


def tol(dtype):
    return TOL[np.dtype(dtype)]


def mod_tol(dtype):
    return MOD_TOL[np.dtype(dtype)]


def name_re(name):
    """Regex matching `name` as a standalone identifier (e.g. 'k' but not 'key')."""
    return r"(?<![A-Za-z0-9_])" + re.escape(name) + r"(?![A-Za-z0-9_])"


def shape_re(shape):
    """Regex for a shape as printed: '(2, 3, 4)', '(4,)', '[2, 3, 4]', '(2x3x4)'."""
    nums = [str(int(s)) for s in shape]
    if not nums:
        return r"\(\s*\)"
    inner = r"\s*(?:,|x|\u00d7)\s*".join(nums)
    return r"[\(\[]\s*" + inner + r"\s*,?\s*[\)\]]"


def assert_msg(excinfo, names=(), shapes=(), numbers=()):
    """The exception message must name at least one of `names`, show at least
    one of `shapes`, and contain every number in `numbers` as a word."""
    msg = str(excinfo.value)
    if names:
        assert any(re.search(name_re(n), msg) for n in names), (
            f"message should name one of {names}: {msg!r}")
    if shapes:
        assert any(re.search(shape_re(s), msg) for s in shapes), (
            f"message should show one of the shapes {shapes}: {msg!r}")
    for num in numbers:
        assert re.search(r"(?<![0-9])" + str(num) + r"(?![0-9])", msg), (
            f"message should contain {num}: {msg!r}")


def randn(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)
