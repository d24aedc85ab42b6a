r"""Where a module keeps its tensors: :class:`Structure`, cached per module, and the lock
that serializes bayesflow's calls on one module.

A structure is computed once per module (and again when the module changes): every
place that holds each parameter and buffer, tied weights and shared submodules included,
the names by which `named_parameters()` knows them, and the submodules that a call must
treat specially.
"""

from __future__ import annotations

__all__ = ["Slot", "Structure", "lock", "structure"]

import inspect
import threading
import types

from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch.nn as nn

from torch import Tensor

from ._caches import PerObject
from ._compat import is_compiling, weight_hooks

# A place that holds a tensor: the `_parameters` or `_buffers` dict of a module, and a key.
Slot = tuple[dict, str]


# zuko's modules whose pieces the vmap-safe stand-ins replace, and those that build them
# (zuko.nn's networks and zuko.distributions' plain distributions need none).
_ZUKO_PARTS = ("transforms", "utils", "flows", "lazy", "mixtures")


def _is_zuko(name: object) -> bool:
    return isinstance(name, str) and any(
        name == f"zuko.{part}" or name.startswith(f"zuko.{part}.") for part in _ZUKO_PARTS
    )


def _names_zuko(code: types.CodeType, scope: dict[str, Any]) -> bool:
    r"""Whether `code` (or a function defined in it) names a global from zuko's parts that
    need the stand-ins: one of their classes or functions, or the modules themselves (also
    as `zuko.transforms...`)."""

    for name in code.co_names:
        obj = scope.get(name)
        if isinstance(obj, types.ModuleType):
            if _is_zuko(obj.__name__):
                return True
            if obj.__name__ == "zuko" and any(part in code.co_names for part in _ZUKO_PARTS):
                return True
        elif _is_zuko(getattr(obj, "__module__", None)):
            return True
    return any(isinstance(c, types.CodeType) and _names_zuko(c, scope) for c in code.co_consts)


def _functions(cls: type) -> Iterator[types.FunctionType]:
    r"""The functions a class defines itself, through decorators (`functools.wraps`)."""

    for value in vars(cls).values():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        elif isinstance(value, property):
            value = value.fget
        value = inspect.unwrap(value) if callable(value) else value
        if isinstance(value, types.FunctionType):
            yield value


def _runs_zuko(cls: type) -> bool:
    r"""Whether a module of type `cls` may run zuko's transforms: a class of zuko's (outside
    zuko.nn and zuko.distributions) or a subclass of one, or a class one of whose own
    methods (its forward, the helpers it calls) names them."""

    for c in cls.__mro__:
        if _is_zuko(c.__module__):
            return True
        if c.__module__.startswith(("torch.", "builtins")):
            continue
        if any(_names_zuko(f.__code__, f.__globals__) for f in _functions(c)):
            return True
    return False


