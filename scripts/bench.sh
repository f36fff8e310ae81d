#!/usr/bin/env bash
# The main job: sets up fastbn (scripts/setup.sh) and runs the benchmark, fastbn against
# PyTorch eager and torch.compile, on the GPU when one is visible, else on the CPU. Results
# (JSON, CSV, PNG chart) go to benchmarks/results/. Extra arguments go to bench.py
# (e.g. --quick, --device cpu, --dtype bfloat16, --layout channels_last, --shapes 56x56).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" benchmarks/bench.py "$@"
