r"""Where a module keeps its tensors, and how bayesflow swaps them for a call.

:class:`Structure` is computed once per module (and recomputed when the module changes):
every place that holds each parameter and buffer, tied weights and shared submodules
included, the names by which `named_parameters()` knows them, and the submodules that
need special handling in a vectorized call. :func:`swapped` puts tensors in those places
and always puts the very same objects back. :class:`State` gives a call the buffer
semantics bayesflow documents: every sample starts from the state the call found, and a
floating-point buffer ends at the average of the samples' updates.
"""

from __future__ import annotations

__all__ = ["State", "Structure", "patched", "structure", "swapped"]

import threading
import weakref

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn as nn

from torch import Tensor

from ._checks import describe
from ._compat import is_compiling

# A place that holds a tensor: the `_parameters` or `_buffers` dict of a module, and a key.
Slot = tuple[dict, str]


class Structure:
    r"""The tensors of a module, by name, and every place that holds them.

    It refers to the module's tables (`_parameters`, `_buffers`, `_modules`) and its
    submodules, never to the module itself, so the cache never keeps a module alive:
    a submodule path of `""` stands for the module the structure was computed for.
    """

    def __init__(self, module: nn.Module) -> None:
        self.params: dict[str, Tensor] = {}
        self.slots: dict[str, list[Slot]] = {}
        self.aliases: dict[str, str] = {}
        self.buffers: dict[str, Tensor] = {}
        self.buffer_slots: dict[str, list[Slot]] = {}
        self.types: dict[str, type] = {}  # every distinct submodule's class, by path
        self._subs: dict[str, nn.Module] = {}
        self._tables: list[tuple[dict, dict, dict]] = []

        by_id: dict[int, str] = {}
        seen_modules: set[int] = set()
        seen: set[tuple[int, str]] = set()
        for prefix, m in module.named_modules(remove_duplicate=False):
            if id(m) not in seen_modules:
                seen_modules.add(id(m))
                self.types[prefix] = type(m)
                self._tables.append((m._parameters, m._buffers, m._modules))
                if m is not module:
                    self._subs[prefix] = m
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

        self._dicts = [d for tables in self._tables for d in tables]
        self.footprints: dict[tuple, int] = {}  # bytes per sample, by call (chunk_size="auto")
        self._fingerprint = self._fingerprint_of()
        self.expected = {
            name: (p.shape, p.dtype, p.device, p.dim() + 1) for name, p in self.params.items()
        }
        # Zuko's lazy transforms run inside its flows' modules: only those need the
        # stand-ins (zuko.nn's networks are plain torch).
        self.uses_zuko = any(
            t.__module__.startswith("zuko.") and not t.__module__.startswith("zuko.nn")
            for t in self.types.values()
        )

    def _fingerprint_of(self) -> tuple:
        # The objects every table holds, in order, and the tables' sizes: cheap to build,
        # and any addition, removal or replacement changes it.
        return (
            tuple([id(v) for d in self._dicts for v in d.values()]),
            tuple([len(d) for d in self._dicts]),
        )

    def is_current(self) -> bool:
        r"""Whether no parameter, buffer or submodule was added, removed or replaced."""

        return self._fingerprint_of() == self._fingerprint

    def find(self, module: nn.Module, cls: type | tuple[type, ...]) -> list[tuple[str, nn.Module]]:
        r"""Returns the submodules of `module` (this structure's) that are instances of `cls`."""

        return [
            (p, module if p == "" else self._subs[p])
            for p, t in self.types.items()
            if issubclass(t, cls)
        ]


# Per module, by id (cheaper to look up than a weak dict); an entry goes with its module.
_CACHE: dict[int, Structure] = {}
_LOCKS: dict[int, threading.RLock] = {}
_CACHE_LOCK = threading.Lock()


def _forget(key: int) -> None:
    _CACHE.pop(key, None)
    _LOCKS.pop(key, None)


