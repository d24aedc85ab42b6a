r"""The cost of fitting a diagonal Laplace approximation, bayesflow against laplace-torch 0.3,
in epochs of the training that precedes it.

    python benchmarks/posteriors_fit.py --threads 1
    python benchmarks/posteriors_fit.py --threads 1 --repeat 10 --subsets last_layer --no-peer

On the digits MLP and CNN of benchmarks/posteriors.py (trained 40 epochs, float32), the
training split in minibatches of 64: the diagonal GGN and empirical Fisher, all weights and
the last layer; and one epoch of the nets' Adam training. Median seconds of a few runs,
measured in one process with torch.utils.benchmark.Timer. laplace-torch runs with its
default backend (curvlinops) except for the last-layer empirical Fisher, where that
backend returns a zero curvature in 0.3 and ASDL is used. The last layer takes the closed
form of `laplace_fit`; the lines "(per-ex.)" time the per-example path on it, for reference.
`--repeat 10` tiles the training set ten times (the nets are trained on it once), to see the
per-batch cost apart from the fit's fixed one.
"""

from __future__ import annotations

import argparse
import copy
import warnings

from unittest import mock

import torch

from posteriors import MODELS, digits, log_likelihood, logits, train_deterministic, train_epochs
from torch.utils import benchmark

import bayesflow as bf

from bayesflow.cli import _positive_float, _positive_int

SUBSETS = {"all": ("",), "last_layer": ("out",)}


def ours(net: torch.nn.Module, loader: list, hessian: str, subset: str) -> None:
    bf.laplace_fit(
        net, log_likelihood, loader, hessian=hessian, output=logits,
        likelihood="classification", include=SUBSETS[subset],
    )  # fmt: skip


def per_example(net: torch.nn.Module, loader: list, hessian: str, subset: str) -> None:
    r"""The last layer by the per-example path, the closed form switched off."""

    with mock.patch("bayesflow._curvature.last_layer", return_value=None):
        ours(net, loader, hessian, subset)


def theirs(net: torch.nn.Module, loader: object, hessian: str, subset: str) -> None:
    from laplace import Laplace
    from laplace.curvature import AsdlEF, CurvlinopsEF, CurvlinopsGGN

    if hessian == "ggn":
        backend = CurvlinopsGGN
    else:
        backend = AsdlEF if subset == "last_layer" else CurvlinopsEF
    la = Laplace(net, "classification", subset_of_weights=subset, hessian_structure="diag",
                 backend=backend)  # fmt: skip
    la.fit(loader)


def median(stmt: object, min_run_time: float) -> float:
    stmt()  # warm-up
    timer = benchmark.Timer("stmt()", globals={"stmt": stmt}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=_positive_int, default=1)
    parser.add_argument("--min-run-time", type=_positive_float, default=2.0)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["mlp", "cnn"])
    parser.add_argument("--subsets", nargs="+", choices=sorted(SUBSETS), default=list(SUBSETS))
    parser.add_argument(
        "--repeat", type=_positive_int, default=1, help="the training set tiled N times"
    )
    parser.add_argument("--no-peer", action="store_true", help="skip laplace-torch")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    try:
        import laplace  # noqa: F401

        have_peer = not args.no_peer
    except ImportError:
        have_peer = False

    split = digits()
    net_x, net_y = split["x_fit"], split["y_fit"]
    x, y = net_x.repeat(args.repeat, 1, 1, 1), net_y.repeat(args.repeat)
    batches = list(zip(x.split(64), y.split(64), strict=True))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    print(f"digits 0-6, {len(y)} training images in batches of 64, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")  # fmt: skip
    print(f"{'model':>5} | {'hessian':>7} | {'subset':>10} | {'bayesflow s':>11} | "
          f"{'laplace-torch s':>15} | {'ratio':>5} | {'epochs':>6}")  # fmt: skip
    for model in args.models:
        net = train_deterministic(MODELS[model], net_x, net_y, epochs=40)
        trainee = copy.deepcopy(net)
        optimizer = torch.optim.Adam(trainee.parameters(), lr=3e-3, weight_decay=1e-4)
        generator = torch.Generator().manual_seed(0)
        epoch = median(
            lambda t=trainee, o=optimizer, g=generator: train_epochs(t, o, x, y, 1, g),
            args.min_run_time,
        )
        print(f"{model:>5} | one Adam epoch: {epoch:.4f} s")
        for hessian in ("ggn", "ef"):
            for subset in args.subsets:
                a = median(
                    lambda n=net, h=hessian, s=subset: ours(n, batches, h, s), args.min_run_time
                )
                if have_peer:
                    b = median(
                        lambda n=net, h=hessian, s=subset: theirs(copy.deepcopy(n), loader, h, s),
                        args.min_run_time,
                    )
                    peer, ratio = f"{b:15.4f}", f"{b / a:5.2f}"
                else:
                    peer, ratio = f"{'not run':>15}", f"{'-':>5}"
                print(f"{model:>5} | {hessian:>7} | {subset:>10} | {a:11.4f} | {peer} | "
                      f"{ratio} | {a / epoch:6.2f}")  # fmt: skip
                if subset == "last_layer":
                    c = median(
                        lambda n=net, h=hessian, s=subset: per_example(n, batches, h, s),
                        args.min_run_time,
                    )
                    print(f"{model:>5} | {hessian:>7} | {'(per-ex.)':>10} | {c:11.4f} | "
                          f"{'':>15} | {'':>5} | {c / epoch:6.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
