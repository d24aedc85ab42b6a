r"""The one place where bayesflow touches private or version-dependent torch APIs."""

from __future__ import annotations

__all__ = ["is_batched", "is_compiling", "load_jvp_decompositions", "unwrap_batched"]

import importlib
import sys
import warnings

import torch

from torch import Tensor
from torch._C import _functorch


def is_compiling() -> bool:
    r"""Whether the code runs under :func:`torch.compile` tracing (dynamo)."""

    return torch.compiler.is_compiling()


def is_batched(t: Tensor) -> bool:
    r"""Whether `t` is batched by the innermost active :func:`torch.func.vmap`."""

    return _functorch.is_batchedtensor(t)


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
