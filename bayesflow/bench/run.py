r"""The benchmark's loop: every model, mode, K and method, checked, then timed."""

from __future__ import annotations

__all__ = ["Options", "measure_cell", "run_bench"]

import contextlib
import os
import platform
import sys
import time

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import zuko

import bayesflow as bf

from .cases import SMALL, Case, make_case
from .checks import (
    STATISTICAL_SAMPLES,
    check_deterministic,
    check_exact,
    check_oracle,
    check_statistically,
    mode_fn,
)
from .measure import threads as _threads
from .measure import time_call
from .methods import LOOPS, METHODS, THEIRS, Method, Noise, comparable
from .status import BUGS, NotApplicable, NotInstalled, Status, Unsupported, Wrong, first_line


@dataclass(frozen=True)
class Options:
    r"""How the cells are built and timed.

    Attributes:
        batch: The batch size, or several (a batch sweep); each model's default if
            :py:`None`.
        device: The device.
        dtype: The floating point type.
        threads: The number of CPU threads; torch's current number if :py:`None`.
        chunk_size: The chunk size of the vectorized methods.
        min_time: The time, in seconds, to spend timing each cell.
        repeats: The number of timed measurements, of which medians and IQRs are taken.
        seed: The seed of the models, inputs and checks.
        model_samples: Numbers of samples K for some models, in place of `samples`.
        check_samples: The least number of samples of a statistical check.
        max_loop_samples: The largest K at which the Python loops over samples
            (:data:`~bayesflow.bench.methods.LOOPS`) run; no limit if :py:`None`.
        small: Whether the slowest flows take their smaller settings
            (:data:`~bayesflow.bench.cases.SMALL`), for a smoke test.
    """

    batch: int | Sequence[int] | None = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    threads: int | None = None
    chunk_size: int | None = None
    min_time: float = 0.25
    repeats: int = 7
    seed: int = 0
    model_samples: Mapping[str, Sequence[int]] = field(default_factory=dict)
    check_samples: int = STATISTICAL_SAMPLES
    max_loop_samples: int | None = None
    small: bool = False


def _wrap_mode(method: Method, case: Case, run: Callable, mode: str) -> Callable:
    r"""Turns `run(seed) -> outputs` into the work of a mode."""

    if mode == "train":
        if method.targets is None:  # the method's run is the whole training step
            return run
        targets = method.targets(case)

        def train(seed: int | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            losses = case.loss(run(seed))
            if not losses.requires_grad:  # a gradient of none of the posterior's tensors
                raise Wrong(f"{method.name}: its loss records no gradient")
            grads = torch.autograd.grad(losses.mean(), list(targets.values()), allow_unused=True)
            missing = [name for name, g in zip(targets, grads, strict=True) if g is None]
            if missing:
                raise Wrong(f"{method.name}: no gradient reaches {missing[0]}")
            return losses.detach(), dict(zip(targets, grads, strict=True))

        return train

    def infer(seed: int | None) -> torch.Tensor:
        with torch.no_grad():
            return run(seed)

    return infer


def _error_type(err: BaseException) -> str:
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return type(cause).__name__


def _failure(err: Exception, method: Method, K: int) -> tuple[Status, str]:
    r"""The status and detail of a cell whose method raised `err`."""

    if _is_oom(err):
        return Status.OOM, f"out of memory at K={K}"
    if isinstance(err, Unsupported):
        return Status.UNSUPPORTED, str(err)
    # A crash of bayesflow's own method (a programming error, or one that bayesflow
    # wrapped, as vmap_call(fallback=False) wraps what stopped vmap): not a limitation.
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, BUGS) and method.name not in THEIRS:
        return Status.ERROR, f"{_error_type(err)}: {first_line(err)}"
    return Status.UNSUPPORTED, f"{_error_type(err)}: {first_line(err)}"


def _finite_loss(losses: Any) -> bool:
    r"""Whether the losses of a training step are finite."""

    return not isinstance(losses, torch.Tensor) or bool(torch.isfinite(losses).all())


def _is_oom(err: BaseException) -> bool:
    # CUDA's out of memory error, or the CPU allocator's RuntimeError ("DefaultCPUAllocator:
    # can't allocate memory: you tried to allocate ... bytes").
    text = str(err).lower()
    return (
        isinstance(err, torch.OutOfMemoryError)
        or "out of memory" in text
        or "can't allocate memory" in text
    )


