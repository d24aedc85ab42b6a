r"""`loop_call` with gradients: the K samples split once per call, against one indexing per
sample (what the loop did before: each `params[k][i]` records a backward that fills a zero
gradient of the whole (K, ...) stack, a cost that grows as K squared). Same run, interleaved
rounds, one thread; the old way is put back for the measurement only.

    python benchmarks/loop_split.py
"""

from __future__ import annotations

import statistics

import torch
import torch.nn as nn
import zuko

from torch.utils.benchmark import Timer

import bayesflow as bf

from bayesflow import _engine


def _indexing(t: torch.Tensor) -> torch.Tensor:
    return t  # the loop indexes `t[i]` for every sample


def _step(net: nn.Module, q: bf.Posterior, x: torch.Tensor, k: int):
    leaves = [*q.mean.values(), *q.logvar.values()]

    def step() -> None:
        y = bf.loop_call(net, bf.sample(q, k), x)
        torch.autograd.grad(y.square().mean(), leaves)

    return step


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    wide = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    cases = {
        "MLP 5-64-64-5, batch 64": (zuko.nn.MLP(5, 5), torch.randn(64, 5), (32, 128)),
        "MLP 784-1024-1024-10, batch 256": (wide, torch.randn(256, 784), (8, 32)),
    }
    split_once = _engine._split
    print(f"torch {torch.__version__}, 1 thread, float32; median ms of loop_call + backward")
    for name, (net, x, ks) in cases.items():
        q = bf.init(net, -9.0)
        for k in ks:
            step = _step(net, q, x, k)
            times: dict[str, list[float]] = {"indexing": [], "split once": []}
            try:
                for _ in range(3):
                    for label, split in (("indexing", _indexing), ("split once", split_once)):
                        _engine._split = split
                        timer = Timer("step()", globals={"step": step})
                        times[label].append(timer.blocked_autorange(min_run_time=1.0).median)
            finally:
                _engine._split = split_once
            a, b = (statistics.median(times[label]) * 1e3 for label in times)
            print(f"{name}, K = {k}: indexing {a:.1f}, split once {b:.1f} ({a / b:.2f}x)")


if __name__ == "__main__":
    main()
