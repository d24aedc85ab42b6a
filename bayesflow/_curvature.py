r"""The curvature of a log-likelihood at trained parameters, summed over examples: the
diagonal empirical Fisher and generalized Gauss-Newton matrix from per-example gradients and
vector-Jacobian products vectorized by :mod:`torch.func`, a closed form for a last linear
layer, the one pass over the data, and the checks of its batches."""

from __future__ import annotations

__all__ = [
    "HESSIANS",
    "LIKELIHOODS",
    "Buffers",
    "FitOptions",
    "check_fit_args",
    "check_no_max_norm",
    "check_per_datum",
    "check_per_example_layers",
    "check_split",
    "close",
    "ends",
    "evaluating",
    "fit",
    "last_layer",
    "per_example",
    "restore_modes",
    "transforming",
]

import math

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from torch import Tensor
from torch.func import grad, vjp, vmap

from . import _posterior
from ._checks import (
    check_callable,
    check_float,
    check_int,
    check_module,
    check_not_bridge,
    check_number,
)
from ._compat import BatchNorm, ValueReads
from ._engine import _rng_state, _set_rng_state
from ._numerics import accumulator
from ._structure import structure
from .call import vmap_call

#: The curvatures :func:`bayesflow.laplace_fit` computes: the generalized Gauss-Newton
#: matrix and the empirical Fisher, both diagonal.
HESSIANS = ("ggn", "ef")

#: The likelihoods whose output Hessian the generalized Gauss-Newton matrix uses.
LIKELIHOODS = ("classification", "regression")

Fn = Callable[..., Tensor]
Batch = tuple[Tensor, ...]
Step = tuple[dict[str, Tensor], Tensor]


class FitOptions(NamedTuple):
    r"""The checked arguments of a fit: the parameter names, the curvature and the
    likelihood of the GGN."""

    names: list[str]
    hessian: str
    output: Fn | None
    likelihood: str | None
    sigma: float
    chunk_size: int | None


class LastLayer(NamedTuple):
    r"""A :class:`torch.nn.Linear` layer whose weight (and maybe bias) are the parameters
    of a fit or a posterior, with their names."""

    layer: nn.Linear
    weight: str
    bias: str | None


class Buffers:
    r"""The buffers of a module as found: every place that holds one, the tensor it held,
    a copy of its values and its version counter (which an in-place write moves, even one
    that writes the same values)."""

    def __init__(self, module: nn.Module) -> None:
        self.entries = [
            (f"{prefix}.{attr}" if prefix else attr, m._buffers, attr, t, t.detach().clone())
            for prefix, m in module.named_modules()
            for attr, t in m._buffers.items()
            if t is not None
        ]
        self.versions = [_version(e[3]) for e in self.entries]

    def changed(self) -> list[str]:
        r"""Returns the names of the buffers that the module holds no more, or that were
        written since they were found (or last restored)."""

        return [
            name
            for (name, d, attr, t, copy), version in zip(self.entries, self.versions, strict=True)
            if d.get(attr) is not t or _version(t) != version or not _same(t, copy)
        ]

    def restore(self) -> None:
        r"""Puts every buffer back: the tensor found in its place, holding the values found.

        A forward that assigns a buffer under a :mod:`torch.func` transform
        (`self.ema = 0.9 * self.ema + ...`) would leave the transform's dead wrapper in the
        module."""

        with torch.no_grad():
            for i, (_, d, attr, t, copy) in enumerate(self.entries):
                if d.get(attr) is not t:
                    d[attr] = t
                if t.shape != copy.shape:
                    t.set_(copy.clone())
                elif not _same(t, copy):
                    t.copy_(copy)
                self.versions[i] = _version(t)


def _version(t: Tensor) -> int | None:
    return None if t.is_inference() else t._version


def _same(a: Tensor, b: Tensor) -> bool:
    r"""Whether `a` holds the values of `b`, NaN where `b` holds NaN."""

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


