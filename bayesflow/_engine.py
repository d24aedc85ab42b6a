r"""The engine behind every call over posterior samples.

It is the one place that takes a module's lock, swaps tensors into the module, patches
its layers and applies the buffer rule; every other module hands it what to run and what
to patch. A call either loops (the oracle), makes one plain call (one sample), or runs
:func:`torch.func.vmap` over a function that swaps one sample into every place that holds
each parameter, with the stand-ins the module needs, and falls back to the loop from the
state the call found where vmap cannot run it.
"""

from __future__ import annotations

__all__ = [
    "VmapFallbackWarning",
    "count",
    "draw_state",
    "hold",
    "mark_members",
    "restore_draw_state",
    "run",
    "run_local",
]

import functools
import warnings

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from torch import Tensor
from torch.func import vmap as torch_vmap
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from . import _posterior, _torch_layers
from ._buffers import State
from ._caches import Bounded, PerObject, fn_key, value_key
from ._checks import check_buffers, check_in_dims, check_params, stack_level
from ._compat import (
    StopRecomputation,
    autocast_off,
    autocast_rules,
    closure,
    counting_allocations,
    generating,
    hook_name,
    in_func_transform,
    is_compiling,
    is_wrapped,
    no_saved_tensors_hooks,
    saved_tensors_hooks_active,
    unwrap_batched,
)
from ._errors import ArgumentWritten, Passthrough
from ._layers import LocalPlan, ReadElsewhere, Recorder, StaleShapes, Tape, expire
from ._memory import auto_chunk_size, cache_chunk_size, one_by_one, per_sample_bytes
from ._options import CallOptions
from ._outputs import flatten, flatten_like, map_outputs, stack, unflatten
from ._structure import Structure, fn_runs_zuko, lock, structure
from ._swap import patched, swapped
from ._types import Posterior
from ._vmap_safe import vmap_safe


class VmapFallbackWarning(UserWarning):
    r"""Warned when :func:`bayesflow.vmap_call` cannot vectorize a call and runs a loop."""


class _Job(NamedTuple):
    r"""A checked call, under the module's lock: what to run, on what, how."""

    st: Structure
    module: nn.Module
    params: Mapping[str, Tensor]
    args: tuple
    dims: tuple  # per argument: 0 if it has a sample dim, else None
    n: int
    opts: CallOptions
    buffers: Mapping[str, Tensor]  # per-sample buffers `(n, *shape)` (an ensemble's), or {}
    zuko: bool  # whether zuko's transforms run, in the module or built by `fn`: stand-ins


def run(
    module: nn.Module,
    params: Mapping[str, Tensor],
    args: tuple,
    opts: CallOptions,
    n: int | None = None,
    buffers: Mapping[str, Tensor] | None = None,
) -> Any:
    r"""Runs `opts.fn(module, *args)` for every parameter set, vectorized or looped.

    With `n` or `buffers`, `params` may be empty (every sample shares the module's own
    parameters). `buffers` are per-sample buffers `{name: (n, *shape)}` that the samples
    use and update in place instead of the module's own.
    """

    with lock(module):
        st = structure(module, opts.where)
        if buffers is not None and not (isinstance(buffers, Mapping) and not buffers):
            n = check_buffers(opts.where, st, module, buffers, None if params else n)
        if n is None or params:
            n = check_params(opts.where, st, module, params, n)
        # Not while compiling: dynamo cannot trace the weak dictionary's lookup.
        if (
            st.buffers
            and not buffers
            and not is_compiling()
            and any(v in _MEMBERS for v in params.values())
        ):
            raise ValueError(
                f"{opts.where}: expected buffers=ens.buffers with an ensemble's stacked "
                f"parameters (bayesflow.ensemble, stack_modules) on a module with buffers "
                f"({', '.join(map(repr, st.buffers))}), got none: every member would use, and "
                "update, the module's own (member 0's)"
            )
        dims = check_in_dims(opts.where, args, opts.in_dims, n)
        zuko = st.uses_zuko or fn_runs_zuko(opts.fn)
        job = _Job(st, module, params, args, dims, n, opts, buffers or {}, zuko)
        out, message = _call(job)
    _warn(message, n)
    return out


def count(module: nn.Module, params: Mapping[str, Tensor], opts: CallOptions) -> int:
    r"""Checks sampled parameters against `module` and returns how many sets they hold."""

    with lock(module):
        return check_params(opts.where, structure(module, opts.where), module, params)


def _warn(message: str | None, n: int) -> None:
    if message is not None:
        warnings.warn(
            f"{message}; fell back to a loop over {n} samples",
            VmapFallbackWarning,
            stacklevel=stack_level(),
        )


# What `hold` keeps in place, per module, innermost last: its attribute patches and swap.
_HOLDS: PerObject[list[tuple[patched, swapped]]] = PerObject(cache=False)


@contextmanager
def hold(
    module: nn.Module, params: Mapping[str, Tensor], changes: list[tuple[Any, str, Any]]
) -> Iterator[nn.Module]:
    r"""Keeps one parameter set (unbatched) and the attribute `changes` in `module` until
    exit, then puts back the very same objects.

    The lock is held while entering and leaving only. A call on the module in between
    (from this thread or another), or on a module that holds it or that it holds, sees the
    held parameters for those it does not sample, and the layers' own forwards: it runs
    with the changes undone.
    """

    with lock(module):
        st = structure(module)
        # The weights that hooks assign (weight_norm's, spectral_norm's) from the held
        # samples: put back on exit, as every call puts them back.
        hooked = [(m, n, vars(m).get(n)) for m, n in _hook_places(st, module)]
        swap = swapped(st, params, module=module)
        swap.__enter__()
        patch = patched([*changes, *hooked])
        try:
            patch.__enter__()
        except BaseException:
            swap.__exit__()
            raise
        _HOLDS.setdefault(module, list).append((patch, swap))
    try:
        yield module
    finally:
        with lock(module):
            holds = _HOLDS.get(module)
            i = next(i for i, (p, _) in enumerate(holds) if p is patch)
            del holds[i]
            if i < len(holds):
                # Left before holds entered after it (out of order): where one of them holds
                # a place too, it keeps its sample there and, on its exit, puts back what
                # this one found; the places only this one held are put back now.
                patch.hand_over([p for p, _ in holds[i:]])
                swap.hand_over([w for _, w in holds[i:]])
            else:
                patch.__exit__()
                swap.__exit__()
            if not holds:
                _HOLDS.pop(module)


