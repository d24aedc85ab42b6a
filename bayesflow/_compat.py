r"""The one place where bayesflow touches private torch APIs."""

from __future__ import annotations

__all__ = ["swap_parameters"]

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn

from torch import Tensor
from torch.nn.utils.stateless import _reparametrize_module


@contextmanager
def swap_parameters(module: nn.Module, params: dict[str, Tensor]) -> Iterator[nn.Module]:
    r"""Temporarily replaces parameters of `module` in place, and restores them on exit.

    :func:`torch.func.functional_call` does the same around a single call; the context
    manager form, which :meth:`BayesianModel.reparameterize` needs, is private in torch.
    """

    with _reparametrize_module(module, params, tie_weights=True):
        yield module
