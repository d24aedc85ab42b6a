r"""The bridge, against zuko.bayesian.BayesianModel as the oracle."""

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import zuko
import zuko.bayesian

from torch.nn.utils import parametrizations

import bayesflow as bf
import bayesflow._compat
import bayesflow._swap

from .registry import log_prob, snapshot, unchanged

CONFIGS = {
    "mlp": (lambda: zuko.nn.MLP(5, 5, hidden_features=(16, 16), activation=nn.ELU), {}),
    "nsf-tutorial": (
        lambda: zuko.flows.NSF(features=3, context=5, hidden_features=(16, 16)),
        {
            "include_params": ["transform.transforms.*.hyper.4"],
            "exclude_params": ["**.bias"],
        },
    ),
    "nsf-partial": (
        lambda: zuko.flows.NSF(2, 1, transforms=3, hidden_features=(16, 16)),
        {"include_params": ["**.hyper.4"]},
    ),
}


def pair(name, **extra):
    build, kwargs = CONFIGS[name]
    base = build()
    torch.manual_seed(3)
    ours = bf.BayesianModel(base, **kwargs, **extra)
    torch.manual_seed(3)
    theirs = zuko.bayesian.BayesianModel(base, **kwargs, **extra)
    return ours, theirs


@pytest.mark.parametrize("name", CONFIGS)
def test_same_state_as_zuko(name):
    ours, theirs = pair(name, init_logvar=-7.0)

    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-15) for k in a)
    assert list(ours.means) == list(theirs.means)
    assert torch.allclose(ours.kl_divergence(0.5), theirs.kl_divergence(0.5))


def _transposed_linear():
    layer = nn.Linear(5, 6)
    layer.weight = nn.Parameter(torch.randn(5, 6).t())  # a non-contiguous parameter
    return layer


LAYOUTS = {
    "channels-last": (lambda: nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last), -9.0),
    "transposed": (_transposed_linear, -9.0),
    "float16": (lambda: nn.Linear(5, 8).half(), -3.3),
    "bfloat16": (lambda: nn.Linear(5, 8).bfloat16(), 0.1),
    "float32": (lambda: nn.Linear(5, 8).float(), 0.1),
    "numpy-init": (lambda: nn.Linear(5, 8), np.float32(-2.5)),  # zuko takes any real
    # A 0-dim float64 tensor on float32 parameters: added to the noise, it was rounded twice
    # (1 ulp off zuko's on tensors under 16 elements, where torch draws one by one).
    "tensor-init": (lambda: nn.Linear(5, 3).float(), torch.tensor(-4.3, dtype=torch.float64)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_state_and_generator_as_zuko_to_the_bit(layout):
    # zuko draws `empty_like(param).normal_(init_logvar, 1e-3)`: the parameter's memory
    # layout decides the order of the draw, and one rounding the low bits. The same seed
    # must give the same log-variances, and leave the generator where zuko leaves it.
    build, init = LAYOUTS[layout]
    base = build()
    states = []
    for make in (bf.BayesianModel, zuko.bayesian.BayesianModel):
        torch.manual_seed(3)
        model = make(base, init_logvar=init)
        states.append((model.state_dict(), torch.random.get_rng_state()))
    (ours, rng_ours), (theirs, rng_theirs) = states
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(rng_ours, rng_theirs)


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dicts_load_both_ways(name):
    build, kwargs = CONFIGS[name]
    ours = bf.BayesianModel(build(), **kwargs)
    theirs = zuko.bayesian.BayesianModel(build(), **kwargs)

    ours.load_state_dict(theirs.state_dict())
    assert all(
        torch.equal(a, b)
        for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True)
    )

    ours2 = bf.BayesianModel(build(), **kwargs)
    theirs.load_state_dict(ours2.state_dict())
    assert all(
        torch.equal(a, b)
        for a, b in zip(ours2.state_dict().values(), theirs.state_dict().values(), strict=True)
    )


