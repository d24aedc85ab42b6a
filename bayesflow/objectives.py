r"""Training objectives: the negative ELBO, vectorized over posterior samples, and KL schedules."""

from __future__ import annotations

__all__ = [
    "ConstantSchedule",
    "CyclicalSchedule",
    "LinearWarmup",
    "flipout_nelbo",
    "local_nelbo",
    "loop_nelbo",
    "nelbo",
]

import math

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from torch import Tensor

from .bayesian import BayesianModel
from .call import _check_in_dims, _vmap_call, loop_call
from .local import local_call
from .posterior import (
    Posterior,
    _check_generator,
    _check_module,
    _check_n,
    _check_posterior,
    _sample,
)
from .priors import Prior, prior_kl

Fn = Callable[..., Tensor]


def _check_number(where: str, what: str, value: object, low: float, strict: bool) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.detach().item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: expected {what} to be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < low or (strict and value == low):
        op = ">" if strict else ">="
        raise ValueError(f"{where}: expected a finite {what} {op} {low:g}, got {value}")
    return float(value)


def _check_common(
    where: str,
    module: object,
    posterior: object,
    fn: object,
    num_data: object,
    n: object,
    prior: object,
    kl_weight: object,
    generator: object,
    chunk_size: object,
) -> None:
    _check_module(where, module)
    if isinstance(module, BayesianModel):
        raise TypeError(
            f"{where}: expected the module the posterior is over, got a BayesianModel; "
            "pass bnet.base and bnet.posterior"
        )
    _check_posterior(where, posterior)
    if not callable(fn):
        raise TypeError(
            f"{where}: expected fn to be a callable fn(module, *args) returning per-datum "
            f"log-likelihoods, got {type(fn).__name__}"
        )
    _check_number(where, "num_data", num_data, 0.0, strict=True)
    _check_n(where, n)
    if isinstance(prior, bool) or not isinstance(prior, (Prior, int, float, type(None))):
        raise TypeError(
            f"{where}: expected prior to be a bayesflow.priors.Prior, a float variance or None, "
            f"got {type(prior).__name__}"
        )
    _check_number(where, "kl_weight", kl_weight, 0.0, strict=False)
    _check_generator(where, generator)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(
            f"{where}: expected chunk_size to be a positive int or None, got {chunk_size!r}"
        )


def _finish(
    where: str,
    ll: Any,
    posterior: Posterior,
    num_data: float,
    n: int,
    prior: Prior | float | None,
    kl_weight: float | Tensor,
    generator: torch.Generator | None,
) -> Tensor:
    if not isinstance(ll, Tensor) or ll.dim() == 0 or ll.shape[0] != n:
        shape = tuple(ll.shape) if isinstance(ll, Tensor) else type(ll).__name__
        raise ValueError(
            f"{where}: expected fn to return per-datum log-likelihoods, a tensor per sample, "
            f"stacked to a leading dim n = {n}, got {shape}"
        )

    closed = prior is None or not isinstance(prior, Prior) or prior.closed_form
    kl = prior_kl(posterior, prior, generator=generator, n=None if closed else n)

    return kl_weight * kl / num_data - ll.mean()


