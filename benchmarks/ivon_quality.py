r"""IVON from scratch against the deterministic net, on real data: digits and diabetes.

    python benchmarks/ivon_quality.py            # both data sets (a few minutes on one thread)
    python benchmarks/ivon_quality.py --quick    # a few seconds, reduced sizes

Digits (scikit-learn's 8 x 8 images, as in notebook 05): the CNN of notebook 05 learns the
digits 0-6 from 70% of their images; the other 30% are the test set, the digits 7-9 the
out-of-distribution (OOD) set. The deterministic net is the notebook's (Adam 3e-3, weight decay
1e-4, dropout, 40 epochs of minibatches of 64). IVON trains the same CNN (dropout off: the weight
noise is its regularizer) for the same 40 epochs, one posterior sample per step, with a cosine
learning rate; its hyperparameters (lr, hess_init, clip_radius) are chosen by the mean validation
NLL over two folds, each a fifth of the training images (trained on the other four fifths), and
two seeds (the validation NLL of one run varies by a factor of ten between seeds), then it is
retrained on all of them. Predictions average 32 posterior samples. Three seeds each. The
grid has two values per hyperparameter, and its choice (lr 2, hess_init 1, clip_radius 0.003)
sits at its edge: a larger lr or a smaller clip radius is not tried. benchmarks/seeds.py
compares the clip radius (none, 0.003, 0.01) at that lr on a validation split.

Diabetes (as in notebook 06): five random splits; a heteroscedastic Gaussian MLP; the
deterministic net is Adam 1e-3, full batch, 500 steps, early-stopped on the validation part.
IVON trains the same MLP for the same 500 steps on the same fit part, its hyperparameters chosen
per split by the validation NLL; predictions are mixtures of 256 posterior samples.

Train times are the CPU time of the training thread (one thread), robust to other processes on
a busy machine. The functions are importable (`sys.path` to this folder) for notebook 07.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import statistics
import sys
import time

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from posteriors_tools import diabetes

import bayesflow as bf

# ---------------------------------------------------------------------------------------------
# Digits


def digits(seed: int = 0, validation: float = 0.2) -> dict[str, torch.Tensor]:
    r"""Returns the split of notebook 05 (digits 0-6, 70% train, 30% test; 7-9 OOD), and a
    validation part carved from the training images (`x_fit`, `x_val`)."""

    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(data.target)
    known = labels < 7
    x_known, y_known = images[known], labels[known]

    i = torch.randperm(len(y_known), generator=torch.Generator().manual_seed(seed))
    n_test = 3 * len(y_known) // 10
    test, train = i[:n_test], i[n_test:]
    n_val = int(validation * len(train))
    return {
        "x_train": x_known[train], "y_train": y_known[train],
        "x_fit": x_known[train[n_val:]], "y_fit": y_known[train[n_val:]],
        "x_val": x_known[train[:n_val]], "y_val": y_known[train[:n_val]],
        "x_test": x_known[test], "y_test": y_known[test],
        "x_ood": images[~known],
    }  # fmt: skip


def make_cnn() -> nn.Sequential:
    r"""The CNN of notebook 05: two convolutions with max-pooling, two linear layers."""

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


def categorical_ll(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(net(x), y, reduction="none")


def minibatches(n: int, epochs: int, batch_size: int = 64) -> Iterable[torch.Tensor]:
    for _ in range(epochs):
        yield from torch.randperm(n).split(batch_size)


def train_deterministic_cnn(
    x: torch.Tensor, y: torch.Tensor, epochs: int = 40, seed: int = 0
) -> nn.Module:
    r"""Notebook 05's deterministic net: Adam 3e-3, weight decay 1e-4, dropout on."""

    torch.manual_seed(seed)
    net = make_cnn()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    for i in minibatches(len(y), epochs):
        (-categorical_ll(net, x[i], y[i]).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return net.eval()


def train_ivon(
    net: nn.Module,
    fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int | None = 64,
    k: int = 1,
    seed: int = 0,
    ess: float | None = None,
    callback: Callable[[int, bf.IVON, list[float]], None] | None = None,
    **hyper: Any,
) -> tuple[bf.IVON, list[float]]:
    r"""Trains `net` in place with :class:`bayesflow.IVON` (`ess` the number of data unless
    given), `k` samples per step, a cosine learning rate; returns the optimizer and the loss
    of every step (the mean over samples and batch of the negative log-likelihood `-fn`).
    `callback(epoch, opt, losses)` runs after every epoch."""

    torch.manual_seed(seed)
    n = len(y)
    batch_size = batch_size or n
    steps = epochs * math.ceil(n / batch_size)
    opt = bf.IVON(net, ess=ess or n, **hyper)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    generator = torch.Generator().manual_seed(seed + 1)
    losses = []
    for epoch in range(epochs):
        for i in torch.randperm(n).split(batch_size):
            params = opt.sample(k, generator=generator)
            loss = -bf.vmap_call(net, params, x[i], y[i], fn=fn).mean()
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.item())
        if callback is not None:
            callback(epoch, opt, losses)
    return opt, losses


