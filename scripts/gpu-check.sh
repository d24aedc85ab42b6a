#!/usr/bin/env bash
# On a machine with a CUDA GPU: the test suite on the GPU, then the CUDA benchmark sweep
# (K up to 1024: MLP, NSF, the digits CNN, a last-layer-Bayesian trunk, the peers) as JSON
# and a table in benchmarks/results/cuda.*. Extra arguments go to pytest.
# Usage: bash scripts/gpu-check.sh [PYTEST OPTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[ -x .venv/bin/python ] && . .venv/bin/activate

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: no CUDA device here (torch $(python -c 'import torch; print(torch.__version__)'));" >&2
  echo "gpu-check: install a CUDA build of torch on a GPU machine first" >&2
  exit 1
fi

python -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
python -m pytest --device cuda -q "$@"

mkdir -p benchmarks/results
python -m bayesflow bench --sweep cuda --no-progress \
  --json benchmarks/results/cuda.json --csv benchmarks/results/cuda.csv \
  | tee benchmarks/results/cuda.txt
