r"""Posterior-predictive summaries, model averages and a classifier's uncertainty, over a
leading sample dim.

Every function takes tensors whose dim 0 indexes `K` posterior samples (or the members of
a deep ensemble), as returned by :func:`bayesflow.vmap_call`, and reduces over it.

A NaN propagates, and is not an error: the summaries of an output whose samples include a
NaN are NaN, and so are the probabilities, entropies and mutual information of an input
whose logits include a NaN or a :math:`+\infty` (in some sample), as with
:func:`torch.log_softmax`; the metrics then refuse them. An empty batch (no outputs)
gives empty summaries, as :func:`torch.mean` does; :func:`predictive_nll` refuses it, as
every mean over observations does.
"""

from __future__ import annotations

__all__ = [
    "ClassificationSummary",
    "Summary",
    "classification_summary",
    "expected_entropy",
    "log_mean_probs",
    "mean_probs",
    "mixture_log_prob",
    "mutual_information",
    "predictive_entropy",
    "predictive_interval",
    "predictive_mean",
    "predictive_nll",
    "predictive_quantiles",
    "predictive_std",
    "summarize",
]

from collections.abc import Sequence
from typing import NamedTuple

import torch

from torch import Tensor

from ._checks import check_int, check_level, check_samples, reduce
from ._numerics import accumulator, log_mean_exp

# Summaries over the sample dim.


def predictive_mean(samples: Tensor) -> Tensor:
    r"""Returns the predictive mean :math:`\frac{1}{K} \sum_k y_k` over the sample dim.

    Example:
        >>> predictive_mean(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        tensor([2., 4.])

    Arguments:
        samples: Predictions, with shape `(K, *)`.

    Returns:
        The mean, with shape `(*)`.
    """

    return check_samples("predictive_mean", samples).mean(dim=0)


def predictive_std(samples: Tensor, correction: int = 1) -> Tensor:
    r"""Returns the predictive standard deviation over the sample dim.

    Example:
        >>> predictive_std(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
        tensor([1.4142, 2.8284])

    Arguments:
        samples: Predictions, with shape `(K, *)`.
        correction: The difference between `K` and the divisor, as in :func:`torch.std`:
            `1` for the unbiased estimate, `0` for the population one.

    Returns:
        The standard deviation, with shape `(*)`.
    """

    x = check_samples("predictive_std", samples)
    correction = check_int("predictive_std", "correction", correction, minimum=0)
    if x.shape[0] <= correction:
        raise ValueError(
            f"predictive_std: expected more than correction = {correction} samples on dim 0, "
            f"got {x.shape[0]}"
        )

    return _std(x, correction)


def _std(x: Tensor, correction: int) -> Tensor:
    # torch.std warns of "degrees of freedom <= 0" on an empty batch, whatever K is.
    return x.std(dim=0, correction=correction) if x.numel() > 0 else x.sum(dim=0)


def _quantiles(x: Tensor, q: Tensor) -> Tensor:
    # Linear interpolation between order statistics, as `torch.quantile`, which refuses
    # inputs of more than 2**24 elements: K = 256 samples of a 256 x 256 image already are.
    # The positions in float64 (in half precision q = 0.999 rounds to 1, the maximum),
    # the interpolation in at least float32, rounded once.
    k = x.shape[0]
    xs = x.sort(dim=0).values
    pos = q.to(torch.float64) * (k - 1)
    lo = pos.floor().long().clamp(0, k - 1)
    hi = pos.ceil().long().clamp(0, k - 1)
    wide = torch.promote_types(x.dtype, torch.float32)
    frac = (pos - lo.to(torch.float64)).to(wide).view(-1, *(1,) * (x.dim() - 1))

    below, above = xs[lo], xs[hi]
    a, b = below.to(wide), above.to(wide)
    out = torch.lerp(a, b, frac)
    # lerp takes b - a, which overflows between finite order statistics of opposite signs
    # near the ends of the range: the weighted sum does not.
    far = (b - a).isinf() & a.isfinite() & b.isfinite()
    if far.any():
        out = torch.where(far, a * (1 - frac) + b * frac, out)
    out = out.to(x.dtype)
    # Towards an infinite order statistic the quantile is infinite, and on one or between
    # equal ones there is nothing to interpolate: lerp gives inf - inf = NaN there.
    up, down = above.isposinf(), below.isneginf()
    out = torch.where(up & ~down, above, out)
    out = torch.where(down & ~up, below, out)
    out = torch.where((below == above) | (frac == 0), below, out)

    # As `torch.quantile`: a slice with a NaN has NaN quantiles (sort puts NaN last).
    nan = x.isnan().any(dim=0)
    return out.masked_fill(nan, float("nan")) if nan.any() else out


