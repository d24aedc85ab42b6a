r"""The mean-field posterior's machinery, shared by the functional API and the bridge:
glob selection, initialization, sampling, the KL divergence and the mean model. Every
function takes the name of the public caller for its error messages."""

from __future__ import annotations

__all__ = [
    "FlatPrior",
    "PriorMaker",
    "clear_plans",
    "gaussian_kl_divergence",
    "init",
    "kl_divergence",
    "mean_model",
    "sample",
    "sample_and_kl",
    "select",
    "zero_mean_prior",
]

import copy
import math
import re
import threading
import weakref

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ._checks import (
    check_generator,
    check_module,
    check_n,
    check_number,
    check_posterior,
    describe,
)
from ._compat import flat_cat, in_func_transform, is_compiling
from ._numerics import LOGVAR_BOUND, constant, gaussian_kl, reach, std
from ._types import Posterior

InitLogvar = float | Mapping[str, float | Tensor] | Callable[[str, Tensor], float | Tensor]


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


def _patterns(where: str, what: str, globs: object) -> tuple[tuple[str, ...], list[re.Pattern]]:
    if isinstance(globs, str):
        globs = (globs,)
    if not isinstance(globs, Sequence):
        raise TypeError(
            f"{where}: expected {what} to be a sequence of glob patterns, got {globs!r}"
        )
    globs = tuple(globs)
    return globs, [_compile(where, g) for g in globs]


def _picks(inc: list[re.Pattern], exc: list[re.Pattern], name: str) -> bool:
    return any(p.fullmatch(name) for p in inc) and not any(p.fullmatch(name) for p in exc)


def select(
    where: str, module: object, include: Sequence[str], exclude: Sequence[str]
) -> list[str]:
    check_module(where, module)
    _, inc = _patterns(where, "include", include)
    _, exc = _patterns(where, "exclude", exclude)

    return [name for name, _ in module.named_parameters() if _picks(inc, exc, name)]


def _tied(module: nn.Module, inc: list[re.Pattern], exc: list[re.Pattern]) -> dict[str, str]:
    r"""Returns the tied names (second and later names of one Parameter) a selection picks,
    with the name `named_parameters()` gives their Parameter."""

    first: dict[int, str] = {}
    tied = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        canonical = first.setdefault(id(p), name)
        if canonical != name and _picks(inc, exc, name):
            tied[name] = canonical
    return tied


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
    where: str,
    module: object,
    init_logvar: InitLogvar,
    include: Sequence[str],
    exclude: Sequence[str],
) -> Posterior:
    check_module(where, module)
    inc_globs, inc = _patterns(where, "include", include)
    exc_globs, exc = _patterns(where, "exclude", exclude)
    params = dict(module.named_parameters())
    names = [name for name in params if _picks(inc, exc, name)]

    if not names:
        tied = _tied(module, inc, exc)
        if tied:
            pairs = ", ".join(f"{k!r} is tied to {v!r}" for k, v in tied.items())
            raise ValueError(
                f"{where}: expected include={inc_globs!r} and exclude={exc_globs!r} to pick "
                f"a parameter of {type(module).__name__} by its named_parameters() name, got "
                f"only tied names ({pairs}: the same Parameter); pick those names instead"
            )
        raise ValueError(
            f"{where}: expected include={inc_globs!r} and exclude={exc_globs!r} to pick at "
            f"least one parameter of {type(module).__name__}, got none"
        )

    for name in names:
        p = params[name]
        if not p.is_floating_point():
            raise TypeError(
                f"{where}: expected real floating-point parameters, got {name!r} of dtype "
                f"{p.dtype}; a mean-field Gaussian over complex or integer values is not "
                "defined here: exclude it"
            )

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


# Sampling and the closed-form KL divergence, fused. The tensors of one device and dtype
# (a group) get one flat copy of their means and log-variances, one draw of noise, and
# one node of the autograd graph that computes sigma, every sample and the KL in a few
# passes over the P numbers, and all their gradients in a few more. The plain path
# (`_plain`: the same formulas, one differentiable torch operation at a time) runs where
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
    r"""What sampling needs of a posterior's structure, checked once for its tensors."""

    names: tuple[str, ...]
    refs: tuple[weakref.ref, ...]
    layout: list[tuple[torch.Size, torch.dtype, torch.device]]
    groups: tuple[_Group, ...]


# Keyed by the first mean tensor, held weakly; an entry serves a posterior only while all
# its tensors are those it was made for, with the same names, shapes, dtypes and devices.
_PLANS = WeakIdKeyDictionary()
_PLANS_LOCK = threading.Lock()
_MAX_PLANS = 16


def clear_plans() -> None:
    r"""Forgets the structure of every posterior seen so far."""

    _PLANS.clear()


