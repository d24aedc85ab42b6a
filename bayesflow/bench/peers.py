r"""The peer libraries a user could pick instead: bayesian-torch, posteriors and Pyro.

Each is used the way its own documentation shows, on the tutorial MLP (`mlp`), with its
posterior set to the case's (mean = the means, standard deviation = bayesflow's
:math:`\sigma`), read back and compared before anything runs. Each library is imported
only when its method is built, and a missing one is reported `not installed`
(`pip install "bnn-vmap[peers]"`, or `bash scripts/peers.sh`; see benchmarks/RESULTS.md).

* forward: the K predictions `(K, B, D)`, without gradients.
* train: the K-sample negative ELBO per datum with the tutorial's likelihood,
  :math:`\frac{1}{K} \sum_k \mathrm{mean}_b (f_k(x_b) - y_b)^2 + \mathrm{KL} / N` with
  :math:`N = 10^6` and the prior :math:`\mathcal{N}(0, I)`, and its gradients, computed
  the way each library's training step computes them, without the optimizer's update
  (like every other method's train cell). The losses are on that per-datum scale, the
  gradients keyed `mean:<name>` (on the same scale) and `logvar:<name>`: the gradient with
  respect to the peer's own standard-deviation parameter (rho, log sd, Pyro's
  unconstrained scale), taken to the case's log-variance by the chain rule
  (:func:`_to_logvar`), so that both are checked against the loop's.

Their noise is their own, so they are checked statistically (see
:func:`bayesflow.bench.checks.check_statistically`).
"""

from __future__ import annotations

__all__ = ["NUM_DATA", "build_bayesian_torch", "build_posteriors", "build_pyro", "build_pyro_vec"]

import contextlib
import copy
import importlib
import math
import warnings

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from torch import Tensor

from bayesflow._numerics import softclip, std

from .cases import Case
from .status import NotApplicable, NotInstalled, Unsupported, Wrong, first_line

#: The number of data of the ELBO (zuko's tutorial weighs its KL by 1e-6).
NUM_DATA = 1e6

Run = Callable[[int | None], Any]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # posteriors' tensordict and Pyro warn about their own deprecations at import and use.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _require(module: str, dist: str) -> None:
    try:
        with _quiet():
            importlib.import_module(module)
    except ImportError as e:
        # Not installed: the module itself is missing. Installed but broken (a version that
        # needs another torch): its import fails further in, a limitation, with its message.
        missing = isinstance(e, ModuleNotFoundError) and e.name == module.split(".")[0]
        if not missing:
            raise Unsupported(
                f"import {module} failed ({e.__class__.__name__}: {first_line(e)}); "
                f"bash scripts/peers.sh installs {dist}"
            ) from None
        raise NotInstalled(
            f"{e.__class__.__name__} on import {module}; bash scripts/peers.sh installs {dist}"
        ) from None


def _applies(case: Case, fn: Callable) -> None:
    if case.model != "mlp" or fn is not case.fn:
        raise NotApplicable("the peers are set up for the tutorial MLP (mlp)")


def _seed(seed: int | None) -> None:
    if seed is not None:
        torch.manual_seed(seed)


def _check_map(where: str, case: Case, mean: dict[str, Tensor], sd: dict[str, Tensor]) -> None:
    r"""Checks that the peer holds the case's posterior, read back in its own terms."""

    q = case.posterior
    tol = 1e-5 if q.mean[next(iter(q.mean))].dtype == torch.float32 else 1e-10
    err = 0.0
    for name in q.mean:
        if name not in mean or name not in sd:
            raise Wrong(f"{where}: the posterior has no {name}")
        want_m, want_s = q.mean[name].detach(), std(q.logvar[name].detach())
        err = max(err, ((mean[name] - want_m).abs().max() / want_m.abs().max()).item())
        err = max(err, ((sd[name] - want_s).abs() / want_s).max().item())
    if not err <= tol:
        raise Wrong(f"{where}: its posterior differs from the case's by {err:.1e}")


