r"""Posteriors after training on diabetes (regression): a deterministic heteroscedastic MLP,
Laplace (all weights, last layer) and SWAG-diagonal, over the five splits of notebook 06.

    python benchmarks/posteriors_regression.py --threads 1     # the quality table
    python benchmarks/posteriors_regression.py --quick         # a few seconds

The split, the net and its training are notebook 06's: a quarter of the 442 patients the
test set, a fifth of the rest the validation set (early stopping of the deterministic net),
the nets trained on the remaining 266; features and target standardized on the training
part. The net predicts a Gaussian's mean and scale, so the Laplace curvature is the
empirical Fisher of that likelihood (the GGN of `bayesflow.laplace_fit` is for a fixed
noise scale). The prior precision (and temperature) and SWAG's learning rate and scale are
chosen on the validation split by its NLL; nothing is tuned on the test set. Scores are the
mean and standard error over the splits: the NLL of the predictive (a mixture of the
samples' Gaussians), the RMSE of its mean and the coverage of its 90% interval. There is
no out-of-distribution set here.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import posteriors
import torch
import torch.nn as nn

from posteriors_tools import TEMPERATURES, diabetes, search, seconds, swag_row, tempered

import bayesflow as bf

from bayesflow.cli import _positive_int

DRAWS = 4000


def make_net() -> nn.Sequential:
    r"""Notebook 06's MLP: 10 inputs, 50 ReLU units, the mean and the raw scale."""

    return nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 2))


