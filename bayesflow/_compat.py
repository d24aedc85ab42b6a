r"""The one place where bayesflow touches private or version-dependent torch APIs."""

from __future__ import annotations

__all__ = [
    "AutocastRules",
    "BatchNorm",
    "ConvNd",
    "HookSpectralNorm",
    "HookWeightNorm",
    "InstanceNorm",
    "SpectralNorm",
    "StopRecomputation",
    "ValueReads",
    "WeightNorm",
    "allocated_bytes",
    "autocast_inputs",
    "autocast_off",
    "autocast_rules",
    "batched_at_current_level",
    "closure",
    "counting_allocations",
    "flat_cat",
    "function_apply",
    "fused_rnn",
    "hook_name",
    "in_func_transform",
    "is_compiling",
    "is_metadata",
    "is_wrapped",
    "keep_lazy_cuda_seed",
    "load_jvp_decompositions",
    "no_saved_tensors_hooks",
    "records_gradients",
    "refuse_autocast",
    "saved_tensors_hooks_active",
    "unbatched",
    "unwrap_at",
    "unwrap_batched",
    "vmapped",
    "weight_hooks",
    "wrap_at",
]

import importlib
import sys
import threading
import warnings

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from torch import Tensor
from torch._C import _functorch
from torch.nn.utils import parametrizations
from torch.nn.utils.prune import BasePruningMethod as _Pruning
from torch.nn.utils.spectral_norm import SpectralNorm as _HookSpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as _HookWeightNorm
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

# torch's private base classes of the layers bayesflow handles specially.
BatchNorm = nn.modules.batchnorm._BatchNorm
ConvNd = nn.modules.conv._ConvNd
WeightNorm = parametrizations._WeightNorm
SpectralNorm = parametrizations._SpectralNorm
Orthogonal = parametrizations._Orthogonal
InstanceNorm = nn.modules.instancenorm._InstanceNorm


# Raised by torch.utils.checkpoint to end a recomputation early: never a failure of vmap.
StopRecomputation = torch.utils.checkpoint._StopRecomputationError
HookWeightNorm = _HookWeightNorm
HookSpectralNorm = _HookSpectralNorm


@contextmanager
def keep_lazy_cuda_seed() -> Iterator[None]:
    r"""Puts back the CUDA seed that :func:`torch.manual_seed` queues while CUDA is not
    initialized (applied when it is): :func:`torch.random.fork_rng` restores the states of
    initialized devices only."""

    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)
    fields = ("manual_seed_all_cb", "manual_seed_cb", "call_order")
    if (
        tracker is None
        or torch.cuda.is_initialized()
        or not all(hasattr(tracker, f) for f in fields)
    ):
        yield
        return
    saved = [getattr(tracker, f) for f in fields]
    try:
        yield
    finally:
        if not torch.cuda.is_initialized():
            for f, v in zip(fields, saved, strict=True):
                setattr(tracker, f, v)


def weight_hooks(module: nn.Module) -> list[Any]:
    r"""Returns the forward pre-hooks of the hook-based :func:`torch.nn.utils.weight_norm`
    and :func:`torch.nn.utils.spectral_norm`, and of :mod:`torch.nn.utils.prune`, of
    `module`: each computes a weight (named :func:`hook_name`) and assigns it to the
    module, as a plain attribute, before every forward."""

    return [
        hook
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, (_HookWeightNorm, _HookSpectralNorm, _Pruning))
    ]


def hook_name(hook: Any) -> str:
    r"""The name of the weight a hook of :func:`weight_hooks` assigns."""

    return hook._tensor_name if isinstance(hook, _Pruning) else hook.name


def flat_cat(tensors: list[Tensor]) -> Tensor:
    r"""Returns the tensors flattened and concatenated, in one call (differentiable); under
    a :mod:`torch.func` transform, where that kernel has no batching rule (vmap over a
    batch of posteriors), by :func:`torch.cat`."""

    if torch._C._are_functorch_transforms_active():
        return torch.cat([t.reshape(-1) for t in tensors])
    return torch._C._nn.flatten_dense_tensors(tensors)


def is_compiling() -> bool:
    r"""Whether the code runs under :func:`torch.compile` tracing (dynamo)."""

    return torch.compiler.is_compiling()


