r"""Where a module keeps its tensors: :class:`Structure`, cached per module, and the lock
that serializes bayesflow's calls on one module.

A structure is computed once per module (and again when the module changes): every
place that holds each parameter and buffer, tied weights and shared submodules included,
the names by which `named_parameters()` knows them, and the submodules that a call must
treat specially.
"""

from __future__ import annotations

__all__ = ["Slot", "Structure", "fn_runs_zuko", "lazy_error", "lock", "structure"]

import functools
import inspect
import sys
import threading
import types
import weakref

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch.nn as nn

from torch import Tensor
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from ._caches import PerObject, register
from ._compat import closure, is_compiling, weight_hooks

# A place that holds a tensor: the `_parameters` or `_buffers` dict of a module and a key;
# or a plain list (and an index) or dict (and a key) among a module's attributes.
Slot = tuple[Any, Any]

# The lists in which torch's recurrent layers cache their weights: their forward refreshes
# them (`_update_flat_weights`), and `_swap.swapped` puts them back.
_FLAT = ("_flat_weights", "_flat_weight_refs")

# The containers among a module's attributes that are read for its tensors, and how many
# items of one inside another are read.
_CONTAINERS = (list, dict, tuple, set, frozenset)
_NESTED = 256
_PLAIN = frozenset((*_CONTAINERS, OrderedDict))
_SETTINGS = frozenset((bool, int, float, str, type(None)))
_HOLDERS = (Tensor, *_CONTAINERS)


# zuko's modules whose pieces the vmap-safe stand-ins replace, and those that build them
# (zuko.nn's networks and zuko.distributions' plain distributions need none).
_ZUKO_PARTS = ("transforms", "utils", "flows", "lazy", "mixtures")


def _is_zuko(name: object) -> bool:
    return (
        isinstance(name, str)
        and name.startswith("zuko.")
        and any(name == f"zuko.{part}" or name.startswith(f"zuko.{part}.") for part in _ZUKO_PARTS)
    )


# Libraries whose functions never build zuko's transforms: not read.
_LIBRARIES = frozenset(
    ("torch", "bayesflow", "zuko", "numpy", "einops", "builtins", "functools", "math", "typing")
)

# How many calls deep the user's own functions and classes are read for zuko's parts.
_DEPTH = 3


def _library(name: object) -> bool:
    r"""Whether the module `name` is a library's (installed, or Python's own), whose
    functions are not read: only the user's code is."""

    return not isinstance(name, str) or _installed(name.partition(".")[0])


# Whether a top-level module is installed (or Python's own), by name.
_INSTALLED: dict[str, bool] = {}
register(_INSTALLED.clear)


def _installed(top: str) -> bool:
    r"""Whether the top-level module `top` is a library that cannot build zuko's
    transforms: one of :data:`_LIBRARIES`, Python's own, or an installed package none of
    whose loaded modules holds anything of zuko's (a user's own package installed with pip
    may build them)."""

    verdict = _INSTALLED.get(top)
    if verdict is None:
        path = getattr(sys.modules.get(top), "__file__", None) or ""
        verdict = (
            top in _LIBRARIES
            or top in sys.stdlib_module_names
            or (("site-packages" in path or "dist-packages" in path) and not _holds_zuko(top))
        )
        if not is_compiling() and len(_INSTALLED) < 4096:
            _INSTALLED[top] = verdict
    return verdict


def _module_of(obj: object) -> object:
    try:
        return getattr(obj, "__module__", None)
    except Exception:  # an object whose attributes raise: nothing of zuko's
        return None


def _holds_zuko(top: str) -> bool:
    r"""Whether a loaded module of the package `top` holds a module, class or function of
    zuko among its globals."""

    for name, module in list(sys.modules.items()):
        if module is None or (name != top and not name.startswith(top + ".")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, types.ModuleType):
                if value.__name__ == "zuko" or value.__name__.startswith("zuko."):
                    return True
            elif _is_zuko(_module_of(value)):
                return True
    return False


def _scope(f: types.FunctionType) -> dict[str, Any]:
    r"""The names a function reads from outside: its module's globals and its closure."""

    if not f.__closure__:
        return f.__globals__
    return {**f.__globals__, **dict(closure(f))}


