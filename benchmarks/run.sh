#!/usr/bin/env bash
# Runs the benchmark sweeps and writes their tables, JSON, CSV and plots to benchmarks/results/.
# Usage: bash benchmarks/run.sh [SWEEP ...] [-- EXTRA BENCH OPTIONS]
#   sweeps (defined in bayesflow/bench/sweeps.py, SWEEPS): default, quick, paper, peers,
#   architectures, cost, cnn, flows, flows-sample, cuda
#   e.g.  bash benchmarks/run.sh paper -- --threads 2
# The peers and cost sweeps also write their tables into benchmarks/RESULTS.md ("Peers",
# "The cost of being Bayesian"), with the command, the date and the load.
set -euo pipefail
cd "$(dirname "$0")/.."

sweeps=()
while [[ $# -gt 0 && "$1" != "--" ]]; do sweeps+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
[[ ${#sweeps[@]} -eq 0 ]] && sweeps=(paper)

mkdir -p benchmarks/results
status=0
for sweep in "${sweeps[@]}"; do
  out="benchmarks/results/${sweep}"
  plot=(--plot "$out.png")
  [[ "$sweep" == flows* || "$sweep" == cost ]] && plot=()  # one K: nothing to plot against K
  before="$(date -u '+%Y-%m-%d %H:%M UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
  # A method with wrong numbers (exit 1) does not stop the others: its cells say so.
  python -m bayesflow bench --sweep "$sweep" "$@" \
    --json "$out.json" --csv "$out.csv" --markdown "$out.md" "${plot[@]}" | tee "$out.txt" \
    || status=$?
  after="load average $(cut -d' ' -f1-3 /proc/loadavg)"
  printf '# %s; after: %s\n' "$before" "$after" >> "$out.txt"
  if [[ "$sweep" == peers || "$sweep" == cost ]]; then
    python - "$sweep" "$out" "$before" "$after" "$*" <<'PY'
import json, sys
from bayesflow.bench import cost_table, replace_section
sweep, out, before, after, extra = sys.argv[1:]
if sweep == "cost":
    table = cost_table(json.load(open(f"{out}.json")))
else:
    table = open(f"{out}.md").read()
command = f"bash benchmarks/run.sh {sweep}{' -- ' + extra if extra else ''}"
note = f"`{command}`: started {before}; {after} at the end.\n\n"
replace_section("benchmarks/RESULTS.md", f"{sweep}-table", note + table)
PY
  fi
done
exit $status
