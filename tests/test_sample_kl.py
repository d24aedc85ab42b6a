r"""Sampling and the closed-form KL divergence (one fused pass per group of tensors)
against the plain torch formulas: values, gradients, generator semantics, refusals."""

import copy
import gc
import math
import weakref

import pytest
import torch
import torch.nn as nn
import zuko

import bayesflow as bf

from bayesflow import _numerics, _sampling
from bayesflow.priors import GaussianPrior, ScaleMixturePrior, prior_kl, sample_and_kl

from .registry import snapshot

SHAPES = {"w": (3, 4), "b": (4,), "s": (), "c": (2, 1, 3)}


@pytest.fixture(autouse=True)
def _float64():
    r"""The oracle is float64 whatever `--dtype` says; other dtypes are tested by name."""

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def posterior(shapes=SHAPES, dtype=None, scale=6.0, seed=0):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)

    def draw(shape):
        return torch.randn(shape, generator=g, dtype=dtype)

    return bf.Posterior(
        mean={k: draw(s).requires_grad_() for k, s in shapes.items()},
        logvar={k: (scale * draw(s) - 2.0).requires_grad_() for k, s in shapes.items()},
    )


def leaves(q):
    return [*q.mean.values(), *q.logvar.values()]


def softclip(x):
    return x / torch.sqrt(1 + (x / 18) ** 2)


def formulas(q, eps, prior_mean=None, prior_var=1.0):
    r"""The samples and KL, one tensor at a time, in plain torch: the oracle."""

    n, params, kl, offset = eps.shape[0], {}, 0.0, 0
    for name, m in q.mean.items():
        lv = softclip(q.logvar[name])
        e = eps[:, offset : offset + m.numel()].reshape(n, *m.shape)
        params[name] = m + torch.exp(lv / 2) * e
        offset += m.numel()
        m0 = 0.0 if prior_mean is None else prior_mean[name]
        s2 = prior_var[name] if isinstance(prior_var, dict) else prior_var
        s2 = torch.as_tensor(s2, dtype=lv.dtype)
        kl = kl + (0.5 * ((lv.exp() + (m - m0) ** 2) / s2 + s2.log() - lv - 1)).sum()
    return params, kl


def draw(q, n, seed, dtype=None):
    size = sum(m.numel() for m in q.mean.values())
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    return torch.randn(n, size, generator=g, dtype=dtype)


def loss_of(params, kl, weights, beta=0.7):
    return sum((params[k] * weights[k]).sum() for k in params) + beta * kl


def flat_formula(q, eps):
    r"""What sample computed before its passes were fused: flat copies of the means and
    log-variances, std, one addcmul; split by name."""

    names = list(q.mean)
    m = torch.cat([q.mean[k].detach().flatten() for k in names])
    lv = torch.cat([q.logvar[k].detach().flatten() for k in names])
    r = torch.addcmul(torch.ones((), dtype=lv.dtype), lv, lv, value=1 / 18**2).rsqrt()
    theta = torch.addcmul(m, r.mul(lv).mul(0.5).exp(), eps)
    pieces = theta.split([q.mean[k].numel() for k in names], 1)
    return {k: t.reshape(-1, *q.mean[k].shape) for k, t in zip(names, pieces, strict=True)}


@pytest.mark.parametrize("n", [1, 3])
def test_sample_is_the_formula_bit_for_bit(gen, n):
    q = posterior(scale=20.0)
    expected = flat_formula(q, draw(q, n, 5))

    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            params = bf.sample(q, n, generator=gen(5))
        assert list(params) == list(SHAPES)
        for k, e in expected.items():
            assert params[k].shape == (n, *SHAPES[k])
            assert torch.equal(params[k], e)
            assert params[k].requires_grad == grad


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("prior", ["none", "var", "gaussian", "per-element"])
def test_values_and_gradients_match_the_formulas(gen, n, prior):
    q = posterior()
    pm, pv = None, 1.0
    if prior == "var":
        pv = 2.5
    elif prior == "gaussian":
        pm, pv = dict.fromkeys(SHAPES, 0.3), 0.5
    elif prior == "per-element":
        pm = {k: 0.1 * torch.randn(s) for k, s in SHAPES.items()}
        pv = {k: torch.rand(s) + 0.5 for k, s in SHAPES.items()}
        pv["b"] = torch.tensor(2.0)  # broadcast
    p = None if prior == "none" else pv if prior == "var" else GaussianPrior(pm or 0.0, pv)

    params, kl = sample_and_kl("test", q, n, gen(3), p)
    expected, expected_kl = formulas(q, draw(q, n, 3), pm, pv)

    assert kl.shape == () and torch.allclose(kl, expected_kl, rtol=1e-12)
    assert torch.allclose(kl, prior_kl(q, p), rtol=1e-12)
    for k in SHAPES:
        assert torch.allclose(params[k], expected[k], rtol=1e-13, atol=1e-15)

    weights = {k: torch.randn(n, *s) for k, s in SHAPES.items()}
    for beta in (0.0, 0.7):  # the samples alone, and with the KL
        grads = torch.autograd.grad(
            loss_of(params, kl, weights, beta), leaves(q), retain_graph=True
        )
        oracle = torch.autograd.grad(
            loss_of(expected, expected_kl, weights, beta), leaves(q), retain_graph=True
        )
        for a, b in zip(grads, oracle, strict=True):
            assert torch.allclose(a, b, rtol=1e-11, atol=1e-13)

    # the KL alone
    grads = torch.autograd.grad(kl, leaves(q))
    oracle = torch.autograd.grad(expected_kl, leaves(q))
    assert all(
        torch.allclose(a, b, rtol=1e-11, atol=1e-13) for a, b in zip(grads, oracle, strict=True)
    )


def test_gradients_when_some_samples_are_unused(gen):
    q = posterior()
    params, kl = sample_and_kl("test", q, 2, gen(1), None)
    expected, expected_kl = formulas(q, draw(q, 2, 1))

    loss = params["w"].sum() + params["c"].square().sum() + kl
    oracle = expected["w"].sum() + expected["c"].square().sum() + expected_kl
    grads = torch.autograd.grad(loss, leaves(q))
    for a, b in zip(grads, torch.autograd.grad(oracle, leaves(q)), strict=True):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-13)


