r"""Many sampled models in one call: vectorized with :func:`torch.func.vmap`, or looped."""

from __future__ import annotations

__all__ = ["VmapFallbackWarning", "loop_call", "vmap_call"]

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn as nn

from torch import Tensor

from ._checks import check_module
from ._engine import VmapFallbackWarning, run
from ._options import call_options
from ._types import Fn

VmapFallbackWarning.__module__ = "bayesflow"


def loop_call(
    module: nn.Module,
    params: Mapping[str, Tensor],
    *args: Any,
    fn: Fn | None = None,
    in_dims: Sequence[int | None] | None = None,
    buffers: Mapping[str, Tensor] | None = None,
) -> Any:
    r"""Runs `fn(module, *args)` once per parameter set, in a Python loop.

    The oracle for :func:`vmap_call`: same contract, same numbers, no vectorization.
    Buffers follow the same rule as in :func:`vmap_call`.

    Arguments:
        module: A module.
        params: Sampled parameters `{name: (n, *shape)}`, e.g. from :func:`bayesflow.sample`.
            Parameters absent from `params` keep their own value, shared by every sample.
        args: The arguments of `fn`, shared by every sample unless `in_dims` says otherwise.
        fn: What to compute, `fn(module, *args)`; `module(*args)` if :py:`None`.
        in_dims: One entry per argument: :py:`None` if shared, `0` if per-sample (with a
            leading dim `n`).
        buffers: Per-sample buffers `{name: (n, *shape)}`, as in :func:`vmap_call`.

    Returns:
        The outputs of `fn` (tensors, :py:`None`, or tuples, lists or dicts of them)
        stacked on a new leading dim of size `n`.
    """

    where = "loop_call"
    check_module(where, module)
    opts = call_options(where, fn, in_dims=in_dims, vectorized=False)
    return run(module, params, args, opts, buffers=buffers)


