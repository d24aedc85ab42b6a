r"""The linear layers bayesflow treats specially, recognized without importing zuko."""

from __future__ import annotations

__all__ = ["is_linear", "linear", "mask_of"]

import sys

import torch.nn as nn
import torch.nn.functional as F

from torch import Tensor


def is_linear(layer: nn.Module) -> bool:
    r"""Returns whether `layer` computes :math:`y = x (A \odot W)^T + b` in its `forward`.

    That is an instance of :class:`torch.nn.Linear` or :class:`zuko.nn.Linear`, or of a
    subclass, such as zuko's `MaskedLinear` (whose mask is :math:`A`), that keeps one of
    their `forward` methods: a subclass with a `forward` of its own may compute anything.

    Importing zuko changes torch.distributions defaults, so bayesflow never imports it
    itself: a module that holds zuko layers was built after zuko was imported.
    """

    forwards = {nn.Linear.forward}
    zuko_nn = sys.modules.get("zuko.nn")
    if zuko_nn is not None:
        if not isinstance(layer, (nn.Linear, zuko_nn.Linear)):
            return False
        forwards |= {zuko_nn.Linear.forward, zuko_nn.MaskedLinear.forward}
    elif not isinstance(layer, nn.Linear):
        return False

    return type(layer).forward in forwards


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
