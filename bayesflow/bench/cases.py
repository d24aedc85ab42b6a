r"""The benchmark's models: a registry of cases, each a module, its posterior and its inputs."""

from __future__ import annotations

__all__ = ["FLOWS", "MODELS", "MODES", "SMALL", "Case", "make_case"]

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn
import zuko

from torch import Tensor

import bayesflow as bf

MODES = ("forward", "train", "sample")

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


@dataclass
class Case:
    r"""A model to benchmark, its posterior and its inputs.

    Attributes:
        model: The model's name, e.g. `mlp` or `nsf`.
        module: The base module.
        posterior: The bayesflow posterior over the Bayesian parameters of `module`.
        zuko: zuko's :class:`zuko.bayesian.BayesianModel` over `module`, with the same
            means and log-variances as `posterior`.
        batch: The batch size.
        fn: What to compute in forward and train modes, `fn(module, *args)`.
        args: The inputs of `fn`.
        loss: Per-sample losses `(K,)` from the stacked outputs of `fn`: minus the mean of
            `loglik` over everything but the sample dim.
        loglik: Per-datum log-likelihoods from outputs of `fn`, with any leading dims
            (`(K, B, ...)` or `(B, ...)`): minus the squared error, the log-softmax of a
            label, or the log-density of a flow.
        sample_fn: What to compute in sample mode, or :py:`None` where it does not apply.
        sample_args: The inputs of `sample_fn`.
        output: Where `fn(module, *args)` is `output(module(*args))`, `output`; :py:`None`
            where `fn` is more than a call of the module (flows).
        target: The regression target of `loss`, or :py:`None`.
        labels: The class labels of a classifier's `loss` (cross-entropy), or :py:`None`.
        plain_gradient_error: The relative error allowed for the gradients of the plain
            module (`deterministic`) where they are an approximation, or :py:`None`.
        plain_gradient_note: Why, for the detail of a cell that passed.
        check_samples: The least number of samples of a statistical check, if fewer than
            the run's (:data:`SMALL_CHECK_SAMPLES` for the smaller settings), or
            :py:`None`.
        cache: The references computed so far, by `(K, mode, noise, seed)`.
    """

    model: str
    module: nn.Module
    posterior: bf.Posterior
    zuko: Any
    batch: int
    fn: Callable[..., Tensor]
    args: tuple
    loss: Callable[[Tensor], Tensor]
    loglik: Callable[[Tensor], Tensor]
    sample_fn: Callable[..., Tensor] | None = None
    sample_args: tuple = ()
    output: Callable[[Any], Tensor] | None = None
    target: Tensor | None = None
    labels: Tensor | None = None
    plain_gradient_error: float | None = None
    plain_gradient_note: str = ""
    check_samples: int | None = None
    cache: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Spec:
    module: nn.Module
    fn: Callable[..., Tensor]
    args: tuple
    target: Tensor | None = None
    output: Callable[[Any], Tensor] | None = None
    labels: Tensor | None = None
    sample_fn: Callable[..., Tensor] | None = None
    sample_args: tuple = ()
    include: Sequence[str] = ("",)
    plain_gradient_error: float | None = None
    plain_gradient_note: str = ""


def _call(module: nn.Module, *args: Tensor) -> Tensor:
    return module(*args)


def _first(out: tuple) -> Tensor:
    return out[0]


def _call_first(module: nn.Module, *args: Tensor) -> Tensor:
    return module(*args)[0]


def _identity(out: Tensor) -> Tensor:
    return out


def _flow_log_prob(flow: nn.Module, c: Tensor, x: Tensor) -> Tensor:
    return flow(c).log_prob(x)


def _flow_sample(flow: nn.Module, c: Tensor, z: Tensor) -> Tensor:
    # Base noise drawn outside, pushed through the inverse: vmap cannot draw it inside.
    return flow(c).transform.inv(z)


def _plain(module: nn.Module, *args: Tensor, include: Sequence[str] = ("",)) -> _Spec:
    with torch.no_grad():
        target = torch.randn_like(module(*args))
    return _Spec(module, _call, args, target, _identity, include=include)


def _mlp(batch: int | None) -> _Spec:
    batch = 64 if batch is None else batch
    module = zuko.nn.MLP(5, 5, hidden_features=(64, 64), activation=nn.ELU)
    x = torch.randn(batch, 5)
    return _Spec(module, _call, (x,), x.sort(dim=-1).values, _identity)


