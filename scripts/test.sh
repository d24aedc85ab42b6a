#!/usr/bin/env bash
# Sets up .venv with the test extras and runs the whole test suite (notebooks included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# shellcheck disable=SC1091
. .venv/bin/activate
# Over every core (pytest-xdist, a test extra): the suite is CPU-bound and each test stands
# alone. `bash scripts/test.sh -n 0` runs it in one process.
python -m pytest -n auto "$@"
