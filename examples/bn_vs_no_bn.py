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
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import fastbn

EXAMPLES_DIR = Path(__file__).resolve().parent
if str(EXAMPLES_DIR) not in sys.path:  # the helper modules next to this script, from any working directory
    sys.path.insert(0, str(EXAMPLES_DIR))
from example_cli import parse_args  # noqa: E402  (command line)
from example_data import as_tensors, load_dataset  # noqa: E402  (digits / MNIST, standardised)
from example_report import print_summary, write_results  # noqa: E402  (chart, JSON, summary)

METRICS = ("train_loss", "train_acc", "val_loss", "val_acc")
LABELS = {"with_bn": "with BN", "without_bn": "without BN", "torch_bn": "with torch BN"}


# --------------------------------------------------------------------------------------- models


def build_mlp(in_features, num_classes=10, hidden=32, depth=2, activation=nn.ReLU, norm=None):
    """``depth`` x (Linear -> [norm] -> activation) -> Linear. ``norm``: a BatchNorm1d class
    (fastbn's or torch's), or None for the model without BN."""
    layers, width = [], in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), *([norm(hidden)] if norm else []), activation()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def build_cnn(image_size, num_classes=10, channels=32, norm=None):
    """2 x (3x3 Conv2d -> [norm] -> ReLU -> 2x2 MaxPool) -> Flatten -> Linear, for one-channel images of
    ``image_size`` (H, W), both divisible by 4. ``norm``: a BatchNorm2d class, or None for no BN."""
    height, width = image_size
    layers, in_channels = [], 1
    for _ in range(2):
        layers += [nn.Conv2d(in_channels, channels, kernel_size=3, padding=1),
                   *([norm(channels)] if norm else []), nn.ReLU(), nn.MaxPool2d(2)]
        in_channels = channels
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * (height // 4) * (width // 4), num_classes))


def copy_shared_weights(src, dst):
    """Copies every Linear/Conv2d layer of ``src`` into the matching layer of ``dst`` (in module order),
    so that the models with and without BN start from the same point. Returns ``dst``."""
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
    """Eval-mode logits of ``model`` over ``x`` (BN uses its running statistics and updates nothing)."""
    model.eval()
    return torch.cat([model(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def evaluate(model, x, y):
    """Returns (mean cross-entropy loss, accuracy) of ``model`` on (x, y) in eval mode, as floats."""
    logits = predict(model, x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train_epoch(model, optimizer, x, y, batch_size, generator, desc="", progress=True):
    """One epoch in train mode, on mini-batches in the order drawn from ``generator``; a trailing batch
    of one sample is skipped (training-mode BN needs more than one value per channel).
    Returns (mean loss, accuracy) over the epoch's batches, as the optimiser saw them."""
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
    """Trains each of ``models`` ({name: module}) with its own Adam, all on the same batches in the same
    order, evaluating after every epoch. ``data`` is (x_train, y_train, x_val, y_val).
    Returns {name: {metric: [one value per epoch]}} for the METRICS."""
    x_train, y_train, x_val, y_val = data
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=lr) for name, model in models.items()}
    history = {name: {metric: [] for metric in METRICS} for name in models}
    for epoch in range(1, epochs + 1):
        for name, model in models.items():
            generator = torch.Generator().manual_seed(1000 * seed + epoch)  # same order for every model
            train_loss, train_acc = train_epoch(model, optimizers[name], x_train, y_train, batch_size, generator,
                                                f"epoch {epoch}/{epochs} {LABELS[name]}", progress)
            val_loss, val_acc = evaluate(model, x_val, y_val)
            for metric, value in zip(METRICS, (train_loss, train_acc, val_loss, val_acc)):
                history[name][metric].append(value)
            if verbose:
                print(f"epoch {epoch:>3}/{epochs}  {LABELS[name]:<13}  train loss {train_loss:.4f}  acc {train_acc:.4f}"
                      f"  |  val loss {val_loss:.4f}  acc {val_acc:.4f}", flush=True)
    return history


# ---------------------------------------------------------------------------------- the comparison


def checkpoint_round_trip(model, make_fresh, x_val, y_val, path):
    """torch.save's ``model.state_dict()`` to ``path``, loads it into ``make_fresh()`` and compares both
    models' eval-mode logits. Returns {"checkpoint", "logits_identical", "val_acc_before", "val_acc_after"}."""
    torch.save(model.state_dict(), path)
    fresh = make_fresh().to(x_val.device, x_val.dtype)
    fresh.load_state_dict(torch.load(path, map_location=x_val.device, weights_only=True))
    before, after = predict(model, x_val), predict(fresh, x_val)
    accuracy = [(logits.argmax(1) == y_val).float().mean().item() for logits in (before, after)]
    return {"checkpoint": str(path), "logits_identical": torch.equal(before, after),
            "val_acc_before": accuracy[0], "val_acc_after": accuracy[1]}


def curve_differences(a, b):
    """{metric: largest |a - b| over the epochs} of two histories, plus "max" (the largest of those) and
    "per_epoch" (the largest over the metrics, epoch by epoch)."""
    diffs = {metric: max(abs(u - v) for u, v in zip(a[metric], b[metric])) for metric in METRICS}
    diffs["max"] = max(diffs.values())
    diffs["per_epoch"] = [max(abs(a[m][e] - b[m][e]) for m in METRICS) for e in range(len(a[METRICS[0]]))]
    return diffs


def main(argv=None):
    """Runs the experiment for ``argv`` (sys.argv[1:] when None) with torch limited to --threads CPU
    threads (restored afterwards). Returns the results dict of run_experiment, also written as JSON."""
    args = parse_args(argv, description=__doc__, default_out_dir=EXAMPLES_DIR / "output")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run_experiment(args)
    finally:
        torch.set_num_threads(previous_threads)


def run_experiment(args):
    """Runs the experiment for the parsed command line ``args`` and writes the PNG, JSON and checkpoint.
    Returns the results dict (settings, per-epoch history, checks, paths; see write_results)."""
    started, verbose = time.perf_counter(), not args.quiet
    device, dtype = torch.device(args.device), torch.float64 if args.float64 else torch.float32
    mode = "cnn" if args.cnn else "sigmoid" if args.sigmoid else "mlp"
    dataset, arrays = load_dataset(args.mnist_dir, args.subset)
    data, sample_shape = as_tensors(arrays, images=args.cnn, device=device, dtype=dtype)
    n_train, n_val = len(data[0]), len(data[2])

    # The swap: one architecture built with fastbn's BatchNorm, without BN, and (optionally) with torch's.
    if args.cnn:
        make = partial(build_cnn, sample_shape[1:], channels=args.hidden)
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
    settings = {"mode": mode, "model": description, "model_with_bn": str(with_bn), "bn": bn_name, "dataset": dataset,
                "n_train": n_train, "n_val": n_val, "input_shape": list(sample_shape), "subset": args.subset,
                "epochs": args.epochs, "batch_size": args.batch_size, "optimizer": "Adam", "lr": args.lr,
                "hidden": args.hidden, "seed": args.seed, "compare_torch": args.compare_torch, "device": str(device),
                "dtype": str(dtype).removeprefix("torch."), "threads": args.threads, "torch_version": torch.__version__}
    if verbose:
        print(f"{description} on {dataset}: {n_train} train / {n_val} validation samples, {device}, "
              f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}", flush=True)

    history = train(models, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    progress=verbose and not args.no_progress, verbose=verbose)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bn_vs_no_bn" + ("" if mode == "mlp" else f"_{mode}") + ("_mnist" if args.mnist_dir else "")
    round_trip = checkpoint_round_trip(with_bn, partial(make, norm=fast_norm), data[2], data[3],
                                       out_dir / f"{stem}_bn_model.pt")
    compare = None
    if args.compare_torch:  # fastbn against torch.nn: how far apart the two BN runs' curves ended up
        compare = {"torch_bn": f"torch.nn.{torch_norm.__name__}",
                   **curve_differences(history["with_bn"], history["torch_bn"])}

    title = (f"{description} on {dataset} ({n_train} train / {n_val} val), "
             f"Adam lr {args.lr}, batch {args.batch_size}, seed {args.seed}")
    results = write_results(out_dir / stem, title=title, settings=settings, history=history, round_trip=round_trip,
                            compare=compare, started=started,
                            readme_dir=EXAMPLES_DIR if args.save_readme_chart else None)
    if verbose:
        print_summary(results)
    return results


if __name__ == "__main__":
    main()
