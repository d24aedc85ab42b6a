r"""The mean-field posterior's machinery, shared by the functional API and the bridge:
glob selection, initialization, sampling and the KL divergence (from `_sampling`) and the
mean model. Every function takes the name of the public caller for its error messages."""

from __future__ import annotations

__all__ = [
    "check_data",
    "init",
    "kl_divergence",
    "mean_model",
    "posterior_from_variance",
    "sample",
    "select",
]

import copy
import math
import numbers
import re

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from torch import Tensor
from torch.nn.parameter import is_lazy

from ._checks import check_module, check_not_bridge, check_posterior, describe
from ._compat import hook_name, weight_hooks
from ._numerics import logvar_from_var
from ._sampling import kl_divergence, sample
from ._structure import Structure, lazy_error, lock
from ._types import Posterior

InitLogvar = float | Mapping[str, float | Tensor] | Callable[[str, Tensor], float | Tensor]


def _compile(where: str, pattern: object) -> re.Pattern:
    if not isinstance(pattern, str):
        raise TypeError(f"{where}: expected glob patterns as strings, got {pattern!r}")
    if pattern == "":
        return re.compile(r".*")
    if len(pattern) > 1 and pattern.endswith("."):
        # zuko's way to end a prefix at a segment ("net.1." for net.1 but not net.10):
        # here every pattern does.
        pattern = pattern[:-1]

    parts = []
    for segment in pattern.split("."):
        if segment == "**":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        elif re.fullmatch(r"(?:\w|\*)+", segment):
            # Within a segment, as zuko: `**` spans segments ("**weight" picks 0.0.weight,
            # not weight), `*` stays within one.
            parts.append(
                ".+".join(
                    "[^.]*".join(re.escape(s) for s in piece.split("*"))
                    for piece in segment.split("**")
                )
            )
        else:
            raise ValueError(
                f"{where}: malformed glob pattern {pattern!r}: expected dot-separated segments "
                "of letters, digits, '_', '*' and '**'"
            )

    return re.compile(r"\.".join(parts) + r"(?:\..*)?")


def _patterns(where: str, what: str, globs: object) -> tuple[tuple[str, ...], list[re.Pattern]]:
    if isinstance(globs, str):
        globs = (globs,)
    # Any iterable, as zuko takes (a set, dict keys, a generator), but no tensor or bytes.
    if not isinstance(globs, Iterable) or isinstance(globs, (bytes, Tensor)):
        raise TypeError(
            f"{where}: expected {what} to be a sequence of glob patterns, got {globs!r}"
        )
    globs = tuple(globs)
    return globs, [_compile(where, g) for g in globs]


def globs(where: str, what: str, patterns: object) -> tuple[str, ...]:
    r"""Returns `patterns` (one string, or any iterable of them) as a tuple, checked: what
    a message shows of them, and what can be read twice (a generator cannot)."""

    return _patterns(where, what, patterns)[0]


def _picks(inc: list[re.Pattern], exc: list[re.Pattern], name: str) -> bool:
    return any(p.fullmatch(name) for p in inc) and not any(p.fullmatch(name) for p in exc)


def select(
    where: str, module: object, include: Sequence[str], exclude: Sequence[str]
) -> list[str]:
    check_module(where, module)
    inc_globs, inc = _patterns(where, "include", include)
    exc_globs, exc = _patterns(where, "exclude", exclude)

    names = [name for name, _ in module.named_parameters() if _picks(inc, exc, name)]
    _refuse_tied(where, module, inc, exc, inc_globs, exc_globs, names)
    return names


def _refuse_tied(
    where: str,
    module: nn.Module,
    inc: list[re.Pattern],
    exc: list[re.Pattern],
    inc_globs: tuple[str, ...],
    exc_globs: tuple[str, ...],
    names: list[str],
) -> None:
    r"""Refuses a selection that picks a tied Parameter by a second name only (`dec.weight`
    tied to `emb.weight`): its one name is the first, which the selection leaves out, so
    the posterior would silently lack it (the decoder's bias alone, say)."""

    # (A first name that an exclude pattern leaves out is left out on purpose.)
    tied = {
        k: v
        for k, v in _tied(module, inc, exc).items()
        if v not in names and not any(p.fullmatch(v) for p in exc)
    }
    if not tied:
        return
    pairs = ", ".join(f"{k!r} is tied to {v!r}" for k, v in tied.items())
    got = "only tied names" if not names else "tied names whose Parameter it leaves out"
    raise ValueError(
        f"{where}: expected include={inc_globs!r} and exclude={exc_globs!r} to pick "
        f"each parameter of {type(module).__name__} by its named_parameters() name, got "
        f"{got} ({pairs}: the same Parameter, named by its first name); pick the first names "
        "too, or exclude the tied ones"
    )


