#!/usr/bin/env bash
# Creates .venv with a CPU build of torch and bayesflow installed in it.
# Usage: bash scripts/setup.sh [EXTRAS]
#   EXTRAS: bench, test, dev (test and ruff), docs or peers, or several joined by commas
#   (test,docs); default: bench. scripts/bench.sh passes bench, test.sh test, docs.sh docs,
#   package.sh dev. TORCH_VERSION (default 2.13.0), TORCH_INDEX_URL (default PyTorch's CPU
#   wheel index, tried after pip's own) and PYTHON (the venv's interpreter, default python3)
#   are read from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-bench}"
torch_version="${TORCH_VERSION:-2.13.0}"

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

if ! python -c "import torch" 2>/dev/null; then
  # The "+cpu" local version exists only as a CPU build, so this never pulls CUDA wheels.
  # PyPI does not serve the "+cpu" builds: PyTorch's CPU wheel index does.
  index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
  if ! python -m pip install -q "torch==${torch_version}+cpu" \
    && ! python -m pip install -q "torch==${torch_version}+cpu" --index-url "$index"; then
    echo "setup: no CPU build of torch ${torch_version} found (pip's indexes, then $index);" >&2
    echo "setup: install one first, or set TORCH_INDEX_URL to an index that serves it." >&2
    exit 1
  fi
fi

python -m pip install -q -e ".[${extras}]"