def _to_logvar(
    case: Case, sd: dict[str, Callable[[Tensor], Tensor]], u: dict[str, Tensor]
) -> dict[str, Tensor]:
    r"""Returns, per tensor, the factor that takes a gradient with respect to a peer's
    standard-deviation parameter `u[name]` (:math:`\sigma = ` `sd[name](u)`) to one with
    respect to the case's log-variance: :math:`\frac{\partial \sigma / \partial \log
    \sigma^2}{\partial \sigma / \partial u}`, both elementwise."""

    factors = {}
    with torch.enable_grad():
        for name, f in sd.items():
            lv = case.posterior.logvar[name].detach().requires_grad_()
            (d_lv,) = torch.autograd.grad(std(lv).sum(), lv)
            uu = u[name].detach().requires_grad_()
            (d_u,) = torch.autograd.grad(f(uu).sum(), uu)
            factors[name] = d_lv.to(d_u.dtype) / d_u
    return factors


def _mse(out: Tensor, y: Tensor) -> Tensor:
    return (out - y).square().mean()


# bayesian-torch (Intel Labs)


_BT_NAMES = (("weight", "mu_weight", "rho_weight"), ("bias", "mu_bias", "rho_bias"))


def _bt_kl(model: nn.Module) -> Tensor:
    # get_kl_loss sums each tensor's MEAN element-wise KL (kl_div ends with .mean()): the
    # true KL, summed over elements, is that times the tensor's size.
    kl = 0.0
    for layer in model.modules():
        if not hasattr(layer, "mu_weight"):
            continue
        for mu, rho, p_mu, p_sigma in (
            ("mu_weight", "rho_weight", "prior_weight_mu", "prior_weight_sigma"),
            ("mu_bias", "rho_bias", "prior_bias_mu", "prior_bias_sigma"),
        ):
            m = getattr(layer, mu)
            if m is None:
                continue
            sigma = torch.log1p(torch.exp(getattr(layer, rho)))
            kl = kl + layer.kl_div(m, sigma, getattr(layer, p_mu), getattr(layer, p_sigma)) * (
                m.numel()
            )
    return kl