def _tied(module: nn.Module, inc: list[re.Pattern], exc: list[re.Pattern]) -> dict[str, str]:
    r"""Returns the tied names (second and later names of one Parameter) a selection picks,
    with the name `named_parameters()` gives their Parameter."""

    first: dict[int, str] = {}
    tied = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        canonical = first.setdefault(id(p), name)
        if canonical != name and _picks(inc, exc, name):
            tied[name] = canonical
    return tied


def _logvar_value(where: str, name: str, value: object, like: Tensor) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(
            f"{where}: expected init_logvar for {name!r} to be a float or a tensor, "
            f"got {type(value).__name__}"
        )

    if isinstance(value, Tensor) and (value.dtype == torch.bool or value.is_complex()):
        raise TypeError(
            f"{where}: expected init_logvar for {name!r} to be real, got a tensor of {value.dtype}"
        )
    if isinstance(value, Tensor) and value.is_meta:
        raise ValueError(
            f"{where}: expected init_logvar for {name!r} with data, got a tensor on the meta "
            "device"
        )
    if isinstance(value, int) and not -(2**1023) < value < 2**1023:
        value = math.inf if value > 0 else -math.inf  # beyond float64: refused below
    # Detached: the log-variances are fresh leaves, whatever graph `value` belongs to.
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device).detach()

    if not torch.isfinite(value).all():
        raise ValueError(f"{where}: expected a finite init_logvar for {name!r}, got {value}")

    try:
        return torch.broadcast_to(value, like.shape).clone()
    except RuntimeError:
        raise ValueError(
            f"{where}: expected init_logvar for {name!r} to broadcast to "
            f"{tuple(like.shape)}, got shape {tuple(value.shape)}"
        ) from None


def check_data(where: str, params: dict[str, Tensor], module: nn.Module) -> None:
    r"""Refuses picked parameters of `module` on the meta device (shapes without data) or
    uninitialized (a lazy module's): torch's own errors name no function."""

    meta = [name for name, p in params.items() if p.is_meta]
    if meta:
        raise ValueError(
            f"{where}: expected parameters with data, got {meta} on the meta device; "
            "materialize the module first (module.to_empty(device=...), then initialize or "
            "load its parameters)"
        )
    lazy = [name for name, p in params.items() if is_lazy(p)]
    if lazy:
        raise lazy_error(where, "initialized parameters", lazy, module)


def init(
    where: str,
    module: object,
    init_logvar: InitLogvar,
    include: Sequence[str],
    exclude: Sequence[str],
    empty: bool = False,
) -> Posterior:
    r"""Returns the posterior of the parameters `include` and `exclude` pick, at their
    values; a selection that picks none is an error unless `empty` (zuko's wrapper)."""

    check_module(where, module)
    inc_globs, inc = _patterns(where, "include", include)
    exc_globs, exc = _patterns(where, "exclude", exclude)
    with lock(module):  # another thread's call may have samples swapped in
        params = dict(module.named_parameters())
    names = [name for name in params if _picks(inc, exc, name)]

    if not empty:  # (zuko's wrapper picks by the first names, as zuko does)
        with lock(module):
            _refuse_tied(where, module, inc, exc, inc_globs, exc_globs, names)
    if not names and not empty:
        raise ValueError(
            f"{where}: expected include={inc_globs!r} and exclude={exc_globs!r} to pick at "
            f"least one parameter of {type(module).__name__}, got none"
        )

    check_data(where, {n: params[n] for n in names}, module)
    for name in names:
        p = params[name]
        if not p.is_floating_point():
            raise TypeError(
                f"{where}: expected real floating-point parameters, got {name!r} of dtype "
                f"{p.dtype}; a mean-field Gaussian over complex or integer values is not "
                "defined here: exclude it"
            )

    if isinstance(init_logvar, Mapping):
        unknown = sorted(set(init_logvar) - set(names))
        missing = [n for n in names if n not in init_logvar]
        if unknown or missing:
            raise ValueError(
                f"{where}: expected init_logvar to map every picked parameter name, got "
                f"unknown names {unknown} and missing names {missing}"
            )
        values = {n: init_logvar[n] for n in names}
    elif callable(init_logvar):
        values = {n: init_logvar(n, params[n]) for n in names}
    else:
        if isinstance(init_logvar, Tensor) and init_logvar.numel() != 1:
            # Broadcast against every parameter, a per-unit vector landed on a weight's
            # input columns (or failed on another parameter's shape).
            raise TypeError(
                f"{where}: expected init_logvar to be a float (or a one-element tensor), a "
                "dict by parameter name or a callable, got a tensor of shape "
                f"{tuple(init_logvar.shape)}; pass {{name: tensor}} for values per parameter"
            )
        values = dict.fromkeys(names, init_logvar)

    logvar = {n: _logvar_value(where, n, values[n], params[n]) for n in names}
    mean = {n: params[n].detach().clone() for n in names}

    return Posterior(
        mean={n: t.requires_grad_() for n, t in mean.items()},
        logvar={n: t.requires_grad_() for n, t in logvar.items()},
    )


