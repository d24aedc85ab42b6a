r"""The numerics of the mean-field Gaussian, written once: variances, KL, log-mean-exp."""

from __future__ import annotations

__all__ = [
    "LOGVAR_BOUND",
    "LOGVAR_LIMIT",
    "gaussian_kl",
    "inverse_softclip",
    "log_mean_exp",
    "logvar_from_var",
    "softclip",
    "std",
    "var",
]

import math

import torch

from torch import Tensor

from ._caches import register

LOGVAR_BOUND = 18.0

#: The largest :math:`|\log \sigma^2|` a posterior is written with: softclip's range is the
#: open interval :math:`(-18, 18)`, and its inverse grows without bound near the ends, so the
#: variances that can be written are :math:`[e^{-17.984}, e^{17.984}]`, about
#: :math:`[1.55 \cdot 10^{-8}, 6.5 \cdot 10^{7}]`.
LOGVAR_LIMIT = LOGVAR_BOUND - 2**-6


def softclip(x: Tensor, bound: float = LOGVAR_BOUND) -> Tensor:
    r"""Returns :math:`x / \sqrt{1 + (x / b)^2}`, zuko's bound on log-variances."""

    return x * (1 + (x / bound).square()).rsqrt()


def var(logvar: Tensor) -> Tensor:
    r"""Returns the variance :math:`\sigma^2 = \exp(\mathrm{softclip}(\log \sigma^2))`."""

    return softclip(logvar).exp()


_ONES: dict[tuple[torch.dtype, torch.device], Tensor] = {}
register(_ONES.clear)


def std(logvar: Tensor) -> Tensor:
    r"""Returns :math:`\sigma = \exp(\mathrm{softclip}(\log \sigma^2) / 2)`.

    In five kernels rather than seven (the draw of every sample starts with it).
    """

    key = (logvar.dtype, logvar.device)
    one = _ONES.get(key)
    if one is None:
        one = _ONES[key] = torch.ones((), dtype=logvar.dtype, device=logvar.device)
    r = torch.addcmul(one, logvar, logvar, value=1 / LOGVAR_BOUND**2).rsqrt_()
    return r.mul(logvar).mul_(0.5).exp_()


def _accumulator(t: Tensor) -> torch.dtype:
    # Sums of many small terms overflow or lose everything in half precision.
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def gaussian_kl(
    mean: Tensor,
    logvar: Tensor,
    prior_mean: Tensor | float = 0.0,
    prior_var: Tensor | float = 1.0,
) -> Tensor:
    r"""Returns :math:`\mathrm{KL}(\mathcal{N}(\mu, \sigma^2) \,\|\, \mathcal{N}(m, s^2))`
    summed over every element, in at least float32,

    .. math:: \frac{1}{2} \sum \left( \frac{\sigma^2 + (\mu - m)^2}{s^2}
        + \log s^2 - \log \sigma^2 - 1 \right).
    """

    acc = _accumulator(mean)
    mean, logvar = mean.to(acc), softclip(logvar.to(acc))
    if isinstance(prior_var, Tensor):
        prior_var = prior_var.to(acc)
        log_prior_var = prior_var.log()
    else:
        log_prior_var = math.log(prior_var)
    if isinstance(prior_mean, Tensor):
        prior_mean = prior_mean.to(acc)

    diff = mean if isinstance(prior_mean, float) and prior_mean == 0.0 else mean - prior_mean
    kl = 0.5 * ((logvar.exp() + diff.square()) / prior_var + log_prior_var - logvar - 1.0)

    return kl.expand_as(mean).sum()


def log_mean_exp(x: Tensor, dim: int = 0) -> Tensor:
    r"""Returns :math:`\log \frac{1}{K} \sum_k e^{x_k}` over `dim`, in log-space."""

    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def inverse_softclip(y: Tensor, bound: float = LOGVAR_BOUND) -> Tensor:
    r"""Returns :math:`x = y / \sqrt{1 - (y / b)^2}`, the :math:`x` with
    :math:`\mathrm{softclip}(x, b) = y`, for :math:`|y| < b`."""

    return y * (1 - (y / bound).square()).rsqrt()


def logvar_from_var(variance: Tensor) -> Tensor:
    r"""Returns the unconstrained log-variance whose variance (:func:`var`) is `variance`,
    with :math:`\log \sigma^2` clamped to :math:`[-L, L]`, :math:`L` = :data:`LOGVAR_LIMIT`.

    `variance` must be positive (not checked here: see :func:`posterior_from_variance`).
    """

    return inverse_softclip(variance.log().clamp(-LOGVAR_LIMIT, LOGVAR_LIMIT))
