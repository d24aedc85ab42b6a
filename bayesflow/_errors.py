r"""Errors that a call passes on as they are, never turning them into a loop fallback."""

from __future__ import annotations

__all__ = [
    "ArgumentWritten",
    "NonFiniteError",
    "OutputError",
    "OutputStructureError",
    "Passthrough",
]


class Passthrough(Exception):
    r"""An error that must reach the caller as it is, never turned into a fallback."""


class OutputError(Passthrough, TypeError):
    r"""`fn` returned something that is not made of tensors."""


class NonFiniteError(Passthrough, RuntimeError):
    r"""A computation reached NaN or infinity where it cannot go on (an ODE solver)."""


class OutputStructureError(Passthrough, ValueError):
    r"""`fn` returned outputs of another structure for some samples than for others."""


class ArgumentWritten(Passthrough, ValueError):
    r"""`fn` wrote an argument that every sample shares in place, which one vectorized
    pass writes once where the loop writes it once per sample."""
