"""Command line: ``python -m fastattn {info,demo,bench,scaling}``.

Help texts are plain text (argparse prints them as written): no markup.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, List, Optional, Sequence

import numpy as np

from .threads import MAX_THREADS


def _at_least(lo: int, hi: Optional[int] = None) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi]; argparse names the option
    when it refuses one (exit status 2, no traceback)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            span = f">= {lo}" if hi is None else f"from {lo} to {hi}"
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {value}")
        return value
    parse.__name__ = "count"  # what argparse calls the type in its messages
    return parse


def _output_path(plot: bool = False) -> Callable[[str], str]:
    """An argparse type for an output file: checked when the command line is
    read, before a run that could take minutes and then lose its results.
    The folder must exist and take a new file, the path must not be a
    folder, and a plot needs matplotlib."""
    def parse(path: str) -> str:
        target = os.path.abspath(path)
        folder = os.path.dirname(target)
        if os.path.isdir(target):
            raise argparse.ArgumentTypeError(f"{path!r} is a directory, expected a file name")
        if not os.path.isdir(folder):
            raise argparse.ArgumentTypeError(f"cannot write {path!r}: no directory {folder!r}")
        # os.access says yes to root everywhere: opening is the real test
        # (append mode, so an existing file keeps its contents until the run
        # writes it; a file made here goes again)
        existed = os.path.exists(target)
        try:
            with open(target, "ab"):
                pass
        except OSError as exc:
            raise argparse.ArgumentTypeError(
                f"cannot write {path!r}: {exc.strerror or exc}") from None
        if not existed:
            os.remove(target)
        if plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise argparse.ArgumentTypeError(
                    "needs matplotlib, which is not installed: pip install matplotlib (or "
                    "pip install 'fastattn[bench]'), or leave --plot out") from None
        return path
    parse.__name__ = "path"  # what argparse calls the type in its messages
    return parse


def _names(known: Callable[[], Sequence[str]]) -> Callable[[str], List[str]]:
    """An argparse type: a comma-separated list of names from ``known()``."""
    def parse(text: str) -> List[str]:
        names = [n for n in text.split(",") if n]
        allowed = list(known())
        unknown = [n for n in names if n not in allowed]
        if not names or unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {unknown or 'empty list'}; known: {', '.join(allowed)}")
        return names
    parse.__name__ = "list"
    return parse


def _presets() -> Sequence[str]:
    from .tools import benchmark

    return list(benchmark.PRESETS)


def cmd_info(args: argparse.Namespace) -> int:
    from . import info

    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"fastattn {data['version']}")
    print(f"  kernels:     {data['kernel_isa']} build (runnable here: {', '.join(data['available_isas'])})")
    print(f"  bfloat16:    {data['bfloat16']} (float16: widened to float32)")
    print(f"  OpenMP:      {'on' if data['openmp'] else 'off (single-threaded build)'}")
    print(f"  threads:     {data['num_threads']}")
    lim = data["limits"]
    quota = "none" if lim["cpu_quota"] is None else f"{lim['cpu_quota']:g} CPUs"
    mem = "none" if lim["memory_limit"] is None else f"{lim['memory_limit'] / 2**30:.2f} GiB"
    print(f"  limits:      {lim['affinity_cpus']} CPUs in the affinity mask, cgroup CPU quota "
          f"{quota}, cgroup memory limit {mem}; "
          f"{lim['available_memory'] / 2**30:.2f} GiB available")
    print(f"  numpy:       {data['numpy']}")
    print(f"  projections: {data['projections']} (no BLAS in a fastattn call)")
    blas = data["numpy_blas"]
    print(f"  numpy BLAS:  {blas['name']} {blas.get('version') or ''} (used by the NumPy comparison)")
    print(f"  python:      {data['python']} on {data['machine']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        return _demo(args)
    except MemoryError as exc:
        print(f"demo: not enough memory for these sizes ({exc})", file=sys.stderr)
        return 1


def _demo(args: argparse.Namespace) -> int:
    from . import MultiHeadSelfAttention, set_num_threads
    from .tools import benchmark
    from .tools.numpy_seed import mhsa_numpy

    dtype = np.dtype(args.dtype)
    B, N, D, H = args.batch, args.seq, args.d_model, args.heads
    if D % H:
        print(f"--heads ({H}) must divide --d-model ({D})", file=sys.stderr)
        return 2
    if args.threads is not None:
        set_num_threads(args.threads)
    m = MultiHeadSelfAttention(D, H, dtype=dtype, seed=0)
    x = np.random.default_rng(1).standard_normal((B, N, D)).astype(dtype)
    print(f"MultiHeadSelfAttention(embed_dim={D}, num_heads={H}), x {x.shape} {dtype.name}, "
          f"d_k = {D // H}, scores scaled by 1/sqrt(d_k) = {1 / np.sqrt(D // H):.4f}")
    y = m(x)
    ref = mhsa_numpy(m, x.astype(np.float64))
    err = float(np.max(np.abs(y - ref)))
    rel = err / float(np.max(np.abs(ref)))
    print(f"max |fastattn - numpy float64| = {err:.3e} (relative {rel:.2e})")
    # as the bench times: rounds interleaved, a pause before each turn so that
    # one library's spinning BLAS or OpenMP threads do not slow the next
    times = benchmark.time_interleaved({"fastattn": lambda: m(x),
                                        "numpy": lambda: mhsa_numpy(m, x)},
                                       args.rounds, benchmark.PAUSE_S)
    rounds = f"{args.rounds} interleaved round{'s' * (args.rounds != 1)}"
    print(f"time per call over {rounds} (a {benchmark.PAUSE_S:g} s pause before each turn): "
          f"median, spread = min-max")
    med, noisy = {}, []
    for name, what in (("fastattn", ""),
                       ("numpy", f"  (plain NumPy, {dtype.name}, scores materialised)")):
        t = [1e3 * s for s in times[name]]
        med[name] = float(np.median(t))
        if benchmark.spread(t)[1]:
            noisy.append(name)
        print(f"  {name + ':':<10}{med[name]:10.2f} ms  ({min(t):.2f}-{max(t):.2f} ms)"
              f"{' !' if name in noisy else ''}{what}")
    print(f"speed-up: {med['numpy'] / med['fastattn']:.1f}x (numpy's median / fastattn's)")
    if args.rounds < benchmark.MIN_SPREAD_ROUNDS:
        print(f"note: with {rounds}, the spread cannot be judged "
              f"({benchmark.MIN_SPREAD_ROUNDS} or more needed): take the speed-up as rough")
    elif noisy:
        print(f"note: {' and '.join(noisy)} marked ! ({benchmark.NOISY_RULE}): the speed-up "
              f"is unreliable; rerun with --rounds {benchmark.more_rounds(args.rounds)} on an "
              f"otherwise idle machine")
    tol = 1e-4 if dtype == np.float32 else 1e-10
    if not rel <= tol:
        print(f"ERROR: relative error {rel:.2e} exceeds {tol:.0e}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import get_num_threads, info, set_num_threads
    from .tools import benchmark

    if args.dtype == "bfloat16":
        try:
            benchmark.bfloat16_dtype()
        except ImportError as exc:
            print(f"--dtype bfloat16: {exc}", file=sys.stderr)
            return 2
    shapes, parts = args.shapes, args.parts
    # one thread count for everything the command measures (and reports)
    old = get_num_threads()
    if args.threads:
        set_num_threads(args.threads)
    try:
        return _bench(args, shapes, parts, get_num_threads(), info())
    finally:
        set_num_threads(old)


def _bench(args: argparse.Namespace, shapes: List[str], parts: List[str], threads: int,
           config: dict) -> int:
    from .tools import benchmark

    rows, notes = benchmark.run(shapes, threads=threads, rounds=args.rounds, parts=parts,
                                progress=not args.no_progress, dtype=args.dtype)
    print(benchmark.format_table(rows, threads, args.dtype))
    notes = benchmark.spread_notes(rows, args.rounds) + notes
    for note in notes:
        print(f"note: {note}")
    extra = {"threads": threads, "dtype": args.dtype, "info": config,
             "noisy_rule": benchmark.NOISY_RULE,
             "command": "python -m fastattn " +
             " ".join(sys.argv[1:] if args.argv is None else args.argv)}
    # the core's yardstick: a GEMM of the table's dtype, what the hardware does at best
    if args.dtype == "float32":
        gemm, held = benchmark.numpy_sgemm_gflops(threads)
        extra["numpy_sgemm_gflops"] = gemm
        print(f"NumPy float32 matmul 2048^3 at {threads} threads: {gemm:.1f} GFLOP/s"
              + ("" if held else " (NumPy's BLAS not held to that count: threadpoolctl is missing)"))
    else:
        gemm = benchmark.torch_bf16_gemm_gflops(threads)
        extra["torch_bf16_gemm_gflops"] = gemm
        print(f"torch bfloat16 matmul 2048^3 at {threads} threads: {gemm:.1f} GFLOP/s"
              if gemm else "torch bfloat16 matmul: not measured (torch is not installed)")
    for r in rows:
        if gemm and r.impl == "fastattn" and r.part == "core" and r.shape != "decode":
            print(f"  fastattn core at {r.shape}: {r.gflops:.1f} GFLOP/s = "
                  f"{100 * r.gflops / gemm:.0f}% of it")
    if args.memory:
        mem = benchmark.peak_memory(num_threads=threads)
        extra["memory"] = mem
        print(f"peak memory of a forward at {tuple(mem['shape'])}: "
              f"+{mem['traced_peak'] / 2**20:.0f} MiB of arrays (RSS +{mem['growth'] / 2**20:.0f} MiB), "
              f"{mem['ratio']:.2f}x the bytes of input + output + Q/K/V")
    if args.overhead:
        us = benchmark.python_overhead_us()
        extra["python_overhead_us"] = us
        print(f"python overhead at small: {us:.1f} us per call (module minus its kernel calls)")
    if args.json:
        with open(args.json, "w") as f:
            f.write(benchmark.rows_to_json(rows, notes, extra))
        print(f"wrote {args.json}")
    if args.plot:
        if benchmark.plot(rows, args.plot):
            print(f"wrote {args.plot}")
        else:
            print("--plot needs matplotlib: pip install matplotlib", file=sys.stderr)
    return 0


def cmd_scaling(args: argparse.Namespace) -> int:
    from .tools import scaling

    try:
        dks = [int(d) for d in args.dk.split(",") if d]
    except ValueError:
        dks = []
    if not dks or min(dks) < 1:
        print(f"--dk must be comma-separated integers >= 1, got {args.dk!r}", file=sys.stderr)
        return 2
    try:
        rows = scaling.measure(dks, trials=args.trials, length=args.length, seed=args.seed,
                               progress=not args.no_progress)
    except MemoryError as exc:
        print(f"scaling: not enough memory for --dk {args.dk} with --trials {args.trials} and "
              f"--length {args.length} ({exc})", file=sys.stderr)
        return 2
    print(scaling.format_table(rows, args.length))
    if args.json:
        with open(args.json, "w") as f:
            f.write(scaling.to_json(rows, trials=args.trials, length=args.length, seed=args.seed))
        print(f"wrote {args.json}")
    if args.plot:
        if scaling.plot(rows, args.plot, args.length):
            print(f"wrote {args.plot}")
        else:
            print("--plot needs matplotlib: pip install matplotlib", file=sys.stderr)
            return 1
    return 0


_DESCRIPTION = """\
fastattn's command line: multi-head attention on the CPU over NumPy arrays.
python -m fastattn COMMAND --help describes each command."""

_DEMO = """\
Runs MultiHeadSelfAttention on random inputs, checks its output against the
same forward pass written in plain NumPy (in float64), then times both: the
rounds are interleaved (each runs fastattn and NumPy in turn), with a pause
before each turn so that one library's worker threads do not slow the other.
Prints each one's median time and spread (min-max of the rounds), and the
speed-up, the ratio of the medians.  A time whose rounds spread widely
(interquartile range above 25% of the median) is marked !."""

_BENCH = """\
Times fastattn against each library installed here (NumPy; torch, ONNX
Runtime and OpenVINO where present) on the same weights and inputs, after
checking that their outputs agree.  Rounds are interleaved, with a pause
before each turn.

