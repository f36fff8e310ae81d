"""The classic BatchNorm experiment, on fastbn: one network trained with and without BatchNorm.

Both models start from the same weights for the layers they share (the Linear/Conv2d layers),
are trained with Adam on the same batches in the same order, and are evaluated after every epoch.
The script prints one line per model per epoch, draws the four curves (train/validation loss and
accuracy) into a PNG, writes every number and the run's settings to a JSON file, and checks that a
saved-and-reloaded BN model gives bit-identical eval-mode outputs.

With --compare-torch, a twin on torch.nn.BatchNorm1d/2d starts from the same weights and sees the
same batches. The two agree to float rounding step by step, but float32 training amplifies rounding:
Adam's first steps move every parameter by about +-lr whatever the size of its gradient, and under BN
some true gradients are exactly zero (the bias before BN, the weights of pixels blank across a batch),
so rounding noise picks the sign. The curves therefore drift apart, by a few 0.01 over 10 epochs (a
torch model nudged by 1e-7 drifts as far); with --float64 they agree to ~1e-11.

    python examples/bn_vs_no_bn.py                     # MLP with fastbn.BatchNorm1d on sklearn's 8x8 digits
    python examples/bn_vs_no_bn.py --sigmoid           # the paper's 3 x 100 sigmoid MLP
    python examples/bn_vs_no_bn.py --cnn               # small CNN with fastbn.BatchNorm2d
    python examples/bn_vs_no_bn.py --compare-torch     # also train a torch.nn.BatchNorm twin and diff the curves
    python examples/bn_vs_no_bn.py --mnist-dir ~/mnist # real MNIST from local IDX files (never downloaded)
"""
import argparse
import gzip
import json
import shutil
import struct
import sys
import time
from functools import partial
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

import fastbn

matplotlib.use("Agg")  # no display needed; must come before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

EXAMPLES_DIR = Path(__file__).resolve().parent
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")
LABELS = {"with_bn": "with BN", "without_bn": "without BN", "torch_bn": "with torch BN"}
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# IDX type codes (third byte of the magic number) -> numpy dtypes; multi-byte types are big-endian.
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ----------------------------------------------------------------------------------------- data


def load_digits_data(val_fraction=0.2, seed=0):
    """Splits scikit-learn's handwritten digits (1797 images, shipped with sklearn) into train and
    validation sets, stratified by class, with a fixed seed.

    Returns (x_train, y_train, x_val, y_val): images as float arrays of shape (N, 8, 8) with the raw
    pixel values 0..16, labels as int64 arrays of shape (N,).
    """
    digits = load_digits()
    x_train, x_val, y_train, y_val = train_test_split(
        digits.images, digits.target.astype(np.int64), test_size=val_fraction, random_state=seed, stratify=digits.target
    )
    return x_train, y_train, x_val, y_val


