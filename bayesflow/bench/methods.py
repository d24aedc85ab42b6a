r"""The ways to compute K posterior samples of a case: typed records and their registry.

A method's `build(case, K, mode, fn, args, chunk_size=None)` returns `run(seed)`, which
computes the outputs `(K, ...)` of `fn(module, *args)` for K posterior samples, drawing its
noise after seeding with `seed` (unless :py:`None`, as when it is timed). Train mode
differentiates the per-sample losses of those outputs with respect to the method's
`targets`; a method without targets (the peers, `limit`, the `nelbo` steps and
`deterministic`) returns the whole training step, `(losses, gradients)`, itself.

`deterministic` is the reference of the cost of being Bayesian: the plain module, one
plain call in forward mode and one Adam step on its own parameters in train mode, whatever
K. The `nelbo` methods are whole training steps as a user writes them: :func:`bayesflow.nelbo`
with K samples (weights, the local trick or Flipout), its backward, and one Adam step on the
means and log-variances; `nelbo-grad` is the same negative ELBO and its gradients without the
step, the work the peers' training cells time (the likelihood, the KL, their gradients).
"""

from __future__ import annotations

__all__ = [
    "LOOPS",
    "METHODS",
    "NUM_DATA",
    "REFERENCES",
    "THEIRS",
    "VECTORIZED",
    "Method",
    "Noise",
    "bf_targets",
    "get_method",
]

import copy

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from torch import Tensor

import bayesflow as bf

from . import peers
from .cases import Case
from .limit import gemms
from .peers import NUM_DATA
from .status import Named, NotApplicable

Run = Callable[[int | None], Any]
Build = Callable[..., Run]


