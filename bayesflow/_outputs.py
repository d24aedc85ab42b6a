r"""The outputs of `fn`: tensors, :py:`None`, or tuples (named too), lists and dicts of them."""

from __future__ import annotations

__all__ = ["OutputError", "flatten", "map_outputs", "stack", "unflatten"]

from collections.abc import Callable, Mapping
from typing import Any

import torch

from torch import Tensor

from ._errors import OutputError


def _rebuild(like: Any, items: list[Any]) -> Any:
    return type(like)(*items) if hasattr(like, "_fields") else type(like)(items)


def map_outputs(where: str, f: Callable[[Tensor], Any], out: Any) -> Any:
    r"""Applies `f` to every tensor of `out`; :py:`None` stays, anything else is an error."""

    if isinstance(out, Tensor):
        return f(out)
    if out is None:
        return None
    if isinstance(out, Mapping):
        return {k: map_outputs(where, f, v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return _rebuild(out, [map_outputs(where, f, o) for o in out])

    raise OutputError(
        f"{where}: expected fn to return tensors (or tuples, lists or dicts of them), got "
        f"{type(out).__name__}; reduce it to tensors inside fn, e.g. "
        "fn=lambda flow, c, x: flow(c).log_prob(x)"
    )


class _Leaf(int):
    r"""The position of a tensor in the outputs, in a spec from :func:`flatten`."""


def flatten(where: str, out: Any) -> tuple[tuple[Tensor, ...], Any]:
    r"""Returns the tensors of `out` in order (none if `out` holds none, e.g. is :py:`None`)
    and what it takes to rebuild `out` from them."""

    leaves: list[Tensor] = []

    def take(t: Tensor) -> _Leaf:
        leaves.append(t)
        return _Leaf(len(leaves) - 1)

    spec = map_outputs(where, take, out)
    return tuple(leaves), spec


def unflatten(spec: Any, leaves: tuple[Tensor, ...] | list[Tensor]) -> Any:
    r"""Rebuilds outputs from :func:`flatten`'s spec and new tensors in the same order."""

    if isinstance(spec, _Leaf):
        return leaves[spec]
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return {k: unflatten(v, leaves) for k, v in spec.items()}
    return _rebuild(spec, [unflatten(s, leaves) for s in spec])


def stack(outs: list[Any]) -> Any:
    r"""Stacks per-sample outputs of the same structure on a new leading dim."""

    first = outs[0]
    if isinstance(first, Tensor):
        return torch.stack(outs)
    if first is None:
        return None
    if isinstance(first, Mapping):
        return {k: stack([o[k] for o in outs]) for k in first}
    return _rebuild(first, [stack(list(o)) for o in zip(*outs, strict=True)])
