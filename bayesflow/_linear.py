r"""The linear layers bayesflow treats specially, recognized without importing zuko."""

from __future__ import annotations

__all__ = ["linear", "linear_types", "mask_of"]

import sys

import torch.nn as nn
import torch.nn.functional as F

from torch import Tensor


def linear_types() -> tuple[type, ...]:
    r"""Returns :class:`torch.nn.Linear` (which zuko's `MaskedLinear` subclasses), and
    :class:`zuko.nn.Linear` if zuko is imported.

    Importing zuko changes torch.distributions defaults, so bayesflow never imports it
    itself: a module that holds zuko layers was built after zuko was imported.
    """

    zuko_nn = sys.modules.get("zuko.nn")
    return (nn.Linear,) if zuko_nn is None else (nn.Linear, zuko_nn.Linear)


def mask_of(layer: nn.Module) -> Tensor | None:
    r"""Returns the mask of a zuko `MaskedLinear` layer, or :py:`None`."""

    zuko_nn = sys.modules.get("zuko.nn")
    if zuko_nn is not None and isinstance(layer, zuko_nn.MaskedLinear):
        return layer.mask
    return None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    r"""Returns :math:`x W^T + b`, for a weight of shape `(out, in)` or, as in
    :class:`zuko.nn.Linear`, a stack `(S, out, in)` applied to inputs `(*, S, in)`."""

    if weight.dim() == 2:
        return F.linear(x, weight, bias)

    y = (weight @ x.unsqueeze(-1)).squeeze(-1)
    return y if bias is None else y + bias
