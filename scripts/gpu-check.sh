#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU as it is: a python3 with a CUDA torch, numpy,
# einops and pytest, where nothing can be installed from a registry. In one run of at most
# about 8 minutes:
#   1. zuko, if python cannot import it, from the wheel carried in .whl/ (pip --no-index
#      --no-deps --target a temporary folder, put on PYTHONPATH); bayesflow from this checkout;
#   2. the tests with --device cuda (the notebook and site tests skip when nbclient, nbformat
#      or sphinx are missing; the benchmark's and CLI's tests, CPU-bound, and this script's
#      rehearsal are left out: step 4 runs the benchmark on the device), at most
#      GPU_CHECK_TEST_SECONDS (default 300) seconds;
#   3. float64 on the GPU against the CPU, on the same posterior samples;
#   4. the reduced CUDA sweep (`bayesflow bench --sweep cuda`: K = 1, 128, 1024; MLP, NSF, the
#      digits CNN, a last-layer-Bayesian trunk; the plain module, vmap, bmm, limit, torch-func,
#      and the loops only up to K = 128), at most GPU_CHECK_SWEEP_SECONDS (default 150).
# Everything lands in one folder: $OUT when set, else benchmarks/results/ (cuda.txt, .json,
# .csv, .md: the sweep; cuda-tests.txt: the tests; cuda-env.txt: the machine and step 3).
#
# Usage:
#   bash scripts/gpu-check.sh --wheels    # here, with network: zuko's wheel into .whl/
#   bash scripts/gpu-check.sh [PYTEST OPTIONS]                  # there, on the GPU machine
#   GPU_CHECK_CPU=1 bash scripts/gpu-check.sh                   # a rehearsal on any CPU
# GPU_CHECK_TESTS (test paths) and GPU_CHECK_SWEEP_OPTIONS (more bench options) narrow a run;
# GPU_CHECK_PYTHON names the interpreter (default: the checkout's .venv, else python3).
# The rehearsal runs the same steps on the CPU at tiny sizes, with zuko, nbclient, nbformat and
# sphinx hidden from python (as on the GPU machine) and zuko's wheel built from the installed
# copy when .whl/ has none; its files are named cpu-rehearsal.* (in $OUT, or a temporary folder).
# benchmarks/RESULTS.md ("The GPU") says how to run it on a lent machine.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
zuko_version="${ZUKO_VERSION:-1.6.0}"

python="${GPU_CHECK_PYTHON:-python3}"
[[ -z "${GPU_CHECK_PYTHON:-}" && -x .venv/bin/python ]] && python="$root/.venv/bin/python"

if [[ "${1:-}" == --wheels ]]; then
  mkdir -p .whl
  "$python" -m pip download -q --no-deps --only-binary=:all: -d .whl "zuko==$zuko_version"
  ls .whl
  exit $?
fi

rehearsal="${GPU_CHECK_CPU:-}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
if [[ -n "$rehearsal" ]]; then
  device=cpu
  prefix=cpu-rehearsal
  out="${OUT:-$tmp/out}"
else
  device=cuda
  prefix=cuda
  out="${OUT:-benchmarks/results}"
fi
mkdir -p "$out"
env_log="$out/$prefix-env.txt"
: > "$env_log"
say() { echo "gpu-check: $*" | tee -a "$env_log"; }
failed=()

if [[ -n "$rehearsal" ]]; then
  # As on the GPU machine: these packages cannot be imported.
  for name in zuko nbclient nbformat sphinx; do
    mkdir -p "$tmp/hidden/$name"
    echo "raise ModuleNotFoundError(\"No module named '$name'\", name='$name')" \
      > "$tmp/hidden/$name/__init__.py"
  done
  if ! ls .whl/zuko-*.whl > /dev/null 2>&1; then
    # zuko's wheel, rebuilt from the installed copy (files and RECORD as installed).
    mkdir -p "$tmp/wheels"
    "$python" - "$tmp/wheels" <<'PY'
