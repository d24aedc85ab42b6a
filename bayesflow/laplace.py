r"""Laplace approximations after training: a diagonal Gaussian at the trained parameters,
with its curvature from per-example gradients and Jacobians vectorized by :mod:`torch.func`."""

from __future__ import annotations

__all__ = [
    "HESSIANS",
    "LIKELIHOODS",
    "LaplaceFit",
    "laplace",
    "laplace_fit",
    "laplace_marglik",
    "laplace_posterior",
    "linearized_predictive",
    "optimize_prior_precision",
    "probit_probs",
]

import math
import numbers

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn as nn

from torch import Tensor
from torch.func import grad, jacrev, vjp, vmap

from . import _posterior
from ._checks import (
    check_callable,
    check_float,
    check_int,
    check_module,
    check_not_bridge,
    check_number,
    check_posterior,
    check_same_shape,
    check_tensor,
)
from ._numerics import LOGVAR_LIMIT
from ._numerics import var as _var
from ._types import Posterior
from .call import vmap_call
from .posterior import mean_params

#: The curvatures :func:`laplace_fit` computes: the generalized Gauss-Newton matrix and the
#: empirical Fisher, both diagonal.
HESSIANS = ("ggn", "ef")

#: The likelihoods whose output Hessian the generalized Gauss-Newton matrix uses.
LIKELIHOODS = ("classification", "regression")

STRUCTURES = ("scalar", "tensor")

Fn = Callable[..., Tensor]
PriorPrecision = float | Tensor | Mapping[str, float | Tensor]


class LaplaceFit(NamedTuple):
    r"""What a Laplace approximation needs from the data: the trained parameters
    :math:`\theta_*`, the diagonal :math:`h` of the curvature of the negative
    log-likelihood at :math:`\theta_*`, and the log-likelihood itself.

    The posterior for a prior :math:`\mathcal{N}(0, \mathrm{diag}(\lambda)^{-1})` is then
    :math:`\mathcal{N}(\theta_*, \mathrm{diag}(h + \lambda)^{-1})`
    (:func:`laplace_posterior`), and the evidence follows in closed form
    (:func:`laplace_marglik`). All dicts are keyed by
    :meth:`torch.nn.Module.named_parameters` names.

    Attributes:
        mean: The trained parameters :math:`\theta_*`, detached copies.
        hessian: The curvature diagonals :math:`h`, of the parameters' shapes.
        log_likelihood: :math:`\log p(\mathcal{D} \mid \theta_*)`, the sum of `fn` over the
            data, a scalar tensor.
        num_data: The number of data :math:`N`.
    """

    mean: dict[str, Tensor]
    hessian: dict[str, Tensor]
    log_likelihood: Tensor
    num_data: int


LaplaceFit.__module__ = "bayesflow"


@contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    r"""Puts `module` in evaluation mode for a block, then gives every submodule its own
    mode back."""

    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _batches(where: str, data: object) -> Iterator[tuple[Tensor, ...]]:
    if isinstance(data, (Tensor, Mapping, str)) or not isinstance(data, Iterable):
        raise TypeError(
            f"{where}: expected data to be an iterable of batches (tuples of tensors, e.g. a "
            f"DataLoader), got {type(data).__name__}"
        )
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or not batch:
            raise TypeError(
                f"{where}: expected each batch to be a tuple or list of tensors, got "
                f"{type(batch).__name__} at batch {i} (one batch (x, y) is passed as [(x, y)])"
            )
        size = None
        for j, t in enumerate(batch):
            if not isinstance(t, Tensor) or t.dim() == 0:
                what = f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(
                    f"{where}: expected each batch to hold tensors with a leading batch dim, "
                    f"got {what} at position {j} of batch {i}"
                )
            if size is None:
                size = t.shape[0]
            elif t.shape[0] != size:
                raise ValueError(
                    f"{where}: expected the tensors of a batch to share their leading dim, got "
                    f"{size} and {t.shape[0]} in batch {i}"
                )
        if size == 0:
            continue
        yield tuple(batch)


def _per_example(module: nn.Module, fn: Fn) -> Callable[..., Tensor]:
    r"""Returns `call(params, *example)`: `fn(module, *batch)` for a batch of one example,
    with `params` swapped in (through :func:`bayesflow.vmap_call`, the one swap of the
    library), without its sample dim: the shape of `fn`'s output, `(1, ...)`."""

    def call(params: dict[str, Tensor], *example: Tensor) -> Tensor:
        batch = tuple(t.unsqueeze(0) for t in example)
        one = {k: v.unsqueeze(0) for k, v in params.items()}
        return vmap_call(module, one, *batch, fn=fn)[0]

    return call


