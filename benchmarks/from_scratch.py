r"""Training curves of the digits CNN from scratch: the deterministic net, the ELBO three ways,
and IVON; for docs/from-scratch.md.

    python benchmarks/from_scratch.py                       # 60 epochs, about two minutes
    python benchmarks/from_scratch.py --epochs 4 --no-plot  # a few seconds

The data, the CNN and the deterministic net are those of notebook 05 (benchmarks/ivon_quality.py
holds them): 885 training images of the digits 0-6, 5863 parameters. Every epoch, each method
prints and records its training loss, split into the expected negative log-likelihood per datum
(the data term, averaged over the epoch's steps) and the KL term per datum, and the NLL of its
predictive (the average of 16 posterior samples) on the 379 test images. Writes
benchmarks/results/from-scratch.png (the curves) and prints a table of the final numbers.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

import bayesflow as bf

from bayesflow.cli import _positive_int

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivon_quality import (
    categorical_ll,
    classification_metrics,
    digits,
    make_cnn,
    posterior_logits,
    train_ivon,
)

PNG = Path(__file__).resolve().parent / "results" / "from-scratch.png"


def init_logvar_rule(net: nn.Module, n: int, noise: float = 0.1) -> dict[str, float]:
    r"""The initial log-variance of every parameter: :math:`\sigma_0^2 = 1 / (N + 3 d / \rho)`
    with :math:`d` its layer's fan-in and :math:`\rho` the noise-to-signal variance ratio
    of the layer's outputs at initialization (torch's default init has weight variance
    :math:`1 / (3 d)`)."""

    out = {}
    for name, module in net.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() > 1:
            d = weight[0].numel()
            for pname, _ in module.named_parameters(recurse=False):
                out[f"{name}.{pname}"] = -math.log(n + 3 * d / noise)
    return out


class Curves:
    r"""The per-epoch record of one method."""

    def __init__(self) -> None:
        self.data: list[float] = []
        self.kl: list[float] = []
        self.test_nll: list[float] = []
        self.seconds = 0.0


def evaluate(curves: Curves, logits: torch.Tensor, y: torch.Tensor) -> None:
    curves.test_nll.append(classification_metrics(logits, y)["NLL"])


def run_deterministic(d: dict, epochs: int, seed: int = 0) -> tuple[Curves, torch.Tensor]:
    torch.manual_seed(seed)
    net = make_cnn()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    curves = Curves()
    for _ in range(epochs):
        start, losses = time.thread_time(), []
        net.train()
        for i in torch.randperm(len(d["y_train"])).split(64):
            loss = -categorical_ll(net, d["x_train"][i], d["y_train"][i]).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        curves.seconds += time.thread_time() - start
        curves.data.append(statistics.mean(losses))
        curves.kl.append(0.0)
        with torch.no_grad():
            evaluate(curves, net.eval()(d["x_test"]).unsqueeze(0), d["y_test"])
    return curves, net(d["x_test"]).detach().unsqueeze(0)


def run_elbo(
    d: dict,
    epochs: int,
    init_logvar: float | dict,
    kl_weight: float = 1.0,
    seed: int = 0,
) -> tuple[Curves, torch.Tensor]:
    r"""Notebook 05's BNN from scratch: bf.nelbo with the local reparameterization trick,
    K = 4, prior N(0, 1), Adam (3e-3 for the means, 3e-2 for the log-variances), the KL
    weight warmed up linearly to `kl_weight` over the first quarter of the steps."""

    torch.manual_seed(seed)
    net = make_cnn().eval()
    n = len(d["y_train"])
    q = bf.init(net, init_logvar=init_logvar)
    optimizer = torch.optim.Adam(
        [{"params": [*q.mean.values()], "lr": 3e-3}, {"params": [*q.logvar.values()], "lr": 3e-2}]
    )
    warmup = bf.LinearWarmup(max(1, epochs * math.ceil(n / 64) // 4), weight=kl_weight)
    generator = torch.Generator().manual_seed(seed + 1)
    curves, step = Curves(), 0
    for _ in range(epochs):
        start, data, kls = time.thread_time(), [], []
        for i in torch.randperm(n).split(64):
            beta = warmup(step)
            loss = bf.nelbo(
                net, q, d["x_train"][i], d["y_train"][i],
                fn=categorical_ll, num_data=n, n=4, kl_weight=beta,
                generator=generator, estimator="local",
            )  # fmt: skip
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                kl = bf.kl_divergence(q).item() / n
            data.append(loss.item() - beta * kl)
            kls.append(beta * kl)
            step += 1
        curves.seconds += time.thread_time() - start
        curves.data.append(statistics.mean(data))
        curves.kl.append(statistics.mean(kls))
        evaluate(curves, posterior_logits(net, q, d["x_test"], k=16), d["y_test"])
    return curves, posterior_logits(net, q, d["x_test"])


def run_ivon(d: dict, epochs: int, seed: int = 0, **hyper: float) -> tuple[Curves, torch.Tensor]:
    r"""bf.IVON with `ess` = N (or a multiple), one sample per step, a cosine learning rate.
    Its KL term is that of the ELBO it fits: the prior N(0, 1 / (ess weight_decay))."""

    torch.manual_seed(seed)
    net = make_cnn().eval()
    n = len(d["y_train"])
    steps = math.ceil(n / 64)
    curves = Curves()
    mark = [time.thread_time()]

    def record(epoch: int, opt: bf.IVON, losses: list[float]) -> None:
        curves.seconds += time.thread_time() - mark[0]
        group = opt.param_groups[0]
        prior_var = 1 / (group["ess"] * group["weight_decay"])
        kl = bf.kl_divergence(opt.posterior, prior_var=prior_var).item()
        curves.data.append(statistics.mean(losses[-steps:]))
        curves.kl.append(kl / group["ess"])
        evaluate(curves, posterior_logits(net, opt.posterior, d["x_test"], k=16), d["y_test"])
        mark[0] = time.thread_time()

    hyper = dict(hyper)
    ess = hyper.pop("ess_factor", 1.0) * n
    opt, _ = train_ivon(
        net, categorical_ll, d["x_train"], d["y_train"], epochs,
        seed=seed, ess=ess, callback=record, **hyper,
    )  # fmt: skip
    return curves, posterior_logits(net, opt.posterior, d["x_test"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=_positive_int, default=60)
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    d = digits()
    n = len(d["y_train"])
    print(f"torch {torch.__version__}, 1 thread; {n} training images, {args.epochs} epochs")
    rule = init_logvar_rule(make_cnn(), n)
    print("init_logvar from N and fan-in:", {k: round(v, 2) for k, v in rule.items()})

    runs: dict[str, Callable[[], tuple[Curves, torch.Tensor]]] = {
        "deterministic (Adam)": lambda: run_deterministic(d, args.epochs),
        "ELBO, init_logvar=-9": lambda: run_elbo(d, args.epochs, -9.0),
        "ELBO, init_logvar from N, fan-in": lambda: run_elbo(d, args.epochs, rule),
        "ELBO, tempered (KL weight 0.1)": lambda: run_elbo(d, args.epochs, rule, kl_weight=0.1),
        "IVON (ess = N)": lambda: run_ivon(
            d, args.epochs, lr=2.0, hess_init=1.0, clip_radius=0.003
        ),
    }
    results = {}
    for name, run in runs.items():
        curves, logits = run()
        results[name] = (curves, classification_metrics(logits, d["y_test"]))
        print(
            f"{name:>34}: {curves.seconds:5.1f} s; last epoch: data term {curves.data[-1]:.4f}, "
            f"KL term {curves.kl[-1]:.4f}, test NLL {curves.test_nll[-1]:.4f}"
        )

    print(f"\n{'test (379 images)':>34} | accuracy |    NLL |    ECE")
    for name, (_, m) in results.items():
        print(f"{name:>34} | {m['accuracy']:8.4f} | {m['NLL']:.4f} | {m['ECE']:.4f}")

    if not args.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        epochs = range(1, args.epochs + 1)
        for name, (curves, _) in results.items():
            total = [a + b for a, b in zip(curves.data, curves.kl, strict=True)]
            axes[0].plot(epochs, total, label=name)
            axes[1].plot(epochs, curves.data, label=name)
            axes[2].plot(epochs, curves.test_nll, label=name)
        titles = (
            "training loss per datum (data + KL term)",
            "data term (expected NLL)",
            "test NLL",
        )
        for ax, title in zip(axes, titles, strict=True):
            ax.set_yscale("log")
            ax.set_xlabel("epoch")
            ax.set_title(title, fontsize=9)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        PNG.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(PNG, dpi=100)
        print(f"wrote {PNG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
