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
    "std",
]

import copy
import math
import re

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn

from torch import Tensor

LOGVAR_BOUND = 18.0

InitLogvar = float | Mapping[str, float | Tensor] | Callable[[str, Tensor], float | Tensor]


class Posterior(NamedTuple):
    r"""A mean-field Gaussian :math:`q(\theta) = \mathcal{N}(\mu, \mathrm{diag}(\sigma^2))`.

    Both fields map parameter names, as in :meth:`torch.nn.Module.named_parameters`, to
    tensors of the parameter's shape. The variance is parameterized as in zuko,
    :math:`\sigma^2 = \exp(\mathrm{softclip}(\log \sigma^2, 18))` with
    :math:`\mathrm{softclip}(x, b) = x / \sqrt{1 + (x / b)^2}`, which keeps it within
    :math:`(e^{-18}, e^{18})` without ever cutting gradients.

    Attributes:
        mean: The means :math:`\mu`.
        logvar: The unconstrained log-variances :math:`\log \sigma^2`.
    """

    mean: dict[str, Tensor]
    logvar: dict[str, Tensor]


def _softclip(x: Tensor, bound: float = LOGVAR_BOUND) -> Tensor:
    return x * (1 + (x / bound).square()).rsqrt()


def std(posterior: Posterior) -> dict[str, Tensor]:
    r"""Returns the standard deviations :math:`\sigma` of a posterior, by name."""

    return {name: _softclip(lv).div(2).exp() for name, lv in posterior.logvar.items()}


def _compile(where: str, pattern: object) -> re.Pattern:
    if not isinstance(pattern, str):
        raise TypeError(f"{where}: expected glob patterns as strings, got {pattern!r}")
    if pattern == "":
        return re.compile(r".*")

    parts = []
    for segment in pattern.split("."):
        if segment == "**":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        elif re.fullmatch(r"(?:\w|\*(?!\*))+", segment):
            parts.append("[^.]*".join(re.escape(s) for s in segment.split("*")))
        else:
            raise ValueError(
                f"{where}: malformed glob pattern {pattern!r}: expected dot-separated segments "
                "of letters, digits, '_' and '*', or a lone '**'"
            )

    return re.compile(r"\.".join(parts) + r"(?:\..*)?")


def _patterns(where: str, globs: object) -> list[re.Pattern]:
    if isinstance(globs, str):
        globs = (globs,)
    if not isinstance(globs, Sequence):
        raise TypeError(f"{where}: expected a sequence of glob patterns, got {globs!r}")
    return [_compile(where, g) for g in globs]


def _check_module(where: str, module: object) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{where}: expected a torch.nn.Module, got {type(module).__name__}")


def select(
    module: nn.Module,
    include: Sequence[str] = ("",),
    exclude: Sequence[str] = (),
) -> list[str]:
    r"""Returns the names of the parameters of `module` picked by glob patterns.

    A name is picked if it starts with a match of an `include` pattern and with no match
    of an `exclude` pattern. Patterns are dot-separated: `*` matches one name segment
    (or part of one, as in `lin*`), `**` one or more segments, and a pattern matches
    whole leading segments, so `0` picks `0.weight` but not `10.weight`. The empty
    pattern picks everything.

    Example:
        >>> net = zuko.nn.MLP(3, 5)
        >>> select(net, include=["**"], exclude=["**.bias"])
        ['0.weight', '2.weight', '4.weight']

    Arguments:
        module: A module.
        include: Patterns of the names to pick.
        exclude: Patterns of the names to leave out.

    Returns:
        The picked names, in the order of :meth:`torch.nn.Module.named_parameters`.
    """

    return _select("select", module, include, exclude)


def _select(
    where: str, module: nn.Module, include: Sequence[str], exclude: Sequence[str]
) -> list[str]:
    _check_module(where, module)
    inc = _patterns(where, include)
    exc = _patterns(where, exclude)

    return [
        name
        for name, _ in module.named_parameters()
        if any(p.fullmatch(name) for p in inc) and not any(p.fullmatch(name) for p in exc)
    ]


