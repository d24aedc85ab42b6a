r"""Mean-field Gaussian posteriors over named parameters, as pure functions."""

from __future__ import annotations

__all__ = [
    "Posterior",
    "init",
    "kl_divergence",
    "mean_model",
    "mean_params",
    "sample",
    "select",
    "stack_params",
    "std",
]

from collections.abc import Sequence

import torch
import torch.nn as nn

from torch import Tensor

from . import _posterior
from ._checks import check_members, check_not_bridge, check_posterior
from ._numerics import std as _std
from ._posterior import InitLogvar
from ._types import Posterior


def select(
    module: nn.Module,
    include: Sequence[str] = ("",),
    exclude: Sequence[str] = (),
) -> list[str]:
    r"""Returns the names of the parameters of `module` picked by glob patterns.

    A name is picked if it starts with a match of an `include` pattern and with no match
    of an `exclude` pattern. Patterns are dot-separated: `*` matches one name segment
    (or part of one, as in `lin*`), `**` one or more segments, and a pattern matches
    whole leading segments, so `0` picks `0.weight` but not `10.weight` (a trailing dot,
    `0.`, changes nothing). The empty pattern picks everything. Names are those of
    :meth:`torch.nn.Module.named_parameters`: a Parameter shared by several modules (tied
    weights) has one name, its first. A selection that picks a tied Parameter by a second
    name only (`dec.weight` tied to `emb.weight`, by `include=["dec"]`) is refused: it
    would leave the Parameter out, silently.

    Example:
        >>> net = zuko.nn.MLP(3, 5)
        >>> select(net, include=["**"], exclude=["**.bias"])
        ['0.weight', '2.weight', '4.weight']

    Arguments:
        module: A module.
        include: Patterns of the names to pick: any iterable of strings, or one string.
        exclude: Patterns of the names to leave out, likewise.

    Returns:
        The picked names, in the order of :meth:`torch.nn.Module.named_parameters`.

    Raises:
        ValueError: If the patterns pick a tied Parameter by a second name only.
    """

    return _posterior.select("select", module, include, exclude)


def init(
    module: nn.Module,
    init_logvar: InitLogvar = -9.0,
    include: Sequence[str] = ("",),
    exclude: Sequence[str] = (),
) -> Posterior:
    r"""Creates a posterior centred on the current parameters of `module`.

    The module is left untouched: the means are copies of its parameters.

    Example:
        >>> net = zuko.nn.MLP(3, 5)
        >>> q = init(net, init_logvar=-6.0, exclude=["**.bias"])
        >>> list(q.mean)
        ['0.weight', '2.weight', '4.weight']

    Arguments:
        module: A module.
        init_logvar: The initial log-variance: a float; a dict from every picked name to
            a float or a tensor broadcastable to the parameter; or a callable
            `init_logvar(name, param)` that returns one of those.
        include: Glob patterns of the parameters to make Bayesian (see :func:`select`).
        exclude: Glob patterns of the parameters to leave deterministic.

    Returns:
        A posterior whose tensors are fresh leaves with `requires_grad=True`, of the
        parameters' dtypes and devices.

    Raises:
        ValueError: If the patterns pick nothing (or only the second name of a tied
            Parameter), or `init_logvar` is not finite or does not fit.
        TypeError: If a picked parameter is not real floating-point (complex or integer),
            or `module` is a :class:`bayesflow.BayesianModel` (whose posterior is
            `bnet.posterior`).
    """

    # A BayesianModel's own tensors are its posterior's means and log-variances.
    check_not_bridge("init", module, "use bnet.posterior, or bayesflow.init(bnet.base)")
    return _posterior.init("init", module, init_logvar, include, exclude)


