r"""What the posterior benchmarks share: the validation search of the Laplace prior
precision and curvature temperature, a timer, the SWAG row and the table printer."""

from __future__ import annotations

import time

from collections.abc import Callable

import torch
import torch.nn as nn

from torch.utils import benchmark

import bayesflow as bf

#: The prior precisions of the validation search, half decades from 1e-2 to 1e8: a posterior
#: holds precisions up to e^17.98 = 6.5e7, so the top of the grid is the least variance it
#: can hold (the trained net itself, to the predictions' precision).
PRECISIONS = tuple(10 ** (i / 2) for i in range(-4, 17))

#: Temperatures :math:`T` of the curvature (posterior precision :math:`h / T + \lambda`).
TEMPERATURES = (1.0, 0.3, 0.1, 0.03, 0.01)


def diabetes(seed: int) -> dict[str, torch.Tensor]:
    r"""Returns split `seed` of notebook 06 (a quarter of the patients for the test, a fifth of
    the rest for validation): `x_fit, y_fit, x_val, y_val, x_test, y_test`,
    standardized with the training part's statistics, and `y_std`, the target's scale."""

    from sklearn.datasets import load_diabetes

    data = load_diabetes(scaled=False)
    features = torch.tensor(data.data, dtype=torch.float32)
    target = torch.tensor(data.target, dtype=torch.float32)
    i = torch.randperm(len(target), generator=torch.Generator().manual_seed(seed))
    test, train = i[: len(i) // 4], i[len(i) // 4 :]
    x_mean, x_std = features[train].mean(dim=0), features[train].std(dim=0)
    y_mean, y_std = target[train].mean(), target[train].std()
    x, y = (features - x_mean) / x_std, (target - y_mean) / y_std
    val, fit = train[: len(train) // 5], train[len(train) // 5 :]
    return {
        "x_fit": x[fit], "y_fit": y[fit], "x_val": x[val], "y_val": y[val],
        "x_test": x[test], "y_test": y[test], "y_std": y_std,
    }  # fmt: skip


def tempered(fit: bf.LaplaceFit, temperature: float) -> bf.LaplaceFit:
    r"""The fit with its curvature divided by `temperature`: the posterior precision
    :math:`h / T + \lambda`."""

    return fit._replace(hessian={k: h / temperature for k, h in fit.hessian.items()})


def seconds(stmt: Callable[[], object], min_run_time: float = 0.2) -> float:
    r"""The median time of `stmt()`, by :class:`torch.utils.benchmark.Timer` at the
    current thread count, after a warm-up."""

    stmt()
    timer = benchmark.Timer("stmt()", globals={"stmt": stmt}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def search(
    val_nll: Callable[[float, float], float],
    precisions: tuple[float, ...] = PRECISIONS,
    temperatures: tuple[float, ...] = (1.0,),
) -> dict[str, float | str]:
    r"""Minimizes `val_nll(prior_precision, temperature)` over the grid; where the best
    precision is the grid's least, the grid is extended a decade at a time down to 1e-8.

    Returns the best `"prior precision"`, `"temperature"` and `"val NLL"`, and `"edge"`:
    `"upper"` if the best precision is the grid's largest (no variance is best: the
    posterior collapses onto the trained net), `"lower"` at 1e-8, else `""`."""

    grid = sorted(precisions)
    values: dict[tuple[float, float], float] = {}
    while True:
        for t in temperatures:
            for lam in grid:
                if (lam, t) not in values:
                    values[lam, t] = val_nll(lam, t)
        lam, t = min(values, key=values.get)
        if lam > grid[0] or grid[0] <= 1e-8:
            break
        grid = [grid[0] / 10, *grid]
    edge = "upper" if lam == grid[-1] else "lower" if lam == grid[0] else ""
    return {"prior precision": lam, "temperature": t, "val NLL": values[lam, t], "edge": edge}


def note(value: object) -> str:
    if isinstance(value, dict):
        return f"{min(value.values()):.3g} to {max(value.values()):.3g} (per tensor)"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def print_rows(title: str, rows: dict[str, dict], columns: tuple[str, ...]) -> None:
    r"""Prints one line per method: the scores, the seconds of the fit, of the tuning on
    the validation split and of a prediction, then the choices made."""

    width = max(len(name) for name in rows)
    print(title)
    times = ("fit s", "tune s", "predict s")
    header = " | ".join(f"{c:>8}" for c in (*columns, "fit s", "tune s", "predict ms"))
    print(f"{'method':>{width}} | {header}")
    for name, r in rows.items():
        cells = [f"{r[c]:8.3f}" for c in columns]
        cells += [f"{r['fit s']:8.3f}", f"{r.get('tune s', 0.0):8.2f}"]
        cells += [f"{1e3 * r['predict s']:10.2f}"]
        extra = {a: b for a, b in r.items() if a not in (*columns, *times)}
        notes = ", ".join(f"{a} {note(b)}" for a, b in extra.items() if b)
        print(f"{name:>{width}} | " + " | ".join(cells) + (f" | {notes}" if notes else ""))


def swag_row(
    choose: Callable[[], tuple[dict, bf.SWAG, nn.Module]],
    predict: Callable[[nn.Module, bf.Posterior], object],
    score: Callable[[object], dict[str, float]],
    min_run_time: float = 0.2,
) -> tuple[dict, nn.Module]:
    r"""SWAG-diagonal as `choose()` picks it on the validation split: its row (the scores of
    `predict(mean_net, q)`, the fit, tuning and prediction seconds, the choices) and the
    mean model."""

    start = time.perf_counter()
    choice, swag, last = choose()
    tune_s = time.perf_counter() - start
    mean_net = swag.mean_model(last)
    q = swag.posterior(scale=choice["scale"])
    row = {
        **score(predict(mean_net, q)),
        "fit s": choice.pop("fit s"),
        "tune s": tune_s,
        "predict s": seconds(lambda: predict(mean_net, q), min_run_time),
        **choice,
    }
    return row, mean_net
