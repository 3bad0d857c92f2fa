"""Installing and importing fail with a message that says what to do.

* A missing OpenMP runtime at import time (slim container images lack
  libgomp.so.1): simulated for real, on a copy of the built package whose
  driver extension names a libgomp that no system has, so the dynamic loader
  itself refuses it; and the loaders' wordings (glibc, musl, macOS) parsed.
* A build without a C compiler, or without Python's headers: setup.py run in
  a copy of the sources with CC pointing nowhere, or at a compiler that cannot
  see Python.h.
* What the wheel and the sdist carry, from setup.py's build_py and sdist (a
  whole wheel takes over a minute to compile: .ci/run builds, repairs and
  installs one).

(The unbuilt checkout's message is tests/test_unbuilt_import.py.)
"""
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tarfile

import pytest

import fastattn
from fastattn import _dispatch

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = pathlib.Path(fastattn.__file__).resolve().parent

# -I: no user site, no PYTHONPATH, so the copy in the cwd is what imports
IMPORT_COPY = "import sys; sys.path.insert(0, '.'); import fastattn"


# --- a missing OpenMP runtime -------------------------------------------------

def _driver_library():
    found = sorted((PACKAGE / "_kernels").glob("_driver.*"))
    found = [p for p in found if p.suffix in (".so", ".pyd", ".dylib")]
    return found[0] if found else None


