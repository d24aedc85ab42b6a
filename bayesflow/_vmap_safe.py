r"""Vmap-safe stand-ins for the pieces of zuko that torch.func cannot batch.

Zuko 1.6 has six pieces that :func:`torch.func.vmap` cannot batch: the in-place merge of
coupling transforms (NICE, RealNVP), the :py:`autograd.grad` derivative of monotonic
transforms (NAF, GF, BPF), the old-style autograd functions behind bisection (inverse of
every monotonic transform), Gauss-Legendre quadrature (UNAF, SOSPF) and the adaptive ODE
solver, and the :py:`autograd.grad` trace of free-form Jacobian transforms (CNF). A
seventh, GMM's :func:`torch.masked_scatter`, runs under vmap but slowly, with a warning.

While at least one thread is inside :func:`vmap_safe`, each of those attributes of zuko
holds a dispatcher: in a thread inside a bayesflow call (vectorized, looped or of one
sample: zuko's pieces that recompute in their backward pass would see the module's own
parameters by then) it runs the equivalent in :mod:`bayesflow._zuko_transforms`, in any
other thread zuko's own function. When the last such thread leaves, zuko's very objects
are put back. Nothing is patched at import.

A piece is replaced only if it is still the function zuko defined (by module and
qualified name; an object put there by someone else is left alone) and a probe shows,
on a tiny input, that zuko's version runs unbatched, fails under vmap, and that the
stand-in gives its numbers. A zuko release that fixes a piece is used as is; one that
changed it so that the probe no longer runs is left alone, with a warning.
"""

from __future__ import annotations

__all__ = ["vmap_safe"]

import sys
import threading
import types
import warnings

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from torch.func import vmap

from . import _zuko_transforms as _safe
from ._caches import PerObject, register
from ._compat import in_forward_ad, is_compiling, load_jvp_decompositions, outside_func_transforms


@dataclass(frozen=True)
class _Piece:
    r"""A zuko attribute, its vmap-safe equivalent and a probe of the original."""

    module: str
    owner: str | None  # a class of `module`, or None for a module-level function
    name: str
    stand_in: str  # the name of its replacement in bayesflow._zuko_transforms
    probe: Callable[[Any, bool], Any]  # runs an implementation on a tiny input, looped or not
    origin: str = "zuko.transforms"  # the module where zuko defines the original

    @property
    def replacement(self) -> Callable[..., Any]:
        return getattr(_safe, self.stand_in)

    def target(self) -> Any | None:
        module = sys.modules.get(self.module)
        if module is None:
            return None
        if self.owner is None:
            return module
        return getattr(module, self.owner, None)

    def is_zukos(self, obj: Any) -> bool:
        r"""Whether `obj` is the function zuko defines for this piece (any zuko version)."""

        qualname = self.name if self.owner is None else f"{self.owner}.{self.name}"
        return (
            getattr(obj, "__module__", None) == self.origin
            and getattr(obj, "__qualname__", None) == qualname
        )

    def original(self, target: Any) -> Any | None:
        # The attribute as defined on the target itself (not inherited), or None.
        return vars(target).get(self.name)


def _probe_input() -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.linspace(0.5, 1.5, 2, dtype=torch.float64, requires_grad=True)
    x = torch.linspace(-1.0, 1.0, 3, dtype=torch.float64)
    return s, x


def _over(f: Callable[[torch.Tensor], Any], s: torch.Tensor, batched: bool) -> Any:
    r"""Runs `f` on every element of `s`, vectorized or in a loop, stacking the outputs."""

    if batched:
        return vmap(f)(s)
    outs = [f(si) for si in s]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs, strict=True))
    return torch.stack(outs)


def _probe_merge(merge: Callable[..., Any], batched: bool) -> Any:
    transforms = sys.modules["zuko.transforms"]
    t = transforms.CouplingTransform(meta=None, mask=torch.tensor([True, False, True]))
    s, x = _probe_input()

    def f(si: torch.Tensor) -> torch.Tensor:
        x_a, x_b = t.split(x)
        return merge(t, x_a, x_b * si, x.shape)

    return _over(f, s, batched)


