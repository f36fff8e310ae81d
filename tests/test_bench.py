"""Smoke tests of benchmarks/bench.py (the entry point) and its package benchmarks/fastbn_bench/
on the CPU: the quick grid end to end (table, JSON, CSV, chart), the case grid and filters, the
tiny group (in every grid, --tiny, its batched timer, the summary's per-call overhead block),
that a wrong implementation is reported as FAIL, the time budget, the torch kernel column and
the compile policies.

The `bench` fixture is bench.py loaded from its path (tests call its main); the package's
modules are the fixtures bench_cases, checking, runner, report and cli. A test that replaces a
function patches the module that calls it (see the module docstrings): runner.time_case,
runner.compiled_module, cli.fastbn_factory, and checking.TORCH_BN (a patched copy of
fastbn.testing.TORCH_BN: the shared table itself stays untouched, so the wrong implementations
below still subclass torch's classes)."""
import csv
import importlib
import json
import re
import time
import types
from pathlib import Path

import pytest
import torch
from helpers import load_script

from fastbn.testing import TORCH_BN

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
ROW_COLUMNS = ("case", "dtype", "layout", "mode", "status", "torch_kernel", "fastbn_ms", "eager_ms", "compile_ms",
               "speedup_eager", "speedup_compile", "gbps", "pct_copy_bw")
TIME_COLUMNS = ("fastbn_ms", "eager_ms", "compile_ms", "speedup_eager", "speedup_compile", "gbps", "pct_copy_bw")


@pytest.fixture(scope="module")
def bench():
    """benchmarks/bench.py loaded from its path; loading it puts benchmarks/ on sys.path."""
    return load_script(BENCH_PATH, "bench_script")


@pytest.fixture(scope="module")
def bench_pkg(bench):
    """The package benchmarks/fastbn_bench/ that bench.py runs."""
    return importlib.import_module("fastbn_bench")


@pytest.fixture(scope="module")
def bench_cases(bench_pkg):
    return bench_pkg.cases


@pytest.fixture(scope="module")
def runner(bench_pkg):
    return bench_pkg.runner


@pytest.fixture(scope="module")
def checking(bench_pkg):
    return bench_pkg.checking


@pytest.fixture(scope="module")
def report(bench_pkg):
    return bench_pkg.report


@pytest.fixture(scope="module")
def cli(bench_pkg):
    return bench_pkg.cli


def _output_scaled_by(factor):
    """Subtly wrong forward: torch BatchNorm, then * factor."""

    def factory(kind, num_features, **kwargs):
        class Scaled(TORCH_BN[kind]):
            def forward(self, input):
                return super().forward(input) * factor

        return Scaled(num_features, **kwargs)

    return factory


_scaled_output_factory = _output_scaled_by(1.01)


def _grad_scaled_by(factor):
    """Right forward values, gradients `factor` times too large."""

    def factory(kind, num_features, **kwargs):
        class ScaledGrad(TORCH_BN[kind]):
            def forward(self, input):
                y = super().forward(input)
                return y + (y - y.detach()) * (factor - 1)

        return ScaledGrad(num_features, **kwargs)

    return factory


_scaled_grad_factory = _grad_scaled_by(1.01)


def _wrong_momentum_factory(kind, num_features, **kwargs):
    """Right outputs and gradients, wrong running statistics."""
    return TORCH_BN[kind](num_features, momentum=0.2, **kwargs)


def _read_csv(path):
    with open(path, newline="") as f:
        lines = [line for line in f if not line.startswith("#")]
    return list(csv.DictReader(lines))


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = bench.main(["--quick", "--device", "cpu", "--no-compile", "--out-dir", str(out), "--tag", "test"])
    return rc, out


