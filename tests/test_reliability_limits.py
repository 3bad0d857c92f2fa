"""Thread counts and memory under the limits a process really has.

* A child forked after another library's OpenMP team (same libgomp) ran must
  not hang: it runs fastattn on one thread, as after fastattn's own teams.
* fastattn.dask.apply: the caller's set_num_threads during a compute wins,
  the plan counts the CPUs the affinity mask allows, numpy ints are thread
  counts, and a bad attn_mask fails when the graph is built.
* Container limits: the default thread count follows the affinity mask and
  the cgroup CPU quota, the memory checks the cgroup memory limit (v1 and v2,
  read from a fake tree here); the kernel's per-call offset tables are in the
  memory check; info() reports what was found.
"""

import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastattn
from fastattn import _validate, threads

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))


@pytest.fixture(autouse=True)
def restore_threads():
    before = fastattn.get_num_threads()
    yield
    fastattn.set_num_threads(before)


# ---- item 2: fork after another library's OpenMP team ------------------------------

TEAM_C = r"""
#include <omp.h>
int team(int n) {
    int got = 0;
    #pragma omp parallel num_threads(n)
    {
        #pragma omp atomic
        got++;
    }
    return got;
}
typedef void (*callback)(int);
int team_calling_back(int n, callback cb) {
    #pragma omp parallel num_threads(n)
    cb(omp_get_thread_num());
    return n;
}
"""