def test_gradcheck(gen):
    shapes = {"w": (2, 3), "b": (3,)}
    q = posterior(shapes, scale=3.0)

    def f(*tensors):
        mean, logvar = tensors[:2], tensors[2:]
        p = bf.Posterior(
            dict(zip(shapes, mean, strict=True)), dict(zip(shapes, logvar, strict=True))
        )
        params, kl = sample_and_kl("test", p, 2, gen(0), 1.5)
        return (*params.values(), kl)

    assert torch.autograd.gradcheck(f, leaves(q))
    assert torch.autograd.gradgradcheck(f, leaves(q))  # create_graph: the plain formulas


def test_single_tensor_posterior(gen):
    q = posterior({"w": (5, 2)})
    params, kl = sample_and_kl("test", q, 4, gen(2), None)
    expected, expected_kl = formulas(q, draw(q, 4, 2))
    assert torch.allclose(params["w"], expected["w"], rtol=1e-13)
    assert torch.allclose(kl, expected_kl, rtol=1e-12)
    weights = {"w": torch.randn(4, 5, 2)}
    grads = torch.autograd.grad(loss_of(params, kl, weights), leaves(q))
    oracle = torch.autograd.grad(loss_of(expected, expected_kl, weights), leaves(q))
    assert all(torch.allclose(a, b, rtol=1e-11) for a, b in zip(grads, oracle, strict=True))


@pytest.mark.parametrize("n", [1, 3])
def test_float32(gen, n):
    q = posterior(dtype=torch.float32)
    q64 = bf.Posterior(
        {k: v.detach().double().requires_grad_() for k, v in q.mean.items()},
        {k: v.detach().double().requires_grad_() for k, v in q.logvar.items()},
    )
    params, kl = sample_and_kl("test", q, n, gen(4), 2.0)
    expected, expected_kl = formulas(q64, draw(q, n, 4, torch.float32).double(), None, 2.0)

    assert kl.dtype == torch.float32
    assert abs(kl.item() - expected_kl.item()) < 1e-6 * abs(expected_kl.item())
    for k in SHAPES:
        assert params[k].dtype == torch.float32
        assert torch.allclose(params[k].double(), expected[k], rtol=1e-5, atol=1e-6)

    weights = {k: torch.randn(n, *s, dtype=torch.float64) for k, s in SHAPES.items()}
    grads = torch.autograd.grad(
        loss_of(params, kl, {k: w.float() for k, w in weights.items()}), leaves(q)
    )
    oracle = torch.autograd.grad(loss_of(expected, expected_kl, weights), leaves(q64))
    for a, b in zip(grads, oracle, strict=True):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-5)


def test_half_precision_kl_is_summed_in_float32(gen):
    q = posterior({"w": (300, 100), "b": (100,)}, dtype=torch.float16, scale=1.0)
    q64 = bf.Posterior(
        {k: v.detach().double() for k, v in q.mean.items()},
        {k: v.detach().double() for k, v in q.logvar.items()},
    )
    params, kl = sample_and_kl("test", q, 2, gen(0), None)
    expected = bf.kl_divergence(q64)

    assert kl.dtype == torch.float32 and bf.kl_divergence(q).dtype == torch.float32
    assert abs(kl.item() - expected.item()) < 1e-3 * expected.item()
    assert params["w"].dtype == torch.float16
    # the samples are those of the half-precision formula
    expected = flat_formula(q, draw(q, 2, 0, torch.float16))
    assert all(torch.equal(params[k], expected[k]) for k in params)
    kl.backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves(q))


@pytest.mark.parametrize("n", [1, 3])
def test_half_precision_gradients_of_large_sample_gradients_are_finite(gen, n):
    # The fused backward formed 4 g eps in float16 before sigma and r^3 scaled it down:
    # gradients of the samples of 1.5e4 gave infinite log-variance gradients where they
    # are a few thousand. Oracle: the formulas in float64 on the same values and noise.
    q = posterior({"w": (8, 5), "b": (5,)}, dtype=torch.float16, scale=0.5)
    q64 = bf.Posterior(
        {k: v.detach().double().requires_grad_() for k, v in q.mean.items()},
        {k: v.detach().double().requires_grad_() for k, v in q.logvar.items()},
    )
    params, _ = sample_and_kl("test", q, n, gen(5), None)
    expected, _ = formulas(q64, draw(q, n, 5, torch.float16).double())
    weights = {k: 1.5e4 * torch.randn(n, *v.shape).sign() for k, v in q.mean.items()}
    grads = torch.autograd.grad(
        loss_of(params, 0.0, {k: w.half() for k, w in weights.items()}, 0.0), leaves(q)
    )
    oracle = torch.autograd.grad(loss_of(expected, 0.0, weights, 0.0), leaves(q64))
    for a, b in zip(grads, oracle, strict=True):
        assert torch.isfinite(a).all()
        assert torch.allclose(a.double(), b, rtol=4e-3, atol=1e-3 * b.abs().max().item())
    assert max(b.abs().max().item() for b in oracle[len(q.mean) :]) > 1e3  # large, in range


def test_groups_of_dtypes_draw_in_order(gen):
    q = bf.Posterior(
        {"a": torch.randn(3, requires_grad=True), "b": torch.randn(2, dtype=torch.float32)},
        {"a": torch.randn(3, requires_grad=True), "b": torch.randn(2, dtype=torch.float32)},
    )
    params, kl = sample_and_kl("test", q, 2, gen(9), 3.0)

    g = gen(9)
    e64 = torch.randn(2, 3, generator=g)
    e32 = torch.randn(2, 2, generator=g, dtype=torch.float32)
    assert torch.allclose(params["a"], q.mean["a"] + bf.std(q)["a"] * e64, rtol=1e-14)
    assert torch.allclose(params["b"], q.mean["b"] + bf.std(q)["b"] * e32, rtol=1e-6)
    assert params["b"].dtype == torch.float32 and not params["b"].requires_grad
    assert kl.dtype == torch.float64
    assert torch.allclose(kl, formulas(q, torch.cat([e64, e32.double()], 1), None, 3.0)[1])


