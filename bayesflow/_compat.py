r"""The one place where bayesflow touches private or version-dependent torch APIs."""

from __future__ import annotations

__all__ = [
    "BatchNorm",
    "ConvNd",
    "WeightNorm",
    "allocated_bytes",
    "batched_at_current_level",
    "flat_cat",
    "fused_rnn",
    "in_func_transform",
    "is_batched",
    "is_compiling",
    "is_wrapped",
    "load_jvp_decompositions",
    "unbatched",
    "unwrap_at",
    "unwrap_batched",
    "wrap_at",
]

import importlib
import sys
import warnings

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from torch import Tensor
from torch._C import _functorch
from torch.nn.utils import parametrizations
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# torch's private base classes of the layers bayesflow handles specially.
BatchNorm = nn.modules.batchnorm._BatchNorm
ConvNd = nn.modules.conv._ConvNd
WeightNorm = parametrizations._WeightNorm


def flat_cat(tensors: list[Tensor]) -> Tensor:
    r"""Returns the tensors flattened and concatenated, in one call (differentiable)."""

    return torch._C._nn.flatten_dense_tensors(tensors)


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


def is_wrapped(t: Tensor) -> bool:
    r"""Whether `t` is wrapped by any :mod:`torch.func` transform (vmap, grad, jvp)."""

    return _functorch.is_functorch_wrapped_tensor(t)


def fused_rnn(mode: str) -> Callable[..., tuple[Tensor, Any]]:
    r"""Returns torch's fused kernel of a recurrent layer's `mode` (`nn.RNNBase.mode`): the
    function `nn.LSTM`, `nn.GRU` and `nn.RNN` call with their flat weights."""

    return {
        "LSTM": torch._VF.lstm,
        "GRU": torch._VF.gru,
        "RNN_TANH": torch._VF.rnn_tanh,
        "RNN_RELU": torch._VF.rnn_relu,
    }[mode]


def unwrap_at(t: Tensor, level: int) -> tuple[Tensor, int | None]:
    r"""Returns the tensor under the vmap wrapper of `level` and its batch dim (or
    :py:`None` if `t` is not batched at that level)."""

    return _functorch._unwrap_batched(t, level)


def wrap_at(t: Tensor, dim: int, level: int) -> Tensor:
    r"""Returns `t` batched along `dim` at the vmap level `level`."""

    return _functorch._add_batch_dim(t, dim, level)


_BATCHED = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchBatched)


@contextmanager
def unbatched() -> Iterator[None]:
    r"""Runs the operations of a block below the current vmap level, as torch runs a
    batching rule: the level is popped off functorch's stack (its operations then skip
    functorch's dispatch altogether) and batching is excluded."""

    saved = _functorch.pop_dynamic_layer_stack()
    try:
        with torch._C._ExcludeDispatchKeyGuard(_BATCHED):
            yield
    finally:
        _functorch.push_dynamic_layer_stack(saved)


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


class _Allocations(TorchDispatchMode):
    r"""Sums the bytes of every tensor the operations of a block return (no frees are
    subtracted: an upper bound of the block's peak memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views and in-place results share an input's storage: only new storage counts.
        seen = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    self.bytes += storage.nbytes()
        return out


def allocated_bytes(call: Callable[[], Any]) -> int:
    r"""Returns the bytes of new storage that the operations of `call()` allocate."""

    with _Allocations() as counter:
        call()
    return counter.bytes


def in_func_transform() -> bool:
    r"""Whether a :mod:`torch.func` transform (vmap, grad, jvp, ...) is active."""

    return torch._C._are_functorch_transforms_active()
