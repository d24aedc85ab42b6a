r"""The linearized (GLM) predictive of a Gaussian posterior and its probit approximation
for classification."""

from __future__ import annotations

__all__ = ["linearized_predictive", "probit_probs"]

import math

import torch
import torch.nn as nn

from torch import Tensor
from torch.func import jacrev, vmap

from . import _engine, _posterior
from ._checks import (
    check_callable,
    check_float,
    check_int,
    check_module,
    check_not_bridge,
    check_posterior,
    check_same_shape,
    check_tensor,
)
from ._curvature import (
    Buffers,
    Fn,
    LastLayer,
    attributes,
    capture,
    check_no_max_norm,
    check_per_datum,
    check_per_example_layers,
    check_split,
    close,
    ends,
    evaluating,
    last_layer,
    per_example,
    transforming,
)
from ._numerics import accumulator
from ._numerics import var as _var
from ._options import call_options
from ._sampling import check_finite
from ._types import Posterior
from .posterior import mean_params


def _last_layer_variance(
    where: str,
    module: nn.Module,
    posterior: Posterior,
    fn: Fn,
    args: tuple,
    found: LastLayer,
    buffers: Buffers,
    out: Tensor,
    phi: Tensor,
    z: Tensor,
) -> Tensor | None:
    r"""The variance of the output from the layer's input features :math:`\phi`, where the
    layer's output :math:`z` is `fn`'s, `out`; checked on the first and the last example
    against the Jacobians (a module that mixes the examples in order, as a recurrent layer
    over the batch dim, leaves one of them alone, not both)."""

    if out.shape != z.shape or not torch.equal(out, z):
        return None
    # In at least float32 (a half-precision feature's square overflows before the small
    # variance scales it), given back in the output's dtype.
    acc = accumulator(phi)
    f_var = phi.to(acc).square() @ _var(posterior.logvar[found.weight].to(acc)).T
    if found.bias is not None:
        f_var = f_var + _var(posterior.logvar[found.bias].to(acc))
    f_var = f_var.to(out.dtype)
    rows = ends(out.shape[0])
    with transforming(where, buffers):  # each example on its own
        one, one_out = _jacobian_variance(
            where, module, posterior, fn, tuple(a[rows] for a in args), None
        )
    if not close(out[rows], one_out.reshape(out[rows].shape)) or not one.isfinite().all():
        return None  # fn mixes the examples of a batch: the per-example path says so
    tol = math.sqrt(torch.finfo(f_var.dtype).eps)
    if not torch.allclose(f_var[rows], one, rtol=tol, atol=tol * one.abs().max().item()):
        return None
    return f_var