def read_idx(path):
    """Reads one IDX file (plain, or gzip-compressed when the name ends in ``.gz``).

    Returns its contents as a numpy array with the file's shape and dtype (native byte order).
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an IDX file")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic number {data[:4].hex()})")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_DTYPES[code])
    expected = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise ValueError(f"{path}: {len(data) - header} bytes of data, expected {expected} for shape {shape}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_mnist(directory):
    """Reads MNIST from the four standard IDX files in ``directory`` (each plain or ``.gz``; the plain
    file wins when both exist). Nothing is downloaded.

    Returns (x_train, y_train, x_test, y_test) exactly as stored: uint8 images of shape (N, 28, 28)
    and uint8 labels of shape (N,); the test split serves as the validation set.
    """
    directory = Path(directory).expanduser()
    arrays = []
    for name in MNIST_FILES:
        candidates = [directory / name, directory / f"{name}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"neither {candidates[0]} nor {candidates[1]} exists")
        arrays.append(read_idx(path))
    x_train, y_train, x_test, y_test = arrays
    for images, labels, split in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"MNIST {split}: images {images.shape} do not match labels {labels.shape}")
    return x_train, y_train, x_test, y_test


def standardise(train, *others):
    """Shifts and scales pixel values by the mean and standard deviation of the training images
    (one scalar each, the usual image normalisation); the validation data does not influence them.

    Returns a list of float32 arrays: the standardised ``train`` followed by the standardised ``others``.
    """
    train = np.asarray(train, dtype=np.float64)
    mean, std = train.mean(), train.std()
    return [((np.asarray(a, dtype=np.float64) - mean) / std).astype(np.float32) for a in (train, *others)]


# --------------------------------------------------------------------------------------- models


def build_mlp(in_features, num_classes=10, hidden=32, depth=2, activation=nn.ReLU, norm=None):
    """Builds ``depth`` x (Linear -> [norm] -> activation) followed by a Linear classifier.

    ``norm`` is a BatchNorm1d class (fastbn's or torch's) or None for the model without BN.
    Returns the nn.Sequential.
    """
    layers, width = [], in_features
    for _ in range(depth):
        layers.append(nn.Linear(width, hidden))
        if norm is not None:
            layers.append(norm(hidden))
        layers.append(activation())
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def build_cnn(image_size, num_classes=10, channels=32, norm=None):
    """Builds 2 x (3x3 Conv2d -> [norm] -> ReLU -> 2x2 MaxPool) -> Flatten -> Linear for one-channel
    images of ``image_size`` (H, W), both divisible by 4 (8x8 digits, 28x28 MNIST).

    ``norm`` is a BatchNorm2d class (fastbn's or torch's) or None for the model without BN.
    Returns the nn.Sequential.
    """
    height, width = image_size
    layers, in_channels = [], 1
    for _ in range(2):
        layers.append(nn.Conv2d(in_channels, channels, kernel_size=3, padding=1))
        if norm is not None:
            layers.append(norm(channels))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        in_channels = channels
    layers += [nn.Flatten(), nn.Linear(channels * (height // 4) * (width // 4), num_classes)]
    return nn.Sequential(*layers)


def copy_shared_weights(src, dst):
    """Copies the weights of every Linear/Conv2d layer of ``src`` into the matching layer of ``dst``
    (in module order), so a model with BN and one without start from the same point.

    Returns ``dst``.
    """
    shared = (nn.Linear, nn.Conv2d)
    src_layers = [m for m in src.modules() if isinstance(m, shared)]
    dst_layers = [m for m in dst.modules() if isinstance(m, shared)]
    if len(src_layers) != len(dst_layers):
        raise ValueError(f"{len(src_layers)} shared layers in the source model, {len(dst_layers)} in the target")
    for s, d in zip(src_layers, dst_layers):
        d.load_state_dict(s.state_dict())
    return dst


# ------------------------------------------------------------------------------------- training


@torch.no_grad()
def predict(model, x, chunk=1024):
    """Runs ``model`` in eval mode (BN uses its running statistics and updates nothing) over ``x``
    in fixed chunks. Returns the logits, shape (N, num_classes)."""
    model.eval()
    return torch.cat([model(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def evaluate(model, x, y):
    """Returns (mean cross-entropy loss, accuracy) of ``model`` on (x, y) in eval mode, as floats."""
    logits = predict(model, x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train_epoch(model, optimizer, x, y, batch_size, generator, desc="", progress=True):
    """Trains ``model`` for one epoch in train mode, on mini-batches in the order drawn from
    ``generator``. A trailing batch of a single sample is skipped: training-mode BatchNorm needs
    more than one value per channel.

    Returns (mean loss, accuracy) over the epoch's batches, as the optimiser saw them.
    """
    model.train()
    order = torch.randperm(len(x), generator=generator).to(x.device)
    starts = [s for s in range(0, len(x), batch_size) if len(x) - s > 1]
    loss_sum = torch.zeros((), dtype=x.dtype, device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    seen = 0
    for start in tqdm(starts, desc=desc, disable=not progress, file=sys.stderr, leave=False, unit="batch"):
        idx = order[start : start + batch_size]
        logits = model(x[idx])
        loss = F.cross_entropy(logits, y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(1) == y[idx]).sum()
        seen += len(idx)
    return loss_sum.item() / seen, correct.item() / seen


def train(models, data, *, epochs, batch_size, lr, seed, progress=True, verbose=True):
    """Trains every model in ``models`` ({name: module}) with its own Adam optimiser, epoch by epoch,
    all on the same batches in the same order (a torch.Generator seeded per epoch), and evaluates
    each on the validation set after every epoch. ``data`` is (x_train, y_train, x_val, y_val).

    Returns {name: {"train_loss": [...], "train_acc": [...], "val_loss": [...], "val_acc": [...]}},
    one value per epoch.
    """
    x_train, y_train, x_val, y_val = data
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=lr) for name, model in models.items()}
    history = {name: {metric: [] for metric in METRICS} for name in models}
    for epoch in range(1, epochs + 1):
        for name, model in models.items():
            generator = torch.Generator().manual_seed(1000 * seed + epoch)  # same order for every model
            desc = f"epoch {epoch}/{epochs} {LABELS[name]}"
            train_loss, train_acc = train_epoch(
                model, optimizers[name], x_train, y_train, batch_size, generator, desc, progress
            )
            val_loss, val_acc = evaluate(model, x_val, y_val)
            for metric, value in zip(METRICS, (train_loss, train_acc, val_loss, val_acc)):
                history[name][metric].append(value)
            if verbose:
                print(
                    f"epoch {epoch:>3}/{epochs}  {LABELS[name]:<13}  train loss {train_loss:.4f}  acc {train_acc:.4f}"
                    f"  |  val loss {val_loss:.4f}  acc {val_acc:.4f}",
                    flush=True,
                )
    return history


# ------------------------------------------------------------------------------ checks and output


def checkpoint_round_trip(model, make_fresh, x_val, y_val, path):
    """Saves ``model.state_dict()`` to ``path`` with torch.save, loads it into ``make_fresh()`` and
    compares the eval-mode logits of both models on the validation set.

    Returns {"checkpoint", "logits_identical" (torch.equal), "val_acc_before", "val_acc_after"}.
    """
    torch.save(model.state_dict(), path)
    fresh = make_fresh().to(x_val.device, x_val.dtype)
    fresh.load_state_dict(torch.load(path, map_location=x_val.device, weights_only=True))
    before, after = predict(model, x_val), predict(fresh, x_val)
    return {
        "checkpoint": str(path),
        "logits_identical": torch.equal(before, after),
        "val_acc_before": (before.argmax(1) == y_val).float().mean().item(),
        "val_acc_after": (after.argmax(1) == y_val).float().mean().item(),
    }


def curve_differences(a, b):
    """Compares two training histories. Returns {metric: largest |a - b| over the epochs} for each
    metric, plus "max" (the largest of those) and "per_epoch" (the largest over the metrics, epoch
    by epoch)."""
    diffs = {metric: max(abs(u - v) for u, v in zip(a[metric], b[metric])) for metric in METRICS}
    diffs["max"] = max(diffs.values())
    diffs["per_epoch"] = [max(abs(a[m][e] - b[m][e]) for m in METRICS) for e in range(len(a[METRICS[0]]))]
    return diffs


def plot_history(history, path, title, bn_name):
    """Draws train loss, train accuracy, validation loss and validation accuracy per epoch, "with BN"
    against "without BN", as a 2x2 chart and saves it as a PNG at ``path``. Returns ``path``."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    panels = [
        ("train_loss", "train loss (epoch mean, train mode)"),
        ("train_acc", "train accuracy (epoch mean, train mode)"),
        ("val_loss", "validation loss (eval mode)"),
        ("val_acc", "validation accuracy (eval mode)"),
    ]
    styles = {"with_bn": dict(color="tab:blue", label=f"with BN ({bn_name})"),
              "without_bn": dict(color="tab:orange", linestyle="--", label="without BN")}
    for ax, (metric, name) in zip(axes.flat, panels):
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


