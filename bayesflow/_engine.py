r"""The engine behind every call over posterior samples: checks, the swap, the vectorized
pass with its stand-ins and batched state, the loop, and the fallback between them."""

from __future__ import annotations

__all__ = ["VmapFallbackWarning", "check_chunk_size", "run"]

import warnings

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from torch import Tensor
from torch.func import vmap

from . import _torch_layers
from ._checks import (
    check_callable,
    check_in_dims,
    check_int,
    check_module,
    check_randomness,
)
from ._errors import Passthrough
from ._memory import auto_chunk_size, check_max_memory, per_sample_bytes
from ._outputs import flatten, map_outputs, stack, unflatten
from ._swap import State, Structure, check_params, lock, structure, swapped
from ._vmap_safe import vmap_safe

Fn = Callable[..., Any]


class VmapFallbackWarning(UserWarning):
    r"""Warned when :func:`bayesflow.vmap_call` cannot vectorize a call and runs a loop."""


def _default_fn(module: nn.Module, *args: Any) -> Any:
    return module(*args)


def check_chunk_size(where: str, chunk_size: object) -> int | str | None:
    if chunk_size is None or chunk_size == "auto":
        return chunk_size
    if isinstance(chunk_size, str):
        raise ValueError(
            f"{where}: expected chunk_size to be a positive int, 'auto' or None, "
            f"got {chunk_size!r}"
        )
    return check_int(where, "chunk_size", chunk_size, or_none=True)


def _auto_chunk_size(
    st: Structure,
    module: nn.Module,
    fn: Fn,
    params: Mapping[str, Tensor],
    n: int,
    args: tuple,
    dims: tuple,
    max_memory: int | None,
) -> int:
    r"""Returns how many samples fit in `max_memory`, from what one sample allocates."""

    key = (
        id(fn),
        torch.is_grad_enabled(),
        tuple(params),
        tuple(
            (tuple(a.shape[1:] if d == 0 else a.shape), a.dtype)
            if isinstance(a, Tensor)
            else id(a)
            for a, d in zip(args, dims, strict=True)
        ),
    )
    per_sample = st.footprints.get(key)
    if per_sample is None:

        def one() -> None:
            with swapped(st, {k: v[0] for k, v in params.items()}):
                fn(module, *_index(args, dims, 0))

        state = State(st)
        try:
            per_sample = per_sample_bytes(one)
        finally:
            state.restore()
        if len(st.footprints) >= 16:  # a new `fn` per call must not grow this forever
            st.footprints.pop(next(iter(st.footprints)))
        st.footprints[key] = per_sample

    like = next(iter(params.values()), None)
    if like is None:
        like = next((a for a in args if isinstance(a, Tensor)), torch.empty(0))
    return auto_chunk_size(per_sample, n, like.device, max_memory)


def _index(args: tuple, dims: tuple, i: int) -> tuple:
    return tuple(a if d is None else a[i] for a, d in zip(args, dims, strict=True))