@contextmanager
def evaluating(module: nn.Module) -> Iterator[Buffers]:
    r"""Puts `module` in evaluation mode for a block, then gives every submodule its own
    mode back (:func:`restore_modes`) and every buffer as found (the same tensor, with
    the same values), also where the block raises, and there torch's default generators
    as found too (a failed call draws nothing); yields the buffers found, for the checks
    of :func:`transforming` and to be restored between parts of the block."""

    modes = [(m, m.training) for m in module.modules()]
    found = Buffers(module)
    rng = _rng_state()
    try:
        module.eval()
        yield found
    except BaseException:
        _set_rng_state(rng)
        raise
    finally:
        try:
            restore_modes(modes)
        finally:
            found.restore()


def restore_modes(modes: Sequence[tuple[nn.Module, bool]]) -> None:
    r"""Gives each module of `modes`, listed parents first, its mode through its `train`,
    which a layer may override (a LoRA layer merges its update into its weight in
    evaluation mode), not by its flag. A module is called only where it is not yet in its
    mode, after its parent's call has set the modes of all its children: each module gets
    its own mode last."""

    for m, mode in modes:
        if m.training != mode:
            m.train(mode)


@contextmanager
def transforming(where: str, found: Buffers) -> Iterator[None]:
    r"""Runs a block of per-example transforms (:mod:`torch.func`), and turns their
    failure on a random operation of the forward, or after the forward wrote its buffers,
    into an error that says so: torch's own message names neither the function nor the
    cause."""

    try:
        yield
    except RuntimeError as err:
        text = str(err).strip()
        cause = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
        if "called random operation" in text:
            raise ValueError(
                f"{where}: expected a forward without random operations in evaluation mode "
                "(the curvature and the Jacobians are those of one deterministic network), "
                "got a forward that draws random numbers in evaluation mode (dropout with "
                f"training=True, say) ({cause})"
            ) from err
        written = found.changed()
        if not written:
            raise
        raise ValueError(
            f"{where}: expected the module's forward to leave its buffers alone in evaluation "
            f"mode, got writes to {written} (an observer's range, say), which the per-example "
            f"gradients and Jacobians of torch.func cannot run ({cause})"
        ) from err


def check_per_example_layers(where: str, module: nn.Module) -> None:
    r"""Refuses batch normalization without running statistics: in evaluation mode too,
    it normalizes each example with the statistics of the batch (instance normalization
    uses each example's own)."""

    for name, m in module.named_modules():
        if isinstance(m, BatchNorm) and m.running_mean is None and m.running_var is None:
            layer = f"{type(m).__name__} {name!r}" if name else type(m).__name__
            raise ValueError(
                f"{where}: expected layers that treat each example on its own, got {layer} "
                "without running statistics (track_running_stats=False): it normalizes with "
                "the statistics of the batch in evaluation mode too, so it mixes the examples "
                "of a batch"
            )


def check_no_max_norm(where: str, module: nn.Module) -> None:
    r"""Refuses an embedding with `max_norm`: its forward renormalizes the rows of its
    weight in place, which no :mod:`torch.func` transform can run, and which would rewrite
    the user's weight before the transform fails, whether the weight is fitted or not."""

    written = sorted(structure(module).written)
    if written:
        raise ValueError(
            f"{where}: expected no nn.Embedding or nn.EmbeddingBag with max_norm (it "
            "renormalizes the rows of its weight in place at every forward, which the "
            f"per-example derivatives cannot run), got max_norm on the weights {written}"
        )


