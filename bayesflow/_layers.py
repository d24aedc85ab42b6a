r"""The layers with a local reparameterization: what they are, where their noise comes
from, and their stochastic forward, planned once for :func:`bayesflow.local_call` and
:meth:`bayesflow.BayesianModel.reparameterize`."""

from __future__ import annotations

__all__ = [
    "Absent",
    "Cached",
    "Layout",
    "LocalPlan",
    "Moments",
    "Noise",
    "ReadElsewhere",
    "Recorder",
    "StaleShapes",
    "Tape",
    "expire",
    "is_conv",
    "is_linear",
    "is_local",
    "linear",
    "mask_of",
    "moments",
]

import contextlib
import copy
import functools
import inspect
import math
import sys

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch import Size, Tensor
from torch.utils._pytree import tree_leaves, tree_map

from ._caches import register
from ._compat import (
    ConvNd,
    ValueReads,
    autocast_inputs,
    drawing_level,
    flat_cat,
    func_level,
    in_func_transform,
    is_compiling,
    is_metadata,
    outside_func_transforms,
)
from ._errors import Passthrough
from ._numerics import spread
from ._swap import has_own_forward, ours

# Below this many numbers in all, a local call computes its layers' spreads in one node
# (the per-operation cost of a node per tensor outweighs one copy of the log-variances).
_SMALL = 1 << 16

_CONV_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}


def is_linear(layer: nn.Module) -> bool:
    r"""Returns whether `layer` computes :math:`y = x (A \odot W)^T + b` in its `forward`.

    That is an instance of :class:`torch.nn.Linear` or :class:`zuko.nn.Linear`, or of a
    subclass, such as zuko's `MaskedLinear` (whose mask is :math:`A`), that keeps one of
    their `forward` methods: a subclass with a `forward` of its own may compute anything,
    and so may an instance whose `forward` was set on it (a monkeypatch, accelerate's
    hooks).

    Importing zuko changes torch.distributions defaults, so bayesflow never imports it
    itself: a module that holds zuko layers was built after zuko was imported.
    """

    if has_own_forward(layer):
        return False  # its instance's forward runs, whatever it computes
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

    return (
        isinstance(layer, ConvNd)
        and type(layer).forward in _CONV_FORWARDS
        and not has_own_forward(layer)
    )


def is_local(layer: nn.Module) -> bool:
    r"""Returns whether the local reparameterization trick applies to `layer`."""

    return is_linear(layer) or is_conv(layer)


def _plain(layer: nn.Module) -> bool:
    r"""Whether the layer's weight and bias are its own Parameters. A weight computed from
    others (a parametrization, hook-based weight norm) would be read once, as the module's
    own, whatever the samples of the tensors it is computed from: such a layer is sampled
    whole."""

    own = layer._parameters
    bias = getattr(layer, "bias", None)
    return own.get("weight") is not None and (bias is None or own.get("bias") is bias)


def mask_of(layer: nn.Module) -> Tensor | None:
    r"""Returns the mask of a zuko `MaskedLinear` layer, or :py:`None`."""

    zuko_nn = sys.modules.get("zuko.nn")
    if zuko_nn is not None and isinstance(layer, zuko_nn.MaskedLinear):
        return layer.mask
    return None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    r"""Returns :math:`x W^T + b`, for a weight of shape `(out, in)` or, as in
    :class:`zuko.nn.Linear`, a stack `(S, out, in)` applied to inputs `(*, S, in)`."""

    # Under vmap, torch's rules for a batched input run below autocast: its casts first.
    x, weight, bias = autocast_inputs(x.device.type, x, weight, bias)
    if weight.dim() == 2:
        return F.linear(x, weight, bias)

    y = (weight @ x.unsqueeze(-1)).squeeze(-1)
    return y if bias is None else y + bias


