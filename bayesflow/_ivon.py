r"""The flat state of IVON and the arithmetic of its step, in passes over all P numbers."""

from __future__ import annotations

__all__ = [
    "HYPER",
    "Draw",
    "Flat",
    "Hyper",
    "averages",
    "changed_since_taken",
    "fold",
    "forget",
    "gradients",
    "noise_times_gradients",
    "set_variance",
    "update",
]

import math
import weakref

from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from torch import Tensor

from ._numerics import LOGVAR_LIMIT, accumulator, constant, inverse_softclip

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
    leaves: list[Tensor | None]  # the sampled parameters handed out, (n, *shape) each
    std: Tensor  # (P,): the standard deviations it was drawn with (`Flat.std` until changed)


class Taken(NamedTuple):
    r"""The gradient of a sample as a draw's statistics took it (:py:`None` where none had
    reached it, counted as zero): what changes after that (a backward pass, a clipping)
    would be silently ignored."""

    leaf: weakref.ref
    grad: weakref.ref | None
    version: int | None


class Flat:
    r"""The state of IVON over the `P` numbers of the picked parameters: flat buffers, so
    that every operation of a step is one pass over all of them. Their views by name are
    the posterior, and the means become the parameters' own storage.

    The means, the posterior's log-variances and the noise are in the parameters' dtype;
    the rest (the Hessian estimates, the momentum, the standard deviations, the gradient
    statistics) in at least float32 (`state_dtype`): in half precision an update of the
    Hessian estimate at `beta2` near 1 rounds away, and float16 overflows on gradients of
    a few thousand.

    Arguments:
        names: The names of the parameters.
        params: The parameters, of one dtype and device.
        hess_init: The initial Hessian estimate.
    """

    def __init__(self, names: list[str], params: list[Tensor], hess_init: float) -> None:
        self.names = names
        self.shapes = [p.shape for p in params]
        self.sizes = [p.numel() for p in params]
        self.dtype, self.device = params[0].dtype, params[0].device
        self.state_dtype = dtype = accumulator(self.dtype)
        device = self.device
        size = sum(self.sizes)

        with torch.no_grad():
            self.mean = torch.cat([p.detach().reshape(-1) for p in params])
        self.hess = torch.full((size,), hess_init, dtype=dtype, device=device)
        self.momentum = torch.zeros(size, dtype=dtype, device=device)
        self.H = torch.empty(size, dtype=dtype, device=device)  # hess + weight_decay
        self.std = torch.empty(size, dtype=dtype, device=device)
        self.logvar = torch.empty(size, dtype=self.dtype, device=device)  # the posterior's
        self.work = torch.empty(2, size, dtype=dtype, device=device)
        self.stats = torch.empty(2, size, dtype=dtype, device=device)  # those of a draw
        self.stats_views = (self.views(self.stats[0], 1), self.views(self.stats[1], 1))
        self.momentum_views = self.views(self.momentum, 1)
        self.sums: Tensor | None = None  # (2, P): those of several draws, summed
        self.count = 0  # the number of draws in `sums`
        self.eps: Tensor | None = None  # (n, P): the noise of the last draw
        self.eps_views: list[Tensor] = []  # by parameter, (n, *shape)
        self.draws: list[Draw] = []  # those no gradient has reached yet, oldest first
        self.taken: list[Taken] = []  # the gradients in `sums`
        self.t = 0  # the number of steps
        # (ess, weight_decay, the version of hess) when the variances were set
        self.variance_of: tuple[float, float, int] | None = None

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
        r"""Returns the buffer `(n, P)` of the noise of a draw of `n` samples (a fresh one
        while a draw that awaits its gradients holds the last)."""

        held = any(d.eps is self.eps for d in self.draws)
        if self.eps is None or self.eps.shape[0] != n or held:
            self.eps = torch.empty(n, self.mean.numel(), dtype=self.dtype, device=self.device)
            self.eps_views = self.views(self.eps, n)
        return self.eps


def set_variance(s: Flat, ess: float, weight_decay: float) -> None:
    r"""Sets :math:`H = h + \delta`, :math:`\sigma = 1 / \sqrt{\lambda H}` clamped to the
    posterior's range, and the posterior's log-variances :math:`\log \sigma^2`, unclipped.
    Draws that await their gradients keep the sigma they were drawn with."""

    if any(d.std is s.std for d in s.draws):
        std = s.std.clone()
        s.draws = [d._replace(std=std) if d.std is s.std else d for d in s.draws]
    torch.add(s.hess, weight_decay, out=s.H)
    bound = math.exp(LOGVAR_LIMIT / 2)
    # 1 / sqrt(H) / sqrt(ess): ess * H overflows float16 (65504) for ess = 1e5 and H = 1.
    torch.rsqrt(s.H, out=s.std).mul_(ess**-0.5).clamp_(1 / bound, bound)
    y = torch.log(s.std, out=s.work[0])
    y = torch.add(y, y, out=y)  # log sigma^2 = 2 log sigma
    if s.logvar.dtype == y.dtype:
        inverse_softclip(y, out=s.logvar)
    else:  # in the state's dtype, rounded once (y is within the bound: x is finite)
        s.logvar.copy_(inverse_softclip(y, out=s.work[1]))
    s.variance_of = (ess, weight_decay, s.hess._version)