def _check_per_datum(where: str, what: str, out: object, size: int) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != size:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"{where}: expected {what} to return a tensor with one row per datum, leading dim "
            f"{size} as the batch, got {shape}"
        )
    check_float(where, f"the output of {what}", out)
    return out


def _check_split(where: str, what: str, whole: Tensor, parts: Tensor) -> None:
    r"""Checks that `fn` on single examples gives what it gives on the batch: a batch that
    couples its examples (train-mode BatchNorm, a mean over the batch) has no per-example
    curvature."""

    tol = math.sqrt(torch.finfo(whole.dtype).eps)
    scale = whole.abs().max().clamp_min(1.0)
    if not torch.allclose(whole, parts, rtol=tol, atol=tol * scale):
        error = (whole - parts).abs().max().item()
        raise ValueError(
            f"{where}: expected {what} on one example at a time to give what it gives on the "
            f"whole batch, got differences up to {error:.3g}: does it mix the examples of a "
            "batch (a mean over the batch, BatchNorm statistics)?"
        )


def _ef_batch(
    module: nn.Module,
    fn: Fn,
    params: dict[str, Tensor],
    batch: tuple[Tensor, ...],
    chunk_size: int | None,
) -> tuple[dict[str, Tensor], Tensor]:
    call = _per_example(module, fn)

    def loglik(p: dict[str, Tensor], *example: Tensor) -> tuple[Tensor, Tensor]:
        total = call(p, *example).sum()
        return total, total.detach()

    dims = (None, *(0,) * len(batch))
    grads, values = vmap(grad(loglik, has_aux=True), in_dims=dims, chunk_size=chunk_size)(
        params, *batch
    )
    return {k: _sum_of_squares(g, 1) for k, g in grads.items()}, values


