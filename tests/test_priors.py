r"""Tests for bayesflow.priors: closed forms against Monte Carlo and quadrature."""

import math

import numpy as np
import pytest
import torch
import zuko

import bayesflow as bf

from bayesflow.priors import GaussianPrior, Prior, ScaleMixturePrior, prior_kl


def _posterior(logvar=-2.0):
    net = zuko.nn.MLP(3, 2, hidden_features=(4,))
    q = bf.init(net, init_logvar=logvar)
    with torch.no_grad():
        for lv in q.logvar.values():
            lv.add_(torch.randn_like(lv))
    return net, q


def _mc_values(prior, q, n, seed):
    r"""Per-sample Monte Carlo KL terms, with the same draws as `prior.kl(n=n)`."""

    params = bf.sample(
        q, n, generator=torch.Generator(torch.get_default_device()).manual_seed(seed)
    )
    entropy = sum(
        0.5 * (2 * sd.log() + math.log(2 * math.pi) + 1).sum() for sd in bf.std(q).values()
    )
    return -entropy - prior.log_prob(params)


def _per_param(q, f):
    return {name: f(m) for name, m in q.mean.items()}


PRIORS = {
    "standard": lambda q: GaussianPrior(),
    "scalar": lambda q: GaussianPrior(mean=0.3, var=0.5),
    "per-param": lambda q: GaussianPrior(
        mean=_per_param(q, lambda m: 0.1 * torch.randn_like(m)),
        var=_per_param(q, lambda m: torch.rand_like(m) + 0.5),
    ),
    "per-param-scalars": lambda q: GaussianPrior(
        mean=dict.fromkeys(q.mean, -0.2), var=dict.fromkeys(q.mean, 2.0)
    ),
}


@pytest.mark.parametrize("name", PRIORS)
def test_gaussian_closed_form_matches_monte_carlo(name):
    _, q = _posterior()
    prior = PRIORS[name](q)

    closed = prior.kl(q)
    values = _mc_values(prior, q, 4000, seed=0)
    mc = prior.kl(q, generator=torch.Generator(torch.get_default_device()).manual_seed(0), n=4000)

    assert torch.allclose(mc, values.mean())
    assert (mc - closed).abs() <= 5 * values.std() / 4000**0.5
    assert torch.allclose(prior_kl(q, prior), closed)


def test_gaussian_matches_kl_divergence():
    _, q = _posterior()
    for var in (1.0, 0.3):
        closed = GaussianPrior(0.0, var).kl(q)
        assert torch.allclose(closed, bf.kl_divergence(q, prior_var=var))
        assert torch.allclose(prior_kl(q, var), closed)
    assert torch.allclose(prior_kl(q), bf.kl_divergence(q, 1.0))
    assert torch.allclose(prior_kl(q, None), bf.kl_divergence(q, 1.0))


def test_moped_prior_centred_on_the_module():
    net, q = _posterior()
    prior = GaussianPrior.from_module(net, var=0.1)

    assert set(prior.mean) == {name for name, _ in net.named_parameters()}
    # the posterior starts at the module's weights: no mean term in the KL
    var = [sd.square() for sd in bf.std(q).values()]
    expected = sum(0.5 * (v / 0.1 + math.log(0.1) - v.log() - 1).sum() for v in var)
    assert torch.allclose(prior.kl(q), expected)
    assert prior.kl(q) < GaussianPrior(0.0, 0.1).kl(q)

    # a posterior over a subset of the parameters, with a prior over all of them
    sub = bf.init(net, init_logvar=-3.0, include=["0"])
    assert torch.allclose(
        prior.kl(sub),
        GaussianPrior({"0.weight": 0, "0.bias": 0}, 0.1).kl(
            bf.Posterior({k: v - prior.mean[k] for k, v in sub.mean.items()}, sub.logvar)
        ),
    )


def _quadrature_kl(mu, var, prior):
    r"""KL(N(mu, var) || prior) for one scalar parameter, by the trapezoidal rule."""

    sd = math.sqrt(var)
    t = torch.linspace(mu - 12 * sd, mu + 12 * sd, 200001)
    log_q = -0.5 * ((t - mu) ** 2 / var + math.log(2 * math.pi * var))
    log_p = prior.log_prob({"w": t.unsqueeze(1)})
    return torch.trapezoid(log_q.exp() * (log_q - log_p), t)


