r"""Laplace after training: the curvatures against Python loops and closed forms, the
evidence against its formula, the prior precision against the evidence's stationarity, the
linearized predictive against explicit Jacobians, and all of them against laplace-torch."""

import copy
import importlib.util
import math
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bayesflow as bf

from bayesflow import _curvature
from bayesflow._numerics import LOGVAR_LIMIT, logvar_from_var
from bayesflow._numerics import var as var_of
from bayesflow._posterior import posterior_from_variance
from bayesflow.linearized import _jacobian_variance

from .pages import run_page
from .registry import LoRA

HAS_LAPLACE = importlib.util.find_spec("laplace") is not None
needs_laplace = pytest.mark.skipif(
    not HAS_LAPLACE,
    reason="laplace-torch is not installed (bash scripts/peers.sh installs it)",
)

SIGMA = 0.7


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(outputs=3):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, outputs)
    )


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    )


def classification_ll(m, x, y):
    return -F.cross_entropy(m(x), y, reduction="none")


def regression_ll(m, x, y):
    return torch.distributions.Normal(m(x), SIGMA).log_prob(y).sum(-1)


def output(m, x, y):
    return m(x)


def data(kind, n=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "cnn":
        x = torch.randn(n, 1, 4, 4, generator=g)
    else:
        x = torch.randn(n, 4, generator=g)
    if kind == "regression":
        return x, torch.randn(n, 2, generator=g)
    return x, torch.randint(0, 3, (n,), generator=g)


# Cases: (module, per-datum log-likelihood, likelihood, data kind).
CASES = {
    "mlp-classification": (mlp, classification_ll, "classification", "classification"),
    "mlp-regression": (lambda: mlp(2), regression_ll, "regression", "regression"),
    "cnn-classification": (cnn, classification_ll, "classification", "cnn"),
}
SELECTIONS = {"all": ((), ()), "last-layer": (("4",), ()), "weights": (("**",), ("**.bias",))}


def selection(case, which):
    include, exclude = SELECTIONS[which]
    return include or ("",), exclude


def batches(x, y, size=5):
    return list(zip(x.split(size), y.split(size), strict=True))


def loop_ef(module, fn, x, y, names):
    r"""The empirical Fisher by a Python loop of torch.autograd.grad, one example at a time."""

    params = [module.get_parameter(k) for k in names]
    h = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        grads = torch.autograd.grad(fn(module, x[i : i + 1], y[i : i + 1]).sum(), params)
        for acc, g in zip(h, grads, strict=True):
            acc += g.square()
    return dict(zip(names, h, strict=True))


def explicit_jacobian(module, x, names):
    r"""The Jacobian (C, P) of the output of one example by torch.autograd.functional."""

    params = {k: module.get_parameter(k).detach() for k in names}

    def f(*flat):
        p = dict(zip(names, flat, strict=True))
        return torch.func.functional_call(module, p, (x.unsqueeze(0),)).reshape(-1)

    jac = torch.autograd.functional.jacobian(f, tuple(params.values()))
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)


def loop_ggn(module, likelihood, x, names):
    r"""diag(J^T Lambda J) summed over examples, with the full output Hessian Lambda."""

    total = 0
    for i in range(len(x)):
        jac = explicit_jacobian(module, x[i], names)
        f = module(x[i : i + 1]).reshape(-1)
        if likelihood == "classification":
            p = f.softmax(-1)
            lam = torch.diag(p) - torch.outer(p, p)
        else:
            lam = torch.eye(len(f)) / SIGMA**2
        total = total + torch.diagonal(jac.T @ lam @ jac)
    sizes = [module.get_parameter(k).numel() for k in names]
    return {
        k: t.view_as(module.get_parameter(k))
        for k, t in zip(names, total.split(sizes), strict=True)
    }


def snapshot(module):
    return (
        {k: (p, p.detach().clone(), p.requires_grad) for k, p in module.named_parameters()},
        {k: (b, b.clone()) for k, b in module.named_buffers()},
        [m.training for m in module.modules()],
    )


def unchanged(module, before):
    params, buffers, modes = before
    now = dict(module.named_parameters())
    return (
        now.keys() == params.keys()
        and all(
            now[k] is p and torch.equal(p, v) and p.requires_grad == r and p.grad is None
            for k, (p, v, r) in params.items()
        )
        and dict(module.named_buffers()).keys() == buffers.keys()
        and all(
            dict(module.named_buffers())[k] is b and torch.equal(b, v)
            for k, (b, v) in buffers.items()
        )
        and [m.training for m in module.modules()] == modes
    )


# The curvatures.


@pytest.mark.parametrize("which", SELECTIONS)
@pytest.mark.parametrize("case", CASES)
def test_empirical_fisher_matches_a_loop_of_autograd_grad(case, which):
    build, fn, _, kind = CASES[case]
    module = build()
    x, y = data(kind)
    include, exclude = selection(case, which)
    before = snapshot(module)

    fit = bf.laplace_fit(module, fn, batches(x, y), hessian="ef", include=include, exclude=exclude)

    assert unchanged(module, before)
    expected = loop_ef(module, fn, x, y, bf.select(module, include, exclude))
    assert fit.hessian.keys() == expected.keys()
    for k, h in fit.hessian.items():
        assert torch.allclose(h, expected[k], rtol=1e-10, atol=1e-12), k
        assert torch.equal(fit.mean[k], module.get_parameter(k))
    assert any(h.abs().max() > 1e-3 for h in fit.hessian.values())  # not a zero curvature
    assert torch.allclose(fit.log_likelihood, fn(module, x, y).sum(), rtol=1e-12)
    assert fit.num_data == len(x)


@pytest.mark.parametrize("which", SELECTIONS)
@pytest.mark.parametrize("case", CASES)
def test_ggn_matches_explicit_jacobians_and_output_hessians(case, which):
    build, fn, likelihood, kind = CASES[case]
    module = build()
    x, y = data(kind)
    include, exclude = selection(case, which)
    before = snapshot(module)

    fit = bf.laplace_fit(
        module,
        fn,
        batches(x, y),
        output=output,
        likelihood=likelihood,
        sigma=SIGMA,
        include=include,
        exclude=exclude,
    )

    assert unchanged(module, before)
    expected = loop_ggn(module, likelihood, x, bf.select(module, include, exclude))
    for k, h in fit.hessian.items():
        assert torch.allclose(h, expected[k], rtol=1e-10, atol=1e-12), k
        assert (h >= -1e-12).all()
    assert any(h.abs().max() > 1e-3 for h in fit.hessian.values())


def test_the_fit_does_not_depend_on_batches_or_chunks():
    module = mlp()
    x, y = data("classification", n=17)
    kw = dict(output=output, likelihood="classification")

    one = bf.laplace_fit(module, classification_ll, [(x, y)], **kw)
    split = bf.laplace_fit(module, classification_ll, batches(x, y, 4), chunk_size=3, **kw)
    ef_one = bf.laplace_fit(module, classification_ll, [(x, y)], hessian="ef")
    ef_split = bf.laplace_fit(
        module, classification_ll, batches(x, y, 6), hessian="ef", chunk_size=2
    )

    for a, b in ((one, split), (ef_one, ef_split)):
        for k in a.hessian:
            assert torch.allclose(a.hessian[k], b.hessian[k], rtol=1e-12, atol=1e-14)
        assert torch.allclose(a.log_likelihood, b.log_likelihood, rtol=1e-12)
    assert not torch.allclose(one.hessian["0.weight"], ef_one.hessian["0.weight"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_half_precision_fit_sums_its_batches_in_float32(dtype):
    # 120 batches of 16, each adding a few units to curvatures in the hundreds: a running
    # sum in bfloat16 moves in steps of 2 to 4 there (6% off before; float16 0.4%).
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    x, y = torch.randn(120 * 16, 4).to(dtype), torch.randint(0, 3, (120 * 16,))
    loader = batches(x, y, 16)
    kw = dict(output=output, likelihood="classification")

    fit = bf.laplace_fit(module, classification_ll, loader, **kw)

    # The oracle: the very same per-batch steps (a fit per batch), summed in float64.
    # The fit keeps them in float32 (rounded to the dtype, bfloat16's sum was 6% off).
    steps = [bf.laplace_fit(module, classification_ll, [b], **kw) for b in loader]
    tol = 120 * torch.finfo(torch.float32).eps  # a float32 sum of 120 terms
    for k, h in fit.hessian.items():
        exact = sum(step.hessian[k].double() for step in steps)
        assert h.dtype == torch.float32
        assert torch.allclose(h.double(), exact, rtol=tol, atol=0.0), k
    exact = sum(classification_ll(module, *b).double().sum() for b in loader)
    assert fit.log_likelihood.dtype == torch.float32
    assert torch.allclose(fit.log_likelihood.double(), exact, rtol=tol, atol=0.0)
    assert fit.hessian["2.bias"].min() > 100  # sums far above the steps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_half_precision_fit_beyond_the_dtypes_range(dtype):
    # The curvature and the log-likelihood were returned in the module's dtype: 256 points
    # at sigma = 0.05 have a bias curvature of 102400, infinite in float16 (the posterior
    # then refused), and bfloat16 rounded a log-likelihood of -8e5 by thousands. In
    # float32 now; the posterior's variances (in the module's dtype) follow them.
    # Oracle: the same fit of the module in float64 (its values rounded to `dtype`).
    torch.manual_seed(0)
    module = nn.Linear(3, 1).to(dtype)
    x, y = torch.randn(256, 3).to(dtype), (10 * torch.randn(256, 1)).to(dtype)
    sigma = 0.05
    fn = lambda m, x, y: torch.distributions.Normal(m(x).float(), sigma).log_prob(y.float())
    kw = dict(output=output, likelihood="regression", sigma=sigma)
    fit = bf.laplace_fit(module, lambda m, x, y: fn(m, x, y).sum(-1), [(x, y)], **kw)
    wide = copy.deepcopy(module).double()
    fn64 = lambda m, x, y: torch.distributions.Normal(m(x), sigma).log_prob(y).sum(-1)
    exact = bf.laplace_fit(wide, fn64, [(x.double(), y.double())], **kw)

    assert fit.hessian["bias"].dtype == torch.float32
    assert fit.hessian["bias"].item() == pytest.approx(256 / sigma**2, rel=1e-6)
    for k, h in fit.hessian.items():
        assert torch.allclose(h.double(), exact.hessian[k], rtol=2e-2), k
    assert fit.log_likelihood.item() == pytest.approx(exact.log_likelihood.item(), rel=1e-3)
    assert exact.log_likelihood.item() < -1e5
    q = bf.laplace_posterior(fit, 1.0)
    var = bf.std(q)["bias"].double().square()
    assert q.mean["bias"].dtype == dtype and torch.isfinite(var).all()
    rel = 8 * torch.finfo(dtype).eps  # the log-variance rounded to dtype, then std in it
    assert var.item() == pytest.approx(1 / (256 / sigma**2 + 1.0), rel=rel)


def test_a_dataloader_and_a_regression_output_of_shape_b():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0))
    x, y = torch.randn(9, 3), torch.randn(9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    fn = lambda m, x, y: torch.distributions.Normal(m(x), SIGMA).log_prob(y)

    fit = bf.laplace_fit(module, fn, loader, output=output, likelihood="regression", sigma=SIGMA)

    expected = loop_ggn(module, "regression", x, bf.select(module))
    for k, h in fit.hessian.items():
        assert torch.allclose(h, expected[k], rtol=1e-10, atol=1e-12)


def test_evaluation_mode_and_the_module_left_as_found():
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)
    )
    module.train()
    x, y = data("classification")
    module[1].running_mean.normal_()  # statistics the fit must use, and leave alone
    before = snapshot(module)

    fit = bf.laplace_fit(
        module, classification_ll, batches(x, y), output=output, likelihood="classification"
    )

    assert unchanged(module, before)
    assert module.training and module[2].training
    reference = copy.deepcopy(module).eval()
    expected = loop_ggn(reference, "classification", x, bf.select(module))
    for k, h in fit.hessian.items():
        assert torch.allclose(h, expected[k], rtol=1e-10, atol=1e-12)