def linearized_predictive(
    module: nn.Module,
    posterior: Posterior,
    *args: Tensor,
    fn: Fn | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Returns the mean and variance of the model output under the linearized model,
    :math:`f(x, \theta) \approx f(x, \mu) + J(x) (\theta - \mu)` with
    :math:`\theta \sim \mathcal{N}(\mu, \mathrm{diag}(\sigma^2))`:

    .. math:: \mathbb{E}[f] = f(x, \mu), \qquad
        \mathbb{V}[f_c] = \sum_j J_{cj}(x)^2 \sigma_j^2,

    the GLM predictive of Laplace Redux, per output (the diagonal of its covariance). For
    a posterior over the last :class:`torch.nn.Linear` layer alone, whose output is that of
    `fn` and whose parameters no other operation of `fn` takes, the model is linear in
    those parameters and the variance is read from the layer's input features
    :math:`\phi` (a forward hook) as :math:`\phi^2 \sigma_W^{2\top} + \sigma_b^2`;
    otherwise the Jacobians come from :func:`torch.func.jacrev` vectorized over the
    examples.

    The module is evaluated in evaluation mode (dropout off, BatchNorm on its running
    statistics), as by :func:`bayesflow.laplace_fit`: the linearized model is that of the
    evaluation-mode network. It is left in the modes (given back through
    :meth:`torch.nn.Module.train`, which a layer may override), and with the parameters
    and buffers (the same tensors, with the same values), it had, also where the call
    raises.

    Example:
        >>> net = zuko.nn.MLP(4, 3, hidden_features=[8])
        >>> q = bayesflow.init(net, init_logvar=-4.0, include=["2"])
        >>> mean, var = linearized_predictive(net, q, torch.randn(5, 4))
        >>> probit_probs(mean, var).shape
        torch.Size([5, 3])

    Arguments:
        module: A module.
        posterior: A posterior over parameters of `module`.
        args: The inputs of `fn`, tensors with a leading batch dim.
        fn: The model output, `fn(module, *args)`, of shape `(B, C)` or `(B,)`;
            `module(*args)` if :py:`None`.
        chunk_size: The number of examples per vectorized chunk of the Jacobians; all at
            once if :py:`None`.

    Returns:
        The mean :math:`f(x, \mu)` and the variance, two tensors of the output's shape,
        detached: for a batch of zero examples, `(0, C)` or `(0,)`, from one call of `fn`
        and no Jacobian.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If the posterior's names or shapes are not the module's or it holds
            NaN or infinite values, the inputs do not share a leading batch dim, `fn` does
            not return `(B, C)` or `(B,)`, `fn` mixes the examples of a batch (a mean
            over the batch, train-mode statistics, a batch normalization without running
            statistics): the linearized model is per example; or the module holds an
            :class:`torch.nn.Embedding` or :class:`torch.nn.EmbeddingBag` with `max_norm`
            (it renormalizes its weight in place at every forward; refused before any
            forward), or its forward writes its buffers in a way the per-example Jacobians
            cannot run or draws random numbers in evaluation mode (dropout with
            `training=True`; torch's default generators are left as found), or `fn` returns
            a result without a gradient in the posterior's parameters (computed under
            :func:`torch.no_grad`, or detached), whose variance would be 0.

    References:
        | Laplace Redux -- Effortless Bayesian Deep Learning (Daxberger et al., 2021)
        | https://arxiv.org/abs/2106.14806
    """

    where = "linearized_predictive"
    check_module(where, module)
    check_not_bridge(where, module)
    check_posterior(where, posterior)
    if not posterior.mean:
        raise ValueError(
            f"{where}: expected a posterior over at least one parameter of "
            f"{type(module).__name__}, got none"
        )
    _posterior.check_matches(where, module, posterior)
    check_finite(where, posterior)
    check_callable(where, "fn", fn)
    if chunk_size is not None:
        chunk_size = check_int(where, "chunk_size", chunk_size, or_none=True)
    if not args:
        raise ValueError(f"{where}: expected at least one input tensor, got none")
    for j, a in enumerate(args):
        if not isinstance(a, Tensor):
            raise TypeError(
                f"{where}: expected input tensors that share a leading batch dim, got "
                f"{type(a).__name__} at position {j}"
            )
        if a.is_meta:
            raise ValueError(
                f"{where}: expected input tensors with data, got a tensor on the meta device "
                f"at position {j}"
            )
        if a.dim() == 0 or a.shape[0] != args[0].shape[0]:
            raise ValueError(
                f"{where}: expected input tensors that share a leading batch dim, got shape "
                f"{tuple(a.shape)} at position {j}"
            )
    check_per_example_layers(where, module)
    check_no_max_norm(where, module)
    fn = (lambda m, *a: m(*a)) if fn is None else fn
    size = args[0].shape[0]
    names = list(posterior.mean)
    opts = call_options(where, fn)  # the engine's errors about fn's output name us

    def call() -> Tensor:
        out = _engine.run(module, mean_params(posterior), args, opts)
        if not isinstance(out, Tensor):
            raise TypeError(f"{where}: expected fn to return a tensor, got {type(out).__name__}")
        return out[0]

    with evaluating(module) as buffers, torch.no_grad():
        found = last_layer(module, names)
        if found is None:
            out, got = call(), None
        else:
            out, got, _ = capture(found.layer, call, alone=attributes(found))
        out = check_per_datum(where, "fn", out, size)
        if out.dim() > 2:
            raise ValueError(
                f"{where}: expected fn to return (B, C) or (B,), got {tuple(out.shape)}"
            )
        if out.numel() == 0:
            # No example (or no output), no Jacobian: torch.func cannot take one of an
            # empty output. The result is empty, as vmap_call's is on zero examples.
            return out.detach(), torch.zeros_like(out)
        if got is not None:
            f_var = _last_layer_variance(
                where, module, posterior, fn, args, found, buffers, out, *got
            )
            if f_var is not None:
                return out.detach(), f_var.detach()
            buffers.restore()  # what the check's transforms assigned, their dead wrappers
        with transforming(where, buffers):
            f_var, outs = _jacobian_variance(where, module, posterior, fn, args, chunk_size)
        # The linearized model is that of each example on its own: fn must not mix them.
        check_split(where, "fn", out.reshape(size, -1), outs.reshape(size, -1))
    return out.detach(), f_var.reshape(out.shape)


def _jacobian_variance(
    where: str,
    module: nn.Module,
    posterior: Posterior,
    fn: Fn,
    args: tuple,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor]:
    r"""Returns :math:`\sum_j J_{cj}^2 \sigma_j^2` per example and output, `(B, C)`, with
    the Jacobians at the posterior mean by :func:`torch.func.jacrev` over examples, and
    the output of each example on its own."""

    call = per_example(where, "fn", module, fn)
    mean = {k: m.detach() for k, m in posterior.mean.items()}
    var = {k: _var(lv.detach().to(accumulator(lv))) for k, lv in posterior.logvar.items()}

    def f_var(p: dict[str, Tensor], *example: Tensor) -> tuple[Tensor, Tensor]:
        def f(q: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            y = call(q, *example).reshape(-1)
            return y, y

        # Reduced per example: the Jacobians of a chunk never stand together. In at
        # least float32 (a half-precision Jacobian's square overflows before the small
        # variance scales it), given back in the output's dtype.
        jac, y = jacrev(f, has_aux=True)(p)
        terms = ((j.to(var[k].dtype).square() * var[k]).flatten(1).sum(-1) for k, j in jac.items())
        return sum(terms).to(y.dtype), y

    with torch.no_grad():
        dims = (None, *(0,) * len(args))
        return vmap(f_var, in_dims=dims, chunk_size=chunk_size)(mean, *args)


def probit_probs(mean: Tensor, var: Tensor) -> Tensor:
    r"""Returns the probit approximation of the predictive probabilities of a Gaussian
    over logits, :math:`\mathrm{softmax}(\kappa \odot m)` with
    :math:`\kappa = (1 + \frac{\pi}{8} v)^{-1/2}`.

    With :func:`linearized_predictive`, the linearized (GLM) predictive of a Laplace
    posterior, without sampling (MacKay, 1992; laplace-torch's `link_approx="probit"`).

    Example:
        >>> probit_probs(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]))
        tensor([[0.8808, 0.1192]])

    For one logit (a binary classifier with a sigmoid), the probit approximation is
    :math:`\mathrm{sigmoid}(\kappa m)`,
    `torch.sigmoid(mean / torch.sqrt(1 + math.pi / 8 * var))`: a softmax over one logit
    is 1 everywhere, so this function refuses it.

    Arguments:
        mean: The means :math:`m` of the logits, `(..., C)` with at least one leading dim
            and :math:`C \geq 2` classes.
        var: Their variances :math:`v \geq 0`, of the same shape.

    Returns:
        Probabilities of the shape of `mean`, summing to 1 over the last dim.

    Raises:
        ValueError: If `mean` has fewer than 2 dims or classes, or a variance is negative
            or NaN.

    References:
        | The Evidence Framework Applied to Classification Networks (MacKay, 1992)
        | https://doi.org/10.1162/neco.1992.4.5.720
    """

    where = "probit_probs"
    check_tensor(where, "mean", mean)
    check_tensor(where, "var", var)
    check_float(where, "mean", mean)
    check_float(where, "var", var)
    check_same_shape(where, mean=mean, var=var)
    if mean.dim() < 2 or mean.shape[-1] < 2:
        raise ValueError(
            f"{where}: expected logits of shape (..., C) with at least one leading dim and "
            f"C >= 2 classes, got {tuple(mean.shape)}; for one logit (a sigmoid), the probit "
            "approximation is torch.sigmoid(mean / torch.sqrt(1 + math.pi / 8 * var))"
        )
    bad = ~(var >= 0)  # NaN too
    if bad.any():
        raise ValueError(f"{where}: expected variances >= 0, got {var[bad][0].item()}")
    kappa = (1 + math.pi / 8 * var).rsqrt()
    return (kappa * mean).softmax(dim=-1)
