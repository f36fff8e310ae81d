"""Smoke tests of benchmarks/bench.py on the CPU: the quick grid end to end (table, JSON, CSV,
chart), the case grid and filters, and that a wrong implementation is reported as FAIL."""
import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import load_script

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
ROW_COLUMNS = ("case", "dtype", "layout", "mode", "status", "fastbn_ms", "eager_ms", "compile_ms",
               "speedup_eager", "speedup_compile", "gbps", "pct_copy_bw")
TIME_COLUMNS = ("fastbn_ms", "eager_ms", "compile_ms", "speedup_eager", "speedup_compile", "gbps", "pct_copy_bw")


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH_PATH, "fastbn_bench")


TORCH_BN = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}


def _scaled_output_factory(kind, num_features, **kwargs):
    """Subtly wrong forward: torch BatchNorm, then * 1.01."""

    class Scaled(TORCH_BN[kind]):
        def forward(self, input):
            return super().forward(input) * 1.01

    return Scaled(num_features, **kwargs)


def _scaled_grad_factory(kind, num_features, **kwargs):
    """Right forward values, gradients 1.01x too large."""

    class ScaledGrad(TORCH_BN[kind]):
        def forward(self, input):
            y = super().forward(input)
            return y + (y - y.detach()) * 0.01

    return ScaledGrad(num_features, **kwargs)


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


def test_quick_run_outputs(bench, quick_run):
    rc, out = quick_run
    assert rc == 0
    [json_path] = out.glob("cpu-*-test.json")
    stem = json_path.name[: -len(".json")]
    data = json.loads(json_path.read_text())
    rows = data["rows"]
    cases = bench.build_cases("cpu", quick=True)
    assert len(rows) == len(cases) * len(bench.MODES)
    for row in rows:
        for column in ROW_COLUMNS:
            assert column in row, column
        assert row["status"] == "ok", row
        assert row["compile_ms"] is None and row["speedup_compile"] is None
        for column in ("fastbn_ms", "eager_ms", "speedup_eager", "gbps", "pct_copy_bw"):
            assert row[column] > 0, (column, row)
    header = data["header"]
    assert header["torch"] == torch.__version__
    assert header["copy_gbps"] > 0
    assert "fastbn_cpu_isa" in header and "fastbn_built_with_cuda" in header
    assert "--quick" in header["command"]
    assert data["summary"]["fail_count"] == 0
    assert set(data["summary"]["modes"]) == set(bench.MODES)

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
    assert "FAIL rows: 0" in text
    assert not list(tmp_path.glob("*.png"))


def test_grids_and_filters(bench):
    cpu = bench.build_cases("cpu")
    assert {c.dtype for c in cpu} == {"float32", "bfloat16"}
    assert len(cpu) == 2 * (11 * 2 + 3)  # 9 ResNet-50 + small-C + 3-D in both layouts, 3 BatchNorm1d
    assert all(c.layout == "nchw" for c in cpu if c.kind == 1)
    gpu = bench.build_cases("cuda")
    assert len(gpu) == 3 * (20 * 2 + 3)
    assert {"bn2d-256x2048x7x7", "bn2d-128x4x224x224", "bn3d-8x64x16x56x56", "bn1d-32x32"} <= {c.name for c in gpu}

    picked = bench.build_cases("cpu", filters={"shapes": "64x56x56", "dtypes": ["bfloat16"],
                                               "layouts": ["channels_last"]})
    assert [(c.name, c.dtype, c.layout) for c in picked] == [("bn2d-8x64x56x56", "bfloat16", "channels_last")]
    assert not bench.build_cases("cpu", filters={"shapes": "bn1d", "layouts": ["channels_last"]})
    assert {c.name for c in bench.build_cases("cpu", filters={"shapes": "^bn3d"})} == {"bn3d-2x64x8x28x28"}


def test_wrong_output_is_fail_without_time(bench):
    cases = bench.build_cases("cpu", quick=True, filters={"shapes": "bn2d", "dtypes": ["float32"]})
    rows = bench.run_benchmark(cases, impl_factory=_scaled_output_factory, compile_policy="none", progress=False)
    assert len(rows) == len(cases) * len(bench.MODES)
    for row in rows:
        assert row["status"] == "FAIL", row
        assert row["note"].startswith("output:"), row
        for column in TIME_COLUMNS:
            assert row[column] is None, (column, row)
    summary = bench.summarize(rows)
    assert summary["fail_count"] == len(rows)
    assert summary["modes"] == {}
    assert "FAIL rows: %d" % len(rows) in bench.format_summary(summary)[-1]


def test_check_covers_gradients_and_running_stats(bench):
    [case] = bench.build_cases("cpu", quick=True, filters={"shapes": "bn2d", "dtypes": ["float32"],
                                                            "layouts": ["nchw"]})
    assert bench.check_case(case, "fwdbwd") == (True, "")  # fastbn itself
    assert bench.check_case(case, "fwd", _scaled_grad_factory) == (True, "")
    passed, note = bench.check_case(case, "fwdbwd", _scaled_grad_factory)
    assert not passed and note.startswith("input grad:")
    passed, note = bench.check_case(case, "fwd", _wrong_momentum_factory)
    assert not passed and note.startswith("running_mean:")
    assert bench.check_case(case, "eval", _wrong_momentum_factory) == (True, "")


def test_inaccurate_eager_is_not_blamed_on_fastbn(bench, monkeypatch):
    """Where torch eager itself is off, the float64 reference decides."""

    class InaccurateEager(torch.nn.BatchNorm2d):
        def forward(self, input):
            y = super().forward(input)
            return y if input.dtype == torch.float64 else y * 1.01

    monkeypatch.setitem(bench.TORCH_BN, 2, InaccurateEager)
    [case] = bench.build_cases("cpu", quick=True, filters={"shapes": "bn2d", "dtypes": ["float32"],
                                                            "layouts": ["nchw"]})
    passed, note = bench.check_case(case, "fwd")
    assert passed and "float64 reference" in note
    passed, note = bench.check_case(case, "fwd", _scaled_grad_factory)  # right outputs
    assert passed and "float64 reference" in note
    passed, note = bench.check_case(case, "fwdbwd", _scaled_grad_factory)  # wrong gradients
    assert not passed


def test_main_exit_status_on_fail(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "fastbn_factory", _scaled_output_factory)
    rc = bench.main(["--quick", "--device", "cpu", "--no-compile", "--shapes", "bn1d", "--dtype", "float32",
                     "--modes", "eval", "--out-dir", str(tmp_path), "--no-chart"])
    assert rc == 1
    [json_path] = tmp_path.glob("*.json")
    data = json.loads(json_path.read_text())
    assert [r["status"] for r in data["rows"]] == ["FAIL"]
    assert data["rows"][0]["fastbn_ms"] is None
    assert data["summary"]["fail_count"] == 1


def test_compile_column(bench):
    """One tiny torch.compile row: timed, or (no working compiler here) reported, never fatal."""
    cases = bench.build_cases("cpu", quick=True, filters={"shapes": "bn1d", "dtypes": ["float32"]})
    notes = []
    [row] = bench.run_benchmark(cases, modes=["fwdbwd"], compile_policy="fwdbwd-float32", progress=False, notes=notes)
    assert row["status"] == "ok"
    if row["compile_ms"] is None:
        assert row["note"].startswith("torch.compile failed") and notes
    else:
        assert row["compile_ms"] > 0 and row["speedup_compile"] > 0
