"""``python -m fastattn bench``: fastattn against its peers, measured side by side.

For every shape, every implementation that can run here is built from the same
weights and inputs, checked against fastattn, then timed in interleaved rounds
(each round runs every implementation once, in a rotating order, with a pause
before each so that the previous library's spinning worker threads have gone
quiet).  Reported: median time, spread (min-max of the rounds), GFLOP/s and
the speed ratio to the fastest peer (> 1: fastattn is faster).  A row whose
rounds disagree (:data:`NOISY_RULE`) is marked noisy, and the run suggests
more rounds.

A run measures one dtype: "float32" (fastattn and every float32 peer) or
"bfloat16" (fastattn's bfloat16 path, ``ml_dtypes.bfloat16`` arrays, against
the peers' bfloat16 paths).  bfloat16 weights and inputs are float32 ones
rounded to bfloat16, so every implementation of a case computes on the same
values; their outputs are checked against fastattn's float32 forward of those
values, to bfloat16's tolerance.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import peers
from ._progress import Progress as _Progress
from ..functional import scaled_dot_product_attention
from ..modules import MultiHeadSelfAttention
from ..threads import get_num_threads, set_num_threads

# (B, N, D, H); "decode" is one query over 4096 keys (attention core only)
PRESETS: Dict[str, Tuple[int, int, int, int]] = {
    "small": (1, 128, 512, 8),
    "bert": (8, 512, 768, 12),
    "long": (1, 4096, 512, 8),
    "wide": (1, 1024, 1024, 16),
    "decode": (1, 4096, 512, 8),
}
DEFAULT_SHAPES = ("small", "bert", "long", "wide", "decode")
PAUSE_S = 0.12  # OpenBLAS workers spin ~100 ms after a threaded call, ORT's ~26 ms
DTYPES = peers.DTYPES
# how far an output may stray from the float32 reference, relative to its largest
# magnitude: float32 round-off; for bfloat16, a few units of its 8-bit mantissa
# (inputs, Q/K/V, probabilities and output each rounded once)
CHECK_TOL = {"float32": 1e-4, "bfloat16": 3e-2}

# When a row's rounds disagree too much for its median to be trusted.  The
# interquartile range, not max/min: one stray round (a page fault, another
# process) leaves the median sound and should not mark the row, and with more
# rounds, which is what the mark suggests, max/min only grows; with 3 rounds
# the IQR is half the range, so a wild round still marks the row.
NOISY_IQR = 0.25
MIN_SPREAD_ROUNDS = 3
NOISY_RULE = (f"noisy (!): the middle half of the rounds (interquartile range) spans more "
              f"than {NOISY_IQR:.0%} of the median")


@dataclass
class Row:
    shape: str
    part: str  # "full" (MHSA forward) or "core" (attention only)
    impl: str
    median_ms: float
    min_ms: float
    max_ms: float
    gflops: float
    ratio: Optional[float] = None  # fastest peer's median / fastattn's median
    times_ms: List[float] = field(default_factory=list)
    dtype: str = "float32"  # what the implementations computed in
    iqr_ms: float = 0.0  # interquartile range of the rounds
    noisy: Optional[bool] = None  # NOISY_RULE; None: too few rounds to say


def spread(times: Sequence[float]) -> Tuple[float, Optional[bool]]:
    """(interquartile range, noisy) of one implementation's round times:
    noisy by :data:`NOISY_RULE`, None below :data:`MIN_SPREAD_ROUNDS` rounds."""
    times = np.asarray(times, dtype=np.float64)
    if times.size == 0:
        return 0.0, None
    q25, q75 = np.percentile(times, [25, 75])
    iqr = float(q75 - q25)
    if times.size < MIN_SPREAD_ROUNDS:
        return iqr, None
    return iqr, bool(iqr > NOISY_IQR * float(np.median(times)))


def more_rounds(rounds: int) -> int:
    """The rounds to suggest after a noisy run of ``rounds``."""
    return max(2 * rounds, 15)


def spread_notes(rows: Sequence[Row], rounds: int) -> List[str]:
    """What the table's spread says about trusting it: the noisy rows, or
    too few rounds to tell."""
    if rounds < MIN_SPREAD_ROUNDS:
        return [f"{rounds} round{'s' * (rounds != 1)} per implementation: too few to judge the "
                f"spread ({MIN_SPREAD_ROUNDS} or more; default 7), so no row is marked; "
                f"treat the medians as rough"]
    noisy = [r for r in rows if r.noisy]
    if not noisy:
        return []
    which = ", ".join(f"{r.shape} {r.part} {r.impl}" for r in noisy)
    return [f"{len(noisy)} of {len(rows)} rows noisy (marked !: {which}); their medians, and "
            f"ratios from them, are unreliable: rerun with --rounds {more_rounds(rounds)} "
            f"(now {rounds}) on an otherwise idle machine"]


def flops(shape: str, part: str) -> float:
    """Multiply-adds x 2 of one forward (projections included for "full")."""
    B, N, D, H = PRESETS[shape]
    Lq = 1 if shape == "decode" else N
    attn = 4.0 * B * Lq * N * D  # QK^T and PV over all heads
    if part == "core":
        return attn
    return attn + 2.0 * B * Lq * D * 4 * D  # Q, K, V and output projections


def _check(name: str, got, expected: np.ndarray, dtype: str = "float32") -> None:
    got = np.asarray(got)
    if dtype == "bfloat16":
        if got.dtype != bfloat16_dtype():
            # a float32 result would time other work than the table says
            raise AssertionError(f"{name} returned {got.dtype}, not bfloat16")
        got = got.astype(np.float32)
    scale = float(np.max(np.abs(expected))) or 1.0
    err = float(np.max(np.abs(got - expected))) / scale
    if not err <= CHECK_TOL[dtype]:
        raise AssertionError(f"{name} disagrees with fastattn: max error {err:.2e} of the output scale")


def bfloat16_dtype():
    """numpy's bfloat16 (ml_dtypes); ImportError names the package when it is missing."""
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError("bfloat16 needs ml_dtypes (pip install ml_dtypes)") from None
    return np.dtype(ml_dtypes.bfloat16)


