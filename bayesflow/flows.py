r"""Sampling Bayesian normalizing flows on the vectorized path."""

from __future__ import annotations

__all__ = ["flow_sample"]

import numbers

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from torch import Size, Tensor
from torch.distributions import (
    Distribution,
    Independent,
    MultivariateNormal,
    Normal,
    Uniform,
)

from ._buffers import State
from ._caches import PerObject
from ._checks import check_buffers, check_generator, check_module, describe
from ._compat import generating, is_compiling
from ._engine import _rng_state, _set_rng_state, count, draw_state, restore_draw_state, run
from ._options import call_options
from ._structure import Structure, lock, structure
from ._vmap_safe import vmap_safe

# The contexts each flow was seen to take, while its structure stays the same: the check
# of a context depends only on the two, and runs the flow's networks (a MAF's, once per
# feature).
_CONTEXTS: PerObject[tuple[Structure, set[tuple]]] = PerObject()
_MAX_CONTEXTS = 64


def _gaussian(where: str, d: Distribution) -> tuple[Tensor, Tensor, bool]:
    r"""Returns the location, the scale and whether the scale is a Cholesky factor."""

    if isinstance(d, Independent) and isinstance(d.base_dist, Normal):
        return d.base_dist.loc, d.base_dist.scale, False
    if isinstance(d, Normal):
        return d.loc, d.scale, False
    if isinstance(d, MultivariateNormal):
        return d.loc, d.scale_tril, True

    raise TypeError(
        f"{where}: expected a Gaussian base distribution (Normal, Independent Normal or "
        f"MultivariateNormal), got {type(d).__name__}"
    )


def _base(where: str, d: Distribution) -> tuple[str, Callable[[Tensor], Tensor]]:
    r"""Returns the kind of noise a base distribution reparameterizes, and how."""

    inner = d.base_dist if isinstance(d, Independent) else d

    # As `Normal.rsample` and `Uniform.rsample`: the same numbers for the same noise.
    if isinstance(inner, Normal):
        return "normal", lambda eps: inner.loc + eps * inner.scale
    if isinstance(inner, Uniform):
        return "uniform", lambda u: inner.low + u * (inner.high - inner.low)

    kind = type(d).__name__
    if inner is not d:
        kind += f"({type(inner).__name__})"
    raise TypeError(
        f"{where}: expected a Normal or Uniform base distribution (possibly Independent), "
        f"got {kind}"
    )


def _drawable(d: Distribution) -> bool:
    r"""Whether `flow_sample` can reparameterize the base distribution `d` (:func:`_base`)."""

    return isinstance(d.base_dist if isinstance(d, Independent) else d, (Normal, Uniform))


def _is_flow(d: object) -> bool:
    return hasattr(d, "transform") and isinstance(getattr(d, "base", None), Distribution)


def _is_mixture(d: object) -> bool:
    return isinstance(getattr(d, "base", None), Distribution) and isinstance(
        getattr(d, "logits", None), Tensor
    )


def _push(flow: nn.Module, c: Tensor | None, eps: Tensor) -> Tensor:
    r"""Reparameterizes the base noise and pushes it through the inverse transform."""

    d = flow() if c is None else flow(c)
    _, reparameterize = _base("flow_sample", d.base)

    return d.transform.inv(reparameterize(eps))


def _drew(found: tuple[Tensor, list[Tensor] | None]) -> bool:
    r"""Whether torch's global generators moved since their state `found`."""

    now = _rng_state()
    if not torch.equal(now[0], found[0]):
        return True
    return now[1] is not None and (found[1] is None or not all(map(torch.equal, now[1], found[1])))


def _evaluate(flow: nn.Module, st: Structure, c: Tensor | None, check: bool) -> Distribution:
    r"""Returns `flow(c)` with the flow's own parameters and, if `check`, runs its inverse
    transform on the base mean: a pass for shapes and checks only, which leaves the flow's
    buffers and torch's global generators as it found them (a context encoder's
    train-mode batch norm, its dropout). The sampling pass updates them, once."""

    state = State(st)
    rng = _rng_state()
    try:
        # With the stand-ins: zuko's own autograd Functions (bisection, the ODE solver)
        # fail inside a torch.func transform of the caller's.
        with torch.no_grad(), vmap_safe(st.uses_zuko):
            d = flow() if c is None else flow(c)
            # A base flow_sample cannot draw from (a mixture) is refused after this pass,
            # by `_base`, with its own message; its mean may not exist.
            if check and _is_flow(d) and _drawable(d.base):
                d.transform.inv(d.base.mean)
    finally:
        state.restore()
        # Only if this pass drew: putting them back replays what other threads drew.
        if _drew(rng):
            _set_rng_state(rng)

    return d


