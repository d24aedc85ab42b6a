r"""The numerics of the mean-field Gaussian, written once: variances, KL, log-mean-exp."""

from __future__ import annotations

__all__ = [
    "LOGVAR_BOUND",
    "LOGVAR_LIMIT",
    "FlatPrior",
    "SampleKL",
    "Spread",
    "accumulator",
    "constant",
    "fused_sample_kl",
    "gaussian_kl",
    "halves",
    "inverse_softclip",
    "log_mean_exp",
    "logvar_from_var",
    "normal_range",
    "pieces",
    "plain_sample_kl",
    "reach",
    "softclip",
    "spread",
    "std",
    "var",
]

import math

from typing import Any, NamedTuple

import torch

from torch import Tensor

from ._caches import register
from ._compat import batched_gradients, in_func_transform, is_compiling

LOGVAR_BOUND = 18.0

#: The largest :math:`|\log \sigma^2|` a posterior is written with: softclip's range is the
#: open interval :math:`(-18, 18)`, and its inverse grows without bound near the ends, so the
#: variances that can be written are :math:`[e^{-17.984}, e^{17.984}]`, about
#: :math:`[1.55 \cdot 10^{-8}, 6.5 \cdot 10^{7}]`.
LOGVAR_LIMIT = LOGVAR_BOUND - 2**-6


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
register(_CONSTANTS.clear)


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


class Spread(torch.autograd.Function):
    r"""The variance (`power=2`, :func:`var`) or the standard deviation (`power=1`,
    :func:`std`) of log-variances, bit for bit, as one node of the graph: the same
    formulas without an autograd record per operation (six or seven, each saving its
    inputs), and a derivative in five passes,

    .. math:: \frac{d \sigma^p}{d \log \sigma^2} = \frac{p}{2} \, \sigma^p
        \left(1 + (\log \sigma^2 / b)^2\right)^{-3/2},

    zero beyond :func:`reach` (where the clamp of the formulas holds the value). Backward
    and forward mode; out of place where the gradient comes in, so that autograd may batch
    it (`is_grads_batched`, vectorized Jacobians)."""

    @staticmethod
    def forward(ctx: Any, logvar: Tensor, power: int) -> Tensor:
        out = var(logvar) if power == 2 else std(logvar)
        ctx.save_for_backward(logvar, out)
        ctx.save_for_forward(logvar, out)
        ctx.power = power
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        logvar, out = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph of the gradients: autograd's own
            y = var(logvar) if ctx.power == 2 else std(logvar)
            (g,) = torch.autograd.grad(y, logvar, grad, create_graph=True)
            return g, None
        return _spread_derivative(logvar, out, ctx.power) * grad, None

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, _: None) -> Tensor:
        # Operations that forward mode can differentiate again (the saved tensors may
        # carry tangents of an outer level).
        logvar, out = ctx.saved_tensors
        c = reach(logvar.dtype)
        s = logvar.clamp(-c, c)
        d = (1 + (s / LOGVAR_BOUND).square()).rsqrt().pow(3) * out * (ctx.power / 2)
        if _beyond_reach_survives(logvar.dtype):
            d = d.masked_fill(logvar.abs() > c, 0.0)
        return d * tangent


def _spread_derivative(logvar: Tensor, out: Tensor, power: int) -> Tensor:
    r"""Returns :math:`d \sigma^p / d \log \sigma^2` (:class:`Spread`), a fresh tensor."""

    c = reach(logvar.dtype)
    s = torch.clamp(logvar, -c, c)
    s = torch.addcmul(constant(1.0, s), s, s, value=1 / LOGVAR_BOUND**2, out=s)
    s.rsqrt_().pow_(3).mul_(out)
    if power == 1:
        s.mul_(0.5)
    # Beyond reach the factor (about (b / c)^3) underflows to zero, the clamp's zero
    # derivative, in every dtype but float16, where it is zeroed.
    if _beyond_reach_survives(logvar.dtype):
        s.masked_fill_(logvar.abs() > c, 0.0)
    return s


def _beyond_reach_survives(dtype: torch.dtype) -> bool:
    info = torch.finfo(dtype)
    return (LOGVAR_BOUND / reach(dtype)) ** 3 >= info.tiny * info.eps


def spread(logvar: Tensor, power: int) -> Tensor:
    r"""Returns :func:`var` (`power=2`) or :func:`std` (`power=1`) of `logvar`, as one
    :class:`Spread` node where autograd records it (not inside torch.compile or a
    torch.func transform, which get the plain formulas)."""

    plain = var if power == 2 else std
    if not logvar.requires_grad or not torch.is_grad_enabled():
        return plain(logvar)
    if is_compiling() or in_func_transform():
        return plain(logvar)
    return Spread.apply(logvar, power)


