r"""Natural-gradient variational inference (IVON) whose state is a mean-field posterior."""

from __future__ import annotations

__all__ = ["IVON"]

import copy
import math

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from torch import Tensor

from ._checks import (
    check_bool,
    check_generator,
    check_int,
    check_module,
    check_not_bridge,
    check_number,
)
from ._ivon import (
    HYPER,
    Draw,
    Flat,
    Hyper,
    averages,
    changed_since_taken,
    finite,
    fold,
    forget,
    gradients,
    noise_times_gradients,
    set_variance,
    update,
)
from ._posterior import check_data, globs
from ._structure import lock
from ._types import Posterior
from .posterior import select

# What to do where a step is refused because a loss diverged (a NaN or infinite loss, an
# exploding gradient): its update would write NaN into the means, the module's own weights.
_DIVERGED = "lower the learning rate or clip the gradients"


def _check_hyper(where: str, values: Mapping[str, Any]) -> Hyper:
    lr = check_number(where, "lr", values["lr"], 0.0, strict=False)
    ess = check_number(where, "ess", values["ess"], 0.0, strict=True)
    hess_init = check_number(where, "hess_init", values["hess_init"], 0.0, strict=True)
    beta1 = check_number(where, "beta1", values["beta1"], 0.0, strict=False)
    if beta1 >= 1:
        raise ValueError(f"{where}: expected 0 <= beta1 < 1, got {beta1}")
    beta2 = check_number(where, "beta2", values["beta2"], 0.0, strict=False)
    if beta2 > 1:
        raise ValueError(f"{where}: expected 0 <= beta2 <= 1, got {beta2}")
    weight_decay = check_number(where, "weight_decay", values["weight_decay"], 0.0, strict=False)
    clip_radius = values["clip_radius"]
    if isinstance(clip_radius, Tensor) and clip_radius.numel() == 1:
        clip_radius = clip_radius.item()
    if not (isinstance(clip_radius, (int, float)) and clip_radius == math.inf):
        clip_radius = check_number(where, "clip_radius", clip_radius, 0.0, strict=True)
    rescale_lr = check_bool(where, "rescale_lr", values["rescale_lr"])
    debias = check_bool(where, "debias", values["debias"])

    return Hyper(
        lr, ess, hess_init, beta1, beta2, weight_decay, float(clip_radius), rescale_lr, debias
    )


