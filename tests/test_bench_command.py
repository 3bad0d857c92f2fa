"""The benchmark harness behind `python -m fastattn bench` (not its timings)."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest

import fastattn
from fastattn.tools import benchmark


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