def build_bayesian_torch(
    case: Case, K: int, mode: str, fn: Callable, args: tuple, **_: Any
) -> Run:
    r"""bayesian-torch 0.5: `dnn_to_bnn`, then a Python loop over samples.

    As its README ("dnn_to_bnn", "Testing snippet": `model(x)` once per Monte Carlo
    sample, stacked) and its CIFAR example's training loop. The prior is N(0, 1); mu and
    rho are set to the case's posterior (:math:`\sigma = \mathrm{softplus}(\rho)`).

    Two pitfalls are worked around. Each layer refills its noise buffer in place through
    `.data` on every call, and `sigma * eps` saved that buffer for backward: the example's
    one backward over K samples gives every sample's rho gradient the LAST sample's noise,
    silently. Here each sample is backpropagated at once. And `get_kl_loss` sums the mean
    of each tensor's element-wise KL, not its sum (the KL 800x too small here): the loss
    uses the summed KL.
    """

    _require("bayesian_torch", "bayesian-torch")
    _applies(case, fn)
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn

    q = case.posterior
    like = q.mean[next(iter(q.mean))]
    model = copy.deepcopy(case.module)
    prior = {
        "prior_mu": 0.0,
        "prior_sigma": 1.0,
        "posterior_mu_init": 0.0,
        "posterior_rho_init": -3.0,
        "type": "Reparameterization",  # not Flipout: bayesflow's estimator
        "moped_enable": False,
        "moped_delta": 0.5,
    }
    with _quiet():
        dnn_to_bnn(model, prior)
    model.to(device=like.device, dtype=like.dtype)

    layers = {name: m for name, m in model.named_modules() if hasattr(m, "mu_weight")}
    pairs = {}  # our name -> (mu, rho)
    with torch.no_grad():
        for name, layer in layers.items():
            for ours, mu, rho in _BT_NAMES:
                key = f"{name}.{ours}"
                sigma = std(q.logvar[key].detach().double())
                getattr(layer, mu).copy_(q.mean[key])
                getattr(layer, rho).copy_(torch.log(torch.expm1(sigma)))
                pairs[key] = (getattr(layer, mu), getattr(layer, rho))
    _check_map(
        "bayesian-torch",
        case,
        {k: m for k, (m, _) in pairs.items()},
        {k: torch.log1p(torch.exp(r)) for k, (_, r) in pairs.items()},
    )

    (x,), y = args, case.target

    if mode != "train":
        model.eval()  # its layers sample in eval mode too

        def forward(seed: int | None) -> Tensor:
            _seed(seed)
            return torch.stack([model(x) for _ in range(K)])

        return forward

    model.train()
    params = [p for pair in pairs.values() for p in pair]
    softplus = lambda rho: torch.log1p(torch.exp(rho))
    factor = _to_logvar(
        case, dict.fromkeys(pairs, softplus), {k: r for k, (_, r) in pairs.items()}
    )

    def step(seed: int | None) -> tuple[Tensor, dict[str, Tensor]]:
        _seed(seed)
        for p in params:
            p.grad = None
        kl = _bt_kl(model) / NUM_DATA
        kl.backward()
        losses = []
        for _ in range(K):
            loss = _mse(model(x), y)
            (loss / K).backward()  # before the next sample refills the noise buffers
            losses.append(loss.detach())
        grads = {
            **{f"mean:{k}": m.grad for k, (m, _) in pairs.items()},
            **{f"logvar:{k}": r.grad * factor[k] for k, (_, r) in pairs.items()},
        }
        return torch.stack(losses) + kl.detach(), grads

    return step


# posteriors (normal-computing)


def build_posteriors(case: Case, K: int, mode: str, fn: Callable, args: tuple, **_: Any) -> Run:
    r"""posteriors 0.1: `posteriors.vi.diag`.

    As its README's quickstart: `log_posterior(params, batch)` from `functional_call` and
    `diag_normal_log_prob(params) / num_data`, `vi.diag.build(log_posterior,
    torchopt.adam(), temperature=1 / num_data, n_samples=K, init_log_sds=...)` with
    :math:`\log \sigma = \mathrm{softclip}(\log \sigma^2) / 2`. Forward: `vi.diag.sample`
    then `torch.vmap` of `functional_call`, as its examples. Train: the gradient that
    `vi.diag.update` takes, `torch.func.grad_and_value` of `vi.diag.nelbo` with respect to
    the mean and the log-sds (a Monte Carlo KL, sticking-the-landing gradients), without
    torchopt's update. The initial mean is a detached copy: from the README's
    `named_parameters()`, each update would chain an autograd graph to the previous one.
    """

    _require("posteriors", "posteriors")
    _require("torchopt", "torchopt")
    _applies(case, fn)
    with _quiet():
        import posteriors
        import torchopt

    from optree import tree_map
    from torch.func import functional_call, grad_and_value

    q = case.posterior
    net = case.module
    (x,), y = args, case.target
    mean = {k: v.detach().clone() for k, v in q.mean.items()}
    log_sds = {k: softclip(v.detach()).div(2) for k, v in q.logvar.items()}

    def log_posterior(params: dict[str, Tensor], batch: tuple) -> tuple[Tensor, Tensor]:
        xb, yb = batch
        out = functional_call(net, params, (xb,))
        return -_mse(out, yb) + posteriors.diag_normal_log_prob(params) / NUM_DATA, out

    with _quiet():
        transform = posteriors.vi.diag.build(
            log_posterior,
            torchopt.adam(lr=1e-3),
            temperature=1 / NUM_DATA,
            n_samples=K,
            init_log_sds=log_sds,
        )
        state = transform.init(mean)
    _check_map(
        "posteriors", case, dict(state.params), {k: v.exp() for k, v in state.log_sd_diag.items()}
    )

    if mode != "train":

        def model_func(p: dict[str, Tensor], xb: Tensor) -> Tensor:
            return functional_call(net, p, (xb,))

        def forward(seed: int | None) -> Tensor:
            _seed(seed)
            sampled = posteriors.vi.diag.sample(state, (K,))
            return torch.vmap(model_func, in_dims=(0, None))(sampled, x)

        return forward

    factor = _to_logvar(case, dict.fromkeys(mean, torch.exp), dict(state.log_sd_diag))

    def nelbo(m: dict[str, Tensor], lsd: dict[str, Tensor]) -> tuple[Tensor, Any]:
        sd = tree_map(torch.exp, lsd)
        return posteriors.vi.diag.nelbo(m, sd, (x, y), log_posterior, 1 / NUM_DATA, K, True)

    def step(seed: int | None) -> tuple[Tensor, dict[str, Tensor]]:
        _seed(seed)
        with torch.no_grad():
            (g_mean, g_lsd), (value, _) = grad_and_value(nelbo, argnums=(0, 1), has_aux=True)(
                state.params, state.log_sd_diag
            )
        grads = {
            **{f"mean:{k}": v for k, v in g_mean.items()},
            **{f"logvar:{k}": v * factor[k] for k, v in g_lsd.items()},
        }
        return value.reshape(1), grads

    return step