def test_generator_semantics(gen):
    q = posterior()
    a, b, c = gen(7), gen(7), gen(8)
    pa, pb, pc = bf.sample(q, 3, a), bf.sample(q, 3, b), bf.sample(q, 3, c)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not any(torch.equal(pa[k], pc[k]) for k in pa)

    # one draw of n x P numbers: the generator ends where such a draw leaves it
    g = gen(7)
    draw(q, 3, 0)  # another generator: no effect on g
    torch.randn(3, sum(m.numel() for m in q.mean.values()), generator=g)
    assert torch.equal(torch.randn(5, generator=a), torch.randn(5, generator=g))

    # sample_and_kl and nelbo draw the same numbers as sample
    params, _ = sample_and_kl("test", q, 3, gen(7), None)
    assert all(torch.equal(params[k], pa[k]) for k in pa)


def test_samples_can_be_written_in_place(gen):
    # a module may write to its weights in place (Embedding(max_norm) renormalizes rows):
    # the backward pass must still work and give the formula's gradients
    q = posterior()
    params, kl = sample_and_kl("test", q, 1, gen(0), None)
    expected, expected_kl = formulas(q, draw(q, 1, 0))

    for p in (params, expected):
        with torch.no_grad():
            p["w"].mul_(0.5)
        p["b"].mul_(3.0).add_(p["s"].square().unsqueeze(-1))
    loss = (params["w"] * params["b"]).sum() + params["c"].sum() + kl
    oracle = (expected["w"] * expected["b"]).sum() + expected["c"].sum() + expected_kl
    grads = torch.autograd.grad(loss, leaves(q))
    for a, b in zip(grads, torch.autograd.grad(oracle, leaves(q)), strict=True):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-13)


def test_embedding_with_max_norm_trains(gen):
    emb = nn.Embedding(6, 3, max_norm=1.0)
    q = bf.init(emb, init_logvar=-4.0)
    x = torch.tensor([0, 2, 2, 5])
    loss = bf.nelbo(emb, q, x, fn=lambda m, x: m(x).sum(-1), num_data=10, n=1, generator=gen(0))
    loss.backward()
    assert torch.isfinite(q.mean["weight"].grad).all() and q.logvar["weight"].grad.abs().sum() > 0


def test_under_torch_func_grad(gen):
    q = posterior({"w": (3,)})

    def f(m):
        p = bf.Posterior({"w": m}, {"w": q.logvar["w"].detach()})
        return bf.sample(p, 2, generator=gen(0))["w"].square().sum() + bf.kl_divergence(p)

    grad = torch.func.grad(f)(q.mean["w"].detach())
    m = q.mean["w"].detach().requires_grad_()
    expected = torch.autograd.grad(f(m), m)[0]
    assert torch.allclose(grad, expected, rtol=1e-12)


# torch's forward mode loads its decompositions through torch.jit.script on first use.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_learned_prior_variance_gets_its_gradient(gen):
    # kl_divergence(q, prior_var) with a tensor that requires grad (empirical Bayes) must
    # give it the closed form's gradient, log term included; it was detached silently.
    bnet = bf.BayesianModel(nn.Linear(3, 2), init_logvar=-2.0)
    for q, kl_of in (
        (posterior(), lambda q, s: bf.kl_divergence(q, prior_var=s)),
        (bnet.posterior, lambda q, s: bnet.kl_divergence(s)),
    ):
        s, s_ref = torch.tensor(2.5, requires_grad=True), torch.tensor(2.5, requires_grad=True)
        kl = kl_of(q, s)
        size = sum(m.numel() for m in q.mean.values())
        expected = formulas(q, torch.zeros(1, size), None, s_ref)[1]
        assert torch.allclose(kl, expected, rtol=1e-12)
        (g,) = torch.autograd.grad(kl, s, retain_graph=True)
        (g_ref,) = torch.autograd.grad(expected, s_ref)
        assert g.abs() > 1e-3 and torch.allclose(g, g_ref, rtol=1e-12)
        # the posterior's gradients are those with a float prior variance of the same value
        got = torch.autograd.grad(kl, leaves(q))
        want = torch.autograd.grad(bf.kl_divergence(q, prior_var=2.5), leaves(q))
        assert all(torch.allclose(a, b, rtol=1e-12) for a, b in zip(got, want, strict=True))

    # through torch.func.grad and forward-mode AD as well
    kl_of_s = lambda s: bf.kl_divergence(q, prior_var=s)
    assert torch.allclose(torch.func.grad(kl_of_s)(torch.tensor(2.5)), g_ref, rtol=1e-12)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(torch.tensor(2.5), torch.tensor(1.0))
        tangent = torch.autograd.forward_ad.unpack_dual(kl_of_s(dual)).tangent
    assert torch.allclose(tangent, g_ref, rtol=1e-12)
    # a tensor without a gradient is a number, as before; its value is checked either way
    assert torch.allclose(kl_of_s(torch.tensor(2.5)), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="kl_divergence: expected a finite prior_var > 0"):
        kl_of_s(torch.tensor(-1.0, requires_grad=True))