class Counting(nn.Module):
    r"""Counts its calls by assigning its buffer a new tensor, as an EMA does
    (`self.ema = 0.9 * self.ema + ...`)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.lin = nn.Linear(4, 6)

    def forward(self, x):
        self.calls = self.calls + 1
        return self.lin(x)


class Observer(nn.Module):
    r"""Keeps the range of what it saw, in place and in evaluation mode too, as torch's
    `MinMaxObserver` does."""

    def __init__(self):
        super().__init__()
        self.register_buffer("low", torch.tensor(math.inf))
        self.register_buffer("high", torch.tensor(-math.inf))

    def forward(self, x):
        seen = x.detach()
        self.low.copy_(torch.minimum(self.low, seen.min()))
        self.high.copy_(torch.maximum(self.high, seen.max()))
        return x


def counting():
    torch.manual_seed(0)
    return nn.Sequential(Counting(), nn.Tanh(), nn.Linear(6, 3))


def observed():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), Observer(), nn.Tanh(), nn.Linear(6, 3))


def _linearized(include, fn=None):
    def call(m, loader):
        q = bf.init(m, init_logvar=-3.0, include=include(m))
        return bf.linearized_predictive(m, q, torch.cat([b[0] for b in loader]), fn=fn)

    return call


def _fit(hessian, include):
    return lambda m, loader: bf.laplace_fit(
        m, classification_ll, loader, hessian=hessian, include=include(m), **GOOD
    )


def _all(m):
    return [""]


def _last(m):
    return [str(len(m) - 1)]


# The calls that run the per-example transforms, over all weights and a last layer.
TRANSFORMING = {
    "ggn-all": ("laplace_fit", _fit("ggn", _all)),
    "ggn-last-layer": ("laplace_fit", _fit("ggn", _last)),
    "ef-all": ("laplace_fit", _fit("ef", _all)),
    "ef-last-layer": ("laplace_fit", _fit("ef", _last)),
    "linearized-all": ("linearized_predictive", _linearized(_all)),
    "linearized-last-layer": ("linearized_predictive", _linearized(_last)),
}


@pytest.mark.parametrize("call", TRANSFORMING)
def test_a_buffer_that_the_forward_assigns_is_left_as_found(call):
    module = counting()
    plain = nn.Sequential(module[0].lin, module[1], module[2])  # the same net, no counter
    x, y = data("classification")
    before = snapshot(module)
    run = TRANSFORMING[call][1]

    got = run(module, batches(x, y))

    # The same tensor, with its value: no dead functorch wrapper from the transforms.
    assert unchanged(module, before)
    copy.deepcopy(module)
    expected = run(plain, batches(x, y))
    if isinstance(got, bf.LaplaceFit):
        got, expected = got.hessian.values(), expected.hessian.values()
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    module(x)
    assert module[0].calls is not before[1]["0.calls"][0]  # the forward does assign


@pytest.mark.parametrize("call", ["ggn-last-layer", "ef-all", "linearized-all"])
def test_a_buffer_that_the_forward_assigns_is_left_as_found_where_the_call_raises(call):
    module = counting()
    x, y = data("classification")
    before = snapshot(module)
    if call.startswith("linearized"):
        # The transforms ran before the check that refuses a mixing fn.
        run = _linearized(_all, fn=lambda m, x: m(x) - m(x).mean(0))
        message = "linearized_predictive: expected fn on one example at a time"
    else:
        run, message = TRANSFORMING[call][1], "laplace_fit: expected the tensors of a batch"
    loader = [*batches(x, y), (x[:3], y[:2])]  # a bad batch after the others

    with pytest.raises(ValueError, match=message):
        run(module, loader)

    assert unchanged(module, before)
    copy.deepcopy(module)


@pytest.mark.parametrize("calibrated", [False, True], ids=["fresh", "calibrated"])
@pytest.mark.parametrize("call", TRANSFORMING)
def test_a_buffer_that_the_forward_writes_in_place_is_refused_and_left_as_found(call, calibrated):
    module = observed()
    x, y = data("classification")
    if calibrated:  # on these data: the forward writes the values it found
        module(x)
    before = snapshot(module)
    where, run = TRANSFORMING[call]

    with pytest.raises(
        ValueError,
        match=rf"{where}: expected the module's forward to leave its buffers alone in "
        r"evaluation mode, got writes to \['1.low', '1.high'\]",
    ):
        run(module, batches(x, y))

    assert unchanged(module, before)
    copy.deepcopy(module)
    module(2 * x)
    assert not torch.equal(module[1].low, before[1]["1.low"][1])  # the forward does write


class NoGrad(nn.Sequential):
    r"""The net under torch.no_grad(), as an `output` that "only evaluates" it."""

    def forward(self, x):
        with torch.no_grad():
            return super().forward(x)


class Detached(nn.Sequential):
    def forward(self, x):
        return super().forward(x).detach()


@pytest.mark.parametrize("wrap", [NoGrad, Detached], ids=["no-grad", "detached"])
@pytest.mark.parametrize("call", TRANSFORMING)
def test_an_output_without_a_gradient_is_refused_and_the_module_left_as_found(call, wrap):
    # Under the transforms, its derivative is zero, not an error: a curvature and a
    # variance of zero, silently, on the last-layer closed form too.
    torch.manual_seed(0)
    module = wrap(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3))
    module.train()
    module[2].eval()  # modes of its own, to be given back
    x, y = data("classification")
    before, rng = snapshot(module), torch.get_rng_state()
    where, run = TRANSFORMING[call]
    what = "output" if call.startswith("ggn") else "fn"

    with pytest.raises(
        ValueError,
        match=rf"{where}: expected {what} to return a result that depends on the picked "
        r"parameters, got one without a gradient in them \(computed under torch.no_grad\(\)",
    ):
        run(module, batches(x, y))

    assert unchanged(module, before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_ggn_takes_a_fn_without_a_gradient():
    # The GGN differentiates output alone: fn gives the log-likelihood, its values only.
    module = mlp()
    x, y = data("classification")

    def no_grad_ll(m, x, y):
        with torch.no_grad():
            return classification_ll(m, x, y)

    fit = bf.laplace_fit(module, no_grad_ll, batches(x, y), **GOOD)

    expected = loop_ggn(module, "classification", x, list(fit.mean))
    for k, h in fit.hessian.items():
        assert torch.allclose(h, expected[k], rtol=1e-10, atol=1e-12)
    assert all((h > 0).any() for h in fit.hessian.values())


class MCDropout(nn.Module):
    r"""Dropout that stays random in evaluation mode, as MC dropout is often written."""

    def forward(self, x):
        return F.dropout(x, 0.5, training=True)


@pytest.mark.parametrize("call", TRANSFORMING)
def test_a_forward_random_in_evaluation_mode_is_refused_and_draws_nothing(call):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), MCDropout(), nn.Linear(6, 3))
    x, y = data("classification")
    before, rng = snapshot(module), torch.get_rng_state()
    where, run = TRANSFORMING[call]

    with pytest.raises(
        ValueError,
        match=rf"{where}: expected a forward without random operations in evaluation mode "
        r".*got a forward that draws random numbers in evaluation mode",
    ):
        run(module, batches(x, y))

    assert unchanged(module, before)
    assert torch.equal(torch.get_rng_state(), rng)  # a failed call draws nothing
    assert not torch.equal(module(x), module(x))  # the forward is random


@pytest.mark.parametrize("call", TRANSFORMING)
def test_modes_are_given_back_through_train(call):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Dropout(0.5), LoRA(6, 6), nn.BatchNorm1d(6))
    module = nn.Sequential(nn.Linear(4, 6), inner, nn.Tanh(), LoRA(6, 3))
    module.train()
    inner[0].eval()
    inner[1].eval()  # merged, under a parent in training mode
    loras = [m for m in module.modules() if isinstance(m, LoRA)]
    modes = [m.training for m in module.modules()]
    weights = [m.weight.detach().clone() for m in loras]
    x, y = data("classification")

    TRANSFORMING[call][1](module, batches(x, y))

    assert [m.training for m in module.modules()] == modes  # each module its own
    for m, w in zip(loras, weights, strict=True):
        assert m.merged == (not m.training)  # its train() ran to give its mode back
        assert torch.allclose(m.weight, w, rtol=0.0, atol=1e-14)  # up to BA - BA


def test_a_fn_that_mixes_the_batch_is_refused():
    module = mlp()
    x, y = data("classification")
    centred = lambda m, x, y: classification_ll(m, x, y) - classification_ll(m, x, y).mean()
    before = snapshot(module)

    for include in ([""], ["4"]):  # the per-example path and the closed form
        with pytest.raises(ValueError, match="laplace_fit: expected fn on one example at a"):
            bf.laplace_fit(module, centred, [(x, y)], hessian="ef", include=include)
    with pytest.raises(ValueError, match="laplace_fit: expected output on one example"):
        bf.laplace_fit(
            module,
            classification_ll,
            [(x, y)],
            output=lambda m, x, y: m(x) - m(x).mean(0),
            likelihood="classification",
        )
    assert unchanged(module, before)


@pytest.mark.parametrize("include", [("",), ("2",)], ids=["all", "last-layer"])
def test_the_ggn_checks_fn_on_the_first_and_last_example(include):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(12, 2)
    y = x.sum(-1)
    sizes = []

    def slip(m, x, y):  # a (B, 1) mean against (B,) targets: (B, B), summed per datum
        sizes.append(len(x))
        return torch.distributions.Normal(m(x), SIGMA).log_prob(y)

    def right(m, x, y):
        sizes.append(len(x))
        return torch.distributions.Normal(m(x).squeeze(-1), SIGMA).log_prob(y)

    kw = dict(output=output, likelihood="regression", sigma=SIGMA, include=include)
    before = snapshot(module)

    with pytest.raises(ValueError, match="laplace_fit: expected fn on one example at a time"):
        bf.laplace_fit(module, slip, batches(x, y), **kw)
    assert unchanged(module, before)

    sizes.clear()
    fit = bf.laplace_fit(module, right, batches(x, y), **kw)

    assert sizes == [5, 1, 1, 5, 2]  # two more forwards, of its first and last example
    assert torch.allclose(fit.log_likelihood, right(module, x, y).sum(), rtol=1e-12)


class _TimeIsBatch(nn.Module):
    r"""A GRU without `batch_first` on `(B, T, F)`: it reads the batch dim as time, so the
    features of example i depend on examples 0 to i - 1 (example 0 alone is unmixed), or,
    `reverse`, on examples i + 1 to B - 1 (the last example alone is unmixed)."""

    def __init__(self, reverse=False):
        super().__init__()
        self.rnn, self.out, self.reverse = nn.GRU(3, 5), nn.Linear(5, 3), reverse

    def forward(self, x):
        if self.reverse:
            return self.out(self.rnn(x.flip(0))[0][:, -1].flip(0))
        return self.out(self.rnn(x)[0][:, -1])


class _Centred(nn.Module):
    r"""Features centred over the batch before the last layer."""

    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(3, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.out(h - h.mean(0, keepdim=True))


def test_the_last_layer_closed_form_checks_more_than_one_unmixed_example():
    # The closed form was checked on the first example of the first batch alone: a module
    # that leaves that example unmixed (a recurrent layer over the batch dim), or a first
    # batch of one example, let a curvature or a variance of mixed features through, where
    # the per-example path (all weights) raised.
    torch.manual_seed(0)
    ll = lambda m, x, y: -F.cross_entropy(m(x), y, reduction="none")
    kw = dict(output=lambda m, x, y: m(x), likelihood="classification", include=["out"])
    x, y = torch.randn(8, 4, 3), torch.randint(0, 3, (8,))
    for reverse in (False, True):  # the first example alone unmixed, or the last
        module = _TimeIsBatch(reverse)
        assert not torch.allclose(module(x[1:2]), module(x)[1:2])  # example 1 is mixed
        before = snapshot(module)
        for hessian in ("ggn", "ef"):
            with pytest.raises(
                ValueError, match=r"laplace_fit: expected (fn|output) on one example"
            ):
                bf.laplace_fit(module, ll, batches(x, y, 4), **{**kw, "hessian": hessian})
        q = bf.init(module, init_logvar=-3.0, include=["out"])
        with pytest.raises(ValueError, match=r"linearized_predictive: expected fn on one example"):
            bf.linearized_predictive(module, q, x)
        assert unchanged(module, before)

    # A batch of one example first (it mixes nothing): the next batch is checked.
    module, x2, y2 = _Centred(), torch.randn(9, 3), torch.randint(0, 3, (9,))
    with pytest.raises(ValueError, match=r"laplace_fit: expected output on one example"):
        bf.laplace_fit(module, ll, [(x2[:1], y2[:1]), (x2[1:], y2[1:])], **kw)
    # Examples that do not mix: the closed form, as the per-example path gives it.
    plain = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))
    data = [(x2[:1], y2[:1]), (x2[1:], y2[1:])]
    fast = bf.laplace_fit(plain, ll, data, **{**kw, "include": ["2"]})
    slow = bf.laplace_fit(plain, ll, data, **{**kw, "include": ["0", "2"]})
    for k in fast.hessian:
        assert torch.allclose(fast.hessian[k], slow.hessian[k], rtol=1e-10)


def test_the_ggn_checks_fn_until_a_batch_of_two_examples():
    # On a first batch of one example, a (B, 1) mean against (B,) targets is (1, 1), a
    # per-datum shape: the later batches' (B, B) log-likelihoods were summed per datum, and
    # the evidence was -87.1 for -18.0.
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))
    x, y = torch.randn(9, 3), torch.randn(9)
    slip = lambda m, x, y: torch.distributions.Normal(m(x), SIGMA).log_prob(y)
    kw = dict(output=output, likelihood="regression", sigma=SIGMA)
    for include in ([""], ["2"]):
        with pytest.raises(ValueError, match="laplace_fit: expected fn on one example at a time"):
            bf.laplace_fit(module, slip, [(x[:1], y[:1]), (x[1:], y[1:])], **kw, include=include)
    # An fn whose last datum alone is right (the others summed with the ones after them).
    right = lambda m, x, y: torch.distributions.Normal(m(x).squeeze(-1), SIGMA).log_prob(y)
    late = lambda m, x, y: right(m, x, y).flip(0).cumsum(0).flip(0)
    with pytest.raises(ValueError, match="laplace_fit: expected fn on one example at a time"):
        bf.laplace_fit(module, late, [(x, y)], **kw)


NORMS = {
    "batch-norm": lambda: nn.BatchNorm1d(6, track_running_stats=False),
    "batch-norm-2d": lambda: nn.Sequential(
        nn.Unflatten(1, (6, 1, 1)), nn.BatchNorm2d(6, track_running_stats=False), nn.Flatten()
    ),
}
NORM_CALLS = {
    "ggn": ("laplace_fit", lambda m, fn, x, y: bf.laplace_fit(m, fn, [(x, y)], **GOOD)),
    "ef": ("laplace_fit", lambda m, fn, x, y: bf.laplace_fit(m, fn, [(x, y)], hessian="ef")),
    "laplace": ("laplace", lambda m, fn, x, y: bf.laplace(m, fn, [(x, y)], **GOOD)),
    "linearized": (
        "linearized_predictive",
        lambda m, fn, x, y: bf.linearized_predictive(
            m, bf.init(m, init_logvar=-3.0), x, y, fn=lambda m, x, y: fn(m, x, y).unsqueeze(-1)
        ),
    ),
}


@pytest.mark.parametrize("call", NORM_CALLS)
@pytest.mark.parametrize("norm", NORMS)
def test_batch_norm_without_running_statistics_is_refused_before_any_work(norm, call):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 6), NORMS[norm](), nn.Tanh(), nn.Linear(6, 3))
    x, y = data("classification")
    calls = []

    def fn(m, x, y):
        calls.append(len(x))
        return classification_ll(m, x, y)

    before = snapshot(module)
    where, run = NORM_CALLS[call]
    layer = "BatchNorm1d '1'" if norm == "batch-norm" else "BatchNorm2d '1.1'"

    with pytest.raises(
        ValueError,
        match=rf"{where}: expected layers that treat each example on its own, got {layer} "
        r"without running statistics \(track_running_stats=False\): .* mixes the examples",
    ):
        run(module, fn, x, y)

    assert calls == []
    assert unchanged(module, before)


class Embedded(nn.Module):
    def __init__(self, bag):
        super().__init__()
        # Embedding and EmbeddingBag with max_norm renormalize the rows they read, in place.
        emb = nn.EmbeddingBag(5, 4, max_norm=1.0) if bag else nn.Embedding(5, 4, max_norm=1.0)
        self.emb, self.out = emb, nn.Linear(4, 3)

    def forward(self, t):
        return self.out(self.emb(t))


EMBEDDED_CALLS = {
    "ggn-last-layer": (
        "laplace_fit",
        lambda m, fn, t, y: bf.laplace_fit(m, fn, [(t, y)], **GOOD, include=["out"]),
    ),
    "ggn-all": ("laplace_fit", lambda m, fn, t, y: bf.laplace_fit(m, fn, [(t, y)], **GOOD)),
    "ef-all": (
        "laplace_fit",
        lambda m, fn, t, y: bf.laplace_fit(m, fn, [(t, y)], hessian="ef"),
    ),
    "laplace": (
        "laplace",
        lambda m, fn, t, y: bf.laplace(m, fn, [(t, y)], **GOOD, prior_precision="marglik"),
    ),
    "linearized-last-layer": (
        "linearized_predictive",
        lambda m, fn, t, y: bf.linearized_predictive(
            m, bf.init(m, init_logvar=-3.0, include=["out"]), t, y, fn=output
        ),
    ),
    "linearized-all": (
        "linearized_predictive",
        lambda m, fn, t, y: bf.linearized_predictive(
            m, bf.init(m, init_logvar=-3.0), t, y, fn=output
        ),
    ),
}


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # embedding_bag
@pytest.mark.parametrize("call", EMBEDDED_CALLS)
@pytest.mark.parametrize("bag", [False, True], ids=["embedding", "embedding-bag"])
def test_an_embedding_with_max_norm_is_refused_before_any_forward(bag, call):
    # Its forward renormalizes the weight's rows in place, which torch.func cannot run:
    # the calls failed with torch's bare RuntimeError, after rewriting the user's rows.
    torch.manual_seed(0)
    module = Embedded(bag)
    with torch.no_grad():
        module.emb.weight.mul_(3.0)
    t = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 2]]) if bag else torch.tensor([0, 1, 2, 3])
    y = torch.tensor([0, 1, 2, 0])
    calls = []

    def fn(m, t, y):
        calls.append(len(t))
        return classification_ll(m, t, y)

    before = snapshot(module)
    assert (module.emb.weight.norm(dim=1) > module.emb.max_norm).all()  # rows it would rewrite
    where, run = EMBEDDED_CALLS[call]

    with pytest.raises(
        ValueError,
        match=rf"^{where}: expected no nn\.Embedding or nn\.EmbeddingBag with max_norm \(it "
        r"renormalizes the rows of its weight in place at every forward, .*\), got max_norm "
        r"on the weights \['emb\.weight'\]$",
    ):
        run(module, fn, t, y)

    assert calls == []
    assert unchanged(module, before)  # the rows above max_norm too, bit for bit
    module.emb.max_norm = None  # the same net without the renormalization is fitted
    run(module, fn, t, y)


def test_instance_norm_uses_each_examples_own_statistics_and_is_accepted():
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Linear(4, 6),
        nn.Unflatten(1, (2, 3)),
        nn.InstanceNorm1d(2),  # no running statistics either, but per example
        nn.Flatten(),
        nn.Tanh(),
        nn.Linear(6, 3),
    )
    x, y = data("classification")

    fit = bf.laplace_fit(module, classification_ll, batches(x, y), hessian="ef")

    expected = loop_ef(module, classification_ll, x, y, bf.select(module))
    for k, h in fit.hessian.items():
        assert torch.allclose(h, expected[k], rtol=1e-10, atol=1e-12), k


# The closed form of a last linear layer.


def per_example_calls(monkeypatch):
    r"""Records the batch sizes the per-example (generic) path is called with."""

    sizes = []
    for name in ("_ggn_batch", "_ef_batch"):
        original = getattr(_curvature, name)

        def spy(*args, original=original):
            sizes.append(args[-1][0].shape[0])
            return original(*args)

        monkeypatch.setattr(_curvature, name, spy)
    return sizes


LAST = {
    **{f"{case}-{h}": (case, h, ("4",)) for case in CASES for h in ("ggn", "ef")},
    "weight-only": ("mlp-classification", "ggn", ("4.weight",)),
    "weight-only-ef": ("mlp-regression", "ef", ("4.weight",)),
}


@pytest.mark.parametrize("name", LAST)
def test_the_last_layer_closed_form_matches_the_per_example_path(name, monkeypatch):
    case, hessian, include = LAST[name]
    build, fn, likelihood, kind = CASES[case]
    module = build()
    x, y = data(kind, n=17)
    outputs = []

    def counted(m, x, y):
        outputs.append(len(x))
        return output(m, x, y)

    kw = dict(hessian=hessian, output=counted, likelihood=likelihood, sigma=SIGMA, include=include)
    before = snapshot(module)

    sizes = per_example_calls(monkeypatch)
    fast = bf.laplace_fit(module, fn, batches(x, y, 6), **kw)
    assert sizes == [2]  # the closed form, checked on its first and last example
    # The GGN reads the output of later batches off the call of `fn`.
    assert outputs == ([6, 1] if hessian == "ggn" else [])
    monkeypatch.setattr(_curvature, "last_layer", lambda module, names: None)
    slow = bf.laplace_fit(module, fn, batches(x, y, 6), **kw)
    assert sizes == [2, 6, 6, 5]

    assert unchanged(module, before)
    assert list(fast.hessian) == list(slow.hessian) == bf.select(module, include)
    for k, h in fast.hessian.items():
        assert torch.allclose(h, slow.hessian[k], rtol=1e-10, atol=1e-12), k
        assert torch.equal(fast.mean[k], slow.mean[k])
    assert any(h.abs().max() > 1e-3 for h in fast.hessian.values())
    assert torch.allclose(fast.log_likelihood, slow.log_likelihood, rtol=1e-12)
    assert fast.num_data == slow.num_data == len(x)


def test_the_closed_form_with_an_output_of_shape_b(monkeypatch):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0))
    x, y = torch.randn(9, 3), torch.randn(9)
    fn = lambda m, x, y: torch.distributions.Normal(m(x), SIGMA).log_prob(y)
    sizes = per_example_calls(monkeypatch)

    for hessian in ("ggn", "ef"):
        fit = bf.laplace_fit(
            module, fn, batches(x, y, 4), hessian=hessian, output=output,
            likelihood="regression", sigma=SIGMA, include=["2"],
        )  # fmt: skip
        names = bf.select(module, ["2"])
        if hessian == "ggn":
            expected = loop_ggn(module, "regression", x, names)
        else:
            expected = loop_ef(module, fn, x, y, names)
        for k, h in fit.hessian.items():
            assert torch.allclose(h, expected[k], rtol=1e-10, atol=1e-12), (hessian, k)
    assert sizes == [2, 2]


class Reused(nn.Module):
    r"""A last layer whose weight also enters the net elsewhere, in a functional call."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        return self.out(torch.tanh(F.linear(x, self.out.weight)))


