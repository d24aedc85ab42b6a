r"""Tests for bayesflow.predictive: oracles are torch.quantile, loops and direct formulas."""

import math

import pytest
import torch
import torch.nn as nn
import zuko

import bayesflow as bf

from .pages import run_page


def _tol(x: torch.Tensor) -> float:
    return 1e-12 if x.dtype == torch.float64 else 1e-5


# Summaries over the sample dim.

SHAPES = {"scalar": (7,), "vector": (5, 3), "batch": (64, 4, 2), "k1": (1, 3)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_quantiles_match_torch(shape):
    x = torch.randn(shape)
    q = [0.0, 0.05, 0.3, 0.5, 0.95, 1.0]

    out = bf.predictive_quantiles(x, q)

    assert out.shape == (len(q), *shape[1:])
    assert torch.allclose(out, torch.quantile(x, torch.tensor(q), dim=0), atol=_tol(x))
    assert torch.allclose(bf.predictive_quantiles(x, 0.3), torch.quantile(x, 0.3, dim=0))
    assert torch.allclose(
        bf.predictive_quantiles(x, torch.tensor([0.3])), torch.quantile(x, 0.3, dim=0)[None]
    )


@pytest.mark.parametrize("level", [0.5, 0.9, 0.99])
def test_interval_and_summary_match_torch(level):
    x = torch.randn(256, 8, 3)
    x0 = x.clone()
    a = (1 - level) / 2

    lower, upper = bf.predictive_interval(x, level=level)
    s = bf.summarize(x, level=level)

    assert torch.equal(x, x0)  # inputs are left untouched (no in-place sort)
    assert torch.allclose(lower, torch.quantile(x, a, dim=0))
    assert torch.allclose(upper, torch.quantile(x, 1 - a, dim=0))
    assert torch.allclose(s.mean, x.mean(dim=0))
    assert torch.allclose(s.std, x.std(dim=0))
    assert torch.allclose(s.median, torch.quantile(x, 0.5, dim=0))
    assert torch.equal(s.lower, lower) and torch.equal(s.upper, upper)
    assert torch.allclose(bf.predictive_mean(x), x.mean(dim=0))
    assert torch.allclose(bf.predictive_std(x), x.std(dim=0))
    assert torch.allclose(bf.predictive_std(x, correction=0), x.std(dim=0, correction=0))


def test_summaries_of_a_bayesian_mlp_in_one_pass():
    net = zuko.nn.MLP(3, 1, hidden_features=(16, 16))
    params = bf.sample(bf.init(net, init_logvar=-4.0), 256)
    x = torch.randn(32, 3)

    y = bf.vmap_call(net, params, x)
    s = bf.summarize(y, level=0.9)
    oracle = bf.loop_call(net, params, x)

    assert torch.allclose(s.mean, oracle.mean(dim=0))
    assert torch.allclose(s.lower, torch.quantile(oracle, 0.05, dim=0))
    assert (s.std > 0).all()  # the sampled parameters changed the output
    assert not torch.allclose(y[0], net(x))


# Density models.


def test_mixture_log_prob_matches_direct_and_is_stable():
    lp = torch.randn(16, 10, dtype=torch.float64) * 3

    direct = lp.exp().mean(dim=0).log()

    assert torch.allclose(bf.mixture_log_prob(lp), direct, atol=1e-12)
    # Far below exp's range: the direct formula gives -inf, the mixture stays exact.
    assert torch.isinf(((lp - 1e4).exp().mean(dim=0)).log()).all()
    assert torch.allclose(bf.mixture_log_prob(lp - 1e4), direct - 1e4, atol=1e-9)
    # One sample: its own log-density; identical samples: the same.
    assert torch.equal(bf.mixture_log_prob(lp[:1]), lp[0])
    assert torch.allclose(bf.mixture_log_prob(lp[:1].expand(5, 10)), lp[0], atol=1e-12)


def test_predictive_nll_reductions():
    lp = torch.randn(8, 5, 3)
    nll = -bf.mixture_log_prob(lp)

    assert torch.allclose(bf.predictive_nll(lp, reduction="none"), nll)
    assert torch.allclose(bf.predictive_nll(lp), nll.mean())
    assert torch.allclose(bf.predictive_nll(lp, reduction="sum"), nll.sum())


def test_bayesian_flow_model_average_density(gen):
    torch.manual_seed(1)
    flow = bf.BayesianModel(
        zuko.flows.NSF(2, 1, transforms=2, hidden_features=(16, 16)), init_logvar=-6.0
    )
    c, x = torch.randn(32, 1), torch.randn(32, 2)
    fn = lambda f, c, x: f(c).log_prob(x)

    params = flow.sample_params(16, generator=gen(0))
    lp = bf.vmap_call(flow.base, params, c, x, fn=fn)
    oracle = bf.loop_call(flow.base, params, c, x, fn=fn)
    same = flow(c, x, n=16, fn=fn, generator=gen(0))

    assert lp.shape == (16, 32)
    assert torch.allclose(lp, oracle, atol=1e-10)
    assert torch.allclose(same, lp, atol=1e-10)
    assert not torch.allclose(lp[0], lp[1])  # the sampled parameters changed the output
    assert not torch.allclose(lp[0], fn(flow.base, c, x))

    mix = bf.mixture_log_prob(lp)
    direct = oracle.to(torch.float64).exp().mean(dim=0).log()

    assert torch.allclose(mix.to(torch.float64), direct, atol=100 * _tol(lp))
    assert torch.allclose(bf.predictive_nll(lp), -direct.mean().to(lp.dtype), atol=100 * _tol(lp))


# Classifiers.


def _entropy_direct(p):
    return -(p * p.log()).nan_to_num().sum(dim=-1)


@pytest.mark.parametrize(
    "shape", [(8, 1, 4), (8, 16, 4), (3, 2, 5, 3)], ids=["k1c", "kbc", "kbbc"]
)
def test_classification_matches_direct(shape):
    z = torch.randn(shape) * 2
    p = z.softmax(dim=-1)

    mean = p.mean(dim=0)
    total = _entropy_direct(mean)
    aleatoric = _entropy_direct(p).mean(dim=0)
    s = bf.classification_summary(z)

    assert torch.allclose(bf.mean_probs(z), mean)
    assert torch.allclose(bf.log_mean_probs(z), mean.log())
    assert torch.allclose(bf.predictive_entropy(z), total)
    assert torch.allclose(bf.expected_entropy(z), aleatoric)
    assert torch.allclose(bf.mutual_information(z), total - aleatoric)
    assert torch.allclose(s.probs, mean)
    assert torch.allclose(s.predictive_entropy, total)
    assert torch.allclose(s.expected_entropy, aleatoric)
    assert torch.allclose(s.mutual_information, total - aleatoric)
    assert (s.mutual_information >= 0).all()
    assert (s.mutual_information <= math.log(shape[-1]) + 1e-6).all()
    # log-probabilities are logits too.
    assert torch.allclose(bf.classification_summary(p.log()).mutual_information, total - aleatoric)


def test_mutual_information_known_values():
    c = 5
    # All samples agree: no epistemic uncertainty, whatever the aleatoric one.
    z = torch.randn(1, 10, c).expand(8, 10, c)
    assert torch.allclose(bf.mutual_information(z), torch.zeros(10), atol=_tol(z))
    assert torch.allclose(bf.predictive_entropy(z), bf.expected_entropy(z))

    # C samples, each sure of a different class: MI = log C, expected entropy 0.
    z = torch.full((c, c), -1e4).fill_diagonal_(0.0).unsqueeze(1)
    assert torch.allclose(bf.mutual_information(z), torch.tensor([math.log(c)]))
    assert torch.allclose(bf.expected_entropy(z), torch.tensor([0.0]))

    # Uniform samples: all aleatoric.
    z = torch.zeros(4, 3, c)
    assert torch.allclose(bf.expected_entropy(z), torch.full((3,), math.log(c)))
    assert torch.allclose(bf.mutual_information(z), torch.zeros(3), atol=_tol(z))


def test_entropy_with_zero_probabilities_has_finite_gradients():
    lp = torch.tensor([[[0.0, -math.inf]], [[-math.inf, 0.0]]], requires_grad=True)

    s = bf.classification_summary(lp)
    (s.predictive_entropy + s.expected_entropy + s.mutual_information).sum().backward()

    assert torch.allclose(s.mutual_information, torch.tensor([math.log(2)]))
    assert torch.isfinite(lp.grad).all()


# Calibration.


# Coverage.


def test_predictive_interval_converges_to_exact_quantiles():
    mean, std = torch.randn(50), torch.rand(50) + 0.5
    k = 100000
    samples = mean + std * torch.randn(k, 50)

    lower, upper = bf.predictive_interval(samples, level=0.9)
    z = 1.6448536269514722

    # The standard error of a sample quantile: sqrt(a (1 - a) / K) / density at it.
    se = math.sqrt(0.05 * 0.95 / k) / (math.exp(-(z**2) / 2) / math.sqrt(2 * math.pi)) * std
    assert ((lower - (mean - z * std)).abs() < 5 * se).all()
    assert ((upper - (mean + z * std)).abs() < 5 * se).all()


# Deep ensembles.


def _train(net, x, y, steps=20):
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        (net(x) - y).square().mean().backward()
        optimizer.step()
    return net


def test_deep_ensemble_through_vmap_call():
    x = torch.randn(64, 3)
    y = x.sum(dim=-1, keepdim=True).sin()
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(_train(zuko.nn.MLP(3, 1, hidden_features=(16, 16)), x, y))

    params = bf.stack_params(members)
    out = bf.vmap_call(members[0], params, x)

    assert set(params) == {name for name, _ in members[0].named_parameters()}
    assert all(v.shape[0] == 3 for v in params.values())
    for i, m in enumerate(members):
        assert torch.allclose(out[i], m(x), atol=1e-10 if x.dtype == torch.float64 else 1e-5)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    assert torch.allclose(out, bf.loop_call(members[0], params, x))

    s = bf.summarize(out)
    assert torch.allclose(s.mean, torch.stack([m(x) for m in members]).mean(dim=0))

    out.sum().backward()  # gradients reach every member
    assert all(m[0].weight.grad is not None for m in members)


def test_deep_ensemble_of_flows_and_classifiers():
    nets = [zuko.nn.MLP(2, 3, hidden_features=(8,)) for _ in range(4)]
    x = torch.randn(10, 2)
    s = bf.classification_summary(bf.vmap_call(nets[0], bf.stack_params(nets), x))
    logits = torch.stack([n(x) for n in nets])
    assert torch.allclose(s.mutual_information, bf.mutual_information(logits))
    assert (s.mutual_information > 0).all()

    flows = [zuko.flows.NSF(2, 1, transforms=1, hidden_features=(8,)) for _ in range(3)]
    c, x = torch.randn(16, 1), torch.randn(16, 2)
    fn = lambda f, c, x: f(c).log_prob(x)
    lp = bf.vmap_call(flows[0], bf.stack_params(flows), c, x, fn=fn)
    direct = torch.stack([fn(f, c, x) for f in flows])
    assert torch.allclose(lp, direct, atol=1e-10 if lp.dtype == torch.float64 else 1e-4)
    assert not torch.allclose(lp[0], lp[1])
    assert torch.allclose(bf.mixture_log_prob(lp), direct.exp().mean(dim=0).log(), atol=1e-4)


def test_stack_params_rejects_mismatched_members():
    a = zuko.nn.MLP(3, 5)
    bn = [nn.BatchNorm1d(3), nn.BatchNorm1d(3)]
    bn[1].running_mean.fill_(1.0)

    with pytest.raises(TypeError, match="stack_params: expected a sequence"):
        bf.stack_params(a)
    with pytest.raises(TypeError, match="stack_params: expected a sequence"):
        bf.stack_params([a, "b"])
    with pytest.raises(ValueError, match="stack_params: expected at least one module"):
        bf.stack_params([])
    with pytest.raises(ValueError, match="stack_params: expected modules of one class"):
        bf.stack_params([a, nn.Linear(3, 5)])
    with pytest.raises(ValueError, match=r"stack_params: expected '4\.weight' of shape"):
        bf.stack_params([a, zuko.nn.MLP(3, 6)])
    with pytest.raises(ValueError, match="stack_params: expected the same parameter names"):
        bf.stack_params([a, zuko.nn.MLP(3, 5, hidden_features=(64,))])
    with pytest.raises(ValueError, match="stack_params: expected equal buffers"):
        bf.stack_params(bn)
    with pytest.raises(ValueError, match="stack_params: expected modules with parameters"):
        bf.stack_params([nn.ReLU(), nn.ReLU()])


# Docs.


def test_docs_examples_run():
    run_page("predictive.md", 4)


def test_nan_propagates_as_in_torch_quantile():
    x = torch.tensor([[1.0, 1.0], [float("nan"), 2.0], [3.0, 3.0], [4.0, 4.0], [5.0, 5.0]])

    q = bf.predictive_quantiles(x, [0.1, 0.5, 0.9])
    expected = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9]), dim=0)
    assert torch.equal(q.isnan(), expected.isnan()) and q[:, 0].isnan().all()
    assert torch.allclose(q[:, 1], expected[:, 1])
    assert bf.predictive_quantiles(x[:, :1], 0.5).isnan().all()
    lower, upper = bf.predictive_interval(x, 0.5)
    assert lower[0].isnan() and upper[0].isnan() and not lower[1].isnan()
    s = bf.summarize(x)
    assert all(t[0].isnan() and not t[1].isnan() for t in s)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantiles_of_low_precision_samples(dtype, gen):
    # In bfloat16, q = 0.999 rounded to 1: the quantile was the maximum.
    x = torch.randn(4096, 3, generator=gen(0)).to(dtype)
    q = [0.001, 0.5, 0.995, 0.999]
    expected = torch.quantile(x.double(), torch.tensor(q, dtype=torch.float64), dim=0)

    got = bf.predictive_quantiles(x, q)
    lower, upper = bf.predictive_interval(x, level=0.998)

    assert got.dtype == dtype
    assert torch.equal(got, expected.to(dtype))  # the exact value, rounded once
    assert torch.equal(upper, got[3]) and torch.equal(lower, got[0])
    assert (upper < x.max(dim=0).values).all()