def posterior_logits(
    net: nn.Module, q: bf.Posterior, x: torch.Tensor, k: int = 32, seed: int = 2
) -> torch.Tensor:
    r"""Logits of `k` posterior samples, `(k, len(x), classes)`."""

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return bf.vmap_call(net, bf.sample(q, k, generator=generator), x)


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, ood_logits: torch.Tensor | None = None
) -> dict[str, float]:
    r"""Accuracy, NLL and ECE (10 bins) of the model average of `(S, n, classes)` logits;
    with OOD logits, the AUROC of the predictive entropy (OOD against test)."""

    probs = bf.mean_probs(logits)
    out = {
        "accuracy": (probs.argmax(dim=-1) == labels).double().mean().item(),
        "NLL": bf.categorical_nll(probs, labels).item(),
        "ECE": bf.expected_calibration_error(probs, labels, bins=10).item(),
    }
    if ood_logits is not None:
        scores = torch.cat((bf.predictive_entropy(logits), bf.predictive_entropy(ood_logits)))
        is_ood = torch.arange(len(scores)) >= logits.shape[1]
        out["AUROC"] = bf.auroc(scores, is_ood).item()
    return out


DIGITS_GRID = {
    "lr": (1.0, 2.0),
    "hess_init": (1.0, 3.0),
    "clip_radius": (0.003, 0.01),
}


def grid(space: dict[str, tuple]) -> list[dict[str, float]]:
    return [dict(zip(space, values, strict=True)) for values in itertools.product(*space.values())]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.thread_time()
    out = fn()
    return out, time.thread_time() - start


def ivon_cnn(d: dict, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, **cfg: Any):
    cfg = dict(cfg)
    ess = cfg.pop("ess_factor", 1.0) * len(y)
    torch.manual_seed(seed)
    net = make_cnn().eval()  # dropout off: the weight noise regularizes
    opt, _ = train_ivon(net, categorical_ll, x, y, epochs, seed=seed, ess=ess, **cfg)
    return net, opt


def validation_folds(d: dict, folds: int = 2) -> list[tuple[torch.Tensor, ...]]:
    r"""The first `folds` fifths of the training images, each as a validation part with the
    rest to fit on: `(x_fit, y_fit, x_val, y_val)`."""

    n = len(d["y_train"])
    size = n // 5
    out = []
    for f in range(folds):
        val = torch.arange(f * size, (f + 1) * size)
        fit = torch.cat((torch.arange(0, f * size), torch.arange((f + 1) * size, n)))
        x, y = d["x_train"], d["y_train"]
        out.append((x[fit], y[fit], x[val], y[val]))
    return out


