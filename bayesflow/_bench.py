r"""The loop-versus-vmap benchmark behind `bayesflow bench`.

Every method computes the same thing, K posterior samples of a model evaluated on the
same inputs, and is checked against :func:`bayesflow.loop_call` on the same samples
before it is timed. A method that disagrees is reported as wrong and never timed.

How each method is checked:

* Methods that draw their noise from a :class:`torch.Generator` in one flat draw
  (`loop`, `vmap`, `vmap-compiled`, `bmm`) are compared with the loop on the samples
  that :func:`bayesflow.sample` gives for the same generator state.
* zuko's own methods (`zuko-loop`, `sample-model-loop`) draw one tensor at a time from
  the global generator; the reference replays those draws (same seed, same order), so
  they are compared exactly too.
* `local-trick` samples activations rather than weights, so no shared samples exist.
  It is checked statistically on `max(K, 128)` samples: for every output element, the
  mean over samples must agree with the loop's within 5 standard errors, and the
  average variance must agree within 5 standard errors of its log; in train mode,
  the per-sample losses must agree in mean within 5 standard errors and every
  gradient must be finite.
"""

from __future__ import annotations

__all__ = [
    "DEFAULTS",
    "METHODS",
    "MODELS",
    "MODES",
    "SWEEPS",
    "Case",
    "Method",
    "format_table",
    "make_case",
    "plot",
    "run_bench",
    "write_csv",
    "write_json",
]

import contextlib
import csv
import ctypes
import json
import math
import platform
import sys
import threading
import time

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import zuko

from torch import Tensor

import bayesflow as bf

from ._numerics import softclip as _softclip

MODES = ("forward", "train", "sample")

METHODS = (
    "zuko-loop",
    "sample-model-loop",
    "loop",
    "vmap",
    "vmap-compiled",
    "local-trick",
    "bmm",
)

#: The zuko flows the benchmark knows, by lower-case class name.
FLOWS = {
    name.lower(): getattr(zuko.flows, name)
    for name in (
        "BPF",
        "CNF",
        "GF",
        "GMM",
        "MAF",
        "NAF",
        "NCSF",
        "NICE",
        "NSF",
        "RealNVP",
        "SOSPF",
        "UNAF",
    )
}

MODELS = ("mlp", *sorted(FLOWS))

#: What a run with no option does: small enough for a 2-core CPU in well under 2 minutes.
DEFAULTS: dict[str, Any] = {
    "models": ["mlp", "nsf"],
    "samples": [1, 8, 32],
    "modes": ["forward", "train"],
    "methods": [m for m in METHODS if m != "vmap-compiled"],
    "min_time": 0.25,
    # One thread: on a shared CPU, two OpenMP threads that compete with other processes
    # make parallel kernels up to 10x slower, at random. `--threads` sets more.
    "threads": 1,
}

#: Named sweeps for `bayesflow bench --sweep NAME`.
SWEEPS: dict[str, dict[str, Any]] = {
    "default": dict(DEFAULTS),
    "quick": {
        "models": ["mlp", "nsf"],
        "samples": [1, 4],
        "modes": ["forward", "train", "sample"],
        "methods": [m for m in METHODS if m != "vmap-compiled"],
        "batch": 16,
        "min_time": 0.01,
        "repeats": 3,
    },
    "paper": {
        "models": ["mlp", "nsf"],
        "samples": [1, 8, 32, 128],
        "modes": ["forward", "train"],
        "methods": list(METHODS),
        "min_time": 0.5,
    },
    "flows": {
        "models": sorted(FLOWS),
        "samples": [32],
        "modes": ["forward"],
        "methods": ["zuko-loop", "loop", "vmap"],
        "min_time": 0.1,
    },
    # Sampling inverts the flow: by bisection for NAF, UNAF, SOSPF, GF and BPF (slow in a
    # loop), by an ODE for CNF; these five invert in closed form or autoregressively.
    "flows-sample": {
        "models": ["maf", "ncsf", "nice", "nsf", "realnvp"],
        "samples": [8],
        "modes": ["sample"],
        "methods": ["zuko-loop", "loop", "vmap"],
        "min_time": 0.1,
    },
    "cuda": {
        "models": ["mlp", "nsf"],
        "samples": [1, 32, 128, 1024],
        "modes": ["forward", "train"],
        "methods": list(METHODS),
        "device": "cuda",
        "min_time": 0.5,
    },
}


