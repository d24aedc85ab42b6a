#!/usr/bin/env bash
# Sets up .venv with the test extras and runs the whole test suite (notebooks included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pytest "$@"
