"""Issue 18, items 6, 9 and 10: which file load reads, bytes paths, big-endian
arrays in the function, the CLI's memory and output-path errors, ALiBi slopes
whose bias would overflow."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastattn
from fastattn import MultiHeadSelfAttention as MHSA
from reference import positional_bias, ref_sdpa
from _util import tol


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "fastattn", *args, "--no-progress"],
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- item 6: load's file name

def test_load_reads_the_file_save_wrote_or_refuses_an_ambiguous_name(tmp_path):
    old, new = MHSA(8, 2, seed=0), MHSA(8, 2, seed=1)
    bare = tmp_path / "model"
    with open(bare, "wb") as f:  # an earlier save through a file object: no suffix added
        old.save(f)
    assert MHSA.load(bare) == old  # the only file of that name
    new.save(bare)  # writes model.npz
    with pytest.raises(ValueError, match="ambiguous") as ei:
        MHSA.load(bare)
    assert str(bare) in str(ei.value) and str(bare) + ".npz" in str(ei.value)
    assert MHSA.load(str(bare) + ".npz") == new
    os.remove(bare)
    assert MHSA.load(bare) == new


# ---------------------------------------------------------------- item 9: bytes paths

def test_load_and_save_refuse_what_is_neither_a_path_nor_a_file(tmp_path):
    for bad in (3, None, 2.5):
        with pytest.raises(TypeError, match="path must be a file name"):
            MHSA.load(bad)
        with pytest.raises(TypeError):
            MHSA(8, 2).save(bad)


def test_load_takes_one_file_under_two_names_or_a_folder_beside_a_file(tmp_path):
    m = MHSA(8, 2, seed=4)
    m.save(tmp_path / "a")
    os.symlink(tmp_path / "a.npz", tmp_path / "a")  # the same file twice: not ambiguous
    assert MHSA.load(tmp_path / "a") == m
    (tmp_path / "b.npz").mkdir()  # a folder is never what save wrote
    with open(tmp_path / "b", "wb") as f:
        m.save(f)
    assert MHSA.load(tmp_path / "b") == m


def test_load_accepts_bytes_paths(tmp_path):
    m = MHSA(8, 2, seed=2)
    m.save(tmp_path / "m.npz")
    assert MHSA.load(os.fsencode(tmp_path / "m.npz")) == m
    assert MHSA.load(os.fsencode(tmp_path / "m")) == m


def test_save_accepts_bytes_paths(tmp_path):
    m = MHSA(8, 2, seed=3)
    m.save(os.fsencode(tmp_path / "m"))
    assert MHSA.load(tmp_path / "m.npz") == m


# ---------------------------------------------------------------- item 9: big-endian arrays

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_function_accepts_big_endian_arrays_like_the_modules(rng, dtype):
    q = rng.standard_normal((2, 5, 4)).astype(dtype)
    k = rng.standard_normal((1, 7, 4)).astype(dtype)
    v = rng.standard_normal((1, 7, 3)).astype(dtype)
    mask = rng.standard_normal((5, 7)).astype(dtype)
    swapped = [a.astype(a.dtype.newbyteorder(">")) for a in (q, k, v, mask)]
    out = fastattn.scaled_dot_product_attention(*swapped[:3], swapped[3], is_causal=True)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    ref, _ = ref_sdpa(q, k, v, attn_mask=mask, is_causal=True)
    np.testing.assert_allclose(out, ref, **tol(dtype))
    m = MHSA(8, 2, dtype=dtype, seed=4)
    x = rng.standard_normal((1, 3, 8)).astype(dtype)
    np.testing.assert_array_equal(m(x.astype(x.dtype.newbyteorder(">"))), m(x))


# ---------------------------------------------------------------- item 9: the CLI

def test_scaling_without_memory_for_dk_names_the_option():
    r = _cli("scaling", "--dk", "300000000", timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--dk 300000000" in r.stderr and "memory" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_bench_and_scaling_check_output_paths_before_running(tmp_path, option):
    missing = str(tmp_path / "no-such-dir" / "out")
    # /proc takes no new files, even from root (for whom os.access says yes)
    runs = [("bench", "--shapes", "small", "--parts", "core", "--rounds", "1",
             "--threads", "1", option, missing),
            ("scaling", "--dk", "4", "--trials", "2", "--length", "2", option, missing),
            ("scaling", "--dk", "4", "--trials", "2", "--length", "2", option, str(tmp_path)),
            ("scaling", "--dk", "4", "--trials", "2", "--length", "2", option,
             "/proc/fastattn-out")]
    for args in runs:
        r = _cli(*args)
        assert r.returncode == 2, r.stdout + r.stderr
        assert option in r.stderr and "Traceback" not in r.stderr
        assert r.stdout == ""  # refused before any measurement


# ---------------------------------------------------------------- item 10: ALiBi overflow

def test_alibi_slopes_whose_bias_overflows_are_refused_naming_slope_distance_dtype():
    x = np.ones((1, 4, 8), np.float32)
    with pytest.raises(ValueError, match=r"alibi_slopes\[0\] = -3e\+38") as ei:
        MHSA(8, 2, seed=5)(x, alibi_slopes=[-3e38, 1])
    assert "(3)" in str(ei.value) and "float32" in str(ei.value)
    q = np.ones((1, 1, 4), np.float32)
    k = np.ones((1, 6, 4), np.float32)
    with pytest.raises(ValueError, match=r"alibi_slopes\[0\].*\(5\).*float32"):
        fastattn.scaled_dot_product_attention(q, k, k, alibi_slopes=[2e37])


def test_alibi_limit_counts_cached_keys_and_a_refused_call_leaves_the_cache(rng):
    m = MHSA(8, 2, seed=6)
    cache = m.new_cache(1, 16)
    x = rng.standard_normal((1, 3, 8)).astype(np.float32)
    slopes = [3e37, 0.5]  # distance 2 fits float32's quarter (8.5e37), 3 does not
    m(x, cache=cache, alibi_slopes=slopes)
    with pytest.raises(ValueError, match=r"alibi_slopes\[0\].*\(3\)"):
        m(x[:, :1], cache=cache, alibi_slopes=slopes)
    assert len(cache) == 3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_alibi_slopes_within_the_limit_match_the_reference(rng, dtype):
    # the largest slopes allowed: the bias dominates and picks one key per row
    Lq, Lk = 3, 5
    limit = float(np.finfo(dtype).max) / 4 / (Lk - 1)
    slopes = np.array([limit, -limit, 1.0]) * 0.999
    q = rng.standard_normal((3, Lq, 4)).astype(dtype)
    k = rng.standard_normal((3, Lk, 4)).astype(dtype)
    v = rng.standard_normal((3, Lk, 2)).astype(dtype)
    out = fastattn.scaled_dot_product_attention(q, k, v, alibi_slopes=slopes)
    ref, _ = ref_sdpa(q, k, v, attn_mask=positional_bias(Lq, Lk, 3, slopes=slopes))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, **tol(dtype))


def test_alibi_slopes_and_sinks_take_bfloat16_arrays_as_the_values_they_hold(rng):
    # a bfloat16 model's per-head settings come as bfloat16 (numpy kind 'V')
    from fastattn._dtypes import BFLOAT16
    q = rng.standard_normal((1, 4, 3, 8)).astype(np.float32)
    k = rng.standard_normal((1, 4, 5, 8)).astype(np.float32)
    slopes = fastattn.alibi_slopes(4).astype(BFLOAT16)
    sinks = np.array([0.5, -1, 2, 0]).astype(BFLOAT16)
    got = fastattn.scaled_dot_product_attention(q, k, k, alibi_slopes=slopes, sinks=sinks)
    want = fastattn.scaled_dot_product_attention(q, k, k, alibi_slopes=slopes.astype(np.float32),
                                                 sinks=sinks.astype(np.float32))
    np.testing.assert_array_equal(got, want)
    with pytest.raises(TypeError, match="alibi_slopes must be a real array, got dtype bool"):
        fastattn.scaled_dot_product_attention(q, k, k, alibi_slopes=np.ones(4, bool))
