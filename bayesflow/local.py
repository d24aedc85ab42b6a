r"""The local reparameterization trick and Flipout, vectorized over posterior samples."""

from __future__ import annotations

__all__ = ["local_call", "local_layers"]

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from . import _posterior
from ._checks import (
    check_bool,
    check_generator,
    check_module,
    check_n,
    check_not_bridge,
    check_posterior,
)
from ._engine import run_local
from ._layers import LocalPlan, is_local
from ._options import CallOptions, call_options
from ._sampling import check_finite
from ._types import Fn, Posterior


def local_layers(module: nn.Module) -> dict[str, nn.Module]:
    r"""Returns the layers of `module` that :func:`local_call` can sample locally (the
    candidates), by name: which of them it does depends on the estimator and on how
    `fn` calls them (see :func:`local_call`). Under the local trick a convolution, or a
    linear layer whose input has positions besides the example dim, takes a whole weight
    sample, and under Flipout so does a linear layer on `(B, T, in)`, unless
    `per_position`; and so does a layer that `fn` calls twice or that shares its weight.

    The candidates are the instances of :class:`torch.nn.Linear`, :class:`zuko.nn.Linear` and
    :class:`torch.nn.Conv1d` / `Conv2d` / `Conv3d`, and of their subclasses that keep
    their `forward`, such as zuko's `MaskedLinear`, but for instances whose `forward` was
    set on the instance (a monkeypatch, accelerate's hooks): that runs as it is.

    Arguments:
        module: A module.

    Returns:
        The layers, keyed by their names in :meth:`torch.nn.Module.named_modules`.
    """

    check_module("local_layers", module)

    return {name: m for name, m in module.named_modules() if is_local(m)}


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
    per_position: bool = False,
) -> Any:
    r"""Runs `fn(module, *args)` for `n` posterior samples with noise on the outputs of
    the linear and convolutional layers rather than on their weights.

    The Bayesian layers (see :func:`local_layers`) are temporarily replaced by stochastic
    ones and `fn` runs as in :func:`bayesflow.vmap_call`: every other module sees exactly
    the per-sample shapes it sees there. Any other Bayesian parameter (of a normalization
    layer, a recurrent layer, ...) is sampled whole, as in :func:`bayesflow.vmap_call`.

    With the local reparameterization trick, a linear layer :math:`y = x W^T + b` returns

    .. math:: y = x \mu_W^T + \mu_b + \sqrt{x^2 (\sigma_W^2)^T + \sigma_b^2} \odot \epsilon,

    with fresh :math:`\epsilon \sim \mathcal{N}(0, I)` for every sample and example, and
    no weight sample is ever drawn. With Flipout, every sample draws one perturbation
    :math:`\Delta W = \sigma_W \odot E`, which random signs :math:`s, r \in \{\pm 1\}`
    drawn per example decorrelate between examples,

    .. math:: y = x \mu_W^T + \left( (x \odot s) \Delta W^T \right) \odot r + b,

    with the bias sampled once per sample; a convolution's signs are per input and output
    channel, shared by all positions of an example.

    What is exact. For every sample and every example, the outputs of a layer have
    the joint law of a weight sample: the `n` samples are `n` independent draws of the
    predictive for each example, and gradients reach the posterior's means and
    log-variances. What changes is the correlation between the examples of one batch
    (as if every example had its own weights), which makes the gradient estimates of an
    expected log-likelihood less noisy: a module that mixes examples after a Bayesian
    layer (batch statistics of a train-mode BatchNorm, a softmax over the batch) sees
    that decorrelated noise too, so its outputs differ in law from weight sampling.

    Where the local trick cannot be exact, the weight is sampled whole instead: a
    convolution, or a linear layer whose input has positions besides the example dim
    (`(B, T, in)`), shares its weight across the positions of one example, and
    independent noise per position would make sums over positions (a global average
    pooling, a flatten and a linear head) far too narrow. `per_position=True` takes the
    local trick there anyway, with noise per position: an approximation, cheaper for large
    layers, whose outputs have the right law one by one but not jointly. Flipout is exact
    for convolutions; for a linear layer on `(B, T, in)` its weight is sampled whole too,
    unless `per_position`. The examples are the first dim of a layer's input, unchecked: the
    rows of a 2-D input that are the positions of an unbatched sequence `(T, in)`, or of a
    batch flattened with them `(B * T, in)`, get independent noise, and sums over them are
    far too narrow; keep the positions in a dim of their own (see docs/training.md).

    A layer whose weight its outputs share otherwise is sampled whole too, whatever
    `per_position`: one called more than once by `fn` (a weight-shared block, a MAF's
    inverse), one whose weight or bias another module holds too (tied weights), and one
    whose Bayesian tensors `fn` reads outside the layer's call (as `F.linear(h,
    layer.weight)`); fresh noise per call, or the mean elsewhere, would be silently
    wrong. All the noise is drawn
    before the vectorized pass, from `generator`, laid out by the layer calls of one
    shape-finding pass of `fn` (without gradients, buffers restored, torch's generators
    restored: a generator that `fn` holds itself is not, and draws once more in the call
    that records it; remembered for the same `fn` code and argument shapes; recorded at
    every trace inside torch.compile). A remembered pass in which a layer was called twice
    (sampled whole) is recorded again where the layer is now called once.
    During the call, the local layers' own tensors in `module` are stand-ins whose values
    cannot be read: a read the remembered pass did not see (a module flag switched since
    switches on a tied head) makes the call start again with that layer sampled whole,
    a layout then remembered: later calls of the same `fn` code and argument shapes sample
    that layer whole too, even where they would not read it (a flag switched back), until
    :func:`bayesflow.clear_caches` (see the guide on training). The same generator state gives
    the same numbers vectorized or not (`vectorized=False`, the loop oracle), and whatever
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
        per_position: Whether a layer whose weight its input's positions share takes the
            estimator with noise per position (an approximation) rather than a whole
            weight sample.

    Returns:
        The outputs of `fn`, with a leading dim of size `n`, differentiable with respect
        to `posterior`.

    Raises:
        ValueError: If `posterior` has no parameter of a linear or convolutional layer, or
            if `fn` does not call every Bayesian layer (a module that reads a layer's
            weight directly, as :class:`torch.nn.MultiheadAttention` does, would see the
            mean: use :func:`bayesflow.vmap_call` for those), and where
            :func:`bayesflow.vmap_call` raises (a tensor every sample shares, an argument or
            one `fn` closes over, written in place by `fn`; the shape-finding pass runs on
            copies of the arguments).

    References:
        | Variational Dropout and the Local Reparameterization Trick (Kingma et al., 2015)
        | https://arxiv.org/abs/1506.02557

        | Flipout: Efficient Pseudo-Independent Weight Perturbations on Mini-Batches (Wen et al., 2018)
        | https://arxiv.org/abs/1803.04386
    """  # noqa: E501

    where = "local_call"
    opts = call_options(
        where, fn, chunk_size, fallback, in_dims, randomness, vectorized, max_memory
    )
    return local_with_options(module, posterior, n, args, opts, generator, flipout, per_position)