def positive_int(text):
    """argparse type: returns ``text`` as an int, rejecting values below 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv=None):
    """Returns the parsed command line (``argv``, or sys.argv[1:] when None)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sigmoid", action="store_true",
                      help="the original paper's MLP: 3 hidden layers of 100 sigmoid units")
    mode.add_argument("--cnn", action="store_true", help="a small CNN with fastbn.BatchNorm2d instead of the MLP")
    p.add_argument("--epochs", type=positive_int, default=10, help="default 10")
    p.add_argument("--batch-size", type=positive_int, default=32, help="default 32")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default 0.01)")
    p.add_argument("--hidden", type=positive_int,
                   help="hidden width, channels for --cnn (default 32; 100 with --sigmoid)")
    p.add_argument("--seed", type=int, default=0, help="seed for the initial weights and the batch order (default 0)")
    p.add_argument("--mnist-dir", help="read MNIST from the four IDX files (plain or .gz) in this directory")
    p.add_argument("--subset", type=positive_int, help="use only the first N training samples")
    p.add_argument("--compare-torch", action="store_true",
                   help="also train a twin on torch.nn.BatchNorm1d/2d and report how far the curves differ")
    p.add_argument("--float64", action="store_true",
                   help="train in double precision (with --compare-torch: the curves agree to ~1e-11 "
                        "instead of drifting apart by float32 rounding amplified by training)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="CPU threads for torch (default 1: the models are so small that more threads only add "
                        "overhead, several times over when other programs keep the cores busy)")
    p.add_argument("--out-dir", default=str(EXAMPLES_DIR / "output"), help="where the PNG, JSON and checkpoint go")
    p.add_argument("--save-readme-chart", action="store_true",
                   help="also copy the PNG next to this script (examples/), for the README")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="print nothing (implies --no-progress)")
    args = p.parse_args(argv)
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2 (training-mode BatchNorm needs more than one sample)")
    if args.mnist_dir and not Path(args.mnist_dir).expanduser().is_dir():
        p.error(f"--mnist-dir {args.mnist_dir}: no such directory")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but no CUDA GPU is available to torch")
    if args.hidden is None:
        args.hidden = 100 if args.sigmoid else 32
    return args


