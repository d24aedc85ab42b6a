r"""Tests for bayesflow.objectives: the vectorized negative ELBO and KL schedules."""

import math

import pytest
import torch
import torch.nn as nn
import zuko

import bayesflow as bf

from bayesflow.priors import GaussianPrior, Prior, ScaleMixturePrior

from .pages import run_page
from .registry import TRAINING, mse, snapshot, unchanged


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PRIORS = {
    "default": None,
    "var": 0.5,
    "gaussian": GaussianPrior(0.1, 2.0),
    "mixture": ScaleMixturePrior(0.5, 1.0, 0.01),
}

OBJECTIVES = [bf.nelbo, bf.loop_nelbo, bf.local_nelbo, bf.flipout_nelbo]


def _grads(q):
    return [t.grad.clone() for t in (*q.mean.values(), *q.logvar.values())]


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("case", TRAINING)
def test_nelbo_matches_loop(case, prior):
    build, args, fn, include = TRAINING[case]
    module = build()
    q = bf.init(module, init_logvar=-3.0, include=include)
    a = args()
    kw = dict(fn=fn, num_data=100, n=4, prior=PRIORS[prior], kl_weight=0.5)

    losses, grads = [], []
    for objective, chunk in ((bf.nelbo, None), (bf.nelbo, 3), (bf.loop_nelbo, None)):
        g = torch.Generator(torch.get_default_device()).manual_seed(0)
        loss = objective(module, q, *a, generator=g, chunk_size=chunk, **kw)
        loss.backward()
        losses.append(loss.detach())
        grads.append(_grads(q))
        for t in (*q.mean.values(), *q.logvar.values()):
            t.grad = None

    for loss, grad in zip(losses[1:], grads[1:], strict=True):
        assert torch.allclose(loss, losses[0], atol=1e-10)
        assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(grad, grads[0], strict=True))

    # the formula, from its pieces, and the sampled parameters changed the loss
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    ll = bf.vmap_call(module, bf.sample(q, 4, generator=g), *a, fn=fn)
    mc = PRIORS[prior] is not None and not getattr(PRIORS[prior], "closed_form", True)
    kl = bf.prior_kl(q, PRIORS[prior], generator=g, n=4 if mc else None)
    assert torch.allclose(losses[0], 0.5 * kl / 100 - ll.mean(), atol=1e-10)
    assert not torch.allclose(ll[0], fn(module, *a))


def test_tutorial_loss_is_expressible():
    # zuko's tutorial: loss = MSE + 1e-6 * KL(q || N(0, 1)), one sample per step
    bnet = bf.BayesianModel(zuko.nn.MLP(5, 5, hidden_features=(16,)), init_logvar=-9.0)
    x = torch.randn(64, 5)
    y = torch.sort(x, dim=-1).values

    loss = bf.nelbo(
        bnet.base, bnet.posterior, x, y,
        fn=mse, num_data=1e6, n=3, generator=torch.Generator(torch.get_default_device()).manual_seed(0),
    )  # fmt: skip

    params = bnet.sample_params(
        n=3, generator=torch.Generator(torch.get_default_device()).manual_seed(0)
    )
    expected = 0.0
    for k in range(3):
        net = bnet.mean_model()
        out = torch.func.functional_call(net, {n: p[k] for n, p in params.items()}, (x,))
        expected = expected + (out - y).square().mean() / 3
    expected = expected + 1e-6 * bnet.kl_divergence()

    assert torch.allclose(loss, expected, atol=1e-10)

    loss.backward()
    assert all(p.grad is not None for p in bnet.means.values())
    assert all(p.grad is not None for p in bnet.logvars.values())


def test_bayesian_model_and_functional_posterior_agree():
    bnet = bf.BayesianModel(zuko.nn.MLP(3, 2, hidden_features=(8,)), init_logvar=-3.0)
    q = bf.Posterior(
        {k: v.detach().clone() for k, v in bnet.posterior.mean.items()},
        {k: v.detach().clone() for k, v in bnet.posterior.logvar.items()},
    )
    x, y = torch.randn(10, 3), torch.randn(10, 2)

    for objective in OBJECTIVES:
        kw = dict(fn=mse, num_data=50, n=4)
        a = objective(
            bnet.base,
            bnet.posterior,
            x,
            y,
            generator=torch.Generator(torch.get_default_device()).manual_seed(1),
            **kw,
        )
        b = objective(
            bnet.base,
            q,
            x,
            y,
            generator=torch.Generator(torch.get_default_device()).manual_seed(1),
            **kw,
        )
        assert torch.allclose(a, b)


