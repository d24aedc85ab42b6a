#!/usr/bin/env bash
# Sets up .venv and runs the loop-vs-vmap benchmark on a small default (extra arguments go to it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh bench
# shellcheck disable=SC1091
. .venv/bin/activate
bayesflow bench "$@"