def _ggn_batch(
    module: nn.Module,
    output: Fn,
    likelihood: str,
    sigma: float,
    params: dict[str, Tensor],
    batch: tuple[Tensor, ...],
    chunk_size: int | None,
) -> tuple[dict[str, Tensor], Tensor]:
    call = _per_example(module, output)

    def roots(p: dict[str, Tensor], *example: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        # Lambda = L L^T, so diag(J^T Lambda J) = sum_c (J^T L_c)^2: one vector-Jacobian
        # product per column of L. For the softmax, L = diag(sqrt p) - p sqrt(p)^T (since
        # sum_c p_c = 1); for a Gaussian, L = I / sigma.
        out, pullback = vjp(lambda q: call(q, *example).reshape(-1), p)
        out = out.detach()
        if likelihood == "classification":
            probs = out.softmax(dim=-1)
            root = probs.sqrt()
            columns = torch.diag(root) - root.unsqueeze(-1) * probs  # row c: L_c
        else:
            columns = torch.eye(len(out), dtype=out.dtype, device=out.device) / sigma
        return vmap(pullback)(columns)[0], out

    dims = (None, *(0,) * len(batch))
    rows, out = vmap(roots, in_dims=dims, chunk_size=chunk_size)(params, *batch)
    h = {k: _sum_of_squares(r, 2).view_as(params[k]) for k, r in rows.items()}
    return h, out


def _sum_of_squares(t: Tensor, dims: int) -> Tensor:
    r"""Sums the squares of `t` over its first `dims` dims."""

    return t.flatten(0, dims - 1).square().sum(0)


def laplace_fit(
    module: nn.Module,
    fn: Fn,
    data: Iterable[Sequence[Tensor]],
    *,
    hessian: str = "ggn",
    output: Fn | None = None,
    likelihood: str | None = None,
    sigma: float = 1.0,
    include: Sequence[str] = ("",),
    exclude: Sequence[str] = (),
    chunk_size: int | None = None,
) -> LaplaceFit:
    r"""Computes the diagonal curvature of the negative log-likelihood at the current
    (trained) parameters of `module`, over the parameters picked by `include`/`exclude`.

    With per-datum log-likelihoods :math:`\ell_i(\theta) = \log p(y_i \mid x_i, \theta)`
    (`fn`) and model outputs :math:`f_i(\theta)` (`output`), the two curvatures are

    .. math:: h_\text{ef} = \sum_i (\nabla_\theta \ell_i)^2, \qquad
        h_\text{ggn} = \sum_i \mathrm{diag}(J_i^\top \Lambda_i J_i),

    the empirical Fisher and the generalized Gauss-Newton matrix, with :math:`J_i` the
    Jacobian of :math:`f_i` and :math:`\Lambda_i = -\partial^2 \ell_i / \partial f_i^2`:
    :math:`\mathrm{diag}(p_i) - p_i p_i^\top` with :math:`p_i = \mathrm{softmax}(f_i)` for
    classification, :math:`I / \sigma^2` for Gaussian regression. Both are sums over
    examples, computed by :func:`torch.func.vmap` over the examples of each batch: of
    :func:`torch.func.grad` for the empirical Fisher, of :func:`torch.func.vjp` with the
    columns of :math:`L_i`, :math:`\Lambda_i = L_i L_i^\top`, for the GGN
    (:math:`\mathrm{diag}(J^\top \Lambda J) = \sum_c (J^\top L_c)^2`, one product per output),
    with the parameters swapped in by :func:`bayesflow.vmap_call`. The GGN is positive
    semi-definite and is the better choice; the empirical Fisher needs only `fn` (Kunstner
    et al., 2019, on its limits).

    The module is evaluated in evaluation mode (dropout off, BatchNorm on its running
    statistics), and left in the modes, and with the parameters and buffers, it had.

    Example:
        >>> net = zuko.nn.MLP(4, 3, hidden_features=[8])
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> ll = lambda net, x, y: -torch.nn.functional.cross_entropy(net(x), y, reduction="none")
        >>> fit = laplace_fit(net, ll, [(x, y)], output=lambda net, x, y: net(x),
        ...                   likelihood="classification", include=["2"])
        >>> fit.hessian["2.weight"].shape, fit.num_data
        (torch.Size([3, 8]), 32)

    Arguments:
        module: The trained module.
        fn: The log-likelihood, `fn(module, *batch)`, returning per-datum log-likelihoods
            with the batch on dim 0 (other dims are summed per datum), as for
            :func:`bayesflow.nelbo`. It gives the empirical Fisher and
            :math:`\log p(\mathcal{D} \mid \theta_*)` of the evidence.
        data: An iterable of batches, each a tuple or list of tensors that share their
            leading (batch) dim, e.g. a :class:`torch.utils.data.DataLoader`; every batch
            is `(*args)` of `fn(module, *args)`. One pass.
        hessian: `"ggn"` (needs `output` and `likelihood`) or `"ef"`.
        output: For the GGN, the model output :math:`f`, `output(module, *batch)`, of
            shape `(B, C)` (logits, or the means of a Gaussian) or `(B,)`.
        likelihood: For the GGN, `"classification"` (softmax cross-entropy on `output`)
            or `"regression"` (a Gaussian with mean `output` and standard deviation
            `sigma`). It must be the likelihood `fn` computes.
        sigma: The noise standard deviation :math:`\sigma` of `"regression"`.
        include: Glob patterns of the parameters to fit (see :func:`bayesflow.select`),
            e.g. `["out"]` for a last layer named `out`.
        exclude: Glob patterns of the parameters to leave out.
        chunk_size: The number of examples per vectorized chunk (memory: the GGN holds
            `chunk_size x C` gradients); a whole batch at once if :py:`None`.

    Returns:
        The fit: the trained parameters, the curvature diagonals (both of the parameters'
        shapes), :math:`\log p(\mathcal{D} \mid \theta_*)` and :math:`N`.

    Raises:
        TypeError: If an argument or a batch has the wrong type.
        ValueError: If the patterns pick nothing, `hessian` or `likelihood` is unknown,
            `data` is empty, or `fn`/`output` do not return one row per datum (or give
            other numbers on one example than on the batch).

    References:
        | Laplace Redux -- Effortless Bayesian Deep Learning (Daxberger et al., 2021)
        | https://arxiv.org/abs/2106.14806

        | Limitations of the Empirical Fisher Approximation for Natural Gradient Descent
          (Kunstner et al., 2019)
        | https://arxiv.org/abs/1905.12558
    """

    return _fit(
        "laplace_fit",
        module,
        fn,
        data,
        hessian,
        output,
        likelihood,
        sigma,
        include,
        exclude,
        chunk_size,
    )


def _check_fit_args(
    where: str,
    module: object,
    fn: object,
    hessian: object,
    output: object,
    likelihood: object,
    sigma: object,
    include: Sequence[str],
    exclude: Sequence[str],
    chunk_size: object,
) -> tuple[list[str], float, int | None]:
    check_module(where, module)
    check_not_bridge(where, module)
    if not callable(fn):
        raise TypeError(
            f"{where}: expected fn to be a callable fn(module, *batch) returning per-datum "
            f"log-likelihoods, got {type(fn).__name__}"
        )
    if hessian not in HESSIANS:
        raise ValueError(f"{where}: expected hessian to be 'ggn' or 'ef', got {hessian!r}")
    check_callable(where, "output", output)
    if likelihood is not None and likelihood not in LIKELIHOODS:
        raise ValueError(
            f"{where}: expected likelihood to be 'classification', 'regression' or None, "
            f"got {likelihood!r}"
        )
    if hessian == "ggn" and (output is None or likelihood is None):
        raise ValueError(
            f"{where}: expected output and likelihood with hessian='ggn' (the GGN is "
            "J^T Lambda J of the model output), got "
            f"output={'None' if output is None else 'a callable'} and likelihood={likelihood!r}"
        )
    sigma = check_number(where, "sigma", sigma, 0.0, strict=True)
    if chunk_size is not None:
        chunk_size = check_int(where, "chunk_size", chunk_size, or_none=True)

    names = _posterior.select(where, module, include, exclude)
    if not names:
        raise ValueError(
            f"{where}: expected include={tuple(include)!r} and exclude={tuple(exclude)!r} to "
            f"pick at least one parameter of {type(module).__name__}, got none"
        )
    for name in names:
        p = module.get_parameter(name)
        if not p.is_floating_point():
            raise TypeError(
                f"{where}: expected real floating-point parameters, got {name!r} of dtype "
                f"{p.dtype}: exclude it"
            )
    return names, sigma, chunk_size


def _fit(
    where: str,
    module: nn.Module,
    fn: Fn,
    data: object,
    hessian: str,
    output: Fn | None,
    likelihood: str | None,
    sigma: float,
    include: Sequence[str],
    exclude: Sequence[str],
    chunk_size: int | None,
) -> LaplaceFit:
    names, sigma, chunk_size = _check_fit_args(
        where, module, fn, hessian, output, likelihood, sigma, include, exclude, chunk_size
    )
    batches = _batches(where, data)
    params = {k: module.get_parameter(k).detach() for k in names}
    h = {k: torch.zeros_like(p) for k, p in params.items()}
    log_likelihood = None
    num_data = 0

    with _evaluating(module), torch.no_grad():
        for batch in batches:
            size = batch[0].shape[0]
            ll = _check_per_datum(where, "fn", fn(module, *batch), size)
            per_datum = ll.reshape(size, -1).sum(1)
            if hessian == "ef":
                hb, parts = _ef_batch(module, fn, params, batch, chunk_size)
                _check_split(where, "fn", per_datum, parts)
            else:
                f = _check_per_datum(where, "output", output(module, *batch), size)
                if f.dim() > 2 or (
                    likelihood == "classification" and (f.dim() != 2 or f.shape[1] < 2)
                ):
                    shapes = (
                        "(B, C), C >= 2" if likelihood == "classification" else "(B, C) or (B,)"
                    )
                    raise ValueError(
                        f"{where}: expected output of shape {shapes}, got {tuple(f.shape)}"
                    )
                hb, parts = _ggn_batch(
                    module, output, likelihood, sigma, params, batch, chunk_size
                )
                _check_split(where, "output", f.reshape(size, -1), parts)
            for k in h:
                h[k] += hb[k]
            total = ll.sum()
            log_likelihood = total if log_likelihood is None else log_likelihood + total
            num_data += size

    if log_likelihood is None:
        raise ValueError(f"{where}: expected data with at least one datum, got none")

    return LaplaceFit(
        mean={k: p.clone() for k, p in params.items()},
        hessian=h,
        log_likelihood=log_likelihood,
        num_data=num_data,
    )


def _check_fit(where: str, fit: object) -> LaplaceFit:
    if not isinstance(fit, LaplaceFit):
        raise TypeError(
            f"{where}: expected a bayesflow.LaplaceFit (from laplace_fit), got "
            f"{type(fit).__name__}"
        )
    return fit


def _positive(where: str, what: str, value: Tensor) -> None:
    v = value.detach()
    if not (torch.isfinite(v).all() and (v > 0).all()):
        raise ValueError(
            f"{where}: expected a finite positive {what}, got {v.flatten()[:4].tolist()}"
        )


def _prior_precision(
    where: str, names: Sequence[str], like: Mapping[str, Tensor], prior_precision: object
) -> dict[str, Tensor]:
    r"""Returns the prior precision of every name, a tensor broadcastable to the parameter
    (differentiable where `prior_precision` is a tensor)."""

    def one(name: str, value: object) -> Tensor:
        p = like[name]
        if isinstance(value, Tensor):
            if not value.is_floating_point():
                raise TypeError(
                    f"{where}: expected a floating-point prior_precision, got {value.dtype}"
                )
            t = value.to(p.dtype)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            t = torch.tensor(float(value), dtype=p.dtype, device=p.device)
        else:
            raise TypeError(
                f"{where}: expected prior_precision to be a positive number, a tensor or a "
                f"dict of them by parameter name, got {type(value).__name__}"
            )
        _positive(where, f"prior_precision for {name!r}", t)
        try:
            fits = torch.broadcast_shapes(t.shape, p.shape) == p.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"{where}: expected prior_precision for {name!r} to broadcast to "
                f"{tuple(p.shape)}, got shape {tuple(t.shape)}"
            )
        return t

    if isinstance(prior_precision, Mapping):
        unknown = sorted(set(prior_precision) - set(names))
        missing = [n for n in names if n not in prior_precision]
        if unknown or missing:
            raise ValueError(
                f"{where}: expected prior_precision to map every fitted parameter name, got "
                f"unknown names {unknown} and missing names {missing}"
            )
        return {n: one(n, prior_precision[n]) for n in names}
    return {n: one(n, prior_precision) for n in names}