def tied():
    r"""A first layer whose weight is also the last layer's."""

    first, out = nn.Linear(3, 3), nn.Linear(3, 3)
    out.weight = first.weight
    return nn.Sequential(first, nn.Tanh(), out)


@pytest.mark.parametrize("hessian", ["ggn", "ef"])
@pytest.mark.parametrize("kind", ["reused", "tied", "middle-layer"])
def test_the_per_example_path_where_the_closed_form_does_not_hold(kind, hessian, monkeypatch):
    torch.manual_seed(0)
    module, include = {
        "reused": (Reused(), ["out"]),
        "tied": (tied(), ["0"]),
        "middle-layer": (mlp(), ["2"]),
    }[kind]
    x = torch.randn(10, 4 if kind == "middle-layer" else 3)
    y = torch.randint(0, 3, (10,))
    sizes = per_example_calls(monkeypatch)

    fit = bf.laplace_fit(
        module, classification_ll, batches(x, y), hessian=hessian, output=output,
        likelihood="classification", include=include,
    )  # fmt: skip

    names = bf.select(module, include)
    if hessian == "ggn":
        expected = loop_ggn(module, "classification", x, names)
    else:
        expected = loop_ef(module, classification_ll, x, y, names)
    for k, h in fit.hessian.items():
        assert torch.allclose(h, expected[k], rtol=1e-10, atol=1e-12), k
    if kind == "middle-layer" and hessian == "ef":
        # g phi^T is the gradient of any linear layer called once: the closed form holds.
        assert sizes == [2]
    else:
        assert sizes[-2:] == [5, 5]  # the per-example path took over