def test_quantiles_of_infinite_samples_and_numpy_probabilities():
    np = pytest.importorskip("numpy")
    x = torch.tensor([[1.0], [math.inf], [math.inf], [2.0]])
    assert bf.predictive_quantiles(x, 0.9).item() == math.inf  # NaN before (inf - inf)
    assert bf.predictive_quantiles(x, 0.5).item() == math.inf
    assert bf.predictive_quantiles(-x, 0.1).item() == -math.inf
    assert bf.predictive_quantiles(x, np.float32(0.0)).item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_quantiles_between_finite_samples_near_the_ends_of_the_range(dtype):
    # lerp takes above - below, which overflowed: inf, -inf, and lower > upper.
    m = torch.finfo(dtype).max / 1.5
    x = torch.tensor([[-m], [m]], dtype=dtype)
    exact = torch.tensor([-m / 2, 0.0, m / 2], dtype=torch.float64)  # K = 2: q (m + m) - m

    got = bf.predictive_quantiles(x, [0.25, 0.5, 0.75])[:, 0]
    lower, upper = bf.predictive_interval(x, 0.5)

    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), exact.to(dtype).double(), rtol=4 * torch.finfo(dtype).eps)
    assert torch.equal(lower[0], got[0]) and torch.equal(upper[0], got[2]) and lower < upper


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_uncertainty_of_half_precision_logits_against_float64(dtype, gen):
    # The mutual information was the difference of two entropies of about 7 nats, each
    # rounded to the dtype: 0 or 0.03 for 0.0012. Oracle: float64 on the very same values.
    g = gen(0)
    z = torch.randn(1, 6, 1000, generator=g) * 0.5 + 0.05 * torch.randn(32, 6, 1000, generator=g)
    z = z.to(dtype)
    exact = bf.classification_summary(z.double())
    assert (exact.mutual_information > 1e-3).all()  # a small part of an entropy of ~6.9

    s = bf.classification_summary(z)
    for got, oracle in zip(s, exact, strict=True):
        assert got.dtype == dtype
        assert torch.allclose(got.double(), oracle, rtol=2 * torch.finfo(dtype).eps, atol=0)
    for f, i in ((bf.mean_probs, 0), (bf.predictive_entropy, 1), (bf.expected_entropy, 2)):
        assert torch.equal(f(z), s[i])
    assert torch.equal(bf.mutual_information(z), s.mutual_information)
    assert torch.equal(bf.log_mean_probs(z), bf.log_mean_probs(z.float()).to(dtype))


