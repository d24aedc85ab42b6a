r"""The local reparameterization trick and Flipout, vectorized over posterior samples."""

from __future__ import annotations

__all__ = ["local_call", "local_layers"]

import weakref

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from torch import Size, Tensor

from . import _posterior, _torch_layers
from ._checks import (
    check_bool,
    check_callable,
    check_generator,
    check_in_dims,
    check_module,
    check_n,
    check_not_bridge,
    check_posterior,
)
from ._engine import run
from ._errors import Passthrough
from ._layers import Moments, Noise, is_local, local_forward, moments
from ._swap import State, lock, patched, structure
from ._types import Fn, Posterior


def local_layers(module: nn.Module) -> dict[str, nn.Module]:
    r"""Returns the layers of `module` that :func:`local_call` samples locally, by name.

    They are the instances of :class:`torch.nn.Linear`, :class:`zuko.nn.Linear` and
    :class:`torch.nn.Conv1d` / `Conv2d` / `Conv3d`, and of their subclasses that keep
    their `forward`, such as zuko's `MaskedLinear`.

    Arguments:
        module: A module.

    Returns:
        The layers, keyed by their names in :meth:`torch.nn.Module.named_modules`.
    """

    check_module("local_layers", module)

    return {name: m for name, m in module.named_modules() if is_local(m)}


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


class _StaleShapes(Passthrough):
    r"""The layer calls of a vectorized pass differ from those its noise was drawn for."""


class _Tape(Noise):
    r"""The noise of :func:`local_call`: one flat draw per sample, laid out by the layer
    calls that a shape-finding pass recorded, plus one draw shared by all samples."""

    def __init__(self, calls: list[tuple[str, Size, Size]] | None = None) -> None:
        self.recording = calls is None
        self.calls: list[tuple[str, Size, Size]] = [] if calls is None else calls
        self.slab: Tensor | None = None
        self.common: Tensor | None = None
        self.pos = self.shared_pos = self.index = 0

    def start(self, name: str, x: Tensor, y: Tensor) -> bool:
        if self.recording:
            self.calls.append((name, x.shape, y.shape))
            return False
        if self.index >= len(self.calls) or self.calls[self.index] != (name, x.shape, y.shape):
            raise _StaleShapes(name)
        self.index += 1
        return True

    def begin(self, slab: Tensor, common: Tensor) -> None:
        self.slab, self.common = slab, common
        self.pos = self.shared_pos = self.index = 0

    def normal(self, name: str, shape: Size, like: Tensor) -> Tensor:
        size = shape.numel()
        e = self.slab[self.pos : self.pos + size]
        self.pos += size
        return e.view(shape)

    def shared(self, name: str, shape: Size, like: Tensor) -> Tensor:
        size = shape.numel()
        e = self.common[self.shared_pos : self.shared_pos + size]
        self.shared_pos += size
        return e.view(shape)


def _sizes(
    calls: list[tuple[str, Size, Size]], stats: dict[str, Moments], flipout: bool
) -> tuple[int, int]:
    r"""Returns how many numbers per sample, and shared, the recorded calls draw."""

    per, shared = 0, 0
    for name, x, y in calls:
        m = stats[name]
        if not flipout:
            per += y.numel()
            continue
        if m.w_std is not None:
            shared += m.w_std.numel()
            per += x.numel() + y.numel()
        if m.b_std is not None:
            per += m.b_std.numel()
    return per, shared


# Recorded layer calls, per module and call signature (a few entries each).
_CALLS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, list]] = weakref.WeakKeyDictionary()


def _signature(
    fn: Any, args: tuple, dims: tuple, flipout: bool, layers: dict[str, nn.Module], training: bool
) -> tuple:
    r"""What the recorded layer calls depend on: `fn`, the argument shapes, the stochastic
    layers (which the posterior decides) and the mode."""

    parts = []
    for a, d in zip(args, dims, strict=True):
        if isinstance(a, Tensor):
            shape = tuple(a.shape[1:] if d == 0 else a.shape)
            parts.append((shape, a.dtype, a.device))
        else:
            parts.append(id(a))
    return (id(fn), flipout, tuple(layers), training, tuple(parts))