class _Numbered(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
        self.head = nn.Linear(2, 1)


@pytest.mark.parametrize(
    "include, exclude",
    [
        (["net.1."], []),  # zuko's way to pick net.1 and not net.10
        (["net.1.", "head."], ["net.1.bias"]),
        ({"net.1.", "head"}, ()),  # a set
        (dict.fromkeys(["net.10", "head.weight"]).keys(), iter(["net.10.bias"])),
        ((p for p in ["net.*."]), ["**.bias"]),  # a generator
        (["**weight"], []),  # `**` within a segment: these were refused as malformed
        (["net**.bias"], ["h**"]),
        (["***"], ["net.1**"]),
    ],
    ids=[
        "trailing-dot",
        "trailing-dots",
        "set",
        "dict-keys",
        "generator",
        "**weight",
        "net**.bias",
        "***",
    ],
)
def test_picks_what_zuko_picks_from_what_zuko_takes(include, exclude):
    include, exclude = list(include), list(exclude)  # the same patterns for both, once
    ours = bf.BayesianModel(_Numbered(), include_params=set(include), exclude_params=iter(exclude))
    theirs = zuko.bayesian.BayesianModel(
        _Numbered(), include_params=include, exclude_params=exclude
    )
    assert sorted(ours.means) == sorted(theirs.means) and len(ours.means) > 0
    assert bf.select(_Numbered(), include=iter(include), exclude=exclude) == [
        k.replace("-", ".") for k in theirs.means
    ]


@pytest.mark.parametrize(
    "make, kwargs",
    [
        (_Numbered, dict(include_params=["net.1"])),  # zuko: net.1, net.10, net.11
        (lambda: zuko.nn.MLP(3, 5), dict(include_params=["0.w"])),  # zuko: 0.weight
        (lambda: zuko.nn.MLP(3, 5), dict(exclude_params=["0.b", "2.b"])),  # zuko: biases out
        (lambda: nn.Sequential(nn.LSTM(3, 4)), dict(exclude_params=["**.bias"])),
    ],
    ids=["numbered", "prefix-include", "prefix-exclude", "lstm-bias"],
)
def test_a_selection_unlike_zukos_is_warned_of(make, kwargs):
    # Patterns match whole segments here, character prefixes in zuko: the same arguments
    # silently made other parameters Bayesian (`include_params=["0.w"]`: none here, a
    # wrapper with nothing Bayesian; `exclude_params=["0.b"]`: the biases Bayesian here).
    # Oracle: zuko's own selection.
    theirs = [k.replace("-", ".") for k in zuko.bayesian.BayesianModel(make(), **kwargs).means]
    with pytest.warns(
        UserWarning, match=r"^BayesianModel: the include/exclude patterns pick"
    ) as w:
        ours = bf.BayesianModel(make(), **kwargs)
    mine = [k.replace("-", ".") for k in ours.means]  # (both in named_parameters() order)
    assert set(mine) != set(theirs)
    only_ours = [n for n in mine if n not in theirs]
    only_theirs = [n for n in theirs if n not in mine]
    assert f"here only {only_ours}, in zuko only {only_theirs}" in str(w[0].message)


@pytest.mark.parametrize(
    "kwargs",
    [dict(include_params=[]), dict(exclude_params=["**"]), dict(include_params=["nothing"])],
    ids=["no-patterns", "all-excluded", "no-match"],
)
def test_a_selection_that_picks_nothing_is_zukos_empty_wrapper(kwargs):
    # zuko builds a wrapper with nothing Bayesian (configs switch layers off by pattern);
    # this raised. Its every method is the base model's.
    base = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    torch.manual_seed(0)
    ours = bf.BayesianModel(base, **kwargs)
    rng = torch.get_rng_state()
    torch.manual_seed(0)
    theirs = zuko.bayesian.BayesianModel(base, **kwargs)
    assert torch.equal(rng, torch.get_rng_state())  # nothing drawn by either
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.sample_params() == theirs.sample_params() == {} == ours.sample_params(3)
    assert float(ours.kl_divergence(0.5)) == theirs.kl_divergence(0.5) == 0.0
    x = torch.randn(5, 3)
    for local in (False, True):
        with ours.reparameterize(local_trick=local) as a, theirs.reparameterize() as b:
            assert torch.equal(a(x), b(x)) and torch.equal(a(x), base(x))
    assert torch.equal(ours(x), base(x))
    assert torch.equal(ours(x, n=4), base(x).expand(4, 5, 2))
    xs = torch.randn(4, 5, 3)  # an argument per sample: vmap maps over it
    assert torch.allclose(ours(xs, n=4, in_dims=(0,)), base(xs), rtol=1e-14, atol=1e-15)
    assert torch.equal(ours.sample_model()(x), base(x))
    assert torch.equal(ours.mean_model()(x), base(x))


FLAGS = {
    "0": (0, False),
    "1": (1, True),
    "None": (None, False),
    "np.int64(1)": (np.int64(1), True),
    "np.True_": (np.True_, True),
    "np.False_": (np.False_, False),
    "tensor(True)": (torch.tensor(True), True),
    "tensor([False])": (torch.tensor([False]), False),
    "tensor([[1]])": (torch.tensor([[1]]), True),
    "tensor(0, uint8)": (torch.tensor(0, dtype=torch.uint8), False),
}


@pytest.mark.parametrize("flag, local", FLAGS.values(), ids=FLAGS)
def test_local_trick_flags_as_zuko_reads_them(flag, local):
    bnet = bf.BayesianModel(zuko.nn.MLP(3, 2, hidden_features=(8,)), init_logvar=-2.0)
    x = torch.randn(4, 3)
    with bnet.reparameterize(local_trick=flag, generator=torch.Generator().manual_seed(0)) as net:
        y = net(x)
    with bnet.reparameterize(local_trick=local, generator=torch.Generator().manual_seed(0)) as net:
        assert torch.equal(y, net(x))
    with bnet.reparameterize(
        local_trick=not local, generator=torch.Generator().manual_seed(0)
    ) as net:
        assert not torch.allclose(y, net(x))  # the flag changed the estimator
    for bad in ("yes", 2, torch.tensor(2), torch.tensor(1.0), torch.tensor([True, False])):
        with pytest.raises(TypeError, match=r"reparameterize: expected local_trick to be a bool"):
            with bnet.reparameterize(local_trick=bad):
                pass


def test_reparameterize_behaves_like_zuko():
    ours, theirs = pair("mlp", init_logvar=-2.0)
    x = torch.randn(5)
    before = snapshot(ours.base)
    originals = list(ours.base.parameters())

    with ours.reparameterize() as net:
        y1, y2 = net(x), net(x)
        assert torch.equal(y1, y2)  # deterministic within the context
    assert not torch.allclose(y1, ours.mean_model()(x), atol=1e-6)  # sampled
    (g_mean,) = torch.autograd.grad(y1.sum(), [ours.means["0-weight"]])
    assert g_mean.abs().sum() > 0

    assert unchanged(before, ours.base)
    assert all(a is b for a, b in zip(originals, ours.base.parameters(), strict=True))

    # the same distribution of outputs as zuko's: means and variances within 5 standard errors
    n = 2000
    with torch.no_grad():
        ys = torch.stack([_reparameterized(ours, x) for _ in range(n)])
        zs = torch.stack([_reparameterized(theirs, x) for _ in range(n)])
    _same_moments(ys, zs)


def _reparameterized(bnet, x, **kwargs):
    with bnet.reparameterize(**kwargs) as net:
        return net(x)


def _same_moments(ys, zs):
    n = ys.shape[0]
    se_mean = torch.sqrt((ys.var(0) + zs.var(0)) / n)
    assert torch.all((ys.mean(0) - zs.mean(0)).abs() < 5 * se_mean)
    # the variance of a sample variance is about 2 var^2 / n (near Gaussian outputs)
    se_var = torch.sqrt(2 * (ys.var(0) ** 2 + zs.var(0) ** 2) / n)
    assert torch.all((ys.var(0) - zs.var(0)).abs() < 5 * se_var)


@pytest.mark.parametrize("kind", ["mlp", "masked-mlp"])
def test_local_trick_behaves_like_zuko(kind):
    if kind == "mlp":
        base = zuko.nn.MLP(3, 2, hidden_features=(8,))
    else:
        base = zuko.nn.MaskedMLP(torch.tril(torch.ones(3, 3, dtype=torch.bool), -1), (8,))
    torch.manual_seed(0)
    ours = bf.BayesianModel(base, init_logvar=-2.0)
    torch.manual_seed(0)
    theirs = zuko.bayesian.BayesianModel(base, init_logvar=-2.0)
    x = torch.randn(4, 3)

    with ours.reparameterize(local_trick=True) as net:
        assert torch.equal(net(x), net(x))  # the noise is cached per layer and shape
        y = net(x)
    assert not torch.allclose(y[0], y[1])
    (g,) = torch.autograd.grad(y.sum(), [ours.logvars["0-weight"]])
    assert g.abs().sum() > 0
    assert all("forward" not in m.__dict__ for m in base.modules())  # restored

    n = 2000
    with torch.no_grad():
        ys = torch.stack([_reparameterized(ours, x, local_trick=True) for _ in range(n)])
        zs = torch.stack([_reparameterized(theirs, x, local_trick=True) for _ in range(n)])
    _same_moments(ys, zs)

    if kind == "masked-mlp":  # the mask still holds: output i ignores inputs j >= i
        with ours.reparameterize(local_trick=True) as net:
            jac = torch.autograd.functional.jacobian(lambda v: net(v), x[0])
        assert torch.all(jac[~torch.tril(torch.ones(3, 3, dtype=torch.bool), -1)] == 0)


def test_local_trick_after_zukos_own_block_still_applies():
    # zuko's local trick puts the layers' forwards back as instance attributes (the
    # class's own, bound): taken for a forward of the user's, every layer was then sampled
    # whole, silently, in bayesflow's local trick on the same module.
    base = zuko.nn.MLP(3, 2, hidden_features=(8,))
    twin = copy.deepcopy(base)
    with zuko.bayesian.BayesianModel(base, init_logvar=-2.0).reparameterize(local_trick=True) as n:
        n(torch.randn(4, 3))
    assert any("forward" in vars(m) for m in base.modules())  # what zuko leaves
    x = torch.randn(1, 3).expand(64, 3)  # the same input in every row
    state = bf.BayesianModel(twin, init_logvar=-2.0).state_dict()
    outs = []
    for net in (base, twin):
        bnet = bf.BayesianModel(net, init_logvar=-2.0)
        bnet.load_state_dict(state)
        with bnet.reparameterize(
            local_trick=True, generator=torch.Generator().manual_seed(0)
        ) as f:
            outs.append(f(x))
    assert torch.equal(outs[0], outs[1])
    assert outs[0].std(0).min() > 0  # every row its own noise: the local trick


@pytest.mark.parametrize("exact", [True, False])
def test_local_trick_runs_continuous_flows(exact):
    # The exact trace of a CNF runs, in bayesflow's stand-in, under a vmap over the
    # Jacobian's columns, where the local trick drew its noise on first use: vmap refused
    # the draw (zuko's own loop over the columns draws outside any transform).
    torch.manual_seed(0)
    flow = zuko.flows.CNF(3, 2, hidden_features=(16, 16), exact=exact)
    bnet = bf.BayesianModel(flow, init_logvar=-3.0)
    c, x = torch.randn(6, 2), torch.randn(6, 3)
    lps = []
    for seed in (0, 0, 1):
        g = torch.Generator().manual_seed(seed)
        with bnet.reparameterize(local_trick=True, generator=g) as f:
            torch.manual_seed(2)  # the Hutchinson estimator's probe
            lp = f(c).log_prob(x)
            torch.manual_seed(2)
            assert torch.equal(f(c).log_prob(x), lp)  # the noise is drawn once per block
            if exact:  # zuko's own trace (autograd.grad per column), on the same noise
                dist = f(c)
                call = zuko.transforms.FreeFormJacobianTransform.call_and_ladj
                z, ladj = call.bayesflow_original(dist.transform, x)
                torch.testing.assert_close(dist.base.log_prob(z) + ladj, lp)
        lps.append(lp)
    assert torch.equal(lps[0], lps[1]) and not torch.allclose(lps[0], lps[2])
    (g,) = torch.autograd.grad(lps[0].sum(), [bnet.logvars["transform-ode-0-weight"]])
    assert g.abs().sum() > 0


def test_local_trick_covers_linear_subclasses():
    class MyLinear(nn.Linear):
        pass

    bnet = bf.BayesianModel(nn.Sequential(MyLinear(3, 2)), init_logvar=-2.0)
    x = torch.randn(1, 3).expand(64, 3)  # the same input in every row

    with bnet.reparameterize(local_trick=True) as net:
        y = net(x)

    # with the local trick every row gets its own noise, without it all rows are equal
    assert y.std(0).min() > 0
    with bnet.reparameterize() as net:
        assert torch.allclose(net(x).std(0), torch.zeros(2))


def test_local_trick_leaves_linear_subclasses_with_their_own_forward_alone():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    bnet = bf.BayesianModel(nn.Sequential(Scaled(3, 2)), init_logvar=-2.0)
    x = torch.randn(1, 3).expand(64, 3)
    g = torch.Generator(torch.get_default_device())

    with bnet.reparameterize(local_trick=True, generator=g.manual_seed(0)) as net:
        y = net(x)
    with bnet.reparameterize(generator=g.manual_seed(0)) as net:
        expected = net(x)

    # its own forward ran, on one sampled weight: all rows equal, twice the linear output
    assert torch.equal(y, expected) and torch.allclose(y.std(0), torch.zeros(2))
    assert "forward" not in bnet.base[0].__dict__


def test_sample_model_and_mean_model():
    bnet, _ = pair("mlp", init_logvar=-3.0)
    before = snapshot(bnet)
    x = torch.randn(4, 5)

    a, b = bnet.sample_model(), bnet.sample_model()
    m = bnet.mean_model()

    assert a is not bnet.base and not torch.allclose(a(x), b(x), atol=1e-6)
    assert all(p.grad_fn is None for p in a.parameters())
    assert torch.allclose(m(x), bf.mean_model(bnet.base, bnet.posterior)(x))
    assert unchanged(before, bnet)

    g = torch.Generator(torch.get_default_device())
    same = [bnet.sample_model(generator=g.manual_seed(5))(x) for _ in range(2)]
    assert torch.equal(*same)


def test_forward_is_the_vectorized_call():
    ours, _ = pair("nsf-partial", init_logvar=-3.0)
    c, x = torch.randn(7, 1), torch.randn(7, 2)
    g = torch.Generator(torch.get_default_device())

    y = ours(c, x, n=5, fn=log_prob, generator=g.manual_seed(1))
    params = ours.sample_params(5, generator=g.manual_seed(1))
    y_loop = bf.loop_call(ours.base, params, c, x, fn=log_prob)

    assert y.shape == (5, 7)
    assert torch.allclose(y, y_loop, atol=1e-10)
    assert not torch.allclose(y[0], log_prob(ours.mean_model(), c, x), atol=1e-6)

    one = ours(c, x, fn=log_prob, generator=g.manual_seed(2))
    assert one.shape == (7,)
    assert torch.allclose(one, ours(c, x, n=1, fn=log_prob, generator=g.manual_seed(2))[0])

    (grad,) = torch.autograd.grad(
        y.mean(), [ours.logvars["transform-transforms-0-hyper-4-weight"]]
    )
    assert grad.abs().sum() > 0

    with pytest.raises(TypeError, match=r"BayesianModel.forward: expected fn to return tensors"):
        ours(c)


def test_posterior_is_a_view():
    bnet, _ = pair("mlp")
    q = bnet.posterior

    assert list(q.mean) == [k.replace("-", ".") for k in bnet.means]
    assert all(a is b for a, b in zip(q.mean.values(), bnet.means.values(), strict=True))
    bf.kl_divergence(q).backward()
    assert all(p.grad is not None for p in bnet.logvars.values())


def test_attribute_pass_through_save_load_and_repr():
    bnet, _ = pair("nsf-tutorial")

    assert bnet.transform is bnet.base.transform
    with pytest.raises(AttributeError):
        bnet.does_not_exist  # noqa: B018

    buffer = io.BytesIO()
    torch.save(bnet, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)

    assert type(loaded) is bf.BayesianModel
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), bnet.state_dict().values(), strict=True)
    )
    c, x = torch.randn(3, 5), torch.randn(3, 3)
    g = torch.Generator(torch.get_default_device())
    assert torch.equal(
        loaded(c, x, n=2, fn=log_prob, generator=g.manual_seed(0)),
        bnet(c, x, n=2, fn=log_prob, generator=g.manual_seed(0)),
    )

    text = repr(bnet)
    assert text.startswith("BayesianModel(") and "bayesian_tensors=3" in text
    assert "(means): ParameterDict(" in text and "(base): NSF(" in text


