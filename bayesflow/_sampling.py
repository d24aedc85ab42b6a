r"""Sampling and the closed-form KL divergence of a mean-field posterior, fused. Every
function takes the name of the public caller for its error messages."""

from __future__ import annotations

__all__ = [
    "FlatPrior",
    "PriorMaker",
    "check_finite",
    "check_prior_range",
    "clear_plans",
    "gaussian_kl_divergence",
    "kl_divergence",
    "sample",
    "sample_and_kl",
    "zero_mean_prior",
]

import math
import threading

from collections.abc import Callable
from typing import NamedTuple

import torch

from torch import Tensor

from ._caches import register
from ._checks import check_generator, check_n, check_number, check_posterior, describe
from ._compat import (
    dual,
    flat_cat,
    function_apply,
    generating,
    in_func_transform,
    is_compiling,
    vmapped,
)
from ._numerics import (
    FlatPrior,
    SampleKL,
    accumulator,
    fused_sample_kl,
    halves,
    normal_range,
    pieces,
    plain_sample_kl,
    reach,
)
from ._types import Posterior

# Sampling and the closed-form KL divergence, fused. The tensors of one device and dtype
# (a group) get one flat copy of their means and log-variances, one draw of noise, and
# one node of the autograd graph that computes sigma, every sample and the KL in a few
# passes over the P numbers, and all their gradients in a few more. The plain path
# (`plain_sample_kl`: the same formulas, one torch operation at a time) runs where
# such a node cannot: inside torch.compile and torch.func transforms, for a graph of the
# gradients (create_graph=True), and for log-variances so large that (logvar / 18)^2
# overflows.


class _Group(NamedTuple):
    r"""The tensors of one device and dtype: their positions, sizes and shapes."""

    index: tuple[int, ...]
    sizes: tuple[int, ...]
    shapes: tuple[torch.Size, ...]
    device: torch.device
    dtype: torch.dtype


class _Plan(NamedTuple):
    r"""What sampling needs of a posterior's structure, checked once for its layout."""

    names: tuple[str, ...]
    groups: tuple[_Group, ...]


# Keyed by the names, each with the layouts (shape, dtype, device of every tensor) it was
# made for, which decide everything a plan holds and every check made before one is made:
# no reference to the tensors themselves, not even a weak one (`torch.utils.swap_tensors`,
# which converting a module may use, refuses a tensor that has one). A few layouts per
# names (two `nn.Sequential`s of other widths share their names), the last used first, and
# a bounded number of names: the oldest go first.
_PLANS: dict[tuple, list[tuple[list, _Plan]]] = {}
_PLANS_LOCK = threading.Lock()
_MAX_PLANS = 16
_MAX_LAYOUTS = 4


def clear_plans() -> None:
    r"""Forgets the structure of every posterior seen so far."""

    with _PLANS_LOCK:
        _PLANS.clear()


register(clear_plans)


def _layout(tensors: list) -> list | None:
    r"""The shape, dtype and device of every tensor (:py:`None` if one is not a tensor)."""

    layout = []
    for t in tensors:
        if not isinstance(t, Tensor):
            return None
        layout.append((t.shape, t.dtype, t.device))
    return layout


