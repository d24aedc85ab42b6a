r"""Posterior-predictive summaries, model averages and metrics over a leading sample dim.

Every function takes tensors whose dim 0 indexes `K` posterior samples (or the members of
a deep ensemble), as returned by :func:`bayesflow.vmap_call`, and reduces over it.
"""

from __future__ import annotations

__all__ = [
    "CalibrationCurve",
    "ClassificationSummary",
    "Summary",
    "calibration_curve",
    "categorical_nll",
    "classification_summary",
    "expected_calibration_error",
    "expected_entropy",
    "gaussian_nll",
    "interval_coverage",
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
    "stack_params",
    "summarize",
]

import math

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn

from torch import Tensor

# Helpers: input checks at the boundary, with the public function's name.


def _check_tensor(where: str, name: str, x: object, min_dim: int = 1) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected {name} to be a tensor, got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(
            f"{where}: expected {name} with at least {min_dim} dims, got shape {tuple(x.shape)}"
        )
    return x


def _check_float(where: str, name: str, x: Tensor) -> Tensor:
    if not x.is_floating_point():
        raise TypeError(f"{where}: expected {name} to be a floating-point tensor, got {x.dtype}")
    return x


def _check_samples(where: str, samples: object, name: str = "samples", min_dim: int = 1) -> Tensor:
    x = _check_tensor(where, name, samples, min_dim)
    _check_float(where, name, x)
    if x.shape[0] < 1:
        raise ValueError(
            f"{where}: expected {name} with at least one sample on dim 0, got shape "
            f"{tuple(x.shape)}"
        )
    return x


def _check_labels(where: str, labels: object, shape: torch.Size, classes: int) -> Tensor:
    y = _check_tensor(where, "labels", labels, min_dim=0)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{where}: expected integer labels, got {y.dtype}")
    if y.shape != shape:
        raise ValueError(f"{where}: expected labels of shape {tuple(shape)}, got {tuple(y.shape)}")
    if y.numel() > 0 and (y.min() < 0 or y.max() >= classes):
        raise ValueError(
            f"{where}: expected labels in [0, {classes - 1}], got values in "
            f"[{int(y.min())}, {int(y.max())}]"
        )
    return y


def _check_probs(where: str, probs: object) -> Tensor:
    p = _check_tensor(where, "probs", probs, min_dim=1)
    _check_float(where, "probs", p)
    if p.shape[-1] < 1:
        raise ValueError(f"{where}: expected at least one class on the last dim, got none")
    if p.numel() == 0:
        return p

    tol = math.sqrt(torch.finfo(p.dtype).eps) * max(1, p.shape[-1])
    if not ((p >= 0).all() and (p <= 1).all()):
        raise ValueError(
            f"{where}: expected probabilities in [0, 1], got values in "
            f"[{float(p.min())}, {float(p.max())}]"
        )
    error = (p.sum(dim=-1) - 1).abs().max()
    if error > tol:
        raise ValueError(
            f"{where}: expected probabilities that sum to 1 on the last dim, got sums off by "
            f"up to {float(error):.3g}"
        )
    return p


def _check_level(where: str, level: object) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)):
        raise TypeError(f"{where}: expected level to be a float, got {type(level).__name__}")
    if not 0 < level < 1:
        raise ValueError(f"{where}: expected level in (0, 1), got {level}")
    return float(level)