def test_missing_libgomp_says_what_to_install(tmp_path):
    driver = _driver_library()
    if sys.platform != "linux" or driver is None:
        pytest.skip("needs a Linux build of the kernels (an ELF driver extension)")
    needed = b"libgomp.so.1\0"
    if needed not in driver.read_bytes():
        pytest.skip("this build does not link libgomp (built without OpenMP, or another "
                    "OpenMP runtime)")
    shutil.copytree(PACKAGE, tmp_path / "fastattn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    copy = tmp_path / "fastattn" / "_kernels" / driver.name
    # The driver's dynamic section names its libraries in a string table; a
    # name of the same length keeps the file valid, and no system has
    # libgomp.so.X, so the loader fails exactly as it does on an image
    # without libgomp1
    data = copy.read_bytes()
    copy.write_bytes(data.replace(needed, b"libgomp.so.X\0"))
    r = subprocess.run([sys.executable, "-I", "-c", IMPORT_COPY], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: fastattn's compiled kernels in "), r.stderr
    assert "the OpenMP runtime libgomp.so.X, which is not installed here" in last
    assert "libgomp.so.X: cannot open shared object file" in last  # the loader's own words
    assert "`apt install libgomp1`" in last and "manylinux wheel" in last
    # the raw error is not what ends the traceback, nor a chained second one
    assert "During handling of the above exception" not in r.stderr


@pytest.mark.parametrize("text, library", [
    # glibc
    ("libgomp.so.1: cannot open shared object file: No such file or directory",
     "libgomp.so.1"),
    # musl
    ("Error loading shared library libgomp.so.1: No such file or directory (needed by "
     "/x/fastattn/_kernels/_driver.cpython-311-x86_64-linux-musl.so)", "libgomp.so.1"),
    # macOS
    ("dlopen(/x/fastattn/_kernels/_driver.cpython-311-darwin.so, 0x0002): Library not "
     "loaded: @rpath/libomp.dylib\n  Referenced from: <0A1B> /x/_driver.so\n  Reason: "
     "tried: '/opt/homebrew/opt/libomp/lib/libomp.dylib' (no such file)", "libomp.dylib"),
    ("libfoo.so.3: cannot open shared object file: No such file or directory", "libfoo.so.3"),
    ("cannot import name 'attention' from partially initialized module", None),
    ("/x/_driver.so: undefined symbol: GOMP_parallel", None),
])
def test_loader_messages_are_read(text, library):
    assert _dispatch._missing_library(ImportError(text)) == library


def test_missing_openmp_message_names_the_package(monkeypatch):
    err = ImportError("libgomp.so.1: cannot open shared object file: No such file or directory")
    monkeypatch.setattr(sys, "platform", "linux")
    msg = str(_dispatch._missing_runtime(err, "libgomp.so.1"))
    assert "the OpenMP runtime libgomp.so.1, which is not installed here" in msg
    assert "`apt install libgomp1`" in msg and "`dnf install libgomp`" in msg
    assert "manylinux wheel" in msg and "cannot open shared object file" in msg
    monkeypatch.setattr(sys, "platform", "darwin")
    msg = str(_dispatch._missing_runtime(ImportError("Library not loaded: @rpath/libomp.dylib"),
                                         "libomp.dylib"))
    assert "`brew install libomp`" in msg
    msg = str(_dispatch._missing_runtime(ImportError("x"), "libfoo.so.3"))
    assert "the shared library libfoo.so.3" in msg and "OpenMP" not in msg


# --- building without a compiler ------------------------------------------------

def _needs_build_tools():
    try:
        import Cython  # noqa: F401
        import setuptools
    except ImportError as exc:
        pytest.skip(f"setup.py needs Cython and setuptools (the test extra has them): {exc}")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setup.py needs setuptools>=77 (have {setuptools.__version__})")


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    """The sources a build reads, copied: setup.py runs there, never in the
    checkout.  Generated .c files come along with their times when the
    checkout has them, so that Cython need not run again."""
    _needs_build_tools()
    dest = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "fastattn", dest / "fastattn",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    shutil.copytree(ROOT / "tests", dest / "tests",
                    ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
    return dest


def _setup(src, *args, env=None):
    full = dict(os.environ, **(env or {}))
    full.pop("FASTATTN_EXTRA_CFLAGS", None)
    return subprocess.run([sys.executable, "setup.py", *args], cwd=src, env=full,
                          capture_output=True, text=True, timeout=300)


def test_build_without_compiler_says_what_to_install(source_copy):
    r = _setup(source_copy, "build_ext", "--inplace", env={"CC": "/nonexistent/cc"})
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "fastattn: no working C compiler" in out, out[-3000:]
    assert "/nonexistent/cc" in out
    assert "`apt install build-essential python3-dev`" in out
    assert "binary wheel" in out
    # stopped before compiling anything (or probing OpenMP)
    assert not list((source_copy / "fastattn" / "_kernels").glob("*.so"))
    assert "OpenMP" not in out


def test_build_without_python_headers_says_what_to_install(source_copy, tmp_path):
    if sys.platform != "linux":
        pytest.skip("the stand-in compiler is a POSIX script")
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no {cc} to wrap")
    hidden = {"-I" + p for p in {sysconfig.get_paths()["include"],
                                 sysconfig.get_paths()["platinclude"],
                                 os.path.join(sys.prefix, "include"),
                                 os.path.join(sys.base_prefix, "include")}}
    # the real compiler, minus the include paths that hold Python.h: what a
    # system without python3-dev looks like to the build
    wrapper = tmp_path / "cc-without-python-headers"
    wrapper.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        f"hidden = {sorted(hidden)!r}\n"
        "args = [a for a in sys.argv[1:] if a not in hidden]\n"
        f"os.execvp({cc!r}, [{cc!r}] + args)\n")
    wrapper.chmod(0o755)
    r = _setup(source_copy, "build_ext", "--inplace", env={"CC": str(wrapper)})
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "cannot find Python's headers (Python.h" in out, out[-3000:]
    assert "`apt install build-essential python3-dev`" in out
    assert not list((source_copy / "fastattn" / "_kernels").glob("*.so"))


# --- what the wheel and the sdist hold ----------------------------------------

SOURCE_SUFFIXES = (".c", ".pyx", ".pxi", ".pxd", ".tp", ".h")


def test_wheel_python_part_holds_no_sources(source_copy, tmp_path):
    # build_py makes everything of the wheel but the compiled extensions
    r = _setup(source_copy, "build_py", "--build-lib", str(tmp_path / "lib"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "Package would be ignored" not in out  # setuptools' warning about _kernels/src
    files = [p.relative_to(tmp_path / "lib").as_posix()
             for p in (tmp_path / "lib").rglob("*") if p.is_file()]
    assert "fastattn/__init__.py" in files and "fastattn/py.typed" in files
    assert "fastattn/_kernels/__init__.py" in files and "fastattn/tools/benchmark.py" in files
    assert [f for f in files if f.endswith(SOURCE_SUFFIXES)] == []


def test_sdist_holds_what_a_source_build_needs(source_copy, tmp_path):
    r = _setup(source_copy, "sdist", "--dist-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    (archive,) = tmp_path.glob("fastattn-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    kernels = ROOT / "fastattn" / "_kernels"
    needed = {"setup.py", "pyproject.toml", "LICENSE", "README.md",
              "tests/conftest.py", "tests/data/bit_identical.json"}
    for pattern in ("*.pyx", "*.pxd", "*.pxi.tp", "src/*.h"):
        needed |= {p.relative_to(ROOT).as_posix() for p in kernels.glob(pattern)}
    needed |= {p.relative_to(ROOT).as_posix() for p in kernels.glob("*.pxi")
               if p.name != "_typed.pxi"}
    assert not needed - names
    generated = [n for n in names if n.endswith((".c", ".so")) or n.endswith("_typed.pxi")]
    assert generated == []
