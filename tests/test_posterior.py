r"""Posterior, init, sample, select and kl_divergence against closed forms and zuko."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import zuko
import zuko.bayesian

from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

import bayesflow as bf

from .registry import MODELS, snapshot, unchanged

PATTERNS = [
    ("",),
    ("transform.transforms.*.hyper.4",),
    ("**.hyper.4",),
    ("**.bias",),
    ("transform.transforms.1",),
    ("*.transforms.0.hyper",),
    ("transform.transforms.0.hyper.0.weight", "**.hyper.2"),
]


def zuko_selection(module, include, exclude=()):
    bnet = zuko.bayesian.BayesianModel(module, include_params=include, exclude_params=exclude)
    return [k.replace("-", ".") for k in bnet.means]


@pytest.mark.parametrize("include", PATTERNS, ids=str)
@pytest.mark.parametrize("exclude", [(), ("**.bias",)], ids=str)
def test_select_agrees_with_zuko(include, exclude):
    flow = zuko.flows.NSF(3, 2, transforms=2, hidden_features=(8, 8))

    ours = bf.select(flow, include, exclude)

    assert ours == zuko_selection(flow, include, exclude)


def test_select_matches_whole_segments():
    net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(11)])

    assert bf.select(net, ["1"]) == ["1.weight", "1.bias"]  # not 10.weight
    assert bf.select(net, ["1*"]) == ["1.weight", "1.bias", "10.weight", "10.bias"]
    assert bf.select(net, ["*.weight"]) == [f"{i}.weight" for i in range(11)]
    assert bf.select(net, ["**"], ["**.bias", "1*"]) == [
        f"{i}.weight" for i in range(11) if i not in (1, 10)
    ]
    assert bf.select(net, "1") == ["1.weight", "1.bias"]  # a lone string is one pattern


@pytest.mark.parametrize("name", MODELS)
def test_init_copies_the_module(name):
    case = MODELS[name]
    module = case.build()
    before = snapshot(module)

    q = bf.init(module, init_logvar=-5.0, include=case.include, exclude=case.exclude)

    assert list(q.mean) == bf.select(module, case.include, case.exclude)
    params = dict(module.named_parameters())
    for name_, m in q.mean.items():
        assert m.is_leaf and m.requires_grad and q.logvar[name_].requires_grad
        assert torch.equal(m, params[name_]) and m.data_ptr() != params[name_].data_ptr()
        assert torch.equal(q.logvar[name_], torch.full_like(m, -5.0))

    with torch.no_grad():
        for m in q.mean.values():
            m.add_(1.0)
    assert unchanged(before, module)


def test_init_logvar_forms():
    net = zuko.nn.MLP(2, 3, hidden_features=(4,))
    names = [n for n, _ in net.named_parameters()]

    by_dict = bf.init(net, {n: -float(i) for i, n in enumerate(names)})
    by_fn = bf.init(net, lambda name, p: torch.full_like(p, -1.0) if "bias" in name else -7.0)
    by_tensor = bf.init(net, {**dict.fromkeys(names, -2.0), "0.bias": torch.arange(4.0)})

    for i, n in enumerate(names):
        assert torch.all(by_dict.logvar[n] == -float(i))
        assert torch.all(by_fn.logvar[n] == (-1.0 if "bias" in n else -7.0))
    assert torch.equal(by_tensor.logvar["0.bias"], torch.arange(4.0))
    for real in (np.float32(-2.5), np.int64(-2)):  # any real number, as zuko takes
        assert torch.all(bf.init(net, real).logvar["0.bias"] == float(real))
    one = bf.init(net, torch.tensor([-3.0]))  # a one-element tensor, as a float
    assert all(torch.all(v == -3.0) for v in one.logvar.values())
    # A tensor of several values was broadcast against every parameter: a per-unit vector
    # of a square layer landed on the weight's input columns.
    square = nn.Linear(4, 4)
    with pytest.raises(TypeError, match=r"init: expected init_logvar to be a float .*got a "
                       r"tensor of shape \(4,\); pass \{name: tensor\}"):  # fmt: skip
        bf.init(square, torch.tensor([-1.0, -2.0, -3.0, -4.0]))


def test_sample_statistics():
    q = bf.init(nn.Linear(3, 2), init_logvar=-1.0)
    with torch.no_grad():
        q.mean["weight"].copy_(torch.randn(2, 3))
        q.logvar["bias"].fill_(1.0)
    n = 20000

    params = bf.sample(q, n, generator=torch.Generator(torch.get_default_device()).manual_seed(0))
    sigma = bf.std(q)

    for name, theta in params.items():
        assert theta.shape == (n, *q.mean[name].shape)
        se = sigma[name] / math.sqrt(n)
        assert torch.all((theta.mean(0) - q.mean[name]).abs() < 5 * se)
        # the standard error of a sample std is about sigma / sqrt(2 n)
        assert torch.all((theta.std(0) - sigma[name]).abs() < 5 * sigma[name] / math.sqrt(2 * n))
    # softclip: logvar 1 gives a variance of exp(1 / sqrt(1 + 1/324))
    assert torch.allclose(
        sigma["bias"] ** 2, torch.full((2,), math.exp(1 / math.sqrt(1 + 1 / 324)))
    )


def test_sample_is_reproducible_and_differentiable():
    q = bf.init(zuko.nn.MLP(3, 2, hidden_features=(5,)), init_logvar=-2.0)

    a = bf.sample(q, 3, generator=torch.Generator(torch.get_default_device()).manual_seed(7))
    b = bf.sample(q, 3, generator=torch.Generator(torch.get_default_device()).manual_seed(7))
    c = bf.sample(q, 3, generator=torch.Generator(torch.get_default_device()).manual_seed(8))

    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)
    assert not torch.equal(a["0.weight"][0], a["0.weight"][1])

    total = sum(t.sum() for t in a.values())
    grads = torch.autograd.grad(total, [*q.mean.values(), *q.logvar.values()])
    for g in grads[: len(q.mean)]:
        assert torch.allclose(g, torch.full_like(g, 3.0))  # d/dmu of the sum of 3 samples
    assert all(g.abs().sum() > 0 for g in grads[len(q.mean) :])


def test_kl_closed_form():
    q = bf.init(zuko.nn.MLP(3, 2, hidden_features=(5,)), init_logvar=-2.0)
    with torch.no_grad():
        for lv in q.logvar.values():
            lv.uniform_(-30.0, 5.0)  # outside softclip's bound too

    sigma = bf.std(q)
    for prior_var in (0.3, 1.0, 4.0):
        expected = sum(
            torch_kl(Normal(q.mean[k], sigma[k]), Normal(0.0, math.sqrt(prior_var))).sum()
            for k in q.mean
        )
        assert torch.allclose(bf.kl_divergence(q, prior_var), expected, rtol=1e-10)


@pytest.mark.parametrize("prior_var", [0.5, 1.0, 2.0])
def test_kl_agrees_with_zuko(prior_var):
    zbnet = zuko.bayesian.BayesianModel(zuko.flows.NSF(2, 1), include_params=["**.hyper.4"])
    with torch.no_grad():
        for lv in zbnet.logvars.values():
            lv.uniform_(-25.0, 3.0)
    q = bf.Posterior(
        mean={k.replace("-", "."): v for k, v in zbnet.means.items()},
        logvar={k.replace("-", "."): v for k, v in zbnet.logvars.items()},
    )

    assert torch.allclose(bf.kl_divergence(q, prior_var), zbnet.kl_divergence(prior_var))


def test_mean_model_and_mean_params():
    flow = zuko.flows.NSF(2, 1, hidden_features=(8,))
    q = bf.init(flow, include=["**.hyper.2"])
    with torch.no_grad():
        for m in q.mean.values():
            m.add_(0.1)
    c, x = torch.randn(4, 1), torch.randn(4, 2)
    before = snapshot(flow)

    mean = bf.mean_model(flow, q)
    y = bf.vmap_call(flow, bf.mean_params(q), c, x, fn=lambda f, c, x: f(c).log_prob(x))

    assert torch.allclose(y[0], mean(c).log_prob(x), atol=1e-12)
    assert not torch.allclose(y[0], flow(c).log_prob(x), atol=1e-6)
    assert unchanged(before, flow)


def test_kl_sums_in_at_least_float32():
    layer = torch.nn.Linear(1000, 1000).half()
    q = bf.init(layer, init_logvar=-9.0)

    kl = bf.kl_divergence(q)
    expected = bf.kl_divergence(
        bf.Posterior(
            {k: v.double() for k, v in q.mean.items()},
            {k: v.double() for k, v in q.logvar.items()},
        )
    )
    assert kl.dtype == torch.float32 and torch.isfinite(kl)
    assert abs(kl.item() - expected.item()) < 1e-3 * expected.item()
    assert torch.isfinite(bf.GaussianPrior(0.0, 1.0).kl(q))


def test_std_reads_cleanly_under_no_grad(recwarn):
    net = torch.nn.Linear(3, 2)
    q = bf.init(net, init_logvar=-9.0)

    sigma = bf.std(q)
    assert sigma["weight"].requires_grad  # differentiable, as documented
    (g,) = torch.autograd.grad(sigma["weight"].sum(), [q.logvar["weight"]])
    assert torch.allclose(g, 0.5 * sigma["weight"].detach() * _dsoftclip(q.logvar["weight"]))

    with torch.no_grad():
        read = bf.std(q)
    assert not read["weight"].requires_grad
    assert float(read["bias"][0]) == pytest.approx(math.exp(0.5 * _softclip(-9.0)), rel=1e-12)
    assert not recwarn.list  # float() of it does not warn


def _softclip(x, bound=18.0):
    return x / math.sqrt(1 + (x / bound) ** 2)


def _dsoftclip(x, bound=18.0):
    return (1 + (x / bound) ** 2) ** -1.5


def test_posterior_repr_is_short():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3), torch.nn.Flatten(), torch.nn.Linear(16, 4)
    )
    q = bf.init(net, init_logvar=lambda name, p: -9.0 if "weight" in name else -4.0)
    text = repr(q)
    lines = text.splitlines()
    sigma_w, sigma_b = math.exp(0.5 * _softclip(-9.0)), math.exp(0.5 * _softclip(-4.0))
    numel = sum(p.numel() for p in net.parameters())
    assert lines[0] == (
        f"Posterior({numel:,} parameters in 4 tensors, float64 on cpu, "
        f"sigma {sigma_w:.3g} to {sigma_b:.3g})"
    )
    assert lines[1].split() == ["0.weight", "(16,", "1,", "3,", "3)", "sigma", f"{sigma_w:.3g}"]
    assert lines[4].split() == ["2.bias", "(4,)", "sigma", f"{sigma_b:.3g}"]
    assert len(lines) == 5 and str(q) == text

    # Still the NamedTuple it was: fields, equality, unpacking.
    mean, logvar = q
    assert q._fields == ("mean", "logvar") and q == bf.Posterior(mean, logvar)
    # A big model stays short; odd contents fall back to the plain form.
    big = bf.init(torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(30)]))
    assert len(repr(big).splitlines()) == 25 and "... and 37 more tensors" in repr(big)
    assert repr(bf.Posterior({}, {})) == "Posterior(no parameters)"
    assert repr(bf.Posterior(1, 2)) == "Posterior(mean=1, logvar=2)"


def test_init_logvar_from_tensors_that_record_gradients_gives_fresh_leaves():
    net = nn.Linear(3, 2)
    old = bf.init(net, init_logvar=-5.0)
    p = torch.nn.Parameter(torch.tensor(-4.0))
    for init_logvar in (dict(old.logvar), lambda name, w: p):
        q = bf.init(net, init_logvar=init_logvar)
        assert all(t.is_leaf and t.requires_grad for t in q.logvar.values())
        torch.optim.Adam([*q.mean.values(), *q.logvar.values()])  # refused non-leaves
        bf.kl_divergence(q).backward()
        assert p.grad is None and all(t.grad is None for t in old.logvar.values())


def test_posteriors_over_empty_tensors():
    # aminmax over a group of empty tensors raised; a sample of no numbers is empty.
    m, lv = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([-1.0, 0.0, 1.0])
    q = bf.Posterior({"a": m, "b": torch.zeros(4, 0)}, {"a": lv, "b": torch.zeros(4, 0)})
    samples = bf.sample(q, 2, generator=torch.Generator().manual_seed(0))
    assert samples["a"].shape == (2, 3) and samples["b"].shape == (2, 4, 0)
    assert not torch.equal(samples["a"][0], samples["a"][1])
    only = bf.Posterior({"b": q.mean["b"]}, {"b": q.logvar["b"]})
    assert bf.sample(only, 3)["b"].shape == (3, 4, 0)
    assert bf.kl_divergence(only) == 0
    clipped = lv / (1 + (lv / 18) ** 2).sqrt()  # the soft clip of log-variances at 18
    expected = torch_kl(Normal(m, (clipped / 2).exp()), Normal(0.0, 1.0)).sum()
    assert torch.allclose(bf.kl_divergence(q), expected, atol=1e-12)


def test_std_refuses_integer_tensors():
    # torch.finfo's TypeError named no function.
    ints = bf.Posterior(
        {"w": torch.zeros(3, dtype=torch.long)}, {"w": torch.zeros(3, dtype=torch.long)}
    )
    with pytest.raises(
        TypeError,
        match=r"std: expected real floating-point posterior tensors, got "
        r"posterior.logvar\['w'\] of dtype torch.int64",
    ):
        bf.std(ints)


def test_init_refuses_a_bridge():
    # bf.init(bnet) gave a posterior over the wrapper's own means and log-variances (12
    # tensors for a 4-tensor posterior), refused only later by another function.
    bnet = bf.BayesianModel(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    state = {k: v.clone() for k, v in bnet.state_dict().items()}
    with pytest.raises(TypeError, match=r"init: expected the module .* use bnet.posterior"):
        bf.init(bnet)
    assert all(torch.equal(v, state[k]) for k, v in bnet.state_dict().items())
    assert sorted(bf.init(bnet.base).mean) == sorted(bnet.posterior.mean)


def test_init_refuses_meta_tensors():
    # torch's RuntimeError (Tensor.item() cannot be called on meta tensors) named no function.
    net = nn.Linear(3, 2)
    with pytest.raises(
        ValueError,
        match=r"init: expected parameters with data, got \['weight', 'bias'\] on the meta",
    ):
        bf.init(nn.Linear(3, 2, device="meta"))
    with pytest.raises(ValueError, match=r"BayesianModel: expected parameters with data"):
        bf.BayesianModel(nn.Linear(3, 2, device="meta"))
    with pytest.raises(ValueError, match=r"IVON: expected parameters with data"):
        bf.IVON(nn.Linear(3, 2, device="meta"), lr=0.1, ess=1.0)
    for init_logvar in (
        torch.zeros((), device="meta"),
        {"weight": torch.zeros((), device="meta"), "bias": -9.0},
        lambda name, p: torch.zeros((), device="meta"),
    ):
        with pytest.raises(
            ValueError,
            match=r"init: expected init_logvar for 'weight' with data, got a tensor on the meta",
        ):
            bf.init(net, init_logvar)
    # A meta parameter that the selection leaves out is not read.
    mixed = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2, device="meta"))
    assert list(bf.init(mixed, include=["0"]).mean) == ["0.weight", "0.bias"]


def test_sample_under_an_outer_vmap(gen):
    # The flat sample was cut by unsafe_split_with_sizes, which has no batching rule: a
    # sample (or a local call sampling a layer whole) under vmap(randomness="different")
    # raised.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2))
    q = bf.init(net, init_logvar=-2.0)
    x = torch.randn(5, 3)

    def each(xi):
        return bf.loop_call(net, bf.sample(q, 3), xi[None])[:, 0]

    torch.manual_seed(1)
    same = torch.func.vmap(each, randomness="same")(x)
    torch.manual_seed(1)
    assert torch.allclose(same, bf.loop_call(net, bf.sample(q, 3), x).transpose(0, 1))

    different = torch.func.vmap(each, randomness="different")(x)
    assert different.shape == (5, 3, 2) and not torch.allclose(different[0], different[1])
    local = torch.func.vmap(lambda xi: bf.local_call(net, q, 3, xi), randomness="different")(x)
    assert local.shape == (5, 3, 2) and not torch.allclose(local[:, 0], local[:, 1])


def test_an_int_beyond_the_float_range_is_an_infinite_init_logvar():
    # A bare OverflowError ("int too large to convert to float") that named no function.
    for value in (10**400, -(10**400), {"weight": 10**400, "bias": 0.0}):
        with pytest.raises(
            ValueError, match=r"^init: expected a finite init_logvar for 'weight', got"
        ):
            bf.init(nn.Linear(3, 2), value)


def test_mean_model_refuses_a_bridge():
    # It said "expected posterior names and shapes from ...", about the wrapper's names.
    bnet = bf.BayesianModel(nn.Linear(3, 2))
    with pytest.raises(
        TypeError,
        match=r"^mean_model: expected the module the posterior is over, got a BayesianModel",
    ):
        bf.mean_model(bnet, bnet.posterior)


def test_a_generator_on_another_device_is_refused_before_any_draw(device):
    if device.type == "cpu":
        pytest.skip("needs a second device: run with --device cuda")
    q = bf.init(nn.Linear(3, 2).to(device))
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    with pytest.raises(
        ValueError, match=r"^sample: expected a generator on the posterior's device"
    ):
        bf.sample(q, 2, generator=g)
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("call", ["local_call", "local_nelbo", "flow_sample"])
def test_a_generator_on_another_device_is_refused_by_local_calls_and_flows(device, call):
    # These raised torch's own error from the draw, not one naming the function.
    if device.type == "cpu":
        pytest.skip("needs a second device: run with --device cuda")
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    x = torch.randn(4, 3, device=device)
    with pytest.raises(ValueError, match=rf"^{call}: expected a generator on the "):
        if call == "flow_sample":
            flow = zuko.flows.MAF(2, 3).to(device)
            bf.flow_sample(flow, bf.sample(bf.init(flow), 2), x, (), generator=g)
        else:
            net = nn.Linear(3, 2).to(device)
            q = bf.init(net)
            if call == "local_call":
                bf.local_call(net, q, 2, x, generator=g)
            else:
                ll = lambda m, x: -m(x).square().sum(-1)
                bf.local_nelbo(net, q, x, fn=ll, num_data=4, n=2, generator=g)
    assert torch.equal(g.get_state(), state)


def test_a_posterior_saved_as_its_two_dicts_loads_with_weights_only(tmp_path):
    # As the Posterior's docstring says: torch.load's default refuses the NamedTuple itself.
    q = bf.init(nn.Linear(3, 2), init_logvar=-4.0)
    torch.save({"mean": q.mean, "logvar": q.logvar}, tmp_path / "q.pt")
    loaded = bf.Posterior(**torch.load(tmp_path / "q.pt"))
    for field in ("mean", "logvar"):
        for k, t in getattr(q, field).items():
            got = getattr(loaded, field)[k]
            assert torch.equal(got, t) and got.requires_grad and got.is_leaf
    a = bf.sample(q, 3, generator=torch.Generator().manual_seed(0))
    b = bf.sample(loaded, 3, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a[k], b[k]) for k in a)