def check_fit_args(
    where: str,
    module: object,
    fn: object,
    hessian: object,
    output: object,
    likelihood: object,
    sigma: object,
    include: Sequence[str],
    exclude: Sequence[str],
    chunk_size: object,
) -> FitOptions:
    check_module(where, module)
    check_not_bridge(where, module)
    check_callable(
        where,
        "fn",
        fn,
        optional=False,
        form="fn(module, *batch) returning per-datum log-likelihoods",
    )
    if hessian not in HESSIANS:
        raise ValueError(f"{where}: expected hessian to be 'ggn' or 'ef', got {hessian!r}")
    check_callable(where, "output", output)
    if likelihood is not None and likelihood not in LIKELIHOODS:
        raise ValueError(
            f"{where}: expected likelihood to be 'classification', 'regression' or None, "
            f"got {likelihood!r}"
        )
    if hessian == "ggn" and (output is None or likelihood is None):
        raise ValueError(
            f"{where}: expected output and likelihood with hessian='ggn' (the GGN is "
            "J^T Lambda J of the model output), got "
            f"output={'None' if output is None else 'a callable'} and likelihood={likelihood!r}"
            "; for a log-likelihood alone (a normalizing flow's log_prob), hessian='ef'"
        )
    sigma = check_number(where, "sigma", sigma, 0.0, strict=True)
    if chunk_size is not None:
        chunk_size = check_int(where, "chunk_size", chunk_size, or_none=True)
    # The posterior's own selection: no parameter picked, tied names, lazy or integer
    # parameters are refused with its messages.
    names = list(_posterior.init(where, module, 0.0, include, exclude).mean)
    # Frozen parameters were not trained (no mode of the loss), and laplace-torch leaves
    # them out: so do the fits, as IVON does.
    named = dict(module.named_parameters())
    frozen = [name for name in names if not named[name].requires_grad]
    names = [name for name in names if named[name].requires_grad]
    if not names:
        raise ValueError(
            f"{where}: expected include and exclude to pick at least one trainable "
            f"parameter of {type(module).__name__}, got only frozen ones "
            f"(requires_grad=False): {frozen}"
        )
    check_per_example_layers(where, module)
    check_no_max_norm(where, module)
    return FitOptions(names, hessian, output, likelihood, sigma, chunk_size)


def batches(where: str, data: object) -> Iterator[Batch]:
    if isinstance(data, (Tensor, Mapping, str)) or not isinstance(data, Iterable):
        raise TypeError(
            f"{where}: expected data to be an iterable of batches (tuples of tensors, e.g. a "
            f"DataLoader), got {type(data).__name__}"
        )
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or not batch:
            raise TypeError(
                f"{where}: expected each batch to be a tuple or list of tensors, got "
                f"{type(batch).__name__} at batch {i} (one batch (x, y) is passed as [(x, y)])"
            )
        size = None
        for j, t in enumerate(batch):
            if not isinstance(t, Tensor) or t.dim() == 0:
                what = f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(
                    f"{where}: expected each batch to hold tensors with a leading batch dim, "
                    f"got {what} at position {j} of batch {i}"
                )
            if size is None:
                size = t.shape[0]
            elif t.shape[0] != size:
                raise ValueError(
                    f"{where}: expected the tensors of a batch to share their leading dim, got "
                    f"{size} and {t.shape[0]} in batch {i}"
                )
        if size == 0:
            continue
        yield tuple(batch)


def per_example(where: str, what: str, module: nn.Module, fn: Fn) -> Callable[..., Tensor]:
    r"""Returns `call(params, *example)`: `fn(module, *batch)` for a batch of one example,
    with `params` swapped in (through :func:`bayesflow.vmap_call`, the one swap of the
    library), without its sample dim: the shape of `fn`'s output, `(1, ...)`; to be
    differentiated in `params`, and refused (`fn` named `what`) where it does not depend
    on them."""

    def call(params: dict[str, Tensor], *example: Tensor) -> Tensor:
        batch = tuple(t.unsqueeze(0) for t in example)
        one = {k: v.unsqueeze(0) for k, v in params.items()}
        out = vmap_call(module, one, *batch, fn=fn)[0]
        # Under the transforms, a result computed under torch.no_grad() or detached has a
        # derivative of zero, not an error: a curvature and a variance of zero, silently.
        # Read once per vectorized chunk, as the transform traces it.
        if isinstance(out, Tensor) and not out.requires_grad:
            raise ValueError(
                f"{where}: expected {what} to return a result that depends on the picked "
                "parameters, got one without a gradient in them (computed under "
                "torch.no_grad(), or detached?)"
            )
        return out

    return call