@pytest.mark.parametrize("objective", [bf.local_nelbo, bf.flipout_nelbo])
def test_local_objectives_are_unbiased(objective):
    net = zuko.nn.MLP(3, 2, hidden_features=(8,), activation=nn.ELU)
    q = bf.init(net, init_logvar=-2.0)
    x, y = torch.randn(10, 3), torch.randn(10, 2)
    g = torch.Generator(torch.get_default_device()).manual_seed(2)
    kw = dict(fn=mse, num_data=50, n=8, generator=g)

    with torch.no_grad():
        local = torch.stack([objective(net, q, x, y, **kw) for _ in range(400)])
        full = torch.stack([bf.nelbo(net, q, x, y, **kw) for _ in range(400)])

    se = (local.var() / 400 + full.var() / 400).sqrt()
    assert (local.mean() - full.mean()).abs() <= 5 * se
    assert local.std() > 0

    # chunks draw the same noise, in the same order
    a = objective(
        net,
        q,
        x,
        y,
        fn=mse,
        num_data=50,
        n=6,
        generator=torch.Generator(torch.get_default_device()).manual_seed(3),
    )
    b = objective(
        net, q, x, y, fn=mse, num_data=50, n=6, chunk_size=6,
        generator=torch.Generator(torch.get_default_device()).manual_seed(3),
    )  # fmt: skip
    assert torch.equal(a, b)
    c = objective(net, q, x, y, fn=mse, num_data=50, n=6, chunk_size=4)
    assert c.shape == ()


def test_in_dims():
    net = zuko.nn.MLP(3, 2, hidden_features=(8,))
    q = bf.init(net, init_logvar=-3.0)
    x, y = torch.randn(4, 10, 3), torch.randn(10, 2)

    for objective in OBJECTIVES:
        g1, g2 = (
            torch.Generator(torch.get_default_device()).manual_seed(4),
            torch.Generator(torch.get_default_device()).manual_seed(4),
        )
        kw = dict(fn=mse, num_data=50, n=4, in_dims=[0, None])
        a = objective(net, q, x, y, generator=g1, **kw)
        b = bf.loop_nelbo(net, q, x, y, generator=g2, **kw)
        if objective in (bf.nelbo, bf.loop_nelbo):
            assert torch.allclose(a, b)
        else:
            assert torch.isfinite(a)


def test_kl_weight_and_num_data():
    net = zuko.nn.MLP(3, 2, hidden_features=(8,))
    q = bf.init(net, init_logvar=-3.0)
    x, y = torch.randn(10, 3), torch.randn(10, 2)
    kl = bf.kl_divergence(q)

    def loss(**kw):
        return bf.nelbo(
            net,
            q,
            x,
            y,
            fn=mse,
            n=2,
            generator=torch.Generator(torch.get_default_device()).manual_seed(5),
            **kw,
        )

    base = loss(num_data=10, kl_weight=0.0)
    assert torch.allclose(loss(num_data=10, kl_weight=1.0) - base, kl / 10)
    assert torch.allclose(loss(num_data=40, kl_weight=torch.tensor(2.0)) - base, 2 * kl / 40)


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda f: f.__name__)
def test_errors(objective):
    name = objective.__name__
    net = zuko.nn.MLP(3, 2, hidden_features=(8,))
    q = bf.init(net)
    x, y = torch.randn(10, 3), torch.randn(10, 2)

    def call(**kw):
        kw = {"fn": mse, "num_data": 10} | kw
        return objective(net, q, x, y, **kw)

    with pytest.raises(TypeError, match=f"{name}: expected fn to be a callable"):
        call(fn=None)
    with pytest.raises(
        TypeError,
        match=f"{name}(: |\\(\\) )(missing|required keyword|expected the keyword arguments fn and num_data)",
    ):
        objective(net, q, x, y, num_data=10)
    with pytest.raises(ValueError, match=f"{name}: expected a finite num_data > 0"):
        call(num_data=0)
    with pytest.raises(TypeError, match=f"{name}: expected num_data to be a number"):
        call(num_data="10")
    with pytest.raises(ValueError, match=f"{name}: expected n to be a positive int"):
        call(n=0)
    with pytest.raises(TypeError, match=f"{name}: expected prior to be"):
        call(prior="normal")
    with pytest.raises(ValueError, match=f"{name}: expected a finite kl_weight >= 0"):
        call(kl_weight=-1.0)
    with pytest.raises(TypeError, match=f"{name}: expected generator"):
        call(generator=0)
    with pytest.raises(ValueError, match=f"{name}: expected chunk_size"):
        call(chunk_size=0)
    with pytest.raises(TypeError, match=rf"{name}: expected a bayesflow\.Posterior"):
        objective(net, {}, x, y, fn=mse, num_data=10)
    bnet = bf.BayesianModel(net)
    with pytest.raises(TypeError, match=f"{name}: expected the module the posterior is over"):
        objective(bnet, bnet.posterior, x, y, fn=mse, num_data=10)
    with pytest.raises(ValueError, match=f"{name}: expected fn to return per-datum"):
        call(fn=lambda m, x, y: [mse(m, x, y)])
    # A batch of no datum gave a NaN loss (the mean over nothing).
    gen = torch.Generator(torch.get_default_device())
    state = gen.get_state()
    with pytest.raises(ValueError, match=f"{name}: expected fn to return at least one log-lik"):
        objective(net, q, x[:0], y[:0], fn=mse, num_data=10, generator=gen)
    assert torch.equal(gen.get_state(), state)
    # A complex log-likelihood gave a complex loss; integers failed in torch's mean().
    for dtype in (torch.complex128, torch.int64, torch.bool):
        with pytest.raises(TypeError, match=f"{name}: expected fn to return real floating"):
            call(fn=lambda m, x, y, dtype=dtype: mse(m, x, y).to(dtype))