def accumulator(t: Tensor | torch.dtype) -> torch.dtype:
    r"""Returns the dtype to sum the terms of `t` (a tensor or a dtype) in: float32 for half
    precision, whose sums of many small terms overflow or lose everything."""

    dtype = t if isinstance(t, torch.dtype) else t.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def normal_range(dtype: torch.dtype) -> tuple[float, float]:
    r"""Returns the bounds `(lo, hi)` of the floats :math:`x \geq 0` that `dtype`, float32 or
    float64 (the dtypes of a KL), rounds to a normal number, at least `finfo(dtype).tiny`
    (:math:`x \geq lo`), and to a finite one (:math:`x < hi`; infinite for float64)."""

    r = _RANGE.get(dtype)
    if r is None:
        info = torch.finfo(dtype)
        # Half a step below tiny, or above max, a value ties between two neighbours and
        # rounds to the even one: tiny (significand 1.0), or 2^emax, infinity.
        lo = info.tiny * (1 - info.eps / 2)
        hi = info.max + math.ldexp(info.eps, math.frexp(info.max)[1] - 2)  # half a step
        r = _RANGE[dtype] = (lo, hi)
    return r


_RANGE: dict[torch.dtype, tuple[float, float]] = {}


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

    acc = accumulator(mean)
    mean, logvar = mean.to(acc), softclip(logvar.to(acc))
    if isinstance(prior_var, Tensor):
        prior_var = prior_var.to(acc)
        log_prior_var = prior_var.log()
    else:
        log_prior_var = math.log(prior_var)
    if isinstance(prior_mean, Tensor):
        prior_mean = prior_mean.to(acc)

    diff = mean if isinstance(prior_mean, float) and prior_mean == 0.0 else mean - prior_mean
    # sigma^2 / s^2 - 1 - log(sigma^2 / s^2) as expm1(x) - x: no terms of about 1 that
    # cancel near the prior (see `fused_sample_kl`).
    x = logvar - log_prior_var
    kl = 0.5 * (torch.expm1(x) - x + diff.square() / prior_var)

    return kl.expand_as(mean).sum()


class FlatPrior(NamedTuple):
    r"""A Gaussian prior over the flat parameters of a group: its mean (:py:`None` for
    zero, a float or a flat tensor) and its variance (a float or a flat tensor)."""

    mean: float | Tensor | None
    var: float | Tensor