def _names_zuko(
    code: types.CodeType, scope: dict[str, Any], depth: int = 0, seen: set | None = None
) -> bool:
    r"""Whether `code` (or a function defined in it) names a global from zuko's parts that
    need the stand-ins: one of their classes or functions, or the modules themselves (also
    as `zuko.transforms...`); or calls, up to :data:`_DEPTH` deep, a function or class of
    the user's own (in another module too, as `helpers.make_flow`) that does."""

    seen = {} if seen is None else seen
    for name in (*code.co_names, *code.co_freevars):
        obj = _callee(scope.get(name))
        if isinstance(obj, types.ModuleType):
            if _is_zuko(obj.__name__):
                return True
            if obj.__name__ == "zuko" and any(part in code.co_names for part in _ZUKO_PARTS):
                return True
            if depth < _DEPTH and not _library(obj.__name__):
                members = vars(obj)
                if any(_reaches_zuko(members.get(a), depth + 1, seen) for a in code.co_names):
                    return True
        elif _is_zuko(_module_of(obj)):
            return True
        elif depth < _DEPTH and _reaches_zuko(obj, depth + 1, seen):
            return True
    return any(
        isinstance(c, types.CodeType) and _names_zuko(c, scope, depth, seen)
        for c in code.co_consts
    )


def _callee(obj: object) -> object:
    r"""What calling `obj` runs, as far as it is read for zuko's parts: a partial's function
    (or a zuko class or function it wraps), a bound method's function, a callable object's
    class; anything else as it is."""

    while isinstance(obj, functools.partial):
        for a in (*obj.args, *obj.keywords.values()):
            if _is_zuko(_module_of(a)):
                return a
        obj = obj.func
    if isinstance(obj, types.MethodType):
        return obj.__func__
    if isinstance(
        obj, (types.FunctionType, types.ModuleType, type, types.BuiltinFunctionType)
    ) or not callable(obj):
        return obj
    return type(obj)


def _first(key: object, depth: int, seen: dict) -> bool:
    r"""Whether `key` is reached for the first time this shallow (it is then read)."""

    if seen.get(key, _DEPTH + 1) <= depth:
        return False
    seen[key] = depth
    return True