def _is_complex(q: object) -> bool:
    # torch.as_tensor casts a complex tensor or array to a real dtype with a warning only,
    # dropping the imaginary part.
    if isinstance(q, Tensor):
        return q.is_complex()
    return getattr(getattr(q, "dtype", None), "kind", None) == "c"


def _has_bools(q: object) -> bool:
    # torch.as_tensor takes True for 1.0: a probability no one meant.
    if isinstance(q, bool):
        return True
    dtype = getattr(q, "dtype", None)  # tensors, NumPy arrays and scalars
    if dtype is not None:
        return dtype == torch.bool or getattr(dtype, "kind", None) == "b"
    if isinstance(q, Sequence) and not isinstance(q, (str, bytes)):
        return any(_has_bools(v) for v in q)
    return False


def predictive_quantiles(samples: Tensor, q: float | Sequence[float] | Tensor) -> Tensor:
    r"""Returns quantiles of the predictive distribution over the sample dim.

    The quantiles interpolate linearly between order statistics, as :func:`torch.quantile`
    (and numpy's default), but with no limit on the size of `samples`. As there, an
    output whose samples include a NaN is NaN.

    Example:
        >>> x = torch.arange(5.0).unsqueeze(-1)  # K = 5 samples of one output
        >>> predictive_quantiles(x, [0.25, 0.5, 0.9])
        tensor([[1.0000],
                [2.0000],
                [3.6000]])

    Arguments:
        samples: Predictions, with shape `(K, *)`.
        q: The probabilities, in :math:`[0, 1]`: a float (or a 0-d tensor or array) or a
            1-d sequence of `Q` floats; not bools.

    Returns:
        The quantiles, with shape `(*)` if `q` is a float, else `(Q, *)`.
    """

    where = "predictive_quantiles"
    x = check_samples(where, samples)

    if _has_bools(q):
        raise TypeError(
            f"{where}: expected q to be a float or a sequence of floats, got bools in {q!r}"
        )
    if _is_complex(q):
        raise TypeError(f"{where}: expected q to be real, got complex values {q!r}")
    try:
        qs = torch.as_tensor(q, dtype=torch.float64, device=x.device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{where}: expected q to be a float or a sequence of floats, got {q!r}"
        ) from None
    if qs.dim() > 1:
        raise ValueError(f"{where}: expected q to be a float or 1-d, got shape {tuple(qs.shape)}")
    if qs.numel() == 0:
        raise ValueError(f"{where}: expected at least one probability in q, got none")
    if not ((qs >= 0) & (qs <= 1)).all():
        raise ValueError(f"{where}: expected q in [0, 1], got {qs.tolist()}")

    out = _quantiles(x, qs.reshape(-1))

    return out[0] if qs.dim() == 0 else out


def predictive_interval(samples: Tensor, level: float = 0.9) -> tuple[Tensor, Tensor]:
    r"""Returns the equal-tailed predictive interval of probability `level`.

    Its bounds are the quantiles :math:`(1 - \alpha) / 2` and :math:`(1 + \alpha) / 2`
    for :math:`\alpha` = `level`, from :func:`predictive_quantiles`.

    Example:
        >>> x = torch.arange(5.0)  # K = 5 samples of a scalar
        >>> predictive_interval(x, level=0.5)
        (tensor(1.), tensor(3.))

    Arguments:
        samples: Predictions, with shape `(K, *)`.
        level: The probability mass inside the interval, in :math:`(0, 1)`: a real number
            (Python or NumPy) or a tensor of one element.

    Returns:
        The lower and upper bounds, each with shape `(*)`.
    """

    where = "predictive_interval"
    x = check_samples(where, samples)
    level = check_level(where, level)

    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64, device=x.device)
    lower, upper = _quantiles(x, q)

    return lower, upper


