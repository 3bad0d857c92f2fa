"""A/B of this build against another build of fastattn, in one process.

    python benchmarks/ab_builds.py OTHER [--rounds 9] [--cases small,bert core,...]

OTHER is the fastattn package directory of the other build (a checkout's
fastattn/ with its compiled kernels in place, e.g. from `git worktree add`
and `python setup.py build_ext --inplace` there).  It is copied to a
temporary directory and imported under another name, so both builds run in
one process on the same arrays; rounds alternate which build runs first, and
each case prints the median of the per-round ratios (this build / OTHER).
Run it twice with OTHER set to a copy of this build to see the noise floor.

The cases are the bench's presets as (B, N, D, H): small (1, 128, 512, 8),
bert (8, 512, 768, 12), long (1, 4096, 512, 8), wide (1, 1024, 1024, 16):
"full" the module's forward, "core" scaled_dot_product_attention (and
"core causal"); "decode core" one query over 4,096 keys with 8 heads;
"decode step 4k" the module's step over a 4,096-position cache; "decode step
16k bfloat16" and "... float16" over 16,384 positions in a 16-bit cache.
"""

import argparse
import importlib
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

# "this build" is the checkout holding this script, whatever else is installed
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import fastattn  # noqa: E402

PRESETS = {"small": (1, 128, 512, 8), "bert": (8, 512, 768, 12),
           "long": (1, 4096, 512, 8), "wide": (1, 1024, 1024, 16)}


def load_other(path: str):
    """The build in ``path`` (a fastattn package directory) as a module named
    fastattn_other; its absolute self-imports are pointed at that name."""
    src = pathlib.Path(path).resolve()
    if not (src / "__init__.py").exists():
        sys.exit(f"OTHER: {src} is not a package directory (no __init__.py)")
    root = pathlib.Path(tempfile.mkdtemp(prefix="fastattn-ab-"))
    dst = root / "fastattn_other"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.c"))
    for py in dst.rglob("*.py"):
        text = py.read_text()
        fixed = text.replace('f"fastattn._kernels', 'f"fastattn_other._kernels').replace(
            '"fastattn._kernels', '"fastattn_other._kernels')
        if fixed != text:
            py.write_text(fixed)
    sys.path.insert(0, str(root))
    return importlib.import_module("fastattn_other")


def cases(lib):
    out = {}
    for name, (B, N, D, H) in PRESETS.items():
        rng = np.random.default_rng(0)
        x = rng.standard_normal((B, N, D), dtype=np.float32)
        m = lib.MultiHeadSelfAttention(D, H, seed=0)
        q, k, v = (rng.standard_normal((B, H, N, D // H), dtype=np.float32) for _ in range(3))
        sdpa = lib.scaled_dot_product_attention
        out[f"{name} full"] = lambda m=m, x=x: m(x)
        out[f"{name} core"] = lambda q=q, k=k, v=v: sdpa(q, k, v)
        out[f"{name} core causal"] = lambda q=q, k=k, v=v: sdpa(q, k, v, is_causal=True)
    rng = np.random.default_rng(3)
    qd = rng.standard_normal((1, 8, 1, 64), dtype=np.float32)
    kd, vd = (rng.standard_normal((1, 8, 4096, 64), dtype=np.float32) for _ in range(2))
    out["decode core"] = lambda: lib.scaled_dot_product_attention(qd, kd, vd)
    m = lib.MultiHeadSelfAttention(512, 8, seed=0)
    cache = m.new_cache(1, 4200)
    m(np.random.default_rng(1).standard_normal((1, 4096, 512), dtype=np.float32), cache=cache)
    x1 = np.random.default_rng(2).standard_normal((1, 1, 512), dtype=np.float32)

    def step():
        m(x1, cache=cache)
        cache._truncate(4096)  # the next step starts from the same cache

    out["decode step 4k"] = step
    # the same step over 16,384 positions held in a 16-bit cache
    prompt = np.random.default_rng(4).standard_normal((1, 16384, 512), dtype=np.float32)
    for dt in ("bfloat16", "float16"):
        c16 = m.new_cache(1, 16400, dtype=dt)
        m(prompt, cache=c16)

        def step16(c=c16):
            m(x1, cache=c)
            c._truncate(16384)

        out[f"decode step 16k {dt}"] = step16
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("other", help="the other build's fastattn package directory")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--cases", default="", help="comma-separated case-name prefixes (default: all)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    args = ap.parse_args(argv)
    other = load_other(args.other)
    wanted = [c for c in args.cases.split(",") if c]
    print(f"this build {fastattn.__file__} ({fastattn.info()['kernel_isa']}) against "
          f"{args.other} ({other.info()['kernel_isa']}), {args.rounds} rounds")
    for nt in (int(t) for t in args.threads.split(",")):
        fastattn.set_num_threads(nt)
        other.set_num_threads(nt)
        mine, theirs = cases(fastattn), cases(other)
        for name in mine:
            if wanted and not any(name.startswith(w) for w in wanted):
                continue
            pair = {"this": mine[name], "other": theirs[name]}
            for f in pair.values():
                f()
            t0 = time.perf_counter()
            pair["this"]()
            reps = max(1, min(30, int(0.15 / max(time.perf_counter() - t0, 1e-6))))
            times = {"this": [], "other": []}
            for r in range(args.rounds):
                for lab in (("other", "this") if r % 2 else ("this", "other")):
                    time.sleep(0.03)  # the other library's threads go quiet
                    pair[lab]()
                    t = []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        pair[lab]()
                        t.append(time.perf_counter() - t0)
                    times[lab].append(np.median(t))
            a, b = np.array(times["this"]) * 1e3, np.array(times["other"]) * 1e3
            print(f"{nt} thr {name:>18}: other {np.median(b):9.3f} ms  this {np.median(a):9.3f} ms"
                  f"  this/other {np.median(a / b):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
