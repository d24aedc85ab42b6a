r"""SWAG-diagonal: a Gaussian from the first two moments of the parameters along an SGD
trajectory."""

from __future__ import annotations

__all__ = ["SWAG"]


from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from torch import Tensor

from . import _posterior
from ._checks import check_callable, check_int, check_module, check_not_bridge, check_number
from ._compat import BatchNorm
from ._curvature import restore_modes
from ._structure import lock
from ._types import Posterior


def _moment_dtype(dtype: torch.dtype) -> torch.dtype:
    r"""The dtype the moments of parameters of `dtype` are kept in: float32 for float16 and
    bfloat16, the dtype itself otherwise."""

    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_batch(where: str, batch: object, i: int) -> None:
    r"""Checks that `batch` is what :meth:`SWAG.mean_model` calls the copy on (as
    :func:`torch.optim.swa_utils.update_bn` does): a tensor `x`, or a tuple or list
    `(x, ...)`."""

    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(x, Tensor):
        return
    if x is not batch:
        got = f"a {type(batch).__name__} whose first item is {type(x).__name__}"
    elif isinstance(batch, (tuple, list)):
        got = f"an empty {type(batch).__name__}"
    else:
        got = type(batch).__name__
    raise TypeError(
        f"{where}: expected each batch to be a tensor x or a tuple or list (x, ...) whose "
        f"first item is a tensor, got {got} at batch {i}"
    )


@torch.no_grad()  # as torch's update_bn: statistics only, no graph
def _update_bn(
    where: str,
    module: nn.Module,
    data: Iterable[Any],
    fn: Callable[..., Any] | None = None,
) -> None:
    r"""Recomputes the running statistics of the BatchNorm layers of `module` over one pass
    of `data`, as the SWAG paper's `bn_update`: each batch weighted by its size :math:`b`
    (momentum :math:`b / (n + b)` after :math:`n` examples), so that the running mean is
    the data's. Every layer's momentum and every submodule's mode are restored, also when
    a batch fails."""

    bns = [m for m in module.modules() if isinstance(m, BatchNorm)]
    momenta = [m.momentum for m in bns]
    modes = [(m, m.training) for m in module.modules()]
    for m in bns:
        m.reset_running_stats()
    n = batches = 0
    try:
        module.train()
        for batch in data:  # each batch checked as it is read (data may be an iterator)
            _check_batch(where, batch, batches)
            batches += 1
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            b = x.shape[0] if x.dim() > 0 else 1
            if b == 0:  # no example, no statistics (and b / (n + b) = 0 / 0 at first)
                continue
            # torch's update_bn sets momentum=None instead: every batch weighs the same, and
            # a short last batch counts as a full one.
            for m in bns:
                m.momentum = b / (n + b)
            try:
                if fn is None:
                    module(x)
                else:
                    fn(module, *(batch if isinstance(batch, (tuple, list)) else (batch,)))
            except ValueError as err:
                # torch's BatchNorm in training mode, given one value per channel: a batch of
                # one example (a DataLoader's short last batch) has no variance to average.
                if "more than 1 value per channel" not in str(err):
                    raise
                raise ValueError(
                    f"{where}: expected batches whose BatchNorm layers see more than one "
                    f"value per channel, got a batch of {b} at batch {batches - 1} (torch: "
                    f"{err}); leave it out, e.g. DataLoader(..., drop_last=True)"
                ) from err
            n += b
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        restore_modes(modes)  # through train(): a layer may override it
    if n == 0:  # the statistics were reset and nothing averaged
        got = "an empty iterable" if batches == 0 else f"{batches} batches of no examples"
        raise ValueError(
            f"{where}: expected data to hold at least one batch (an iterator already consumed "
            f"holds none), got {got}"
        )