def _fits(plan: _Plan, names: tuple[str, ...], tensors: list[Tensor]) -> bool:
    if names != plan.names:
        return False
    for ref, t, layout in zip(plan.refs, tensors, plan.layout, strict=True):
        if ref() is not t or (t.shape, t.dtype, t.device) != layout:
            return False
    return True


def _plan(where: str, posterior: object) -> tuple[_Plan, list[Tensor]]:
    r"""Returns the plan of `posterior` and its tensors (the means, then the log-variances
    in the same order), checking the posterior when its tensors are new."""

    if isinstance(posterior, Posterior):
        mean, logvar = posterior
        if type(mean) is dict and type(logvar) is dict and mean and len(mean) == len(logvar):
            try:
                tensors = [*mean.values(), *map(logvar.__getitem__, mean)]
            except KeyError:
                tensors = None
            if tensors is not None and isinstance(tensors[0], Tensor):
                plan = _PLANS.get(tensors[0])
                if plan is not None and _fits(plan, tuple(mean), tensors):
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
        refs=tuple(weakref.ref(t) for t in tensors),
        layout=[(t.shape, t.dtype, t.device) for t in tensors],
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
    if tensors:
        with _PLANS_LOCK:
            while len(_PLANS) >= _MAX_PLANS:
                del _PLANS[next(iter(_PLANS.keys()))]
            _PLANS[tensors[0]] = plan

    return plan, tensors


class FlatPrior(NamedTuple):
    r"""A Gaussian prior over the flat parameters of a group: its mean (:py:`None` for
    zero, a float or a flat tensor) and its variance (a float or a flat tensor)."""

    mean: float | Tensor | None
    var: float | Tensor


#: Makes the flat prior of a group from its names, shapes, dtype and device.
PriorMaker = Callable[[list[str], tuple[torch.Size, ...], torch.dtype, torch.device], FlatPrior]


def _fused(
    eps: Tensor | None, m: Tensor, lv: Tensor, prior: FlatPrior | None, grads: bool
) -> tuple[Tensor | None, Tensor | None, tuple[Tensor | None, Tensor, Tensor | None]]:
    r"""Returns the flat samples `(n, P)` of a group, its KL divergence from `prior`, and
    what its gradients need, from its flat means `m` and log-variances `lv`."""

    # With r = (4 (1 + (lv / b)^2))^(-1/2), h = lv r is softclip(lv) / 2 and sigma = e^h,
    # bit for bit as std(lv) computes it (the factors 2 and 4 are exact), and
    # dh / dlv = 4 r^3 (the backward pass applies the 4). Few fresh buffers: a pass over
    # P numbers costs several times more when it writes to memory not just used.
    r = torch.addcmul(constant(4.0, lv), lv, lv, value=4 / LOGVAR_BOUND**2).rsqrt_()
    h = lv * r
    sigma = h.exp()
    r3 = r.pow_(3) if grads else None
    del r

    kl, d = None, None
    if prior is not None:
        d = m if prior.mean is None else m - prior.mean
        # Element by element, then one sum: no cancellation between large sums.
        if isinstance(prior.var, Tensor):
            u = torch.addcmul(d * d, sigma, sigma).div_(prior.var)
            u.sub_(h, alpha=2.0).add_(prior.var.log()).sub_(1.0)
            kl = u.sum().mul_(0.5)
        else:
            # 0.5 ((sigma^2 + d^2) / s^2 + log s^2 - 2 h - 1), scaled in every operation
            # (a Python number in a float32 operation costs a conversion each time).
            c = 0.5 / prior.var
            k = torch.full((), 0.5 * (math.log(prior.var) - 1.0), dtype=m.dtype, device=m.device)
            u = torch.add(k, h, alpha=-1.0, out=h)
            kl = u.addcmul_(sigma, sigma, value=c).addcmul_(d, d, value=c).sum()

    theta = None
    if eps is not None:
        # Into a buffer done with: the noise's (no gradient) or h's (one sample).
        out = eps if not grads else h.view(1, -1) if eps.shape[0] == 1 else None
        theta = torch.addcmul(m, sigma, eps, out=out)

    return theta, kl, (d, sigma, r3)