def _lstm(batch: int | None) -> _Spec:
    batch = 16 if batch is None else batch
    module = nn.LSTM(8, 32, batch_first=True)
    x = torch.randn(batch, 20, 8)
    with torch.no_grad():
        target = torch.randn_like(module(x)[0])
    return _Spec(module, _call_first, (x,), target, _first)


def _cnn(batch: int | None) -> _Spec:
    batch = 64 if batch is None else batch
    module = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )
    return _plain(module, torch.randn(batch, 1, 8, 8))


def _wide_mlp(batch: int | None) -> _Spec:
    batch = 256 if batch is None else batch
    module = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    x, labels = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    return _Spec(module, _call, (x,), output=_identity, labels=labels)


def _digits_cnn(batch: int | None) -> _Spec:
    batch = 540 if batch is None else batch
    # Notebook 05's CNN without its dropout layers: 2 convolutions, 2 poolings, 2 linear.
    module = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 7),
    )
    x, labels = torch.randn(batch, 1, 8, 8), torch.randint(0, 7, (batch,))
    return _Spec(module, _call, (x,), output=_identity, labels=labels)


def _last_layer(batch: int | None) -> _Spec:
    batch = 64 if batch is None else batch
    trunk = [layer for _ in range(6) for layer in (nn.Linear(512, 512), nn.ReLU())]
    module = nn.Sequential(*trunk, nn.Linear(512, 10))
    return _plain(module, torch.randn(batch, 512), include=[str(len(trunk))])


def _transformer(batch: int | None) -> _Spec:
    batch = 8 if batch is None else batch
    module = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    return _plain(module, torch.randn(batch, 16, 32))


#: Smaller settings of the slowest flows, for a smoke test (:func:`make_case` with `small`,
#: `bayesflow bench --quick`): the CNF's ODE solved to looser tolerances, fewer and
#: smaller UNAF transforms, each inverted by bisection.
SMALL: dict[str, dict[str, Any]] = {
    "cnf": {"hidden_features": (16, 16), "atol": 1e-5, "rtol": 1e-4},
    "unaf": {"hidden_features": (16, 16), "transforms": 2, "signal": 4},
}

#: The least number of samples of a statistical check on the flows of :data:`SMALL` with
#: their smaller settings: the reference loops over that many ODE solves or bisections.
SMALL_CHECK_SAMPLES = 32


def _flow(model: str, small: bool = False) -> Callable[[int | None], _Spec]:
    def spec(batch: int | None) -> _Spec:
        batch = 256 if batch is None else batch
        kwargs: dict[str, Any] = {}
        if model != "gmm":
            kwargs["hidden_features"] = (64, 64)
        if model not in ("gmm", "cnf"):
            kwargs["transforms"] = 3
        if small:
            kwargs.update(SMALL.get(model, {}))
        module = FLOWS[model](2, 1, **kwargs)
        c, x = torch.randn(batch, 1), torch.randn(batch, 2)
        if model == "gmm":
            return _Spec(module, _flow_log_prob, (c, x))
        z = torch.randn(batch, 2)
        spec = _Spec(module, _flow_log_prob, (c, x), sample_fn=_flow_sample, sample_args=(c, z))
        if model == "cnf":
            # The plain CNF's gradient is zuko's ODE adjoint, an approximation: 1.3% off a
            # finite difference on this case, which the loop (it differentiates the
            # solver's steps) matches. The tolerance is that of tests/test_flows.py.
            note = "the plain CNF's gradients are zuko's ODE adjoint, an approximation"
            spec = replace(spec, plain_gradient_error=5e-2, plain_gradient_note=note)
        return spec

    return spec


#: The cases, by name: each builds its module and inputs for a batch size (its default if
#: :py:`None`), after the seed is set.
CASES: dict[str, Callable[[int | None], _Spec]] = {
    "mlp": _mlp,
    "wide-mlp": _wide_mlp,
    "lstm": _lstm,
    "cnn": _cnn,
    "digits-cnn": _digits_cnn,
    "last-layer": _last_layer,
    "transformer": _transformer,
    **{name: _flow(name) for name in sorted(FLOWS)},
}

MODELS = tuple(CASES)


def _log_softmax_at(out: Tensor, labels: Tensor) -> Tensor:
    index = labels.expand(out.shape[:-1]).unsqueeze(-1)
    return out.log_softmax(dim=-1).gather(-1, index).squeeze(-1)


