r"""The local reparameterization trick and Flipout, vectorized over posterior samples."""

from __future__ import annotations

__all__ = ["linear_layers", "local_call"]

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from torch import Tensor

from ._linear import is_linear, linear, mask_of
from .bayesian import BayesianModel
from .call import _check_in_dims, _map_outputs
from .posterior import (
    Posterior,
    _check_generator,
    _check_matches,
    _check_module,
    _check_n,
    _check_posterior,
    _softclip,
)


def linear_layers(module: nn.Module) -> dict[str, nn.Module]:
    r"""Returns the linear layers of `module` that :func:`local_call` handles, by name.

    They are the instances of :class:`torch.nn.Linear` and :class:`zuko.nn.Linear`, and of
    their subclasses that keep their `forward`, such as zuko's `MaskedLinear`.

    Arguments:
        module: A module.

    Returns:
        The layers, keyed by their names in :meth:`torch.nn.Module.named_modules`.
    """

    _check_module("linear_layers", module)

    return {name: m for name, m in module.named_modules() if is_linear(m)}


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


class _Layer:
    r"""The posterior of one linear layer: means and variances of its weight and bias."""

    def __init__(self, name: str, layer: nn.Module, posterior: Posterior) -> None:
        p = _prefix(name)
        mask = mask_of(layer)

        self.name = name
        self.w_mean, self.w_var, self.w_std = self._moments(
            p + "weight", layer.weight, posterior, mask
        )
        self.b_mean, self.b_var, self.b_std = self._moments(
            p + "bias", layer.bias, posterior, None
        )

    @staticmethod
    def _moments(
        name: str, own: Tensor | None, posterior: Posterior, mask: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if name not in posterior.mean:
            return (own if mask is None else mask * own), None, None

        mean = posterior.mean[name]
        logvar = _softclip(posterior.logvar[name])
        var, std = logvar.exp(), logvar.div(2).exp()
        if mask is not None:  # a 0/1 mask: (A w)^2 = A w^2
            mean, var, std = mask * mean, mask * var, mask * std

        return mean, var, std


def _signs(shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    r"""Returns independent random signs :math:`\pm 1`."""

    s = torch.randint(0, 2, shape, generator=generator, dtype=like.dtype, device=like.device)
    return s.mul_(2).sub_(1)


def _randn(shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)


def _enter(layer: _Layer, n: int, calls: list[str], x: Tensor) -> None:
    if x.dim() < 2 or x.shape[0] != n:
        raise ValueError(
            f"local_call: expected the input of linear layer {layer.name!r} to carry the "
            f"leading sample dim n = {n}, got shape {tuple(x.shape)}"
        )
    calls.append(layer.name)


def _local_forward(
    layer: _Layer, n: int, generator: torch.Generator | None, calls: list[str]
) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        _enter(layer, n, calls, x)

        # An input shared by every sample (an expanded argument): the moments of the
        # output are computed once, only the noise has the sample dim.
        shared = x.stride(0) == 0
        x0 = x[0] if shared else x

        mean = linear(x0, layer.w_mean, layer.b_mean)

        if layer.w_var is None:
            var = layer.b_var.expand_as(mean)
        else:
            var = linear(x0.square(), layer.w_var, layer.b_var)

        shape = (n, *mean.shape) if shared else mean.shape
        eps = _randn(shape, mean, generator)

        if layer.b_var is None:
            # The clamp keeps the gradient of the square root finite where the variance
            # vanishes (an all-zero input); a Bayesian bias keeps it positive anyway.
            var = var.clamp_min(torch.finfo(var.dtype).tiny)

        return torch.addcmul(mean, var.sqrt(), eps)

    return forward


def _flipout_forward(
    layer: _Layer, n: int, generator: torch.Generator | None, calls: list[str]
) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        _enter(layer, n, calls, x)

        shared = x.stride(0) == 0
        y = linear(x[0] if shared else x, layer.w_mean, layer.b_mean)
        if shared:
            y = y.expand(n, *y.shape)

        if layer.w_var is not None:
            # One perturbation dW for every sample and example, decorrelated by random
            # sign flips: W_i = W + dW * (r_i s_i^T) has the law of W for every i.
            dw = layer.w_std * _randn(layer.w_std.shape, x, generator)
            s = _signs(x.shape, x, generator)
            r = _signs(y.shape, y, generator)
            y = y + linear(x * s, dw) * r

        if layer.b_std is not None:
            b = layer.b_std
            shape = (n,) + (1,) * (y.dim() - 1 - b.dim()) + tuple(b.shape)
            y = y + b * _randn(torch.Size(shape), y, generator)

        return y

    return forward


@contextmanager
def _patched(
    module: nn.Module, forwards: dict[nn.Module, Callable[[Tensor], Tensor]]
) -> Iterator[None]:
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for m, forward in forwards.items():
            patched.append((m, m.__dict__.get("forward")))
            m.forward = forward
        yield
    finally:
        for m, own in patched:
            if own is None:
                del m.forward
            else:
                m.forward = own


def _check_leading(t: Tensor, n: int) -> None:
    if t.dim() == 0 or t.shape[0] != n:
        raise ValueError(
            f"local_call: expected fn to return tensors with the leading sample dim n = {n}, "
            f"got shape {tuple(t.shape)}"
        )


def local_call(
    module: nn.Module,
    posterior: Posterior,
    n: int,
    *args: Any,
    fn: Callable[..., Any] | None = None,
    generator: torch.Generator | None = None,
    flipout: bool = False,
    in_dims: Sequence[int | None] | None = None,
) -> Any:
    r"""Runs `fn(module, *args)` for `n` posterior samples with noise on the outputs of
    the linear layers rather than on their weights.

    Every Bayesian parameter must be the weight or the bias of a linear layer (see
    :func:`linear_layers`); the layers are temporarily replaced by stochastic ones and
    `fn` runs once, with every tensor argument expanded to a leading sample dim `n`
    (no copy). No weight sample is ever materialized.

    With the local reparameterization trick, a layer :math:`y = x W^T + b` returns

    .. math:: y = x \mu_W^T + \mu_b + \sqrt{x^2 (\sigma_W^2)^T + \sigma_b^2} \odot \epsilon,

    with fresh :math:`\epsilon \sim \mathcal{N}(0, I)` for every sample and example. With
    Flipout, one perturbation :math:`\Delta W = \sigma_W \odot E` is shared and
    decorrelated by random signs :math:`s, r \in \{\pm 1\}`,

    .. math:: y = x \mu_W^T + \left( (x \odot s) \Delta W^T \right) \odot r + b,

    with the bias sampled once per sample. Either way each output has exactly the law of
    a full weight sample, and gradients reach the posterior's means and log-variances;
    what changes is the correlation between examples (independent weights per example),
    which makes the gradient estimates of an expected log-likelihood less noisy. A layer
    called twice in one `fn` draws fresh noise each time.

    Example:
        >>> net = zuko.nn.MLP(3, 5)
        >>> q = bayesflow.init(net, init_logvar=-6.0)
        >>> bayesflow.local_call(net, q, 8, torch.randn(16, 3)).shape
        torch.Size([8, 16, 5])

    Arguments:
        module: A module.
        posterior: A posterior over parameters of `module` that all belong to linear
            layers, e.g. from :func:`bayesflow.init` or :attr:`BayesianModel.posterior`
            (with `module = bnet.base`).
        n: The number of samples.
        args: The arguments of `fn`, shared by every sample unless `in_dims` says otherwise.
        fn: What to compute, `fn(module, *args)`; `module(*args)` if :py:`None`. It runs
            once, on arguments with a leading sample dim, and must return tensors (or
            tuples, lists or dicts of them) with that leading dim.
        generator: The source of all the noise; the global one if :py:`None`.
        flipout: Whether to use Flipout instead of the local reparameterization trick.
        in_dims: One entry per argument: :py:`None` if shared (expanded to the sample
            dim), `0` if per-sample (already with a leading dim `n`).

    Returns:
        The outputs of `fn`, with a leading dim of size `n`, differentiable with respect
        to `posterior`.

    Raises:
        ValueError: If a Bayesian parameter is not the weight or bias of a linear layer
            (use :func:`bayesflow.vmap_call` for those), or if `fn` did not call every
            Bayesian linear layer (a module that reads a layer's weight directly, as
            :class:`torch.nn.MultiheadAttention` does, would see the mean).

    References:
        | Variational Dropout and the Local Reparameterization Trick (Kingma et al., 2015)
        | https://arxiv.org/abs/1506.02557

        | Flipout: Efficient Pseudo-Independent Weight Perturbations on Mini-Batches (Wen et al., 2018)
        | https://arxiv.org/abs/1803.04386
    """  # noqa: E501

    where = "local_call"
    _check_module(where, module)
    if isinstance(module, BayesianModel):
        raise TypeError(
            f"{where}: expected the module the posterior is over, got a BayesianModel; "
            "pass bnet.base and bnet.posterior"
        )
    _check_posterior(where, posterior)
    _check_n(where, n)
    if fn is not None and not callable(fn):
        raise TypeError(f"{where}: expected fn to be callable or None, got {type(fn).__name__}")
    _check_generator(where, generator)
    if not isinstance(flipout, bool):
        raise TypeError(f"{where}: expected flipout to be a bool, got {type(flipout).__name__}")

    _check_matches(where, module, posterior)

    layers = {}
    covered = set()
    for name, layer in module.named_modules():
        if not is_linear(layer):
            continue
        names = {_prefix(name) + "weight", _prefix(name) + "bias"} & posterior.mean.keys()
        if names:
            layers[name] = layer
            covered |= names

    others = [name for name in posterior.mean if name not in covered]
    if others:
        raise ValueError(
            f"{where}: expected every Bayesian parameter to be the weight or bias of a "
            f"torch.nn.Linear or zuko.nn.Linear, got {others}; use bayesflow.vmap_call for "
            "these"
        )

    dims = _check_in_dims(where, args, in_dims, n)
    args = tuple(
        a.expand(n, *a.shape) if d is None and isinstance(a, Tensor) else a
        for a, d in zip(args, dims, strict=True)
    )

    make = _flipout_forward if flipout else _local_forward
    calls: list[str] = []
    forwards = {
        layer: make(_Layer(name, layer, posterior), n, generator, calls)
        for name, layer in layers.items()
    }

    with _patched(module, forwards):
        out = module(*args) if fn is None else fn(module, *args)

    _map_outputs(where, lambda t: None, out)
    skipped = [name for name in layers if name not in calls]
    if skipped:
        # A module that reads a layer's weight without calling the layer (as
        # nn.MultiheadAttention does with `out_proj`) would silently see the mean.
        raise ValueError(
            f"{where}: expected fn to call every Bayesian linear layer of "
            f"{type(module).__name__}, got {skipped} never called; use bayesflow.vmap_call"
        )
    _map_outputs(where, lambda t: _check_leading(t, n), out)

    return out