def _as_bf16_values(a: np.ndarray) -> np.ndarray:
    """float32 holding ``a`` rounded to bfloat16 (exact in both dtypes)."""
    return a.astype(bfloat16_dtype()).astype(np.float32)


def _fastattn_full_bf16(m32, x: np.ndarray):
    """fastattn's bfloat16 forward of ``m32``'s weights on ``x`` as a callable, or the
    reason it cannot run (a fastattn without bfloat16 modules raises TypeError)."""
    bf16 = bfloat16_dtype()
    try:
        m = MultiHeadSelfAttention(m32.embed_dim, m32.num_heads, dtype=bf16.type)
    except TypeError as exc:
        return None, str(exc)
    m.load_state_dict({k: v.astype(bf16) for k, v in m32.state_dict().items()})
    xb = x.astype(bf16)
    return (lambda: m(xb)), None


def _fastattn_core_bf16(q: np.ndarray, k: np.ndarray, v: np.ndarray):
    """fastattn's bfloat16 attention core as a callable, or why it cannot run."""
    qb, kb, vb = (a.astype(bfloat16_dtype()) for a in (q, k, v))
    try:
        scaled_dot_product_attention(qb, kb, vb)
    except TypeError as exc:
        return None, str(exc)
    return (lambda: scaled_dot_product_attention(qb, kb, vb)), None


# fastattn's float32 forward in the bfloat16 table
OWN_F32 = "fastattn-f32"