@dataclass
class Case:
    r"""A model to benchmark, its posterior and its inputs.

    Attributes:
        model: The model's name, e.g. `mlp` or `nsf`.
        module: The base module.
        posterior: The bayesflow posterior over every parameter of `module`.
        zuko: zuko's :class:`zuko.bayesian.BayesianModel` over `module`, with the same
            means and log-variances as `posterior`.
        batch: The batch size.
        fn: What to compute in forward and train modes, `fn(module, *args)`.
        args: The inputs of `fn`.
        loss: Per-sample losses `(K,)` from the stacked outputs of `fn`.
        sample_fn: What to compute in sample mode, or :py:`None` where it does not apply.
        sample_args: The inputs of `sample_fn`.
    """

    model: str
    module: nn.Module
    posterior: bf.Posterior
    zuko: Any
    batch: int
    fn: Callable[..., Tensor]
    args: tuple
    loss: Callable[[Tensor], Tensor]
    sample_fn: Callable[..., Tensor] | None = None
    sample_args: tuple = ()
    cache: dict = field(default_factory=dict)


def _mlp_fn(net: nn.Module, x: Tensor) -> Tensor:
    return net(x)


def _flow_log_prob(flow: nn.Module, c: Tensor, x: Tensor) -> Tensor:
    return flow(c).log_prob(x)


def _flow_sample(flow: nn.Module, c: Tensor, z: Tensor) -> Tensor:
    # Base noise drawn outside, pushed through the inverse: vmap cannot draw it inside.
    return flow(c).transform.inv(z)


def _mse(out: Tensor, y: Tensor) -> Tensor:
    return (out - y).square().flatten(1).mean(1)


def _nll(out: Tensor) -> Tensor:
    return -out.flatten(1).mean(1)


