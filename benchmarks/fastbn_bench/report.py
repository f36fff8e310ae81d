"""What a run reports: the summary, the text table, the run header and the result files.

Contracts:
- summarize(rows, not_run) -> {"modes": {mode: {"timed_rows", "geomean_speedup_eager",
  "geomean_speedup_compile", "compile_rows", "by_torch_kernel", "slowest"}}, "fail_count",
  "skip_count", "rows", "not_run"}; a mode appears only when some row of it was timed. Tiny
  rows (case name in TINY_NAMES) count in "modes" like every other row; when some were timed,
  the summary also holds "overhead": {mode: {"rows": [{"case", "dtype", "layout", "fastbn_us",
  "eager_us", "speedup_eager"}], "fastbn_not_slower": rows with fastbn_us <= eager_us,
  "fastbn_never_slower": whether that is every row}}, in MODES order, a mode only when some
  tiny row of it was timed.
- format_summary: one line per mode of "modes"; then, when "overhead" is there, the line
  "per-call overhead (tiny tensors, us per call):" and one line per mode of it; its last line
  always reads "FAIL rows: F   SKIP rows: S   rows: R", followed by
  "   not run (time budget): K" when K > 0.
- format_table prints TABLE_COLUMNS ("-" for a missing value).
- write_outputs(rows, header, summary, out_dir, stem, chart) writes <stem>.json ({"header",
  "summary", "rows"}), <stem>.csv ("# key: value" header lines, then a CSV of COLUMNS, one line
  per row) and, when `chart` and some row was timed, <stem>.png; returns the paths written.
- device_label(device) and sanitize(text) are file-name safe ([A-Za-z0-9-]).
"""
import csv
import datetime
import json
import math
import platform
import re
import shlex
import statistics
from pathlib import Path

import torch

import fastbn

from .cases import MODE_TITLES, MODES, TINY_NAMES
from .checking import TORCH_KERNELS
from .runner import COLUMNS, TABLE_COLUMNS


def _geomean(values):
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


def summarize(rows, not_run=0):
    """Per mode: geometric-mean speedup of fastbn vs eager and vs compile over the timed rows,
    the speedup vs eager split by the kernel torch eager ran ("by_torch_kernel": kernel ->
    {"geomean_speedup_eager", "rows"}, kernels in TORCH_KERNELS order) and the slowest row
    (lowest speedup vs eager); plus the FAIL and SKIP counts, the number of rows and
    `not_run`, the number of rows the time budget left out. When tiny rows (TINY_NAMES) were
    timed, "overhead" gives per mode their fastbn and eager microseconds per call and how many
    have fastbn <= eager (see the module docstring)."""
    summary = {"modes": {}, "fail_count": sum(r["status"] == "FAIL" for r in rows),
               "skip_count": sum(r["status"] == "SKIP" for r in rows), "rows": len(rows), "not_run": not_run}
    for mode in MODES:
        timed = [r for r in rows if r["mode"] == mode and r["speedup_eager"] is not None]
        if not timed:
            continue
        vs_compile = [r["speedup_compile"] for r in timed if r["speedup_compile"] is not None]
        by_kernel = {}
        for kernel in TORCH_KERNELS:
            speedups = [r["speedup_eager"] for r in timed if r["torch_kernel"] == kernel]
            if speedups:
                by_kernel[kernel] = {"geomean_speedup_eager": _geomean(speedups), "rows": len(speedups)}
        slowest = min(timed, key=lambda r: r["speedup_eager"])
        summary["modes"][mode] = {
            "timed_rows": len(timed),
            "geomean_speedup_eager": _geomean([r["speedup_eager"] for r in timed]),
            "geomean_speedup_compile": _geomean(vs_compile),
            "compile_rows": len(vs_compile),
            "by_torch_kernel": by_kernel,
            "slowest": {k: slowest[k] for k in ("case", "dtype", "layout", "speedup_eager")},
        }
    overhead = _overhead(rows)
    if overhead:
        summary["overhead"] = overhead
    return summary