def test_std_and_logvars_at_the_ends():
    # the soft clip keeps sigma^2 within [e^-18, e^18] for every log-variance, infinite
    # ones included, and where (logvar / 18)^2 overflows
    for dtype, big in ((torch.float64, 1e200), (torch.float32, 1e30), (torch.float16, 6e4)):
        lv = torch.tensor([math.inf, -math.inf, big, -big, 0.0], dtype=dtype)
        sigma = bf.std(bf.Posterior({"x": torch.zeros(5, dtype=dtype)}, {"x": lv}))["x"]
        e = torch.tensor([9.0, -9.0, 9.0, -9.0, 0.0], dtype=torch.float64).exp()
        assert torch.allclose(sigma.double(), e, rtol=2e-3), dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_huge_logvars_are_clipped_not_overflowed(gen, dtype):
    big = 1e200 if dtype == torch.float64 else 1e30
    q = posterior({"w": (2, 3)}, dtype=dtype)
    with torch.no_grad():
        q.logvar["w"][0, 0] = big
        q.logvar["w"][1, 2] = -big
    params, kl = sample_and_kl("test", q, 2, gen(0), None)
    eps = draw(q, 2, 0, dtype).view(2, 2, 3)
    sigma = (softclip(q.logvar["w"].detach().double().clamp(-1e100, 1e100)) / 2).exp()

    assert torch.allclose(sigma[0, 0], torch.tensor(math.exp(9.0)))
    theta = q.mean["w"].detach().double() + sigma * eps.double()
    assert torch.allclose(params["w"].double(), theta, rtol=1e-5)
    lv = softclip(q.logvar["w"].detach().double().clamp(-1e100, 1e100))
    expected = 0.5 * (lv.exp() + q.mean["w"].detach().double() ** 2 - lv - 1).sum()
    assert torch.allclose(kl.double(), expected, rtol=1e-6)


NONFINITE = [
    ("mean", math.nan),
    ("mean", math.inf),
    ("logvar", math.nan),
    ("logvar", math.inf),
    ("logvar", -math.inf),
]


def calls(module, q, g):
    x = torch.randn(4, 3)
    ll = lambda m, x: m(x).sum(-1)
    mixture = ScaleMixturePrior(0.5, 1.0, 0.01)
    return {
        "sample": lambda: bf.sample(q, 2, generator=g),
        "kl_divergence": lambda: bf.kl_divergence(q, 2.0),
        "nelbo": lambda: bf.nelbo(module, q, x, fn=ll, num_data=10, n=1, generator=g),
        "loop_nelbo": lambda: bf.loop_nelbo(module, q, x, fn=ll, num_data=10, n=3, generator=g),
        "local_nelbo": lambda: bf.local_nelbo(module, q, x, fn=ll, num_data=10, n=2, generator=g),
        "flipout_nelbo": lambda: bf.flipout_nelbo(
            module, q, x, fn=ll, num_data=10, n=2, generator=g, prior=GaussianPrior(0.0, 2.0)
        ),
        # A prior with no closed form: no KL checks the values before the call does.
        "local_nelbo-mixture": lambda: bf.local_nelbo(
            module, q, x, fn=ll, num_data=10, n=2, generator=g, prior=mixture
        ),
        "flipout_nelbo-mixture": lambda: bf.flipout_nelbo(
            module, q, x, fn=ll, num_data=10, n=2, generator=g, prior=mixture
        ),
        "local_call": lambda: bf.local_call(module, q, 2, x, generator=g),
        "vmap_call-of-sample": lambda: bf.vmap_call(module, bf.sample(q, 2, generator=g), x),
        "prior_kl": lambda: prior_kl(q, GaussianPrior(0.1, 2.0)),
        "GaussianPrior.kl": lambda: GaussianPrior(0.1, 2.0).kl(q),
    }


@pytest.mark.parametrize("field, value", NONFINITE)
@pytest.mark.parametrize("name", list(calls(None, None, None)))
def test_nonfinite_posteriors_are_refused(gen, field, value, name):
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    q = bf.init(module, init_logvar=-3.0)
    with torch.no_grad():
        getattr(q, field)["2.weight"][1, 3] = value
    g = gen(0)
    before = snapshot(module, q.mean, q.logvar)

    call = calls(module, q, g)[name]
    where = {"prior_kl": "GaussianPrior.kl", "vmap_call-of-sample": "sample"}.get(name, name)
    where = where.removesuffix("-mixture")
    pattern = rf"{where}: expected finite values in posterior.{field}\['2.weight'\], got"
    with pytest.raises(ValueError, match=pattern):
        call()

    after = snapshot(module, q.mean, q.logvar)  # BatchNorm's statistics too
    assert all(
        torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
        for a, b in zip(before, after, strict=True)
    )
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=gen(0)))  # no draw


def test_bridge_refuses_nonfinite_posteriors():
    bnet = bf.BayesianModel(zuko.nn.MLP(3, 2, hidden_features=(4,)), init_logvar=-3.0)
    with torch.no_grad():
        bnet.logvars["0-bias"][0] = math.nan
    for call, where in (
        (lambda: bnet(torch.randn(2, 3)), "BayesianModel.forward"),
        (lambda: bnet.sample_params(), "BayesianModel.sample_params"),
        (lambda: bnet.kl_divergence(), "BayesianModel.kl_divergence"),
    ):
        with pytest.raises(ValueError, match=rf"{where}: expected finite values in posterior"):
            call()


def test_structure_is_cached_by_names_and_layout(gen):
    q = posterior()
    bf.sample(q, 1, generator=gen(0))

    # a tensor replaced under the same name, with a new shape: the new one is sampled
    q.mean["w"] = torch.randn(5, 2)
    q.logvar["w"] = torch.full((5, 2), -3.0)
    params = bf.sample(q, 2, generator=gen(0))
    assert params["w"].shape == (2, 5, 2)
    assert torch.allclose(params["w"], formulas(q, draw(q, 2, 0))[0]["w"])

    # renamed: the new names
    q2 = bf.Posterior(
        {"z" + k: v for k, v in q.mean.items()}, {"z" + k: v for k, v in q.logvar.items()}
    )
    assert list(bf.sample(q2, 1, generator=gen(0))) == ["z" + k for k in q.mean]

    # the cache keeps no posterior alive, and is bounded
    ref = weakref.ref(q.mean["w"])
    del q, q2, params
    gc.collect()
    assert ref() is None
    for i in range(3 * _sampling._MAX_PLANS):
        bf.sample(posterior({f"x{i}": (2,)}), 1)
    assert len(_sampling._PLANS) == _sampling._MAX_PLANS
    # the same names over other layouts: a few plans each, the last used first
    for i in range(3 * _sampling._MAX_LAYOUTS):
        bf.sample(posterior({"y": (i + 1,)}), 1)
    assert len(_sampling._PLANS[("y",)]) == _sampling._MAX_LAYOUTS