def test_swap_restores_on_error():
    net = nn.Linear(2, 2)
    weight = net.weight
    new = {"weight": torch.zeros(2, 2)}

    with (
        pytest.raises(KeyError),
        bayesflow._swap.swapped(bayesflow._structure.structure(net), new),
    ):
        assert torch.equal(net.weight, torch.zeros(2, 2))
        raise KeyError("boom")

    assert net.weight is weight


def test_init_logvar_noise_like_zuko():
    bnet = bf.BayesianModel(nn.Linear(100, 100), init_logvar=-4.0)
    lv = bnet.logvars["weight"]

    assert abs(lv.mean().item() + 4.0) < 5 * 1e-3 / math.sqrt(lv.numel())
    assert abs(lv.std().item() - 1e-3) < 5 * 1e-3 / math.sqrt(2 * lv.numel())


def test_failed_calls_draw_nothing_and_name_the_method():
    bnet = bf.BayesianModel(zuko.nn.MLP(3, 2))
    x = torch.randn(5, 3)
    state = torch.random.get_rng_state()
    with pytest.raises(
        ValueError, match=r"BayesianModel\.forward: expected argument 0 to be per-sample"
    ):
        bnet(x, n=4, in_dims=(0,))  # x has no sample dim of 4
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(TypeError, match=r"BayesianModel\.sample_model: expected generator"):
        bnet.sample_model(generator=1)


