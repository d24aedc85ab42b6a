r"""How many samples fit in a memory budget: `chunk_size="auto"`."""

from __future__ import annotations

__all__ = ["auto_chunk_size", "available_memory", "per_sample_bytes"]

import os

from collections.abc import Callable
from typing import Any

import torch

from ._compat import allocated_bytes

# The share of the free memory a call may use when no budget is given.
FRACTION = 0.5


def per_sample_bytes(call: Callable[[], Any]) -> int:
    r"""Returns the bytes that one sample's call allocates, at least 1."""

    return max(allocated_bytes(call), 1)


def available_memory(device: torch.device) -> int:
    r"""Returns the free memory of `device`, in bytes (the available physical memory on
    the CPU)."""

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on every platform
        return 2**31


def auto_chunk_size(per_sample: int, n: int, device: torch.device, max_memory: int | None) -> int:
    r"""Returns the number of samples per chunk: as many as fit in `max_memory` bytes (by
    default a share of the device's free memory), at least one, at most `n`."""

    budget = int(FRACTION * available_memory(device)) if max_memory is None else max_memory
    return max(1, min(n, budget // per_sample))