import base64, hashlib, importlib.metadata as md, sys, zipfile
dist = md.distribution("zuko")
files = [f for f in dist.files if "__pycache__" not in f.parts and f.suffix != ".pyc"]
name = f"zuko-{dist.version}-py3-none-any.whl"
record = next(f for f in files if f.name == "RECORD")
rows = []
with zipfile.ZipFile(f"{sys.argv[1]}/{name}", "w") as whl:
    for f in files:
        if f == record or f.name in ("INSTALLER", "REQUESTED", "direct_url.json"):
            continue
        data = f.locate().read_bytes()
        whl.writestr(str(f), data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{f},sha256={digest},{len(data)}")
    whl.writestr(str(record), "\n".join([*rows, f"{record},,"]) + "\n")
print(f"gpu-check: rehearsal: built {name} from the installed zuko")
PY
    wheels=("$tmp"/wheels/zuko-*.whl)
  fi
  export PYTHONPATH="$tmp/hidden${PYTHONPATH:+:$PYTHONPATH}"
fi

# 1. zuko from the carried wheel, bayesflow from this checkout.
if ! "$python" -c "import torch" 2> /dev/null; then
  say "$python cannot import torch; set GPU_CHECK_PYTHON to an interpreter that can"
  exit 1
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if ! "$python" -c "import zuko" 2> /dev/null; then
  [[ -z "${wheels:-}" ]] && wheels=(.whl/zuko-*.whl)
  if [[ ! -e "${wheels[0]}" ]]; then
    say "python cannot import zuko and .whl/ has no zuko wheel;"
    say "run 'bash scripts/gpu-check.sh --wheels' where pip can download, and carry .whl/"
    exit 1
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$tmp/site" "${wheels[@]}" || { say "installing ${wheels[*]} failed"; exit 1; }
  export PYTHONPATH="$tmp/site:$PYTHONPATH"
  say "zuko from ${wheels[*]##*/}"
fi

if [[ -z "$rehearsal" ]] && ! "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  say "no CUDA device here (torch $("$python" -c 'import torch; print(torch.__version__)'))"
  say "on a CPU, GPU_CHECK_CPU=1 rehearses the same steps"
  exit 1
fi
"$python" - <<'PY' 2>&1 | tee -a "$env_log"
import platform, torch, zuko, bayesflow
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"gpu-check: {gpu} | torch {torch.__version__} (CUDA {torch.version.cuda}) | zuko "
      f"{zuko.__version__} from {zuko.__file__} | bayesflow {bayesflow.__version__} from "
      f"{bayesflow.__file__} | Python {platform.python_version()}")
PY
command -v nvidia-smi > /dev/null && nvidia-smi >> "$env_log" 2>&1

# 2. The tests on the device (the package's doctests print CPU tensors: not here).
timeout_opt=()
"$python" -c "import pytest_timeout" 2> /dev/null && timeout_opt=(--timeout=180)
tests=(tests --ignore=tests/test_bench.py --ignore=tests/test_cli.py --ignore=tests/test_gpu_check.py)
[[ -n "${GPU_CHECK_TESTS:-}" ]] && read -r -a tests <<< "$GPU_CHECK_TESTS"
say "tests: python -m pytest --device $device ${tests[*]} $*"
timeout -s INT -k 20 "${GPU_CHECK_TEST_SECONDS:-300}" "$python" -m pytest -p no:cacheprovider -q -rfEs \
  --device "$device" "${timeout_opt[@]}" "${tests[@]}" "$@" > "$out/$prefix-tests.txt" 2>&1
status=$?
tail -n 25 "$out/$prefix-tests.txt"
[[ $status == 0 ]] || failed+=("tests (pytest exit $status)")

# 3. float64 on the device against the CPU, on the same samples.
"$python" - "$device" <<'PY' 2>&1 | tee -a "$env_log"
import sys, torch, bayesflow as bf
from bayesflow.bench import make_case
device = sys.argv[1]
worst = 0.0
for model in ("mlp", "nsf", "digits-cnn", "last-layer"):
    case = make_case(model, batch=32, dtype=torch.float64)
    params = bf.sample(case.posterior, 8, generator=torch.Generator().manual_seed(0))
    ref = bf.vmap_call(case.module, params, *case.args, fn=case.fn)
    module = case.module.to(device)
    moved = {k: v.detach().to(device) for k, v in params.items()}
    got = bf.vmap_call(module, moved, *(a.to(device) for a in case.args), fn=case.fn)
    err = ((got.cpu() - ref).abs().max() / ref.abs().max()).item()
    worst = max(worst, err)
    print(f"gpu-check: float64 {device} against cpu, {model}, K = 8: max relative error {err:.1e}")
sys.exit(0 if worst <= 1e-10 else 1)
PY
status=$?
[[ $status == 0 ]] || failed+=("float64 $device against cpu")

# 4. The reduced CUDA sweep; an interrupted sweep still writes the cells it finished.
sweep=(--sweep cuda --device "$device" --no-progress)
if [[ -n "$rehearsal" ]]; then
  sweep+=(--samples 1 2 4 --max-loop-samples 2 --batch 4 --min-time 0.001 --repeats 1)
fi
# More options for the sweep (they win over the sweep's), e.g. "--models mlp".
[[ -n "${GPU_CHECK_SWEEP_OPTIONS:-}" ]] && read -r -a more <<< "$GPU_CHECK_SWEEP_OPTIONS" && sweep+=("${more[@]}")
say "sweep: bayesflow bench ${sweep[*]}"
timeout -s INT -k 20 "${GPU_CHECK_SWEEP_SECONDS:-150}" "$python" -m bayesflow bench "${sweep[@]}" \
  --json "$out/$prefix.json" --csv "$out/$prefix.csv" --markdown "$out/$prefix.md" \
  > "$out/$prefix.txt" 2> "$tmp/sweep.err"
status=$?
cat "$out/$prefix.txt"
tail -n 5 "$tmp/sweep.err" >&2
[[ $status == 0 ]] || failed+=("sweep (exit $status)")

say "results in $out: $(cd "$out" && ls | tr '\n' ' ')"
if [[ ${#failed[@]} -gt 0 ]]; then
  say "FAILED: ${failed[*]}"
  exit 1
fi
say "all steps passed"
