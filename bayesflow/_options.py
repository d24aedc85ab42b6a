r"""The options of a call over posterior samples, checked once and carried as one bundle."""

from __future__ import annotations

__all__ = ["CallOptions", "call_options"]

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch.nn as nn

from ._checks import check_bool, check_callable, check_int, check_randomness

Fn = Callable[..., Any]


def _call(module: nn.Module, *args: Any) -> Any:
    return module(*args)


class CallOptions(NamedTuple):
    r"""Everything a call over posterior samples is told besides the module, the samples
    and the arguments; see :func:`bayesflow.vmap_call` for their meanings.

    Build it with :func:`call_options`, which checks every field: the engine trusts it.
    """

    where: str
    fn: Fn = _call
    chunk_size: int | str | None = None
    fallback: bool = True
    in_dims: Sequence[int | None] | None = None
    randomness: str | None = None
    vectorized: bool = True
    max_memory: int | None = None


def _chunk_size(where: str, chunk_size: object) -> int | str | None:
    if chunk_size is None or chunk_size == "auto":
        return chunk_size
    if isinstance(chunk_size, str):
        raise ValueError(
            f"{where}: expected chunk_size to be a positive int, 'auto' or None, "
            f"got {chunk_size!r}"
        )
    return check_int(where, "chunk_size", chunk_size, or_none=True)


def call_options(
    where: str,
    fn: object = None,
    chunk_size: object = None,
    fallback: object = True,
    in_dims: object = None,
    randomness: object = None,
    vectorized: object = True,
    max_memory: object = None,
) -> CallOptions:
    r"""Checks the options of a call made by the public function `where`, and bundles them.

    `in_dims` is checked against the arguments and the number of samples by the engine,
    which knows both, before any work.
    """

    check_callable(where, "fn", fn)
    chunk_size = _chunk_size(where, chunk_size)
    if max_memory is not None:
        max_memory = check_int(where, "max_memory", max_memory)
        if chunk_size != "auto":  # the budget of "auto" only: silently ignored otherwise
            raise ValueError(
                f"{where}: expected chunk_size='auto' with max_memory (the budget of its "
                f"chunks), got chunk_size={chunk_size!r}"
            )
    return CallOptions(
        where=where,
        fn=_call if fn is None else fn,
        chunk_size=chunk_size,
        fallback=check_bool(where, "fallback", fallback),
        in_dims=in_dims,
        randomness=check_randomness(where, randomness),
        vectorized=check_bool(where, "vectorized", vectorized),
        max_memory=max_memory,
    )
