r"""Vmap-safe equivalents of the pieces of :mod:`zuko.transforms` that vmap cannot batch.

Each function here computes the same numbers as its zuko counterpart with plain,
differentiable tensor code: no in-place writes into unbatched tensors, no old-style
:class:`torch.autograd.Function`, no :py:`requires_grad_()` or :func:`torch.autograd.grad`
and no :py:`.item()`. They are installed only while :func:`bayesflow._vmap_safe.vmap_safe`
is active.
"""

from __future__ import annotations

__all__ = [
    "bisection",
    "coupling_merge",
    "ffj_call_and_ladj",
    "gauss_legendre",
    "gmm_forward_full",
    "monotonic_call_and_ladj",
    "odeint",
]

import math
import sys
import threading

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from functools import cache
from typing import Any

import numpy as np
import torch

from torch import Size, Tensor
from torch.distributions import Distribution, MultivariateNormal
from torch.func import jvp, vmap

from ._caches import register
from ._compat import function_apply, is_compiling, shared_draws, unwrap_batched
from ._errors import NonFiniteError

_MAX_ODE_ATTEMPTS = 10_000


def coupling_merge(self: Any, x_a: Tensor, x_b: Tensor, shape: Size) -> Tensor:
    r"""Merges the two splits of a coupling transform out of place.

    Replaces :meth:`zuko.transforms.CouplingTransform.merge`, which writes a batched
    split into an unbatched empty tensor when only the context carries the sample dim.
    """

    batch = tuple(shape[:-1])
    x_a = x_a.expand(*batch, x_a.shape[-1])
    x_b = x_b.expand(*batch, x_b.shape[-1])
    order = torch.argsort(torch.cat((self.idx_a, self.idx_b)))

    return torch.index_select(torch.cat((x_a, x_b), dim=-1), -1, order)


# Forward-mode AD levels are process-wide in torch: two threads in `jvp` at once break
# each other's levels. One thread at a time runs a forward-mode pass.
_FORWARD_AD = threading.RLock()


def _forward_ad() -> Any:
    return nullcontext() if is_compiling() else _FORWARD_AD


def _jvp(f: Callable[..., Any], primals: tuple, tangents: tuple) -> Any:
    with _forward_ad():
        return jvp(f, primals, tangents)


