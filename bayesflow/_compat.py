r"""The one place where bayesflow touches private or version-dependent torch APIs."""

from __future__ import annotations

__all__ = [
    "batched_at_current_level",
    "is_batched",
    "is_compiling",
    "load_jvp_decompositions",
    "unbatched",
    "unwrap_at",
    "unwrap_batched",
    "wrap_at",
]

import importlib
import sys
import warnings

from typing import Any

import torch

from torch import Tensor
from torch._C import _functorch


def is_compiling() -> bool:
    r"""Whether the code runs under :func:`torch.compile` tracing (dynamo)."""

    return torch.compiler.is_compiling()


def is_batched(t: Tensor) -> bool:
    r"""Whether `t` is batched by the innermost active :func:`torch.func.vmap`."""

    return _functorch.is_batchedtensor(t)


def batched_at_current_level(t: Tensor) -> int | None:
    r"""Returns the current vmap level if `t` is batched at it, else :py:`None`."""

    level = _functorch.maybe_current_level()
    if level is None or not _functorch.is_batchedtensor(t):
        return None
    return level if _functorch.maybe_get_level(t) == level else None


def unwrap_at(t: Tensor, level: int) -> tuple[Tensor, int | None]:
    r"""Returns the tensor under the vmap wrapper of `level` and its batch dim (or
    :py:`None` if `t` is not batched at that level)."""

    return _functorch._unwrap_batched(t, level)


def wrap_at(t: Tensor, dim: int, level: int) -> Tensor:
    r"""Returns `t` batched along `dim` at the vmap level `level`."""

    return _functorch._add_batch_dim(t, dim, level)


_BATCHED = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchBatched)


def unbatched() -> Any:
    r"""Runs the operations of a block below vmap's batching, as a batching rule does
    (torch's own `register_vmap` rules run this way)."""

    return torch._C._ExcludeDispatchKeyGuard(_BATCHED)


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