def gaussian(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = net(x)
    return out[..., 0], nn.functional.softplus(out[..., 1]) + 1e-3


def log_likelihood(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mean, scale = gaussian(net, x)
    return torch.distributions.Normal(mean, scale).log_prob(y)


def train_deterministic(d: dict[str, torch.Tensor], seed: int, steps: int = 500) -> nn.Module:
    r"""Full-batch Adam (lr 1e-3) with early stopping on the validation NLL, checked every
    10 steps, as in notebook 06."""

    torch.manual_seed(seed)
    net = make_net()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    best, state = math.inf, copy.deepcopy(net.state_dict())
    for step in range(steps):
        loss = -log_likelihood(net, d["x_fit"], d["y_fit"]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 9:
            with torch.no_grad():
                val = -log_likelihood(net, d["x_val"], d["y_val"]).mean().item()
            if val < best:
                best, state = val, copy.deepcopy(net.state_dict())
    net.load_state_dict(state)
    return net.eval()


def sampled(net: nn.Module, q: bf.Posterior, x: torch.Tensor, k: int) -> tuple:
    r"""The means and scales `(k, n)` of `k` posterior samples, in one vectorized pass."""

    with torch.no_grad():
        params = bf.sample(q, k, generator=torch.Generator().manual_seed(0))
        return bf.vmap_call(net, params, x, fn=gaussian)


def linearized(net: nn.Module, q: bf.Posterior, x: torch.Tensor) -> tuple:
    r"""The GLM predictive `(1, n)`: the net's mean and scale at the posterior mean, the
    variance of the linearized mean added to the scale's square (the scale's own
    uncertainty is left out)."""

    mean, var = bf.linearized_predictive(net, q, x)
    scale = nn.functional.softplus(mean[:, 1]) + 1e-3
    return mean[None, :, 0], (scale.square() + var[:, 0]).sqrt()[None]


def scores(mean: torch.Tensor, scale: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    r"""The NLL of the mixture of the `(S, n)` Gaussians, the RMSE of its mean and the
    coverage of its equal-tailed 90% interval (from `DRAWS` draws per datum)."""

    log_probs = torch.distributions.Normal(mean, scale).log_prob(y)
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(DRAWS // len(mean), *mean.shape, generator=generator)
    lower, upper = bf.predictive_interval((mean + scale * noise).flatten(0, 1), level=0.9)
    return {
        "NLL": bf.predictive_nll(log_probs).item(),
        "RMSE": (bf.predictive_mean(mean) - y).square().mean().sqrt().item(),
        "coverage 90%": bf.interval_coverage(lower, upper, y).item(),
    }


def laplace_rows(
    net: nn.Module, d: dict[str, torch.Tensor], include: tuple[str, ...], k: int,
    temperatures: tuple[float, ...],
) -> dict[str, dict]:  # fmt: skip
    r"""Laplace over the parameters `include` picks: the empirical Fisher, then the prior
    precision by the evidence or by the validation NLL (with a temperature from
    `temperatures`), with the sampled or the linearized predictive."""

    start = time.perf_counter()
    data = list(zip(d["x_fit"].split(64), d["y_fit"].split(64), strict=True))
    fit = bf.laplace_fit(net, log_likelihood, data, hessian="ef", include=include)
    fit_s = time.perf_counter() - start
    predict = {
        "sampled": lambda q, x: sampled(net, q, x, k),
        "linearized": lambda q, x: linearized(net, q, x),
    }

    rows = {}
    for how in ("evidence", "validation"):
        for name, fn in predict.items():
            start = time.perf_counter()
            if how == "evidence":
                extra = {"prior precision": bf.optimize_prior_precision(fit)}
            else:

                def val_nll(lam: float, t: float, fn: object = fn) -> float:
                    q = bf.laplace_posterior(tempered(fit, t), lam)
                    return scores(*fn(q, d["x_val"]), d["y_val"])["NLL"]

                extra = search(val_nll, temperatures=temperatures)
            t = extra.get("temperature", 1.0)
            q = bf.laplace_posterior(tempered(fit, t), extra["prior precision"])
            tune_s = time.perf_counter() - start
            rows[f"{how}, {name}"] = {
                **scores(*fn(q, d["x_test"]), d["y_test"]),
                "fit s": fit_s,
                "tune s": tune_s,
                "predict s": seconds(lambda fn=fn, q=q: fn(q, d["x_test"]), 0.05),
                **extra,
            }
    return rows


def choose_swag(
    net: nn.Module,
    d: dict[str, torch.Tensor],
    epochs: int,
    k: int,
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2),
    scales: tuple[float, ...] = (0.5, 1.0),
) -> tuple[dict[str, float], bf.SWAG, nn.Module]:
    r"""SWAG (minibatches of 32) with the learning rate and scale of the best validation
    NLL; returns the choice (with the seconds of the chosen run), the collector and the
    last iterate of the chosen learning rate."""

    def val_nll(last: nn.Module, q: bf.Posterior) -> float:
        return scores(*sampled(last, q, d["x_val"], k), d["y_val"])["NLL"]

    return posteriors.choose_swag(net, d, epochs, k, lrs, scales, log_likelihood, 32, val_nll)


def compare_split(
    seed: int, steps: int = 500, swag_epochs: int = 30, k: int = 64,
    temperatures: tuple[float, ...] = TEMPERATURES,
) -> dict[str, dict]:  # fmt: skip
    r"""Trains, fits and scores every method on split `seed`; returns `{method: row}`."""

    d = diabetes(seed)
    y = d["y_test"]
    start = time.perf_counter()
    det = train_deterministic(d, seed, steps)
    fit_s = time.perf_counter() - start
    with torch.no_grad():
        mean, scale = gaussian(det, d["x_test"])
        predict_s = seconds(lambda: gaussian(det, d["x_test"]), 0.05)
    rows = {
        "deterministic": {
            **scores(mean[None], scale[None], y), "fit s": fit_s, "predict s": predict_s
        }
    }  # fmt: skip
    for name, include in (("Laplace all", ("",)), ("Laplace last layer", ("2",))):
        for how, row in laplace_rows(det, d, include, k, temperatures).items():
            rows[f"{name}, {how}"] = row

    rows["SWAG-diagonal"], _ = swag_row(
        lambda: choose_swag(det, d, swag_epochs, k),
        lambda net, q: sampled(net, q, d["x_test"], k),
        lambda out: scores(*out, y),
        0.05,
    )
    return rows


COLUMNS = ("NLL", "NLL - deterministic", "RMSE", "coverage 90%")
CHOICES = ("prior precision", "temperature", "lr", "scale", "edge", "val NLL")


def compare(splits: int = 5, **kwargs: object) -> dict[str, dict]:
    r"""Every method on `splits` splits; returns `{method: row}` with the mean of each
    score and time over the splits, its standard error under `"<name> se"` (also of the
    paired difference `"NLL - deterministic"`), and the list of the choices made on each
    split."""

    per_split = [compare_split(seed, **kwargs) for seed in range(splits)]
    for r in per_split:
        for row in r.values():
            row["NLL - deterministic"] = row["NLL"] - r["deterministic"]["NLL"]
    rows = {}
    for method in per_split[0]:
        row = {}
        for key, value in per_split[0][method].items():
            values = [r[method][key] for r in per_split]
            if key in CHOICES:
                row[key] = values
            elif isinstance(value, (int, float)):
                row[key] = statistics.mean(values)
                if len(values) > 1:
                    row[f"{key} se"] = statistics.stdev(values) / math.sqrt(len(values))
        rows[method] = row
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=_positive_int, default=1)
    parser.add_argument("--splits", type=_positive_int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 splits, 50 steps, K = 8")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    splits, steps, swag_epochs, k = (2, 50, 3, 8) if args.quick else (args.splits, 500, 30, 64)
    temperatures = (1.0, 0.1) if args.quick else TEMPERATURES
    start = time.perf_counter()
    rows = compare(splits, steps=steps, swag_epochs=swag_epochs, k=k, temperatures=temperatures)
    print(
        f"diabetes, mean ± standard error over {splits} splits, K = {k}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{math.ceil(time.perf_counter() - start)} s in all"
    )
    width = max(len(name) for name in rows)
    times = ("fit s", "tune s", "predict ms")
    print(f"{'method':>{width}} | " + " | ".join(f"{c:>14}" for c in (*COLUMNS, *times)))
    for name, r in rows.items():
        cells = [f"{r[c]:6.3f} ± {r.get(c + ' se', 0.0):.3f}" for c in COLUMNS]
        cells += [f"{r.get(c, 0.0):14.3f}" for c in times[:2]]
        cells += [f"{1e3 * r['predict s']:14.3f}"]
        notes = ", ".join(
            f"{c} " + "/".join(f"{v:.3g}" if isinstance(v, float) else v or "-" for v in r[c])
            for c in CHOICES[:-1]
            if c in r and any(r[c])
        )
        print(f"{name:>{width}} | " + " | ".join(cells) + (f" | {notes}" if notes else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
