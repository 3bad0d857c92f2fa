"""The `python -m fastattn` command line."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

import fastattn


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "fastattn", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_version_is_string():
    assert isinstance(fastattn.__version__, str)
    assert fastattn.__version__.strip() != ""


def test_info():
    r = run("info", timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert fastattn.__version__ in out
    low = out.lower()
    assert "openmp" in low
    assert "thread" in low
    assert "blas" in low
    # the thread count is printed as a number
    assert re.search(r"thread[^\n]*\d", low)
    # and the limits found, as fastattn.info() reports them
    cpus = fastattn.info()["limits"]["affinity_cpus"]
    assert re.search(rf"limits:\s+{cpus} cpus in the affinity mask", low)


def test_unknown_command_fails():
    r = run("definitely-not-a-command", timeout=60)
    assert r.returncode != 0


def test_demo_small():
    # `demo --help` advertises size options; a small run keeps this fast.
    h = run("demo", "--help", timeout=60)
    assert h.returncode == 0, h.stderr
    for opt in ("--batch", "--seq", "--d-model", "--heads"):
        assert opt in h.stdout
    for dtype, limit in (("float32", 1e-4), ("float64", 1e-10)):
        r = run("demo", "--batch", "2", "--seq", "67", "--d-model", "64", "--heads", "4",
                "--dtype", dtype, "--rounds", "1", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        low = r.stdout.lower()
        assert "max" in low and "ms" in low
        # the printed max error is small
        m = re.search(r"max[^\n=:]*[=:]\s*([0-9.]+(?:e[-+]?\d+)?)", low)
        assert m, r.stdout
        assert float(m.group(1)) < limit * 10, r.stdout
        # timed in interleaved rounds: each one's median and spread, their ratio
        assert "time per call over 1 interleaved round" in r.stdout
        assert re.search(r"fastattn:\s+[0-9.]+ ms  \([0-9.]+-[0-9.]+ ms\)", r.stdout)
        assert re.search(r"speed-up: [0-9.]+x \(numpy's median / fastattn's\)", r.stdout)


@pytest.mark.parametrize("args, needle", [
    (("demo", "--heads", "3"), "--heads (3) must divide --d-model (512)"),
    (("demo", "--d-model", "-16"), "--d-model: expected an integer >= 1, got -16"),
    (("demo", "--batch", "0"), "--batch: expected an integer >= 1, got 0"),
    (("demo", "--seq", "x"), "--seq: expected an integer, got 'x'"),
    (("demo", "--rounds", "0"), "--rounds: expected an integer >= 1, got 0"),
    (("demo", "--threads", "0"), "--threads: expected an integer from 1 to"),
    (("scaling", "--dk", "0"), "--dk must be comma-separated integers >= 1"),
    (("scaling", "--dk", "a,b"), "--dk must be comma-separated integers >= 1"),
    (("scaling", "--trials", "1"), "--trials: expected an integer >= 2, got 1"),
    (("scaling", "--length", "1"), "--length: expected an integer >= 2, got 1"),
    (("scaling", "--seed", "-1"), "--seed: expected an integer >= 0, got -1"),
])
def test_demo_and_scaling_refuse_bad_options(args, needle):
    # refused before any work: exit status 2, the option named, no traceback
    r = run(*args, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_demo_without_enough_memory_says_so():
    r = run("demo", "--batch", "1", "--seq", "99999999999", timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "demo: not enough memory for these sizes" in r.stderr
    assert "Traceback" not in r.stderr


# ---- help texts, output paths, the demo's timing -------------------------------------

from fastattn.__main__ import main  # noqa: E402
from fastattn.tools import benchmark, scaling  # noqa: E402


def _help(capsys, *args):
    with pytest.raises(SystemExit) as ei:
        main([*args, "--help"])
    assert ei.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [(), ("info",), ("demo",), ("bench",), ("scaling",)])
def test_help_texts_are_plain_text(capsys, command):
    out = _help(capsys, *command)
    for markup in ("``", ":func:", ":class:", ":meth:", ":data:", "the seed"):
        assert markup not in out, (markup, out)


def test_bench_help_states_the_noisy_rule_the_bench_applies(capsys):
    out = " ".join(_help(capsys, "bench").split())
    assert f"spans more than {benchmark.NOISY_IQR:.0%} of its median" in out
    assert "interquartile range" in out and "marked !" in out
    assert f"fewer than {benchmark.MIN_SPREAD_ROUNDS} rounds" in out


def _refused(capsys, argv, monkeypatch):
    """main(argv) stops with argparse's usage error before any work."""
    def no_work(*a, **k):
        raise AssertionError("the run started")

    monkeypatch.setattr(benchmark, "run", no_work)
    monkeypatch.setattr(scaling, "measure", no_work)
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fastattn ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("command", ["bench", "scaling"])
@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_output_paths_are_checked_before_any_work(tmp_path, capsys, monkeypatch, command,
                                                  option):
    name = "out.png" if option == "--plot" else "out.json"
    missing = tmp_path / "no" / name
    if option == "--plot" and importlib.util.find_spec("matplotlib") is None:
        # without matplotlib --plot is refused first, for that reason, and as early
        err = _refused(capsys, [command, option, str(tmp_path / name)], monkeypatch)
        assert f"argument --plot: needs matplotlib, which is not installed" in err
        return
    err = _refused(capsys, [command, option, str(missing)], monkeypatch)
    assert (f"fastattn {command}: error: argument {option}: cannot write {str(missing)!r}: "
            f"no directory {str(missing.parent)!r}") in err
    err = _refused(capsys, [command, option, str(tmp_path)], monkeypatch)
    assert (f"argument {option}: {str(tmp_path)!r} is a directory, expected a file name"
            in err)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            err = _refused(capsys, [command, option, str(locked / name)], monkeypatch)
            assert f"argument {option}: cannot write" in err and "Permission denied" in err
        finally:
            locked.chmod(0o700)
    # a path that can be written is let through, and the check leaves no file
    # behind (nor changes one that is there)
    fresh, kept = tmp_path / ("a" + name), tmp_path / ("b" + name)
    kept.write_text("before")
    from fastattn.__main__ import build_parser

    for path in (fresh, kept):
        args = build_parser().parse_args([command, option, str(path)])
        assert getattr(args, option[2:]) == str(path)
    assert not fresh.exists() and kept.read_text() == "before"