def run_digits(
    epochs: int = 40, seeds: int = 3, selection_seeds: int = 2, quick: bool = False
) -> dict[str, Any]:
    r"""Chooses IVON's hyperparameters by the mean validation NLL over two validation folds of
    the training images and `selection_seeds` seeds, then trains the deterministic net and
    IVON on all training images for `seeds` seeds; returns the selection and the test
    metrics per seed."""

    d = digits()
    space = {k: v[:1] for k, v in DIGITS_GRID.items()} if quick else DIGITS_GRID
    folds = validation_folds(d, 1 if quick else 2)
    selection = []
    for cfg in grid(space):
        nll = []
        for (x_fit, y_fit, x_val, y_val), seed in itertools.product(folds, range(selection_seeds)):
            net, opt = ivon_cnn(d, x_fit, y_fit, epochs, seed=seed, **cfg)
            logits = posterior_logits(net, opt.posterior, x_val)
            nll.append(classification_metrics(logits, y_val)["NLL"])
        selection.append((statistics.mean(nll), cfg))
    best = min(selection, key=lambda s: s[0])[1]

    rows: dict[str, list] = {"deterministic": [], "IVON": []}
    for seed in range(seeds):
        net, seconds = timed(
            lambda s=seed: train_deterministic_cnn(d["x_train"], d["y_train"], epochs, s)
        )
        with torch.no_grad():
            z, z_ood = net(d["x_test"]).unsqueeze(0), net(d["x_ood"]).unsqueeze(0)
        scores = classification_metrics(z, d["y_test"], z_ood)
        rows["deterministic"].append(scores | {"train s": seconds})

        (net, opt), seconds = timed(
            lambda s=seed: ivon_cnn(d, d["x_train"], d["y_train"], epochs, seed=s, **best)
        )
        z = posterior_logits(net, opt.posterior, d["x_test"])
        z_ood = posterior_logits(net, opt.posterior, d["x_ood"])
        scores = classification_metrics(z, d["y_test"], z_ood)
        rows["IVON"].append(scores | {"train s": seconds})
    return {"selection": selection, "best": best, "rows": rows}


# ---------------------------------------------------------------------------------------------
# Diabetes


def make_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 2))