@pytest.mark.parametrize("mu, logvar", [(0.0, -2.0), (0.7, 0.0), (-0.3, -6.0)])
def test_scale_mixture_monte_carlo_matches_quadrature(mu, logvar):
    prior = ScaleMixturePrior(0.25, 1.0, math.exp(-6))
    q = bf.Posterior({"w": torch.tensor([mu])}, {"w": torch.tensor([logvar])})

    values = _mc_values(prior, q, 20000, seed=1)
    mc = prior.kl(q, generator=torch.Generator(torch.get_default_device()).manual_seed(1), n=20000)

    assert torch.allclose(mc, values.mean())
    assert (
        mc - _quadrature_kl(mu, bf.std(q)["w"].item() ** 2, prior)
    ).abs() <= 5 * values.std() / 20000**0.5


def test_scale_mixture_of_equal_scales_is_gaussian():
    _, q = _posterior()
    mixture = ScaleMixturePrior(0.3, 0.5, 0.5)
    gaussian = GaussianPrior(0.0, 0.5)

    g1, g2 = (
        torch.Generator(torch.get_default_device()).manual_seed(2),
        torch.Generator(torch.get_default_device()).manual_seed(2),
    )
    assert torch.allclose(mixture.kl(q, g1, n=8), gaussian.kl(q, g2, n=8))
    params = bf.sample(q, 3)
    assert torch.allclose(mixture.log_prob(params), gaussian.log_prob(params))


def test_scale_mixture_is_stable():
    prior = ScaleMixturePrior(0.5, 1.0, math.exp(-12))
    w = torch.tensor([[0.0, 1e-3, 5.0, 1e3]])

    lp = prior.log_prob({"w": w})
    wide = math.log(0.5) - 0.5 * (w.square() + math.log(2 * math.pi))

    assert torch.isfinite(lp).all()
    # far in the tails, the wide component is all there is
    assert torch.allclose(lp, wide[:, 2:].sum(1) + prior.log_prob({"w": w[:, :2]}))


def test_monte_carlo_gradients_and_default_samples():
    _, q = _posterior()
    prior = ScaleMixturePrior(0.5, 1.0, 0.01)
    assert not prior.closed_form and GaussianPrior.closed_form

    kl = prior.kl(
        q, generator=torch.Generator(torch.get_default_device()).manual_seed(3)
    )  # one sample by default
    kl.backward()

    assert kl.shape == ()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in q.mean.values())
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in q.logvar.values())
    assert torch.allclose(
        kl,
        prior_kl(q, prior, generator=torch.Generator(torch.get_default_device()).manual_seed(3)),
    )


def test_repr():
    assert repr(GaussianPrior(0.0, 2.0)) == "GaussianPrior(mean=0.0, var=2.0)"
    assert (
        repr(ScaleMixturePrior(0.5, 1.0, 0.1)) == "ScaleMixturePrior(pi=0.5, var1=1.0, var2=0.1)"
    )
    assert "tensors" in repr(GaussianPrior.from_module(zuko.nn.MLP(2, 2)))