class SWAG:
    r"""Collects the running mean and variance of chosen parameters of a module along an
    SGD trajectory, and gives the diagonal SWAG posterior
    :math:`\mathcal{N}(\bar\theta, \mathrm{diag}(\overline{\theta^2} - \bar\theta^2))`.

    Train as usual, typically with a constant or cyclical, fairly high learning rate after
    a warm-up, and call :meth:`collect` once per epoch (or every few steps): each call adds
    the module's current parameters to the moments (Welford's update, stable in float32;
    for float16 and bfloat16 parameters the moments are kept in float32).
    :meth:`posterior` then gives a :class:`bayesflow.Posterior` that
    :func:`bayesflow.sample` and :func:`bayesflow.vmap_call` use as any other. A module
    with BatchNorm needs running statistics that fit the mean weights: use the copy
    :meth:`mean_model` returns, whose statistics are recomputed on the training data.

    The collector holds the moments only (two tensors per parameter), never the module.
    Parameters frozen when it is made (`requires_grad=False`) are not trained, so they are
    left out, as :class:`bayesflow.IVON` and :func:`bayesflow.laplace` leave them: the
    posterior, the state and :meth:`mean_model`'s means cover the trainable ones only (a
    frozen parameter keeps its value in the mean model).

    Example:
        >>> net = zuko.nn.MLP(3, 1)
        >>> swag = bayesflow.SWAG(net)
        >>> optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
        >>> for epoch in range(10):
        ...     loss = (net(x) - y).square().mean()
        ...     optimizer.zero_grad(); loss.backward(); optimizer.step()
        ...     swag.collect(net)
        >>> q = swag.posterior()
        >>> bayesflow.vmap_call(net, bayesflow.sample(q, 8), x).shape
        torch.Size([8, 64, 1])

    Arguments:
        module: The module being trained.
        include: Glob patterns of the parameters to collect (see :func:`bayesflow.select`),
            among the trainable ones.
        exclude: Glob patterns of the parameters to leave out.

    References:
        | A Simple Baseline for Bayesian Uncertainty in Deep Learning (Maddox et al., 2019)
        | https://arxiv.org/abs/1902.02476
    """

    def __init__(
        self,
        module: nn.Module,
        include: Sequence[str] = ("",),
        exclude: Sequence[str] = (),
    ) -> None:
        where = "SWAG"
        check_module(where, module)
        check_not_bridge(where, module)
        # The posterior's own selection and its checks (nothing picked, tied names, lazy or
        # integer parameters).
        include = _posterior.globs(where, "include", include)
        exclude = _posterior.globs(where, "exclude", exclude)
        mean = _posterior.init(where, module, 0.0, include, exclude).mean
        # Frozen parameters are not trained, so their iterates have no spread to read: they
        # are left out, as IVON and Laplace leave them.
        with lock(module):  # another thread's call may have samples swapped in
            named = dict(module.named_parameters())
        frozen = [k for k in mean if not named[k].requires_grad]
        mean = {k: m for k, m in mean.items() if named[k].requires_grad}
        if not mean:
            raise ValueError(
                f"{where}: expected include={include!r} and exclude={exclude!r} "
                f"to pick at least one trainable parameter of {type(module).__name__}, got "
                f"none but frozen ones (requires_grad=False): {frozen}"
            )

        self.n = 0
        # The parameters' dtypes, which the moments need not share: in float16 and bfloat16,
        # mean += delta / n falls below half an ulp as n grows (the mean stalls, m2 loses
        # its increments), so the moments are kept in float32 there.
        self._dtypes = {k: m.dtype for k, m in mean.items()}
        self.mean = {
            k: torch.zeros_like(m.detach(), dtype=_moment_dtype(m.dtype)) for k, m in mean.items()
        }
        self._m2 = {k: torch.zeros_like(m) for k, m in self.mean.items()}

    def _check(self, where: str, module: object) -> dict[str, Tensor]:
        check_module(where, module)
        check_not_bridge(where, module)
        named = dict(module.named_parameters())
        params = {}
        for name, m in self.mean.items():
            p, dtype = named.get(name), self._dtypes[name]
            if p is None or p.shape != m.shape or p.dtype != dtype or p.device != m.device:
                got = "none" if p is None else f"{tuple(p.shape)} ({p.dtype}, {p.device})"
                raise ValueError(
                    f"{where}: expected a module with the collected parameter {name!r} of "
                    f"shape {tuple(m.shape)} ({dtype}, {m.device}), got {got}"
                )
            params[name] = p.detach()
        return params

    @torch.no_grad()
    def collect(self, module: nn.Module) -> None:
        r"""Adds the current parameters of `module` to the moments.

        Arguments:
            module: The module being trained (or any module with the same parameters).

        Raises:
            ValueError: If `module` lacks a collected parameter (or its shape, dtype or
                device differ), or a collected parameter is not finite (a diverged step);
                the moments are then left as they were.
        """

        where = "SWAG.collect"
        with lock(module):  # another thread's call may have samples swapped in
            params = self._check(where, module)
        for k, p in params.items():
            if not torch.isfinite(p).all():
                raise ValueError(
                    f"{where}: expected finite parameters (an SGD step that diverged must not "
                    f"enter the moments), got {p[~torch.isfinite(p)][0].item()} in {k!r}"
                )
        self.n += 1
        for k, p in params.items():
            p = p.to(self.mean[k].dtype)
            delta = p - self.mean[k]
            self.mean[k].add_(delta, alpha=1 / self.n)
            self._m2[k].addcmul_(delta, p - self.mean[k])

    @property
    def var(self) -> dict[str, Tensor]:
        r"""The variances :math:`\overline{\theta^2} - \bar\theta^2` of the collected
        parameters (over the :math:`n` collected, not :math:`n - 1`), by name, in the
        moments' dtype (float32 for float16 and bfloat16 parameters)."""

        n = max(self.n, 1)
        return {k: m2 / n for k, m2 in self._m2.items()}

    def posterior(self, scale: float = 1.0, min_var: float = 1e-30) -> Posterior:
        r"""Returns the SWAG-diagonal posterior
        :math:`\mathcal{N}(\bar\theta, s \cdot \max(\sigma^2, \sigma^2_\text{min}))`.

        A posterior holds variances of at least :math:`e^{-17.98} \approx 1.55 \cdot
        10^{-8}` (see :class:`bayesflow.Posterior`); smaller ones, e.g. of weights that
        never moved, are raised to it (the paper's code clamps at `1e-30`), and larger
        ones than :math:`e^{17.98} \approx 6.5 \cdot 10^7` lowered to that. In float16 and
        bfloat16 the variances are computed from the float32 moments (float16 holds neither
        the default `min_var` nor :math:`s \cdot \sigma^2` above 65504); the means and
        variances are then written in the parameters' dtype.

        Arguments:
            scale: The factor :math:`s > 0` of the variances, as the paper's code's
                `scale` (its samples are :math:`\bar\theta + \sqrt{s}\,\sigma\,\epsilon`).
            min_var: The least variance :math:`\sigma^2_\text{min} > 0`.

        Returns:
            A posterior over the collected parameters whose tensors are fresh leaves with
            `requires_grad=True`.

        Raises:
            ValueError: If fewer than two parameter sets were collected.
        """

        where = "SWAG.posterior"
        scale = check_number(where, "scale", scale, 0.0, strict=True)
        min_var = check_number(where, "min_var", min_var, 0.0, strict=True)
        if self.n < 2:
            raise ValueError(
                f"{where}: expected at least 2 collected parameter sets (collect after each "
                f"epoch), got {self.n}"
            )
        # In half precision the default min_var (1e-30) is 0 and scale * var may overflow:
        # the variances are computed from the float32 moments, and the posterior is written
        # in the parameters' dtype from them.
        var = {k: m2 / self.n for k, m2 in self._m2.items()}
        # Then kept positive and finite where min_var or scale leave the dtype's range (a
        # scale of 1e-40 underflowed float32 to 0): the posterior clamps far inside it.
        var = {
            k: (v.clamp_min(min_var) * scale).clamp(
                torch.finfo(v.dtype).tiny, torch.finfo(v.dtype).max
            )
            for k, v in var.items()
        }
        mean = {k: m.to(self._dtypes[k]) for k, m in self.mean.items()}
        return _posterior.posterior_from_variance(where, mean, var)

    def mean_model(
        self,
        module: nn.Module,
        data: Iterable[Any] | None = None,
        fn: Callable[..., Any] | None = None,
    ) -> nn.Module:
        r"""Returns a copy of `module` with the SWAG means as parameters and, if it has
        BatchNorm layers, their running statistics recomputed for those weights on `data`.

        The statistics are those of one pass of `data`, each batch weighted by its size, as
        the paper's `bn_update` weighs them: the running mean is the mean of the data's
        features, the running variance the size-weighted average of the batches' (unbiased)
        variances. (:func:`torch.optim.swa_utils.update_bn` weighs every batch the same, a
        short last batch as a full one.) The copy is called in training mode on the first
        element of each batch (or as `fn(copy, *batch)`, a forward that takes more than
        one input, say); its submodules' modes and its BatchNorms' momenta are then
        restored. Sample from :meth:`posterior` with this copy, e.g.
        `bayesflow.vmap_call(mean_net, bayesflow.sample(q, k), x)`: the statistics the
        SGD iterate left in `module` belong to other weights.

        Arguments:
            module: The module collected from.
            data: The training batches, `(x, ...)` or `x`; required if `module` has
                BatchNorm layers. A batch's size is the leading dim of `x`.
            fn: How to run the copy on a batch, `fn(copy, *batch)` (its output unused);
                `copy(x)` if :py:`None`.

        Returns:
            A standalone copy of `module`, in the mode `module` is in.

        Raises:
            ValueError: If `module` has BatchNorm layers and `data` is :py:`None` or holds
                no batch, or a batch that gives a BatchNorm layer one value per channel (a
                last batch of one example), or no parameter set was collected.
            TypeError: If `fn` is not callable, or `module` has BatchNorm layers and `data`
                is not an iterable of batches, or a batch is neither a tensor nor a tuple or
                list whose first item is a tensor (checked as the batches are read; `module`
                is left as found).
        """

        where = "SWAG.mean_model"
        self._check(where, module)
        check_callable(where, "fn", fn, form="fn(module, *batch)")
        if self.n < 1:
            raise ValueError(f"{where}: expected at least 1 collected parameter set, got 0")
        has_bn = any(isinstance(m, BatchNorm) for m in module.modules())
        if has_bn and data is None:
            raise ValueError(
                f"{where}: expected data for the BatchNorm layers of {type(module).__name__} "
                "(their running statistics must be recomputed for the mean weights), got None"
            )

        if has_bn and (isinstance(data, Tensor) or not isinstance(data, Iterable)):
            raise TypeError(
                f"{where}: expected data to be an iterable of batches (a DataLoader, a list "
                f"of (x, ...) tuples or of tensors), got {type(data).__name__}"
                + ("; a single batch x goes in a list: [x]" if isinstance(data, Tensor) else "")
            )

        with lock(module):  # another thread's call may have samples swapped in
            new = _posterior.copy_module(where, module)
        with torch.no_grad():
            for k, m in self.mean.items():
                new.get_parameter(k).copy_(m)
        if has_bn:
            _update_bn(where, new, data, fn)
        return new

    def __copy__(self) -> SWAG:
        r"""Returns a collector with moments of its own: collecting into the copy leaves
        this one as it is (shared moments with counts apart would disagree)."""

        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._dtypes = dict(self._dtypes)
        new.mean = {k: m.clone() for k, m in self.mean.items()}
        new._m2 = {k: m.clone() for k, m in self._m2.items()}
        return new

    def state_dict(self) -> dict[str, Any]:
        r"""Returns the collected moments: `{"n": int, "mean": {...}, "m2": {...}}`, copies
        in the moments' dtype (float32 for float16 and bfloat16 parameters), for
        :func:`torch.save`."""

        return {
            "n": self.n,
            "mean": {k: m.clone() for k, m in self.mean.items()},
            "m2": {k: m.clone() for k, m in self._m2.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        r"""Restores moments saved by :meth:`state_dict`, into a collector made for the same
        parameters (checked before anything is changed).

        Raises:
            TypeError: If `state` is not a dict, `n` is not an int, or a moment is a complex
                tensor.
            ValueError: If the keys, names or shapes differ from the collector's, `n < 0`, a
                moment is not finite, `m2 < 0`, or the moments contradict `n` (`m2` not zero
                with `n <= 1`, `mean` not zero with `n = 0`).
        """

        where = "SWAG.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(f"{where}: expected a dict, got {type(state).__name__}")
        if set(state) != {"n", "mean", "m2"}:
            raise ValueError(
                f"{where}: expected a dict with the keys 'm2', 'mean' and 'n', got {sorted(state)}"
            )
        n = check_int(where, "n", state["n"], minimum=0)
        for field in ("mean", "m2"):
            value = state[field]
            if not isinstance(value, Mapping) or value.keys() != self.mean.keys():
                got = sorted(value) if isinstance(value, Mapping) else type(value).__name__
                raise ValueError(
                    f"{where}: expected {field} for the parameters {sorted(self.mean)}, got {got}"
                )
            for k, m in self.mean.items():
                t = value[k]
                if not isinstance(t, Tensor) or t.shape != m.shape:
                    got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(
                        f"{where}: expected {field}[{k!r}] of shape {tuple(m.shape)}, got {got}"
                    )
                if t.is_complex():  # converting would drop the imaginary part
                    raise TypeError(
                        f"{where}: expected real tensors, got {field}[{k!r}] of dtype {t.dtype}"
                    )

        # Every tensor converted and checked before anything changes.
        try:
            mean = {k: state["mean"][k].detach().to(m, copy=True) for k, m in self.mean.items()}
            m2 = {k: state["m2"][k].detach().to(m, copy=True) for k, m in self._m2.items()}
        except (RuntimeError, NotImplementedError) as err:
            raise ValueError(
                f"{where}: expected tensors that convert to the moments': {err}"
            ) from None
        for k in self.mean:
            if not torch.isfinite(mean[k]).all() or not torch.isfinite(m2[k]).all():
                raise ValueError(f"{where}: expected finite moments, got others in {k!r}")
            if (m2[k] < 0).any():
                raise ValueError(
                    f"{where}: expected m2 >= 0 (sums of squared deviations), got "
                    f"{float(m2[k].min())} in {k!r}"
                )
            # Welford's update leaves exact zeros: both moments before the first collection,
            # m2 after it.
            if n == 0 and ((mean[k] != 0).any() or (m2[k] != 0).any()):
                field = "mean" if (mean[k] != 0).any() else "m2"
                raise ValueError(
                    f"{where}: expected mean = 0 and m2 = 0 with n = 0 (nothing collected), "
                    f"got a nonzero {field} in {k!r}"
                )
            if n == 1 and (m2[k] != 0).any():
                raise ValueError(
                    f"{where}: expected m2 = 0 with n = 1 (one parameter set has no spread), "
                    f"got {float(m2[k].abs().max())} in {k!r}"
                )

        self.n = n
        self.mean.update(mean)
        self._m2.update(m2)

    def __repr__(self) -> str:
        size = sum(m.numel() for m in self.mean.values())
        return f"SWAG({len(self.mean)} tensors, {size} parameters, n={self.n})"
