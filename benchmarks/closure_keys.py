r"""A training loop's `fn` closes over the step's batch: what that costs against passing the
batch as an argument, on one thread.

    python benchmarks/closure_keys.py              # 5 interleaved rounds
    python benchmarks/closure_keys.py --rounds 9

Two steps, each written both ways (`fn=lambda m, x: loss(m(x), y)` made anew at every step
over that step's `y`, and `fn=lambda m, x, y: loss(m(x), y)` with `y` passed):

- `vmap_call` of K = 128 samples of an MLP 5-64-64-5 at batch 64 (cross-entropy): with the
  default chunks, on the CPU, its first call of a kind counts what it allocates (a dispatch
  mode over the call); with `chunk_size="auto"`, it measures one sample in a pass of its own;
- `nelbo(estimator="local")` at n = 16 on an MLP 5-64-5 (squared error): its first call of a
  kind runs a shape-finding pass.

Each cell is the median over rounds of the mean time of a step over 50 batches, and at how
many of the 50 steps (after a first) the call measured again. The caches key what `fn`
closes over by its shapes (tensors) and values (numbers): both ways should cost the same.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import bayesflow as bf

from bayesflow import _compat, _layers
from bayesflow.cli import _positive_int

STEPS = 50


class _Counted:
    r"""Counts the calls of a method of a class while in use."""

    def __init__(self, cls: type, name: str) -> None:
        self.cls, self.name, self.count = cls, name, 0

    def __enter__(self) -> _Counted:
        self.original = getattr(self.cls, self.name)
        original = self.original

        def counted(obj, *args, **kwargs):
            self.count += 1
            return original(obj, *args, **kwargs)

        setattr(self.cls, self.name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(self.cls, self.name, self.original)


def vmap_steps(closure: bool, chunk_size: str | None = None):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)
    )
    q = bf.init(net, init_logvar=-9.0)
    batches = [(torch.randn(64, 5), torch.randint(0, 5, (64,))) for _ in range(STEPS)]

    def loss(y):
        return lambda m, x: -F.cross_entropy(m(x), y, reduction="none")

    def step(x, y):
        params = bf.sample(q, 128)
        if closure:
            return bf.vmap_call(net, params, x, fn=loss(y), chunk_size=chunk_size)
        return bf.vmap_call(
            net,
            params,
            x,
            y,
            fn=lambda m, x, y: -F.cross_entropy(m(x), y, reduction="none"),
            chunk_size=chunk_size,
        )

    return step, batches, (_compat._Allocations, "__enter__")


def local_steps(closure: bool):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 5))
    q = bf.init(net, init_logvar=-9.0)
    batches = [(torch.randn(64, 5), torch.randn(64, 5)) for _ in range(STEPS)]

    def loss(y):
        return lambda m, x: -((m(x) - y) ** 2).sum(-1)

    def step(x, y):
        if closure:
            return bf.local_nelbo(net, q, x, fn=loss(y), num_data=1000, n=16)
        return bf.local_nelbo(
            net, q, x, y, fn=lambda m, x, y: -((m(x) - y) ** 2).sum(-1), num_data=1000, n=16
        )

    return step, batches, (_layers.Recorder, "__init__")


CASES = {
    "vmap_call, K = 128": vmap_steps,
    'the same, "auto"': lambda closure: vmap_steps(closure, "auto"),
    "local nelbo, n = 16": local_steps,
}


def _run(make, closure: bool) -> tuple[float, int]:
    step, batches, (cls, name) = make(closure)
    bf.clear_caches()
    step(*batches[0])  # the first call of a kind measures, both ways
    with _Counted(cls, name) as counted:
        start = time.perf_counter()
        for x, y in batches:
            step(x, y)
        ms = (time.perf_counter() - start) / len(batches) * 1e3
    return ms, counted.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=_positive_int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, bayesflow {bf.__version__}, 1 thread, {STEPS} steps")
    print(f"\n| {'step':<20} | {'fn':<16} | {'ms per step':>11} | {'measured again':>14} |")
    print(f"|{'-' * 22}|{'-' * 18}|{'-' * 13}|{'-' * 16}|")
    for title, make in CASES.items():
        times: dict[bool, list[float]] = {True: [], False: []}
        passes: dict[bool, int] = {}
        for _ in range(args.rounds):
            for closure in (False, True):  # interleaved
                ms, count = _run(make, closure)
                times[closure].append(ms)
                passes[closure] = count
        for closure in (False, True):
            how = "closes over y" if closure else "takes y"
            ms = statistics.median(times[closure])
            print(f"| {title:<20} | {how:<16} | {ms:11.2f} | {passes[closure]:14d} |")


if __name__ == "__main__":
    main()