@pytest.mark.parametrize("method", ["forward", "sample_model", "reparameterize"])
def test_a_non_finite_posterior_is_refused_by_the_method_called(method):
    bnet = bf.BayesianModel(nn.Linear(3, 2), init_logvar=-3.0)
    with torch.no_grad():
        bnet.logvars["weight"][0, 0] = math.nan
    before, x = snapshot(bnet), torch.randn(4, 3)
    calls = {
        "forward": lambda: bnet(x),
        "sample_model": bnet.sample_model,
        "reparameterize": lambda: bnet.reparameterize().__enter__(),
    }
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match=rf"^BayesianModel\.{method}: expected finite values"):
        calls[method]()
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(before, snapshot(bnet), strict=True):  # (the NaN too)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_local_trick_leaves_tied_layers_with_the_held_sample():
    net = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    net[2].weight = net[0].weight
    bnet = bf.BayesianModel(net, init_logvar=-2.0)
    x = torch.randn(4, 3)
    with bnet.reparameterize(local_trick=True, generator=torch.Generator().manual_seed(0)) as m:
        w = m[0].weight  # the held sample, in both places
        assert m[2].weight is w
        expected = F.linear(torch.tanh(F.linear(x, w, m[0].bias)), w, m[2].bias)
        assert torch.equal(m(x), expected)
    assert not torch.equal(w, bnet.posterior.mean["0.weight"])  # a sample, not the mean


