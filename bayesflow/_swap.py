r"""How bayesflow puts tensors and attributes in a module for a call, and always puts the
very same objects back: :class:`swapped` for parameters and buffers (in every place that
holds them), :func:`patched` for instance attributes such as a layer's `forward`."""

from __future__ import annotations

__all__ = ["REMOVE", "has_own_forward", "ours", "patched", "swapped"]

import weakref

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ._structure import Structure


class swapped:
    r"""Puts `params` (and `buffers`) in every place that holds them, tied and shared
    places included, and puts the original objects back on exit."""

    __slots__ = ("buffers", "done", "params", "st")

    def __init__(
        self,
        st: Structure,
        params: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.st, self.params, self.buffers = st, params, buffers
        self.done: list[tuple[dict, str, Tensor]] = []

    def __enter__(self) -> None:
        done = self.done
        try:
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

    def __exit__(self, *exc: object) -> None:
        for d, attr, original in reversed(self.done):
            d[attr] = original
        self.done.clear()


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

    def __exit__(self, *exc: object) -> None:
        for obj, name, old in reversed(self.done):
            if old is REMOVE:
                vars(obj).pop(name, None)
            else:
                vars(obj)[name] = old
        self.done.clear()
