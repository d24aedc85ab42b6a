#!/usr/bin/env bash
# Runs the benchmark sweeps and writes their tables, JSON, CSV and plots to benchmarks/results/.
# Usage: bash benchmarks/run.sh [SWEEP ...] [-- EXTRA BENCH OPTIONS]
#   sweeps (defined in bayesflow/_bench.py, SWEEPS): default, quick, paper, flows, cuda
#   e.g.  bash benchmarks/run.sh paper -- --threads 2
set -euo pipefail
cd "$(dirname "$0")/.."

sweeps=()
while [[ $# -gt 0 && "$1" != "--" ]]; do sweeps+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
[[ ${#sweeps[@]} -eq 0 ]] && sweeps=(paper)

mkdir -p benchmarks/results
for sweep in "${sweeps[@]}"; do
  out="benchmarks/results/${sweep}"
  plot=(--plot "$out.png")
  [[ "$sweep" == flows* ]] && plot=()  # one K per flow: nothing to plot against K
  python -m bayesflow bench --sweep "$sweep" "$@" \
    --json "$out.json" --csv "$out.csv" "${plot[@]}" | tee "$out.txt"
done
