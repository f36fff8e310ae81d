"""Command line of examples/bn_vs_no_bn.py.

Contract: ``parse_args(argv, description, default_out_dir)`` parses ``argv`` (sys.argv[1:] when None)
and returns an argparse.Namespace with sigmoid, cnn, epochs, batch_size, lr, hidden, seed, mnist_dir,
subset, compare_torch, float64, device, threads, out_dir, save_readme_chart, no_progress and quiet.
After parsing, ``device`` is always set ("cuda" when torch sees a GPU, else "cpu") and ``hidden`` is
always set (100 with --sigmoid, else 32). Invalid input (a count below 1, --batch-size 1, a missing
--mnist-dir, --device cuda without a GPU, --sigmoid with --cnn) exits through argparse's error (status 2).
``description`` is the --help text (the script's docstring), shown as written.
"""
import argparse
from pathlib import Path

import torch


def positive_int(text):
    """argparse type: returns ``text`` as an int, rejecting values below 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv=None, description=None, default_out_dir="output"):
    """Returns the parsed command line (``argv``, or sys.argv[1:] when None)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--out-dir", default=str(default_out_dir), help="where the PNG, JSON and checkpoint go")
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
