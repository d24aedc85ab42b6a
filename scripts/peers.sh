#!/usr/bin/env bash
# Installs the peer libraries of `bayesflow bench` (bayesian-torch, posteriors, Pyro), of the
# Laplace comparison (laplace-torch) and the reference implementation of bf.IVON (ivon-opt)
# into .venv next to its CPU torch, without ever letting pip pull another torch (or a CUDA one).
# Usage: bash scripts/peers.sh            (after bash scripts/setup.sh; see benchmarks/RESULTS.md)
#
# Each peer is installed with --no-deps, then only what it really imports; a constraint file pins
# the torch already installed, so a step that wanted another torch fails instead of downloading.
# Skipped on purpose: bayesian-torch's torchvision (each release pins one torch; the package never
# imports it), tensorboard (never imported) and scikit-learn (only its AvUC loss imports it);
# laplace-torch's torchvision (never imported, same reason).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck disable=SC1091
. .venv/bin/activate
torch_version=$(python -W ignore -c 'import torch; print(torch.__version__)')
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==${torch_version%%+*}" > "$constraints"

check() {
  local now
  now=$(python -W ignore -c 'import torch; print(torch.__version__)')
  if [ "$now" != "$torch_version" ]; then
    echo "peers: torch changed from $torch_version to $now; stopping" >&2
    exit 1
  fi
}

pip() { python -m pip install -q -c "$constraints" "$@"; check; }

pip --no-deps bayesian-torch==0.5.0
pip --no-deps posteriors==0.1.3 torchopt==0.7.3 tensordict==0.15.3
pip optree==0.20.0 cloudpickle==3.1.3 "pyvers>=0.2,<0.3" graphviz==0.21 numpy
pip --no-deps pyro-ppl==1.9.2
pip pyro-api==0.1.2 opt_einsum==3.4.0 tqdm
# laplace-torch imports its three curvature backends (curvlinops, BackPACK, ASDL, the last from the
# asdfghjkl distribution), torchmetrics, scipy and opt_einsum; the backends import unfoldNd,
# einconv and linear_operator.
pip --no-deps laplace-torch==0.3 curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 \
  asdfghjkl==0.1a4 torchmetrics==1.9.0 lightning-utilities==0.15.3 unfoldNd==0.2.3 \
  einconv==0.1.0 linear_operator==0.6.1
pip scipy packaging
pip --no-deps ivon-opt==0.1.3  # imports torch only

python -W ignore -c '
import bayesian_torch.models.dnn_to_bnn, ivon, laplace, posteriors, pyro.infer.autoguide, torch
print("peers: installed next to torch", torch.__version__)
'
