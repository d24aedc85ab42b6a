r"""Priors over named parameters and their KL divergences from a posterior."""

from __future__ import annotations

__all__ = ["GaussianPrior", "Prior", "ScaleMixturePrior", "prior_kl"]

import math
import numbers

from collections.abc import Mapping
from typing import NamedTuple, Union

import torch
import torch.nn as nn

from torch import Tensor

from . import _posterior, _sampling
from ._checks import (
    check_broadcasts,
    check_generator,
    check_module,
    check_n,
    check_number,
    check_posterior,
    check_real,
)
from ._compat import dual, flat_cat, in_func_transform
from ._engine import draw_state, restore_draw_state
from ._numerics import accumulator, softclip
from ._types import Posterior

Value = Union[float, Tensor, Mapping[str, Union[float, Tensor]]]  # noqa: UP007

LOG_2PI = math.log(2 * math.pi)


class _Extent(NamedTuple):
    r"""The least and the greatest values of a prior mean or variance: floats, or dicts of
    floats by parameter name."""

    lo: float | dict[str, float]
    hi: float | dict[str, float]


class _Checked(NamedTuple):
    r"""A Gaussian prior's mean and variance as they were checked, their extents, the
    names and dtypes (of the KL) they were found to fit, and their stamps."""

    mean: Value
    var: Value
    mean_extent: _Extent
    var_extent: _Extent
    fits: set[tuple[tuple[str, ...], torch.dtype]]
    stamps: tuple[tuple, tuple]


def _stamp(value: Value) -> tuple:
    r"""What a change of a prior value in place changes: the entries of a dict, and the
    version counter of each tensor (held, so that a freed tensor's id is never taken for
    it)."""

    items = value.items() if isinstance(value, Mapping) else ((None, value),)
    return tuple((k, v, v._version if isinstance(v, Tensor) else None) for k, v in items)


def _same_stamp(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        ka == kb and va is vb and ra == rb for (ka, va, ra), (kb, vb, rb) in zip(a, b, strict=True)
    )


def _check_value(
    where: str, what: str, value: object, positive: bool, top: bool = True
) -> tuple[Value, _Extent]:
    r"""Checks a prior value: a float, a tensor, or (at the top only) a dict of them. Returns
    it (tensors copied) and its extent."""

    if top and isinstance(value, Mapping):
        checked = {
            name: _check_value(where, f"{what}[{name!r}]", v, positive, top=False)
            for name, v in value.items()
        }
        return (
            {name: v for name, (v, _) in checked.items()},
            _Extent(
                {name: e.lo for name, (_, e) in checked.items()},
                {name: e.hi for name, (_, e) in checked.items()},
            ),
        )
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        kind = "a float, a tensor or a dict of them" if top else "a float or a tensor"
        raise TypeError(f"{where}: expected {what} to be {kind}, got {type(value).__name__}")
    if isinstance(value, Tensor):
        if value.is_meta:
            raise ValueError(
                f"{where}: expected {what} with data, got a tensor on the meta device"
            )
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"{where}: expected {what} to be a real tensor (floating-point or integer), "
                f"got {value.dtype}"
            )

    # As Python floats, not in the default dtype: 1e-50 and 1e39 are positive and finite;
    # the KL checks them against its own dtype (`_sampling.check_prior_range`).
    if isinstance(value, Tensor) and value.numel() == 0:
        lo, hi = math.inf, -math.inf  # no value: none to check, the identities of min and max
    else:
        if isinstance(value, Tensor):
            lo, hi = (float(x) for x in torch.stack(torch.aminmax(value.detach())).tolist())
        else:
            lo = hi = _as_float(value)
        if not (math.isfinite(lo) and math.isfinite(hi)) or (positive and not lo > 0):
            bound = " > 0" if positive else ""
            raise ValueError(f"{where}: expected a finite {what}{bound}, got {value}")

    # A copy: a prior made from a module's parameters must not move as the module trains.
    copy = float(value) if not isinstance(value, Tensor) else value.detach().clone()
    return copy, _Extent(lo, hi)