def laplace_marglik(fit: LaplaceFit, prior_precision: PriorPrecision) -> Tensor:
    r"""Returns the Laplace approximation of the log evidence :math:`\log p(\mathcal{D})`
    for the prior :math:`\mathcal{N}(0, \mathrm{diag}(\lambda)^{-1})`,

    .. math:: \log p(\mathcal{D}) \approx \log p(\mathcal{D} \mid \theta_*)
        - \frac{1}{2} \sum_j \left( \log (h_j + \lambda_j) - \log \lambda_j
        + \lambda_j \theta_{*j}^2 \right),

    the log-likelihood at the trained parameters, plus the log prior there, plus the log
    volume of the posterior (MacKay, 1992), for a diagonal curvature :math:`h`.

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> ll = lambda net, x, y: -torch.nn.functional.cross_entropy(net(x), y, reduction="none")
        >>> fit = laplace_fit(net, ll, [(x, y)], hessian="ef")
        >>> log_prec = torch.zeros((), requires_grad=True)
        >>> laplace_marglik(fit, log_prec.exp()).backward()
        >>> log_prec.grad.shape
        torch.Size([])

    Arguments:
        fit: The curvature and log-likelihood at the trained parameters
            (:func:`laplace_fit`).
        prior_precision: :math:`\lambda > 0`: a number, a tensor (a scalar, or of a shape
            that broadcasts to every parameter), or a dict from every fitted name to one of
            those (one precision per parameter tensor, or per element).

    Returns:
        A scalar tensor, differentiable with respect to `prior_precision`.

    References:
        | A Practical Bayesian Framework for Backpropagation Networks (MacKay, 1992)
        | https://doi.org/10.1162/neco.1992.4.3.448

        | Laplace Redux -- Effortless Bayesian Deep Learning (Daxberger et al., 2021)
        | https://arxiv.org/abs/2106.14806
    """

    where = "laplace_marglik"
    _check_fit(where, fit)
    lam = _prior_precision(where, list(fit.mean), fit.mean, prior_precision)

    penalty = fit.log_likelihood.new_zeros(())
    for k, m in fit.mean.items():
        prec = torch.broadcast_to(lam[k], m.shape)
        penalty = penalty + (
            (fit.hessian[k] + prec).log().sum() - prec.log().sum() + (prec * m.square()).sum()
        )
    return fit.log_likelihood - 0.5 * penalty