def _derivative(f: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    r"""Returns :math:`f(x)` and :math:`f'(x)` of an element-wise function, in forward mode.

    On a copy of `x`, as zuko's own clones it: an expanded `x` (one element in several
    places) cannot be the primal of forward mode."""

    return _jvp(f, (x.clone(),), (torch.ones_like(x),))


def monotonic_call_and_ladj(self: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""Replaces :meth:`zuko.transforms.MonotonicTransform.call_and_ladj`.

    The derivative of the element-wise :math:`f` is one forward-mode pass instead of
    :py:`requires_grad_()` and :func:`torch.autograd.grad`, which vmap cannot batch.
    """

    y, dy = _derivative(self.f, x)

    return y, dy.log()


_SECOND_ORDER = (
    "bisection: expected derivatives of first order through the inverse of a monotonic "
    "transform (NAF, UNAF, SOSPF, GF, BPF); got a request to differentiate its gradient "
    "again: its implicit gradient is exact to first order only (zuko's own bisection "
    "raises here too)"
)


class _Refuse(torch.autograd.Function):
    r"""Returns `g`, in a graph that raises where it is differentiated: its second input,
    `x`, ties it to everything `x` depends on (:class:`_FirstOrder`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g: Tensor, x: Tensor) -> Tensor:
        return g.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        raise RuntimeError(_SECOND_ORDER)

    @staticmethod
    def jvp(ctx: Any, g_t: Tensor, x_t: Tensor) -> Tensor:
        raise RuntimeError(_SECOND_ORDER)


class _FirstOrder(torch.autograd.Function):
    r"""The identity, whose gradient cannot be differentiated again.

    With a graph of the gradient requested (`create_graph=True`, or nested
    :mod:`torch.func` transforms), the gradient passes through :class:`_Refuse`, tied to
    `x`'s graph: any derivative of it with respect to what `x` depends on raises, also
    when the incoming gradient is a constant (where `once_differentiable` lets it pass).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return grad
        (x,) = ctx.saved_tensors
        return function_apply(_Refuse, grad, x)

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return function_apply(_Refuse, tangent, x)


def bisection(
    f: Callable[[Tensor], Tensor],
    y: Tensor,
    a: float | Tensor,
    b: float | Tensor,
    n: int = 16,
    phi: Iterable[Tensor] = (),
) -> Tensor:
    r"""Replaces :func:`zuko.utils.bisection`: the same iterations, then implicit gradients.

    The root :math:`x^\star` is found without gradients. The returned value is exactly
    :math:`x^\star`, and its gradients are those of the implicit function theorem,
    :math:`\partial x = (\partial y - \partial f_\phi(x^\star)) / f'_\phi(x^\star)`, as
    in zuko's backward, with respect to every tensor :math:`f` depends on. They are exact
    to first order only: differentiating them again raises (:class:`_FirstOrder`), as
    zuko's own `once_differentiable` backward does, except inside :func:`torch.compile`.
    """

    a = torch.as_tensor(a).to(y)
    b = torch.as_tensor(b).to(y)

    with torch.no_grad():
        for _ in range(n):
            c = (a + b) / 2
            mask = f(c) < y
            a = torch.where(mask, c, a)
            b = torch.where(mask, b, c)

        x = (a + b) / 2

    if not torch.is_grad_enabled():
        return x

    fx, dfx = _derivative(f, x)
    delta = (y - fx) / dfx.detach()

    # `delta - delta.detach()` is zero in value and carries the implicit gradients.
    x = x + torch.where(torch.isfinite(delta), delta - delta.detach(), 0.0)

    # Dynamo cannot trace a custom `jvp` (a graph break), and it would compile the
    # backward's test of `create_graph` away: traced code gets the plain formulas.
    return x if is_compiling() else function_apply(_FirstOrder, x)


@cache
def _legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.legendre.leggauss(n)

    return (nodes + 1) / 2, weights / 2


register(_legendre.cache_clear)


def _quadrature(f: Callable[[Tensor], Tensor], a: Tensor, b: Tensor, n: int) -> Tensor:
    nodes, weights = _legendre(n)
    nodes = torch.as_tensor(nodes, dtype=a.dtype, device=a.device)
    weights = torch.as_tensor(weights, dtype=a.dtype, device=a.device)
    nodes = torch.lerp(a[..., None], b[..., None], nodes).movedim(-1, 0)

    return (b - a) * torch.tensordot(weights, f(nodes), dims=1)


def gauss_legendre(
    f: Callable[[Tensor], Tensor],
    a: Tensor,
    b: Tensor,
    n: int = 3,
    phi: Iterable[Tensor] = (),
) -> Tensor:
    r"""Replaces :func:`zuko.utils.gauss_legendre`, with zuko's gradients.

    The bounds get the exact gradients :math:`-f(a)` and :math:`f(b)` (the fundamental
    theorem of calculus, as in zuko's backward), and the parameters of :math:`f` the
    gradient of the quadrature. Unlike zuko's, these gradients can be differentiated
    again: the second derivatives are exact too (:func:`_bound`).
    """

    area = _quadrature(f, a.detach(), b.detach(), n)

    if torch.is_grad_enabled():
        area = area + _bound(f, b)
        area = area - _bound(f, a)

    return area


def _bound(f: Callable[[Tensor], Tensor], b: Tensor) -> Tensor:
    r"""Returns zero, with the derivatives of :math:`\int_{b_0}^{b} f(t) \, dt` at
    :math:`b_0 = b`, to second order.

    The midpoint rule :math:`s f(b_0 + s / 2)`, :math:`s = b - b_0`, has the exact
    derivatives :math:`f(b_0)` in :math:`s`, :math:`f'(b_0)` in :math:`s` twice, and
    :math:`\partial f(b_0)` in :math:`s` and anything :math:`f` depends on. Its third
    derivative in :math:`s` is :math:`3 f''(b_0) / 4` instead of :math:`f''(b_0)`.
    """

    s = b - b.detach()

    # `s` is zero: the point is `b` itself and the first-order gradients are f(b), bit
    # for bit; only a second derivative sees the point move (at half the speed of `b`).
    return s * f(b.detach() + s / 2)


# fmt: off
def _dopri45(
    f: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, dt: Tensor
) -> tuple[Tensor, Tensor]:
    r"""One Dormand-Prince step and its error estimate, as :func:`zuko.utils.dopri45`."""

    k1 = dt * f(t, x)
    k2 = dt * f(t + 1 / 5 * dt, x + 1 / 5 * k1)
    k3 = dt * f(t + 3 / 10 * dt, x + 3 / 40 * k1 + 9 / 40 * k2)
    k4 = dt * f(t + 4 / 5 * dt, x + 44 / 45 * k1 - 56 / 15 * k2 + 32 / 9 * k3)
    k5 = dt * f(
        t + 8 / 9 * dt,
        x + 19372 / 6561 * k1 - 25360 / 2187 * k2 + 64448 / 6561 * k3 - 212 / 729 * k4,
    )
    k6 = dt * f(
        t + dt,
        x
        + 9017 / 3168 * k1
        - 355 / 33 * k2
        + 46732 / 5247 * k3
        + 49 / 176 * k4
        - 5103 / 18656 * k5,
    )
    x_next = (
        x
        + 35 / 384 * k1
        + 500 / 1113 * k3
        + 125 / 192 * k4
        - 2187 / 6784 * k5
        + 11 / 84 * k6
    )
    k7 = dt * f(t + dt, x_next)
    x_star = (
        x
        + 5179 / 57600 * k1
        + 7571 / 16695 * k3
        + 393 / 640 * k4
        - 92097 / 339200 * k5
        + 187 / 2100 * k6
        + 1 / 40 * k7
    )

    return x_next, abs(x_next - x_star)
# fmt: on


def _any(mask: Tensor) -> bool:
    r"""Whether any element of `mask` is true, across every vmap level.

    The stopping test of the adaptive solver: each sample keeps its own step sizes, and
    the loop runs until the last sample reaches :math:`t_1`.
    """

    return bool(unwrap_batched(mask).any())


def _adaptive(
    f: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    t0: Tensor,
    t1: Tensor,
    atol: float,
    rtol: float,
) -> Tensor:
    r"""Zuko's adaptive Dormand-Prince loop with tensor-valued step control.

    Every accepted and rejected step is the one zuko takes for the same input; finished
    samples are masked. Gradients flow through the accepted steps (the step sizes are
    constants, as in zuko).
    """

    t, dt = t0, t1 - t0
    sign = torch.sign(dt)
    done = ~(sign * (t1 - t) > 0)

    attempts = 0
    while _any(~done):
        if attempts == _MAX_ODE_ATTEMPTS:
            raise RuntimeError(
                f"odeint: expected the adaptive solver to reach t1 within "
                f"{_MAX_ODE_ATTEMPTS} steps, got a sample still short of it"
            )
        attempts += 1

        dt = sign * torch.minimum(abs(dt), abs(t1 - t))
        y, error = _dopri45(f, x, t, dt)
        tolerance = atol + rtol * torch.maximum(abs(x), abs(y))
        error = torch.max(error / tolerance).clip(min=1e-9).detach()
        if _any(~torch.isfinite(error) & ~done):
            # No step size makes a NaN finite: zuko's own solver would loop forever.
            raise NonFiniteError(
                "odeint: the ODE's state or derivative is not finite (NaN or infinity), "
                "e.g. from sampled parameters far in the posterior's tails; the solver "
                "cannot reach t1"
            )

        accept = (error < 1.0) & ~done
        x = torch.where(accept, y, x)
        t = torch.where(accept, t + dt, t)

        factor = (0.9 / error ** (1 / 5)).clip(min=0.1, max=10.0)
        dt = torch.where(done, dt, dt * factor)
        done = done | ~(sign * (t1 - t) > 0)

    return x


def odeint(
    f: Callable[..., Any],
    x: Tensor | Sequence[Tensor],
    t0: float | Tensor,
    t1: float | Tensor,
    phi: Iterable[Tensor] = (),
    atol: float = 1e-6,
    rtol: float = 1e-5,
) -> Tensor | Sequence[Tensor]:
    r"""Replaces :func:`zuko.utils.odeint`: the same adaptive steps, plain autograd.

    Gradients are those of the discrete solution (backpropagation through the accepted
    steps) instead of zuko's adaptive checkpoint adjoint; both approximate the same
    continuous gradient to within the solver's tolerance.
    """

    if torch.is_tensor(x):
        x0 = x
        g = f
    else:
        shapes = [y.shape for y in x]

        def pack(xs: Iterable[Tensor]) -> Tensor:
            return torch.cat([y.flatten() for y in xs])

        x0 = pack(x)

        def g(t: Tensor, x: Tensor) -> Tensor:
            return pack(f(t, *_unpack(x, shapes)))

    t0 = torch.as_tensor(t0, dtype=x0.dtype, device=x0.device)
    t1 = torch.as_tensor(t1, dtype=x0.dtype, device=x0.device)

    if t0.dim() != 0 or t1.dim() != 0:
        raise ValueError(
            f"odeint: expected scalar t0 and t1, got shapes {tuple(t0.shape)} and "
            f"{tuple(t1.shape)}"
        )

    x1 = _adaptive(g, x0, t0, t1, atol, rtol)

    if torch.is_tensor(x):
        return x1

    return _unpack(x1, shapes)


def _unpack(x: Tensor, shapes: Sequence[Size]) -> tuple[Tensor, ...]:
    sizes = [math.prod(s) for s in shapes]
    parts = x.split(sizes, -1)

    return tuple(y.unflatten(-1, (*s, 1)).squeeze(-1) for y, s in zip(parts, shapes, strict=True))


def ffj_call_and_ladj(self: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""Replaces :meth:`zuko.transforms.FreeFormJacobianTransform.call_and_ladj`.

    The trace of the Jacobian is taken in forward mode (one :func:`torch.func.jvp` per
    basis vector, batched with vmap) instead of :py:`requires_grad_()` and
    :func:`torch.autograd.grad`.
    """

    if self.exact:
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        eye = eye.expand(*x.shape, -1).movedim(-1, 0)
    else:
        eps = torch.randn_like(x)

    def f_aug(t: Tensor, x: Tensor, ladj: Tensor) -> tuple[Tensor, Tensor]:
        def ode(x: Tensor) -> Tensor:
            return self.f(t, x)

        if self.exact:
            with _forward_ad(), shared_draws():
                dx, columns = vmap(lambda v: jvp(ode, (x,), (v,)))(eye)
            dx, trace = dx[0], torch.einsum("i...i", columns)
        else:
            dx, jeps = _jvp(ode, (x,), (eps,))
            trace = (jeps * eps).sum(dim=-1)

        return dx, trace * self.trace_scale

    ladj = torch.zeros_like(x[..., 0])
    y, ladj = odeint(f_aug, (x, ladj), self.t0, self.t1, self.phi, self.atol, self.rtol)

    return y, ladj * (1 / self.trace_scale)


def gmm_forward_full(
    self: Any, logits: Tensor, loc: Tensor, diag: Tensor, tril: Tensor
) -> Distribution:
    r"""Replaces :meth:`zuko.mixtures.GMM._forward_full` without :func:`torch.masked_scatter`.

    Vmap has no batching rule for `masked_scatter` (a slow fallback with a warning); the
    strictly lower entries are gathered in the same row-major order instead.
    """

    mixtures = sys.modules["zuko.mixtures"]

    scale = torch.diag_embed(diag.exp() + self.epsilon)
    d = scale.shape[-1]
    mask = torch.tril(torch.ones(d, d, dtype=torch.bool, device=scale.device), diagonal=-1)
    flat = mask.flatten()
    index = torch.where(flat, flat.cumsum(0) - 1, tril.shape[-1])
    # One feature has no strictly lower entry: the zero column from the shape, not from them.
    lower = torch.cat((tril, tril.new_zeros(*tril.shape[:-1], 1)), dim=-1)
    lower = torch.index_select(lower, -1, index).unflatten(-1, (d, d))
    scale = torch.where(mask, lower, scale)

    return mixtures.Mixture(MultivariateNormal(loc=loc, scale_tril=scale), logits)
