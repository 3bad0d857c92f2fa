"""Smoke test of an installed fastattn wheel (run by .ci/run and by
cibuildwheel's test step, from a directory outside the source tree).

Checks that fastattn imports from the environment, not from a checkout; says
which kernel build runs (fastattn.info()); that OpenMP is on and, where the
wheel was repaired to bundle its OpenMP runtime, that the bundled copy is the
one loaded; and that a module's forward matches the same attention written
in NumPy (float64), with and without a causal mask.  Exits non-zero on any
failure.  Needs only NumPy and the wheel.
"""
import os
import sys

import numpy as np

import fastattn

SOURCE_TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference(m, x, causal):
    """softmax(Q K^T / sqrt(E) [+ causal mask]) V per head, projected in and
    out, in float64: written from the definition, sharing no code with the
    package (unlike fastattn.tools.numpy_seed, which the demo uses)."""
    x = x.astype(np.float64)
    B, N, D = x.shape
    H, E = m.num_heads, m.head_dim
    w = {k: getattr(m, k).astype(np.float64) for k in ("w_q", "w_k", "w_v", "w_o")}
    b = {k: getattr(m, k).astype(np.float64) for k in ("b_q", "b_k", "b_v", "b_o")}
    heads = lambda t: t.reshape(B, N, H, E).transpose(0, 2, 1, 3)  # noqa: E731
    q = heads(x @ w["w_q"].T + b["b_q"])
    k = heads(x @ w["w_k"].T + b["b_k"])
    v = heads(x @ w["w_v"].T + b["b_v"])
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(E)
    if causal:
        s = np.where(np.tril(np.ones((N, N), dtype=bool)), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    out = (p @ v).transpose(0, 2, 1, 3).reshape(B, N, H * E)
    return out @ w["w_o"].T + b["b_o"]


def loaded_openmp_runtimes():
    """Paths of the OpenMP runtimes mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return None
    return sorted(p for p in paths if "libgomp" in os.path.basename(p)
                  or "libomp" in os.path.basename(p))


def main():
    where = os.path.dirname(os.path.abspath(fastattn.__file__))
    print(f"fastattn {fastattn.__version__} from {where}")
    if where.startswith(SOURCE_TREE + os.sep):
        sys.exit(f"FAIL: fastattn imported from the source tree ({where}), not the wheel")

    info = fastattn.info()
    print(f"kernel build: {info['kernel_isa']} (available here: {info['available_isas']}); "
          f"OpenMP: {'on' if info['openmp'] else 'off'}; threads: {info['num_threads']}; "
          f"{info['machine']}, Python {info['python']}, NumPy {info['numpy']}")
    if not info["openmp"]:
        sys.exit("FAIL: this wheel's kernels were built without OpenMP")

    fastattn.set_num_threads(2)  # a parallel region even on one core
    m = fastattn.MultiHeadSelfAttention(48, 4, seed=0)  # float32
    x = np.random.default_rng(1).standard_normal((3, 37, 48)).astype(np.float32)
    for causal in (False, True):
        y = m(x, is_causal=causal)
        ref = reference(m, x, causal)
        err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
        print(f"forward, is_causal={causal}: {y.shape} {y.dtype}, max relative error "
              f"against NumPy float64 {err:.1e}")
        if y.shape != x.shape or y.dtype != np.float32 or not err < 1e-4:
            sys.exit("FAIL: the forward does not match the NumPy formulation")

    runtimes = loaded_openmp_runtimes()
    if runtimes is not None:
        print(f"OpenMP runtime loaded: {runtimes}")
        bundled = os.path.join(os.path.dirname(where), "fastattn.libs")
        if os.path.isdir(bundled) and not any(p.startswith(bundled + os.sep) for p in runtimes):
            sys.exit(f"FAIL: the wheel bundles an OpenMP runtime in {bundled}, "
                     f"but the kernels loaded {runtimes}")
    print("wheel smoke test: OK")


if __name__ == "__main__":
    main()