def _reaches_zuko(obj: object, depth: int, seen: dict) -> bool:
    r"""Whether a function or class of the user's (not a library's) names zuko's parts
    (:func:`_names_zuko`), `depth` calls deep. `seen` holds the least depth each was read
    at: one reached again shallower is read again, with more depth left."""

    obj = _callee(obj)
    if isinstance(obj, type):
        if _library(obj.__module__) or not _first(obj, depth, seen):
            return False
        return any(
            _names_zuko(f.__code__, _scope(f), depth, seen) for c in obj.__mro__ for f in (
                () if _library(c.__module__) else _functions(c)
            )
        )  # fmt: skip
    if not isinstance(obj, types.FunctionType):
        return False
    obj = inspect.unwrap(obj)
    if not isinstance(obj, types.FunctionType) or _library(obj.__module__):
        return False
    if not _first(obj.__code__, depth, seen):
        return False
    return _names_zuko(obj.__code__, _scope(obj), depth, seen)


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
    methods (its forward, the helpers it calls, in its module or another) names them."""

    for c in cls.__mro__:
        if _is_zuko(c.__module__):
            return True
        if c.__module__.startswith(("torch.", "builtins")):
            continue
        if any(_names_zuko(f.__code__, _scope(f)) for f in _functions(c)):
            return True
    return False


# The verdicts of :func:`fn_runs_zuko`: on the code of an `fn` (a new lambda per call has the
# same), and on the functions and classes its closure holds, all held weakly (a function
# made per step, closing over its batch, is not kept alive).
_CODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
register(_CODES.clear)
register(_VERDICTS.clear)


def _verdict(obj: object, compute: Callable[[], bool]) -> bool:
    if is_compiling():  # traced once per compilation: no cache
        return compute()
    verdict = _VERDICTS.get(obj)
    if verdict is None:
        verdict = _VERDICTS[obj] = compute()
    return verdict


def _held_runs_zuko(obj: object) -> bool:
    return _is_zuko(_module_of(obj)) or _reaches_zuko(obj, 1, {})


def fn_runs_zuko(fn: object) -> bool:
    r"""Whether the `fn` of a call may build zuko's transforms itself (as
    `lambda net, c, x: zuko.transforms.UnconstrainedMonotonicTransform(...)(x)`), in its
    own code or in the user's functions it calls (:func:`_names_zuko`): then the call
    needs the stand-ins as a flow's does. About a microsecond a call once zuko is
    imported: the verdict on its code is cached, the functions its closure holds are
    looked up at every call."""

    if "zuko" not in sys.modules:
        return False
    while isinstance(fn, functools.partial):
        fn = fn.func
    if isinstance(fn, types.MethodType):
        fn = fn.__func__
    if not isinstance(fn, types.FunctionType):
        if isinstance(fn, nn.Module):
            return False  # its own forward is read with its structure
        cls = type(fn)  # a callable object: its class
        return _verdict(cls, lambda: _reaches_zuko(cls, 0, {}))
    module = fn.__module__
    if _library(module):
        return _is_zuko(module)
    code = fn.__code__
    verdict = None if is_compiling() else _CODES.get(code)
    if verdict is None:
        verdict = _names_zuko(code, fn.__globals__)
        if not is_compiling():
            _CODES[code] = verdict
    if verdict or not fn.__closure__:
        return verdict
    for cell in fn.__closure__:
        try:
            obj = _callee(cell.cell_contents)
        except ValueError:  # a cell not yet filled
            continue
        if isinstance(obj, types.ModuleType):
            if obj.__name__ == "zuko" or _is_zuko(obj.__name__):
                return True
        elif isinstance(obj, (types.FunctionType, types.MethodType, type)):
            if _verdict(obj, functools.partial(_held_runs_zuko, obj)):
                return True
    return False


class Structure:
    r"""The tensors of a module, by name, and every place that holds them.

    It refers to the module's tables of tensors (`_parameters`, `_buffers`), and to the
    module, its submodules and their classes only weakly, so the cache never keeps a module
    alive (a submodule's hook that is a method of the module, or the class torch makes for
    a parametrized module, would lead back to it): a submodule path of `""` stands for the
    module the structure was computed for.

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
            as a plain attribute (the hook-based `weight_norm` and `spectral_norm`, and
            `torch.nn.utils.prune`'s masks).
        uses_zuko: Whether zuko's lazy transforms run inside the module.
        empty: `(name, table, key)` of the buffers registered as :py:`None`, which a call
            may fill (`self.h = ...`): see :class:`bayesflow._buffers.State`.
        unreached: The places a call cannot swap that hold a parameter (a tuple, a set, a
            container inside a container, a view of it), described, by the parameter's name.
        plain: The ids of the plain lists and dicts among the places, whose items a call
            finds and puts back by identity (`forward` may move them).

    A tensor registered both as a parameter and as a buffer (of another module) is a
    parameter: its buffer places are among its `slots`, and get its sample. A parameter or
    buffer also held in a plain list or dict attribute of a module (`self.ws = [self.lin.
    weight]`), or as a plain attribute, has that place among its slots too (torch's
    recurrent layers' cached weights excepted, which their forward refreshes).
    """

    def __init__(self, module: nn.Module) -> None:
        self.params: dict[str, Tensor] = {}
        self.slots: dict[str, list[Slot]] = {}
        self.aliases: dict[str, str] = {}
        self.buffers: dict[str, Tensor] = {}
        self.buffer_slots: dict[str, list[Slot]] = {}
        self.types: dict[str, type] = {}
        self.hooked: list[tuple[str, Any]] = []
        self._subs: dict[str, weakref.ref] = {}
        self._dicts: list[dict] = []

        embeddings: list[tuple[nn.Module, Any]] = []
        seen_modules: set[int] = set()
        distinct: list[tuple[str, nn.Module]] = []
        occurrences = list(module.named_modules(remove_duplicate=False))
        for prefix, m in occurrences:
            if id(m) not in seen_modules:
                seen_modules.add(id(m))
                distinct.append((prefix, m))
                self.types[prefix] = _own_class(m)
                self._dicts += (m._parameters, m._buffers)
                if m is not module:
                    self._subs[prefix] = weakref.ref(m)
                self.hooked += [(prefix, hook) for hook in weight_hooks(m)]
                if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
                    embeddings.append((m, m._parameters.get("weight")))

        # Parameters first, all of them: a buffer that is a parameter too (registered in
        # another module, before or after it) is one of the parameter's places.
        by_id: dict[int, str] = {}
        seen: set[tuple[int, str]] = set()
        self.empty: list[tuple[str, dict, str]] = []
        for table, slots, name_of in (
            (self.params, self.slots, lambda m: m._parameters),
            (self.buffers, self.buffer_slots, lambda m: m._buffers),
        ):
            mine: dict[int, str] = {}  # this table's tensors, by id
            for prefix, m in occurrences:
                d = name_of(m)
                for attr, t in d.items():
                    if (id(d), attr) in seen:
                        continue  # a shared submodule: the same place again
                    seen.add((id(d), attr))
                    name = f"{prefix}.{attr}" if prefix else attr
                    if t is None:
                        if table is self.buffers:
                            self.empty.append((name, d, attr))
                        continue
                    canonical = by_id.get(id(t))
                    if canonical is not None and id(t) not in mine:
                        self.slots[canonical].append((d, attr))  # a parameter's place
                        continue
                    canonical = by_id.setdefault(id(t), name)
                    mine[id(t)] = canonical
                    if canonical == name:
                        table[name] = t
                        slots[name] = []
                    elif table is self.params:
                        self.aliases[name] = canonical
                    slots[canonical].append((d, attr))

        # The buffer tables and the keys they hold: a buffer registered during a call
        # (`register_buffer` in forward) is found by their sizes (:meth:`added`).
        self._buffer_tables = [
            (prefix, m._buffers, m._non_persistent_buffers_set, frozenset(m._buffers))
            for prefix, m in distinct
        ]
        self._buffer_dicts = [d for _, d, _, _ in self._buffer_tables]
        self._buffer_sizes = [len(d) for d in self._buffer_dicts]

        # Plain lists and dicts among the modules' attributes that hold their tensors.
        self.unreached: dict[str, list[str]] = {}
        self._watched: list[tuple[weakref.ref, str]] = []
        self._extra: list[Slot] = []
        for prefix, m in distinct:
            self._find_aliases(prefix, m, by_id)
        # The plain lists and dicts, by id (`fn` may move a list's items, or pop a dict's):
        # their places are found and put back by what they hold (see `_swap.swapped`).
        self.plain = frozenset(id(c) for c, _ in self._extra)
        # Each module's attributes, by their number: a list or dict that holds a tensor of
        # the module, set after the structure was built, changes it (see `is_current`). The
        # root's through a weak reference: its `__dict__` may lead back to it (a hook that
        # is its own bound method), and it keys the cache that holds this structure.
        self._root = weakref.ref(module)
        self._refs = [self._root, *self._subs.values()]
        self._embeddings = [
            (weakref.ref(m), by_id[id(t)]) for m, t in embeddings if id(t) in by_id
        ]
        # The module, its submodules and their weight hooks, by id (alive while this is).
        self.objects = frozenset(seen_modules | {id(hook) for _, hook in self.hooked})
        self._fingerprint = self._fingerprint_of()
        # The module's own tensors, which a call's outputs must not share (see _engine).
        self.own = frozenset(map(id, (*self.params.values(), *self.buffers.values())))
        # Lazy (uninitialized) parameters and buffers have no shape: `structure(module,
        # where)` refuses a module that holds any.
        # (Not while compiling: dynamo traces no `is_lazy`, and a lazy module cannot run.)
        tables = () if is_compiling() else (*self.params.items(), *self.buffers.items())
        self.lazy = [name for name, t in tables if is_lazy(t)]
        # The parameters that samples must fit, read at every call: `module.to()` changes
        # their dtype and device in place (the same objects).
        self.expected = {name: p for name, p in self.params.items() if name not in self.lazy}
        # Zuko's lazy transforms run inside its flows' modules, and in modules whose forward
        # builds zuko's transforms: only those need the stand-ins (zuko.nn's networks are
        # plain torch; installing them costs ~50 us a call).
        self.uses_zuko = any(_runs_zuko(t) for t in set(self.types.values()))

    def _find_aliases(self, prefix: str, m: nn.Module, by_id: dict[int, str]) -> None:
        r"""Adds the places among the plain attributes of `m` that hold a tensor of the
        module: a list's index or a dict's key (one level deep) and the attribute itself
        are slots; a parameter in a tuple, a set or deeper is `unreached`. Read once per
        structure; the attributes read are watched by :meth:`is_current`."""

        d = vars(m)
        params, buffers, modules = m._parameters, m._buffers, m._modules
        # The tensors and the non-empty containers, but the module's own tables: read at
        # every build, by exact type first (most attributes are settings, and torch's hook
        # dicts, empty).
        candidates = [
            (attr, value)
            for attr, value in d.items()
            if (
                (value and value is not params and value is not buffers and value is not modules)
                if type(value) in _PLAIN
                else type(value) not in _SETTINGS and isinstance(value, _HOLDERS)
            )
        ]
        if candidates and isinstance(m, nn.RNNBase):
            # Refreshed by torch's forward, put back by `_swap.swapped`.
            candidates = [(attr, value) for attr, value in candidates if attr not in _FLAT]
        for attr, value in candidates:
            if isinstance(value, Tensor):
                items: Any = ((attr, value),)
                container: Any = _attributes(m)
            elif isinstance(value, list):
                items, container = enumerate(value), value
            elif isinstance(value, dict):
                items, container = value.items(), value
            else:  # a tuple or a set: its items cannot be replaced
                items, container = enumerate(value), None
            found = False
            where = f"{prefix}.{attr}" if prefix else attr
            for key, item in items:
                if isinstance(item, Tensor):
                    name = by_id.get(id(item))
                    if name is None:
                        # A view of a parameter (`self.w_t = self.lin.weight.T`): no sample
                        # can be put there.
                        base = by_id.get(id(item._base)) if item._base is not None else None
                        if base is not None and base in self.params:
                            found = True
                            self.unreached.setdefault(base, []).append(f"{where} (a view)")
                        continue
                    found = True
                    if container is not None:
                        self._extra.append((container, key))
                        slots = self.slots if name in self.slots else self.buffer_slots
                        slots[name].append((container, key))
                    elif name in self.params:
                        kind = type(value).__name__
                        self.unreached.setdefault(name, []).append(f"{where} (a {kind})")
                elif isinstance(item, _CONTAINERS):
                    inner = item.values() if isinstance(item, dict) else item
                    for i, t in enumerate(inner):
                        if i >= _NESTED:
                            break
                        name = by_id.get(id(t)) if isinstance(t, Tensor) else None
                        if name is not None and name in self.params:
                            found = True
                            self.unreached.setdefault(name, []).append(
                                f"{where}[{key!r}] (a {type(item).__name__} inside a "
                                f"{type(value).__name__})"
                            )
            if found and container is not d:
                self._watched.append((weakref.ref(m), attr))

    def _fingerprint_of(self) -> tuple | None:
        # The objects every table holds, in order, and the tables' sizes: cheap to build,
        # and any addition, removal or replacement changes it. The plain attributes that
        # hold tensors of the module too (most modules have none), and what they hold.
        # (:py:`None` where a module is gone.)
        modules = [r() for r in self._refs]
        if None in modules:
            return None
        attrs = [m.__dict__ for m in modules]
        dicts = self._dicts + [d["_modules"] for d in attrs]
        tables = (
            tuple([id(v) for d in dicts for v in d.values()]),
            tuple(map(len, dicts)),
            tuple(map(len, attrs)),
        )
        if not self._watched and not self._extra:
            return tables
        return (
            *tables,
            tuple([id(vars(r()).get(attr)) for r, attr in self._watched]),  # (all alive)
            tuple([id(_held(c, key)) for c, key in self._extra]),
        )

    @property
    def written(self) -> set[str]:
        written = set()
        for ref, name in self._embeddings:
            m = ref()
            if m is not None and m.max_norm is not None:
                written.add(name)
        return written

    def added(self) -> list[tuple[str, dict, str, set]]:
        r"""Returns the buffers registered since the structure was computed (by a call's
        `fn`): `(name, table, key, the module's non-persistent names)` of each."""

        if list(map(len, self._buffer_dicts)) == self._buffer_sizes:
            return []
        return [
            (f"{prefix}.{key}" if prefix else key, d, key, nonpersistent)
            for prefix, d, nonpersistent, keys in self._buffer_tables
            for key in d
            if key not in keys
        ]

    def is_current(self) -> bool:
        r"""Whether no parameter, buffer or submodule was added, removed or replaced."""

        fingerprint = self._fingerprint_of()
        return fingerprint is not None and fingerprint == self._fingerprint

    def sub(self, module: nn.Module, path: str) -> nn.Module:
        r"""Returns the submodule at `path` of `module` (this structure's)."""

        if path == "":
            return module
        sub = self._subs[path]()
        # (Gone only if the module no longer holds it: found again where it is now.)
        return sub if sub is not None else module.get_submodule(path)

    def find(self, module: nn.Module, cls: type | tuple[type, ...]) -> list[tuple[str, nn.Module]]:
        r"""Returns the submodules of `module` (this structure's) that are instances of `cls`."""

        return [(p, self.sub(module, p)) for p, t in self.types.items() if issubclass(t, cls)]


def _own_class(m: nn.Module) -> type:
    r"""The class of `m`, or for a parametrized module the class torch's parametrize made
    it from: the class it makes for each such module has properties that lead back to it."""

    cls = type(m)
    if parametrize.is_parametrized(m) and cls.__bases__:
        return cls.__bases__[0]
    return cls


class _Attributes:
    r"""The plain attributes of a module (its `__dict__`) as a place of its tensors, the
    module held weakly: its `__dict__` may lead back to it (a hook that is its own bound
    method), and a cached structure must not keep it alive."""

    __slots__ = ("_module",)

    def __init__(self, module: nn.Module) -> None:
        self._module = weakref.ref(module)

    def _dict(self) -> dict:
        m = self._module()
        return {} if m is None else vars(m)

    def get(self, key: str, default: Any = None) -> Any:
        return self._dict().get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self._dict()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._dict()[key] = value

    def __delitem__(self, key: str) -> None:
        del self._dict()[key]

    def pop(self, key: str, default: Any = None) -> Any:
        return self._dict().pop(key, default)


# One place per module (by identity), whatever the structures built of it: nested holds
# and swaps pair their places by the container's identity. Not a cache: the place of a
# hold still open must stay the one it holds.
_ATTRIBUTES: PerObject[_Attributes] = PerObject(cache=False)


def _attributes(module: nn.Module) -> _Attributes:
    return _ATTRIBUTES.setdefault(module, lambda: _Attributes(module))


def _held(container: Any, key: Any) -> Any:
    r"""What the place `(container, key)` holds; :py:`None` where it holds nothing."""

    if isinstance(container, list):
        return container[key] if key < len(container) else None
    return container.get(key)


_STRUCTURES: PerObject[Structure] = PerObject()


def structure(module: nn.Module, where: str | None = None) -> Structure:
    r"""Returns the structure of `module`, cached while the module does not change. With
    `where`, the name of a public call, refuses a module with lazy parameters or buffers."""

    if is_compiling():
        st = Structure(module)
    else:
        st = _STRUCTURES.get(module)
        # A lazy parameter is materialized in place (the same object): found again.
        if st is None or st.lazy or not st.is_current():
            st = _STRUCTURES.put(module, Structure(module))
    if st.lazy and where is not None:
        raise lazy_error(where, "an initialized module", st.lazy, module)
    return st


def lazy_error(where: str, what: str, names: list[str], module: nn.Module) -> ValueError:
    r"""The error for the lazy (uninitialized) tensors `names` of `module`, where `what`
    was expected."""

    return ValueError(
        f"{where}: expected {what}, got {names} uninitialized (a lazy module, such as "
        f"torch.nn.LazyLinear): run one forward pass of {type(module).__name__} first, so "
        "that its parameters get their shapes"
    )


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
