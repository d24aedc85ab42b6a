r"""What became of a benchmark cell: a status, and the exceptions that lead to each."""

from __future__ import annotations

__all__ = [
    "BUGS",
    "Named",
    "NotApplicable",
    "NotInstalled",
    "Status",
    "Unsupported",
    "Wrong",
    "first_line",
]

from enum import Enum


class Named(str, Enum):
    r"""An enum whose members print as their values (what tables and JSON show)."""

    def __str__(self) -> str:
        return self.value


class Status(Named):
    r"""The outcome of one cell (model, mode, K, method); its value is what JSON holds."""

    OK = "ok"
    WRONG = "wrong"
    #: One of bayesflow's own methods raised a programming error (see :data:`BUGS`): a
    #: bug to fix, not a limitation (the run exits with status 1, as for `wrong`).
    ERROR = "error"
    UNSUPPORTED = "unsupported"
    NOT_APPLICABLE = "n/a"
    NOT_INSTALLED = "not installed"
    OOM = "oom"


class NotApplicable(Exception):
    r"""Raised by a method that makes no sense for a case or mode."""


class NotInstalled(Exception):
    r"""Raised by a method whose library is not installed."""


class Unsupported(Exception):
    r"""Raised by a method that cannot run a case."""


class Wrong(Exception):
    r"""Raised by a method whose check fails before any output is compared."""


#: Exceptions that no limitation of a model or a mode raises, only a bug in the code that
#: runs it: bayesflow refuses what it cannot run with ValueError, TypeError, RuntimeError or
#: NotImplementedError, each naming the call. A peer library raising one is `unsupported`.
BUGS = (AttributeError, NameError, AssertionError, KeyError, IndexError, ZeroDivisionError)


def first_line(err: BaseException) -> str:
    r"""The first line of an exception's message, at most 200 characters (a cell's detail)."""

    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""
