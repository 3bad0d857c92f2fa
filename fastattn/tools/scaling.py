"""Why attention divides q.k by sqrt(d_k): measured.

If the components of q and k are independent with mean 0 and variance 1, then
q.k = sum_i q_i k_i has mean 0 and variance d_k (Vaswani et al., 2017,
section 3.2.1, footnote 4).  Left unscaled, the scores of a row spread further
apart as d_k grows, the softmax saturates toward a one-hot vector, and its
Jacobian diag(p) - p p^T, the factor every gradient through the softmax is
multiplied by, shrinks toward zero.  Dividing by sqrt(d_k) brings the variance
back to 1 whatever d_k is.

:func:`measure` draws queries and keys in two settings:

* ``"gaussian"``: i.i.d. N(0, 1) components, the footnote's assumption;
* ``"mhsa"``: the Q and K projections of a freshly initialised
  :class:`~fastattn.MultiHeadSelfAttention` (one head of width d_k, initialised
  like ``torch.nn.Linear``) applied to N(0, 1) inputs, the situation at the
  start of training;

and, with and without the 1/sqrt(d_k) factor, reports the variance of q.k, and
over each row of ``L`` keys the largest softmax probability, the softmax's
entropy and the Frobenius norm of its Jacobian.  The probabilities come from
fastattn's own kernel (``scaled_dot_product_attention(..., need_weights=True)``,
``scale=1.0`` for the unscaled case).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import List, Sequence

import numpy as np

from ._progress import Progress
from .._validate import ensure_memory
from ..functional import scaled_dot_product_attention
from ..modules import MultiHeadSelfAttention

__all__ = ["ScalingRow", "measure", "format_table", "plot", "DEFAULT_DKS"]

DEFAULT_DKS = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
SETTINGS = ("gaussian", "mhsa")


@dataclass
class ScalingRow:
    setting: str
    dk: int
    scaled: bool
    score_var: float  # variance of the (scaled or not) scores
    max_prob: float  # mean over rows of the largest probability
    entropy: float  # mean softmax entropy, nats (uniform over L keys: ln L)
    jacobian_norm: float  # mean Frobenius norm of diag(p) - p p^T


def _queries_keys(setting: str, dk: int, trials: int, length: int, rng: np.random.Generator):
    """q (trials, dk) and k (trials, length, dk) in float64."""
    if setting == "gaussian":
        q = rng.standard_normal((trials, dk))
        k = rng.standard_normal((trials, length, dk))
        return q, k
    if setting == "mhsa":
        m = MultiHeadSelfAttention(dk, 1, dtype=np.float64, seed=rng)
        x = rng.standard_normal((trials, length, dk))
        q = x[:, 0] @ m.w_q.T + m.b_q  # the first position queries the sequence
        k = x @ m.w_k.T + m.b_k
        return q, k
    raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")


def _softmax_stats(p: np.ndarray):
    """Mean max probability, entropy and Jacobian Frobenius norm of rows p (T, L)."""
    max_prob = p.max(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    entropy = -plogp.sum(axis=-1)
    # ||diag(p) - p p^T||_F^2 = sum p^2 - 2 sum p^3 + (sum p^2)^2
    s2 = (p * p).sum(axis=-1)
    s3 = (p * p * p).sum(axis=-1)
    jac = np.sqrt(np.maximum(s2 - 2 * s3 + s2 * s2, 0.0))
    return float(max_prob.mean()), float(entropy.mean()), float(jac.mean())


def measure(
    dks: Sequence[int] = DEFAULT_DKS,
    *,
    trials: int = 200,
    length: int = 128,
    seed: int = 0,
    settings: Sequence[str] = SETTINGS,
    progress: bool = False,
) -> List[ScalingRow]:
    """Measure the effect of the 1/sqrt(d_k) factor for each d_k in ``dks``.

    Parameters
    ----------
    dks : sequence of int
        Key widths to try.
    trials : int
        Independent query rows per d_k (each against its own ``length`` keys).
    length : int
        Keys per row, L.
    seed : int
        Seed of every random draw: the same arguments give the same numbers.
    settings : sequence of str
        ``"gaussian"`` and/or ``"mhsa"`` (see the module docstring).

    Returns
    -------
    list of ScalingRow
        One row per (setting, d_k, scaled).
    """
    for dk in dks:
        if isinstance(dk, bool) or not isinstance(dk, (int, np.integer)) or dk < 1:
            raise ValueError(f"dks must be positive ints, got {dk!r}")
    if trials < 2 or length < 2:
        raise ValueError(f"trials and length must be >= 2, got {trials} and {length}")
    dk = max(int(d) for d in dks) if len(dks) else 0
    # the largest d_k's arrays, checked before any is measured: the mhsa
    # setting's inputs, keys and their bias-add temporary, the queries, and
    # four (d_k, d_k) weights plus their packed copies
    ensure_memory([(trials, length, dk)] * 3 + [(trials, dk)] + [(dk, dk)] * 8,
                  np.dtype(np.float64).itemsize, f"the measurement at d_k = {dk}")
    rows: List[ScalingRow] = []
    bar = Progress(len(dks) * len(settings), progress)
    try:
        for si, setting in enumerate(settings):
            for dk in dks:
                rng = np.random.default_rng([seed, si, int(dk)])
                q, k = _queries_keys(setting, int(dk), trials, length, rng)
                dots = np.einsum("te,tle->tl", q, k)
                v = np.zeros((trials, 1, length, 1))
                for scaled in (False, True):
                    factor = 1.0 / math.sqrt(dk) if scaled else 1.0
                    _, w = scaled_dot_product_attention(
                        q[:, None, None, :], k[:, None], v, scale=factor, need_weights=True
                    )
                    max_prob, entropy, jac = _softmax_stats(w[:, 0, 0])
                    rows.append(ScalingRow(setting, int(dk), scaled, float(np.var(dots * factor)),
                                           max_prob, entropy, jac))
                bar.step(f"{setting} d_k={dk}")
    finally:
        bar.close()
    return rows


def format_table(rows: Sequence[ScalingRow], length: int) -> str:
    out = [f"L = {length} keys per row; entropy in nats (uniform: ln L = {math.log(length):.2f})"]
    for setting in dict.fromkeys(r.setting for r in rows):
        out.append("")
        out.append(f"setting: {setting}")
        out.append(f"{'':>5} | {'var(q.k)':^17} | {'largest p':^13} | {'entropy':^15} | "
                   f"{'|diag(p) - pp^T|':^16}")
        out.append(f"{'d_k':>5} | {'unscaled':>8} {'scaled':>8} | {'unsc.':>6} {'scaled':>6} | "
                   f"{'unsc.':>7} {'scaled':>7} | {'unsc.':>7} {'scaled':>8}")
        by = {(r.dk, r.scaled): r for r in rows if r.setting == setting}
        for dk in sorted({r.dk for r in rows if r.setting == setting}):
            u, s = by[(dk, False)], by[(dk, True)]
            out.append(
                f"{dk:>5} | {u.score_var:>8.2f} {s.score_var:>8.3f} | "
                f"{u.max_prob:>6.3f} {s.max_prob:>6.3f} | {u.entropy:>7.3f} {s.entropy:>7.3f} | "
                f"{u.jacobian_norm:>7.3f} {s.jacobian_norm:>8.3f}"
            )
    return "\n".join(out)


def plot(rows: Sequence[ScalingRow], path: str, length: int) -> bool:
    """Four panels against d_k; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    panels = [
        ("score_var", "variance of the scores", True),
        ("max_prob", "largest softmax probability", False),
        ("entropy", f"softmax entropy (nats, L = {length})", False),
        ("jacobian_norm", "|diag(p) - p p^T|_F", True),
    ]
    styles = {"gaussian": "-", "mhsa": "--"}
    for ax, (attr, title, logy) in zip(axes.flat, panels):
        for setting in dict.fromkeys(r.setting for r in rows):
            for scaled, color in ((False, "tab:red"), (True, "tab:blue")):
                pts = sorted((r.dk, getattr(r, attr)) for r in rows
                             if r.setting == setting and r.scaled == scaled)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(setting, "-"),
                        color=color, marker="o", ms=3,
                        label=f"{'q.k/sqrt(d_k)' if scaled else 'q.k'} ({setting})")
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("d_k")
        ax.set_title(title, fontsize=10)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Scaled dot-product attention: with and without 1/sqrt(d_k)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def to_json(rows: Sequence[ScalingRow], **meta) -> str:
    return json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2)