def build_cases(shape: str, num_threads: int, parts: Sequence[str], dtype: str = "float32"):
    """{part: {impl: callable}} for one shape in ``dtype``, every implementation
    checked; plus skip notes."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {DTYPES}")
    B, N, D, H = PRESETS[shape]
    full_peers, core_peers = peers.PEERS[dtype]
    bf16 = dtype == "bfloat16"
    rng = np.random.default_rng(0)
    cases: Dict[str, Dict[str, Callable]] = {}
    notes: List[str] = []

    def checked(part, own, built, expected):
        # fastattn's float32 forward is the reference; its bfloat16 one is checked
        # against it as the peers are
        impls = {} if own is None else {"fastattn": own}
        for name, fn in {**impls, **built}.items():
            if bf16 or name != "fastattn":
                _check(f"{shape} {part} {name}", fn(), expected, dtype)
        return {**impls, **built}

    if "full" in parts and shape != "decode":
        m = MultiHeadSelfAttention(D, H, seed=0)
        x = rng.standard_normal((B, N, D)).astype(np.float32)
        if bf16:
            m.load_state_dict({k: _as_bf16_values(v) for k, v in m.state_dict().items()})
            x = _as_bf16_values(x)
        expected = m(x)
        own, why = _fastattn_full_bf16(m, x) if bf16 else ((lambda: m(x)), None)
        built, skipped = peers.available(full_peers, peers.full_peer, m, x, num_threads,
                                         dtype=dtype)
        cases["full"] = checked("full", own, built, expected)
        if bf16 and own is not None:
            # fastattn's own float32 forward on the same values: the yardstick
            # of the bfloat16 path's speed-up, not a peer
            cases["full"][OWN_F32] = lambda: m(x)
        if why:
            notes.append(f"{shape} full: fastattn {dtype} row skipped: {why}")
        notes += [f"{shape} full: {s}" for s in skipped]
    elif "full" in parts:
        notes.append(f"{shape} full: not run (one query over cached keys: the core is the case)")
    if "core" in parts:
        E = D // H
        Lq = 1 if shape == "decode" else N
        q = rng.standard_normal((B, H, Lq, E)).astype(np.float32)
        k, v = (rng.standard_normal((B, H, N, E)).astype(np.float32) for _ in range(2))
        if bf16:
            q, k, v = (_as_bf16_values(a) for a in (q, k, v))
        expected = scaled_dot_product_attention(q, k, v)
        own, why = (_fastattn_core_bf16(q, k, v) if bf16
                    else ((lambda: scaled_dot_product_attention(q, k, v)), None))
        built, skipped = peers.available(core_peers, peers.core_peer, q, k, v, num_threads,
                                         dtype=dtype)
        cases["core"] = checked("core", own, built, expected)
        if bf16 and own is not None:
            cases["core"][OWN_F32] = lambda: scaled_dot_product_attention(q, k, v)
        if why:
            notes.append(f"{shape} core: fastattn {dtype} row skipped: {why}")
        notes += [f"{shape} core: {s}" for s in skipped]
    return cases, notes


def time_interleaved(impls: Dict[str, Callable], rounds: int, pause_s: float,
                     progress: Optional[_Progress] = None, label: str = "",
                     burst_s: float = 0.05) -> Dict[str, List[float]]:
    """Per implementation, one time per round, in seconds.

    A round runs every implementation once, in a rotating order.  Each turn
    pauses (so the previous library's spinning threads go quiet), makes one
    untimed call (an idle core can take milliseconds to wake: a timed first
    call would measure the wake-up), then times a short burst of calls and
    keeps its median.
    """
    names = list(impls)
    burst: Dict[str, int] = {}
    for name in names:
        impls[name]()  # warm-up: first touches of fresh memory are slow here
        t0 = time.perf_counter()
        impls[name]()
        burst[name] = int(min(25, max(1, burst_s / max(time.perf_counter() - t0, 1e-9))))
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if pause_s:
                time.sleep(pause_s)
            impls[name]()
            calls = []
            for _ in range(burst[name]):
                t0 = time.perf_counter()
                impls[name]()
                calls.append(time.perf_counter() - t0)
            times[name].append(float(np.median(calls)))
        if progress:
            progress.step(f"{label} round {r + 1}/{rounds}")
    return times


def run(shapes: Sequence[str], *, threads: Optional[int] = None, rounds: int = 7,
        parts: Sequence[str] = ("full", "core"), pause_s: float = PAUSE_S,
        progress: bool = True, dtype: str = "float32") -> Tuple[List[Row], List[str]]:
    """Benchmark ``shapes`` in ``dtype``; returns the table rows and notes on skipped
    implementations."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {DTYPES}")
    old = get_num_threads()
    if threads:
        set_num_threads(threads)
    nt = get_num_threads()
    rows: List[Row] = []
    notes: List[str] = []
    bar = _Progress(len(shapes) * len(parts) * rounds, progress)
    # only the numpy peer calls NumPy's BLAS, and the bfloat16 table has none
    blas_limit = _limit_numpy_blas(nt, notes) if "numpy" in sum(peers.PEERS[dtype], ()) else None
    try:
        for shape in shapes:
            cases, skipped = build_cases(shape, nt, parts, dtype)
            notes += skipped
            for part in parts:
                if part not in cases:
                    bar.step(count=rounds)
                    continue
                times = time_interleaved(cases[part], rounds, pause_s, bar, f"{shape} {part}")
                fl = flops(shape, part)
                med = {name: float(np.median(t)) for name, t in times.items()}
                peer_best = min((t for n, t in med.items() if n not in ("fastattn", OWN_F32)),
                                default=None)
                if OWN_F32 in med and "fastattn" in med:
                    notes.append(f"{shape} {part}: fastattn bfloat16 ran "
                                 f"{med[OWN_F32] / med['fastattn']:.2f}x the speed of its "
                                 f"float32 ({OWN_F32} row) on the same values")
                for name, t in times.items():
                    iqr, noisy = spread(t)
                    rows.append(Row(
                        shape=shape, part=part, impl=name,
                        median_ms=1e3 * med[name], min_ms=1e3 * min(t), max_ms=1e3 * max(t),
                        gflops=fl / med[name] / 1e9,
                        ratio=(peer_best / med[name]) if (name == "fastattn" and peer_best) else None,
                        times_ms=[1e3 * s for s in t], dtype=dtype, iqr_ms=1e3 * iqr,
                        noisy=noisy,
                    ))
    finally:
        bar.close()
        set_num_threads(old)
        if blas_limit is not None:
            blas_limit.restore_original_limits()
    return rows, notes


