#!/usr/bin/env bash
# Sets up fastbn (scripts/setup.sh), then runs the CUDA emulator suite: fastbn's CUDA kernels
# executed on the CPU (tests/cuda_emu), compared with the CPU kernels, under three schedules,
# AddressSanitizer + UBSan and ThreadSanitizer, plus the seeded-bug checks. No GPU needed.
# Extra arguments go to pytest (e.g. -k float16).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q -rs tests/test_cuda_emu.py tests/test_cuda_emu_seeded_bugs.py "$@"