def check_per_datum(where: str, what: str, out: object, size: int) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != size:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"{where}: expected {what} to return a tensor with one row per datum, leading dim "
            f"{size} as the batch, got {shape}"
        )
    check_float(where, f"the output of {what}", out)
    return out


def _check_output(where: str, likelihood: str, f: Tensor) -> None:
    if f.dim() > 2 or (likelihood == "classification" and (f.dim() != 2 or f.shape[1] < 2)):
        shapes = "(B, C), C >= 2" if likelihood == "classification" else "(B, C) or (B,)"
        raise ValueError(f"{where}: expected output of shape {shapes}, got {tuple(f.shape)}")


def close(a: Tensor, b: Tensor) -> bool:
    r"""Whether `b` is `a` up to rounding: the same NaN and infinite entries, and the
    finite ones within the square root of the dtype's resolution, relative to each entry
    and to the largest entry below its inverse."""

    finite = torch.isfinite(a)
    if not (finite.all() and torch.isfinite(b).all()):
        same = (
            torch.equal(finite, torch.isfinite(b))
            and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.isposinf(), b.isposinf())
        )
        if not same:
            return False
        a, b = a[finite], b[finite]
        if a.numel() == 0:
            return True
    tol = math.sqrt(torch.finfo(a.dtype).eps)
    # Entries beyond 1/tol (a -1e9 mask) are compared relatively only: as the scale of the
    # absolute tolerance they would hide differences of order 1 everywhere else.
    magnitude = a.abs()
    ordinary = magnitude[magnitude <= 1.0 / tol]
    scale = max(ordinary.max().item() if ordinary.numel() else 0.0, 1.0)
    return torch.allclose(a, b, rtol=tol, atol=tol * scale)


def check_split(where: str, what: str, whole: Tensor, parts: Tensor) -> None:
    r"""Checks that `fn` on single examples gives what it gives on the batch: a batch that
    couples its examples (train-mode BatchNorm, a mean over the batch) has no per-example
    curvature."""

    if not close(whole, parts):
        error = (whole - parts).abs().max().item()
        raise ValueError(
            f"{where}: expected {what} on one example at a time to give what it gives on the "
            f"whole batch, got differences up to {error:.3g}: does it mix the examples of a "
            "batch (a mean over the batch, BatchNorm statistics)?"
        )


def _sum_of_squares(t: Tensor, dims: int) -> Tensor:
    r"""Sums the squares of `t` over its first `dims` dims, in at least float32 (squares
    and sums of half precision overflow)."""

    return t.flatten(0, dims - 1).to(accumulator(t.dtype)).square().sum(0)


def _ef_batch(
    where: str,
    module: nn.Module,
    fn: Fn,
    options: FitOptions,
    params: dict[str, Tensor],
    batch: Batch,
) -> Step:
    call = per_example(where, "fn", module, fn)

    def loglik(p: dict[str, Tensor], *example: Tensor) -> tuple[Tensor, Tensor]:
        total = call(p, *example).sum()
        return total, total.detach()

    dims = (None, *(0,) * len(batch))
    grads, values = vmap(grad(loglik, has_aux=True), in_dims=dims, chunk_size=options.chunk_size)(
        params, *batch
    )
    return {k: _sum_of_squares(g, 1) for k, g in grads.items()}, values