def _fused_grads(
    g_theta: Tensor | None,
    g_kl: Tensor | None,
    eps: Tensor | None,
    prior: FlatPrior | None,
    d: Tensor | None,
    sigma: Tensor,
    r3: Tensor,
    out: Tensor,
) -> None:
    r"""Writes the gradients of the flat means and log-variances of a group into `out`,
    `(2, 1, P)`,

    .. math:: g_\mu = \sum_k g_k + c \, (\mu - m), \quad
        g_{\log \sigma^2} = 4 r^3 \left( \sigma \left(
        \sum_k g_k \epsilon_k + c \, \sigma \right) - g_\mathrm{KL} \right),

    with :math:`c = g_\mathrm{KL} / s^2` and :math:`4 r^3 = dh / d \log \sigma^2`, from
    those of the samples :math:`g_k`, `(n, P)` (which may be in `out[0]` already), and of
    the KL :math:`g_\mathrm{KL}` (either may be :py:`None`)."""

    g_mean, g_logvar = out
    zero = constant(0.0, sigma)
    c = None
    if g_kl is not None:
        c = (
            g_kl / prior.var
            if isinstance(prior.var, Tensor)
            else g_kl * constant(1 / prior.var, g_kl)
        )

    if g_theta is None:
        g_mean, g_logvar = out.view(2, -1)
        torch.mul(d, c, out=g_mean)
        torch.addcmul(zero, sigma, c, value=4.0, out=g_logvar)
    else:
        if g_theta.shape[0] > 1:
            torch.sum(g_theta * eps, 0, keepdim=True, out=g_logvar).mul_(4.0)
            torch.sum(g_theta, 0, keepdim=True, out=g_mean)
        else:
            torch.addcmul(zero, g_theta, eps, value=4.0, out=g_logvar)
            if g_theta.data_ptr() != g_mean.data_ptr():
                if c is not None:
                    torch.addcmul(g_theta, d, c, out=g_mean)
                else:
                    g_mean.copy_(g_theta)
        if c is not None:
            if g_theta.shape[0] > 1 or g_theta.data_ptr() == g_mean.data_ptr():
                g_mean.addcmul_(d, c)
            g_logvar.addcmul_(sigma, c, value=4.0)
    if g_kl is None:
        g_logvar.mul_(sigma)
    else:
        torch.addcmul(g_kl * constant(-4.0, g_kl), g_logvar, sigma, out=g_logvar)
    g_logvar.mul_(r3)


class _SampleKL(torch.autograd.Function):
    r"""The samples and the KL divergence of a group, as one node of the graph."""

    @staticmethod
    def forward(
        ctx: Any,
        eps: Tensor | None,
        prior: FlatPrior | None,
        sizes: tuple[int, ...],
        *flat: Tensor,
    ) -> tuple[Tensor | None, ...]:
        # `flat`: the means and log-variances in one tensor, or in two.
        m, lv = flat if len(flat) == 2 else flat[0].chunk(2)
        theta, kl, (d, sigma, r3) = _fused(eps, m, lv, prior, grads=True)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(eps, d if d is not m else None, sigma, r3, *flat)
        ctx.prior, ctx.sizes = prior, sizes
        return (*_pieces(theta, sizes), kl)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        eps, d, sigma, r3, *flat = ctx.saved_tensors
        prior, sizes = ctx.prior, ctx.sizes
        g_pieces, g_kl = grads[:-1], grads[-1]
        # A graph of the gradients (create_graph=True): the plain formulas, which autograd
        # can differentiate again; else the gradients written into one buffer.
        graph = torch.is_grad_enabled()
        out = None if graph else sigma.new_empty(2, 1, sigma.numel())
        g_theta = None
        if eps is not None and any(g is not None for g in g_pieces):
            n = eps.shape[0]
            if len(sizes) == 1:
                g_theta = g_pieces[0]
            else:
                g_theta = torch.cat(
                    [
                        eps.new_zeros(n, size) if g is None else g
                        for g, size in zip(g_pieces, sizes, strict=True)
                    ],
                    dim=1,
                    out=out[0] if n == 1 and out is not None else None,
                )
        if g_theta is None and g_kl is None:
            return (None,) * (3 + len(flat))

        if graph:
            m, lv = flat if len(flat) == 2 else flat[0].chunk(2)
            theta, kl = _plain(eps, m, lv, prior)
            pairs = [(o, g) for o, g in ((theta, g_theta), (kl, g_kl)) if g is not None]
            outs, gs = zip(*pairs, strict=True)
            found = torch.autograd.grad(outs, flat, gs, create_graph=True, allow_unused=True)
            return (None, None, None, *found)

        if d is None:
            d = flat[0] if len(flat) == 2 else flat[0].narrow(0, 0, sigma.numel())
        _fused_grads(g_theta, g_kl, eps, prior, d, sigma, r3, out)
        return (None, None, None, *(out.view(2, -1) if len(flat) == 2 else (out.view(-1),)))


