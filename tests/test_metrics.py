r"""Tests for bayesflow.metrics: negative log-likelihoods, calibration, coverage, AUROC."""

import importlib.util
import math
import pathlib

from fractions import Fraction

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

    # In the dtype the three promote to, not y's: 2/3 in bfloat16 is 0.668.
    got = bf.interval_coverage(lower[:3].double(), upper[:3].double(), y[1:4].bfloat16())
    assert got.dtype == torch.float64 and torch.allclose(got, torch.tensor(2 / 3).double())


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


# Low precision and large inputs: the oracles in float64 on the very same values.


def _ece_float64(probs, labels, bins):
    r"""The ECE of `probs` (any dtype) from their exact values, with edges k / B."""

    conf, pred = probs.double().max(dim=-1)
    correct = (pred == labels).double()
    ece = 0.0
    for b in range(bins):
        inside = (conf > b / bins) & (conf <= (b + 1) / bins) if b else conf <= 1 / bins
        if inside.any():
            ece += inside.double().mean() * (correct[inside].mean() - conf[inside].mean()).abs()
    return float(ece)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ece_of_many_low_precision_probabilities(dtype, gen):
    # Always 90.625% sure (exact in every dtype), 60% right: an ECE of 0.30625. Sums in
    # the input dtype drifted (float32, a million) or stopped (bfloat16 at 256).
    n = 1_000_000 if dtype == torch.float32 else 2000
    probs = torch.tensor([0.90625, 0.09375], dtype=dtype).expand(n, 2)
    labels = (torch.rand(n, generator=gen(0)) >= 0.6).long()  # about 60% class 0
    right = float((labels == 0).double().mean())

    ece = bf.expected_calibration_error(probs, labels, bins=15)
    curve = bf.calibration_curve(probs, labels, bins=15)

    assert ece.dtype == dtype
    assert abs(float(ece) - abs(0.90625 - right)) <= torch.finfo(dtype).eps
    assert float(curve.confidence[curve.count > 0]) == 0.90625


