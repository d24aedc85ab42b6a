r"""Input checks at the public boundary: every message names the function, what it
expected and what it got."""

from __future__ import annotations

__all__ = [
    "check_bool",
    "check_broadcasts",
    "check_buffers",
    "check_callable",
    "check_float",
    "check_generator",
    "check_in_dims",
    "check_int",
    "check_labels",
    "check_level",
    "check_members",
    "check_module",
    "check_n",
    "check_not_bridge",
    "check_not_data_parallel",
    "check_number",
    "check_params",
    "check_posterior",
    "check_probs",
    "check_randomness",
    "check_real",
    "check_same_shape",
    "check_samples",
    "check_tensor",
    "describe",
    "reduce",
    "stored_in",
]

import enum
import functools
import math
import numbers
import os
import sys
import types
import warnings
import weakref

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from torch import Tensor
from torch.nn.parameter import UninitializedTensorMixin
from torch.nn.utils import parametrize

from ._structure import lock
from ._types import Posterior

if TYPE_CHECKING:
    from ._structure import Structure

RANDOMNESS = ("error", "different", "same")


def check_module(where: str, module: object) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{where}: expected a torch.nn.Module, got {type(module).__name__}")
    return module


def _wrappers(module: nn.Module) -> list[nn.Module]:
    r"""`module`, then the modules inside it, while it is a data-parallel wrapper
    (`DistributedDataParallel`, `DataParallel`) or torch.compile's, nested: the last is
    the wrapped one."""

    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    chain = [module]
    while True:
        m = chain[-1]
        if isinstance(m, wrappers) and isinstance(m.module, nn.Module):
            chain.append(m.module)
        elif type(m).__name__ == "OptimizedModule" and isinstance(
            getattr(m, "_orig_mod", None), nn.Module
        ):
            chain.append(m._orig_mod)  # torch.compile's wrapper
        else:
            return chain


def check_not_bridge(
    where: str, module: nn.Module, hint: str = "pass bnet.base and bnet.posterior"
) -> None:
    inner = _wrappers(module)[-1]
    if getattr(type(inner), "_bayesflow_bridge", False):
        wrapped = "" if inner is module else f" (wrapped in {type(module).__name__})"
        raise TypeError(
            f"{where}: expected the module the posterior is over, got a BayesianModel"
            f"{wrapped}; {hint}"
        )


def check_not_data_parallel(where: str, module: nn.Module) -> None:
    r"""Refuses a `DistributedDataParallel` wrapper where a posterior's own tensors are
    trained: its gradient averaging reaches the module's parameters only."""

    if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in _wrappers(module)):
        raise TypeError(
            f"{where}: expected the module itself, got a DistributedDataParallel wrapper, "
            "whose gradient averaging reaches the module's own parameters, not the "
            "posterior's tensors: every process would train a posterior of its own. Pass "
            "ddp.module and average the posterior's gradients over the processes after "
            "backward() (torch.distributed.all_reduce), or wrap a BayesianModel in "
            "DistributedDataParallel (docs/training.md)"
        )


def check_callable(
    where: str, what: str, fn: object, optional: bool = True, form: str = ""
) -> None:
    r"""Checks that `fn` is callable (or :py:`None` if `optional`); `form` tells how it is
    called, e.g. `"fn(module, *args) returning per-datum log-likelihoods"`."""

    if (fn is None and optional) or callable(fn):
        return
    also = " or None" if optional else ""
    form = f" as {form}" if form else ""
    raise TypeError(
        f"{where}: expected {what} to be callable{form}{also}, got {type(fn).__name__}"
    )


def check_int(
    where: str, what: str, value: object, minimum: int = 1, or_none: bool = False
) -> int:
    r"""Returns `value` as an int: Python and NumPy integers are accepted, bools are not."""

    kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    kind += " or None" if or_none else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{where}: expected {what} to be {kind}, got {type(value).__name__} {value!r}"
        )
    if value < minimum:
        raise ValueError(f"{where}: expected {what} to be {kind}, got {value}")
    return int(value)


