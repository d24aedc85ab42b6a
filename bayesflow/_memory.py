r"""How many samples run at once: as many as fit a memory budget (`chunk_size="auto"`), or,
by default on the CPU, as many as fit its last-level cache."""

from __future__ import annotations

__all__ = [
    "auto_chunk_size",
    "available_memory",
    "cache_bytes",
    "cache_chunk_size",
    "core_cache_bytes",
    "one_by_one",
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

# The last-level cache, and the cache of one core (level 2), when the system does not say
# (common sizes for a server CPU).
DEFAULT_CACHE = 32 * 2**20
DEFAULT_CORE_CACHE = 2**20
_CACHE: list[int] = []
_CORE_CACHE: list[int] = []


def per_sample_bytes(call: Callable[[], Any]) -> int:
    r"""Returns the bytes that one sample's call allocates, at least 1."""

    return max(allocated_bytes(call), 1)


def available_memory(device: torch.device) -> int:
    r"""Returns the free memory of `device`, in bytes (the available physical memory on
    the CPU)."""

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:  # Linux: what can be allocated without swapping, reclaimable caches included
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # elsewhere: the free pages only
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on every platform
        return 2**31


def auto_chunk_size(per_sample: int, n: int, device: torch.device, max_memory: int | None) -> int:
    r"""Returns the number of samples per chunk: as many as fit in `max_memory` bytes (by
    default a share of the device's free memory), at least one, at most `n`."""

    budget = int(FRACTION * available_memory(device)) if max_memory is None else max_memory
    return max(1, min(n, budget // per_sample))


def _cache_sizes() -> dict[int, int]:
    r"""Returns the size in bytes of each level of the first CPU's caches, from sysfs (none
    where it does not say)."""

    sizes: dict[int, int] = {}
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(index, "size")) as f:
                text = f.read().strip().upper()
            with open(os.path.join(index, "level")) as f:
                level = int(f.read().strip())
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            size = int(text.rstrip("KMG")) * scale
        except (OSError, ValueError):
            continue
        sizes[level] = max(size, sizes.get(level, 0))
    return sizes


def cache_bytes() -> int:
    r"""Returns the size of the CPU's largest cache, in bytes (read once from sysfs)."""

    if not _CACHE:
        _CACHE.append(max(_cache_sizes().values(), default=DEFAULT_CACHE))
    return _CACHE[0]


def core_cache_bytes() -> int:
    r"""Returns the size of one core's level-2 cache, in bytes (read once from sysfs)."""

    if not _CORE_CACHE:
        _CORE_CACHE.append(_cache_sizes().get(2, DEFAULT_CORE_CACHE))
    return _CORE_CACHE[0]


def cache_chunk_size(per_sample: int, n: int) -> int | None:
    r"""Returns how many samples to run at once on the CPU: all (:py:`None`) if their
    working set fits the last-level cache, else as many as fit it, at least one.

    K samples of a large call (a convolutional net at a large batch) overflow the caches,
    and every operation then runs at memory speed: chunks that fit run faster
    (`python benchmarks/cnn_chunks.py` measures it).
    """

    budget = cache_bytes()
    if per_sample * n <= budget:
        return None
    return max(1, budget // per_sample)


def one_by_one(per_sample: int) -> bool:
    r"""Whether samples run faster one by one (a loop) than together on the CPU: when one
    sample's working set overflows a core's cache.

    Such a sample gains nothing from running with others: each of its operations is long
    enough that a loop's fixed cost per operation is small, and one sample at a time
    through the whole call keeps each result in cache for the next operation, where a
    vectorized operation over several samples evicts it (`python benchmarks/cnn_chunks.py`
    measures it).
    """

    return per_sample > core_cache_bytes()