def _overhead(rows):
    """The "overhead" entry of summarize: per mode, the timed tiny rows' microseconds per call."""
    overhead = {}
    for mode in MODES:
        tiny = [r for r in rows if r["mode"] == mode and r["case"] in TINY_NAMES and r["speedup_eager"] is not None]
        if not tiny:
            continue
        entries = [{"case": r["case"], "dtype": r["dtype"], "layout": r["layout"], "fastbn_us": 1e3 * r["fastbn_ms"],
                    "eager_us": 1e3 * r["eager_ms"], "speedup_eager": r["speedup_eager"]} for r in tiny]
        not_slower = sum(e["fastbn_us"] <= e["eager_us"] for e in entries)
        overhead[mode] = {"rows": entries, "fastbn_not_slower": not_slower,
                          "fastbn_never_slower": not_slower == len(entries)}
    return overhead


def format_summary(summary):
    """The summary as printable lines: the modes, the per-call overhead block (when there is
    one), and last the FAIL/SKIP line."""
    lines = []
    for mode, s in summary["modes"].items():
        slow = s["slowest"]
        line = (f"{MODE_TITLES[mode]:>26}: fastbn vs eager {s['geomean_speedup_eager']:.2f}x geomean "
                f"over {s['timed_rows']} rows")
        if s["geomean_speedup_compile"] is not None:
            line += f", vs compile {s['geomean_speedup_compile']:.2f}x over {s['compile_rows']}"
        if s["by_torch_kernel"]:
            line += "; " + ", ".join(f"vs {kernel} rows {k['geomean_speedup_eager']:.2f}x (n={k['rows']})"
                                     for kernel, k in s["by_torch_kernel"].items())
        line += f"; slowest: {slow['case']} {slow['dtype']} {slow['layout']} {slow['speedup_eager']:.2f}x"
        lines.append(line)
    lines += _format_overhead(summary.get("overhead"))
    last = f"FAIL rows: {summary['fail_count']}   SKIP rows: {summary['skip_count']}   rows: {summary['rows']}"
    if summary["not_run"]:
        last += f"   not run (time budget): {summary['not_run']}"
    lines.append(last)
    return lines


def _format_overhead(overhead):
    """The "overhead" entry as printable lines ([] when there is none)."""
    if not overhead:
        return []
    lines = ["per-call overhead (tiny tensors, us per call):"]
    for mode, o in overhead.items():
        cells = [f"{_tiny_label(e)} fastbn {e['fastbn_us']:.1f} vs eager {e['eager_us']:.1f} "
                 f"({e['speedup_eager']:.2f}x)" for e in o["rows"]]
        lines.append(f"{MODE_TITLES[mode]:>26}: " + ", ".join(cells)
                     + f"; fastbn <= eager on {o['fastbn_not_slower']} of {len(o['rows'])} rows")
    return lines


def _tiny_label(entry):
    """Case name, then the dtype unless float32 and the layout unless BatchNorm1d (nchw only)."""
    parts = [entry["case"]]
    if entry["dtype"] != "float32":
        parts.append(entry["dtype"])
    if not entry["case"].startswith("bn1d-"):
        parts.append(entry["layout"])
    return " ".join(parts)


def _fmt(column, value):
    if value is None:
        return "-"
    if column.endswith("_ms"):
        return f"{value:.4f}" if value < 1 else f"{value:.3f}" if value < 100 else f"{value:.1f}"
    if column.startswith("speedup"):
        return f"{value:.2f}x"
    if column == "gbps":
        return f"{value:.1f}"
    if column == "pct_copy_bw":
        return f"{value:.0f}%"
    return str(value)


