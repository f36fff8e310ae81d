"""Output of examples/bn_vs_no_bn.py: the chart, the JSON results file and the closing summary.

Contract:
- ``plot_history(history, path, title, bn_name)`` draws the "with_bn" and "without_bn" curves of a
  history ({model: {"train_loss", "train_acc", "val_loss", "val_acc": [one value per epoch]}}) as a
  2x2 chart, saves it as a PNG at ``path`` and returns ``path``. Other models in the history (the
  torch twin) are not drawn. matplotlib runs on the Agg backend: no display is needed.
- ``write_results(stem, ...)`` draws that chart to ``{stem}.png`` (copied into ``readme_dir`` when
  one is given), assembles the run's results dict, writes it to ``{stem}.json`` (indented JSON, trailing
  newline) and returns it; its keys are listed in its docstring.
- ``print_summary(results)`` prints the closing lines (final accuracies, the checkpoint round trip,
  the torch comparison when there is one, the output paths, the elapsed time) from the results dict
  that write_results returns.
"""
import json
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed; must come before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    ("train_loss", "train loss (epoch mean, train mode)"),
    ("train_acc", "train accuracy (epoch mean, train mode)"),
    ("val_loss", "validation loss (eval mode)"),
    ("val_acc", "validation accuracy (eval mode)"),
]


def plot_history(history, path, title, bn_name):
    """Draws train loss, train accuracy, validation loss and validation accuracy per epoch, "with BN"
    against "without BN", as a 2x2 chart and saves it as a PNG at ``path``. Returns ``path``."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    styles = {"with_bn": dict(color="tab:blue", label=f"with BN ({bn_name})"),
              "without_bn": dict(color="tab:orange", linestyle="--", label="without BN")}
    for ax, (metric, name) in zip(axes.flat, PANELS):
        for model, style in styles.items():
            values = history[model][metric]
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, **style)
        ax.set_title(name)
        ax.set_ylabel("cross-entropy loss" if metric.endswith("loss") else "accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in axes[1]:
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(stem, *, title, settings, history, round_trip, compare, started, readme_dir=None):
    """Draws the chart to ``{stem}.png`` (and copies it into ``readme_dir`` when given), then writes the
    results dict to ``{stem}.json``; ``stem`` is a Path whose directory exists.

    Returns the results dict, with keys in this order: "settings", "history", "final_val_acc" ({model:
    last validation accuracy}), "checkpoint_round_trip", "compare_torch", "elapsed_s" (seconds since
    ``started``, a time.perf_counter() value, rounded to 0.01), "png", "json", "readme_chart" (paths as
    strings; readme_chart None without ``readme_dir``).
    """
    png = plot_history(history, stem.parent / f"{stem.name}.png", title, settings["bn"])
    readme_chart = None
    if readme_dir is not None:
        readme_chart = Path(readme_dir) / png.name
        shutil.copyfile(png, readme_chart)
    json_path = stem.parent / f"{stem.name}.json"
    results = {
        "settings": settings,
        "history": history,
        "final_val_acc": {name: h["val_acc"][-1] for name, h in history.items()},
        "checkpoint_round_trip": round_trip,
        "compare_torch": compare,
        "elapsed_s": round(time.perf_counter() - started, 2),
        "png": str(png),
        "json": str(json_path),
        "readme_chart": None if readme_chart is None else str(readme_chart),
    }
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_summary(results):
    """Prints the closing lines of a run from the results dict that write_results returned."""
    final, round_trip, compare = results["final_val_acc"], results["checkpoint_round_trip"], results["compare_torch"]
    print(f"final validation accuracy: with BN {final['with_bn']:.4f}, without BN {final['without_bn']:.4f}")
    print(f"checkpoint round trip ({round_trip['checkpoint']}): eval-mode logits identical: "
          f"{round_trip['logits_identical']} (val acc {round_trip['val_acc_before']:.4f} -> "
          f"{round_trip['val_acc_after']:.4f})")
    if compare:
        print(f"{results['settings']['bn']} vs {compare['torch_bn']}: largest difference between the curves "
              f"{compare['max']:.3g} (after epoch 1: {compare['per_epoch'][0]:.3g})")
    readme_chart = results["readme_chart"]
    print(f"wrote {results['png']} and {results['json']}" + (f"; README chart {readme_chart}" if readme_chart else ""))
    print(f"done in {results['elapsed_s']:.1f} s")