def check_n(where: str, n: object) -> int:
    return check_int(where, "n", n)


def check_real(where: str, what: str, value: object) -> float:
    r"""Returns a real number as a float: Python and NumPy real numbers and tensors of one
    real element are accepted, bools are not; an int beyond the float range is infinite."""

    if isinstance(value, Tensor) and value.numel() == 1:
        if value.is_meta:
            raise ValueError(
                f"{where}: expected {what} with data, got a tensor on the meta device"
            )
        value = value.detach().item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: expected {what} to be a number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        return math.inf


def check_number(where: str, what: str, value: object, low: float, strict: bool) -> float:
    value = check_real(where, what, value)
    if not math.isfinite(value) or value < low or (strict and value == low):
        op = ">" if strict else ">="
        raise ValueError(f"{where}: expected a finite {what} {op} {low:g}, got {value}")
    return value


def check_bool(where: str, what: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{where}: expected {what} to be a bool, got {type(value).__name__}")
    return value


def check_broadcasts(where: str, what: str, value: Tensor, shape: torch.Size) -> None:
    r"""Checks that `value` broadcasts to `shape` without growing it."""

    try:
        fits = torch.broadcast_shapes(value.shape, shape) == shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"{where}: expected {what} to broadcast to {tuple(shape)}, got shape "
            f"{tuple(value.shape)}"
        )


def check_generator(where: str, generator: object, device: torch.device | None = None) -> None:
    r"""Checks a generator (or :py:`None`), and that it draws on `device` if given."""

    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{where}: expected generator to be a torch.Generator or None, "
            f"got {type(generator).__name__}"
        )
    if generator is not None and device is not None:
        on = generator.device
        if on.type != device.type or on.index not in (None, device.index):
            raise ValueError(
                f"{where}: expected a generator on the posterior's device ({device}), got one "
                f"on {on}"
            )


def check_randomness(where: str, randomness: object) -> str | None:
    if randomness is None or (isinstance(randomness, str) and randomness in RANDOMNESS):
        return randomness
    raise ValueError(
        f"{where}: expected randomness to be None, 'error', 'different' or 'same', "
        f"got {randomness!r}"
    )


def check_posterior(where: str, posterior: object) -> Posterior:
    if not isinstance(posterior, Posterior):
        raise TypeError(f"{where}: expected a bayesflow.Posterior, got {type(posterior).__name__}")
    for field in ("mean", "logvar"):
        value = getattr(posterior, field)
        if not isinstance(value, Mapping):
            raise TypeError(
                f"{where}: expected posterior.{field} to be a dict from parameter names to "
                f"tensors, got {type(value).__name__}"
            )
    if posterior.mean.keys() != posterior.logvar.keys():
        raise ValueError(
            f"{where}: expected mean and logvar with the same names, got "
            f"{sorted(posterior.mean)} and {sorted(posterior.logvar)}"
        )
    for name, m in posterior.mean.items():
        lv = posterior.logvar[name]
        for field, t in (("mean", m), ("logvar", lv)):
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"{where}: expected posterior.{field}[{name!r}] to be a tensor, "
                    f"got {type(t).__name__}"
                )
            # An attribute, no value read: this check runs on every training step.
            if t.is_meta:
                raise ValueError(
                    f"{where}: expected posterior tensors with data, got "
                    f"posterior.{field}[{name!r}] on the meta device"
                )
        if m.shape != lv.shape:
            raise ValueError(
                f"{where}: expected mean and logvar of {name!r} with the same shape, "
                f"got {tuple(m.shape)} and {tuple(lv.shape)}"
            )
        # (A mean that is not floating-point gets each caller's TypeError.)
        if m.is_floating_point() and (lv.dtype != m.dtype or lv.device != m.device):
            raise ValueError(
                f"{where}: expected posterior.logvar[{name!r}] with the dtype and device of "
                f"its mean ({describe(m)}), got {describe(lv)}"
            )
    return posterior