def make_case(
    model: str,
    batch: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Case:
    r"""Builds a benchmark case.

    `mlp` is zuko's `MLP(5, 5, hidden_features=(64, 64), activation=ELU)` on a batch of
    64 (learning to sort 5 numbers); a flow name is that zuko flow with 2 features, a
    context of 1, 3 transforms and hidden layers of (64, 64) where it takes them, on a
    batch of 256. Every parameter is Bayesian, with log-variance -9.

    Arguments:
        model: `mlp` or a zuko flow's class name in lower case.
        batch: The batch size; the model's default if :py:`None`.
        device: The device.
        dtype: The floating point type.
        seed: The seed of the weights and inputs.

    Returns:
        The case.
    """

    import zuko.bayesian

    torch.manual_seed(seed)

    if model == "mlp":
        batch = 64 if batch is None else batch
        module = zuko.nn.MLP(5, 5, hidden_features=(64, 64), activation=nn.ELU)
        x = torch.randn(batch, 5)
        y = x.sort(dim=-1).values
        fn, args = _mlp_fn, (x,)
        sample_fn, sample_args = None, ()
        targets = (y,)

        def loss(out: Tensor) -> Tensor:
            return _mse(out, targets[0])

    elif model in FLOWS:
        batch = 256 if batch is None else batch
        cls = FLOWS[model]
        kwargs: dict[str, Any] = {}
        if model != "gmm":
            kwargs["hidden_features"] = (64, 64)
        if model not in ("gmm", "cnf"):
            kwargs["transforms"] = 3
        try:
            module = cls(2, 1, **kwargs)
        except TypeError:
            module = cls(2, 1)
        c, x = torch.randn(batch, 1), torch.randn(batch, 2)
        fn, args = _flow_log_prob, (c, x)
        loss = _nll
        if model == "gmm":
            sample_fn, sample_args = None, ()
        else:
            sample_fn, sample_args = _flow_sample, (c, torch.randn(batch, 2))
    else:
        raise ValueError(f"make_case: expected one of {', '.join(MODELS)}, got {model!r}")

    module = module.to(device=device, dtype=dtype)
    moved = tuple(a.to(device=device, dtype=dtype) for a in args)
    sample_args = tuple(a.to(device=device, dtype=dtype) for a in sample_args)
    if model == "mlp":
        targets = (targets[0].to(device=device, dtype=dtype),)

    posterior = bf.init(module, init_logvar=-9.0)
    znet = zuko.bayesian.BayesianModel(module, init_logvar=-9.0)
    with torch.no_grad():  # zuko jitters its log-variances: make both posteriors equal
        for key in znet.logvars:
            znet.logvars[key].copy_(posterior.logvar[key.replace("-", ".")])

    return Case(model, module, posterior, znet, batch, fn, moved, loss, sample_fn, sample_args)


# Methods


class Unsupported(Exception):
    r"""Raised by a method that cannot run a case."""


class NotApplicable(Exception):
    r"""Raised by a method that makes no sense for a case or mode."""


@dataclass
class Method:
    r"""A way to compute K posterior samples of a model.

    Attributes:
        name: The name shown in tables.
        build: `build(case, K, mode, fn, args)` returns `run(seed)`, which computes the
            outputs `(K, ...)` of `fn(module, *args)` for K posterior samples, drawing its
            noise after seeding with `seed` (unless :py:`None`). Train mode wraps it.
        noise: How the method draws its noise: `flat` (one draw from a generator, as
            :func:`bayesflow.sample`), `zuko` (one draw per tensor from the global
            generator, as zuko) or `local` (activations, checked statistically).
        differentiable: Whether gradients reach the posterior (train mode).
        targets: `targets(case)`, the posterior tensors by name, for train mode.
    """

    name: str
    build: Callable[..., Callable[[int | None], Tensor]]
    noise: str = "flat"
    differentiable: bool = True
    targets: Callable[[Case], dict[str, Tensor]] | None = None


def _bf_targets(case: Case) -> dict[str, Tensor]:
    q = case.posterior
    return {
        **{"mean:" + k: v for k, v in q.mean.items()},
        **{"logvar:" + k: v for k, v in q.logvar.items()},
    }


def _zuko_targets(case: Case) -> dict[str, Tensor]:
    z = case.zuko
    return {
        **{"mean:" + k.replace("-", "."): v for k, v in z.means.items()},
        **{"logvar:" + k.replace("-", "."): v for k, v in z.logvars.items()},
    }


def _generator(case: Case) -> torch.Generator:
    device = next(iter(case.posterior.mean.values())).device
    return torch.Generator(device=device)


def _seeded(g: torch.Generator, seed: int | None) -> torch.Generator:
    if seed is not None:
        g.manual_seed(seed)
    return g


def _build_zuko_loop(case: Case, K: int, mode: str, fn: Callable, args: tuple) -> Callable:
    znet = case.zuko

    def run(seed: int | None) -> Tensor:
        if seed is not None:
            torch.manual_seed(seed)
        outs = []
        for _ in range(K):
            with znet.reparameterize() as m:
                outs.append(fn(m, *args))
        return torch.stack(outs)

    return run


def _build_sample_model_loop(case: Case, K: int, mode: str, fn: Callable, args: tuple) -> Callable:
    if mode == "train":
        raise NotApplicable("sample_model() detaches: no gradient reaches the posterior")
    znet = case.zuko

    def run(seed: int | None) -> Tensor:
        if seed is not None:
            torch.manual_seed(seed)
        return torch.stack([fn(znet.sample_model(), *args) for _ in range(K)])

    return run


def _build_loop(case: Case, K: int, mode: str, fn: Callable, args: tuple) -> Callable:
    g = _generator(case)

    def run(seed: int | None) -> Tensor:
        params = bf.sample(case.posterior, K, generator=_seeded(g, seed))
        return bf.loop_call(case.module, params, *args, fn=fn)

    return run


def _build_vmap(
    case: Case, K: int, mode: str, fn: Callable, args: tuple, chunk_size: int | None = None
) -> Callable:
    g = _generator(case)

    def run(seed: int | None) -> Tensor:
        params = bf.sample(case.posterior, K, generator=_seeded(g, seed))
        return bf.vmap_call(
            case.module, params, *args, fn=fn, chunk_size=chunk_size, fallback=False
        )

    return run


def _build_vmap_compiled(
    case: Case, K: int, mode: str, fn: Callable, args: tuple, chunk_size: int | None = None
) -> Callable:
    g = _generator(case)

    def vectorized(g: torch.Generator, *args: Any) -> Tensor:
        params = bf.sample(case.posterior, K, generator=g)
        return bf.vmap_call(
            case.module, params, *args, fn=fn, chunk_size=chunk_size, fallback=False
        )

    # Dynamo caches compiled code per code object, and `vectorized` is the same code
    # object in every cell: without a reset, later cells pass the recompile limit and
    # silently run eagerly.
    torch._dynamo.reset()
    compiled = torch.compile(vectorized, dynamic=False)

    def run(seed: int | None) -> Tensor:
        return compiled(_seeded(g, seed), *args)

    return run


def _build_local_trick(case: Case, K: int, mode: str, fn: Callable, args: tuple) -> Callable:
    local_call = getattr(bf, "local_call", None)
    if local_call is None:
        raise NotApplicable("unavailable: bayesflow.local_call is missing")
    g = _generator(case)

    def run(seed: int | None) -> Tensor:
        return local_call(case.module, case.posterior, K, *args, fn=fn, generator=_seeded(g, seed))

    return run


def _sequential_linears(module: nn.Module) -> list[nn.Module] | None:
    if not isinstance(module, nn.Sequential):
        return None
    layers = list(module)
    for layer in layers:
        if _is_linear(layer):
            continue
        if any(True for _ in layer.parameters()):
            return None
    return layers


def _is_linear(layer: nn.Module) -> bool:
    if type(layer) is nn.Linear:
        return True
    return type(layer) is zuko.nn.Linear and layer.weight.dim() == 2


def _build_bmm(case: Case, K: int, mode: str, fn: Callable, args: tuple) -> Callable:
    layers = _sequential_linears(case.module)
    if layers is None or fn is not _mlp_fn:
        raise NotApplicable("the batched-matmul reference is written for MLPs only")

    q = case.posterior
    names = list(q.mean)
    sizes = [q.mean[k].numel() for k in names]
    prefix = {id(p): n for n, p in case.module.named_parameters()}
    g = _generator(case)
    (x,) = args
    like = q.mean[names[0]]

    def run(seed: int | None) -> Tensor:
        # theta = mu + sigma * eps for all K samples with one flat draw, then one
        # batched matmul per layer: the least work this computation can take.
        eps = torch.randn(
            K, sum(sizes), generator=_seeded(g, seed), device=like.device, dtype=like.dtype
        )
        theta = {}
        for name, e in zip(names, eps.split(sizes, dim=1), strict=True):
            sigma = _softclip(q.logvar[name]).div(2).exp()
            theta[name] = torch.addcmul(q.mean[name], sigma, e.view(K, *q.mean[name].shape))

        h = x.expand(K, *x.shape)
        for layer in layers:
            if _is_linear(layer):
                w_name, b_name = prefix[id(layer.weight)], prefix.get(id(layer.bias))
                w = theta[w_name] if w_name in theta else layer.weight.expand(K, -1, -1)
                if b_name is None:
                    b = torch.zeros((), dtype=h.dtype, device=h.device)
                elif b_name in theta:
                    b = theta[b_name].unsqueeze(1)
                else:
                    b = layer.bias.expand(K, 1, -1)
                h = torch.baddbmm(b, h, w.transpose(1, 2))
            else:
                h = layer(h)
        return h

    return run


BUILDERS: dict[str, tuple[Callable, str, bool, Callable]] = {
    "zuko-loop": (_build_zuko_loop, "zuko", True, _zuko_targets),
    "sample-model-loop": (_build_sample_model_loop, "zuko", False, _zuko_targets),
    "loop": (_build_loop, "flat", True, _bf_targets),
    "vmap": (_build_vmap, "flat", True, _bf_targets),
    "vmap-compiled": (_build_vmap_compiled, "flat", True, _bf_targets),
    "local-trick": (_build_local_trick, "local", True, _bf_targets),
    "bmm": (_build_bmm, "flat", True, _bf_targets),
}


def get_method(name: str) -> Method:
    r"""Returns a method by name."""

    build, noise, differentiable, targets = BUILDERS[name]
    return Method(name, build, noise, differentiable, targets)


# The reference: the loop on the same noise


def _noise(case: Case, K: int, kind: str, seed: int) -> dict[str, Tensor]:
    q = case.posterior
    like = next(iter(q.mean.values()))
    if kind == "zuko":
        torch.manual_seed(seed)
        draws = []
        for _ in range(K):
            draws.append(
                {k.replace("-", "."): torch.randn_like(m) for k, m in case.zuko.means.items()}
            )
        return {name: torch.stack([d[name] for d in draws]) for name in q.mean}

    g = torch.Generator(device=like.device).manual_seed(seed)
    sizes = [m.numel() for m in q.mean.values()]
    eps = torch.randn(K, sum(sizes), generator=g, device=like.device, dtype=like.dtype)
    return {
        name: e.view(K, *m.shape)
        for (name, m), e in zip(q.mean.items(), eps.split(sizes, dim=1), strict=True)
    }


def _reference(case: Case, K: int, mode: str, kind: str, seed: int) -> Any:
    key = (K, mode, kind, seed)
    if key in case.cache:
        return case.cache[key]

    q = case.posterior
    eps = _noise(case, K, kind, seed)
    fn, args = _mode_fn(case, mode)

    with torch.set_grad_enabled(mode == "train"):
        params = {
            name: q.mean[name] + _softclip(q.logvar[name]).div(2).exp() * eps[name]
            for name in q.mean
        }
        out = bf.loop_call(case.module, params, *args, fn=fn)
        if mode == "train":
            losses = case.loss(out)
            targets = _bf_targets(case)
            grads = torch.autograd.grad(losses.mean(), list(targets.values()))
            result = (losses.detach(), dict(zip(targets, grads, strict=True)))
        else:
            result = out

    case.cache[key] = result
    return result


def _mode_fn(case: Case, mode: str) -> tuple[Callable, tuple]:
    if mode == "sample":
        if case.sample_fn is None:
            raise NotApplicable(f"{case.model} has no sample mode")
        return case.sample_fn, case.sample_args
    return case.fn, case.args


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-8, torch.float32: 2e-4}.get(dtype, 2e-2)


