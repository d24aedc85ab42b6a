r"""The digits CNN of notebook 05 under vmap_call: the loop, a bare torch.func vmap, and
vmap_call by default and at fixed chunk sizes, over a range of batch sizes, on one thread.

    python benchmarks/cnn_chunks.py [K] [BATCH ...]     (default: K = 32, batches 16 to 1024)

The default (`chunk_size=None`) runs as many samples at once as fit the CPU's last-level
cache, or one by one where one sample overflows a core's level-2 cache: the column to
compare with the loop and with the fixed chunks. Ratios are to the loop.
"""

from __future__ import annotations

import sys

from collections import OrderedDict

import torch
import torch.nn as nn

from torch.func import functional_call, vmap
from torch.utils.benchmark import Timer

import bayesflow as bf

from bayesflow._compat import allocated_bytes

CHUNKS = (None, 16, 8, 4, 2)


def make_cnn() -> nn.Module:
    layers = OrderedDict(
        conv1=nn.Conv2d(1, 8, 3, padding=1),
        act1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(8, 16, 3, padding=1),
        act2=nn.ReLU(),
        pool2=nn.MaxPool2d(2),
        flat=nn.Flatten(),
        fc=nn.Linear(64, 64),
        act3=nn.ReLU(),
        out=nn.Linear(64, 7),
    )
    return nn.Sequential(layers).eval()


def median_ms(f: object) -> float:
    f()
    return (
        Timer("f()", globals={"f": f}, num_threads=1).blocked_autorange(min_run_time=0.6).median
        * 1e3
    )


def main() -> None:
    torch.set_num_threads(1)
    k = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    batches = [int(b) for b in sys.argv[2:]] or [16, 64, 256, 540, 1024]
    torch.manual_seed(0)
    net = make_cnn()
    params = bf.sample(bf.init(net, -6.0), k)
    print(f"K = {k}, 1 thread, torch {torch.__version__}; ms, and ratio to the loop")
    print("batch | MB/sample | loop | bare vmap | " + " | ".join(f"chunk {c}" for c in CHUNKS))
    for batch in batches:
        x = torch.randn(batch, 1, 8, 8)
        with torch.no_grad():
            per_sample = allocated_bytes(lambda x=x: net(x)) / 2**20
            loop = median_ms(lambda x=x: bf.loop_call(net, params, x))
            bare = median_ms(
                lambda x=x: vmap(lambda p, x: functional_call(net, p, (x,)), in_dims=(0, None))(
                    params, x
                )
            )
            chunks = [
                median_ms(lambda c=c, x=x: bf.vmap_call(net, params, x, chunk_size=c))
                for c in CHUNKS
            ]
        cells = " | ".join(f"{t:7.1f} ({t / loop:.2f})" for t in chunks)
        print(
            f"{batch:5d} | {per_sample:9.2f} | {loop:6.1f} | {bare:6.1f} ({bare / loop:.2f}) | "
            + cells,
            flush=True,
        )


if __name__ == "__main__":
    main()
