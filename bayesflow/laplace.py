r"""Laplace approximations after training: a diagonal Gaussian at the trained parameters,
with its curvature from the training data, its prior precision from the evidence."""

from __future__ import annotations

__all__ = [
    "HESSIANS",
    "LIKELIHOODS",
    "LaplaceFit",
    "laplace",
    "laplace_fit",
    "laplace_marglik",
    "laplace_posterior",
    "optimize_prior_precision",
]

import math
import numbers

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn

from torch import Tensor

from . import _curvature, _posterior
from ._checks import check_broadcasts, check_real, describe
from ._curvature import HESSIANS, LIKELIHOODS, Fn, check_fit_args
from ._numerics import LOGVAR_LIMIT, accumulator
from ._types import Posterior

STRUCTURES = ("scalar", "tensor")

# The posterior holds a precision as at most e^(L + 1): any precision above e^L gives the
# least variance e^-L, and this one is in float32's range, as a float64 above 3.4e38 is not.
_MOST = math.exp(LOGVAR_LIMIT + 1.0)

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

    A last layer costs one forward pass per batch (and one of `output`, where it does not
    return the module's output itself, as `module(x)` does): for the weight :math:`W` (and bias
    :math:`b`) of one :class:`torch.nn.Linear` whose output is `output`'s, with input
    features :math:`\phi_i` (read by a forward hook),

    .. math:: h_{W_{cj}} = \sum_i \Lambda_{i,cc} \phi_{ij}^2, \qquad
        h_{b_c} = \sum_i \Lambda_{i,cc},

    and for the empirical Fisher of any linear layer that runs once,
    :math:`\Lambda_{i,cc}` is replaced by :math:`g_{ic}^2`, with :math:`g_i` the gradient
    of :math:`\ell_i` in the layer's output. This closed form is used by itself where it
    holds: the layer runs once per call, no operation outside that call takes its
    parameters (seen on the first batch, whatever the data: a second use of the weight
    that vanishes on some examples still counts), for the GGN `output` equals the layer's
    output on every batch, and the first and the last example of a batch give what the
    per-example path gives (until a batch of two examples or more has passed).
    From the first batch where one of these fails, the per-example path takes over.

    The module is evaluated in evaluation mode (dropout off, BatchNorm on its running
    statistics), and left in the modes, and with the parameters and buffers (the same
    tensors, with the same values), it had, also where the call raises. Every batch runs on
    the buffers as found.

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
            e.g. `["out"]` for a last layer named `out`. Frozen parameters
            (`requires_grad=False`: not trained, so at no mode) are left out, whatever the
            patterns, as laplace-torch leaves them.
        exclude: Glob patterns of the parameters to leave out.
        chunk_size: The number of examples per vectorized chunk (memory: the GGN holds
            `chunk_size x C` gradients); a whole batch at once if :py:`None`.

    Returns:
        The fit: the trained parameters (of the parameters' shapes and dtypes), the
        curvature diagonals (of the parameters' shapes, in their dtype or float32 if wider:
        a module in half precision gets float32 curvatures), :math:`\log p(\mathcal{D}
        \mid \theta_*)` (in `fn`'s dtype or float32 if wider) and :math:`N`. Sums over
        many batches, and curvatures beyond 65504, do not fit half precision.

    Raises:
        TypeError: If an argument or a batch has the wrong type.
        ValueError: If the patterns pick nothing, `hessian` or `likelihood` is unknown,
            `data` is empty, `fn`/`output` do not return one row per datum (or give
            other numbers on one example than on the batch: `output` on every example,
            `fn` on every example for the empirical Fisher and on the first and last of
            a batch for the GGN), the module holds a batch normalization without running
            statistics (it mixes the examples of a batch) or an :class:`torch.nn.Embedding`
            or :class:`torch.nn.EmbeddingBag` with `max_norm` (it renormalizes its weight
            in place at every forward; both refused before any forward), or its forward
            writes its buffers in a way the per-example transforms cannot run or draws
            random numbers in evaluation mode (dropout with `training=True`); or if `output`
            (the GGN) or `fn` (the empirical Fisher) returns a result without a gradient in
            the picked parameters (computed under :func:`torch.no_grad`, or detached), whose
            curvature would be 0. The module is left in its modes, given back through
            :meth:`torch.nn.Module.train` (which a layer may override), and with its buffers
            as found, also where the call raises; and there torch's default generators too.

    References:
        | Laplace Redux -- Effortless Bayesian Deep Learning (Daxberger et al., 2021)
        | https://arxiv.org/abs/2106.14806

        | Limitations of the Empirical Fisher Approximation for Natural Gradient Descent
          (Kunstner et al., 2019)
        | https://arxiv.org/abs/1905.12558
    """

    where = "laplace_fit"
    options = check_fit_args(
        where, module, fn, hessian, output, likelihood, sigma, include, exclude, chunk_size
    )
    return LaplaceFit(*_curvature.fit(where, module, fn, data, options))


def _check_fit(where: str, fit: object, likelihood: bool = True) -> LaplaceFit:
    r"""Checks a fit as :func:`laplace_fit` makes it, or as edited with `fit._replace`: the
    same names in `mean` and `hessian`, each curvature of its mean's shape and device, and
    its dtype or float32 for a half-precision mean, finite and non-negative, finite means,
    a finite scalar log-likelihood and `num_data >= 1`. The values take one reduction per
    tensor and one synchronization per device. Without `likelihood` (for what does not
    read it), the log-likelihood may be infinite."""

    if not isinstance(fit, LaplaceFit):
        raise TypeError(
            f"{where}: expected a bayesflow.LaplaceFit (from laplace_fit), got "
            f"{type(fit).__name__}"
        )
    for field in ("mean", "hessian"):
        value = getattr(fit, field)
        if not isinstance(value, Mapping):
            raise TypeError(
                f"{where}: expected fit.{field} to be a dict from parameter names to tensors, "
                f"got {type(value).__name__}"
            )
    if not fit.mean:
        raise ValueError(f"{where}: expected a fit of at least one parameter, got none")
    if fit.mean.keys() != fit.hessian.keys():
        missing = [k for k in fit.mean if k not in fit.hessian]
        extra = [k for k in fit.hessian if k not in fit.mean]
        raise ValueError(
            f"{where}: expected fit.hessian with the names of fit.mean, {list(fit.mean)}, "
            f"got {missing} missing and {extra} extra"
        )

    ok = []
    for name, m in fit.mean.items():
        h = fit.hessian[name]
        for field, t in (("mean", m), ("hessian", h)):
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"{where}: expected fit.{field}[{name!r}] to be a tensor, got "
                    f"{type(t).__name__}"
                )
        if not m.is_floating_point():
            raise TypeError(
                f"{where}: expected fit.mean[{name!r}] to be a floating-point tensor, got "
                f"{m.dtype}"
            )
        if h.shape != m.shape:
            raise ValueError(
                f"{where}: expected fit.hessian[{name!r}] of its mean's shape "
                f"{tuple(m.shape)}, got {tuple(h.shape)}"
            )
        if h.dtype not in (m.dtype, accumulator(m.dtype)) or h.device != m.device:
            wide = "" if accumulator(m.dtype) == m.dtype else " (or float32)"
            raise ValueError(
                f"{where}: expected fit.hessian[{name!r}] with its mean's dtype{wide} and "
                f"device, {describe(m)}, got {describe(h)}"
            )
        m, h = m.detach(), h.detach()
        ok.append(m.isfinite().all() & (h.isfinite() & (h >= 0)).all())

    ll = fit.log_likelihood
    if not isinstance(ll, Tensor) or not ll.is_floating_point():
        got = ll.dtype if isinstance(ll, Tensor) else type(ll).__name__
        raise TypeError(
            f"{where}: expected fit.log_likelihood to be a floating-point tensor, got {got}"
        )
    if ll.dim() != 0:
        raise ValueError(
            f"{where}: expected fit.log_likelihood to be a scalar, got shape {tuple(ll.shape)}"
        )
    n = fit.num_data
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{where}: expected fit.num_data to be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{where}: expected fit.num_data >= 1, got {n}")
    if likelihood:  # the evidence reads it; the posterior does not (-inf in float16 is fine)
        ok.append(ll.detach().isfinite())

    devices: dict[torch.device, list[Tensor]] = {}
    for flag in ok:
        devices.setdefault(flag.device, []).append(flag)
    if all(bool(torch.stack(flags).all()) for flags in devices.values()):
        return fit

    # Only on the way to an error: which tensor, and what it holds.
    for name, m in fit.mean.items():
        h = fit.hessian[name].detach()
        for field, t, good in (
            ("mean", m.detach(), m.detach().isfinite()),
            ("hessian", h, h.isfinite() & (h >= 0)),
        ):
            if not good.all():
                bad = t[~good]
                what = "finite values" if field == "mean" else "finite values >= 0"
                raise ValueError(
                    f"{where}: expected {what} in fit.{field}[{name!r}], got {bad[0].item()} "
                    f"({bad.numel()} of {t.numel()} entries)"
                )
    raise ValueError(f"{where}: expected a finite fit.log_likelihood, got {ll.item()}")


def _positive(where: str, what: str, value: Tensor) -> None:
    v = value.detach()
    if not (torch.isfinite(v).all() and (v > 0).all()):
        raise ValueError(
            f"{where}: expected a finite positive {what}, got {v.flatten()[:4].tolist()}"
        )


def _prior_precision(
    where: str,
    names: Sequence[str],
    like: Mapping[str, Tensor],
    prior_precision: object,
    least: torch.dtype = torch.float32,
    most: float | None = None,
) -> dict[str, Tensor]:
    r"""Returns the prior precision of every name, a tensor broadcastable to the parameter
    (differentiable where `prior_precision` is a tensor), held in the wider of the
    parameter's dtype and `least`, at least float32: a float16 parameter takes precisions
    above 65504. It is checked as given, before the cast; with `most`, it is held as at
    most `most`."""

    def one(name: str, value: object) -> Tensor:
        p = like[name]
        dtype = torch.promote_types(accumulator(p.dtype), least)
        what = f"prior_precision for {name!r}"
        if isinstance(value, Tensor):
            if not value.is_floating_point():
                raise TypeError(
                    f"{where}: expected a floating-point prior_precision, got {value.dtype}"
                )
            if value.is_meta:
                raise ValueError(
                    f"{where}: expected a {what} with data, got a tensor on the meta device"
                )
            given = value
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = check_real(where, what, value)  # an int beyond floats: infinite
            given = torch.tensor(number, dtype=torch.float64)  # on the CPU: any device
        else:
            raise TypeError(
                f"{where}: expected prior_precision to be a positive number, a tensor or a "
                f"dict of them by parameter name, got {type(value).__name__}"
            )
        _positive(where, what, given)
        check_broadcasts(where, what, given, p.shape)
        if isinstance(value, Tensor):
            t = value.to(dtype) if most is None else value.clamp(max=most).to(dtype)
        else:
            v = number if most is None else min(number, most)
            t = torch.tensor(v, dtype=dtype, device=p.device)
        if not (torch.isfinite(t).all() and (t > 0).all()):  # a float64 beyond float32's range
            raise ValueError(
                f"{where}: expected a {what} that {dtype} holds (the precision of {p.dtype} "
                f"parameters is held in it), got {given.detach().flatten()[:4].tolist()}"
            )
        return t

    if isinstance(prior_precision, Mapping):
        if set(prior_precision) != set(names):
            raise ValueError(
                f"{where}: expected prior_precision to map every fitted parameter name, "
                f"{list(names)}, and no other, got {list(prior_precision)}"
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
        A scalar tensor, differentiable with respect to `prior_precision`, computed in
        the widest of float32, the log-likelihood's dtype and the parameters' dtypes, with
        the precision held in it: a half-precision fit's evidence in float32 (its two
        sums of logs, of thousands each, nearly cancel, and in the half dtype would leave
        it tens of nats off).

    Raises:
        TypeError: If `fit` is not a :class:`LaplaceFit` or holds a field of the wrong type.
        ValueError: If `fit`, e.g. as edited with `fit._replace`, is not what
            :func:`laplace_fit` gives: a `hessian` without the names, shapes, dtypes and
            devices of `mean`, a negative or non-finite curvature, a non-finite mean or
            `log_likelihood`; or if `prior_precision` is not finite and positive, does not
            broadcast, or (a float64 precision beyond about :math:`3.4 \cdot 10^{38}` or
            below about :math:`10^{-45}`) does not fit a float32 evidence.

    References:
        | A Practical Bayesian Framework for Backpropagation Networks (MacKay, 1992)
        | https://doi.org/10.1162/neco.1992.4.3.448

        | Laplace Redux -- Effortless Bayesian Deep Learning (Daxberger et al., 2021)
        | https://arxiv.org/abs/2106.14806
    """

    where = "laplace_marglik"
    _check_fit(where, fit)
    # The two sums of logs, thousands each, nearly cancel: rounded to a half dtype's three
    # significant digits, they would put the evidence tens of nats off.
    dtype = accumulator(fit.log_likelihood.dtype)
    for m in fit.mean.values():
        dtype = torch.promote_types(dtype, m.dtype)
    lam = _prior_precision(where, list(fit.mean), fit.mean, prior_precision, least=dtype)

    penalty = fit.log_likelihood.new_zeros((), dtype=dtype)
    for k, m in fit.mean.items():
        m, h = m.to(dtype), fit.hessian[k].to(dtype)
        prec = torch.broadcast_to(lam[k], m.shape)
        penalty = penalty + ((h + prec).log().sum() - prec.log().sum() + (prec * m.square()).sum())
    return fit.log_likelihood.to(dtype) - 0.5 * penalty


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

    Raises:
        TypeError: If `fit` is not a :class:`LaplaceFit` or holds a field of the wrong type.
        ValueError: If `fit`, e.g. as edited with `fit._replace`, is not what
            :func:`laplace_fit` gives: a `hessian` without the names, shapes, dtypes and
            devices of `mean`, a negative or non-finite curvature, a non-finite mean or
            `log_likelihood`; or if `structure` is unknown.

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
    :math:`e^{L} \approx 6.5 \cdot 10^7` gives the variance :math:`e^{-L}`. The
    precision and :math:`1 / (h + \lambda)` are computed in at least float32 (a float16 fit
    takes precisions above its largest number, 65504), then the log-variances are rounded
    to the parameters' dtype.

    Arguments:
        fit: The fit (:func:`laplace_fit`).
        prior_precision: :math:`\lambda > 0`, as in :func:`laplace_marglik`.

    Returns:
        A posterior over the fitted parameters whose tensors are fresh leaves with
        `requires_grad=True`, as :func:`bayesflow.init` makes them.

    Raises:
        TypeError: If `fit` is not a :class:`LaplaceFit` or holds a field of the wrong type.
        ValueError: If `fit`, e.g. as edited with `fit._replace`, is not what
            :func:`laplace_fit` gives: a `hessian` without the names, shapes, dtypes and
            devices of `mean`, a negative or non-finite curvature or a non-finite mean (its
            `log_likelihood`, which it does not read, may be infinite); or if
            `prior_precision` is not finite and positive, does not broadcast, or (a float64
            precision below about :math:`10^{-45}`) is 0 in float32.
    """

    where = "laplace_posterior"
    _check_fit(where, fit, likelihood=False)
    lam = _prior_precision(where, list(fit.mean), fit.mean, prior_precision, most=_MOST)
    with torch.no_grad():  # in the precision's dtype, at least float32
        variance = {k: 1 / (fit.hessian[k].to(lam[k].dtype) + lam[k]) for k in fit.mean}
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
    options = check_fit_args(
        where, module, fn, hessian, output, likelihood, sigma, include, exclude, chunk_size
    )
    if isinstance(prior_precision, str):
        if prior_precision != "marglik":
            raise ValueError(
                f"{where}: expected prior_precision to be positive, a dict of them or "
                f"'marglik', got {prior_precision!r}"
            )
    else:
        like = {k: module.get_parameter(k) for k in options.names}
        _prior_precision(where, options.names, like, prior_precision, most=_MOST)

    fit = LaplaceFit(*_curvature.fit(where, module, fn, data, options))
    fit = _check_fit(where, fit, likelihood=isinstance(prior_precision, str))
    if isinstance(prior_precision, str):
        prior_precision = optimize_prior_precision(fit)
    return laplace_posterior(fit, prior_precision)