def _changes(st: Structure, module: nn.Module, extra: list) -> list[tuple[Any, str, Any]]:
    r"""What every call on `module` changes for its duration: the forwards of the holds
    undone (on `module`, on a module that holds it, or on one it holds: a hold's changes
    to the objects of `module`), the weights that hooks assign put back afterwards, and
    `extra`."""

    if not st.hooked and not _HOLDS:
        return extra
    changes = []
    for holds in _HOLDS.values() if _HOLDS else ():
        for patch, _ in reversed(holds):
            changes += [
                (obj, name, old)
                for obj, name, old in reversed(patch.done)
                if id(obj) in st.objects
            ]
    changes += [(m, name, vars(m).get(name)) for m, name in _hook_places(st, module)]
    return changes + extra


def _hook_places(st: Structure, module: nn.Module) -> list[tuple[nn.Module, str]]:
    r"""The attributes that the weight hooks of `module` assign (weight_norm's `weight`)."""

    return [(st.sub(module, path), hook_name(hook)) for path, hook in st.hooked]


def check_no_parametrization_cache(
    where: str, module: nn.Module, st: Structure | None = None
) -> None:
    r"""Refuses a call inside :func:`torch.nn.utils.parametrize.cached` on a module with
    parametrizations: the cache keeps the first weight computed (the module's own, or the
    first sample's) for every later sample."""

    if not parametrize._cache_enabled:
        return
    if st is None:
        with lock(module):
            st = structure(module, where)
    if st.find(module, parametrize.ParametrizationList):
        raise RuntimeError(
            f"{where}: expected no torch.nn.utils.parametrize.cached() around a call on a "
            "module with parametrizations, got one: its cache would give every sample the "
            "weight computed first; call outside cached()"
        )


def _call(job: _Job, extra: list | None = None) -> tuple[Any, str | None]:
    r"""Runs a checked call under the lock, with the attribute changes `extra`; returns its
    outputs and, if it fell back to the loop, why."""

    st = job.st
    check_no_parametrization_cache(job.opts.where, job.module, st)
    written = {k: job.params[k] for k in st.written if k in job.params}
    if written:  # a module that writes its weight in place gets a copy of its own
        params = {k: v.clone() if k in written else v for k, v in job.params.items()}
        job = job._replace(params=params)
    changes = _changes(st, job.module, extra or [])
    with _no_recomputation(job.opts.where):
        if not changes:
            result = _dispatch(job)
        else:
            with patched(changes):
                result = _dispatch(job)
    if written:
        _hand_back(written, job.params)
    return result


# The stacked parameters of ensembles (:func:`bayesflow.ensemble`, `stack_modules`): each
# member's module would hold its own, which the module writes in place.
_MEMBERS = WeakIdKeyDictionary()


def mark_members(params: Mapping[str, Tensor]) -> None:
    r"""Marks an ensemble's stacked parameters: what a module writes into its own weight
    (`Embedding(max_norm)`) is written back into them, as into K separate modules."""

    for t in params.values():
        _MEMBERS[t] = True


def _hand_back(originals: Mapping[str, Tensor], copies: Mapping[str, Tensor]) -> None:
    r"""Writes what the module wrote into its weight's copies (`Embedding(max_norm)`
    renormalizes the rows it reads) back into an ensemble's parameters (:func:`mark_members`):
    as torch writes a module's own weight, and K separate trainings see. Anything else,
    the samples of a posterior among them, is left as it is."""

    if in_func_transform():
        return
    with torch.no_grad():
        for k, v in originals.items():
            if v in _MEMBERS:
                v.copy_(copies[k])


def _no_recomputation(where: str) -> Any:
    r"""Refuses activation checkpointing inside a call that records gradients.

    `torch.utils.checkpoint` recomputes its part of the forward pass during the backward
    pass, after the call has put the module's own parameters back: the gradients would
    silently be those of other weights. It works through saved-tensor hooks, which this
    disables, with a message, for the duration of the call (unless hooks are already
    active around the call: a checkpoint around the whole call recomputes it whole).
    """

    if not torch.is_grad_enabled() or is_compiling() or saved_tensors_hooks_active():
        return nullcontext()
    return no_saved_tensors_hooks(
        f"{where}: activation checkpointing (torch.utils.checkpoint) inside the call cannot "
        "see the sampled parameters: its backward pass recomputes the forward after the "
        "call has put the module's own parameters back, so the gradients would be those "
        "of other weights; checkpoint around the whole call instead, e.g. "
        "checkpoint(lambda x: bayesflow.vmap_call(module, params, x), x, use_reentrant=False)"
    )


