r"""Posteriors after training on digits 0-6 (7-9 out of distribution): a deterministic net,
Laplace (all weights, last layer) and SWAG-diagonal, scored on held-out data.

    python benchmarks/posteriors.py --model cnn --threads 1 --peer  # results/posteriors-cnn.txt
    python benchmarks/posteriors.py --model mlp --threads 1 --peer  # results/posteriors-mlp.txt
    python benchmarks/posteriors.py --model mlp --quick             # a few seconds

`--peer` adds laplace-torch's last-layer Laplace (diagonal, KFAC, full), as in the committed
results; without it the table has bayesflow's rows only. One training seed: for the noise of
training, see benchmarks/seeds.py (results/seeds.txt).

The pieces (data split, models, training, fitting, the validation search, scores) are
functions that other scripts and notebooks import; `compare(...)` takes reduced sizes. The
split: scikit-learn's digits, 0-6 known, 30% of them the test set (the split of notebook 05,
from seed 0), and 20% of the rest the validation set (seed 1), on which SWAG's learning rate
and scale and, where said, the Laplace prior precision (and temperature) are chosen by the
NLL; the nets train on what is left. Nothing is tuned on the test set or the digits 7-9.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from posteriors_tools import TEMPERATURES, print_rows, search, seconds, swag_row, tempered

import bayesflow as bf

from bayesflow.cli import _positive_int

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
    loss: Callable[..., torch.Tensor] = log_likelihood,
    batch_size: int = 64,
) -> nn.Module:
    r"""Maximizes the mean of `loss` (a per-datum log-likelihood) in training mode on
    minibatches; collects into `swag` after every epoch."""

    net.train()
    for _ in range(epochs):
        for i in torch.randperm(len(y), generator=generator).split(batch_size):
            value = -loss(net, x[i], y[i]).mean()
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        if swag is not None:
            swag.collect(net)
    return net.eval()


def train_deterministic(
    make: Callable[[], nn.Module],
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
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    seed: int = 0,
    loss: Callable[..., torch.Tensor] = log_likelihood,
    batch_size: int = 64,
) -> tuple[bf.SWAG, nn.Module]:
    r"""SWAG from a trained net: SGD (momentum 0.9, weight decay 1e-4) at a constant
    learning rate for `epochs` epochs, collected after each; returns the collector and the
    last iterate (a copy: `net` is left alone)."""

    torch.manual_seed(seed)  # dropout draws from the global generator
    net = copy.deepcopy(net)
    swag = bf.SWAG(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    train_epochs(net, optimizer, x, y, epochs, generator, swag, loss, batch_size)
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

    mean, var = bf.linearized_predictive(net, q, x, chunk_size=32)
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


def choose_laplace(
    net: nn.Module,
    fit: bf.LaplaceFit,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    predictive: str,
    k: int = 32,
    temperatures: tuple[float, ...] = (1.0,),
) -> dict[str, float | str]:
    r"""The prior precision (and temperature) with the best validation NLL of the
    `"probit"` (linearized) or `"sampled"` predictive (laplace-torch's `gridsearch`)."""

    def val_nll(lam: float, t: float) -> float:
        q = bf.laplace_posterior(tempered(fit, t), lam)
        if predictive == "probit":
            probs = probit_log_probs(net, q, x_val)[0].exp()
        else:
            probs = bf.mean_probs(sampled_logits(net, q, x_val, k))
        return bf.categorical_nll(probs, y_val).item()

    return search(val_nll, temperatures=temperatures)


def logit_temperature(
    net: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor
) -> dict[str, float | str]:
    r"""The temperature of the logits with the best validation NLL (Guo et al., 2017),
    on a grid from 0.25 to 4: above 1 the net is overconfident on the validation split,
    below 1 underconfident."""

    with torch.no_grad():
        z = net(x_val)
    grid = tuple(2 ** (i / 8) for i in range(-16, 17))
    values = {t: bf.categorical_nll((z / t).softmax(-1), y_val).item() for t in grid}
    best = min(values, key=values.get)
    edge = "upper" if best == grid[-1] else "lower" if best == grid[0] else ""
    return {"logit temperature": best, "val NLL": values[best], "edge": edge}


def choose_swag(
    net: nn.Module,
    split: dict[str, torch.Tensor],
    epochs: int,
    k: int,
    lrs: tuple[float, ...] = (1e-2, 3e-2, 1e-1, 3e-1),
    scales: tuple[float, ...] = (0.5, 1.0),
    loss: Callable[..., torch.Tensor] = log_likelihood,
    batch_size: int = 64,
    val_nll: Callable[[nn.Module, bf.Posterior], float] | None = None,
) -> tuple[dict[str, float], bf.SWAG, nn.Module]:
    r"""SWAG's learning rate and scale by `val_nll(last_iterate, posterior)` (by default
    the NLL of the sampled predictive on the validation digits); returns the choice (with
    the seconds of the chosen run), the collector and the iterate of the chosen learning
    rate."""

    def digits_nll(last: nn.Module, q: bf.Posterior) -> float:
        z = sampled_logits(last, q, split["x_val"], k)
        return bf.categorical_nll(bf.mean_probs(z), split["y_val"]).item()

    val_nll = digits_nll if val_nll is None else val_nll
    best = None
    for lr in lrs:
        start = time.perf_counter()
        swag, last = train_swag(
            net, split["x_fit"], split["y_fit"], epochs, lr, loss=loss, batch_size=batch_size
        )
        fit_s = time.perf_counter() - start
        for scale in scales:
            nll = val_nll(last, swag.posterior(scale=scale))
            if best is None or nll < best[0]["val NLL"]:
                best = ({"lr": lr, "scale": scale, "val NLL": nll, "fit s": fit_s}, swag, last)
    return best


def laplace_rows(
    net: nn.Module,
    split: dict[str, torch.Tensor],
    x_eval: torch.Tensor,
    include: tuple[str, ...],
    k: int,
    temperatures: tuple[float, ...],
) -> dict[str, dict]:
    r"""Laplace over the parameters `include` picks: the GGN fit, then the prior precision
    by the evidence (one, or one per tensor) or by the validation NLL, with the probit
    (linearized) or the sampled predictive; one row each, with the seconds of the fit
    (curvature and precision) and of the prediction of `x_eval`."""

    y_test = split["y_test"]
    start = time.perf_counter()
    fit, _, _ = fit_laplace(net, split["x_fit"], split["y_fit"], include)
    fit_s = time.perf_counter() - start
    predict = {
        "probit": lambda q: probit_log_probs(net, q, x_eval),
        "sampled": lambda q: sampled_logits(net, q, x_eval, k),
    }

    rows = {}
    for how in ("evidence", "evidence per tensor", "validation"):
        for name, fn in predict.items():
            if how == "evidence per tensor" and name == "sampled":
                continue
            start = time.perf_counter()
            if how == "validation":
                extra = choose_laplace(
                    net, fit, split["x_val"], split["y_val"], name, k,
                    temperatures if name == "probit" else (1.0,),
                )  # fmt: skip
            else:
                structure = "tensor" if how.endswith("tensor") else "scalar"
                extra = {"prior precision": bf.optimize_prior_precision(fit, structure)}
            prec = extra["prior precision"]
            q = bf.laplace_posterior(tempered(fit, extra.get("temperature", 1.0)), prec)
            tune_s = time.perf_counter() - start
            rows[f"{how}, {name}"] = {
                **scores(fn(q), y_test),
                "fit s": fit_s,
                "tune s": tune_s,
                "predict s": seconds(lambda fn=fn, q=q: fn(q)),
                **extra,
            }
    return rows


def compare(
    model: str = "cnn",
    epochs: int = 40,
    swag_epochs: int = 20,
    k: int = 32,
    temperatures: tuple[float, ...] = TEMPERATURES,
    peer: bool = False,
) -> dict[str, dict]:
    r"""Trains, fits and scores every method on one split (and laplace-torch's last-layer
    Laplace with `peer`); returns `{method: row}`, each
    row with its scores, the seconds of its fit (training for the deterministic net, the
    curvature for Laplace, the extra epochs at the chosen learning rate for SWAG), of its
    tuning on the validation split, and of one prediction of the test and
    out-of-distribution images, and the choices made."""

    split = digits()
    x_eval = torch.cat((split["x_test"], split["x_ood"]))
    y_test = split["y_test"]

    start = time.perf_counter()
    det = train_deterministic(MODELS[model], split["x_fit"], split["y_fit"], epochs)
    fit_s = time.perf_counter() - start
    with torch.no_grad():
        val_nll = bf.categorical_nll(det(split["x_val"]).softmax(-1), split["y_val"]).item()
        z = det(x_eval).unsqueeze(0)
        predict_s = seconds(lambda: det(x_eval))
    rows = {
        "deterministic": {
            **scores(z, y_test), "fit s": fit_s, "predict s": predict_s, "val NLL": val_nll
        }
    }  # fmt: skip
    start = time.perf_counter()
    scaled = logit_temperature(det, split["x_val"], split["y_val"])
    tune_s = time.perf_counter() - start
    rows["deterministic, temperature-scaled"] = {
        **scores(z / scaled["logit temperature"], y_test),
        "fit s": fit_s,
        "tune s": tune_s,
        "predict s": predict_s,
        **scaled,
    }

    for name, include in (("Laplace all", ("",)), ("Laplace last layer", ("out",))):
        for how, row in laplace_rows(det, split, x_eval, include, k, temperatures).items():
            rows[f"{name}, {how}"] = row

    if peer:
        rows.update(laplace_torch_rows(det, split, x_eval))

    rows["SWAG-diagonal"], mean_net = swag_row(
        lambda: choose_swag(det, split, swag_epochs, k),
        lambda net, q: sampled_logits(net, q, x_eval, k),
        lambda z: scores(z, y_test),
    )
    with torch.no_grad():
        rows["SWA (SWAG's mean alone)"] = {
            **scores(mean_net(x_eval).unsqueeze(0), y_test),
            **{c: rows["SWAG-diagonal"][c] for c in ("fit s", "tune s")},
            "predict s": rows["deterministic"]["predict s"],
        }
    return rows


def laplace_torch_rows(
    net: nn.Module, split: dict[str, torch.Tensor], x_eval: torch.Tensor
) -> dict[str, dict]:
    r"""laplace-torch 0.3's last-layer Laplace with the diagonal, KFAC and full GGN, the
    prior precision by its evidence (Adam on :math:`\log \lambda`, 300 steps), and the
    probit predictive: what the correlations the diagonal leaves out change."""

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from laplace import Laplace
        from laplace.curvature import CurvlinopsGGN

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(split["x_fit"], split["y_fit"]), batch_size=64
    )
    rows = {}
    for structure in ("diag", "kron", "full"):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la = Laplace(
                copy.deepcopy(net), "classification", subset_of_weights="last_layer",
                hessian_structure=structure, backend=CurvlinopsGGN,
            )  # fmt: skip
            la.fit(loader)
            la.optimize_prior_precision(
                method="marglik", pred_type="glm", link_approx="probit", n_steps=300, lr=0.1
            )
            fit_s = time.perf_counter() - start
            probs = la(x_eval, pred_type="glm", link_approx="probit")
        rows[f"laplace-torch last layer {structure}, evidence, probit"] = {
            **scores(probs.log().unsqueeze(0), split["y_test"]),
            "fit s": fit_s,
            "predict s": seconds(lambda la=la: la(x_eval, pred_type="glm", link_approx="probit")),
            "prior precision": la.prior_precision.item(),
        }
    return rows


SCORES = ("accuracy", "NLL", "ECE", "AUROC")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="cnn")
    parser.add_argument("--threads", type=_positive_int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 epochs, K = 4")
    parser.add_argument("--peer", action="store_true", help="laplace-torch's last layer too")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    epochs, swag_epochs, k = (2, 3, 4) if args.quick else (40, 20, 32)
    temperatures = (1.0, 0.1) if args.quick else TEMPERATURES
    start = time.perf_counter()
    rows = compare(args.model, epochs, swag_epochs, k, temperatures, args.peer)
    print_rows(
        f"digits 0-6 against 7-9, {args.model}, {epochs} epochs, K = {k}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{math.ceil(time.perf_counter() - start)} s in all",
        rows,
        SCORES,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
