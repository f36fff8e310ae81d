#!/usr/bin/env bash
# Sets up fastbn (scripts/setup.sh) and runs the test suite without the tests marked slow (long
# stress tests and the emulator's seeded-bug builds; CI runs them next: .ci/run). Extra
# arguments go to pytest (`-m slow` runs only the slow ones, `-m ""` everything).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest -q -rs tests -m "not slow" "$@"