class Summary(NamedTuple):
    r"""A summary of the predictive distribution, from :func:`summarize`.

    Attributes:
        mean: The predictive mean, with shape `(*)`.
        std: The predictive standard deviation, with shape `(*)`.
        median: The predictive median, with shape `(*)`.
        lower: The lower bound of the equal-tailed interval, with shape `(*)`.
        upper: The upper bound of the equal-tailed interval, with shape `(*)`.
    """

    mean: Tensor
    std: Tensor
    median: Tensor
    lower: Tensor
    upper: Tensor


def summarize(samples: Tensor, level: float = 0.9) -> Summary:
    r"""Summarizes predictions over the sample dim: mean, standard deviation, median and
    the equal-tailed interval of probability `level`.

    Example:
        >>> net = zuko.nn.MLP(3, 1)
        >>> params = bayesflow.sample(bayesflow.init(net, init_logvar=-4.0), 256)
        >>> s = summarize(bayesflow.vmap_call(net, params, torch.randn(16, 3)), level=0.9)
        >>> s.mean.shape, bool((s.lower <= s.median).all() and (s.median <= s.upper).all())
        (torch.Size([16, 1]), True)

    Arguments:
        samples: Predictions, with shape `(K, *)`, `K >= 2`.
        level: The probability mass inside the interval, in :math:`(0, 1)`: a real number
            (Python or NumPy) or a tensor of one element.

    Returns:
        A :class:`Summary` of tensors with shape `(*)`; `std` is the unbiased one. Where
        the samples of an output include a NaN, all its summaries are NaN. An empty `*`
        (a batch of none) gives empty tensors, as the other summaries do.
    """

    where = "summarize"
    x = check_samples(where, samples)
    level = check_level(where, level)
    if x.shape[0] < 2:
        raise ValueError(f"{where}: expected at least 2 samples on dim 0, got {x.shape[0]}")

    q = torch.tensor([0.5, (1 - level) / 2, (1 + level) / 2], dtype=torch.float64, device=x.device)
    median, lower, upper = _quantiles(x, q)

    return Summary(x.mean(dim=0), _std(x, 1), median, lower, upper)


# Density models.


def mixture_log_prob(log_probs: Tensor) -> Tensor:
    r"""Returns the log-density of the Bayesian model average (an equal-weight mixture).

    .. math:: \log p(x) = \log \frac{1}{K} \sum_{k=1}^K p_k(x)
        = \operatorname{logsumexp}_k \log p_k(x) - \log K

    computed in log-space, so densities far below the floating-point range are fine.

    Example:
        >>> lp = torch.tensor([[-1000.0], [-1001.0]])  # exp() underflows to 0
        >>> mixture_log_prob(lp)
        tensor([-1000.3799])

    Arguments:
        log_probs: Per-sample log-densities :math:`\log p_k(x)`, with shape `(K, *)`,
            e.g. from `vmap_call(flow, params, c, x, fn=lambda f, c, x: f(c).log_prob(x))`.

    Returns:
        The log-density of the mixture, with shape `(*)`.
    """

    lp = check_samples("mixture_log_prob", log_probs, "log_probs")

    return log_mean_exp(lp)


def predictive_nll(log_probs: Tensor, reduction: str = "mean") -> Tensor:
    r"""Returns the negative log-likelihood of observations under the model average,
    :math:`-\log \frac{1}{K} \sum_k p_k(y)`, from per-sample log-likelihoods.

    Example:
        >>> lp = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]])  # K = 2 samples that agree
        >>> predictive_nll(lp)
        tensor(1.5000)

    Arguments:
        log_probs: Per-sample log-likelihoods :math:`\log p_k(y)` of the observations,
            with shape `(K, *)`.
        reduction: `'mean'` or `'sum'` over the observations, or `'none'`.

    Returns:
        A scalar, or a tensor of shape `(*)` if `reduction` is `'none'`.
    """

    lp = check_samples("predictive_nll", log_probs, "log_probs")
    return reduce("predictive_nll", -log_mean_exp(lp), reduction)


