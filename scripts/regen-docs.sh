#!/usr/bin/env bash
# Regenerates the measured outputs that the docs show, from the current code, each page saying
# which command produced it, when, and under what load:
#   tutorial  docs/training.md: benchmarks/tutorial.py with nelbo (vmap) and the local trick
#   flows     docs/flows.md's speed table: bash benchmarks/run.sh flows
#   notebook  notebook 04: bash benchmarks/run.sh paper, then the notebook executed in place
#             ("notebook --no-sweep" only executes it on the committed results)
#   cost      benchmarks/RESULTS.md's "The cost of being Bayesian": bash benchmarks/run.sh cost
#   all       all of them (about half an hour on a 2-core CPU)
# Usage: bash scripts/regen-docs.sh TARGET [TARGET ...]     (after bash scripts/setup.sh dev)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[[ -x .venv/bin/python ]] && . .venv/bin/activate

stamp() { echo "$(date -u '+%Y-%m-%d %H:%M UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg)"; }

# Replaces the section NAME of FILE with the text on stdin.
section() {
  python -c '
import sys
from bayesflow.bench import replace_section
replace_section(sys.argv[1], sys.argv[2], sys.stdin.read())
' "$1" "$2"
}

tutorial() {
  local before vmap local_
  before="$(stamp)"
  vmap="$(python benchmarks/tutorial.py --threads 1)"
  local_="$(python benchmarks/tutorial.py --threads 1 --method local)"
  {
    echo "\`bash scripts/regen-docs.sh tutorial\`: started $before; $(stamp) at the end."
    echo
    echo '```text'
    echo '$ python benchmarks/tutorial.py --threads 1'
    echo "$vmap"
    echo
    echo '$ python benchmarks/tutorial.py --threads 1 --method local'
    echo "$local_"
    echo '```'
  } | section docs/training.md tutorial-output
}

flows() {
  local before
  before="$(stamp)"
  bash benchmarks/run.sh flows -- --no-progress > /dev/null \
    || echo "regen-docs: the flows sweep reported wrong cells (benchmarks/results/flows.txt)"
  python - "$before" "$(stamp)" <<'PY' | section docs/flows.md flows-table
import json, sys
from bayesflow.bench import flows_table
from bayesflow.bench.cases import FLOWS

order = ("nice", "realnvp", "maf", "nsf", "ncsf", "sospf", "naf", "unaf", "gf", "bpf", "cnf", "gmm")
names = {m: FLOWS[m].__name__ for m in order}
records = json.load(open("benchmarks/results/flows.json"))
print(f"`bash benchmarks/run.sh flows`: started {sys.argv[1]}; {sys.argv[2]} at the end "
      f"({records[0]['device_name']}, torch {records[0]['versions']['torch']}).\n")
print(flows_table(records, names))
PY
}

notebook() {
  if [[ "${1:-}" != --no-sweep ]]; then
    # vmap-compiled is wrong on nsf train K=1 (torch.compile's, see RESULTS.md): not a stop.
    bash benchmarks/run.sh paper -- --no-progress > /dev/null \
      || echo "regen-docs: the paper sweep reported wrong cells (benchmarks/results/paper.txt)"
  fi
  OMP_NUM_THREADS=1 MPLBACKEND=Agg python - <<'PY'
import nbclient, nbformat
path = "notebooks/04_loop_vs_vmap.ipynb"
nb = nbformat.read(path, as_version=4)
nbclient.NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": "notebooks"}}
).execute()
nbformat.write(nb, path)
print(f"regen-docs: executed {path}")
PY
}

cost() {
  bash benchmarks/run.sh cost -- --no-progress > /dev/null
}

[[ $# -gt 0 ]] || { sed -n '2,10p' "$0"; exit 2; }
while [[ $# -gt 0 ]]; do
  target="$1"
  shift
  case "$target" in
    tutorial) tutorial ;;
    flows) flows ;;
    notebook)
      if [[ "${1:-}" == --no-sweep ]]; then notebook --no-sweep; shift; else notebook; fi ;;
    cost) cost ;;
    all) tutorial; flows; notebook; cost ;;
    *) echo "regen-docs: expected tutorial, flows, notebook, cost or all, got $target" >&2; exit 2 ;;
  esac
  echo "regen-docs: $target done ($(stamp))"
done