def _close(a: Tensor, b: Tensor, tol: float) -> tuple[bool, float]:
    if a.shape != b.shape:
        return False, math.inf
    if not torch.isfinite(a).all():
        return False, math.inf
    scale = b.abs().max().clamp_min(1.0)
    err = ((a - b).abs().max() / scale).item()
    return err <= tol, err


# Timing, memory, checking


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
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


def _heap_bytes() -> int | None:
    r"""Bytes held by malloc (glibc), which torch's CPU allocator uses, or None."""

    return None if _HEAP is None else _HEAP()


def _peak_memory(call: Callable[[], Any], device: torch.device) -> tuple[float | None, str]:
    r"""Returns the peak memory, in MiB, that one call takes above what was there before."""

    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "cuda-max-allocated"

    base = _heap_bytes()
    if base is None:
        call()
        return None, "none"

    # Polls malloc's bytes in use while the call runs: peaks shorter than the polling
    # period can be missed, so this is a lower bound.
    peak = [base]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _heap_bytes() or 0)
            time.sleep(1e-4)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        call()
    finally:
        done.set()
        thread.join()
    return (peak[0] - base) / 2**20, "cpu-malloc-peak"


def _time(
    call: Callable[[], Any], threads: int, device: torch.device, min_time: float, repeats: int
) -> dict[str, Any]:
    r"""Times `call` after one warm-up call, which also gives its peak memory."""

    from torch.utils.benchmark import Timer

    timer = Timer("call()", globals={"call": call}, num_threads=threads)

    t0 = time.perf_counter()
    peak, kind = _peak_memory(call, device)
    once = max(time.perf_counter() - t0, 1e-7)

    # Each measurement lasts ~min_time / repeats; slow cells get fewer, single-call ones.
    number = max(1, int(min_time / repeats / once))
    if number == 1:
        repeats = max(3, min(repeats, int(2 * min_time / once)))
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