def format_table(rows):
    """The rows as an aligned text table (text columns left-, numbers right-aligned)."""
    titles = {"torch_kernel": "torch kernel", "fastbn_ms": "fastbn ms", "eager_ms": "eager ms",
              "compile_ms": "compile ms", "speedup_eager": "vs eager", "speedup_compile": "vs compile",
              "gbps": "GB/s", "pct_copy_bw": "% copy"}
    header = [titles.get(c, c) for c in TABLE_COLUMNS]
    body = [[_fmt(c, r[c]) for c in TABLE_COLUMNS] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    left = {"case", "dtype", "layout", "mode", "status", "torch_kernel"}

    def line(cells):
        return "  ".join(cell.ljust(w) if c in left else cell.rjust(w)
                         for c, cell, w in zip(TABLE_COLUMNS, cells, widths))

    out = [line(header), "  ".join("-" * w for w in widths)] + [line(b) for b in body]
    return "\n".join(out)


def _cpu_model():
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sanitize(name):
    """`name` with every run of characters other than [A-Za-z0-9] replaced by "-"."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def device_label(device):
    """File-name-safe device name: the GPU's name, or "cpu-<model>-<threads>t"."""
    if device == "cuda":
        return sanitize(torch.cuda.get_device_name())
    return f"cpu-{sanitize(_cpu_model())}-{torch.get_num_threads()}t"


def run_header(device, copy_gbps, argv):
    """The header block stored with the results: versions, device, copy bandwidth, command."""
    header = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "python": platform.python_version(),
        "fastbn_cpu_isa": fastbn.cpu_isa(),
        "fastbn_cpu_cache_mb": fastbn._C.cpu_cache_bytes() / 2**20,
        "fastbn_built_with_cuda": fastbn.built_with_cuda(),
        "copy_gbps": copy_gbps,
        "command": shlex.join(["benchmarks/bench.py"] + list(argv)),
    }
    return header


def _write_chart(rows, path, title):
    """Horizontal bars of fastbn's speedup per row for the training forward+backward mode (or
    the first mode that was timed), on a log scale from the line at 1.0: vs eager, and vs
    compile where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    timed = [r for r in rows if r["speedup_eager"] is not None]
    mode = "fwdbwd" if any(r["mode"] == "fwdbwd" for r in timed) else timed[0]["mode"]
    data = [r for r in timed if r["mode"] == mode]
    with_compile = any(r["speedup_compile"] is not None for r in data)
    height = 0.4 if with_compile else 0.7
    series = [("speedup_eager", "vs torch eager", -height / 2 if with_compile else 0.0)]
    if with_compile:
        series.append(("speedup_compile", "vs torch.compile", height / 2))
    fig, ax = plt.subplots(figsize=(10, 1.8 + 0.3 * len(data)))
    values = []
    for column, label, offset in series:
        points = [(y + offset, r[column]) for y, r in enumerate(data) if r[column] is not None]
        values += [s for _, s in points]
        colors = [("tab:green" if s >= 1 else "tab:red") if column == "speedup_eager" else "tab:blue"
                  for _, s in points]
        ax.barh([y for y, _ in points], [s - 1 for _, s in points], left=1, height=height, color=colors,
                alpha=1.0 if column == "speedup_eager" else 0.5, label=label)
        for y, s in points:
            ax.text(s, y, f" {s:.2f}x ", va="center",
                    ha="left" if s >= 1 else "right", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(values + [1]) / 1.6, max(values + [1]) * 1.6)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_yticks(range(len(data)), [f"{r['case']} {r['dtype']} {r['layout']}" for r in data], fontsize=8)
    ax.set_ylim(len(data) - 0.5, -0.5)
    ax.set_xlabel(f"fastbn speedup, {MODE_TITLES[mode]} (log scale; right of 1x: fastbn faster)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(rows, header, summary, out_dir, stem, chart=True):
    """Writes <out_dir>/<stem>.json (header, summary, rows), .csv (the header as "# key: value"
    comment lines, then one line per row) and, when `chart` and some row was timed, the .png
    chart. Returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.csv"]
    paths[0].write_text(json.dumps({"header": header, "summary": summary, "rows": rows}, indent=1) + "\n")
    with open(paths[1], "w", newline="") as f:
        for key, value in header.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if chart and any(r["speedup_eager"] is not None for r in rows):
        paths.append(out_dir / f"{stem}.png")
        where = header["device_name"] + (f" ({header['threads']} threads)" if header["device"] == "cpu" else "")
        _write_chart(rows, paths[-1], f"fastbn vs PyTorch on {where}, torch {header['torch']}, {header['date']}")
    return paths