def make_case(
    model: str,
    batch: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    small: bool = False,
) -> Case:
    r"""Builds a benchmark case.

    * `mlp`: zuko's `MLP(5, 5, hidden_features=(64, 64), activation=ELU)` on a batch of
      64, learning to sort 5 numbers (zuko's tutorial).
    * `wide-mlp`: `Linear(784, 1024)`, ReLU, `Linear(1024, 1024)`, ReLU, `Linear(1024, 10)`
      on a batch of 256, classifying random labels (cross-entropy).
    * `lstm`: `nn.LSTM(8, 32, batch_first=True)`, a batch of 16 sequences of length 20;
      the output is the LSTM's output sequence.
    * `cnn`: a digits-sized CNN, two 3x3 convolutions (16 and 32 channels) and a linear
      classifier, on a batch of 64 single-channel 8x8 images.
    * `digits-cnn`: notebook 05's CNN (two 3x3 convolutions with 8 and 16 channels, each
      followed by ReLU and 2x2 max-pooling, then `Linear(64, 64)`, ReLU, `Linear(64, 7)`)
      on a batch of 540 8x8 images, classifying random labels (cross-entropy).
    * `last-layer`: a deterministic trunk of 6 `Linear(512, 512)` + ReLU and a Bayesian
      last `Linear(512, 10)`, on a batch of 64.
    * `transformer`: an eval-mode `nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)`,
      a batch of 8 sequences of length 16.
    * a flow name: that zuko flow with 2 features, a context of 1, 3 transforms and hidden
      layers of (64, 64) where it takes them, `log_prob` on a batch of 256.

    Every parameter is Bayesian (but the trunk of `last-layer`), with log-variance -9.
    The train-mode loss is the cross-entropy for the classifiers, an MSE against a fixed
    target (the sorted inputs for `mlp`, a Gaussian draw otherwise) for the other
    modules, and the negative log-likelihood for flows.

    Arguments:
        model: A name from :data:`MODELS`.
        batch: The batch size; the model's default if :py:`None`.
        device: The device.
        dtype: The floating point type.
        seed: The seed of the weights and inputs.
        small: Whether to build the smaller settings of :data:`SMALL` (CNF and UNAF,
            checked statistically on :data:`SMALL_CHECK_SAMPLES`; the other models are
            the same).

    Returns:
        The case.
    """

    import zuko.bayesian

    if model not in CASES:
        raise ValueError(f"make_case: expected one of {', '.join(MODELS)}, got {model!r}")

    torch.manual_seed(seed)
    small = small and model in SMALL
    spec = _flow(model, small=True)(batch) if small else CASES[model](batch)

    def move(ts: tuple) -> tuple:
        return tuple(t.to(device=device, dtype=dtype) for t in ts)

    module = spec.module.to(device=device, dtype=dtype)
    args, sample_args = move(spec.args), move(spec.sample_args)
    target = None if spec.target is None else spec.target.to(device=device, dtype=dtype)
    labels = None if spec.labels is None else spec.labels.to(device=device)

    def loglik(out: Tensor) -> Tensor:
        if labels is not None:
            return _log_softmax_at(out, labels)
        if target is not None:
            return -(out - target).square()
        return out

    def loss(out: Tensor) -> Tensor:
        return -loglik(out).flatten(1).mean(1)

    posterior = bf.init(module, init_logvar=-9.0, include=spec.include)
    znet = zuko.bayesian.BayesianModel(module, init_logvar=-9.0, include_params=spec.include)
    if {k.replace("-", ".") for k in znet.means} != set(posterior.mean):
        raise ValueError(f"make_case: zuko and bayesflow pick different parameters of {model}")
    with torch.no_grad():  # zuko jitters its log-variances: make both posteriors equal
        for key in znet.logvars:
            znet.logvars[key].copy_(posterior.logvar[key.replace("-", ".")])

    return Case(
        model=model,
        module=module,
        posterior=posterior,
        zuko=znet,
        batch=args[0].shape[0],
        fn=spec.fn,
        args=args,
        loss=loss,
        loglik=loglik,
        sample_fn=spec.sample_fn,
        sample_args=sample_args,
        output=spec.output,
        target=target,
        labels=labels,
        plain_gradient_error=spec.plain_gradient_error,
        plain_gradient_note=spec.plain_gradient_note,
        check_samples=SMALL_CHECK_SAMPLES if small else None,
    )
