"""Build of the fastattn kernels.

The kernels' work items (fastattn/_kernels/_kernel.pxi and the files it
includes) are compiled into one extension per instruction set,
fastattn._kernels._<isa>: baseline (whatever the compiler targets by
default), AVX2+FMA, AVX-512, and AVX-512 with AVX512-BF16 on x86-64.  Everything else of the compiled
layer (entry points, checks, ForwardPlan, the OpenMP team) is one extension,
fastattn._kernels._driver, built without instruction-set flags; each kernel
build hands it a table of function pointers.  fastattn/_dispatch.py loads the
widest build the CPU runs, so a wheel stays portable without -march=native.

Before Cython runs, fastattn/_kernels/_typed.pxi.tp (a Tempita template over
the list of element types) is expanded into _typed.pxi next to it.

OpenMP is probed by compiling and running a tiny program; without it the
kernels build single-threaded and the build says so.

Environment switches:
  FASTATTN_BOUNDSCHECK=1  turn Cython's bounds and None checks back on
  FASTATTN_NO_OPENMP=1    build without OpenMP even when the compiler has it
  FASTATTN_EXTRA_CFLAGS   extra compile and link flags (e.g. sanitizers)
"""

import glob
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap

import numpy as np
from Cython import Tempita
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_TEST = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d\\n", n);
        return n > 0 ? 0 : 1;
    }
    """
)


def _openmp_flags(compiler_type):
    """(compile flags, link flags) that turn OpenMP on for this compiler."""
    if compiler_type == "msvc":
        return ["/openmp"], []
    if sys.platform == "darwin":
        # Apple clang: OpenMP only through libomp (Homebrew's or conda's).
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def _probe_openmp(compiler, compile_flags, link_flags):
    """Compiles, links and runs a tiny OpenMP program; True if all three work."""
    tmp = tempfile.mkdtemp(prefix="fastattn-omp-")
    try:
        src = os.path.join(tmp, "omp_probe.c")
        with open(src, "w") as f:
            f.write(OPENMP_TEST)
        objects = compiler.compile([src], output_dir=tmp, extra_postargs=compile_flags)
        exe = os.path.join(tmp, "omp_probe")
        compiler.link_executable(objects, exe, extra_postargs=link_flags)
        subprocess.run([exe], check=True, capture_output=True, timeout=60)
        return True
    except Exception:  # any failure means: no usable OpenMP
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    def build_extensions(self):
        ctype = self.compiler.compiler_type
        extra = os.environ.get("FASTATTN_EXTRA_CFLAGS", "").split()
        omp_c, omp_l = _openmp_flags(ctype)
        use_omp = not os.environ.get("FASTATTN_NO_OPENMP")
        if use_omp and not _probe_openmp(self.compiler, omp_c, omp_l):
            use_omp = False
            print(
                "fastattn: WARNING: this compiler has no usable OpenMP; the kernels are "
                "built single-threaded (fastattn.info() reports openmp: off)",
                file=sys.stderr,
            )
        print(f"fastattn: OpenMP {'on' if use_omp else 'off'}", file=sys.stderr)
        opt = ["/O2"] if ctype == "msvc" else ["-O3"]
        for ext in self.extensions:
            ext.extra_compile_args = opt + ext.extra_compile_args + extra
            ext.extra_link_args = ext.extra_link_args + extra
            if use_omp:
                ext.extra_compile_args += omp_c
                ext.extra_link_args += omp_l
        super().build_extensions()


def _isa_flags():
    """Instruction-set builds for this platform: {name: extra compile flags}."""
    machine = platform.machine().lower()
    avx512 = ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma", "-mavx2",
              "-mf16c", "-mprefer-vector-width=512"]
    if machine in ("x86_64", "amd64", "i686", "x86") and sysconfig.get_platform() != "win32":
        return {
            "baseline": [],
            "avx2": ["-mavx2", "-mfma", "-mf16c"],
            "avx512": avx512,
            # the same kernels; bfloat16 projections multiply pairs (VDPBF16PS)
            "avx512bf16": avx512 + ["-mavx512bf16"],
        }
    return {"baseline": []}


KERNELS = "fastattn/_kernels"
SRC = "fastattn/_kernels/src"


def _generate(template):
    """Expands a Tempita template (x.pxi.tp -> x.pxi).  The file is rewritten
    only when its text changes: a new timestamp alone would make cythonize
    recompile every build."""
    target = template[: -len(".tp")]
    with open(template) as f:
        text = Tempita.Template(f.read(), name=template).substitute()
    if os.path.exists(target):
        with open(target) as f:
            if f.read() == text:
                return target
    with open(target, "w") as f:
        f.write(text)
    return target


def _extensions():
    _generate(os.path.join(KERNELS, "_typed.pxi.tp"))
    depends = sorted(glob.glob(os.path.join(KERNELS, "*.pxi"))
                     + glob.glob(os.path.join(KERNELS, "*.pxd"))
                     + glob.glob(os.path.join(SRC, "*.h")))
    common = dict(include_dirs=[np.get_include(), SRC],
                  define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
                  depends=depends)
    # the driver gets no -m flags: it must import on any CPU, and it checks and
    # sets up for every build alike (see _driver.pyx)
    exts = [Extension("fastattn._kernels._driver", [f"{KERNELS}/_driver.pyx"], **common)]
    for isa, flags in _isa_flags().items():
        exts.append(
            Extension(
                f"fastattn._kernels._{isa}",
                [f"{KERNELS}/_{isa}.pyx"],
                extra_compile_args=list(flags),
                **common,
            )
        )
    checks = bool(os.environ.get("FASTATTN_BOUNDSCHECK"))
    return cythonize(
        exts,
        compiler_directives={
            "language_level": 3,
            "boundscheck": checks,
            "wraparound": checks,
            "initializedcheck": checks,
            "nonecheck": checks,
            "cdivision": True,
        },
    )


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