def _apply(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if is_conv(layer):
        # Under vmap, torch's convolution rule runs below autocast: its casts first.
        x, weight, bias = autocast_inputs(x.device.type, x, weight, bias)
        return layer._conv_forward(x, weight, bias)
    return linear(x, weight, bias)


@dataclass
class Moments:
    r"""The Gaussian of a layer's weight and bias as an estimator reads it: the means, and
    the variances (the local trick) or the standard deviations (Flipout); a spread is
    :py:`None` where the tensor is not Bayesian (its mean is then its value)."""

    w_mean: Tensor
    w_spread: Tensor | None
    b_mean: Tensor | None
    b_spread: Tensor | None


def moments(
    layer: nn.Module,
    w: tuple[Tensor, Tensor] | None,
    b: tuple[Tensor, Tensor] | None,
) -> Moments:
    r"""Returns the moments of a layer from the `(mean, spread)` of its weight and bias,
    or :py:`None` for a deterministic one (the layer's own tensor is used)."""

    mask = mask_of(layer)
    w_mean, w_spread = (layer.weight, None) if w is None else w
    if mask is not None:  # a 0/1 mask: (A w)^2 = A w^2
        w_mean = mask * w_mean
        w_spread = None if w_spread is None else mask * w_spread
    b_mean, b_spread = (layer.bias, None) if b is None else b
    return Moments(w_mean, w_spread, b_mean, b_spread)


class StaleShapes(Passthrough):
    r"""The layer calls of a vectorized pass differ from those its noise was drawn for."""


class ReadElsewhere(StaleShapes):
    r"""A local layer's own tensor (an :class:`Absent` stand-in) was read outside the
    layer's call: the layer must be sampled whole. Its arguments: the layer, and the
    stand-in (whose call, of nested ones, handles it)."""


class Absent(nn.Parameter):
    r"""What a local call puts in place of a local layer's Bayesian tensors (the module's
    own values) for its duration: any operation that reads its values raises
    :class:`ReadElsewhere`, naming the layer.

    The layer's stochastic forward reads the posterior, never these; a read elsewhere
    (a tied head, a penalty in `fn`) was unseen by the shape-finding pass, whose layout
    is then stale (a module flag switched since), and the call samples the layer whole.
    Shape, dtype, device and the like stay readable, and it is a parameter where the
    module's own is. Its values are NaN, so that a read that bypasses torch functions
    (TorchScript, DLPack) gives NaN rather than the module's own weight. Kept past the
    call (by a module that stores `self.weight` somewhere), it stands for the module's
    own tensor.
    """

    owner: str
    original: Tensor
    live: bool

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not kwargs and len(args) == 1 and type(args[0]) is Absent and is_metadata(func):
            return func(args[0].original)  # `weight.dim()` in a layer's call: the fast path
        kwargs = kwargs or {}
        live = [a for a in tree_leaves((args, kwargs)) if isinstance(a, Absent) and a.live]
        if live and not is_metadata(func):
            raise ReadElsewhere(live[0].owner, live[0])
        # Metadata (strides and contiguity included), and anything after the call: the
        # module's own tensors.
        own = tree_map(lambda a: a.original if isinstance(a, Absent) else a, (args, kwargs))
        return func(*own[0], **own[1])

    def __deepcopy__(self, memo: dict) -> Any:
        if self.live:
            raise ReadElsewhere(self.owner, self)
        return copy.deepcopy(self.original, memo)


# NaN of each shape, dtype and device (views of one number), behind the stand-ins: making
# one costs 5x the rest of a stand-in.
_NANS: dict[tuple[Size, torch.dtype, torch.device], Tensor] = {}
register(_NANS.clear)


def absent(t: Tensor, owner: str) -> Absent:
    r"""Returns a stand-in for `t` (same shape, dtype, device and `requires_grad`) whose
    values the layer `owner` alone may read, through the posterior; `expire` it after the
    call."""

    # Outside any torch function mode (a recorder's) and transform-safe (no requires_grad_).
    with torch._C.DisableTorchFunction():
        key = (t.shape, t.dtype, t.device)
        nan = _NANS.get(key)
        if nan is None or nan._version:  # written through an alias: made again
            if len(_NANS) > 4096:
                _NANS.clear()
            with torch.inference_mode(False):  # not an inference tensor, whatever the mode
                nan = torch.full((), math.nan, dtype=t.dtype, device=t.device).expand(t.shape)
            _NANS[key] = nan
        a = Tensor._make_subclass(Absent, nan, t.requires_grad)
    a.owner, a.original, a.live = owner, t, True
    return a


def expire(stand_ins: dict[str, Absent]) -> None:
    r"""Makes the stand-ins of a finished call stand for the module's own tensors."""

    for a in stand_ins.values():
        a.live = False


class Noise:
    r"""Where a stochastic layer gets its noise.

    :meth:`enter` is told of every call of a layer, and whether the layer samples its
    outputs for it (else its weight is a whole sample); :meth:`normal` and :meth:`signs`
    are then asked for what it draws.
    """

    def enter(self, name: str, local: bool) -> None:
        pass

    def leave(self, name: str) -> None:
        pass

    def normal(self, name: str, shape: Size, like: Tensor) -> Tensor:
        raise NotImplementedError

    def signs(self, name: str, shape: Size, like: Tensor) -> Tensor:
        e = self.normal(name, shape, like)
        return torch.where(e >= 0, 1.0, -1.0).to(e.dtype)


class Recorder(Noise):
    r"""The noise of a shape-finding pass: records every call and every draw, and
    returns zeros (the layers return their mean outputs); as a torch function mode,
    records the layers whose Bayesian tensors `watched` (by id) an operation outside the
    layer's own call reads."""

    def __init__(self, watched: dict[int, str] | None = None) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.draws: list[tuple[str, Size]] = []
        self.watched = watched or {}
        self.inside: list[str] = []
        self.read_elsewhere: set[str] = set()
        # The layers `fn` calls under a torch.func transform of its own (an inner vmap
        # over positions, a derivative with respect to the input): the tape's noise is not
        # batched over it, and an input derivative of the local output is not the weight's.
        self.transformed: set[str] = set()
        self.level = func_level()

    def enter(self, name: str, local: bool) -> None:
        self.calls.append((name, local))
        self.inside.append(name)
        if func_level() != self.level:
            self.transformed.add(name)

    def leave(self, name: str) -> None:
        self.inside.pop()

    def reads(self) -> Any:
        r"""Returns a context in which the reads of the watched tensors are recorded."""

        return ValueReads(self._seen) if self.watched else contextlib.nullcontext()

    def _seen(self, tensors: list[Tensor]) -> None:
        compiling = is_compiling()
        for t in tensors:
            if compiling and not isinstance(t, nn.Parameter):
                continue  # `id` of a traced tensor guards on it: a recompile at every call
            owner = self.watched.get(id(t))
            if owner is not None and (not self.inside or self.inside[-1] != owner):
                self.read_elsewhere.add(owner)

    def normal(self, name: str, shape: Size, like: Tensor) -> Tensor:
        self.draws.append((name, shape))
        return torch.zeros(shape, dtype=like.dtype, device=like.device)


@dataclass(frozen=True)
class Layout:
    r"""What a local call draws, from a shape-finding pass: the layers sampled locally,
    the draws they make, in order, and their total size per sample."""

    local: tuple[str, ...]
    whole: tuple[str, ...]
    draws: tuple[tuple[str, Size], ...]
    size: int
    # The layers sampled whole only because `fn` called them more than once: a remembered
    # layout counts their calls (a module flag may have made it once since).
    counted: tuple[str, ...] = ()


class Tape(Noise):
    r"""The noise of a local call: one flat draw per sample (set by :meth:`begin`), laid out
    by the draws of a :class:`Layout`, checked one by one."""

    def __init__(self, layout: Layout, check: bool = False) -> None:
        self.draws = layout.draws
        self.check = check
        self.counted = layout.counted if check else ()
        self.calls: dict[str, int] = {}
        self.slab: Tensor | None = None
        self.pos = self.index = 0
        self.level: int | None = None

    def begin(self, slab: Tensor) -> None:
        self.slab = slab
        self.pos = self.index = 0
        self.calls = {}
        self.level = func_level()

    def count(self, name: str, local: bool) -> None:
        r"""Counts a call of a layer of `counted` (sampled whole): one it could not
        sample locally counts as two."""

        calls = 1 if local and func_level() == self.level else 2
        self.calls[name] = self.calls.get(name, 0) + calls

    def enter(self, name: str, local: bool) -> None:
        # A layer under a torch.func transform that `fn` opened (an inner vmap over
        # positions, a derivative with respect to the input) with the shapes the layout
        # recorded outside one: the layout is stale, and a fresh one samples it whole.
        if not local or func_level() != self.level:
            raise StaleShapes(name)

    def done(self) -> None:
        r"""With `check`, raises :class:`StaleShapes` unless the pass took every draw of the
        layout (a layout remembered for another `fn` of the same key, which called more
        layers), and called each layer of `counted` again more than once (else a fresh
        layout samples it locally, as a call without a remembered one would)."""

        if not self.check:
            return
        if self.index != len(self.draws) or any(self.calls.get(k) == 1 for k in self.counted):
            raise StaleShapes(None)

    def normal(self, name: str, shape: Size, like: Tensor) -> Tensor:
        if self.index >= len(self.draws) or self.draws[self.index] != (name, shape):
            raise StaleShapes(name)
        self.index += 1
        size = shape.numel()
        e = self.slab[self.pos : self.pos + size]
        self.pos += size
        # One slab in the posterior's widest dtype: each layer takes it in its own.
        return e.view(shape).to(dtype=like.dtype, device=like.device)


class Cached(Noise):
    r"""zuko's noise for the local trick: drawn on first use, then the same for a layer
    and an output shape until the end of the `reparameterize()` block."""

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator
        self.cache: dict[tuple[str, Size], Tensor] = {}

    def normal(self, name: str, shape: Size, like: Tensor) -> Tensor:
        key = (name, shape)
        if key not in self.cache:
            # Under a stand-in's vmap (CNF's exact trace), drawn below it: shared by the
            # columns, as zuko's loop over them shares it.
            shared, level = drawing_level()
            with outside_func_transforms(level) if shared else contextlib.nullcontext():
                self.cache[key] = torch.randn(
                    shape, generator=self.generator, dtype=like.dtype, device=like.device
                )
        return self.cache[key]


def _bias_view(b: Tensor, layer: nn.Module, y: Tensor) -> Tensor:
    r"""Returns a bias shaped to broadcast against an output `y` of `layer`."""

    if is_conv(layer):  # (C,) against (*, C, *spatial)
        return b.view(*b.shape, *(1,) * (layer.weight.dim() - 2))
    return b


def _local(name: str, layer: nn.Module, x: Tensor, m: Moments, noise: Noise) -> Tensor:
    mean = _apply(layer, x, m.w_mean, m.b_mean)
    if m.w_spread is None:
        # (In the output's dtype, that autocast gives the layer.)
        var = _bias_view(m.b_spread.to(mean.dtype), layer, mean).expand_as(mean)
    else:
        var = _apply(layer, x.square(), m.w_spread, m.b_spread)
    if m.b_spread is None:
        # The clamp keeps the gradient of the square root finite where the variance
        # vanishes (an all-zero input); a Bayesian bias keeps it positive anyway. At the
        # least subnormal number: float16's least normal one, 6.1e-5, is a variance a
        # layer may well have (it held such variances up, and took their gradient).
        info = torch.finfo(var.dtype)
        var = var.clamp_min(info.tiny * info.eps)

    return torch.addcmul(mean, var.sqrt(), noise.normal(name, mean.shape, mean))


def _channels(layer: nn.Module, t: Tensor) -> Size:
    r"""The shape of a convolution's input or output without its spatial dims."""

    return t.shape[: t.dim() - (layer.weight.dim() - 2)]


def _flipout(name: str, layer: nn.Module, x: Tensor, m: Moments, noise: Noise) -> Tensor:
    y = _apply(layer, x, m.w_mean, m.b_mean)

    if m.w_spread is not None:
        # A perturbation dW of this sample, decorrelated between examples by random signs:
        # W = mu + dW * (r s^T) has the law of the weight for every example. A
        # convolution's signs are per channel, shared by all positions of an example.
        dw = m.w_spread * noise.normal(name, m.w_spread.shape, x)
        if is_conv(layer):
            spatial = (1,) * (layer.weight.dim() - 2)
            s = noise.signs(name, _channels(layer, x), x)
            r = noise.signs(name, _channels(layer, y), y)
            s, r = s.view(*s.shape, *spatial), r.view(*r.shape, *spatial)
        else:
            s = noise.signs(name, x.shape, x)
            r = noise.signs(name, y.shape, y)
        y = y + _apply(layer, x * s, dw, None) * r
    if m.b_spread is not None:
        # (In the output's dtype, that autocast gives the layer, as the term above.)
        db = (m.b_spread * noise.normal(name, m.b_spread.shape, y)).to(y.dtype)
        y = y + _bias_view(db, layer, y)

    return y


def _bound_input(original: Any, layer: nn.Module, x: Tensor | None, kwargs: dict) -> Tensor:
    r"""Returns the input of a call of `layer` as its own forward `original` binds it (its
    errors, for a call that forward refuses)."""

    args = () if x is None else (x,)
    try:
        bound = inspect.signature(original).bind(layer, *args, **kwargs)
    except TypeError:
        original(layer, *args, **kwargs)  # raises its own error, naming the argument
        raise
    return list(bound.arguments.values())[1]


class LocalPlan:
    r"""The local reparameterization trick or Flipout for the layers of a module whose
    weight or bias a posterior holds (see :func:`is_local`), written once for
    :func:`bayesflow.local_call` and :meth:`bayesflow.BayesianModel.reparameterize`.

    An estimator is exact for a call when every example's outputs have the joint law
    of a weight sample: the local trick for a linear layer on inputs `(B, in)` (one
    leading dim: the examples) and for a stack `(S, out, in)` on `(B, S, in)` or
    `(B, 1, in)` (a weight per position), Flipout for those and for convolutions (signs
    per channel, shared by the positions of an example). Elsewhere (a convolution under
    the local trick, a linear layer on `(B, T, in)` or a stack of one broadcast over its
    `T` positions, whose weight is shared by the positions of an example) the layer's
    weight is sampled whole, unless `per_position` asks for the estimator anyway, with
    independent noise at every position: an approximation whose outputs have the right
    law one by one, but whose sums over positions (a pooling, a flatten and a linear head)
    have too small a variance. A local call (:meth:`layout`)
    also samples whole, whatever `per_position`, a layer whose weight or bias is shared
    with another module (tied), one called more than once by `fn`, and one whose Bayesian
    tensors `fn` reads outside the layer's call: their outputs share one weight.

    Arguments:
        module: The module.
        posterior: The posterior over parameters of `module`.
        flipout: Whether to use Flipout rather than the local trick.
        per_position: Whether inexact calls take the estimator anyway.
        lazy: Whether to read the moments from `posterior` at every call of a layer (the
            bridge, whose posterior is trained between calls) rather than once.
    """

    def __init__(
        self,
        module: nn.Module,
        posterior: Any,
        flipout: bool = False,
        per_position: bool = False,
        lazy: bool = False,
    ) -> None:
        self.flipout, self.per_position, self.posterior = flipout, per_position, posterior
        self.layers: dict[str, nn.Module] = {}
        self.covered: dict[str, tuple[str, ...]] = {}
        self.unplain: list[str] = []  # Bayesian layers sampled whole for their weight
        for name, layer in module.named_modules():
            if not is_local(layer):
                continue
            prefix = f"{name}." if name else ""
            if not _plain(layer):
                if any(k.startswith(prefix) for k in posterior.mean):
                    self.unplain.append(name)
                continue
            names = tuple(n for n in (prefix + "weight", prefix + "bias") if n in posterior.mean)
            if names:
                self.layers[name] = layer
                self.covered[name] = names

        self.module = module
        # What the layout recorded depends on which of their tensors the posterior holds.
        self.key = (flipout, per_position, tuple(self.covered.items()))
        self._moments = None
        if not lazy:
            spreads = self._spreads([n for names in self.covered.values() for n in names])
            self._moments = {name: self._read(name, spreads) for name in self.layers}

    @functools.cached_property
    def tied(self) -> set[str]:
        r"""The layers whose weight or bias another module holds too (read when a layout is
        made, not at every call)."""

        places: dict[int, int] = {}
        for _, p in self.module.named_parameters(remove_duplicate=False):
            places[id(p)] = places.get(id(p), 0) + 1
        return {
            name
            for name, layer in self.layers.items()
            for t in (layer.weight, getattr(layer, "bias", None))
            if t is not None and places.get(id(t), 0) > 1
        }

    @functools.cached_property
    def watched(self) -> dict[int, str]:
        r"""The module's own Bayesian tensors of each layer, by id, for the shape-finding
        pass."""

        own = dict(self.module.named_parameters())
        return {
            id(own[n]): name for name, names in self.covered.items() for n in names if n in own
        }

    def _spreads(self, names: list[str]) -> dict[str, Tensor]:
        r"""Returns the variances (the local trick) or standard deviations (Flipout) of the
        tensors `names`: small ones of one dtype and device together, in one node (not
        inside torch.compile or a torch.func transform, where no node is made)."""

        power = 1 if self.flipout else 2
        logvars = [self.posterior.logvar[n] for n in names]
        like = logvars[0] if logvars else None
        if (
            len(logvars) < 2
            or sum(t.numel() for t in logvars) > _SMALL
            or any(t.dtype != like.dtype or t.device != like.device for t in logvars)
            or is_compiling()
            or in_func_transform()
        ):
            return {n: spread(t, power) for n, t in zip(names, logvars, strict=True)}
        flat = spread(flat_cat(logvars), power)
        pieces = flat.split([t.numel() for t in logvars])
        return {n: p.view(t.shape) for n, p, t in zip(names, pieces, logvars, strict=True)}

    def _read(self, name: str, spreads: dict[str, Tensor] | None = None) -> Moments:
        q, prefix = self.posterior, f"{name}." if name else ""
        if spreads is None:
            spreads = self._spreads(
                [n for n in (prefix + "weight", prefix + "bias") if n in q.mean]
            )

        def pair(key: str) -> tuple[Tensor, Tensor] | None:
            return (q.mean[key], spreads[key]) if key in q.mean else None

        return moments(self.layers[name], pair(prefix + "weight"), pair(prefix + "bias"))

    def exact(self, layer: nn.Module, x: Tensor, stack: int | None) -> bool:
        r"""Whether the estimator gives every example of input `x` the law of a weight sample
        (`stack`: the size of a stacked weight's leading dim, :py:`None` for a weight
        `(out, in)`)."""

        if is_conv(layer):
            return self.flipout
        if x.dim() <= 2:
            return True
        # A stack `(S, out, in)` on `(B, T, in)`: exact where every position has a weight
        # of its own (T = S, or T = 1 broadcast against it), not where a stack of one is
        # broadcast over the T positions, which then share it.
        return stack is not None and x.dim() == 3 and x.shape[-2] <= stack

    def forwards(self, noise: Noise, names: Any) -> list[tuple[nn.Module, str, Any]]:
        r"""Returns the changes that give the layers `names` their stochastic forward."""

        return [(self.layers[k], "forward", ours(self._forward(k, noise))) for k in names]

    def counters(self, tape: Tape, names: Any) -> list[tuple[nn.Module, str, Any]]:
        r"""Returns the changes that count the calls of the layers `names`, sampled whole,
        on `tape` (their own forward, the weight sampled whole, runs)."""

        return [(self.layers[k], "forward", ours(self._counting(k, tape))) for k in names]

    def _local_for(self, layer: nn.Module) -> Callable[[Tensor], bool]:
        r"""Returns whether a call of `layer` on an input samples its outputs (else its
        weight is sampled whole): `per_position`, or the estimator exact for it."""

        stack = layer.weight.shape[0] if layer.weight.dim() == 3 else None  # read once
        return lambda x: self.per_position or self.exact(layer, x, stack)

    def _counting(self, name: str, tape: Tape) -> Any:
        layer = self.layers[name]
        original = type(layer).forward
        local_for = self._local_for(layer)

        def count(x: Tensor) -> None:
            tape.count(name, local_for(x))

        def forward(x: Tensor | None = None, /, **kwargs: Any) -> Tensor:
            if kwargs or x is None:
                x = _bound_input(original, layer, x, kwargs)
            count(x)
            return original(layer, x)

        # A vectorized pass's own forward of the layer (a batched linear) counts too.
        forward._bayesflow_count = count  # type: ignore[attr-defined]
        return forward

    def _forward(self, name: str, noise: Noise) -> Any:
        layer = self.layers[name]
        step = _flipout if self.flipout else _local
        original = type(layer).forward
        local_for = self._local_for(layer)

        def forward(x: Tensor | None = None, /, **kwargs: Any) -> Tensor:
            if kwargs or x is None:  # the input by keyword (`input=` for torch's layers)
                x = _bound_input(original, layer, x, kwargs)
            local = local_for(x)
            noise.enter(name, local)
            try:
                if not local:
                    return original(layer, x)  # the weight sampled whole
                m = self._read(name) if self._moments is None else self._moments[name]
                return step(name, layer, x, m, noise)
            finally:
                noise.leave(name)

        return forward

    def layout(
        self,
        where: str,
        module: nn.Module,
        recorder: Recorder,
        whole: frozenset[str] = frozenset(),
    ) -> Layout:
        r"""Returns the layout of a shape-finding pass's draws, the layers `whole` sampled
        whole; raises if `fn` skipped a layer."""

        called = {name for name, _ in recorder.calls}
        skipped = [name for name in self.layers if name not in called]
        if skipped:
            # A module that reads a layer's weight without calling the layer (as
            # nn.MultiheadAttention does with `out_proj`) would silently see the mean.
            raise ValueError(
                f"{where}: expected fn to call every Bayesian layer of "
                f"{type(module).__name__}, got {skipped} never called; use "
                "bayesflow.vmap_call"
            )
        # Sampled whole: the layers an estimator is inexact for, and those whose weight
        # several calls or places share (their outputs must share one sample).
        inexact = {name for name, local in recorder.calls if not local}
        counts: dict[str, int] = {}
        for name, _ in recorder.calls:
            counts[name] = counts.get(name, 0) + 1
        again = {k for k, c in counts.items() if c > 1}
        other = self.tied | recorder.read_elsewhere | recorder.transformed | whole | inexact
        whole = tuple(k for k in self.layers if k in again or k in other)
        local = tuple(k for k in self.layers if k not in whole)
        draws = tuple(d for d in recorder.draws if d[0] in local)
        counted = tuple(k for k in whole if k not in other)
        return Layout(local, whole, draws, sum(shape.numel() for _, shape in draws), counted)

    def absent(self, layout: Layout) -> dict[str, Absent]:
        r"""Returns the stand-ins of the local layers' Bayesian tensors of the module
        (:class:`Absent`), by name, for the duration of a local call; none inside
        torch.compile, which does not trace them."""

        if is_compiling():
            return {}
        stand_ins = {}
        for k in layout.local:
            own = self.layers[k]._parameters
            for n in self.covered[k]:
                t = own.get(n.rpartition(".")[2])
                if t is not None:
                    stand_ins[n] = absent(t, k)
        return stand_ins

    def sampled(self, posterior: Any, layout: Layout) -> Any:
        r"""Returns the part of `posterior` a local call samples whole: every parameter
        outside the local layers."""

        local = {n for k in layout.local for n in self.covered[k]}
        names = [n for n in posterior.mean if n not in local]
        return type(posterior)(
            {n: posterior.mean[n] for n in names}, {n: posterior.logvar[n] for n in names}
        )
