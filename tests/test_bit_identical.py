"""Outputs bit for bit as recorded from the kernels before a restructuring.

Every path of the public API (query tiles, causal and window bands, masks,
ALiBi, the weights path, few-query rows, split-K, grouped-query heads, the
module's fused and unfused plans, masks through the module, cross-attention,
cache decoding), both dtypes and every kernel build this CPU runs, on inputs
drawn here from fixed seeds.  tests/data/bit_identical.json holds a SHA-256
of each output's bytes, recorded at commit 6f0dc26 with

    FASTATTN_ISA=<isa> python tests/test_bit_identical.py record

(one run per build; each run adds its build's digests).  A change that moves
any output by one ulp fails here; the float64 reference tests say whether a
deliberate change is still right.  Two threads throughout: the split-K
path's splits depend on the thread count.
"""
import hashlib
import json
import os
import pathlib
import platform
import subprocess
import sys

import numpy as np
import pytest

DATA = pathlib.Path(__file__).resolve().parent / "data" / "bit_identical.json"
THREADS = 2


def _rand(seed, shape, dtype):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _cases(fastattn, dtype):
    sdpa = fastattn.scaled_dot_product_attention
    MHSA, MHA = fastattn.MultiHeadSelfAttention, fastattn.MultiHeadAttention

    def qkv(seed, lead, H, Hkv, Lq, Lk, E, Ev=None):
        return (_rand(seed, lead + (H, Lq, E), dtype), _rand(seed + 1, lead + (Hkv, Lk, E), dtype),
                _rand(seed + 2, lead + (Hkv, Lk, Ev or E), dtype))

    q, k, v = qkv(1, (2,), 3, 3, 70, 70, 16)
    q2, k2, v2 = qkv(4, (1,), 2, 2, 70, 90, 16)
    bmask = np.random.default_rng(7).random((70, 70)) < 0.8
    fmask = _rand(8, (3, 70, 70), dtype)
    x = _rand(20, (2, 40, 64), dtype)
    x1 = _rand(21, (1, 33, 64), dtype)
    pad = np.zeros((2, 40), bool)
    pad[1, 31:] = True

    def module(**kw):
        return MHSA(64, 4, dtype=dtype, seed=5, **kw)

    def decode():
        m = module(num_kv_heads=2)
        cache = m.new_cache(2, 64)
        steps = [m(x[:, :5], cache=cache)] + [m(x[:, i:i + 1], cache=cache) for i in range(5, 9)]
        return np.concatenate(steps, axis=1)

    def cross():
        m = MHA(64, 4, kdim=24, vdim=40, dtype=dtype, seed=6)
        return m(x, _rand(22, (2, 29, 24), dtype), _rand(23, (2, 29, 40), dtype),
                 attn_mask=np.random.default_rng(9).random((40, 29)) < 0.9)

    return {
        "tiles": lambda: sdpa(q, k, v),
        "causal": lambda: sdpa(q2, k2, v2, is_causal=True),
        "window": lambda: sdpa(q2, k2, v2, window=(5, 3)),
        "alibi": lambda: sdpa(q, k, v, alibi=True, is_causal=True),
        "bool_mask": lambda: sdpa(q, k, v, bmask),
        "float_mask": lambda: sdpa(q, k, v, fmask),
        "weights": lambda: np.concatenate([a.ravel() for a in
                                           sdpa(q2, k2, v2, is_causal=True, need_weights=True)]),
        "gqa": lambda: sdpa(*qkv(10, (1,), 4, 2, 65, 65, 16)),
        "rows": lambda: sdpa(*qkv(11, (2,), 2, 2, 3, 100, 16)),
        "split_k": lambda: sdpa(*qkv(12, (1,), 1, 1, 1, 1100, 32)),
        "head_dim_48": lambda: sdpa(*qkv(13, (1,), 2, 1, 37, 53, 48, 24), scale=0.3),
        "module_fused_plan": lambda: module()(x),
        "module_unfused": lambda: module()(x1),
        "module_padding_causal": lambda: module()(x, key_padding_mask=pad, is_causal=True),
        "module_weights": lambda: np.concatenate([a.ravel() for a in
                                                  module()(x, need_weights=True)]),
        "module_gqa_alibi_window": lambda: module(num_kv_heads=2)(x, alibi=True, window=(7, 0)),
        "module_no_bias": lambda: module(bias=False)(x),
        "cross": cross,
        "decode": decode,
    }


def _digest(a):
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def digests():
    """{dtype: {case: digest}} for the kernel build this process runs."""
    import fastattn

    fastattn.set_num_threads(THREADS)
    return {np.dtype(dt).name: {name: _digest(f()) for name, f in _cases(fastattn, dt).items()}
            for dt in (np.float32, np.float64)}


def _isas():
    """The recorded builds: every one must run here (x86-64 with AVX-512)."""
    return sorted(json.loads(DATA.read_text()))


# The digests are of x86-64 code: another architecture's compiler contracts
# and orders floating-point operations its own way.
pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="digests recorded from x86-64 builds")


@pytest.mark.parametrize("isa", _isas())
def test_outputs_match_the_recorded_ones(isa):
    from fastattn._dispatch import available_isas

    if isa not in available_isas():
        pytest.fail(f"the {isa} build does not run here ({available_isas()}): the recorded "
                    f"digests need a CPU with AVX-512")
    recorded = json.loads(DATA.read_text())
    # the build is chosen at import: one process per build
    env = dict(os.environ, FASTATTN_ISA=isa)
    r = subprocess.run([sys.executable, __file__, "print"], capture_output=True, text=True,
                       env=env, timeout=300, cwd=pathlib.Path(__file__).parent)
    assert r.returncode == 0, r.stderr
    now = json.loads(r.stdout)
    differ = [f"{dt}/{name}" for dt, cases in recorded[isa].items()
              for name, d in cases.items() if now[dt].get(name) != d]
    assert not differ, f"{isa} build: outputs changed bit-wise in {differ}"


# Builds that are another build's kernels compiled with one more instruction
# set for other element types (avx512bf16: AVX-512 plus the bfloat16 pair
# products): their float32 and float64 outputs are that build's, bit for bit.
EXTENDS = {"avx512bf16": "avx512"}


@pytest.mark.parametrize("isa", sorted(EXTENDS))
def test_extended_builds_match_their_base(isa):
    from fastattn._dispatch import _baseline

    if not _baseline.cpu_features().get(isa, False):
        pytest.skip(f"this CPU does not run the {isa} build")
    recorded = json.loads(DATA.read_text())[EXTENDS[isa]]
    env = dict(os.environ, FASTATTN_ISA=isa)
    r = subprocess.run([sys.executable, __file__, "print"], capture_output=True, text=True,
                       env=env, timeout=300, cwd=pathlib.Path(__file__).parent)
    assert r.returncode == 0, r.stderr
    now = json.loads(r.stdout)
    differ = [f"{dt}/{name}" for dt, cases in recorded.items()
              for name, d in cases.items() if now[dt].get(name) != d]
    assert not differ, f"{isa} build: outputs differ from {EXTENDS[isa]}'s in {differ}"


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    got = digests()
    if sys.argv[1:] == ["record"]:
        from fastattn import _dispatch

        isa = _dispatch.kernels.isa()
        table = json.loads(DATA.read_text()) if DATA.exists() else {}
        table[isa] = got
        DATA.parent.mkdir(exist_ok=True)
        DATA.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print(f"recorded {isa}")
    else:
        print(json.dumps(got))