def _probe_monotonic(call_and_ladj: Callable[..., Any], batched: bool) -> Any:
    transforms = sys.modules["zuko.transforms"]
    s, x = _probe_input()

    def f(si: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = transforms.MonotonicTransform(lambda u: u * si + u**3, phi=(si,))
        return call_and_ladj(t, x)

    return _over(f, s, batched)


def _probe_bisection(bisection: Callable[..., Any], batched: bool) -> Any:
    s, x = _probe_input()
    return _over(lambda si: bisection(lambda u: u * si, x, -2.0, 2.0, n=8, phi=(si,)), s, batched)


def _probe_gauss_legendre(gauss_legendre: Callable[..., Any], batched: bool) -> Any:
    s, x = _probe_input()

    def f(si: torch.Tensor) -> torch.Tensor:
        return gauss_legendre(lambda u: u * si, torch.zeros_like(x), x, n=2, phi=(si,))

    return _over(f, s, batched)


def _probe_odeint(odeint: Callable[..., Any], batched: bool) -> Any:
    s, x = _probe_input()
    return _over(lambda si: odeint(lambda t, u: -u * si, x, 0.0, 0.1, phi=(si,)), s, batched)


def _probe_ffj(call_and_ladj: Callable[..., Any], batched: bool) -> Any:
    transforms = sys.modules["zuko.transforms"]
    s, x = _probe_input()

    def f(si: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = transforms.FreeFormJacobianTransform(lambda t, u: -u * si, 0.0, 0.1, phi=(si,))
        return call_and_ladj(t, x[None])

    return _over(f, s, batched)


def _probe_gmm(forward_full: Callable[..., Any], batched: bool) -> Any:
    # Zuko's version runs under vmap, only slowly and with a warning: feature-detect it.
    code = getattr(forward_full, "__code__", None)
    if batched and "masked_scatter" in getattr(code, "co_names", ()):
        raise NotImplementedError("masked_scatter has no batching rule")

    s, _ = _probe_input()
    owner = types.SimpleNamespace(epsilon=1e-5)
    logits = torch.tensor([0.3, -0.2], dtype=torch.float64)
    loc = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).view(2, 3)
    diag = torch.linspace(-0.5, 0.5, 6, dtype=torch.float64).view(2, 3)
    tril = torch.linspace(0.1, 0.6, 6, dtype=torch.float64).view(2, 3)
    x = torch.linspace(-0.5, 0.7, 3, dtype=torch.float64)

    def f(si: torch.Tensor) -> torch.Tensor:
        return forward_full(owner, logits, loc * si, diag, tril * si).log_prob(x)

    return _over(f, s, batched)


_PIECES = (
    _Piece("zuko.transforms", "CouplingTransform", "merge", "coupling_merge", _probe_merge),
    _Piece(
        "zuko.transforms",
        "MonotonicTransform",
        "call_and_ladj",
        "monotonic_call_and_ladj",
        _probe_monotonic,
    ),
    _Piece("zuko.transforms", None, "bisection", "bisection", _probe_bisection, "zuko.utils"),
    _Piece(
        "zuko.transforms",
        None,
        "gauss_legendre",
        "gauss_legendre",
        _probe_gauss_legendre,
        "zuko.utils",
    ),
    _Piece("zuko.transforms", None, "odeint", "odeint", _probe_odeint, "zuko.utils"),
    _Piece(
        "zuko.transforms",
        "FreeFormJacobianTransform",
        "call_and_ladj",
        "ffj_call_and_ladj",
        _probe_ffj,
    ),
    _Piece(
        "zuko.mixtures",
        "GMM",
        "_forward_full",
        "gmm_forward_full",
        _probe_gmm,
        "zuko.mixtures",
    ),
)

# Probe verdicts, per original object.
_VERDICTS: PerObject[bool] = PerObject()

# Zuko releases the stand-ins were written and tested against.
TESTED = ((1, 6),)

_LOCK = threading.Lock()
_LOCAL = threading.local()
_USERS = 0  # threads inside a bayesflow call
_INSTALLED: list[tuple[Any, str, Any]] = []
_WARNED: set[str] = set()
register(_WARNED.clear)


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _zuko_version() -> str:
    return str(getattr(sys.modules.get("zuko"), "__version__", "unknown"))


def _check_version() -> None:
    version = _zuko_version()
    try:
        major_minor = tuple(int(v) for v in version.split(".")[:2])
    except ValueError:
        major_minor = None
    if major_minor not in TESTED:
        tested = ", ".join(f"{a}.{b}" for a, b in TESTED)
        _warn_once(
            "version",
            f"bayesflow: zuko {version} is outside the tested range ({tested}.x); each "
            "vmap-safe stand-in is checked against zuko's own piece before it is used",
        )


def _agree(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_agree(x, y) for x, y in zip(a, b, strict=True))
    return a is None and b is None


def _verdict(piece: _Piece, original: Any) -> bool:
    r"""Whether the stand-in is needed for `original` and gives its numbers.

    The probes run outside any :mod:`torch.func` transform of the caller: zuko's
    old-style functions raise inside one, which read as "zuko changed" and, cached, kept
    the stand-ins out of every later call."""

    with outside_func_transforms(), torch.inference_mode(False), torch.enable_grad():
        try:
            expected = piece.probe(original, False)
        except Exception as err:
            _warn_once(
                piece.name,
                f"bayesflow: zuko {_zuko_version()}'s {piece.name} no longer runs the probe "
                f"of its vmap-safe stand-in ({type(err).__name__}); it is left as zuko "
                "defines it, and vmap_call falls back to a loop where vmap cannot run it",
            )
            return False
        try:
            piece.probe(original, True)
        except Exception:
            pass
        else:
            return False  # zuko's own piece runs under vmap
        try:
            load_jvp_decompositions()
            got = piece.probe(piece.replacement, False)
            batched = piece.probe(piece.replacement, True)
        except Exception as err:
            got, batched = err, None
        if not (_agree(got, expected) and batched is not None):
            _warn_once(
                piece.name,
                f"bayesflow: the vmap-safe stand-in for zuko {_zuko_version()}'s {piece.name} "
                "does not reproduce it; it is not used, and vmap_call falls back to a loop",
            )
            return False
    return True


def _needed(piece: _Piece, original: Any) -> bool:
    verdict = _VERDICTS.get(original)
    if verdict is None:
        if in_forward_ad():
            # Under an open level of forward-mode AD (the process's, maybe another
            # thread's) the probes' own jvp cannot run: no verdict, none remembered (a
            # "no" would keep the stand-ins out of every later call); zuko's own piece
            # runs in this block.
            return False
        verdict = _VERDICTS.put(original, _verdict(piece, original))
    return verdict


def _depth() -> list[int]:
    r"""Returns this thread's count of open blocks, as an object: a block left in another
    thread (its context manager exited there) counts down the thread that entered it."""

    depth = getattr(_LOCAL, "depth", None)
    if depth is None:
        depth = _LOCAL.depth = [0]
    return depth


def _inside() -> bool:
    depth = getattr(_LOCAL, "depth", None)
    return depth is not None and depth[0] > 0


def _dispatcher(original: Any, replacement: Callable[..., Any]) -> Callable[..., Any]:
    def dispatch(*args: Any, **kwargs: Any) -> Any:
        return (replacement if _inside() else original)(*args, **kwargs)

    dispatch.__doc__ = original.__doc__
    dispatch.bayesflow_original = original  # type: ignore[attr-defined]
    return dispatch


def _install() -> list[tuple[Any, str, Any]]:
    if "zuko" in sys.modules:
        _check_version()

    installed = []
    try:
        for piece in _PIECES:
            target = piece.target()
            if target is None:
                continue
            current = piece.original(target)
            if current is None or not piece.is_zukos(current):
                continue  # absent, or someone else replaced it: leave it alone
            if _needed(piece, current):
                load_jvp_decompositions()
                setattr(target, piece.name, _dispatcher(current, piece.replacement))
                installed.append((target, piece.name, current))
    except BaseException:
        _restore(installed)
        raise

    return installed


def _restore(installed: list[tuple[Any, str, Any]]) -> None:
    for target, name, original in reversed(installed):
        setattr(target, name, original)


@contextmanager
def vmap_safe(uses_zuko: bool = True) -> Iterator[None]:
    r"""Makes zuko's flows batchable by :func:`torch.func.vmap` in this thread, for the
    duration of the block.

    Re-entrant. Other threads keep running zuko's own functions unless they are inside a
    block of their own. Under :func:`torch.compile` tracing nothing is swapped.
    """

    global _INSTALLED, _USERS

    counter = _depth()
    depth = counter[0]
    if not uses_zuko or is_compiling() or "zuko.transforms" not in sys.modules:
        yield
        return

    if depth == 0:
        with _LOCK:
            if _USERS == 0:
                _INSTALLED = _install()
            _USERS += 1
    counter[0] = depth + 1

    try:
        yield
    finally:
        counter[0] = depth
        if depth == 0:
            with _LOCK:
                _USERS -= 1
                if _USERS == 0:
                    installed, _INSTALLED = _INSTALLED, []
                    _restore(installed)