def nelbo(
    module: nn.Module,
    posterior: Posterior,
    *args: Any,
    fn: Fn,
    num_data: float,
    n: int = 4,
    prior: Prior | float | None = None,
    kl_weight: float | Tensor = 1.0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    in_dims: Sequence[int | None] | None = None,
) -> Tensor:
    r"""Returns the negative ELBO per datum, with `n` posterior samples in one vectorized pass.

    For a batch of :math:`B` data out of `num_data` :math:`= N`, with parameter samples
    :math:`\theta_k \sim q` (:func:`bayesflow.sample`) and per-datum log-likelihoods
    :math:`\ell_{kb} = \log p(y_b \mid x_b, \theta_k)` computed by :func:`bayesflow.vmap_call`,

    .. math:: \mathcal{L} = -\frac{1}{n} \sum_{k=1}^n \frac{1}{B} \sum_{b=1}^B \ell_{kb}
        + \beta \, \frac{\mathrm{KL}(q \,\|\, p)}{N},

    an unbiased estimate of :math:`-\mathrm{ELBO} / N` when :math:`\beta = 1`. The scale
    per datum keeps the learning rate independent of :math:`N`; :math:`\beta` (`kl_weight`)
    can follow a schedule, e.g. :class:`LinearWarmup`. A loss "mean error :math:`+ \lambda`
    KL" is `fn` returning minus the per-datum error with :math:`N = 1 / \lambda`:
    zuko's tutorial loss `MSE + 1e-6 * KL` is

    >>> net = zuko.nn.MLP(5, 5)
    >>> q = bayesflow.init(net)
    >>> x = torch.randn(64, 5)
    >>> y = x.sort(dim=-1).values
    >>> mse = lambda net, x, y: -(net(x) - y).square().mean(dim=-1)
    >>> loss = nelbo(net, q, x, y, fn=mse, num_data=1e6, n=4)
    >>> loss.shape
    torch.Size([])

    Every objective of this module shares this signature (:func:`loop_nelbo`,
    :func:`local_nelbo`, :func:`flipout_nelbo`). With a :class:`bayesflow.BayesianModel`
    `bnet`, pass `bnet.base` and `bnet.posterior`: the gradients reach its `means` and
    `logvars`.

    Arguments:
        module: A module.
        posterior: A posterior :math:`q` over parameters of `module`.
        args: The arguments of `fn`, e.g. a batch of inputs and targets, shared by every
            sample unless `in_dims` says otherwise.
        fn: The log-likelihood, `fn(module, *args)`, returning a tensor of per-datum
            log-likelihoods (any shape; they are averaged). For a flow,
            `fn=lambda f, c, x: f(c).log_prob(x)`.
        num_data: The number of data :math:`N` the KL is shared by.
        n: The number of posterior samples.
        prior: The prior :math:`p`: a :class:`bayesflow.priors.Prior`; a float
            :math:`s^2` for :math:`\mathcal{N}(0, s^2 I)`; :math:`\mathcal{N}(0, I)` if
            :py:`None`. A prior without closed-form KL uses an `n`-sample Monte Carlo
            estimate.
        kl_weight: The weight :math:`\beta \geq 0` of the KL term.
        generator: The source of all the randomness; the global one if :py:`None`.
            The same state gives the same loss, whatever `chunk_size`.
        chunk_size, in_dims: As in :func:`bayesflow.vmap_call`.

    Returns:
        A scalar tensor, differentiable with respect to `posterior`.

    References:
        | Weight Uncertainty in Neural Networks (Blundell et al., 2015)
        | https://arxiv.org/abs/1505.05424
    """

    where = "nelbo"
    _check_common(
        where, module, posterior, fn, num_data, n, prior, kl_weight, generator, chunk_size
    )
    params = _sample(where, posterior, n, generator)
    ll = _vmap_call(where, module, params, args, fn, chunk_size, True, in_dims)

    return _finish(where, ll, posterior, num_data, n, prior, kl_weight, generator)


def loop_nelbo(
    module: nn.Module,
    posterior: Posterior,
    *args: Any,
    fn: Fn,
    num_data: float,
    n: int = 4,
    prior: Prior | float | None = None,
    kl_weight: float | Tensor = 1.0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    in_dims: Sequence[int | None] | None = None,
) -> Tensor:
    r"""Returns the negative ELBO per datum of :func:`nelbo`, one sample at a time.

    The oracle of :func:`nelbo`: same signature, same samples for the same generator
    state, same number, computed with :func:`bayesflow.loop_call`. `chunk_size` is
    accepted for the common signature and changes nothing.
    """

    where = "loop_nelbo"
    _check_common(
        where, module, posterior, fn, num_data, n, prior, kl_weight, generator, chunk_size
    )
    params = _sample(where, posterior, n, generator)
    ll = loop_call(module, params, *args, fn=fn, in_dims=in_dims)

    return _finish(where, ll, posterior, num_data, n, prior, kl_weight, generator)


def _local(
    where: str,
    flipout: bool,
    module: nn.Module,
    posterior: Posterior,
    args: tuple,
    fn: Fn,
    num_data: float,
    n: int,
    prior: Prior | float | None,
    kl_weight: float | Tensor,
    generator: torch.Generator | None,
    chunk_size: int | None,
    in_dims: Sequence[int | None] | None,
) -> Tensor:
    _check_common(
        where, module, posterior, fn, num_data, n, prior, kl_weight, generator, chunk_size
    )
    dims = _check_in_dims(where, args, in_dims, n)

    size = n if chunk_size is None else chunk_size
    lls = []
    for start in range(0, n, size):
        k = min(size, n - start)
        chunk = tuple(
            a if d is None else a[start : start + k] for a, d in zip(args, dims, strict=True)
        )
        lls.append(
            local_call(
                module,
                posterior,
                k,
                *chunk,
                fn=fn,
                generator=generator,
                flipout=flipout,
                in_dims=in_dims,
            )
        )
    ll = lls[0] if len(lls) == 1 else torch.cat(lls)

    return _finish(where, ll, posterior, num_data, n, prior, kl_weight, generator)


def local_nelbo(
    module: nn.Module,
    posterior: Posterior,
    *args: Any,
    fn: Fn,
    num_data: float,
    n: int = 4,
    prior: Prior | float | None = None,
    kl_weight: float | Tensor = 1.0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    in_dims: Sequence[int | None] | None = None,
) -> Tensor:
    r"""Returns the negative ELBO per datum of :func:`nelbo`, with the local
    reparameterization trick.

    Same signature and estimand as :func:`nelbo`; the log-likelihoods come from
    :func:`bayesflow.local_call`, so every Bayesian parameter must belong to a linear
    layer, and `fn` runs once on arguments with a leading sample dim. With `chunk_size`,
    the samples are processed `chunk_size` at a time.
    """

    return _local(
        "local_nelbo",
        False,
        module,
        posterior,
        args,
        fn,
        num_data,
        n,
        prior,
        kl_weight,
        generator,
        chunk_size,
        in_dims,
    )