def batched_at_current_level(t: Tensor) -> int | None:
    r"""Returns the current vmap level if `t` is batched at it, else :py:`None`."""

    level = _functorch.maybe_current_level()
    if level is None or not _functorch.is_batchedtensor(t):
        return None
    return level if _functorch.maybe_get_level(t) == level else None


def vmapped(t: Tensor) -> bool:
    r"""Whether a vmap batches `t`, at any level: its values cannot be read there (the
    plain tensor under the wrappers has the batch dims)."""

    return in_func_transform() and unwrap_batched(t).dim() > t.dim()


def is_wrapped(t: Tensor) -> bool:
    r"""Whether `t` is wrapped by any :mod:`torch.func` transform (vmap, grad, jvp)."""

    return _functorch.is_functorch_wrapped_tensor(t)


def fused_rnn(mode: str) -> Callable[..., tuple[Tensor, Any]]:
    r"""Returns torch's fused kernel of a recurrent layer's `mode` (`nn.RNNBase.mode`): the
    function `nn.LSTM`, `nn.GRU` and `nn.RNN` call with their flat weights."""

    return {
        "LSTM": torch._VF.lstm,
        "GRU": torch._VF.gru,
        "RNN_TANH": torch._VF.rnn_tanh,
        "RNN_RELU": torch._VF.rnn_relu,
    }[mode]


def unwrap_at(t: Tensor, level: int) -> tuple[Tensor, int | None]:
    r"""Returns the tensor under the vmap wrapper of `level` and its batch dim (or
    :py:`None` if `t` is not batched at that level)."""

    return _functorch._unwrap_batched(t, level)


def wrap_at(t: Tensor, dim: int, level: int) -> Tensor:
    r"""Returns `t` batched along `dim` at the vmap level `level`."""

    return _functorch._add_batch_dim(t, dim, level)


_BATCHED = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchBatched)


@contextmanager
def unbatched() -> Iterator[None]:
    r"""Runs the operations of a block below the current vmap level, as torch runs a
    batching rule: the level is popped off functorch's stack (its operations then skip
    functorch's dispatch altogether) and batching is excluded."""

    saved = _functorch.pop_dynamic_layer_stack()
    try:
        with torch._C._ExcludeDispatchKeyGuard(_BATCHED):
            yield
    finally:
        _functorch.push_dynamic_layer_stack(saved)


@contextmanager
def outside_func_transforms(level: int | None = None) -> Iterator[None]:
    r"""Runs a block as if no :mod:`torch.func` transform above `level` were active (none
    at all if :py:`None`): those levels are popped off functorch's stack for its duration,
    and pushed back after."""

    saved = []
    try:
        while True:
            top = _functorch.peek_interpreter_stack()
            if top is None or (level is not None and top.level() <= level):
                break
            saved.append(_functorch.pop_dynamic_layer_stack())
        yield
    finally:
        while saved:
            _functorch.push_dynamic_layer_stack(saved.pop())


# Per thread: the level (or None) below the transforms a stand-in of zuko's opened, whose
# random draws every element shares (see `shared_draws`); absent outside one.
_SHARED = threading.local()


@contextmanager
def shared_draws() -> Iterator[None]:
    r"""Marks the :mod:`torch.func` transforms a block opens as a stand-in's own (the vmap
    over the Jacobian's columns that replaces zuko's `autograd.grad` loop): a layer that
    draws its noise on first use (the local trick of a `reparameterize()` block) draws it
    below them, once, as zuko's own code does outside any transform."""

    before = getattr(_SHARED, "levels", None)
    _SHARED.levels = (*(before or ()), func_level())
    try:
        yield
    finally:
        _SHARED.levels = before


def drawing_level() -> tuple[bool, int | None]:
    r"""Whether a draw now is inside transforms a stand-in opened (:func:`shared_draws`),
    and the level to draw at."""

    levels = getattr(_SHARED, "levels", None)
    if not levels or func_level() == levels[-1]:
        return False, None
    return True, levels[-1]


