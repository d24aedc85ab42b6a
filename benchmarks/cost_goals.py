r"""The cost of being Bayesian against its goals, every row measured in one run (1 thread):

    python benchmarks/cost_goals.py                      # prints the table
    python benchmarks/cost_goals.py --out benchmarks/results/cost_goals.txt
    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=100000000000 \
        python benchmarks/cost_goals.py --out benchmarks/results/cost_goals-tuned.txt

Three `bayesflow bench` runs, one after the other on the same machine, each checking its
methods before timing them:

- K = 1 against the plain module (`deterministic`): the `nelbo(n=1)` training steps (with
  each estimator) over a plain Adam step, and the forward `vmap_call(net, sample(q, 1), x)`
  over `net(x)`, on the tutorial MLP 5-64-64-5 (batch 64) and the wide MLP 784-1024-1024-10
  (batch 256);
- the digits CNN at K = 32: `vmap_call` with its default options and a bare
  `torch.func.vmap(functional_call)` (`torch-func`) over `loop_call`, forward and training
  step, at batches 16, 64, 540 and 1024;
- the tutorial MLP at K = 1 against the peer libraries, forward and training step, each
  against the bayesflow method doing the same work (in training, the peers' negative ELBO and
  its gradients against `nelbo-grad`, a bare `torch.func.vmap`'s likelihood gradients against
  `vmap`).

A ratio under 1 means faster than what it is divided by. The goals are those of the cost
work: the nelbo steps at most 1.5x (tutorial) and 1.3x (wide, the local trick 1.5x), the
K = 1 forward at most 1.5x, the CNN never slower than the loop and at most 0.8x at batch 64,
and no peer faster than bayesflow at K = 1. The second command keeps glibc's freed memory
in the heap (see benchmarks/allocator.py): vectorized calls of the CNN fault less.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

RUNS = {
    "cost": [
        "--models", "mlp", "wide-mlp", "--samples", "1", "--modes", "forward", "train",
        "--methods", "deterministic", "vmap", "nelbo", "nelbo-local", "nelbo-flipout",
        "--min-time", "0.5",
    ],
    "cnn": [
        "--models", "digits-cnn", "--samples", "32", "--batch", "16", "64", "540", "1024",
        "--modes", "forward", "train", "--methods", "loop", "vmap", "torch-func",
        "--min-time", "0.25",
    ],
    "peers": [
        "--models", "mlp", "--samples", "1", "--modes", "forward", "train", "--methods",
        "vmap", "nelbo-grad", "torch-func", "bayesian-torch", "posteriors", "pyro", "pyro-vec",
        "--min-time", "0.5",
    ],
}  # fmt: skip

RUNS_CNN = ("loop", "vmap", "torch-func")
MALLOC = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # see benchmarks/allocator.py
PEERS = ("torch-func", "bayesian-torch", "posteriors", "pyro", "pyro-vec")


def _bench(name: str, folder: str) -> list[dict]:
    path = os.path.join(folder, f"{name}.json")
    command = [sys.executable, "-m", "bayesflow", "bench", *RUNS[name], "--threads", "1"]
    subprocess.run([*command, "--no-progress", "--json", path], check=False)
    return json.load(open(path)) if os.path.exists(path) else []


def _index(records: list[dict]) -> dict[tuple, dict]:
    return {
        (r["model"], r["method"], r["mode"], r.get("batch")): r
        for r in records
        if r["status"] == "ok"
    }


def _ratio(by: dict, a: tuple, b: tuple) -> str:
    if a not in by or b not in by:
        return "n/a"
    x, y = by[a]["median_ms"], by[b]["median_ms"]
    return f"{x / y:.2f}x ({_ms(x)} / {_ms(y)} ms)"


def _ms(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def table(records: dict[str, list[dict]]) -> str:
    cost, cnn, peers = (_index(records[k]) for k in RUNS)
    rows = ["| what | measured | goal |", "|---|---|---|"]

    def add(what: str, cell: str, goal: str) -> None:
        rows.append(f"| {what} | {cell} | {goal} |")

    goals = {("mlp", "nelbo"): "<= 1.5x", ("wide-mlp", "nelbo"): "<= 1.3x"}
    goals["wide-mlp", "nelbo-local"] = "<= 1.5x"
    for model, batch in (("mlp", 64), ("wide-mlp", 256)):
        det = (model, "deterministic", "train", batch)
        for method in ("nelbo", "nelbo-local", "nelbo-flipout"):
            add(
                f"`{method}` step (n=1) / deterministic Adam step, {model}, batch {batch}",
                _ratio(cost, (model, method, "train", batch), det),
                goals.get((model, method), ""),
            )
    add(
        "K = 1 forward `vmap_call(net, sample(q, 1), x)` / `net(x)`, mlp, batch 64",
        _ratio(cost, ("mlp", "vmap", "forward", 64), ("mlp", "deterministic", "forward", 64)),
        "<= 1.5x",
    )
    for mode in ("forward", "train"):
        for batch in (16, 64, 540, 1024):
            loop, vmap, bare = (("digits-cnn", m, mode, batch) for m in RUNS_CNN)
            add(
                f"digits CNN, K = 32, batch {batch}, {mode}: `vmap_call` / `loop_call`",
                _ratio(cnn, vmap, loop),
                "<= 0.8x" if batch == 64 else "<= 1.0x",
            )
            add("... a bare `torch.func.vmap` / `vmap_call`", _ratio(cnn, bare, vmap), ">= 1.0x")
    for mode in ("forward", "train"):
        add(f"fastest peer / bayesflow, K = 1, mlp, {mode}", _peer_cell(peers, mode), ">= 1.0x")
    return "\n".join(rows) + "\n"


def ours(peer: str, mode: str) -> str:
    r"""The bayesflow method that does the work of `peer`'s cell of `mode`: in training, the
    peer libraries' cells are the negative ELBO and its gradients (the KL included:
    `nelbo-grad`), a bare `torch.func.vmap`'s the likelihood's gradients alone (`vmap`)."""

    return "nelbo-grad" if mode == "train" and peer != "torch-func" else "vmap"


def _peer_cell(peers: dict[tuple, dict], mode: str) -> str:
    r"""The least ratio of a peer's time to that of bayesflow's method doing the same work."""

    pairs = [
        (peers[key]["median_ms"] / peers[mine]["median_ms"], key, mine)
        for key in peers
        if key[1] in PEERS and key[2] == mode
        for mine in [("mlp", ours(key[1], mode), mode, 64)]
        if mine in peers
    ]
    if not pairs:
        return "n/a"
    _, key, mine = min(pairs)
    return f"{key[1]} / {mine[1]}: {_ratio(peers, key, mine)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].rstrip(":") + ".")
    parser.add_argument("--out", help="also write the table and the runs' JSON beside it")
    opts = parser.parse_args()

    start = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.2f}"
    with tempfile.TemporaryDirectory() as folder:
        records = {name: _bench(name, folder) for name in RUNS}
    command = " ".join(
        [*(f"{k}={os.environ[k]}" for k in MALLOC if k in os.environ), "python", sys.argv[0]]
    )
    text = (
        f"`{command}`: started {start}, load {os.getloadavg()[0]:.2f} at the end; medians, "
        f"1 thread\n\n{table(records)}"
    )
    print("\n" + text)
    if opts.out:
        with open(opts.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(opts.out)[0] + ".json", "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