def _track(module: nn.Module) -> None:
    if id(module) not in _LOCKS:
        _LOCKS[id(module)] = threading.RLock()
        weakref.finalize(module, _forget, id(module))


def structure(module: nn.Module) -> Structure:
    r"""Returns the structure of `module`, cached while the module does not change."""

    if is_compiling():
        return Structure(module)

    st = _CACHE.get(id(module))
    if st is None or not st.is_current():
        st = Structure(module)
        with _CACHE_LOCK:
            _track(module)
            _CACHE[id(module)] = st
    return st


def lock(module: nn.Module) -> Any:
    r"""Serializes bayesflow calls on one module across threads (not while compiling).

    One lock per module, not per structure: while a call holds tensors swapped in, the
    module's structure looks different to anyone else. Acquire it before
    :func:`structure`, and hold it while tensors are swapped in.
    """

    if is_compiling():
        return nullcontext()
    found = _LOCKS.get(id(module))
    if found is None:
        with _CACHE_LOCK:
            _track(module)
            found = _LOCKS[id(module)]
    return found


def check_params(where: str, st: Structure, module: nn.Module, params: object) -> int:
    r"""Validates sampled parameters `{name: (n, *shape)}` and returns `n`."""

    # The common case in one pass; any doubt goes to the checks below, which say what.
    if isinstance(params, Mapping) and params:
        n = -1
        expected = st.expected
        for name, value in params.items():
            e = expected.get(name)
            if (
                e is None
                or not isinstance(value, Tensor)
                or value.dim() != e[3]
                or value.shape[1:] != e[0]
                or value.dtype != e[1]
                or value.device != e[2]
                or (n >= 0 and value.shape[0] != n)
            ):
                break
            n = value.shape[0]
        else:
            if n >= 1:
                return n

    return _check_params(where, st, module, params)


def _check_params(where: str, st: Structure, module: nn.Module, params: object) -> int:
    if not isinstance(params, Mapping):
        raise TypeError(
            f"{where}: expected params to be a dict from parameter names to tensors, "
            f"got {type(params).__name__}"
        )
    if not params:
        raise ValueError(f"{where}: expected at least one parameter in params, got none")

    for name, value in params.items():
        ref = st.params.get(name)
        if ref is None:
            if name in st.aliases:
                raise ValueError(
                    f"{where}: expected names from {type(module).__name__}.named_parameters(), "
                    f"got {name!r}, which is tied to {st.aliases[name]!r} (the same "
                    f"Parameter): use {st.aliases[name]!r}"
                )
            unknown = [k for k in params if k not in st.params]
            raise ValueError(
                f"{where}: expected names from {type(module).__name__}.named_parameters(), got "
                f"unknown names {unknown}"
            )
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{where}: expected params[{name!r}] to be a tensor, got {type(value).__name__}"
            )
        if value.dim() != ref.dim() + 1 or value.shape[1:] != ref.shape:
            raise ValueError(
                f"{where}: expected params[{name!r}] of shape (n, *{tuple(ref.shape)}), "
                f"got {tuple(value.shape)}"
            )

    counts = {k: v.shape[0] for k, v in params.items()}
    n = next(iter(counts.values()))
    if any(c != n for c in counts.values()):
        raise ValueError(
            f"{where}: expected the same number of samples n for every parameter, got {counts}"
        )

    if n < 1:
        raise ValueError(f"{where}: expected at least one sample, got n = 0")

    for name, value in params.items():
        ref = st.params[name]
        if value.dtype != ref.dtype or value.device != ref.device:
            raise ValueError(
                f"{where}: expected params[{name!r}] with the module's dtype and device "
                f"({describe(ref)}), got {describe(value)}"
            )

    return n


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


_MISSING = object()