def measure_cell(
    method: Method, case: Case, K: int, mode: str, options: Options
) -> dict[str, Any]:
    r"""Checks one method on one case, mode and K and, if it passed, times it.

    Returns:
        The cell's record fields: `status` (a :class:`Status`), `detail`, `error` and
        the timings of :func:`~bayesflow.bench.measure.time_call` (:py:`None` unless ok).
    """

    empty = {"median_ms": None, "iqr_ms": None, "peak_mem_mb": None, "error": None}
    device = next(iter(case.posterior.mean.values())).device

    def build(k: int, oracle: bool = False) -> Callable:
        fn, args = mode_fn(case, mode)
        if oracle:  # a loop: no chunks
            run = method.oracle(case, k, mode, fn, args)
        else:
            run = method.build(case, k, mode, fn, args, chunk_size=options.chunk_size)
        if mode == "train" and not method.differentiable:
            raise NotApplicable("no gradient reaches the posterior")
        return _wrap_mode(method, case, run, mode)

    def failed(status: Status, detail: str) -> dict[str, Any]:
        if status is Status.OOM and device.type == "cuda":
            torch.cuda.empty_cache()
        return {**empty, "status": status, "detail": detail}

    statistical = method.noise in (Noise.LOCAL, Noise.OWN)
    compile_s = None
    try:
        t0 = time.perf_counter()
        if statistical:
            check = check_statistically(
                case,
                K,
                mode,
                method.noise,
                build,
                options.seed,
                min(options.check_samples, case.check_samples or options.check_samples),
                method.kl,
            )
            # Built anew after the check, which built its own: some peers hold global
            # state (Pyro's parameter store), valid for the latest build only.
            work = build(K) if check.ok else None
            if work is not None and method.oracle is not None:
                # The law of the estimator is checked above; this is the object timed, at
                # its K, against bayesflow's loop on the same draws.
                exact = check_oracle(case, mode, work, build(K, oracle=True), options.seed)
                check = check if exact.ok else exact
        elif method.noise is Noise.NONE:
            work = build(K)
            check = check_deterministic(case, mode, work, options.seed)
        else:
            work = build(K)
            check = check_exact(method, case, K, mode, work, options.seed)
        if method.name == "vmap-compiled":
            compile_s = time.perf_counter() - t0
    except NotApplicable as e:
        return failed(Status.NOT_APPLICABLE, str(e))
    except NotInstalled as e:
        return failed(Status.NOT_INSTALLED, str(e))
    except Wrong as e:
        return failed(Status.WRONG, str(e))
    except Exception as e:
        return failed(*_failure(e, method, K))

    if not check.ok or work is None:
        return {**failed(Status.WRONG, check.detail), "error": check.error}

    last: list[Any] = [None]  # a training step's losses (outputs would hold memory)
    train = mode == "train"

    def timed() -> None:
        out = work(None)
        if train:
            last[0] = out[0] if isinstance(out, tuple) else out

    try:
        timing = time_call(
            timed, torch.get_num_threads(), device, options.min_time, options.repeats
        )
    except Exception as e:  # a timed call that fails: this cell's, not the whole run's
        return failed(*_failure(e, method, K))
    if train and not _finite_loss(last[0]):
        # A training step timed after the checked one diverged (its optimizer's steps):
        # the timings are of steps on NaN or infinite numbers.
        return failed(
            Status.UNSUPPORTED, "the timed training steps diverged (a NaN or infinite loss)"
        )

    how = "checked statistically" if statistical else "checked exactly"
    if statistical and method.oracle is not None:
        how += ", and exactly against bayesflow's loop"
    return {
        **timing,
        "status": Status.OK,
        "detail": how + (f" ({check.detail})" if check.detail else ""),
        "error": check.error,
        "compile_s": compile_s,
    }