def _ggn_batch(
    where: str, module: nn.Module, options: FitOptions, params: dict[str, Tensor], batch: Batch
) -> Step:
    call = per_example(where, "output", module, options.output)

    def roots(p: dict[str, Tensor], *example: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        # Lambda = L L^T, so diag(J^T Lambda J) = sum_c (J^T L_c)^2: one vector-Jacobian
        # product per column of L. For the softmax, L = diag(sqrt p) - p sqrt(p)^T (since
        # sum_c p_c = 1); for a Gaussian, L = I / sigma.
        out, pullback = vjp(lambda q: call(q, *example).reshape(-1), p)
        out = out.detach()
        if options.likelihood == "classification":
            probs = out.softmax(dim=-1)
            root = probs.sqrt()
            columns = torch.diag(root) - root.unsqueeze(-1) * probs  # row c: L_c
        else:
            columns = torch.eye(len(out), dtype=out.dtype, device=out.device) / options.sigma
        return vmap(pullback)(columns)[0], out

    dims = (None, *(0,) * len(batch))
    rows, out = vmap(roots, in_dims=dims, chunk_size=options.chunk_size)(params, *batch)
    h = {k: _sum_of_squares(r, 2).view_as(params[k]) for k, r in rows.items()}
    return h, out


def last_layer(module: nn.Module, names: Sequence[str]) -> LastLayer | None:
    r"""Returns the :class:`torch.nn.Linear` whose weight, and maybe bias, are exactly
    `names`, if neither is tied to another name of `module`."""

    counts: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    for prefix, m in module.named_modules():
        if type(m) is not nn.Linear:
            continue
        dot = f"{prefix}." if prefix else ""
        own = {f"{dot}{n}": p for n, p in m.named_parameters()}
        weight = f"{dot}weight"
        if weight in names and set(names) <= own.keys():
            if all(counts[id(p)] == 1 for p in own.values()):
                bias = f"{dot}bias" if f"{dot}bias" in names else None
                return LastLayer(m, weight, bias)
            return None
    return None


class _Elsewhere:
    r"""Records whether a torch function outside the calls of `layer` takes one of its
    parameters `names`: the ones it holds now (swapped in, maybe), or held on entry."""

    def __init__(self, layer: nn.Module, names: Sequence[str]) -> None:
        self.layer, self.names = layer, names
        self.held = [getattr(layer, n) for n in names]
        self.depth = 0
        self.found = False
        self.mode = ValueReads(self._seen)

    def _seen(self, tensors: list[Tensor]) -> None:
        if not (self.depth or self.found):
            held = [*self.held, *(getattr(self.layer, n) for n in self.names)]
            self.found = any(a is t for a in tensors for t in held)


class Captured(NamedTuple):
    r"""What :func:`capture` saw of a call: its result, the input :math:`\phi` `(B, d)` and
    output :math:`z` `(B, C)` of the layer (or :py:`None`), and the output of the root
    module's one call (or :py:`None`)."""

    result: Any
    features: tuple[Tensor, Tensor] | None
    root: Any


def attributes(found: LastLayer) -> list[str]:
    r"""Returns the names, in the layer, of the parameters of `found`: `weight`, maybe
    `bias`."""

    return [n.rpartition(".")[2] for n in (found.weight, found.bias) if n is not None]


def capture(
    layer: nn.Module,
    call: Callable[[], Any],
    leaf: bool = False,
    alone: Sequence[str] = (),
    root: nn.Module | None = None,
) -> Captured:
    r"""Runs `call()` and returns its result with the input and output of `layer`, or with
    :py:`None` for them unless `layer` ran once on a matrix and no torch function outside
    that call took its parameters named in `alone`; and the output of `root`, if it ran
    once. With `leaf`, :math:`z` is a leaf whose copy the rest of the call continues from,
    recorded, for the gradient of the result in :math:`z`."""

    seen = []
    roots = []
    grad_mode = torch.is_grad_enabled()
    # The closed form holds where the parameters enter the result through this one call
    # alone. A numerical check on some example cannot tell: another use of the weight
    # may vanish there (a first row of zeros). The graph can, on one pass: no function
    # outside the call, a mode sees them all, takes the parameters (what it reads of
    # them, not their metadata), as a function of no particular example.
    mode = _Elsewhere(layer, alone) if alone else None

    def enter(m: nn.Module, inputs: tuple) -> None:
        if mode is not None:
            mode.depth += 1

    def hook(m: nn.Module, inputs: tuple, out: Tensor) -> Tensor | None:
        if mode is not None:
            mode.depth -= 1
        phi, z, back = inputs[0] if inputs else None, out, None
        # Inference tensors have no version counter to tell a later in-place write: copies.
        phi, z = (t.clone() if isinstance(t, Tensor) and t.is_inference() else t for t in (phi, z))
        if leaf and not seen and isinstance(out, Tensor):
            # Only what follows the layer is recorded: gradients are switched on here, inside
            # the call, and back off after it.
            torch.set_grad_enabled(True)
            z = out.detach().requires_grad_()
            back = z.clone()  # not the leaf itself: an in-place ReLU may follow
        seen.append((phi, z, _versions(phi, z)))
        return back

    handles = [layer.register_forward_pre_hook(enter)]
    # Before the user's own forward hooks: what the layer computed, which a hook of theirs
    # may replace (a clamp of the logits on some examples); the closed form holds for it.
    handles.append(layer.register_forward_hook(hook, prepend=True, always_call=True))
    if root is not None:
        handles.append(root.register_forward_hook(lambda m, inputs, out: roots.append(out)))
    try:
        if mode is None:
            result = call()
        else:
            with mode.mode:
                result = call()
    finally:
        for handle in handles:
            handle.remove()
        torch.set_grad_enabled(grad_mode)
    out = roots[0] if len(roots) == 1 else None
    if len(seen) != 1 or (mode is not None and mode.found):
        return Captured(result, None, out)
    phi, z, versions = seen[0]
    if not (isinstance(phi, Tensor) and isinstance(z, Tensor) and phi.dim() == z.dim() == 2):
        return Captured(result, None, out)
    if _versions(phi, z) != versions:
        # Written in place after the layer ran (a ReLU(inplace=True), a clamp_ of the
        # logits): they no longer hold the layer's input and output, and a check that
        # compares the call's output with them would compare a tensor with itself.
        return Captured(result, None, out)
    return Captured(result, (phi, z), out)


def _versions(*tensors: object) -> tuple[int | None, ...]:
    r"""The version counters of `tensors`, which every in-place write moves (:py:`None`
    for what has none: inference tensors, which :func:`capture` keeps as copies)."""

    return tuple(
        t._version if isinstance(t, Tensor) and not t.is_inference() else None for t in tensors
    )


def _layer_step(found: LastLayer, phi: Tensor, lam: Tensor) -> dict[str, Tensor]:
    r""":math:`h_{W_{cj}} = \sum_b \Lambda_{bc} \phi_{bj}^2` and
    :math:`h_{b_c} = \sum_b \Lambda_{bc}`: the diagonal of :math:`J^\top \Lambda J` of a
    linear layer, for a diagonal :math:`\Lambda` or the diagonal of the squared gradients."""

    wide = accumulator(phi.dtype)  # in at least float32: sums of half precision overflow
    lam, phi = lam.to(wide), phi.to(wide)
    h = {found.weight: lam.T @ phi.square()}
    if found.bias is not None:
        h[found.bias] = lam.sum(0)
    return h


def _fits(got: tuple[Tensor, Tensor] | None, size: int) -> bool:
    return got is not None and got[0].shape[0] == got[1].shape[0] == size


def _equal(f: object, z: Tensor) -> bool:
    r"""Whether `f` holds the numbers of `z`, `(B, C)`, maybe without its dim of one."""

    return isinstance(f, Tensor) and f.numel() == z.numel() and torch.equal(f.reshape(z.shape), z)


class _Closed(NamedTuple):
    r"""A batch in closed form: its curvature, `fn` per datum, the curvature of its first
    and last examples, what the per-example path is checked against (`fn` for the empirical Fisher,
    `output` for the GGN), and, for the GGN, whether `output` returns the module's own
    output as it is (then later batches need no call of `output`)."""

    h: dict[str, Tensor]
    ll: Tensor
    one: dict[str, Tensor]
    value: Tensor
    own: bool


def _last_layer_batch(
    where: str,
    module: nn.Module,
    fn: Fn,
    options: FitOptions,
    found: LastLayer,
    batch: Batch,
    own: bool | None,
) -> _Closed | None:
    r"""The curvature of a batch in closed form, from one call of `fn` that records the
    layer's input and output; :py:`None` where the closed form does not apply.

    For the GGN, `output` must be the layer's output on every batch. On the first batch
    (`own` is :py:`None`), `output` runs too, and must return the module's own output as it
    is (`own`): then later batches compare that output with the layer's, both read from the
    call of `fn`; else `output` runs on every batch. The first batch also checks that the
    layer's parameters enter `fn` (the empirical Fisher) or `output` (the GGN) through the
    layer alone."""

    size = batch[0].shape[0]
    first = own is None
    alone = attributes(found) if first else []
    if options.hessian == "ef":
        got = capture(found.layer, lambda: fn(module, *batch), leaf=True, alone=alone)
        ll = check_per_datum(where, "fn", got.result, size)
        if not _fits(got.features, size) or not ll.requires_grad:
            return None
        phi, z = got.features
        with torch.enable_grad():
            (g,) = torch.autograd.grad(ll.sum(), z)
        lam = g.square()
        value = ll = ll.detach()
    else:
        got = capture(found.layer, lambda: fn(module, *batch), root=module)
        ll = check_per_datum(where, "fn", got.result, size)
        if own:
            if not _fits(got.features, size) or not _equal(got.root, got.features[1]):
                return None  # an output that leaves the layer's on this batch (a late clamp)
            phi, z = got.features
            value = got.root
        else:
            out = capture(
                found.layer, lambda: options.output(module, *batch), alone=alone, root=module
            )
            value = check_per_datum(where, "output", out.result, size)
            _check_output(where, options.likelihood, value)
            if not _fits(out.features, size) or not _equal(value, out.features[1]):
                return None
            phi, z = out.features
            if first:
                own = (
                    out.result is out.root
                    and _fits(got.features, size)
                    and all(map(torch.equal, got.features, out.features))
                )
        if options.likelihood == "classification":
            p = z.softmax(dim=-1)
            lam = p - p.square()
        else:
            lam = torch.full_like(z, options.sigma**-2)
    rows = ends(size)
    one = _layer_step(found, phi[rows], lam[rows])
    return _Closed(_layer_step(found, phi, lam), ll, one, value, bool(own))


def ends(size: int) -> list[int]:
    r"""The first and the last example of a batch: a module that mixes the examples in
    order (a recurrent layer over the batch dim, a cumulative sum) leaves one of them
    alone, but not both."""

    return [0, size - 1] if size > 1 else [0]


def _agree(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)


def fit(
    where: str, module: nn.Module, fn: Fn, data: object, options: FitOptions
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor, int]:
    r"""Returns the trained parameters, the curvature diagonals, the log-likelihood and the
    number of data, in one pass over `data`.

    Where the parameters are one linear layer's, each batch takes the closed form from
    one call of `fn` (and of `output`, for a GGN whose `output` is not the module's own;
    `output` must be the layer's output on every batch). The first batch checks that no
    operation outside the layer's one call takes its parameters, and its first and last
    examples (a module that mixes the examples in order leaves one of them alone, not both)
    are checked against the per-example path, on every batch until one of two examples or
    more has passed (one example alone shows no mixing). From the first batch where any
    of this fails, the per-example path takes over: the curvature is a sum over batches,
    and the batches before were in closed form rightly. The same holds for the GGN's
    check of `fn`."""

    params = {k: module.get_parameter(k).detach() for k in options.names}
    # Sums over many batches in half precision lose the later batches (a bfloat16 sum
    # near 900 moves in steps of 4): they run in at least float32.
    h = {k: torch.zeros_like(p, dtype=accumulator(p.dtype)) for k, p in params.items()}
    found = last_layer(module, options.names)
    own = None  # before the first batch in closed form; then, for the GGN, see _Closed
    # Whether a batch of two examples or more has passed the check of the closed form
    # against the per-example path, and (GGN) the check of `fn`.
    closed_checked = fn_checked = False
    log_likelihood, dtype = None, None
    num_data = 0

    with evaluating(module) as buffers, torch.no_grad():
        for batch in batches(where, data):
            size = batch[0].shape[0]
            fast = None
            if found is not None:
                try:
                    fast = _last_layer_batch(where, module, fn, options, found, batch, own)
                except RuntimeError:
                    fast = None  # the per-example path runs, and raises what is wrong
            if fast is not None and not closed_checked:
                rows = ends(size)
                one = tuple(t[rows] for t in batch)
                with transforming(where, buffers):
                    slow = _slow_batch(where, module, fn, options, params, one, fast.value[rows])
                fast = fast if _agree(fast.one, slow[0]) else None
                if own is None:
                    own = None if fast is None else fast.own
                closed_checked = fast is not None and size > 1
            if fast is not None:
                step, ll = fast.h, fast.ll
            else:
                found = None
                ll = check_per_datum(where, "fn", fn(module, *batch), size)
            if fast is None:
                if options.hessian == "ef":
                    whole = ll
                else:
                    whole = check_per_datum(where, "output", options.output(module, *batch), size)
                    _check_output(where, options.likelihood, whole)
                with transforming(where, buffers):
                    step = _slow_batch(where, module, fn, options, params, batch, whole)[0]
            if options.hessian == "ggn" and not fn_checked:
                # The GGN runs `output` per example, never `fn`: a forward of its first and
                # of its last example checks it (a (B, 1) mean against (B,) targets broadcasts to a
                # (B, B) log-likelihood that sums over the batch), as the empirical Fisher
                # checks `fn` on every example; until a batch of two or more has passed
                # (on a batch of one, (1, 1) is a per-datum shape). After the per-example
                # pass, which names a forward that is random in evaluation mode, as this
                # check would not (its two calls differ).
                for i in ends(size):
                    one = fn(module, *(t[i : i + 1] for t in batch))
                    if not isinstance(one, Tensor):
                        check_per_datum(where, "fn", one, 1)
                    found_one = ll[i : i + 1].reshape(1, -1).sum(1)
                    check_split(where, "fn", found_one, one.reshape(1, -1).sum(1))
                fn_checked = size > 1
            for k in h:
                h[k] += step[k]
            dtype = ll.dtype if dtype is None else torch.promote_types(dtype, ll.dtype)
            total = ll.sum(dtype=accumulator(ll.dtype))
            log_likelihood = total if log_likelihood is None else log_likelihood + total
            num_data += size
            # Every batch runs the module as found: a forward that assigns a buffer under
            # the per-example transforms leaves their dead wrapper in it.
            buffers.restore()

    if log_likelihood is None:
        raise ValueError(f"{where}: expected data with at least one datum, got none")
    # In at least float32, as summed: a half-precision curvature overflows (float16's
    # largest number is 65504: 256 points at sigma = 0.05 make 102400) and a
    # log-likelihood of many data rounds to -inf or by tens of nats.
    return (
        {k: p.clone() for k, p in params.items()},
        h,
        log_likelihood.to(accumulator(dtype)),
        num_data,
    )


def _slow_batch(
    where: str,
    module: nn.Module,
    fn: Fn,
    options: FitOptions,
    params: dict[str, Tensor],
    batch: Batch,
    whole: Tensor,
) -> Step:
    r"""The curvature of a batch by per-example gradients or vector-Jacobian products,
    checked to give on one example at a time what `fn` or `output` gave on the batch
    (`whole`, per datum)."""

    size = batch[0].shape[0]
    if options.hessian == "ef":
        step = _ef_batch(where, module, fn, options, params, batch)
        check_split(where, "fn", whole.reshape(size, -1).sum(1), step[1])
    else:
        step = _ggn_batch(where, module, options, params, batch)
        check_split(where, "output", whole.reshape(size, -1), step[1])
    return step
