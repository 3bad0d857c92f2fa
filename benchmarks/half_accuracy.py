"""Errors of the 16-bit paths against the float64 reference, beside torch's and
OpenVINO's on the same inputs (the table in docs/numerics.md).

    python benchmarks/half_accuracy.py            # the build this CPU picks
    FASTATTN_ISA=avx512 python benchmarks/half_accuracy.py   # the widening path

Error: max |out - ref| / max |ref| and the relative RMS, ref computed in
float64 from the same 16-bit inputs (widened exactly).  Inputs N(0, 1),
B=2, H=8, E=64, 512 queries and keys (causal: the same, with the mask);
decoding: 1 query over 4096 keys; the module: D=512, H=8, N=256 with
nn.Linear's initialisation.  Worst over 3 seeds.
"""

import os
import sys

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import fastattn  # noqa: E402
from fastattn.tools import peers  # noqa: E402
from reference import params_of, ref_mhsa, ref_sdpa  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


def errors(got, want):
    d = np.asarray(got, np.float64) - want
    return (float(np.abs(d).max() / np.abs(want).max()),
            float(np.sqrt(np.mean(d ** 2) / np.mean(want ** 2))))


def worst(rows):
    return tuple(max(r[i] for r in rows) for i in range(2))


def sdpa_cases(dtype, seed):
    rng = np.random.default_rng(seed)
    for name, (Lq, Lk, causal) in {"tiles": (512, 512, False), "causal": (512, 512, True),
                                   "decode": (1, 4096, False)}.items():
        q, k, v = (rng.standard_normal((2, 8, L, 64)).astype(dtype) for L in (Lq, Lk, Lk))
        yield name, q, k, v, causal


def main():
    fastattn.set_num_threads(2)
    print(f"build {fastattn.info()['kernel_isa']} (bfloat16: {fastattn.info()['bfloat16']})")
    print(f"{'case':<10} {'dtype':<9} {'impl':<12} {'max rel':>9} {'rms rel':>9}")
    for dtype in (BF16, np.dtype(np.float16)):
        results = {}
        for seed in range(3):
            for name, q, k, v, causal in sdpa_cases(dtype, seed):
                want = ref_sdpa(q, k, v, is_causal=causal)[0]
                got = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal)
                results.setdefault((name, "fastattn"), []).append(errors(got, want))
                if dtype != BF16:
                    continue
                for peer in ("torch-sdpa", "ov-sdpa"):
                    try:
                        run = peers.core_peer(peer, q, k, v, 2, is_causal=causal, dtype="bfloat16")
                        results.setdefault((name, peer), []).append(errors(run(), want))
                    except Exception as exc:  # a peer missing here: say so once
                        results.setdefault((name, peer), exc)
            rng = np.random.default_rng(seed)
            m = fastattn.MultiHeadSelfAttention(512, 8, dtype=dtype, seed=seed)
            x = rng.standard_normal((1, 256, 512)).astype(dtype)
            want = ref_mhsa(x, params_of(m), 8)[0]
            results.setdefault(("module", "fastattn"), []).append(errors(m(x), want))
        for (name, impl), rows in results.items():
            if isinstance(rows, Exception):
                print(f"{name:<10} {dtype.name:<9} {impl:<12} unavailable ({rows})")
                continue
            mx, rms = worst(rows)
            print(f"{name:<10} {dtype.name:<9} {impl:<12} {mx:9.2e} {rms:9.2e}")


if __name__ == "__main__":
    main()