def _plan(where: str, posterior: object) -> tuple[_Plan, list[Tensor]]:
    r"""Returns the plan of `posterior` and its tensors (the means, then the log-variances
    in the same order), checking the posterior when its layout is new."""

    names = layout = None
    if isinstance(posterior, Posterior):
        mean, logvar = posterior
        if type(mean) is dict and type(logvar) is dict and mean and len(mean) == len(logvar):
            try:
                tensors = [*mean.values(), *map(logvar.__getitem__, mean)]
            except KeyError:
                tensors = None
            layout = None if tensors is None else _layout(tensors)
            if layout is not None:
                names = tuple(mean)
                for seen, plan in _PLANS.get(names, ()):
                    if seen == layout:
                        return plan, tensors

    check_posterior(where, posterior)
    names = tuple(posterior.mean)
    tensors = [*posterior.mean.values(), *(posterior.logvar[k] for k in names)]

    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, name in enumerate(names):
        m, lv = tensors[i], tensors[len(names) + i]
        if not m.is_floating_point():
            raise TypeError(
                f"{where}: expected real floating-point posterior tensors, got "
                f"posterior.mean[{name!r}] of dtype {m.dtype}"
            )
        if lv.dtype != m.dtype or lv.device != m.device:
            raise ValueError(
                f"{where}: expected posterior.logvar[{name!r}] with the dtype and device of "
                f"its mean ({describe(m)}), got {describe(lv)}"
            )
        groups.setdefault((m.device, m.dtype), []).append(i)

    plan = _Plan(
        names=names,
        groups=tuple(
            _Group(
                index=tuple(index),
                sizes=tuple(tensors[i].numel() for i in index),
                shapes=tuple(tensors[i].shape for i in index),
                device=device,
                dtype=dtype,
            )
            for (device, dtype), index in groups.items()
        ),
    )
    if layout is not None:  # (a posterior of other containers is checked at every call)
        with _PLANS_LOCK:
            entries = [(layout, plan), *_PLANS.pop(names, ())][:_MAX_LAYOUTS]
            while len(_PLANS) >= _MAX_PLANS:
                del _PLANS[next(iter(_PLANS))]
            _PLANS[names] = entries

    return plan, tensors


#: Makes the flat prior of a group from its names, shapes, dtype and device, checked
#: (:func:`check_prior_range`) with the name of the public caller, the first argument.
PriorMaker = Callable[
    [str, list[str], tuple[torch.Size, ...], torch.dtype, torch.device], FlatPrior
]


def _flat(means: list[Tensor], logvars: list[Tensor]) -> tuple[Tensor, ...]:
    r"""Returns the means and log-variances of a group, flat: one tensor, or views of the
    two of a group of one tensor (differentiable)."""

    if len(means) == 1:
        return means[0].reshape(-1), logvars[0].reshape(-1)
    return (flat_cat([*means, *logvars]),)


def check_prior_range(
    where: str,
    what: str,
    lo: float,
    hi: float,
    dtype: torch.dtype,
    variance: bool,
    converted: bool,
) -> None:
    r"""Raises unless the values of a prior, from `lo` to `hi`, give a KL that can be
    computed in the dtype of the KL of a group of `dtype` (:func:`accumulator`): a mean must
    round to a finite number there, a variance to a normal number (a smaller one rounds to
    0, or its :math:`1 / s^2` overflows: NaN, or torch's overflow error inside the fused
    node), and to a finite one where it is `converted` (a tensor; a float is used as a
    Python number)."""

    acc = accumulator(dtype)
    least, top = normal_range(acc)
    if variance and lo >= least and (not converted or hi < top):  # False for NaN
        return
    if not variance and -top < lo and hi < top:
        return
    info, name = torch.finfo(acc), str(acc).removeprefix("torch.")
    if not variance:
        value, bound = (lo if -lo >= hi else hi), f"finite in {name} (within +-{info.max:.6g}"
    elif lo < least:
        value, bound = lo, f"a normal number in {name} (>= {info.tiny:.6g}"
    else:
        value, bound = hi, f"finite in {name} (<= {info.max:.6g}"
    raise ValueError(
        f"{where}: expected {what} to be {bound}: the KL is computed in {name}), got {value:.6g}"
    )


def _bounds(flat: tuple[Tensor, ...]) -> list[float]:
    r"""Returns the least and largest of all the means and log-variances, then of the
    log-variances alone, in one synchronization. For one flat tensor, the second pair is
    the first again: when all values are within the soft clip's reach, so are those."""

    if flat[0].numel() == 0:  # a group of empty tensors: nothing to check
        return [0.0] * 4
    if len(flat) == 1:
        return torch.stack(torch.aminmax(flat[0].detach())).tolist() * 2
    m, lv = (t.detach() for t in flat)
    return torch.stack([*torch.aminmax(m), *torch.aminmax(lv)]).tolist()


