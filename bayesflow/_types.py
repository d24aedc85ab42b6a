r"""The plain data types shared by every layer of bayesflow."""

from __future__ import annotations

__all__ = ["Fn", "Posterior"]

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from torch import Tensor

from ._numerics import std

Fn = Callable[..., Any]

#: The most tensors a posterior's repr lists by name.
_REPR_ROWS = 24


class Posterior(NamedTuple):
    r"""A mean-field Gaussian :math:`q(\theta) = \mathcal{N}(\mu, \mathrm{diag}(\sigma^2))`.

    Both fields map parameter names, as in :meth:`torch.nn.Module.named_parameters`, to
    tensors of the parameter's shape. The variance is parameterized as in zuko,
    :math:`\sigma^2 = \exp(\mathrm{softclip}(\log \sigma^2, 18))` with
    :math:`\mathrm{softclip}(x, b) = x / \sqrt{1 + (x / b)^2}`, which keeps it within
    :math:`(e^{-18}, e^{18})` without ever cutting gradients.

    It pickles with its tensors: `torch.save(q, f)` and `torch.load(f, weights_only=False)`
    (torch's default `weights_only=True` loads tensors and plain containers only), or
    save `{"mean": q.mean, "logvar": q.logvar}` and rebuild it with `Posterior(**d)`.

    Attributes:
        mean: The means :math:`\mu`.
        logvar: The unconstrained log-variances :math:`\log \sigma^2`.
    """

    mean: dict[str, Tensor]
    logvar: dict[str, Tensor]

    def __repr__(self) -> str:
        # A posterior of a real network holds millions of numbers: name the tensors, their
        # shapes and the range of sigma instead of printing them.
        try:
            return _summary(self)
        except Exception:  # not dicts of tensors: the plain NamedTuple form
            return f"Posterior(mean={self.mean!r}, logvar={self.logvar!r})"


def _sigma_range(logvars: list[Tensor]) -> str:
    with torch.no_grad():
        sigmas = [std(lv.detach()) for lv in logvars if lv.numel() and not lv.is_meta]
        if not sigmas:
            return ""
        low = min(s.min().item() for s in sigmas)
        high = max(s.max().item() for s in sigmas)
    low_, high_ = f"{low:.3g}", f"{high:.3g}"
    return f"sigma {low_}" if low_ == high_ else f"sigma {low_} to {high_}"


def _summary(posterior: Posterior) -> str:
    mean, logvar = posterior.mean, posterior.logvar
    tensors = [*mean.values(), *logvar.values()]
    if not all(isinstance(t, Tensor) for t in tensors) or mean.keys() != logvar.keys():
        raise TypeError("not a posterior")
    if not mean:
        return "Posterior(no parameters)"

    numel = sum(m.numel() for m in mean.values())
    kinds = ", ".join(
        dict.fromkeys(f"{str(t.dtype).removeprefix('torch.')} on {t.device}" for t in tensors)
    )
    head = [f"{numel:,} parameters in {len(mean)} tensors", kinds]
    head.append(_sigma_range(list(logvar.values())))
    lines = [f"Posterior({', '.join(h for h in head if h)})"]

    names = list(mean)
    shown = names if len(names) <= _REPR_ROWS else names[: _REPR_ROWS - 1]
    width = max(len(n) for n in shown)
    shapes = {n: str(tuple(mean[n].shape)) for n in shown}
    shape_width = max(len(s) for s in shapes.values())
    for n in shown:
        sigma = _sigma_range([logvar[n]])
        lines.append(f"  {n:<{width}}  {shapes[n]:<{shape_width}}  {sigma}".rstrip())
    if len(shown) < len(names):
        lines.append(f"  ... and {len(names) - len(shown)} more tensors")
    return "\n".join(lines)


Posterior.__module__ = "bayesflow"
