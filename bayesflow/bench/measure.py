r"""Timing (:class:`torch.utils.benchmark.Timer`), threads and peak memory."""

from __future__ import annotations

__all__ = ["peak_memory", "threads", "time_call"]

import contextlib
import ctypes
import threading
import time

from collections.abc import Callable, Iterator
from typing import Any

import torch


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    r"""Sets torch's number of CPU threads for the duration of the block."""

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo() -> Callable[[], int] | None:
    try:
        libc = ctypes.CDLL(None)
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _Mallinfo2

    def heap() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return heap


_HEAP = _mallinfo()


def peak_memory(call: Callable[[], Any], device: torch.device) -> tuple[float | None, str]:
    r"""Runs `call` once and returns the peak memory, in MiB, that it took above what was
    there before, and how it was measured.

    On CUDA, the allocator's peak. On CPU, the bytes in use of glibc's malloc (which torch's
    CPU allocator uses), polled while the call runs: a peak shorter than the polling
    period can be missed, so it is a lower bound; :py:`None` without glibc.
    """

    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "cuda-max-allocated"

    if _HEAP is None:
        call()
        return None, "none"

    heap = _HEAP
    base = heap()
    peak = [base]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], heap())
            time.sleep(1e-4)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        call()
    finally:
        done.set()
        thread.join()
    return (peak[0] - base) / 2**20, "cpu-malloc-peak"


def time_call(
    call: Callable[[], Any], num_threads: int, device: torch.device, min_time: float, repeats: int
) -> dict[str, Any]:
    r"""Times `call` after warm-up calls: the first gives its peak memory, the next its
    time per call, from which the number of calls per measurement is set.

    Each of the `repeats` measurements lasts about `min_time / repeats` seconds; a cell
    slower than that gets single-call measurements, at least 3 (or `repeats` if fewer) and
    about `2 * min_time` seconds of them.

    Returns:
        The median, quartiles, IQR and minimum in ms, the number of measurements and of
        calls per measurement, and the peak memory.
    """

    from torch.utils.benchmark import Timer

    # The Timer synchronizes CUDA itself.
    timer = Timer("call()", globals={"call": call}, num_threads=num_threads)

    peak, kind = peak_memory(call, device)
    # Not the call above: on CPU, starting and joining its polling thread takes up to a
    # millisecond or more, which would give a fast call a small fraction of `min_time`.
    once = timer.timeit(1).median
    budget = min_time / repeats
    if once < budget / 100:  # one fast call is mostly timer overhead and jitter: time more
        n = int(budget / 10 / once)
        once = timer.timeit(n).median

    number = max(1, int(budget / max(once, 1e-9)))
    if number == 1:
        repeats = min(repeats, max(3, int(2 * min_time / once)))
    times = [timer.timeit(number).median for _ in range(repeats)]
    t = torch.tensor(times, dtype=torch.float64) * 1e3
    q25, q50, q75 = (torch.quantile(t, p).item() for p in (0.25, 0.5, 0.75))

    return {
        "median_ms": q50,
        "iqr_ms": q75 - q25,
        "q25_ms": q25,
        "q75_ms": q75,
        "min_ms": t.min().item(),
        "runs": repeats,
        "calls_per_run": number,
        "peak_mem_mb": peak,
        "mem_kind": kind,
    }