def test_docs_examples_run():
    run_page("training.md", 4)


@pytest.mark.parametrize("estimator", ["weights", "local"])
def test_a_posterior_that_does_not_fit_draws_nothing(estimator):
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    q = bf.init(net, init_logvar=-3.0)
    x, y = torch.randn(6, 3), torch.randn(6, 2)

    def fn(m, x, y):
        return -(m(x) - y).square().sum(-1)

    extra = torch.zeros(2)
    unknown = bf.Posterior({**q.mean, "nope": extra}, {**q.logvar, "nope": extra})
    other = bf.Posterior(
        {k: v.float() for k, v in q.mean.items()}, {k: v.float() for k, v in q.logvar.items()}
    )
    state = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    before = g.get_state()
    for bad, kwargs in ((unknown, {}), (other, {}), (q, {"in_dims": (0, None)})):
        with pytest.raises(ValueError, match="nelbo: expected"):
            bf.nelbo(
                net,
                bad,
                x,
                y,
                fn=fn,
                num_data=10.0,
                n=3,
                generator=g,
                estimator=estimator,
                **kwargs,
            )
        assert torch.equal(g.get_state(), before)  # no draw: a retry gives the same numbers
        assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_a_kl_weight_of_one_element_gives_a_scalar_loss():
    net = zuko.nn.MLP(3, 2, hidden_features=(8,))
    q = bf.init(net, init_logvar=-3.0)
    x, y = torch.randn(10, 3), torch.randn(10, 2)

    def loss(kl_weight):
        g = torch.Generator(torch.get_default_device()).manual_seed(5)
        return bf.nelbo(net, q, x, y, fn=mse, num_data=10, n=2, generator=g, kl_weight=kl_weight)

    for weight in (torch.tensor([0.5]), torch.tensor([[0.5]]), torch.tensor(0.5)):
        out = loss(weight)
        assert out.shape == () and torch.equal(out, loss(0.5))
    assert torch.allclose(loss(1.0) - loss(0.0), bf.kl_divergence(q) / 10, atol=1e-12)


@pytest.mark.parametrize("estimator", ["weights", "local", "flipout"])
def test_an_output_refused_leaves_the_buffers_as_found(estimator):
    # The output is checked after the forward passes, which update a train-mode
    # BatchNorm's running statistics: a refused output left them updated.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    q = bf.init(net, init_logvar=-2.0)
    x = torch.randn(8, 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="nelbo: expected fn to return per-datum"):
        bf.nelbo(net, q, x, fn=lambda m, x: (m(x).squeeze(-1),), num_data=10, estimator=estimator)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    with pytest.raises(TypeError, match="nelbo: expected fn to return real floating"):
        bf.nelbo(net, q, x, fn=lambda m, x: m(x).squeeze(-1).cfloat(), num_data=10)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    # The same call with a per-datum output does update them.
    bf.nelbo(net, q, x, fn=lambda m, x: m(x).squeeze(-1), num_data=10, estimator=estimator)
    assert not torch.equal(net[1].running_mean, before["1.running_mean"])


class _BrokenPrior(Prior):
    r"""A prior without closed-form KL whose log-density fails: after the forward passes."""

    def log_prob(self, params):
        raise RuntimeError("no log-density here")