def _wrap_mode(method: Method, case: Case, run: Callable, mode: str) -> Callable:
    r"""Turns `run(seed) -> outputs` into the work of a mode."""

    if mode == "train":
        targets = (method.targets or _bf_targets)(case)

        def train(seed: int | None) -> tuple[Tensor, dict[str, Tensor]]:
            losses = case.loss(run(seed))
            grads = torch.autograd.grad(losses.mean(), list(targets.values()))
            return losses.detach(), dict(zip(targets, grads, strict=True))

        return train

    def infer(seed: int | None) -> Tensor:
        with torch.no_grad():
            return run(seed)

    return infer


def _check(
    method: Method, case: Case, K: int, mode: str, work: Callable, seed: int, build: Callable
) -> tuple[bool, float, str]:
    r"""Checks a method against the loop. Returns (ok, error, detail)."""

    dtype = next(iter(case.posterior.mean.values())).dtype
    tol = _tolerance(dtype)

    if method.noise == "local":
        return _check_statistically(case, K, mode, build, seed)

    got = work(seed)
    ref = _reference(case, K, mode, method.noise, seed)

    if mode == "train":
        ok, err = _close(got[0], ref[0], tol)
        for name, g in ref[1].items():
            ok_g, err_g = _close(got[1][name], g, tol)
            ok, err = ok and ok_g, max(err, err_g)
        return ok, err, "" if ok else f"max relative error {err:.2e} > {tol:.0e} (gradients)"

    ok, err = _close(got, ref, tol)
    return ok, err, "" if ok else f"max relative error {err:.2e} > {tol:.0e}"