# Classifiers.


def _log_softmax(where: str, logits: object) -> tuple[Tensor, torch.dtype]:
    r"""Returns the log-probabilities of `logits`, in at least float32, and the dtype of
    `logits`, which the results are rounded to once."""

    x = check_samples(where, logits, "logits")
    if x.dim() < 3:
        # (K, C) is also (B, C) with the sample dim forgotten: one would be silently
        # averaged over the batch. A batch dim, even of one, says which is which.
        raise ValueError(
            f"{where}: expected logits of shape (K, *batch, C) with a sample dim first and "
            f"at least one batch dim, got shape {tuple(x.shape)}; for one example, pass "
            "logits[:, None]"
        )
    if x.shape[-1] < 1:
        raise ValueError(f"{where}: expected at least one class on the last dim, got none")
    # Entropies of half-precision log-probabilities lose everything below 2^-8 of their
    # size: the mutual information, a small difference, came out as 0 or 0.03.
    return x.to(accumulator(x)).log_softmax(dim=-1), x.dtype


def _entropy(logp: Tensor) -> Tensor:
    # `p * logp` is NaN where p = 0 and logp = -inf, in the output or in its gradient.
    logp = logp.clamp(min=torch.finfo(logp.dtype).min)
    return -(logp.exp() * logp).sum(dim=-1)


def log_mean_probs(logits: Tensor) -> Tensor:
    r"""Returns the log of the model-average class probabilities,
    :math:`\log \frac{1}{K} \sum_k \mathrm{softmax}(z_k)`, computed in log-space.

    Example:
        >>> z = torch.tensor([[[0.0, -1000.0]], [[-1000.0, 0.0]]])  # K = 2, B = 1, C = 2
        >>> log_mean_probs(z)
        tensor([[-0.6931, -0.6931]])

    Arguments:
        logits: Per-sample logits (or log-probabilities) :math:`z_k`, with shape
            `(K, *batch, C)` (at least one batch dim).

    Returns:
        The log-probabilities, at most 0, with shape `(*batch, C)`.
    """

    lp, dtype = _log_softmax("log_mean_probs", logits)
    return log_mean_exp(lp).to(dtype)


def mean_probs(logits: Tensor) -> Tensor:
    r"""Returns the model-average class probabilities
    :math:`\bar{p} = \frac{1}{K} \sum_k \mathrm{softmax}(z_k)`.

    Example:
        >>> z = torch.tensor([[[0.0, -1000.0]], [[-1000.0, 0.0]]])  # K = 2, B = 1, C = 2
        >>> mean_probs(z)
        tensor([[0.5000, 0.5000]])

    Arguments:
        logits: Per-sample logits (or log-probabilities) :math:`z_k`, with shape
            `(K, *batch, C)` (at least one batch dim).

    Returns:
        The probabilities, in :math:`[0, 1]` (as the metrics require), with shape
        `(*batch, C)`.
    """

    lp, dtype = _log_softmax("mean_probs", logits)
    return log_mean_exp(lp).exp().to(dtype)


def predictive_entropy(logits: Tensor) -> Tensor:
    r"""Returns the entropy of the model average, :math:`\mathbb{H}[\bar{p}]` (total
    uncertainty), in nats.

    Example:
        >>> z = torch.zeros(4, 2, 3)  # 4 samples, 2 inputs, each sample unsure among 3
        >>> predictive_entropy(z)  # log 3
        tensor([1.0986, 1.0986])

    Arguments:
        logits: Per-sample logits (or log-probabilities) of shape `(K, *batch, C)`, with at
            least one batch dim.

    Returns:
        The entropy, with shape `(*batch)`.
    """

    lp, dtype = _log_softmax("predictive_entropy", logits)
    return _entropy(log_mean_exp(lp)).to(dtype)


def expected_entropy(logits: Tensor) -> Tensor:
    r"""Returns the average entropy of the samples, :math:`\frac{1}{K} \sum_k
    \mathbb{H}[p_k]` (aleatoric uncertainty), in nats.

    Example:
        >>> z = torch.zeros(3, 1, 2)  # three samples, each unsure between two classes
        >>> expected_entropy(z)  # log 2
        tensor([0.6931])

    Arguments:
        logits: The `K` samples' logits (or log-probabilities), `(K, *batch, C)`.

    Returns:
        The expected entropy of every input, with shape `(*batch)`.
    """

    lp, dtype = _log_softmax("expected_entropy", logits)
    return _entropy(lp).mean(dim=0).to(dtype)