def _ll_and_logits(m, x, y):  # a common slip: the log-likelihoods and the outputs
    out = m(x)
    return -(out - y).square().sum(-1), out


def _raises(m, x, y):
    m(x)
    if torch.is_grad_enabled():  # not in the local trick's shape-finding pass: after the draws
        raise RuntimeError("fn fails after its forward pass")
    return m(x).sum(-1)


FAILURES = {
    "output-refused": (_ll_and_logits, None, ValueError, "nelbo: expected fn to return"),
    "fn-raises": (_raises, None, RuntimeError, "fn fails after"),
    "mc-kl-raises": (mse, _BrokenPrior(), RuntimeError, "no log-density here"),
}


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda f: f.__name__)
def test_a_failed_call_leaves_the_generator_as_found(objective, failure, device):
    # The samples (or the local noise) were drawn, then the call failed: the generator
    # given was left advanced, and a retry gave other numbers. (torch's global one is not
    # put back: other threads draw from it.)
    fn, prior, error, message = FAILURES[failure]
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    q = bf.init(net, init_logvar=-3.0)
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator(device).manual_seed(1)
    found = g.get_state()
    with pytest.raises(error, match=message):
        objective(net, q, x, y, fn=fn, num_data=10, n=3, prior=prior, generator=g)
    assert torch.equal(g.get_state(), found)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())

    # A retry draws what the failed call drew: the same loss as from a fresh generator.
    loss = objective(net, q, x, y, fn=mse, num_data=10, n=3, generator=g)
    fresh = torch.Generator(device).manual_seed(1)
    net.load_state_dict(before)
    assert torch.equal(loss, objective(net, q, x, y, fn=mse, num_data=10, n=3, generator=fresh))


class _LaplacePrior(GaussianPrior):
    r"""A Laplace prior of its Gaussian's variance: no closed form, the Monte Carlo KL of its
    own log-density."""

    closed_form = False

    def log_prob(self, params):
        b = math.sqrt(self.var / 2)
        return sum((-(t.abs() / b) - math.log(2 * b)).flatten(1).sum(1) for t in params.values())


def _laplace_kl(q, var):
    r"""The exact KL from `q` of the centred Laplace prior of variance `var` (scale `b`):
    :math:`-H(q) + E|\theta| / b + \log 2b`, with :math:`E|\theta| = s \sqrt{2 / \pi}
    e^{-m^2 / 2 s^2} + m \, \mathrm{erf}(m / s \sqrt{2})` for :math:`\theta \sim N(m, s^2)`."""

    b, sd, kl = math.sqrt(var / 2), bf.std(q), 0.0
    for k, m in q.mean.items():
        s = sd[k]
        mean_abs = s * math.sqrt(2 / math.pi) * torch.exp(-(m**2) / (2 * s**2))
        mean_abs = mean_abs + m * torch.erf(m / (s * math.sqrt(2)))
        entropy = 0.5 * (torch.log(2 * math.pi * s**2) + 1)
        kl = kl + (mean_abs / b + math.log(2 * b) - entropy).sum()
    return kl


class _DoubledKL(GaussianPrior):
    r"""A Gaussian prior whose `kl` is its own: twice the closed form."""

    def kl(self, posterior, generator=None, n=None):
        return 2 * super().kl(posterior, generator, n)


@pytest.mark.parametrize("estimator", ["weights", "local", "flipout"])
def test_a_gaussian_prior_subclass_with_a_kl_of_its_own(estimator, gen):
    # nelbo took GaussianPrior's fused closed form for every subclass that kept `_closed_kl`,
    # whatever its `closed_form` or `kl`: a Laplace prior's loss was the Gaussian KL (3.17,
    # 11 standard errors off its 3.06), an overridden `kl` was never called.
    torch.manual_seed(0)
    net, x = nn.Linear(3, 2), torch.randn(4, 3)
    q = bf.init(net, init_logvar=-2.0)
    zero = lambda m, x: 0.0 * m(x).sum(-1)  # the loss is the KL alone
    kw = dict(fn=zero, num_data=1.0, estimator=estimator)

    g, laplace = gen(1), _LaplacePrior(var=0.5)
    kls = torch.stack(
        [bf.nelbo(net, q, x, n=256, prior=laplace, generator=g, **kw).detach() for _ in range(100)]
    )
    se = kls.std() / 10
    exact, closed = _laplace_kl(q, 0.5), bf.kl_divergence(q, 0.5).detach()
    assert (kls.mean() - exact).abs() <= 5 * se
    assert (kls.mean() - closed).abs() > 5 * se  # the test tells the two apart

    doubled = bf.nelbo(net, q, x, n=2, prior=_DoubledKL(var=0.5), generator=gen(2), **kw)
    assert torch.allclose(doubled, 2 * closed, rtol=1e-12)