class Noise(Named):
    r"""How a method draws its noise, which says how it is checked against the loop."""

    #: One flat draw from a :class:`torch.Generator`, as :func:`bayesflow.sample`: exact.
    FLAT = "flat"
    #: One draw per tensor from the global generator, as zuko: replayed, exact.
    ZUKO = "zuko"
    #: Noise on activations (the local trick): statistical, and exact against the
    #: method's oracle (bayesflow's loop on the same draws) where it has one.
    LOCAL = "local"
    #: A peer library's own sampler: statistical.
    OWN = "own"
    #: No posterior noise (the plain module): exact, against the mean model.
    NONE = "none"


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
        kl: Whether the train-mode loss includes the KL divergence over
            :data:`NUM_DATA` (a negative ELBO per datum), as the reference then does.
        uses_k: Whether the work depends on K; where it does not (`deterministic`), a
            cell is measured at the first K and its record repeated for the others.
        oracle: `oracle(case, K, mode, fn, args)` returns the `run(seed)` of bayesflow's
            loop over the samples (`vectorized=False`), which computes what the method
            computes, on the same draws: a method checked statistically
            (:attr:`Noise.LOCAL`) is also checked exactly against it, at the K that is
            timed; :py:`None` where there is none.
    """

    name: str
    build: Build
    noise: Noise = Noise.FLAT
    differentiable: bool = True
    targets: Callable[[Case], dict[str, Tensor]] | None = bf_targets
    kl: bool = False
    uses_k: bool = True
    oracle: Build | None = None


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


def _build_local_trick(vectorized: bool = True) -> Build:
    def build(
        case: Case, K: int, mode: str, fn: Callable, args: tuple, chunk_size: int | None = None
    ) -> Run:
        _require_local_layers(case)
        g = _generator(case)

        def run(seed: int | None) -> Tensor:
            return bf.local_call(
                case.module,
                case.posterior,
                K,
                *args,
                fn=fn,
                generator=_seeded(g, seed),
                chunk_size=chunk_size,
                vectorized=vectorized,
            )

        return run

    return build


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


def _build_torch_func(
    case: Case, K: int, mode: str, fn: Callable, args: tuple, chunk_size: int | None = None
) -> Run:
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

    vectorized = torch.vmap(
        fmodel, in_dims=(0, None, *(None for _ in args)), chunk_size=chunk_size
    )
    g = _generator(case)

    def run(seed: int | None) -> Tensor:
        params = bf.sample(case.posterior, K, generator=_seeded(g, seed))
        return vectorized(params, shared, *args)

    return run


def _adam_eps(module: torch.nn.Module) -> float:
    r"""Adam's `eps` for the parameters of `module`: its default 1e-8 rounds to zero in
    float16, where an element with no gradient yet then divides zero by zero (NaN)."""

    dtype = next(module.parameters()).dtype
    return 1e-4 if dtype == torch.float16 else 1e-8


def _build_deterministic(
    case: Case, K: int, mode: str, fn: Callable, args: tuple, **_: Any
) -> Run:
    net = copy.deepcopy(case.module)
    names = set(case.posterior.mean)
    if mode != "train":
        # One plain call, stacked as one sample.
        return lambda seed: fn(net, *args).unsqueeze(0)

    state: dict[str, Any] = {}
    # The parameters the posterior covers, trained; the others frozen: the plain step of
    # the same model (a last-layer posterior's trunk is not trained either).
    trained = [p for n, p in net.named_parameters() if n in names]
    for n, p in net.named_parameters():
        p.requires_grad_(n in names)

    def reset() -> None:
        with torch.no_grad():
            for p, p0 in zip(net.parameters(), case.module.parameters(), strict=True):
                p.copy_(p0)
        state["optimizer"] = torch.optim.Adam(trained, lr=1e-3, eps=_adam_eps(net))

    reset()

    def step(seed: int | None) -> tuple[Tensor, dict[str, Tensor]]:
        # A seed starts from the case's weights, so that the check sees the first step.
        if seed is not None:
            reset()
        optimizer = state["optimizer"]
        optimizer.zero_grad(set_to_none=True)
        losses = case.loss(fn(net, *args).unsqueeze(0))
        losses.sum().backward()
        grads = {}
        if seed is not None:
            grads = {f"mean:{n}": p.grad.clone() for n, p in net.named_parameters() if n in names}
        optimizer.step()
        return losses.detach(), grads

    return step


def _build_nelbo(estimator: str, vectorized: bool = True, adam: bool = True) -> Build:
    # Without `adam`, the loss and its gradients alone: what the peers' training cells time.
    def build(case: Case, K: int, mode: str, fn: Callable, args: tuple, **options: Any) -> Run:
        if mode != "train":
            raise NotApplicable("a training step only (forward: vmap, local-trick)")
        if estimator != "weights":
            _require_local_layers(case)
        g = _generator(case)
        chunk_size = options.get("chunk_size")
        q = case.posterior
        mine = bf.Posterior(
            {k: v.detach().clone().requires_grad_() for k, v in q.mean.items()},
            {k: v.detach().clone().requires_grad_() for k, v in q.logvar.items()},
        )
        targets = {
            **{"mean:" + k: v for k, v in mine.mean.items()},
            **{"logvar:" + k: v for k, v in mine.logvar.items()},
        }
        state: dict[str, Any] = {}

        def reset() -> None:
            with torch.no_grad():
                for k in q.mean:
                    mine.mean[k].copy_(q.mean[k])
                    mine.logvar[k].copy_(q.logvar[k])
            state["optimizer"] = torch.optim.Adam(
                list(targets.values()), lr=1e-3, eps=_adam_eps(case.module)
            )

        reset()
        loglik = case.loglik

        def log_likelihood(module: torch.nn.Module, *a: Tensor) -> Tensor:
            return loglik(fn(module, *a))

        def step(seed: int | None) -> tuple[Tensor, dict[str, Tensor]]:
            if seed is not None and adam:
                reset()
            optimizer = state["optimizer"]
            optimizer.zero_grad(set_to_none=True)
            loss = bf.nelbo(
                case.module,
                mine,
                *args,
                fn=log_likelihood,
                num_data=NUM_DATA,
                n=K,
                generator=_seeded(g, seed),
                chunk_size=chunk_size,
                estimator=estimator,
                vectorized=vectorized,
            )
            loss.backward()
            grads = {}
            if seed is not None:
                grads = {name: t.grad.clone() for name, t in targets.items()}
            if adam:
                optimizer.step()
            return loss.detach(), grads

        return step

    return build


def _require_local_layers(case: Case) -> None:
    layers = bf.local_layers(case.module)
    names = {f"{n}.{p}" if n else p for n in layers for p in ("weight", "bias")}
    if not names & set(case.posterior.mean):
        raise NotApplicable("no linear or convolutional layer is Bayesian")


def _peer(name: str, build: Build) -> Method:
    return Method(name, build, Noise.OWN, True, None, kl=True)


#: The methods, in table order.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("deterministic", _build_deterministic, Noise.NONE, True, None, uses_k=False),
        Method("zuko-loop", _build_zuko_loop, Noise.ZUKO, True, _zuko_targets),
        Method("sample-model-loop", _build_sample_model_loop, Noise.ZUKO, False, _zuko_targets),
        Method("loop", _build_loop),
        Method("vmap", _build_vmap),
        Method("vmap-compiled", _build_vmap_compiled),
        Method(
            "local-trick",
            _build_local_trick(),
            Noise.LOCAL,
            oracle=_build_local_trick(vectorized=False),
        ),
        Method("bmm", _build_bmm),
        Method("limit", _build_limit, targets=None),
        Method("nelbo", _build_nelbo("weights"), targets=None, kl=True),
        Method("nelbo-grad", _build_nelbo("weights", adam=False), targets=None, kl=True),
        Method(
            "nelbo-local",
            _build_nelbo("local"),
            Noise.LOCAL,
            targets=None,
            kl=True,
            oracle=_build_nelbo("local", vectorized=False),
        ),
        Method(
            "nelbo-flipout",
            _build_nelbo("flipout"),
            Noise.LOCAL,
            targets=None,
            kl=True,
            oracle=_build_nelbo("flipout", vectorized=False),
        ),
        Method("torch-func", _build_torch_func),
        _peer("bayesian-torch", peers.build_bayesian_torch),
        _peer("posteriors", peers.build_posteriors),
        _peer("pyro", peers.build_pyro),
        _peer("pyro-vec", peers.build_pyro_vec),
    )
}

#: The vectorized bayesflow methods, for the "fastest" line of the tables.
VECTORIZED = ("vmap", "vmap-compiled", "local-trick")

#: The Python loops over samples (`--max-loop-samples` bounds their K): bayesflow's,
#: zuko's and the peers' that loop (bayesian-torch's forward passes, Pyro's `Predictive`
#: and `Trace_ELBO` without vectorized particles).
LOOPS = ("zuko-loop", "sample-model-loop", "loop", "bayesian-torch", "pyro")

#: The methods that run another library's code (zuko's loops, torch's ensembling recipe,
#: the peers): an error of theirs is a limitation of theirs, not a crash of bayesflow's.
THEIRS = (
    "zuko-loop",
    "sample-model-loop",
    "torch-func",
    "bayesian-torch",
    "posteriors",
    "pyro",
    "pyro-vec",
)

#: The references the tables divide by, never "fastest": the plain module and the
#: hand-written batched GEMMs.
REFERENCES = ("deterministic", "bmm", "limit")

#: The methods whose training cells take an optimizer step, as `deterministic`'s does: the
#: others' training cells are the gradients alone, whose ratio to a step would flatter them.
STEPS = ("deterministic", "nelbo", "nelbo-local", "nelbo-flipout")


def comparable(method: str, mode: str) -> bool:
    r"""Whether a cell of `method` compares with `deterministic`'s of `mode`: a training
    cell only where it takes an optimizer step too (the others' are gradients alone)."""

    return mode != "train" or method in STEPS


def get_method(name: str) -> Method:
    r"""Returns a method by name."""

    return METHODS[name]