def _check(
    where: str,
    bounds: list[float],
    group: _Group,
    names: tuple[str, ...],
    means: list[Tensor],
    logvars: list[Tensor],
) -> bool:
    r"""Raises if a tensor of the group holds NaN or infinite values; returns whether its
    log-variances are within :func:`reach` (beyond, the fused formulas overflow)."""

    c = reach(group.dtype)
    lo, hi, lv_lo, lv_hi = bounds
    if -math.inf < lo <= hi < math.inf and -c <= lv_lo <= lv_hi <= c:  # False for NaN
        return True
    for field, tensors in (("mean", means), ("logvar", logvars)):
        for i, x in zip(group.index, tensors, strict=True):
            finite = torch.isfinite(x)
            if not finite.all():
                nan = int(torch.isnan(x).sum())
                raise ValueError(
                    f"{where}: expected finite values in posterior.{field}[{names[i]!r}], "
                    f"got {nan} NaN and {int((~finite).sum()) - nan} infinite of {x.numel()}"
                )
    return -c <= lv_lo <= lv_hi <= c


def _traced() -> bool:
    # Inside torch.compile or a torch.func transform: no custom node, and no check that
    # reads values (a graph break, or an error under vmap).
    return is_compiling() or in_func_transform()


def _run(
    where: str,
    plan: _Plan,
    tensors: list[Tensor],
    n: int | None,
    generator: torch.Generator | None,
    prior: PriorMaker | None,
) -> tuple[dict[str, Tensor], Tensor | None]:
    r"""Returns the samples of every parameter (if `n`) and the KL divergence from the
    prior (if `prior`), each group of tensors in one pass."""

    names, t = plan.names, len(plan.names)
    traced = _traced()
    work = []
    for group in plan.groups:
        if len(plan.groups) == 1:
            means, logvars = tensors[:t], tensors[t:]
        else:
            means = [tensors[i] for i in group.index]
            logvars = [tensors[t + i] for i in group.index]
        flat = _flat(means, logvars)
        p = None
        if prior is not None:
            p = prior(
                where, [names[i] for i in group.index], group.shapes, group.dtype, group.device
            )
        # Dual tensors of forward mode take the plain path too (the fused one writes `out=`),
        # as does a prior variance with a gradient of its own (the fused node gives it none).
        fused = not traced and _check(where, _bounds(flat), group, names, means, logvars)
        fused = fused and not (p is not None and _learned(p.var))
        fused = fused and not dual((*flat, *(() if p is None else p)))
        work.append((group, flat, fused, p))

    if n is not None:
        for group in plan.groups:
            check_generator(where, generator, group.device)

    # Every check has passed: only now draw the noise, one call per group, in order.
    params: list[Tensor | None] = [None] * t
    kl = None
    for group, flat, fused, p in work:
        eps = None
        if n is not None:
            size = sum(group.sizes)
            eps = torch.randn(
                n, size, **generating(generator), device=group.device, dtype=group.dtype
            )

        # The KL of half precision is summed in float32: the plain path converts.
        fused_p = p if group.dtype in (torch.float32, torch.float64) else None
        if not fused:
            m, lv = halves(flat)
            theta, term = plain_sample_kl(eps, m, lv, p)
            samples = pieces(theta, group.sizes)
        else:
            if torch.is_grad_enabled() and any(x.requires_grad for x in flat):
                *samples, term = function_apply(SampleKL, eps, fused_p, group.sizes, *flat)
            else:
                m, lv = halves(flat)
                theta, term, _ = fused_sample_kl(eps, m, lv, fused_p, grads=False)
                samples = pieces(theta, group.sizes)
            if p is not None and fused_p is None:
                m, lv = halves(flat)
                term = plain_sample_kl(None, m, lv, p)[1]

        for i, piece, shape in zip(group.index, samples, group.shapes, strict=False):
            params[i] = piece if len(shape) == 1 else piece.view(n, *shape)
        if term is not None:
            kl = term if kl is None else kl + term.to(kl.device)

    return (dict(zip(names, params, strict=True)) if n is not None else {}), kl