class _OwnKL(Prior):
    r"""A prior whose `kl` is its own and returns `value(posterior)`."""

    def __init__(self, value):
        self.value = value

    def kl(self, posterior, generator=None, n=None):
        return self.value(posterior)


def _summed(q):
    return sum(m.square().sum() for m in q.mean.values())


BAD_KLS = {
    "no return": (lambda q: None, TypeError, r"a real floating-point tensor, got NoneType"),
    "one per tensor": (
        lambda q: torch.stack([m.square().sum() for m in q.mean.values()]),
        ValueError,
        r"one KL, a scalar tensor, got shape \(4,\)",
    ),
    "integers": (
        lambda q: torch.tensor(3),
        TypeError,
        r"a real floating-point tensor, got a torch\.int64 tensor",
    ),
}


@pytest.mark.parametrize("bad", BAD_KLS)
@pytest.mark.parametrize("estimator", ["weights", "local", "flipout"])
def test_a_kl_of_ones_own_that_is_not_one_kl_is_refused(estimator, bad, gen):
    # A `kl` that forgot its return failed with a bare TypeError after the forward pass,
    # which had updated the BatchNorm statistics and advanced the generator; one KL per
    # tensor gave a vector loss.
    value, error, message = BAD_KLS[bad]
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    q = bf.init(net, init_logvar=-3.0, include=["0", "2"])
    x = torch.randn(8, 3, dtype=torch.float64)
    g = gen(1)
    before, state = snapshot(net), g.get_state()
    kw = dict(fn=lambda m, x: -m(x).square().sum(-1), num_data=10, estimator=estimator)
    with pytest.raises(error, match=rf"^nelbo: expected _OwnKL\.kl to return {message}"):
        bf.nelbo(net, q, x, n=2, prior=_OwnKL(value), generator=g, **kw)
    assert unchanged(before, net) and torch.equal(g.get_state(), state)
    with pytest.raises(error, match=rf"^prior_kl: expected _OwnKL\.kl to return {message}"):
        bf.prior_kl(q, _OwnKL(value))

    # One KL in a tensor of one element is one KL: the loss is a scalar.
    one = bf.nelbo(
        net, q, x, n=2, prior=_OwnKL(lambda q: _summed(q).reshape(1)), generator=gen(2), **kw
    )
    two = bf.nelbo(net, q, x, n=2, prior=_OwnKL(_summed), generator=gen(2), **kw)
    assert one.shape == () and torch.equal(one, two)


class _ShapedLogProb(Prior):
    r"""A prior whose `log_prob` gives `extra` more values than parameter sets."""

    def __init__(self, extra):
        self.extra = extra

    def log_prob(self, params):
        n = next(iter(params.values())).shape[0]
        return sum(p.flatten(1).square().sum(1) for p in params.values()).repeat(1 + self.extra)[
            : n + self.extra
        ]


def test_a_log_prob_of_the_wrong_shape_is_refused(gen):
    # The Monte Carlo KL averaged a log_prob of any shape.
    q = bf.init(nn.Linear(3, 2).double(), init_logvar=-3.0)
    g = gen(1)
    state = g.get_state()
    with pytest.raises(
        ValueError, match=r"^_ShapedLogProb\.kl: expected _ShapedLogProb\.log_prob to return one"
    ):
        bf.prior_kl(q, _ShapedLogProb(4), generator=g, n=3)
    assert torch.equal(g.get_state(), state)
    assert bf.prior_kl(q, _ShapedLogProb(0), generator=g, n=3).shape == ()


def test_the_aliases_show_nelbos_signature_less_what_they_fix():
    # help() showed (module, posterior, *args, **kwargs), and the docs said "one signature".
    import inspect

    full = inspect.signature(bf.nelbo, eval_str=True).parameters
    for objective, fixed in (
        (bf.loop_nelbo, "vectorized"),
        (bf.local_nelbo, "estimator"),
        (bf.flipout_nelbo, "estimator"),
    ):
        shown = inspect.signature(objective).parameters
        assert list(shown) == [name for name in full if name != fixed]
        assert all(shown[name] == full[name] for name in shown)
        net = nn.Linear(2, 1)
        with pytest.raises(TypeError, match=rf"{objective.__name__}: .*{fixed}"):
            objective(
                net,
                bf.init(net),
                torch.randn(3, 2),
                fn=lambda m, x: m(x)[:, 0],
                num_data=3,
                **{fixed: None},
            )
