r"""The torch bridge: a drop-in superset of :class:`zuko.bayesian.BayesianModel`."""

from __future__ import annotations

__all__ = ["BayesianModel"]

import numbers
import re
import threading
import warnings

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
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
from ._outputs import map_outputs
from ._posterior import InitLogvar
from ._structure import lock, structure
from ._types import Posterior
from ._vmap_safe import vmap_safe


def _zuko_flag(where: str, what: str, value: object) -> bool:
    r"""A flag as zuko reads it (`if local_trick:`), on what config files hold: a bool,
    0, 1 or :py:`None`, a NumPy bool or integer, or a one-element bool or integer tensor
    equal to 0 or 1."""

    if value is None:
        return False
    if isinstance(value, np.bool_):
        return bool(value)
    if (
        isinstance(value, Tensor)
        and value.numel() == 1
        and not (value.is_floating_point() or value.is_complex() or value.is_meta)
    ):
        value = value.item()
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(
        f"{where}: expected {what} to be a bool (or 0, 1, None, or a one-element bool or "
        f"integer tensor equal to 0 or 1), got {value!r}"
    )


# Per thread: how many `reparameterize()` blocks on a module that runs zuko's transforms
# are open, and the stand-ins they share (blocks may be left out of order, and the
# stand-ins' own context is left in the order it was entered).
_BLOCKS: dict[int, list[Any]] = {}


@contextmanager
def _stand_ins() -> Iterator[None]:
    r"""Runs zuko's pieces as bayesflow's stand-ins (plain autograd) in this thread while
    a block is open: zuko's quadrature and ODE adjoint recompute the flow in their
    backward pass, which may run after the block has put the module's own parameters
    back."""

    me = threading.get_ident()
    entry = _BLOCKS.get(me)
    if entry is None:
        safe = vmap_safe()
        safe.__enter__()
        entry = _BLOCKS[me] = [safe, 0]
    entry[1] += 1
    try:
        yield
    finally:
        entry[1] -= 1
        if not entry[1]:
            del _BLOCKS[me]
            entry[0].__exit__(None, None, None)


def _zuko_picks(base: nn.Module, include: Any, exclude: Any) -> list[str] | None:
    r"""The names zuko's rule picks: each pattern a prefix of the name, `*` one or more
    word characters, `**` one or more words and dots (:py:`None` for patterns zuko
    refuses)."""

    def compiled(patterns: Any) -> list[re.Pattern] | None:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        if not all(isinstance(p, str) and re.fullmatch(r"[\w\.\*]*", p) for p in patterns):
            return None
        return [
            re.compile(p.replace(".", r"\.").replace("**", r"[\w\.]+").replace("*", r"\w+") + ".*")
            for p in patterns
        ]

    inc, exc = compiled(include), compiled(exclude)
    if inc is None or exc is None:
        return None
    return [
        name
        for name, _ in base.named_parameters()
        if any(p.fullmatch(name) for p in inc) and not any(p.fullmatch(name) for p in exc)
    ]


def _warn_unlike_zuko(base: nn.Module, names: list[str], include: Any, exclude: Any) -> None:
    r"""Warns where the patterns pick other parameters than zuko's rule would."""

    theirs = _zuko_picks(base, include, exclude)
    if theirs is None or theirs == names:
        return
    ours = set(names)
    only_ours = [n for n in names if n not in set(theirs)]
    only_theirs = [n for n in theirs if n not in ours]
    warnings.warn(
        "BayesianModel: the include/exclude patterns pick other parameters than "
        "zuko.bayesian.BayesianModel's would (zuko matches each pattern as a prefix of the "
        "name, bayesflow whole dot-separated segments, see bayesflow.select): "
        f"Bayesian here only {only_ours}, in zuko only {only_theirs}",
        UserWarning,
        stacklevel=3,
    )