def test_sampled_tensors_can_be_swapped_and_converted_afterwards(gen):
    # The structure cache held weak references to the posterior's tensors, which
    # torch.utils.swap_tensors refuses: under torch's swap-on-conversion mode, a
    # BayesianModel could not be converted or load a state dict once it had sampled
    # ("Cannot swap t1 because it has weakref associated with it").
    q = posterior()
    bf.sample(q, 1, generator=gen(0))
    other = torch.zeros_like(q.mean["w"])
    torch.utils.swap_tensors(q.mean["w"], other)
    assert torch.equal(q.mean["w"], torch.zeros_like(other))

    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        torch.manual_seed(0)
        bnet = bf.BayesianModel(nn.Linear(3, 2).float())
        fresh = copy.deepcopy(bnet).double()  # converted before any call
        state = copy.deepcopy(bnet.state_dict())
        bnet(torch.randn(4, 3, dtype=torch.float32), n=2)
        bnet.kl_divergence()
        bnet.double()
        bnet.load_state_dict({k: v.double() for k, v in state.items()})
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    x = torch.randn(4, 3, dtype=torch.float64)
    a = bnet(x, n=3, generator=gen(1))
    b = fresh(x, n=3, generator=gen(1))
    assert a.dtype == torch.float64 and torch.equal(a, b) and not torch.allclose(a[0], a[1])
    assert torch.equal(bnet.kl_divergence(), fresh.kl_divergence())


def test_posterior_tensors_must_be_real_and_agree():
    ints = bf.Posterior(
        {"w": torch.zeros(3, dtype=torch.long)}, {"w": torch.zeros(3, dtype=torch.long)}
    )
    with pytest.raises(
        TypeError,
        match=r"sample: expected real floating-point posterior tensors, got posterior.mean\['w'\] of dtype torch.int64",
    ):
        bf.sample(ints, 1)

    mixed = bf.Posterior(
        {"w": torch.zeros(3, dtype=torch.float64)}, {"w": torch.zeros(3, dtype=torch.float32)}
    )
    with pytest.raises(
        ValueError,
        match=r"kl_divergence: expected posterior.logvar\['w'\] with the dtype and device of its mean",
    ):
        bf.kl_divergence(mixed)


# torch's forward mode loads its decompositions through torch.jit.script on first use.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("shapes", [SHAPES, {"w": (2, 3)}], ids=["tensors", "one-tensor"])
def test_batched_and_forward_mode_gradients(gen, shapes):
    # Gradients that autograd batches (`is_grads_batched`, vectorized Jacobians: the
    # backward runs under autograd's vmap) and forward mode (dual tensors), against the
    # plain formulas on the same noise.
    from torch.autograd import forward_ad

    def flat(params, kl):
        return torch.cat([*(p.reshape(-1) for p in params.values()), kl.reshape(1)])

    q = posterior(shapes)
    out = flat(*sample_and_kl("test", q, 2, gen(0), 0.5))
    expected = flat(*formulas(q, draw(q, 2, 0), None, 0.5))
    assert torch.allclose(out, expected, rtol=1e-12)

    v = torch.randn(3, out.numel())
    found = torch.autograd.grad(out, leaves(q), v, is_grads_batched=True)
    wanted = torch.autograd.grad(expected, leaves(q), v, is_grads_batched=True, retain_graph=True)
    for a, b in zip(found, wanted, strict=True):
        assert torch.allclose(a, b, rtol=1e-12)
    one = torch.autograd.grad(expected, leaves(q), v[1], retain_graph=True)
    assert all(torch.allclose(a[1], b, rtol=1e-12) for a, b in zip(found, one, strict=True))

    with forward_ad.dual_level():
        dual = bf.Posterior(
            *({k: forward_ad.make_dual(t, torch.randn_like(t)) for k, t in d.items()} for d in q)
        )
        out = forward_ad.unpack_dual(flat(*sample_and_kl("test", dual, 2, gen(0), 0.5)))
        expected = forward_ad.unpack_dual(flat(*formulas(dual, draw(q, 2, 0), None, 0.5)))
    assert torch.allclose(out.primal, expected.primal, rtol=1e-12)
    assert torch.allclose(out.tangent, expected.tangent, rtol=1e-12)
    assert out.tangent.abs().min() > 0


def test_an_open_forward_mode_level_of_others_changes_nothing(gen, monkeypatch):
    # The level of forward-mode AD is the process's: while one thread held one open, the
    # calls of every other thread took the plain path, whose numbers differ in the last
    # bits (threads gave other numbers than alone). Tensors that are not dual take the
    # fused path, whatever level is open.
    from torch.autograd import forward_ad

    fused = []
    real = _numerics.SampleKL.forward
    spy = staticmethod(lambda *a: fused.append(1) or real(*a))
    monkeypatch.setattr(_numerics.SampleKL, "forward", spy)

    def run():
        q = posterior()
        params, kl = sample_and_kl("test", q, 2, gen(0), 0.5)
        loss = sum(p.sin().sum() for p in params.values()) + kl
        return [loss.detach(), *torch.autograd.grad(loss, leaves(q))]

    alone = run()
    with forward_ad.dual_level():
        within = run()
    assert len(fused) == 2
    assert all(torch.equal(a, b) for a, b in zip(alone, within, strict=True))