def check_fits(where: str, st: Structure, module: nn.Module, posterior: Posterior) -> None:
    r"""Checks, before a draw, that the samples of a posterior will fit `module` (its
    structure `st`): the names (a tied weight's other names too), shapes, dtypes and
    devices of its parameters."""

    expected, aliases = st.expected, st.aliases
    for name, m in posterior.mean.items():
        e = expected.get(aliases.get(name, name))
        if e is None or m.shape != e.shape or m.dtype != e.dtype or m.device != e.device:
            check_matches(where, module, posterior)  # says what does not fit
            raise ValueError(
                f"{where}: expected posterior names, shapes, dtypes and devices of "
                f"{type(module).__name__}'s parameters, got {name!r}"
            )


def check_matches(where: str, module: nn.Module, posterior: Posterior) -> None:
    r"""Checks that a posterior's names, shapes, dtypes and devices are the module's."""

    named = dict(module.named_parameters())
    for name, m in posterior.mean.items():
        p = named.get(name)
        if p is None or p.shape != m.shape:
            raise ValueError(
                f"{where}: expected posterior names and shapes from "
                f"{type(module).__name__}.named_parameters(), got {name!r} of shape "
                f"{tuple(m.shape)}"
            )
        for field, t in (("mean", m), ("logvar", posterior.logvar[name])):
            if t.dtype != p.dtype or t.device != p.device:
                raise ValueError(
                    f"{where}: expected the posterior's {field}[{name!r}] with the module's "
                    f"dtype and device ({describe(p)}), got {describe(t)}"
                )


def copy_module(where: str, module: nn.Module) -> nn.Module:
    r"""Returns `copy.deepcopy(module)`, or raises a ValueError that says why there is
    none: a module holding a tensor computed from others (a sample of a `reparameterize()`
    block), which torch refuses to copy. The weight that a hook-based `weight_norm`,
    `spectral_norm` or pruning computes before every forward (from the last forward with
    gradients: computed from others) is copied detached: the copy's next forward computes
    it again."""

    computed = []
    for m in module.modules():
        for hook in weight_hooks(m):
            name = hook_name(hook)
            t = vars(m).get(name)
            if isinstance(t, Tensor) and t.grad_fn is not None:
                computed.append((m, name, t))
    try:
        for m, name, t in computed:
            vars(m)[name] = t.detach()
        return copy.deepcopy(module)
    except RuntimeError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"{where}: expected a module that copy.deepcopy can copy, got "
            f"{type(module).__name__}, which holds a tensor computed from others ({reason}): "
            "inside a BayesianModel.reparameterize() block the base holds a sample (call it "
            "after the block)"
        ) from e
    finally:
        for m, name, t in computed:
            vars(m)[name] = t


def mean_model(where: str, module: object, posterior: object) -> nn.Module:
    check_module(where, module)
    check_not_bridge(where, module)
    check_posterior(where, posterior)
    with lock(module):  # another thread's call may have samples swapped in
        check_matches(where, module, posterior)
        new = copy_module(where, module)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if name in posterior.mean:
                p.copy_(posterior.mean[name])

    return new


def posterior_from_variance(
    where: str, mean: dict[str, Tensor], variance: dict[str, Tensor]
) -> Posterior:
    r"""Returns the posterior :math:`\mathcal{N}(\mu, \mathrm{diag}(\sigma^2))` with these
    means and variances, as fresh leaves with `requires_grad=True` (as :func:`bayesflow.init`
    makes them).

    A posterior holds variances in :math:`[e^{-L}, e^{L}]` only (:data:`LOGVAR_LIMIT`):
    those outside are clamped to that range. Every method that ends in a posterior (Laplace,
    SWAG) writes its variances through this function.

    Raises:
        ValueError: If a variance is not finite and positive, or a mean is not finite, or
            the names or shapes of the two dicts differ.
    """

    if mean.keys() != variance.keys():
        raise ValueError(
            f"{where}: expected means and variances with the same names, got {sorted(mean)} "
            f"and {sorted(variance)}"
        )
    for name, m in mean.items():
        v = variance[name]
        if v.shape != m.shape:
            raise ValueError(
                f"{where}: expected the variance of {name!r} of shape {tuple(m.shape)}, "
                f"got {tuple(v.shape)}"
            )
        if not torch.isfinite(m).all():
            raise ValueError(f"{where}: expected finite means, got a non-finite one in {name!r}")
        if not (torch.isfinite(v).all() and (v > 0).all()):
            bad = v[~(torch.isfinite(v) & (v > 0))][0].item()
            raise ValueError(f"{where}: expected finite positive variances, got {bad} in {name!r}")

    return Posterior(
        mean={k: m.detach().clone().requires_grad_() for k, m in mean.items()},
        logvar={
            k: logvar_from_var(variance[k].detach()).to(m.dtype).requires_grad_()
            for k, m in mean.items()
        },
    )