@pytest.mark.parametrize("local_trick", [False, True])
def test_reparameterize_blocks_left_out_of_order(local_trick):
    # Enter A, enter B, leave A, leave B: A put its originals back under B, and B then put
    # back A's sample, which stayed in the base for good (zuko does the same).
    torch.manual_seed(0)
    base = zuko.nn.MLP(3, 2, hidden_features=(8,))
    bnet = bf.BayesianModel(base, init_logvar=-2.0)
    x = torch.randn(4, 3)
    before = snapshot(base)
    originals = list(base.parameters())
    forwards = [dict(vars(m)) for m in base.modules()]

    a = bnet.reparameterize(local_trick=local_trick, generator=torch.Generator().manual_seed(1))
    b = bnet.reparameterize(local_trick=local_trick, generator=torch.Generator().manual_seed(2))
    a.__enter__()
    y_a = base(x)
    b.__enter__()
    y_b = base(x)
    assert not torch.allclose(y_a, y_b)  # each block holds its own sample
    a.__exit__(None, None, None)
    assert torch.equal(base(x), y_b)  # B's block still sees B's sample
    b.__exit__(None, None, None)

    assert all(p is q for p, q in zip(base.parameters(), originals, strict=True))
    assert unchanged(before, base)
    assert [dict(vars(m)) for m in base.modules()] == forwards  # no forward left patched