def fused_sample_kl(
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
        if eps is None:
            # The KL alone, a value to read (near 0 for a posterior near its prior): its
            # variance part as expm1(x) - x, x = log(sigma^2 / s^2). The forms below, for a
            # training step, add terms of about 1/2 that cancel, each off by a unit of
            # rounding: float32 KLs of 1e6 numbers near their prior came out negative.
            tensor_var = isinstance(prior.var, Tensor)
            x = torch.mul(h, 2.0).sub_(prior.var.log() if tensor_var else math.log(prior.var))
            u = torch.expm1(x).sub_(x)
            if tensor_var:
                u.addcmul_(d, d / prior.var)
            else:
                u.addcmul_(d, d, value=1 / prior.var)
            kl = u.sum().mul_(0.5)
        elif isinstance(prior.var, Tensor):
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


class SampleKL(torch.autograd.Function):
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
        m, lv = halves(flat)
        theta, kl, (d, sigma, r3) = fused_sample_kl(eps, m, lv, prior, grads=True)
        ctx.set_materialize_grads(False)
        # A prior's tensors too (views of the caller's, as its variance of one tensor is):
        # written in place before the backward pass, they raise autograd's error rather
        # than give the gradients of other values.
        mean, var = (None, None) if prior is None else prior
        saved = [t if isinstance(t, Tensor) else None for t in (mean, var)]
        ctx.save_for_backward(eps, d if d is not m else None, sigma, r3, *saved, *flat)
        ctx.prior, ctx.sizes = prior, sizes
        return (*pieces(theta, sizes), kl)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        eps, d, sigma, r3, mean, var, *flat = ctx.saved_tensors
        prior, sizes = ctx.prior, ctx.sizes
        if prior is not None:
            prior = FlatPrior(
                prior.mean if mean is None else mean, prior.var if var is None else var
            )
        g_pieces, g_kl = grads[:-1], grads[-1]
        # A graph of the gradients (create_graph=True), or gradients that autograd batches:
        # the plain formulas, which autograd can differentiate again and batch; else the
        # gradients written into one buffer.
        graph = torch.is_grad_enabled() or batched_gradients(grads)
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
            create = torch.is_grad_enabled()
            with torch.enable_grad():  # a batched backward runs without
                m, lv = halves(flat)
                theta, kl = plain_sample_kl(eps, m, lv, prior)
                pairs = [(o, g) for o, g in ((theta, g_theta), (kl, g_kl)) if g is not None]
                outs, gs = zip(*pairs, strict=True)
                found = torch.autograd.grad(outs, flat, gs, create_graph=create, allow_unused=True)
            return (None, None, None, *found)

        if d is None:
            d = flat[0] if len(flat) == 2 else flat[0].narrow(0, 0, sigma.numel())
        if sigma.dtype in (torch.float16, torch.bfloat16):
            # In float32, rounded once: 4 g eps overflowed float16 for gradients of the
            # samples above about 8e3, where the log-variances' gradient is far smaller.
            wide = torch.empty(out.shape, dtype=torch.float32, device=out.device)
            up = [None if t is None else t.float() for t in (g_theta, g_kl, eps, d)]
            _fused_grads(*up[:3], prior, up[3], sigma.float(), r3.float(), wide)
            out.copy_(wide)
        else:
            _fused_grads(g_theta, g_kl, eps, prior, d, sigma, r3, out)
        return (None, None, None, *(out.view(2, -1) if len(flat) == 2 else (out.view(-1),)))


def halves(flat: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    r"""Returns the means and log-variances of a group from `flat`: one tensor (the means,
    then the log-variances) or the two."""

    return flat if len(flat) == 2 else flat[0].chunk(2)


def pieces(theta: Tensor | None, sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
    r"""Returns the samples of each tensor of a group, `(n, size)`, from the flat ones:
    separate tensors, not views of one (modules may write to their weights in place), but
    disjoint pieces of one buffer with version counters of their own."""

    if theta is None:
        return ()
    if in_func_transform():  # no batching rule for the unsafe split: copies of views
        return tuple(t.clone() for t in theta.split(sizes, 1))
    return torch.unsafe_split_with_sizes(theta, sizes, 1)


def plain_sample_kl(
    eps: Tensor | None, m: Tensor, lv: Tensor, prior: FlatPrior | None
) -> tuple[Tensor | None, Tensor | None]:
    r"""Returns the samples and the KL of :func:`_fused`, one torch operation at a time."""

    theta = None if eps is None else torch.addcmul(m, std(lv), eps)
    kl = None
    if prior is not None:
        kl = gaussian_kl(m, lv, 0.0 if prior.mean is None else prior.mean, prior.var)
    return theta, kl


def log_mean_exp(x: Tensor, dim: int = 0) -> Tensor:
    r"""Returns :math:`\log \frac{1}{K} \sum_k e^{x_k}` over `dim`, in log-space: -inf
    where every :math:`x_k` is, with a gradient of zero there (logsumexp's is NaN).

    It is :math:`m + \log \frac{1}{K} \sum_k e^{x_k - m}` with :math:`m = \max_k x_k`,
    in at least float32, rounded once: never above :math:`m` (log-probabilities stay
    :math:`\leq 0`), and within a few units of rounding of :math:`\max(1, |m|)` of the
    exact value (an absolute error: a result near 0 may be off by many units of its own).
    """

    # Not logsumexp - log K: the two logs round apart (a float32 logsumexp of 7 equal
    # values is 1 ulp above the correctly rounded log 7), which put probabilities at
    # 1 + 1e-7. Each term here is at most 1, so their mean is, and its log at most 0.
    dead = x.amax(dim=dim, keepdim=True).isneginf()
    y = x.masked_fill(dead, 0.0).to(accumulator(x))
    m = y.amax(dim=dim, keepdim=True).detach()
    m = m.masked_fill(m.isinf(), 0.0)
    out = (y - m).exp().mean(dim=dim, keepdim=True).log().add(m).squeeze(dim)
    return out.to(x.dtype).masked_fill(dead.squeeze(dim), -math.inf)


def inverse_softclip(y: Tensor, bound: float = LOGVAR_BOUND, out: Tensor | None = None) -> Tensor:
    r"""Returns :math:`x = y / \sqrt{1 - (y / b)^2}`, the :math:`x` with
    :math:`\mathrm{softclip}(x, b) = y`, for :math:`|y| < b`, written into `out` if given
    (a tensor other than `y`).

    In three passes, in place: not differentiable. In half precision, a :math:`|y|` just
    below the bound rounds onto it (bfloat16's step there is 0.125), where :math:`x` is
    infinite: there :math:`y` is taken to float32, clamped to within :math:`2^{-6}` of the
    bound (:data:`LOGVAR_LIMIT` for the default) and :math:`x` rounded back once.
    """

    if y.dtype in (torch.float16, torch.bfloat16):
        limit = bound - 2**-6
        x = inverse_softclip(y.float().clamp(-limit, limit), bound)
        return x.to(y.dtype) if out is None else out.copy_(x)
    x = torch.addcmul(constant(1.0, y), y, y, value=-1 / bound**2, out=out)
    return x.rsqrt_().mul_(y)


def logvar_from_var(variance: Tensor) -> Tensor:
    r"""Returns the unconstrained log-variance whose variance (:func:`var`) is `variance`,
    with :math:`\log \sigma^2` clamped to :math:`[-L, L]`, :math:`L` = :data:`LOGVAR_LIMIT`.

    `variance` must be positive (not checked here: see :func:`posterior_from_variance`).
    """

    if variance.dtype in (torch.float16, torch.bfloat16):  # the log to float32's precision
        variance = variance.float()
    return inverse_softclip(variance.log().clamp(-LOGVAR_LIMIT, LOGVAR_LIMIT))