def test_quick_run_outputs(bench_cases, quick_run):
    rc, out = quick_run
    assert rc == 0
    [json_path] = out.glob("cpu-*-test.json")
    stem = json_path.name[: -len(".json")]
    data = json.loads(json_path.read_text())
    rows = data["rows"]
    cases = bench_cases.build_cases("cpu", quick=True)
    assert len(rows) == len(cases) * len(bench_cases.MODES)
    for row in rows:
        for column in ROW_COLUMNS:
            assert column in row, column
        assert row["status"] == "ok", row
        assert row["torch_kernel"] == "native", row
        assert row["compile_ms"] is None and row["speedup_compile"] is None
        for column in ("fastbn_ms", "eager_ms", "speedup_eager", "gbps", "pct_copy_bw"):
            assert row[column] > 0, (column, row)
    header = data["header"]
    assert header["torch"] == torch.__version__
    assert header["copy_gbps"] > 0
    assert "fastbn_cpu_isa" in header and "fastbn_built_with_cuda" in header
    assert header["fastbn_cpu_cache_mb"] > 0
    assert "--quick" in header["command"]
    assert data["summary"]["fail_count"] == 0
    assert data["summary"]["not_run"] == 0
    assert set(data["summary"]["modes"]) == set(bench_cases.MODES)
    for mode, s in data["summary"]["modes"].items():
        assert s["by_torch_kernel"] == {"native": {"geomean_speedup_eager": pytest.approx(s["geomean_speedup_eager"]),
                                                   "rows": s["timed_rows"]}}, mode

    csv_rows = _read_csv(out / f"{stem}.csv")
    assert len(csv_rows) == len(rows)
    assert set(ROW_COLUMNS) <= set(csv_rows[0])
    png = out / f"{stem}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_prints_table_and_summary(bench, capsys, tmp_path):
    rc = bench.main(["--quick", "--device", "cpu", "--no-compile", "--shapes", "bn1d", "--dtype", "fp32",
                     "--modes", "fwdbwd", "--out-dir", str(tmp_path), "--no-chart"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "copy bandwidth:" in text
    assert "bn1d-64x32  float32" in text
    assert "training forward+backward: fastbn vs eager" in text
    assert "; vs native rows " in text and "(n=2)" in text  # bn1d-64x32 and the tiny group's bn1d-32x32
    assert "torch kernel" in text
    lines = text.splitlines()
    i = lines.index("per-call overhead (tiny tensors, us per call):")
    assert re.fullmatch(r" training forward\+backward: bn1d-32x32 fastbn [0-9.]+ vs eager [0-9.]+ \([0-9.]+x\); "
                        r"fastbn <= eager on [01] of 1 rows", lines[i + 1]), lines[i + 1]
    assert lines[i + 2].startswith("FAIL rows: 0")
    assert not list(tmp_path.glob("*.png"))


def test_grids_and_filters(bench_cases):
    cpu = bench_cases.build_cases("cpu")
    assert {c.dtype for c in cpu} == {"float32", "bfloat16"}
    # 9 ResNet-50 + small-C + 3-D in both layouts, 2 BatchNorm1d; float32 adds the tiny group (1 + 2 + 2)
    assert len(cpu) == 2 * (11 * 2 + 2) + 5
    assert all(c.layout == "nchw" for c in cpu if c.kind == 1)
    gpu = bench_cases.build_cases("cuda")
    assert len(gpu) == 3 * (20 * 2 + 2) + 5
    assert {"bn2d-256x2048x7x7", "bn2d-128x4x224x224", "bn3d-8x64x16x56x56", "bn1d-32x32"} <= {c.name for c in gpu}

    picked = bench_cases.build_cases("cpu", filters={"shapes": "64x56x56", "dtypes": ["bfloat16"],
                                                     "layouts": ["channels_last"]})
    assert [(c.name, c.dtype, c.layout) for c in picked] == [("bn2d-8x64x56x56", "bfloat16", "channels_last")]
    assert not bench_cases.build_cases("cpu", filters={"shapes": "bn1d", "layouts": ["channels_last"]})
    assert {c.name for c in bench_cases.build_cases("cpu", filters={"shapes": "^bn3d"})} == {"bn3d-2x64x8x28x28",
                                                                                            "bn3d-2x8x2x4x4"}


TINY_GROUP = [("bn1d-32x32", "nchw"), ("bn2d-8x16x4x4", "nchw"), ("bn2d-8x16x4x4", "channels_last"),
              ("bn3d-2x8x2x4x4", "nchw"), ("bn3d-2x8x2x4x4", "channels_last")]


@pytest.mark.parametrize("device, quick", [("cpu", False), ("cpu", True), ("cuda", False), ("cuda", True)])
def test_tiny_group_in_every_grid(bench_cases, device, quick):
    """Every grid ends its float32 block with the tiny group, in float32 only, each case once."""
    cases = bench_cases.build_cases(device, quick=quick)
    keys = [(c.name, c.dtype, c.layout) for c in cases]
    assert len(keys) == len(set(keys))
    float32 = [(c.name, c.layout) for c in cases if c.dtype == "float32"]
    assert float32[-len(TINY_GROUP):] == TINY_GROUP
    assert [(c.name, c.dtype, c.layout) for c in cases if c.tiny] == [(n, "float32", lay) for n, lay in TINY_GROUP]
    assert all(c.tiny == (c.name in bench_cases.TINY_NAMES) for c in cases)
    assert not any(c.tiny for c in bench_cases.build_cases(device, quick=quick, filters={"dtypes": ["bfloat16"]}))


def test_tiny_filter_and_flag_select_the_tiny_group(bench, bench_cases, cli, capsys, monkeypatch, tmp_path):
    for quick in (False, True):
        tiny = bench_cases.build_cases("cpu", quick=quick, filters={"tiny": True})
        assert tiny == [c for c in bench_cases.build_cases("cpu", quick=quick) if c.tiny]
    assert [c.name for c in bench_cases.build_cases("cpu", filters={"tiny": True, "shapes": "bn2d"})] == \
        ["bn2d-8x16x4x4"] * 2
    run = []

    def fake_run_benchmark(cases, **kwargs):
        run.append(cases)
        return []

    monkeypatch.setattr(cli, "run_benchmark", fake_run_benchmark)
    monkeypatch.setattr(cli, "copy_bandwidth_gbps", lambda device: 1.0)
    assert bench.main(["--device", "cpu", "--tiny", "--out-dir", str(tmp_path), "--no-chart"]) == 0
    assert [(c.name, c.dtype, c.layout) for c in run[0]] == [(n, "float32", lay) for n, lay in TINY_GROUP]
    assert [p.name.endswith("-tiny.json") for p in tmp_path.glob("*.json")] == [True]
    assert bench.main(["--device", "cpu", "--tiny", "--dtype", "bf16", "--out-dir", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    assert "--tiny" in capsys.readouterr().out


def _timed_row(runner, case, layout, mode, fastbn_ms, eager_ms, dtype="float32"):
    """A synthetic timed "ok" row."""
    row = dict.fromkeys(runner.COLUMNS)
    row.update(case=case, dtype=dtype, layout=layout, mode=mode, status="ok", torch_kernel="native", note="",
               fastbn_ms=fastbn_ms, eager_ms=eager_ms, speedup_eager=eager_ms / fastbn_ms)
    return row


def test_summary_overhead_of_tiny_rows(runner, report):
    rows = [_timed_row(runner, "bn2d-4x16x16x16", "nchw", "fwd", 0.5, 1.0),
            _timed_row(runner, "bn1d-32x32", "nchw", "fwd", 0.0142, 0.027),
            _timed_row(runner, "bn2d-8x16x4x4", "channels_last", "fwd", 0.030, 0.020),  # fastbn slower
            _timed_row(runner, "bn3d-2x8x2x4x4", "nchw", "eval", 0.010, 0.010),
            dict(_timed_row(runner, "bn1d-32x32", "nchw", "fwdbwd", 1, 1), status="FAIL", fastbn_ms=None,
                 eager_ms=None, speedup_eager=None)]
    summary = report.summarize(rows)
    assert summary["modes"]["fwd"]["timed_rows"] == 3  # tiny rows count in the geomeans too
    assert summary["modes"]["fwd"]["slowest"]["case"] == "bn2d-8x16x4x4"
    overhead = summary["overhead"]
    assert list(overhead) == ["fwd", "eval"]
    fwd = overhead["fwd"]
    assert [(e["case"], e["layout"]) for e in fwd["rows"]] == [("bn1d-32x32", "nchw"),
                                                               ("bn2d-8x16x4x4", "channels_last")]
    assert fwd["rows"][0]["fastbn_us"] == pytest.approx(14.2) and fwd["rows"][0]["eager_us"] == pytest.approx(27.0)
    assert fwd["rows"][1]["speedup_eager"] == pytest.approx(2 / 3)
    assert (fwd["fastbn_not_slower"], fwd["fastbn_never_slower"]) == (1, False)
    assert (overhead["eval"]["fastbn_not_slower"], overhead["eval"]["fastbn_never_slower"]) == (1, True)
    json.dumps(summary)

    lines = report.format_summary(summary)
    i = lines.index("per-call overhead (tiny tensors, us per call):")
    assert lines[i + 1] == ("          training forward: bn1d-32x32 fastbn 14.2 vs eager 27.0 (1.90x), "
                            "bn2d-8x16x4x4 channels_last fastbn 30.0 vs eager 20.0 (0.67x); "
                            "fastbn <= eager on 1 of 2 rows")
    assert lines[i + 2] == ("              eval forward: bn3d-2x8x2x4x4 nchw fastbn 10.0 vs eager 10.0 (1.00x); "
                            "fastbn <= eager on 1 of 1 rows")
    assert lines[-1] == "FAIL rows: 1   SKIP rows: 0   rows: 5"
    assert len(lines) == i + 4

    plain = report.summarize(rows[:1])
    assert "overhead" not in plain
    assert not any("overhead" in line for line in report.format_summary(plain))


class _FakeClock:
    """A perf_counter that only moves when a fake call advances it (binary fractions of a second,
    so that sums stay exact)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_batched_timer_returns_per_call_times(bench_pkg, monkeypatch):
    """With min_sample_s, a sample is a batch of calls (and one sync), reported per call."""
    timing = bench_pkg.timing
    clock = _FakeClock()
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    call_s = 2.0 ** -14  # 61 us
    calls, syncs = [], []

    def fn():
        calls.append(None)
        clock.now += call_s

    ms = timing._median_ms_wall({"f": fn}, reps=5, warmup=2, min_sample_s=2.0 ** -10,
                                sync=lambda: syncs.append(None))["f"]
    assert ms == pytest.approx(call_s * 1e3)  # one call's time, not a batch's
    batch = 16  # 2^-10 s / 2^-14 s
    # warm-up, 5 calibration calls, 5 rounds of a lead-in call and a sample of a batch
    assert len(calls) == 2 + 5 + 5 * (1 + batch)
    assert len(syncs) == 5 + 5 * 2
    calls.clear()
    assert timing._median_ms_wall({"f": fn}, reps=5, warmup=2)["f"] == pytest.approx(call_s * 1e3)
    assert len(calls) == 2 + 5 * 2  # a lead-in call and a one-call sample a round
    assert timing._batch_size(fn, 1.0, None) == timing.MAX_BATCH
    assert timing._batch_size(fn, 0.0, None) == 1


def test_tiny_cases_are_timed_in_batches(bench_cases, bench_pkg, monkeypatch):
    """time_case times a tiny case over batches of calls, any other case one call per sample."""
    timing = bench_pkg.timing
    median_ms_wall = timing._median_ms_wall
    seen = []

    def recording(fns, reps, min_time_s=0.0, **kwargs):
        seen.append(kwargs)
        return median_ms_wall(fns, reps, min_time_s, **kwargs)

    monkeypatch.setattr(timing, "_median_ms_wall", recording)
    [tiny] = bench_cases.build_cases("cpu", filters={"tiny": True, "shapes": "bn1d"})
    [small] = _bn1d_cases(bench_cases)
    for case in (tiny, small):
        impl = TORCH_BN[case.kind](case.num_features)
        times, errors = timing.time_case(case, "eval", {"m": impl}, reps=3)
        assert errors == {} and times["m"] > 0
    assert seen == [{"min_sample_s": timing.TINY_SAMPLE_S, "sync": None}, {}]  # tiny, then small


def test_every_call_reads_the_input_set_read_longest_ago(bench_cases, bench_pkg):
    """The input rotation is one cycle shared by every call of every module, in call order:
    each call reads the set read n_sets calls before it, and none of the sets of the calls in
    between."""
    timing = bench_pkg.timing
    [case] = _bn1d_cases(bench_cases)
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append((self.name, x.data_ptr()))
            return x

    n_sets = timing.MAX_INPUT_SETS  # the 64 x 32 case is far smaller than any cache
    timing.time_case(case, "eval", {"a": Recorder("a"), "b": Recorder("b")}, reps=2 * n_sets)
    ptrs = [p for _, p in calls]
    assert len(set(ptrs)) == n_sets and len(ptrs) > 4 * n_sets
    for j in range(len(ptrs) - n_sets + 1):
        assert len(set(ptrs[j:j + n_sets])) == n_sets  # n_sets consecutive calls, all sets
    assert {m for m, _ in calls} == {"a", "b"}


def test_no_timed_call_follows_another_modules_call(bench_pkg, monkeypatch):
    """Each timed sample follows an untimed call of the same function: a function that is slow
    right after another function's call (as after memory another library freed and the
    allocator returned to the system) is timed at its own steady pace."""
    timing = bench_pkg.timing
    clock = _FakeClock()
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    last = [None]

    def make(name):
        def fn():
            clock.now += 2.0 ** -10 if last[0] == name else 1.0  # 1 ms after itself, 1 s after another
            last[0] = name
        return fn

    times = timing._median_ms_wall({"a": make("a"), "b": make("b")}, reps=5, warmup=2)
    assert times == {"a": pytest.approx(2.0 ** -10 * 1e3), "b": pytest.approx(2.0 ** -10 * 1e3)}


@pytest.mark.parametrize("modules", [2, 3])
def test_no_call_reads_the_inputs_the_call_before_it_read(bench_cases, bench_pkg, monkeypatch, modules):
    """Where a call's working set takes 2 or 3 input sets to exceed twice the cache, no call
    reads the set the call before it read: in particular the first module of a round does not
    get the set the last module of the round before has just read."""
    timing = bench_pkg.timing
    [case] = _bn1d_cases(bench_cases)
    working_set = bench_cases.MODE_TENSORS["eval"] * case.numel * case.torch_dtype.itemsize
    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            calls.append(x.data_ptr())
            return x

    for sets_needed in (2, 3):
        monkeypatch.setattr(timing, "cache_bytes", lambda device: sets_needed * working_set // 2)
        calls.clear()
        timing.time_case(case, "eval", {str(k): Recorder() for k in range(modules)}, reps=12)
        rounds = calls[3 * modules:]  # after each module's first call and 2 warm-up calls
        assert len(rounds) == 12 * modules * 2  # a lead-in call and a timed one a module a round
        assert len(set(rounds)) == sets_needed
        assert all(p != q for p, q in zip(rounds, rounds[1:]))


def test_wrong_output_is_fail_without_time(bench_cases, runner, report):
    cases = bench_cases.build_cases("cpu", quick=True, filters={"shapes": "bn2d", "dtypes": ["float32"]})
    rows = runner.run_benchmark(cases, impl_factory=_scaled_output_factory, compile_policy="none", progress=False)
    assert len(rows) == len(cases) * len(bench_cases.MODES)
    for row in rows:
        assert row["status"] == "FAIL", row
        assert row["note"].startswith("output:"), row
        for column in TIME_COLUMNS:
            assert row[column] is None, (column, row)
    summary = report.summarize(rows)
    assert summary["fail_count"] == len(rows)
    assert summary["modes"] == {}
    assert "FAIL rows: %d" % len(rows) in report.format_summary(summary)[-1]


def test_check_covers_gradients_and_running_stats(bench_cases, checking):
    [case] = bench_cases.build_cases("cpu", quick=True, filters={"shapes": "bn2d-4x16", "dtypes": ["float32"],
                                                                  "layouts": ["nchw"]})
    assert checking.check_case(case, "fwdbwd") == (True, "")  # fastbn itself
    assert checking.check_case(case, "fwd", _scaled_grad_factory) == (True, "")
    passed, note = checking.check_case(case, "fwdbwd", _scaled_grad_factory)
    assert not passed and note.startswith("input grad:")
    passed, note = checking.check_case(case, "fwd", _wrong_momentum_factory)
    assert not passed and note.startswith("running_mean:")
    assert checking.check_case(case, "eval", _wrong_momentum_factory) == (True, "")


@pytest.fixture
def inaccurate_eager_case(bench_cases, checking, monkeypatch):
    """A float32 BatchNorm2d case whose torch eager reference is 1.01x off (its float64 run exact)."""

    class InaccurateEager(torch.nn.BatchNorm2d):
        def forward(self, input):
            y = super().forward(input)
            return y if input.dtype == torch.float64 else y * 1.01

    monkeypatch.setattr(checking, "TORCH_BN", {**TORCH_BN, 2: InaccurateEager})
    [case] = bench_cases.build_cases("cpu", quick=True, filters={"shapes": "bn2d-4x16", "dtypes": ["float32"],
                                                                  "layouts": ["nchw"]})
    return case


def test_inaccurate_eager_is_not_blamed_on_fastbn(inaccurate_eager_case, checking):
    """Where torch eager itself is off, the float64 reference decides."""
    case = inaccurate_eager_case
    passed, note = checking.check_case(case, "fwd")
    assert passed and "float64 reference" in note
    passed, note = checking.check_case(case, "fwd", _scaled_grad_factory)  # right outputs
    assert passed and "float64 reference" in note
    passed, note = checking.check_case(case, "fwdbwd", _grad_scaled_by(1.05))  # gradients farther off than eager's
    assert not passed and note.startswith("input grad:"), note


def test_no_less_accurate_than_an_inaccurate_eager_passes(inaccurate_eager_case, checking):
    """Where eager and the implementation are both off the float64 reference, the implementation
    passes when no output of it is farther off than eager's, and fails when one is."""
    case = inaccurate_eager_case
    passed, note = checking.check_case(case, "fwd", _output_scaled_by(1.005))
    assert passed and note.startswith("no less accurate than torch eager"), note
    passed, note = checking.check_case(case, "fwd", _output_scaled_by(1.02))
    assert not passed and "output: fastbn" in note and "torch eager" in note, note


def test_main_exit_status_on_fail(bench, cli, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "fastbn_factory", _scaled_output_factory)
    rc = bench.main(["--quick", "--device", "cpu", "--no-compile", "--shapes", "bn1d-64x32", "--dtype", "float32",
                     "--modes", "eval", "--out-dir", str(tmp_path), "--no-chart"])
    assert rc == 1
    [json_path] = tmp_path.glob("*.json")
    data = json.loads(json_path.read_text())
    assert [r["status"] for r in data["rows"]] == ["FAIL"]
    assert data["rows"][0]["fastbn_ms"] is None
    assert data["summary"]["fail_count"] == 1


def _bn1d_cases(bench_cases, dtypes=("float32",)):
    """The quick CPU grid's BatchNorm1d case outside the tiny group (64 x 32), one per dtype."""
    return bench_cases.build_cases("cpu", quick=True, filters={"shapes": "bn1d-64x32", "dtypes": list(dtypes)})


def test_compile_column(bench_cases, runner):
    """One small torch.compile row: timed, or (no working compiler here) reported, never fatal."""
    cases = _bn1d_cases(bench_cases)
    notes = []
    [row] = runner.run_benchmark(cases, modes=["fwdbwd"], compile_policy="fwdbwd-float32", progress=False,
                                 notes=notes)
    assert row["status"] == "ok"
    if row["compile_ms"] is None:
        assert row["note"].startswith("torch.compile failed") and notes
    else:
        assert row["compile_ms"] > 0 and row["speedup_compile"] > 0


def test_budget_zero_runs_nothing_but_writes_outputs(bench, bench_cases, capsys, tmp_path):
    rc = bench.main(["--quick", "--device", "cpu", "--shapes", "bn1d", "--budget-s", "0",
                     "--out-dir", str(tmp_path), "--no-chart"])
    assert rc == 0
    total = len(bench_cases.build_cases("cpu", quick=True, filters={"shapes": "bn1d"})) * len(bench_cases.MODES)
    [json_path] = tmp_path.glob("*.json")
    data = json.loads(json_path.read_text())
    assert data["rows"] == []
    assert data["summary"]["rows"] == 0 and data["summary"]["not_run"] == total
    assert data["header"]["budget_s"] == 0
    assert any(f"{total} of {total} rows not run" in n for n in data["header"]["notes"])
    assert _read_csv(json_path.with_suffix(".csv")) == []
    assert f"not run (time budget): {total}" in capsys.readouterr().out


def test_deadline_stops_between_rows(bench_cases, runner, report, monkeypatch):
    """The row under way when the deadline passes completes; no further row starts."""
    time_case = runner.time_case
    timed = []

    def recording_time_case(*args, **kwargs):
        timed.append(args[1])
        return time_case(*args, **kwargs)

    # The deadline passes during the first row (not by the wall clock, which a loaded machine
    # would make pass before the first row starts).
    monkeypatch.setattr(runner, "time_case", recording_time_case)
    monkeypatch.setattr(runner, "_past", lambda deadline: bool(timed))
    cases = _bn1d_cases(bench_cases)
    notes = []
    rows = runner.run_benchmark(cases, compile_policy="none", copy_gbps=1.0, progress=False, notes=notes,
                                deadline=time.monotonic() + 3600)
    assert [(r["mode"], r["status"]) for r in rows] == [(bench_cases.MODES[0], "ok")]
    assert rows[0]["fastbn_ms"] > 0
    total = len(cases) * len(bench_cases.MODES)
    assert notes == [f"stopped at the time budget (--budget-s): {total - 1} of {total} rows not run"]
    summary = report.summarize(rows, not_run=total - 1)
    assert summary["not_run"] == total - 1
    assert report.format_summary(summary)[-1].endswith(f"not run (time budget): {total - 1}")
    assert "not run" not in report.format_summary(report.summarize(rows))[-1]


def _eager_as_compiled():
    """Stands in for compiled_module: torch eager BatchNorm, without the cost of compiling."""

    def compiled_module(case, mode, state_dict):
        module = TORCH_BN[case.kind](case.num_features, device=case.device)
        module.load_state_dict(state_dict)
        module.train(mode != "eval")
        return module

    return compiled_module


def test_compile_pass_respects_deadline(bench_cases, runner, monkeypatch):
    """The compile pass runs after every row's fastbn and eager times; rows it has not reached
    at the deadline keep those and get no compile time."""
    monkeypatch.setattr(runner, "compiled_module", _eager_as_compiled())
    time_case = runner.time_case
    calls = []

    def recording_time_case(case, mode, modules, *args, **kwargs):
        calls.append(sorted(modules))
        return time_case(case, mode, modules, *args, **kwargs)

    # The deadline passes once the first compile time is taken (not by the wall clock, which a
    # loaded machine would make pass during the first pass already).
    monkeypatch.setattr(runner, "time_case", recording_time_case)
    monkeypatch.setattr(runner, "_past", lambda deadline: ["compile"] in calls)
    notes = []
    rows = runner.run_benchmark(_bn1d_cases(bench_cases, ("float32", "bfloat16")), modes=["fwdbwd"],
                                compile_policy="all", copy_gbps=1.0, progress=False, notes=notes,
                                deadline=time.monotonic() + 3600)
    assert calls == [["eager", "fastbn"], ["eager", "fastbn"], ["compile"]]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["compile_ms"] > 0
    assert rows[0]["speedup_compile"] == pytest.approx(rows[0]["compile_ms"] / rows[0]["fastbn_ms"])
    assert rows[1]["fastbn_ms"] > 0 and rows[1]["compile_ms"] is None and rows[1]["speedup_compile"] is None
    assert notes == ["torch.compile column missing from 1 of 2 rows that want it: the time budget (--budget-s) ran out"]


@pytest.mark.parametrize("policy, compiled", [
    ("fwdbwd", {("float32", "fwdbwd"), ("bfloat16", "fwdbwd")}),
    ("fwdbwd-float32", {("float32", "fwdbwd")}),
    ("all", {(d, m) for d in ("float32", "bfloat16") for m in ("fwd", "fwdbwd", "eval")}),
    ("none", set()),
])
def test_compile_policy_picks_rows(bench_cases, runner, monkeypatch, policy, compiled):
    monkeypatch.setattr(runner, "compiled_module", _eager_as_compiled())
    rows = runner.run_benchmark(_bn1d_cases(bench_cases, ("float32", "bfloat16")), compile_policy=policy, reps=2,
                                copy_gbps=1.0, progress=False)
    assert len(rows) == 2 * len(bench_cases.MODES)
    assert all(r["status"] == "ok" and r["fastbn_ms"] > 0 for r in rows)
    assert {(r["dtype"], r["mode"]) for r in rows if r["compile_ms"] is not None} == compiled
    assert all((r["speedup_compile"] is None) == (r["compile_ms"] is None) for r in rows)


def test_compile_failure_switches_compile_off(bench_cases, runner, monkeypatch):
    """A first compilation that fails leaves every further row without a compile time."""

    def broken(case, mode, state_dict):
        module = _eager_as_compiled()(case, mode, state_dict)
        module.forward = lambda x: (_ for _ in ()).throw(RuntimeError("no compiler"))
        return module

    monkeypatch.setattr(runner, "compiled_module", broken)
    notes = []
    rows = runner.run_benchmark(_bn1d_cases(bench_cases, ("float32", "bfloat16")), modes=["fwdbwd"],
                                compile_policy="all", reps=2, copy_gbps=1.0, progress=False, notes=notes)
    assert [r["compile_ms"] for r in rows] == [None, None]
    assert rows[0]["note"] == "torch.compile failed: RuntimeError: no compiler" and rows[1]["note"] == ""
    assert notes == ["torch.compile column skipped: compiling failed (RuntimeError: no compiler)"]


def test_compile_policy_flags(bench_cases, runner, cli):
    def policy(*argv, device="cpu"):
        return cli.compile_policy_for(cli.parse_args(list(argv)), device)[0]

    assert policy() == "fwdbwd-float32"
    assert policy("--quick") == "fwdbwd-float32"
    assert policy("--no-compile") == "none"
    assert policy("--compile-all") == "all"
    assert policy("--compile-policy", "fwdbwd") == "fwdbwd"
    assert policy("--compile-policy", "none") == "none"
    assert policy("--compile-policy", "all") == "all"
    with pytest.raises(SystemExit):
        cli.parse_args(["--no-compile", "--compile-policy", "all"])
    [f32, bf16] = _bn1d_cases(bench_cases, ("float32", "bfloat16"))
    assert runner._wants_compile("fwdbwd", bf16, "fwdbwd") and not runner._wants_compile("fwdbwd", f32, "fwd")
    assert not runner._wants_compile("fwdbwd-float32", bf16, "fwdbwd")


@pytest.mark.parametrize("op, kernel", [("aten::cudnn_batch_norm", "cudnn"), ("aten::miopen_batch_norm", "miopen")])
def test_torch_kernel_from_profiled_ops(bench_cases, checking, monkeypatch, op, kernel):
    """"native" on the CPU; what the recorded op names say when eager runs a vendor kernel."""
    [case] = _bn1d_cases(bench_cases)
    for mode in bench_cases.MODES:
        assert checking.torch_kernel(case, mode) == "native"

    class VendorBatchNorm(torch.nn.BatchNorm1d):
        def forward(self, input):
            with torch.profiler.record_function(op):
                return super().forward(input)

    monkeypatch.setattr(checking, "TORCH_BN", {**TORCH_BN, 1: VendorBatchNorm})
    for mode in bench_cases.MODES:
        assert checking.torch_kernel(case, mode) == kernel


def test_no_function_rebinds_torch(bench, bench_pkg):
    """A function-local `import torch.x` makes `torch` local to the whole function, so every
    other use of `torch` in it fails when that import did not run (seen on a GPU with
    --no-compile: UnboundLocalError at torch.cuda.empty_cache())."""
    modules = [bench] + [getattr(bench_pkg, name) for name in bench_pkg.__all__]
    assert {m.__name__ for m in modules[1:]} >= {f"fastbn_bench.{name}" for name in
                                                 ("cases", "checking", "timing", "runner", "report", "cli")}
    funcs = [f for m in modules for f in vars(m).values()
             if isinstance(f, types.FunctionType) and f.__module__ == m.__name__]
    assert funcs
    assert [f"{f.__module__}.{f.__name__}" for f in funcs if "torch" in f.__code__.co_varnames] == []
