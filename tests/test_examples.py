"""Each script in examples/ runs, small, and its own checks hold (they
assert their outputs against a reference before they print timings)."""
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run(name, *args):
    r = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_port_torch_mha():
    pytest.importorskip("torch")
    out = run("port_torch_mha.py", "--seq", "24", "--dim", "64", "--heads", "4")
    assert "max relative difference" in out and "fastattn:" in out


def test_kv_cache_generation():
    out = run("kv_cache_generation.py", "--prompt", "12", "--new", "6", "--batch", "3",
              "--dim", "64", "--vocab", "50")
    assert "against the full causal forward" in out


def test_benchmark_side_by_side():
    out = run("benchmark_side_by_side.py", "--batch", "1", "--seq", "32", "--dim", "64",
              "--heads", "4", "--rounds", "2", "--threads", "1")
    assert "fastattn: median" in out and "numpy: median" in out


def test_readme_quick_start_runs():
    """The README's quick start, as written."""
    import re

    text = (EXAMPLES.parent / "README.md").read_text()
    section = text[text.index("## Quick start"):text.index("## Coming from PyTorch")]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    exec(compile(block, "README.md", "exec"), {})