FORK_AFTER_OTHER_TEAM = r"""
import ctypes, os, sys, time
import numpy as np
import fastattn
from reference import ref_sdpa

lib = ctypes.CDLL(sys.argv[1])
fastattn.set_num_threads(2)
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((2, 4, 64, 32)) for _ in range(3))
want = ref_sdpa(q, k, v)[0]
if sys.argv[2] == "plain":
    assert lib.team(2) == 2  # libgomp now keeps a pool for this thread
else:
    # the pool's worker calls into Python, which then lists it as a (dummy)
    # thread of its own for good, as logging from a callback would
    import threading
    CB = ctypes.CFUNCTYPE(None, ctypes.c_int)
    cb = CB(lambda i: threading.current_thread())
    assert lib.team_calling_back(2, cb) == 2
pid = os.fork()
if pid == 0:
    y = fastattn.scaled_dot_product_attention(q, k, v)
    ok = np.allclose(y, want, rtol=1e-11, atol=1e-12)
    print(fastattn.get_num_threads(), ok, flush=True)
    os._exit(0)
# a child that hangs is killed here, so that the test fails instead of waiting
deadline = time.monotonic() + 20
while os.waitpid(pid, os.WNOHANG) == (0, 0):
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("child hung", flush=True)
        sys.exit(1)
    time.sleep(0.02)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
@pytest.mark.parametrize("team", ["plain", "calling_back_into_python"])
def test_child_forked_after_another_librarys_openmp_team_does_not_hang(tmp_path, team):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the OpenMP library")
    if not fastattn.info()["openmp"]:
        pytest.skip("a build without OpenMP starts no threads")
    src, lib = tmp_path / "team.c", tmp_path / "libteam.so"
    src.write_text(TEAM_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-fopenmp", "-o", str(lib), str(src)],
                   check=True, capture_output=True)
    script = tmp_path / "fork_after_team.py"
    script.write_text(FORK_AFTER_OTHER_TEAM)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, HERE]))
    env.pop("OMP_NUM_THREADS", None)
    log = tmp_path / "log.txt"
    with open(log, "w") as out:  # a file, not a pipe a stuck grandchild could hold open
        r = subprocess.run([sys.executable, str(script), str(lib), team], stdout=out,
                           stderr=subprocess.STDOUT, env=env, timeout=120)
    text = log.read_text()
    assert r.returncode == 0, text
    assert text.split()[-2:] == ["1", "True"], text


# ---- item 8: fastattn.dask.apply and thread counts ----------------------------------

def _dask():
    pytest.importorskip("dask.array")
    import fastattn.dask as fdask

    return fdask


def test_callers_thread_count_set_during_a_compute_wins(rng):
    fdask = _dask()
    started, go, seen = threading.Event(), threading.Event(), []

    class Gated(fastattn.MultiHeadSelfAttention):
        def __call__(self, x, **kwargs):
            seen.append(fastattn.get_num_threads())
            started.set()
            go.wait(30)
            return super().__call__(x, **kwargs)

    m = Gated(16, 2, seed=5)
    x = rng.standard_normal((4, 8, 16)).astype(np.float32)
    fastattn.set_num_threads(2)
    result = []
    worker = threading.Thread(target=lambda: result.append(
        fdask.apply(m, x, threads_per_task=1).compute(scheduler="threads")))
    worker.start()
    try:
        assert started.wait(30)
        assert fastattn.get_num_threads() == 2  # the task's count is its thread's own
        fastattn.set_num_threads(3)
    finally:
        go.set()
        worker.join(60)
    assert seen == [1]
    assert fastattn.get_num_threads() == 3
    np.testing.assert_array_equal(result[0], fastattn.MultiHeadSelfAttention(16, 2, seed=5)(x))


def test_thread_plan_counts_the_cpus_of_the_affinity_mask(monkeypatch):
    fdask = _dask()

    class OneWorker:  # what thread_plan asks of a distributed client
        def scheduler_info(self):
            return {"workers": {"tcp://w": {"host": "h", "nthreads": 1}}}

        def run(self, fn):
            return {"tcp://w": fn()}

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert fdask.thread_plan(OneWorker()) == {"plan": {"tcp://w": 1}, "default": 1}


def test_threads_per_task_takes_numpy_ints(rng):
    fdask = _dask()
    assert fdask.thread_plan(None, threads_per_task=np.int64(2)) == {"plan": {}, "default": 2}
    m = fastattn.MultiHeadSelfAttention(16, 2, seed=1)
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)
    y = fdask.apply(m, x, threads_per_task=np.int64(2)).compute(scheduler="sync")
    np.testing.assert_array_equal(y, m(x))
    with pytest.raises(TypeError, match="threads_per_task must be an int from 1 to 1024, got 2.0"):
        fdask.apply(m, x, threads_per_task=2.0)


def test_apply_refuses_a_bad_attn_mask_when_the_graph_is_built():
    fdask = _dask()
    m = fastattn.MultiHeadSelfAttention(16, 2, seed=2)
    x = np.zeros((2, 8, 16), np.float32)
    with pytest.raises(ValueError, match=r"attn_mask has shape \(5, 5\)"):
        fdask.apply(m, x, attn_mask=np.ones((5, 5), bool))
    with pytest.raises(TypeError, match="attn_mask must be a bool array .* got dtype int32"):
        fdask.apply(m, x, attn_mask=np.ones((8, 8), np.int32))
    fdask.apply(m, x, attn_mask=np.ones((2, 8, 8), bool))  # (H, N, N) is fine


def test_apply_refuses_a_bad_key_padding_mask_when_the_graph_is_built():
    fdask = _dask()
    import dask.array as da

    m = fastattn.MultiHeadSelfAttention(16, 2, seed=2)
    x = np.zeros((10, 7, 16), np.float32)
    # numpy, wrong count of sequences: named as such, not a dask chunking error
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(10, 7\)"):
        fdask.apply(m, x, key_padding_mask=np.ones((9, 7), bool))
    # dask, wrong dtype: its dtype is known before the compute
    with pytest.raises(TypeError, match="key_padding_mask must be a bool array.*int8"):
        fdask.apply(m, x, key_padding_mask=da.ones((10, 7), dtype=np.int8, chunks=5))


# ---- item 11: container limits --------------------------------------------------------

@pytest.fixture
def resources():
    from fastattn import _resources

    return _resources


def _write(root, path, text):
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


MIB = 1 << 20


def _cgroup_v2(root, mountinfo=True):
    """A process in /box/job; /box has 1.5 CPUs and 1 GiB, of which 900 MiB are
    used (100 MiB of it inactive page cache); /box/job sets no limit."""
    _write(root, "/proc/self/cgroup", "0::/box/job\n")
    if mountinfo:
        _write(root, "/proc/self/mountinfo",
               "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
               "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n")
    _write(root, "/proc/meminfo", "MemTotal: 67108864 kB\nMemAvailable: 33554432 kB\n")
    box = "/sys/fs/cgroup/box"
    _write(root, box + "/cpu.max", "150000 100000\n")
    _write(root, box + "/memory.max", f"{1024 * MIB}\n")
    _write(root, box + "/memory.current", f"{1000 * MIB}\n")
    _write(root, box + "/memory.stat", f"anon {800 * MIB}\ninactive_file {100 * MIB}\n")
    _write(root, box + "/job/cpu.max", "max 100000\n")
    _write(root, box + "/job/memory.max", "max\n")
    _write(root, box + "/job/memory.current", f"{1000 * MIB}\n")


@pytest.mark.parametrize("mountinfo", [True, False])
def test_cgroup_v2_limits(resources, tmp_path, monkeypatch, mountinfo):
    _cgroup_v2(tmp_path, mountinfo)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    root = str(tmp_path)
    assert resources.cpu_quota(root) == 1.5
    assert resources.usable_cpus(root) == 2
    assert resources.cgroup_memory(root) == (1024 * MIB, 124 * MIB)
    assert resources.available_memory(root) == 124 * MIB


def test_cgroup_v1_limits_in_a_container_that_sees_its_own_cgroup_as_the_top(resources, tmp_path):
    _write(tmp_path, "/proc/self/cgroup",
           "5:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n0::/\n")
    _write(tmp_path, "/proc/self/mountinfo",
           "33 31 0:30 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct\n"
           "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n")
    _write(tmp_path, "/proc/meminfo", "MemAvailable: 33554432 kB\n")
    _write(tmp_path, "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "50000\n")
    _write(tmp_path, "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    _write(tmp_path, "/sys/fs/cgroup/memory/memory.limit_in_bytes", f"{512 * MIB}\n")
    _write(tmp_path, "/sys/fs/cgroup/memory/memory.usage_in_bytes", f"{256 * MIB}\n")
    _write(tmp_path, "/sys/fs/cgroup/memory/memory.stat", "cache 0\ntotal_inactive_file 0\n")
    root = str(tmp_path)
    assert resources.cpu_quota(root) == 0.5
    assert resources.usable_cpus(root) == 1
    assert resources.available_memory(root) == 256 * MIB
    # v1's "no limit" (a number near 2**63) and "-1" for no quota
    _write(tmp_path, "/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")
    _write(tmp_path, "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    assert resources.cgroup_memory(root) is None and resources.cpu_quota(root) is None
    assert resources.available_memory(root) == 33554432 * 1024


def test_garbage_cgroup_files_mean_no_limits(resources, tmp_path):
    # a NUL in the cgroup path, a negative limit and a negative period are not
    # limits; none of them may raise (this runs at import)
    _cgroup_v2(tmp_path)
    box = "/sys/fs/cgroup/box"
    _write(tmp_path, box + "/memory.max", "-1\n")
    _write(tmp_path, box + "/cpu.max", "50000 -100000\n")
    limits = resources.limits(str(tmp_path))
    assert limits["memory_limit"] is None and limits["cpu_quota"] is None
    _write(tmp_path, "/proc/self/cgroup", "0::/box/a\x00b\n")
    limits = resources.limits(str(tmp_path))
    assert limits["memory_limit"] is None and limits["cpu_quota"] is None


def test_no_cgroup_files_means_no_limits(resources, tmp_path):
    limits = resources.limits(str(tmp_path))
    assert limits["cpu_quota"] is None and limits["memory_limit"] is None
    assert limits["available_memory"] is None
    assert limits["usable_cpus"] == limits["affinity_cpus"] >= 1
    real = resources.limits()  # this machine: whatever it has, read without error
    assert 1 <= real["usable_cpus"] <= real["affinity_cpus"]


def test_default_threads_memory_check_and_info_follow_the_cgroup(resources, tmp_path, monkeypatch):
    _cgroup_v2(tmp_path)
    monkeypatch.setattr(resources, "ROOT", str(tmp_path))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.default_num_threads() == 2
    # 300 MiB fit in MemAvailable (32 GiB) but not in the 124 MiB the cgroup leaves
    with pytest.raises(MemoryError, match="more than the 0.121 GiB available"):
        _validate.ensure_memory([(300 * MIB,)], 1, "the output")
    limits = fastattn.info()["limits"]
    assert limits["cpu_quota"] == 1.5 and limits["usable_cpus"] == 2
    assert limits["memory_limit"] == 1024 * MIB and limits["available_memory"] == 124 * MIB


def test_cross_attention_key_projections_are_in_the_memory_check(resources, monkeypatch):
    # one query over many keys: the K and V projections are the big buffers
    monkeypatch.setattr(resources, "available_memory", lambda root=None: 100 * MIB)
    m = fastattn.MultiHeadAttention(512, 8, kdim=1, vdim=1)
    key = np.ones((1, 80000, 1), np.float32)
    with pytest.raises(MemoryError):
        m(np.ones((1, 1, 512), np.float32), key, key)


def test_the_kernels_offset_tables_are_in_the_memory_check(monkeypatch):
    # with two leading axes the kernel builds one int64 offset per leading
    # index per operand: 5 operands x 8 bytes x 2**17, 5 MiB, for an output of
    # 512 KiB (zero-stride inputs cost nothing)
    lead = (2 ** 16, 2)
    q = np.broadcast_to(np.ones((1, 1, 1, 1, 1), np.float32), lead + (1, 1, 1))
    mask = np.ones((1, 1, 1), bool)
    monkeypatch.setattr(_validate, "CHECK_MEMORY_ABOVE", 0)
    monkeypatch.setattr(_validate, "available_memory", lambda: 1 * MIB)
    with pytest.raises(MemoryError, match="offset tables"):
        fastattn.scaled_dot_product_attention(q, q, q, mask)
    monkeypatch.setattr(_validate, "available_memory", lambda: 6 * MIB)
    out = fastattn.scaled_dot_product_attention(q, q, q, mask)
    np.testing.assert_array_equal(out, np.ones(lead + (1, 1, 1), np.float32))