def test_errors():
    _, q = _posterior()

    with pytest.raises(ValueError, match="GaussianPrior: expected a finite var > 0"):
        GaussianPrior(0.0, 0.0)
    with pytest.raises(ValueError, match=r"GaussianPrior: expected a finite var\['a'\] > 0"):
        GaussianPrior(0.0, {"a": torch.tensor([1.0, -1.0])})
    with pytest.raises(ValueError, match="GaussianPrior: expected a finite mean"):
        GaussianPrior(float("nan"))
    with pytest.raises(TypeError, match="GaussianPrior: expected mean to be a float"):
        GaussianPrior("0")
    theta = torch.zeros(2, 3)  # a tensor where parameter sets {name: tensor} go
    with pytest.raises(TypeError, match=r"GaussianPrior\.log_prob: expected parameter sets"):
        GaussianPrior().log_prob(theta)
    with pytest.raises(TypeError, match=r"ScaleMixturePrior\.log_prob: expected parameter sets"):
        ScaleMixturePrior(0.5, 1.0, 0.01).log_prob(theta)
    with pytest.raises(ValueError, match=r"GaussianPrior.kl: expected the prior mean to name"):
        GaussianPrior({"0.weight": 0.0}).kl(q)
    with pytest.raises(
        ValueError, match=r"GaussianPrior.kl: expected the prior var of '0.weight'"
    ):
        GaussianPrior(0.0, _per_param(q, lambda m: torch.ones(7))).kl(q)
    with pytest.raises(
        ValueError, match=r"GaussianPrior.kl: expected the prior mean of '0.weight' to broadcast"
    ):  # a prior tensor larger than the parameter
        GaussianPrior(_per_param(q, lambda m: torch.zeros(2, *m.shape))).kl(q)
    with pytest.raises(ValueError, match=r"GaussianPrior.kl: expected n"):
        GaussianPrior().kl(q, n=0)
    with pytest.raises(TypeError, match=r"GaussianPrior.kl: expected generator"):
        GaussianPrior().kl(q, generator=1)
    with pytest.raises(TypeError, match=r"GaussianPrior.kl: expected a bayesflow.Posterior"):
        GaussianPrior().kl({})
    with pytest.raises(TypeError, match=r"GaussianPrior.from_module: expected a torch.nn"):
        GaussianPrior.from_module(q)
    with pytest.raises(ValueError, match="ScaleMixturePrior: expected 0 < pi < 1"):
        ScaleMixturePrior(1.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="ScaleMixturePrior: expected a finite var2 > 0"):
        ScaleMixturePrior(0.5, 1.0, -0.1)
    with pytest.raises(TypeError, match="ScaleMixturePrior: expected var1 to be a number"):
        ScaleMixturePrior(0.5, None, 0.1)
    with pytest.raises(ValueError, match=r"ScaleMixturePrior.kl: expected n"):
        ScaleMixturePrior(0.5, 1.0, 0.1).kl(q, n=-1)
    with pytest.raises(TypeError, match="prior_kl: expected prior to be"):
        prior_kl(q, "normal")
    with pytest.raises(ValueError, match="prior_kl: expected a finite prior_var > 0"):
        prior_kl(q, -1.0)
    # prior_kl names itself where it builds the prior, the prior's kl where it is given one.
    with pytest.raises(ValueError, match="prior_kl: expected a finite prior_var > 0"):
        prior_kl(q, -1.0, n=4)
    for prior in (None, 2.0):
        with pytest.raises(ValueError, match=r"prior_kl: expected n"):
            prior_kl(q, prior, n=0)
    with pytest.raises(ValueError, match=r"ScaleMixturePrior.kl: expected n"):
        prior_kl(q, ScaleMixturePrior(0.5, 1.0, 0.1), n=0)
    with pytest.raises(ValueError, match=r"GaussianPrior.log_prob: expected the prior var"):
        GaussianPrior(0.0, {"a": 1.0}).log_prob({"b": torch.zeros(2, 3)})
    with pytest.raises(NotImplementedError):
        Prior().log_prob({})


def test_a_prior_value_is_one_dict_level_deep():
    # A nested dict was accepted, then failed in kl with "unhashable type: 'dict'".
    for value in ({"0.weight": {"w": 0.0}}, {"0.weight": [0.0]}):
        with pytest.raises(
            TypeError,
            match=r"GaussianPrior: expected mean\['0.weight'\] to be a float or a tensor, "
            r"got (dict|list)",
        ):
            GaussianPrior(mean=value)
    with pytest.raises(
        TypeError, match=r"GaussianPrior: expected var\['0.bias'\] to be a float or a tensor"
    ):
        GaussianPrior(var={"0.weight": 1.0, "0.bias": {"b": 1.0}})
    prior = GaussianPrior(mean={"a": 0.5, "b": torch.zeros(3)}, var={"a": 2.0, "b": 1.0})
    assert prior.mean["a"] == 0.5 and torch.equal(prior.mean["b"], torch.zeros(3))


def test_prior_kl_checks_generator_and_n_with_every_prior():
    # With no prior or a float, and n=None, the generator went unchecked. prior_kl names
    # itself where it builds the prior, the prior's kl where it is given one.
    _, q = _posterior()
    for prior, where in (
        (None, "prior_kl"),
        (2.0, "prior_kl"),
        (GaussianPrior(), "GaussianPrior.kl"),
        (ScaleMixturePrior(0.5, 1.0, 0.1), "ScaleMixturePrior.kl"),
    ):
        with pytest.raises(
            TypeError,
            match=rf"{where}: expected generator to be a torch.Generator or None, got str",
        ):
            prior_kl(q, prior, generator="not a generator")
        with pytest.raises(TypeError, match=rf"{where}: expected n to be a positive int"):
            prior_kl(q, prior, n=1.5)
    assert torch.equal(prior_kl(q, generator=torch.Generator()), bf.kl_divergence(q))


def test_log_prob_checks_that_prior_tensors_broadcast_as_kl_does():
    # kl refused a prior tensor that does not fit the parameter; log_prob gave torch's error.
    q = bf.init(torch.nn.Linear(3, 2))
    params = bf.sample(q, 2)
    for prior, what in (
        (GaussianPrior(var=torch.ones(5)), "var"),
        (GaussianPrior(mean={"weight": torch.zeros(2, 2, 3), "bias": 0.0}), "mean"),
    ):
        for method, args in (("kl", (q, None, 2)), ("log_prob", (params,))):
            with pytest.raises(
                ValueError,
                match=rf"GaussianPrior\.{method}: expected the prior {what} of 'weight' to "
                r"broadcast to \(2, 3\), got shape",
            ):
                getattr(prior, method)(*args)
    # Tensors that broadcast to the parameter, as kl takes them.
    fits = GaussianPrior(var={"weight": torch.full((3,), 2.0), "bias": torch.ones(2)})
    same = GaussianPrior(var={"weight": 2.0, "bias": 1.0})
    assert torch.allclose(fits.log_prob(params), same.log_prob(params), rtol=1e-12)


