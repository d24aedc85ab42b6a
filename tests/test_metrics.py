r"""Tests for bayesflow.metrics: negative log-likelihoods, calibration, coverage, AUROC."""

import math

import pytest
import torch

import bayesflow as bf


def test_categorical_nll():
    probs = torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]])
    labels = torch.tensor([0, 1, 1])
    hand = torch.tensor([math.log(2), -math.log(0.75), -math.log(0.1)])

    assert torch.allclose(bf.categorical_nll(probs, labels, reduction="none"), hand)
    assert torch.allclose(bf.categorical_nll(probs, labels), hand.mean())
    assert torch.allclose(bf.categorical_nll(probs, labels, reduction="sum"), hand.sum())

    # The model average from per-sample logits: the same as the log-space predictive_nll.
    z = torch.randn(8, 16, 3)
    y = torch.randint(3, (16,))
    lp = z.log_softmax(dim=-1).gather(-1, y.expand(8, 16).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(bf.categorical_nll(bf.mean_probs(z), y), bf.predictive_nll(lp))
    assert torch.allclose(
        bf.categorical_nll(bf.mean_probs(z), y),
        torch.nn.functional.nll_loss(z.softmax(-1).mean(0).log(), y),
    )


def test_gaussian_nll_matches_torch():
    mean, std, y = torch.randn(20), torch.rand(20) + 0.1, torch.randn(20)

    nll = -torch.distributions.Normal(mean, std).log_prob(y)

    assert torch.allclose(bf.gaussian_nll(mean, std, y, reduction="none"), nll)
    assert torch.allclose(bf.gaussian_nll(mean, std, y), nll.mean())
    assert torch.allclose(bf.gaussian_nll(mean, std, y, reduction="sum"), nll.sum())
    assert torch.allclose(
        bf.gaussian_nll(mean, std, y),
        torch.nn.functional.gaussian_nll_loss(mean, y, std.square(), full=True),
    )


def _ece_loop(probs, labels, bins):
    conf, pred = probs.max(dim=-1)
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [i for i in range(len(conf)) if lo < conf[i] <= hi]
        if inside:
            acc = sum(float(pred[i] == labels[i]) for i in inside) / len(inside)
            avg = sum(float(conf[i]) for i in inside) / len(inside)
            ece += len(inside) / len(conf) * abs(acc - avg)
    return ece


def test_ece_hand_example_and_loop():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1])
    # One bin (0.5, 1]: confidence (0.9 + 0.8 + 0.7) / 3 = 0.8, accuracy 2/3.
    assert torch.allclose(
        bf.expected_calibration_error(probs, labels, bins=2), torch.tensor(0.8 - 2 / 3)
    )
    # Ten bins: (0.6, 0.7] holds 0.7 (right), (0.7, 0.8] 0.8 (wrong), (0.8, 0.9] 0.9 (right).
    ten = (0.3 + 0.8 + 0.1) / 3
    assert torch.allclose(bf.expected_calibration_error(probs, labels, bins=10), torch.tensor(ten))

    probs = torch.randn(200, 4).mul(2).softmax(dim=-1)
    labels = torch.randint(4, (200,))
    for bins in (1, 7, 15):
        ece = bf.expected_calibration_error(probs, labels, bins=bins)
        assert math.isclose(float(ece), _ece_loop(probs, labels, bins), abs_tol=1e-6)

    curve = bf.calibration_curve(probs, labels, bins=15)
    assert int(curve.count.sum()) == 200 and curve.count.shape == (15,)


def _calibrated_binary(n, generator):
    u = 0.5 + 0.5 * torch.rand(n, generator=generator)  # the confidence in class 0
    labels = (torch.rand(n, generator=generator) >= u).long()  # class 0 with probability u
    return torch.stack([u, 1 - u], dim=-1), labels


def test_ece_of_a_calibrated_classifier_is_zero(gen):
    n, bins = 20000, 15
    probs, labels = _calibrated_binary(n, gen(0))

    ece = bf.expected_calibration_error(probs, labels, bins=bins)

    # |acc_b - conf_b| has standard error sqrt(sum_i p_i (1 - p_i)) / n_b in bin b.
    conf = probs.max(dim=-1).values
    index = torch.bucketize(conf, torch.linspace(0, 1, bins + 1)[1:-1])
    se = 0.0
    for b in range(bins):
        c = conf[index == b]
        se += float((c * (1 - c)).sum().sqrt()) / n
    assert 0 <= float(ece) < 5 * se


def test_ece_of_an_overconfident_classifier(gen):
    n = 20000
    g = gen(0)
    labels = (torch.rand(n, generator=g) >= 0.6).long()  # 60% class 0
    probs = torch.tensor([0.9, 0.1]).expand(n, 2)  # always 90% sure of class 0

    ece = bf.expected_calibration_error(probs, labels)

    assert abs(float(ece) - 0.3) < 5 * math.sqrt(0.6 * 0.4 / n)


def test_interval_coverage_hand_example():
    lower, upper = torch.zeros(5), torch.ones(5)
    y = torch.tensor([0.0, 0.5, 1.0, 1.5, -0.1])

    assert torch.allclose(bf.interval_coverage(lower, upper, y), torch.tensor(0.6))


@pytest.mark.parametrize("level", [0.5, 0.9])
def test_interval_coverage_of_exact_gaussian_quantiles(level, gen):
    n = 20000
    g = gen(0)
    mean, std = torch.randn(n, generator=g), torch.rand(n, generator=g) + 0.5
    y = mean + std * torch.randn(n, generator=g)
    z = math.sqrt(2) * torch.erfinv(torch.tensor(level))

    coverage = bf.interval_coverage(mean - z * std, mean + z * std, y)

    assert abs(float(coverage) - level) < 5 * math.sqrt(level * (1 - level) / n)


def test_auroc_against_the_pairwise_definition(gen):
    g = gen(0)
    scores = torch.randint(0, 6, (40,), generator=g).double()  # many ties
    labels = torch.randint(0, 2, (40,), generator=g)

    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    assert torch.allclose(bf.auroc(scores, labels), pairs.mean(), atol=1e-12)
    assert bf.auroc(torch.tensor([0.0, 1.0]), torch.tensor([False, True])) == 1.0
    assert bf.auroc(torch.tensor([1.0, 0.0]), torch.tensor([0, 1])) == 0.0

    with pytest.raises(ValueError, match="auroc: expected at least one positive and one negative"):
        bf.auroc(torch.tensor([0.0, 1.0]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="auroc: expected binary labels"):
        bf.auroc(torch.tensor([0.0, 1.0]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="auroc: expected scores and labels of the same shape"):
        bf.auroc(torch.tensor([0.0, 1.0]), torch.tensor([0, 1, 1]))
