r"""The cost of a training step: Adam against bf.IVON against ivon-opt, on one thread.

    python benchmarks/ivon_cost.py                # both MLPs, K = 1 and 8
    python benchmarks/ivon_cost.py --quick        # a few seconds (fewer repeats)
    python benchmarks/ivon_cost.py --profile      # also a torch.profiler table of each step

A step is everything a training loop does per batch: the draw (IVON), the forward, the loss,
its backward and the optimizer's update. Two MLPs: the tutorial's 5-64-64-5 at batch 64
(MSE) and a 784-1024-1024-10 at batch 256 (cross-entropy), float32. ivon-opt (the reference
package, `pip install --no-deps ivon-opt==0.1.3`) loops over its K samples, each a forward
and a backward through the module with the sample written into its parameters; bf.IVON draws
the K samples at once and runs them in one bf.vmap_call pass. Medians of
torch.utils.benchmark.Timer, all in one run, in rounds (every step timed once per round);
the ratios, to the Adam step (K = 1) or to ivon-opt's loop (K = 8), are the medians of the
ratios within a round.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import zuko

from torch.utils.benchmark import Timer

import bayesflow as bf

from bayesflow.cli import _positive_int

try:
    import ivon
except ImportError:  # the comparison is optional
    ivon = None


def tutorial() -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable]:
    net = zuko.nn.MLP(5, 5, hidden_features=(64, 64), activation=nn.ELU)
    x = torch.randn(64, 5)
    return net, x, x.sort(dim=-1).values, F.mse_loss


def wide() -> tuple[nn.Module, torch.Tensor, torch.Tensor, Callable]:
    net = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    return net, torch.randn(256, 784), torch.randint(0, 10, (256,)), F.cross_entropy


CASES = {"tutorial 5-64-64-5, batch 64": tutorial, "wide 784-1024-1024-10, batch 256": wide}


def adam_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable) -> Callable:
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step() -> None:
        loss_fn(net(x), y).backward()
        opt.step()
        opt.zero_grad()

    return step


def bf_step(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, k: int
) -> Callable:
    opt = bf.IVON(net, lr=1e-3, ess=1e4)
    generator = torch.Generator().manual_seed(0)
    target = y.repeat(k) if y.dim() == 1 else y.repeat(k, 1)

    def step() -> None:
        params = opt.sample(k, generator=generator)
        out = bf.vmap_call(net, params, x)
        loss_fn(out.flatten(0, 1), target).backward()
        opt.step()

    return step


def ivon_opt_step(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, k: int
) -> Callable:
    opt = ivon.IVON(net.parameters(), lr=1e-3, ess=1e4, mc_samples=k)

    def step() -> None:
        for _ in range(k):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                loss_fn(net(x), y).backward()
        opt.step()

    return step


def measure(steps: dict[str, Callable], rounds: int, run_time: float) -> dict[str, list]:
    r"""Times every step in turn, `rounds` times over: on a busy machine, each round's
    ratios compare steps measured within seconds of each other."""

    for step in steps.values():
        for _ in range(3):
            step()
    times: dict[str, list] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            timer = Timer("step()", globals={"step": step}, num_threads=1)
            times[name].append(timer.blocked_autorange(min_run_time=run_time).median * 1e3)
    return times


def profile(name: str, step: Callable) -> None:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            step()
    print(f"\n--- {name}: torch.profiler, 10 steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--profile", action="store_true", help="profile every step")
    parser.add_argument(
        "--rounds", type=_positive_int, default=5, help="rounds of timings (default 5)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    version = ivon.__name__ + " 0.1.3" if ivon is not None else "ivon-opt not installed"
    print(f"torch {torch.__version__}, {version}, 1 thread, float32, median ms per step")

    for case, build in CASES.items():
        print(f"\n{case}")
        net, x, y, loss_fn = build()

        def fresh(net: nn.Module = net) -> nn.Module:
            return copy.deepcopy(net)

        steps = {"Adam": adam_step(fresh(), x, y, loss_fn)}
        for k in (1, 8):
            steps[f"bf.IVON K={k} (one pass)"] = bf_step(fresh(), x, y, loss_fn, k)
            if ivon is not None:
                steps[f"ivon-opt K={k} (loop)"] = ivon_opt_step(fresh(), x, y, loss_fn, k)

        times = measure(steps, args.rounds, 0.2 if args.quick else 1.0)
        if args.profile:
            for name, step in steps.items():
                profile(f"{case}, {name}", step)

        for name, t in times.items():
            base = "ivon-opt K=8 (loop)" if "K=8" in name and ivon is not None else "Adam"
            ratio = ""
            if name != base:
                r = statistics.median(a / b for a, b in zip(t, times[base], strict=True))
                ratio = f"{r:6.2f}x {base}"
            print(f"  {name:<26} {statistics.median(t):9.3f} ms  {ratio}")

    return 0


if __name__ == "__main__":
    sys.exit(main())