def test_per_parameter_tensors_are_detached_copies():
    _, q = _posterior()
    var = _per_param(q, lambda m: torch.full_like(m, 2.0).requires_grad_())

    prior = GaussianPrior(0.0, var)

    assert all(not v.requires_grad for v in prior.var.values())


def test_a_prior_made_from_live_tensors_does_not_move_with_them():
    net, q = _posterior()
    mean = {k: p.detach() for k, p in net.named_parameters() if k in q.mean}  # the module's
    prior = GaussianPrior(mean, 0.5)
    kl = prior.kl(q)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # a training step moves the module
    assert torch.equal(prior.kl(q), kl)
    expected = bf.priors.GaussianPrior({k: v - 1.0 for k, v in mean.items()}, 0.5).kl(q)
    assert torch.allclose(kl, expected)


def _half(q, dtype):
    return bf.Posterior(
        {k: v.detach().to(dtype) for k, v in q.mean.items()},
        {k: v.detach().to(dtype) for k, v in q.logvar.items()},
    )


def _kl64(q, prior_var):
    r"""The closed form in float64 from the half-precision posterior's exact values."""

    q64 = bf.Posterior(
        {k: v.double() for k, v in q.mean.items()}, {k: v.double() for k, v in q.logvar.items()}
    )
    return bf.kl_divergence(q64, prior_var).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kl_is_summed_in_float32_by_monte_carlo_too(dtype):
    # 90 300 numbers: float16 sums of the entropy and the log-densities overflow (inf, NaN
    # for a mixture), bfloat16 ones round to a step of the result. The oracle: the same
    # draws, the same formula, in float64.
    g = lambda: torch.Generator(torch.get_default_device()).manual_seed(0)
    q = _half(bf.init(torch.nn.Linear(300, 300), init_logvar=-9.0), dtype)
    mixture = ScaleMixturePrior(0.5, 1.0, math.exp(-6))
    params = {k: v.double() for k, v in bf.sample(q, 4, generator=g()).items()}
    q64 = bf.Posterior(
        {k: v.double() for k, v in q.mean.items()}, {k: v.double() for k, v in q.logvar.items()}
    )
    for prior in (mixture, GaussianPrior()):
        kl = prior.kl(q, generator=g(), n=4)
        expected = (
            -sum(
                0.5 * (2 * sd.log() + math.log(2 * math.pi) + 1).sum()
                for sd in bf.std(q64).values()
            )
            - prior.log_prob(params).mean()
        )
        assert kl.dtype == torch.float32 and torch.isfinite(kl)
        assert abs(kl.item() - expected.item()) <= 1e-5 * abs(expected.item())
    closed = _kl64(q, 1.0)
    assert abs(GaussianPrior().kl(q, n=4).item() - closed) <= 1e-3 * closed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_tensor_prior_of_a_half_precision_posterior_is_not_rounded(dtype):
    # The KL is summed in float32: the prior must reach it unrounded, as a float does.
    net = torch.nn.Linear(50, 50)
    q = _half(bf.init(net, init_logvar=-2.0), dtype)
    for var in (0.3, 1e-6):
        as_tensor = GaussianPrior(0.0, {k: torch.full(v.shape, var) for k, v in q.mean.items()})
        expected = _kl64(q, var)
        for prior in (as_tensor, GaussianPrior(0.0, var)):
            assert abs(prior.kl(q).item() - expected) <= 1e-5 * expected


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))  # a 0-dim parameter
        self.lin = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x) * self.scale


def test_monte_carlo_kl_of_a_scalar_parameter(gen):
    # A 0-dim parameter's samples are (n,): the Monte Carlo terms raised an IndexError.
    q = bf.init(_Scaled(), init_logvar=-2.0)
    n = 4000
    gaussian = GaussianPrior(mean=0.3, var=0.5)
    values = _mc_values(gaussian, q, n, seed=0)
    mc = gaussian.kl(q, generator=gen(0), n=n)
    assert torch.allclose(mc, values.mean())
    assert (mc - gaussian.kl(q)).abs() <= 5 * values.std() / n**0.5
    mixture = ScaleMixturePrior(0.5, 1.0, 0.01)
    params = bf.sample(q, 3, generator=gen(1))
    normal = lambda var, t: torch.distributions.Normal(0.0, var**0.5).log_prob(t)
    expected = sum(
        torch.logaddexp(math.log(0.5) + normal(1.0, t), math.log(0.5) + normal(0.01, t))
        .reshape(3, -1)
        .sum(1)
        for t in params.values()
    )
    assert torch.allclose(mixture.log_prob(params), expected, rtol=1e-12)
    assert mixture.kl(q, generator=gen(2), n=3).isfinite()