def _dispatch(job: _Job) -> tuple[Any, str | None]:
    opts = job.opts
    if not opts.vectorized:
        return _loop(job), None
    # `randomness="error"` asserts that `fn` draws nothing, and only vmap checks it: no
    # shortcut around vmap (a plain call, the loop) is taken then.
    checked = opts.randomness == "error"
    if job.n == 1 and not checked:  # a plain call costs less than vmap's fixed overhead
        return _single(job), None
    hooked = _backward_hooked(job.st, job.module) if torch.is_grad_enabled() else None
    if hooked and _records_gradients(job):
        # torch.func's vmap runs no backward hook: the gradients would be those of the
        # module without them. The loop runs them, as a plain call does.
        message = (
            f"{opts.where}: vmap runs no backward hook, and {type(job.module).__name__} has "
            f"{hooked}: the gradients would be those of the module without them"
        )
        if not opts.fallback:
            raise RuntimeError(message)
        return _loop(job), message

    shared = _shared_versions(job)
    chunk_size, measure, cached = opts.chunk_size, None, None
    # Random operations under vmap draw by the chunk (and a non-contiguous dropout's mask
    # in the batched layout): the chunk the first call measures must not change the
    # numbers of the next ones. All at once, as the first call, every time.
    drawn = opts.randomness in ("different", "same")
    if chunk_size == "auto":
        chunk_size = auto_chunk_size(_footprint(job), job.n, _device(job), opts.max_memory)
    elif chunk_size is None and _fits_the_cache(job):
        footprints, key = _footprints(job)
        per_sample = footprints.get(key)
        if per_sample is None:
            measure = (footprints, key)  # this call, all at once, measures it
        elif drawn:
            pass  # all at once, as the call that measured it
        elif footprints.get((key, "one pass")):
            pass  # fn writes buffers in place: chunks would write them once each
        elif one_by_one(per_sample) and not checked:
            return _loop(job), None
        elif one_by_one(per_sample):
            chunk_size, cached = 1, (footprints, key)
        else:
            chunk_size, cached = cache_chunk_size(per_sample, job.n), (footprints, key)
    state = State(job.st, job.buffers)
    # Random operations under vmap draw from torch's generators: a fallback to the loop
    # (or a pass again, all at once) starts from the state the call found, as loop_call does.
    # A failed call (fallback=False) leaves them as it found them too.
    rng = _rng_state() if opts.randomness in ("different", "same") else None
    try:
        if measure is None:
            try:
                out = _vectorized(job, chunk_size, state)
                return _checked(job, shared, chunk_size, out), None
            except _ChunkedWrites:
                _check_arguments(job, shared)
                if cached is None or chunk_size is None or chunk_size >= job.n:
                    raise
            # Chunks the user did not ask for (the cache's) made fn write a buffer once per
            # chunk: the buffers as found, then all samples in one pass, as the first call
            # did; remembered for the module and call.
            state.restore()
            if rng is not None:
                _set_rng_state(rng)
            cached[0].put((cached[1], "one pass"), 1)
            state = State(job.st, job.buffers)
            return _checked(job, shared, None, _vectorized(job, None, state)), None
        with counting_allocations() as counter:
            out = _checked(job, shared, None, _vectorized(job, None, state))
        measure[0].put(measure[1], max(1, counter.bytes // job.n))
        return out, None
    except (Passthrough, StopRecomputation):
        state.restore()
        raise
    except Exception as err:
        state.restore()
        if rng is not None:
            _set_rng_state(rng)
        _check_arguments(job, shared, err)  # no fallback on arguments written
        message = (
            f"{opts.where}: vmap cannot run {type(job.module).__name__} ({_cause(err)})"
            f"{_torch_layers.hint(job.st, job.module, err, opts.randomness)}"
        )
        if any(isinstance(a, PackedSequence) for a in job.args):  # torch's vmap fails on it
            message += "; a PackedSequence is not vectorized: pad the sequences instead"
        if not opts.fallback:
            raise RuntimeError(message) from err
    except BaseException:  # an interrupt, say: the buffers as found, as in the loop
        state.restore()
        raise

    # A broken `fn` raises its own error here, rather than a warning about vmap.
    return _loop(job, state), message


def _shared_versions(job: _Job) -> list[tuple[int | str, Tensor, int]]:
    r"""The version counters of the tensors that every sample shares and `fn` must not
    write in place (see :func:`_check_arguments`): those among its arguments (`in_dims`
    None, by position) and those it closes over (by name), but the module's own."""

    if is_compiling() or job.n == 1:  # (one sample writes once, as the loop's)
        return []
    own: frozenset[int] = job.st.own
    versions: list[tuple[int | str, Tensor, int]] = []
    for i, (a, d) in enumerate(zip(job.args, job.dims, strict=True)):
        if d is None:
            for t in (a,) if isinstance(a, Tensor) else tree_leaves(a):
                if isinstance(t, Tensor):
                    _watch(versions, own, i, t)
    fn = job.opts.fn
    for name, t in closure(getattr(fn, "_bayesflow_fn", fn)):  # a local call's: the caller's
        if isinstance(t, Tensor):
            _watch(versions, own, name, t)
    return versions


def _watch(versions: list, own: frozenset[int], what: int | str, t: Tensor) -> None:
    if is_wrapped(t):  # under an outer transform's wrappers: the tensor it writes
        t = unwrap_batched(t)
    # (The module's own tensors follow the buffers' rule; an inference tensor has no
    # version counter.)
    base = t._base
    if id(t) not in own and (base is None or id(base) not in own) and not t.is_inference():
        versions.append((what, t, t._version))


def _check_arguments(
    job: _Job, versions: list[tuple[int | str, Tensor, int]], err: BaseException | None = None
) -> None:
    r"""Raises if a vectorized pass wrote a tensor every sample shares in place: the loop's
    samples each see the writes of those before them (the oracle, `loop_call`), one pass
    writes once (or once per chunk), and a fallback to the loop would start from that
    write."""

    moved = [what for what, t, version in versions if t._version != version]
    if moved:
        shift = getattr(job.opts.fn, "_bayesflow_leading", 0)  # a local call's noise first
        written = dict.fromkeys(
            f"argument {what - shift}"
            if isinstance(what, int)
            else f"the tensor {what!r} that fn closes over"
            for what in moved
        )
        raise ArgumentWritten(
            f"{job.opts.where}: expected fn to leave the tensors that every sample shares as "
            f"they are, got {', '.join(written)} written in place (or a tensor that shares "
            "its memory, a view of it; it now holds the vectorized pass's writes): in the "
            "loop each sample would see the writes of the samples before it (an in-place "
            "activation on it, nn.ReLU(inplace=True), writes it too, even where that changes "
            "nothing). Copy it inside fn before writing (x = x.clone()), pass it per sample "
            "(in_dims), or run the loop (bayesflow.loop_call; vectorized=False for "
            "local_call and the objectives)"
        ) from err


def _checked(
    job: _Job, versions: list[tuple[int | str, Tensor, int]], chunk_size: int | None, out: Any
) -> Any:
    if chunk_size != 1:  # (one at a time, each chunk's writes are the loop's)
        _check_arguments(job, versions)
    return out


def _records_gradients(job: _Job) -> bool:
    r"""Whether a call (in grad mode) may record gradients: a sample, a per-sample buffer,
    an argument or a parameter of the module it does not sample requires them."""

    if any(t.requires_grad for group in (job.params, job.buffers) for t in group.values()):
        return True
    if any(p.requires_grad for name, p in job.st.params.items() if name not in job.params):
        return True
    return any(isinstance(a, Tensor) and a.requires_grad for a in tree_leaves(job.args))


def _backward_hooked(st: Structure, module: nn.Module) -> str | None:
    r"""Says which backward hooks (module hooks and pre-hooks, global ones too) would run
    in a plain call of `module`; :py:`None` if none."""

    found = [
        repr(path) if path else "the module itself"
        for path, m in st.find(module, nn.Module)
        if m._backward_hooks or m._backward_pre_hooks
    ]
    if found:
        return f"backward hooks (on {', '.join(found)})"
    glob = torch.nn.modules.module
    if getattr(glob, "_global_backward_hooks", None) or getattr(
        glob, "_global_backward_pre_hooks", None
    ):
        return "global module backward hooks (register_module_full_backward_hook)"
    return None


def _cause(err: BaseException) -> str:
    text = str(err).strip()
    # The first public class of bayesflow's own errors (`_ChunkedWrites` is a RuntimeError).
    kind = next(c.__name__ for c in type(err).__mro__ if not c.__name__.startswith("_"))
    return f"{kind}: {text.splitlines()[0] if text else ''}"


def _index(args: tuple, dims: tuple, i: int) -> tuple:
    return tuple(a if d is None else a[i] for a, d in zip(args, dims, strict=True))


def _copies(args: tuple, dims: tuple) -> tuple:
    r"""The arguments of the first sample, their tensors copied: for a pass of `fn` that
    only looks (a shape-finding pass), which must not write the caller's tensors."""

    return tree_map(lambda a: a.clone() if isinstance(a, Tensor) else a, _index(args, dims, 0))


def _rng_state() -> tuple[Tensor, list[Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.random.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    # One draw for all samples, in the loop as under vmap(randomness="same").
    torch.random.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


# What a failed call puts back: each generator it draws from, with the state it found.
DrawState = list[tuple[torch.Generator, Tensor]]


def draw_state(generator: torch.Generator | None, default: bool = False) -> DrawState:
    r"""Returns the state of the generator a call draws from: `generator`; if :py:`None`,
    nothing, unless `default`: then torch's default CPU generator. Under
    :func:`torch.compile` tracing, nothing (a state read would break the graph).

    A call that draws and then fails (a check of `fn`'s output, or `fn` itself) puts it
    back with :func:`restore_draw_state`: a failed call draws nothing. A CPU generator's
    state is a 5 KB copy, about 2 us. torch's default generators are the process's: other
    threads may draw from them meanwhile (torch.compile's own workers are threads), and
    putting them back would replay those draws; only :func:`bayesflow.ensemble`, whose
    seeds are drawn on the CPU before any other work, asks for it.
    """

    if is_compiling():
        return []
    if generator is not None:
        return [(generator, generator.get_state())]
    if not default:
        return []
    return [(torch.default_generator, torch.default_generator.get_state())]


def restore_draw_state(saved: DrawState) -> None:
    r"""Puts back what :func:`draw_state` found."""

    for g, state in saved:
        g.set_state(state)


def _split(t: Tensor) -> Tensor | tuple[Tensor, ...]:
    r"""Returns what the loop indexes for sample `i`: for a tensor that records gradients,
    its K slices, split at once (one backward node that stacks the K gradients, where K
    indexings `t[i]` each fill a zero tensor of the whole stack's size), else `t` itself."""

    if t.requires_grad and torch.is_grad_enabled():
        return t.unbind(0)
    return t


def _loop(job: _Job, state: State | None = None) -> Any:
    if job.zuko and is_compiling():
        return _eager(_loop_now)(job, state)
    return _loop_now(job, state)


def _single(job: _Job) -> Any:
    if job.zuko and is_compiling():
        return _eager(_single_now)(job)
    return _single_now(job)


def _loop_now(job: _Job, state: State | None = None) -> Any:
    st, opts = job.st, job.opts
    state = State(st, job.buffers) if state is None else state
    rng = _rng_state() if opts.randomness == "same" else None
    outs = []
    # A weight the module writes in place keeps its per-sample slice (a slice of `unbind`
    # may not be written in place).
    written = st.written
    params = {k: v if k in written else _split(v) for k, v in job.params.items()}
    args = [(a, _split(a) if d == 0 else None) for a, d in zip(job.args, job.dims, strict=True)]
    # An argument expanded over the samples (stride 0) has one memory for all: each sample
    # gets a copy of its own to write (it read the writes of the samples before it).
    expanded = [u is not None and a.shape[0] > 1 and a.stride(0) == 0 for a, u in args]
    try:
        for i in range(job.n):
            if rng is not None:
                _set_rng_state(rng)
            given = {k: b[i] for k, b in job.buffers.items()}
            buffers = {**state.fresh(), **given}
            # zuko's pieces that recompute in their backward pass would run it with the
            # module's own parameters, put back by then: the stand-ins, plain autograd.
            # A written weight gets a copy per sample: views of one copy share a version
            # counter, and a sample's write would break the graphs of the samples before.
            sample = {k: v[i].clone() if k in written else v[i] for k, v in params.items()}
            with (
                swapped(st, sample, buffers, job.module),
                _stand_ins(job.zuko),
                _outer_layers(st, job.module, sample.keys()),
            ):
                out = opts.fn(
                    job.module,
                    *(
                        a if u is None else u[i].clone() if e else u[i]
                        for (a, u), e in zip(args, expanded, strict=True)
                    ),
                )
                held = state.current()
                assigned = state.given_held(given)
            state.write_given(opts.where, given, assigned)
            if written:  # the sample's own copy, as the module wrote it (see _hand_back)
                with torch.no_grad():
                    for k in written.intersection(sample):
                        params[k][i].copy_(sample[k])
            map_outputs(opts.where, lambda t: None, out)
            outs.append(out)
            state.collect(held)
        # Before the buffers are written: outputs that disagree leave them as found.
        stacked = stack(opts.where, outs)
    except BaseException:
        state.restore()
        raise
    state.finish()

    return stacked


# A context that does nothing (reusable).
_NOTHING = nullcontext()


def _stand_ins(zuko: bool) -> Any:
    return vmap_safe() if zuko else _NOTHING


def _outer_layers(st: Structure, module: nn.Module, sampled: Any) -> Any:
    r"""Under an outer transform (vmap over examples), the layers of the vectorized path for
    a pass of one sample: torch's fused kernels of the recurrent layers have no batching
    rule."""

    layers = in_func_transform() and _torch_layers.changes(st, module, sampled)
    return patched(layers) if layers else _NOTHING


def _single_now(job: _Job) -> Any:
    st, module = job.st, job.module
    # (Always: a buffer registered as None, or by fn, may be filled.)
    state = State(st, job.buffers)
    try:
        buffers = {k: b[0] for k, b in job.buffers.items()}
        # `squeeze`, a view, rather than `v[0]`, whose backward fills a zero gradient.
        params = {k: v.squeeze(0) for k, v in job.params.items()}
        with (
            swapped(st, params, buffers, module),
            _stand_ins(job.zuko),
            _outer_layers(st, module, params.keys()),
        ):
            out = job.opts.fn(module, *_index(job.args, job.dims, 0))
            assigned = state.given_held(buffers)
        if assigned:
            state.write_given(job.opts.where, buffers, assigned)
        # `self.ema = 0.9 * self.ema + ...`: the loop's rule, not the sample's graph; not
        # inside a torch.func transform, which cannot write a captured tensor (its caller,
        # Laplace's per-example pass, puts the buffers back itself).
        moved = state.reassigned() if not in_func_transform() else None
        if moved:
            state.write_assigned(moved)
        if is_compiling():  # (a compiled graph's outputs follow its own aliasing rules)
            return map_outputs(job.opts.where, lambda t: t.unsqueeze(0), out)
        # Copies, as the loop's stacked outputs: an output may be a tensor held elsewhere
        # (an argument, a buffer, a tensor fn closes over, another output), which a write to
        # the output would change.
        return map_outputs(job.opts.where, lambda t: t.unsqueeze(0).clone(), out)
    except BaseException:
        state.restore()
        raise


# Under torch.compile, a zuko flow's loop and single call run eagerly (a graph break):
# zuko's pieces that recompute in their backward need the stand-ins, which are only
# installed outside tracing (traced, the backward ran with the module's own parameters:
# silently wrong gradients). Made on first use: `torch.compiler.disable` imports dynamo,
# which would cost every `import bayesflow` more than a second.
_EAGER: dict[Callable[..., Any], Callable[..., Any]] = {}


def _eager(f: Callable[..., Any]) -> Callable[..., Any]:
    eager = _EAGER.get(f)
    if eager is None:
        eager = _EAGER[f] = torch.compiler.disable(f)
    return eager


def _same_bits(a: Tensor, b: Tensor) -> bool:
    r"""Whether `a` and `b` (one shape and dtype) hold the same bits: NaN where NaN is,
    -0.0 where -0.0 is (`torch.equal` says no to any NaN, yes to 0.0 for -0.0)."""

    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(a.element_size())
    if a.is_floating_point() and ints is not None:
        return torch.equal(a.view(ints), b.view(ints))
    return torch.equal(a, b)


class _ChunkedWrites(RuntimeError):
    r"""`fn` wrote a buffer in place in a pass in chunks: once per chunk."""


def _vectorized(job: _Job, chunk_size: int | None, state: State) -> Any:
    st, module, params, n, opts = job.st, job.module, job.params, job.n, job.opts
    updated = [k for k in _torch_layers.updated_buffers(st, module) if k not in job.buffers]
    averaged = {
        name: st.buffers[name].detach().unsqueeze(0).repeat(n, *(1,) * st.buffers[name].dim())
        for name in updated
    }
    # Per-sample buffers in memory of their own order: torch's batching rule of batch norm
    # writes the statistics of non-contiguous ones into a copy it drops. Written back below.
    copies = {k: b.contiguous() for k, b in job.buffers.items() if not b.is_contiguous()}
    buffers = {**averaged, **job.buffers, **copies}
    names, buffer_names, given = list(params), list(buffers), list(job.buffers)
    flat = (*params.values(), *buffers.values(), *job.args)
    split, end = len(names), len(names) + len(buffer_names)
    spec: list[Any] = []
    fn, where = opts.fn, opts.where

    def single(*inputs: Any) -> tuple[Tensor, ...]:
        # Flat inputs: vmap's pytree handling of nested dicts costs more than the swap.
        p = dict(zip(names, inputs[:split], strict=True))
        b = dict(zip(buffer_names, inputs[split:end], strict=True))
        with swapped(st, p, b, module):
            out = fn(module, *inputs[end:])
            if given and state.given_held({k: b[k] for k in given}):
                # vmap's wrappers cannot be written back: the loop, which writes them
                raise RuntimeError(
                    "fn assigns new tensors to buffers given per sample (as `self.ema = "
                    "0.9 * self.ema + ...` does), which vmap cannot batch"
                )
        if spec:  # a later chunk: the first's structure, its dicts' keys in its order
            return flatten_like(where, out, spec[0])
        leaves, s = flatten(where, out)
        spec.append(s)
        return leaves

    # In chunks, a buffer that fn writes in place with a value shared by the samples (a
    # step counter, a running mean of the input) would be written once per chunk, and the
    # later chunks would read the earlier ones' writes: such a call runs in the loop.
    # (Buffers updated per sample, above, are stacked copies; one pass writes them once.)
    watched = None
    if chunk_size is not None and chunk_size < n and is_compiling():
        # No version counter can be read while tracing: where a module that holds buffers
        # of its own is in training mode, where modules write them (a step counter), all
        # samples run in one pass, which writes them once.
        owners = (
            module.get_submodule(k.rpartition(".")[0]) for k in st.buffers if k not in buffers
        )
        if any(owner.training for owner in owners):
            chunk_size = None
    elif chunk_size is not None and chunk_size < n:
        watched = [
            (name, t, t._version)
            for name, t in st.buffers.items()
            if name not in buffers and not t.is_inference()
        ]

    with (
        vmap_safe(job.zuko),
        patched(_torch_layers.changes(st, module, params.keys())),
        autocast_rules(),
    ):
        leaves = vmap(
            single,
            in_dims=(*(0,) * end, *job.dims),
            chunk_size=chunk_size,
            randomness=opts.randomness or "error",
            size=n,
        )(*flat)

    written = [name for name, t, version in watched or () if t._version != version]
    if watched is not None and not written:
        # By value too: a write through `.data`, or by a kernel (batch norm's on buffers of
        # a layer of the user's), bumps no version counter.
        written = state.written(buffers)
    if written:
        raise _ChunkedWrites(
            f"fn writes the buffers {written} in place, which a pass in chunks of "
            f"{chunk_size} samples would write once per chunk (chunk_size={n} or more runs "
            "all samples in one pass)"
        )
    reassigned = state.reassigned()
    if reassigned:
        # vmap's wrappers would escape into the module: the loop, which keeps the rule
        raise RuntimeError(
            f"fn assigns new tensors to the buffers {reassigned} (as `self.ema = 0.9 * "
            "self.ema + ...` does, or fills a buffer registered as None, or registers one), "
            "which vmap cannot batch; update them in place, or register them with a tensor"
        )
    for name, stacked in averaged.items():
        state.set_averaged(name, stacked)
    with torch.no_grad():
        for name, written_copy in copies.items():
            given_buffer = job.buffers[name]
            if not _same_bits(given_buffer, written_copy):  # (a write bumps its version)
                given_buffer.copy_(written_copy)

    if is_compiling():
        return unflatten(spec[0], leaves)
    if n == 1:  # copies, as every output of a one-sample call (see _single_now)
        return unflatten(spec[0], [t.clone() for t in leaves])
    ids, own = _inputs(job), st.own
    return unflatten(spec[0], _distinct([_unshared(t, ids, own) for t in leaves]))


def _distinct(leaves: list[Tensor]) -> list[Tensor]:
    r"""Returns `leaves` with a copy of each that shares memory with one before it (fn
    returned `(y, y)`, `(y, y.T)` or `(y, y.detach())`): the loop's outputs are stacked
    copies of their own, and a write to one output changes no other."""

    if len(leaves) < 2:
        return leaves
    seen: set[object] = set()
    out = []
    for t in leaves:
        where = _memory(t)
        if where in seen:
            t = t.clone()
        else:
            seen.add(where)
        out.append(t)
    return out


def _memory(t: Tensor) -> object:
    r"""What identifies the memory of `t`: its storage's address, where it has one and it
    is not empty; else its root tensor."""

    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # nested, sparse, ...
        ptr = 0
    return ptr if ptr else id(t if t._base is None else t._base)


def _inputs(job: _Job) -> set[int]:
    r"""The ids of the tensors that a call's outputs must not share memory with, besides
    the module's own (`Structure.own`): its arguments (in tuples, lists and dicts too),
    samples and buffers."""

    args = job.args
    if not all(isinstance(a, Tensor) for a in args):  # (pytree's walk costs microseconds)
        args = [a for a in tree_leaves(args) if isinstance(a, Tensor)]
    ids = set()
    for group in (args, job.params.values(), job.buffers.values()):
        for t in group:
            ids.add(id(t))
            base = t._base
            if base is not None:  # a view (a slice of a data set): its root too
                ids.add(id(base))
    return ids


def _unshared(t: Tensor, ids: set[int], own: frozenset[int]) -> Tensor:
    r"""Returns `t`, vmap's output, or a copy of it where it shares memory with a tensor of
    `ids` or `own` or repeats one value over the samples (vmap expands an output that does
    not depend on them): as the loop's stacked copies, a write to one sample's output
    changes nothing else."""

    key, base = id(t), t._base
    root = None if base is None else id(base)
    if (
        key in ids
        or key in own
        or (root is not None and (root in ids or root in own))
        or (t.dim() > 0 and t.shape[0] > 1 and t.stride(0) == 0)
    ):
        return t.clone()
    return t


def vmap(
    func: Callable, *, in_dims: tuple, chunk_size: int | None, randomness: str, size: int
) -> Callable:
    r"""Returns :func:`torch.func.vmap` of `func` over `size` samples in chunks of
    `chunk_size`; a chunk that holds every sample is no chunk (torch would split the
    inputs and copy the one chunk's outputs into a concatenation: 0.06-0.15 ms on a small
    MLP). The same numbers and the same draws either way."""

    if chunk_size is not None and chunk_size >= size:
        chunk_size = None
    return torch_vmap(func, in_dims=in_dims, chunk_size=chunk_size, randomness=randomness)


def _signature(args: tuple, dims: tuple) -> tuple:
    r"""What a call's arguments are, as far as the memory and the layer calls of `fn`
    depend on them: the shapes of one sample's tensors, and the shared arguments as
    :func:`value_key` keys them (a 0-dim integer tensor, which may be a count, by value;
    other tensors by shape; numbers and strings by value; anything else by identity)."""

    return tuple(
        (tuple(a.shape[1:]), a.dtype, a.device)
        if d == 0 and isinstance(a, Tensor)
        else value_key(a)
        for a, d in zip(args, dims, strict=True)
    )


# Bytes per sample of a call (chunk_size="auto"), per module and call signature.
_FOOTPRINTS: PerObject[Bounded[tuple, int]] = PerObject()


def _fits_the_cache(job: _Job) -> bool:
    r"""Whether the default chunk is the one that fits the CPU's cache: on the CPU, outside
    compilation, for torch modules (zuko's flows run their own stand-ins)."""

    return (
        not is_compiling()
        and not job.zuko
        and not in_func_transform()  # (a loop under an outer vmap gains nothing)
        and _device(job).type == "cpu"
    )


def _footprints(job: _Job) -> tuple[Bounded, tuple]:
    r"""Returns the footprints measured for the module of `job`, and the key of its call:
    `fn` code, the samples' names, shapes and dtypes, the module's mode and the argument
    shapes (a layer replaced by a larger one, or train mode's buffers, change it)."""

    footprints = _FOOTPRINTS.setdefault(job.module, lambda: Bounded(16, cache=False))
    fn = job.opts.fn
    # A local call's wrapper is new at every call: the key of what it runs instead.
    what = getattr(fn, "_bayesflow_key", None) or fn_key(fn)
    # The samples' names, shapes (n too: one measure per sample count) and dtypes.
    samples = tuple([(v.shape, v.dtype) for v in job.params.values()])
    key = (what, tuple(job.params), samples, job.module.training, _signature(job.args, job.dims))
    return footprints, key


def _footprint(job: _Job) -> int:
    r"""Returns the bytes one sample's call allocates, measured before the call by one
    unbatched pass without gradients (a pass that records nothing: a checkpoint around the
    call recomputes what the first pass saved, and no more), the global random state left
    as it was; remembered."""

    st, module, params, args, dims, _, opts, _, _ = job
    footprints, key = _footprints(job)
    per_sample = footprints.get(key)
    if per_sample is None:

        def one(inputs: tuple) -> None:
            buffers = {k: b[0] for k, b in job.buffers.items()}
            with (
                swapped(st, {k: v[0] for k, v in params.items()}, buffers, module),
                _outer_layers(st, module, params.keys()),
            ):
                opts.fn(module, *inputs)

        state = State(st, job.buffers)
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        try:
            with torch.random.fork_rng(devices=devices):
                try:
                    with torch.no_grad():
                        per_sample = per_sample_bytes(functools.partial(one, _copies(args, dims)))
                except Exception:
                    if not torch.is_grad_enabled():
                        raise
                    # An fn that differentiates inside (torch.autograd.grad): in the
                    # caller's grad mode, the graph's memory counted too (an upper bound).
                    state.restore()
                    per_sample = per_sample_bytes(functools.partial(one, _copies(args, dims)))
        finally:
            state.restore()
        footprints.put(key, per_sample)
    return per_sample


def _device(job: _Job) -> torch.device:
    like = next(iter(job.params.values()), None)
    if like is None:
        like = next((a for a in job.args if isinstance(a, Tensor)), None)
    return torch.device("cpu") if like is None else like.device


# The layer calls of `fn` that a local call draws noise for, per module and signature.
_RECORDINGS: PerObject[Bounded[tuple, Any]] = PerObject()


def run_local(
    module: nn.Module,
    posterior: Posterior,
    n: int,
    args: tuple,
    opts: CallOptions,
    plan: LocalPlan,
    generator: torch.Generator | None,
) -> Any:
    r"""Runs `opts.fn(module, *args)` for `n` samples with the layers of `plan` sampled
    locally, their noise drawn up front from `generator` and laid out by the layer calls
    of one shape-finding pass."""

    where = opts.where
    with lock(module):
        st = structure(module, where)
        check_no_parametrization_cache(where, module, st)  # before any draw
        dims = check_in_dims(where, args, opts.in_dims, n)
        # A call that fails after the draws (`fn`'s output refused, say) draws nothing.
        zuko = st.uses_zuko or fn_runs_zuko(opts.fn)
        saved = draw_state(generator)
        try:
            # Layers whose own tensors a call read outside their call, unseen by the
            # shape-finding pass (a read under grad mode, on a branch of the noise): whole.
            forced: frozenset[str] = frozenset()
            retried = False
            for attempt in range(2 * len(plan.layers) + 2):
                # torch.compile traces this once per guard, with no stand-ins: a layout
                # recorded before a retrace (a module flag switched) could be stale.
                fresh = attempt > 0 or is_compiling()
                layout, recorded = _layout(st, module, plan, args, dims, opts, fresh, forced)
                like = next(iter(posterior.mean.values()))
                # All the noise up front: one slab for the layers, then the whole samples;
                # in the widest dtype of the posterior (a float64 layer behind a float16
                # one took float16 noise), which each layer takes in its own.
                dtypes = {t.dtype for t in posterior.mean.values()}
                dtype = functools.reduce(torch.promote_types, dtypes)
                slab = torch.randn(
                    n, layout.size, **generating(generator), dtype=dtype, device=like.device
                )
                whole = plan.sampled(posterior, layout)
                params = _posterior.sample(where, whole, n, generator) if whole.mean else {}
                # A layout remembered for this key: recorded for another fn of the same
                # key, maybe (one code run by `exec` with other globals), which called more
                # layers; a pass that leaves its draws unused records again. (One just
                # recorded is this fn's: a sample that skips a layer leaves its draw.)
                tape = Tape(layout, check=not recorded)

                def local_fn(m: nn.Module, s: Tensor, *a: Any, tape: Tape = tape) -> Any:
                    tape.begin(s)
                    try:
                        out = opts.fn(m, *a)
                    finally:
                        tape.slab = None  # a sample's tensor, not to outlive the pass
                    tape.done()
                    return out

                local_fn._bayesflow_key = ("local", fn_key(opts.fn), plan.key, forced)  # type: ignore[attr-defined]
                local_fn._bayesflow_leading = 1  # type: ignore[attr-defined]
                local_fn._bayesflow_fn = opts.fn  # type: ignore[attr-defined]
                local = opts._replace(fn=local_fn)
                forwards = plan.forwards(tape, layout.local)
                if not recorded:  # its layers sampled whole for a second call: counted
                    forwards += plan.counters(tape, layout.counted)
                job = _Job(st, module, params, (slab, *args), (0, *dims), n, local, {}, zuko)
                # The module's own values of the local layers' tensors are never the
                # call's: a read of one outside its layer raises ReadElsewhere.
                stand_ins = plan.absent(layout)
                try:
                    with swapped(st, stand_ins):
                        out, message = _call(job, forwards)
                    break
                except ReadElsewhere as err:
                    owner, stand_in = err.args
                    if not any(stand_in is a for a in stand_ins.values()):
                        raise  # a stand-in of an enclosing local call
                    if owner in forced:
                        raise RuntimeError(
                            f"{where}: expected the tensors of layer {owner!r} to be read "
                            "through the layer alone once it is sampled whole, got another "
                            "read of them"
                        ) from None
                    forced |= {owner}
                except StaleShapes as err:
                    name = err.args[0] if err.args else None
                    if not retried:
                        retried = True  # a fresh layout first (a module flag switched)
                    elif name in plan.layers and name not in forced:
                        # Called otherwise than the pass without gradients saw (a second
                        # call under grad mode, rows picked by the data): sampled whole.
                        forced |= {name}
                    else:
                        raise RuntimeError(
                            f"{where}: expected the layers to be called with the same "
                            "shapes as in the shape-finding pass, got others twice"
                            + (f" for layer {name!r}" if name else "")
                            + "; bayesflow.vmap_call samples every layer whole"
                        ) from None
                finally:
                    expire(stand_ins)
                # The retry draws what a call with a fresh layout draws.
                restore_draw_state(saved)
        except BaseException:
            restore_draw_state(saved)
            raise
    _warn(message, n)
    return out


def _layout(
    st: Structure,
    module: nn.Module,
    plan: LocalPlan,
    args: tuple,
    dims: tuple,
    opts: CallOptions,
    fresh: bool,
    forced: frozenset[str] = frozenset(),
) -> tuple[Any, bool]:
    r"""Returns the layer calls of `opts.fn` as a local call sees them, recorded by one
    unbatched pass without gradients (buffers restored), or remembered; and whether they
    were recorded now."""

    recordings = _RECORDINGS.setdefault(module, lambda: Bounded(8, cache=False))
    key = (fn_key(opts.fn), plan.key, module.training, _signature(args, dims))
    layout = None if fresh else recordings.get(key)
    if layout is not None:
        return layout, False
    recorder = Recorder(plan.watched)
    state = State(st)
    # Its random numbers are not the call's: the same seed gives the same call, whether
    # the layout was recorded before or not.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    # Without autocast: shapes do not depend on it, and the stand-ins that refuse it
    # (a fallback to the loop in the vectorized pass) would fail the plain pass.
    with autocast_off():
        # The layers as the vectorized pass sees them (without gradients, torch's fused
        # attention would skip the layers that the reference path calls).
        changes = _changes(st, module, plan.forwards(recorder, plan.layers))
        changes += _torch_layers.changes(st, module)
        try:
            with (
                torch.random.fork_rng(devices=devices),
                torch.no_grad(),
                patched(changes),
                recorder.reads(),
            ):
                opts.fn(module, *_copies(args, dims))
        finally:
            state.restore()
    layout = recordings.put(key, plan.layout(opts.where, module, recorder, forced))
    return layout, True