def _limit_numpy_blas(num_threads: int, notes: List[str]):
    """Hold NumPy's BLAS (used by the numpy peer) to the run's thread count."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        notes.append("numpy peer: threadpoolctl is not installed, so NumPy's BLAS uses its "
                     "default thread count (pip install 'fastattn[bench]')")
        return None
    return threadpool_limits(limits=num_threads, user_api="blas")


def _peer_best(rows: Sequence[Row], shape: str, part: str) -> Optional[Row]:
    """The fastest peer's row of a (shape, part): the one fastattn's ratio is to."""
    peers_ = [r for r in rows if r.shape == shape and r.part == part
              and r.impl not in ("fastattn", OWN_F32)]
    return min(peers_, key=lambda r: r.median_ms, default=None)


def format_table(rows: Sequence[Row], threads: int, dtype: Optional[str] = None) -> str:
    """The table, with its legend; a noisy row is marked ``!``, and so is a
    ratio from a noisy row (fastattn's or its fastest peer's)."""
    dtype = dtype or (rows[0].dtype if rows else "float32")
    lines = [
        f"dtype: {dtype}; threads: {threads}; median of the rounds, spread = min-max; "
        "ratio = fastest peer's median / fastattn's (> 1: fastattn faster)",
        f"{NOISY_RULE}: its median, and a ratio from it, is unreliable",
        f"{'shape':<8} {'part':<5} {'impl':<14} {'median ms':>10} {'spread ms':>17} "
        f"{'':1} {'GFLOP/s':>8} {'ratio':>6}",
    ]
    for r in rows:
        ratio = ""
        if r.ratio is not None:
            best = _peer_best(rows, r.shape, r.part)
            shaky = r.noisy or (best is not None and best.noisy)
            ratio = f"{r.ratio:6.2f}" + ("!" if shaky else "")
        spread_ = f"{r.min_ms:.2f}-{r.max_ms:.2f}"
        mark = "!" if r.noisy else ""
        lines.append(
            f"{r.shape:<8} {r.part:<5} {r.impl:<14} {r.median_ms:>10.3f} {spread_:>17} "
            f"{mark:1} {r.gflops:>8.1f} {ratio:>6}"
        )
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: str) -> bool:
    """Bar charts of GFLOP/s, one panel per part; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    parts = [p for p in ("full", "core") if any(r.part == p for r in rows)]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        prow = [r for r in rows if r.part == part]
        shapes = list(dict.fromkeys(r.shape for r in prow))
        impls = sorted({r.impl for r in prow}, key=lambda n: (n != "fastattn", n))
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            vals = [next((r.gflops for r in prow if r.shape == s and r.impl == impl), 0)
                    for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels(shapes)
        ax.set_ylabel("GFLOP/s (higher is faster)")
        ax.set_title("full MHSA forward" if part == "full" else "attention core")
        # below the panel: inside, it would hide the tallest bars
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(impls))
    fig.suptitle(f"fastattn vs peers, {rows[0].dtype if rows else 'float32'}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def peak_memory(shape: Tuple[int, int, int, int] = (1, 16384, 512, 8),
                num_threads: Optional[int] = None) -> Dict[str, float]:
    """Peak memory of one module forward, against the bytes it must hold anyway.

    Runs in a fresh interpreter (with ``num_threads``, default: this one's
    count) so that earlier allocations do not hide the peak.
    """
    import subprocess

    code = f"""
import json, resource, tracemalloc, numpy as np, fastattn
def hwm():
    # VmHWM is the high-water mark of this process's own memory map (ru_maxrss
    # would carry over the peak of a large parent across fork and exec)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
B, N, D, H = {shape!r}
fastattn.set_num_threads({num_threads or get_num_threads()})
m = fastattn.MultiHeadSelfAttention(D, H, seed=0)
x = np.random.default_rng(0).standard_normal((B, N, D), dtype=np.float32)
m(x[:, :8])  # load the kernels, pack the weights
before = hwm()
tracemalloc.start()
y = m(x)
traced = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
after = hwm()
print(json.dumps({{"growth": after - before, "traced_peak": traced,
                  "io_qkv": x.nbytes + y.nbytes + 3 * x.nbytes}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    # NumPy reports its allocations to tracemalloc: the traced peak is exact
    # for arrays; RSS growth also sees the kernels' (small) scratch
    data["ratio"] = max(data["growth"], data["traced_peak"]) / data["io_qkv"]
    data["shape"] = list(shape)
    data["num_threads"] = num_threads or get_num_threads()
    return data


def python_overhead_us(rounds: int = 200) -> float:
    """fastattn's own time per forward at "small": the module call minus the time
    its kernels ran (projection GEMMs and attention, timed inside the same
    call by the module's :class:`ForwardPlan`); the median over ``rounds`` calls.

    What is left is validation, dispatch and the output allocation, in Python
    and at the kernels' entry.  Timing the kernels inside each call (instead
    of subtracting a separate run of bare kernel calls) keeps the machine's
    noise, tens of microseconds per millisecond call, out of the figure.
    """
    B, N, D, H = PRESETS["small"]
    m = MultiHeadSelfAttention(D, H, seed=0)
    x = np.random.default_rng(0).standard_normal((B, N, D)).astype(np.float32)
    m(x)  # pack the weights, make the plan
    plan = m._plan
    own = []
    for r in range(rounds + 5):
        t0 = time.perf_counter()
        m(x)
        total = time.perf_counter() - t0
        if m._plan is not plan:
            raise RuntimeError("the module planned again: the overhead figure would be wrong")
        if r >= 5:
            own.append(total - plan.kernel_seconds)
    return 1e6 * float(np.median(own))


def numpy_sgemm_gflops(num_threads: int, n: int = 2048, rounds: int = 5) -> Tuple[float, bool]:
    """GFLOP/s of NumPy's float32 matmul of n x n matrices, the yardstick for the
    core; and whether its BLAS was held to ``num_threads`` (needs threadpoolctl)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    notes: List[str] = []
    limit = _limit_numpy_blas(num_threads, notes)
    try:
        times = time_interleaved({"sgemm": lambda: np.matmul(a, b, out=out)}, rounds, 0.0)
    finally:
        if limit is not None:
            limit.restore_original_limits()
    return 2.0 * n ** 3 / float(np.median(times["sgemm"])) / 1e9, limit is not None


def torch_bf16_gemm_gflops(num_threads: int, n: int = 2048, rounds: int = 5) -> Optional[float]:
    """GFLOP/s of torch's bfloat16 matmul of n x n matrices at ``num_threads``, the
    yardstick for the bfloat16 core (torch hands it to oneDNN's bf16 GEMM where the
    CPU has bf16 instructions); None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(num_threads)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(torch.bfloat16) for _ in range(2))
    out = torch.empty(n, n, dtype=torch.bfloat16)
    with torch.inference_mode():
        times = time_interleaved({"gemm": lambda: torch.matmul(a, b, out=out)}, rounds, 0.0)
    return 2.0 * n ** 3 / float(np.median(times["gemm"])) / 1e9


def rows_to_json(rows: Sequence[Row], notes: Sequence[str], extra: dict) -> str:
    return json.dumps({"rows": [asdict(r) for r in rows], "notes": list(notes), **extra}, indent=2)