def test_float_prior_values_are_not_rounded_to_the_default_dtype():
    # Rounded to float32 (the default dtype outside the tests), 1e-50 read as "not > 0" and
    # 1e39 as "not finite": GaussianPrior refused them whatever the posterior's dtype.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        tiny, huge = GaussianPrior(0.0, 1e-50), GaussianPrior(1e39, 1.0)
    finally:
        torch.set_default_dtype(old)

    assert (tiny.mean, tiny.var, huge.mean, huge.var) == (0.0, 1e-50, 1e39, 1.0)
    q = bf.init(torch.nn.Linear(3, 2), init_logvar=-3.0)  # float64: both fit its KL
    sd = bf.std(q)
    for prior, m, s in ((tiny, 0.0, 1e-25), (huge, 1e39, 1.0)):
        oracle = sum(
            torch.distributions.kl_divergence(
                torch.distributions.Normal(q.mean[k], sd[k]), torch.distributions.Normal(m, s)
            ).sum()
            for k in q.mean
        )
        assert torch.allclose(prior.kl(q), oracle, rtol=1e-12)


def test_prior_values_set_after_construction_are_checked_and_used():
    # The checks remembered for a prior's values hold for those values only: a variance
    # replaced later, or set by a subclass without GaussianPrior.__init__, is checked again.
    q = bf.init(torch.nn.Linear(3, 2), init_logvar=-3.0)
    sd = bf.std(q)

    def oracle(m, var):
        s = math.sqrt(var)
        return sum(
            torch.distributions.kl_divergence(
                torch.distributions.Normal(q.mean[k], sd[k]), torch.distributions.Normal(m, s)
            ).sum()
            for k in q.mean
        )

    prior = GaussianPrior(0.0, 2.0)
    assert torch.allclose(prior.kl(q), oracle(0.0, 2.0), rtol=1e-12)
    prior.var = 1e-320  # below float64's least normal number: its 1 / s^2 overflows
    with pytest.raises(
        ValueError,
        match=r"GaussianPrior\.kl: expected the prior var to be a normal number in float64",
    ):
        prior.kl(q)
    prior.mean, prior.var = 0.25, 0.5
    assert torch.allclose(prior.kl(q), oracle(0.25, 0.5), rtol=1e-12)

    class Own(GaussianPrior):
        def __init__(self):  # no GaussianPrior.__init__: nothing checked yet
            self.mean, self.var = -1.0, 3.0

    assert torch.allclose(Own().kl(q), oracle(-1.0, 3.0), rtol=1e-12)
    own = Own()
    own.var = 1e-320
    with pytest.raises(
        ValueError,
        match=r"Own\.kl: expected the prior var to be a normal number in float64",
    ):
        own.kl(q)


def test_prior_values_changed_in_place_are_checked_and_used(gen):
    # A dict entry set, or a tensor filled, after a first KL skipped the checks: a NaN KL,
    # and nelbo's loss NaN, without an error. Oracle: a prior made with the new values.
    net = torch.nn.Linear(3, 2)
    q = bf.init(net, init_logvar=-3.0)
    x, y = torch.randn(4, 3, generator=gen(0)), torch.randn(4, 2, generator=gen(1))
    ll = lambda m, x, y: -(m(x) - y).square().sum(-1)

    by_name = GaussianPrior(0.0, var={"weight": 1.0, "bias": 1.0})
    tensor = GaussianPrior(torch.zeros(()), var=torch.ones(()))
    by_name.kl(q), tensor.kl(q)
    by_name.var["weight"] = -1.0
    tensor.var.fill_(0.0)
    for prior, message in (
        (by_name, r"expected a finite var\['weight'\] > 0, got -1.0"),
        (tensor, "expected a finite var > 0"),
    ):
        g = gen(2)
        state = g.get_state()
        for where, call in (
            ("GaussianPrior.kl", lambda p=prior: p.kl(q)),
            ("GaussianPrior.kl", lambda p=prior: prior_kl(q, p)),  # the prior's own kl
            (
                "nelbo",
                lambda p=prior, g=g: bf.nelbo(
                    net, q, x, y, fn=ll, num_data=10, prior=p, generator=g
                ),
            ),
        ):
            with pytest.raises(ValueError, match=rf"^{where}: {message}"):
                call()
        assert torch.equal(g.get_state(), state)  # refused before any draw

    by_name.var["weight"] = 4.0
    tensor.var.fill_(0.5)
    tensor.mean.add_(0.25)
    assert torch.allclose(
        by_name.kl(q), GaussianPrior(0.0, {"weight": 4.0, "bias": 1.0}).kl(q), rtol=1e-12
    )
    assert torch.allclose(tensor.kl(q), GaussianPrior(0.25, 0.5).kl(q), rtol=1e-12)
    assert not torch.allclose(tensor.kl(q), GaussianPrior(0.0, 1.0).kl(q))


