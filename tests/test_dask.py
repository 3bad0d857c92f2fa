"""Modules pickle cheaply, and fastattn.dask maps them over dask arrays on a
two-process LocalCluster with the same bits as the in-process call."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import fastattn


def test_module_pickles_as_config_and_arrays(rng):
    m = fastattn.MultiHeadSelfAttention(64, 4, num_kv_heads=2, dtype=np.float64, seed=3)
    x = rng.standard_normal((2, 9, 64))
    y = m(x)  # packs weights and allocates scratch: none of it may travel
    blob = pickle.dumps(m)
    param_bytes = sum(a.nbytes for a in m.state_dict().values())
    assert len(blob) < param_bytes + 4096
    m2 = pickle.loads(blob)
    assert m2 == m and m2.config() == m.config()
    np.testing.assert_array_equal(m2(x), y)


def test_unpickled_module_works_in_a_fresh_process(tmp_path, rng):
    m = fastattn.MultiHeadSelfAttention(32, 4, seed=5)
    x = rng.standard_normal((3, 7, 32)).astype(np.float32)
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(m))
    np.save(tmp_path / "x.npy", x)
    code = (
        "import pickle, numpy as np, fastattn\n"
        f"m = pickle.loads(open({str(tmp_path / 'm.pkl')!r}, 'rb').read())\n"
        "fastattn.set_num_threads(1)\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, m(np.load({str(tmp_path / 'x.npy')!r})))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), m(x))


def test_importing_fastattn_does_not_import_dask():
    code = "import sys, fastattn; print('dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
import fastattn.dask as fdask  # noqa: E402


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def test_apply_on_a_two_process_cluster_matches_in_process_bits(client, rng):
    m = fastattn.MultiHeadSelfAttention(48, 6, seed=11)
    S, N = 11, 13
    x = rng.standard_normal((S, N, 48)).astype(np.float32)
    kpm = rng.random((S, N)) < 0.2
    kpm[:, 0] = False  # every sequence keeps at least one key
    dx = da.from_array(x, chunks=(4, N, 48))
    y = fdask.apply(m, dx, key_padding_mask=kpm, is_causal=True).compute()
    assert y.shape == (S, N, 48) and y.dtype == np.float32
    for lo in range(0, S, 4):
        hi = min(lo + 4, S)
        expected = m(x[lo:hi], key_padding_mask=kpm[lo:hi], is_causal=True)
        np.testing.assert_array_equal(y[lo:hi], expected)
    # the tasks really ran on both worker processes
    assert len(client.scheduler_info()["workers"]) == 2


def test_thread_plan_shares_each_hosts_cores(client):
    from fastattn import _resources

    plan = fdask.thread_plan(client)
    cores = _resources.usable_cpus()  # the workers' CPUs are this process's
    assert set(plan["plan"]) == set(client.scheduler_info()["workers"])
    assert all(n == max(1, cores // 2) for n in plan["plan"].values())
    assert fdask.thread_plan(client, threads_per_task=3) == {"plan": {}, "default": 3}
    with pytest.raises(ValueError, match="threads_per_task"):
        fdask.thread_plan(client, threads_per_task=0)


def test_apply_with_a_shared_mask_and_dask_padding_on_the_local_scheduler(rng):
    m = fastattn.MultiHeadSelfAttention(16, 2, seed=2)
    x = rng.standard_normal((6, 5, 16)).astype(np.float32)
    mask = np.tril(np.ones((5, 5), bool))
    kpm = da.from_array(np.zeros((6, 5), bool), chunks=(3, 5))
    y = fdask.apply(m, x, attn_mask=mask, key_padding_mask=kpm).compute(scheduler="threads")
    np.testing.assert_array_equal(y, m(x, attn_mask=mask))


def test_apply_rejects_bad_input(rng):
    m = fastattn.MultiHeadSelfAttention(16, 2, seed=2)
    with pytest.raises(ValueError, match="num_sequences"):
        fdask.apply(m, np.zeros((2, 3, 8), np.float32))
    with pytest.raises(ValueError, match="key_padding_mask"):
        fdask.apply(m, np.zeros((2, 3, 16), np.float32), key_padding_mask=np.zeros((2, 4), bool))
    with pytest.raises(TypeError, match="module"):
        fdask.apply(object(), np.zeros((2, 3, 16), np.float32))
    # numpy masked arrays: their mask would be dropped
    x = np.zeros((2, 3, 16), np.float32)
    with pytest.raises(TypeError, match="x is a numpy masked array"):
        fdask.apply(m, np.ma.masked_array(x, mask=x == 0))
    with pytest.raises(TypeError, match="key_padding_mask is a numpy masked array"):
        fdask.apply(m, x, key_padding_mask=np.ma.masked_array(np.zeros((2, 3), bool)))


def test_example_script_streams_a_dataset_through_a_cluster(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "stream_dataset.py")
    inp, out = tmp_path / "seqs.npy", tmp_path / "out.npy"
    res = subprocess.run(
        [sys.executable, script, "--make", "40", "--seq", "8", "--d-model", "32", "--heads", "4",
         "--chunk", "16", "--input", str(inp), "--output", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "sequences/s" in res.stdout
    m = fastattn.MultiHeadSelfAttention(32, 4, seed=0)
    np.testing.assert_array_equal(np.load(out), m(np.load(inp)))


def test_apply_leaves_the_callers_thread_count_alone(rng):
    # the local scheduler (named: a client of another test may be the default)
    # runs tasks in this process: each task's thread count must not outlive
    # the computation
    m = fastattn.MultiHeadSelfAttention(16, 2, seed=5)
    x = rng.standard_normal((300, 8, 16)).astype(np.float32)
    old = fastattn.get_num_threads()
    try:
        fastattn.set_num_threads(2)
        y = fdask.apply(m, x).compute(scheduler="threads")
        assert fastattn.get_num_threads() == 2
        y7 = fdask.apply(m, x, threads_per_task=7).compute(scheduler="threads")
        assert fastattn.get_num_threads() == 2
    finally:
        fastattn.set_num_threads(old)
    np.testing.assert_allclose(y, m(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y7, y)


def test_a_task_whose_thread_count_is_refused_leaves_no_trace(rng, monkeypatch):
    import warnings

    from fastattn import threads

    m = fastattn.MultiHeadSelfAttention(16, 2, seed=6)
    x = rng.standard_normal((100, 8, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="threads_per_task must be an int from 1 to 1024"):
        fdask.apply(m, x, threads_per_task=5000)
    old = fastattn.get_num_threads()
    try:
        fastattn.set_num_threads(2)
        # a forked child refuses 3 threads with a warning, an error under -W error
        monkeypatch.setattr(threads, "_forked_after_team", True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with pytest.raises(RuntimeWarning):
                fdask.apply(m, x, threads_per_task=3).compute(scheduler="sync")
        monkeypatch.undo()
        assert getattr(threads._this_thread, "n", None) is None
        fdask.apply(m, x, threads_per_task=1).compute(scheduler="sync")
        assert fastattn.get_num_threads() == 2
    finally:
        fastattn.set_num_threads(old)


def test_apply_computes_with_the_weights_the_module_had_when_called(rng):
    # The graph's keys are made from the module's weights at apply(); a task
    # computing with weights assigned afterwards would return them under the
    # old weights' keys, where a later apply() of the old weights finds them
    # (a distributed cluster keeps persisted results by key).
    m = fastattn.MultiHeadSelfAttention(16, 2, seed=4)
    x = rng.standard_normal((4, 3, 16)).astype(np.float32)
    before, w_q = m(x), m.w_q
    y = fdask.apply(m, x)
    m.w_q = np.zeros((16, 16), np.float32)
    np.testing.assert_array_equal(y.compute(scheduler="threads"), before)
    # (":0": a free port; the default 8787 may be taken, which warns)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1,
                            dashboard_address=":0"):
        zero = m(x)
        held = fdask.apply(m, x).persist()
        m.w_q = w_q
        np.testing.assert_array_equal(fdask.apply(m, x).compute(), before)
        np.testing.assert_array_equal(held.compute(), zero)


def test_apply_takes_sequences_and_padding_selected_by_a_computed_condition(rng):
    # x[keep] and key_padding_mask[keep] have chunks of unknown length
    m = fastattn.MultiHeadSelfAttention(16, 2, seed=6)
    x = rng.standard_normal((7, 5, 16)).astype(np.float32)
    kpm = rng.random((7, 5)) < 0.3
    kpm[:, 0] = False
    keep_np = x[:, 0, 0] > 0
    dx, dk = da.from_array(x, chunks=(3, 5, 16)), da.from_array(kpm, chunks=(3, 5))
    keep = dx[:, 0, 0] > 0
    y = fdask.apply(m, dx[keep], key_padding_mask=dk[keep]).compute(scheduler="threads")
    np.testing.assert_array_equal(y, m(x[keep_np], key_padding_mask=kpm[keep_np]))
    with pytest.raises(ValueError, match="unknown number.*compute_chunk_sizes"):
        fdask.apply(m, dx[keep], key_padding_mask=kpm[keep_np])
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(7, 5\)"):
        fdask.apply(m, dx, key_padding_mask=np.zeros((7, 4), bool))