def test_the_closed_form_before_an_in_place_activation(monkeypatch):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))
    x, y = data("classification")
    sizes = per_example_calls(monkeypatch)

    fit = bf.laplace_fit(module, classification_ll, batches(x, y), hessian="ef", include=["0"])

    expected = loop_ef(module, classification_ll, x, y, bf.select(module, ["0"]))
    for k, h in fit.hessian.items():
        assert torch.allclose(h, expected[k], rtol=1e-10, atol=1e-12), k
    assert sizes == [2]


class Elsewhere(nn.Module):
    r"""A last layer whose weight also enters the net before it, by `use`, a use that
    vanishes on an input row of zeros; or only its shape is read there (`use=None`)."""

    def __init__(self, use):
        super().__init__()
        self.use = use
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        if self.use is None:
            return self.out(torch.tanh(x[:, : self.out.weight.shape[1]]))
        return self.out(torch.tanh(self.use(x, self.out.weight)))


USES = {
    "functional": lambda x, w: F.linear(x, w),
    "transpose": lambda x, w: x @ w.T,
}


def jacrev_ggn_and_ef(module, x, y, names):
    r"""The exact GGN and empirical Fisher, by torch.func.jacrev and grad per example."""

    params = {k: module.get_parameter(k).detach() for k in names}
    ggn = {k: torch.zeros_like(p) for k, p in params.items()}
    ef = {k: torch.zeros_like(p) for k, p in params.items()}
    for xi, yi in zip(x, y, strict=True):

        def f(p, xi=xi):
            return torch.func.functional_call(module, p, (xi[None],))[0]

        jac = torch.func.jacrev(f)(params)
        p = f(params).softmax(-1)
        lam = torch.diag(p) - torch.outer(p, p)
        g = torch.func.grad(lambda p, f=f, yi=yi: -F.cross_entropy(f(p), yi))(params)
        for k in names:
            j = jac[k].reshape(len(p), -1)
            ggn[k] += torch.einsum("cp,cd,dp->p", j, lam, j).view_as(params[k])
            ef[k] += g[k].square()
    return ggn, ef


@pytest.mark.parametrize("use", USES)
def test_a_weight_used_elsewhere_where_that_use_vanishes_on_the_first_example(use, monkeypatch):
    module = Elsewhere(USES[use])
    x, y = data("classification", n=10)
    x = x[:, :3].clone()
    x[0] = 0.0  # the other use of the weight contributes nothing to the first example
    before = snapshot(module)
    sizes = per_example_calls(monkeypatch)

    ggn = bf.laplace_fit(module, classification_ll, batches(x, y), **GOOD, include=["out"])
    ef = bf.laplace_fit(module, classification_ll, batches(x, y), hessian="ef", include=["out"])

    assert unchanged(module, before)
    expected = jacrev_ggn_and_ef(module, x, y, ["out.weight", "out.bias"])
    for fit, h in zip((ggn, ef), expected, strict=True):
        for k in h:
            assert torch.allclose(fit.hessian[k], h[k], rtol=1e-10, atol=1e-12), k
    assert sizes[-2:] == [5, 5]  # the per-example path

    _assert_linearized_matches_jacobians(module, bf.init(module, -2.0, include=["out"]), x)


def test_the_closed_form_where_only_the_weight_shape_is_read_elsewhere(monkeypatch):
    module = Elsewhere(None)
    x, y = data("classification", n=10)
    x = x[:, :3]
    sizes = per_example_calls(monkeypatch)

    ggn = bf.laplace_fit(module, classification_ll, batches(x, y), **GOOD, include=["out"])
    ef = bf.laplace_fit(module, classification_ll, batches(x, y), hessian="ef", include=["out"])

    assert sizes == [2, 2]  # the closed form, checked on two examples each
    expected = jacrev_ggn_and_ef(module, x, y, ["out.weight", "out.bias"])
    for fit, h in zip((ggn, ef), expected, strict=True):
        for k in h:
            assert torch.allclose(fit.hessian[k], h[k], rtol=1e-10, atol=1e-12), k


class NonNegative(nn.Module):
    r"""A regression net whose mean may be clamped at zero after its last layer."""

    def __init__(self, clamp):
        super().__init__()
        self.clamp = clamp
        self.body = nn.Sequential(nn.Linear(2, 6), nn.Tanh())
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        z = self.out(self.body(x))
        if self.clamp == "in-place":  # writes to the layer's output itself
            return z.clamp_(min=0.0).squeeze(-1)
        return z.clamp(min=0.0).squeeze(-1) if self.clamp else z


# Where the mean is clamped: the module's own output as it is (one call per batch), or an
# output that is not (a call of `fn` and one of `output` per batch); and no clamp at all.
CLAMPS = {
    "in-the-module": (True, lambda f: f, [2, 4, 4]),
    "in-output": (False, lambda f: f.clamp(min=0.0).squeeze(-1), [2, 4, 4]),
    "none": (False, lambda f: f.squeeze(-1), [2]),
    # In place, the layer's output tensor itself holds the clamped numbers: a check that
    # compares the call's output with it compared a tensor with itself and passed.
    "in-place-in-the-module": ("in-place", lambda f: f, [4, 4, 4]),
    "in-place-in-output": (False, lambda f: f.clamp_(min=0.0).squeeze(-1), [4, 4, 4]),
}


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap's clamp_
@pytest.mark.parametrize("where", CLAMPS)
def test_an_output_that_leaves_the_layers_on_a_later_batch_only(where, monkeypatch):
    clamp, post, calls = CLAMPS[where]
    torch.manual_seed(0)
    module = NonNegative(clamp)
    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = module.out(module.body(x)).squeeze(-1)
        x = x[torch.argsort(z - z.median(), descending=True)]
        module.out.bias -= z.median()  # half clamped, all in the later batches
        y = post(module(x)) + 0.1
    out = lambda m, x, y: post(m(x))
    fn = lambda m, x, y: torch.distributions.Normal(out(m, x, y), SIGMA).log_prob(y)
    sizes = per_example_calls(monkeypatch)

    fit = bf.laplace_fit(
        module, fn, batches(x, y, 4), output=out, likelihood="regression", sigma=SIGMA,
        include=["out"],
    )  # fmt: skip

    names = ["out.weight", "out.bias"]
    params = {k: module.get_parameter(k).detach() for k in names}
    f = lambda p, xi: post(torch.func.functional_call(module, p, (xi[None],)))[0]
    jac = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, x)
    for k in names:
        expected = jac[k].square().sum(0) / SIGMA**2
        assert torch.allclose(fit.hessian[k], expected, rtol=1e-10, atol=1e-12), k
    if where != "none":
        assert (out(module, x[:4], None) > 0).all() and (out(module, x[4:], None) == 0).any()
        assert fit.hessian["out.bias"].item() < 12 / SIGMA**2  # the clamped examples add none
    assert sizes == calls  # the per-example path from the first batch where they differ


# The evidence and the prior precision.


def fitted(hessian="ggn", include=("",)):
    module = mlp()
    x, y = data("classification", n=40)
    fit = bf.laplace_fit(
        module,
        classification_ll,
        batches(x, y, 16),
        hessian=hessian,
        output=output,
        likelihood="classification",
        include=include,
    )
    return module, fit


def marglik_formula(fit, lam):
    r"""log p(D | theta) + log N(theta; 0, 1/lambda) + P/2 log(2 pi) - 1/2 log det(H + lambda)."""

    theta = torch.cat([m.reshape(-1) for m in fit.mean.values()])
    h = torch.cat([v.reshape(-1) for v in fit.hessian.values()])
    lam = torch.cat(
        [
            torch.broadcast_to(torch.as_tensor(lam[k]), m.shape).reshape(-1)
            for k, m in fit.mean.items()
        ]
    )
    prior = torch.distributions.Normal(0, lam.rsqrt()).log_prob(theta).sum()
    logdet = torch.logdet(torch.diag(h + lam))
    return fit.log_likelihood + prior + len(theta) / 2 * math.log(2 * math.pi) - logdet / 2


@pytest.mark.parametrize("kind", ["scalar", "tensor", "element"])
def test_marglik_matches_its_formula_and_is_differentiable(kind):
    _, fit = fitted()
    if kind == "scalar":
        lam = {k: 2.5 for k in fit.mean}
        arg = 2.5
    elif kind == "tensor":
        lam = {k: 0.5 + i for i, k in enumerate(fit.mean)}
        arg = lam
    else:
        lam = {k: torch.rand(m.shape) + 0.1 for k, m in fit.mean.items()}
        arg = lam

    assert torch.allclose(bf.laplace_marglik(fit, arg), marglik_formula(fit, lam), rtol=1e-12)

    log_lam = torch.tensor(0.3, requires_grad=True)
    bf.laplace_marglik(fit, log_lam.exp()).backward()
    lam = math.exp(0.3)
    theta2 = sum(m.square().sum() for m in fit.mean.values())
    d = 0.5 * sum((1 - lam / (h + lam)).sum() for h in fit.hessian.values()) - 0.5 * lam * theta2
    assert torch.allclose(log_lam.grad, d, rtol=1e-10)


def half_fit(module, dtype, inputs=1.0, n=64):
    r"""A fit of `module` in `dtype` on inputs of scale `inputs`, with a float32
    log-likelihood, and the same fit's tensors in float64."""

    module = module.to(dtype)
    x, y = data("classification", n=n)
    x = (inputs * x).to(dtype)
    fn = lambda m, x, y: -F.cross_entropy(m(x).float(), y, reduction="none")
    fit = bf.laplace_fit(module, fn, batches(x, y, 16), **GOOD)
    exact = fit._replace(
        mean={k: v.double() for k, v in fit.mean.items()},
        hessian={k: v.double() for k, v in fit.hessian.items()},
        log_likelihood=fit.log_likelihood.double(),
    )
    return fn, (x, y), fit, exact