@pytest.mark.parametrize("by_name", [False, True])
def test_prior_values_changed_between_forward_and_backward_are_refused(by_name, gen):
    # The fused node held a view of the prior's variance (a posterior of one tensor, a
    # full-shape variance) without autograd's version check: written in place before the
    # backward pass, the gradient was that of the new value (m / 100 for m / 2). Refused
    # now, as plain autograd refuses it; with several tensors (a copy) the forward's value.
    m = torch.randn(3, generator=gen(0)).requires_grad_()
    lv = torch.full((3,), -1.0, requires_grad=True)
    q = bf.Posterior({"w": m}, {"w": lv})
    var = torch.full((3,), 2.0)
    prior = GaussianPrior(torch.zeros(3), {"w": var} if by_name else var)
    for change in (
        lambda: prior.var["w" if by_name else ...].fill_(100.0),
        lambda: prior.mean.add_(1.0),
    ):
        kl = prior.kl(q)
        (expected,) = torch.autograd.grad(GaussianPrior(prior.mean.clone(), 2.0).kl(q), m)
        with torch.no_grad():
            change()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(kl, m)
        with torch.no_grad():  # back as it was
            prior.var["w" if by_name else ...].fill_(2.0)
            prior.mean.zero_()
        assert torch.allclose(torch.autograd.grad(prior.kl(q), m)[0], expected, rtol=1e-12)


def test_complex_and_bool_prior_tensors_are_refused():
    # A complex mean lost its imaginary part (torch's cast warning only); a complex variance
    # failed in torch ("gt_cpu" not implemented); a bool tensor was a variance of 1.
    for what, value in (
        ("mean", torch.tensor(1.0 + 5.0j)),
        ("var", torch.tensor(1.0 + 0.0j)),
        ("var", torch.tensor(True)),
        ("mean", torch.tensor([True, False])),
    ):
        with pytest.raises(
            TypeError,
            match=rf"GaussianPrior: expected {what} to be a real tensor \(floating-point or "
            rf"integer\), got {value.dtype}",
        ):
            GaussianPrior(**{what: value})
        with pytest.raises(
            TypeError, match=rf"GaussianPrior: expected {what}\['w'\] to be a real"
        ):
            GaussianPrior(**{what: {"w": value}})
    # Integer tensors are numbers: those of the same floats.
    q = bf.init(torch.nn.Linear(3, 2), init_logvar=-3.0)
    ints = GaussianPrior(torch.tensor(1), {"weight": torch.tensor([2, 3, 4]), "bias": 5})
    floats = GaussianPrior(1.0, {"weight": torch.tensor([2.0, 3.0, 4.0]), "bias": 5.0})
    assert torch.allclose(ints.kl(q), floats.kl(q), rtol=1e-12)


class _NoLogProb(Prior):
    r"""A prior that implements nothing: the base class as a user might subclass it."""


class _Refusing(Prior):
    r"""A prior whose log_prob refuses negative parameters (after the draw)."""

    def log_prob(self, params):
        if any((t < 0).any() for t in params.values()):
            raise ValueError("_Refusing.log_prob: expected non-negative parameters")
        return sum(t.flatten(1).sum(1) for t in params.values())