def local_with_options(
    module: nn.Module,
    posterior: Posterior,
    n: int,
    args: tuple,
    opts: CallOptions,
    generator: torch.Generator | None,
    flipout: bool,
    per_position: bool,
    finite: bool = False,
) -> Any:
    r"""Runs :func:`local_call` with options checked by the caller (:func:`bayesflow.nelbo`),
    which may have checked that the posterior holds finite values (`finite`): its KL did."""

    where = opts.where
    check_module(where, module)
    check_not_bridge(where, module)
    n = check_n(where, n)
    check_generator(where, generator)
    check_bool(where, "flipout", flipout)
    check_bool(where, "per_position", per_position)
    check_posterior(where, posterior)
    # The layers' noise is drawn on the device of the posterior's first tensor.
    check_generator(where, generator, next(iter(posterior.mean.values())).device)
    if not finite:
        check_finite(where, posterior)
    _posterior.check_matches(where, module, posterior)

    plan = LocalPlan(module, posterior, flipout, per_position)
    if not plan.layers and not plan.unplain:
        raise ValueError(
            f"{where}: expected the posterior to hold the weight or bias of a linear or "
            f"convolutional layer of {type(module).__name__}, got none; use "
            "bayesflow.vmap_call"
        )
    return run_local(module, posterior, n, args, opts, plan, generator)