@pytest.mark.parametrize("command", ["bench", "scaling"])
def test_plot_without_matplotlib_is_refused_before_any_work(tmp_path, capsys, monkeypatch,
                                                            command):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    err = _refused(capsys, [command, "--plot", str(tmp_path / "fig.png")], monkeypatch)
    assert (f"fastattn {command}: error: argument --plot: needs matplotlib, which is not "
            f"installed: pip install matplotlib") in err
    assert "leave --plot out" in err


def _demo_times(monkeypatch, times):
    """Runs the demo's timing on ``times`` (seconds per round, per name);
    returns what time_interleaved was asked."""
    asked = {}

    def fake(impls, rounds, pause_s, *a, **k):
        asked.update(names=list(impls), rounds=rounds, pause_s=pause_s)
        for fn in impls.values():
            fn()
        return {name: list(times[name]) for name in impls}

    monkeypatch.setattr(benchmark, "time_interleaved", fake)
    return asked


DEMO = ["demo", "--batch", "1", "--seq", "8", "--d-model", "16", "--heads", "2"]


def test_demo_interleaves_with_pauses_and_prints_medians_spreads_and_their_ratio(
        capsys, monkeypatch):
    asked = _demo_times(monkeypatch, {"fastattn": [0.002, 0.001, 0.003],
                                      "numpy": [0.010, 0.012, 0.011]})
    assert main(DEMO + ["--rounds", "3"]) == 0
    out = capsys.readouterr().out
    assert asked == {"names": ["fastattn", "numpy"], "rounds": 3,
                     "pause_s": benchmark.PAUSE_S}
    assert (f"time per call over 3 interleaved rounds (a {benchmark.PAUSE_S:g} s pause before "
            f"each turn): median, spread = min-max") in out
    assert re.search(r"fastattn:\s+2\.00 ms  \(1\.00-3\.00 ms\) !\n", out), out
    assert re.search(r"numpy:\s+11\.00 ms  \(10\.00-12\.00 ms\)  \(plain NumPy", out), out
    assert "speed-up: 5.5x (numpy's median / fastattn's)" in out
    # fastattn's rounds spread (IQR 1 ms, half its median): marked, more rounds suggested
    assert ("note: fastattn marked ! (noisy (!): the middle half of the rounds (interquartile "
            "range) spans more than 25% of the median): the speed-up is unreliable; rerun "
            "with --rounds 15") in out


def test_demo_with_steady_or_too_few_rounds(capsys, monkeypatch):
    _demo_times(monkeypatch, {"fastattn": [0.001] * 5, "numpy": [0.004] * 5})
    assert main(DEMO + ["--rounds", "5"]) == 0
    out = capsys.readouterr().out
    assert "speed-up: 4.0x" in out and "!" not in out and "note:" not in out
    _demo_times(monkeypatch, {"fastattn": [0.001], "numpy": [0.004]})
    assert main(DEMO + ["--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert ("note: with 1 interleaved round, the spread cannot be judged (3 or more needed): "
            "take the speed-up as rough") in out