def local_call(
    module: nn.Module,
    posterior: Posterior,
    n: int,
    *args: Any,
    fn: Fn | None = None,
    generator: torch.Generator | None = None,
    flipout: bool = False,
    in_dims: Sequence[int | None] | None = None,
    chunk_size: int | None = None,
    fallback: bool = True,
    randomness: str | None = None,
    vectorized: bool = True,
    max_memory: int | None = None,
) -> Any:
    r"""Runs `fn(module, *args)` for `n` posterior samples with noise on the outputs of
    the linear and convolutional layers rather than on their weights.

    The Bayesian layers (see :func:`local_layers`) are temporarily replaced by stochastic
    ones and `fn` runs as in :func:`bayesflow.vmap_call`: every other module sees exactly
    the per-sample shapes it sees there, and no weight sample is ever materialized. Any
    other Bayesian parameter (of a normalization layer, a recurrent layer, ...) is
    sampled whole, as in :func:`bayesflow.vmap_call`.

    With the local reparameterization trick, a layer :math:`y = x W^T + b` (or a
    convolution :math:`y = W * x + b`) returns

    .. math:: y = x \mu_W^T + \mu_b + \sqrt{x^2 (\sigma_W^2)^T + \sigma_b^2} \odot \epsilon,

    with fresh :math:`\epsilon \sim \mathcal{N}(0, I)` for every sample and example. With
    Flipout, one perturbation :math:`\Delta W = \sigma_W \odot E` is shared and
    decorrelated by random signs :math:`s, r \in \{\pm 1\}`,

    .. math:: y = x \mu_W^T + \left( (x \odot s) \Delta W^T \right) \odot r + b,

    with the bias sampled once per sample. Either way each output has exactly the law of
    a full weight sample, and gradients reach the posterior's means and log-variances;
    what changes is the correlation between examples (independent weights per example),
    which makes the gradient estimates of an expected log-likelihood less noisy. A module
    that mixes examples after a Bayesian layer (batch statistics of a train-mode
    BatchNorm, a softmax over the batch) sees that decorrelated noise too, so its outputs
    differ in law from full weight sampling. A layer called twice in one `fn` draws fresh
    noise each time.

    All the noise is drawn before the vectorized pass, from `generator`, laid out by the
    layer calls of one shape-finding pass of `fn` (without gradients, buffers restored;
    remembered for the same `fn` and argument shapes). The same generator state gives the
    same numbers vectorized or not (`vectorized=False`, the loop oracle), and whatever
    `chunk_size`.

    Example:
        >>> net = zuko.nn.MLP(3, 5)
        >>> q = bayesflow.init(net, init_logvar=-6.0)
        >>> bayesflow.local_call(net, q, 8, torch.randn(16, 3)).shape
        torch.Size([8, 16, 5])

    Arguments:
        module: A module.
        posterior: A posterior over parameters of `module`, e.g. from
            :func:`bayesflow.init` or :attr:`BayesianModel.posterior` (with
            `module = bnet.base`).
        n: The number of samples.
        args: The arguments of `fn`, shared by every sample unless `in_dims` says otherwise.
        fn: What to compute, `fn(module, *args)`; `module(*args)` if :py:`None`. It must
            return tensors (or tuples, lists or dicts of them).
        generator: The source of all the noise; the global one if :py:`None`.
        flipout: Whether to use Flipout instead of the local reparameterization trick.
        in_dims, chunk_size, fallback, randomness, max_memory: As in
            :func:`bayesflow.vmap_call`.
        vectorized: Whether to run vectorized or, the oracle, in a loop.

    Returns:
        The outputs of `fn`, with a leading dim of size `n`, differentiable with respect
        to `posterior`.

    Raises:
        ValueError: If `posterior` has no parameter of a linear or convolutional layer, or
            if `fn` does not call every Bayesian layer (a module that reads a layer's
            weight directly, as :class:`torch.nn.MultiheadAttention` does, would see the
            mean: use :func:`bayesflow.vmap_call` for those).

    References:
        | Variational Dropout and the Local Reparameterization Trick (Kingma et al., 2015)
        | https://arxiv.org/abs/1506.02557

        | Flipout: Efficient Pseudo-Independent Weight Perturbations on Mini-Batches (Wen et al., 2018)
        | https://arxiv.org/abs/1803.04386
    """  # noqa: E501

    where = "local_call"
    check_module(where, module)
    check_not_bridge(where, module)
    check_posterior(where, posterior)
    n = check_n(where, n)
    check_callable(where, "fn", fn)
    check_generator(where, generator)
    check_bool(where, "flipout", flipout)
    check_bool(where, "vectorized", vectorized)
    _posterior.check_matches(where, module, posterior)
    dims = check_in_dims(where, args, in_dims, n)

    layers: dict[str, nn.Module] = {}
    covered: set[str] = set()
    for name, layer in module.named_modules():
        if not is_local(layer):
            continue
        names = {_prefix(name) + "weight", _prefix(name) + "bias"} & posterior.mean.keys()
        if names:
            layers[name] = layer
            covered |= names
    if not layers:
        raise ValueError(
            f"{where}: expected the posterior to hold the weight or bias of a linear or "
            f"convolutional layer of {type(module).__name__}, got none; use "
            "bayesflow.vmap_call"
        )

    def pair(name: str) -> tuple[Tensor, Tensor] | None:
        return (posterior.mean[name], posterior.logvar[name]) if name in covered else None

    stats = {
        name: moments(layer, pair(_prefix(name) + "weight"), pair(_prefix(name) + "bias"))
        for name, layer in layers.items()
    }
    others = [name for name in posterior.mean if name not in covered]
    fn = (lambda m, *a: m(*a)) if fn is None else fn

    with lock(module):
        st = structure(module)
        for attempt in range(2):
            try:
                return _local_call(
                    where,
                    module,
                    st,
                    posterior,
                    others,
                    layers,
                    stats,
                    n,
                    args,
                    dims,
                    fn,
                    generator,
                    flipout,
                    chunk_size,
                    fallback,
                    randomness,
                    vectorized,
                    max_memory,
                    fresh=attempt > 0,
                )
            except _StaleShapes:
                if attempt > 0:
                    raise RuntimeError(
                        f"{where}: expected the layers to be called with the same shapes "
                        "as in the shape-finding pass, got others twice"
                    ) from None


