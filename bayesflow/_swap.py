r"""How bayesflow puts tensors and attributes in a module for a call, and always puts the
very same objects back: :class:`swapped` for parameters and buffers (in every place that
holds them, and the weights a recurrent layer caches), :func:`patched` for instance
attributes such as a layer's `forward`."""

from __future__ import annotations

__all__ = ["REMOVE", "has_own_forward", "ours", "patched", "swapped"]

import weakref

from collections.abc import Callable, Mapping
from typing import Any

import torch.nn as nn

from torch import Tensor

from ._caches import PerObject, identity
from ._compat import is_compiling
from ._structure import Structure

# The attributes in which torch's recurrent layers cache their weights.
_FLAT = ("_flat_weights", "_flat_weight_refs")

# Per structure: the recurrent layers, each as its path and the names of its parameters.
_RECURRENT: PerObject[tuple[tuple[str, frozenset[str]], ...]] = PerObject()


def _recurrent_of(st: Structure, module: nn.Module) -> tuple[tuple[str, frozenset[str]], ...]:
    r"""Returns the recurrent layers (:class:`torch.nn.RNNBase`) of `module`: the path of
    each, and the names by which `st` knows the parameters it holds, its parametrizations'
    included (tied ones by their first name); none for most modules. Cached with the
    structure."""

    # Not read while compiling: dynamo would guard on the weak dictionary's keys, which
    # other modules' structures leave at any garbage collection (a failed guard).
    found = None if is_compiling() else _RECURRENT.get(st)
    if found is None:
        layers = []
        for path, m in st.find(module, nn.RNNBase):
            tables = {identity(sub._parameters) for sub in m.modules()}
            names = [
                name
                for name, slots in st.slots.items()
                if any(identity(d) in tables for d, _ in slots)
            ]
            layers.append((path, frozenset(names)))
        found = tuple(layers)
        if not is_compiling():
            _RECURRENT.put(st, found)
    return found


class swapped:
    r"""Puts `params` (and `buffers`) in every place that holds them, tied and shared
    places included, and puts the original objects back on exit.

    Given `module`, the module `st` describes (as the engine always gives it), the
    recurrent layers whose parameters are swapped also get back the very lists in which
    torch caches their weights (`_flat_weights`), as they were: torch's forward fills them
    with the tensors it finds, which would keep a sample (a view of a whole draw, its
    graph, or a dead vmap tensor) alive in the module after the call.
    """

    __slots__ = ("buffers", "done", "flat", "module", "params", "st")

    def __init__(
        self,
        st: Structure,
        params: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor] | None = None,
        module: nn.Module | None = None,
    ) -> None:
        self.st, self.params, self.buffers, self.module = st, params, buffers, module
        self.done: list[tuple[dict, str, Tensor]] = []
        # Per recurrent layer: its `__dict__`, and per cached list the list and its items.
        self.flat: list[tuple[dict, list[tuple[str, Any, list]]]] = []

    def __enter__(self) -> None:
        done = self.done
        try:
            if self.module is not None:
                recurrent = _recurrent_of(self.st, self.module)
                if recurrent:
                    self._keep_flat(recurrent)
            slots = self.st.slots
            for name, t in self.params.items():
                for d, attr in slots[name]:
                    done.append((d, attr, d[attr]))
                    d[attr] = t
            if self.buffers:
                slots = self.st.buffer_slots
                for name, t in self.buffers.items():
                    for d, attr in slots[name]:
                        done.append((d, attr, d[attr]))
                        d[attr] = t
        except BaseException:
            self.__exit__()
            raise

    def _keep_flat(self, recurrent: tuple[tuple[str, frozenset[str]], ...]) -> None:
        for path, names in recurrent:
            if names.isdisjoint(self.params):
                continue
            d = vars(self.st.sub(self.module, path))
            kept = []
            for attr in _FLAT:
                cached = d.get(attr, REMOVE)
                kept.append((attr, cached, REMOVE if cached is REMOVE else list(cached)))
            self.flat.append((d, kept))

    def hand_over(self, inner: swapped) -> None:
        r"""Leaves without restoring: `inner`, entered after this one and still open, puts
        back on its exit what this one found."""

        _hand_over(self.done, inner.done, lambda e: (id(e[0]), e[1]))
        _hand_over(self.flat, inner.flat, lambda e: id(e[0]))

    def __exit__(self, *exc: object) -> None:
        for d, attr, original in reversed(self.done):
            d[attr] = original
        self.done.clear()
        for d, kept in self.flat:
            for attr, cached, items in kept:
                if cached is REMOVE:
                    d.pop(attr, None)
                else:
                    cached[:] = items  # torch updates the list in place on `m.weight = w`
                    d[attr] = cached
        self.flat.clear()


#: A value for :class:`patched`: the attribute is removed from the instance `__dict__`
#: for the duration (its class's attribute shows through), and put back on exit.
REMOVE: Any = object()

# The forwards bayesflow has put on instances (held by a call or a `hold`).
_FORWARDS: weakref.WeakSet = weakref.WeakSet()


def has_own_forward(obj: Any) -> bool:
    r"""Whether `obj` has a `forward` set on the instance by someone else than bayesflow
    (a monkeypatch, accelerate's hooks): it, not the class's, runs, and no stand-in may
    replace it."""

    forward = vars(obj).get("forward")
    if forward is None:
        return False
    try:
        return forward not in _FORWARDS
    except TypeError:  # not weakly referable: not ours
        return True


def ours(forward: Any) -> Any:
    r"""Returns `forward`, a stand-in bayesflow puts on an instance, marked as such."""

    _FORWARDS.add(forward)
    return forward


class patched:
    r"""Sets instance attributes `(obj, name, value)` and restores them on exit.

    The one way bayesflow replaces a layer's `forward` or flag for the duration of a call:
    through the instance `__dict__`, so no class and no other instance is affected. A
    value of :data:`REMOVE` removes the attribute from the instance for the duration.
    """

    __slots__ = ("changes", "done")

    def __init__(self, changes: list[tuple[Any, str, Any]]) -> None:
        self.changes = changes
        # What was there before: (obj, name, old value or REMOVE if the instance had none).
        self.done: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> None:
        try:
            for obj, name, value in self.changes:
                d = vars(obj)
                self.done.append((obj, name, d.get(name, REMOVE)))
                if value is REMOVE:
                    d.pop(name, None)
                else:
                    d[name] = value
        except BaseException:
            self.__exit__()
            raise

    def hand_over(self, inner: patched) -> None:
        r"""Leaves without restoring: `inner`, entered after this one and still open, puts
        back on its exit what this one found."""

        _hand_over(self.done, inner.done, lambda e: (id(e[0]), e[1]))

    def __exit__(self, *exc: object) -> None:
        for obj, name, old in reversed(self.done):
            if old is REMOVE:
                vars(obj).pop(name, None)
            else:
                vars(obj)[name] = old
        self.done.clear()


def _hand_over(outer: list, inner: list, place: Callable[[Any], Any]) -> None:
    r"""Moves the records of what `outer` found into `inner`, a change made after it on
    the same places: where both changed a place, the inner one's record (the outer one's
    value) becomes the outer one's; a place only the outer one changed is restored last."""

    first: dict[Any, int] = {}
    for i, entry in enumerate(inner):
        first.setdefault(place(entry), i)
    for entry in reversed(outer):
        i = first.get(place(entry))
        if i is None:
            inner.insert(0, entry)
            first = {k: v + 1 for k, v in first.items()}
        else:
            inner[i] = entry
    outer.clear()
