r"""The ways to compute K posterior samples of a case: typed records and their registry.

A method's `build(case, K, mode, fn, args, chunk_size=None)` returns `run(seed)`, which
computes the outputs `(K, ...)` of `fn(module, *args)` for K posterior samples, drawing its
noise after seeding with `seed` (unless :py:`None`, as when it is timed). Train mode
differentiates the per-sample losses of those outputs with respect to the method's
`targets`; a method without targets (the peers, `limit`) returns the whole training step,
`(losses, gradients)`, itself.
"""

from __future__ import annotations

__all__ = ["METHODS", "VECTORIZED", "Method", "Noise", "bf_targets", "get_method"]

import copy

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from torch import Tensor

import bayesflow as bf

from . import peers
from .cases import Case
from .limit import gemms
from .status import NotApplicable

Run = Callable[[int | None], Any]
Build = Callable[..., Run]


class Noise(str, Enum):
    r"""How a method draws its noise, which says how it is checked against the loop."""

    #: One flat draw from a :class:`torch.Generator`, as :func:`bayesflow.sample`: exact.
    FLAT = "flat"
    #: One draw per tensor from the global generator, as zuko: replayed, exact.
    ZUKO = "zuko"
    #: Noise on activations (the local trick): statistical.
    LOCAL = "local"
    #: A peer library's own sampler: statistical.
    OWN = "own"

    def __str__(self) -> str:
        return self.value


def bf_targets(case: Case) -> dict[str, Tensor]:
    r"""Returns the posterior's tensors, keyed `mean:<name>` and `logvar:<name>`."""

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


@dataclass(frozen=True)
class Method:
    r"""A way to compute K posterior samples of a model.

    Attributes:
        name: The name shown in tables.
        build: `build(case, K, mode, fn, args, chunk_size=None)` returns `run(seed)`.
        noise: How the method draws its noise, hence how it is checked.
        differentiable: Whether gradients reach the posterior (train mode).
        targets: `targets(case)`, the tensors train mode differentiates, by name; where
            :py:`None`, the train-mode `run` returns `(losses, gradients)` itself.
    """

    name: str
    build: Build
    noise: Noise = Noise.FLAT
    differentiable: bool = True
    targets: Callable[[Case], dict[str, Tensor]] | None = bf_targets


def _generator(case: Case) -> torch.Generator:
    device = next(iter(case.posterior.mean.values())).device
    return torch.Generator(device=device)


def _seeded(g: torch.Generator, seed: int | None) -> torch.Generator:
    if seed is not None:
        g.manual_seed(seed)
    return g


def _build_zuko_loop(case: Case, K: int, mode: str, fn: Callable, args: tuple, **_: Any) -> Run:
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


def _build_sample_model_loop(
    case: Case, K: int, mode: str, fn: Callable, args: tuple, **_: Any
) -> Run:
    if mode == "train":
        raise NotApplicable("sample_model() detaches: no gradient reaches the posterior")
    znet = case.zuko

    def run(seed: int | None) -> Tensor:
        if seed is not None:
            torch.manual_seed(seed)
        return torch.stack([fn(znet.sample_model(), *args) for _ in range(K)])

    return run


def _build_loop(case: Case, K: int, mode: str, fn: Callable, args: tuple, **_: Any) -> Run:
    g = _generator(case)

    def run(seed: int | None) -> Tensor:
        params = bf.sample(case.posterior, K, generator=_seeded(g, seed))
        return bf.loop_call(case.module, params, *args, fn=fn)

    return run


def _build_vmap(
    case: Case, K: int, mode: str, fn: Callable, args: tuple, chunk_size: int | None = None
) -> Run:
    g = _generator(case)

    def run(seed: int | None) -> Tensor:
        params = bf.sample(case.posterior, K, generator=_seeded(g, seed))
        return bf.vmap_call(
            case.module, params, *args, fn=fn, chunk_size=chunk_size, fallback=False
        )

    return run


def _build_vmap_compiled(
    case: Case, K: int, mode: str, fn: Callable, args: tuple, chunk_size: int | None = None
) -> Run:
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


