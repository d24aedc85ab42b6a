r"""The one place where bayesflow touches private torch APIs."""

from __future__ import annotations

__all__ = ["load_jvp_decompositions", "swap_parameters", "unwrap_batched"]

import importlib
import sys
import warnings

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn

from torch import Tensor
from torch._C import _functorch
from torch.nn.utils.stateless import _reparametrize_module


@contextmanager
def swap_parameters(module: nn.Module, params: dict[str, Tensor]) -> Iterator[nn.Module]:
    r"""Temporarily replaces parameters of `module` in place, and restores them on exit.

    :func:`torch.func.functional_call` does the same around a single call; the context
    manager form, which :meth:`BayesianModel.reparameterize` needs, is private in torch.
    """

    with _reparametrize_module(module, params, tie_weights=True):
        yield module


def unwrap_batched(t: Tensor) -> Tensor:
    r"""Returns the plain tensor under every functorch wrapper of `t` (all vmap levels).

    `bool()` of a batched tensor raises; a loop that must run until every sample of a
    vmap is done reads its stopping test through the wrappers.
    """

    while _functorch.is_functorch_wrapped_tensor(t):
        t = _functorch.get_unwrapped(t)
    return t


def load_jvp_decompositions() -> None:
    r"""Imports torch's forward-mode decompositions, which :func:`torch.func.jvp` imports on
    first use, outside vmap and without the deprecation warning torch raises there."""

    name = "torch._decomp.decompositions_for_jvp"
    if name not in sys.modules:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            importlib.import_module(name)
