"""The `python -m fastattn` command line."""
import re
import subprocess
import sys

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