def _groups(fit: LaplaceFit, structure: str) -> dict[str, list[str]]:
    if structure == "scalar":
        return {"": list(fit.mean)}
    return {k: [k] for k in fit.mean}


def _argmax(h: Tensor, square: float) -> float:
    r"""Returns the :math:`\log \lambda` in :math:`[-L, L]` that maximizes the evidence of a
    group: the root of :math:`g(u) = P - \sum_j \lambda / (h_j + \lambda) - \lambda s`,
    :math:`\lambda = e^u`, decreasing in :math:`u` (the evidence is concave in
    :math:`\log \lambda`), by Newton steps kept inside a shrinking bracket."""

    size = h.numel()

    def g(u: float) -> tuple[float, float]:
        lam = math.exp(u)
        r = lam / (h + lam)
        return size - r.sum().item() - lam * square, -(r * (1 - r)).sum().item() - lam * square

    lo, hi = -LOGVAR_LIMIT, LOGVAR_LIMIT
    if g(hi)[0] >= 0:
        return hi
    if g(lo)[0] <= 0:
        return lo
    u = 0.0
    for _ in range(200):
        value, slope = g(u)
        if value > 0:
            lo = u
        else:
            hi = u
        step = u - value / slope if slope < 0 else (lo + hi) / 2
        if not lo < step < hi:
            step = (lo + hi) / 2
        if abs(step - u) < 1e-13 * max(1.0, abs(u)):
            return step
        u = step
    return u


