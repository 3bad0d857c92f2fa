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
