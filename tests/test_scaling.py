"""The measured case for the 1/sqrt(d_k) factor (fastattn.scaling), on fixed seeds."""

import math
import subprocess
import sys

import numpy as np
import pytest

from fastattn.tools import scaling

DKS = (4, 16, 64, 256, 1024)


@pytest.fixture(scope="module")
def rows():
    return scaling.measure(DKS, trials=200, length=128, seed=0)


def _get(rows, setting, dk, scaled):
    (row,) = [r for r in rows if (r.setting, r.dk, r.scaled) == (setting, dk, scaled)]
    return row


@pytest.mark.parametrize("dk", [d for d in DKS if d >= 16])
def test_score_variance_is_dk_unscaled_and_one_scaled(rows, dk):
    unscaled = _get(rows, "gaussian", dk, False).score_var
    scaled = _get(rows, "gaussian", dk, True).score_var
    assert abs(unscaled / dk - 1) < 0.10, unscaled
    assert abs(scaled - 1) < 0.10, scaled
    # same draws: the factor divides the variance by exactly d_k
    assert scaled == pytest.approx(unscaled / dk, rel=1e-9)


@pytest.mark.parametrize("setting", scaling.SETTINGS)
def test_unscaled_softmax_saturates_as_dk_grows(rows, setting):
    ent = [_get(rows, setting, dk, False).entropy for dk in DKS]
    maxp = [_get(rows, setting, dk, False).max_prob for dk in DKS]
    jac = [_get(rows, setting, dk, False).jacobian_norm for dk in DKS]
    assert all(a > b for a, b in zip(ent, ent[1:])), ent
    assert all(a < b for a, b in zip(maxp, maxp[1:])), maxp
    # |J| is small at both ends (uniform p and one-hot p): unscaled, it peaks
    # while the scores are still moderate, then falls as the softmax saturates
    peak = int(np.argmax(jac))
    assert all(a > b for a, b in zip(jac[peak:], jac[peak + 1:])), jac
    if setting == "gaussian":
        assert maxp[-1] > 0.9 and ent[-1] < 0.3  # close to one-hot at d_k = 1024
        assert jac[-1] < 0.5 * jac[peak]  # the gradient factor has collapsed
    else:
        assert jac[-1] < 0.7 * jac[peak]


@pytest.mark.parametrize("setting", scaling.SETTINGS)
def test_scaled_softmax_stays_in_a_narrow_band(rows, setting):
    ent = [_get(rows, setting, dk, True).entropy for dk in DKS]
    jac = [_get(rows, setting, dk, True).jacobian_norm for dk in DKS]
    assert max(ent) - min(ent) < 0.15, ent
    assert max(ent) < math.log(128)  # not uniform either: the scores still differ
    assert max(jac) / min(jac) < 1.3, jac


def test_softmax_statistics_match_a_direct_computation():
    rng = np.random.default_rng(3)
    p = rng.random((5, 9))
    p /= p.sum(axis=1, keepdims=True)
    max_prob, entropy, jac = scaling._softmax_stats(p)
    direct = [np.linalg.norm(np.diag(r) - np.outer(r, r)) for r in p]
    assert max_prob == pytest.approx(p.max(axis=1).mean())
    assert entropy == pytest.approx((-(p * np.log(p)).sum(axis=1)).mean())
    assert jac == pytest.approx(np.mean(direct))


def test_same_seed_same_numbers():
    a = scaling.measure((8, 32), trials=20, length=16, seed=5)
    b = scaling.measure((8, 32), trials=20, length=16, seed=5)
    assert a == b


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="dks"):
        scaling.measure((0, 8))
    with pytest.raises(ValueError, match="trials"):
        scaling.measure((8,), trials=1)


def test_cli_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "s.json"
    res = subprocess.run(
        [sys.executable, "-m", "fastattn", "scaling", "--dk", "8,64", "--trials", "20",
         "--json", str(out), "--no-progress"],
        capture_output=True, text=True, check=True,
    )
    assert "var(q.k)" in res.stdout and "gaussian" in res.stdout and "mhsa" in res.stdout
    import json

    data = json.loads(out.read_text())
    assert {r["dk"] for r in data["rows"]} == {8, 64}
