r"""The CPU memory allocator and the cost of a large model's step or of a vectorized call.

    python benchmarks/allocator.py             # 1 thread, 3 rounds
    python benchmarks/allocator.py --rounds 5

On Linux, torch's CPU tensors come from glibc's `malloc`, which serves a block larger than
its mmap threshold (128 KiB at first, rising up to 32 MiB as blocks are freed) with a fresh
`mmap` and returns it to the system when freed. Every such tensor is then paid for again at
its first write, page by page (a minor page fault per 4 KiB: the kernel zeroes it). A step
of the 784-1024-1024-10 MLP at batch 256 allocates and frees several buffers of 3-15 MB:
the gradients, Adam's temporaries, and for a Bayesian step the flat means and log-variances,
the noise and the sample. A vectorized call pays the same at smaller sizes: 32 samples of
the digits CNN at batch 64 run through buffers of 2-4 MB, where the loop's stay below the
threshold.

This script runs each step in a fresh process, with glibc's defaults and with
`MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=100000000000` (every block below
1 GB from the heap, and the heap kept), and reports the median time of a step and its minor
page faults (`getrusage`). Rounds interleave the two settings, so that the machine's load
falls on both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

TUNED = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
STEPS = ("deterministic", "nelbo", "nelbo-local")
CALLS = ("cnn-loop", "cnn-vmap")

CHILD = r"""
import json, resource, statistics, sys, time
import torch, torch.nn as nn, torch.nn.functional as F
import bayesflow as bf

torch.set_num_threads(1)
torch.manual_seed(0)
which = sys.argv[1]
cnn = nn.Sequential(
    nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 7),
)
images = torch.randn(64, 1, 8, 8)
net = nn.Sequential(
    nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
)
x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
ll = lambda m, x, y: -F.cross_entropy(m(x), y, reduction="none")
if which.startswith("cnn-"):
    q = bf.init(cnn, init_logvar=-9.0)
    call = bf.loop_call if which == "cnn-loop" else bf.vmap_call

    def step():  # digits CNN, 32 samples, batch 64, forward without autograd
        with torch.no_grad():
            call(cnn, bf.sample(q, 32), images)
elif which == "deterministic":
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def loss():
        return -ll(net, x, y).mean()
else:
    q = bf.init(net, init_logvar=-9.0)
    opt = torch.optim.Adam([*q.mean.values(), *q.logvar.values()], lr=1e-4)
    estimator = "local" if which == "nelbo-local" else "weights"

    def loss():
        return bf.nelbo(net, q, x, y, fn=ll, n=1, num_data=60000.0, estimator=estimator)

if not which.startswith("cnn-"):

    def step():
        opt.zero_grad()
        loss().backward()
        opt.step()

for _ in range(5):
    step()
times, faults = [], []
for _ in range(int(sys.argv[2])):
    f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
print(json.dumps({"ms": 1e3 * statistics.median(times), "faults": statistics.median(faults)}))
"""


def run(which: str, tuned: bool, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TUNED}
    if tuned:
        env.update(TUNED)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, which, str(steps)],
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"allocator.py: the {which} step failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    a = parser.parse_args()
    if a.rounds < 1 or a.steps < 1:
        parser.error(f"expected positive --rounds and --steps, got {a.rounds} and {a.steps}")
    if sys.platform != "linux":
        raise SystemExit("allocator.py: the glibc settings it compares exist on Linux only")

    found: dict[tuple[str, bool], list[dict]] = {}
    for r in range(a.rounds):
        for tuned in (False, True) if r % 2 == 0 else (True, False):
            for which in STEPS + CALLS:
                found.setdefault((which, tuned), []).append(run(which, tuned, a.steps))

    def med(which: str, tuned: bool, key: str) -> float:
        return statistics.median(d[key] for d in found[which, tuned])

    def table(title: str, names: tuple[str, ...], what: str) -> None:
        print(f"{title}, 1 thread, {a.rounds} rounds of {a.steps} {what}s")
        head = (what, "glibc defaults (ms)", f"faults/{what}", "tuned (ms)", f"faults/{what}")
        print("| " + " | ".join((*head, "tuned / defaults")) + " |")
        print("|---|---:|---:|---:|---:|---:|")
        for which in names:
            d, t = med(which, False, "ms"), med(which, True, "ms")
            print(
                f"| {which} | {d:.1f} | {med(which, False, 'faults'):.0f} | {t:.1f} | "
                f"{med(which, True, 'faults'):.0f} | {t / d:.2f} |"
            )

    table("wide MLP 784-1024-1024-10, batch 256", STEPS, "step")
    for tuned, label in ((False, "glibc defaults"), (True, "tuned")):
        det = med("deterministic", tuned, "ms")
        ratios = ", ".join(f"{w} {med(w, tuned, 'ms') / det:.2f}x" for w in STEPS[1:])
        print(f"{label}: {ratios} the deterministic step")
    print()
    table("digits CNN, 32 samples, batch 64, forward", CALLS, "call")
    for tuned, label in ((False, "glibc defaults"), (True, "tuned")):
        loop = med("cnn-loop", tuned, "ms")
        ratios = ", ".join(f"{w} {med(w, tuned, 'ms') / loop:.2f}x" for w in CALLS[1:])
        print(f"{label}: {ratios} the loop")


if __name__ == "__main__":
    main()