def test_calls_on_a_module_holding_the_base_or_held_by_it_inside_a_local_trick_block(gen):
    # Inside reparameterize(local_trick=True), calls on the base run its own layers; calls
    # on a module that holds the base (or on a layer of the base) kept the block's local
    # forwards, which read the wrapper's posterior: the call's own samples were ignored,
    # in the loop too (off by 1.8).
    base = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    bnet = bf.BayesianModel(base, init_logvar=-1.0)
    outer = nn.Sequential(base, nn.Tanh())
    x = torch.randn(5, 3)
    cases = []
    for module, arg in ((outer, x), (base[0], x)):
        for k in (3, 1):
            params = bf.sample(bf.init(module, init_logvar=-1.0), k, generator=gen(k))
            copies = [copy.deepcopy(module) for _ in range(k)]
            for i, c in enumerate(copies):
                c.load_state_dict({name: v[i] for name, v in params.items()})
            expected = torch.stack([c(arg) for c in copies])
            cases.append((module, params, arg, expected))
    with bnet.reparameterize(local_trick=True, generator=gen(0)):
        for module, params, arg, expected in cases:
            for call in (bf.vmap_call, bf.loop_call):
                got = call(module, params, arg)
                assert torch.allclose(got, expected, atol=1e-10)
                assert got.shape[0] == 1 or not torch.allclose(got[0], got[1])


def test_blocks_of_two_wrappers_on_one_base_left_out_of_order():
    # Two wrappers of one base with disjoint selections (an encoder, a head): leaving the
    # encoder's block first handed its whole swap to the head's, so the encoder's sample
    # stayed in the base until the head's block ended, and a loss computed after the
    # encoder's block sent gradients into its means (zuko puts its weights back).
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    originals = list(base.parameters())
    before = snapshot(base)
    enc = bf.BayesianModel(base, init_logvar=-2.0, include_params=["0.*"])
    head = bf.BayesianModel(base, init_logvar=-2.0, include_params=["2.*"])
    again = bf.BayesianModel(base, init_logvar=-2.0, include_params=["0.*"])

    a, b = enc.reparameterize(), head.reparameterize()
    a.__enter__()
    b.__enter__()
    sampled_head = base[2].weight
    assert sampled_head is not originals[2]
    a.__exit__(None, None, None)
    assert base[0].weight is originals[0] and base[0].bias is originals[1]
    assert base[2].weight is sampled_head  # the head's block is still open
    base(x).square().sum().backward()
    assert all(m.grad is None for m in enc.posterior.mean.values())
    assert all(m.grad is not None for m in head.posterior.mean.values())
    b.__exit__(None, None, None)
    assert all(p is q for p, q in zip(base.parameters(), originals, strict=True))

    # Three blocks, the first left first: a place a later block holds too keeps that
    # block's sample, and goes back to the base's own weight when that block ends.
    a, b, c = enc.reparameterize(), head.reparameterize(), again.reparameterize()
    a.__enter__()
    b.__enter__()
    c.__enter__()
    held = base[0].weight
    a.__exit__(None, None, None)
    assert base[0].weight is held and base[2].weight is not originals[2]
    c.__exit__(None, None, None)
    assert base[0].weight is originals[0] and base[2].weight is not originals[2]
    b.__exit__(None, None, None)
    assert all(p is q for p, q in zip(base.parameters(), originals, strict=True))
    assert unchanged(before, base)


def _returns_str(m, x):
    m(x)
    return "oops"


def _raises(m, x):
    m(x)
    raise RuntimeError("fn fails after its forward pass")


@pytest.mark.parametrize(
    "fn, error, message",
    [
        (_returns_str, TypeError, r"BayesianModel\.forward: expected fn to return tensors"),
        (_raises, RuntimeError, "fn fails after"),
    ],
    ids=["output-refused", "fn-raises"],
)
@pytest.mark.parametrize("n", [None, 1, 3])
def test_a_failed_forward_leaves_the_generator_as_found(n, fn, error, message, device):
    # The parameters were sampled, then fn's output was refused: the generator given was
    # left advanced. (torch's global one is not put back: other threads draw from it.)
    bnet = bf.BayesianModel(nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)))
    x = torch.randn(6, 3)
    before = snapshot(bnet)
    g = torch.Generator(device).manual_seed(1)
    found = g.get_state()
    with pytest.raises(error, match=message):
        bnet(x, n=n, fn=fn, generator=g)
    assert torch.equal(g.get_state(), found)
    assert unchanged(before, bnet)

    # A retry draws what the failed call drew.
    y = bnet(x, n=n, generator=g)
    fresh = torch.Generator(device).manual_seed(1)
    assert torch.allclose(y, bnet(x, n=n, generator=fresh), atol=1e-12)


