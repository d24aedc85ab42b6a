r"""Metrics of predictive distributions: negative log-likelihoods, calibration of a
classifier, and coverage of predictive intervals."""

from __future__ import annotations

__all__ = [
    "CalibrationCurve",
    "auroc",
    "calibration_curve",
    "categorical_nll",
    "expected_calibration_error",
    "gaussian_nll",
    "interval_coverage",
]

import math

from typing import NamedTuple

import torch

from torch import Tensor

from ._checks import (
    check_float,
    check_int,
    check_labels,
    check_probs,
    check_same_shape,
    check_tensor,
    reduce,
)


def gaussian_nll(mean: Tensor, std: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    r"""Returns the negative log-likelihood of observations under Gaussian predictions,

    .. math:: -\log \mathcal{N}(y \mid \mu, \sigma^2) = \frac{1}{2} \log(2 \pi \sigma^2)
        + \frac{(y - \mu)^2}{2 \sigma^2},

    with every constant included. For a moment-matched predictive, pass the outputs of
    :func:`predictive_mean` and :func:`predictive_std`.

    Half-precision inputs are computed in float32 (bfloat16, whose range is float32's, in
    float64) and the result rounded once, so it is finite wherever the exact value fits
    the dtype. A NaN mean, standard deviation or observation (e.g. the summary of an
    output whose samples include a NaN, from :func:`summarize`) is an error, as in
    :func:`interval_coverage`.

    Example:
        >>> gaussian_nll(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([0.0]))
        tensor(0.9189)

    Arguments:
        mean: The predictive means :math:`\mu`, with shape `(*)`.
        std: The predictive standard deviations :math:`\sigma > 0`, with shape `(*)`.
        y: The observations, with shape `(*)`.
        reduction: `'mean'` or `'sum'` over the observations, or `'none'`.

    Returns:
        A scalar, or a tensor of shape `(*)` if `reduction` is `'none'`.
    """

    where = "gaussian_nll"
    for name, t in (("mean", mean), ("std", std), ("y", y)):
        check_float(where, name, check_tensor(where, name, t, min_dim=0))
    out = torch.promote_types(torch.promote_types(mean.dtype, std.dtype), y.dtype)
    check_same_shape(where, mean=mean, std=std, y=y)
    _check_no_nan(where, mean=mean, std=std, y=y)
    if std.numel() > 0 and not (std > 0).all():
        raise ValueError(f"{where}: expected std > 0, got a minimum of {float(std.min())}")

    # In at least float32, rounded once: in float16, z**2 overflowed from |z| = 256
    # (and the sum of a batch from 65504) where the NLL itself is far below that. bfloat16
    # reaches float32's range: z**2 overflowed float32 from |z| = 1.8e19, where the NLL of
    # bfloat16 ends at 3.4e38, so it takes float64.
    bf16 = torch.bfloat16 in (mean.dtype, std.dtype, y.dtype)
    mean, std, y = (
        t.to(torch.float64 if bf16 else torch.promote_types(t.dtype, torch.float32))
        for t in (mean, std, y)
    )
    z = (y - mean) / std
    nll = (0.5 * z) * z + std.log() + 0.5 * math.log(2 * math.pi)  # z^2 / 2 overflows later
    if nll.isnan().any():  # only from infinities: inf - inf, inf / inf
        raise ValueError(
            f"{where}: expected a defined NLL, got infinite values of mean, std or y that "
            f"leave it undefined (inf - inf or inf / inf) at {int(nll.isnan().sum())} of "
            f"{nll.numel()} positions"
        )

    return reduce(where, nll, reduction).to(out)


def _check_no_nan(where: str, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.isnan().any():
            raise ValueError(
                f"{where}: expected {name} without NaN, got {int(t.isnan().sum())} NaN among "
                f"{t.numel()} values"
            )


def categorical_nll(probs: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    r"""Returns the negative log-likelihood :math:`-\log p(y)` of labels under class
    probabilities.

    For the model average of per-sample logits, :func:`predictive_nll` of the gathered
    per-sample log-probabilities gives the same numbers in log-space, robust to
    probabilities that underflow (and NaN for a NaN, which this refuses).

    Example:
        >>> probs = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
        >>> categorical_nll(probs, torch.tensor([0, 1]), reduction="none")
        tensor([0.6931, 0.2877])

    Arguments:
        probs: Probabilities that sum to 1 on the last dim, with shape `(*, C)`, e.g. from
            :func:`mean_probs`.
        labels: Integer labels in :math:`[0, C)`, of any integer dtype, with shape `(*)`.
        reduction: `'mean'` or `'sum'` over the observations, or `'none'`.

    Returns:
        A scalar, or a tensor of shape `(*)` if `reduction` is `'none'`.
    """

    where = "categorical_nll"
    p = check_probs(where, probs)
    y = check_labels(where, labels, p.shape[:-1], p.shape[-1])
    nll = -p.gather(-1, y.unsqueeze(-1)).squeeze(-1).log()

    return reduce(where, nll, reduction)


class CalibrationCurve(NamedTuple):
    r"""A reliability diagram, from :func:`calibration_curve`.

    Attributes:
        confidence: The mean confidence in each bin (0 where empty), with shape `(bins,)`.
        accuracy: The accuracy in each bin (0 where empty), with shape `(bins,)`.
        count: The number of predictions in each bin, with shape `(bins,)`.
    """

    confidence: Tensor
    accuracy: Tensor
    count: Tensor


def calibration_curve(probs: Tensor, labels: Tensor, bins: int = 15) -> CalibrationCurve:
    r"""Bins predictions by confidence, :math:`\max_c p_c`, into `bins` equal-width bins
    :math:`((b - 1) / B, b / B]`, and returns each bin's mean confidence and accuracy. The
    prediction is the class of highest probability, the first of them on a tie.

    A confidence on an edge :math:`k / B` belongs to the bin below it,
    :math:`((k - 1) / B, k / B]` (the first bin takes 0), and so does the rounding of
    :math:`k / B` to the dtype of `probs`: 0.8 is in :math:`(0.7, 0.8]` for `bins=10` in
    every dtype, though float32's 0.8 is 0.800000012 and bfloat16's 0.80078125. Each
    confidence is compared with the edges of its own dtype, whatever the other rows hold:
    probabilities cast up to a wider dtype meet that dtype's edges (bfloat16's 0.8 cast to
    float32 is 0.80078125, above float32's 0.8, in :math:`(0.8, 0.9]`), so compute the
    curve in the dtype the probabilities were computed in.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
        >>> calibration_curve(probs, torch.tensor([0, 1, 1]), bins=2)
        CalibrationCurve(confidence=tensor([0.0000, 0.8000]), accuracy=tensor([0.0000, 0.6667]), count=tensor([0, 3]))

    Arguments:
        probs: Probabilities that sum to 1 on the last dim, with shape `(*, C)`.
        labels: Integer labels in :math:`[0, C)`, of any integer dtype, with shape `(*)`.
        bins: The number of bins `B >= 1`.

    Returns:
        A :class:`CalibrationCurve`.
    """  # noqa: E501

    curve = _calibration_curve("calibration_curve", probs, labels, bins)
    dtype = probs.dtype  # computed in float64, rounded once
    return curve._replace(confidence=curve.confidence.to(dtype), accuracy=curve.accuracy.to(dtype))


def _calibration_curve(where: str, probs: Tensor, labels: Tensor, bins: int) -> CalibrationCurve:
    bins = check_int(where, "bins", bins)
    p = check_probs(where, probs)
    y = check_labels(where, labels, p.shape[:-1], p.shape[-1])
    if y.numel() == 0:
        raise ValueError(f"{where}: expected at least one prediction, got none")

    # In float64: sums of a million float32 confidences drift, a bfloat16 sum stops at 256,
    # and the edges k / B are then correctly rounded (a float32 linspace put 0.5 above
    # 7 / 14). Every value of a narrower dtype is exact in float64.
    acc = torch.float64
    conf, pred = p.reshape(-1, p.shape[-1]).max(dim=-1)
    conf = conf.to(acc)
    correct = (pred == y.reshape(-1)).to(acc)

    # The edges k / B as the probabilities' dtype writes them: float32's 0.8 is above
    # float64's, and fell in (0.8, 0.9] where float64's 0.8 fell in (0.7, 0.8]. The dtype
    # of `probs`, not one guessed from its values: a guess made for the whole table (all
    # values exact in bfloat16: bfloat16's edges) moved a row by what the others held.
    edges = (torch.arange(1, bins, dtype=acc, device=p.device) / bins).to(p.dtype).to(acc)
    index = torch.bucketize(conf.detach(), edges, right=False)  # (lo, hi]

    count = torch.zeros(bins, dtype=torch.long, device=p.device).index_add_(
        0, index, torch.ones_like(index)
    )
    total_conf = torch.zeros(bins, dtype=acc, device=p.device).index_add(0, index, conf)
    total_correct = torch.zeros(bins, dtype=acc, device=p.device).index_add(0, index, correct)
    denom = count.clamp(min=1).to(acc)

    return CalibrationCurve(total_conf / denom, total_correct / denom, count)


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> Tensor:
    r"""Returns the expected calibration error of a classifier,

    .. math:: \mathrm{ECE} = \sum_{b=1}^B \frac{n_b}{N} \left| \mathrm{acc}_b -
        \mathrm{conf}_b \right|,

    over `bins` equal-width confidence bins (see :func:`calibration_curve`). A
    calibrated classifier scores about 0 (plus a positive bias of order
    :math:`\sqrt{B / N}`); one that is always 90% sure and 60% right, 0.3.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
        >>> expected_calibration_error(probs, torch.tensor([0, 1, 1]), bins=2)
        tensor(0.1333)

    Arguments:
        probs: Probabilities that sum to 1 on the last dim, with shape `(*, C)`, e.g. from
            :func:`mean_probs`.
        labels: Integer labels in :math:`[0, C)`, of any integer dtype, with shape `(*)`.
        bins: The number of bins `B >= 1`.

    Returns:
        A scalar tensor, in :math:`[0, 1]`.

    References:
        | On Calibration of Modern Neural Networks (Guo et al., 2017)
        | https://arxiv.org/abs/1706.04599
    """

    curve = _calibration_curve("expected_calibration_error", probs, labels, bins)
    weight = curve.count.to(curve.confidence.dtype) / curve.count.sum()

    return (weight * (curve.accuracy - curve.confidence).abs()).sum().to(probs.dtype)


def interval_coverage(lower: Tensor, upper: Tensor, y: Tensor) -> Tensor:
    r"""Returns the fraction of observations inside their predictive interval,
    :math:`\frac{1}{N} \sum_i [l_i \leq y_i \leq u_i]`.

    For calibrated intervals of probability `level` (e.g. from
    :func:`predictive_interval`), it is about `level`, within a standard error of
    :math:`\sqrt{\mathrm{level} (1 - \mathrm{level}) / N}`.

    A NaN bound or observation (e.g. the interval of an output whose samples include a
    NaN, from :func:`summarize`) is an error, not a miss.

    Example:
        >>> lower, upper = torch.tensor([0.0, 0.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])
        >>> interval_coverage(lower, upper, torch.tensor([0.5, 1.0, 1.5, -0.1]))
        tensor(0.5000)

    Arguments:
        lower: The lower bounds, with shape `(*)`.
        upper: The upper bounds, with shape `(*)`, no less than `lower`.
        y: The observations, with shape `(*)`.

    Returns:
        A scalar tensor, in :math:`[0, 1]`.
    """

    where = "interval_coverage"
    for name, t in (("lower", lower), ("upper", upper), ("y", y)):
        check_float(where, name, check_tensor(where, name, t, min_dim=0))
    check_same_shape(where, lower=lower, upper=upper, y=y)
    if y.numel() == 0:
        raise ValueError(f"{where}: expected at least one observation, got none")
    # A NaN compares false: it would count as a miss, and pass the check below.
    _check_no_nan(where, lower=lower, upper=upper, y=y)
    if (lower > upper).any():
        raise ValueError(f"{where}: expected lower <= upper, got lower > upper somewhere")

    inside = (lower <= y) & (y <= upper)
    dtype = torch.promote_types(torch.promote_types(lower.dtype, upper.dtype), y.dtype)

    return inside.to(dtype).mean()


def auroc(scores: Tensor, labels: Tensor) -> Tensor:
    r"""Returns the area under the ROC curve of `scores` separating positive from negative
    labels: the probability that a random positive scores higher than a random negative,
    ties counting one half (the Mann-Whitney statistic).

    For out-of-distribution detection, the scores are an uncertainty (e.g.
    :func:`predictive_entropy` or :func:`mutual_information`) and the positives the
    out-of-distribution inputs: 1 separates them perfectly, 0.5 is chance.

    Example:
        >>> auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        tensor(0.7500)

    Arguments:
        scores: The scores, with shape `(N,)`, floating-point.
        labels: Binary labels (`bool`, or integers in :math:`\{0, 1\}`), with shape `(N,)`,
            with at least one of each.

    Returns:
        A scalar tensor, in :math:`[0, 1]`, of the dtype of `scores`.

    References:
        | The meaning and use of the area under a receiver operating characteristic (ROC)
        | curve (Hanley et al., 1982) https://doi.org/10.1148/radiology.143.1.7063747
    """

    where = "auroc"
    s = check_float(where, "scores", check_tensor(where, "scores", scores, min_dim=1))
    y = check_tensor(where, "labels", labels, min_dim=1)
    if s.dim() != 1 or y.shape != s.shape:
        raise ValueError(
            f"{where}: expected scores and labels of the same shape (N,), got "
            f"{tuple(s.shape)} and {tuple(y.shape)}"
        )
    if y.is_floating_point() or y.is_complex():
        raise TypeError(f"{where}: expected binary labels (bool, 0 or 1), got {y.dtype} labels")
    binary = (y == 0) | (y == 1)
    if not binary.all():
        # Through Python ints: torch neither sorts nor reduces uint16, uint32 and uint64.
        bad = sorted(set(y[~binary].tolist()))
        shown = ", ".join(str(v) for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ValueError(
            f"{where}: expected binary labels (bool, 0 or 1), got {int((~binary).sum())} of "
            f"{y.numel()} {y.dtype} labels outside {{0, 1}}, of values {shown}"
        )
    if torch.isnan(s).any():
        raise ValueError(f"{where}: expected scores without NaN, got some")
    positive = y.bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"{where}: expected at least one positive and one negative label, got {n_pos} "
            f"positives and {n_neg} negatives"
        )

    # Average ranks (ties share the mean of their ranks), then Mann-Whitney's U, in
    # float64: ranks above 256 are not exact in bfloat16, and float16 sums overflow.
    order = s.argsort()
    sorted_s = s[order]
    _, inverse, counts = torch.unique_consecutive(
        sorted_s, return_inverse=True, return_counts=True
    )
    ends = counts.cumsum(0).to(torch.float64)
    mean_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty(s.shape, dtype=torch.float64, device=s.device)
    ranks[order] = mean_rank[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2

    return (u / (n_pos * n_neg)).to(s.dtype)
