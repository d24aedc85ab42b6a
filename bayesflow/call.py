r"""Many sampled models in one call: vectorized with :func:`torch.func.vmap`, or looped."""

from __future__ import annotations

__all__ = ["VmapFallbackWarning", "loop_call", "vmap_call"]

import warnings

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from torch import Tensor
from torch.func import vmap

from ._compat import swap_parameters
from ._vmap_safe import vmap_safe
from .posterior import _check_module

Fn = Callable[..., Any]


class VmapFallbackWarning(UserWarning):
    r"""Raised when :func:`vmap_call` cannot vectorize a module and runs a loop instead."""


class _Call:
    r"""Runs `fn(base, *args)` while `base` holds swapped parameters."""

    __slots__ = ("base", "fn")

    def __init__(self, base: nn.Module, fn: Fn) -> None:
        self.base = base
        self.fn = fn

    def __call__(self, params: Mapping[str, Tensor], args: tuple) -> Any:
        # The swap of `functional_call`, without a wrapper module built on every call.
        # Zuko flows build their transforms lazily: `flow(c).log_prob(x)` must run
        # entirely inside the swap, or `log_prob` silently uses the original weights.
        with swap_parameters(self.base, params):
            return self.fn(self.base, *args)


class _OutputError(TypeError):
    pass


def _default_fn(module: nn.Module, *args: Any) -> Any:
    return module(*args)


def _rebuild(like: Any, items: list[Any]) -> Any:
    return type(like)(*items) if hasattr(like, "_fields") else type(like)(items)