@pytest.mark.parametrize("n", [None, 3])
def test_a_base_converted_after_wrapping_leaves_the_generator_as_found(n, device):
    # The posterior was sampled in the base's old dtype, then the call refused the samples.
    bnet = bf.BayesianModel(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).float())
    bnet.base.double()  # the posterior keeps float32 means
    g = torch.Generator(device).manual_seed(1)
    found = g.get_state()
    with pytest.raises(ValueError, match=r"BayesianModel\.forward: expected .*'0\.weight'"):
        bnet(torch.randn(5, 3, dtype=torch.float64), n=n, generator=g)
    assert torch.equal(g.get_state(), found)


def test_an_empty_wrapper_updates_buffers_once_per_call():
    # forward(n=K) on a wrapper with nothing Bayesian made K calls, which moved the
    # running statistics K times; a wrapper with a Bayesian tensor moves them once.
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))  # train mode
    x = torch.randn(16, 3)
    oracle = copy.deepcopy(base)
    y = oracle(x)  # one train-mode call
    bnet = bf.BayesianModel(copy.deepcopy(base), include_params=["nothing"])
    # A Bayesian shift after the statistics, which it leaves as they are.
    shift = bf.BayesianModel(copy.deepcopy(base), include_params=["1.bias"])

    for wrapper in (bnet, shift):
        assert wrapper(x, n=4).shape == (4, 16, 4)
        bn, expected = wrapper.base[1], oracle[1]
        assert bn.num_batches_tracked.item() == expected.num_batches_tracked.item() == 1
        assert torch.allclose(bn.running_mean, expected.running_mean, rtol=0, atol=1e-15)
        assert torch.allclose(bn.running_var, expected.running_var, rtol=0, atol=1e-15)
    assert torch.equal(bnet(x, n=4), y.expand(4, 16, 4))  # nothing Bayesian: the base's
    assert bnet.base[1].num_batches_tracked.item() == 2


def _renamed():
    bnet = bf.BayesianModel(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), 0.0)
    parametrizations.weight_norm(bnet.base[0])  # '0.weight' is now a parametrization
    return bnet, r"expected posterior names and shapes .* got '0\.weight'"


def _converted():
    bnet = bf.BayesianModel(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).float(), 0.0)
    bnet.base.double()  # the posterior keeps float32 means
    return bnet, r"expected the posterior's mean\['0\.weight'\] with the module's dtype"


CHANGED = {"renamed": _renamed, "converted": _converted}


@pytest.mark.parametrize("change", CHANGED)
def test_sample_model_refuses_a_posterior_that_no_longer_fits(change, device):
    # The sample was loaded with strict=False: a renamed weight kept the base's own value,
    # returned as a "posterior sample"; a converted base got the sample cast.
    bnet, message = CHANGED[change]()
    g = torch.Generator(device).manual_seed(1)
    found = g.get_state()
    before = snapshot(bnet)
    with pytest.raises(ValueError, match=r"BayesianModel\.sample_model: " + message):
        bnet.sample_model(generator=g)
    assert torch.equal(g.get_state(), found)  # nothing drawn
    assert unchanged(before, bnet)
    with pytest.raises(ValueError, match=r"BayesianModel\.mean_model: " + message):
        bnet.mean_model()  # the same refusal