def _logvar_value(where: str, name: str, value: object, like: Tensor) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(
            f"{where}: expected init_logvar for {name!r} to be a float or a tensor, "
            f"got {type(value).__name__}"
        )

    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)

    if not torch.isfinite(value).all():
        raise ValueError(f"{where}: expected a finite init_logvar for {name!r}, got {value}")

    try:
        return torch.broadcast_to(value, like.shape).clone()
    except RuntimeError:
        raise ValueError(
            f"{where}: expected init_logvar for {name!r} to broadcast to "
            f"{tuple(like.shape)}, got shape {tuple(value.shape)}"
        ) from None


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
        A posterior whose tensors are fresh leaves with `requires_grad=True`.
    """

    return _init("init", module, init_logvar, include, exclude)


def _init(
    where: str,
    module: nn.Module,
    init_logvar: InitLogvar,
    include: Sequence[str],
    exclude: Sequence[str],
) -> Posterior:
    names = _select(where, module, include, exclude)

    if not names:
        raise ValueError(
            f"{where}: expected include={tuple(include)!r} and exclude={tuple(exclude)!r} to "
            f"pick at least one parameter of {type(module).__name__}, got none"
        )

    params = dict(module.named_parameters())

    if isinstance(init_logvar, Mapping):
        unknown = sorted(set(init_logvar) - set(names))
        missing = [n for n in names if n not in init_logvar]
        if unknown or missing:
            raise ValueError(
                f"{where}: expected init_logvar to map every picked parameter name, got "
                f"unknown names {unknown} and missing names {missing}"
            )
        values = {n: init_logvar[n] for n in names}
    elif callable(init_logvar):
        values = {n: init_logvar(n, params[n]) for n in names}
    else:
        values = dict.fromkeys(names, init_logvar)

    logvar = {n: _logvar_value(where, n, values[n], params[n]) for n in names}
    mean = {n: params[n].detach().clone() for n in names}

    return Posterior(
        mean={n: t.requires_grad_() for n, t in mean.items()},
        logvar={n: t.requires_grad_() for n, t in logvar.items()},
    )


def _check_posterior(where: str, posterior: object) -> None:
    if not isinstance(posterior, Posterior):
        raise TypeError(f"{where}: expected a bayesflow.Posterior, got {type(posterior).__name__}")
    if posterior.mean.keys() != posterior.logvar.keys():
        raise ValueError(
            f"{where}: expected mean and logvar with the same names, got "
            f"{sorted(posterior.mean)} and {sorted(posterior.logvar)}"
        )
    for name, m in posterior.mean.items():
        lv = posterior.logvar[name]
        if m.shape != lv.shape:
            raise ValueError(
                f"{where}: expected mean and logvar of {name!r} with the same shape, "
                f"got {tuple(m.shape)} and {tuple(lv.shape)}"
            )


def _check_n(where: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{where}: expected n to be a positive int, got {type(n).__name__} {n!r}")
    if n < 1:
        raise ValueError(f"{where}: expected n to be a positive int, got {n}")
    return n


def _check_generator(where: str, generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{where}: expected generator to be a torch.Generator or None, "
            f"got {type(generator).__name__}"
        )


def sample(
    posterior: Posterior,
    n: int,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    r"""Draws `n` parameter sets :math:`\theta_i = \mu + \sigma \odot \epsilon_i` from `posterior`.

    All the noise :math:`\epsilon_i \sim \mathcal{N}(0, I)` is drawn in one call (one per
    device and dtype) from `generator`: the same generator state gives the same samples,
    whatever is done with them afterwards.

    Example:
        >>> q = init(zuko.nn.MLP(3, 5))
        >>> params = sample(q, 4, generator=torch.Generator().manual_seed(0))
        >>> params["0.weight"].shape
        torch.Size([4, 64, 3])

    Arguments:
        posterior: The posterior :math:`q`.
        n: The number of parameter sets.
        generator: The source of randomness; the global one if :py:`None`.

    Returns:
        Tensors of shape `(n, *param.shape)`, differentiable with respect to `posterior`.
    """

    return _sample("sample", posterior, n, generator)


def _flat_std(posterior: Posterior, names: list[str], sizes: list[int]) -> Sequence[Tensor]:
    r"""Returns the flat standard deviations of `names`, in one pass where it can."""

    logvars = [posterior.logvar[k] for k in names]
    if len(logvars) == 1 or len({(lv.device, lv.dtype) for lv in logvars}) > 1:
        return [_softclip(lv).div(2).exp().reshape(-1) for lv in logvars]

    # One elementwise pass over all the log-variances costs a sixth of one per tensor.
    flat = torch.cat([lv.reshape(-1) for lv in logvars])
    return _softclip(flat).div(2).exp().split(sizes)


def _sample(
    where: str, posterior: Posterior, n: int, generator: torch.Generator | None
) -> dict[str, Tensor]:
    _check_posterior(where, posterior)
    _check_n(where, n)
    _check_generator(where, generator)

    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for name, m in posterior.mean.items():
        groups.setdefault((m.device, m.dtype), []).append(name)

    params = {}

    for (device, dtype), names in groups.items():
        sizes = [posterior.mean[k].numel() for k in names]
        eps = torch.randn(n, sum(sizes), generator=generator, device=device, dtype=dtype)
        sigmas = _flat_std(posterior, names, sizes)

        for name, e, s in zip(names, eps.split(sizes, dim=1), sigmas, strict=True):
            m = posterior.mean[name]
            params[name] = torch.addcmul(m, s.view(m.shape), e.view(n, *m.shape))

    return {name: params[name] for name in posterior.mean}


def mean_params(posterior: Posterior) -> dict[str, Tensor]:
    r"""Returns the parameters of the mean model, :math:`\theta = \mu`, with a sample dim of 1.

    Arguments:
        posterior: The posterior :math:`q`.

    Returns:
        Tensors of shape `(1, *param.shape)`, ready for :func:`bayesflow.vmap_call`.
    """

    _check_posterior("mean_params", posterior)

    return {name: m.unsqueeze(0) for name, m in posterior.mean.items()}


def _check_matches(where: str, module: nn.Module, posterior: Posterior) -> None:
    named = dict(module.named_parameters())
    for name, m in posterior.mean.items():
        if name not in named or named[name].shape != m.shape:
            raise ValueError(
                f"{where}: expected posterior names and shapes from "
                f"{type(module).__name__}.named_parameters(), got {name!r} of shape "
                f"{tuple(m.shape)}"
            )


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

    _check_module("mean_model", module)
    _check_posterior("mean_model", posterior)
    _check_matches("mean_model", module, posterior)

    new = copy.deepcopy(module)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if name in posterior.mean:
                p.copy_(posterior.mean[name])

    return new


def kl_divergence(posterior: Posterior, prior_var: float = 1.0) -> Tensor:
    r"""Returns :math:`\mathrm{KL}(q \,\|\, p)` for the prior :math:`p = \mathcal{N}(0, s^2 I)`.

    In closed form, summed over every element,

    .. math:: \mathrm{KL} = \frac{1}{2} \sum \left( \frac{\sigma^2 + \mu^2}{s^2}
        + \log s^2 - \log \sigma^2 - 1 \right).

    It equals :meth:`zuko.bayesian.BayesianModel.kl_divergence` for the same state.

    Arguments:
        posterior: The posterior :math:`q`.
        prior_var: The prior variance :math:`s^2 > 0`.

    Returns:
        A scalar tensor, differentiable with respect to `posterior`.
    """

    return _kl_divergence("kl_divergence", posterior, prior_var)


def _kl_divergence(where: str, posterior: Posterior, prior_var: float) -> Tensor:
    _check_posterior(where, posterior)

    if isinstance(prior_var, bool) or not isinstance(prior_var, (int, float)):
        raise TypeError(
            f"{where}: expected prior_var to be a float, got {type(prior_var).__name__}"
        )
    if not (math.isfinite(prior_var) and prior_var > 0):
        raise ValueError(f"{where}: expected a finite prior_var > 0, got {prior_var}")

    log_prior_var = math.log(prior_var)
    kl = 0.0

    for name, m in posterior.mean.items():
        logvar = _softclip(posterior.logvar[name])
        kl = (
            kl
            + 0.5 * ((logvar.exp() + m.square()) / prior_var + log_prior_var - logvar - 1.0).sum()
        )

    return torch.as_tensor(kl)
