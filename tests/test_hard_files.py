"""MultiHeadSelfAttention.load on hostile files.

Every file that is not a module written by ``save`` must raise ``ValueError``
with the reason (and, for file-level problems, the path) and must never run
code: the pickle cases carry an object whose ``__reduce__`` creates a marker
file, which must not exist afterwards.  Files are also checked for what they
make ``load`` allocate: a few-KB file must not make it allocate hundreds of MB
before it is rejected (tracemalloc sees NumPy's allocations).
"""
import io
import json
import pickle
import tracemalloc
import zipfile

import numpy as np
import pytest

import fastattn

MHSA = fastattn.MultiHeadSelfAttention
FORMAT = "fastattn.MultiHeadSelfAttention/1"


@pytest.fixture
def module():
    return MHSA(8, 2, seed=0)


@pytest.fixture
def good(tmp_path, module):
    path = tmp_path / "good.npz"
    module.save(path)
    return path


def config(module, **changes):
    cfg = {"format": FORMAT, **module.config()}
    if "d_model" in changes:  # a file of the old spelling: "d_model" where config() has embed_dim
        del cfg["embed_dim"]
    return np.array(json.dumps({**cfg, **changes}))


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def expect_value_error(path, *words):
    """load(path) raises ValueError whose message has every one of ``words``."""
    with pytest.raises(ValueError) as ei:
        MHSA.load(path)
    msg = str(ei.value)
    for w in words:
        assert str(w) in msg, f"message should mention {w!r}: {msg!r}"
    return msg


def peak_bytes(fn):
    """(result or exception, traced peak in bytes) of fn()."""
    tracemalloc.start()
    try:
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001
            res = e
        return res, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_good_file_roundtrip(good, module):
    m = MHSA.load(good)
    for name, arr in module.state_dict().items():
        np.testing.assert_array_equal(m.state_dict()[name], arr)


# ------------------------------------------------------------- truncated

@pytest.mark.parametrize("cut", [0, 1, 2, 4, 10, 30, 100, 300, 0.5, -200, -100, -22, -1])
def test_truncated(tmp_path, good, cut):
    raw = good.read_bytes()
    n = int(len(raw) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(raw) + cut)
    path = tmp_path / "truncated.npz"
    path.write_bytes(raw[:n])
    expect_value_error(path, path)


# ------------------------------------------------------------- corrupted

@pytest.mark.parametrize("seed", range(12))
def test_random_byte_flips(tmp_path, good, module, seed):
    """Random bytes overwritten anywhere: ValueError, or (a byte of metadata
    nobody reads) the very same module."""
    rng = np.random.default_rng(seed)
    raw = bytearray(good.read_bytes())
    for i in rng.integers(0, len(raw), 1 + seed % 6):
        raw[i] = (raw[i] + int(rng.integers(1, 256))) % 256
    path = tmp_path / "flipped.npz"
    path.write_bytes(bytes(raw))
    try:
        m = MHSA.load(path)
    except ValueError as e:
        assert str(path) in str(e) or str(e).strip()
        return
    for name, arr in module.state_dict().items():
        np.testing.assert_array_equal(m.state_dict()[name], arr)


@pytest.mark.parametrize("region", ["local-header", "data", "central-directory", "end-record"])
def test_corrupted_regions(tmp_path, good, region):
    raw = bytearray(good.read_bytes())
    n = len(raw)
    start = {"local-header": 0, "data": n // 3, "central-directory": n - 400,
             "end-record": n - 22}[region]
    for i in range(start, min(start + 16, n)):
        raw[i] ^= 0xA5
    path = tmp_path / f"corrupt-{region}.npz"
    path.write_bytes(bytes(raw))
    expect_value_error(path, path)


@pytest.mark.parametrize("prefix", [b"", b"PK\x03\x04", b"\x93NUMPY", b"\x80\x04", b"\x93NUMPY\x01\x00"],
                         ids=["random", "zip-magic", "npy-magic", "pickle-magic", "npy-v1"])
def test_random_bytes(tmp_path, prefix):
    path = tmp_path / "random.npz"
    path.write_bytes(prefix + np.random.default_rng(1).bytes(4000))
    expect_value_error(path, path)


def test_zeros(tmp_path, good):
    path = tmp_path / "zeros.npz"
    path.write_bytes(bytes(len(good.read_bytes())))
    expect_value_error(path, path)


