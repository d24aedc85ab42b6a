r"""Vmap-safe stand-ins for the pieces of zuko that torch.func cannot batch.

Zuko 1.6 has six pieces that :func:`torch.func.vmap` cannot batch: the in-place merge of
coupling transforms (NICE, RealNVP), the :py:`autograd.grad` derivative of monotonic
transforms (NAF, GF, BPF), the old-style autograd functions behind bisection (inverse of
every monotonic transform), Gauss-Legendre quadrature (UNAF, SOSPF) and the adaptive ODE
solver, and the :py:`autograd.grad` trace of free-form Jacobian transforms (CNF). A
seventh, GMM's :func:`torch.masked_scatter`, runs under vmap but slowly, with a warning.

:func:`vmap_safe` swaps each of them for its equivalent in
:mod:`bayesflow._zuko_transforms` for the duration of a block, and puts zuko's own objects
back on exit, also when the block raises. Nothing is patched at import. A piece is swapped
only if it is still a function zuko defined (by module and qualified name; an object put
there by someone else is left alone) and a tiny probe shows that vmap cannot run it: a
zuko release that fixes a piece is used as is.
"""

from __future__ import annotations

__all__ = ["vmap_safe"]

import sys
import threading

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from torch.func import vmap

from . import _zuko_transforms as _safe


@dataclass(frozen=True)
class _Piece:
    r"""A zuko attribute, its vmap-safe equivalent and a probe of the original."""

    module: str
    owner: str | None  # a class of `module`, or None for a module-level function
    name: str
    replacement: Callable[..., Any]
    probe: Callable[[Any], None]  # runs the original under vmap; raises if it cannot
    origin: str = "zuko.transforms"  # the module where zuko defines the original

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


def _probe_merge(merge: Callable[..., Any]) -> None:
    transforms = sys.modules["zuko.transforms"]
    t = transforms.CouplingTransform(meta=None, mask=torch.tensor([True, False, True]))
    s, x = _probe_input()

    def f(si: torch.Tensor) -> torch.Tensor:
        x_a, x_b = t.split(x)
        return merge(t, x_a, x_b * si, x.shape)

    vmap(f)(s)


def _probe_monotonic(call_and_ladj: Callable[..., Any]) -> None:
    transforms = sys.modules["zuko.transforms"]
    s, x = _probe_input()

    def f(si: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = transforms.MonotonicTransform(lambda u: u * si, phi=(si,))
        return call_and_ladj(t, x)

    vmap(f)(s)


def _probe_bisection(bisection: Callable[..., Any]) -> None:
    s, x = _probe_input()
    vmap(lambda si: bisection(lambda u: u * si, x, -2.0, 2.0, n=2, phi=(si,)))(s)


def _probe_gauss_legendre(gauss_legendre: Callable[..., Any]) -> None:
    s, x = _probe_input()
    vmap(lambda si: gauss_legendre(lambda u: u * si, torch.zeros_like(x), x, n=2, phi=(si,)))(s)


def _probe_odeint(odeint: Callable[..., Any]) -> None:
    s, x = _probe_input()
    vmap(lambda si: odeint(lambda t, u: -u * si, x, 0.0, 0.1, phi=(si,)))(s)


def _probe_ffj(call_and_ladj: Callable[..., Any]) -> None:
    transforms = sys.modules["zuko.transforms"]
    s, x = _probe_input()

    def f(si: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = transforms.FreeFormJacobianTransform(lambda t, u: -u * si, 0.0, 0.1, phi=(si,))
        return call_and_ladj(t, x[None])

    vmap(f)(s)


def _probe_gmm(forward_full: Callable[..., Any]) -> None:
    # The original is right under vmap, only slow (and it warns): feature-detect it.
    if "masked_scatter" in getattr(getattr(forward_full, "__code__", None), "co_names", ()):
        raise NotImplementedError("masked_scatter has no batching rule")


_PIECES = (
    _Piece("zuko.transforms", "CouplingTransform", "merge", _safe.coupling_merge, _probe_merge),
    _Piece(
        "zuko.transforms",
        "MonotonicTransform",
        "call_and_ladj",
        _safe.monotonic_call_and_ladj,
        _probe_monotonic,
    ),
    _Piece("zuko.transforms", None, "bisection", _safe.bisection, _probe_bisection, "zuko.utils"),
    _Piece(
        "zuko.transforms",
        None,
        "gauss_legendre",
        _safe.gauss_legendre,
        _probe_gauss_legendre,
        "zuko.utils",
    ),
    _Piece("zuko.transforms", None, "odeint", _safe.odeint, _probe_odeint, "zuko.utils"),
    _Piece(
        "zuko.transforms",
        "FreeFormJacobianTransform",
        "call_and_ladj",
        _safe.ffj_call_and_ladj,
        _probe_ffj,
    ),
    _Piece(
        "zuko.mixtures",
        "GMM",
        "_forward_full",
        _safe.gmm_forward_full,
        _probe_gmm,
        "zuko.mixtures",
    ),
)

# Probe verdicts, per original object (kept alive here so that ids stay unique).
_VERDICTS: dict[int, tuple[Any, bool]] = {}

_LOCK = threading.RLock()
_DEPTH = 0
_APPLIED: list[tuple[Any, str, Any]] = []


def _needed(piece: _Piece, original: Any) -> bool:
    if id(original) not in _VERDICTS:
        try:
            with torch.inference_mode(False), torch.enable_grad():
                piece.probe(original)
        except Exception:
            needed = True
        else:
            needed = False
        _VERDICTS[id(original)] = (original, needed)

    return _VERDICTS[id(original)][1]


def _apply() -> list[tuple[Any, str, Any]]:
    applied = []
    try:
        for piece in _PIECES:
            target = piece.target()
            if target is None:
                continue

            current = piece.original(target)
            if current is None:
                continue

            if not piece.is_zukos(current):
                continue  # someone else replaced it: leave it alone

            if _needed(piece, current):
                if not applied:
                    _safe.prepare()
                setattr(target, piece.name, piece.replacement)
                applied.append((target, piece.name, current))
    except BaseException:
        _restore(applied)
        raise

    return applied


def _restore(applied: list[tuple[Any, str, Any]]) -> None:
    for target, name, original in reversed(applied):
        setattr(target, name, original)


@contextmanager
def vmap_safe() -> Iterator[None]:
    r"""Makes zuko's flows batchable by :func:`torch.func.vmap` for the duration of the block.

    Re-entrant and thread-safe: the pieces are swapped when the outermost block is entered
    and restored when it exits, also when it raises. While a block is active, zuko code
    that runs in other threads sees the vmap-safe pieces too; they give the same numbers.
    """

    global _APPLIED, _DEPTH

    with _LOCK:
        if _DEPTH == 0:
            _APPLIED = _apply()
        _DEPTH += 1

    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                applied, _APPLIED = _APPLIED, []
                _restore(applied)