def float32_tolerance(exact, lam):
    r"""A few float32 roundings of the magnitudes of the evidence's terms (float64 `lam`)."""

    terms = sum(
        ((exact.hessian[k] + v).log().abs() + v.log().abs() + v * exact.mean[k].square()).sum()
        for k, v in lam.items()
    )
    return 16 * torch.finfo(torch.float32).eps * (exact.log_likelihood.abs() + terms / 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_half_precision_evidence_is_computed_in_float32(dtype):
    # Its terms, sums of hundreds, nearly cancel: each was rounded in the half dtype before,
    # which put the evidence tens of nats off on a 10k-parameter net, enough to prefer the
    # wrong precision.
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    _, _, fit, exact = half_fit(module, dtype)
    per_element = {k: torch.rand(m.shape) * 10 + 0.1 for k, m in fit.mean.items()}
    for lam in (0.01, 1.0, 30.0, 1e5, per_element):
        given = lam if isinstance(lam, dict) else {k: lam for k in fit.mean}
        given = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in given.items()}

        evidence = bf.laplace_marglik(fit, lam)

        assert evidence.dtype == torch.float32
        # The oracle: the fit's own numbers, with the Gaussian's formula in float64.
        error = abs(evidence.double() - marglik_formula(exact, given))
        assert error <= float32_tolerance(exact, given), lam

    log_lam = torch.tensor(0.0, requires_grad=True)  # float64: the gradient reaches it
    bf.laplace_marglik(fit, log_lam.exp()).backward()
    assert log_lam.grad.dtype == torch.float64 and log_lam.grad.isfinite()


@pytest.mark.parametrize("structure", ["scalar", "tensor"])
def test_the_optimized_prior_precision_maximizes_the_evidence(structure):
    _, fit = fitted()

    best = bf.optimize_prior_precision(fit, structure)

    values = {k: best for k in fit.mean} if structure == "scalar" else best
    log_lam = {k: torch.tensor(math.log(v), requires_grad=True) for k, v in values.items()}
    arg = (
        log_lam[next(iter(log_lam))].exp()
        if structure == "scalar"
        else {k: v.exp() for k, v in log_lam.items()}
    )
    top = bf.laplace_marglik(fit, arg)
    grads = torch.autograd.grad(
        top, list(log_lam.values()) if structure == "tensor" else [log_lam[next(iter(log_lam))]]
    )
    assert all(abs(g.item()) < 1e-8 for g in grads)  # stationary in log lambda
    for factor in (0.9, 1.1):
        moved = {k: v * factor for k, v in values.items()}
        assert bf.laplace_marglik(fit, moved) < top
    assert bf.laplace_marglik(fit, 1.0) < top


def test_posterior_is_centred_on_the_fit_with_precision_h_plus_lambda():
    module, fit = fitted(include=("4",))
    lam = {"4.weight": 3.0, "4.bias": torch.tensor([1.0, 2.0, 4.0])}

    q = bf.laplace_posterior(fit, lam)

    assert list(q.mean) == ["4.weight", "4.bias"]
    for k in q.mean:
        assert torch.equal(q.mean[k], module.get_parameter(k))
        assert q.mean[k].is_leaf and q.mean[k].requires_grad and q.logvar[k].requires_grad
        expected = 1 / (fit.hessian[k] + torch.as_tensor(lam[k]))
        assert torch.allclose(bf.std(q)[k].square(), expected, rtol=1e-12)


def test_a_float16_posterior_takes_precisions_beyond_65504():
    # The precision was cast to float16 first: every one above 65504 became inf and was
    # refused, the optimum of laplace(prior_precision="marglik") among them.
    torch.manual_seed(0)
    module = nn.Linear(4, 3)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(5e-4)  # small weights, large inputs: a large precision
    fn, (x, y), fit, exact = half_fit(module, torch.float16, inputs=10.0)
    best = bf.optimize_prior_precision(fit)
    assert best > 65504
    LIMIT = math.exp(LOGVAR_LIMIT)

    def expected(lam):  # the posterior in float64, rounded to float16 once
        return {
            k: logvar_from_var(1 / (exact.hessian[k] + lam)).to(torch.float16)
            for k in exact.hessian
        }

    before = snapshot(module)
    q_best = bf.laplace(module, fn, batches(x, y, 16), **GOOD, prior_precision="marglik")
    assert unchanged(module, before)
    q_huge = bf.laplace_posterior(fit, LIMIT * 1e300)  # beyond float32 too
    for lam, q in (
        (1e5, bf.laplace_posterior(fit, 1e5)),
        (best, bf.laplace_posterior(fit, best)),
        (best, q_best),
        (LIMIT * 1e300, q_huge),
    ):
        for k, lv in expected(lam).items():
            assert torch.equal(q.mean[k], fit.mean[k])
            assert q.logvar[k].dtype == torch.float16
            # One float16 rounding apart at most (float32 against float64 before it).
            eps = torch.finfo(torch.float16).eps
            assert torch.allclose(q.logvar[k].double(), lv.double(), rtol=eps, atol=0.0)
    # A precision above e^L gives the least variance, e^-L.
    least = logvar_from_var(torch.tensor(1 / LIMIT)).to(torch.float16)
    assert all(torch.equal(v, least.expand_as(v)) for v in q_huge.logvar.values())

    given = {k: torch.tensor(best) for k in fit.mean}
    error = abs(bf.laplace_marglik(fit, best).double() - marglik_formula(exact, given))
    assert error <= float32_tolerance(exact, given)
    with pytest.raises(
        ValueError,
        match=r"^laplace_marglik: expected a prior_precision for 'weight' that torch.float32 "
        r"holds \(the precision of torch.float16 parameters is held in it\), got \[1e\+300\]",
    ):
        bf.laplace_marglik(fit, 1e300)


def test_laplace_is_the_fit_the_optimum_and_the_posterior():
    module = mlp()
    x, y = data("classification", n=40)
    kw = dict(output=output, likelihood="classification", include=["**"], exclude=["**.bias"])
    before = snapshot(module)

    q = bf.laplace(module, classification_ll, batches(x, y), prior_precision="marglik", **kw)

    assert unchanged(module, before)
    fit = bf.laplace_fit(module, classification_ll, [(x, y)], **kw)
    expected = bf.laplace_posterior(fit, bf.optimize_prior_precision(fit))
    assert list(q.mean) == ["0.weight", "2.weight", "4.weight"]
    for k in q.mean:
        assert torch.equal(q.mean[k], expected.mean[k])
        assert torch.allclose(q.logvar[k], expected.logvar[k], rtol=1e-10)

    params = bf.sample(q, 4, generator=torch.Generator().manual_seed(0))
    logits = bf.vmap_call(module, params, x)
    assert torch.allclose(logits, bf.loop_call(module, params, x), atol=1e-12)
    assert not torch.allclose(logits[0], module(x))  # the sampled weights were used


# The linearized predictive.


@pytest.mark.parametrize("include", [("4",), ("4.weight",), ("",), ("2", "4")])
def test_linearized_variance_matches_explicit_jacobians(include):
    module, fit = fitted(include=include)
    q = bf.laplace_posterior(fit, 2.0)
    with torch.no_grad():  # a mean away from the module's own weights
        for m in q.mean.values():
            m.add_(0.1)
    x, _ = data("classification", n=6, seed=1)

    mean, var = bf.linearized_predictive(module, q, x)

    shifted = bf.mean_model(module, q)
    assert torch.allclose(mean, shifted(x), atol=1e-12)
    sigma2 = torch.cat([var_of(q.logvar[k]).reshape(-1) for k in q.mean])
    for i in range(len(x)):
        jac = explicit_jacobian(shifted, x[i], list(q.mean))
        assert torch.allclose(var[i], (jac.square() * sigma2).sum(1), rtol=1e-10, atol=1e-14)
    generic, _ = _jacobian_variance(
        "linearized_predictive", module, q, lambda m, x: m(x), (x,), None
    )
    assert torch.allclose(var, generic, rtol=1e-10, atol=1e-14)  # the last-layer shortcut
    assert (var > 0).all()


