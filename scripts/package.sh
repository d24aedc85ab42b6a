#!/usr/bin/env bash
# Builds the sdist and the wheel into dist/, installs the wheel (not editable) into a fresh
# venv with a CPU build of torch, imports it and runs the quick benchmark: a package file
# that the wheel misses shows up here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# shellcheck disable=SC1091
. .venv/bin/activate
torch_version="${TORCH_VERSION:-2.13.0}"

python -m pip install -q build
rm -rf dist
python -m build -q --sdist --wheel --outdir dist . > /dev/null

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3}" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q "torch==${torch_version}+cpu" \
  || "$tmp/venv/bin/python" -m pip install -q "torch==${torch_version}+cpu" --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
wheel="$(ls dist/*.whl)"
"$tmp/venv/bin/python" -m pip install -q "${wheel}[bench]"

cd "$tmp"  # away from the source tree: the installed package only
"$tmp/venv/bin/python" -c "import bayesflow, torch; print('bayesflow', bayesflow.__version__, 'torch', torch.__version__)"
"$tmp/venv/bin/python" -c "import torch; assert torch.__version__.endswith('+cpu'), torch.__version__"
"$tmp/venv/bin/bayesflow" bench --quick --no-progress > "$tmp/bench.txt"
tail -n 3 "$tmp/bench.txt"
echo "package: $(basename "$wheel") and $(basename "$(ls "$OLDPWD"/dist/*.tar.gz)") install and run"