def _versions() -> dict[str, str]:
    return {
        "bayesflow": bf.__version__,
        "torch": torch.__version__,
        "zuko": zuko.__version__,
        "python": platform.python_version(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class _NoBar:
    def set_description(self, _: str) -> None:
        pass

    def update(self, _: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, unit="case", leave=False, dynamic_ncols=True)


def _ratios(records: list[dict[str, Any]]) -> None:
    r"""Sets each record's `ratio_to_bmm` and `ratio_to_deterministic`: its median over
    the `bmm` and `deterministic` medians of its cell, among `records`, those of one run."""

    for name in ("bmm", "deterministic"):
        base = {
            (r["model"], r["mode"], r["batch"], r["samples"]): r["median_ms"]
            for r in records
            if r["method"] == name and r["status"] is Status.OK
        }
        for r in records:
            b = base.get((r["model"], r["mode"], r["batch"], r["samples"]))
            ok = b is not None and r["status"] is Status.OK
            # (a training cell of gradients alone has no ratio to a plain step, as in the
            # tables)
            ok = ok and (name != "deterministic" or comparable(r["method"], r["mode"]))
            r[f"ratio_to_{name}"] = r["median_ms"] / b if ok else None


def run_bench(
    models: Sequence[str],
    samples: Sequence[int],
    modes: Sequence[str],
    methods: Sequence[str] = tuple(METHODS),
    *,
    options: Options | None = None,
    extra: Mapping[str, Method] | None = None,
    records: list[dict[str, Any]] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> list[dict[str, Any]]:
    r"""Checks and times every method on every model, mode and number of samples.

    Arguments:
        models: Model names, see :data:`~bayesflow.bench.MODELS`.
        samples: The numbers of samples K.
        modes: `forward`, `train` (forward and backward of the K-sample loss) or
            `sample` (draws from each sampled flow).
        methods: Method names, see :data:`~bayesflow.bench.METHODS`.
        options: How to build and time the cells; the defaults of :class:`Options` if
            :py:`None`.
        extra: More methods, by name (e.g. a deliberately wrong one, in tests).
        records: A list to append the records to as they come (what is done survives
            an interruption); a new one if :py:`None`. The records it holds already are
            left as they are.
        progress: Whether to show a progress bar on stderr.
        overrides: Fields of :class:`Options` to set (e.g. `batch=8`).

    Returns:
        One record (a dict) per model, mode, K and method.
    """

    options = Options(**{**(options.__dict__ if options else {}), **overrides})
    device = torch.device(options.device)
    # zuko's methods and the peers draw from the global generator: the caller's state is
    # put back.
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        records = [] if records is None else records
        start = len(records)
        try:
            _run(models, samples, modes, methods, options, extra or {}, records, progress)
        finally:
            # The ratios of this run's records to this run's references only: the list may
            # hold other runs (another dtype, device or thread count) with the same cells.
            _ratios(records[start:])
        return records


def _run(
    models: Sequence[str],
    samples: Sequence[int],
    modes: Sequence[str],
    methods: Sequence[str],
    options: Options,
    extra: Mapping[str, Method],
    records: list[dict[str, Any]],
    progress: bool,
) -> None:
    device = torch.device(options.device)
    n_threads = torch.get_num_threads() if options.threads is None else options.threads
    table = {name: METHODS[name] for name in methods}
    table.update(extra)

    def ks(model: str) -> list[int]:
        return list(options.model_samples.get(model, samples))

    def runs(name: str, K: int) -> bool:
        limit = options.max_loop_samples
        return limit is None or name not in LOOPS or K <= limit

    batches: list[int | None]
    if options.batch is None or isinstance(options.batch, int):
        batches = [options.batch]
    else:
        batches = list(options.batch)
    total = len(batches) * sum(
        sum(runs(name, K) for K in ks(m) for name in table) * len(modes) for m in models
    )
    bar = _progress(total, progress)
    common = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else _cpu_name(),
        "dtype": str(options.dtype).removeprefix("torch."),
        "threads": n_threads,
        "chunk_size": options.chunk_size,
        "seed": options.seed,  # (with the date: which run a record is of)
        "versions": _versions(),
    }

    with _threads(n_threads), contextlib.closing(bar):
        for model in models:
            for batch in batches:
                case = make_case(
                    model,
                    batch,
                    device=device,
                    dtype=options.dtype,
                    seed=options.seed,
                    small=options.small,
                )
                for mode in modes:
                    cells = [(K, n, m) for K in ks(model) for n, m in table.items() if runs(n, K)]
                    # Reported, not dropped: a model without a sample mode gets n/a cells.
                    none = mode == "sample" and case.sample_fn is None
                    once: dict[str, dict[str, Any]] = {}  # the cells of methods without K
                    for K, name, method in cells:
                        bar.set_description(f"{model} {mode} K={K} {name}")
                        record = {
                            "model": model,
                            "method": name,
                            "samples": K,
                            "mode": mode,
                            "batch": case.batch,
                            **common,
                            "small": options.small and model in SMALL,
                            "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                        }
                        if none:
                            result = {
                                "median_ms": None,
                                "iqr_ms": None,
                                "peak_mem_mb": None,
                                "error": None,
                                "status": Status.NOT_APPLICABLE,
                                "detail": f"{model} has no sample mode",
                            }
                        elif name in once:
                            result = once[name]
                        else:
                            result = measure_cell(method, case, K, mode, options)
                            if not method.uses_k:
                                if result["status"] is Status.OK:
                                    result["detail"] += ", measured once (independent of K)"
                                once[name] = result
                        record.update(result)
                        records.append(record)
                        bar.update(1)
                del case
                if device.type == "cuda":
                    torch.cuda.empty_cache()