def gaussian(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = net(x)
    return out[..., 0], F.softplus(out[..., 1]) + 1e-3


def gaussian_ll(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mean, scale = gaussian(net, x)
    return torch.distributions.Normal(mean, scale).log_prob(y)


def train_deterministic_mlp(d: dict, seed: int, steps: int = 500) -> nn.Module:
    r"""Notebook 06's deterministic net: Adam 1e-3, full batch, the state with the best
    validation NLL (checked every 10 steps)."""

    torch.manual_seed(seed)
    net = make_mlp()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    best, best_state = math.inf, copy.deepcopy(net.state_dict())
    for step in range(steps):
        (-gaussian_ll(net, d["x_fit"], d["y_fit"]).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 9:
            with torch.no_grad():
                val = -gaussian_ll(net, d["x_val"], d["y_val"]).mean().item()
            if val < best:
                best, best_state = val, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    return net


def regression_metrics(
    mean: torch.Tensor, scale: torch.Tensor, y: torch.Tensor, y_std: torch.Tensor
) -> dict[str, float]:
    r"""The NLL of the equal-weight mixture of `(S, n)` Gaussians, and the RMSE of its mean
    (standardized and in the original units)."""

    log_probs = torch.distributions.Normal(mean, scale).log_prob(y)
    rmse = (bf.predictive_mean(mean) - y).square().mean().sqrt().item()
    return {
        "NLL": bf.predictive_nll(log_probs).item(),
        "RMSE": rmse,
        "RMSE (units)": rmse * y_std.item(),
    }


DIABETES_GRID = {"lr": (0.03, 0.1), "hess_init": (0.3, 1.0, 3.0), "weight_decay": (1e-2, 1e-1)}


def ivon_mlp(d: dict, steps: int, seed: int, **cfg: Any) -> tuple[nn.Module, bf.IVON]:
    torch.manual_seed(seed)
    net = make_mlp()
    opt, _ = train_ivon(
        net, gaussian_ll, d["x_fit"], d["y_fit"], steps, batch_size=None, seed=seed, **cfg
    )
    return net, opt


def posterior_gaussians(net: nn.Module, q: bf.Posterior, x: torch.Tensor, k: int = 256):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return bf.vmap_call(net, bf.sample(q, k, generator=generator), x, fn=gaussian)


def run_diabetes(steps: int = 500, splits: int = 5, quick: bool = False) -> dict[str, Any]:
    r"""Per split: the deterministic net, and IVON with the hyperparameters of the best
    validation NLL; returns the test metrics per split."""

    space = {k: v[:1] for k, v in DIABETES_GRID.items()} if quick else DIABETES_GRID
    rows: dict[str, list] = {"deterministic": [], "IVON": []}
    chosen = []
    for seed in range(splits):
        d = diabetes(seed)
        net, seconds = timed(lambda d=d, s=seed: train_deterministic_mlp(d, s, steps))
        with torch.no_grad():
            mean, scale = gaussian(net, d["x_test"])
        scores = regression_metrics(mean[None], scale[None], d["y_test"], d["y_std"])
        rows["deterministic"].append(scores | {"train s": seconds})

        best = None
        for cfg in grid(space):
            (net, opt), seconds = timed(lambda d=d, s=seed, c=cfg: ivon_mlp(d, steps, s, **c))
            val = regression_metrics(
                *posterior_gaussians(net, opt.posterior, d["x_val"]), d["y_val"], d["y_std"]
            )["NLL"]
            if best is None or val < best[0]:
                best = (val, cfg, net, opt, seconds)
        _, cfg, net, opt, seconds = best
        chosen.append(cfg)
        mean, scale = posterior_gaussians(net, opt.posterior, d["x_test"])
        scores = regression_metrics(mean, scale, d["y_test"], d["y_std"])
        rows["IVON"].append(scores | {"train s": seconds})
    return {"chosen": chosen, "rows": rows}


# ---------------------------------------------------------------------------------------------


def table(rows: dict[str, list[dict]], columns: list[str]) -> str:
    r"""Mean ± standard error over seeds or splits, one line per method."""

    lines = [f"{'':>14} | " + " | ".join(f"{c:>15}" for c in columns)]
    for name, runs in rows.items():
        cells = []
        for c in columns:
            values = [r[c] for r in runs]
            se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {se:.4f}".rjust(15))
        lines.append(f"{name:>14} | " + " | ".join(cells))
    return "\n".join(lines)


def ratio(rows: dict[str, list[dict]]) -> float:
    det = statistics.median(r["train s"] for r in rows["deterministic"])
    return statistics.median(r["train s"] for r in rows["IVON"]) / det


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: reduced sizes")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, bayesflow {bf.__version__}, 1 thread")

    result = run_digits(
        epochs=2 if args.quick else 40,
        seeds=2 if args.quick else 3,
        selection_seeds=1 if args.quick else 2,
        quick=args.quick,
    )
    print("\ndigits 0-6, OOD 7-9; IVON's validation NLL per configuration:")
    for nll, cfg in sorted(result["selection"], key=lambda s: s[0]):
        print(f"  {nll:.4f}  {cfg}")
    print(f"chosen: {result['best']}; test (379 images) and OOD (533), mean ± se over seeds:")
    print(table(result["rows"], ["accuracy", "NLL", "ECE", "AUROC", "train s"]))
    print(f"train time, IVON / deterministic: {ratio(result['rows']):.2f}x")

    result = run_diabetes(
        steps=20 if args.quick else 500, splits=2 if args.quick else 5, quick=args.quick
    )
    print("\ndiabetes, heteroscedastic Gaussian MLP; chosen per split:")
    for i, cfg in enumerate(result["chosen"]):
        print(f"  split {i}: {cfg}")
    print("test (110 patients per split), mean ± se over splits:")
    print(table(result["rows"], ["NLL", "RMSE", "RMSE (units)", "train s"]))
    print(f"train time, IVON / deterministic: {ratio(result['rows']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