def _rng_state() -> tuple[Tensor, list[Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.random.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    # One draw for all samples, in the loop as under vmap(randomness="same").
    torch.random.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _loop(
    where: str,
    st: Structure,
    module: nn.Module,
    fn: Fn,
    params: Mapping[str, Tensor],
    n: int,
    args: tuple,
    dims: tuple,
    randomness: str | None,
    state: State | None = None,
) -> Any:
    state = State(st) if state is None else state
    rng = _rng_state() if randomness == "same" else None
    outs = []
    try:
        for i in range(n):
            if rng is not None:
                _set_rng_state(rng)
            with swapped(st, {k: v[i] for k, v in params.items()}, state.fresh()):
                out = fn(module, *_index(args, dims, i))
                held = state.current()
            map_outputs(where, lambda t: None, out)
            outs.append(out)
            state.collect(held)
    except BaseException:
        state.restore()
        raise
    state.finish()

    return stack(outs)


def _single(
    where: str,
    st: Structure,
    module: nn.Module,
    fn: Fn,
    params: Mapping[str, Tensor],
    args: tuple,
    dims: tuple,
) -> Any:
    state = State(st) if st.buffers else None
    try:
        with swapped(st, {k: v[0] for k, v in params.items()}):
            out = fn(module, *_index(args, dims, 0))
    except BaseException:
        if state is not None:
            state.restore()
        raise
    return map_outputs(where, lambda t: t.unsqueeze(0), out)


def _batched_buffers(st: Structure, module: nn.Module, n: int) -> dict[str, Tensor]:
    r"""Per-sample copies `(n, *shape)` of the buffers that a vectorized call updates."""

    buffers = {}
    for name in _torch_layers.updated_buffers(st, module):
        t = st.buffers[name]
        buffers[name] = t.detach().unsqueeze(0).repeat(n, *(1,) * t.dim())
    return buffers


def _vectorized(
    where: str,
    st: Structure,
    module: nn.Module,
    fn: Fn,
    params: Mapping[str, Tensor],
    n: int,
    args: tuple,
    dims: tuple,
    chunk_size: int | None,
    randomness: str | None,
    state: State,
) -> Any:
    buffers = _batched_buffers(st, module, n)
    names, buffer_names = list(params), list(buffers)
    flat = (*params.values(), *buffers.values(), *args)
    split, end = len(names), len(names) + len(buffer_names)
    spec: list[Any] = []

    def single(*inputs: Any) -> tuple[Tensor, ...]:
        # Flat inputs: vmap's pytree handling of nested dicts costs more than the swap.
        p = dict(zip(names, inputs[:split], strict=True))
        b = dict(zip(buffer_names, inputs[split:end], strict=True))
        with swapped(st, p, b):
            out = fn(module, *inputs[end:])
        leaves, s = flatten(where, out)
        spec[:] = [s]
        return leaves

    with vmap_safe(st.uses_zuko), _torch_layers.vectorized(st, module, params.keys()):
        leaves = vmap(
            single,
            in_dims=(*(0,) * end, *dims),
            chunk_size=chunk_size,
            randomness=randomness or "error",
        )(*flat)

    for name, stacked in buffers.items():
        state.set_averaged(name, stacked)

    return unflatten(spec[0], leaves)


def _cause(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def run(
    where: str,
    module: nn.Module,
    params: Mapping[str, Tensor],
    args: tuple,
    fn: Fn | None = None,
    chunk_size: int | None = None,
    fallback: bool = True,
    in_dims: Sequence[int | None] | None = None,
    randomness: str | None = None,
    vectorized: bool = True,
    n: int | None = None,
    max_memory: int | None = None,
) -> Any:
    r"""Runs `fn(module, *args)` for every parameter set, vectorized or looped.

    With `n`, `params` may be empty (every sample shares the module's own parameters).
    """

    check_module(where, module)
    check_callable(where, "fn", fn)
    chunk_size = check_chunk_size(where, chunk_size)
    max_memory = check_max_memory(where, max_memory)
    randomness = check_randomness(where, randomness)
    fn = _default_fn if fn is None else fn

    with lock(module):
        st = structure(module)
        if n is None or params:
            n = check_params(where, st, module, params)
        dims = check_in_dims(where, args, in_dims, n)
        if not vectorized:
            return _loop(where, st, module, fn, params, n, args, dims, randomness)
        if n == 1:  # a plain call costs less than vmap's fixed overhead
            return _single(where, st, module, fn, params, args, dims)

        if chunk_size == "auto":
            chunk_size = _auto_chunk_size(st, module, fn, params, n, args, dims, max_memory)
        state = State(st)
        try:
            return _vectorized(
                where, st, module, fn, params, n, args, dims, chunk_size, randomness, state
            )
        except Passthrough:
            state.restore()
            raise
        except Exception as err:
            state.restore()
            message = (
                f"{where}: vmap cannot run {type(module).__name__} ({_cause(err)})"
                f"{_torch_layers.hint(st, module, err)}"
            )
            if not fallback:
                raise RuntimeError(message) from err

        # A broken `fn` raises its own error here, rather than a warning about vmap.
        out = _loop(where, st, module, fn, params, n, args, dims, randomness, state)

    warnings.warn(
        f"{message}; fell back to a loop over {n} samples", VmapFallbackWarning, stacklevel=3
    )
    return out