@pytest.mark.parametrize("shapes", [SHAPES, {"w": (2, 3)}], ids=["tensors", "one-tensor"])
def test_gradients_of_gradients(gen, shapes):
    # create_graph=True with gradients that are themselves differentiable
    q = posterior(shapes)
    params, kl = sample_and_kl("test", q, 2, gen(0), 0.5)
    expected, expected_kl = formulas(q, draw(q, 2, 0), None, 0.5)
    w = {k: torch.randn(2, *s, requires_grad=True) for k, s in shapes.items()}

    def second(params, kl):
        g = torch.autograd.grad(
            [*params.values(), kl], leaves(q), [*w.values(), torch.tensor(0.3)], create_graph=True
        )
        return torch.autograd.grad(sum((x * x).sum() for x in g), [*w.values(), *leaves(q)])

    for a, b in zip(second(params, kl), second(expected, expected_kl), strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("power", [1, 2], ids=["std", "var"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spread_is_the_formulas_as_one_node(power, dtype):
    # The variances and standard deviations the local trick and Flipout read: the values
    # of var and std bit for bit, their gradients by autograd through those formulas,
    # zero beyond the clamp, for ordinary, tiny, huge and infinite log-variances.
    big = 1e200 if dtype == torch.float64 else 1e30
    g = torch.Generator().manual_seed(0)
    lv = torch.cat(
        [
            torch.randn(50, generator=g, dtype=dtype) * 10,
            torch.tensor([0.0, 17.9, -17.9, 40.0, big, -big, math.inf, -math.inf], dtype=dtype),
        ]
    )
    plain = _numerics.var if power == 2 else _numerics.std
    upstream = torch.randn(lv.shape, generator=g, dtype=dtype)

    a = lv.clone().requires_grad_()
    y = _numerics.spread(a, power)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "SpreadBackward"
    (ga,) = torch.autograd.grad(y, a, upstream)

    b = lv.clone().requires_grad_()
    z = plain(b)
    (gb,) = torch.autograd.grad(z, b, upstream)

    assert torch.equal(y.detach(), z.detach())
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(ga, gb, rtol=rtol, atol=0.0)
    assert torch.equal(ga[-4:], torch.zeros(4, dtype=dtype))  # beyond reach: the clamp's 0
    assert ga[:50].abs().min() > 0  # and not zero where the clamp does not hold


@pytest.mark.parametrize("power", [1, 2], ids=["std", "var"])
def test_spread_in_half_precision_has_the_clamps_zero_gradient_beyond_reach(power):
    # float16's reach is about 1152: beyond, the derivative's factor (about (b / c)^3 =
    # 4e-6) does not underflow in float16 as it does in every wider dtype, yet the clamp
    # of the formulas holds the value there, so the gradient is 0.
    dtype = torch.float16
    c = _numerics.reach(dtype)
    lv = torch.tensor(
        [-3.0, 0.5, 1.0, 8.0, c + 50, 5000.0, 60000.0, -5000.0, math.inf], dtype=dtype
    )
    plain = _numerics.var if power == 2 else _numerics.std
    a, b = lv.clone().requires_grad_(), lv.clone().requires_grad_()
    y, z = _numerics.spread(a, power), plain(b)
    (ga,) = torch.autograd.grad(y.sum(), a)
    (gb,) = torch.autograd.grad(z.sum(), b)

    assert torch.equal(y.detach(), z.detach())
    assert torch.equal(ga[4:], torch.zeros(5, dtype=dtype))
    assert torch.equal(gb[4:], torch.zeros(5, dtype=dtype))
    assert ga[:4].abs().min() > 0
    assert torch.allclose(ga[:4].double(), gb[:4].double(), rtol=1e-2, atol=0.0)


# torch's forward mode loads its decompositions through torch.jit.script on first use.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("power", [1, 2], ids=["std", "var"])
def test_spread_gradcheck_and_gradients_of_gradients(power):
    lv = (torch.randn(6, generator=torch.Generator().manual_seed(1)) * 5).requires_grad_()
    # Backward (batched too: autograd runs the backward under vmap), forward mode, and
    # the gradient of the gradient.
    torch.autograd.gradcheck(
        lambda t: _numerics.spread(t, power), (lv,), check_batched_grad=True, check_forward_ad=True
    )
    torch.autograd.gradgradcheck(lambda t: _numerics.spread(t, power), (lv,))

    w = torch.randn(6, dtype=lv.dtype)
    plain = _numerics.var if power == 2 else _numerics.std
    found = []
    for f in (lambda t: _numerics.spread(t, power), plain):
        (g,) = torch.autograd.grad((f(lv) * w).sum(), lv, create_graph=True)
        found.append(torch.autograd.grad(g.square().sum(), lv)[0])
    assert torch.allclose(*found, rtol=1e-12)


# Prior values against the dtype of the KL (float32 for a float32 or half-precision
# posterior): a variance below float32's least normal number gave torch's overflow error
# inside the fused node (forward or backward), NaN, or -inf under torch.func.grad.


def _cast(q, dtype):
    return bf.Posterior(
        {k: v.detach().to(dtype) for k, v in q.mean.items()},
        {k: v.detach().to(dtype) for k, v in q.logvar.items()},
    )


def _closed64(q, prior_var, prior_mean=0.0):
    r"""The closed form by hand, in float64, from the posterior's exact values."""

    kl = 0.0
    for name, m in q.mean.items():
        m, lv = m.detach().double(), softclip(q.logvar[name].detach().double())
        term = (lv.exp() + (m - prior_mean) ** 2) / prior_var + math.log(prior_var) - lv - 1
        kl += 0.5 * term.sum().item()
    return kl


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
def test_normal_range_is_where_torch_rounds(dtype):
    # The oracle: torch's own rounding of float64 numbers (float32 and float64 are the
    # dtypes of a KL; torch rounds float64 to half precision through float32, twice).
    lo, hi = _numerics.normal_range(dtype)
    info = torch.finfo(dtype)
    to = lambda x: torch.tensor(x, dtype=torch.float64).to(dtype).item()
    assert to(lo) >= info.tiny
    assert (math.isinf(to(hi)) and math.isfinite(to(info.max))) or dtype == torch.float64
    if dtype in (torch.float32, torch.float64):
        assert to(math.nextafter(lo, 0.0)) < info.tiny
        assert math.isinf(hi) or math.isfinite(to(math.nextafter(hi, 0.0)))


_LL = lambda m, x: m(x).sum(-1)

# The call, and whom and what its message names.
TINY_VAR_CALLS = {
    "kl_divergence": (
        "kl_divergence: expected prior_var",
        lambda m, q, x, g, s: bf.kl_divergence(q, s),
    ),
    "kl_divergence-learned": (
        "kl_divergence: expected prior_var",
        lambda m, q, x, g, s: bf.kl_divergence(
            q, torch.tensor(s, dtype=torch.float64, requires_grad=True)
        ),
    ),
    "kl_divergence-func-grad": (
        "kl_divergence: expected prior_var",
        lambda m, q, x, g, s: torch.func.grad(
            lambda mean: bf.kl_divergence(bf.Posterior(mean, q.logvar), s)
        )({k: v.detach() for k, v in q.mean.items()}),
    ),
    "prior_kl": ("prior_kl: expected prior_var", lambda m, q, x, g, s: prior_kl(q, s)),
    "nelbo": (
        "nelbo: expected prior",
        lambda m, q, x, g, s: bf.nelbo(m, q, x, fn=_LL, num_data=10, prior=s, generator=g),
    ),
    "local_nelbo": (
        "local_nelbo: expected prior",
        lambda m, q, x, g, s: bf.local_nelbo(m, q, x, fn=_LL, num_data=10, prior=s, generator=g),
    ),
    "GaussianPrior.kl": (
        "GaussianPrior.kl: expected the prior var",
        lambda m, q, x, g, s: GaussianPrior(0.0, s).kl(q),
    ),
    "GaussianPrior.kl-tensor": (
        "GaussianPrior.kl: expected the prior var",
        lambda m, q, x, g, s: GaussianPrior(0.0, torch.tensor(s, dtype=torch.float64)).kl(q),
    ),
    "GaussianPrior.kl-dict": (
        "GaussianPrior.kl: expected the prior var of '2.weight'",
        lambda m, q, x, g, s: GaussianPrior(0.0, {**dict.fromkeys(q.mean, 1.0), "2.weight": s}).kl(
            q
        ),
    ),
    "nelbo-GaussianPrior": (
        "nelbo: expected the prior var",
        lambda m, q, x, g, s: bf.nelbo(
            m, q, x, fn=_LL, num_data=10, prior=GaussianPrior(0.0, s), generator=g
        ),
    ),
}


@pytest.mark.parametrize("s", [1e-50, 2.5e-39])  # 2.5e-39: a float32 subnormal
@pytest.mark.parametrize("name", TINY_VAR_CALLS)
def test_prior_variances_below_the_least_normal_number_of_the_kl_are_refused(gen, name, s):
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).float()
    q = bf.init(module, init_logvar=-3.0)
    x, g = torch.randn(4, 3, dtype=torch.float32), gen(0)
    before = snapshot(module, q.mean, q.logvar)

    message, call = TINY_VAR_CALLS[name]
    with pytest.raises(
        ValueError,
        match=rf"{message} to be a normal number in float32 \(>= 1.17549e-38: the KL is "
        rf"computed in float32\), got {s:g}",
    ):
        call(module, q, x, g, s)

    after = snapshot(module, q.mean, q.logvar)  # BatchNorm's statistics too
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=gen(0)))  # no draw