def optimize_prior_precision(
    fit: LaplaceFit, structure: str = "scalar"
) -> float | dict[str, float]:
    r"""Returns the prior precision that maximizes the Laplace evidence
    (:func:`laplace_marglik`) of a fit.

    For a diagonal curvature the evidence separates over groups of parameters that share a
    precision :math:`\lambda`, and is concave in :math:`\log \lambda`: its maximum is the
    root of MacKay's condition :math:`\lambda \lVert \theta_* \rVert^2 = \gamma`, with
    :math:`\gamma = \sum_j h_j / (h_j + \lambda)` the effective number of parameters,
    found to machine precision by safeguarded Newton steps on :math:`\log \lambda` (no
    learning rate, no step count). The precision is kept within :math:`[e^{-L}, e^{L}]`,
    :math:`L \approx 17.98`, the range of variances a posterior can hold.

    Example:
        >>> net = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
        >>> ll = lambda net, x, y: -torch.nn.functional.cross_entropy(net(x), y, reduction="none")
        >>> fit = laplace_fit(net, ll, [(x, y)], output=lambda net, x, y: net(x),
        ...                   likelihood="classification")
        >>> prec = optimize_prior_precision(fit)
        >>> q = laplace_posterior(fit, prec)

    Arguments:
        fit: The fit (:func:`laplace_fit`).
        structure: `"scalar"`, one precision for every parameter, or `"tensor"`, one per
            parameter tensor (laplace-torch's `"layerwise"`).

    Returns:
        The precision: a float for `"scalar"`, a dict from every fitted name to a float for
        `"tensor"`; either can be passed to :func:`laplace_posterior`.

    References:
        | A Practical Bayesian Framework for Backpropagation Networks (MacKay, 1992)
        | https://doi.org/10.1162/neco.1992.4.3.448
    """

    where = "optimize_prior_precision"
    _check_fit(where, fit)
    if structure not in STRUCTURES:
        raise ValueError(
            f"{where}: expected structure to be 'scalar' or 'tensor', got {structure!r}"
        )

    best = {}
    for group, names in _groups(fit, structure).items():
        h = torch.cat([fit.hessian[k].detach().reshape(-1) for k in names]).double().cpu()
        square = sum(fit.mean[k].detach().double().square().sum().item() for k in names)
        best[group] = math.exp(_argmax(h, square))

    if structure == "scalar":
        return best[""]
    return best


def laplace_posterior(fit: LaplaceFit, prior_precision: PriorPrecision = 1.0) -> Posterior:
    r"""Returns the Laplace posterior :math:`\mathcal{N}(\theta_*, \mathrm{diag}(h +
    \lambda)^{-1})` of a fit, for the prior :math:`\mathcal{N}(0, \mathrm{diag}(\lambda)^{-1})`.

    Variances are written as a :class:`bayesflow.Posterior` holds them, within
    :math:`[e^{-L}, e^{L}]`, :math:`L \approx 17.98`: a precision above
    :math:`e^{L} \approx 6.5 \cdot 10^7` gives the variance :math:`e^{-L}`.

    Arguments:
        fit: The fit (:func:`laplace_fit`).
        prior_precision: :math:`\lambda > 0`, as in :func:`laplace_marglik`.

    Returns:
        A posterior over the fitted parameters whose tensors are fresh leaves with
        `requires_grad=True`, as :func:`bayesflow.init` makes them.
    """

    where = "laplace_posterior"
    _check_fit(where, fit)
    lam = _prior_precision(where, list(fit.mean), fit.mean, prior_precision)
    with torch.no_grad():
        variance = {k: 1 / (fit.hessian[k] + lam[k]) for k in fit.mean}
    return _posterior.posterior_from_variance(where, fit.mean, variance)