The table gives per implementation the median time of the rounds, the
spread (min-max), GFLOP/s, and for fastattn the ratio of the fastest other
implementation's median to its own (above 1: fastattn is faster).

A row is marked ! when it is noisy: the middle half of its rounds (the
interquartile range) spans more than 25% of its median.  Its median, and a
ratio from it, is then unreliable, and the run suggests more rounds.  With
fewer than 3 rounds the spread cannot be judged and no row is marked."""

_SCALING = """\
Draws queries and keys (independent normal components, and the projections
of a freshly initialised MultiHeadSelfAttention) and reports, with and
without the 1/sqrt(d_k) factor, the variance of the scores and, over each
row of keys, the softmax's largest probability, its entropy and the norm of
its Jacobian."""


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="fastattn", description=_DESCRIPTION, formatter_class=raw)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pi = sub.add_parser("info", help="version, kernel build, OpenMP, threads, BLAS",
                        description="Prints the version, the kernel build this CPU runs, "
                                    "OpenMP, the thread count, the CPU and memory limits "
                                    "found, and NumPy's BLAS.")
    pi.add_argument("--json", action="store_true", help="print as JSON")
    pi.set_defaults(func=cmd_info)
    pd = sub.add_parser("demo", help="a forward pass checked against NumPy, both timed",
                        description=_DEMO, formatter_class=raw)
    pd.add_argument("--batch", type=_at_least(1), default=8, help="batch size B (default 8)")
    pd.add_argument("--seq", type=_at_least(1), default=512, help="sequence length N (default 512)")
    pd.add_argument("--d-model", type=_at_least(1), default=512, help="model width D (default 512)")
    pd.add_argument("--heads", type=_at_least(1), default=8, help="attention heads H (default 8)")
    pd.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="computation dtype (default float32)")
    pd.add_argument("--threads", type=_at_least(1, MAX_THREADS), default=None,
                    help="default: fastattn's thread count")
    pd.add_argument("--rounds", type=_at_least(1), default=5,
                    help="interleaved rounds, each timing both (default 5; 3 or more to judge "
                         "the spread)")
    pd.set_defaults(func=cmd_demo)
    pb = sub.add_parser("bench", help="fastattn vs NumPy, torch, ONNX Runtime and OpenVINO "
                                      "(those installed)",
                        description=_BENCH, formatter_class=raw)
    pb.add_argument("--shapes", type=_names(_presets), default="small,bert,long,wide,decode",
                    help="comma-separated presets: small, bert, long, wide, decode (default: all)")
    pb.add_argument("--parts", type=_names(lambda: ("full", "core")), default="full,core",
                    help="full (MHSA forward), core (attention) (default: both)")
    pb.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="float32 (default): fastattn and every peer; bfloat16: fastattn's "
                         "bfloat16 path against torch's and OpenVINO's (needs ml_dtypes)")
    pb.add_argument("--threads", type=_at_least(1, MAX_THREADS), default=None,
                    help="default: fastattn's thread count")
    pb.add_argument("--rounds", type=_at_least(1), default=7,
                    help="interleaved rounds (default 7); a row whose rounds spread widely "
                         "(interquartile range above 25%% of the median) is marked !")
    pb.add_argument("--json", type=_output_path(), default=None,
                    help="write the results to this file (checked before the run)")
    pb.add_argument("--plot", type=_output_path(plot=True), default=None,
                    help="write a bar chart (PNG) here (needs matplotlib; checked before the "
                         "run)")
    pb.add_argument("--memory", action="store_true",
                    help="also measure peak memory of a forward at (1, 16384, 512, 8)")
    pb.add_argument("--overhead", action="store_true",
                    help="also measure fastattn's Python overhead at small")
    pb.add_argument("--no-progress", action="store_true", help="no progress bar")
    pb.set_defaults(func=cmd_bench)
    ps = sub.add_parser("scaling", help="measure why scores are divided by sqrt(d_k)",
                        description=_SCALING, formatter_class=raw)
    ps.add_argument("--dk", default="4,8,16,32,64,128,256,512,1024",
                    help="comma-separated key widths d_k (default 4,8,...,1024)")
    ps.add_argument("--trials", type=_at_least(2), default=200, help="query rows per d_k (default 200)")
    ps.add_argument("--length", type=_at_least(2), default=128, help="keys per row, L (default 128)")
    ps.add_argument("--seed", type=_at_least(0), default=0, help="random seed (default 0)")
    ps.add_argument("--json", type=_output_path(), default=None,
                    help="write the measurements to this file (checked before the run)")
    ps.add_argument("--plot", type=_output_path(plot=True), default=None,
                    help="write the figure (PNG) here (needs matplotlib; checked before the "
                         "run)")
    ps.add_argument("--no-progress", action="store_true", help="no progress bar")
    ps.set_defaults(func=cmd_scaling)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
