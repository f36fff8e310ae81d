import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


def pytest_terminal_summary(terminalreporter):
    """What the CUDA emulator suite showed, when it ran: coverage, sanitizers, seeded bugs."""
    report = getattr(sys.modules.get("emu_harness"), "REPORT", {})
    if not any(report.get(k) for k in ("coverage", "asan", "tsan", "seeded")):
        return
    tr = terminalreporter
    tr.section("CUDA emulator")
    for key in ("coverage", "asan", "tsan"):
        if key in report:
            tr.write_line(f"cuda_emu: {report[key]}")
    if report.get("seeded"):
        tr.write_line(f"cuda_emu: seeded bugs caught: {len(report['seeded'])}/{report['seeded_total']}")
        for line in report["seeded"]:
            tr.write_line(f"  {line}")