def check_finite(where: str, posterior: Posterior) -> None:
    r"""Raises if a mean or log-variance of `posterior` holds NaN or infinite values (the
    check :func:`sample` makes before any draw, and skips as it does where values cannot
    be read: inside torch.compile or a torch.func transform)."""

    plan, tensors = _plan(where, posterior)
    if _traced():
        return
    names, t = plan.names, len(plan.names)
    for group in plan.groups:
        means = [tensors[i] for i in group.index]
        logvars = [tensors[t + i] for i in group.index]
        _check(where, _bounds(_flat(means, logvars)), group, names, means, logvars)


def sample(
    where: str, posterior: Posterior, n: int, generator: torch.Generator | None
) -> dict[str, Tensor]:
    plan, tensors = _plan(where, posterior)
    n = check_n(where, n)
    check_generator(where, generator)

    return _run(where, plan, tensors, n, generator, None)[0]


def sample_and_kl(
    where: str,
    posterior: Posterior,
    n: int,
    generator: torch.Generator | None,
    prior: PriorMaker,
) -> tuple[dict[str, Tensor], Tensor]:
    r"""Returns :func:`sample`'s parameters and the KL divergence from a Gaussian prior,
    in one pass: the same samples as apart, and the same KL up to rounding (the KL alone
    takes a form that keeps more digits near the prior, at one more pass)."""

    plan, tensors = _plan(where, posterior)
    n = check_n(where, n)
    check_generator(where, generator)

    params, kl = _run(where, plan, tensors, n, generator, prior)
    return params, torch.zeros(()) if kl is None else kl


def gaussian_kl_divergence(where: str, posterior: Posterior, prior: PriorMaker) -> Tensor:
    r"""Returns the closed-form KL divergence of `posterior` from a Gaussian prior."""

    plan, tensors = _plan(where, posterior)
    return _kl(where, plan, tensors, prior)


def _kl(where: str, plan: _Plan, tensors: list[Tensor], prior: PriorMaker) -> Tensor:
    kl = _run(where, plan, tensors, None, None, prior)[1]
    return torch.zeros(()) if kl is None else kl


def _learned(var: float | Tensor) -> bool:
    return isinstance(var, Tensor) and var.requires_grad


def zero_mean_prior(var: float | Tensor, value: float | None, what: str) -> PriorMaker:
    r"""Returns the flat prior :math:`\mathcal{N}(0, s^2 I)` of every group, with `var`, a
    float or a tensor, whose `value` (:py:`None` if it cannot be read) is checked against
    the dtype of each group's KL, under the name `what`."""

    converted = isinstance(var, Tensor)

    def make(
        where: str,
        names: list[str],
        shapes: tuple[torch.Size, ...],
        dtype: torch.dtype,
        device: torch.device,
    ) -> FlatPrior:
        if value is not None:
            check_prior_range(where, what, value, value, dtype, True, converted)
        return FlatPrior(None, var)

    return make


def kl_divergence(where: str, posterior: object, prior_var: object) -> Tensor:
    plan, tensors = _plan(where, posterior)
    if isinstance(prior_var, Tensor) and vmapped(prior_var):
        # A prior variance that vmap batches: used as a learned one, with no check of its
        # values, which `.item()` cannot read there.
        if prior_var.numel() != 1 or prior_var.is_complex() or prior_var.dtype == torch.bool:
            raise TypeError(
                f"{where}: expected prior_var to be a number, or a real tensor of one element "
                f"per vmapped call, got {prior_var.dtype} of shape {tuple(prior_var.shape)}"
            )
        return _kl(where, plan, tensors, zero_mean_prior(prior_var.reshape(()), None, "prior_var"))

    value = check_number(where, "prior_var", prior_var, 0.0, strict=True)
    var: float | Tensor = value
    # A learned prior variance (a tensor with a gradient, or one a torch.func transform
    # or forward-mode AD differentiates) keeps its gradient: the KL is differentiable
    # with respect to it too.
    if isinstance(prior_var, Tensor) and (
        prior_var.requires_grad or in_func_transform() or dual((prior_var,))
    ):
        var = prior_var.reshape(())

    return _kl(where, plan, tensors, zero_mean_prior(var, value, "prior_var"))