def main(argv=None):
    """Runs the experiment described by ``argv`` (see parse_args) with torch limited to --threads
    CPU threads (restored afterwards), and writes the PNG, JSON and checkpoint into --out-dir.

    Returns the results dict of run_experiment, which is also written as JSON.
    """
    args = parse_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run_experiment(args)
    finally:
        torch.set_num_threads(previous_threads)


def run_experiment(args):
    """Runs the experiment for the parsed command line ``args``.

    Returns the results dict that is also written as JSON: "settings", "history" (per-epoch numbers
    per model), "final_val_acc", "checkpoint_round_trip", "compare_torch" (None without
    --compare-torch), "elapsed_s" and the output paths "png", "json", "readme_chart".
    """
    started = time.perf_counter()
    verbose = not args.quiet
    device = torch.device(args.device)
    dtype = torch.float64 if args.float64 else torch.float32
    mode = "cnn" if args.cnn else "sigmoid" if args.sigmoid else "mlp"

    if args.mnist_dir:
        x_train, y_train, x_val, y_val = load_mnist(args.mnist_dir)
        dataset = "MNIST"
    else:
        x_train, y_train, x_val, y_val = load_digits_data()
        dataset = "sklearn digits"
    if args.subset:
        x_train, y_train = x_train[: args.subset], y_train[: args.subset]
    x_train, x_val = standardise(x_train, x_val)
    image_size = x_train.shape[1:]
    sample_shape = (1, *image_size) if args.cnn else (int(np.prod(image_size)),)
    data = (
        torch.from_numpy(x_train).reshape(-1, *sample_shape).to(device, dtype),
        torch.from_numpy(y_train.astype(np.int64)).to(device),
        torch.from_numpy(x_val).reshape(-1, *sample_shape).to(device, dtype),
        torch.from_numpy(y_val.astype(np.int64)).to(device),
    )

    if args.cnn:
        make = partial(build_cnn, image_size, channels=args.hidden)
        fast_norm, torch_norm = fastbn.BatchNorm2d, nn.BatchNorm2d
        description = f"CNN, {args.hidden} channels"
    else:
        depth, activation = (3, nn.Sigmoid) if args.sigmoid else (2, nn.ReLU)
        make = partial(build_mlp, sample_shape[0], hidden=args.hidden, depth=depth, activation=activation)
        fast_norm, torch_norm = fastbn.BatchNorm1d, nn.BatchNorm1d
        description = f"MLP, {depth} x {args.hidden} {activation.__name__}"
    torch.manual_seed(args.seed)
    without_bn = make(norm=None)
    with_bn = copy_shared_weights(without_bn, make(norm=fast_norm))
    models = {"with_bn": with_bn, "without_bn": without_bn}
    if args.compare_torch:
        models["torch_bn"] = make(norm=torch_norm)
        models["torch_bn"].load_state_dict(with_bn.state_dict())  # same keys: fastbn's modules subclass torch's
    for model in models.values():
        model.to(device, dtype)

    bn_name = f"fastbn.{fast_norm.__name__}"
    settings = {
        "mode": mode,
        "model": description,
        "model_with_bn": str(with_bn),
        "bn": bn_name,
        "dataset": dataset,
        "n_train": len(x_train),
        "n_val": len(x_val),
        "input_shape": list(sample_shape),
        "subset": args.subset,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": "Adam",
        "lr": args.lr,
        "hidden": args.hidden,
        "seed": args.seed,
        "compare_torch": args.compare_torch,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": args.threads,
        "torch_version": torch.__version__,
    }
    if verbose:
        print(f"{description} on {dataset}: {len(x_train)} train / {len(x_val)} validation samples, {device}, "
              f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}", flush=True)

    history = train(models, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    progress=verbose and not args.no_progress, verbose=verbose)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bn_vs_no_bn" + ("" if mode == "mlp" else f"_{mode}") + ("_mnist" if args.mnist_dir else "")
    round_trip = checkpoint_round_trip(with_bn, partial(make, norm=fast_norm), data[2], data[3],
                                       out_dir / f"{stem}_bn_model.pt")
    compare = None
    if args.compare_torch:
        compare = {"torch_bn": f"torch.nn.{torch_norm.__name__}",
                   **curve_differences(history["with_bn"], history["torch_bn"])}

    title = (f"{description} on {dataset} ({len(x_train)} train / {len(x_val)} val), "
             f"Adam lr {args.lr}, batch {args.batch_size}, seed {args.seed}")
    png = plot_history(history, out_dir / f"{stem}.png", title, bn_name)
    readme_chart = None
    if args.save_readme_chart:
        readme_chart = EXAMPLES_DIR / png.name
        shutil.copyfile(png, readme_chart)
    json_path = out_dir / f"{stem}.json"
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

    if verbose:
        final = results["final_val_acc"]
        print(f"final validation accuracy: with BN {final['with_bn']:.4f}, without BN {final['without_bn']:.4f}")
        print(f"checkpoint round trip ({round_trip['checkpoint']}): eval-mode logits identical: "
              f"{round_trip['logits_identical']} (val acc {round_trip['val_acc_before']:.4f} -> "
              f"{round_trip['val_acc_after']:.4f})")
        if compare:
            print(f"{bn_name} vs {compare['torch_bn']}: largest difference between the curves {compare['max']:.3g} "
                  f"(after epoch 1: {compare['per_epoch'][0]:.3g})")
        print(f"wrote {png} and {json_path}" + (f"; README chart {readme_chart}" if readme_chart else ""))
        print(f"done in {results['elapsed_s']:.1f} s")
    return results


if __name__ == "__main__":
    main()
