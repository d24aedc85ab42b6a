r"""Training objectives: the negative ELBO, with posterior samples vectorized."""

from __future__ import annotations

__all__ = ["ESTIMATORS", "flipout_nelbo", "local_nelbo", "loop_nelbo", "nelbo"]

import inspect

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from torch import Tensor

from . import _posterior
from ._buffers import State
from ._checks import (
    check_generator,
    check_in_dims,
    check_module,
    check_n,
    check_not_bridge,
    check_not_data_parallel,
    check_number,
    check_posterior,
)
from ._compat import in_func_transform, is_compiling
from ._engine import check_no_parametrization_cache, draw_state, restore_draw_state, run
from ._options import CallOptions, call_options
from ._structure import lock, structure
from ._types import Posterior
from .local import local_with_options
from .priors import Prior, check_prior, checked_kl, prior_kl, sample_and_kl

Fn = Callable[..., Tensor]

#: How :func:`nelbo` samples the model: whole weights, or the outputs of linear and
#: convolutional layers (local reparameterization, Flipout).
ESTIMATORS = ("weights", "local", "flipout")


def nelbo(
    module: nn.Module,
    posterior: Posterior,
    *args: Any,
    fn: Fn,
    num_data: float,
    n: int = 4,
    prior: Prior | float | Tensor | None = None,
    kl_weight: float | Tensor = 1.0,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    in_dims: Sequence[int | None] | None = None,
    estimator: str = "weights",
    vectorized: bool = True,
    randomness: str | None = None,
    max_memory: int | None = None,
) -> Tensor:
    r"""Returns the negative ELBO per datum, with `n` posterior samples in one vectorized pass.

    For a batch of :math:`B` data out of `num_data` :math:`= N`, with parameter samples
    :math:`\theta_k \sim q` (:func:`bayesflow.sample`) and per-datum log-likelihoods
    :math:`\ell_{kb} = \log p(y_b \mid x_b, \theta_k)` computed by :func:`bayesflow.vmap_call`,

    .. math:: \mathcal{L} = -\frac{1}{n} \sum_{k=1}^n \frac{1}{B} \sum_{b=1}^B \ell_{kb}
        + \beta \, \frac{\mathrm{KL}(q \,\|\, p)}{N},

    an unbiased estimate of :math:`-\mathrm{ELBO} / N` when :math:`\beta = 1`. The scale
    per datum keeps the learning rate independent of :math:`N`; :math:`\beta` (`kl_weight`)
    can follow a schedule, e.g. :class:`bayesflow.LinearWarmup`. A loss "mean error
    :math:`+ \lambda` KL" is `fn` returning minus the per-datum error with
    :math:`N = 1 / \lambda`: zuko's tutorial loss `MSE + 1e-6 * KL` is

    >>> net = zuko.nn.MLP(5, 5)
    >>> q = bayesflow.init(net)
    >>> x = torch.randn(64, 5)
    >>> y = x.sort(dim=-1).values
    >>> mse = lambda net, x, y: -(net(x) - y).square().mean(dim=-1)
    >>> loss = nelbo(net, q, x, y, fn=mse, num_data=1e6, n=4)
    >>> loss.shape
    torch.Size([])

    With a :class:`bayesflow.BayesianModel` `bnet`, pass `bnet.base` and
    `bnet.posterior`: the gradients reach its `means` and `logvars`.

    In data-parallel training, pass the module itself, not a `DistributedDataParallel`
    wrapper (refused with a TypeError: its gradient averaging does not reach the
    posterior's tensors), and average the posterior's gradients over the processes after
    `backward()` (see the data-parallel section of the training guide).

    Arguments:
        module: A module.
        posterior: A posterior :math:`q` over parameters of `module`.
        args: The arguments of `fn`, e.g. a batch of inputs and targets, shared by every
            sample unless `in_dims` says otherwise.
        fn: The log-likelihood, `fn(module, *args)`, returning one log-likelihood per
            datum: a datum's several outputs summed in `fn` (`.sum(-1)`). Every entry it
            returns is averaged as one datum, so a `(B, D)` output divides the data term
            by `D`. For a flow, `fn=lambda f, c, x: f(c).log_prob(x)`.
        num_data: The number of data :math:`N` the KL is shared by.
        n: The number of posterior samples.
        prior: The prior :math:`p`: a :class:`bayesflow.priors.Prior`; a variance
            :math:`s^2` for :math:`\mathcal{N}(0, s^2 I)` (a real number or a one-element
            tensor, as :func:`bayesflow.kl_divergence` takes it); :math:`\mathcal{N}(0, I)`
            if :py:`None`. A prior without closed-form KL uses an `n`-sample Monte Carlo
            estimate.
        kl_weight: The weight :math:`\beta \geq 0` of the KL term.
        generator: The source of all the randomness; the global one if :py:`None`.
            The same state gives the same loss, whatever `chunk_size`; a call that raises
            (`fn` itself, or its output refused) leaves a given generator as found.
        chunk_size, in_dims, randomness, max_memory: As in :func:`bayesflow.vmap_call`.
        estimator: How the model is sampled: `"weights"` (whole weight samples, through
            :func:`bayesflow.vmap_call`), `"local"` (the local reparameterization trick)
            or `"flipout"`, both through :func:`bayesflow.local_call`: same estimand,
            less gradient noise, for models that treat examples independently; a module
            that mixes examples after a Bayesian layer (train-mode BatchNorm, a softmax
            over the batch) sees independent weights per example, and its loss and
            gradients are then those of another estimand (see docs/training.md).
        vectorized: Whether to run vectorized or, the oracle, in a loop (same samples,
            same number).

    Returns:
        A scalar tensor, differentiable with respect to `posterior`.

    References:
        | Weight Uncertainty in Neural Networks (Blundell et al., 2015)
        | https://arxiv.org/abs/1505.05424
    """

    # Every option, by name, as given: none can be dropped on the way.
    options = {k: v for k, v in locals().items() if k not in ("module", "posterior", "args")}
    return _nelbo("nelbo", module, posterior, args, **options)