@pytest.mark.parametrize("bins", [14, 26, 28, 30])
def test_ece_bins_have_the_exact_edges(bins):
    # 0.5 = (bins / 2) / bins belongs to (0.5 - 1 / bins, 0.5]; a float32 linspace put its
    # edge at 0.49999997 and 0.5 in the next bin, with 0.52.
    probs = torch.tensor([[0.5, 0.5], [0.52, 0.48]], dtype=torch.float32)
    labels = torch.tensor([0, 1])
    for p in (probs, probs.double()):
        curve = bf.calibration_curve(p, labels, bins=bins)
        assert curve.count[bins // 2 - 1] == 1 and curve.count[bins // 2] == 1
        ece = bf.expected_calibration_error(p, labels, bins=bins)
        assert abs(float(ece) - _ece_float64(p, labels, bins)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_auroc_of_low_precision_scores(dtype, gen):
    # Ranks above 256 are not exact in bfloat16, and a float16 rank sum overflows (NaN).
    g = gen(1)
    scores = torch.randn(1000, generator=g).to(dtype)
    labels = torch.randint(0, 2, (1000,), generator=g)
    s = scores.double()
    pos, neg = s[labels == 1], s[labels == 0]
    pairs = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()

    got = bf.auroc(scores, labels)

    assert got.dtype == dtype
    assert got == pairs.mean().to(dtype)  # the exact value, rounded once


def test_probabilities_must_sum_to_one_whatever_the_number_of_classes(gen):
    logits = torch.randn(8, 20_000, generator=gen(2), dtype=torch.float32) * 3
    labels = torch.zeros(8, dtype=torch.long)
    good = logits.softmax(-1)
    bf.categorical_nll(good, labels)  # a float32 softmax over 20000 classes
    bf.categorical_nll(good.double(), labels)  # float32 probabilities cast up
    bf.categorical_nll(logits.half().softmax(-1), labels)

    # float32 sums of 1.3: accepted by the old bound, sqrt(eps) per class (0.35)
    bad = torch.full((8, 1000), 1.3 / 1000, dtype=torch.float32)
    for metric in (
        lambda p: bf.categorical_nll(p, labels),
        lambda p: bf.expected_calibration_error(p, labels),
        lambda p: bf.calibration_curve(p, labels),
    ):
        with pytest.raises(ValueError, match="expected probabilities that sum to 1"):
            metric(bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_probabilities_pass_as_they_are_and_cast_up(dtype, gen):
    logits = torch.randn(64, 10, generator=gen(3), dtype=torch.float32) * 2
    labels = torch.randint(0, 10, (64,), generator=gen(4))
    half = logits.to(dtype).softmax(-1)  # after autocast, say
    expected = _ece_float64(half, labels, 15)
    for p in (half, half.float(), half.double()):
        assert abs(float(bf.expected_calibration_error(p, labels)) - expected) < 1e-2
        bf.categorical_nll(p, labels)
    bad = half.float() * 0.95  # off by 5%: not a rounding of the half-precision values
    with pytest.raises(ValueError, match="expected probabilities that sum to 1"):
        bf.categorical_nll(bad, labels)


def test_interval_coverage_refuses_nan(gen):
    # One diverged sample of output 1: its interval is NaN, which compared false (a miss)
    # and passed the lower <= upper check.
    samples = torch.randn(256, 4, generator=gen(0))
    samples[5, 1] = math.nan
    s = bf.summarize(samples, level=0.9)
    y = torch.zeros(4)
    with pytest.raises(ValueError, match="interval_coverage: expected lower without NaN"):
        bf.interval_coverage(s.lower, s.upper, y)

    lower, upper, y = torch.zeros(3), torch.ones(3), torch.full((3,), 0.5)
    nan = torch.tensor([0.0, math.nan, 0.0])
    for name, args in (
        ("lower", (lower + nan, upper, y)),
        ("upper", (lower, upper + nan, y)),
        ("y", (lower, upper, y + nan)),
    ):
        with pytest.raises(ValueError, match=f"interval_coverage: expected {name} without NaN"):
            bf.interval_coverage(*args)
    assert bf.interval_coverage(lower - math.inf, upper + math.inf, y) == 1.0


INTEGERS = [torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32]
INTEGERS += [torch.int64, torch.uint64]


@pytest.mark.parametrize("dtype", INTEGERS, ids=lambda d: str(d)[6:])
def test_every_integer_label_dtype_gives_the_int64_result(dtype, gen):
    probs = torch.randn(50, 4, generator=gen(0)).mul(2).softmax(dim=-1)
    labels = torch.randint(4, (50,), generator=gen(1))
    ours = labels.to(dtype)

    nll = bf.categorical_nll(probs, ours, reduction="none")
    oracle = -probs.double()[torch.arange(50), labels].log()
    assert torch.allclose(nll.double(), oracle, rtol=4 * torch.finfo(probs.dtype).eps)
    assert torch.equal(nll, bf.categorical_nll(probs, labels, reduction="none"))
    ece = bf.expected_calibration_error(probs, ours, bins=7)
    assert math.isclose(float(ece), _ece_float64(probs, labels, 7), abs_tol=1e-6)
    curves = bf.calibration_curve(probs, ours), bf.calibration_curve(probs, labels)
    assert all(torch.equal(a, b) for a, b in zip(*curves, strict=True))

    with pytest.raises(
        ValueError, match=r"categorical_nll: expected labels in \[0, 3\], got .* 4\]"
    ):
        bf.categorical_nll(
            probs, labels.clamp(max=3).index_fill(0, torch.tensor([7]), 4).to(dtype)
        )


def test_labels_beyond_int64_are_refused_as_they_are():
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    big = torch.tensor([0, 2**63 + 5], dtype=torch.uint64)  # -9223372036854775803 as int64
    with pytest.raises(ValueError, match=rf"got values in \[0, {2**63 + 5}\]"):
        bf.categorical_nll(probs, big)
    with pytest.raises(ValueError, match=rf"got values in \[{2**63 + 5}, {2**64 - 1}\]"):
        bf.expected_calibration_error(
            probs, torch.tensor([2**64 - 1, 2**63 + 5], dtype=torch.uint64)
        )


# Probabilities that do not sum to 1, in every dtype.


@pytest.mark.parametrize(
    "metric", ["categorical_nll", "expected_calibration_error", "calibration_curve"]
)
def test_probabilities_exact_in_half_precision_get_no_wider_tolerance(metric):
    # Values exact in bfloat16 got bfloat16's tolerance times 16 + C / 64: 0.125 for
    # any C, more than 1 from C = 6100, so that all zeros passed as probabilities.
    f = getattr(bf, metric)
    refused = [
        torch.tensor([[0.75, 0.125], [0.5, 0.5]], dtype=torch.float32),  # off by 12.5%
        torch.zeros(2, 8192),
        torch.full((2, 1000), 0.8 / 1000).to(torch.bfloat16),  # off by 20%
        torch.full((2, 1000), 0.9 / 1000).to(torch.float16),  # off by 10%
    ]
    for p in refused:
        labels = torch.zeros(p.shape[:-1], dtype=torch.long)
        # The oracle: sums off by 10% or more are no rounding of probabilities.
        assert float((p.double().sum(-1) - 1).abs().max()) >= 0.1
        with pytest.raises(ValueError, match=rf"{metric}: expected probabilities that sum to 1"):
            f(p, labels)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_softmax_and_mean_probs_outputs_pass_in_every_dtype(dtype, gen):
    # Each probability rounded once is off by eps / 2 of itself; mean_probs rounds the
    # log first, which adds eps / 2 of the entropy (up to 5 eps for 20000 classes).
    g = gen(5)
    for classes in (2, 10, 1000, 20_000):
        for scale in (0.0, 0.1, 3.0):
            z = (scale * torch.randn(3, 4, classes, generator=g)).to(dtype)
            labels = torch.randint(classes, (4,), generator=g)
            for p in (z[0].softmax(-1), bf.mean_probs(z)):
                for q in (p, p.float(), p.double()):
                    nll = bf.categorical_nll(q, labels, reduction="none")
                    oracle = -q.double()[torch.arange(4), labels].log()
                    assert torch.allclose(nll.double(), oracle, rtol=torch.finfo(q.dtype).eps)
                    bf.expected_calibration_error(q, labels)


# Calibration bins of a probability on an edge, whatever its dtype.


def _cast_up(p):
    r"""`p`, and `p` cast to float32 and float64 where they are wider."""

    wider = [t for t in (torch.float32, torch.float64) if p.element_size() < t.itemsize]
    return [p, *(p.to(t) for t in wider)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("bins", [10, 15])
def test_a_confidence_on_an_edge_is_in_the_bin_below_in_every_dtype(bins, dtype):
    # float32's 0.8 is 0.800000012 and bfloat16's 0.80078125: they fell in (0.8, 0.9],
    # where float64's 0.8 (0.80000000000000004) fell in (0.7, 0.8].
    for k in range(bins // 3 + 1, bins):  # k / B > 1/3: a confidence of 3 classes or 2
        c = torch.tensor(k / bins).to(dtype)  # the dtype's rounding of k / B
        classes = 2 if 2 * k >= bins else 3
        rest = (1 - c.double()) / (classes - 1)
        probs = torch.cat([c.double().view(1), rest.expand(classes - 1)]).to(dtype)[None]
        labels = torch.tensor([0])
        curve = bf.calibration_curve(probs, labels, bins=bins)
        assert curve.count.tolist() == [int(b == k - 1) for b in range(bins)], (k, probs)
        assert float(curve.confidence[k - 1]) == float(c)
        for p in _cast_up(probs)[1:]:
            # Cast up, the value meets the wider dtype's edges: above k / B there (the
            # oracle, in exact rationals), it is in the bin above.
            above = Fraction(float(p[0, 0])) > Fraction(k, bins)
            expected = k if above else k - 1
            counts = bf.calibration_curve(p, labels, bins=bins).count.tolist()
            assert counts == [int(b == expected) for b in range(bins)], (k, p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_ece_of_edge_confidences_does_not_depend_on_the_dtype(dtype):
    # 0.8 right and 0.85 wrong: two bins, |1 - 0.8| / 2 + |0 - 0.85| / 2 = 0.525 (in
    # float32 both fell in (0.8, 0.9]: |1/2 - 0.825| = 0.325).
    probs = torch.tensor([[0.8, 0.2], [0.85, 0.15]]).to(dtype)
    labels = torch.tensor([0, 1])
    c = probs.double()[:, 0]
    oracle = (0.5 * (1 - c[0]) + 0.5 * c[1]).to(dtype)

    ece = bf.expected_calibration_error(probs, labels, bins=10)
    assert ece.dtype == probs.dtype
    assert abs(float(ece) - float(oracle)) <= torch.finfo(dtype).eps * float(oracle)
    counts = bf.calibration_curve(probs, labels, bins=10).count
    assert counts.tolist() == [0] * 7 + [1, 1, 0]


def _exact_bins(probs, bins):
    r"""The bin of each row's confidence, compared with the edges k / B in exact rationals."""

    return [
        next(b for b in range(bins) if b == bins - 1 or Fraction(c) <= Fraction(b + 1, bins))
        for c in probs.max(dim=-1).values.tolist()
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_row_is_binned_by_its_own_value_not_by_the_other_rows(dtype):
    # Vote fractions of 256 members are exact in bfloat16: when every value of a table was,
    # its edges were bfloat16's, and 205 / 256 = 0.80078125 (bfloat16's 0.8, above 0.8)
    # fell in (0.7, 0.8]; one more row that is not exact in bfloat16 moved it back.
    votes = torch.tensor([205, 205, 205, 205, 154, 154, 230, 230], dtype=torch.float64) / 256
    probs = torch.stack([votes, 1 - votes], -1).to(dtype)
    labels = torch.tensor([0, 0, 0, 1, 0, 1, 0, 0])
    extra = torch.tensor([[0.55 + 1e-7, 0.45 - 1e-7]], dtype=dtype)
    more = torch.cat([probs, extra])

    for p, y in ((probs, labels), (more, torch.cat([labels, torch.tensor([0])]))):
        bins = _exact_bins(p, 10)
        expected = [bins.count(b) for b in range(10)]
        assert bf.calibration_curve(p, y, bins=10).count.tolist() == expected
        oracle = _ece_float64(p, y, 10)
        got = float(bf.expected_calibration_error(p, y, bins=10))
        assert abs(got - oracle) <= 4 * torch.finfo(dtype).eps
    assert _exact_bins(probs, 10)[0] == 8  # 0.80078125 in (0.8, 0.9]

    # The same through mean_probs: 256 one-hot members, float32.
    k = torch.tensor([205, 154, 77, 192, 160])
    members = torch.arange(256)[:, None] < k  # (256, 5): member votes for class 0
    log_probs = torch.stack([members, ~members], -1).to(dtype).log()
    p, y = bf.mean_probs(log_probs), torch.tensor([0, 1, 0, 1, 0])
    assert torch.equal(p[:, 0].double(), k.double() / 256)
    assert abs(float(bf.expected_calibration_error(p, y, bins=10)) - _ece_float64(p, y, 10)) < 1e-6


# The Gaussian NLL: half precision and NaN.


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gaussian_nll_of_half_precision_is_the_rounded_exact_value(dtype, gen):
    # z**2 overflowed in float16 from |z| = 256: inf where the NLL is 44977.
    g = gen(6)
    mean = torch.randn(200, generator=g).to(dtype)
    std = (torch.rand(200, generator=g) * 0.05 + 0.005).to(dtype)
    y = (torch.randn(200, generator=g) * 3).to(dtype)
    mean[0], std[0], y[0] = 0.0, 0.01, 3.0
    exact = -torch.distributions.Normal(mean.double(), std.double()).log_prob(y.double())
    eps = torch.finfo(dtype).eps

    nll = bf.gaussian_nll(mean, std, y, reduction="none")
    assert nll.dtype == dtype and float(exact[0]) > 256**2 / 2
    big = exact.to(dtype).isinf()  # beyond the dtype's range: inf is the rounded value
    assert torch.equal(nll.isinf(), big) and int(big.sum()) < 100
    assert ((nll.double() - exact).abs() <= eps * exact.abs())[~big].all()  # within 1 ulp
    for reduction, value in (("mean", exact.mean()), ("sum", exact.sum())):
        got = bf.gaussian_nll(mean, std, y, reduction=reduction)
        assert got.dtype == dtype
        if value > torch.finfo(dtype).max:
            assert got.isposinf()
        else:
            assert abs(float(got) - float(value)) <= eps * float(value)


def test_gaussian_nll_of_bfloat16_is_finite_to_the_end_of_its_range():
    # bfloat16 has float32's range: z**2 overflowed float32 from |z| = 1.8e19 (inf), where
    # the exact NLL (2e38 at z = 2e19) still fits bfloat16.
    y = torch.tensor([2e19, -1.5e19, 1e19, 2.7e19], dtype=torch.bfloat16)
    mean, std = torch.zeros_like(y), torch.ones_like(y)
    exact = -torch.distributions.Normal(0.0, 1.0).log_prob(y.double())
    fits = ~exact.to(torch.bfloat16).isinf()
    assert fits[:3].all() and not fits[3]  # 2.7e19 gives 3.6e38: beyond bfloat16 too

    nll = bf.gaussian_nll(mean, std, y, reduction="none")
    assert nll.dtype == torch.bfloat16 and torch.equal(nll.isinf(), ~fits)
    assert torch.equal(nll[fits], exact[fits].to(torch.bfloat16))  # rounded once
    half = bf.gaussian_nll(mean[:3], std[:3], y[:3], reduction="mean")
    assert half == exact[:3].mean().to(torch.bfloat16)


def test_gaussian_nll_refuses_nan():
    mean, std, y = torch.zeros(3), torch.ones(3), torch.tensor([0.0, 0.5, 1.0])
    nan = torch.tensor([0.0, math.nan, 0.0])
    for name, args in (
        ("mean", (mean + nan, std, y)),
        ("std", (mean, std + nan, y)),
        ("y", (mean, std, y + nan)),
    ):
        with pytest.raises(
            ValueError, match=rf"gaussian_nll: expected {name} without NaN, got 1 NaN among 3"
        ):
            bf.gaussian_nll(*args)
    # Infinities are values: an observation at infinity is infinitely unlikely.
    inf = bf.gaussian_nll(mean, std, y + torch.tensor([0.0, math.inf, 0.0]), reduction="none")
    assert inf[1] == math.inf and torch.equal(
        inf[[0, 2]], bf.gaussian_nll(mean[[0, 2]], std[[0, 2]], y[[0, 2]], reduction="none")
    )
    # ... but an infinite mean at an infinite observation (or an infinite std and error)
    # has no NLL: it was a silent NaN.
    inf = torch.tensor([0.0, math.inf, 0.0])
    for args in ((mean + inf, std, y + inf), (mean, std + inf, y - inf)):
        with pytest.raises(
            ValueError, match=r"gaussian_nll: expected a defined NLL, got .* at 1 of 3"
        ):
            bf.gaussian_nll(*args)


def test_gaussian_nll_of_float32_is_finite_where_the_exact_value_fits():
    # z**2 overflowed float32 from |z| = 1.8e19, where z**2 / 2 fits up to 2.6e19.
    y = torch.tensor([2e19, -2.5e19, 1e19])
    mean, std = torch.zeros_like(y), torch.ones_like(y)
    exact = -torch.distributions.Normal(0.0, 1.0).log_prob(y.double())
    assert exact.to(torch.float32).isfinite().all()

    nll = bf.gaussian_nll(mean, std, y, reduction="none")
    assert torch.allclose(nll.double(), exact, rtol=1e-6, atol=0)


# Messages, data sets and documentation.


def test_auroc_names_the_labels_that_are_not_binary():
    scores = torch.arange(6.0)
    for labels in (
        torch.tensor([0, 2, 1, 5, 2, 0]),
        torch.tensor([0, 1, 1, -3, 0, 1], dtype=torch.int8),
        torch.tensor([0, 1, 2**64 - 1, 0, 1, 0], dtype=torch.uint64),
    ):
        bad = sorted({int(v) for v in labels.tolist()} - {0, 1})
        count = sum(int(v) not in (0, 1) for v in labels.tolist())
        shown = ", ".join(map(str, bad))
        with pytest.raises(
            ValueError,
            match=rf"auroc: expected binary labels \(bool, 0 or 1\), got {count} of 6 "
            rf"{labels.dtype} labels outside \{{0, 1\}}, of values {shown}$",
        ):
            bf.auroc(scores, labels)
    # A dtype, not a value: TypeError, as the other metrics give (it was a ValueError).
    with pytest.raises(
        TypeError, match=r"auroc: expected binary labels \(bool, 0 or 1\), got torch.float32"
    ):
        bf.auroc(scores, torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float32))


def test_two_moons_takes_any_real_sigma(gen):
    np = pytest.importorskip("numpy")
    x, label = bf.datasets.two_moons(64, sigma=0.25, generator=gen(7))
    for sigma in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25), 0.25):
        y, other = bf.datasets.two_moons(64, sigma=sigma, generator=gen(7))
        assert torch.equal(x, y) and torch.equal(label, other)
    # Its float labels, as integers, feed the metrics.
    probs = torch.stack([1 - label, label], dim=-1) * 0.5 + 0.25
    assert bf.expected_calibration_error(probs, label.long()) == 0.25

    for bad in ("0.1", True, None):
        with pytest.raises(TypeError, match="two_moons: expected sigma to be a number"):
            bf.datasets.two_moons(4, sigma=bad)
    for bad in (-0.1, math.nan, np.float32(math.inf)):
        with pytest.raises(ValueError, match="two_moons: expected a finite sigma >= 0"):
            bf.datasets.two_moons(4, sigma=bad)


ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_metric_is_listed_in_the_readme_and_the_guide():
    metrics = [name for name in bf.metrics.__all__ if name[0].islower()]
    readme = ROOT.joinpath("README.md").read_text()
    guide = ROOT.joinpath("docs", "predictive.md").read_text()
    bullet = readme[readme.index("- **Posterior predictive**") :].split("\n- **")[0]
    table = next(line for line in readme.splitlines() if line.endswith("| metrics |"))
    rows = [line for line in guide.splitlines() if line.startswith("|")]
    for name in metrics:
        assert f"`{name}`" in bullet, name
        assert f"`{name}`" in table, name
        assert any(f"`{name}`" in row for row in rows), name


def test_the_digits_split_sizes_in_the_docs_are_those_of_the_benchmark(monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("_posteriors", ROOT / "benchmarks/posteriors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    split = module.digits()
    n_test, n_ood, n_val = len(split["y_test"]), len(split["x_ood"]), len(split["y_val"])

    text = " ".join(ROOT.joinpath("docs", "posteriors.md").read_text().split())
    assert f"the other 20% ({n_val} images) the validation split" in text
    assert f"NLL and ECE on the {n_test} test digits" in text
    assert f"against the {n_ood} digits 7-9" in text
    assert f"predict the {n_test + n_ood} test and out-of-distribution images" in text


def test_a_tie_for_the_top_class_predicts_the_first():
    # As documented: the prediction is the first class of highest probability.
    probs = torch.tensor([[0.25, 0.375, 0.375], [0.5, 0.5, 0.0]])
    for labels, right in (([1, 0], [1.0, 1.0]), ([2, 1], [0.0, 0.0])):
        curve = bf.calibration_curve(probs, torch.tensor(labels), bins=2)
        assert curve.count.tolist() == [2, 0]
        assert float(curve.accuracy[0]) == sum(right) / 2
