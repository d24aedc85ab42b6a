r"""Posteriors after training on digits 0-6 (7-9 out of distribution): a deterministic net,
Laplace (all weights, last layer) and SWAG-diagonal, scored on held-out data.

    python benchmarks/posteriors.py --model cnn --threads 1     # the quality table
    python benchmarks/posteriors.py --model mlp --quick         # a few seconds

The pieces (data split, models, training, fitting, scores) are functions that other scripts
and notebooks import. The split: scikit-learn's digits, 0-6 known, 30% of them the test set
(the split of notebook 05, from seed 0), and 20% of the rest the validation set (seed 1)
on which SWAG's learning rate and scale are chosen; the nets train on what is left. The
Laplace prior precision is chosen by the evidence on the training data. Nothing is tuned
on the test set.
"""

from __future__ import annotations

import argparse
import copy
import time

from collections import OrderedDict
from collections.abc import Iterator

import torch
import torch.nn as nn

import bayesflow as bf

BINS = 10


def digits(val_fraction: float = 0.2) -> dict[str, torch.Tensor]:
    r"""Returns the split: `x_fit, y_fit` (training), `x_val, y_val`, `x_test, y_test`
    (digits 0-6) and `x_ood` (7-9), images of shape `(n, 1, 8, 8)` in [0, 1], float32."""

    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(data.target)
    known = labels < 7
    x_known, y_known = images[known], labels[known]

    i = torch.randperm(len(y_known), generator=torch.Generator().manual_seed(0))
    n_test = 3 * len(y_known) // 10
    x_train, y_train = x_known[i[n_test:]], y_known[i[n_test:]]
    j = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(1))
    n_val = int(val_fraction * len(y_train))
    return {
        "x_fit": x_train[j[n_val:]],
        "y_fit": y_train[j[n_val:]],
        "x_val": x_train[j[:n_val]],
        "y_val": y_train[j[:n_val]],
        "x_test": x_known[i[:n_test]],
        "y_test": y_known[i[:n_test]],
        "x_ood": images[~known],
    }


def make_cnn() -> nn.Sequential:
    r"""The CNN of notebook 05 (5863 parameters; the last layer is `out`)."""

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


def make_mlp() -> nn.Sequential:
    r"""An MLP on the 64 pixels, 64-128-128-7 (25479 parameters; the last layer is `out`)."""

    return nn.Sequential(
        OrderedDict(
            flat=nn.Flatten(),
            fc1=nn.Linear(64, 128),
            act1=nn.ReLU(),
            fc2=nn.Linear(128, 128),
            act2=nn.ReLU(),
            out=nn.Linear(128, 7),
        )
    )


MODELS = {"cnn": make_cnn, "mlp": make_mlp}