def check_in_dims(
    where: str, args: tuple, in_dims: Sequence[int | None] | None, n: int
) -> tuple[int | None, ...]:
    if in_dims is None:
        return (None,) * len(args)
    if (
        isinstance(in_dims, (str, Tensor))
        or not isinstance(in_dims, Sequence)
        or len(in_dims) != len(args)
    ):
        raise ValueError(
            f"{where}: expected in_dims with one entry (0 or None) per argument, "
            f"{len(args)} in all, got {in_dims!r}"
        )

    dims: list[int | None] = []
    for i, (a, d) in enumerate(zip(args, in_dims, strict=True)):
        if d is None:
            dims.append(None)
            continue
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d != 0:
            raise ValueError(f"{where}: expected in_dims[{i}] to be 0 or None, got {d!r}")
        if not isinstance(a, Tensor) or a.dim() == 0 or a.shape[0] != n:
            shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise ValueError(
                f"{where}: expected argument {i} to be per-sample with leading dim n = {n}, "
                f"got {shape}"
            )
        dims.append(0)

    return tuple(dims)


def check_params(
    where: str, st: Structure, module: nn.Module, params: object, n: int | None = None
) -> int:
    r"""Validates sampled parameters `{name: (n, *shape)}` of `module` and returns `n` (which
    must equal `n` if given)."""

    # The common case in one pass; any doubt goes to the checks below, which say what.
    if isinstance(params, Mapping) and params:
        k = -1 if n is None else n
        expected = st.expected
        for name, value in params.items():
            e = expected.get(name)
            if (
                e is None
                or not isinstance(value, Tensor)
                or value.dim() != e.dim() + 1
                or value.shape[1:] != e.shape
                or value.dtype != e.dtype
                or value.device != e.device
                or (k >= 0 and value.shape[0] != k)
            ):
                break
            k = value.shape[0]
        else:
            if k >= 1:
                return k

    return _check_stacked(
        where, "params", "named_parameters", st.params, st.aliases, module, params, n
    )


def check_buffers(
    where: str, st: Structure, module: nn.Module, buffers: object, n: int | None = None
) -> int:
    r"""Validates per-sample buffers `{name: (n, *shape)}` of `module` and returns `n`:
    each sample's of memory of its own (one that many samples share, from `expand`, would
    get every sample's writes)."""

    n = _check_stacked(where, "buffers", "named_buffers", st.buffers, {}, module, buffers, n)
    for name, value in buffers.items():  # type: ignore[attr-defined]
        if value.shape[0] > 1 and value.stride(0) == 0:
            raise ValueError(
                f"{where}: expected per-sample buffers with memory of their own for each "
                f"sample (each sample writes its own), got buffers[{name!r}] of stride 0 "
                "along its sample dim (from expand()): pass a copy, .clone()"
            )
    return n


def _check_stacked(
    where: str,
    what: str,
    source: str,
    table: Mapping[str, Tensor],
    aliases: Mapping[str, str],
    module: nn.Module,
    values: object,
    n: int | None,
) -> int:
    r"""Checks tensors `{name: (n, *shape)}` against the module's `table` of `what` (params or
    buffers), one message per kind of mistake."""

    noun = "parameter" if what == "params" else "buffer"
    if not isinstance(values, Mapping):
        raise TypeError(
            f"{where}: expected {what} to be a dict from {noun} names to tensors, "
            f"got {type(values).__name__}"
        )
    if not values:
        raise ValueError(f"{where}: expected at least one {noun} in {what}, got none")

    owner = f"{type(module).__name__}.{source}()"
    for name, value in values.items():
        ref = table.get(name)
        if ref is None:
            if name in aliases:
                raise ValueError(
                    f"{where}: expected names from {owner}, got {name!r}, which is tied to "
                    f"{aliases[name]!r} (the same Parameter): use {aliases[name]!r}"
                )
            unknown = [k for k in values if k not in table]
            raise ValueError(f"{where}: expected names from {owner}, got unknown names {unknown}")
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{where}: expected {what}[{name!r}] to be a tensor, got {type(value).__name__}"
            )
        if value.dim() != ref.dim() + 1 or value.shape[1:] != ref.shape:
            raise ValueError(
                f"{where}: expected {what}[{name!r}] of shape (n, *{tuple(ref.shape)}), "
                f"got {tuple(value.shape)}"
            )

    counts = {k: v.shape[0] for k, v in values.items()}
    first = next(iter(counts.values())) if n is None else n
    if any(c != first for c in counts.values()):
        given = "" if n is None else f" (n = {n} from the other per-sample tensors)"
        raise ValueError(
            f"{where}: expected the same number of samples n for every {noun}{given}, got {counts}"
        )
    if first < 1:
        raise ValueError(f"{where}: expected at least one sample, got n = 0")

    for name, value in values.items():
        ref = table[name]
        if value.dtype != ref.dtype or value.device != ref.device:
            raise ValueError(
                f"{where}: expected {what}[{name!r}] with the module's dtype and device "
                f"({describe(ref)}), got {describe(value)}"
            )

    return first