@pytest.mark.parametrize(
    "prior",
    [GaussianPrior(), ScaleMixturePrior(0.5, 1.0, 0.1), Prior()],
    ids=["gaussian", "scale-mixture", "base"],
)
def test_log_prob_checks_the_leading_n_of_every_parameter(prior):
    # A 0-dim tensor gave an IndexError; names with n = 3 and n = 1 were broadcast to (3,).
    where = rf"{type(prior).__name__}\.log_prob"
    for params, shapes in (
        ({"s": torch.tensor(0.3)}, r"\{'s': \(\)\}"),
        ({"a": torch.randn(3, 2), "b": torch.randn(1, 2)}, r"\{'a': \(3, 2\), 'b': \(1, 2\)\}"),
        ({"a": torch.randn(3), "b": torch.randn(2, 3)}, r"\{'a': \(3,\), 'b': \(2, 3\)\}"),
    ):
        with pytest.raises(
            ValueError,
            match=rf"{where}: expected parameter sets \{{name: \(n, \*shape\) tensor\}} with the "
            rf"same leading n for every name, as bayesflow.sample gives, got shapes {shapes}",
        ):
            prior.log_prob(params)
    if type(prior) is Prior:
        with pytest.raises(NotImplementedError, match=r"Prior\.log_prob: not implemented"):
            prior.log_prob({"a": torch.randn(3, 2)})
        return
    # Parameter sets of one n, scalar parameters (n,) included: torch.distributions' numbers.
    params = {"a": torch.randn(3, 2), "s": torch.randn(3)}
    if isinstance(prior, GaussianPrior):
        oracle = lambda t: torch.distributions.Normal(0.0, 1.0).log_prob(t)
    else:
        normal = lambda var, t: torch.distributions.Normal(0.0, var**0.5).log_prob(t)
        oracle = lambda t: torch.logaddexp(
            math.log(0.5) + normal(1.0, t), math.log(0.5) + normal(0.1, t)
        )
    expected = oracle(params["a"]).sum(1) + oracle(params["s"])
    assert torch.allclose(prior.log_prob(params), expected, rtol=1e-12)


@pytest.mark.parametrize("prior", [_NoLogProb(), _Refusing()], ids=["no-log_prob", "refusing"])
def test_a_failed_monte_carlo_kl_leaves_the_generator_as_found(gen, prior):
    # The samples were drawn before log_prob raised, and the generator stayed advanced.
    q = bf.init(torch.nn.Linear(3, 2), init_logvar=-3.0)
    g = gen(0)
    error = TypeError if isinstance(prior, _NoLogProb) else ValueError
    with pytest.raises(error, match=rf"{type(prior).__name__}\.(kl|log_prob): expected"):
        prior.kl(q, generator=g, n=2)
    assert torch.equal(g.get_state(), gen(0).get_state())
    # A retry draws what a fresh generator draws.
    if isinstance(prior, _Refusing):
        with torch.no_grad():
            for t in q.mean.values():
                t.fill_(100.0)
        assert torch.equal(prior.kl(q, generator=g, n=2), prior.kl(q, generator=gen(0), n=2))


class _ClosedOnly(Prior):
    r"""A closed-form KL of its own and no log_prob: N(0, I) written by hand."""

    closed_form = True

    def _closed_kl(self, where, posterior):
        return bf.kl_divergence(posterior)


def test_a_prior_that_implements_nothing_is_refused_before_any_work(gen):
    # nelbo took bf.Prior() and raised NotImplementedError after the draw and fn's call.
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    q = bf.init(module, init_logvar=-3.0)
    x, g, calls = torch.randn(5, 3), gen(0), []

    def fn(m, x):
        calls.append(1)
        return m(x).sum(-1)

    before = [t.clone() for t in module.state_dict().values()]
    for prior in (Prior(), _NoLogProb()):
        for estimator in ("weights", "local"):
            with pytest.raises(
                TypeError,
                match=rf"nelbo: expected a prior that implements log_prob, kl or a closed form "
                rf"\(a subclass of bayesflow.priors.Prior\), got {type(prior).__name__}",
            ):
                bf.nelbo(
                    module, q, x, fn=fn, num_data=5, prior=prior, generator=g, estimator=estimator
                )
        with pytest.raises(
            TypeError, match=rf"{type(prior).__name__}\.kl: expected a prior with a log_prob"
        ):
            prior.kl(q, generator=g)
    assert not calls
    assert all(
        torch.equal(a, b) for a, b in zip(before, module.state_dict().values(), strict=True)
    )
    assert torch.equal(g.get_state(), gen(0).get_state())

    # A closed form of its own is enough: nelbo takes it, as prior_kl does.
    zero = lambda m, x: 0.0 * m(x).sum(-1)
    loss = bf.nelbo(module.eval(), q, x, fn=zero, num_data=5.0, prior=_ClosedOnly(), generator=g)
    assert torch.allclose(loss, bf.kl_divergence(q) / 5.0, rtol=1e-12)


def _closed_kl(q, var):
    r"""KL(q || N(0, var I)) by the formula, with the variances that bf.std gives."""

    return sum(
        0.5 * ((sd.square() + m.square()) / var + math.log(var) - 2 * sd.log() - 1.0).sum()
        for m, sd in zip(q.mean.values(), bf.std(q).values(), strict=True)
    ).detach()


_LL = lambda m, x: m(x).sum(-1)