@pytest.mark.parametrize("local_trick", [False, True])
@pytest.mark.parametrize("change", CHANGED)
def test_reparameterize_refuses_a_posterior_that_no_longer_fits(change, local_trick, device):
    # It raised a bare KeyError, or torch's dtype error from inside the block, after the
    # draw.
    bnet, message = CHANGED[change]()
    g = torch.Generator(device).manual_seed(1)
    found = g.get_state()
    before = snapshot(bnet)
    originals = list(bnet.base.parameters())
    forwards = [dict(vars(m)) for m in bnet.base.modules()]
    with pytest.raises(ValueError, match=r"BayesianModel\.reparameterize: " + message):
        with bnet.reparameterize(local_trick=local_trick, generator=g):
            pass
    assert torch.equal(g.get_state(), found)  # nothing drawn
    assert unchanged(before, bnet)
    assert all(p is q for p, q in zip(bnet.base.parameters(), originals, strict=True))
    assert [dict(vars(m)) for m in bnet.base.modules()] == forwards


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_a_base_that_cannot_be_copied_is_refused_before_the_draw(gen):
    # sample_model drew, then deep-copied: torch's bare RuntimeError ("Only Tensors created
    # explicitly by the user ... support the deepcopy protocol"), the generator advanced.
    # (A hook-based weight_norm's computed weight, which made such a module uncopyable, is
    # copied detached: see below.)
    hooked = nn.Sequential(nn.utils.weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2))
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    bnets = bf.BayesianModel(hooked, init_logvar=-3.0), bf.BayesianModel(plain, init_logvar=-3.0)

    def refused(bnet):
        g = gen(0)
        state, before = g.get_state(), snapshot(bnet)
        for where, call in (
            ("BayesianModel.sample_model", lambda: bnet.sample_model(generator=g)),
            ("BayesianModel.mean_model", bnet.mean_model),
            ("mean_model", lambda: bf.mean_model(bnet.base, bnet.posterior)),
        ):
            with pytest.raises(
                ValueError, match=rf"^{where}: expected a module that copy.deepcopy"
            ):
                call()
        assert torch.equal(g.get_state(), state) and unchanged(before, bnet)

    with bnets[1].reparameterize():
        refused(bnets[1])

    # The hook-based weight_norm's copy: the sample's weight, computed by its forward.
    assert hooked[0].weight.grad_fn is not None
    new = bnets[0].sample_model(generator=gen(0))
    params = bnets[0].sample_params(generator=gen(0))
    x = torch.randn(5, 3)
    expected = bf.loop_call(hooked, {k: v[None] for k, v in params.items()}, x)[0]
    assert torch.allclose(new(x), expected) and not torch.allclose(expected, hooked(x))

    # After the block, a copy: the sample the same generator state draws.
    new = bnets[1].sample_model(generator=gen(0))
    params = bnets[1].sample_params(generator=gen(0))
    x = torch.randn(5, 3)
    assert torch.allclose(
        new(x), bf.loop_call(plain, {k: v[None] for k, v in params.items()}, x)[0]
    )
    assert not torch.allclose(new(x), plain(x))


def test_init_logvar_tensors_of_bools_or_complex_numbers_are_refused():
    # torch.tensor(True) was taken as 1.0 (a bool is refused); a complex one gave a bare
    # RuntimeError after torch's warning that it drops the imaginary part.
    for value in (torch.tensor(True), torch.tensor(1 + 2j)):
        for where, make in (
            ("init", lambda v: bf.init(nn.Linear(3, 2), init_logvar=v)),
            ("BayesianModel", lambda v: bf.BayesianModel(nn.Linear(3, 2), init_logvar=v)),
        ):
            with pytest.raises(
                TypeError, match=rf"^{where}: expected init_logvar for 'weight' to be real"
            ):
                make(value)


def test_a_block_left_in_another_thread_leaves_this_one_as_it_found_it(gen):
    # The block's stand-ins count the blocks open in a thread; one left in another thread
    # counted down that thread, so this one never installed them again, and a backward
    # pass after a later block recomputed UNAF with the module's own weights (off by 66).
    import threading

    flow = zuko.flows.UNAF(2, 1, transforms=1, hidden_features=(8,)).eval()
    bnet = bf.BayesianModel(flow, init_logvar=-3.0)
    c, x = torch.randn(5, 1, generator=gen(0)), torch.randn(5, 2, generator=gen(1))
    leaves = list(bnet.means.values())

    def inside_and_after():
        with bnet.reparameterize(generator=gen(2)) as f:
            lp = f(c).log_prob(x).sum()
            inside = torch.autograd.grad(lp, leaves, retain_graph=True)
        return inside, torch.autograd.grad(lp, leaves)

    block = bnet.reparameterize()
    block.__enter__()
    other = threading.Thread(target=block.__exit__, args=(None, None, None))
    other.start()
    other.join()

    inside, after = inside_and_after()
    assert all(
        torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(inside, after, strict=True)
    )
    assert any(a.abs().sum() > 0 for a in inside)


def test_a_double_star_within_a_segment_needs_a_character_as_zukos():
    # "**weight" picked a top-level `weight` too, which zuko's `[\w.]+` does not.
    for base in (nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2))):
        theirs = zuko.bayesian.BayesianModel(base, include_params=["**weight"])
        picked = bf.select(base, include=["**weight"], exclude=[])
        assert picked == [k.replace("-", ".") for k in theirs.means]
    assert bf.select(nn.Linear(3, 2), include=["**weight"], exclude=[]) == []


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
@pytest.mark.parametrize("local_trick", [False, True])
def test_reparameterize_puts_back_the_weights_that_hooks_assign(local_trick):
    # A hook-based weight_norm assigns `weight` from the held sample at every forward: after
    # the block, the layer kept the last sample's weight (and its graph to the posterior),
    # where every call puts the module's own back.
    torch.manual_seed(0)
    layer = torch.nn.utils.weight_norm(nn.Linear(3, 2).double())
    net = nn.Sequential(layer)
    before = layer.weight
    x = torch.randn(5, 3, dtype=torch.float64)
    bnet = bf.BayesianModel(net, init_logvar=-1.0)
    outs = []
    for _ in range(2):
        with bnet.reparameterize(local_trick=local_trick) as sampled:
            outs.append(sampled(x))
        assert layer.weight is before
    assert not torch.allclose(outs[0], outs[1])  # the samples reached the output
