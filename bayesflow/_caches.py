r"""Every cache of bayesflow, in one place, cleared by one function.

A cache is keyed by the objects it describes, never by their `id()` (an id is reused once
its object is freed), and holds at most a fixed number of entries, or only as many as
there are live objects (a weak key). A function passed anew at every call, as a lambda
written inside a training loop is, keys by what it runs (its code and what it closes
over), so that a fresh lambda of the same code finds the entry of the last one.
"""

from __future__ import annotations

__all__ = ["Bounded", "PerObject", "clear_caches", "fn_key", "identity"]

import threading
import weakref

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

_REGISTRY: list[Callable[[], None]] = []


def clear_caches() -> None:
    r"""Empties every cache of bayesflow: module structures, recorded layer calls, measured
    memory footprints, the verdicts on zuko's pieces, the warnings already given.

    Nothing needs it for correctness (every cache checks that its entry still describes
    its object); it gives tests and long-running programs a clean slate.
    """

    for clear in _REGISTRY:
        clear()


class _Identity:
    r"""A key that compares by identity and keeps its object alive (its id stays its own)."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.obj is self.obj


def identity(obj: object) -> Hashable:
    r"""Returns a key for `obj` by identity, hashable whatever `obj` is."""

    return _Identity(obj)


_EMPTY = object()


def _contents(cell: Any) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet bound
        return _EMPTY


def fn_key(fn: Callable[..., Any]) -> Hashable:
    r"""Returns a key for what `fn` computes: its code and the objects it closes over, so
    that the same lambda created again (in a loop) gets the same key."""

    code = getattr(fn, "__code__", None)
    if code is None:
        func = getattr(fn, "__func__", None)  # a bound method: the function and its object
        if func is not None and hasattr(func, "__code__"):
            return (fn_key(func), _Identity(fn.__self__))
        return _Identity(fn)
    cells = tuple(_Identity(_contents(c)) for c in fn.__closure__ or ())
    defaults = tuple(_Identity(d) for d in fn.__defaults__ or ())
    kwdefaults = tuple((k, _Identity(v)) for k, v in (fn.__kwdefaults__ or {}).items())
    return (code, _Identity(fn.__globals__), cells, defaults, kwdefaults)


class Bounded(Generic[K, V]):
    r"""A map that keeps its `size` most recently used entries, registered with
    :func:`clear_caches` unless `cache` is false (one held by a :class:`PerObject`, which
    clears it)."""

    def __init__(self, size: int, cache: bool = True) -> None:
        self.size = size
        self.entries: OrderedDict[K, V] = OrderedDict()
        self.lock = threading.Lock()
        if cache:
            _REGISTRY.append(self.clear)

    def get(self, key: K) -> V | None:
        with self.lock:
            value = self.entries.get(key)
            if value is not None:
                self.entries.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> V:
        with self.lock:
            self.entries[key] = value
            self.entries.move_to_end(key)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)


class PerObject(Generic[V]):
    r"""Values attached to live objects (weak keys: an entry goes with its object),
    registered with :func:`clear_caches` unless `cache` is false (state that must live as
    long as its object, such as a lock)."""

    def __init__(self, cache: bool = True) -> None:
        self.entries: weakref.WeakKeyDictionary[Any, V] = weakref.WeakKeyDictionary()
        self.lock = threading.Lock()
        if cache:
            _REGISTRY.append(self.clear)

    def get(self, obj: object) -> V | None:
        return self.entries.get(obj)

    def setdefault(self, obj: object, make: Callable[[], V]) -> V:
        with self.lock:
            value = self.entries.get(obj)
            if value is None:
                value = self.entries[obj] = make()
            return value

    def put(self, obj: object, value: V) -> V:
        with self.lock:
            self.entries[obj] = value
        return value

    def pop(self, obj: object) -> V | None:
        with self.lock:
            return self.entries.pop(obj, None)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)


def register(clear: Callable[[], None]) -> None:
    r"""Registers the clear function of a cache that is neither :class:`Bounded` nor
    :class:`PerObject` (a set of warnings given, say)."""

    _REGISTRY.append(clear)
