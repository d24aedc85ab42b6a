r"""Posteriors on digits over several training seeds, each against the deterministic net of
the same seed: which differences are larger than the noise of training.

    python benchmarks/seeds.py --threads 1    # 5 seeds, the CNN and the MLP (about 2 minutes)
    python benchmarks/seeds.py --quick        # a few seconds, reduced sizes

The split is posteriors.py's and stays fixed (digits 0-6: 708 training, 177 validation and 379
test images; the 533 digits 7-9 out of distribution); only the training seed changes. Per seed,
for the CNN of notebook 05 and the MLP of posteriors.py: the deterministic net (Adam, 40
epochs, the seed its initialization, batches and dropout); temperature scaling of its logits;
last-layer Laplace with the probit and with the sampled predictive, the prior precision (and,
for the probit, the curvature temperature) by the validation NLL; SWAG-diagonal, its learning
rate and scale by the validation NLL (its SGD runs use posteriors.py's seed 0 whatever the
training seed), and SWA, its mean alone. On the CNN also IVON from scratch with the recipe of
notebook 07 (lr 2, hess_init 1, clip_radius 0.003, 40 epochs, one sample per step), which
benchmarks/ivon_quality.py chose for this CNN on validation folds of the training images; the
MLP has no IVON row. IVON trains by ivon_quality.py's `ivon_cnn`, whose batches come from
another random stream than notebook 07's: seed 0 is not that notebook's run. The scores are
posteriors.py's: accuracy, NLL and ECE on the test digits, OOD AUROC of the predictive
entropy, K = 32 samples. Then the mean ± standard error over the seeds, and the paired
differences from the deterministic net of the same seed.

The clip radius of that recipe is compared on the validation split alone: IVON on the CNN
with no clip, 0.003 and 0.01 (lr 2, hess_init 1), the validation accuracy, NLL and ECE per
seed.

Nothing is chosen on the test set or on the digits 7-9.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ivon_quality import classification_metrics, ivon_cnn, posterior_logits, table
from posteriors import (
    MODELS,
    SCORES,
    choose_laplace,
    choose_swag,
    digits,
    fit_laplace,
    logit_temperature,
    probit_log_probs,
    sampled_logits,
    scores,
    train_deterministic,
)
from posteriors_tools import TEMPERATURES, note, tempered

import bayesflow as bf

from bayesflow.cli import _positive_int

#: Notebook 07's IVON recipe for the digits CNN (`ivon_quality.DIGITS_GRID`'s choice).
IVON = {"lr": 2.0, "hess_init": 1.0, "clip_radius": 0.003}
#: The clip radii compared on the validation split (`math.inf`: no clip).
CLIPS = (math.inf, 0.003, 0.01)


def seed_rows(
    model: str,
    split: dict[str, torch.Tensor],
    seed: int,
    epochs: int,
    swag_epochs: int,
    k: int,
    temperatures: tuple[float, ...],
) -> tuple[dict[str, dict], dict[str, str]]:
    r"""Trains and scores every method for one training seed; returns `{method: scores}` and
    `{method: the choices made on the validation split}`."""

    x_eval = torch.cat((split["x_test"], split["x_ood"]))
    y_test = split["y_test"]
    det = train_deterministic(MODELS[model], split["x_fit"], split["y_fit"], epochs, seed)
    with torch.no_grad():
        z = det(x_eval).unsqueeze(0)
    rows = {"deterministic": scores(z, y_test)}

    scaled = logit_temperature(det, split["x_val"], split["y_val"])
    rows["temperature"] = scores(z / scaled["logit temperature"], y_test)
    choices = {"temperature": f"T {note(scaled['logit temperature'])}"}

    fit, _, _ = fit_laplace(det, split["x_fit"], split["y_fit"], ("out",))
    predict = {
        "probit": lambda q: probit_log_probs(det, q, x_eval),
        "sampled": lambda q: sampled_logits(det, q, x_eval, k),
    }
    for name, fn in predict.items():
        extra = choose_laplace(
            det, fit, split["x_val"], split["y_val"], name, k,
            temperatures if name == "probit" else (1.0,),
        )  # fmt: skip
        q = bf.laplace_posterior(tempered(fit, extra["temperature"]), extra["prior precision"])
        rows[f"LL {name}"] = scores(fn(q), y_test)
        choices[f"LL {name}"] = (
            f"lambda {note(extra['prior precision'])}, T {note(extra['temperature'])}"
            + (f", edge {extra['edge']}" if extra["edge"] else "")
        )

    choice, swag, last = choose_swag(det, split, swag_epochs, k)
    mean_net = swag.mean_model(last)
    rows["SWAG"] = scores(
        sampled_logits(mean_net, swag.posterior(scale=choice["scale"]), x_eval, k), y_test
    )
    with torch.no_grad():
        rows["SWA"] = scores(mean_net(x_eval).unsqueeze(0), y_test)
    choices["SWAG"] = f"lr {note(choice['lr'])}, scale {note(choice['scale'])}"

    if model == "cnn":
        net, opt = ivon_cnn(None, split["x_fit"], split["y_fit"], epochs, seed, **IVON)
        rows["IVON"] = scores(sampled_logits(net, opt.posterior, x_eval, k), y_test)
    return rows, choices


def clip_scores(
    split: dict[str, torch.Tensor], seed: int, epochs: int, k: int
) -> dict[float, dict[str, float]]:
    r"""IVON on the CNN with each clip radius of `CLIPS` (notebook 07's lr and hess_init):
    accuracy, NLL and ECE on the validation split."""

    out = {}
    for clip in CLIPS:
        hyper = {**IVON, "clip_radius": clip}
        net, opt = ivon_cnn(None, split["x_fit"], split["y_fit"], epochs, seed, **hyper)
        logits = posterior_logits(net, opt.posterior, split["x_val"], k)
        out[clip] = classification_metrics(logits, split["y_val"])
    return out


def radius(clip: float) -> str:
    return "none" if clip == math.inf else f"{clip:g}"


def mean_se(values: list[float]) -> str:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.4f} ± {se:.4f}"


def print_differences(rows: dict[str, list[dict]]) -> None:
    r"""Per method, the difference of each score from the deterministic net's of the same
    seed: mean ± standard error over the seeds, and on how many seeds it is lower."""

    det = rows["deterministic"]
    n = len(det)
    print(f"{'minus deterministic':>19} | " + " | ".join(f"{c:>28}" for c in SCORES))
    for name, runs in rows.items():
        if name == "deterministic":
            continue
        cells = []
        for c in SCORES:
            d = [r[c] - b[c] for r, b in zip(runs, det, strict=True)]
            lower = sum(x < 0 for x in d)
            cells.append(f"{mean_se(d)} ({lower}/{n} lower)".rjust(28))
        print(f"{name:>19} | " + " | ".join(cells))
    for name, runs in rows.items():
        if name != "deterministic":
            d = [r["NLL"] - b["NLL"] for r, b in zip(runs, det, strict=True)]
            print(f"{name:>19}   NLL per seed: " + ", ".join(f"{x:+.4f}" for x in d))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=_positive_int, default=5, help="training seeds 0, 1, ...")
    parser.add_argument("--threads", type=_positive_int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 seeds, 2 epochs, K = 4")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    seeds = min(args.seeds, 2) if args.quick else args.seeds
    epochs, swag_epochs, k = (2, 3, 4) if args.quick else (40, 20, 32)
    temperatures = (1.0, 0.1) if args.quick else TEMPERATURES
    split = digits()
    start = time.perf_counter()
    print(
        f"digits 0-6 against 7-9, seeds 0-{seeds - 1}, {epochs} epochs, K = {k}, torch "
        f"{torch.__version__}, bayesflow {bf.__version__}, {torch.get_num_threads()} thread(s)"
    )
    print(
        "LL: Laplace over the last layer, lambda (and T) by validation; temperature: of the "
        "logits, on validation;\nSWA: SWAG's mean alone; IVON: notebook 07's recipe (CNN only)"
    )

    for model in ("cnn", "mlp"):
        rows: dict[str, list[dict]] = {}
        print(f"\n{model}, per seed (test: accuracy, NLL, ECE; OOD AUROC):")
        for seed in range(seeds):
            result, choices = seed_rows(
                model, split, seed, epochs, swag_epochs, k, temperatures
            )  # fmt: skip
            for name, r in result.items():
                rows.setdefault(name, []).append(r)
                cells = " ".join(f"{r[c]:.4f}" for c in SCORES)
                extra = f"  ({choices[name]})" if name in choices else ""
                print(f"  seed {seed} {name:>13}: {cells}{extra}")
            print(f"  ({math.ceil(time.perf_counter() - start)} s so far)", flush=True)
        print(f"\n{model}, mean ± standard error over {seeds} seeds:")
        print(table(rows, list(SCORES)))
        print()
        print_differences(rows)

    print("\ncnn, IVON's clip radius on the validation split (177 images), lr 2, hess_init 1:")
    clips: dict[float, list[dict]] = {}
    for seed in range(seeds):
        for clip, r in clip_scores(split, seed, epochs, k).items():
            clips.setdefault(clip, []).append(r)
            cells = ", ".join(f"{c} {r[c]:.4f}" for c in ("accuracy", "NLL", "ECE"))
            print(f"  seed {seed}, clip_radius {radius(clip)}: {cells}", flush=True)
    print(f"mean ± standard error over {seeds} seeds:")
    print(table({f"clip {radius(c)}": v for c, v in clips.items()}, ["accuracy", "NLL", "ECE"]))
    print(f"\n{math.ceil(time.perf_counter() - start)} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
