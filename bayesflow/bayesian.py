r"""The torch bridge: a drop-in superset of :class:`zuko.bayesian.BayesianModel`."""

from __future__ import annotations

__all__ = ["BayesianModel"]

import copy
import numbers

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from torch import Tensor

from . import _posterior
from ._checks import check_generator, check_in_dims, check_module, check_n
from ._engine import (
    check_no_parametrization_cache,
    draw_state,
    hold,
    restore_draw_state,
    run,
)
from ._layers import Cached, LocalPlan
from ._options import call_options
from ._outputs import map_outputs, stack
from ._posterior import InitLogvar
from ._structure import lock
from ._types import Posterior


def _zuko_flag(where: str, what: str, value: object) -> bool:
    r"""A flag as zuko reads it (`if local_trick:`), on what config files hold: a bool,
    0, 1 or :py:`None`."""

    if value is None:
        return False
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{where}: expected {what} to be a bool (or 0, 1, None), got {value!r}")


class BayesianModel(nn.Module):
    r"""Creates a Bayesian wrapper around a base model.

    It accepts everything :class:`zuko.bayesian.BayesianModel` accepts, holds the same
    state (`means` and `logvars` parameter dicts whose keys are the parameter names with
    `.` replaced by `-`) and behaves the same. On top of that, it runs `n` sampled models
    in one vectorized pass (:meth:`forward`) and exposes the posterior to the functional
    API (:attr:`posterior`).

    Example:
        >>> bnet = BayesianModel(zuko.nn.MLP(3, 5), init_logvar=-6.0)
        >>> bnet(torch.randn(16, 3), n=8).shape
        torch.Size([8, 16, 5])

    Arguments:
        base: A base model.
        init_logvar: The initial log-variance, as in :func:`bayesflow.init`. As in zuko,
            a little noise (standard deviation :math:`10^{-3}`) is added to it.
        include_params: Glob patterns of the parameters to make Bayesian: `*` matches one
            name segment, `**` several (see :func:`bayesflow.select`). All by default.
            Unlike zuko's, a pattern matches whole segments only: `"1"` picks `1.weight`
            but not `10.weight` (zuko's trailing dot, `"1."`, changes nothing), and
            `"**.bias"` no LSTM `bias_ih_l0` (write `"**.bias*"`); and `*` may match
            nothing: `"enc*"` picks `enc.weight` as well as `enc_head.weight` (zuko's only
            the latter). Any iterable of patterns, or one string. As in zuko, a selection
            that picks nothing gives a wrapper with nothing Bayesian.
        exclude_params: Glob patterns of the parameters to leave deterministic.

    Attributes:
        base: The base model. Its own copies of the Bayesian parameters are not used by
            the sampled models (as in zuko).
        means: The posterior means, keyed by parameter name with `.` replaced by `-`.
        logvars: The posterior log-variances, keyed as :attr:`means`.
    """

    # Recognized by the functional API, which never imports this module.
    _bayesflow_bridge = True

    def __init__(
        self,
        base: nn.Module,
        init_logvar: InitLogvar = -9.0,
        include_params: Sequence[str] = ("",),
        exclude_params: Sequence[str] = (),
    ) -> None:
        check_module("BayesianModel", base)
        # As zuko's, a selection that picks nothing gives a wrapper with nothing Bayesian.
        q = _posterior.init(
            "BayesianModel", base, init_logvar, include_params, exclude_params, empty=True
        )

        for name in q.mean:
            if "-" in name:
                raise ValueError(
                    f"BayesianModel: expected parameter names without '-', which zuko's "
                    f"key mangling ('.' -> '-') cannot undo, got {name!r}"
                )

        super().__init__()

        self.base = base
        self.means = nn.ParameterDict()
        self.logvars = nn.ParameterDict()

        named = dict(base.named_parameters())
        plain = isinstance(init_logvar, numbers.Real) and not isinstance(init_logvar, bool)
        for name, mean in q.mean.items():
            key = name.replace(".", "-")
            # zuko's very draw, `empty_like(param).normal_(init_logvar, 1e-3)`, in the same
            # order: the same numbers for the same seed (the parameter's memory layout and
            # one rounding included); a tensor or per-name value gets the same noise added.
            like = torch.empty_like(named[name])
            if plain:
                logvar = like.normal_(float(init_logvar), 1e-3)
            else:
                logvar = q.logvar[name].detach() + like.normal_(0.0, 1e-3)

            self.means[key] = nn.Parameter(mean.detach())
            self.logvars[key] = nn.Parameter(logvar)

    def extra_repr(self) -> str:
        numel = sum(m.numel() for m in self.means.values())
        return f"bayesian_tensors={len(self.means)}, bayesian_elements={numel}"

    @property
    def posterior(self) -> Posterior:
        r"""The posterior as a :class:`bayesflow.Posterior`, a view of :attr:`means`
        and :attr:`logvars`: gradients through it reach them."""

        names = [key.replace("-", ".") for key in self.means]

        return Posterior(
            mean=dict(zip(names, self.means.values(), strict=True)),
            logvar=dict(zip(names, self.logvars.values(), strict=True)),
        )

    def sample_params(
        self, n: int | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        r"""Returns model parameters sampled from the posterior.

        Arguments:
            n: The number of parameter sets; one, without a sample dim, if :py:`None`.
            generator: The source of randomness; the global one if :py:`None`.

        Returns:
            Tensors of shape `param.shape`, or `(n, *param.shape)` if `n` is given,
            differentiable with respect to :attr:`means` and :attr:`logvars`.
        """

        where = "BayesianModel.sample_params"
        if n is None:
            params = _posterior.sample(where, self.posterior, 1, generator)
            return {k: v[0] for k, v in params.items()}

        return _posterior.sample(where, self.posterior, n, generator)

    def sample_model(self, generator: torch.Generator | None = None) -> nn.Module:
        r"""Returns a model sampled from the posterior.

        The returned model is a standalone copy of the base model whose parameters are
        replaced by a sample. It can be used in every way the base model can, but no
        gradient flows back to the posterior: train with :meth:`reparameterize` or
        :meth:`forward`.

        Arguments:
            generator: The source of randomness; the global one if :py:`None`.

        Returns:
            A deep copy of the base model.
        """

        where = "BayesianModel.sample_model"
        with torch.no_grad():
            params = {
                k: v[0] for k, v in _posterior.sample(where, self.posterior, 1, generator).items()
            }

        with lock(self.base):  # another thread's call may have samples swapped in
            new = copy.deepcopy(self.base)
        new.load_state_dict(params, strict=False)

        return new

    def mean_model(self) -> nn.Module:
        r"""Returns a standalone copy of the base model at the posterior mean, as
        :func:`bayesflow.mean_model`."""

        with torch.no_grad():
            return _posterior.mean_model("BayesianModel.mean_model", self.base, self.posterior)

    @contextmanager
    def reparameterize(
        self, local_trick: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[nn.Module]:
        r"""Reparameterizes the base model in place from one posterior sample.

        Within this context the base model holds sampled parameters, differentiable with
        respect to the posterior, and is deterministic: the same inputs give the same
        outputs. The original parameters (the very same objects) are restored on exit,
        also after an error, and also when nested blocks are left out of order (the block
        left last puts them back); tied weights are sampled once and held in every place.

        Calls of bayesflow on the base model inside the block (:func:`bayesflow.vmap_call`,
        :meth:`forward`, ...) use their own samples, with the layers' own forwards; the
        parameters they do not sample are the held ones.

        Arguments:
            local_trick: Whether to use the local reparameterization trick (a bool; 0, 1
                and :py:`None` are read as zuko reads them) for the Bayesian
                layers among :class:`torch.nn.Linear`, zuko's `Linear` and their subclasses
                that keep their `forward` (such as zuko's `MaskedLinear`): their outputs,
                rather than their weights, are sampled, with fresh noise per example, where
                that is exact (inputs `(B, in)`: see :func:`bayesflow.local_call`).
                Convolutions, linear layers on inputs with positions, and layers whose
                weight or bias another module holds too (tied) use the sample. As in
                zuko, the noise of a layer is drawn once per output shape for the whole
                block: a layer that `fn` calls more than once per pass (a weight-shared
                block) does not have the joint law of one weight there, nor does one
                whose weight the block's code also reads outside the layer's call
                (`F.linear(h, layer.weight)`: that read sees the held sample, the layer's
                output fresh noise); use :func:`bayesflow.local_call`, which samples such
                layers whole. Layers whose weight is a parametrization or a hook-based
                weight norm use the sample.
            generator: The source of randomness; the global one if :py:`None`.

        Yields:
            The reparameterized base model.

        References:
            | Variational Dropout and the Local Reparameterization Trick (Kingma et al., 2015)
            | https://arxiv.org/abs/1506.02557
        """

        where = "BayesianModel.reparameterize"
        local_trick = _zuko_flag(where, "local_trick", local_trick)
        check_generator(where, generator)
        params = self.sample_params(generator=generator)
        changes = []
        if local_trick:
            plan = LocalPlan(self.base, self.posterior, lazy=True)
            # A layer tied to another module keeps the held sample, as its other holders.
            local = [k for k in plan.layers if k not in plan.tied]
            changes = plan.forwards(Cached(generator), local)

        with hold(self.base, params, changes) as base:
            yield base

    def kl_divergence(self, prior_var: float = 1.0) -> Tensor:
        r"""Returns the KL divergence between the posterior and the prior
        :math:`\mathcal{N}(0, \mathrm{prior\_var})`, as :func:`bayesflow.kl_divergence`.

        Arguments:
            prior_var: The variance of the centred Gaussian prior: a number, or a
                one-element tensor; one that requires grad gets its gradient.

        Returns:
            A scalar tensor, differentiable with respect to :attr:`means` and :attr:`logvars`.
        """

        return _posterior.kl_divergence("BayesianModel.kl_divergence", self.posterior, prior_var)

    def forward(
        self,
        *args: Any,
        n: int | None = None,
        fn: Callable[..., Any] | None = None,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
        fallback: bool = True,
        in_dims: Sequence[int | None] | None = None,
        randomness: str | None = None,
        max_memory: int | None = None,
    ) -> Any:
        r"""Runs `fn(base, *args)` with parameters sampled from the posterior.

        With `n`, the `n` sampled models run in one vectorized pass
        (:func:`bayesflow.vmap_call`); without, one sampled model runs. Either way the
        output is differentiable with respect to the posterior, so this is a training
        step's forward as well as a predictive one.

        Example:
            >>> flow = BayesianModel(zuko.flows.NSF(2, 1), include_params=["**.hyper.4"])
            >>> c, x = torch.randn(64, 1), torch.randn(64, 2)
            >>> flow(c, x, n=4, fn=lambda f, c, x: f(c).log_prob(x)).shape
            torch.Size([4, 64])

        Arguments:
            args: The arguments of `fn`, shared by every sample unless `in_dims` says
                otherwise.
            n: The number of sampled models; one, without a sample dim, if :py:`None`.
            fn: What to compute, `fn(base, *args)`; `base(*args)` if :py:`None`. It must
                return tensors: for a flow, `fn=lambda f, c, x: f(c).log_prob(x)`.
            generator: The source of randomness; the global one if :py:`None`. A call
                that raises (`fn` itself, or its output refused) leaves a given generator
                as found.
            chunk_size, fallback, in_dims, randomness, max_memory: As in
                :func:`bayesflow.vmap_call`.

        Returns:
            The outputs of `fn`, stacked on a leading dim of size `n` if `n` is given.
        """

        where = "BayesianModel.forward"
        k = 1 if n is None else check_n(where, n)
        opts = call_options(where, fn, chunk_size, fallback, in_dims, randomness, True, max_memory)
        check_generator(where, generator)
        # Before the draw: a failed call draws nothing.
        check_in_dims(where, args, in_dims, k)
        base, posterior = self.base, self.posterior
        check_no_parametrization_cache(where, base)
        # A call that fails after the draw (fn's output refused, fn itself, or a base
        # converted since it was wrapped) leaves the generator as found.
        saved = draw_state(generator)
        try:
            params = _posterior.sample(where, posterior, k, generator)
            if not params and n is not None and not any(d is not None for d in in_dims or ()):
                # Nothing Bayesian (zuko's empty wrapper) and no argument per sample: vmap
                # has nothing to map over, so `n` calls of the one model, as the loop
                # makes them.
                outs = [run(base, params, args, opts, n=1) for _ in range(k)]
                return stack([map_outputs(where, lambda t: t.squeeze(0), o) for o in outs])
            out = run(base, params, args, opts, n=k)  # `n`: for a wrapper with no tensors
            return out if n is not None else map_outputs(where, lambda t: t.squeeze(0), out)
        except BaseException:
            restore_draw_state(saved)
            raise

    def __getattr__(self, name: str) -> Any:
        r"""Looks attributes up in the base model if the wrapper does not have them."""

        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)