def test_empty_and_directory(tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    expect_value_error(empty, empty)
    expect_value_error(tmp_path, tmp_path)
    # a path that does not exist: ValueError, or the plain FileNotFoundError
    with pytest.raises((ValueError, FileNotFoundError)) as ei:
        MHSA.load(tmp_path / "missing.npz")
    assert "missing.npz" in str(ei.value)


# Regression test (bug found by this file, fixed since): BUG (message): a plain .npy file
# passed to load raises ValueError whose reason is "'numpy.ndarray' object does not
# support the context manager protocol" (np.load returned an array, not an NpzFile);
# expected a reason such as 'not an .npz archive'
def test_npy_instead_of_npz(tmp_path):
    path = tmp_path / "weights.npy"
    np.save(path, np.zeros(3))
    msg = expect_value_error(path, path)
    assert "context manager" not in msg


# ------------------------------------------------------------- pickles

class Evil:
    """Creates ``marker`` when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("slot", ["w_q", "b_o", "__config__", "extra", "only"])
def test_pickled_object_array_is_never_run(tmp_path, module, slot):
    marker = tmp_path / "pickle-ran"
    evil = np.array([Evil(marker)], dtype=object)
    arrays = {"__config__": config(module), **module.state_dict()}
    if slot == "only":
        arrays = {"w_q": evil}
    elif slot == "extra":
        arrays["extra"] = evil
    else:
        arrays[slot] = evil
    path = write_npz(tmp_path / "pickled.npz", **arrays)  # np.savez pickles object arrays
    # the file really holds a pickle that would run
    with np.load(path, allow_pickle=True) as data:
        assert any(data[n].dtype == object for n in data.files)
    assert marker.exists()
    marker.unlink()

    expect_value_error(path)
    assert not marker.exists(), "load() executed a pickle"


def test_raw_pickle_file_is_never_run(tmp_path):
    marker = tmp_path / "pickle-ran"
    path = tmp_path / "model.npz"
    path.write_bytes(pickle.dumps(Evil(marker)))
    expect_value_error(path, path)
    assert not marker.exists(), "load() executed a pickle"


def test_pickled_npy_member_is_never_run(tmp_path, module):
    """An .npz member that is an object-dtype .npy written by hand."""
    marker = tmp_path / "pickle-ran"
    path = tmp_path / "member.npz"
    module.save(path)
    buf = io.BytesIO()
    np.save(buf, np.array([Evil(marker)], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("w_z.npy", buf.getvalue())
    assert not marker.exists()
    expect_value_error(path)
    assert not marker.exists(), "load() executed a pickle"


# ------------------------------------------------------------- wrong shapes

@pytest.mark.parametrize("name,shape", [("w_q", (8, 4)), ("w_k", (4, 8)), ("w_o", (8,)),
                                        ("b_o", (7,)), ("b_q", ()), ("w_v", (1, 8, 8))])
def test_wrong_weight_shape(tmp_path, module, name, shape):
    arrays = {"__config__": config(module), **module.state_dict()}
    arrays[name] = np.zeros(shape, np.float32)
    path = write_npz(tmp_path / "shape.npz", **arrays)
    expect_value_error(path, name, str(shape))


def test_config_disagrees_with_weights(tmp_path, module):
    path = write_npz(tmp_path / "kv.npz", __config__=config(module, num_kv_heads=1),
                     **module.state_dict())
    expect_value_error(path, "w_k")


def test_missing_and_extra_weights(tmp_path, module):
    sd = module.state_dict()
    del sd["b_o"]
    path = write_npz(tmp_path / "missing.npz", __config__=config(module), **sd)
    expect_value_error(path, "b_o")
    path = write_npz(tmp_path / "extra.npz", __config__=config(module),
                     extra=np.zeros(3), **module.state_dict())
    expect_value_error(path, "extra")


# Regression test (bug found by this file, fixed since): BUG: a file whose weights are
# int32 (or any non-float dtype) makes load raise TypeError ('w_q: expected a float array,
# got dtype int32') from load_state_dict; load documents ValueError, with the reason, for
# every file that is not a module
def test_non_float_weights(tmp_path, module):
    sd = module.state_dict()
    sd["w_q"] = sd["w_q"].astype(np.int32)
    path = write_npz(tmp_path / "int.npz", __config__=config(module), **sd)
    expect_value_error(path, "w_q")


# ------------------------------------------------------------- config

def test_missing_config(tmp_path, module):
    path = write_npz(tmp_path / "noconfig.npz", **module.state_dict())
    expect_value_error(path, "__config__", path)


@pytest.mark.parametrize("raw", [
    np.array("not json"), np.array(json.dumps([1, 2])), np.array(json.dumps("str")),
    np.array(json.dumps({"format": "other/1"})), np.array([1, 2]), np.zeros((2, 2)),
    np.array(b"\xff\xfe"), np.array(""),
], ids=["not-json", "list", "string", "other-format", "int-array", "2d", "bytes", "empty"])
def test_broken_config(tmp_path, module, raw):
    path = write_npz(tmp_path / "cfg.npz", __config__=raw, **module.state_dict())
    expect_value_error(path, path)


@pytest.mark.parametrize("field,value", [
    ("d_model", True), ("d_model", 8.0), ("d_model", "8"), ("d_model", -8), ("d_model", 0),
    ("d_model", None), ("embed_dim", True), ("embed_dim", 8.0), ("embed_dim", "8"),
    ("embed_dim", -8), ("embed_dim", 0), ("embed_dim", None), ("num_heads", 3), ("num_heads", 0), ("num_kv_heads", 3),
    ("bias", 1), ("bias", "yes"), ("dtype", "float8"), ("dtype", "int8"), ("dtype", None),
])
def test_invalid_config_field(tmp_path, module, field, value):
    path = write_npz(tmp_path / "field.npz", __config__=config(module, **{field: value}),
                     **module.state_dict())
    expect_value_error(path)


def test_config_field_missing(tmp_path, module):
    old = {"format": FORMAT, **module.config()}
    old["d_model"] = old.pop("embed_dim")  # the spelling of files from before the rename
    for field in ("embed_dim", "num_heads", "num_kv_heads", "bias", "dtype", "format",
                  "d_model"):
        cfg = dict(old) if field == "d_model" else {"format": FORMAT, **module.config()}
        del cfg[field]
        path = write_npz(tmp_path / f"no-{field}.npz", __config__=np.array(json.dumps(cfg)),
                         **module.state_dict())
        expect_value_error(path)


# Regression test (bug found by this file, fixed since): BUG: a config whose d_model is an
# integer too big for a float (10**1000) makes load raise 'OverflowError: integer division
# result too large for a float' from the constructor's memory estimate; expected
# ValueError
def test_config_d_model_beyond_float(tmp_path, module):
    path = write_npz(tmp_path / "huge.npz", __config__=config(module, d_model=10**1000),
                     **module.state_dict())
    expect_value_error(path)


# Regression test (bug found by this file, fixed since): BUG: a few-KB file whose config
# claims d_model = 2**20 or 2**40 (weights 8 x 8) makes load raise MemoryError ('the
# module's parameters needs 1.64e+04 GiB ...'): the module is built from the config before
# the stored arrays are compared with it; expected ValueError naming the weight whose
# shape does not match the config
@pytest.mark.parametrize("d_model", [2**20, 2**40])
def test_config_claims_huge_model(tmp_path, module, d_model):
    path = write_npz(tmp_path / "huge.npz",
                     __config__=config(module, d_model=d_model, num_heads=2, num_kv_heads=2),
                     **module.state_dict())
    msg = expect_value_error(path)
    assert "d_model" in msg or "w_q" in msg, msg


# Regression test (bug found by this file, fixed since): BUG: a 4 KB file whose config
# claims d_model = 4096 (weights 8 x 8) makes load allocate and randomly initialise a
# 4096-wide module (256 MiB traced) before it finds that w_q has the wrong shape; expected
# the shapes checked against the config first (ValueError without allocating the module)
def test_config_mismatch_allocates_nothing(tmp_path, module):
    path = write_npz(tmp_path / "big.npz",
                     __config__=config(module, d_model=4096, num_heads=2, num_kv_heads=2),
                     **module.state_dict())
    res, peak = peak_bytes(lambda: MHSA.load(path))
    assert isinstance(res, ValueError), res
    assert peak < 16 << 20, f"rejecting a 4 KB file traced {peak / 2**20:.0f} MiB"


# ------------------------------------------------------------- crafted archives

def _npy_header_only(shape, dtype="<f4"):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + bytes(64)


# Regression test (bug found by this file, fixed since): BUG: an .npz member whose .npy
# header declares a huge shape ((2**34,) float32) with 64 bytes of data makes np.load (via
# load) try to allocate the declared 64 GiB before reading; load rejects the file with
# ValueError only after that allocation fails (on a machine with enough memory it
# succeeds); expected the member's header checked (shape and dtype against the config)
# before any data is read
@pytest.mark.parametrize("member,shape", [("junk.npy", (2**34,)), ("w_q.npy", (8, 2**31)),
                                          ("junk.npy", (2**28,))])
def test_crafted_header_huge_shape(tmp_path, good, member, shape):
    path = tmp_path / "crafted.npz"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            if info.filename != member:
                zout.writestr(info, zin.read(info))
        zout.writestr(member, _npy_header_only(shape))
    res, peak = peak_bytes(lambda: MHSA.load(path))
    assert isinstance(res, ValueError), repr(res)
    assert peak < 64 << 20, f"a {path.stat().st_size}-byte file: traced {peak / 2**20:.0f} MiB"


# Regression test (bug found by this file, fixed since): BUG: load decompresses every
# member of the archive before checking the names and shapes: a 0.25 MB savez_compressed
# file with an extra 256 MiB member of zeros ('junk', or an oversized 'w_q') makes load
# allocate 256 MiB (about 1 s) before the ValueError 'unexpected keys' / 'expected shape';
# expected names and .npy headers checked first
@pytest.mark.parametrize("member", ["junk", "w_q"])
def test_compressed_bomb(tmp_path, module, member):
    arrays = {"__config__": config(module), **module.state_dict()}
    arrays[member] = np.zeros(2**25)  # 256 MiB, compresses to 0.25 MB
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, **arrays)
    assert path.stat().st_size < 2 << 20
    res, peak = peak_bytes(lambda: MHSA.load(path))
    assert isinstance(res, ValueError), repr(res)
    assert peak < 64 << 20, f"a {path.stat().st_size}-byte file: traced {peak / 2**20:.0f} MiB"


def test_failed_load_leaves_no_partial_module(tmp_path, module):
    """load is a classmethod: a failure returns nothing and touches nothing else."""
    sd = module.state_dict()
    sd["w_o"] = np.zeros((3, 3), np.float32)
    path = write_npz(tmp_path / "bad.npz", __config__=config(module), **sd)
    before = module.state_dict()
    expect_value_error(path, "w_o")
    for name, arr in before.items():
        np.testing.assert_array_equal(module.state_dict()[name], arr)


# ---- the first argument's two names: files and pickles of either spelling ----------

def test_files_of_the_old_spelling_load(tmp_path, module):
    # files written before both classes named their first argument embed_dim
    # store the self-attention class's width as "d_model"
    path = write_npz(tmp_path / "old.npz", __config__=config(module, d_model=8),
                     **module.state_dict())
    loaded = MHSA.load(path)
    assert loaded == module and loaded.config()["embed_dim"] == 8


def test_a_config_with_both_spellings_is_refused(tmp_path, module):
    path = write_npz(tmp_path / "both.npz",
                     __config__=np.array(json.dumps({"format": FORMAT, **module.config(),
                                                     "d_model": 8})),
                     **module.state_dict())
    msg = expect_value_error(path)
    assert "embed_dim" in msg and "d_model" in msg, msg


def test_pickles_of_the_old_spelling_load(module):
    import pickle
    data = module.__getstate__()
    data["config"]["d_model"] = data["config"].pop("embed_dim")
    m = MHSA.__new__(MHSA)
    m.__setstate__(data)
    assert m == module
    assert pickle.loads(pickle.dumps(module)) == module


def test_a_file_of_another_version_of_the_same_class_says_so(tmp_path, module):
    path = write_npz(tmp_path / "v2.npz",
                     __config__=config(module, format="fastattn.MultiHeadSelfAttention/2"),
                     **module.state_dict())
    msg = expect_value_error(path, "another file version", "/2")
    assert "load it with that class" not in msg


def test_an_archive_holding_a_member_twice_is_refused(tmp_path, good):
    buf = io.BytesIO()
    np.save(buf, np.zeros((8, 8), np.float32))
    with pytest.warns(UserWarning, match="Duplicate name"):
        with zipfile.ZipFile(good, "a") as z:
            z.writestr("w_q.npy", buf.getvalue())
    expect_value_error(good, str(good), "'w_q.npy' appears twice")