def _nelbo(
    where: str,
    module: nn.Module,
    posterior: Posterior,
    args: tuple,
    *,
    fn: Fn,
    num_data: float,
    n: int,
    prior: Prior | float | None,
    kl_weight: float | Tensor,
    generator: torch.Generator | None,
    chunk_size: int | str | None,
    in_dims: Sequence[int | None] | None,
    estimator: str,
    vectorized: bool,
    randomness: str | None,
    max_memory: int | None,
) -> Tensor:
    # Every argument is checked before any work (a train-mode BatchNorm's statistics
    # move with the first forward pass).
    check_module(where, module)
    check_not_bridge(where, module)
    check_not_data_parallel(where, module)
    check_posterior(where, posterior)
    if not callable(fn):
        raise TypeError(
            f"{where}: expected fn to be a callable fn(module, *args) returning per-datum "
            f"log-likelihoods, got {type(fn).__name__}"
        )
    num_data = check_number(where, "num_data", num_data, 0.0, strict=True)
    n = check_n(where, n)
    check_prior(where, prior, posterior)
    check_number(where, "kl_weight", kl_weight, 0.0, strict=False)
    check_generator(where, generator)
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"{where}: expected estimator to be one of {', '.join(map(repr, ESTIMATORS))}, "
            f"got {estimator!r}"
        )
    opts = call_options(where, fn, chunk_size, True, in_dims, randomness, vectorized, max_memory)
    with lock(module):
        st = structure(module, where)
        # The buffers as found: a call that fails leaves them so.
        state = State(st)
        if estimator == "weights":
            # The samples must fit the module before the draw: a failed call draws nothing.
            _posterior.check_fits(where, st, module, posterior)
            check_no_parametrization_cache(where, module, st)
    if estimator == "weights":
        check_in_dims(where, args, in_dims, n)

    # A call that fails after the draws (fn's output refused, fn itself, a Monte Carlo
    # KL) leaves the module's buffers and the generator as found.
    saved = draw_state(generator)
    try:
        ll, kl = _draw_and_run(
            where, module, posterior, args, n, prior, generator, opts, estimator
        )
        if not isinstance(ll, Tensor) or ll.dim() == 0 or ll.shape[0] != n:
            shape = tuple(ll.shape) if isinstance(ll, Tensor) else type(ll).__name__
            raise ValueError(
                f"{where}: expected fn to return per-datum log-likelihoods, a tensor per "
                f"sample, stacked to a leading dim n = {n}, got {shape}"
            )
        if ll.numel() == 0:  # a mean over no datum is NaN (n >= 1 rows, checked above)
            raise ValueError(
                f"{where}: expected fn to return at least one log-likelihood per sample, got "
                f"shape {tuple(ll.shape)} (an empty batch?)"
            )
        if not ll.is_floating_point():  # complex would give a complex loss, integers no mean
            raise TypeError(
                f"{where}: expected fn to return real floating-point log-likelihoods, got "
                f"{ll.dtype}"
            )

        if kl is None:  # priors with no Gaussian closed form: after the draws of the samples
            closed = prior is None or not isinstance(prior, Prior) or prior.closed_form
            m = None if closed else n
            if isinstance(prior, Prior):  # its own kl, perhaps: what it returns is checked
                kl = checked_kl(where, prior, prior.kl(posterior, generator=generator, n=m))
            else:
                kl = prior_kl(posterior, prior, generator=generator, n=m)
    except BaseException:
        state.restore()
        restore_draw_state(saved)
        raise

    if isinstance(kl_weight, Tensor):
        kl = kl_weight.reshape(()) * kl  # a weight of shape (1,) gives a scalar loss too
    elif kl_weight != 1.0:
        kl = kl_weight * kl
    return kl / num_data - ll.mean()