def _map_outputs(where: str, f: Callable[[Tensor], Any], out: Any) -> Any:
    r"""Applies `f` to every tensor of `out`: a tensor, or tuples (named too), lists and
    dicts of them; anything else is an error."""

    if isinstance(out, Tensor):
        return f(out)
    if isinstance(out, Mapping):
        return {k: _map_outputs(where, f, v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return _rebuild(out, [_map_outputs(where, f, o) for o in out])

    raise _OutputError(
        f"{where}: expected fn to return tensors (or tuples, lists or dicts of them), got "
        f"{type(out).__name__}; reduce it to tensors inside fn, e.g. "
        "fn=lambda flow, c, x: flow(c).log_prob(x)"
    )


def _check_outputs(where: str, out: Any) -> None:
    _map_outputs(where, lambda t: None, out)


def _stack(outs: list[Any]) -> Any:
    first = outs[0]
    if isinstance(first, Tensor):
        return torch.stack(outs)
    if isinstance(first, Mapping):
        return {k: _stack([o[k] for o in outs]) for k in first}
    return _rebuild(first, [_stack(list(o)) for o in zip(*outs, strict=True)])


def _check_params(where: str, module: nn.Module, params: object) -> int:
    r"""Validates `params` against `module` and returns the number of samples."""

    if not isinstance(params, Mapping):
        raise TypeError(
            f"{where}: expected params to be a dict from parameter names to tensors, "
            f"got {type(params).__name__}"
        )
    if not params:
        raise ValueError(f"{where}: expected at least one parameter in params, got none")

    # `functional_call` silently ignores unknown names: a typo would go unnoticed.
    named = dict(module.named_parameters())
    unknown = [k for k in params if k not in named]
    if unknown:
        raise ValueError(
            f"{where}: expected names from {type(module).__name__}.named_parameters(), got "
            f"unknown names {unknown}"
        )

    counts = {}
    for name, value in params.items():
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{where}: expected params[{name!r}] to be a tensor, got {type(value).__name__}"
            )
        shape = tuple(named[name].shape)
        if value.dim() != len(shape) + 1 or tuple(value.shape[1:]) != shape:
            raise ValueError(
                f"{where}: expected params[{name!r}] of shape (n, *{shape}), "
                f"got {tuple(value.shape)}"
            )
        counts[name] = value.shape[0]

    if len(set(counts.values())) > 1:
        raise ValueError(
            f"{where}: expected the same number of samples n for every parameter, got {counts}"
        )

    n = next(iter(counts.values()))
    if n < 1:
        raise ValueError(f"{where}: expected at least one sample, got n = 0")

    return n


def _check_in_dims(where: str, args: tuple, in_dims: Sequence[int | None] | None, n: int) -> tuple:
    if in_dims is None:
        return (None,) * len(args)
    if not isinstance(in_dims, Sequence) or len(in_dims) != len(args):
        raise ValueError(
            f"{where}: expected in_dims with one entry (0 or None) per argument, "
            f"{len(args)} in all, got {in_dims!r}"
        )

    for i, (a, d) in enumerate(zip(args, in_dims, strict=True)):
        if d is None:
            continue
        if d != 0 or isinstance(d, bool):
            raise ValueError(f"{where}: expected in_dims[{i}] to be 0 or None, got {d!r}")
        if not isinstance(a, Tensor) or a.dim() == 0 or a.shape[0] != n:
            shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise ValueError(
                f"{where}: expected argument {i} to be per-sample with leading dim n = {n}, "
                f"got {shape}"
            )

    return tuple(in_dims)


def _prepare(
    where: str,
    module: object,
    params: object,
    args: tuple,
    fn: Fn | None,
    in_dims: Sequence[int | None] | None,
) -> tuple[_Call, dict[str, Tensor], int, tuple]:
    _check_module(where, module)
    if fn is not None and not callable(fn):
        raise TypeError(f"{where}: expected fn to be callable or None, got {type(fn).__name__}")

    n = _check_params(where, module, params)
    dims = _check_in_dims(where, args, in_dims, n)
    wrapper = _Call(module, _default_fn if fn is None else fn)
    return wrapper, dict(params), n, dims


def _index(args: tuple, dims: tuple, i: int) -> tuple:
    return tuple(a if d is None else a[i] for a, d in zip(args, dims, strict=True))


def _run_loop(
    where: str, wrapper: _Call, params: dict[str, Tensor], n: int, args: tuple, dims: tuple
) -> Any:
    outs = []
    for i in range(n):
        out = wrapper({k: v[i] for k, v in params.items()}, _index(args, dims, i))
        _check_outputs(where, out)
        outs.append(out)

    return _stack(outs)


def loop_call(
    module: nn.Module,
    params: Mapping[str, Tensor],
    *args: Any,
    fn: Fn | None = None,
    in_dims: Sequence[int | None] | None = None,
) -> Any:
    r"""Runs `fn(module, *args)` once per parameter set, in a Python loop.

    The oracle for :func:`vmap_call`: same contract, same numbers, no vectorization.

    Arguments:
        module: A module.
        params: Sampled parameters `{name: (n, *shape)}`, e.g. from :func:`bayesflow.sample`.
            Parameters absent from `params` keep their own value, shared by every sample.
        args: The arguments of `fn`, shared by every sample unless `in_dims` says otherwise.
        fn: What to compute, `fn(module, *args)`; `module(*args)` if :py:`None`.
        in_dims: One entry per argument: :py:`None` if shared, `0` if per-sample (with a
            leading dim `n`).

    Returns:
        The outputs of `fn` (tensors, or tuples, lists or dicts of them) stacked on a new
        leading dim of size `n`.
    """

    wrapper, params, n, dims = _prepare("loop_call", module, params, args, fn, in_dims)

    return _run_loop("loop_call", wrapper, params, n, args, dims)


def _batch_norm_hint(module: nn.Module) -> str:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            return (
                "; BatchNorm updates its running statistics in place: call module.eval() or "
                "torch.func.replace_all_batch_norm_modules_(module)"
            )
    return ""


def vmap_call(
    module: nn.Module,
    params: Mapping[str, Tensor],
    *args: Any,
    fn: Fn | None = None,
    chunk_size: int | None = None,
    fallback: bool = True,
    in_dims: Sequence[int | None] | None = None,
) -> Any:
    r"""Runs `fn(module, *args)` for every parameter set in one vectorized pass.

    The whole of `fn` runs with the sampled parameters swapped in, so lazy modules such as
    zuko flows, whose `flow(c)` returns a distribution evaluated later, see them too.

    Example:
        >>> net = zuko.nn.MLP(3, 5)
        >>> params = bayesflow.sample(bayesflow.init(net), 8)
        >>> bayesflow.vmap_call(net, params, torch.randn(16, 3)).shape
        torch.Size([8, 16, 5])

    Arguments:
        module: A module.
        params: Sampled parameters `{name: (n, *shape)}`, e.g. from :func:`bayesflow.sample`.
            Parameters absent from `params` keep their own value, shared by every sample.
        args: The arguments of `fn`, shared by every sample unless `in_dims` says otherwise.
        fn: What to compute, `fn(module, *args)`; `module(*args)` if :py:`None`. It must
            return tensors (or tuples, lists or dicts of them).
        chunk_size: The number of samples per vectorized chunk; all at once if :py:`None`.
            Chunking saves memory and changes no number.
        fallback: What to do where vmap cannot run `fn`: if :py:`True`, warn with
            :class:`VmapFallbackWarning` and run :func:`loop_call`; else raise.
        in_dims: One entry per argument: :py:`None` if shared, `0` if per-sample (with a
            leading dim `n`).

    Returns:
        The outputs of `fn` stacked on a new leading dim of size `n`, differentiable with
        respect to `params` and `args`; the same numbers as :func:`loop_call` (for zuko's
        CNF, gradients within the ODE solver's accuracy: see the flows documentation).
    """

    return _vmap_call("vmap_call", module, params, args, fn, chunk_size, fallback, in_dims)


def _vmap_call(
    where: str,
    module: nn.Module,
    params: Mapping[str, Tensor],
    args: tuple,
    fn: Fn | None,
    chunk_size: int | None,
    fallback: bool,
    in_dims: Sequence[int | None] | None,
) -> Any:
    wrapper, params, n, dims = _prepare(where, module, params, args, fn, in_dims)

    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(
            f"{where}: expected chunk_size to be a positive int or None, got {chunk_size!r}"
        )

    if n == 1:  # a plain call costs less than vmap's fixed overhead
        out = wrapper({k: v[0] for k, v in params.items()}, _index(args, dims, 0))
        return _map_outputs(where, lambda t: t.unsqueeze(0), out)

    def single(p: dict[str, Tensor], *a: Any) -> Any:
        out = wrapper(p, a)
        _check_outputs(where, out)
        return out

    try:
        with vmap_safe():
            return vmap(single, in_dims=(0, *dims), chunk_size=chunk_size)(params, *args)
    except _OutputError:
        raise
    except Exception as err:
        cause = (
            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        )
        message = (
            f"{where}: vmap cannot run {type(module).__name__} ({cause}){_batch_norm_hint(module)}"
        )
        if not fallback:
            raise RuntimeError(message) from err

    # A broken `fn` raises its own error here, rather than a warning about vmap.
    out = _run_loop(where, wrapper, params, n, args, dims)
    warnings.warn(
        f"{message}; fell back to a loop over {n} samples", VmapFallbackWarning, stacklevel=3
    )

    return out
