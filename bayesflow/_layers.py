r"""The layers with a local reparameterization: what they are, and their stochastic
forward, written once for :func:`bayesflow.local_call` and
:meth:`bayesflow.BayesianModel.reparameterize`."""

from __future__ import annotations

__all__ = [
    "Moments",
    "Noise",
    "is_conv",
    "is_linear",
    "is_local",
    "linear",
    "local_forward",
    "mask_of",
    "moments",
]

import sys

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch import Size, Tensor

from ._compat import ConvNd
from ._numerics import std as _std
from ._numerics import var as _var

_CONV_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}


def is_linear(layer: nn.Module) -> bool:
    r"""Returns whether `layer` computes :math:`y = x (A \odot W)^T + b` in its `forward`.

    That is an instance of :class:`torch.nn.Linear` or :class:`zuko.nn.Linear`, or of a
    subclass, such as zuko's `MaskedLinear` (whose mask is :math:`A`), that keeps one of
    their `forward` methods: a subclass with a `forward` of its own may compute anything.

    Importing zuko changes torch.distributions defaults, so bayesflow never imports it
    itself: a module that holds zuko layers was built after zuko was imported.
    """

    forwards = {nn.Linear.forward}
    zuko_nn = sys.modules.get("zuko.nn")
    if zuko_nn is not None:
        if not isinstance(layer, (nn.Linear, zuko_nn.Linear)):
            return False
        forwards |= {zuko_nn.Linear.forward, zuko_nn.MaskedLinear.forward}
    elif not isinstance(layer, nn.Linear):
        return False

    return type(layer).forward in forwards


def is_conv(layer: nn.Module) -> bool:
    r"""Returns whether `layer` is a :class:`torch.nn.Conv1d`, `Conv2d` or `Conv3d` (or a
    subclass that keeps their `forward`)."""

    return isinstance(layer, ConvNd) and type(layer).forward in _CONV_FORWARDS


def is_local(layer: nn.Module) -> bool:
    r"""Returns whether the local reparameterization trick applies to `layer`."""

    return is_linear(layer) or is_conv(layer)


def mask_of(layer: nn.Module) -> Tensor | None:
    r"""Returns the mask of a zuko `MaskedLinear` layer, or :py:`None`."""

    zuko_nn = sys.modules.get("zuko.nn")
    if zuko_nn is not None and isinstance(layer, zuko_nn.MaskedLinear):
        return layer.mask
    return None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    r"""Returns :math:`x W^T + b`, for a weight of shape `(out, in)` or, as in
    :class:`zuko.nn.Linear`, a stack `(S, out, in)` applied to inputs `(*, S, in)`."""

    if weight.dim() == 2:
        return F.linear(x, weight, bias)

    y = (weight @ x.unsqueeze(-1)).squeeze(-1)
    return y if bias is None else y + bias


def _apply(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if is_conv(layer):
        return layer._conv_forward(x, weight, bias)
    return linear(x, weight, bias)


@dataclass
class Moments:
    r"""The Gaussian of a layer's weight and bias: means, variances and standard
    deviations (:py:`None` where the tensor is not Bayesian; its mean is then its value)."""

    w_mean: Tensor
    w_var: Tensor | None
    w_std: Tensor | None
    b_mean: Tensor | None
    b_var: Tensor | None
    b_std: Tensor | None


def moments(
    layer: nn.Module,
    w: tuple[Tensor, Tensor] | None,
    b: tuple[Tensor, Tensor] | None,
) -> Moments:
    r"""Returns the moments of a layer from the `(mean, logvar)` of its weight and bias,
    or :py:`None` for a deterministic one (the layer's own tensor is used)."""

    mask = mask_of(layer)
    if w is None:
        w_mean, w_var, w_std = layer.weight, None, None
    else:
        w_mean, w_var, w_std = w[0], _var(w[1]), _std(w[1])
    if mask is not None:  # a 0/1 mask: (A w)^2 = A w^2
        w_mean = mask * w_mean
        w_var = None if w_var is None else mask * w_var
        w_std = None if w_std is None else mask * w_std

    if b is None:
        b_mean, b_var, b_std = layer.bias, None, None
    else:
        b_mean, b_var, b_std = b[0], _var(b[1]), _std(b[1])

    return Moments(w_mean, w_var, w_std, b_mean, b_var, b_std)


class Noise:
    r"""Where a stochastic layer gets its noise.

    :meth:`start` is told of every call of a layer, with its input and mean output; if
    it returns :py:`False` the layer returns the mean output (a shape-finding pass).
    """

    def start(self, name: str, x: Tensor, y: Tensor) -> bool:
        return True

    def normal(self, name: str, shape: Size, like: Tensor) -> Tensor:
        raise NotImplementedError

    def signs(self, name: str, shape: Size, like: Tensor) -> Tensor:
        e = self.normal(name, shape, like)
        return torch.where(e >= 0, 1.0, -1.0).to(e.dtype)

    def shared(self, name: str, shape: Size, like: Tensor) -> Tensor:
        raise NotImplementedError


def _bias_view(b: Tensor, layer: nn.Module, y: Tensor) -> Tensor:
    r"""Returns a bias shaped to broadcast against an output `y` of `layer`."""

    if is_conv(layer):  # (C,) against (*, C, *spatial)
        return b.view(*b.shape, *(1,) * (layer.weight.dim() - 2))
    return b


def _local(name: str, layer: nn.Module, x: Tensor, m: Moments, noise: Noise) -> Tensor:
    mean = _apply(layer, x, m.w_mean, m.b_mean)
    if not noise.start(name, x, mean):
        return mean

    if m.w_var is None:
        var = _bias_view(m.b_var, layer, mean).expand_as(mean)
    else:
        var = _apply(layer, x.square(), m.w_var, m.b_var)
    if m.b_var is None:
        # The clamp keeps the gradient of the square root finite where the variance
        # vanishes (an all-zero input); a Bayesian bias keeps it positive anyway.
        var = var.clamp_min(torch.finfo(var.dtype).tiny)

    return torch.addcmul(mean, var.sqrt(), noise.normal(name, mean.shape, mean))


def _flipout(name: str, layer: nn.Module, x: Tensor, m: Moments, noise: Noise) -> Tensor:
    y = _apply(layer, x, m.w_mean, m.b_mean)
    if not noise.start(name, x, y):
        return y

    if m.w_std is not None:
        # One perturbation dW for every sample and example, decorrelated by random sign
        # flips: W = mu + dW * (r s^T) has the law of the weight for every sample.
        dw = m.w_std * noise.shared(name, m.w_std.shape, x)
        s = noise.signs(name, x.shape, x)
        r = noise.signs(name, y.shape, y)
        y = y + _apply(layer, x * s, dw, None) * r
    if m.b_std is not None:
        y = y + _bias_view(m.b_std * noise.normal(name, m.b_std.shape, y), layer, y)

    return y


def local_forward(
    name: str,
    layer: nn.Module,
    stats: Moments | Callable[[], Moments],
    noise: Noise,
    flipout: bool = False,
) -> Callable[[Tensor], Tensor]:
    r"""Returns a `forward` for `layer` that samples its outputs (the local
    reparameterization trick) or perturbs them with Flipout.

    `stats` are the layer's moments, or a callable that reads them at every call.
    """

    step = _flipout if flipout else _local

    def forward(x: Tensor) -> Tensor:
        m = stats() if callable(stats) else stats
        return step(name, layer, x, m, noise)

    return forward