def _draw_and_run(
    where: str,
    module: nn.Module,
    posterior: Posterior,
    args: tuple,
    n: int,
    prior: Prior | float | None,
    generator: torch.Generator | None,
    opts: CallOptions,
    estimator: str,
) -> tuple[Any, Tensor | None]:
    r"""Draws the samples (or the local noise) and runs `fn`: its outputs and the
    closed-form KL (:py:`None` for a prior without one)."""

    if estimator == "weights":
        params, kl = sample_and_kl(where, posterior, n, generator, prior)
        return run(module, params, args, opts), kl

    _, kl = sample_and_kl(where, posterior, None, generator, prior)  # checks before work
    # A closed-form KL, outside a trace, has checked that every value is finite.
    finite = kl is not None and not (is_compiling() or in_func_transform())
    flipout = estimator == "flipout"
    ll = local_with_options(
        module, posterior, n, args, opts, generator, flipout, False, finite=finite
    )
    return ll, kl


def loop_nelbo(module: nn.Module, posterior: Posterior, *args: Any, **kwargs: Any) -> Tensor:
    r"""Returns :func:`nelbo` with `vectorized=False`: the oracle, one sample at a time.

    :func:`nelbo`'s arguments but `vectorized`, the same samples for the same generator
    state, the same number.
    """

    return _alias("loop_nelbo", module, posterior, args, kwargs, vectorized=False)


def local_nelbo(module: nn.Module, posterior: Posterior, *args: Any, **kwargs: Any) -> Tensor:
    r"""Returns :func:`nelbo` with `estimator="local"`: the local reparameterization
    trick for the linear and convolutional layers; :func:`nelbo`'s arguments but
    `estimator`."""

    return _alias("local_nelbo", module, posterior, args, kwargs, estimator="local")


def flipout_nelbo(module: nn.Module, posterior: Posterior, *args: Any, **kwargs: Any) -> Tensor:
    r"""Returns :func:`nelbo` with `estimator="flipout"`: Flipout for the linear and
    convolutional layers; :func:`nelbo`'s arguments but `estimator`."""

    return _alias("flipout_nelbo", module, posterior, args, kwargs, estimator="flipout")


def _less(name: str) -> inspect.Signature:
    # What help() and editors show for an alias: nelbo's signature less what it fixes.
    sig = inspect.signature(nelbo, eval_str=True)  # resolved: the docs link the types
    return sig.replace(parameters=[p for p in sig.parameters.values() if p.name != name])


loop_nelbo.__signature__ = _less("vectorized")
local_nelbo.__signature__ = _less("estimator")
flipout_nelbo.__signature__ = _less("estimator")


def _alias(
    where: str, module: nn.Module, posterior: Posterior, args: tuple, kwargs: dict, **fixed: Any
) -> Tensor:
    signature = inspect.signature(nelbo).parameters
    names = set(signature) - {"module", "posterior", "args"}
    unknown = sorted(set(kwargs) - names)
    if unknown or set(kwargs) & set(fixed):
        raise TypeError(f"{where}: got unexpected keyword arguments {unknown or sorted(fixed)}")
    if "fn" not in kwargs or "num_data" not in kwargs:
        raise TypeError(f"{where}: expected the keyword arguments fn and num_data")
    defaults = {k: p.default for k, p in signature.items() if p.default is not p.empty}
    return _nelbo(where, module, posterior, args, **{**defaults, **kwargs, **fixed})