def _build_local_trick(case: Case, K: int, mode: str, fn: Callable, args: tuple, **_: Any) -> Run:
    layers = bf.local_layers(case.module)
    names = {f"{n}.{p}" if n else p for n in layers for p in ("weight", "bias")}
    if not names & set(case.posterior.mean):
        raise NotApplicable("no linear or convolutional layer is Bayesian")
    g = _generator(case)

    def run(seed: int | None) -> Tensor:
        return bf.local_call(
            case.module, case.posterior, K, *args, fn=fn, generator=_seeded(g, seed)
        )

    return run


def _build_bmm(case: Case, K: int, mode: str, fn: Callable, args: tuple, **_: Any) -> Run:
    forward = gemms(case, fn)
    g = _generator(case)

    def run(seed: int | None) -> Tensor:
        # The honest reference: its own K x P draw (one flat randn), then batched GEMMs.
        return forward(bf.sample(case.posterior, K, generator=_seeded(g, seed)), K, *args)

    return run


def _build_limit(case: Case, K: int, mode: str, fn: Callable, args: tuple, **_: Any) -> Run:
    forward = gemms(case, fn)
    g = _generator(case)
    train = mode == "train"
    targets = bf_targets(case)
    drawn: dict[str, dict[str, Tensor]] = {}

    def draw(seed: int | None) -> dict[str, Tensor]:
        if seed is not None or not drawn:
            with torch.set_grad_enabled(train):
                drawn["theta"] = bf.sample(case.posterior, K, generator=_seeded(g, seed))
        return drawn["theta"]

    draw(0)  # drawn outside the timed calls: the GEMMs alone

    def run(seed: int | None) -> Tensor:
        return forward(draw(seed), K, *args)

    if not train:
        return run

    def step(seed: int | None) -> tuple[Tensor, dict[str, Tensor]]:
        # The samples' graph is kept: each step backpropagates through mu + sigma * eps
        # (the gradients must reach the posterior) but never redraws eps.
        losses = case.loss(run(seed))
        grads = torch.autograd.grad(losses.mean(), list(targets.values()), retain_graph=True)
        return losses.detach(), dict(zip(targets, grads, strict=True))

    return step


def _build_torch_func(case: Case, K: int, mode: str, fn: Callable, args: tuple, **_: Any) -> Run:
    if case.output is None or fn is not case.fn:
        raise NotApplicable("fn does more than call the module (a lazy flow)")

    from torch.func import functional_call

    # The model-ensembling tutorial: a stateless copy of the model on the meta device, and
    # vmap of functional_call over stacked parameters. Its stack_module_state(models)
    # stacks the weights of K models; here the K samples of bf.sample are that stack.
    base = copy.deepcopy(case.module).to("meta")
    names = set(case.posterior.mean)
    shared = {
        **{n: p for n, p in case.module.named_parameters() if n not in names},
        **dict(case.module.named_buffers()),
    }
    output = case.output

    def fmodel(params: dict[str, Tensor], shared: dict[str, Tensor], *a: Tensor) -> Tensor:
        return output(functional_call(base, (params, shared), a))

    vectorized = torch.vmap(fmodel, in_dims=(0, None, *(None for _ in args)))
    g = _generator(case)

    def run(seed: int | None) -> Tensor:
        params = bf.sample(case.posterior, K, generator=_seeded(g, seed))
        return vectorized(params, shared, *args)

    return run


def _peer(name: str, build: Build) -> Method:
    return Method(name, build, Noise.OWN, True, None)


#: The methods, in table order.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("zuko-loop", _build_zuko_loop, Noise.ZUKO, True, _zuko_targets),
        Method("sample-model-loop", _build_sample_model_loop, Noise.ZUKO, False, _zuko_targets),
        Method("loop", _build_loop),
        Method("vmap", _build_vmap),
        Method("vmap-compiled", _build_vmap_compiled),
        Method("local-trick", _build_local_trick, Noise.LOCAL),
        Method("bmm", _build_bmm),
        Method("limit", _build_limit, targets=None),
        Method("torch-func", _build_torch_func),
        _peer("bayesian-torch", peers.build_bayesian_torch),
        _peer("posteriors", peers.build_posteriors),
        _peer("pyro", peers.build_pyro),
        _peer("pyro-vec", peers.build_pyro_vec),
    )
}

#: The vectorized bayesflow methods, for the "best vectorized" line of the tables.
VECTORIZED = ("vmap", "vmap-compiled", "local-trick")


def get_method(name: str) -> Method:
    r"""Returns a method by name."""

    return METHODS[name]
