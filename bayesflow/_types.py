r"""The plain data types shared by every layer of bayesflow."""

from __future__ import annotations

__all__ = ["Fn", "Posterior"]

from collections.abc import Callable
from typing import Any, NamedTuple

from torch import Tensor

Fn = Callable[..., Any]


class Posterior(NamedTuple):
    r"""A mean-field Gaussian :math:`q(\theta) = \mathcal{N}(\mu, \mathrm{diag}(\sigma^2))`.

    Both fields map parameter names, as in :meth:`torch.nn.Module.named_parameters`, to
    tensors of the parameter's shape. The variance is parameterized as in zuko,
    :math:`\sigma^2 = \exp(\mathrm{softclip}(\log \sigma^2, 18))` with
    :math:`\mathrm{softclip}(x, b) = x / \sqrt{1 + (x / b)^2}`, which keeps it within
    :math:`(e^{-18}, e^{18})` without ever cutting gradients.

    Attributes:
        mean: The means :math:`\mu`.
        logvar: The unconstrained log-variances :math:`\log \sigma^2`.
    """

    mean: dict[str, Tensor]
    logvar: dict[str, Tensor]


Posterior.__module__ = "bayesflow"