def laplace(
    module: nn.Module,
    fn: Fn,
    data: Iterable[Sequence[Tensor]],
    *,
    hessian: str = "ggn",
    output: Fn | None = None,
    likelihood: str | None = None,
    sigma: float = 1.0,
    include: Sequence[str] = ("",),
    exclude: Sequence[str] = (),
    prior_precision: PriorPrecision | str = 1.0,
    chunk_size: int | None = None,
) -> Posterior:
    r"""Returns the diagonal Laplace approximation of the posterior of a trained module,
    :math:`\mathcal{N}(\theta_*, \mathrm{diag}(h + \lambda)^{-1})` over the parameters
    picked by `include`/`exclude`.

    It is :func:`laplace_fit`, then :func:`optimize_prior_precision` (if
    `prior_precision="marglik"`), then :func:`laplace_posterior`; call them one by one to
    keep the fit, e.g. to try several precisions or read :func:`laplace_marglik`. The
    posterior is a :class:`bayesflow.Posterior` like any other: :func:`bayesflow.sample`
    and :func:`bayesflow.vmap_call` give its predictive.

    Example:
        >>> net = zuko.nn.MLP(4, 3, hidden_features=[8])
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> ll = lambda net, x, y: -torch.nn.functional.cross_entropy(net(x), y, reduction="none")
        >>> q = laplace(net, ll, [(x, y)], output=lambda net, x, y: net(x),
        ...             likelihood="classification", prior_precision="marglik")
        >>> bayesflow.vmap_call(net, bayesflow.sample(q, 16), x).shape
        torch.Size([16, 32, 3])

    Arguments:
        module, fn, data, hessian, output, likelihood, sigma, include, exclude, chunk_size:
            As in :func:`laplace_fit`.
        prior_precision: The prior precision :math:`\lambda`, as in
            :func:`laplace_marglik`, or `"marglik"` for one precision for all that
            maximizes the evidence.

    Returns:
        A posterior over the picked parameters, centred on their current values, whose
        tensors are fresh leaves with `requires_grad=True`.

    References:
        | Laplace Redux -- Effortless Bayesian Deep Learning (Daxberger et al., 2021)
        | https://arxiv.org/abs/2106.14806
    """

    where = "laplace"
    names, _, _ = _check_fit_args(
        where, module, fn, hessian, output, likelihood, sigma, include, exclude, chunk_size
    )
    if isinstance(prior_precision, str):
        if prior_precision != "marglik":
            raise ValueError(
                f"{where}: expected prior_precision to be positive, a dict of them or "
                f"'marglik', got {prior_precision!r}"
            )
    else:
        like = {k: module.get_parameter(k) for k in names}
        _prior_precision(where, names, like, prior_precision)

    fit = _fit(
        where, module, fn, data, hessian, output, likelihood, sigma, include, exclude, chunk_size
    )
    if prior_precision == "marglik":
        prior_precision = optimize_prior_precision(fit)
    return laplace_posterior(fit, prior_precision)


def _linear_layer(module: nn.Module, names: list[str]) -> tuple[nn.Linear, str] | None:
    r"""Returns the :class:`torch.nn.Linear` whose weight (and maybe bias) are all of
    `names`, with the prefix of their names."""

    for prefix, m in module.named_modules():
        if type(m) is nn.Linear:
            dot = f"{prefix}." if prefix else ""
            own = {f"{dot}{n}" for n, _ in m.named_parameters()}
            if f"{dot}weight" in names and set(names) <= own:
                return m, dot
    return None