def test_small_mutual_information_in_float32(gen):
    # MI ~ 2e-6 nats from two entropies of ~1.2: off by up to 25 %, now by < 1 %.
    g, f32 = gen(1), torch.float32
    z = torch.randn(1, 4, 1000, generator=g, dtype=f32) * 0.5
    z = z + 0.002 * torch.randn(32, 4, 1000, generator=g, dtype=f32)
    exact = bf.mutual_information(z.double())
    assert (exact > 1e-6).all() and (exact < 1e-5).all()
    assert torch.allclose(bf.mutual_information(z).double(), exact, rtol=0.01, atol=0)


def test_a_class_impossible_in_every_sample_has_zero_gradients():
    # log-probabilities of -inf for one class in every sample: logsumexp's gradient is NaN
    # there; the oracle replaces -inf by -1e4 (float64: exp(-1e4) = 0).
    z = torch.tensor([[[0.3, -math.inf, -0.2]], [[-0.5, -math.inf, 0.4]]], dtype=torch.float64)
    finite = z.clamp(min=-1e4)
    for f in (
        bf.predictive_entropy,
        bf.mutual_information,
        bf.log_mean_probs,
        bf.mean_probs,
        lambda z: bf.classification_summary(z).mutual_information,
        lambda z: bf.mixture_log_prob(z),
    ):
        a, b = z.clone().requires_grad_(), finite.clone().requires_grad_()
        ya, yb = f(a), f(b)
        assert torch.equal(ya.isneginf(), (yb <= -1e4 + 1e-9) & (yb < 0))
        weights = torch.linspace(0.5, 1.5, ya.numel(), dtype=ya.dtype).view(ya.shape)
        (ya.masked_fill(ya.isneginf(), 0) * weights).sum().backward()
        (yb.masked_fill(yb <= -1e4 + 1e-9, 0) * weights).sum().backward()
        assert torch.isfinite(a.grad).all()
        assert torch.allclose(a.grad, b.grad, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [7, 47, 49])
