r"""The cost of training a deep ensemble: K members in one vectorized pass against one after
another, on one thread.

    python benchmarks/ensemble_cost.py              # K = 5, both nets, 5 rounds
    python benchmarks/ensemble_cost.py --quick      # a few seconds (fewer repeats)

A training step is everything a loop does per batch, for all K members: the forward, the loss,
its backward and Adam's update. One after another: K modules, each with its own Adam, stepped
in turn (what a user writes first). In one pass: `bf.ensemble` stacks the K members' parameters,
one `bf.vmap_call` runs all of them, and one Adam steps the stacked parameters (its update is
element-wise: K independent Adams, see docs/predictive.md). Every member gets a batch of its
own (`in_dims=(0, 0)`), as when trained apart. Two nets, float32:

- the digits CNN of notebooks 05 and 07 (5863 parameters, dropout in training mode, so the
  one-pass call draws its masks with `randomness="different"`), minibatches of 64 images;
- the diabetes MLP of notebooks 06 and 07 (10-50-2, a heteroscedastic Gaussian likelihood),
  full batch, the 266 patients of a split's fit part.

Medians of torch.utils.benchmark.Timer, all in one run, in rounds (both steps timed once per
round); the speed-up is the median over rounds of the ratio within a round, with the
range of those ratios. The Timer reads the CPU time of the process by default (`--clock
cpu`), which other work on a busy machine inflates far less than the wall clock (`--clock
wall`); with one thread, the two agree on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.utils.benchmark import Timer

import bayesflow as bf

from bayesflow.cli import _positive_int


def make_cnn() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 8, 3, padding=1),
            act1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(8, 16, 3, padding=1),
            act2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            flat=nn.Flatten(),
            drop1=nn.Dropout(0.25),
            fc=nn.Linear(64, 64),
            act3=nn.ReLU(),
            drop2=nn.Dropout(0.25),
            out=nn.Linear(64, 7),
        )
    )


def categorical_ll(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(net(x), y, reduction="none")


def make_mlp() -> nn.Module:
    return nn.Sequential(
        OrderedDict(hidden=nn.Linear(10, 50), act=nn.ReLU(), out=nn.Linear(50, 2))
    )


def gaussian_ll(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = net(x)
    scale = F.softplus(out[..., 1]) + 1e-3
    return torch.distributions.Normal(out[..., 0], scale).log_prob(y)


def cnn_batches(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(k, 64, 1, 8, 8), torch.randint(0, 7, (k, 64))


def mlp_batches(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(k, 266, 10), torch.randn(k, 266)


CASES = {
    "digits CNN, batch 64": (make_cnn, categorical_ll, cnn_batches),
    "diabetes MLP 10-50-2, full batch (266)": (make_mlp, gaussian_ll, mlp_batches),
}


def one_after_another(
    members: list[nn.Module], fn: Callable, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in members]

    def step() -> None:
        for j, (member, optimizer) in enumerate(zip(members, optimizers, strict=True)):
            loss = -fn(member, x[j], y[j]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return step


def one_pass(ens: bf.Ensemble, fn: Callable, x: torch.Tensor, y: torch.Tensor) -> Callable:
    optimizer = torch.optim.Adam(ens.params.values(), lr=1e-3)

    def step() -> None:
        ll = bf.vmap_call(
            ens.module, ens.params, x, y, fn=fn, in_dims=(0, 0), randomness="different"
        )
        loss = -ll.mean(1).sum()  # the sum of the members' mean losses
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def measure(
    steps: dict[str, Callable], rounds: int, run_time: float, clock: Callable[[], float]
) -> dict[str, list]:
    r"""Times every step in turn, `rounds` times over: on a busy machine, each round's
    ratio compares steps measured within seconds of each other."""

    for step in steps.values():
        for _ in range(3):
            step()
    times: dict[str, list] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            timer = Timer("step()", globals={"step": step}, num_threads=1, timer=clock)
            times[name].append(timer.blocked_autorange(min_run_time=run_time).median * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=_positive_int, default=5, help="members (default 5)")
    parser.add_argument(
        "--rounds", type=_positive_int, default=5, help="rounds of timings (default 5)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu", help="what the Timer reads (cpu)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rounds = 2 if args.quick else args.rounds
    print(
        f"torch {torch.__version__}, bayesflow {bf.__version__}, 1 thread, float32, "
        f"K = {args.k} members, median ms ({args.clock} time) per training step of all members"
    )
    for case, (make, fn, batches) in CASES.items():
        ens = bf.ensemble(make, args.k, generator=torch.Generator().manual_seed(0))
        members = []
        for seed in ens.seeds:
            torch.manual_seed(seed)
            members.append(make().train())
        ens.module.train()
        x, y = batches(args.k)
        steps = {
            "one after another": one_after_another(members, fn, x, y),
            "one pass (bf.ensemble)": one_pass(ens, fn, x, y),
        }
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        times = measure(steps, rounds, 0.2 if args.quick else 1.0, clock)
        loop, vec = times["one after another"], times["one pass (bf.ensemble)"]
        ratios = [a / b for a, b in zip(loop, vec, strict=True)]
        print(f"\n{case}")
        for name, t in times.items():
            print(f"  {name:<24} {statistics.median(t):8.3f} ms")
        print(
            f"  one pass is {statistics.median(ratios):.2f}x faster (median of {rounds} rounds' "
            f"ratios; {min(ratios):.2f}x to {max(ratios):.2f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