def _check_statistically(
    case: Case, K: int, mode: str, build: Callable, seed: int
) -> tuple[bool, float, str]:
    n = max(K, 128)
    work = build(n)
    got = work(seed + 1)
    ref = _reference(case, n, mode, "flat", seed)

    if mode == "train":
        a, b = got[0].double(), ref[0].double()
        if a.shape != b.shape:
            return False, math.inf, f"loss shape {tuple(a.shape)} != {tuple(b.shape)}"
        se = ((a.var() + b.var()) / n).sqrt().clamp_min(1e-12)
        z = ((a.mean() - b.mean()).abs() / se).item()
        finite = all(torch.isfinite(g).all() for g in got[1].values())
        ok = z <= 5.0 and finite and got[1].keys() == ref[1].keys()
        return ok, z, "" if ok else f"loss mean off by {z:.1f} standard errors or bad gradients"

    a, b = got.double().flatten(1), ref.double().flatten(1)
    if a.shape != b.shape:
        return False, math.inf, f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if not torch.isfinite(a).all():
        return False, math.inf, "non-finite outputs"
    va, vb = a.var(0), b.var(0)
    se = ((va + vb) / n).sqrt().clamp_min(1e-12 * b.abs().max().item())
    z_mean = ((a.mean(0) - b.mean(0)).abs() / se).max().item()
    log_ratio = abs(math.log(max(va.mean().item(), 1e-300) / max(vb.mean().item(), 1e-300)))
    z_var = log_ratio / math.sqrt(2 / (n - 1))
    ok = z_mean <= 5.0 and z_var <= 5.0
    detail = "" if ok else f"means off by {z_mean:.1f} SE, variances by {z_var:.1f} SE"
    return ok, max(z_mean, z_var), detail


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


def run_bench(
    models: Sequence[str],
    samples: Sequence[int],
    modes: Sequence[str],
    methods: Sequence[str] = METHODS,
    batch: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    chunk_size: int | None = None,
    min_time: float = 0.25,
    repeats: int = 7,
    seed: int = 0,
    progress: bool = True,
    extra: dict[str, Method] | None = None,
    records: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    r"""Checks and times every method on every model, mode and number of samples.

    Arguments:
        models: Model names, see :data:`MODELS`.
        samples: The numbers of samples K.
        modes: `forward`, `train` (forward and backward of the K-sample loss) or
            `sample` (draws from each sampled flow).
        methods: Method names, see :data:`METHODS`.
        batch: The batch size; each model's default if :py:`None`.
        device: The device.
        dtype: The floating point type.
        threads: The number of CPU threads; torch's current number if :py:`None`.
        chunk_size: The chunk size of the vectorized methods.
        min_time: The time, in seconds, to spend timing each method at each K.
        repeats: The number of timed measurements, of which medians and IQRs are taken.
        seed: The seed of the models, inputs and checks.
        progress: Whether to show a progress bar on stderr.
        extra: More methods, by name (e.g. a deliberately wrong one, in tests).
        records: A list to append the records to as they come (what is done survives
            an interruption); a new one if :py:`None`.

    Returns:
        One record (a dict) per model, mode, K and method.
    """

    # zuko's methods draw from the global generator: the caller's state is put back.
    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device).index or 0] if cuda else []):
        return _run_bench(
            models, samples, modes, methods, batch, device, dtype, threads, chunk_size,
            min_time, repeats, seed, progress, extra, records,
        )  # fmt: skip


