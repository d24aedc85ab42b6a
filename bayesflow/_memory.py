r"""How many samples run at once: as many as fit a memory budget (`chunk_size="auto"`), or,
by default on the CPU, as many as fit its last-level cache."""

from __future__ import annotations

__all__ = [
    "auto_chunk_size",
    "available_memory",
    "cache_bytes",
    "cache_chunk_size",
    "per_sample_bytes",
]

import glob
import os

from collections.abc import Callable
from typing import Any

import torch

from ._compat import allocated_bytes

# The share of the free memory a call may use when no budget is given.
FRACTION = 0.5

# The last-level cache when the system does not say (a common size for a server CPU).
DEFAULT_CACHE = 32 * 2**20
_CACHE: list[int] = []


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


def cache_bytes() -> int:
    r"""Returns the size of the CPU's largest cache, in bytes (read once from sysfs)."""

    if not _CACHE:
        sizes = []
        for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
            try:
                with open(path) as f:
                    text = f.read().strip().upper()
                scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
                sizes.append(int(text.rstrip("KMG")) * scale)
            except (OSError, ValueError):
                continue
        _CACHE.append(max(sizes, default=DEFAULT_CACHE))
    return _CACHE[0]


def cache_chunk_size(per_sample: int, n: int) -> int | None:
    r"""Returns how many samples to run at once on the CPU: all (:py:`None`) if their
    working set fits the last-level cache, else as many as fit it, at least one.

    K samples of a large call (a convolutional net at a large batch) overflow the caches,
    and every operation then runs at memory speed: chunks that fit run faster, and never
    slower than a loop over the samples (`python benchmarks/cnn_chunks.py` measures it).
    """

    budget = cache_bytes()
    if per_sample * n <= budget:
        return None
    return max(1, budget // per_sample)