def _as_float(value: float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        return math.inf


def _entropy(posterior: Posterior) -> Tensor:
    r"""Returns the entropy of the posterior, in closed form (half precision summed in
    float32, as the closed-form KL)."""

    h = 0.0
    for lv in posterior.logvar.values():
        h = h + 0.5 * (softclip(lv.to(accumulator(lv))) + LOG_2PI + 1.0).sum()
    return torch.as_tensor(h)


def _check_params(where: str, params: object) -> None:
    if not isinstance(params, Mapping) or not all(isinstance(t, Tensor) for t in params.values()):
        raise TypeError(
            f"{where}: expected parameter sets {{name: (n, *shape) tensor}}, as "
            f"bayesflow.sample gives, got {type(params).__name__}"
        )
    # One set of unbatched parameters, or sets of different sizes, were broadcast silently.
    tensors = params.values()
    if any(t.dim() == 0 for t in tensors) or len({t.shape[0] for t in tensors}) > 1:
        shapes = {name: tuple(t.shape) for name, t in params.items()}
        raise ValueError(
            f"{where}: expected parameter sets {{name: (n, *shape) tensor}} with the same "
            f"leading n for every name, as bayesflow.sample gives, got shapes {shapes}"
        )


def _sum_per_sample(x: Tensor) -> Tensor:
    r"""Sums `(n, *shape)` over all but the first dim; a scalar parameter's `(n,)` as it is."""

    return x if x.dim() == 1 else x.flatten(1).sum(1)


class Prior:
    r"""A prior :math:`p(\theta)` over named parameters.

    Subclasses implement :meth:`log_prob`; those with a closed-form KL divergence from
    a mean-field Gaussian posterior set `closed_form` and implement `_closed_kl`.
    """

    closed_form: bool = False

    def log_prob(self, params: Mapping[str, Tensor]) -> Tensor:
        r"""Returns :math:`\log p(\theta)` for parameter sets `{name: (n, *shape)}`.

        Arguments:
            params: Sampled parameters, e.g. from :func:`bayesflow.sample`: every tensor
                with the same leading dim `n` (checked).

        Returns:
            The log-densities, summed over the elements of every parameter, of shape `(n,)`
            (in float32 for half-precision parameters).
        """

        where = f"{type(self).__name__}.log_prob"
        _check_params(where, params)
        raise NotImplementedError(f"{where}: not implemented (a subclass of Prior implements it)")

    def kl(
        self,
        posterior: Posterior,
        generator: torch.Generator | None = None,
        n: int | None = None,
    ) -> Tensor:
        r"""Returns :math:`\mathrm{KL}(q \,\|\, p)` for a posterior :math:`q`.

        By Monte Carlo, with the entropy of :math:`q` in closed form,

        .. math:: \mathrm{KL} \approx -\mathrm{H}(q) - \frac{1}{n} \sum_{i=1}^n
            \log p(\theta_i), \quad \theta_i \sim q,

        an unbiased estimate whose gradients are reparameterized; in closed form where
        the prior has one and `n` is :py:`None`.

        Arguments:
            posterior: The posterior :math:`q`.
            generator: The source of randomness of the Monte Carlo estimate.
            n: The number of Monte Carlo samples; :py:`None` for the closed form, or
                one sample if there is none.

        Returns:
            A scalar tensor, differentiable with respect to `posterior`.
        """

        return self._kl(f"{type(self).__name__}.kl", posterior, generator, n)

    def _kl(
        self, where: str, posterior: Posterior, generator: torch.Generator | None, n: int | None
    ) -> Tensor:
        if n is None and self.closed_form:
            check_posterior(where, posterior)
            check_generator(where, generator)
            self._check_names(where, posterior)
            return self._closed_kl(where, posterior)
        return self._kl_mc(where, posterior, generator, n)

    def _closed_kl(self, where: str, posterior: Posterior) -> Tensor:
        raise NotImplementedError

    def _kl_mc(
        self,
        where: str,
        posterior: Posterior,
        generator: torch.Generator | None,
        n: int | None,
    ) -> Tensor:
        check_posterior(where, posterior)
        check_generator(where, generator)
        n = 1 if n is None else check_n(where, n)
        self._check_names(where, posterior)
        if type(self).log_prob is Prior.log_prob:
            raise TypeError(
                f"{where}: expected a prior with a log_prob of its own for a Monte Carlo KL, "
                f"got {type(self).__name__}, which does not implement it"
            )

        # A log_prob that raises leaves the generator as found: a failed call draws nothing.
        saved = draw_state(generator)
        try:
            params = _posterior.sample(where, posterior, n, generator)
            log_prob = self.log_prob(params)
            if not isinstance(log_prob, Tensor) or log_prob.shape != (n,):
                got = tuple(log_prob.shape) if isinstance(log_prob, Tensor) else type(log_prob)
                raise ValueError(
                    f"{where}: expected {type(self).__name__}.log_prob to return one "
                    f"log-density per parameter set, of shape ({n},), got "
                    f"{got if isinstance(got, tuple) else got.__name__}"
                )
            return -_entropy(posterior) - log_prob.mean()
        except BaseException:
            restore_draw_state(saved)
            raise

    def _check_names(self, where: str, posterior: Posterior) -> None:
        pass


def _flat_value(
    value: Value,
    names: list[str],
    shapes: tuple[torch.Size, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> float | Tensor:
    r"""Returns a prior value for the flat parameters `names`: a float if it is one
    float for all, else a flat tensor (the names and shapes are checked already)."""

    values = [value[k] for k in names] if isinstance(value, Mapping) else [value] * len(names)
    if not any(isinstance(v, Tensor) for v in values) and len(set(values)) == 1:
        return float(values[0])
    parts = [
        torch.as_tensor(v, dtype=dtype, device=device).expand(shape)
        for v, shape in zip(values, shapes, strict=True)
    ]
    return flat_cat(parts)


def _check_range(
    where: str,
    what: str,
    extent: _Extent,
    names: list[str],
    dtype: torch.dtype,
    variance: bool,
    converted: bool,
) -> None:
    r"""Checks the values of a prior mean or variance of the parameters `names` against the
    dtype of their KL, from the extent found when the prior was made: no value is read."""

    check = _sampling.check_prior_range
    if not isinstance(extent.lo, Mapping):
        check(where, f"the prior {what}", extent.lo, extent.hi, dtype, variance, converted)
        return
    # Over the names in C (map), not a Python loop: this runs at every training step.
    lo = min(map(extent.lo.__getitem__, names), default=math.inf)
    hi = max(map(extent.hi.__getitem__, names), default=-math.inf)
    try:
        check(where, f"the prior {what}", lo, hi, dtype, variance, converted)
    except ValueError:
        for name in names:  # the first that fails raises, with its name
            lo, hi = extent.lo[name], extent.hi[name]
            check(where, f"the prior {what} of {name!r}", lo, hi, dtype, variance, converted)
        raise


def _lookup(value: Value, name: str, like: Tensor) -> Tensor | float:
    if isinstance(value, Mapping):
        value = value[name]
    if isinstance(value, Tensor):
        return value.to(dtype=like.dtype, device=like.device)
    return value


class GaussianPrior(Prior):
    r"""A Gaussian prior :math:`p(\theta) = \mathcal{N}(m, \mathrm{diag}(s^2))`.

    The mean and variance are scalars, or dicts from parameter names to floats or
    tensors broadcastable to the parameter; a dict must name every parameter of the
    posterior it meets, and may name others. Its KL divergence from a mean-field Gaussian
    posterior has a closed form (:meth:`kl` with `n=None`),

    .. math:: \mathrm{KL} = \frac{1}{2} \sum \left( \frac{\sigma^2 + (\mu - m)^2}{s^2}
        + \log s^2 - \log \sigma^2 - 1 \right).

    Example:
        >>> q = bayesflow.init(zuko.nn.MLP(3, 5), init_logvar=-6.0)
        >>> prior = GaussianPrior(mean=0.0, var=1.0)
        >>> torch.allclose(prior.kl(q), bayesflow.kl_divergence(q, prior_var=1.0))
        True

    Arguments:
        mean: The prior mean :math:`m`.
        var: The prior variance :math:`s^2 > 0`.

    Floats are taken as they are (in float64); tensors, real (floating-point or integer),
    are copied (detached): a prior made from a module's parameters stays where it was made
    while the module trains. The closed-form KL is computed in the posterior's dtype
    (float32 for half precision), and refuses with a :class:`ValueError` a prior that
    does not fit it there: a variance that rounds below `torch.finfo(dtype).tiny` (the
    least normal number, 1.2e-38 in float32: its :math:`1 / s^2` overflows), a tensor
    variance or a mean that rounds to infinity.

    A subclass may set `closed_form = False` (with a `log_prob` of its own: a Monte Carlo
    KL) or override :meth:`kl`: the objectives then use its KL, as :func:`prior_kl` does,
    rather than the Gaussian closed form.
    """

    closed_form = True

    def __init__(self, mean: Value = 0.0, var: Value = 1.0) -> None:
        self.mean, mean_extent = _check_value("GaussianPrior", "mean", mean, positive=False)
        self.var, var_extent = _check_value("GaussianPrior", "var", var, positive=True)
        stamps = _stamp(self.mean), _stamp(self.var)
        self._checked = _Checked(self.mean, self.var, mean_extent, var_extent, set(), stamps)

    def __repr__(self) -> str:
        def show(v: Value) -> str:
            return f"<{len(v)} tensors>" if isinstance(v, Mapping) else repr(v)

        return f"GaussianPrior(mean={show(self.mean)}, var={show(self.var)})"

    @classmethod
    def from_module(cls, module: nn.Module, var: Value = 1.0) -> GaussianPrior:
        r"""Creates a prior centred on the current (e.g. pretrained) parameters of `module`.

        This is the prior of MOPED: with a posterior also initialized at the pretrained
        weights (:func:`bayesflow.init`), training moves away from them only as far as
        the data demand.

        Arguments:
            module: A module, whose parameters are copied (detached).
            var: The prior variance :math:`s^2 > 0`, a scalar or a dict by name (as for
                :class:`GaussianPrior`: within the range of the dtype of the KL).

        Returns:
            A :class:`GaussianPrior` whose mean maps every parameter name of `module`.

        References:
            | Specifying Weight Priors in Bayesian Deep Neural Networks with Empirical
            | Bayes (Krishnan et al., 2020) https://arxiv.org/abs/1906.05323
        """

        check_module("GaussianPrior.from_module", module)
        mean = {name: p.detach().clone() for name, p in module.named_parameters()}

        return cls(mean=mean, var=var)

    def _check_names(self, where: str, posterior: Posterior) -> None:
        for what, value in (("mean", self.mean), ("var", self.var)):
            if isinstance(value, Mapping):
                missing = [name for name in posterior.mean if name not in value]
                if missing:
                    raise ValueError(
                        f"{where}: expected the prior {what} to name every posterior "
                        f"parameter, got missing names {missing}"
                    )
        for name, m in posterior.mean.items():
            for what, value in (("mean", self.mean), ("var", self.var)):
                v = _lookup(value, name, m)
                if isinstance(v, Tensor):
                    check_broadcasts(where, f"the prior {what} of {name!r}", v, m.shape)

    def log_prob(self, params: Mapping[str, Tensor]) -> Tensor:
        where = "GaussianPrior.log_prob"
        _check_params(where, params)
        for what, value in (("mean", self.mean), ("var", self.var)):
            if isinstance(value, Mapping) and not params.keys() <= value.keys():
                raise ValueError(
                    f"{where}: expected the prior {what} to name every "
                    f"parameter, got missing names {sorted(params.keys() - value.keys())}"
                )
        for name, theta in params.items():
            for what, value in (("mean", self.mean), ("var", self.var)):
                v = value[name] if isinstance(value, Mapping) else value
                if isinstance(v, Tensor):  # against the parameter's shape, (n, *shape)[1:]
                    check_broadcasts(where, f"the prior {what} of {name!r}", v, theta.shape[1:])

        lp = 0.0
        for name, theta in params.items():
            theta = theta.to(accumulator(theta))  # half precision: in float32
            m = _lookup(self.mean, name, theta)
            s2 = _lookup(self.var, name, theta)
            log_s2 = torch.log(s2) if isinstance(s2, Tensor) else math.log(s2)
            x = -0.5 * ((theta - m).square() / s2 + log_s2 + LOG_2PI)
            lp = lp + _sum_per_sample(x.expand_as(theta))
        return torch.as_tensor(lp)

    def _closed_kl(self, where: str, posterior: Posterior) -> Tensor:
        return _sampling.gaussian_kl_divergence(where, posterior, self._flat)

    def _flat(
        self,
        where: str,
        names: list[str],
        shapes: tuple[torch.Size, ...],
        dtype: torch.dtype,
        device: torch.device,
    ) -> _sampling.FlatPrior:
        r"""Returns the prior of the parameters `names`, flattened and concatenated: for
        half precision in float32, where its KL is summed (rounding the prior first would
        move the KL by up to 1%); its values checked against that dtype."""

        dtype = accumulator(dtype)
        mean = _flat_value(self.mean, names, shapes, dtype, device)
        var = _flat_value(self.var, names, shapes, dtype, device)
        checked = self._checked_values(where)
        key, fits = (tuple(names), dtype), checked.fits
        if key not in fits:  # once per names and dtype, not at every training step
            _check_range(where, "mean", checked.mean_extent, names, dtype, False, True)
            var_extent = checked.var_extent
            _check_range(where, "var", var_extent, names, dtype, True, isinstance(var, Tensor))
            if len(fits) >= 64:
                fits.clear()
            fits.add(key)
        return _sampling.FlatPrior(None if isinstance(mean, float) and mean == 0.0 else mean, var)

    def _checked_values(self, where: str) -> _Checked:
        r"""Returns the mean and the variance as they were checked, checked again if either
        was replaced or changed in place since (an entry of a dict, a tensor's values), or
        a subclass set them itself."""

        checked = self.__dict__.get("_checked")
        if (
            checked is None
            or checked.mean is not self.mean
            or checked.var is not self.var
            or not _same_stamp(checked.stamps[0], _stamp(self.mean))
            or not _same_stamp(checked.stamps[1], _stamp(self.var))
        ):
            _, mean_extent = _check_value(where, "mean", self.mean, positive=False)
            _, var_extent = _check_value(where, "var", self.var, positive=True)
            stamps = _stamp(self.mean), _stamp(self.var)
            checked = _Checked(self.mean, self.var, mean_extent, var_extent, set(), stamps)
            self._checked = checked
        return checked


class ScaleMixturePrior(Prior):
    r"""A scale mixture of two centred Gaussians, element-wise,

    .. math:: p(\theta) = \prod_j \left( \pi \, \mathcal{N}(\theta_j \mid 0, s_1^2)
        + (1 - \pi) \, \mathcal{N}(\theta_j \mid 0, s_2^2) \right).

    Its KL divergence has no closed form: :meth:`kl` is a Monte Carlo estimate whose
    log-density is computed with :func:`torch.logaddexp`, stable for any :math:`\theta`.

    Example:
        >>> q = bayesflow.init(zuko.nn.MLP(3, 5), init_logvar=-6.0)
        >>> prior = ScaleMixturePrior(0.5, 1.0, math.exp(-6))
        >>> prior.kl(q, n=4).shape
        torch.Size([])

    Arguments:
        pi: The weight :math:`0 < \pi < 1` of the first component.
        var1: The variance :math:`s_1^2 > 0` of the first component.
        var2: The variance :math:`s_2^2 > 0` of the second component.

    References:
        | Weight Uncertainty in Neural Networks (Blundell et al., 2015)
        | https://arxiv.org/abs/1505.05424
    """

    def __init__(self, pi: float, var1: float, var2: float) -> None:
        where = "ScaleMixturePrior"
        pi, var1, var2 = (
            check_real(where, what, value)
            for what, value in (("pi", pi), ("var1", var1), ("var2", var2))
        )
        if not (0 < pi < 1):
            raise ValueError(f"{where}: expected 0 < pi < 1, got {pi}")
        for what, value in (("var1", var1), ("var2", var2)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{where}: expected a finite {what} > 0, got {value}")

        self.pi, self.var1, self.var2 = pi, var1, var2

    def __repr__(self) -> str:
        return f"ScaleMixturePrior(pi={self.pi}, var1={self.var1}, var2={self.var2})"

    def log_prob(self, params: Mapping[str, Tensor]) -> Tensor:
        _check_params("ScaleMixturePrior.log_prob", params)
        a = math.log(self.pi) - 0.5 * (math.log(self.var1) + LOG_2PI)
        b = math.log1p(-self.pi) - 0.5 * (math.log(self.var2) + LOG_2PI)

        lp = 0.0
        for theta in params.values():
            x2 = theta.to(accumulator(theta)).square()  # half precision: in float32
            x = torch.logaddexp(a - 0.5 * x2 / self.var1, b - 0.5 * x2 / self.var2)
            lp = lp + _sum_per_sample(x)
        return torch.as_tensor(lp)


def check_prior(where: str, prior: object, posterior: Posterior) -> None:
    r"""Checks a prior as :func:`prior_kl` takes it, against `posterior`, before any work."""

    if prior is None:
        return
    if isinstance(prior, Prior):
        kind = type(prior)
        closed = prior.closed_form and kind._closed_kl is not Prior._closed_kl
        if kind.log_prob is Prior.log_prob and kind.kl is Prior.kl and not closed:
            raise TypeError(
                f"{where}: expected a prior that implements log_prob, kl or a closed form "
                f"(a subclass of bayesflow.priors.Prior), got {kind.__name__}, which "
                f"implements none of them"
            )
        prior._check_names(where, posterior)
        return
    if not _is_variance(prior):
        raise TypeError(
            f"{where}: expected prior to be a bayesflow.priors.Prior, a float variance or None, "
            f"got {type(prior).__name__}"
        )
    check_number(where, "prior variance", prior, 0.0, strict=True)


def _is_variance(prior: object) -> bool:
    r"""Whether `prior` stands for :math:`\mathcal{N}(0, s^2 I)` by its variance: a real
    number (NumPy's too; a bool is not) or a tensor (of one real element, checked by
    :func:`check_number` as :func:`bayesflow.kl_divergence` checks it)."""

    return isinstance(prior, Tensor) or (
        isinstance(prior, numbers.Real) and not isinstance(prior, bool)
    )


def _zero_mean_prior(where: str, what: str, prior: float | Tensor) -> _sampling.PriorMaker:
    r"""Returns the prior :math:`\mathcal{N}(0, s^2 I)` of a variance as
    :func:`bayesflow.kl_divergence` takes it: a tensor that requires grad (or that a
    torch.func transform or forward-mode AD differentiates) keeps its gradient."""

    value = check_number(where, what, prior, 0.0, strict=True)
    if isinstance(prior, Tensor) and (
        prior.requires_grad or in_func_transform() or dual((prior,))
    ):
        return _sampling.zero_mean_prior(prior.reshape(()), value, what)
    return _sampling.zero_mean_prior(value, value, what)


def _gaussian_closed_form(prior: GaussianPrior) -> bool:
    r"""Whether the KL of `prior` is :class:`GaussianPrior`'s closed form: not for a subclass
    that declares none (`closed_form = False`, a Monte Carlo KL with its own `log_prob`) or
    that computes its KL itself (`kl` or `_closed_kl` overridden)."""

    kind = type(prior)
    return (
        prior.closed_form and kind.kl is Prior.kl and kind._closed_kl is GaussianPrior._closed_kl
    )


def sample_and_kl(
    where: str,
    posterior: Posterior,
    n: int | None,
    generator: torch.Generator | None,
    prior: Prior | float | Tensor | None,
) -> tuple[dict[str, Tensor], Tensor | None]:
    r"""Returns `n` samples of `posterior` (none if `n` is :py:`None`) and its closed-form
    KL divergence from `prior`, in one pass, where the prior is Gaussian (:py:`None`, a
    variance as :func:`prior_kl` takes it, or a :class:`GaussianPrior` whose KL is that
    closed form); the KL is :py:`None` for any other prior (its own :meth:`Prior.kl` is
    the objectives' to call).
    The objectives' helper: the numbers are those of :func:`bayesflow.sample` and
    :func:`prior_kl` (the KL up to rounding), and every check comes before any work."""

    if prior is None or _is_variance(prior):
        make = _zero_mean_prior(where, "prior", 1.0 if prior is None else prior)
    elif isinstance(prior, GaussianPrior) and _gaussian_closed_form(prior):
        check_posterior(where, posterior)
        prior._check_names(where, posterior)
        make = prior._flat
    elif n is None:
        return {}, None
    else:
        return _posterior.sample(where, posterior, n, generator), None

    if n is None:
        return {}, _sampling.gaussian_kl_divergence(where, posterior, make)
    return _sampling.sample_and_kl(where, posterior, n, generator, make)


def prior_kl(
    posterior: Posterior,
    prior: Prior | float | Tensor | None = None,
    generator: torch.Generator | None = None,
    n: int | None = None,
) -> Tensor:
    r"""Returns :math:`\mathrm{KL}(q \,\|\, p)` for any kind of prior.

    Arguments:
        posterior: The posterior :math:`q`.
        prior: A :class:`Prior`; a variance :math:`s^2` for :math:`\mathcal{N}(0, s^2 I)`,
            a real number or a one-element tensor, as :func:`bayesflow.kl_divergence` takes
            it (one that requires grad gets its gradient, in the closed form only);
            :math:`\mathcal{N}(0, I)` if :py:`None`. The closed form is computed in the
            posterior's dtype (float32 for half precision) and refuses a variance that
            rounds below `torch.finfo(dtype).tiny` there (1.2e-38 in float32).
        generator: The source of randomness of a Monte Carlo estimate.
        n: The number of Monte Carlo samples; :py:`None` for the closed form where there
            is one, else one sample.

    Returns:
        A scalar tensor, differentiable with respect to `posterior` (and to a variance
        tensor that requires grad).
    """

    where = "prior_kl"
    if prior is None or _is_variance(prior):
        if n is None:
            check_generator(where, generator)  # unused by the closed form, but still checked
            return _posterior.kl_divergence(where, posterior, 1.0 if prior is None else prior)
        var = 1.0 if prior is None else check_number(where, "prior_var", prior, 0.0, strict=True)
        if isinstance(prior, Tensor) and prior.requires_grad:
            raise ValueError(
                f"{where}: expected n=None (the closed form) with a prior_var that requires "
                f"grad, got n={n}: the Monte Carlo KL takes the prior as a constant"
            )
        return GaussianPrior(0.0, var)._kl(where, posterior, generator, n)
    if not isinstance(prior, Prior):
        raise TypeError(
            f"{where}: expected prior to be a bayesflow.priors.Prior, a float variance or "
            f"None, got {type(prior).__name__}"
        )
    return checked_kl(where, prior, prior.kl(posterior, generator=generator, n=n))


def checked_kl(where: str, prior: Prior, kl: object) -> Tensor:
    r"""Returns what `prior.kl` returned, a KL, as a scalar, or raises if it is not one (a
    `kl` of one's own that forgot its `return`, or returns a KL per tensor)."""

    what = f"{type(prior).__name__}.kl"
    if not isinstance(kl, Tensor) or not kl.is_floating_point():
        got = f"a {kl.dtype} tensor" if isinstance(kl, Tensor) else type(kl).__name__
        raise TypeError(
            f"{where}: expected {what} to return a real floating-point tensor, got {got}"
        )
    if kl.numel() != 1:
        raise ValueError(
            f"{where}: expected {what} to return one KL, a scalar tensor, got shape "
            f"{tuple(kl.shape)}"
        )
    return kl.reshape(())