def _floating(flow: nn.Module) -> Tensor | None:
    r"""Returns a floating-point tensor of the flow (a parameter, else a buffer), or None."""

    for t in (*flow.parameters(), *flow.buffers()):
        if t.is_floating_point():
            return t
    return None


def _pick(w: Tensor, t: Tensor, event: int) -> Tensor:
    r"""Selects along the component dim of `t` (before its `event` last dims) with one-hot `w`."""

    w = w.reshape(*w.shape, *(1,) * event)
    return (w * t).sum(dim=-(event + 1))


def _mixture(flow: nn.Module, c: Tensor | None, eps: Tensor, u: Tensor) -> Tensor:
    r"""Samples a Gaussian mixture from a normal `eps` and a uniform `u` (inverse CDF)."""

    d = flow() if c is None else flow(c)
    loc, scale, tril = _gaussian("flow_sample", d.base)

    logits = d.logits.expand(*u.shape, d.logits.shape[-1])
    k = (torch.softmax(logits, dim=-1).cumsum(dim=-1) <= u[..., None]).sum(dim=-1)
    k = k.clamp(max=logits.shape[-1] - 1)
    w = (k[..., None] == torch.arange(logits.shape[-1], device=k.device)).to(eps.dtype)

    loc = _pick(w, loc.expand(*u.shape, *loc.shape[-2:]), 1)
    if tril:
        scale = _pick(w, scale.expand(*u.shape, *scale.shape[-3:]), 2)
        x = loc + (scale @ eps[..., None]).squeeze(-1)
    else:
        x = loc + eps * _pick(w, scale.expand(*u.shape, *scale.shape[-2:]), 1)

    # Like zuko's `Mixture.sample`, mixture samples carry no gradient.
    return x.detach()


def _context_error(where: str, flow: nn.Module, c: Tensor | None, e: Exception) -> ValueError:
    r"""Says why the flow cannot be evaluated on the context `c`."""

    lines = str(e).strip().splitlines()
    cause = type(e).__name__ + (f": {lines[0]}" if lines else "")
    if c is None:
        return ValueError(
            f"{where}: expected a context c, got None; the flow cannot be evaluated "
            f"without one ({cause}): pass c, a tensor whose last dim is the flow's "
            "number of context features, as in flow(c)"
        )
    like = _floating(flow)
    if like is not None and (c.dtype != like.dtype or c.device != like.device):
        return ValueError(
            f"{where}: expected a context c of the flow's dtype and device "
            f"({describe(like)}), got {describe(c)}; the flow cannot be evaluated on it "
            f"({cause})"
        )
    return ValueError(
        f"{where}: expected a context c whose last dim is the flow's number of context "
        f"features, got shape {tuple(c.shape)}; the flow cannot be evaluated on it ({cause})"
    )


