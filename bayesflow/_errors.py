r"""Errors that a call passes on as they are, never turning them into a loop fallback."""

from __future__ import annotations

__all__ = ["NonFiniteError", "OutputError", "Passthrough"]


class Passthrough(Exception):
    r"""An error that must reach the caller as it is, never turned into a fallback."""


class OutputError(Passthrough, TypeError):
    r"""`fn` returned something that is not made of tensors."""


class NonFiniteError(Passthrough, RuntimeError):
    r"""A computation reached NaN or infinity where it cannot go on (an ODE solver)."""