def test_confident_classifiers_give_probabilities_of_at_most_one(k, dtype, gen):
    # A float32 logsumexp of K = 7 equal values is 1 ulp above the correctly rounded
    # log 7: probabilities of 1 + 1e-7, which the metrics then refused.
    z = torch.randn(k, 256, 10, generator=gen(k))
    z[..., 0] += 20 + 5 * torch.randn(1, 256, generator=gen(k + 1))
    sure = torch.full((k, 1, 10), -100.0).index_fill_(-1, torch.tensor([0]), 0.0)
    z = torch.cat([z, sure], dim=1).to(dtype)  # p = 1 exactly, in every sample
    labels = torch.zeros(257, dtype=torch.long)
    oracle = z.double().softmax(dim=-1).mean(dim=0)  # the exact mean of the same logits
    eps = torch.finfo(dtype).eps

    log_p, p = bf.log_mean_probs(z), bf.mean_probs(z)
    s = bf.classification_summary(z)

    assert (log_p <= 0).all() and (p <= 1).all() and (s.probs <= 1).all()
    assert (bf.predictive_entropy(z) >= 0).all() and (s.predictive_entropy >= 0).all()
    assert torch.equal(s.probs, p)
    # Within a few units of rounding of log p (that of the logits' log-softmax, in p's).
    bound = 4 * eps * (1 + oracle.log().abs())
    assert ((log_p.double() - oracle.log()).abs() <= bound).all()
    assert ((p.double() - oracle).abs() <= bound * oracle + torch.finfo(dtype).tiny).all()
    bf.categorical_nll(p, labels)
    bf.expected_calibration_error(p, labels)
    bf.calibration_curve(s.probs, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [7, 47, 49])
