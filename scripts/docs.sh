#!/usr/bin/env bash
# Sets up .venv with the docs extra and builds the documentation site into docs/_build/html,
# warnings as errors. Extra arguments go to sphinx-build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh docs
# shellcheck disable=SC1091
. .venv/bin/activate
# The source directory is the repository root (see docs/conf.py). -E: every page is read
# again, so a second run reports the same warnings as the first.
python -m sphinx -E -W --keep-going -c docs . docs/_build/html "$@"
