"""The benchmark harness behind `python -m fastattn bench` (not its timings)."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest

import fastattn
from fastattn.tools import benchmark, peers
from reference import params_of, ref_mhsa, ref_sdpa


def test_python_overhead_is_the_call_minus_its_kernels():
    us = benchmark.python_overhead_us(rounds=20)
    # a small positive figure, far below a call's own time (milliseconds)
    assert 0 < us < 1000
    B, N, D, H = benchmark.PRESETS["small"]
    m = fastattn.MultiHeadSelfAttention(D, H, seed=0)
    x = np.random.default_rng(0).standard_normal((B, N, D)).astype(np.float32)
    t0 = time.perf_counter()
    m(x)
    total = time.perf_counter() - t0
    plan = m._plan
    assert 0 < plan.kernel_seconds < total
    # the plan times the kernels of each call, not of the first
    before = plan.kernel_seconds
    m(x)
    assert plan.kernel_seconds != before


def test_flops_formula():
    B, N, D, H = benchmark.PRESETS["bert"]
    assert benchmark.flops("bert", "core") == 4 * B * N * N * D
    assert benchmark.flops("bert", "full") == 4 * B * N * N * D + 8 * B * N * D * D
    B, N, D, H = benchmark.PRESETS["decode"]
    assert benchmark.flops("decode", "core") == 4 * B * 1 * N * D


def test_time_interleaved_rotates_and_times_every_round():
    calls = []
    impls = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = benchmark.time_interleaved(impls, rounds=4, pause_s=0.0, burst_s=0.0)
    assert set(times) == {"a", "b", "c"}
    assert all(len(t) == 4 and all(s >= 0 for s in t) for t in times.values())
    # each turn: one untimed call then a burst of one; rounds start one later
    firsts = []
    seq = calls[6:]  # after the two warm-up calls of each
    for r in range(4):
        turn = seq[r * 6:(r + 1) * 6]
        firsts.append(turn[0])
    assert firsts == ["a", "b", "c", "a"]


def test_disagreeing_peer_is_refused():
    expected = np.ones((2, 3), np.float32)
    benchmark._check("ok", expected + 1e-6, expected)
    with pytest.raises(AssertionError, match="disagrees"):
        benchmark._check("bad", expected * 1.01, expected)
    with pytest.raises(AssertionError, match="disagrees"):
        benchmark._check("nan", np.full((2, 3), np.nan, np.float32), expected)


def test_bfloat16_check_wants_bfloat16_outputs_within_its_tolerance():
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    expected = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    benchmark._check("ok", (expected + 5e-3).astype(bf16), expected, "bfloat16")
    with pytest.raises(AssertionError, match="not bfloat16"):
        benchmark._check("float32 out", expected, expected, "bfloat16")
    with pytest.raises(AssertionError, match="disagrees"):
        benchmark._check("bad", (expected * 1.1).astype(bf16), expected, "bfloat16")


def _bench(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastattn", "bench", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_bench_command_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    r = _bench("--shapes", "small", "--parts", "core", "--rounds", "2", "--threads", "1",
               "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ratio" in r.stdout and "fastattn" in r.stdout and "numpy" in r.stdout
    data = json.loads(out.read_text())
    rows = data["rows"]
    impls = {row["impl"] for row in rows}
    assert {"fastattn", "numpy"} <= impls
    for row in rows:
        assert row["shape"] == "small" and row["part"] == "core"
        assert len(row["times_ms"]) == 2
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["gflops"] == pytest.approx(
            benchmark.flops("small", "core") / row["median_ms"] / 1e6)
    fast = next(row for row in rows if row["impl"] == "fastattn")
    best = min(row["median_ms"] for row in rows if row["impl"] != "fastattn")
    assert fast["ratio"] == pytest.approx(best / fast["median_ms"])
    assert data["threads"] == 1 and data["numpy_sgemm_gflops"] > 0
    # everything in the report ran at the command's thread count
    assert data["info"]["num_threads"] == 1
    assert data["command"].startswith("python -m fastattn bench")
    # two rounds cannot judge a spread: no row marked, and the run says so
    assert all(row["noisy"] is None for row in rows)
    assert "note: 2 rounds per implementation: too few to judge the spread" in r.stdout


def test_bench_command_notes_decode_has_no_full_forward():
    r = _bench("--shapes", "decode", "--rounds", "1", "--threads", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "decode full: not run" in r.stdout
    assert "decode   core  fastattn" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (("--shapes", "small,huge"), "--shapes"),
    (("--shapes", ","), "--shapes"),
    (("--parts", "foo"), "--parts"),
    (("--rounds", "0"), "--rounds"),
    (("--threads", "-1"), "--threads"),
    (("--threads", "100000"), "--threads"),
    (("--dtype", "float16"), "--dtype"),
])
def test_bench_command_rejects_bad_arguments(args, needle):
    r = _bench(*args, timeout=60)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_onnx_peer_models_carry_the_ir_version_of_their_opset():
    # onnx stamps its own newest IR version; an older onnxruntime refuses that
    # (seen: onnx 1.23 wrote 14, onnxruntime 1.30 reads up to 13)
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")  # the peers need both
    from onnx import TensorProto, helper

    from fastattn.tools import peers

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = peers._onnx_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y], [])
    assert model.ir_version == peers.ONNX_IR_VERSION == 8
    onnx.checker.check_model(model)
    run = peers._ort_session(model, 1)
    a = np.array([[-1.0, 0.5, 2.0], [3.0, -4.0, 0.0]], np.float32)
    np.testing.assert_array_equal(run.run(None, {"x": a})[0], np.maximum(a, 0))


# Peers checked against the float64 reference, not against fastattn: a wrong graph
# must not pass because fastattn is wrong the same way.  Small shapes keep compiling
# cheap; the core has fewer queries than keys (the decode preset's case).
_REL_TOL = {"float32": 1e-5, "bfloat16": 2e-2}  # of the output's largest magnitude
_LIBRARY = {"ov": "openvino", "torch": "torch"}


def _rel_err(got, ref):
    got = np.asarray(got).astype(np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def _values(a, dtype):
    """``a`` in float32, rounded to bfloat16 for a bfloat16 peer (as the bench does)."""
    a = np.asarray(a, np.float32)
    if dtype == "bfloat16":
        a = a.astype(pytest.importorskip("ml_dtypes").bfloat16).astype(np.float32)
    return a


def _peer_or_skip(build):
    try:
        return build()
    except peers.PeerUnavailable as exc:  # e.g. no bf16 instructions for OpenVINO
        pytest.skip(str(exc))


def _expect_dtype(out, dtype):
    if dtype == "bfloat16":
        assert out.dtype == np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    else:
        assert out.dtype == np.float32


@pytest.mark.parametrize("dtype,name", [("float32", "ov-mhsa"), ("bfloat16", "ov-mhsa"),
                                        ("bfloat16", "torch-mha")])
def test_full_forward_peer_matches_the_reference(dtype, name):
    pytest.importorskip(_LIBRARY[name.split("-")[0]])
    B, N, D, H = 2, 12, 32, 4
    m = fastattn.MultiHeadSelfAttention(D, H, seed=3)
    m.load_state_dict({k: _values(v, dtype) for k, v in m.state_dict().items()})
    x = _values(np.random.default_rng(3).standard_normal((B, N, D)), dtype)
    run = _peer_or_skip(lambda: peers.full_peer(name, m, x, 1, dtype=dtype))
    out = np.asarray(run())
    assert out.shape == (B, N, D)
    _expect_dtype(out, dtype)
    assert _rel_err(out, ref_mhsa(x, params_of(m), H)[0]) < _REL_TOL[dtype]


@pytest.mark.parametrize("dtype,name", [("float32", "ov-sdpa"), ("bfloat16", "ov-sdpa"),
                                        ("bfloat16", "torch-sdpa")])
def test_core_peer_matches_the_reference(dtype, name):
    pytest.importorskip(_LIBRARY[name.split("-")[0]])
    rng = np.random.default_rng(4)
    q = _values(rng.standard_normal((2, 3, 5, 8)), dtype)
    k, v = (_values(rng.standard_normal((2, 3, 16, 8)), dtype) for _ in range(2))
    run = _peer_or_skip(lambda: peers.core_peer(name, q, k, v, 1, dtype=dtype))
    out = np.asarray(run())
    assert out.shape == q.shape
    _expect_dtype(out, dtype)
    assert _rel_err(out, ref_sdpa(q, k, v)[0]) < _REL_TOL[dtype]


def test_openvino_core_peer_causal_where_its_mask_is_fastattns():
    pytest.importorskip("openvino")
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, 9, 8)).astype(np.float32) for _ in range(3))
    out = peers.core_peer("ov-sdpa", q, k, v, 1, is_causal=True)()
    assert _rel_err(out, ref_sdpa(q, k, v, is_causal=True)[0]) < _REL_TOL["float32"]
    # fewer queries than keys: top-left and bottom-right alignment differ
    with pytest.raises(peers.PeerUnavailable):
        peers.core_peer("ov-sdpa", q[:, :, :4], k, v, 1, is_causal=True)


def test_peers_without_a_bfloat16_path_are_skipped_not_run():
    m = fastattn.MultiHeadSelfAttention(32, 4, seed=0)
    x = np.zeros((1, 4, 32), np.float32)
    for name in set(peers.FULL_PEERS) - set(peers.PEERS["bfloat16"][0]):
        with pytest.raises(peers.PeerUnavailable, match="bfloat16"):
            peers.full_peer(name, m, x, 1, dtype="bfloat16")
    with pytest.raises(ValueError, match="unknown"):
        peers.full_peer("no-such-peer", m, x, 1)


def test_bench_command_bfloat16_table(tmp_path):
    pytest.importorskip("ml_dtypes")
    out = tmp_path / "bench.json"
    r = _bench("--dtype", "bfloat16", "--shapes", "small", "--parts", "core", "--rounds", "1",
               "--threads", "1", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dtype: bfloat16" in r.stdout
    data = json.loads(out.read_text())
    assert data["dtype"] == "bfloat16"
    impls = {row["impl"] for row in data["rows"]}
    # only bfloat16 implementations, and fastattn's float32 as the yardstick of
    # its speed-up: no float32 peer slips into the table
    assert {"fastattn", benchmark.OWN_F32} <= impls
    assert impls <= {"fastattn", benchmark.OWN_F32} | set(peers.PEERS["bfloat16"][1])
    assert all(row["dtype"] == "bfloat16" for row in data["rows"])
    fast = next(row for row in data["rows"] if row["impl"] == "fastattn")
    own = next(row for row in data["rows"] if row["impl"] == benchmark.OWN_F32)
    assert own["ratio"] is None
    assert (fast["ratio"] is not None) == (len(impls) > 2)
    assert "small core: fastattn bfloat16 ran" in r.stdout


def test_bfloat16_table_times_fastattn_in_bfloat16(monkeypatch):
    # fastattn's rows run its bfloat16 module and function (bfloat16 arrays in
    # and out, checked against the float32 forward), beside its float32 forward
    bf16 = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    real_sdpa = benchmark.scaled_dot_product_attention
    seen = []

    def sdpa(q, k, v):
        seen.append(q.dtype)
        return real_sdpa(q, k, v)

    monkeypatch.setattr(benchmark, "scaled_dot_product_attention", sdpa)
    monkeypatch.setitem(peers.PEERS, "bfloat16", ((), ()))  # fastattn alone: fast
    rows, notes = benchmark.run(["small"], threads=1, rounds=1, pause_s=0.0, progress=False,
                                dtype="bfloat16")
    assert [(r.part, r.impl) for r in rows] == [
        ("full", "fastattn"), ("full", benchmark.OWN_F32),
        ("core", "fastattn"), ("core", benchmark.OWN_F32)]
    assert not any("skipped" in n for n in notes)
    assert sum("fastattn bfloat16 ran" in n for n in notes) == 2
    assert bf16 in seen and np.dtype(np.float32) in seen


# ---- noisy rows ------------------------------------------------------------------------

def test_spread_is_the_iqr_and_marks_rounds_that_disagree():
    # the case: 3 rounds from 0.35 to 11.8 ms
    iqr, noisy = benchmark.spread([0.35, 2.0, 11.8])
    assert noisy is True and iqr == pytest.approx(np.subtract(*np.percentile(
        [0.35, 2.0, 11.8], [75, 25])))
    # one stray round among many leaves the median sound: not marked
    assert benchmark.spread([1.0] * 6 + [11.8]) == (0.0, False)
    assert benchmark.spread([1.0, 1.1, 1.2, 1.1, 1.0])[1] is False
    # below 3 rounds: cannot say
    assert benchmark.spread([0.35, 11.8])[1] is None
    assert benchmark.spread([1.0])[1] is None
    assert benchmark.more_rounds(3) == 15 and benchmark.more_rounds(11) == 22


def _row(impl, times, shape="small", part="core", ratio=None):
    iqr, noisy = benchmark.spread(times)
    return benchmark.Row(shape=shape, part=part, impl=impl, median_ms=float(np.median(times)),
                         min_ms=min(times), max_ms=max(times), gflops=1.0, ratio=ratio,
                         times_ms=list(times), iqr_ms=iqr, noisy=noisy)


def _noisy_rows():
    return [_row("fastattn", [2.0, 2.1, 2.05], ratio=0.17),
            _row("numpy", [0.35, 2.0, 11.8]),               # noisy, and the fastest peer
            _row("ort-mha", [3.0, 3.1, 3.05]),
            _row("fastattn", [1.0, 1.05, 1.1], shape="bert", ratio=2.0),
            _row("numpy", [2.0, 2.1, 2.05], shape="bert")]


def test_table_marks_noisy_rows_and_the_ratios_taken_from_them():
    lines = benchmark.format_table(_noisy_rows(), 1).splitlines()
    assert lines[1] == (f"{benchmark.NOISY_RULE}: its median, and a ratio from it, is "
                        f"unreliable")
    assert benchmark.NOISY_RULE == ("noisy (!): the middle half of the rounds (interquartile "
                                    "range) spans more than 25% of the median")
    rows = {(line.split()[0], line.split()[2]): line for line in lines[3:]}
    assert " ! " in rows[("small", "numpy")] and " ! " not in rows[("small", "ort-mha")]
    # fastattn's own rounds agree, but its ratio is to the noisy numpy row
    assert " ! " not in rows[("small", "fastattn")]
    assert rows[("small", "fastattn")].endswith("0.17!")
    assert rows[("bert", "fastattn")].endswith("2.00") and "!" not in rows[("bert", "numpy")]


def test_spread_notes_suggest_more_rounds():
    rows = _noisy_rows()
    (note,) = benchmark.spread_notes(rows, 3)
    assert note == ("1 of 5 rows noisy (marked !: small core numpy); their medians, and ratios "
                    "from them, are unreliable: rerun with --rounds 15 (now 3) on an otherwise "
                    "idle machine")
    assert benchmark.spread_notes([r for r in rows if not r.noisy], 3) == []
    (few,) = benchmark.spread_notes([_row("fastattn", [1.0, 2.0])], 2)
    assert few.startswith("2 rounds per implementation: too few to judge the spread (3 or "
                          "more; default 7), so no row is marked")


def test_bench_command_prints_the_marks_and_the_suggestion(tmp_path, capsys, monkeypatch):
    from fastattn.__main__ import main

    monkeypatch.setattr(benchmark, "run", lambda *a, **k: (_noisy_rows(), ["a peer note"]))
    monkeypatch.setattr(benchmark, "numpy_sgemm_gflops", lambda threads: (100.0, True))
    out_json = tmp_path / "bench.json"
    assert main(["bench", "--rounds", "3", "--no-progress", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "noisy (!): the middle half of the rounds" in out
    assert "note: 1 of 5 rows noisy (marked !: small core numpy)" in out
    assert "rerun with --rounds 15 (now 3)" in out and "note: a peer note" in out
    data = json.loads(out_json.read_text())
    assert data["noisy_rule"] == benchmark.NOISY_RULE
    assert [r["noisy"] for r in data["rows"]] == [False, True, False, False, False]
    assert all("iqr_ms" in r for r in data["rows"])
    assert data["notes"][0].startswith("1 of 5 rows noisy")