@contextmanager
def patched(changes: list[tuple[Any, str, Any]]) -> Iterator[None]:
    r"""Sets instance attributes `(obj, name, value)` and restores them on exit.

    The one way bayesflow replaces a layer's `forward` or flag for the duration of a call:
    through the instance `__dict__`, so no class and no other instance is affected.
    """

    done: list[tuple[Any, str, Any]] = []
    try:
        for obj, name, value in changes:
            done.append((obj, name, vars(obj).get(name, _MISSING)))
            vars(obj)[name] = value
        yield
    finally:
        for obj, name, old in reversed(done):
            if old is _MISSING:
                vars(obj).pop(name, None)
            else:
                vars(obj)[name] = old


class State:
    r"""The buffers of a module around one call: a snapshot, restored on failure, and the
    update rule of a call over `n` samples.

    Each sample starts from the state the call found. When the call ends, a buffer that
    some sample changed holds the average over samples of their values if it is
    floating-point, else the value the first sample left. The buffers keep their
    identity: the call writes into them once, at the end.
    """

    def __init__(self, st: Structure) -> None:
        self.st = st
        self.entries = [(name, t, t.detach().clone()) for name, t in st.buffers.items()]
        self.records: dict[str, dict[int, Tensor]] = {}
        self.samples = 0

    def _changed(self, name: str, t: Tensor, clone: Tensor) -> bool:
        # By value: kernels such as batch norm's update buffers without bumping their
        # version counters.
        d, attr = self.st.buffer_slots[name][0]
        if d.get(attr) is not t:
            return True
        return not (t.shape == clone.shape and torch.equal(t, clone))

    def restore(self) -> None:
        r"""Puts every buffer back as the call found it."""

        with torch.no_grad():
            for name, t, clone in self.entries:
                if not self._changed(name, t, clone):
                    continue
                for d, attr in self.st.buffer_slots[name]:
                    d[attr] = t
                t.copy_(clone)

    def fresh(self) -> dict[str, Tensor]:
        r"""Returns copies of the initial buffers for one sample of a loop to update.

        Autograd may save a buffer for the backward pass (batch norm saves its running
        statistics), so a sample never updates a tensor another sample uses.
        """

        return {name: clone.clone() for name, t, clone in self.entries if t.dtype != torch.bool}

    def current(self) -> dict[str, Tensor]:
        r"""Returns the buffers the module holds now, by name."""

        held = {}
        for name, _, _ in self.entries:
            d, attr = self.st.buffer_slots[name][0]
            held[name] = d[attr]
        return held

    def collect(self, held: dict[str, Tensor]) -> None:
        r"""Records what one sample of a loop left in the buffers (`held`, from
        :meth:`current`), and puts back any buffer it updated in place."""

        i = self.samples
        for name, t, clone in self.entries:
            value = held[name]
            if value.shape == clone.shape and torch.equal(value, clone):
                continue
            record = value.detach().clone() if value is t else value.detach()
            self.records.setdefault(name, {})[i] = record
        self.samples += 1
        self.restore()

    def finish(self) -> None:
        r"""Writes the update rule's result over the samples of a loop into the buffers."""

        with torch.no_grad():
            for name, t, clone in self.entries:
                records = self.records.get(name)
                if not records:
                    continue
                values = [records.get(i, clone) for i in range(self.samples)]
                first = values[0]
                if first.shape != t.shape or first.dtype != t.dtype:
                    for d, attr in self.st.buffer_slots[name]:
                        d[attr] = first
                elif t.is_floating_point() or t.is_complex():
                    t.copy_(torch.stack(values).mean(0))
                else:
                    t.copy_(first)

    def set_averaged(self, name: str, stack: Tensor) -> None:
        r"""Writes a vectorized call's per-sample buffer values `(n, *shape)` by the rule."""

        t = self.st.buffers[name]
        with torch.no_grad():
            if t.is_floating_point() or t.is_complex():
                t.copy_(stack.mean(0))
            else:
                t.copy_(stack[0])