def sample(
    posterior: Posterior,
    n: int,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    r"""Draws `n` parameter sets :math:`\theta_i = \mu + \sigma \odot \epsilon_i` from `posterior`.

    All the noise :math:`\epsilon_i \sim \mathcal{N}(0, I)` is drawn in one call (one per
    device and dtype) from `generator`: the same generator state gives the same samples,
    whatever is done with them afterwards. One call of `n` samples draws the noise as one
    `(n, P)` block, so its `k`-th sample is not the one the `k`-th of `n` calls with
    `n = 1` draws (the same law, other numbers).

    Example:
        >>> q = init(zuko.nn.MLP(3, 5))
        >>> params = sample(q, 4, generator=torch.Generator().manual_seed(0))
        >>> params["0.weight"].shape
        torch.Size([4, 64, 3])

    Arguments:
        posterior: The posterior :math:`q`.
        n: The number of parameter sets.
        generator: The source of randomness; the global one if :py:`None`; on the
            posterior's device.

    Returns:
        Tensors of shape `(n, *param.shape)`, differentiable with respect to `posterior`.

    Raises:
        ValueError: If a mean or log-variance holds NaN or infinite values, or `generator`
            is on another device (checked before any noise is drawn).
    """

    return _posterior.sample("sample", posterior, n, generator)


def std(posterior: Posterior) -> dict[str, Tensor]:
    r"""Returns the standard deviations :math:`\sigma` of a posterior, by name.

    The tensors carry the graph back to `posterior` (they require gradients), so that a
    loss can use them. To read them (print, plot, `float()`, `.numpy()`), compute them
    under :func:`torch.no_grad`, as below, or `.detach()` them: `float()` of a tensor that
    requires gradients warns. `print(posterior)` shows the range of :math:`\sigma` per
    tensor.

    Example:
        >>> q = bayesflow.init(torch.nn.Linear(3, 2), init_logvar=-9.0)
        >>> with torch.no_grad():
        ...     sigma = bayesflow.std(q)
        >>> round(float(sigma["weight"].max()), 4)
        0.0179

    Arguments:
        posterior: The posterior :math:`q`.

    Returns:
        Tensors of the parameters' shapes, differentiable with respect to `posterior`,
        within :math:`[e^{-9}, e^9]` for every log-variance, infinite ones included.
    """

    check_posterior("std", posterior)
    for name, lv in posterior.logvar.items():
        if not lv.is_floating_point():
            raise TypeError(
                f"std: expected real floating-point posterior tensors, got "
                f"posterior.logvar[{name!r}] of dtype {lv.dtype}"
            )
    return {name: _std(lv) for name, lv in posterior.logvar.items()}


def mean_params(posterior: Posterior) -> dict[str, Tensor]:
    r"""Returns the parameters of the mean model, :math:`\theta = \mu`, with a sample dim of 1.

    Arguments:
        posterior: The posterior :math:`q`.

    Returns:
        Tensors of shape `(1, *param.shape)`, ready for :func:`bayesflow.vmap_call`.
    """

    check_posterior("mean_params", posterior)

    return {name: m.unsqueeze(0) for name, m in posterior.mean.items()}


def mean_model(module: nn.Module, posterior: Posterior) -> nn.Module:
    r"""Returns a standalone copy of `module` whose parameters are the posterior means.

    The copy is detached from `posterior` (no gradient reaches it) and can be used in
    every way the module can, lazy flows included.

    Arguments:
        module: The module `posterior` was made from.
        posterior: The posterior :math:`q`.

    Returns:
        A deep copy of `module` with :math:`\theta = \mu`.
    """

    return _posterior.mean_model("mean_model", module, posterior)


def kl_divergence(posterior: Posterior, prior_var: float = 1.0) -> Tensor:
    r"""Returns :math:`\mathrm{KL}(q \,\|\, p)` for the prior :math:`p = \mathcal{N}(0, s^2 I)`.

    In closed form, summed over every element,

    .. math:: \mathrm{KL} = \frac{1}{2} \sum \left( \frac{\sigma^2 + \mu^2}{s^2}
        + \log s^2 - \log \sigma^2 - 1 \right).

    It equals :meth:`zuko.bayesian.BayesianModel.kl_divergence` for the same state. The
    sum is taken in at least float32, so that half-precision posteriors do not overflow.

    Arguments:
        posterior: The posterior :math:`q`.
        prior_var: The prior variance :math:`s^2 > 0`: a number, or a one-element tensor;
            one that requires grad (a learned prior variance) gets its gradient.

    Returns:
        A scalar tensor (float32 or float64), differentiable with respect to `posterior`
        (and to `prior_var` if it requires grad).

    Raises:
        ValueError: If a mean or log-variance holds NaN or infinite values.
    """

    return _posterior.kl_divergence("kl_divergence", posterior, prior_var)


def stack_params(modules: Sequence[nn.Module]) -> dict[str, Tensor]:
    r"""Stacks the parameters of independently trained modules of one architecture (a deep
    ensemble) on a new leading dim, for :func:`bayesflow.vmap_call` on `modules[0]`.

    The ensemble then goes through the same vectorized path and the same predictive
    summaries as posterior samples. Buffers are not stacked: `vmap_call` uses those of
    `modules[0]`, so they must be equal in every member; members with buffers of their
    own (BatchNorm statistics) go through :func:`bayesflow.stack_modules`.

    Example:
        >>> nets = [zuko.nn.MLP(3, 5) for _ in range(4)]
        >>> params = stack_params(nets)
        >>> bayesflow.vmap_call(nets[0], params, torch.randn(16, 3)).shape
        torch.Size([4, 16, 5])

    Arguments:
        modules: `n >= 1` modules of the same class, with the same parameter names and
            shapes, equal buffers and the same submodules (names and classes), each in the
            same mode and, for torch's layers, with the same settings.

    Returns:
        Tensors of shape `(n, *param.shape)`, differentiable with respect to every member's
        parameters.
    """

    tables = check_members("stack_params", modules, equal_buffers=True)
    return {name: torch.stack([t[0][name] for t in tables]) for name in tables[0][0]}