# Pyro


def _pyro_model(case: Case) -> Any:
    import pyro
    import pyro.distributions as dist

    from pyro.nn import PyroModule, PyroSample
    from pyro.nn.module import to_pyro_module_

    # Its modules tutorial: to_pyro_module_ an existing module in place, then a PyroSample
    # prior N(0, 1) for each parameter.
    net = copy.deepcopy(case.module)
    to_pyro_module_(net)
    for m in list(net.modules()):
        for name, value in list(m.named_parameters(recurse=False)):
            zero, one = torch.zeros_like(value.detach()), torch.ones_like(value.detach())
            setattr(m, name, PyroSample(dist.Normal(zero, one).to_event(value.dim())))

    # A Gaussian likelihood with sigma^2 = D / 2 makes -log p(y_b) = mean_d (out - y)^2
    # + const; the plate of size N over a batch of B scales it by N / B (its subsampling
    # tutorial): Pyro's loss is N * (the per-datum negative ELBO) + const.
    y = case.target
    sigma = math.sqrt(y.shape[-1] / 2)
    subsample = torch.arange(y.shape[0], device=y.device)

    class Model(PyroModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
            out = self.net(x)
            with pyro.plate("data", size=int(NUM_DATA), subsample=subsample):
                pyro.sample("obs", dist.Normal(out, sigma).to_event(1), obs=y)
            return out

    return Model()


def _pyro_const(case: Case) -> float:
    d = case.target.shape[-1]
    return d * 0.5 * math.log(math.pi * d)


def _build_pyro(case: Case, K: int, mode: str, fn: Callable, vectorize: bool) -> Run:
    _require("pyro", "pyro-ppl")
    _applies(case, fn)
    with _quiet():
        import pyro

        from pyro import poutine
        from pyro.infer import Predictive, Trace_ELBO
        from pyro.infer.autoguide import AutoNormal
        from pyro.infer.autoguide.initialization import init_to_value

    q = case.posterior
    (x,), y = case.args, case.target

    # Pyro keeps parameters in ONE global store, by name: only the most recently built
    # Pyro method is valid, so cells are built and timed one at a time.
    pyro.clear_param_store()
    model = _pyro_model(case)
    locs = {f"net.{k}": v.detach().clone() for k, v in q.mean.items()}
    with _quiet():
        guide = AutoNormal(model, init_loc_fn=init_to_value(values=locs), init_scale=0.1)
        guide(x, y)  # its prototype trace registers the parameters
    store = pyro.get_param_store()
    for k, lv in q.logvar.items():
        store[f"AutoNormal.scales.net.{k}"] = std(lv.detach())
    _check_map(
        "pyro",
        case,
        {k: store[f"AutoNormal.locs.net.{k}"].detach() for k in q.mean},
        {k: store[f"AutoNormal.scales.net.{k}"].detach() for k in q.mean},
    )

    if mode != "train":
        predictive = Predictive(model, guide=guide, num_samples=K, return_sites=("_RETURN",))

        def forward(seed: int | None) -> Tensor:
            _seed(seed)
            with _quiet():
                return predictive(x)["_RETURN"]

        return forward

    from torch.distributions import biject_to

    scales = {k: store[f"AutoNormal.scales.net.{k}"].unconstrained() for k in q.mean}
    factor = _to_logvar(
        case, dict.fromkeys(q.mean, biject_to(AutoNormal.scale_constraint)), scales
    )

    if vectorize:
        elbo = Trace_ELBO(num_particles=K, vectorize_particles=True, max_plate_nesting=1)
    else:
        elbo = Trace_ELBO(num_particles=K)
    const = _pyro_const(case)

    def step(seed: int | None) -> tuple[Tensor, dict[str, Tensor]]:
        _seed(seed)
        # What SVI.step does but for the optimizer's update: trace the parameters, take
        # the ELBO's gradients, read them and zero them.
        with _quiet(), poutine.trace(param_only=True) as capture:
            loss = elbo.loss_and_grads(model, guide, x, y)
        params = {n: s["value"].unconstrained() for n, s in capture.trace.nodes.items()}
        grads = {}
        for k in q.mean:
            grads[f"mean:{k}"] = params[f"AutoNormal.locs.net.{k}"].grad / NUM_DATA
            scale = params[f"AutoNormal.scales.net.{k}"].grad / NUM_DATA
            grads[f"logvar:{k}"] = scale * factor[k]
        for p in params.values():
            p.grad = None
        value = torch.tensor([loss / NUM_DATA - const], dtype=x.dtype, device=x.device)
        return value, grads

    return step


def build_pyro(case: Case, K: int, mode: str, fn: Callable, args: tuple, **_: Any) -> Run:
    r"""Pyro 1.9: `PyroModule` + `AutoNormal`, `Predictive` for forward, `Trace_ELBO` for train.

    As its modules tutorial (`to_pyro_module_`, `PyroSample` priors, `AutoNormal(model)`,
    `SVI(model, guide, optim, Trace_ELBO())`) and its Bayesian regression tutorial
    (`Predictive(model, guide=guide, num_samples=K, return_sites=("_RETURN",))`). The
    guide's locs are the means (`init_to_value`) and its scales the case's :math:`\sigma`.
    Train: `Trace_ELBO(num_particles=K).loss_and_grads`, the gradients of `SVI.step`, a
    Monte Carlo KL; both loop over the K samples with a poutine trace and replay each.
    """

    return _build_pyro(case, K, mode, fn, vectorize=False)


def build_pyro_vec(case: Case, K: int, mode: str, fn: Callable, args: tuple, **_: Any) -> Run:
    r"""Pyro's vectorized ELBO, `Trace_ELBO(num_particles=K, vectorize_particles=True)`.

    Train only. The weights get a leading `(K, 1)` batch shape, which works here because
    zuko's `Linear` takes batched weights (`torch.nn.Linear` raises); `Predictive(...,
    parallel=True)` fails on this model (it guesses no plate for the guide, and zuko's
    einsum cannot broadcast the samples against the batch).
    """

    if mode != "train":
        _require("pyro", "pyro-ppl")
        raise NotApplicable("train only: Predictive(parallel=True) fails on this model")
    return _build_pyro(case, K, mode, fn, vectorize=True)
