r"""The two experiments of zuko's Bayesian flows tutorial, trained through the vectorized ELBO.

    python benchmarks/tutorial.py --threads 1   # full: sort BNN 4 x 1024 steps, moons NSF 8 epochs
    python benchmarks/tutorial.py --quick       # a few seconds

Each step evaluates K posterior samples (default 4) in one vectorized pass; the printed loss
is the tutorial's, "error + 1e-6 * KL", averaged over the K samples.
"""

from __future__ import annotations

import argparse
import sys
import time

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.utils.data as data
import zuko

import bayesflow as bf

from bayesflow.cli import _positive_int
from bayesflow.datasets import two_moons
from bayesflow.objectives import flipout_nelbo, local_nelbo, loop_nelbo, nelbo

OBJECTIVES = {"vmap": nelbo, "loop": loop_nelbo, "local": local_nelbo, "flipout": flipout_nelbo}

# The tutorial's "loss + 1e-6 * KL" is the negative ELBO per datum with N = 1e6.
NUM_DATA = 1e6


def sort_ll(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -(net(x) - y).square().mean(dim=-1)


def flow_ll(flow: nn.Module, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return flow(c).log_prob(x)


def _train(
    bmodel: bf.BayesianModel,
    batches: Callable[[], Iterable[tuple[torch.Tensor, ...]]],
    fn: Callable[..., torch.Tensor],
    epochs: int,
    k: int,
    method: str,
    generator: torch.Generator | None,
    log: Callable[[str], None] | None,
) -> list[torch.Tensor]:
    r"""Trains `bmodel` with Adam on the batches of each epoch; returns the step losses."""

    optimizer = torch.optim.Adam(bmodel.parameters(), lr=1e-3)
    objective = OBJECTIVES[method]

    history = []
    for epoch in range(epochs):
        losses = []
        for args in batches():
            loss = objective(
                bmodel.base, bmodel.posterior, *args,
                fn=fn, num_data=NUM_DATA, n=k, generator=generator,
            )  # fmt: skip
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())

        history.append(torch.stack(losses))
        if log is not None:
            log(f"({epoch}) {history[-1].mean().item()} ± {history[-1].std().item()}")

    return history


def sort_experiment(
    epochs: int = 4,
    steps: int = 1024,
    batch: int = 64,
    k: int = 4,
    method: str = "vmap",
    generator: torch.Generator | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[bf.BayesianModel, list[torch.Tensor]]:
    r"""Trains a Bayesian MLP to sort 5 numbers; returns it and the step losses of each epoch."""

    net = zuko.nn.MLP(5, 5, hidden_features=(64, 64), activation=nn.ELU)
    bnet = bf.BayesianModel(net, init_logvar=-9.0)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(steps):
            x = torch.randn(batch, 5)
            yield x, torch.sort(x, dim=-1).values

    return bnet, _train(bnet, batches, sort_ll, epochs, k, method, generator, log)


def moons_experiment(
    epochs: int = 8,
    points: int = 16384,
    batch: int = 64,
    k: int = 4,
    method: str = "vmap",
    generator: torch.Generator | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[bf.BayesianModel, list[torch.Tensor]]:
    r"""Trains a Bayesian NSF on two moons; returns it and the step losses of each epoch."""

    trainset = data.TensorDataset(*two_moons(points))
    trainloader = data.DataLoader(trainset, batch_size=batch, shuffle=True)

    flow = zuko.flows.NSF(features=2, context=1, transforms=3, hidden_features=(64, 64))
    bflow = bf.BayesianModel(flow, init_logvar=-9.0, include_params=["**.hyper.4"])

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, label in trainloader:
            yield label.unsqueeze(dim=-1), x

    return bflow, _train(bflow, batches, flow_ll, epochs, k, method, generator, log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (seconds)")
    parser.add_argument("--experiment", choices=["sort", "moons", "all"], default="all")
    parser.add_argument("--k", type=_positive_int, default=4, help="posterior samples per step")
    parser.add_argument("--method", choices=sorted(OBJECTIVES), default="vmap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=_positive_int, default=None)
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    print(
        f"torch {torch.__version__}, zuko {zuko.__version__}, bayesflow {bf.__version__}, "
        f"threads {torch.get_num_threads()}, K = {args.k}, method {args.method}"
    )

    if args.experiment in ("sort", "all"):
        epochs, steps = (2, 64) if args.quick else (4, 1024)
        print(f"sort BNN: {epochs} epochs x {steps} steps, batch 64")
        start = time.perf_counter()
        sort_experiment(
            epochs, steps, k=args.k, method=args.method, generator=generator, log=print
        )
        print(f"  {time.perf_counter() - start:.1f} s")

    if args.experiment in ("moons", "all"):
        epochs, points = (2, 1024) if args.quick else (8, 16384)
        print(f"two moons NSF: {epochs} epochs over {points} points, batch 64")
        start = time.perf_counter()
        moons_experiment(
            epochs, points, k=args.k, method=args.method, generator=generator, log=print
        )
        print(f"  {time.perf_counter() - start:.1f} s")

    return 0


if __name__ == "__main__":
    sys.exit(main())
