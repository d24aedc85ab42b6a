r"""The flat state of IVON and the arithmetic of its step, in passes over all P numbers."""

from __future__ import annotations

__all__ = [
    "HYPER",
    "Draw",
    "Flat",
    "Hyper",
    "averages",
    "fold",
    "set_variance",
    "update",
    "update_one",
]

import math

from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from torch import Tensor

from ._numerics import LOGVAR_LIMIT, constant, inverse_softclip

HYPER = (
    "lr",
    "ess",
    "hess_init",
    "beta1",
    "beta2",
    "weight_decay",
    "clip_radius",
    "rescale_lr",
    "debias",
)


class Hyper(NamedTuple):
    r"""The hyperparameters of a step, checked."""

    lr: float
    ess: float
    hess_init: float
    beta1: float
    beta2: float
    weight_decay: float
    clip_radius: float
    rescale_lr: bool
    debias: bool


class Draw(NamedTuple):
    r"""The samples handed out by a draw."""

    n: int
    eps: Tensor  # (n, P): the standard normals of the draw
    leaves: list[Tensor]  # the sampled parameters handed out, (n, *shape) each


class Flat:
    r"""The state of IVON over the `P` numbers of the picked parameters: flat buffers, so
    that every operation of a step is one pass over all of them. Their views by name are
    the posterior, and the means become the parameters' own storage.

    Arguments:
        names: The names of the parameters.
        params: The parameters, of one dtype and device.
        hess_init: The initial Hessian estimate.
    """

    def __init__(self, names: list[str], params: list[Tensor], hess_init: float) -> None:
        self.names = names
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        self.dtype, self.device = dtype, device = params[0].dtype, params[0].device
        size = sum(self.sizes)

        with torch.no_grad():
            self.mean = torch.cat([p.detach().reshape(-1) for p in params])
        self.hess = torch.full((size,), hess_init, dtype=dtype, device=device)
        self.momentum = torch.zeros(size, dtype=dtype, device=device)
        self.H = torch.empty(size, dtype=dtype, device=device)  # hess + weight_decay
        self.std = torch.empty(size, dtype=dtype, device=device)
        self.logvar = torch.empty(size, dtype=dtype, device=device)
        self.work = torch.empty(2, size, dtype=dtype, device=device)
        self.stats = torch.empty(2, size, dtype=dtype, device=device)  # those of a draw
        self.stats_views = (self.views(self.stats[0], 1), self.views(self.stats[1], 1))
        self.momentum_views = self.views(self.momentum, 1)
        self.sums: Tensor | None = None  # (2, P): those of several draws, summed
        self.count = 0  # the number of draws in `sums`
        self.eps: Tensor | None = None  # (n, P): the noise of the last draw
        self.eps_views: list[Tensor] = []  # by parameter, (n, *shape)
        self.draw: Draw | None = None
        self.t = 0  # the number of steps
        self.variance_of: tuple[float, float] | None = None  # (ess, weight_decay)

    def views(self, flat: Tensor, n: int | None = None) -> Any:
        r"""Returns the views by name of a flat `(P,)` tensor, or with `n` the list of
        views `(n, *shape)` of an `(n, P)` one."""

        if n is None:
            pieces = torch.split_with_sizes(flat, self.sizes)
            return {
                name: t.view(shape)
                for name, shape, t in zip(self.names, self.shapes, pieces, strict=True)
            }
        pieces = torch.split_with_sizes(flat.view(n, -1), self.sizes, 1)
        return [t.view(n, *shape) for shape, t in zip(self.shapes, pieces, strict=True)]

    def noise(self, n: int) -> Tensor:
        r"""Returns the buffer `(n, P)` of the noise of a draw of `n` samples."""

        if self.eps is None or self.eps.shape[0] != n:
            self.eps = torch.empty(n, self.mean.numel(), dtype=self.dtype, device=self.device)
            self.eps_views = self.views(self.eps, n)
        return self.eps


def set_variance(s: Flat, ess: float, weight_decay: float) -> None:
    r"""Sets :math:`H = h + \delta`, :math:`\sigma = 1 / \sqrt{\lambda H}` clamped to the
    posterior's range, and the posterior's log-variances :math:`\log \sigma^2`, unclipped."""

    torch.add(s.hess, weight_decay, out=s.H)
    bound = math.exp(LOGVAR_LIMIT / 2)
    torch.mul(s.H, ess, out=s.std).rsqrt_().clamp_(1 / bound, bound)
    y = torch.log(s.std, out=s.work[0])
    inverse_softclip(torch.add(y, y, out=y), out=s.logvar)  # of log sigma^2 = 2 log sigma
    s.variance_of = (ess, weight_decay)