class IVON(torch.optim.Optimizer):
    r"""Fits a mean-field Gaussian posterior by natural-gradient variational inference: the
    Improved Variational Online Newton optimizer (IVON).

    The state is a :class:`bayesflow.Posterior` over the picked parameters of `module`
    (:attr:`posterior`) and a Hessian estimate :math:`h` (:attr:`hess`). The posterior is

    .. math:: q(\theta) = \mathcal{N}\left(m, \mathrm{diag}(\sigma^2)\right), \qquad
        \sigma^2 = \frac{1}{\lambda \, (h + \delta)},

    with :math:`\lambda` the effective sample size `ess` (the number of training data,
    usually) and :math:`\delta` the weight decay, which makes
    :math:`\mathcal{N}(0, 1 / (\lambda \delta))` the prior. A training step draws
    :math:`\theta_k = m + \sigma \odot \epsilon_k`, :math:`k = 1, \dots, K`, with
    :meth:`sample`; the loss, the mean over the samples and the batch of the per-datum
    loss :math:`\ell`, is backpropagated to them; and :meth:`step` averages the gradients
    :math:`g_k` and updates, with :math:`r = 1 - \beta_2`,

    .. math:: \bar g = \frac{1}{K} \sum_k g_k, \qquad
        \hat h = \frac{1}{K} \sum_k g_k \odot \frac{\theta_k - m}{\sigma^2},

    .. math:: \mu \leftarrow \beta_1 \mu + (1 - \beta_1) \bar g, \qquad
        h \leftarrow \beta_2 h + r \hat h
        + \frac{r^2}{2} \frac{(h - \hat h)^2}{h + \delta},

    .. math:: m \leftarrow m - \alpha \, \mathrm{clip}\left(
        \frac{\mu / (1 - \beta_1^t) + \delta m}{h + \delta}, \rho \right),

    where :math:`\hat h` is the reparameterization estimate of the expected Hessian, the
    correction term keeps :math:`h + \delta > 0`, :math:`\alpha` is `lr`, times
    `hess_init` + :math:`\delta` if `rescale_lr`, the debiasing :math:`1 - \beta_1^t` is
    dropped if not `debias`, and :math:`\rho` is `clip_radius`. This is the update of the
    reference implementation, ivon-opt 0.1.3, which the tests check to 1e-12 in float64.

    The module's picked parameters share their storage with :attr:`posterior`'s means, so
    that `module(x)` is the mean model at every step (as with ivon-opt; move the module to
    its device and dtype before creating the optimizer: :meth:`sample` and :meth:`step`
    raise once a parameter has other memory, after `module.to(...)`, a second IVON over
    it, or `load_state_dict(assign=True)`; the parameters become contiguous views, so a
    `channels_last` convolution weight is one no more, and converting it back is such a
    change). :attr:`posterior`'s log-variances
    are updated with every step: :func:`bayesflow.sample`, :func:`bayesflow.vmap_call`, the
    predictive summaries and the metrics use it as any other posterior. Its variance
    :math:`\exp(\mathrm{softclip}(\log \sigma^2, 18))` cannot leave :math:`(e^{-18},
    e^{18})`: where :math:`\lambda (h + \delta)` does, :math:`\log \sigma^2` is clamped to
    :math:`\pm 17.98` (as every posterior that bayesflow writes), and the samples use the
    clamped variance (as does
    :math:`\hat h`, the Price estimator for the distribution sampled), so that the posterior
    is always the one sampled. Parameters that the posterior leaves out are never touched:
    train them with another optimizer if they need training. Frozen parameters
    (`requires_grad=False`) are left out, whatever the patterns: freeze them before creating
    the optimizer (:meth:`sample` and :meth:`step` raise for one frozen later). Where `h` is
    negative (the update keeps :math:`h + \delta`, not :math:`h`, positive), a lower
    `weight_decay` that makes :math:`h + \delta \leq 0` is refused, by :meth:`sample`,
    :meth:`step` and :attr:`posterior`, before any change.

    A training step looks like Adam's, plus the draw:

    .. code-block:: python

        opt = bf.IVON(net, lr=0.1, ess=len(train))
        for x, y in batches:
            params = opt.sample(8)  # {name: (8, *shape)}
            logits = bf.vmap_call(net, params, x)  # (8, batch, classes)
            loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(8))  # mean over both
            loss.backward()
            opt.step()

    The mean over the samples makes each sample's gradient :math:`g_k / K`, and
    :meth:`step` sums them. Several draws before one step (a loop, where memory is short)
    are averaged, each draw weighted equally (backpropagate each draw's loss as for a draw
    alone, not divided by the number of draws); a draw that no gradient reached is ignored.
    Each draw's gradients are taken when the next draw is made (so that they can be
    freed) or at :meth:`step`: backpropagate (and clip) a draw's loss before the next
    draw, or draw every sample first and backpropagate their sum once. A gradient that
    changes after it was taken, or reaches a sample that had none then (taken as zero),
    makes :meth:`step` raise rather than ignore it. Clip the gradients of the samples
    (`params.values()`), not the module's parameters, which get none; for the same reason
    :class:`torch.amp.GradScaler` cannot step it (it finds no gradient to unscale and
    raises): under float16 autocast, backpropagate `loss * scale` and divide the samples'
    gradients by `scale` before :meth:`step` (no step is skipped on an overflow, as the
    scaler skips it: :meth:`step` refuses infinite gradients), or use bfloat16, which
    needs no scaler. A
    closure of :meth:`step` that raises leaves the draws it made to the next step: start
    it with :meth:`zero_grad`, which drops them.

    In half precision (float16 or bfloat16 parameters), the means, the samples and
    :attr:`posterior` are in the parameters' dtype, and the rest of the state (:attr:`hess`,
    :attr:`momentum`, the standard deviations the samples are drawn with, the gradient
    statistics of a step) in float32: an update of :math:`h` at :math:`\beta_2` near 1 is
    below half precision's resolution, and float16 overflows on products of gradients of a
    few thousand. The means' own updates round to the parameters' dtype, as with any
    optimizer of half-precision parameters.

    With :mod:`torch.distributed` initialized before the optimizer is created, and `sync`
    true, every process draws its own samples (give each its own generator seed) and
    :meth:`step` averages :math:`\bar g` and :math:`\hat h` over the processes with one
    all-reduce: :math:`W` processes with :math:`K` samples each step as one process with
    :math:`WK` samples. Each process's average weighs as much as any other's (a process
    with more draws or samples before a step does not count for more: give each the same
    number); `ess` stays the size of the whole training set. The checks of :meth:`step`
    that raise before the all-reduce (no gradient, a gradient changed since it was taken,
    a bad hyperparameter) raise in that process only, while the others wait in the
    all-reduce until torch.distributed's timeout: run the same steps everywhere. The means
    are broadcast from the first process when the optimizer
    is created.

    Example:
        >>> net = zuko.nn.MLP(3, 1)
        >>> opt = bayesflow.IVON(net, lr=0.1, ess=100)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> params = opt.sample(4)
        >>> loss = (bayesflow.vmap_call(net, params, x) - y).square().mean()
        >>> loss.backward()
        >>> opt.step()
        >>> sorted(opt.posterior.logvar) == sorted(params)
        True

    Arguments:
        module: A module.
        lr: The learning rate :math:`\alpha \geq 0` (a scheduler may change
            `param_groups[0]["lr"]`, as for any torch optimizer).
        ess: The effective sample size :math:`\lambda > 0`, usually the number of
            training data.
        hess_init: The initial Hessian estimate :math:`h_0 > 0`, which sets the initial
            variance :math:`1 / (\lambda (h_0 + \delta))`.
        beta1: The momentum of the gradient, :math:`0 \leq \beta_1 < 1`.
        beta2: The momentum of the Hessian, :math:`0 \leq \beta_2 \leq 1`.
        weight_decay: :math:`\delta \geq 0`, the prior precision divided by :math:`\lambda`.
        clip_radius: The bound :math:`\rho > 0` on each element of the update
            (:py:`math.inf` for none).
        rescale_lr: Whether to multiply `lr` by :math:`h_0 + \delta`.
        debias: Whether to debias the momentum by :math:`1 - \beta_1^t`.
        include: Glob patterns of the parameters to make Bayesian (see
            :func:`bayesflow.select`).
        exclude: Glob patterns of the parameters to leave out.
        sync: Whether to average the statistics of every step over the processes of
            `process_group`, if :mod:`torch.distributed` is initialized (by then).
        process_group: The processes to average over; the default group if :py:`None`.

    Raises:
        ValueError: If a hyperparameter is out of range, the patterns pick no trainable
            parameter, or the picked parameters do not share one dtype and device.
        TypeError: If an argument has the wrong type, or a picked parameter is not real
            floating-point.

    References:
        | Variational Learning is Effective for Large Deep Networks (Shen et al., 2024)
        | https://arxiv.org/abs/2402.17641
    """

    def __init__(
        self,
        module: nn.Module,
        lr: float,
        ess: float,
        hess_init: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99999,
        weight_decay: float = 1e-4,
        clip_radius: float = math.inf,
        rescale_lr: bool = True,
        debias: bool = True,
        include: Sequence[str] = ("",),
        exclude: Sequence[str] = (),
        sync: bool = True,
        process_group: Any = None,
    ) -> None:
        where = "IVON"
        check_module(where, module)
        check_not_bridge(where, module)
        values = (lr, ess, hess_init, beta1, beta2, weight_decay, clip_radius, rescale_lr, debias)
        h = _check_hyper(where, dict(zip(HYPER, values, strict=True)))
        check_bool(where, "sync", sync)
        if process_group is not None:
            if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
                raise TypeError(
                    f"{where}: expected process_group to be a torch.distributed.ProcessGroup "
                    f"or None, got {type(process_group).__name__}"
                )
            if not dist.is_initialized():
                raise ValueError(
                    f"{where}: expected torch.distributed to be initialized with a "
                    "process_group, got none initialized"
                )

        include = globs(where, "include", include)
        exclude = globs(where, "exclude", exclude)
        try:
            names = select(module, include, exclude)
        except (TypeError, ValueError) as err:
            raise type(err)(str(err).replace("select:", f"{where}:", 1)) from None
        with lock(module):  # another thread's call may have samples swapped in
            named = dict(module.named_parameters())
        frozen = [name for name in names if not named[name].requires_grad]
        names = [name for name in names if named[name].requires_grad]
        if not names:
            but = f" but frozen ones (requires_grad=False): {frozen}" if frozen else ""
            raise ValueError(
                f"{where}: expected include={include!r} and exclude={exclude!r} "
                f"to pick at least one trainable parameter of {type(module).__name__}, got "
                f"none{but}"
            )
        params = [named[name] for name in names]
        check_data(where, dict(zip(names, params, strict=True)), module)
        for name, p in zip(names, params, strict=True):
            if not p.is_floating_point():
                raise TypeError(
                    f"{where}: expected real floating-point parameters, got {name!r} of "
                    f"dtype {p.dtype}: exclude it"
                )
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) > 1:
            got = ", ".join(sorted(f"{d} on {v}" for d, v in kinds))
            raise ValueError(
                f"{where}: expected the picked parameters to share one dtype and device, got {got}"
            )

        self._state = s = Flat(names, params, h.hess_init)

        # The processes to average over, fixed here: torch.distributed is set up first.
        self._group = None
        if sync and dist.is_available() and dist.is_initialized():
            if dist.get_world_size(process_group) > 1:
                self._group = process_group if process_group is not None else dist.group.WORLD
                src = 0 if process_group is None else dist.get_global_rank(process_group, 0)
                dist.broadcast(s.mean, src=src, group=process_group)

        # The means are the module's own storage: `module(x)` is the mean model.
        mean = s.views(s.mean)
        with torch.no_grad():
            for p, m in zip(params, mean.values(), strict=True):
                p.data = m
        self._posterior = Posterior(mean=mean, logvar=s.views(s.logvar))
        # Where each picked parameter sits (a module's own table: an assignment replaces
        # the entry), and the view of the means whose memory it shares.
        self._slots = []
        for name, m in zip(names, mean.values(), strict=True):
            path, _, attr = name.rpartition(".")
            table = module.get_submodule(path)._parameters
            self._slots.append((name, table, attr, m))
        set_variance(s, h.ess, h.weight_decay)

        super().__init__(list(mean.values()), {k: getattr(h, k) for k in HYPER})
        self._checked = (tuple(h), h)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        r"""Refuses a second parameter group: the posterior is the optimizer's only one."""

        if getattr(self, "param_groups", None):
            raise ValueError(
                "IVON.add_param_group: expected one parameter group, the posterior's, got a "
                "second; train other parameters with another optimizer"
            )
        super().add_param_group(param_group)

    @property
    def posterior(self) -> Posterior:
        r"""The posterior :math:`q(\theta) = \mathcal{N}(m, \mathrm{diag}(\sigma^2))`, by name.

        Its tensors are views of the optimizer's state, updated in place by every step: a
        reference to it stays current. They do not require gradients. Views of one flat
        tensor, each would pickle the whole of it (plain `pickle`; :func:`torch.save`
        writes it once): clone them to keep or send a posterior of their size.

        After a write through :attr:`hess` (or a change of `ess` or `weight_decay`), the
        variances are recomputed when this is read, or by the next :meth:`sample` or
        :meth:`step`; each raises a ValueError where :math:`h + \delta \leq 0`.
        """

        where = "IVON.posterior"
        group = self.param_groups[0]
        try:
            ess = check_number(where, "ess", group["ess"], 0.0, strict=True)
            weight_decay = check_number(where, "weight_decay", group["weight_decay"], 0.0, False)
        except (TypeError, ValueError):
            return self._posterior  # the state's: sample() and step() refuse such values
        self._refresh(where, ess, weight_decay)
        return self._posterior

    @property
    def hess(self) -> dict[str, Tensor]:
        r"""The Hessian estimates :math:`h`, by name (views of the optimizer's state, in
        float32 for half-precision parameters).

        A write through them (a per-layer initial :math:`h`, say) is read by the next
        :meth:`sample`, :meth:`step` and :attr:`posterior`; it must keep :math:`h + \delta`
        positive and finite. Writes are seen by the tensors' version counter: one made
        through `.data` or from NumPy is not (write in place under `torch.no_grad()`).
        """

        return self._state.views(self._state.hess)

    @property
    def momentum(self) -> dict[str, Tensor]:
        r"""The gradient momentum :math:`\mu`, by name (views of the optimizer's state, in
        float32 for half-precision parameters)."""

        return self._state.views(self._state.momentum)

    def _hyper(self, where: str) -> Hyper:
        r"""Returns the hyperparameters of `param_groups[0]`, checked (once per change)."""

        group = self.param_groups[0]
        values = tuple(group[k] for k in HYPER)
        if any(isinstance(v, Tensor) for v in values):
            # By value: a scheduler updates a tensor lr in place (the same object).
            if any(isinstance(v, Tensor) and v.numel() != 1 for v in values):
                return _check_hyper(where, group)  # raises
            values = tuple(v.item() if isinstance(v, Tensor) else v for v in values)
        if values != self._checked[0]:
            self._checked = (values, _check_hyper(where, group))
        return self._checked[1]

    def _check_linked(self, where: str) -> None:
        r"""Raises if a picked parameter of the module no longer shares the posterior's
        memory (`module(x)` would silently not be the mean model), or was frozen since the
        optimizer was created (a step would silently train it)."""

        # Pointers compared now, not kept: `share_memory_()` moves both, still shared.
        for name, table, attr, mean in self._slots:
            p = table.get(attr)
            if p is None or p.data_ptr() != mean.data_ptr():
                raise RuntimeError(
                    f"{where}: expected the module's parameter {name!r} to share the "
                    "posterior's memory, as IVON set it up, got it moved elsewhere (by "
                    "another IVON over the same parameters, module.to(...), "
                    "load_state_dict(assign=True) or an assignment to .data): the module "
                    "would no longer be the mean model. Create the IVON after such a change"
                )
            if not p.requires_grad:
                raise RuntimeError(
                    f"{where}: expected the module's parameter {name!r} to require gradients, "
                    "as when IVON was created, got it frozen (requires_grad=False) since: a "
                    "step would still train it. Create the IVON after freezing (it leaves "
                    "frozen parameters out), or unfreeze it"
                )

    def _check_hess(self, where: str, weight_decay: float) -> None:
        r"""Raises if the Hessian estimates were written through :attr:`hess`, or
        `weight_decay` changed, since the variances were set, to values they cannot be set
        from: :math:`h + \delta \leq 0` somewhere."""

        s = self._state
        if s.variance_of is None or s.variance_of[1:] == (weight_decay, s.hess._version):
            return
        if s.variance_of[2] != s.hess._version:
            if not (torch.isfinite(s.hess).all() and (s.hess + weight_decay > 0).all()):
                raise ValueError(
                    f"{where}: expected finite Hessian estimates with hess + weight_decay > 0, "
                    "got others written through IVON.hess"
                )
        # The update keeps h + weight_decay > 0, not h > 0: a lower weight_decay (a
        # schedule) can leave h + weight_decay <= 0, a NaN variance and a step uphill.
        elif not (s.hess + weight_decay > 0).all():
            low = s.hess.min().item()
            raise ValueError(
                f"{where}: expected hess + weight_decay > 0, got min hess = {low:.6g} with "
                f"weight_decay = {weight_decay} (changed from {s.variance_of[1]}): set "
                f"weight_decay above {-low:.6g}, as IVON keeps only hess + weight_decay "
                "positive"
            )

    def _refresh(self, where: str, ess: float, weight_decay: float) -> None:
        r"""Recomputes the variances if `ess`, `weight_decay` or the Hessian estimates (a
        write through :attr:`hess`, checked) changed since they were set."""

        s = self._state
        if s.variance_of == (ess, weight_decay, s.hess._version):
            return
        self._check_hess(where, weight_decay)
        set_variance(s, ess, weight_decay)

    def sample(self, n: int = 1, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        r"""Draws the `n` parameter sets :math:`\theta_k = m + \sigma \odot \epsilon_k` of a
        training step, in one flat draw of :math:`n \times P` standard normals.

        Backpropagate the loss, averaged over the samples, to them, then call
        :meth:`step`. For predictions, sample :attr:`posterior` with
        :func:`bayesflow.sample` instead (the same draw for the same generator state).

        Arguments:
            n: The number of samples :math:`K`.
            generator: The source of randomness; the global one if :py:`None`.

        Returns:
            Leaf tensors of shape `(n, *param.shape)` that require gradients, by name, for
            :func:`bayesflow.vmap_call`.
        """

        where = "IVON.sample"
        n = check_int(where, "n", n)
        s = self._state
        check_generator(where, generator, s.device)
        h = self._hyper(where)
        self._check_linked(where)

        # The check that may raise first: a failed call leaves the draws as they were (the
        # draws that await their gradients keep the sigma they were drawn with).
        self._refresh(where, h.ess, h.weight_decay)
        fold(s)
        eps = torch.randn(
            n, s.mean.numel(), generator=generator, dtype=s.dtype, device=s.device, out=s.noise(n)
        )
        # In the parameters' dtype (the standard deviations may be in float32).
        theta = torch.addcmul(s.mean, s.std, eps).to(s.dtype)
        leaves = [t.requires_grad_() for t in s.views(theta, n)]
        s.draws.append(Draw(n, eps, leaves, s.std))

        return dict(zip(s.names, leaves, strict=True))

    def zero_grad(self, set_to_none: bool = True) -> None:
        r"""Drops the samples drawn since the last step, and their gradients; and clears the
        gradients of the module's picked parameters (see :meth:`step`), as torch's
        optimizers do."""

        forget(self._state)
        for _, table, attr, _ in self._slots:
            p = table.get(attr)
            if p is not None and p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        r"""Updates the posterior from the gradients of the samples drawn since the last step.

        Arguments:
            closure: A callable that draws samples, computes the loss, backpropagates it
                and returns it; called once, with gradients enabled.

        Returns:
            The closure's loss, or :py:`None` without a closure.

        Raises:
            RuntimeError: If no gradient reached a sample of :meth:`sample` since the last
                step, or a gradient reached the module's own picked parameters (a loss term
                computed with the module itself), which the step would ignore; or a picked
                parameter was frozen, or given other memory, since the optimizer was created.
            ValueError: If a gradient is NaN or infinite (a loss that diverged), in any
                process of data-parallel training: nothing is updated, and the draws since
                the last step are dropped; or `weight_decay` changed (or :attr:`hess` was
                written) so that :math:`h + \delta \leq 0` somewhere: nothing is updated.
        """

        where = "IVON.step"
        if closure is not None and not callable(closure):
            raise TypeError(
                f"{where}: expected closure to be a callable or None, got {type(closure).__name__}"
            )
        self._check_linked(where)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        h = self._hyper(where)
        self._check_linked(where)  # again: the closure may have changed it
        reached = [name for name, table, attr, _ in self._slots if table[attr].grad is not None]
        if reached:
            raise RuntimeError(
                f"{where}: expected gradients on the samples of IVON.sample only, got "
                f"gradients on the module's own parameters {reached}, which a step would "
                "ignore: a loss term computed with the module itself (a penalty on its "
                "weights, net(x) outside the sampled call) goes through the samples, or into "
                "the loss the samples get; zero_grad() clears them"
            )
        group, s = self._group, self._state
        if changed_since_taken(s):
            raise RuntimeError(
                f"{where}: expected the gradients of each draw to be complete when the next "
                "draw is made (IVON.sample takes them then), got a gradient changed since: "
                "a backward pass or a change in place would be ignored. Backpropagate and clip "
                "a draw's loss before the next draw, or draw every sample first; zero_grad() "
                "drops the draws"
            )
        if s.count == 0 and not any(g is not None for d in s.draws for g in gradients(d)):
            raise RuntimeError(
                f"{where}: expected gradients of the samples drawn by IVON.sample since the "
                "last step, got none: draw with sample(), backpropagate the loss, then step()"
            )
        self._check_hess(where, h.weight_decay)  # before anything changes
        reached = [d for d in s.draws if any(g is not None for g in gradients(d))]
        one = reached[0] if len(reached) == 1 else None
        grads = [] if one is None else gradients(one)
        single = (
            s.count == 0
            and group is None
            and one is not None
            and one.n == 1
            and one.eps is s.eps
            and s.state_dtype == s.dtype
            and all(g is not None for g in grads)
        )
        # What the update reads must be finite: a loss that diverged would write NaN into
        # the means, the module's weights. One pass over a flat tensor: epsilon * g, NaN
        # or infinite wherever g is, or the averages (in data-parallel training, those of
        # every process: all of them raise).
        if single:
            g, nx = grads, noise_times_gradients(s, grads)
            read = nx
        else:
            g, nx = read = averages(s, group)
        if not finite(read):
            forget(s)
            raise ValueError(
                f"{where}: expected finite gradients of the samples, got NaN or infinite "
                f"values{' in a process' if group is not None else ''} (a loss that "
                f"diverged): nothing was updated, the draws since the last step are dropped; "
                f"{_DIVERGED}"
            )
        # The variances for a changed ess or hess (the draw of one sample keeps the sigma
        # it was drawn with).
        self._refresh(where, h.ess, h.weight_decay)
        if single:
            std = next(d.std for d in s.draws if d.eps is one.eps)
            forget(s)
            update(s, g, nx, h, std)
        else:
            update(s, g, nx, h)
        return loss

    def state_dict(self) -> dict[str, Any]:
        r"""Returns the state of the optimizer, to resume training with :meth:`load_state_dict`.

        Returns:
            A dict with `"state"` (the step count and copies of the flat means, Hessian
            estimates and momentum) and `"param_groups"` (the hyperparameters, with the
            parameter names under `"params"` and their shapes under `"shapes"`). Samples
            drawn since the last step are not part of it.
        """

        for pre_hook in self._optimizer_state_dict_pre_hooks.values():  # as torch's
            pre_hook(self)
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        s = self._state
        state = {
            "state": {
                "step": s.t,
                "mean": s.mean.clone(),
                "hess": s.hess.clone(),
                "momentum": s.momentum.clone(),
            },
            "param_groups": [
                group | {"params": list(s.names), "shapes": [tuple(t) for t in s.shapes]}
            ],
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            state = state if result is None else result
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        r"""Restores a state from :meth:`state_dict`: the means (into the module too), the
        Hessian estimates, the momentum, the step count and the hyperparameters.

        Arguments:
            state_dict: A state of an IVON over the same parameter names and shapes.

        Raises:
            ValueError: If the state does not fit this optimizer (other parameter names or
                shapes, or values it cannot hold).
        """

        where = "IVON.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{where}: expected a dict, got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():  # as torch's
            result = pre_hook(self, state_dict)
            state_dict = state_dict if result is None else result
        try:
            state, groups = state_dict["state"], state_dict["param_groups"]
            tensors = {k: state[k] for k in ("mean", "hess", "momentum")}
            step, group, count = state["step"], groups[0], len(groups)
            names = list(group["params"])
            hyper = {k: group[k] for k in HYPER}
            # States saved before the shapes were kept have none: their size is checked.
            shapes = group["shapes"] if "shapes" in group else None
        except (KeyError, IndexError, TypeError):
            raise ValueError(
                f"{where}: expected a dict from IVON.state_dict(), with the state, the "
                f"parameter names and the hyperparameters {', '.join(HYPER)}, got keys "
                f"{', '.join(sorted(map(repr, state_dict)))}"
            ) from None
        s = self._state
        if count != 1:
            raise ValueError(f"{where}: expected one parameter group, got {count}")
        if names != s.names:
            raise ValueError(
                f"{where}: expected a state over the parameters {s.names}, got {names}"
            )
        if shapes is not None:
            try:
                shapes = [tuple(shape) for shape in shapes]
            except TypeError:
                shapes = None
            if shapes is None or len(shapes) != len(s.names):
                raise ValueError(
                    f"{where}: expected shapes to list the shapes of the {len(s.names)} parameters"
                )
            for name, want, got in zip(s.names, s.shapes, shapes, strict=True):
                if got != tuple(want):
                    raise ValueError(
                        f"{where}: expected {name!r} of shape {tuple(want)}, got {got}: a "
                        "state of another module"
                    )
        size = s.mean.numel()
        for k, t in tensors.items():
            if not isinstance(t, Tensor) or t.shape != (size,):
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{where}: expected {k} of shape ({size},), got {shape}")
            if t.is_complex():
                raise TypeError(f"{where}: expected real {k}, got {t.dtype}")
        step = check_int(where, "step", step, minimum=0)
        h = _check_hyper(where, hyper)
        # Copies, as torch's optimizers load them: a tensor lr that a scheduler updates in
        # place would be shared with the state and the optimizer it came from.
        group = copy.deepcopy({k: v for k, v in group.items() if k not in ("params", "shapes")})
        try:
            # Detached: a state that records gradients (a mean from `bf.init`) would make the
            # optimizer's own tensors record them, and every later sample a non-leaf.
            mean, hess, momentum = (
                tensors[k].detach().to(like, copy=True)
                for k, like in zip(tensors, (s.mean, s.hess, s.momentum), strict=True)
            )
        except (RuntimeError, NotImplementedError) as err:
            raise ValueError(
                f"{where}: expected tensors that convert to {s.dtype} on {s.device}: {err}"
            ) from None
        if not (torch.isfinite(hess).all() and (hess + h.weight_decay > 0).all()):
            raise ValueError(f"{where}: expected finite hess with hess + weight_decay > 0")
        for k, t in (("mean", mean), ("momentum", momentum)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{where}: expected finite values in {k}")

        s.mean.copy_(mean)
        s.hess.copy_(hess)
        s.momentum.copy_(momentum)
        s.t = step
        self.param_groups[0].update(group)
        forget(s)
        set_variance(s, h.ess, h.weight_decay)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> Any:
        raise TypeError(
            "IVON: expected to be saved with state_dict() and restored with load_state_dict() "
            "into an IVON over the module, got a copy or pickle of the optimizer itself, "
            "which cannot be made: its means share their memory with the module's parameters"
        )

    def __repr__(self) -> str:
        group = self.param_groups[0]
        hyper = ", ".join(f"{k}={group[k]!r}" for k in HYPER)
        s = self._state
        return f"IVON({len(s.names)} tensors, {s.mean.numel()} parameters, {hyper})"
