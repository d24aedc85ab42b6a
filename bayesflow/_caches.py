r"""Every cache of bayesflow, in one place, cleared by one function.

A cache is keyed by the objects it describes, never by their `id()` alone (an id is reused
once its object is freed; the one exception, a namespace of no module, is in
:func:`_namespace`), and holds at most a fixed number of entries, or only as many as
there are live objects (a weak key, compared by identity: two modules that compare equal
are two modules). A function passed anew at every call, as a lambda written inside a
training loop is, keys by what it runs (its code and what it closes over, a tensor by its
shape, dtype and device, a number or a string by its value, any other object by identity,
held weakly), so that a fresh lambda of the same code over the next batch finds the entry
of the last one, and no entry keeps alive what the function closes over.
"""

from __future__ import annotations

__all__ = ["Bounded", "PerObject", "clear_caches", "fn_key", "identity", "value_key"]

import sys
import threading
import weakref

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import torch

from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ._compat import is_compiling, is_wrapped

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


class _Strong:
    r"""A reference that keeps its object alive, called as a weak one is."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __call__(self) -> object:
        return self.obj


class _Identity:
    r"""A key that compares by identity. It holds its object weakly where it can: a key of
    a cache's entry that led back to the object keying the cache (an `fn` that closes over
    a trainer holding the module) would keep both alive for good. A tensor, or an object
    that cannot be referenced weakly, is held (its id then stays its own). A key whose
    object is gone equals no other."""

    __slots__ = ("hash", "ref")

    def __init__(self, obj: object) -> None:
        # A tensor is held: it leads back to no module, and `torch.utils.swap_tensors`
        # (which converting a module may use) refuses a tensor that has a weak reference.
        try:
            self.ref: Callable[[], object] = (
                _Strong(obj) if isinstance(obj, Tensor) else weakref.ref(obj)
            )
        except TypeError:
            self.ref = _Strong(obj)
        self.hash = id(obj)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Identity):
            return False
        obj = self.ref()
        return obj is not None and obj is other.ref()


def identity(obj: object) -> Hashable:
    r"""Returns a key for `obj` by identity, hashable whatever `obj` is."""

    return _Identity(obj)


# Immutable values that a key may hold by value (a float or an int made anew at every
# step, a step number, say, is another object each time).
_VALUES = (bool, int, float, complex, str, bytes, type(None))


def value_key(obj: object, depth: int = 2) -> Hashable:
    r"""Returns a key for `obj` as far as the memory and the layer calls of a call depend
    on it: a tensor by its shape, dtype and device (its values are the next batch's; a
    0-dim integer one, which may be a count, by its value on the CPU and elsewhere by identity
    and version; a nested or sparse one by identity), a number or a string by its value, a tuple
    (a named one too), list or dict of those (`depth` levels, 64 items at most) by theirs,
    anything else by identity (held weakly where it can be: see :class:`_Identity`)."""

    if isinstance(obj, Tensor):
        count = obj.dim() == 0 and not obj.is_floating_point() and not obj.is_complex()
        if count and _readable(obj):
            # A 0-dim integer tensor may be a count (`x.repeat(int(k), 1)`): by its value,
            # read for free on the CPU (one example's label, new at every step, finds the
            # last one's entry; a count written in place, its new value's).
            return (Tensor, obj.dtype, int(obj))
        if count and not obj.is_inference():
            # Elsewhere reading it would wait for the device: by identity and version.
            return (_Identity(obj), obj._version)
        if count or obj.is_nested or obj.layout is not torch.strided:
            # (An inference-mode count has no version.) A nested tensor has no shape of
            # one tuple: by identity, as any object. (A float scalar, a batch's scale, a
            # temperature, by its dtype.)
            return _Identity(obj)
        return (Tensor, tuple(obj.shape), obj.dtype, obj.device)
    if type(obj) in _VALUES:
        return (type(obj), obj)
    if depth > 0 and (type(obj) in (tuple, list) or _named(obj)) and len(obj) <= 64:
        return (type(obj), tuple(value_key(o, depth - 1) for o in obj))
    if depth > 0 and type(obj) is dict and len(obj) <= 64:
        items = [(value_key(k, 0), value_key(v, depth - 1)) for k, v in obj.items()]
        return (dict, tuple(items))
    return _Identity(obj)


def _named(obj: object) -> bool:
    r"""Whether `obj` is a named tuple (a batch of fields, by their values as a tuple's)."""

    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def _readable(t: Tensor) -> bool:
    r"""Whether the value of a 0-dim tensor can be read without waiting for a device or
    breaking a trace: a plain CPU tensor, outside torch.compile and torch.func transforms."""

    return (
        t.device.type == "cpu"
        and t.layout is torch.strided
        and not is_compiling()
        and not is_wrapped(t)
        and type(t) is Tensor
    )


_EMPTY = object()


def _contents(cell: Any) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet bound
        return _EMPTY


def fn_key(fn: Callable[..., Any]) -> Hashable:
    r"""Returns a key for what `fn` computes: its code and the objects it closes over
    (:func:`value_key`), so that the same lambda created again (in a loop, over the next
    batch) gets the same key."""

    code = getattr(fn, "__code__", None)
    if code is None:
        func = getattr(fn, "__func__", None)  # a bound method: the function and its object
        if func is not None and hasattr(func, "__code__"):
            return (fn_key(func), _Identity(fn.__self__))
        return _Identity(fn)
    cells = tuple(value_key(_contents(c)) for c in fn.__closure__ or ())
    defaults = tuple(value_key(d) for d in fn.__defaults__ or ())
    kwdefaults = tuple((k, value_key(v)) for k, v in (fn.__kwdefaults__ or {}).items())
    return (code, _namespace(fn), cells, defaults, kwdefaults)


def _namespace(fn: Any) -> Hashable:
    r"""A key for the globals of `fn`: its module, held weakly (a namespace, a dict, cannot
    be; and one of a script run by `exec` holds the script's module and data). A namespace
    of no module (`exec`'s) by its id, not held: after it is gone, a new one may take its
    id, and a function of the same code there the old entries (a footprint that sizes
    chunks; a layer-call recording, which a pass checks against its layer calls)."""

    globals_ = getattr(fn, "__globals__", None)
    name = getattr(fn, "__module__", None)
    module = sys.modules.get(name) if isinstance(name, str) else None
    if module is not None and getattr(module, "__dict__", None) is globals_:
        return _Identity(module)
    return ("namespace", name, id(globals_))


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


def _compares_by_value(obj: object) -> bool:
    r"""Whether the class of `obj` defines its own equality or hash (a module compared by
    its configuration): a weak dictionary would take two such objects for one."""

    t = type(obj)
    return t.__eq__ is not object.__eq__ or t.__hash__ is not object.__hash__


class PerObject(Generic[V]):
    r"""Values attached to live objects (weak keys compared by identity: an entry goes
    with its object, and two objects that compare equal have one each), registered with
    :func:`clear_caches` unless `cache` is false (state that must live as long as its
    object, such as a lock).

    Objects of classes with an equality of their own go to a dictionary keyed by identity;
    the others to Python's weak dictionary, which torch.compile traces (it does not trace
    torch's identity-keyed one)."""

    def __init__(self, cache: bool = True) -> None:
        self.entries: weakref.WeakKeyDictionary[Any, V] = weakref.WeakKeyDictionary()
        self.by_id: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.lock = threading.Lock()
        if cache:
            _REGISTRY.append(self.clear)

    def _table(self, obj: object) -> Any:
        return self.by_id if _compares_by_value(obj) else self.entries

    def get(self, obj: object) -> V | None:
        return self._table(obj).get(obj)

    def setdefault(self, obj: object, make: Callable[[], V]) -> V:
        with self.lock:
            table = self._table(obj)
            value = table.get(obj)
            if value is None:
                value = table[obj] = make()
            return value

    def put(self, obj: object, value: V) -> V:
        with self.lock:
            self._table(obj)[obj] = value
        return value

    def pop(self, obj: object) -> V | None:
        with self.lock:
            return self._table(obj).pop(obj, None)

    def values(self) -> list[V]:
        r"""Returns the values of every live object, at once (a list)."""

        with self.lock:
            return [*self.entries.values(), *self.by_id.values()]

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.by_id.clear()

    def __len__(self) -> int:
        return len(self.entries) + len(self.by_id.data)

    def __bool__(self) -> bool:
        return bool(self.entries) or bool(self.by_id.data)


def register(clear: Callable[[], None]) -> None:
    r"""Registers the clear function of a cache that is neither :class:`Bounded` nor
    :class:`PerObject` (a set of warnings given, say)."""

    _REGISTRY.append(clear)