def _last_layer_variance(
    module: nn.Module,
    posterior: Posterior,
    fn: Fn,
    args: tuple,
    layer: nn.Linear,
    prefix: str,
) -> tuple[Tensor, Tensor] | None:
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    try:
        out = vmap_call(module, mean_params(posterior), *args, fn=fn)[0]
    finally:
        handle.remove()
    if len(seen) != 1:
        return None
    phi, z = seen[0]
    if phi.dim() != 2 or not isinstance(out, Tensor) or out.shape != z.shape:
        return None
    if not torch.equal(out, z):
        return None
    var = _var(posterior.logvar[f"{prefix}weight"])
    f_var = phi.square() @ var.T
    bias = posterior.logvar.get(f"{prefix}bias")
    if bias is not None:
        f_var = f_var + _var(bias)
    return out, f_var


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
    `fn`, the model is linear in those parameters and the variance is read from the
    layer's input features :math:`\phi` (a forward hook) as
    :math:`\phi^2 \sigma_W^{2\top} + \sigma_b^2`; otherwise the Jacobians come from
    :func:`torch.func.jacrev` vectorized over the examples.

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
        detached.

    References:
        | Laplace Redux -- Effortless Bayesian Deep Learning (Daxberger et al., 2021)
        | https://arxiv.org/abs/2106.14806
    """

    where = "linearized_predictive"
    check_module(where, module)
    check_not_bridge(where, module)
    check_posterior(where, posterior)
    _posterior.check_matches(where, module, posterior)
    check_callable(where, "fn", fn)
    if chunk_size is not None:
        chunk_size = check_int(where, "chunk_size", chunk_size, or_none=True)
    if not args:
        raise ValueError(f"{where}: expected at least one input tensor, got none")
    for j, a in enumerate(args):
        if not isinstance(a, Tensor) or a.dim() == 0 or a.shape[0] != args[0].shape[0]:
            what = f"shape {tuple(a.shape)}" if isinstance(a, Tensor) else type(a).__name__
            raise ValueError(
                f"{where}: expected input tensors that share a leading batch dim, got {what} "
                f"at position {j}"
            )
    fn = (lambda m, *a: m(*a)) if fn is None else fn
    size = args[0].shape[0]
    names = list(posterior.mean)

    with torch.no_grad():
        out = _check_per_datum(
            where, "fn", vmap_call(module, mean_params(posterior), *args, fn=fn)[0], size
        )
        if out.dim() > 2:
            raise ValueError(
                f"{where}: expected fn to return (B, C) or (B,), got {tuple(out.shape)}"
            )

        found = _linear_layer(module, names)
        if found is not None:
            last = _last_layer_variance(module, posterior, fn, args, *found)
            if last is not None:
                return last[0].detach(), last[1].detach()

        f_var = _jacobian_variance(module, posterior, fn, args, chunk_size)
    return out.detach(), f_var.reshape(out.shape)


def _jacobian_variance(
    module: nn.Module, posterior: Posterior, fn: Fn, args: tuple, chunk_size: int | None
) -> Tensor:
    r"""Returns :math:`\sum_j J_{cj}^2 \sigma_j^2` per example and output, `(B, C)`, with
    the Jacobians at the posterior mean by :func:`torch.func.jacrev` over examples."""

    call = _per_example(module, fn)
    mean = {k: m.detach() for k, m in posterior.mean.items()}
    var = {k: _var(lv.detach()) for k, lv in posterior.logvar.items()}

    def f(p: dict[str, Tensor], *example: Tensor) -> Tensor:
        return call(p, *example).reshape(-1)

    with torch.no_grad():
        jac = vmap(jacrev(f), in_dims=(None, *(0,) * len(args)), chunk_size=chunk_size)(
            mean, *args
        )
        return sum((j.square() * var[k]).flatten(2).sum(-1) for k, j in jac.items())


def probit_probs(mean: Tensor, var: Tensor) -> Tensor:
    r"""Returns the probit approximation of the predictive probabilities of a Gaussian
    over logits, :math:`\mathrm{softmax}(\kappa \odot m)` with
    :math:`\kappa = (1 + \frac{\pi}{8} v)^{-1/2}`.

    With :func:`linearized_predictive`, the linearized (GLM) predictive of a Laplace
    posterior, without sampling (MacKay, 1992; laplace-torch's `link_approx="probit"`).

    Example:
        >>> probit_probs(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]]))
        tensor([[0.8808, 0.1192]])

    Arguments:
        mean: The means :math:`m` of the logits, `(..., C)`.
        var: Their variances :math:`v \geq 0`, of the same shape.

    Returns:
        Probabilities of the shape of `mean`, summing to 1 over the last dim.

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
    if (var < 0).any():
        raise ValueError(f"{where}: expected variances >= 0, got {var.min().item()}")
    kappa = (1 + math.pi / 8 * var).rsqrt()
    return (kappa * mean).softmax(dim=-1)