def _statistics(s: Flat, draw: Draw, grads: list[Tensor | None]) -> None:
    r"""Writes the sums over the samples of a draw of :math:`g_k` and
    :math:`\epsilon_k \odot g_k` into `s.stats`, from the gradients of its samples."""

    n, eps = draw.n, draw.eps
    grads = [
        torch.zeros_like(t) if g is None else g for t, g in zip(draw.leaves, grads, strict=True)
    ]
    g_sum, nx_sum = s.stats[0], s.stats[1]
    if n == 1:
        torch.cat([g.view(-1) for g in grads], out=g_sum)
        torch.mul(eps[0], g_sum, out=nx_sum)
        return
    noise = s.eps_views
    torch._foreach_mul_(noise, grads)
    for g, nx, g_out, nx_out in zip(grads, noise, *s.stats_views, strict=True):
        torch.sum(g, 0, keepdim=True, out=g_out)
        torch.sum(nx, 0, keepdim=True, out=nx_out)


def fold(s: Flat) -> None:
    r"""Adds the statistics of the last draw, if any gradient reached it, to the sums."""

    draw, s.draw = s.draw, None
    grads = [] if draw is None else [t.grad for t in draw.leaves]
    if all(g is None for g in grads):
        return
    _statistics(s, draw, grads)
    if s.sums is None:
        s.sums = torch.empty_like(s.stats)
    if s.count == 0:
        s.sums.copy_(s.stats)
    else:
        s.sums.add_(s.stats)
    s.count += 1


def averages(s: Flat, group: Any) -> Tensor:
    r"""Returns the averages of :math:`g_k` and :math:`\epsilon_k \odot g_k`, `(2, P)`,
    over the samples of the draws since the last step, each draw weighted equally, and
    over the processes of `group` (none if :py:`None`); and forgets the draws."""

    if s.count == 0:
        draw, s.draw = s.draw, None
        _statistics(s, draw, [t.grad for t in draw.leaves])
        stats = s.stats
    else:
        fold(s)
        stats = s.sums
        if s.count > 1:
            stats.div_(s.count)
    s.count = 0

    if group is not None:
        dist.all_reduce(stats, group=group)
        stats.div_(dist.get_world_size(group))
    return stats


def update_one(s: Flat, draw: Draw, grads: list[Tensor], h: Hyper) -> None:
    r"""Updates the state from the gradients by name of a draw of one sample (none
    missing), without a flat copy of them."""

    torch._foreach_mul_(s.eps_views, grads)  # epsilon * g, into the draw's noise
    update(s, grads, draw.eps[0], h)


def update(s: Flat, g: Tensor | list[Tensor], nx: Tensor, h: Hyper) -> None:
    r"""Updates the momentum, the Hessian estimates, the variances and the means, given the
    averages of :math:`g_k` (flat, or by parameter) and of :math:`\epsilon_k \odot g_k`
    (flat, overwritten)."""

    if isinstance(g, Tensor):
        s.momentum.lerp_(g, 1 - h.beta1)
    else:
        torch._foreach_lerp_(s.momentum_views, g, 1 - h.beta1)

    m, hess, H = s.mean, s.hess, s.H
    d, t = s.work[0], s.work[1]
    s.t += 1

    # With f = nx / sigma (the reparameterization estimate g * (theta - m) / sigma^2,
    # for the sigma sampled) and d = h - f, the new h = b2 h + r f + r^2 d^2 / (2 H)
    # is h + d (r^2 d / (2 H) - r): three passes.
    r = 1 - h.beta2
    torch.addcdiv(hess, nx, s.std, value=-1, out=d)
    torch.addcdiv(constant(-r, d), d, H, value=0.5 * r * r, out=t)
    hess.addcmul_(d, t)
    set_variance(s, h.ess, h.weight_decay)

    # m - lr clip((mu / bias + wd m) / H) with u = bias (mu / bias + wd m)
    bias = 1 - h.beta1**s.t if h.debias else 1.0
    lr = h.lr * (h.hess_init + h.weight_decay) if h.rescale_lr else h.lr
    u = s.momentum
    if h.weight_decay > 0:
        u = torch.add(u, m, alpha=h.weight_decay * bias, out=d)
    if h.clip_radius < math.inf:
        radius = h.clip_radius * bias
        m.sub_(torch.div(u, H, out=d).clamp_(-radius, radius), alpha=lr / bias)
    else:
        m.addcdiv_(u, H, value=-lr / bias)
