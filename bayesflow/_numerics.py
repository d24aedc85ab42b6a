r"""The numerics of the mean-field Gaussian, written once: variances, KL, log-mean-exp."""

from __future__ import annotations

__all__ = [
    "LOGVAR_BOUND",
    "constant",
    "gaussian_kl",
    "log_mean_exp",
    "reach",
    "softclip",
    "std",
    "var",
]

import math

import torch

from torch import Tensor

LOGVAR_BOUND = 18.0


def reach(dtype: torch.dtype) -> float:
    r"""Returns how far from 0 the soft clip's formula holds in `dtype`: beyond,
    :math:`(x / b)^2` overflows and the formula gives 0 (or NaN at infinity) instead of
    :math:`\pm b`. Clamping to it changes no value within (:math:`b` to the last bit)."""

    r = _REACH.get(dtype)
    if r is None:
        r = _REACH[dtype] = LOGVAR_BOUND * math.sqrt(torch.finfo(dtype).max) / 4
    return r


_REACH: dict[torch.dtype, float] = {}


def softclip(x: Tensor, bound: float = LOGVAR_BOUND) -> Tensor:
    r"""Returns :math:`x / \sqrt{1 + (x / b)^2}`, zuko's bound on log-variances, for every
    :math:`x` in :math:`[-\infty, \infty]` (NaN stays NaN)."""

    c = reach(x.dtype) * bound / LOGVAR_BOUND
    x = x.clamp(-c, c)
    return x * (1 + (x / bound).square()).rsqrt()


def var(logvar: Tensor) -> Tensor:
    r"""Returns the variance :math:`\sigma^2 = \exp(\mathrm{softclip}(\log \sigma^2))`."""

    return softclip(logvar).exp()


_CONSTANTS: dict[tuple[float, torch.dtype, torch.device], Tensor] = {}


def constant(value: float, like: Tensor) -> Tensor:
    r"""Returns `value` as a 0-dim tensor of the dtype and device of `like`, made once (a
    Python number in an operation on float32 tensors is converted at every call)."""

    key = (value, like.dtype, like.device)
    c = _CONSTANTS.get(key)
    if c is None:
        if len(_CONSTANTS) >= 64:
            _CONSTANTS.clear()
        c = _CONSTANTS[key] = torch.full((), value, dtype=like.dtype, device=like.device)
    return c


def std(logvar: Tensor) -> Tensor:
    r"""Returns :math:`\sigma = \exp(\mathrm{softclip}(\log \sigma^2) / 2)`, within
    :math:`[e^{-b/2}, e^{b/2}]` for every log-variance in :math:`[-\infty, \infty]`.

    In six kernels rather than eight.
    """

    c = reach(logvar.dtype)
    logvar = logvar.clamp(-c, c)
    r = torch.addcmul(constant(1.0, logvar), logvar, logvar, value=1 / LOGVAR_BOUND**2)
    return r.rsqrt_().mul(logvar).mul_(0.5).exp_()


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