def test_mixture_of_identical_samples_is_each_of_them_exactly(k, dtype, gen):
    lp = (torch.randn(300, generator=gen(0)) * 10).to(dtype)

    assert torch.equal(bf.mixture_log_prob(lp.expand(k, 300)), lp)
    z = lp.view(1, 3, 100).expand(k, 3, 100)
    # Half precision: the log-softmax in float32, rounded once (not half's own).
    exact = z[0].to(torch.promote_types(dtype, torch.float32)).log_softmax(dim=-1).to(dtype)
    assert torch.equal(bf.log_mean_probs(z), exact)


def test_level_takes_any_real_number_and_q_no_bools():
    np = pytest.importorskip("numpy")
    x = torch.randn(100, 3)
    for level in (np.float32(0.9), np.float64(0.5), torch.tensor(0.8), torch.tensor([0.8])):
        a = (1 - float(level)) / 2
        q = torch.tensor([a, 1 - a], dtype=x.dtype)
        lower, upper = bf.predictive_interval(x, level)
        s = bf.summarize(x, level=level)
        assert torch.allclose(torch.stack([lower, upper]), torch.quantile(x, q, dim=0))
        assert torch.equal(s.lower, lower) and torch.equal(s.upper, upper)
    assert torch.equal(bf.predictive_quantiles(x, np.array(0.3)), torch.quantile(x, 0.3, dim=0))

    for where, f in (("predictive_interval", bf.predictive_interval), ("summarize", bf.summarize)):
        for bad in (True, "0.9", torch.tensor(True), 0.5 + 0j, np.bool_(True)):
            with pytest.raises(TypeError, match=f"{where}: expected level to be a float"):
                f(x, bad)
        with pytest.raises(ValueError, match=rf"{where}: expected level .* shape \(2,\)"):
            f(x, torch.tensor([0.8, 0.9]))
        for bad in (torch.tensor(1.0), np.float32(0.0), math.nan):
            with pytest.raises(ValueError, match=rf"{where}: expected level in \(0, 1\)"):
                f(x, bad)
    for bad in (True, False, [0.5, True], torch.tensor([True, False]), np.array([True])):
        with pytest.raises(TypeError, match="predictive_quantiles: expected q to be a float"):
            bf.predictive_quantiles(x, bad)
    # torch.as_tensor dropped the imaginary part of a complex tensor or array, with a warning.
    for bad in (torch.tensor([0.5 + 0.5j]), np.array(0.25 + 0j)):
        with pytest.raises(TypeError, match="predictive_quantiles: expected q to be real"):
            bf.predictive_quantiles(x, bad)


