"""The `python -m fastattn` command line."""
import re
import subprocess
import sys

import pytest

import fastattn


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "fastattn", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_version_is_string():
    assert isinstance(fastattn.__version__, str)
    assert fastattn.__version__.strip() != ""


def test_info():
    r = run("info", timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert fastattn.__version__ in out
    low = out.lower()
    assert "openmp" in low
    assert "thread" in low
    assert "blas" in low
    # the thread count is printed as a number
    assert re.search(r"thread[^\n]*\d", low)
    # and the limits found, as fastattn.info() reports them
    cpus = fastattn.info()["limits"]["affinity_cpus"]
    assert re.search(rf"limits:\s+{cpus} cpus in the affinity mask", low)


def test_unknown_command_fails():
    r = run("definitely-not-a-command", timeout=60)
    assert r.returncode != 0


def test_demo_small():
    # `demo --help` advertises size options; a small run keeps this fast.
    h = run("demo", "--help", timeout=60)
    assert h.returncode == 0, h.stderr
    for opt in ("--batch", "--seq", "--d-model", "--heads"):
        assert opt in h.stdout
    for dtype, limit in (("float32", 1e-4), ("float64", 1e-10)):
        r = run("demo", "--batch", "2", "--seq", "67", "--d-model", "64", "--heads", "4",
                "--dtype", dtype, "--rounds", "1", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        low = r.stdout.lower()
        assert "max" in low and "ms" in low
        # the printed max error is small
        m = re.search(r"max[^\n=:]*[=:]\s*([0-9.]+(?:e[-+]?\d+)?)", low)
        assert m, r.stdout
        assert float(m.group(1)) < limit * 10, r.stdout


@pytest.mark.parametrize("args, needle", [
    (("demo", "--heads", "3"), "--heads (3) must divide --d-model (512)"),
    (("demo", "--d-model", "-16"), "--d-model: expected an integer >= 1, got -16"),
    (("demo", "--batch", "0"), "--batch: expected an integer >= 1, got 0"),
    (("demo", "--seq", "x"), "--seq: expected an integer, got 'x'"),
    (("demo", "--rounds", "0"), "--rounds: expected an integer >= 1, got 0"),
    (("demo", "--threads", "0"), "--threads: expected an integer from 1 to"),
    (("scaling", "--dk", "0"), "--dk must be comma-separated integers >= 1"),
    (("scaling", "--dk", "a,b"), "--dk must be comma-separated integers >= 1"),
    (("scaling", "--trials", "1"), "--trials: expected an integer >= 2, got 1"),
    (("scaling", "--length", "1"), "--length: expected an integer >= 2, got 1"),
    (("scaling", "--seed", "-1"), "--seed: expected an integer >= 0, got -1"),
])
def test_demo_and_scaling_refuse_bad_options(args, needle):
    # refused before any work: exit status 2, the option named, no traceback
    r = run(*args, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_demo_without_enough_memory_says_so():
    r = run("demo", "--batch", "1", "--seq", "99999999999", timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "demo: not enough memory for these sizes" in r.stderr
    assert "Traceback" not in r.stderr
