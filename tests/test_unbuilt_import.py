"""Importing fastattn from a source checkout whose kernels were never built
says what to do, instead of Python's 'cannot import name' (which reads like a
circular import)."""
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _import_from(tmp_path, with_setup_py):
    shutil.copytree(ROOT / "fastattn", tmp_path / "fastattn",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c", "__pycache__"))
    if with_setup_py:
        shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    assert not list((tmp_path / "fastattn").rglob("*.so"))
    # -I: no user site, no PYTHONPATH, so the copy in the cwd is what imports
    code = "import sys; sys.path.insert(0, '.'); import fastattn"
    return subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_unbuilt_checkout_says_how_to_build(tmp_path):
    r = _import_from(tmp_path, with_setup_py=True)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: fastattn's compiled kernels are missing"), r.stderr
    assert "pip install -e ." in last and "python setup.py build_ext --inplace" in last
    assert "outside the checkout" in last
    assert "circular import" not in r.stderr


def test_unbuilt_install_says_to_reinstall(tmp_path):
    r = _import_from(tmp_path, with_setup_py=False)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "compiled kernels are missing" in last and "reinstall" in last, r.stderr
    assert "circular import" not in r.stderr