def autocast_inputs(device: str, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    r"""Returns `tensors` as autocast gives them to `F.linear` or a convolution on
    `device`: in the autocast dtype where it is enabled (any floating dtype but float64).
    torch's batching rules of some operations run below autocast: casting their inputs
    first gives the dtype of a plain call. (Before a custom Function, not inside: its
    backward would multiply saved float32 inputs by a gradient of the lower dtype.)"""

    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(_autocast(t, dtype) for t in tensors)


def _autocast(t: Any, dtype: torch.dtype) -> Any:
    r"""Returns `t` as autocast casts an input to `dtype`: any floating dtype but float64."""

    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype not in (torch.float64, dtype):
        return t.to(dtype)
    return t


@contextmanager
def autocast_off() -> Iterator[None]:
    r"""Turns autocast off, on the CPU and CUDA alike, for a block (a shape-finding pass:
    shapes do not depend on it, and the stand-ins refuse it)."""

    devices = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    for d in devices:
        torch.set_autocast_enabled(d, False)
    try:
        yield
    finally:
        for d in devices:
            torch.set_autocast_enabled(d, True)


def refuse_autocast(t: Any, layer: str) -> None:
    r"""Raises in a vectorized pass under autocast on the device of `t`: torch's batching
    rules run some kernels (convolution, `baddbmm`, the recurrent steps) below autocast,
    in the inputs' dtype, where the loop computes in autocast's. The call falls back to
    the loop, with a warning that says so."""

    if isinstance(t, Tensor) and torch.is_autocast_enabled(t.device.type):
        raise RuntimeError(
            f"{layer} under autocast: vmap runs its kernels without autocast's casts, in "
            "another dtype than the loop's"
        )


def records_gradients(t: Tensor) -> bool:
    r"""Whether `t` requires gradients, read through vmap's wrappers (a batched tensor
    reads :py:`False` inside vmap, whatever the tensor under it)."""

    while _functorch.is_batchedtensor(t):
        t = _functorch.get_unwrapped(t)
    return t.requires_grad


def unwrap_batched(t: Tensor) -> Tensor:
    r"""Returns the plain tensor under every functorch wrapper of `t` (all vmap levels).

    `bool()` of a batched tensor raises; a loop that must run until every sample of a
    vmap is done reads its stopping test through the wrappers.
    """

    while _functorch.is_functorch_wrapped_tensor(t):
        t = _functorch.get_unwrapped(t)
    return t


class no_saved_tensors_hooks:
    r"""Disables saved-tensor hooks for a block, with an error message for whoever tries to
    use them there: :func:`torch.autograd.graph.disable_saved_tensors_hooks`, without its
    generator machinery (a call's every forward pass enters it)."""

    __slots__ = ("message", "previous")

    def __init__(self, message: str) -> None:
        self.message = message

    def __enter__(self) -> None:
        self.previous = torch._C._autograd._saved_tensors_hooks_get_disabled_error_message()
        torch._C._autograd._saved_tensors_hooks_disable(self.message)

    def __exit__(self, *exc: object) -> None:
        if self.previous is None:
            torch._C._autograd._saved_tensors_hooks_enable()
        else:
            torch._C._autograd._saved_tensors_hooks_disable(self.previous)


def saved_tensors_hooks_active() -> bool:
    r"""Whether saved-tensor hooks (:mod:`torch.autograd.graph`) are active in this thread."""

    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def load_jvp_decompositions() -> None:
    r"""Imports torch's forward-mode decompositions, which :func:`torch.func.jvp` imports on
    first use, outside vmap and without the deprecation warning torch raises there."""

    name = "torch._decomp.decompositions_for_jvp"
    if name not in sys.modules:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            importlib.import_module(name)


class _Allocations(TorchDispatchMode):
    r"""Sums the bytes of every tensor the operations of a block return (no frees are
    subtracted: an upper bound of the block's peak memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Else torch wraps `__torch_dispatch__` in a guard whose first call imports
        # torch._dynamo: seconds, on a process's first vectorized call. The mode never
        # runs under torch.compile (the engine measures outside compilation).
        return False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views and in-place results share an input's storage: only new storage counts.
        seen = set()
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, Tensor):
                try:
                    seen.add(t.untyped_storage().data_ptr())
                except RuntimeError:
                    continue
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                try:
                    storage = t.untyped_storage()
                    ptr = storage.data_ptr()
                except RuntimeError:  # no storage of its own (a subclass, a dual tensor)
                    continue
                if ptr not in seen:
                    seen.add(ptr)
                    self.bytes += storage.nbytes()
        return out


def counting_allocations() -> Any:
    r"""A context manager that sums the bytes of new storage the operations in its block
    allocate, in its `bytes` attribute."""

    return _Allocations()


def allocated_bytes(call: Callable[[], Any]) -> int:
    r"""Returns the bytes of new storage that the operations of `call()` allocate."""

    with _Allocations() as counter:
        call()
    return counter.bytes


def in_func_transform() -> bool:
    r"""Whether a :mod:`torch.func` transform (vmap, grad, jvp, ...) is active."""

    return torch._C._are_functorch_transforms_active()


def func_level() -> int | None:
    r"""The level of the innermost active :mod:`torch.func` transform, :py:`None` if none."""

    return torch._C._functorch.maybe_current_level()


def in_forward_ad() -> bool:
    r"""Whether a level of forward-mode AD is open (:mod:`torch.autograd.forward_ad`): dual
    tensors may flow, which operations with `out=` cannot take."""

    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def dual(tensors: Iterable[object]) -> bool:
    r"""Whether one of `tensors` (non-tensors are skipped) is a dual tensor of the open
    level of forward-mode AD. The level is the process's, not the thread's: a call in
    another thread, on tensors of its own, is not one of forward mode."""

    if not in_forward_ad():
        return False
    unpack = torch.autograd.forward_ad.unpack_dual
    return any(isinstance(t, Tensor) and unpack(t).tangent is not None for t in tensors)


def batched_gradients(grads: Iterable[Tensor | None]) -> bool:
    r"""Whether autograd runs a backward under its own vmap (`is_grads_batched`, a
    vectorized Jacobian): the incoming gradients are batched, and in-place or `out=`
    operations mixing them with plain tensors fail."""

    return any(g is not None and _is_legacy_batched(g) for g in grads)


_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


try:  # what torch.autograd.Function.apply runs after binding its arguments
    from torch._functorch.autograd_function import custom_function_call
    from torch._functorch.utils import unwrap_dead_wrappers
except ImportError:  # pragma: no cover - another torch layout: the public apply
    custom_function_call = unwrap_dead_wrappers = None


def function_apply(cls: type[torch.autograd.Function], *args: Any) -> Any:
    r"""Returns `cls.apply(*args)` for a Function whose callers pass every argument of its
    `forward` positionally (under a :mod:`torch.func` transform, a Function with
    `setup_context`: functorch's own call runs it).

    `Function.apply` binds the arguments to `forward`'s signature on every call
    (:func:`inspect.signature`, about 20 us: more than a small layer's matmul) and walks
    them for dead wrappers; with every argument given in order, the binding changes
    nothing, so this skips it.
    """

    if custom_function_call is None:
        return cls.apply(*args)
    if not torch._C._are_functorch_transforms_active():
        # A tensor left over from a finished transform is unwrapped first (its own cost:
        # a tree map over the arguments, paid only when one is wrapped).
        if any(isinstance(a, Tensor) and is_wrapped(a) for a in args):
            args = unwrap_dead_wrappers(args)
        return super(torch.autograd.Function, cls).apply(*args)
    return custom_function_call(cls, *args)


# Operations that read a tensor's metadata, not its values: methods, and properties by name
# (`.T`, `.mT` or `.data` are values).
_METADATA = {
    Tensor.size,
    Tensor.dim,
    Tensor.numel,
    Tensor.stride,
    Tensor.is_floating_point,
    Tensor.is_complex,
    Tensor.is_contiguous,
    Tensor.element_size,
    Tensor.__len__,
    Tensor.get_device,
    Tensor.is_inference,
    Tensor.is_conj,
    Tensor.is_neg,
}
_PROPERTIES = {
    "shape", "dtype", "device", "ndim", "layout", "requires_grad", "is_leaf", "grad",
    "grad_fn", "names", "is_cuda", "is_cpu", "is_sparse", "is_quantized", "is_meta",
    "is_nested", "nbytes", "itemsize",
}  # fmt: skip


def is_metadata(func: Any) -> bool:
    r"""Whether a torch function (as a :class:`torch.overrides.TorchFunctionMode` sees it)
    reads only a tensor's metadata (its shape, dtype, device, ...), not its values."""

    if func in _METADATA:
        return True
    owner = getattr(func, "__self__", None)
    return getattr(func, "__name__", "") == "__get__" and getattr(owner, "__name__", "") in (
        _PROPERTIES
    )


class ValueReads(TorchFunctionMode):
    r"""A torch function mode that hands `seen` the tensor arguments of every torch
    function that reads their values (not only their shape, dtype, device, ...): how the
    checks that a weight enters a call through its layer alone see every use of it."""

    def __init__(self, seen: Callable[[list[Tensor]], None]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not is_metadata(func):
            self.seen([a for a in tree_leaves((args, kwargs)) if isinstance(a, Tensor)])
        return func(*args, **kwargs)


# The torch functions that CPU autocast computes in float32 (the losses, `prod`, `cdist`) and
# in its lower dtype (the linear algebra and convolutions) that a function of `fn` may call.
# Inside torch.func.vmap their batched kernels run below autocast, in their inputs' dtype: a
# loss of bfloat16 logits in bfloat16, where a plain call, the loop, computes it in float32.
_FLOAT32 = frozenset(
    {
        F.binary_cross_entropy, F.binary_cross_entropy_with_logits, F.cosine_embedding_loss,
        F.cross_entropy, F.hinge_embedding_loss, F.huber_loss, F.kl_div, F.l1_loss,
        F.margin_ranking_loss, F.mse_loss, F.multi_margin_loss, F.multilabel_margin_loss,
        F.nll_loss, F.poisson_nll_loss, F.smooth_l1_loss, F.soft_margin_loss,
        F.triplet_margin_loss, torch.cdist, torch.prod, Tensor.prod, torch.trace, Tensor.trace,
    }
)  # fmt: skip
_LOWER = frozenset(
    {
        F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
        F.conv_transpose3d, F.prelu, F.scaled_dot_product_attention, torch.addbmm,
        torch.addmm, torch.baddbmm, torch.linalg.vecdot, Tensor.addbmm, Tensor.addmm,
        Tensor.baddbmm,
    }
)  # fmt: skip


# The normalizations that a plain call computes on a lower-precision input with float32
# weights or statistics (its output in the input's dtype), and vmap's rules refuse or promote.
_NORMS = frozenset({F.batch_norm, F.layer_norm, F.group_norm})


class AutocastRules(TorchFunctionMode):
    r"""A torch function mode for a vectorized pass under CPU autocast: while autocast is
    on (`fn` may turn it off, or change its dtype, for a block), the functions of `_FLOAT32`
    and `_LOWER` get their inputs cast as autocast casts them (any floating dtype but
    float64), and a normalization of `_NORMS` of a lower-precision input with float32
    weights or statistics runs in float32, its output in the input's dtype, as a plain call
    computes it."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _FLOAT32 or func in _LOWER or func in _NORMS:
            if torch.is_autocast_enabled("cpu"):
                if func in _FLOAT32:
                    return func(*_cast(args, torch.float32), **_cast(kwargs, torch.float32))
                if func in _LOWER:
                    dtype = torch.get_autocast_dtype("cpu")
                    return func(*_cast(args, dtype), **_cast(kwargs, dtype))
                if args and _mixed(args[0], (*args[1:], *kwargs.values())):
                    x = args[0]
                    return func(x.float(), *args[1:], **kwargs).to(x.dtype)
        return func(*args, **kwargs)


def _cast(tree: Any, dtype: torch.dtype) -> Any:
    # (CPU autocast's rules: the tensors on the CPU)
    return tree_map(
        lambda t: _autocast(t, dtype) if isinstance(t, Tensor) and t.device.type == "cpu" else t,
        tree,
    )


def _mixed(x: Any, others: tuple) -> bool:
    return (
        isinstance(x, Tensor)
        and x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float16)
        and any(isinstance(t, Tensor) and t.dtype == torch.float32 for t in others)
    )


def autocast_rules() -> Any:
    r"""The :class:`AutocastRules` of a vectorized pass where CPU autocast is on, else a
    context that does nothing."""

    if torch.is_autocast_enabled("cpu") and not is_compiling():
        return AutocastRules()
    return nullcontext()


def closure(f: Any) -> Iterator[tuple[str, Any]]:
    r"""Yields the names and values that the function `f` closes over (none for other
    callables), but the cells not yet bound."""

    cells = getattr(f, "__closure__", None)
    if not cells:
        return
    for name, cell in zip(f.__code__.co_freevars, cells, strict=True):
        try:
            yield name, cell.cell_contents
        except ValueError:  # a cell not yet bound
            pass


def generating(generator: torch.Generator | None) -> dict[str, torch.Generator]:
    r"""The keyword arguments of torch's random functions for `generator`: none for torch's
    default one (an explicit `generator=None` fails under torch.compile once a size is
    dynamic, as the number of samples is after it changed)."""

    return {} if generator is None else {"generator": generator}
