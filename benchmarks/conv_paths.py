r"""The two vectorized paths of a convolution with sampled weights, side by side.

Under `vmap_call`, a convolution whose weight is batched runs either as one grouped
convolution of all K samples (torch's batching rule) or as one dense convolution per sample
below vmap (bayesflow's stand-in). This times both, and the loop, for a range of batch
sizes and layer shapes, on one thread, and prints the output elements per sample at which
the per-sample path starts to win: `bayesflow._torch_layers.CONV_LOOP_ELEMENTS`.

    python benchmarks/conv_paths.py [--k 32] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from torch.utils.benchmark import Timer

import bayesflow as bf

from bayesflow import _torch_layers
from bayesflow.cli import _positive_int

SHAPES = [(1, 8, 8), (8, 16, 4), (16, 32, 8), (3, 16, 16)]  # in channels, out channels, size
BATCHES = [8, 16, 32, 64, 128, 256, 540, 1024]


def median_ms(f: object, threads: int) -> float:
    f()
    timer = Timer("f()", globals={"f": f}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=0.4).median * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=_positive_int, default=32)
    parser.add_argument("--threads", type=_positive_int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threshold = _torch_layers.CONV_LOOP_ELEMENTS

    print(f"K = {args.k}, {args.threads} thread(s), torch {torch.__version__}")
    print("in out size batch | elements/sample | grouped ms | per-sample ms | loop ms | best")
    for c_in, c_out, size in SHAPES:
        conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        params = bf.sample(bf.init(conv, -6.0), args.k)
        for batch in BATCHES:
            x = torch.randn(batch, c_in, size, size)
            times = {}

            def vectorized(conv=conv, params=params, x=x) -> object:
                return bf.vmap_call(conv, params, x)

            def loop(conv=conv, params=params, x=x) -> object:
                return bf.loop_call(conv, params, x)

            with torch.no_grad():
                for name, elements in (("grouped", 2**62), ("per-sample", 0)):
                    _torch_layers.CONV_LOOP_ELEMENTS = elements
                    times[name] = median_ms(vectorized, args.threads)
                _torch_layers.CONV_LOOP_ELEMENTS = threshold
                times["loop"] = median_ms(loop, args.threads)
            best = min(times, key=times.get)
            elements = batch * c_out * size * size
            print(
                f"{c_in:2d} {c_out:3d} {size:4d} {batch:5d} | {elements:15d} | "
                f"{times['grouped']:10.2f} | {times['per-sample']:13.2f} | "
                f"{times['loop']:7.2f} | {best}",
                flush=True,
            )


if __name__ == "__main__":
    main()