def vmap_call(
    module: nn.Module,
    params: Mapping[str, Tensor],
    *args: Any,
    fn: Fn | None = None,
    chunk_size: int | None = None,
    fallback: bool = True,
    in_dims: Sequence[int | None] | None = None,
    randomness: str | None = None,
    max_memory: int | None = None,
    buffers: Mapping[str, Tensor] | None = None,
) -> Any:
    r"""Runs `fn(module, *args)` for every parameter set in one vectorized pass.

    The whole of `fn` runs with the sampled parameters swapped in, so lazy modules such as
    zuko flows, whose `flow(c)` returns a distribution evaluated later, see them too.
    Tied weights and shared submodules get the sample in every place that holds them, and
    after the call the module holds its very own Parameters again, unchanged.

    Buffers are never sampled. A call over `n` samples updates them once: every sample
    starts from the state the call found, and a floating-point buffer that the samples
    update (e.g. the running statistics of a train-mode BatchNorm, where each sample
    normalizes with its own batch statistics) ends at the average of their updates;
    an integer one (`num_batches_tracked`) advances as for one sample.

    Inside the vectorized pass a sampled parameter reads `requires_grad` as :py:`False`
    (torch.func's batched tensors do): code in `fn` that branches on it takes the other
    branch than the loop for `n >= 2` (torch's attention layers, whose fast path does, are
    run on their reference path here).

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
            return tensors, :py:`None`, or tuples, lists or dicts of them.
        chunk_size: The number of samples per vectorized chunk. If :py:`None`: all at
            once on a GPU; on the CPU, as many as fit its last-level cache (all, unless K
            samples of a large call overflow it, as a convolutional net at a large batch
            does: chunks that fit then run faster), and one by one, as
            :func:`loop_call` does, where one sample's call overflows a core's (level 2)
            cache: such a sample gains nothing from running with others. With `"auto"`,
            as many as fit in `max_memory`. Both measure the memory one sample's call
            allocates (by counting the bytes of every tensor its operations return: an
            upper bound), once per module and mode, sample shapes, `fn` code and argument
            shapes (tensors that `fn` closes over count by their shapes, numbers by their
            values; after changing the values of a tensor that sets the amount of work,
            other than a 0-dim integer one, call :func:`bayesflow.clear_caches`): the default
            during its first call, which runs all samples at once, `"auto"` by one more
            pass of one sample before it (without gradients, or with them where `fn` needs
            them; torch's generators are restored after it, but a generator that `fn`
            holds itself is not: it draws once more). Chunking changes no number
            (unless `fn` draws random numbers itself, with `randomness="different"`); one
            by one gives the loop's numbers, equal to rounding. With `randomness`
            `"different"` or `"same"`, :py:`None` runs all samples at once in every call
            (random draws depend on the chunks: the same seed gives the same numbers in
            every call). An int or `"auto"` always vectorizes.
        fallback: What to do where vmap cannot run `fn`: if :py:`True`, warn with
            :class:`VmapFallbackWarning` and run :func:`loop_call` from the state the call
            found; else raise.
        in_dims: One entry per argument: :py:`None` if shared, `0` if per-sample (with a
            leading dim `n`).
        randomness: What random operations inside `fn` (dropout in training mode, say)
            do, as in :func:`torch.func.vmap`: `"error"` refuses them (checked by vmap
            at every `n`, one sample included), `"different"` draws
            independently for every sample, `"same"` draws once for all samples. If
            :py:`None`, they are refused by vmap and the call falls back to the loop
            (where every sample draws its own). With `n = 1`, every value but `"error"`
            runs one plain call, whose random operations draw as the loop's. A call that
            vmap cannot run leaves torch's generators as it found them, for the loop
            (`fallback=True`) or the caller (`fallback=False`); an `fn` that raises in the
            loop leaves what it drew drawn, as :func:`loop_call` does.
        max_memory: The memory budget of `chunk_size="auto"`, in bytes; by default half
            the device's free memory (on the CPU, half the available physical memory).
            Refused with any other `chunk_size`, which it would not change.
        buffers: Per-sample buffers `{name: (n, *shape)}`, keyed by
            :meth:`torch.nn.Module.named_buffers` names, that stand in for the module's own
            (a deep ensemble's, see :func:`bayesflow.ensemble`): each sample uses its own,
            and a train-mode layer updates its own in place; what `fn` assigns to one
            anew (`self.ema = 0.9 * self.ema + ...`) is written into it (by the loop:
            vmap cannot batch such assignments); the module's buffers of those names are
            left alone. `params` may then be empty. Views work (some members' buffers,
            `{k: v[::2] for k, v in ens.buffers.items()}`, are updated in place); buffers
            whose samples share memory (`expand`) are refused.

    Returns:
        The outputs of `fn` stacked on a new leading dim of size `n`, differentiable with
        respect to `params` and `args`; the same numbers as :func:`loop_call` (for zuko's
        CNF, gradients within the ODE solver's accuracy: see the flows documentation).
        Where `fn` returns an input itself (a sampled parameter, an argument or a tensor
        in one, a buffer, the module's own tensors) or a view of one, a tensor that
        does not depend on the sample (which :func:`torch.func.vmap` returns expanded),
        or a tensor that shares memory with another of its outputs (`(y, y)`, `(y,
        y.T)`), it is copied, as the loop's stack copies; with `n = 1` every output is a
        copy. A tensor that shares an input's memory
        otherwise (`x.detach()`, `x.data`) is not recognized: clone it in `fn` before
        changing the output in place. Inside `torch.compile`, the compiled graph's own
        aliasing rules apply.

    Raises:
        RuntimeError: If vmap cannot run `fn` and `fallback` is :py:`False`.
        ValueError: If `fn`, with `n >= 2` samples vectorized in chunks of more than one,
            writes in place a tensor that every sample shares: an argument (`x.add_(1)`,
            an in-place activation on it, even one that changes nothing) or a tensor it
            closes over (an argument per sample, `in_dims=0`, may be written: each sample
            writes its own; one expanded over the samples, stride 0, has one memory for
            all: each sample then writes a copy of its own, which the argument does not
            keep; the module's own buffers follow the buffers' rule). In the
            loop every sample would see the writes of those before it, which one pass
            cannot give, and no fallback is taken (the tensor holds the pass's writes).
            Writes that bump no version counter are not seen: through `.data`, into a
            tensor made under :func:`torch.inference_mode`, or into one held in another
            object. If `fn` returns outputs of another structure in a later chunk of
            samples than in the first.
    """

    where = "vmap_call"
    check_module(where, module)
    opts = call_options(where, fn, chunk_size, fallback, in_dims, randomness, True, max_memory)
    return run(module, params, args, opts, buffers=buffers)