class Structure:
    r"""The tensors of a module, by name, and every place that holds them.

    It refers to the module's tables (`_parameters`, `_buffers`, `_modules`) and its
    submodules, never to the module itself, so the cache never keeps a module alive:
    a submodule path of `""` stands for the module the structure was computed for.

    Attributes:
        params: The parameters, by their `named_parameters()` name.
        slots: Every place that holds each parameter (tied weights: several).
        aliases: The second and later names of tied parameters, with their first name.
        buffers: The buffers, by name; `buffer_slots` their places.
        types: The class of every distinct submodule, by path.
        expected: The shape, dtype, device and sample rank of each parameter.
        written: The parameters their own module writes in place (an `Embedding` or
            `EmbeddingBag` with `max_norm` renormalizes rows of its weight), read at every
            call: `max_norm` may be set after the structure was seen.
        hooked: `(path, hook)` of the forward pre-hooks that compute a weight and assign it
            as a plain attribute, `hook.name` (the hook-based `weight_norm` and
            `spectral_norm`).
        uses_zuko: Whether zuko's lazy transforms run inside the module.
    """

    def __init__(self, module: nn.Module) -> None:
        self.params: dict[str, Tensor] = {}
        self.slots: dict[str, list[Slot]] = {}
        self.aliases: dict[str, str] = {}
        self.buffers: dict[str, Tensor] = {}
        self.buffer_slots: dict[str, list[Slot]] = {}
        self.types: dict[str, type] = {}
        self._embeddings: list[tuple[nn.Module, str]] = []
        self.hooked: list[tuple[str, Any]] = []
        self._subs: dict[str, nn.Module] = {}
        self._tables: list[tuple[dict, dict, dict]] = []

        by_id: dict[int, str] = {}
        embeddings: list[tuple[nn.Module, Any]] = []
        seen_modules: set[int] = set()
        seen: set[tuple[int, str]] = set()
        for prefix, m in module.named_modules(remove_duplicate=False):
            if id(m) not in seen_modules:
                seen_modules.add(id(m))
                self.types[prefix] = type(m)
                self._tables.append((m._parameters, m._buffers, m._modules))
                if m is not module:
                    self._subs[prefix] = m
                self.hooked += [(prefix, hook) for hook in weight_hooks(m)]
                if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
                    embeddings.append((m, m._parameters.get("weight")))
            for table, slots, d in (
                (self.params, self.slots, m._parameters),
                (self.buffers, self.buffer_slots, m._buffers),
            ):
                for attr, t in d.items():
                    if t is None or (id(d), attr) in seen:
                        continue  # a shared submodule: the same place again
                    seen.add((id(d), attr))
                    name = f"{prefix}.{attr}" if prefix else attr
                    canonical = by_id.setdefault(id(t), name)
                    if canonical == name:
                        table[name] = t
                        slots[name] = []
                    elif table is self.params:
                        self.aliases[name] = canonical
                    slots[canonical].append((d, attr))

        self._embeddings = [(m, by_id[id(t)]) for m, t in embeddings if id(t) in by_id]
        self._dicts = [d for tables in self._tables for d in tables]
        self._fingerprint = self._fingerprint_of()
        self.expected = {
            name: (p.shape, p.dtype, p.device, p.dim() + 1) for name, p in self.params.items()
        }
        # Zuko's lazy transforms run inside its flows' modules, and in modules whose forward
        # builds zuko's transforms: only those need the stand-ins (zuko.nn's networks are
        # plain torch; installing them costs ~50 us a call).
        self.uses_zuko = any(_runs_zuko(t) for t in set(self.types.values()))

    def _fingerprint_of(self) -> tuple:
        # The objects every table holds, in order, and the tables' sizes: cheap to build,
        # and any addition, removal or replacement changes it.
        return (
            tuple([id(v) for d in self._dicts for v in d.values()]),
            tuple([len(d) for d in self._dicts]),
        )

    @property
    def written(self) -> set[str]:
        return {name for m, name in self._embeddings if m.max_norm is not None}

    def is_current(self) -> bool:
        r"""Whether no parameter, buffer or submodule was added, removed or replaced."""

        return self._fingerprint_of() == self._fingerprint

    def sub(self, module: nn.Module, path: str) -> nn.Module:
        r"""Returns the submodule at `path` of `module` (this structure's)."""

        return module if path == "" else self._subs[path]

    def find(self, module: nn.Module, cls: type | tuple[type, ...]) -> list[tuple[str, nn.Module]]:
        r"""Returns the submodules of `module` (this structure's) that are instances of `cls`."""

        return [(p, self.sub(module, p)) for p, t in self.types.items() if issubclass(t, cls)]


_STRUCTURES: PerObject[Structure] = PerObject()


def structure(module: nn.Module) -> Structure:
    r"""Returns the structure of `module`, cached while the module does not change."""

    if is_compiling():
        return Structure(module)

    st = _STRUCTURES.get(module)
    if st is None or not st.is_current():
        st = _STRUCTURES.put(module, Structure(module))
    return st


def _tree(module: nn.Module) -> set[int]:
    r"""Returns the ids of `module` and of all its submodules."""

    ids: set[int] = set()
    stack = [module]
    while stack:
        m = stack.pop()
        if id(m) not in ids:
            ids.add(id(m))
            stack.extend(v for v in m._modules.values() if v is not None)
    return ids


# The calls in progress: [module, the thread that holds it, how many times].
_HELD: list[list[Any]] = []
_CHANGED = threading.Condition()


def _conflicts(module: nn.Module, me: int) -> bool:
    r"""Whether another thread holds a module that shares a submodule with `module` (the
    trees are only walked where another thread holds anything: never in one thread)."""

    others = [held for held, owner, _ in _HELD if owner != me]
    if not others:
        return False
    tree = _tree(module)
    return any(not tree.isdisjoint(_tree(held)) for held in others)


class _TreeLock:
    r"""Holds a module and all its submodules for one thread: it waits while another thread
    holds any of them (re-entrant)."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        me = threading.get_ident()
        with _CHANGED:
            while _conflicts(self.module, me):
                _CHANGED.wait()
            for entry in _HELD:
                if entry[0] is self.module and entry[1] == me:
                    entry[2] += 1
                    return
            _HELD.append([self.module, me, 1])

    def __exit__(self, *exc: object) -> None:
        me = threading.get_ident()
        with _CHANGED:
            for i, entry in enumerate(_HELD):
                if entry[0] is self.module and entry[1] == me:
                    entry[2] -= 1
                    if not entry[2]:
                        del _HELD[i]
                    break
            _CHANGED.notify_all()


def lock(module: nn.Module) -> Any:
    r"""Serializes the bayesflow calls of several threads that share modules (not while
    compiling).

    A call holds its module and every submodule: while it has tensors swapped in, their
    structure looks different to anyone else, and a submodule may belong to another
    module too (a lock per module let a call on a model and one on its submodule swap
    each other's samples in and out). Calls on disjoint modules run in parallel. Acquire
    it before :func:`structure`, and hold it while tensors are swapped in.
    """

    return nullcontext() if is_compiling() else _TreeLock(module)