def log_likelihood(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -nn.functional.cross_entropy(net(x), y, reduction="none")


def logits(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return net(x)


def minibatches(n: int, epochs: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    for _ in range(epochs):
        yield from torch.randperm(n, generator=generator).split(64)


def train_epochs(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    generator: torch.Generator,
    swag: bf.SWAG | None = None,
) -> nn.Module:
    r"""Minimizes the mean cross-entropy in training mode on minibatches of 64; collects
    into `swag` after every epoch."""

    net.train()
    for _ in range(epochs):
        for i in torch.randperm(len(y), generator=generator).split(64):
            loss = -log_likelihood(net, x[i], y[i]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if swag is not None:
            swag.collect(net)
    return net.eval()


def train_deterministic(
    make: type[nn.Module] | object,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 40,
    seed: int = 0,
) -> nn.Module:
    r"""Adam (lr 3e-3, weight decay 1e-4) for `epochs` epochs, as in notebook 05."""

    torch.manual_seed(seed)
    net = make()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    return train_epochs(net, optimizer, x, y, epochs, torch.Generator().manual_seed(seed))


def train_swag(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int = 0
) -> tuple[bf.SWAG, nn.Module]:
    r"""SWAG from a trained net: SGD (momentum 0.9, weight decay 1e-4) at a constant
    learning rate for `epochs` epochs, collected after each; returns the collector and the
    last iterate (a copy: `net` is left alone)."""

    net = copy.deepcopy(net)
    swag = bf.SWAG(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    train_epochs(net, optimizer, x, y, epochs, torch.Generator().manual_seed(seed), swag)
    return swag, net


def fit_laplace(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    include: tuple[str, ...] = ("",),
    hessian: str = "ggn",
) -> tuple[bf.LaplaceFit, float, bf.Posterior]:
    r"""The diagonal Laplace fit on minibatches of 64, the prior precision that maximizes
    the evidence, and the posterior."""

    data = list(zip(x.split(64), y.split(64), strict=True))
    fit = bf.laplace_fit(
        net, log_likelihood, data, hessian=hessian, output=logits,
        likelihood="classification", include=include,
    )  # fmt: skip
    prior_precision = bf.optimize_prior_precision(fit)
    return fit, prior_precision, bf.laplace_posterior(fit, prior_precision)


def sampled_logits(
    net: nn.Module, q: bf.Posterior, x: torch.Tensor, k: int, seed: int = 0
) -> torch.Tensor:
    r"""Logits `(k, n, C)` of `k` posterior samples, in one vectorized pass."""

    with torch.no_grad():
        params = bf.sample(q, k, generator=torch.Generator().manual_seed(seed))
        return bf.vmap_call(net, params, x)


def probit_log_probs(net: nn.Module, q: bf.Posterior, x: torch.Tensor) -> torch.Tensor:
    r"""Log-probabilities `(1, n, C)` of the linearized predictive, probit-approximated."""

    mean, var = bf.linearized_predictive(net, q, x, chunk_size=256)
    return bf.probit_probs(mean, var).log().unsqueeze(0)


def scores(log_probs: torch.Tensor, y_test: torch.Tensor) -> dict[str, float]:
    r"""Accuracy, NLL, ECE on the test digits and OOD AUROC of the predictive entropy, from
    per-sample logits or log-probabilities `(S, n_test + n_ood, C)` (test images first)."""

    n = len(y_test)
    probs = bf.mean_probs(log_probs)
    entropy = bf.predictive_entropy(log_probs)
    is_ood = torch.arange(log_probs.shape[1]) >= n
    return {
        "accuracy": (probs[:n].argmax(-1) == y_test).double().mean().item(),
        "NLL": bf.categorical_nll(probs[:n], y_test).item(),
        "ECE": bf.expected_calibration_error(probs[:n], y_test, bins=BINS).item(),
        "AUROC": bf.auroc(entropy, is_ood).item(),
    }


def choose_swag(
    net: nn.Module,
    split: dict[str, torch.Tensor],
    epochs: int,
    k: int,
    lrs: tuple[float, ...] = (1e-2, 3e-2, 1e-1, 3e-1),
    scales: tuple[float, ...] = (0.5, 1.0),
) -> tuple[dict[str, float], bf.SWAG, nn.Module]:
    r"""SWAG's learning rate and scale by the NLL on the validation split; returns the
    choice, the collector and the iterate of the chosen learning rate."""

    best = None
    for lr in lrs:
        swag, last = train_swag(net, split["x_fit"], split["y_fit"], epochs, lr)
        for scale in scales:
            z = sampled_logits(last, swag.posterior(scale=scale), split["x_val"], k)
            nll = bf.categorical_nll(bf.mean_probs(z), split["y_val"]).item()
            if best is None or nll < best[0]["val NLL"]:
                best = ({"lr": lr, "scale": scale, "val NLL": nll}, swag, last)
    return best


def choose_prior_precision(
    net: nn.Module,
    fit: bf.LaplaceFit,
    split: dict[str, torch.Tensor],
    grid: tuple[float, ...] = tuple(10 ** (i / 4) for i in range(-4, 17)),
) -> tuple[float, float]:
    r"""The prior precision of the grid with the best validation NLL of the probit
    predictive (laplace-torch's `method="gridsearch"`); returns it and that NLL."""

    best = None
    for prec in grid:
        lp = probit_log_probs(net, bf.laplace_posterior(fit, prec), split["x_val"])
        nll = bf.categorical_nll(lp[0].exp(), split["y_val"]).item()
        if best is None or nll < best[1]:
            best = (prec, nll)
    return best


def compare(model: str = "cnn", epochs: int = 40, swag_epochs: int = 20, k: int = 32) -> dict:
    r"""Trains, fits and scores every method on one split; returns `{method: row}`, each
    row with its scores and fit time in seconds."""

    split = digits()
    x_eval = torch.cat((split["x_test"], split["x_ood"]))
    y_test = split["y_test"]
    make = MODELS[model]

    start = time.perf_counter()
    det = train_deterministic(make, split["x_fit"], split["y_fit"], epochs)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        val_nll = bf.categorical_nll(det(split["x_val"]).softmax(-1), split["y_val"]).item()
        z = det(x_eval).unsqueeze(0)
    rows = {"deterministic": {**scores(z, y_test), "fit s": seconds, "val NLL": val_nll}}

    for name, include in (("Laplace all", ("",)), ("Laplace last layer", ("out",))):
        start = time.perf_counter()
        fit, prec, q = fit_laplace(det, split["x_fit"], split["y_fit"], include)
        seconds = time.perf_counter() - start
        rows[f"{name}, sampled"] = {**scores(sampled_logits(det, q, x_eval, k), y_test),
                                    "fit s": seconds, "prior precision": prec}  # fmt: skip
        rows[f"{name}, probit"] = {**scores(probit_log_probs(det, q, x_eval), y_test),
                                   "fit s": seconds, "prior precision": prec}  # fmt: skip
        start = time.perf_counter()
        prec, nll = choose_prior_precision(det, fit, split)
        q = bf.laplace_posterior(fit, prec)
        rows[f"{name}, probit, val"] = {
            **scores(probit_log_probs(det, q, x_eval), y_test),
            "fit s": seconds + time.perf_counter() - start,
            "prior precision": prec,
            "val NLL": nll,
        }

    start = time.perf_counter()
    choice, swag, last = choose_swag(det, split, swag_epochs, k)
    seconds = time.perf_counter() - start
    mean_net = swag.mean_model(last)
    q = swag.posterior(scale=choice["scale"])
    rows["SWAG-diagonal"] = {**scores(sampled_logits(mean_net, q, x_eval, k), y_test),
                             "fit s": seconds, **choice}  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="cnn")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 epochs, K = 4")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    epochs, swag_epochs, k = (2, 3, 4) if args.quick else (40, 20, 32)
    rows = compare(args.model, epochs, swag_epochs, k)
    print(f"digits 0-6 against 7-9, {args.model}, {epochs} epochs, K = {k}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")  # fmt: skip
    print(
        f"{'method':>26} | {'accuracy':>8} | {'NLL':>6} | {'ECE':>6} | {'AUROC':>6} | {'fit s':>6}"
    )
    for name, r in rows.items():
        extra = {
            k: v for k, v in r.items() if k not in ("accuracy", "NLL", "ECE", "AUROC", "fit s")
        }
        print(
            f"{name:>26} | {r['accuracy']:8.3f} | {r['NLL']:6.3f} | {r['ECE']:6.3f} | "
            f"{r['AUROC']:6.3f} | {r['fit s']:6.2f} | "
            + ", ".join(f"{a} {b:.3g}" for a, b in extra.items())
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
