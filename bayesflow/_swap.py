r"""How bayesflow puts tensors and attributes in a module for a call, and always puts the
very same objects back: :class:`swapped` for parameters and buffers (in every place that
holds them, and the weights a recurrent layer caches), :func:`patched` for instance
attributes such as a layer's `forward`."""

from __future__ import annotations

__all__ = ["REMOVE", "has_own_forward", "ours", "patched", "swapped"]

import functools
import warnings
import weakref

from collections.abc import Callable, Mapping
from typing import Any

import torch.nn as nn

from torch import Tensor

from ._caches import PerObject, identity
from ._checks import stack_level
from ._compat import is_compiling
from ._structure import _FLAT, Structure

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

    The places are the module's tables and the plain lists and dicts that hold its
    tensors too (see :class:`Structure`), whose items are found and put back by identity;
    a sampled parameter also held where no sample can be put (a tuple, a view) warns.
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
        # (place, key, what it held, what was put there)
        self.done: list[tuple[Any, Any, Tensor, Tensor]] = []
        # Per recurrent layer: its `__dict__`, and per cached list the list and its items.
        self.flat: list[tuple[dict, list[tuple[str, Any, list]]]] = []

    def __enter__(self) -> None:
        done = self.done
        if self.st.unreached:
            _warn_unreached(self.st, self.params)
        try:
            if self.module is not None:
                recurrent = _recurrent_of(self.st, self.module)
                if recurrent:
                    self._keep_flat(recurrent)
            st = self.st
            for table, own, given in (
                (st.slots, st.params, self.params),
                (st.buffer_slots, st.buffers, self.buffers or {}),
            ):
                for name, t in given.items():
                    for d, attr in table[name]:
                        if st.plain and id(d) in st.plain:
                            attr = _where(d, attr, own[name])  # (fn may have moved it)
                            if attr is None:
                                continue
                        done.append((d, attr, d[attr], t))
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

    def hand_over(self, inners: list[swapped]) -> None:
        r"""Leaves before `inners`, entered after this one and still open (in order): a
        place one of them changed too is put back by the first of those on its exit, to
        what this one found; the others are put back now."""

        plain = self.st.plain

        # A place of a table by its key; of a plain list or dict by what the outer one put
        # there, which the inner one found (`fn` may have moved it to another index).
        def outer_place(e: tuple) -> Any:
            return (id(e[0]), id(e[3]) if id(e[0]) in plain else e[1])

        def inner_place(e: tuple) -> Any:
            return (id(e[0]), id(e[2]) if id(e[0]) in plain else e[1])

        _hand_over(
            self.done,
            [i.done for i in inners],
            outer_place,
            functools.partial(_put, plain),
            lambda outer, inner: (*inner[:2], outer[2], inner[3]),  # the inner one's place
            inner_place,
            one_each=True,
        )
        _hand_over(self.flat, [i.flat for i in inners], lambda e: id(e[0]), _put_flat)

    def __exit__(self, *exc: object) -> None:
        plain = self.st.plain
        for entry in reversed(self.done):
            _put(plain, entry)
        self.done.clear()
        for entry in self.flat:
            _put_flat(entry)
        self.flat.clear()


def _warn_unreached(st: Structure, params: Mapping[str, Tensor]) -> None:
    r"""Warns that sampled `params` are also held in places no sample is put in."""

    names = [name for name in st.unreached if name in params]
    if not names:
        return
    places = "; ".join(f"{name!r} in {', '.join(st.unreached[name])}" for name in names)
    warnings.warn(
        "the sampled parameters are also held in attributes that bayesflow cannot swap: "
        f"{places}; the sample does not reach them there, and what reads them gets the "
        "module's own tensor: hold them in a list or dict attribute (one level deep), or "
        "read them from their module (`self.lin.weight`)",
        UserWarning,
        stacklevel=stack_level(),
    )


def _where(d: Any, key: Any, t: Tensor) -> Any:
    r"""Returns the key under which the plain list or dict `d` holds `t`: `key`, or where a
    list holds it now; :py:`None` where it holds it no more."""

    if type(d) is list:
        if key < len(d) and d[key] is t:
            return key
        return next((i for i, held in enumerate(d) if held is t), None)
    return key if d.get(key) is t else None


def _put(plain: frozenset, entry: tuple[Any, Any, Tensor, Tensor]) -> None:
    r"""Puts back what a place held. A plain list or dict of the module's (`plain`) gets it
    where it holds what was put there: `fn` may have moved, removed or replaced its items
    (`self.cache.pop()`), which a plain forward leaves so; the module's tables always."""

    d, attr, original, put = entry
    if id(d) not in plain:
        d[attr] = original
    elif type(d) is list:
        if attr < len(d) and d[attr] is put:
            d[attr] = original
        else:
            for i, held in enumerate(d):  # moved: where it is now
                if held is put:
                    d[i] = original
                    break
    elif d.get(attr) is put:
        d[attr] = original


def _put_flat(entry: tuple[dict, list[tuple[str, Any, list]]]) -> None:
    d, kept = entry
    for attr, cached, items in kept:
        if cached is REMOVE:
            d.pop(attr, None)
        else:
            cached[:] = items  # torch updates the list in place on `m.weight = w`
            d[attr] = cached


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
    if getattr(forward, "__self__", None) is obj and (
        getattr(forward, "__func__", None) is type(obj).forward
    ):
        return False  # the class's own, bound (what zuko's local trick leaves on exit)
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

    def hand_over(self, inners: list[patched]) -> None:
        r"""Leaves before `inners`, entered after this one and still open (in order): an
        attribute one of them changed too is put back by the first of those on its exit,
        to what this one found; the others are put back now."""

        _hand_over(self.done, [i.done for i in inners], lambda e: (id(e[0]), e[1]), _unpatch)

    def __exit__(self, *exc: object) -> None:
        for entry in reversed(self.done):
            _unpatch(entry)
        self.done.clear()


def _unpatch(entry: tuple[Any, str, Any]) -> None:
    obj, name, old = entry
    if old is REMOVE:
        vars(obj).pop(name, None)
    else:
        vars(obj)[name] = old


def _hand_over(
    outer: list,
    inners: list[list],
    place: Callable[[Any], Any],
    put: Callable[[Any], None],
    merge: Callable[[Any, Any], Any] = lambda outer, inner: outer,
    inner_place: Callable[[Any], Any] | None = None,
    one_each: bool = False,
) -> None:
    r"""Leaves the changes recorded in `outer` before those of `inners`, made after it and
    still in place (in order). Where one of them changed a place too, the first such
    record (what it found: this one's value) becomes this one's, and it puts the place
    back on its exit; a place none of them changed is put back now (with `put`), as on an
    exit in order: another change left open keeps none of this one's values in place. The
    records pair by `place` (`inner_place` for the inner ones', if it differs), and `merge`
    makes the record the inner one keeps; with `one_each`, an inner record pairs with one
    outer record at most, in order (places that share a key: a list holding a tensor twice)."""

    inner_place = place if inner_place is None else inner_place
    firsts = []
    for records in inners:
        first: dict[Any, list[int]] = {}
        for i, entry in enumerate(records):
            first.setdefault(inner_place(entry), []).append(i)
        firsts.append(first)
    for entry in outer if one_each else reversed(outer):
        key = place(entry)
        for records, first in zip(inners, firsts, strict=True):
            found = first.get(key)
            if found:
                i = found.pop(0) if one_each else found[0]
                records[i] = merge(entry, records[i])
                break
        else:
            put(entry)
    outer.clear()