def _check_same_shape(where: str, **tensors: Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        got = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(f"{where}: expected tensors of the same shape, got {got}")


def _reduce(where: str, x: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"{where}: expected reduction 'mean', 'sum' or 'none', got {reduction!r}")


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

    return _check_samples("predictive_mean", samples).mean(dim=0)


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

    x = _check_samples("predictive_std", samples)
    if isinstance(correction, bool) or not isinstance(correction, int) or correction < 0:
        raise ValueError(f"predictive_std: expected a correction int >= 0, got {correction!r}")
    if x.shape[0] <= correction:
        raise ValueError(
            f"predictive_std: expected more than correction = {correction} samples on dim 0, "
            f"got {x.shape[0]}"
        )

    return x.std(dim=0, correction=correction)


def _quantiles(x: Tensor, q: Tensor) -> Tensor:
    # Linear interpolation between order statistics, as `torch.quantile`, which refuses
    # inputs of more than 2**24 elements: K = 256 samples of a 256 x 256 image already are.
    k = x.shape[0]
    xs = x.sort(dim=0).values
    pos = q.to(x.dtype) * (k - 1)
    lo = pos.floor().long().clamp(0, k - 1)
    hi = pos.ceil().long().clamp(0, k - 1)
    frac = (pos - lo.to(x.dtype)).view(-1, *(1,) * (x.dim() - 1))

    return torch.lerp(xs[lo], xs[hi], frac)


def predictive_quantiles(samples: Tensor, q: float | Sequence[float] | Tensor) -> Tensor:
    r"""Returns quantiles of the predictive distribution over the sample dim.

    The quantiles interpolate linearly between order statistics, as :func:`torch.quantile`
    (and numpy's default), but with no limit on the size of `samples`.

    Example:
        >>> x = torch.arange(5.0).unsqueeze(-1)  # K = 5 samples of one output
        >>> predictive_quantiles(x, [0.25, 0.5, 0.9])
        tensor([[1.0000],
                [2.0000],
                [3.6000]])

    Arguments:
        samples: Predictions, with shape `(K, *)`.
        q: The probabilities, in :math:`[0, 1]`: a float or a 1-d sequence of `Q` floats.

    Returns:
        The quantiles, with shape `(*)` if `q` is a float, else `(Q, *)`.
    """

    where = "predictive_quantiles"
    x = _check_samples(where, samples)

    scalar = isinstance(q, (int, float)) and not isinstance(q, bool)
    try:
        qs = torch.as_tensor(q, dtype=x.dtype, device=x.device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{where}: expected q to be a float or a sequence of floats, got {q!r}"
        ) from None
    if qs.dim() > 1 or (qs.dim() == 0 and not scalar and not isinstance(q, Tensor)):
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
        level: The probability mass inside the interval, in :math:`(0, 1)`.

    Returns:
        The lower and upper bounds, each with shape `(*)`.
    """

    where = "predictive_interval"
    x = _check_samples(where, samples)
    level = _check_level(where, level)

    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=x.dtype, device=x.device)
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
        level: The probability mass inside the interval, in :math:`(0, 1)`.

    Returns:
        A :class:`Summary` of tensors with shape `(*)`; `std` is the unbiased one.
    """

    where = "summarize"
    x = _check_samples(where, samples)
    level = _check_level(where, level)
    if x.shape[0] < 2:
        raise ValueError(f"{where}: expected at least 2 samples on dim 0, got {x.shape[0]}")

    q = torch.tensor([0.5, (1 - level) / 2, (1 + level) / 2], dtype=x.dtype, device=x.device)
    median, lower, upper = _quantiles(x, q)

    return Summary(x.mean(dim=0), x.std(dim=0), median, lower, upper)


# Density models.


def _log_mean_exp(lp: Tensor) -> Tensor:
    r"""Returns :math:`\log \frac{1}{K} \sum_k e^{l_k}` over the leading dim, in log-space."""

    return torch.logsumexp(lp, dim=0) - math.log(lp.shape[0])


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

    lp = _check_samples("mixture_log_prob", log_probs, "log_probs")

    return _log_mean_exp(lp)


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

    lp = _check_samples("predictive_nll", log_probs, "log_probs")
    return _reduce("predictive_nll", -_log_mean_exp(lp), reduction)


# Classifiers.


def _log_softmax(where: str, logits: object) -> Tensor:
    x = _check_samples(where, logits, "logits", min_dim=2)
    if x.shape[-1] < 1:
        raise ValueError(f"{where}: expected at least one class on the last dim, got none")
    return x.log_softmax(dim=-1)


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
            `(K, *, C)`.

    Returns:
        The log-probabilities, with shape `(*, C)`.
    """

    return _log_mean_exp(_log_softmax("log_mean_probs", logits))


def mean_probs(logits: Tensor) -> Tensor:
    r"""Returns the model-average class probabilities
    :math:`\bar{p} = \frac{1}{K} \sum_k \mathrm{softmax}(z_k)`.

    Example:
        >>> z = torch.tensor([[[0.0, -1000.0]], [[-1000.0, 0.0]]])  # K = 2, B = 1, C = 2
        >>> mean_probs(z)
        tensor([[0.5000, 0.5000]])

    Arguments:
        logits: Per-sample logits (or log-probabilities) :math:`z_k`, with shape
            `(K, *, C)`.

    Returns:
        The probabilities, with shape `(*, C)`.
    """

    return _log_mean_exp(_log_softmax("mean_probs", logits)).exp()


def predictive_entropy(logits: Tensor) -> Tensor:
    r"""Returns the entropy of the model average, :math:`\mathbb{H}[\bar{p}]` (total
    uncertainty), in nats.

    Example:
        >>> z = torch.tensor([[[0.0, -1000.0]], [[-1000.0, 0.0]]])  # two confident samples
        >>> predictive_entropy(z)  # that disagree: log 2
        tensor([0.6931])

    Arguments:
        logits: Per-sample logits (or log-probabilities), with shape `(K, *, C)`.

    Returns:
        The entropy, with shape `(*)`.
    """

    return _entropy(_log_mean_exp(_log_softmax("predictive_entropy", logits)))


def expected_entropy(logits: Tensor) -> Tensor:
    r"""Returns the average entropy of the samples, :math:`\frac{1}{K} \sum_k
    \mathbb{H}[p_k]` (aleatoric uncertainty), in nats.

    Example:
        >>> z = torch.tensor([[[0.0, -1000.0]], [[-1000.0, 0.0]]])  # two confident samples
        >>> expected_entropy(z)
        tensor([0.])

    Arguments:
        logits: Per-sample logits (or log-probabilities), with shape `(K, *, C)`.

    Returns:
        The expected entropy, with shape `(*)`.
    """

    return _entropy(_log_softmax("expected_entropy", logits)).mean(dim=0)


def _mutual_information(lp: Tensor) -> Tensor:
    # Non-negative by Jensen's inequality; rounding can leave it at -1e-16.
    return (_entropy(_log_mean_exp(lp)) - _entropy(lp).mean(dim=0)).clamp(min=0)


def mutual_information(logits: Tensor) -> Tensor:
    r"""Returns the mutual information between the label and the parameters
    (epistemic uncertainty), in nats.

    .. math:: \mathbb{I}[y; \theta] = \mathbb{H}[\bar{p}] - \frac{1}{K} \sum_k \mathbb{H}[p_k]

    It is zero when all samples agree, and at most :math:`\log C`.

    Example:
        >>> z = torch.tensor([[[0.0, -1000.0]], [[-1000.0, 0.0]]])  # two confident samples
        >>> mutual_information(z)  # that disagree: log 2
        tensor([0.6931])

    Arguments:
        logits: Per-sample logits (or log-probabilities), with shape `(K, *, C)`.

    Returns:
        The mutual information, with shape `(*)`.

    References:
        | Bayesian Active Learning for Classification and Preference Learning
        | (Houlsby et al., 2011)
        | https://arxiv.org/abs/1112.5745
    """

    return _mutual_information(_log_softmax("mutual_information", logits))


class ClassificationSummary(NamedTuple):
    r"""A classifier's predictive distribution and its uncertainty decomposition, from
    :func:`classification_summary`; `predictive_entropy = expected_entropy +
    mutual_information`.

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
        logits: Per-sample logits (or log-probabilities), with shape `(K, *, C)`.

    Returns:
        A :class:`ClassificationSummary`.
    """

    lp = _log_softmax("classification_summary", logits)
    log_mean = _log_mean_exp(lp)
    total = _entropy(log_mean)
    aleatoric = _entropy(lp).mean(dim=0)

    return ClassificationSummary(
        probs=log_mean.exp(),
        predictive_entropy=total,
        expected_entropy=aleatoric,
        mutual_information=(total - aleatoric).clamp(min=0),
    )


# Deep ensembles.


def stack_params(modules: Sequence[nn.Module]) -> dict[str, Tensor]:
    r"""Stacks the parameters of independently trained modules of one architecture (a deep
    ensemble) on a new leading dim, for :func:`bayesflow.vmap_call` on `modules[0]`.

    The ensemble then goes through the same vectorized path and the same predictive
    summaries as posterior samples. Buffers are not stacked: `vmap_call` uses those of
    `modules[0]`, so they must be equal in every member.

    Example:
        >>> nets = [zuko.nn.MLP(3, 5) for _ in range(4)]
        >>> params = stack_params(nets)
        >>> bayesflow.vmap_call(nets[0], params, torch.randn(16, 3)).shape
        torch.Size([4, 16, 5])

    Arguments:
        modules: `n >= 1` modules of the same class, with the same parameter names and
            shapes and equal buffers.

    Returns:
        Tensors of shape `(n, *param.shape)`, differentiable with respect to every member's
        parameters.
    """

    where = "stack_params"
    if isinstance(modules, nn.Module) or not isinstance(modules, Sequence):
        raise TypeError(
            f"{where}: expected a sequence of torch.nn.Module, got {type(modules).__name__}"
        )
    if not modules:
        raise ValueError(f"{where}: expected at least one module, got none")
    for i, m in enumerate(modules):
        if not isinstance(m, nn.Module):
            raise TypeError(
                f"{where}: expected a sequence of torch.nn.Module, got {type(m).__name__} "
                f"at index {i}"
            )

    first = modules[0]
    named = dict(first.named_parameters())
    buffers = dict(first.named_buffers())
    if not named:
        raise ValueError(f"{where}: expected modules with parameters, got none")

    for i, m in enumerate(modules[1:], start=1):
        if type(m) is not type(first):
            raise ValueError(
                f"{where}: expected modules of one class, got {type(first).__name__} and "
                f"{type(m).__name__} at index {i}"
            )
        other = dict(m.named_parameters())
        if list(other) != list(named):
            raise ValueError(
                f"{where}: expected the same parameter names in every module, got "
                f"{sorted(set(other) ^ set(named))} differing at index {i}"
            )
        for name, p in other.items():
            ref = named[name]
            if p.shape != ref.shape or p.dtype != ref.dtype or p.device != ref.device:
                raise ValueError(
                    f"{where}: expected {name!r} of shape {tuple(ref.shape)} ({ref.dtype}, "
                    f"{ref.device}) in every module, got {tuple(p.shape)} ({p.dtype}, "
                    f"{p.device}) at index {i}"
                )
        other_buffers = dict(m.named_buffers())
        if list(other_buffers) != list(buffers):
            raise ValueError(
                f"{where}: expected the same buffer names in every module, got "
                f"{sorted(set(other_buffers) ^ set(buffers))} differing at index {i}"
            )
        for name, b in other_buffers.items():
            if b.shape != buffers[name].shape or not torch.equal(b, buffers[name]):
                raise ValueError(
                    f"{where}: expected equal buffers in every module (vmap_call uses those "
                    f"of modules[0]), got a different {name!r} at index {i}"
                )

    return {name: torch.stack([m.get_parameter(name) for m in modules]) for name in named}


# Metrics.


def gaussian_nll(mean: Tensor, std: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    r"""Returns the negative log-likelihood of observations under Gaussian predictions,

    .. math:: -\log \mathcal{N}(y \mid \mu, \sigma^2) = \frac{1}{2} \log(2 \pi \sigma^2)
        + \frac{(y - \mu)^2}{2 \sigma^2},

    with every constant included. For a moment-matched predictive, pass the outputs of
    :func:`predictive_mean` and :func:`predictive_std`.

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
        _check_float(where, name, _check_tensor(where, name, t, min_dim=0))
    _check_same_shape(where, mean=mean, std=std, y=y)
    if std.numel() > 0 and not (std > 0).all():
        raise ValueError(f"{where}: expected std > 0, got a minimum of {float(std.min())}")

    z = (y - mean) / std
    nll = 0.5 * z.square() + std.log() + 0.5 * math.log(2 * math.pi)

    return _reduce(where, nll, reduction)


def categorical_nll(probs: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    r"""Returns the negative log-likelihood :math:`-\log p(y)` of labels under class
    probabilities.

    For the model average of per-sample logits, :func:`predictive_nll` of the gathered
    per-sample log-probabilities gives the same numbers in log-space, robust to
    probabilities that underflow.

    Example:
        >>> probs = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
        >>> categorical_nll(probs, torch.tensor([0, 1]), reduction="none")
        tensor([0.6931, 0.2877])

    Arguments:
        probs: Probabilities that sum to 1 on the last dim, with shape `(*, C)`, e.g. from
            :func:`mean_probs`.
        labels: Integer labels in :math:`[0, C)`, with shape `(*)`.
        reduction: `'mean'` or `'sum'` over the observations, or `'none'`.

    Returns:
        A scalar, or a tensor of shape `(*)` if `reduction` is `'none'`.
    """

    where = "categorical_nll"
    p = _check_probs(where, probs)
    y = _check_labels(where, labels, p.shape[:-1], p.shape[-1])
    nll = -p.gather(-1, y.unsqueeze(-1)).squeeze(-1).log()

    return _reduce(where, nll, reduction)


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
    :math:`((b - 1) / B, b / B]`, and returns each bin's mean confidence and accuracy.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
        >>> calibration_curve(probs, torch.tensor([0, 1, 1]), bins=2)
        CalibrationCurve(confidence=tensor([0.0000, 0.8000]), accuracy=tensor([0.0000, 0.6667]), count=tensor([0, 3]))

    Arguments:
        probs: Probabilities that sum to 1 on the last dim, with shape `(*, C)`.
        labels: Integer labels in :math:`[0, C)`, with shape `(*)`.
        bins: The number of bins `B >= 1`.

    Returns:
        A :class:`CalibrationCurve`.
    """  # noqa: E501

    return _calibration_curve("calibration_curve", probs, labels, bins)


def _calibration_curve(where: str, probs: Tensor, labels: Tensor, bins: int) -> CalibrationCurve:
    if isinstance(bins, bool) or not isinstance(bins, int):
        raise TypeError(f"{where}: expected bins to be an int, got {type(bins).__name__}")
    if bins < 1:
        raise ValueError(f"{where}: expected bins >= 1, got {bins}")
    p = _check_probs(where, probs)
    y = _check_labels(where, labels, p.shape[:-1], p.shape[-1])
    if y.numel() == 0:
        raise ValueError(f"{where}: expected at least one prediction, got none")

    conf, pred = p.reshape(-1, p.shape[-1]).max(dim=-1)
    correct = (pred == y.reshape(-1)).to(p.dtype)

    edges = torch.linspace(0, 1, bins + 1, dtype=p.dtype, device=p.device)[1:-1]
    index = torch.bucketize(conf.detach(), edges, right=False)  # (lo, hi]

    count = torch.zeros(bins, dtype=torch.long, device=p.device).index_add_(
        0, index, torch.ones_like(index)
    )
    total_conf = torch.zeros(bins, dtype=p.dtype, device=p.device).index_add(0, index, conf)
    total_correct = torch.zeros(bins, dtype=p.dtype, device=p.device).index_add(0, index, correct)
    denom = count.clamp(min=1).to(p.dtype)

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
        labels: Integer labels in :math:`[0, C)`, with shape `(*)`.
        bins: The number of bins `B >= 1`.

    Returns:
        A scalar tensor, in :math:`[0, 1]`.

    References:
        | On Calibration of Modern Neural Networks (Guo et al., 2017)
        | https://arxiv.org/abs/1706.04599
    """

    curve = _calibration_curve("expected_calibration_error", probs, labels, bins)
    weight = curve.count.to(curve.confidence.dtype) / curve.count.sum()

    return (weight * (curve.accuracy - curve.confidence).abs()).sum()


def interval_coverage(lower: Tensor, upper: Tensor, y: Tensor) -> Tensor:
    r"""Returns the fraction of observations inside their predictive interval,
    :math:`\frac{1}{N} \sum_i [l_i \leq y_i \leq u_i]`.

    For calibrated intervals of probability `level` (e.g. from
    :func:`predictive_interval`), it is about `level`, within a standard error of
    :math:`\sqrt{\mathrm{level} (1 - \mathrm{level}) / N}`.

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
        _check_float(where, name, _check_tensor(where, name, t, min_dim=0))
    _check_same_shape(where, lower=lower, upper=upper, y=y)
    if y.numel() == 0:
        raise ValueError(f"{where}: expected at least one observation, got none")
    if (lower > upper).any():
        raise ValueError(f"{where}: expected lower <= upper, got lower > upper somewhere")

    inside = (lower <= y) & (y <= upper)

    return inside.to(y.dtype).mean()