def test_prior_values_at_the_ends_of_the_dtype_of_the_kl():
    module = nn.Linear(3, 2)
    with torch.no_grad():
        module.weight.mul_(0.1)
        module.bias.mul_(0.1)
    q64 = bf.init(module, init_logvar=-3.0)
    q32 = _cast(q64, torch.float32)
    tiny = torch.finfo(torch.float32).tiny

    # At float32's least normal number, the fused node's forward and backward are finite
    # and those of the float64 closed form (its terms near 1e37, its gradients near 1e36).
    for s in (tiny, torch.tensor(tiny, dtype=torch.float32, requires_grad=True)):
        q = bf.Posterior(
            {k: v.clone().requires_grad_() for k, v in q32.mean.items()},
            {k: v.clone().requires_grad_() for k, v in q32.logvar.items()},
        )
        kl = bf.kl_divergence(q, s)
        grads = torch.autograd.grad(kl, leaves(q))
        q_ref = bf.Posterior(
            {k: v.double().requires_grad_() for k, v in q32.mean.items()},
            {k: v.double().requires_grad_() for k, v in q32.logvar.items()},
        )
        kl_ref = formulas(q_ref, torch.zeros(1, 8), None, tiny)[1]
        assert math.isclose(kl.item(), _closed64(q32, tiny), rel_tol=1e-5)
        assert math.isclose(kl_ref.item(), _closed64(q32, tiny), rel_tol=1e-12)
        for a, b in zip(grads, torch.autograd.grad(kl_ref, leaves(q_ref)), strict=True):
            assert torch.isfinite(a).all() and torch.allclose(a.double(), b, rtol=1e-5)

    # In float64, 1e-50 is a normal number: the KL is the closed form, 6e49 or so.
    for kl in (
        prior_kl(q64, 1e-50),
        bf.kl_divergence(q64, 1e-50),
        GaussianPrior(0.0, 1e-50).kl(q64),
    ):
        assert math.isclose(kl.item(), _closed64(q64, 1e-50), rel_tol=1e-12)
    with pytest.raises(
        ValueError, match=r"prior_kl: expected prior_var to be a normal number in float64"
    ):
        prior_kl(q64, 1e-310)

    # A mean that float32 rounds to infinity: the message says in which dtype.
    prior = GaussianPrior(mean=1e39)
    assert math.isclose(prior.kl(q64).item(), _closed64(q64, 1.0, 1e39), rel_tol=1e-12)
    for p, what in (
        (prior, "the prior mean"),
        (
            GaussianPrior(mean={"weight": 0.0, "bias": torch.tensor([0.0, -1e39])}),
            "the prior mean of 'bias'",
        ),
        (
            GaussianPrior(var={"weight": 1.0, "bias": torch.tensor([1.0, 1e39])}),
            "the prior var of 'bias'",
        ),
    ):
        with pytest.raises(
            ValueError,
            match=rf"GaussianPrior.kl: expected {what} to be finite in float32 \(.*: the KL "
            r"is computed in float32\), got -?1e\+39",
        ):
            p.kl(q32)
    # A float variance is used as a number, not rounded: 1e39 is as good as in float64.
    assert math.isclose(bf.kl_divergence(q32, 1e39).item(), _closed64(q32, 1e39), rel_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_the_kl_of_half_precision_takes_prior_variances_of_float32(dtype):
    q = _cast(bf.init(nn.Linear(3, 2), init_logvar=-3.0), dtype)
    for kl in (bf.kl_divergence(q, 1e-30), GaussianPrior(0.0, 1e-30).kl(q)):
        assert kl.dtype == torch.float32
        assert math.isclose(kl.item(), _closed64(q, 1e-30), rel_tol=1e-5)
    for call, where in (
        (lambda: bf.kl_divergence(q, 1e-40), "kl_divergence: expected prior_var"),
        (lambda: GaussianPrior(0.0, 1e-40).kl(q), "GaussianPrior.kl: expected the prior var"),
    ):
        with pytest.raises(ValueError, match=rf"{where} to be a normal number in float32"):
            call()


def test_vmap_over_a_batch_of_posteriors_matches_a_loop(gen):
    # Two tensors or more: torch's error ("no batching rule for flatten_dense_tensors").
    b = 3
    means = {"w": torch.randn(b, 3, 2), "b": torch.randn(b, 2)}
    logvars = {"w": torch.randn(b, 3, 2) - 2, "b": torch.randn(b, 2) - 2}
    one = lambda i: bf.Posterior(
        {k: v[i] for k, v in means.items()}, {k: v[i] for k, v in logvars.items()}
    )
    prior = GaussianPrior(
        mean={"w": 0.1 * torch.randn(3, 2), "b": 0.3}, var={"w": torch.rand(3, 2) + 0.5, "b": 2.0}
    )
    kls = {
        "kl_divergence": lambda q: bf.kl_divergence(q, 2.5),
        "prior_kl": lambda q: prior_kl(q, 2.5),
        "GaussianPrior.kl": lambda q: prior.kl(q),
    }
    for name, kl in kls.items():
        got = torch.func.vmap(lambda m, lv, kl=kl: kl(bf.Posterior(m, lv)))(means, logvars)
        want = torch.stack([kl(one(i)) for i in range(b)])
        assert torch.allclose(got, want, rtol=1e-12), name
        grads = torch.func.vmap(torch.func.grad(lambda m, lv, kl=kl: kl(bf.Posterior(m, lv))))(
            means, logvars
        )
        for i in range(b):
            q = bf.Posterior(
                {k: v.clone().requires_grad_() for k, v in one(i).mean.items()}, one(i).logvar
            )
            want = torch.autograd.grad(kl(q), list(q.mean.values()))
            for k, w in zip(q.mean, want, strict=True):
                assert torch.allclose(grads[k][i], w, rtol=1e-12), name

    # The samples: with randomness="same", one draw for all, those of a loop on the seed.
    draw_all = lambda randomness: torch.func.vmap(
        lambda m, lv: bf.sample(bf.Posterior(m, lv), 4, generator=gen(1)), randomness=randomness
    )
    got = draw_all("same")(means, logvars)
    for i in range(b):
        want = bf.sample(one(i), 4, generator=gen(1))
        assert all(torch.equal(got[k][i], want[k]) for k in want)
    # With "different", each posterior draws its own: equal posteriors, different samples.
    equal = ({k: v[:1].expand_as(v) for k, v in d.items()} for d in (means, logvars))
    got = draw_all("different")(*equal)
    assert got["w"].shape == (b, 4, 3, 2) and not torch.equal(got["w"][0], got["w"][1])

    # A batch of prior variances: used as they are (their values cannot be read under vmap).
    q, v = one(0), torch.tensor([0.5, 1.0, 2.5])
    got = torch.func.vmap(lambda s: bf.kl_divergence(q, s))(v)
    assert torch.allclose(got, torch.stack([bf.kl_divergence(q, s.item()) for s in v]), rtol=1e-12)
    got = torch.func.vmap(torch.func.grad(lambda s: bf.kl_divergence(q, s)))(v)
    want = [torch.func.grad(lambda s: bf.kl_divergence(q, s))(s) for s in v]
    assert torch.allclose(got, torch.stack(want), rtol=1e-12)
    for bad in (
        torch.ones(3, 2),
        torch.ones(3, dtype=torch.complex128),
        torch.ones(3, dtype=torch.bool),
    ):
        with pytest.raises(TypeError, match="kl_divergence: expected prior_var to be a number"):
            torch.func.vmap(lambda s: bf.kl_divergence(q, s))(bad)


def test_a_float32_kl_near_its_prior_against_float64():
    # Terms of about 1/2 that cancel, each off by a unit of rounding: a KL of 0.0025 over
    # 1e6 float32 numbers came out as -0.058 (fused) or 0.0 (plain), and a posterior with
    # its prior's variance gave -0.018 to 0.067. Oracle: the same formula in float64.
    f32, f64 = torch.float32, torch.float64
    n = 10**6
    for logvar, var in ((1e-4, 1.0), (math.log(3.0), 3.0), (math.log(0.5) + 1e-3, 0.5)):
        q = bf.Posterior(
            {"w": torch.zeros(n, dtype=f32)}, {"w": torch.full((n,), logvar, dtype=f32)}
        )
        exact = bf.kl_divergence(
            bf.Posterior({"w": q.mean["w"].to(f64)}, {"w": q.logvar["w"].to(f64)}), var
        ).item()
        learned = torch.tensor(var, dtype=f32, requires_grad=True)  # the plain path
        for name, kl in (
            ("fused", bf.kl_divergence(q, var)),
            ("plain", bf.kl_divergence(q, learned)),
            ("GaussianPrior", GaussianPrior(0.0, var).kl(q)),
        ):
            assert kl.item() >= 0, name
            assert abs(kl.item() - exact) <= 1e-3 * exact + 1e-6, (name, kl.item(), exact)