def _run_bench(
    models: Sequence[str],
    samples: Sequence[int],
    modes: Sequence[str],
    methods: Sequence[str],
    batch: int | None,
    device: str,
    dtype: torch.dtype,
    threads: int | None,
    chunk_size: int | None,
    min_time: float,
    repeats: int,
    seed: int,
    progress: bool,
    extra: dict[str, Method] | None,
    records: list[dict[str, Any]] | None,
) -> list[dict[str, Any]]:
    device = torch.device(device)
    threads = torch.get_num_threads() if threads is None else threads
    table = {name: get_method(name) for name in methods}
    table.update(extra or {})

    tasks = [(mo, md, K, me) for mo in models for md in modes for K in samples for me in table]
    bar = _progress(len(tasks), progress)
    common = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else _cpu_name(),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": threads,
        "chunk_size": chunk_size,
        "versions": _versions(),
    }

    records = [] if records is None else records
    with _threads(threads), contextlib.closing(bar):
        for model in models:
            case = make_case(model, batch=batch, device=device, dtype=dtype, seed=seed)
            for mode in modes:
                if mode == "sample" and case.sample_fn is None:
                    bar.update(len(samples) * len(table))
                    continue
                for K in samples:
                    for name, method in table.items():
                        bar.set_description(f"{model} {mode} K={K} {name}")
                        record = {
                            "model": model,
                            "method": name,
                            "samples": K,
                            "mode": mode,
                            "batch": case.batch,
                            **common,
                        }
                        record.update(
                            _measure(method, case, K, mode, chunk_size, min_time, repeats, seed)
                        )
                        records.append(record)
                        bar.update(1)
            del case
            if device.type == "cuda":
                torch.cuda.empty_cache()

    return records


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


def _error_type(err: BaseException) -> str:
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return type(cause).__name__


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _measure(
    method: Method,
    case: Case,
    K: int,
    mode: str,
    chunk_size: int | None,
    min_time: float,
    repeats: int,
    seed: int,
) -> dict[str, Any]:
    empty = {"median_ms": None, "iqr_ms": None, "peak_mem_mb": None, "error": None}
    device = next(iter(case.posterior.mean.values())).device

    def build(k: int) -> Callable:
        fn, args = _mode_fn(case, mode)
        if method.name in ("vmap", "vmap-compiled"):
            run = method.build(case, k, mode, fn, args, chunk_size=chunk_size)
        else:
            run = method.build(case, k, mode, fn, args)
        if mode == "train" and not method.differentiable:
            raise NotApplicable("no gradient reaches the posterior")
        return _wrap_mode(method, case, run, mode)

    try:
        work = build(K)
        t0 = time.perf_counter()
        ok, err, detail = _check(method, case, K, mode, work, seed, build)
        compile_s = time.perf_counter() - t0 if method.name == "vmap-compiled" else None
    except NotApplicable as e:
        status = "unavailable" if str(e).startswith("unavailable") else "n/a"
        return {**empty, "status": status, "detail": str(e).removeprefix("unavailable: ")}
    except Exception as e:
        if _is_oom(e):
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return {**empty, "status": "oom", "detail": f"out of memory at K={K}"}
        return {
            **empty,
            "status": "unsupported",
            "detail": f"{_error_type(e)}: {_first_line(e)}",
        }

    if not ok:
        return {**empty, "status": "wrong", "detail": detail, "error": err}

    try:
        timing = _time(lambda: work(None), torch.get_num_threads(), device, min_time, repeats)
    except Exception as e:
        if _is_oom(e):
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return {**empty, "status": "oom", "detail": f"out of memory at K={K}"}
        raise

    return {
        **timing,
        "status": "ok",
        "detail": "checked statistically" if method.noise == "local" else "checked exactly",
        "error": err,
        "compile_s": compile_s,
    }


# Output


def _fmt_ms(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def format_table(records: list[dict[str, Any]]) -> str:
    r"""Formats records as plain-text tables, one per model and mode.

    Each cell shows the median time in ms, the speed-up over `zuko-loop` (`x`, higher is
    better) and the time relative to `bmm` (`b`, 1.00 is the hand-written limit).
    """

    lines = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["model"], r["mode"]), []).append(r)

    for (model, mode), rs in groups.items():
        ks = sorted({r["samples"] for r in rs})
        methods = list(dict.fromkeys(r["method"] for r in rs))
        by = {(r["method"], r["samples"]): r for r in rs}
        first = rs[0]
        has_bmm = any(r["method"] == "bmm" and r["status"] == "ok" for r in rs)

        lines.append(
            f"{model} · {mode} · batch {first['batch']} · {first['device']} {first['dtype']} · "
            f"{first['threads']} thread(s)"
        )
        lines.append(
            "  median ms, speed-up over zuko-loop (x)" + (", time / bmm (b)" if has_bmm else "")
        )
        width = 22 if has_bmm else 16
        header = f"  {'method':<18}" + "".join(f"{'K=' + str(k):>{width}}" for k in ks)
        lines.append(header)
        notes: list[str] = []
        for m in methods:
            mine = [by[(m, k)] for k in ks if (m, k) in by]
            if all(r["status"] in ("n/a", "unavailable") for r in mine):
                notes.append(f"{m}: {mine[0]['status']} ({mine[0]['detail']})")
                continue
            cells = []
            status_note = None
            for k in ks:
                r = by.get((m, k))
                if r is None:
                    cells.append(f"{'':>{width}}")
                    continue
                if r["status"] != "ok":
                    short = {"unsupported": "unsupported", "n/a": "n/a", "wrong": "WRONG"}.get(
                        r["status"], r["status"]
                    )
                    cells.append(f"{short:>{width}}")
                    status_note = f"{m}: {r['status']} ({r['detail']})"
                    continue
                cell = _fmt_ms(r["median_ms"])
                z = by.get(("zuko-loop", k))
                if z is not None and z["status"] == "ok":
                    cell += f" {z['median_ms'] / r['median_ms']:5.1f}x"
                b = by.get(("bmm", k))
                if has_bmm:
                    if b is not None and b["status"] == "ok":
                        cell += f" {r['median_ms'] / b['median_ms']:5.2f}b"
                    else:
                        cell += " " * 7
                cells.append(f"{cell:>{width}}")
            lines.append(f"  {m:<18}" + "".join(cells))
            if status_note:
                notes.append(status_note)
        best = _best_vectorized(by, ks, has_bmm)
        if best:
            lines.append(f"  best vectorized: {best}")
        for note in notes:
            lines.append(f"    {note}")
        lines.append("")

    return "\n".join(lines).rstrip() + "\n"