class BayesianModel(nn.Module):
    r"""Creates a Bayesian wrapper around a base model.

    It accepts every valid argument that :class:`zuko.bayesian.BayesianModel` accepts
    (zuko also takes a NaN, infinite or bool `init_logvar`, and any truthy `local_trick`,
    which are refused here), holds the same state (`means` and `logvars` parameter dicts
    whose keys are the parameter names with `.` replaced by `-`) and behaves the same. On
    top of that, it runs `n` sampled models in one vectorized pass (:meth:`forward`) and
    exposes the posterior to the functional API (:attr:`posterior`).

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
            the latter). Where the patterns pick other parameters than zuko's rule would
            (`"0.w"`, a prefix of `0.weight` in zuko), a UserWarning names them. Any
            iterable of patterns, or one string. As in zuko, a selection that picks nothing
            gives a wrapper with nothing Bayesian.
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
        # Read once (an iterator of patterns), for the selection and its comparison.
        include_params, exclude_params = (
            list(p) if isinstance(p, Iterable) and not isinstance(p, Collection) else p
            for p in (include_params, exclude_params)
        )
        # As zuko's, a selection that picks nothing gives a wrapper with nothing Bayesian.
        q = _posterior.init(
            "BayesianModel", base, init_logvar, include_params, exclude_params, empty=True
        )
        _warn_unlike_zuko(base, list(q.mean), include_params, exclude_params)

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
        # A 0-dim tensor is read as its number, as zuko's `normal_` reads it (added to the
        # noise, it would be rounded twice).
        plain = (isinstance(init_logvar, numbers.Real) and not isinstance(init_logvar, bool)) or (
            isinstance(init_logvar, Tensor) and init_logvar.dim() == 0
        )
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

        Raises:
            ValueError: If the posterior's names, shapes, dtypes or devices are not those
                of the base model's parameters (the base changed since it was wrapped),
                before any draw.
        """

        where = "BayesianModel.sample_model"
        check_generator(where, generator)
        with lock(self.base):  # another thread's call may have samples swapped in
            # Before the draw: a sample that no longer fits the base (renamed or converted
            # since it was wrapped) would be loaded into nothing, the base's own weights
            # left in its place.
            _posterior.check_matches(where, self.base, self.posterior)
            new = _posterior.copy_module(where, self.base)  # before the draw: it may fail
            with torch.no_grad():
                params = _posterior.sample(where, self.posterior, 1, generator)
        new.load_state_dict({k: v[0] for k, v in params.items()}, strict=False)

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
        also after an error, and also when nested blocks on one base module are left out
        of order: a block left before blocks entered after it puts back at once what none
        of them holds (the parameters of another wrapper's selection), and leaves the rest
        to the first of them that holds it. (Blocks of a wrapper of a submodule of the base
        are not seen from the base's: leave those in order.) Tied weights are sampled once
        and held in every place.

        Calls of bayesflow on the base model inside the block (:func:`bayesflow.vmap_call`,
        :meth:`forward`, ...) use their own samples, with the layers' own forwards; the
        parameters they do not sample are the held ones.

        On a base model that runs zuko's transforms (a flow), the thread that entered the
        block runs zuko's quadrature (UNAF, SOSPF), bisection and ODE solver (CNF) as
        bayesflow's stand-ins (plain autograd, as every bayesflow call does) until its last
        such block is left. zuko's own pieces recompute the flow in their backward pass: a
        `backward()` after the block, once the module's own parameters are back, raised
        (train mode) or gave silently wrong gradients (eval mode). With the stand-ins,
        `backward()` after the block gives the gradients it gives inside. They are those
        of :func:`bayesflow.vmap_call`: in eval mode, UNAF's keep the gradients of its inner
        network, which zuko drops; CNF's are those of the solver's steps, not zuko's
        adjoint (see docs/flows.md, Limits). Activation checkpointing inside the base
        model has no such stand-in: a `backward()` after the block recomputes the
        checkpointed part with the module's own parameters (silently wrong gradients, as
        in zuko); run `backward()` inside the block there.

        Arguments:
            local_trick: Whether to use the local reparameterization trick (a bool; 0, 1,
                :py:`None`, a NumPy bool or integer, and a one-element bool or integer
                tensor equal to 0 or 1 are read as zuko reads them) for the Bayesian
                layers among :class:`torch.nn.Linear`, zuko's `Linear` and their subclasses
                that keep their `forward` (such as zuko's `MaskedLinear`): their outputs,
                rather than their weights, are sampled, with fresh noise per example, where
                that is exact (inputs `(B, in)`: see :func:`bayesflow.local_call`). The
                rows of every 2-D input are taken for examples, as in zuko and
                :func:`bayesflow.local_call`: the rows of an unbatched sequence `(T, in)`
                get independent noise, which is not the law of a weight sample.
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

        Raises:
            ValueError: If the posterior's names, shapes, dtypes or devices no longer fit
                the base model's parameters (the base changed since it was wrapped), before
                any draw: the generator and the module are left as found.

        References:
            | Variational Dropout and the Local Reparameterization Trick (Kingma et al., 2015)
            | https://arxiv.org/abs/1506.02557
        """

        where = "BayesianModel.reparameterize"
        local_trick = _zuko_flag(where, "local_trick", local_trick)
        check_generator(where, generator)
        base, posterior = self.base, self.posterior
        # Before the draw, as forward's: a sample that no longer fits the base fails here.
        with lock(base):
            st = structure(base, where)
            _posterior.check_fits(where, st, base, posterior)

        with ExitStack() as stack:
            saved = draw_state(generator)
            try:
                params = _posterior.sample(where, posterior, 1, generator)
                params = {k: v[0] for k, v in params.items()}
                changes = []
                if local_trick:
                    plan = LocalPlan(base, posterior, lazy=True)
                    # A layer tied to another module keeps the held sample, as its other
                    # holders.
                    local = [k for k in plan.layers if k not in plan.tied]
                    changes = plan.forwards(Cached(generator), local)
                held = stack.enter_context(hold(base, params, changes))
                if st.uses_zuko:
                    stack.enter_context(_stand_ins())
            except BaseException:
                restore_draw_state(saved)
                raise
            yield held

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
                # has nothing to map over. The loop's `n` calls, with its buffer rule (one
                # update per call, as with a Bayesian tensor).
                return run(base, params, args, opts._replace(vectorized=False), n=k)
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