def flow_sample(
    flow: nn.Module,
    params: Mapping[str, Tensor],
    c: Tensor | None = None,
    shape: Sequence[int] = (),
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    fallback: bool = True,
    vectorized: bool = True,
    max_memory: int | None = None,
    buffers: Mapping[str, Tensor] | None = None,
) -> Tensor:
    r"""Draws samples from a Bayesian flow, for every posterior sample in one pass.

    `torch.distributions` draws its noise in place, which vmap cannot batch. Here all the
    noise is drawn first, outside vmap, from `generator`; then, for every parameter set,
    the flow's base distribution (Gaussian or uniform) reparameterizes it and the inverse
    transform pushes it through, :math:`x = f_\theta^{-1}(\mu + \sigma \epsilon \mid c)`.
    For the same noise this is exactly zuko's `flow(c).rsample(shape)`, differentiable with
    respect to `params`. Gaussian mixtures (:class:`zuko.mixtures.GMM`) are sampled by
    inverse CDF from uniform noise and, as in zuko, carry no gradient. Train-mode buffers
    (a context encoder's batch norm) are updated once per call, as by `rsample`, with the
    buffer rule of :func:`bayesflow.vmap_call` over the parameter sets.

    Example:
        >>> flow = zuko.flows.MAF(2, 3)
        >>> params = bayesflow.sample(bayesflow.init(flow), 4)
        >>> bayesflow.flow_sample(flow, params, torch.randn(3), (16,)).shape
        torch.Size([4, 16, 2])

    Arguments:
        flow: A zuko flow (a lazy distribution), e.g. :class:`zuko.flows.NSF`.
        params: Sampled parameters `{name: (n, *shape)}`, e.g. from :func:`bayesflow.sample`.
        c: The context, shared by every parameter set; :py:`None` if unconditional (a
            conditional flow then raises a :class:`ValueError` that says it needs one).
            A context the flow cannot be evaluated on raises a :class:`ValueError`
            before any draw, which names the flow's dtype and device where `c`'s differ.
        shape: The sample shape per parameter set, as in `rsample(shape)`.
        generator: The source of the noise; the global generator if :py:`None`. A call
            that fails after the draw (the flow itself, or vmap with `fallback=False`)
            leaves a given generator as found.
        chunk_size, max_memory: As in :func:`bayesflow.vmap_call`.
        fallback: As in :func:`bayesflow.vmap_call`.
        vectorized: Whether to use :func:`bayesflow.vmap_call` or, the oracle,
            :func:`bayesflow.loop_call`. Both give the same numbers for the same generator
            state.
        buffers: Per-sample buffers, as in :func:`bayesflow.vmap_call`: an ensemble of
            flows (:func:`bayesflow.ensemble`, :func:`bayesflow.stack_modules`) samples
            with `params=ens.params, buffers=ens.buffers`, each member with its own base
            distribution and masks.

    Returns:
        The samples, with shape `(n, *shape, *batch_shape, *event_shape)`.
    """

    where = "flow_sample"
    check_module(where, flow)
    if c is not None and not isinstance(c, Tensor):
        raise TypeError(f"{where}: expected c to be a tensor or None, got {type(c).__name__}")
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, Sequence) or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise ValueError(
            f"{where}: expected shape to be a sequence of non-negative ints, got {shape!r}"
        )
    shape = tuple(int(s) for s in shape)
    check_generator(where, generator)
    opts = call_options(where, None, chunk_size, fallback, None, None, vectorized, max_memory)
    n = count(flow, params, opts)
    if buffers is not None and not (isinstance(buffers, Mapping) and not buffers):
        with lock(flow):  # before any draw
            check_buffers(where, structure(flow, where), flow, buffers, n)

    # The shapes, outside vmap: lazy flows build their transforms only when evaluated.
    # A flow's networks run only once its transform is called: here, in the direction of
    # sampling (for the cost of one sample), on the base mean, so that a missing or
    # ill-shaped context raises before any draw; once per flow structure and context.
    # Under the lock: the pass puts the buffers back, which another thread's call on the
    # flow may be updating.
    with lock(flow):
        st = structure(flow, where)
        # Not read while compiling (dynamo would guard on the weak dictionary's keys).
        seen = None if is_compiling() else _CONTEXTS.get(flow)
        if seen is None or seen[0] is not st:
            seen = (st, set()) if is_compiling() else _CONTEXTS.put(flow, (st, set()))
        context = None if c is None else (tuple(c.shape), c.dtype, c.device)
        try:
            d = _evaluate(flow, st, c, context not in seen[1])
        except (RuntimeError, AttributeError, TypeError, ValueError) as e:
            raise _context_error(where, flow, c, e) from e
        if _is_flow(d) and context not in seen[1]:
            if len(seen[1]) >= _MAX_CONTEXTS:
                seen[1].clear()
            seen[1].add(context)

    if _is_flow(d):
        kind, _ = _base(where, d.base)
        fn, kinds = _push, (kind,)
        loc = d.base.mean
        dims = Size(shape) + d.base.batch_shape + d.base.event_shape
        sizes = [(n, *dims)]
    elif _is_mixture(d):
        fn, kinds = _mixture, ("normal", "uniform")
        loc = d.base.mean
        batch = Size(shape) + d.batch_shape
        sizes = [(n, *batch, *d.event_shape), (n, *batch)]
    else:
        raise TypeError(
            f"{where}: expected flow(c) to be a normalizing flow or a Gaussian mixture, "
            f"got {type(d).__name__}"
        )

    # The noise is drawn where the base distribution lives.
    check_generator(where, generator, loc.device)
    # A run that fails after the draw (the flow itself, vmap without a fallback) leaves
    # the generator as found.
    saved = draw_state(generator)
    noise = []
    for kind, size in zip(kinds, sizes, strict=True):
        z = torch.empty(size, dtype=loc.dtype, device=loc.device)
        noise.append(
            z.normal_(**generating(generator))
            if kind == "normal"
            else z.uniform_(0, 1, **generating(generator))
        )

    in_dims = (None, *(0 for _ in noise))
    try:
        return run(
            flow, params, (c, *noise), opts._replace(fn=fn, in_dims=in_dims), buffers=buffers
        )
    except BaseException:
        restore_draw_state(saved)
        raise