VECTORIZED = ("vmap", "vmap-compiled", "local-trick")


def _best_vectorized(by: dict[tuple[str, int], dict[str, Any]], ks: list[int], bmm: bool) -> str:
    parts = []
    for k in ks:
        rs = [by[m, k] for m in VECTORIZED if (m, k) in by and by[m, k]["status"] == "ok"]
        z = by.get(("zuko-loop", k))
        if not rs or z is None or z["status"] != "ok":
            continue
        r = min(rs, key=lambda r: r["median_ms"])
        part = f"K={k} {r['method']} {z['median_ms'] / r['median_ms']:.1f}x"
        b = by.get(("bmm", k))
        if bmm and b is not None and b["status"] == "ok":
            part += f" {r['median_ms'] / b['median_ms']:.2f}b"
        parts.append(part)
    return " · ".join(parts)


def write_json(records: list[dict[str, Any]], path: str) -> None:
    r"""Writes records as a JSON list."""

    with open(path, "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if k != "versions"}
    for k, v in record.get("versions", {}).items():
        out[f"{k}_version"] = v
    return out


def write_csv(records: list[dict[str, Any]], path: str) -> None:
    r"""Writes records as CSV, one row per record."""

    rows = [_flat(r) for r in records]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot(records: list[dict[str, Any]], path: str) -> None:
    r"""Plots time against K (log-log) and the speed-up over `zuko-loop`, per model and mode."""

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["model"], r["mode"]), []).append(r)

    fig, axes = plt.subplots(
        len(groups), 2, figsize=(10, 3.2 * len(groups)), squeeze=False, dpi=64
    )
    for row, ((model, mode), rs) in zip(axes, groups.items(), strict=True):
        zuko_ms = {
            r["samples"]: r["median_ms"]
            for r in rs
            if r["method"] == "zuko-loop" and r["status"] == "ok"
        }
        for m in dict.fromkeys(r["method"] for r in rs):
            pts = sorted(
                (r["samples"], r["median_ms"])
                for r in rs
                if r["method"] == m and r["status"] == "ok"
            )
            if not pts:
                continue
            ks, ms = zip(*pts, strict=True)
            style = "--" if m.endswith("loop") else "-"
            color = f"C{METHODS.index(m) % 10}" if m in METHODS else None
            row[0].plot(ks, ms, style, marker="o", ms=4, color=color, label=m)
            sp = [(k, zuko_ms[k] / t) for k, t in pts if k in zuko_ms]
            if sp:
                row[1].plot(*zip(*sp, strict=True), style, marker="o", ms=4, color=color)
        row[0].set(
            xscale="log",
            yscale="log",
            xlabel="K (samples)",
            ylabel="median ms",
            title=f"{model} · {mode}",
        )
        row[1].set(
            xscale="log",
            xlabel="K (samples)",
            ylabel="speed-up over zuko-loop",
            title=f"{model} · {mode}",
        )
        row[1].axhline(1.0, color="gray", lw=0.8)
        for ax in row:
            ax.grid(True, which="both", alpha=0.3)
        if row[0].lines:
            row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