def _local_call(
    where: str,
    module: nn.Module,
    st: Any,
    posterior: Posterior,
    others: list[str],
    layers: dict[str, nn.Module],
    stats: dict[str, Moments],
    n: int,
    args: tuple,
    dims: tuple,
    fn: Fn,
    generator: torch.Generator | None,
    flipout: bool,
    chunk_size: int | None,
    fallback: bool,
    randomness: str | None,
    vectorized: bool,
    max_memory: int | None,
    fresh: bool,
) -> Any:
    cache = _CALLS.setdefault(module, {})
    key = _signature(fn, args, dims, flipout, layers, module.training)
    calls = None if fresh else cache.get(key)

    if calls is None:
        # The shape-finding pass: one unbatched call, no gradients, buffers restored, with
        # the layers as the vectorized pass sees them (without gradients, torch's fused
        # attention would skip the layers that the reference path calls).
        tape = _Tape()
        forwards = [
            (m, "forward", local_forward(k, m, stats[k], tape, flipout)) for k, m in layers.items()
        ]
        state = State(st)
        try:
            with torch.no_grad(), _torch_layers.vectorized(st, module), patched(forwards):
                fn(module, *(a if d is None else a[0] for a, d in zip(args, dims, strict=True)))
        finally:
            state.restore()
        calls = tape.calls
        if len(cache) >= 8:
            cache.pop(next(iter(cache)))
        cache[key] = calls

    skipped = [name for name in layers if all(c[0] != name for c in calls)]
    if skipped:
        # A module that reads a layer's weight without calling the layer (as
        # nn.MultiheadAttention does with `out_proj`) would silently see the mean.
        raise ValueError(
            f"{where}: expected fn to call every Bayesian layer of {type(module).__name__}, "
            f"got {skipped} never called; use bayesflow.vmap_call"
        )

    per, shared = _sizes(calls, stats, flipout)
    like = next(iter(posterior.mean.values()))
    # All the noise in two draws: the per-sample slab first, then the shared perturbations.
    slab = torch.randn(n, per, generator=generator, dtype=like.dtype, device=like.device)
    common = torch.randn(shared, generator=generator, dtype=like.dtype, device=like.device)
    params = (
        _posterior.sample(
            where,
            Posterior(
                {k: posterior.mean[k] for k in others}, {k: posterior.logvar[k] for k in others}
            ),
            n,
            generator,
        )
        if others
        else {}
    )

    tape = _Tape(calls)
    forwards = [
        (m, "forward", local_forward(k, m, stats[k], tape, flipout)) for k, m in layers.items()
    ]

    def local_fn(m: nn.Module, s: Tensor, *a: Any) -> Any:
        tape.begin(s, common)
        return fn(m, *a)

    with patched(forwards):
        return run(
            where,
            module,
            params,
            (slab, *args),
            fn=local_fn,
            chunk_size=chunk_size,
            fallback=fallback,
            in_dims=(0, *dims),
            randomness=randomness,
            vectorized=vectorized,
            n=n,
            max_memory=max_memory,
        )