def _statistics(s: Flat, draw: Draw, grads: list[Tensor | None]) -> None:
    r"""Writes the sums over the samples of a draw of :math:`g_k` and of
    :math:`\epsilon_k \odot g_k / \sigma` (for the sigma it was drawn with) into `s.stats`,
    from the gradients of its samples."""

    n, eps = draw.n, draw.eps
    grads = [
        eps.new_zeros(n, *shape) if g is None else g
        for shape, g in zip(s.shapes, grads, strict=True)
    ]
    g_sum, nx_sum = s.stats[0], s.stats[1]
    if s.state_dtype != s.dtype:  # products and sums in the state's dtype
        g = torch.cat([g.reshape(n, -1) for g in grads], 1).to(s.state_dtype)
        torch.sum(g, 0, out=g_sum)
        torch.sum(g.mul_(eps), 0, out=nx_sum).div_(draw.std)
        return
    if n == 1:
        torch.cat([g.view(-1) for g in grads], out=g_sum)
        torch.mul(eps[0], g_sum, out=nx_sum).div_(draw.std)
        return
    noise = s.eps_views if eps is s.eps else s.views(eps, n)
    torch._foreach_mul_(noise, grads)
    for g, nx, g_out, nx_out in zip(grads, noise, *s.stats_views, strict=True):
        torch.sum(g, 0, keepdim=True, out=g_out)
        torch.sum(nx, 0, keepdim=True, out=nx_out)
    nx_sum.div_(draw.std)


def gradients(draw: Draw) -> list[Tensor | None]:
    r"""Returns the gradients of the samples of a draw (:py:`None` where none reached)."""

    return [None if t is None else t.grad for t in draw.leaves]


def take(s: Flat, draw: Draw, grads: list[Tensor | None]) -> None:
    r"""Remembers the gradients a draw's statistics took (weakly)."""

    s.taken.extend(
        Taken(weakref.ref(t), None, None)
        if g is None
        else Taken(weakref.ref(t), weakref.ref(g), g._version)
        for t, g in zip(draw.leaves, grads, strict=True)
        if t is not None
    )


def changed_since_taken(s: Flat) -> bool:
    r"""Whether a gradient of a draw in the sums changed after they took it, or reached a
    sample that had none then (taken as zero)."""

    for taken in s.taken:
        leaf = taken.leaf()
        if leaf is None or leaf.grad is None:
            continue  # dropped, zeroed, or still none: nothing was added
        if taken.grad is None or leaf.grad is not taken.grad():
            return True
        if leaf.grad._version != taken.version:
            return True
    return False


def fold(s: Flat) -> None:
    r"""Adds the statistics of the draws that gradients reached to the sums. The others
    await theirs, unless nothing holds their samples any more (neither the caller nor a
    graph): those no gradient can reach are forgotten."""

    draws, s.draws = s.draws, []
    waiting = []
    while draws:
        draw = draws.pop(0)
        grads = gradients(draw)
        if all(g is None for g in grads):
            refs = [None if t is None else weakref.ref(t) for t in draw.leaves]
            waiting.append((draw._replace(leaves=[]), refs))
        else:
            _statistics(s, draw, grads)
            take(s, draw, grads)
            if s.sums is None:
                s.sums = torch.empty_like(s.stats)
            if s.count == 0:
                s.sums.copy_(s.stats)
            else:
                s.sums.add_(s.stats)
            s.count += 1
        del draw, grads  # the last strong references of ours to its samples
    for draw, refs in waiting:
        leaves = [None if r is None else r() for r in refs]
        if any(t is not None for t in leaves):
            s.draws.append(draw._replace(leaves=leaves))


def finite(t: Tensor) -> bool:
    r"""Whether every value of `t` is finite. Its sum first, one fast pass (NaN or
    infinite where a value is); where that is not finite, a sum of finite values may have
    overflowed: then the exact test, on the least and largest values."""

    if t.numel() == 0 or math.isfinite(t.sum().item()):
        return True
    return all(math.isfinite(v) for v in torch.stack(t.aminmax()).tolist())


def forget(s: Flat) -> None:
    r"""Forgets every draw since the last step, and their statistics."""

    s.draws, s.taken, s.count = [], [], 0


def averages(s: Flat, group: Any) -> Tensor:
    r"""Returns the averages of :math:`g_k` and :math:`\epsilon_k \odot g_k / \sigma`,
    `(2, P)`, over the samples of the draws since the last step that gradients reached,
    each draw weighted equally, and over the processes of `group` (none if :py:`None`); and
    forgets the draws."""

    fold(s)
    stats = s.sums
    if s.count > 1:
        stats.div_(s.count)
    forget(s)

    if group is not None:
        dist.all_reduce(stats, group=group)
        stats.div_(dist.get_world_size(group))
    return stats


def noise_times_gradients(s: Flat, grads: list[Tensor]) -> Tensor:
    r"""Returns :math:`\epsilon \odot g`, flat, for the last draw, of one sample (its
    gradients by name, none missing), written into its noise: without a flat copy of the
    gradients. The draw cannot be used again."""

    torch._foreach_mul_(s.eps_views, grads)
    return s.eps[0]


def update(
    s: Flat, g: Tensor | list[Tensor], nx: Tensor, h: Hyper, std: Tensor | None = None
) -> None:
    r"""Updates the momentum, the Hessian estimates, the variances and the means, given the
    averages of :math:`g_k` (flat, or by parameter) and of :math:`\epsilon_k \odot g_k /
    \sigma` (flat, overwritten), or of :math:`\epsilon_k \odot g_k` and the sigma `std`
    they were drawn with."""

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
    if std is None:
        torch.sub(hess, nx, out=d)
    else:
        torch.addcdiv(hess, nx, std, value=-1, out=d)
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