class _Padded(nn.Module):
    r"""Self-attention over padded sequences (a mask per example), mean-pooled."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x, mask):
        h = self.enc(x, src_key_padding_mask=mask)
        keep = (~mask).unsqueeze(-1).to(h.dtype)
        return self.out((h * keep).sum(1) / keep.sum(1))


def test_attention_with_a_padding_mask_per_example():
    # Under the per-example pass, the attention stand-in branched on the mask's values
    # (which rows are all masked): vmap's "data-dependent control flow" error, for every
    # fit and the linearized predictive.
    torch.manual_seed(0)
    module = _Padded().eval()
    x, y = torch.randn(6, 5, 8), torch.randint(0, 3, (6,))
    mask = torch.arange(5)[None] >= torch.tensor([5, 4, 3, 5, 2, 4])[:, None]
    ll = lambda m, x, mask, y: -F.cross_entropy(m(x, mask), y, reduction="none")
    before = snapshot(module)

    fit = bf.laplace_fit(module, ll, [(x, mask, y)], hessian="ef")
    assert unchanged(module, before)
    names = list(fit.hessian)
    params = [module.get_parameter(k) for k in names]
    for k, p in zip(names, params, strict=True):  # the loop of autograd.grad
        expected = sum(
            torch.autograd.grad(ll(module, x[i : i + 1], mask[i : i + 1], y[i : i + 1]).sum(), p)[
                0
            ].square()
            for i in range(len(x))
        )
        assert torch.allclose(fit.hessian[k], expected, rtol=1e-10, atol=1e-12), k

    q = bf.init(module, -3.0, include=["enc.**"])
    mean, var = bf.linearized_predictive(module, q, x, mask)
    assert torch.allclose(mean, module(x, mask), atol=1e-12)
    sigma2 = torch.cat([var_of(q.logvar[k]).reshape(-1) for k in q.mean])
    for i in range(len(x)):

        def f(*flat, i=i):
            p = dict(zip(q.mean, flat, strict=True))
            return torch.func.functional_call(module, p, (x[i : i + 1], mask[i : i + 1]))[0]

        jac = torch.autograd.functional.jacobian(f, tuple(t.detach() for t in q.mean.values()))
        jac = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)
        assert torch.allclose(var[i], (jac.square() * sigma2).sum(1), rtol=1e-9, atol=1e-14)
    assert (var > 0).all()


@pytest.mark.parametrize("include", [("",), ("2",), ("0",)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_linearized_variance_is_summed_in_float32(dtype, include):
    # Jacobian entries and features above 256 square beyond float16's range before the
    # small variance scales them: an infinite variance (and a uniform probit) where the
    # variance is about 10. Oracle: the same in float64.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.rand(5, 4, dtype=torch.float64) * 2000  # raw-scale inputs
    wide = copy.deepcopy(net).double()
    _, expected = bf.linearized_predictive(wide, bf.init(wide, -16.0, include=include), x)
    half = copy.deepcopy(net).to(dtype)
    q = bf.init(half, -16.0, include=include)
    for chunk_size in (None, 3):
        _, var = bf.linearized_predictive(half, q, x.to(dtype), chunk_size=chunk_size)
        assert var.dtype == dtype and torch.isfinite(var).all()
        rtol = 1e-2 if dtype == torch.float16 else 3e-2
        assert torch.allclose(var.double(), expected, rtol=rtol), (var, expected)
    assert expected.min() > 1.0  # a variance well inside the range


def test_linearized_variance_where_the_last_layer_weight_is_reused():
    torch.manual_seed(0)
    module = Reused()
    x = torch.randn(5, 3)
    _assert_linearized_matches_jacobians(module, bf.init(module, -2.0, include=["out"]), x)


def test_linearized_variance_after_an_in_place_relu():
    # A ReLU(inplace=True) after the last layer writes its output tensor itself: the check
    # that fn's output is the layer's compared a tensor with itself, so clamped examples
    # got the bare layer's variance (0.22 where their Jacobian is zero).
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1), nn.ReLU(inplace=True))
    x = torch.randn(12, 2)
    with torch.no_grad():
        z = module[:3](x).squeeze(-1)
        x = x[torch.argsort(z, descending=True)]  # the first example, which is checked, is not
        module[2].bias -= z.median()  # half of the outputs clamped to 0
    q = bf.init(module, -2.0, include=["2"])
    assert (module(x) == 0).sum() >= 5 and (module(x)[0] > 0).all()

    _assert_linearized_matches_jacobians(module, q, x)
    assert (bf.linearized_predictive(module, q, x)[1][module(x) > 0] > 0).all()
    with torch.inference_mode():  # no version counters there
        var = bf.linearized_predictive(module, q, x)[1]
    assert torch.equal(var, bf.linearized_predictive(module, q, x)[1])


def _clamped_last_layer():
    # A forward hook on the last layer clamps its logits, which changes example 7 alone
    # (mid-batch, in the second batch of 5): the layer's output was read after the hook,
    # so the closed form took the clamped logits for the layer's and gave the clamped
    # example the curvature and variance of an unclamped one.
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        module[2].weight.mul_(4)
    module[2].register_forward_hook(lambda m, inputs, out: out.clamp(-2.0, 2.0))
    x, y = data("classification", n=13, seed=1)
    x = x * 0.1
    x[7] = torch.tensor([30.0, -30.0, 30.0, -30.0])
    with torch.no_grad():  # (without the hook)
        clamped = (module[1](module[0](x)) @ module[2].weight.T + module[2].bias).abs() > 2
    assert clamped.any(1).nonzero().flatten().tolist() == [7]
    return module, x, y, clamped


@pytest.mark.parametrize("hessian", ["ggn", "ef"])
def test_a_hook_that_clamps_the_last_layers_output_on_some_examples(hessian):
    module, x, y, clamped = _clamped_last_layer()
    fit = bf.laplace_fit(
        module,
        classification_ll,
        batches(x, y),
        hessian=hessian,
        output=output,
        likelihood="classification",
        include=["2"],
    )
    names = bf.select(module, ["2"])
    if hessian == "ggn":
        expected = loop_ggn(module, "classification", x, names)
    else:
        expected = loop_ef(module, classification_ll, x, y, names)
    for k, h in fit.hessian.items():
        assert torch.allclose(h, expected[k], rtol=1e-10, atol=1e-12), k

    q = bf.init(module, -2.0, include=["2"])
    _assert_linearized_matches_jacobians(module, q, x)
    var = bf.linearized_predictive(module, q, x)[1]
    assert torch.equal(var == 0, clamped)  # a clamped logit does not move with the weights


class _Fn(nn.Module):
    def __init__(self, net, fn):
        super().__init__()
        self.net, self.fn = net, fn

    def forward(self, x):
        return self.fn(self.net, x)


MIXING = {
    "outputs-centred": lambda m, x: m(x) - m(x).mean(0),
    "inputs-centred": lambda m, x: m(x - x.mean(0)),
    "inputs-scaled": lambda m, x: m(x / x.std(0)),
    # A masked output of -1e9 beside them: it once set the tolerance of the whole check.
    "outputs-centred-masked": lambda m, x: torch.cat(
        [m(x) - m(x).mean(0), torch.full((len(x), 1), -1e9)], -1
    ),
}


@pytest.mark.filterwarnings("ignore:std\\(\\)")  # the std of one example
@pytest.mark.parametrize("fn", MIXING, ids=list(MIXING))
@pytest.mark.parametrize("include", [("",), ("2",)], ids=["all", "last-layer"])
def test_linearized_predictive_refuses_an_fn_that_mixes_the_examples(fn, include):
    # The variance comes from each example on its own: an fn that centres or scales over
    # the batch has other Jacobians (the returned variance was 0, or off by a third, or
    # NaN), and raises as laplace_fit does, leaving the module as it was.
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
    q = bf.init(module, init_logvar=-2.0, include=include)
    x = torch.randn(6, 3)
    before = snapshot(module)
    with pytest.raises(ValueError, match=r"linearized_predictive: .* mix the examples"):
        bf.linearized_predictive(module, q, x, fn=MIXING[fn])
    assert unchanged(module, before)
    # The same fn on a batch of one example mixes nothing: the explicit Jacobians agree.
    if fn != "inputs-scaled":  # the std of one example is NaN
        one = x[:1]
        mean, var = bf.linearized_predictive(module, q, one, fn=MIXING[fn])
        sigma2 = torch.cat([var_of(q.logvar[k]).reshape(-1) for k in q.mean])
        wrapped = _Fn(bf.mean_model(module, q), MIXING[fn])
        jac = explicit_jacobian(wrapped, one[0], [f"net.{k}" for k in q.mean])
        assert torch.allclose(mean, wrapped(one), atol=1e-12)
        assert torch.allclose(var[0], (jac.square() * sigma2).sum(1), rtol=1e-10, atol=1e-14)


def _count_jacobian_batches(monkeypatch):
    r"""Spies on the per-example Jacobian pass: returns the list its batch sizes go to,
    and the pass itself."""

    sizes = []
    original = bf.linearized._jacobian_variance

    def spy(*args):
        sizes.append(args[4][0].shape[0])
        return original(*args)

    monkeypatch.setattr(bf.linearized, "_jacobian_variance", spy)
    return sizes, original


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "inf-masked"])
def test_linearized_checks_hold_on_a_real_batch(dtype, masked, monkeypatch):
    # The checks against one example at a time compare outputs that different matrix
    # shapes round differently (to the last bits, in float64 too), and logits masked to
    # -inf: the last layer must still take the closed form (one example's Jacobians, then
    # none), a masked fn the per-example Jacobians without a refusal; both the variance
    # of the Jacobians.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 10)).to(dtype)
    q = bf.init(net, -4.0, include=("2",))
    x = torch.randn(256, 16, dtype=dtype)
    allowed = torch.arange(10) % 4 != 3  # the same classes for every example

    def fn(m, x):
        return m(x).masked_fill(~allowed, -math.inf) if masked else m(x)

    sizes, original = _count_jacobian_batches(monkeypatch)
    mean, var = bf.linearized_predictive(net, q, x, fn=fn)
    assert sizes == ([256] if masked else [2])  # masked: not the layer's output
    generic, _ = original("linearized_predictive", net, q, fn, (x,), None)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(var, generic, rtol=tol, atol=tol * generic.abs().max().item())
    hidden = ~allowed if masked else torch.zeros(10, dtype=torch.bool)
    assert (var[:, ~hidden] > 0).all() and (var[:, hidden] == 0).all()
    assert torch.equal(mean.isneginf(), hidden.expand_as(mean))


def _assert_linearized_matches_jacobians(module, q, x):
    r"""The linearized predictive against explicit per-example Jacobians."""

    mean, var = bf.linearized_predictive(module, q, x)

    sigma2 = torch.cat([var_of(q.logvar[k]).reshape(-1) for k in q.mean])
    for i in range(len(x)):
        jac = explicit_jacobian(module, x[i], list(q.mean))
        assert torch.allclose(var[i], (jac.square() * sigma2).sum(1), rtol=1e-10, atol=1e-14)
    assert torch.allclose(mean, module(x), atol=1e-12)


@pytest.mark.parametrize("include", [("",), ("4",)])
def test_linearized_predictive_is_the_evaluation_mode_nets(include, monkeypatch):
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)
    )
    module.train()
    module[1].running_mean.normal_()  # statistics the predictive must use, and leave alone
    reference = copy.deepcopy(module).eval()
    q = bf.init(module, init_logvar=-3.0, include=include)
    x, _ = data("classification", n=6, seed=1)
    before = snapshot(module)
    sizes, _ = _count_jacobian_batches(monkeypatch)

    mean, var = bf.linearized_predictive(module, q, x)

    assert unchanged(module, before)
    assert torch.allclose(mean, reference(x), atol=1e-12)
    sigma2 = torch.cat([var_of(q.logvar[k]).reshape(-1) for k in q.mean])
    for i in range(len(x)):
        jac = explicit_jacobian(reference, x[i], list(q.mean))
        assert torch.allclose(var[i], (jac.square() * sigma2).sum(1), rtol=1e-10, atol=1e-14)
    assert sizes == ([2] if include == ("4",) else [6])  # the last layer in closed form

    # A call that fails after the forward pass leaves the module as found too.
    with pytest.raises(ValueError, match="linearized_predictive: expected fn to return"):
        bf.linearized_predictive(module, q, x, fn=lambda m, x: m(x)[:, :, None, None])
    assert unchanged(module, before)


OUTPUTS = {"(B, C)": ((3,), lambda m, x: m(x)), "(B,)": ((), lambda m, x: m(x)[:, 1])}


@pytest.mark.parametrize("shape", OUTPUTS)
@pytest.mark.parametrize("include", [("",), ("4",)], ids=["all", "last-layer"])
def test_linearized_predictive_on_zero_examples_is_empty(include, shape, monkeypatch):
    # A batch of zero examples once raised a bare RuntimeError from inside torch.func.
    module = mlp()
    q = bf.init(module, init_logvar=-3.0, include=include)
    x = torch.randn(0, 4)
    trailing, fn = OUTPUTS[shape]
    before = snapshot(module)
    sizes, _ = _count_jacobian_batches(monkeypatch)

    mean, var = bf.linearized_predictive(module, q, x, fn=fn)

    assert mean.shape == var.shape == (0, *trailing)
    assert mean.dtype == var.dtype == torch.float64 and not mean.requires_grad
    assert torch.equal(mean, fn(module, x)) and torch.equal(var, torch.zeros(0, *trailing))
    assert sizes == []  # no Jacobian was taken
    assert unchanged(module, before)
    if shape == "(B, C)":
        assert bf.probit_probs(mean, var).shape == (0, 3)


@pytest.mark.parametrize("include", [("",), ("4",)], ids=["all", "last-layer"])
def test_linearized_predictive_names_itself_in_every_error(include):
    # The call inside went through vmap_call, whose name its errors gave.
    module = mlp()
    q = bf.init(module, init_logvar=-3.0, include=include)
    x = torch.randn(5, 4)
    before = snapshot(module)

    with pytest.raises(
        ValueError,
        match=r"linearized_predictive: expected a posterior over at least one parameter of "
        r"Sequential, got none",
    ):
        bf.linearized_predictive(module, bf.Posterior({}, {}), x)
    with pytest.raises(
        TypeError, match=r"linearized_predictive: expected fn to return tensors .* got str"
    ):
        bf.linearized_predictive(module, q, x, fn=lambda m, x: "oops")
    for nothing in (None, (), (x, x)):  # a bare TypeError or IndexError before
        with pytest.raises(
            TypeError, match=r"linearized_predictive: expected fn to return a tensor, got"
        ):
            bf.linearized_predictive(module, q, x, fn=lambda m, x, out=nothing: out)
    with pytest.raises(
        ValueError,
        match=r"linearized_predictive: expected input tensors with data, got a tensor on the "
        r"meta device at position 0",
    ):
        bf.linearized_predictive(module, q, x.to("meta"))

    assert unchanged(module, before)


def test_probit_probs():
    mean = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    var = torch.tensor([[1.0, 4.0, 0.0], [0.5, 0.5, 10.0]])

    probs = bf.probit_probs(mean, var)

    expected = (mean / torch.sqrt(1 + math.pi / 8 * var)).softmax(-1)
    assert torch.allclose(probs, expected, atol=1e-15)
    assert torch.allclose(bf.probit_probs(mean, torch.zeros_like(var)), mean.softmax(-1))
    assert probs[1, 2] < mean.softmax(-1)[1, 2]  # the variance tempers the confidence


@pytest.mark.parametrize("shape", [(4, 1), (3,), (2, 5, 1)], ids=str)
def test_probit_probs_refuses_one_logit_and_a_mean_without_classes(shape):
    mean, var = torch.randn(shape), torch.rand(shape)

    with pytest.raises(
        ValueError,
        match=re.escape(
            f"probit_probs: expected logits of shape (..., C) with at least one leading dim "
            f"and C >= 2 classes, got {shape}; for one logit (a sigmoid), the probit "
            "approximation is torch.sigmoid(mean / torch.sqrt(1 + math.pi / 8 * var))"
        ),
    ):
        bf.probit_probs(mean, var)


# Writing variances into a posterior.


def test_variances_round_trip_through_softclip_and_are_clamped_outside():
    v = torch.logspace(-17.9, 17.9, 101, base=math.e)
    assert torch.allclose(var_of(logvar_from_var(v)), v, rtol=1e-12)
    v32 = v.float()
    assert torch.allclose(var_of(logvar_from_var(v32)), v32, rtol=1e-4)

    low, high = math.exp(-LOGVAR_LIMIT), math.exp(LOGVAR_LIMIT)
    out = var_of(logvar_from_var(torch.tensor([1e-30, 1e-9, 1e9, 1e30])))
    assert torch.allclose(out, torch.tensor([low, low, high, high]), rtol=1e-10)

    q = posterior_from_variance("f", {"w": torch.zeros(3)}, {"w": torch.tensor([1e-12, 1.0, 2.0])})
    assert torch.allclose(bf.std(q)["w"].square(), torch.tensor([low, 1.0, 2.0]), rtol=1e-12)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="f: expected finite positive variances"):
            posterior_from_variance("f", {"w": torch.zeros(2)}, {"w": torch.tensor([1.0, bad])})


# Bad input: a clear error naming the function, and the module untouched.

GOOD = dict(output=output, likelihood="classification")

BAD = {
    "module": (
        lambda m, X, Y: bf.laplace_fit("net", classification_ll, [(X, Y)], **GOOD),
        TypeError,
        "laplace_fit: expected a torch.nn.Module",
    ),
    "bridge": (
        lambda m, X, Y: bf.laplace_fit(bf.BayesianModel(m), classification_ll, [(X, Y)], **GOOD),
        TypeError,
        "laplace_fit: expected the module the posterior is over",
    ),
    "fn": (
        lambda m, X, Y: bf.laplace_fit(m, None, [(X, Y)], **GOOD),
        TypeError,
        "laplace_fit: expected fn to be callable",
    ),
    "hessian": (
        lambda m, X, Y: bf.laplace_fit(m, classification_ll, [(X, Y)], hessian="kfac"),
        ValueError,
        "laplace_fit: expected hessian to be 'ggn' or 'ef'",
    ),
    "ggn-without-output": (
        lambda m, X, Y: bf.laplace_fit(m, classification_ll, [(X, Y)]),
        ValueError,
        "laplace_fit: expected output and likelihood with hessian='ggn'",
    ),
    "likelihood": (
        lambda m, X, Y: bf.laplace_fit(
            m, classification_ll, [(X, Y)], output=output, likelihood="poisson"
        ),
        ValueError,
        "laplace_fit: expected likelihood to be",
    ),
    "output": (
        lambda m, X, Y: bf.laplace_fit(
            m, classification_ll, [(X, Y)], output=3, likelihood="regression"
        ),
        TypeError,
        "laplace_fit: expected output to be callable",
    ),
    "sigma": (
        lambda m, X, Y: bf.laplace_fit(m, classification_ll, [(X, Y)], sigma=0.0, **GOOD),
        ValueError,
        "laplace_fit: expected a finite sigma > 0",
    ),
    "include": (
        lambda m, X, Y: bf.laplace_fit(
            m, classification_ll, [(X, Y)], include=["nothing"], **GOOD
        ),
        ValueError,
        "laplace_fit: expected include=.* to pick at least one",
    ),
    "chunk_size": (
        lambda m, X, Y: bf.laplace_fit(m, classification_ll, [(X, Y)], chunk_size=0, **GOOD),
        ValueError,
        "laplace_fit: expected chunk_size",
    ),
    "data-tensor": (
        lambda m, X, Y: bf.laplace_fit(m, classification_ll, X, **GOOD),
        TypeError,
        "laplace_fit: expected data to be an iterable of batches",
    ),
    "data-one-batch": (
        lambda m, X, Y: bf.laplace_fit(m, classification_ll, (X, Y), **GOOD),
        TypeError,
        r"laplace_fit: expected each batch to be a tuple .* \[\(x, y\)\]",
    ),
    "data-empty": (
        lambda m, X, Y: bf.laplace_fit(m, classification_ll, [], **GOOD),
        ValueError,
        "laplace_fit: expected data with at least one datum",
    ),
    "data-sizes": (
        lambda m, X, Y: bf.laplace_fit(m, classification_ll, [(X, Y[:3])], **GOOD),
        ValueError,
        "laplace_fit: expected the tensors of a batch to share",
    ),
    "data-scalar": (
        lambda m, X, Y: bf.laplace_fit(m, classification_ll, [(X, 3)], **GOOD),
        TypeError,
        "laplace_fit: expected each batch to hold tensors",
    ),
    "fn-mean": (
        lambda m, X, Y: bf.laplace_fit(
            m, lambda m, x, y: classification_ll(m, x, y).mean(), [(X, Y)], hessian="ef"
        ),
        ValueError,
        "laplace_fit: expected fn to return a tensor with one row per datum",
    ),
    "output-shape": (
        lambda m, X, Y: bf.laplace_fit(
            m,
            classification_ll,
            [(X, Y)],
            output=lambda m, x, y: m(x)[:, :1],
            likelihood="classification",
        ),
        ValueError,
        r"laplace_fit: expected output of shape \(B, C\), C >= 2",
    ),
    "laplace-prior": (
        lambda m, X, Y: bf.laplace(m, classification_ll, [(X, Y)], prior_precision=-1.0, **GOOD),
        ValueError,
        "laplace: expected a finite positive prior_precision",
    ),
    "laplace-prior-str": (
        lambda m, X, Y: bf.laplace(
            m, classification_ll, [(X, Y)], prior_precision="evidence", **GOOD
        ),
        ValueError,
        "laplace: expected prior_precision to be positive, a dict of them or 'marglik'",
    ),
    "laplace-prior-names": (
        lambda m, X, Y: bf.laplace(
            m, classification_ll, [(X, Y)], prior_precision={"0.weight": 1.0}, **GOOD
        ),
        ValueError,
        "laplace: expected prior_precision to map every fitted parameter name",
    ),
    "linearized-posterior": (
        lambda m, X, Y: bf.linearized_predictive(m, {}, X),
        TypeError,
        "linearized_predictive: expected a bayesflow.Posterior",
    ),
    "linearized-shape": (
        lambda m, X, Y: bf.linearized_predictive(m, bf.init(nn.Linear(2, 2)), X),
        ValueError,
        "linearized_predictive: expected posterior names and shapes",
    ),
    "linearized-args": (
        lambda m, X, Y: bf.linearized_predictive(m, bf.init(m), X, Y[:2]),
        ValueError,
        "linearized_predictive: expected input tensors that share",
    ),
    "linearized-nan": (
        lambda m, X, Y: bf.linearized_predictive(m, _with_nan(bf.init(m)), X),
        ValueError,
        r"linearized_predictive: expected finite values in posterior.logvar\['0.weight'\]",
    ),
    "probit-shapes": (
        lambda m, X, Y: bf.probit_probs(torch.zeros(2, 3), torch.zeros(2, 2)),
        ValueError,
        "probit_probs: expected tensors of the same shape",
    ),
    "probit-var": (
        lambda m, X, Y: bf.probit_probs(torch.zeros(2, 3), -torch.ones(2, 3)),
        ValueError,
        "probit_probs: expected variances >= 0",
    ),
    "probit-nan": (
        lambda m, X, Y: bf.probit_probs(torch.zeros(1, 3), torch.tensor([[0.0, math.nan, 1.0]])),
        ValueError,
        "probit_probs: expected variances >= 0, got nan",
    ),
    "linearized-args-type": (
        lambda m, X, Y: bf.linearized_predictive(m, bf.init(m), X, 3),
        TypeError,
        "linearized_predictive: expected input tensors that share a leading batch dim, got "
        "int at position 1",
    ),
}


def _with_nan(q):
    with torch.no_grad():
        q.logvar["0.weight"][0, 0] = math.nan
    return q


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case):
    call, error, message = BAD[case]
    module = mlp()
    before = snapshot(module)

    x, y = data("classification")

    with pytest.raises(error, match=message):
        call(module, x, y)

    assert unchanged(module, before)


def test_bad_fits_and_precisions():
    _, fit = fitted()
    with pytest.raises(TypeError, match=r"laplace_marglik: expected a bayesflow\.LaplaceFit"):
        bf.laplace_marglik(bf.init(mlp()), 1.0)
    with pytest.raises(
        ValueError, match="laplace_marglik: expected a finite positive prior_precision"
    ):
        bf.laplace_marglik(fit, torch.tensor(0.0))
    with pytest.raises(
        TypeError, match="laplace_marglik: expected prior_precision to be a positive number"
    ):
        bf.laplace_marglik(fit, "1.0")
    with pytest.raises(
        ValueError,
        match=r"laplace_posterior: expected prior_precision for '0.weight' to broadcast to \(6, 4\)",
    ):
        bf.laplace_posterior(fit, {k: torch.ones(7) for k in fit.mean})
    with pytest.raises(ValueError, match="optimize_prior_precision: expected structure"):
        bf.optimize_prior_precision(fit, "diag")


HUGE = {
    "int-beyond-float": 10**400,
    "meta": torch.tensor(2.0, device="meta"),
    "meta-per-element": torch.ones(3, device="meta"),
}
PRECISION_USERS = {
    "laplace_posterior": lambda module, fit, prec: bf.laplace_posterior(fit, prec),
    "laplace_marglik": lambda module, fit, prec: bf.laplace_marglik(fit, prec),
    "laplace": lambda module, fit, prec: bf.laplace(
        module,
        classification_ll,
        [data("classification")],
        include=["4.bias"],
        prior_precision=prec,
        **GOOD,
    ),
}


@pytest.mark.parametrize("where", PRECISION_USERS)
@pytest.mark.parametrize("case", HUGE)
def test_a_prior_precision_beyond_floats_or_on_the_meta_device_is_refused(case, where):
    module, fit = fitted(include=("4.bias",))
    before = snapshot(module)
    if case.startswith("meta"):
        message = "expected a prior_precision for '4.bias' with data, got a tensor on the meta"
    else:  # an int that float() refuses: infinite, as the checks of the library take it
        message = r"expected a finite positive prior_precision for '4.bias', got \[inf\]"

    with pytest.raises(ValueError, match=rf"{where}: {message}"):
        PRECISION_USERS[where](module, fit, HUGE[case])

    assert unchanged(module, before)  # laplace refuses it before any forward


def _edit(field, change):
    r"""Returns an edit of a fit: `change(name, tensor)` applied to each tensor of
    `fit.mean` or `fit.hessian`, or `change(value)` to another field."""

    def edit(fit):
        value = getattr(fit, field)
        if field in ("mean", "hessian"):
            value = {k: change(k, v) for k, v in value.items()}
            value = {k: v for k, v in value.items() if v is not None}
        else:
            value = change(value)
        return fit._replace(**{field: value})

    return edit


def _set(index, number):
    def change(name, t):
        if name != "2.weight":
            return t
        t = t.clone()
        t[index] = number
        return t

    return change


# Edits of a fit as a user may make them with fit._replace: (edit, error, message).
BAD_FITS = {
    "hessian-name-missing": (
        _edit("hessian", lambda k, h: None if k == "4.bias" else h),
        ValueError,
        r"expected fit.hessian with the names of fit.mean, .*got \['4.bias'\] missing and "
        r"\[\] extra",
    ),
    "hessian-name-extra": (
        lambda fit: fit._replace(hessian={**fit.hessian, "5.weight": torch.ones(2)}),
        ValueError,
        r"expected fit.hessian with the names of fit.mean, .*got \[\] missing and "
        r"\['5.weight'\] extra",
    ),
    "hessian-shape": (
        _edit("hessian", lambda k, h: h.reshape(-1)[:1]),
        ValueError,
        r"expected fit.hessian\['0.weight'\] of its mean's shape \(6, 4\), got \(1,\)",
    ),
    "hessian-dtype": (
        _edit("hessian", lambda k, h: h.float()),
        ValueError,
        r"expected fit.hessian\['0.weight'\] with its mean's dtype and device, torch.float64 "
        r"on cpu, got torch.float32 on cpu",
    ),
    "hessian-list": (
        _edit("hessian", lambda k, h: h.tolist()),
        TypeError,
        r"expected fit.hessian\['0.weight'\] to be a tensor, got list",
    ),
    "hessian-not-a-dict": (
        lambda fit: fit._replace(hessian=list(fit.hessian.values())),
        TypeError,
        "expected fit.hessian to be a dict from parameter names to tensors, got list",
    ),
    "hessian-nan": (
        _edit("hessian", _set((1, 2), math.nan)),
        ValueError,
        r"expected finite values >= 0 in fit.hessian\['2.weight'\], got nan \(1 of 30",
    ),
    "hessian-inf": (
        _edit("hessian", _set((1, 2), math.inf)),
        ValueError,
        r"expected finite values >= 0 in fit.hessian\['2.weight'\], got inf \(1 of 30",
    ),
    "hessian-negative": (
        _edit("hessian", _set(0, -0.5)),
        ValueError,
        r"expected finite values >= 0 in fit.hessian\['2.weight'\], got -0.5 \(6 of 30",
    ),
    "mean-nan": (
        _edit("mean", _set((0, 0), math.nan)),
        ValueError,
        r"expected finite values in fit.mean\['2.weight'\], got nan \(1 of 30",
    ),
    "empty": (
        lambda fit: fit._replace(mean={}, hessian={}),
        ValueError,
        "expected a fit of at least one parameter, got none",
    ),
    "log-likelihood-nan": (
        _edit("log_likelihood", lambda ll: ll * math.nan),
        ValueError,
        "expected a finite fit.log_likelihood, got nan",
    ),
    "log-likelihood-inf": (
        _edit("log_likelihood", lambda ll: ll - math.inf),
        ValueError,
        "expected a finite fit.log_likelihood, got -inf",
    ),
    "log-likelihood-shape": (
        _edit("log_likelihood", lambda ll: ll.reshape(1)),
        ValueError,
        r"expected fit.log_likelihood to be a scalar, got shape \(1,\)",
    ),
    "log-likelihood-float": (
        _edit("log_likelihood", float),
        TypeError,
        "expected fit.log_likelihood to be a floating-point tensor, got float",
    ),
    "num-data": (
        _edit("num_data", lambda n: 0),
        ValueError,
        "expected fit.num_data >= 1, got 0",
    ),
}
FIT_USERS = {
    "laplace_marglik": lambda fit: bf.laplace_marglik(fit, 1.0),
    "optimize_prior_precision": lambda fit: bf.optimize_prior_precision(fit, "tensor"),
    "laplace_posterior": lambda fit: bf.laplace_posterior(fit, 1.0),
}


@pytest.mark.parametrize("where", FIT_USERS)
@pytest.mark.parametrize("case", BAD_FITS)
def test_an_edited_fit_is_checked_before_use(case, where):
    _, fit = fitted()
    edit, error, message = BAD_FITS[case]
    bad = edit(fit)

    if where == "laplace_posterior" and case in ("log-likelihood-nan", "log-likelihood-inf"):
        # The posterior does not read the log-likelihood: a float16 sum that overflowed to
        # -inf gives the posterior it gave.
        q, expected = FIT_USERS[where](bad), FIT_USERS[where](fit)
        assert all(torch.equal(q.logvar[k], expected.logvar[k]) for k in q.logvar)
        return
    with pytest.raises(error, match=f"^{where}: {message}"):
        FIT_USERS[where](bad)


def test_laplace_names_itself_where_fn_gives_nan():
    module = mlp()
    x, y = data("classification")
    before = snapshot(module)
    nan_ll = lambda m, x, y: classification_ll(m, x, y) * math.nan

    with pytest.raises(
        ValueError, match=r"^laplace: expected a finite fit\.log_likelihood, got nan"
    ):
        bf.laplace(module, nan_ll, [(x, y)], prior_precision="marglik", **GOOD)
    assert unchanged(module, before)
    # with a given prior precision the log-likelihood is not read: the GGN's posterior
    q = bf.laplace(module, nan_ll, [(x, y)], prior_precision=2.0, **GOOD)
    expected = bf.laplace(module, classification_ll, [(x, y)], prior_precision=2.0, **GOOD)
    assert all(torch.equal(q.logvar[k], expected.logvar[k]) for k in q.logvar)


@pytest.mark.parametrize("grad", [False, True], ids=["number", "tensor"])
def test_a_fit_edited_with_a_temperature_keeps_its_numbers(grad):
    _, fit = fitted()
    zeroed = {k: v.clone() for k, v in fit.hessian.items()}
    zeroed["0.bias"][2] = 0.0  # a zero curvature (a weight no example moves) is valid too
    fit = fit._replace(hessian=zeroed)
    t = torch.tensor(0.3, requires_grad=True) if grad else 0.3
    tempered = fit._replace(hessian={k: h / t for k, h in fit.hessian.items()})  # as the docs
    h = {k: v.detach() for k, v in tempered.hessian.items()}
    lam = {k: 0.5 + i for i, k in enumerate(fit.mean)}

    evidence = bf.laplace_marglik(tempered, lam)
    best = bf.optimize_prior_precision(tempered, "tensor")
    q = bf.laplace_posterior(tempered, lam)

    plain = fit._replace(hessian=h)
    assert torch.allclose(evidence, marglik_formula(plain, lam), rtol=1e-12)
    for k in fit.mean:
        assert torch.allclose(bf.std(q)[k].square(), 1 / (h[k] + lam[k]), rtol=1e-12)
        # MacKay's condition at the optimum: lambda |theta|^2 = sum h / (h + lambda).
        gamma = (h[k] / (h[k] + best[k])).sum()
        assert torch.allclose(best[k] * fit.mean[k].square().sum(), gamma, rtol=1e-9)
    if grad:  # the temperature stays differentiable: d/dT of -1/2 sum log(h/T + lambda)
        evidence.backward()
        d = sum((v / 0.3**2 / (v / 0.3 + lam[k])).sum() for k, v in fit.hessian.items()) / 2
        assert torch.allclose(t.grad, d, rtol=1e-10)


# laplace-torch 0.3, the reference package, on the same float64 nets.

LT_CASES = {
    "classification": (mlp, classification_ll, "classification", "classification"),
    "regression": (lambda: mlp(2), regression_ll, "regression", "regression"),
}


def laplace_torch(module, likelihood, loader, subset, hessian):
    with warnings.catch_warnings():  # its backends warn about deprecated torch APIs on import
        warnings.simplefilter("ignore")
        from laplace import Laplace
        from laplace.curvature import AsdlEF, CurvlinopsGGN

    # CurvlinopsEF is laplace-torch's default EF backend; for a last layer it returns a zero
    # curvature in 0.3 (its per-example gradients are taken of the full model with the last
    # layer's parameter names, which torch.func.functional_call ignores): AsdlEF does not.
    backend = CurvlinopsGGN if hessian == "ggn" else AsdlEF
    kw = dict(sigma_noise=SIGMA) if likelihood == "regression" else {}
    la = Laplace(
        copy.deepcopy(module),
        likelihood,
        subset_of_weights=subset,
        hessian_structure="diag",
        backend=backend,
        **kw,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.fit(loader)
    return la


@needs_laplace
@pytest.mark.parametrize("hessian", ["ggn", "ef"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("case", LT_CASES)
def test_against_laplace_torch(case, subset, hessian):
    build, fn, likelihood, kind = LT_CASES[case]
    module = build()
    x, y = data(kind, n=23)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    include = ("",) if subset == "all" else ("4",)

    fit = bf.laplace_fit(
        module,
        fn,
        loader,
        hessian=hessian,
        output=output,
        likelihood=likelihood,
        sigma=SIGMA,
        include=include,
    )
    la = laplace_torch(module, likelihood, loader, subset, hessian)

    ours = torch.cat([h.reshape(-1) for h in fit.hessian.values()])
    theirs = la.H * la._H_factor  # laplace-torch keeps 1 / sigma^2 out of H
    if likelihood == "regression" and hessian == "ef":
        # laplace-torch squares the gradients of its loss 1/2 * MSE, 2 (f - y) J, and
        # multiplies by 1/2 once: 2 (f - y)^2 J^2, not the (f - y)^2 J^2 of its own
        # log-likelihood N(y; f, 1); so its EF is 2 sigma^2 times the EF of that likelihood.
        theirs = theirs / (2 * SIGMA**2)
    assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-12)  # float64
    assert torch.allclose(fit.log_likelihood, la.log_likelihood, rtol=1e-12)
    if not (likelihood == "regression" and hessian == "ef"):
        for prec in (0.3, 2.0):
            assert torch.allclose(
                bf.laplace_marglik(fit, prec),
                la.log_marginal_likelihood(torch.tensor(prec)),
                rtol=1e-10,
            )


def test_frozen_parameters_are_left_out_as_laplace_torch_does():
    # A fine-tuned head on a frozen body: the fit took the body too (51 numbers where
    # laplace-torch takes 21), so the evidence differed (-65.4 against -56.7).
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    module[0].requires_grad_(False)
    x, y = data("classification", n=23)
    args = (module, classification_ll, batches(x, y, 8))
    kw = dict(output=output, likelihood="classification")

    fit = bf.laplace_fit(*args, **kw)
    assert list(fit.mean) == ["2.weight", "2.bias"]
    explicit = bf.laplace_fit(*args, **kw, include=["2"])
    assert all(torch.equal(fit.hessian[k], explicit.hessian[k]) for k in fit.hessian)
    assert list(bf.laplace(*args, **kw).mean) == ["2.weight", "2.bias"]
    with pytest.raises(ValueError, match=r"laplace_fit: .* got only frozen ones .*'0.weight'"):
        bf.laplace_fit(*args, **kw, include=["0"])


@needs_laplace
def test_frozen_parameters_against_laplace_torch():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    module[0].requires_grad_(False)
    x, y = data("classification", n=23)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)

    fit = bf.laplace_fit(
        module, classification_ll, loader, output=output, likelihood="classification"
    )
    la = laplace_torch(module, "classification", loader, "all", "ggn")
    ours = torch.cat([h.reshape(-1) for h in fit.hessian.values()])
    assert ours.shape == la.H.shape and torch.allclose(ours, la.H, rtol=1e-10, atol=1e-12)
    prec = torch.tensor(1.0)
    assert torch.allclose(
        bf.laplace_marglik(fit, 1.0), la.log_marginal_likelihood(prec), rtol=1e-10
    )


@needs_laplace
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_prior_precision_and_probit_predictive_against_laplace_torch(subset):
    module = mlp()
    x, y = data("classification", n=60)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        (-classification_ll(module, x, y).mean()).backward()
        optimizer.step()
    module.zero_grad(set_to_none=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    include = ("",) if subset == "all" else ("4",)

    fit = bf.laplace_fit(
        module,
        classification_ll,
        loader,
        output=output,
        likelihood="classification",
        include=include,
    )
    la = laplace_torch(module, "classification", loader, subset, "ggn")
    best = bf.optimize_prior_precision(fit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Adam on log(lambda), laplace-torch's method: run to convergence.
        la.optimize_prior_precision(
            pred_type="glm", method="marglik", prior_structure="scalar", n_steps=1000, lr=0.05
        )
    assert math.isclose(best, la.prior_precision.item(), rel_tol=1e-4)

    la.prior_precision = torch.tensor([best])
    q = bf.laplace_posterior(fit, best)
    x_new, _ = data("classification", n=7, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = la(x_new, pred_type="glm", link_approx="probit")
    ours = bf.probit_probs(*bf.linearized_predictive(module, q, x_new))
    assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-14)
    theirs_var = la.posterior_variance
    assert torch.allclose(
        torch.cat([bf.std(q)[k].square().reshape(-1) for k in q.mean]), theirs_var, rtol=1e-10
    )


# Docs.


def test_docs_examples_run():
    run_page("posteriors.md", 3)