# A module's parameters and buffers, by name.
Tables = tuple[dict[str, Tensor], dict[str, Tensor]]


def _tables(module: nn.Module) -> Tables:
    r"""Reads the parameters and buffers of `module` under its lock: while another thread's
    call has samples swapped in, they are not the module's own."""

    with lock(module):
        return dict(module.named_parameters()), dict(module.named_buffers())


def check_members(
    where: str, modules: object, equal_buffers: bool, equal_frozen: bool = False
) -> list[Tables]:
    r"""Checks `n >= 1` modules of one architecture: one class, the same parameter names,
    shapes, dtypes and devices (and `requires_grad`, if `equal_frozen`), the same buffer
    names and shapes (and values, if `equal_buffers`), none of them lazy (uninitialized),
    and the same submodules (names and classes; a parametrized module's original class),
    each in the same mode and with the same settings (the attributes of torch's and zuko's
    layers: eps, momentum, p, batch_first, an activation function, ...; the functions of
    any layer; the other attributes of a user's layer are warned about, not refused).
    Returns each module's parameters and buffers, read under its lock."""

    if isinstance(modules, nn.Module) or not isinstance(modules, Sequence):
        raise TypeError(
            f"{where}: expected a sequence of torch.nn.Module, got {type(modules).__name__}"
        )
    if not modules:
        raise ValueError(f"{where}: expected at least one module, got none")
    for i, m in enumerate(modules):
        if not isinstance(m, nn.Module):
            raise TypeError(
                f"{where}: expected a sequence of torch.nn.Module, got {type(m).__name__} "
                f"at index {i}"
            )

    tables = [_tables(m) for m in modules]
    for i, (params, buffers) in enumerate(tables):
        for name, t in (*params.items(), *buffers.items()):
            if isinstance(t, UninitializedTensorMixin):
                raise ValueError(
                    f"{where}: expected initialized modules, got {name!r} uninitialized (a "
                    f"lazy module) at index {i}; run a forward pass on each module first"
                )
    first = modules[0]
    ours_params, ours_buffers = tables[0]
    if not ours_params:
        raise ValueError(f"{where}: expected modules with parameters, got none")
    warned = False  # a user's layer's attributes that differ: said once
    for i, m in enumerate(modules[1:], start=1):
        if _class(m) is not _class(first):
            ours, theirs = _class_names(first, m)
            raise ValueError(
                f"{where}: expected modules of one class, got {ours} and {theirs} at index {i}"
            )
        for kind, ours, theirs in (
            ("parameter", ours_params, tables[i][0]),
            ("buffer", ours_buffers, tables[i][1]),
        ):
            if list(theirs) != list(ours):
                raise ValueError(
                    f"{where}: expected the same {kind} names in every module, got "
                    f"{sorted(set(theirs) ^ set(ours))} differing at index {i}"
                )
            for name, t in theirs.items():
                ref = ours[name]
                if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
                    raise ValueError(
                        f"{where}: expected {name!r} of shape {tuple(ref.shape)} ({ref.dtype}, "
                        f"{ref.device}) in every module, got {tuple(t.shape)} ({t.dtype}, "
                        f"{t.device}) at index {i}"
                    )
                if kind == "parameter" and equal_frozen and t.requires_grad != ref.requires_grad:
                    raise ValueError(
                        f"{where}: expected {name!r} with requires_grad={ref.requires_grad} in "
                        f"every module (as in modules[0]), got {t.requires_grad} at index {i}"
                    )
                if kind == "buffer" and equal_buffers and not _same_values(t, ref):
                    raise ValueError(
                        f"{where}: expected equal buffers in every module (vmap_call uses "
                        f"those of modules[0]), got a different {name!r} at index {i}; stack "
                        "them too with bayesflow.stack_modules"
                    )
        warned = _check_submodules(where, first, m, i, warned)
    return tables


