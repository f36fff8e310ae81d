#!/usr/bin/env bash
# Sets up fastbn on a fresh machine: torch (the CPU build when none is installed), the Python
# packages the tests, benchmark and example use, then fastbn itself (in place, editable;
# not with --deps-only).
# Installs only what is missing, so it also works offline where everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need() {  # need <import name> <pip requirement>
  "$PY" -c "import $1" 2>/dev/null || "$PY" -m pip install -q "$2"
}
need torch "torch==2.13.0"
need numpy numpy
need pytest pytest
need matplotlib matplotlib
need sklearn scikit-learn
need tqdm tqdm
need onnx onnx                # ONNX export tests (fastbn.onnx)
need onnxscript onnxscript
need onnxruntime onnxruntime
if [ "${1:-}" = "--deps-only" ]; then exit 0; fi  # the packages only, not fastbn
# Build only when the sources changed since the last build made here.
stamp=$(cat setup.py $(find csrc -type f | sort) | sha1sum | cut -d' ' -f1)
here=$("$PY" -c "import os; print(os.path.realpath('fastbn'))")
installed=$(cd / && "$PY" -c "import os, fastbn; print(os.path.realpath(os.path.dirname(fastbn.__file__)))" 2>/dev/null || true)
if ! ls fastbn/_C*.so >/dev/null 2>&1 || [ "$(cat .build-stamp 2>/dev/null)" != "$stamp" ] || [ "$installed" != "$here" ]; then
  "$PY" -m pip install -q --no-build-isolation -e .
  echo "$stamp" > .build-stamp
fi
"$PY" -c "import fastbn, torch; print('fastbn ready: torch', torch.__version__, '| CPU kernels:', fastbn.cpu_isa(), '| CUDA kernels:', fastbn.built_with_cuda())"
