r"""`vmap_call` against a bare `torch.func.vmap(functional_call)` on the same samples, all at
once (no chunks), on one thread: what bayesflow's call adds per call.

    python benchmarks/vmap_overhead.py              # 9 interleaved rounds
    python benchmarks/vmap_overhead.py --rounds 15

Cases: the tutorial MLP 5-64-64-5 at batch 64 (K = 8 and 32) and the digits CNN of notebook
05 at K = 32 (batches 1, 16 and 64), forward without autograd and forward plus backward to
the samples. Each cell is the median over rounds of `Timer.blocked_autorange` medians;
rounds alternate the two methods so that the machine's load falls on both alike.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn
import zuko

from torch.func import functional_call
from torch.utils.benchmark import Timer

import bayesflow as bf

from bayesflow.cli import _positive_int


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 7),
    )  # fmt: skip


CASES = [
    ("tutorial MLP, batch 64", zuko.nn.MLP, (5, 5), (64, 5), 8),
    ("tutorial MLP, batch 64", zuko.nn.MLP, (5, 5), (64, 5), 32),
    ("digits CNN, batch 1", digits_cnn, (), (1, 1, 8, 8), 32),
    ("digits CNN, batch 16", digits_cnn, (), (16, 1, 8, 8), 32),
    ("digits CNN, batch 64", digits_cnn, (), (64, 1, 8, 8), 32),
]


def _ms(f: object) -> float:
    return Timer("f()", globals={"f": f}).blocked_autorange(min_run_time=0.2).median * 1e3


def compare(title: str, net: nn.Module, x: torch.Tensor, k: int, rounds: int) -> None:
    q = bf.init(net, init_logvar=-9.0)
    params = bf.sample(q, k)
    leaves = list(params.values())
    base = copy.deepcopy(net).to("meta")
    bare = torch.vmap(lambda p, x: functional_call(base, p, (x,)), in_dims=(0, None))

    with torch.no_grad():
        ours_out = bf.vmap_call(net, params, x, chunk_size=k)
        torch.testing.assert_close(ours_out, bare(params, x))
        assert not torch.allclose(ours_out[0], ours_out[1])  # the samples differ

    forward = {
        "ours": lambda: bf.vmap_call(net, params, x, chunk_size=k),
        "bare": lambda: bare(params, x),
    }

    def backward(f: object) -> None:
        torch.autograd.grad(f().square().sum(), leaves)

    modes = {
        "forward, no grad": {n: torch.no_grad()(f) for n, f in forward.items()},
        "forward + backward": {n: (lambda f=f: backward(f)) for n, f in forward.items()},
    }
    for mode, fs in modes.items():
        times: dict[str, list[float]] = {n: [] for n in fs}
        for r in range(rounds):
            for n in fs if r % 2 == 0 else reversed(list(fs)):
                times[n].append(_ms(fs[n]))
        ours, theirs = (sorted(times[n])[len(times[n]) // 2] for n in ("ours", "bare"))
        print(f"| {title} | {k} | {mode} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=_positive_int, default=9)
    a = parser.parse_args()
    torch.set_num_threads(1)

    print(f"torch {torch.__version__}, 1 thread, {a.rounds} interleaved rounds, median ms")
    print("| case | K | mode | `vmap_call` | bare `vmap` | `vmap_call` / bare |")
    print("|---|---:|---|---:|---:|---:|")
    for title, make, make_args, shape, k in CASES:
        torch.manual_seed(0)
        compare(title, make(*make_args), torch.randn(shape), k, a.rounds)


if __name__ == "__main__":
    main()
