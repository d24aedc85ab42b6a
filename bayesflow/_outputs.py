r"""The outputs of `fn`: tensors, :py:`None`, or tuples (named too), lists and dicts of them."""

from __future__ import annotations

__all__ = ["OutputError", "flatten", "flatten_like", "map_outputs", "stack", "unflatten"]

from collections.abc import Callable, Mapping
from typing import Any

import torch

from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from ._compat import autocast_off
from ._errors import OutputError, OutputStructureError


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
    if isinstance(out, PackedSequence):  # (a tuple that cannot be rebuilt from pieces)
        raise OutputError(
            f"{where}: expected fn to return tensors (or tuples, lists or dicts of them), got "
            "a PackedSequence, whose samples cannot be stacked into one; pad it inside fn, "
            "e.g. fn=lambda rnn, x: pad_packed_sequence(rnn(x)[0], batch_first=True)[0]"
        )
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


def flatten_like(where: str, out: Any, spec: Any) -> tuple[Tensor, ...]:
    r"""Returns the tensors of `out` in the order of `spec`, the first chunk's structure
    (dicts of the same keys in another order taken by key, as :func:`stack` does); outputs
    of another structure raise an :class:`OutputStructureError`."""

    leaves, other = flatten(where, _like(out, spec))
    if not _same(spec, other):
        raise OutputStructureError(
            f"{where}: expected fn to return outputs of the same structure for every sample, "
            f"got {_describe(other)} for a later chunk of samples and {_describe(spec)} for "
            "the first"
        )
    return leaves


def _describe(spec: Any) -> str:
    r"""Describes a spec from :func:`flatten`, its tensors as `Tensor`."""

    return repr(unflatten(spec, _Tensors()))


class _Tensor:
    def __repr__(self) -> str:
        return "Tensor"


class _Tensors:
    def __getitem__(self, i: int) -> _Tensor:
        return _Tensor()


def unflatten(spec: Any, leaves: tuple[Tensor, ...] | list[Tensor]) -> Any:
    r"""Rebuilds outputs from :func:`flatten`'s spec and new tensors in the same order."""

    if isinstance(spec, _Leaf):
        return leaves[spec]
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return {k: unflatten(v, leaves) for k, v in spec.items()}
    return _rebuild(spec, [unflatten(s, leaves) for s in spec])


def stack(where: str, outs: list[Any]) -> Any:
    r"""Stacks per-sample outputs on a new leading dim. Every sample's outputs must have the
    structure and the shapes of the first's: others raise a :class:`ValueError` (torch's
    error named no function, and keys beyond the first sample's were dropped)."""

    leaves, spec = flatten(where, outs[0])
    columns = [[t] for t in leaves]
    shapes = [t.shape for t in leaves]
    for i, out in enumerate(outs[1:], 1):
        others, other = flatten(where, _like(out, spec))
        if not _same(spec, other) or [t.shape for t in others] != shapes:
            raise ValueError(
                f"{where}: expected fn to return outputs of the same structure and shapes "
                f"for every sample, got {_shapes(where, out)} for sample {i} and "
                f"{_shapes(where, outs[0])} for sample 0"
            )
        for column, t in zip(columns, others, strict=True):
            column.append(t)
    # (Without autocast: its rule for `stack` refuses float16 under bfloat16's autocast;
    # tensors of one dtype stack to it either way.)
    with autocast_off():
        return unflatten(spec, [torch.stack(column) for column in columns])


def _like(out: Any, spec: Any) -> Any:
    r"""Returns `out` with the keys of its dicts in the order of `spec`'s, where they have
    the same keys: the loop stacks dicts by key."""

    if isinstance(spec, Mapping) and isinstance(out, Mapping) and out.keys() == spec.keys():
        return {k: _like(out[k], spec[k]) for k in spec}
    if isinstance(spec, (tuple, list)) and isinstance(out, (tuple, list)):
        if len(out) == len(spec):
            return _rebuild(out, [_like(o, t) for o, t in zip(out, spec, strict=True)])
    return out


def _same(a: Any, b: Any) -> bool:
    r"""Whether two specs from :func:`flatten` are the same, containers and keys in order."""

    if type(a) is not type(b):
        return False
    if isinstance(a, Mapping):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _shapes(where: str, out: Any) -> str:
    r"""Describes outputs by the shapes of their tensors."""

    return repr(map_outputs(where, lambda t: tuple(t.shape), out))