def _same_values(a: Tensor, b: Tensor) -> bool:
    r"""Whether two tensors of one shape, dtype and device hold the same values, NaN
    where the other has NaN (`torch.equal` says no to any NaN)."""

    if a is b or torch.equal(a, b):
        return True
    return a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _class(module: nn.Module) -> type:
    r"""The class of `module`, the original one where `torch.nn.utils.parametrize` made a
    subclass of its own for this module (it makes one for each parametrized module)."""

    kind = type(module)
    return kind.__bases__[0] if parametrize.is_parametrized(module) else kind


def _class_names(first: nn.Module, module: nn.Module) -> tuple[str, str]:
    r"""The names of the classes of `first` and `module`, qualified where they are alike."""

    a, b = _class(first), _class(module)
    if a.__name__ != b.__name__:
        return a.__name__, b.__name__
    return f"{a.__module__}.{a.__qualname__}", f"{b.__module__}.{b.__qualname__}"


# What every module holds in its `__dict__` (hooks, parameters, submodules) and what may
# differ between members without changing what they compute.
_NOT_SETTINGS = frozenset(vars(nn.Module())) | {"_compiled_call_impl"}
_UNSET = object()


class _Data:
    r"""Stands for a module among a module's attributes: each member's own, as its
    submodules are (these are compared apart)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Data)

    def __hash__(self) -> int:
        return 0


class _Values:
    r"""Stands for a tensor among a module's attributes (not a parameter or a buffer, which
    are each member's own): member 0's is the one every member runs with, so the values
    must be equal."""

    def __init__(self, t: Tensor) -> None:
        self.t = t

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Values):
            return False
        a, b = self.t.detach(), other.t.detach()
        if (a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device):
            return False
        return a.is_meta or _same_values(a, b)

    def __hash__(self) -> int:
        return 0


def _setting(value: object, depth: int = 0) -> object:
    r"""A value of a module's attribute in a form that compares as member 0's module must
    match for it to compute another member's function: plain values and tensors by value,
    functions by identity or by their code, defaults and closure, modules not at all (they
    are compared apart), any other object by its class."""

    if isinstance(value, Tensor):
        # A parameter, or a tensor computed from them (the weight of hook-based weight
        # norm, pruning; a recurrent layer's list of its weights): each member's own.
        if isinstance(value, nn.Parameter) or value.requires_grad or value.grad_fn is not None:
            return _Data()
        return _Values(value)
    if isinstance(value, nn.Module):
        return _Data()
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, enum.Enum)):
        return value
    if isinstance(value, (type, torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return value
    if depth > 8:  # a structure that holds itself: as deep as it goes, its classes
        return (type(value),)
    if isinstance(value, (tuple, list, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return (type(value), tuple(_setting(v, depth + 1) for v in items))
    if isinstance(value, Mapping):
        items = value.items()
        return (
            type(value),
            tuple((_setting(k, depth + 1), _setting(v, depth + 1)) for k, v in items),
        )
    if isinstance(value, types.MethodType):
        return (types.MethodType, _setting(value.__func__, depth + 1))
    if isinstance(value, functools.partial):
        parts = (value.func, value.args, value.keywords)
        return (functools.partial, _setting(parts, depth + 1))
    if isinstance(value, types.FunctionType):
        # A function made in the module's __init__ (a lambda) is a new object in each
        # member: the same code, defaults and captured values compute the same.
        cells = []
        for cell in value.__closure__ or ():
            try:
                cells.append(_setting(cell.cell_contents, depth + 1))
            except ValueError:  # an empty cell
                cells.append(None)
        defaults = (value.__defaults__, value.__kwdefaults__)
        return (types.FunctionType, value.__code__, _setting(defaults, depth + 1), tuple(cells))
    if isinstance(value, types.BuiltinFunctionType):  # torch.tanh, math.exp
        return value
    if isinstance(value, weakref.ref):
        return (weakref.ref, _setting(value(), depth + 1))
    return (type(value),)


def _settings(module: nn.Module) -> dict[str, object]:
    r"""The settings of `module`: the attributes in its `__dict__` (torch's layers keep
    there what `extra_repr` does not show, MultiheadAttention's `batch_first`, a
    TransformerEncoderLayer's `norm_first` and `activation` function), apart from hooks,
    parameters, buffers and submodules, as :func:`_setting` compares them."""

    # The weight that torch's hook-based weight norm, spectral norm and pruning compute
    # from a member's own `weight_g`/`weight_v` or `weight_orig`: the member's own.
    own = {k.rpartition("_")[0] for k in module._parameters if k.endswith(("_orig", "_v", "_g"))}
    return {k: v for k, v in vars(module).items() if k not in _NOT_SETTINGS and k not in own}


# The frames a warning skips to point at the user's line: bayesflow's, and torch's (a
# BayesianModel called as a module).
_INSIDE = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep
    for m in (sys.modules[__package__], torch)
)


def stack_level() -> int:
    r"""Returns the `stacklevel` of a warning, given in the function that calls this, that
    points at the first frame outside bayesflow and torch: the user's line, whichever public
    function led there and however deep."""

    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    return level


def _library(module: nn.Module) -> bool:
    r"""Whether `module` is one of torch's or zuko's layers, whose attributes are settings
    (a user's may hold a name, a seed or a cache, which a member may hold of its own)."""

    return _class(module).__module__.split(".")[0] in ("torch", "zuko")


def _behaviour(value: object) -> bool:
    r"""Whether an attribute is code a forward may call (a function, a method, a partial)."""

    return callable(value) and not isinstance(value, (type, nn.Module))


def _show(value: object) -> str:
    if value is _UNSET:
        return "unset"
    if callable(value) and isinstance(getattr(value, "__name__", None), str):
        return f"{getattr(value, '__module__', None) or '?'}.{value.__name__}"
    return repr(value)


def _check_submodules(
    where: str, first: nn.Module, module: nn.Module, i: int, warned: bool = False
) -> bool:
    r"""Checks that `module` has the submodules of `first` (names and classes), each in the
    same mode and with the same settings: calls on the stack run `first` for every member."""

    def label(name: str) -> str:
        return f"submodule {name!r}" if name else "the module"

    ours, theirs = list(first.named_modules()), list(module.named_modules())
    for (name, ref), (other, m) in zip(ours, theirs, strict=False):
        if other != name or _class(m) is not _class(ref):
            ref_class, m_class = _class_names(ref, m)
            raise ValueError(
                f"{where}: expected the submodules of modules[0] (names and classes) in every "
                f"module, got {label(other)} ({m_class}) at index {i} where "
                f"modules[0] has {label(name)} ({ref_class})"
            )
    if len(ours) != len(theirs):
        longer, which = (theirs, "an extra") if len(theirs) > len(ours) else (ours, "no")
        other, m = longer[min(len(ours), len(theirs))]
        raise ValueError(
            f"{where}: expected the submodules of modules[0] (names and classes) in every "
            f"module, got {which} {label(other)} ({type(m).__name__}) at index {i}"
        )
    for (name, ref), (_, m) in zip(ours, theirs, strict=True):
        if m.training != ref.training:
            mode = {True: "training", False: "evaluation"}
            raise ValueError(
                f"{where}: expected every module in the mode of modules[0], got "
                f"{label(name)} in {mode[m.training]} mode at index {i} and in "
                f"{mode[ref.training]} mode in modules[0]; call .train() or .eval() on each"
            )
        settings, ref_settings = _settings(m), _settings(ref)
        for key in (*ref_settings, *(k for k in settings if k not in ref_settings)):
            value, ref_value = settings.get(key, _UNSET), ref_settings.get(key, _UNSET)
            unset = value is _UNSET or ref_value is _UNSET
            if unset or _setting(value) != _setting(ref_value):
                shown, ref_shown = _show(value), _show(ref_value)
                if shown == ref_shown:  # a lambda of the module's: what it captured differs
                    shown += " (with other defaults or captured values)"
                got = (
                    f"{label(name)} with {key}={shown} at index {i} and {key}={ref_shown} in "
                    "modules[0]"
                )
                if _library(ref) or _behaviour(value) or _behaviour(ref_value):
                    raise ValueError(
                        f"{where}: expected the settings of modules[0] in every module, got {got}"
                    )
                # A layer of the user's: a name or a cache of a member's own, or a setting
                # its forward reads; said (the first, once per call), not refused.
                if not warned:
                    warnings.warn(
                        f"{where}: every member runs with the attributes of modules[0], got "
                        f"{got}: if {key!r} changes what the layer computes, the members "
                        "compute modules[0]'s function with their own parameters",
                        stacklevel=stack_level(),
                    )
                    warned = True
    return warned


def describe(t: Any) -> str:
    r"""Returns the dtype and device of a tensor, as messages show them."""

    return f"{t.dtype} on {t.device}"


# Tensors of predictions, probabilities and labels.


def check_tensor(where: str, name: str, x: object, min_dim: int = 1) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected {name} to be a tensor, got {type(x).__name__}")
    if x.is_meta:
        raise ValueError(f"{where}: expected {name} with data, got a tensor on the meta device")
    if x.dim() < min_dim:
        raise ValueError(
            f"{where}: expected {name} with at least {min_dim} dims, got shape {tuple(x.shape)}"
        )
    return x


def check_float(where: str, name: str, x: Tensor) -> Tensor:
    if not x.is_floating_point():
        raise TypeError(f"{where}: expected {name} to be a floating-point tensor, got {x.dtype}")
    return x


def check_samples(where: str, samples: object, name: str = "samples", min_dim: int = 1) -> Tensor:
    x = check_tensor(where, name, samples, min_dim)
    check_float(where, name, x)
    if x.shape[0] < 1:
        raise ValueError(
            f"{where}: expected {name} with at least one sample on dim 0, got shape "
            f"{tuple(x.shape)}"
        )
    return x


def check_labels(where: str, labels: object, shape: torch.Size, classes: int) -> Tensor:
    y = check_tensor(where, "labels", labels, min_dim=0)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{where}: expected integer labels, got {y.dtype}")
    if y.shape != shape:
        raise ValueError(f"{where}: expected labels of shape {tuple(shape)}, got {tuple(y.shape)}")
    # As int64, which gather indexes with, and which compares and reduces (torch does
    # neither for uint16, uint32 and uint64): uint64 labels of 2**63 and more wrap to
    # negative, refused below as the values they were.
    dtype, y = y.dtype, y.long()
    if y.numel() > 0:
        lo, hi = (int(v) for v in y.aminmax())
        if lo < 0 or hi >= classes:
            if dtype == torch.uint64 and lo < 0:
                small = y[y >= 0]
                hi = int(y[y < 0].max()) + 2**64
                lo = int(small.min()) if small.numel() > 0 else int(y.min()) + 2**64
            raise ValueError(
                f"{where}: expected labels in [0, {classes - 1}], got values in [{lo}, {hi}]"
            )
    return y


def stored_in(p: Tensor) -> torch.dtype:
    r"""Returns the coarsest floating-point dtype that holds every value of `p` exactly:
    bfloat16, float16 or float32 if one of them is coarser than `p`'s own, else its own
    (probabilities are often computed in half precision or float32, then cast up)."""

    own = torch.finfo(p.dtype).eps
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        if torch.finfo(dtype).eps > own and torch.equal(p, p.to(dtype).to(p.dtype)):
            return dtype
    return p.dtype


def _probs_tolerance(stored: torch.dtype, classes: int) -> float:
    r"""Returns how far from 1 the sums of `classes` probabilities stored in `stored` may
    be: :math:`\epsilon_s (2 + \ln C) + \epsilon_{32} (16 + C / 64)`.

    Each probability rounded once to its dtype is off by at most :math:`\epsilon_s / 2` of
    itself, so their sum is too, whatever `C`; :func:`mean_probs` rounds the log and then
    the probability, which adds :math:`\epsilon_s / 2` of the entropy, at most
    :math:`\epsilon_s \ln(C) / 2`. Only the float32 sum inside a softmax grows with `C`:
    16 units of float32's rounding, and one more per 64 classes (a float32 softmax over
    20000 classes is off by 42)."""

    eps = torch.finfo(stored).eps
    eps32 = torch.finfo(torch.float32).eps
    return eps * (2 + math.log(classes)) + eps32 * (16 + classes / 64)


def check_probs(where: str, probs: object) -> Tensor:
    r"""Checks probabilities `(*, C)` and returns them: in :math:`[0, 1]`, summing to 1
    within the rounding of the dtype they are stored in (:func:`stored_in`)."""

    p = check_tensor(where, "probs", probs, min_dim=1)
    check_float(where, "probs", p)
    if p.shape[-1] < 1:
        raise ValueError(f"{where}: expected at least one class on the last dim, got none")
    if p.numel() == 0:
        return p

    if p.isnan().any():
        raise ValueError(
            f"{where}: expected probabilities without NaN, got {int(p.isnan().sum())} NaN "
            f"among {p.numel()} values"
        )
    if not ((p >= 0).all() and (p <= 1).all()):
        raise ValueError(
            f"{where}: expected probabilities in [0, 1], got values in "
            f"[{float(p.min())}, {float(p.max())}]"
        )
    stored = stored_in(p)
    error = (p.sum(dim=-1, dtype=torch.float64) - 1).abs().max()
    if error > _probs_tolerance(stored, p.shape[-1]):
        raise ValueError(
            f"{where}: expected probabilities that sum to 1 on the last dim, got sums off by "
            f"up to {float(error):.3g}"
        )
    return p


def check_level(where: str, level: object) -> float:
    r"""Returns `level` as a float in :math:`(0, 1)`: any real number (Python, NumPy) or a
    tensor of one real element is accepted, bools are not, as in :func:`check_number`."""

    expected = f"{where}: expected level to be a float (a real number or a tensor of one element)"
    value = level
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{expected}, got a tensor of shape {tuple(value.shape)}")
        value = value.detach().item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        got = f"{level.dtype} tensor" if isinstance(level, Tensor) else type(level).__name__
        raise TypeError(f"{expected}, got {got}")
    value = float(value)
    if not 0 < value < 1:
        raise ValueError(f"{where}: expected level in (0, 1), got {value}")
    return value


def check_same_shape(where: str, **tensors: Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        got = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ValueError(f"{where}: expected tensors of the same shape, got {got}")
    devices = {k: v.device for k, v in tensors.items()}
    if len(set(devices.values())) > 1:
        got = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"{where}: expected tensors on one device, got {got}")


def reduce(where: str, x: Tensor, reduction: str) -> Tensor:
    r"""Reduces per-observation values; no observation at all is an error, as in every metric."""

    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{where}: expected reduction 'mean', 'sum' or 'none', got {reduction!r}")
    if x.numel() == 0:
        raise ValueError(f"{where}: expected at least one observation, got none")
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    return x