def _pieces(theta: Tensor | None, sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
    r"""Returns the samples of each tensor of a group, `(n, size)`, from the flat ones:
    separate tensors, not views of one (modules may write to their weights in place), but
    disjoint pieces of one buffer with version counters of their own."""

    return () if theta is None else torch.unsafe_split_with_sizes(theta, sizes, 1)


def _plain(
    eps: Tensor | None, m: Tensor, lv: Tensor, prior: FlatPrior | None
) -> tuple[Tensor | None, Tensor | None]:
    r"""Returns the samples and the KL of :func:`_fused`, one torch operation at a time."""

    theta = None if eps is None else torch.addcmul(m, std(lv), eps)
    kl = None
    if prior is not None:
        kl = gaussian_kl(m, lv, 0.0 if prior.mean is None else prior.mean, prior.var)
    return theta, kl


def _flat(means: list[Tensor], logvars: list[Tensor]) -> tuple[Tensor, ...]:
    r"""Returns the means and log-variances of a group, flat: one tensor, or views of the
    two of a group of one tensor (differentiable)."""

    if len(means) == 1:
        return means[0].reshape(-1), logvars[0].reshape(-1)
    return (flat_cat([*means, *logvars]),)


def _bounds(flat: tuple[Tensor, ...]) -> list[float]:
    r"""Returns the least and largest of all the means and log-variances, then of the
    log-variances alone, in one synchronization. For one flat tensor, the second pair is
    the first again: when all values are within the soft clip's reach, so are those."""

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
        fused = not traced and _check(where, _bounds(flat), group, names, means, logvars)
        p = None
        if prior is not None:
            p = prior([names[i] for i in group.index], group.shapes, group.dtype, group.device)
        work.append((group, flat, fused, p))

    # Every check has passed: only now draw the noise, one call per group, in order.
    params: list[Tensor | None] = [None] * t
    kl = None
    for group, flat, fused, p in work:
        eps = None
        if n is not None:
            size = sum(group.sizes)
            eps = torch.randn(n, size, generator=generator, device=group.device, dtype=group.dtype)

        # The KL of half precision is summed in float32: the plain path converts.
        fused_p = p if group.dtype in (torch.float32, torch.float64) else None
        if not fused:
            m, lv = flat if len(flat) == 2 else flat[0].chunk(2)
            theta, term = _plain(eps, m, lv, p)
            pieces = _pieces(theta, group.sizes)
        else:
            if torch.is_grad_enabled() and any(x.requires_grad for x in flat):
                *pieces, term = _SampleKL.apply(eps, fused_p, group.sizes, *flat)
            else:
                m, lv = flat if len(flat) == 2 else flat[0].chunk(2)
                theta, term, _ = _fused(eps, m, lv, fused_p, grads=False)
                pieces = _pieces(theta, group.sizes)
            if p is not None and fused_p is None:
                m, lv = flat if len(flat) == 2 else flat[0].chunk(2)
                term = _plain(None, m, lv, p)[1]

        for i, piece, shape in zip(group.index, pieces, group.shapes, strict=False):
            params[i] = piece if len(shape) == 1 else piece.view(n, *shape)
        if term is not None:
            kl = term if kl is None else kl + term.to(kl.device)

    return (dict(zip(names, params, strict=True)) if n is not None else {}), kl


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
    with the same numbers as apart, in one pass."""

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


def zero_mean_prior(var: float) -> PriorMaker:
    r"""Returns the flat prior :math:`\mathcal{N}(0, s^2 I)` of every group."""

    return lambda names, shapes, dtype, device: FlatPrior(None, var)


def check_matches(where: str, module: nn.Module, posterior: Posterior) -> None:
    r"""Checks that a posterior's names, shapes, dtypes and devices are the module's."""

    named = dict(module.named_parameters())
    for name, m in posterior.mean.items():
        p = named.get(name)
        if p is None or p.shape != m.shape:
            raise ValueError(
                f"{where}: expected posterior names and shapes from "
                f"{type(module).__name__}.named_parameters(), got {name!r} of shape "
                f"{tuple(m.shape)}"
            )
        for field, t in (("mean", m), ("logvar", posterior.logvar[name])):
            if t.dtype != p.dtype or t.device != p.device:
                raise ValueError(
                    f"{where}: expected the posterior's {field}[{name!r}] with the module's "
                    f"dtype and device ({describe(p)}), got {describe(t)}"
                )


def mean_model(where: str, module: object, posterior: object) -> nn.Module:
    check_module(where, module)
    check_posterior(where, posterior)
    check_matches(where, module, posterior)

    new = copy.deepcopy(module)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if name in posterior.mean:
                p.copy_(posterior.mean[name])

    return new


def kl_divergence(where: str, posterior: object, prior_var: object) -> Tensor:
    plan, tensors = _plan(where, posterior)
    prior_var = check_number(where, "prior_var", prior_var, 0.0, strict=True)

    return _kl(where, plan, tensors, zero_mean_prior(prior_var))