def flipout_nelbo(
    module: nn.Module,
    posterior: Posterior,
    *args: Any,
    fn: Fn,
    num_data: float,
    n: int = 4,
    prior: Prior | float | None = None,
    kl_weight: float | Tensor = 1.0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    in_dims: Sequence[int | None] | None = None,
) -> Tensor:
    r"""Returns the negative ELBO per datum of :func:`nelbo`, with Flipout.

    As :func:`local_nelbo`, with `flipout=True` in :func:`bayesflow.local_call`.
    """

    return _local(
        "flipout_nelbo",
        True,
        module,
        posterior,
        args,
        fn,
        num_data,
        n,
        prior,
        kl_weight,
        generator,
        chunk_size,
        in_dims,
    )


def _check_step(where: str, step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"{where}: expected step to be an int >= 0, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"{where}: expected step to be an int >= 0, got {step}")
    return step


def _check_steps(where: str, what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: expected {what} to be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{where}: expected {what} to be a positive int, got {value}")


@dataclass(frozen=True)
class ConstantSchedule:
    r"""A KL weight that never changes, :math:`\beta(t) = w`.

    Arguments:
        weight: The weight :math:`w \geq 0`.
    """

    weight: float = 1.0

    def __post_init__(self) -> None:
        _check_number("ConstantSchedule", "weight", self.weight, 0.0, strict=False)

    def __call__(self, step: int) -> float:
        _check_step("ConstantSchedule", step)
        return float(self.weight)


@dataclass(frozen=True)
class LinearWarmup:
    r"""A KL weight that grows linearly from `start` to `weight` in `steps` steps, then stays.

    .. math:: \beta(t) = \beta_0 + (w - \beta_0) \min(t / T, 1)

    Example:
        >>> schedule = LinearWarmup(steps=100)
        >>> schedule(0), schedule(50), schedule(1000)
        (0.0, 0.5, 1.0)

    Arguments:
        steps: The number of warm-up steps :math:`T \geq 1`.
        weight: The final weight :math:`w \geq 0`.
        start: The initial weight :math:`\beta_0 \geq 0`.

    References:
        | Ladder Variational Autoencoders (Sønderby et al., 2016)
        | https://arxiv.org/abs/1602.02282
    """

    steps: int
    weight: float = 1.0
    start: float = 0.0

    def __post_init__(self) -> None:
        _check_steps("LinearWarmup", "steps", self.steps)
        _check_number("LinearWarmup", "weight", self.weight, 0.0, strict=False)
        _check_number("LinearWarmup", "start", self.start, 0.0, strict=False)

    def __call__(self, step: int) -> float:
        _check_step("LinearWarmup", step)
        return self.start + (self.weight - self.start) * min(step / self.steps, 1.0)


@dataclass(frozen=True)
class CyclicalSchedule:
    r"""A KL weight that repeats a linear ramp every `period` steps.

    Within each cycle, the weight grows linearly from 0 to `weight` over the first
    `ratio` of the cycle and stays there for the rest,
    :math:`\beta(t) = w \min(\tau / R, 1)` with :math:`\tau = (t \bmod P) / P`.

    Example:
        >>> schedule = CyclicalSchedule(period=100, ratio=0.5)
        >>> schedule(0), schedule(25), schedule(75), schedule(125)
        (0.0, 0.5, 1.0, 0.5)

    Arguments:
        period: The length :math:`P \geq 1` of a cycle, in steps.
        ratio: The fraction :math:`0 < R \leq 1` of a cycle spent growing.
        weight: The top weight :math:`w \geq 0`.

    References:
        | Cyclical Annealing Schedule: A Simple Approach to Mitigating KL Vanishing
        | (Fu et al., 2019) https://arxiv.org/abs/1903.10145
    """

    period: int
    ratio: float = 0.5
    weight: float = 1.0

    def __post_init__(self) -> None:
        _check_steps("CyclicalSchedule", "period", self.period)
        _check_number("CyclicalSchedule", "ratio", self.ratio, 0.0, strict=True)
        if self.ratio > 1:
            raise ValueError(f"CyclicalSchedule: expected 0 < ratio <= 1, got {self.ratio}")
        _check_number("CyclicalSchedule", "weight", self.weight, 0.0, strict=False)

    def __call__(self, step: int) -> float:
        _check_step("CyclicalSchedule", step)
        tau = (step % self.period) / self.period
        return self.weight * min(tau / self.ratio, 1.0)