def _mutual_information(lp: Tensor, log_mean: Tensor) -> Tensor:
    # The mean KL divergence of the samples from their average, not the difference of two
    # entropies: that cancels two numbers of about log C, and loses a small information
    # (1e-6 nats in float32) in their rounding. Clamped as _entropy, so that p = 0 gives
    # 0 * finite; non-negative by Jensen's inequality, rounding can leave it at -1e-16.
    lo = torch.finfo(lp.dtype).min
    lp, log_mean = lp.clamp(min=lo), log_mean.clamp(min=lo)
    return (lp.exp() * (lp - log_mean)).sum(dim=-1).mean(dim=0).clamp(min=0)


def mutual_information(logits: Tensor) -> Tensor:
    r"""Returns the mutual information between the label and the parameters
    (epistemic uncertainty), in nats.

    .. math:: \mathbb{I}[y; \theta] = \mathbb{H}[\bar{p}] - \frac{1}{K} \sum_k \mathbb{H}[p_k]
        = \frac{1}{K} \sum_k \mathrm{KL}(p_k \,\|\, \bar{p})

    It is zero when all samples agree, and at most :math:`\log C`. It is computed as the
    mean KL divergence, which keeps a small information that the difference of two
    entropies of about :math:`\log C` would lose to rounding; half-precision logits in
    float32, the result rounded once.

    Example:
        >>> z = torch.tensor([[[0.0, -1000.0]], [[-1000.0, 0.0]]])  # two confident samples
        >>> mutual_information(z)  # that disagree: log 2
        tensor([0.6931])

    Arguments:
        logits: Per-sample logits (or log-probabilities), with shape
            `(K, *batch, C)` (at least one batch dim).

    Returns:
        The mutual information of every input, with shape `(*batch)`.

    References:
        | Bayesian Active Learning for Classification and Preference Learning
        | (Houlsby et al., 2011)
        | https://arxiv.org/abs/1112.5745
    """

    lp, dtype = _log_softmax("mutual_information", logits)
    return _mutual_information(lp, log_mean_exp(lp)).to(dtype)


class ClassificationSummary(NamedTuple):
    r"""A classifier's predictive distribution and its uncertainty decomposition, from
    :func:`classification_summary`; `predictive_entropy = expected_entropy +
    mutual_information`, up to rounding.

    Attributes:
        probs: The model-average probabilities, with shape `(*, C)`.
        predictive_entropy: The total uncertainty, with shape `(*)`.
        expected_entropy: The aleatoric part, with shape `(*)`.
        mutual_information: The epistemic part, with shape `(*)`.
    """

    probs: Tensor
    predictive_entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor


def classification_summary(logits: Tensor) -> ClassificationSummary:
    r"""Returns the model-average probabilities of a classifier and the decomposition of
    its uncertainty, in one pass over the per-sample logits.

    Example:
        >>> net = zuko.nn.MLP(2, 3)  # 3 classes
        >>> params = bayesflow.sample(bayesflow.init(net, init_logvar=-2.0), 64)
        >>> s = classification_summary(bayesflow.vmap_call(net, params, torch.randn(8, 2)))
        >>> s.probs.shape, s.mutual_information.shape
        (torch.Size([8, 3]), torch.Size([8]))

    Arguments:
        logits: Per-sample logits (or log-probabilities), with shape
            `(K, *batch, C)` (at least one batch dim).

    Returns:
        A :class:`ClassificationSummary`.
    """

    lp, dtype = _log_softmax("classification_summary", logits)
    log_mean = log_mean_exp(lp)

    return ClassificationSummary(
        probs=log_mean.exp().to(dtype),
        predictive_entropy=_entropy(log_mean).to(dtype),
        expected_entropy=_entropy(lp).mean(dim=0).to(dtype),
        mutual_information=_mutual_information(lp, log_mean).to(dtype),
    )