# Empty batches and NaN.


def test_an_empty_batch_gives_empty_summaries():
    # torch.std warned "degrees of freedom is <= 0" (an error here) for any K.
    x = torch.ones(4, 0, 3)
    s = bf.summarize(x)
    for field in s:
        assert field.shape == (0, 3) and field.dtype == x.dtype
    assert torch.equal(s.mean, x.mean(dim=0))
    assert bf.predictive_std(x).shape == (0, 3)
    assert bf.predictive_std(x, correction=0).shape == (0, 3)
    assert bf.predictive_mean(x).shape == (0, 3)
    with pytest.raises(ValueError, match="predictive_nll: expected at least one observation"):
        bf.predictive_nll(x)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nan_or_inf_logit_makes_its_input_nan_and_no_other(bad, gen):
    # As documented: NaN propagates through the summaries, the metrics refuse it.
    z = torch.randn(5, 4, 3, generator=gen(0))
    z[2, 1, 0] = bad  # one sample of input 1
    clean = torch.cat([z[:, :1], z[:, 2:]], dim=1)  # the other inputs
    p = z.softmax(dim=-1).mean(dim=0)

    s = bf.classification_summary(z)
    assert torch.allclose(bf.mean_probs(clean), p[[0, 2, 3]], atol=1e-12)
    for f in (
        bf.mean_probs,
        bf.log_mean_probs,
        bf.predictive_entropy,
        bf.expected_entropy,
        bf.mutual_information,
        *(lambda z, i=i: bf.classification_summary(z)[i] for i in range(4)),
    ):
        got = f(z)
        assert got[1].isnan().all()
        assert torch.equal(torch.cat([got[:1], got[2:]]), f(clean))
    # The message said "got values in [nan, nan]".
    with pytest.raises(
        ValueError, match="categorical_nll: expected probabilities without NaN, got 3"
    ):
        bf.categorical_nll(s.probs, torch.zeros(4, dtype=torch.long))