# One variance, 2, as every kind of real scalar: Python's, NumPy's, tensors of one element.
VARIANCES = {
    "float": 2.0,
    "int": 2,
    "np-float64": np.float64(2.0),
    "np-float32": np.float32(2.0),
    "np-int64": np.int64(2),
    "tensor": torch.tensor(2.0),
    "tensor-float32": torch.tensor(2.0, dtype=torch.float32),
    "tensor-int": torch.tensor(2),
}


@pytest.mark.parametrize("name", VARIANCES)
def test_every_real_scalar_is_a_prior_variance_everywhere(name, gen):
    # NumPy's float32 and integers, and tensors, were refused by prior_kl, nelbo,
    # GaussianPrior or ScaleMixturePrior, and accepted by kl_divergence.
    var = VARIANCES[name]
    net, q = _posterior()
    expected = _closed_kl(q, 2.0)
    assert not torch.allclose(expected, _closed_kl(q, 1.0))  # the variance matters

    assert torch.allclose(prior_kl(q, var), expected, rtol=1e-12)
    assert torch.allclose(bf.kl_divergence(q, prior_var=var), expected, rtol=1e-12)
    assert torch.allclose(GaussianPrior(0.0, var).kl(q), expected, rtol=1e-12)
    assert torch.allclose(GaussianPrior(0.0, {k: var for k in q.mean}).kl(q), expected)
    # nelbo: the same draws with the prior N(0, I) give the data term; the KL term is KL/N.
    x = torch.randn(8, 3)
    loss = bf.nelbo(net, q, x, fn=_LL, num_data=10, prior=var, generator=gen(1))
    standard = bf.nelbo(net, q, x, fn=_LL, num_data=10, generator=gen(1))
    assert torch.allclose(loss - standard, (expected - _closed_kl(q, 1.0)) / 10, rtol=1e-10)
    # Monte Carlo, with the draws of the float variance's.
    mc = prior_kl(q, var, generator=gen(2), n=3)
    assert torch.allclose(mc, prior_kl(q, 2.0, generator=gen(2), n=3), rtol=1e-12)

    mixture = ScaleMixturePrior(var / 4, var, var / 8)  # pi = 0.5, the variances 2 and 0.25
    assert (mixture.pi, mixture.var1, mixture.var2) == (0.5, 2.0, 0.25)
    assert all(type(v) is float for v in (mixture.pi, mixture.var1, mixture.var2))


def test_a_learned_prior_variance_gets_its_gradient_from_prior_kl_and_nelbo(gen):
    # The closed-form derivative: d KL / d s^2 = 0.5 * sum(1 / s^2 - (sigma^2 + mu^2) / s^4).
    net, q = _posterior()
    expected = sum(
        0.5 * (1 / 2.0 - (sd.square() + m.square()) / 4.0).sum()
        for m, sd in zip(q.mean.values(), bf.std(q).values(), strict=True)
    ).detach()
    var = torch.tensor(2.0, requires_grad=True)
    prior_kl(q, var).backward()
    assert torch.allclose(var.grad, expected, rtol=1e-10)

    var.grad = None
    x = torch.randn(8, 3)
    bf.nelbo(net, q, x, fn=_LL, num_data=10, prior=var, generator=gen(1)).backward()
    assert torch.allclose(var.grad, expected / 10, rtol=1e-10)

    # The Monte Carlo KL takes its prior as a constant: no gradient, said so.
    with pytest.raises(ValueError, match=r"prior_kl: expected n=None \(the closed form\)"):
        prior_kl(q, var, n=2)


# Bools and complex numbers, of Python, NumPy or torch: refused by every function alike.
NOT_REAL = {
    "bool": True,
    "np-bool": np.bool_(True),
    "complex": 2.0 + 0j,
    "np-complex": np.complex64(2.0),
    "tensor-bool": torch.tensor(True),
    "tensor-complex": torch.tensor(2.0 + 0j),
}


@pytest.mark.parametrize("name", NOT_REAL)
def test_bools_and_complex_numbers_are_no_prior_variance_anywhere(name):
    var = NOT_REAL[name]
    net, q = _posterior()
    x = torch.randn(8, 3)
    for where, call in (
        ("prior_kl", lambda: prior_kl(q, var)),
        ("prior_kl", lambda: prior_kl(q, var, n=2)),
        ("nelbo", lambda: bf.nelbo(net, q, x, fn=_LL, num_data=10, prior=var)),
        ("kl_divergence", lambda: bf.kl_divergence(q, prior_var=var)),
        ("GaussianPrior", lambda: GaussianPrior(0.0, var)),
        ("ScaleMixturePrior", lambda: ScaleMixturePrior(0.5, var, 1.0)),
        ("ScaleMixturePrior", lambda: ScaleMixturePrior(var, 1.0, 1.0)),
    ):
        with pytest.raises(TypeError, match=rf"{where}: expected"):
            call()
