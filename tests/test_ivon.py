r"""IVON against the paper's equations (written here, float64), against the reference package
ivon-opt, against itself looped, and the posterior it keeps against bayesflow's own functions.

Tolerance: 1e-12 relative to the largest magnitude of each compared tensor (float64; the
differences measured are 1e-15 to 1e-14).
"""

import contextlib
import copy
import math

import pytest
import torch
import torch.nn as nn

from torch.func import functional_call

import bayesflow as bf

from bayesflow._numerics import LOGVAR_LIMIT

from .pages import run_page
from .registry import snapshot, unchanged

try:
    import ivon
except ImportError:
    ivon = None

needs_ivon = pytest.mark.skipif(
    ivon is None,
    reason="ivon-opt is not installed (pip install --no-deps ivon-opt==0.1.3, or scripts/peers.sh)",
)

RTOL = 1e-12

# Every hyperparameter exercised; "clamped" has variances below the posterior's range.
HYPERS = {
    "defaults": dict(lr=0.1, ess=50.0),
    "decay-clip": dict(lr=0.05, ess=50.0, weight_decay=1e-2, clip_radius=0.05, hess_init=0.5),
    "raw-lr-biased": dict(lr=0.02, ess=20.0, rescale_lr=False, debias=False, beta2=0.9),
    "no-momentum": dict(lr=0.05, ess=30.0, beta1=0.0, beta2=0.5, weight_decay=0.0),
    "fast-hessian": dict(lr=0.1, ess=10.0, beta1=0.5, beta2=0.0, hess_init=2.0),
    "clamped": dict(lr=0.1, ess=1e9, beta2=0.9, hess_init=3.0),
}

DEFAULTS = dict(
    hess_init=1.0,
    beta1=0.9,
    beta2=0.99999,
    weight_decay=1e-4,
    clip_radius=math.inf,
    rescale_lr=True,
    debias=True,
)


def close(a, b, rtol=RTOL):
    return (a - b).abs().max() <= rtol * b.abs().max()


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(20, 3, generator=g), torch.randn(20, 2, generator=g)


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def size(net):
    return sum(p.numel() for p in net.parameters())


def vectorized_step(opt, net, x, y, n, generator):
    params = opt.sample(n, generator=generator)
    out = bf.vmap_call(net, params, x)  # (n, batch, 2)
    loss = (out - y).square().mean()  # the mean over samples and batch
    loss.backward()
    opt.step()
    return params


@contextlib.contextmanager
def feeding(monkeypatch, rows):
    r"""Makes `torch.randn` return `rows` one after the other (written into `out` if given)."""

    rows = iter(rows)

    def randn(*size, out=None, **kwargs):
        value = next(rows)
        return out.copy_(value.view(out.shape)) if out is not None else value.clone()

    with monkeypatch.context() as m:
        m.setattr(torch, "randn", randn)
        yield


def paper_ivon(net, x, y, eps, steps, lr, ess, **hyper):
    r"""Algorithm 1 of Shen et al. (2024), float64, sample by sample, from noise `eps[t]` of
    shape (K, P); the variance clamped to the posterior's range as bf.IVON documents."""

    h_ = DEFAULTS | hyper
    b1, b2, wd, h0 = h_["beta1"], h_["beta2"], h_["weight_decay"], h_["hess_init"]
    names = [name for name, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]

    def grad(theta):
        theta = theta.clone().requires_grad_()
        params = {n: t.view(s) for n, s, t in zip(names, shapes, theta.split(sizes), strict=True)}
        loss = (functional_call(net, params, (x,)) - y).square().mean()
        return torch.autograd.grad(loss, theta)[0]

    m = flat(net.parameters())
    h = torch.full_like(m, h0)
    g_mom = torch.zeros_like(m)
    bound = math.exp(LOGVAR_LIMIT / 2)
    for t in range(1, steps + 1):
        sigma = (1 / (ess * (h + wd)).sqrt()).clamp(1 / bound, bound)
        K = len(eps[t - 1])
        g_hat = torch.zeros_like(m)
        h_hat = torch.zeros_like(m)
        for e in eps[t - 1]:
            theta = m + sigma * e
            g = grad(theta)
            g_hat += g / K
            h_hat += g * e / sigma / K  # g (theta - m) / sigma^2, without the cancellation
        g_mom = b1 * g_mom + (1 - b1) * g_hat
        h = b2 * h + (1 - b2) * h_hat + 0.5 * (1 - b2) ** 2 * (h - h_hat) ** 2 / (h + wd)
        g_bar = g_mom / (1 - b1**t) if h_["debias"] else g_mom
        alpha = lr * (h0 + wd) if h_["rescale_lr"] else lr
        step = ((g_bar + wd * m) / (h + wd)).clamp(-h_["clip_radius"], h_["clip_radius"])
        m = m - alpha * step
    sigma = (1 / (ess * (h + wd)).sqrt()).clamp(1 / bound, bound)
    return m, h, g_mom, sigma


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("hyper", HYPERS)
def test_steps_match_the_paper(hyper, K, gen):
    net, (x, y) = make_net(), data()
    reference = copy.deepcopy(net)
    opt = bf.IVON(net, **HYPERS[hyper])
    start = flat(net.parameters())

    eps = []
    for t in range(5):
        eps.append(torch.randn(K, size(net), generator=gen(t)))
        vectorized_step(opt, net, x, y, K, gen(t))

    m, h, g_mom, sigma = paper_ivon(reference, x, y, eps, 5, **HYPERS[hyper])
    q = opt.posterior
    assert close(flat(q.mean.values()), m)
    assert close(flat(net.parameters()), m)  # the module is the mean model
    assert close(flat(opt.hess.values()), h)
    assert close(flat(opt.momentum.values()), g_mom)
    assert close(flat(bf.std(q).values()), sigma)
    assert not close(m, start, 1e-3)  # the means moved


@needs_ivon
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("hyper", [h for h in HYPERS if h != "clamped"])
def test_steps_match_ivon_opt(hyper, K, gen, monkeypatch):
    net, (x, y) = make_net(), data()
    reference = copy.deepcopy(net)
    opt = bf.IVON(net, **HYPERS[hyper])
    ref = ivon.IVON(reference.parameters(), mc_samples=K, **(DEFAULTS | HYPERS[hyper]))

    for t in range(5):
        eps = torch.randn(K, size(net), generator=gen(t))
        vectorized_step(opt, net, x, y, K, gen(t))
        with feeding(monkeypatch, eps):  # ivon-opt draws torch.randn(P) once per sample
            for _ in range(K):
                with ref.sampled_params(train=True):
                    ref.zero_grad()
                    (reference(x) - y).square().mean().backward()
            ref.step()

        state = ref.param_groups[0]
        assert close(flat(net.parameters()), flat(reference.parameters()))
        assert close(flat(opt.hess.values()), state["hess"])
        assert close(flat(opt.momentum.values()), state["momentum"])
        ess, wd = HYPERS[hyper]["ess"], state["weight_decay"]
        assert close(flat(bf.std(opt.posterior).values()), 1 / (ess * (state["hess"] + wd)).sqrt())


@needs_ivon
def test_training_matches_ivon_opt_on_the_same_seeds(monkeypatch):
    r"""Minibatches, a cosine learning-rate schedule and K = 4: the same run, step by step."""

    net = make_net()
    reference = copy.deepcopy(net)
    x, y = torch.randn(64, 3), torch.randn(64, 2)
    hyper = dict(lr=0.2, ess=64.0, weight_decay=1e-3, beta2=0.999)
    opt = bf.IVON(net, **hyper)
    ref = ivon.IVON(reference.parameters(), mc_samples=4, **hyper)
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(o, 12) for o in (opt, ref)]

    generator = torch.Generator().manual_seed(7)
    for _ in range(3):
        for i in torch.randperm(64, generator=generator).split(16):
            state = generator.get_state()
            eps = torch.randn(4, size(net), generator=generator)
            generator.set_state(state)
            vectorized_step(opt, net, x[i], y[i], 4, generator)
            with feeding(monkeypatch, eps):
                for _ in range(4):
                    with ref.sampled_params(train=True):
                        ref.zero_grad()
                        (reference(x[i]) - y[i]).square().mean().backward()
                ref.step()
            for s in schedules:
                s.step()

    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] < 0.2
    assert close(flat(net.parameters()), flat(reference.parameters()))
    assert close(flat(opt.hess.values()), ref.param_groups[0]["hess"])


def test_one_pass_equals_a_loop_of_draws(gen, monkeypatch):
    r"""K samples in one vectorized draw step as K draws of one sample, each backpropagated
    on its own (the loop of ivon-opt, here through bf.IVON itself)."""

    net, (x, y) = make_net(), data()
    looped = copy.deepcopy(net)
    opt = bf.IVON(net, **HYPERS["decay-clip"])
    loop_opt = bf.IVON(looped, **HYPERS["decay-clip"])

    for t in range(3):
        eps = torch.randn(3, size(net), generator=gen(t))
        params = vectorized_step(opt, net, x, y, 3, gen(t))
        with feeding(monkeypatch, eps.unsqueeze(1)):
            for _ in range(3):
                sample = loop_opt.sample(1)
                (bf.vmap_call(looped, sample, x) - y).square().mean().backward()
        loop_opt.step()
        # every sample changed the output: they are not the mean model
        out = bf.vmap_call(net, {k: v.detach() for k, v in params.items()}, x)
        assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], net(x))

    assert close(flat(net.parameters()), flat(looped.parameters()))
    assert close(flat(opt.hess.values()), flat(loop_opt.hess.values()))
    assert close(flat(opt.momentum.values()), flat(loop_opt.momentum.values()))


def test_same_seeds_same_run(gen):
    runs = []
    for _ in range(2):
        net, (x, y) = make_net(), data()
        opt = bf.IVON(net, lr=0.1, ess=20.0)
        generator = gen(3)
        for _ in range(4):
            vectorized_step(opt, net, x, y, 2, generator)
        runs.append(flat(net.parameters()))
    assert torch.equal(*runs)


def test_the_posterior_works_everywhere(gen):
    net, (x, y) = make_net(), data()
    opt = bf.IVON(net, lr=0.1, ess=20.0, weight_decay=1e-2)
    for t in range(3):
        vectorized_step(opt, net, x, y, 4, gen(t))
    q = opt.posterior

    # sigma^2 = 1 / (ess (h + weight_decay)), through the posterior's softclip
    var = flat(bf.std(q).values()) ** 2
    assert close(var, 1 / (20.0 * (flat(opt.hess.values()) + 1e-2)))

    # bf.sample draws what IVON.sample draws for the same generator state
    ours = opt.sample(5, generator=gen(9))
    theirs = bf.sample(q, 5, generator=gen(9))
    for name in q.mean:
        assert close(ours[name].detach(), theirs[name])
    opt.zero_grad()

    # the module is the mean model; the samples change the output
    out = bf.vmap_call(net, theirs, x)
    assert torch.allclose(bf.mean_model(net, q)(x), net(x), rtol=0, atol=0)
    assert not torch.allclose(out[0], net(x))
    assert torch.allclose(out, bf.loop_call(net, theirs, x), atol=1e-12)
    assert torch.isfinite(bf.kl_divergence(q)) and not q.mean["0.weight"].requires_grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logvar_round_trip_and_clamp(dtype):
    r"""The posterior holds log-variances through zuko's softclip; IVON writes its inverse,
    and clamps log-variances beyond +-LOGVAR_LIMIT (17.98)."""

    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    y = torch.linspace(-21.0, 21.0, 421, dtype=torch.float64)
    net = nn.Linear(len(y), 1, bias=False).to(dtype)
    nn.init.zeros_(net.weight)  # theta - m = sigma * eps exactly
    opt = bf.IVON(net, lr=0.1, ess=1.0, weight_decay=0.0, hess_init=1.0)
    opt.hess["weight"].copy_(torch.exp(-y).to(dtype))  # sigma^2 = 1 / h = e^y
    opt.param_groups[0]["weight_decay"] = 1e-300  # refreshes the variances at the next draw
    params = opt.sample(2, generator=torch.Generator().manual_seed(0))

    logvar = opt.posterior.logvar["weight"].double()
    assert torch.isfinite(logvar).all()
    expected = y.clamp(-LOGVAR_LIMIT, LOGVAR_LIMIT)
    got = bf.std(opt.posterior)["weight"].double().square().log().view(-1)
    assert (got - expected).abs().max() <= rtol * LOGVAR_LIMIT

    # the samples use the clamped standard deviation, the posterior's
    eps = torch.randn(2, len(y), generator=torch.Generator().manual_seed(0), dtype=dtype)
    noise = (params["weight"] - net.weight).detach().view(2, -1)
    assert torch.allclose(noise, eps * (expected / 2).exp().to(dtype), rtol=10 * rtol, atol=0)
    assert ((y < -LOGVAR_LIMIT) | (y > LOGVAR_LIMIT)).any()


def test_only_the_picked_parameters(gen):
    net, (x, y) = make_net(), data()
    before = snapshot(net[2])
    opt = bf.IVON(net, lr=0.1, ess=20.0, include=["0"])
    params = opt.sample(2, generator=gen(0))
    assert list(params) == list(opt.posterior.mean) == ["0.weight", "0.bias"]
    (bf.vmap_call(net, params, x) - y).square().mean().backward()
    opt.step()

    assert unchanged(before, net[2])  # never touched, although it has a gradient
    assert net[2].weight.grad is not None
    assert not torch.equal(net[0].weight, make_net()[0].weight)


def test_draws_add_up_and_are_consumed(gen):
    net, (x, y) = make_net(), data()
    twice = copy.deepcopy(net)
    opt, opt2 = bf.IVON(net, lr=0.1, ess=20.0), bf.IVON(twice, lr=0.1, ess=20.0)

    # two backward passes through one draw accumulate, as for any leaf
    params = opt.sample(2, generator=gen(0))
    loss = (bf.vmap_call(net, params, x) - y).square().mean()
    loss.backward(retain_graph=True)
    loss.backward()
    params2 = opt2.sample(2, generator=gen(0))
    (2 * (bf.vmap_call(twice, params2, x) - y).square().mean()).backward()
    # a draw that no gradient reached (e.g. for monitoring) is ignored
    opt.sample(3, generator=gen(5))
    opt.step()
    opt2.step()
    assert close(flat(net.parameters()), flat(twice.parameters()))

    with pytest.raises(RuntimeError, match=r"IVON\.step: expected gradients of the samples"):
        opt.step()  # the draw was consumed

    params = opt.sample(1, generator=gen(1))
    (bf.vmap_call(net, params, x) - y).square().mean().backward()
    opt.zero_grad()  # drops it
    with pytest.raises(RuntimeError, match=r"IVON\.step: expected gradients"):
        opt.step()


def test_step_with_a_closure(gen):
    net, (x, y) = make_net(), data()
    other = copy.deepcopy(net)
    opt, opt2 = bf.IVON(net, lr=0.1, ess=20.0), bf.IVON(other, lr=0.1, ess=20.0)

    def closure():
        loss = (bf.vmap_call(net, opt.sample(2, generator=gen(0)), x) - y).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    vectorized_step(opt2, other, x, y, 2, gen(0))
    assert loss.shape == () and close(flat(net.parameters()), flat(other.parameters()))


def test_changed_hyperparameters_take_effect(gen):
    net = make_net()
    opt = bf.IVON(net, lr=0.1, ess=20.0)
    opt.param_groups[0]["ess"] = 80.0
    opt.sample(1, generator=gen(0))
    var = flat(bf.std(opt.posterior).values()) ** 2
    assert close(var, 1 / (80.0 * (flat(opt.hess.values()) + 1e-4)))

    opt.param_groups[0]["beta1"] = 1.0
    with pytest.raises(ValueError, match=r"IVON\.sample: expected 0 <= beta1 < 1, got 1.0"):
        opt.sample(1)


@pytest.mark.parametrize("saved", ["now", "without-shapes"])
def test_state_dict_resumes_training(saved, gen, tmp_path):
    # "without-shapes": a state saved before the parameters' shapes were kept still loads.
    net, (x, y) = make_net(), data()
    opt = bf.IVON(net, lr=0.1, ess=20.0, weight_decay=1e-3)
    for t in range(3):
        vectorized_step(opt, net, x, y, 2, gen(t))
    state = opt.state_dict()
    if saved == "without-shapes":
        del state["param_groups"][0]["shapes"]
    torch.save(state, tmp_path / "ivon.pt")
    for t in range(3, 5):
        vectorized_step(opt, net, x, y, 2, gen(t))

    resumed = make_net()  # a fresh module: the means come from the state
    opt2 = bf.IVON(resumed, lr=1.0, ess=1.0)
    opt2.load_state_dict(torch.load(tmp_path / "ivon.pt"))
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["ess"] == 20.0
    for t in range(3, 5):
        vectorized_step(opt2, resumed, x, y, 2, gen(t))

    assert torch.equal(flat(resumed.parameters()), flat(net.parameters()))
    assert torch.equal(flat(opt2.posterior.logvar.values()), flat(opt.posterior.logvar.values()))


def test_repr():
    text = repr(bf.IVON(make_net(), lr=0.1, ess=20.0))
    assert text.startswith("IVON(4 tensors, 50 parameters, lr=0.1, ess=20.0")


BAD = [
    ("module", dict(module="net"), TypeError, "IVON: expected a torch.nn.Module, got str"),
    ("bridge", dict(module=bf.BayesianModel(nn.Linear(2, 2))), TypeError, "IVON: expected the"),
    ("lr", dict(lr=-1.0), ValueError, "IVON: expected a finite lr >= 0, got -1.0"),
    ("lr-type", dict(lr="big"), TypeError, "IVON: expected lr to be a number, got str"),
    ("ess", dict(ess=0.0), ValueError, "IVON: expected a finite ess > 0, got 0.0"),
    ("hess-init", dict(hess_init=0.0), ValueError, "IVON: expected a finite hess_init > 0"),
    ("beta1", dict(beta1=1.0), ValueError, r"IVON: expected 0 <= beta1 < 1, got 1.0"),
    ("beta2", dict(beta2=1.5), ValueError, r"IVON: expected 0 <= beta2 <= 1, got 1.5"),
    ("decay", dict(weight_decay=-1e-4), ValueError, "IVON: expected a finite weight_decay >= 0"),
    ("clip", dict(clip_radius=0.0), ValueError, "IVON: expected a finite clip_radius > 0"),
    ("rescale", dict(rescale_lr=1), TypeError, "IVON: expected rescale_lr to be a bool"),
    ("debias", dict(debias="yes"), TypeError, "IVON: expected debias to be a bool"),
    ("sync", dict(sync=None), TypeError, "IVON: expected sync to be a bool"),
    ("group", dict(process_group=3), TypeError, "IVON: expected process_group to be a torch"),
    ("glob", dict(include=["0..weight"]), ValueError, "IVON: malformed glob pattern"),
    ("none", dict(include=["7"]), ValueError, r"IVON: expected include=\('7',\) and exclude"),
]


@pytest.mark.parametrize("name", [b[0] for b in BAD])
def test_bad_construction_changes_nothing(name):
    _, kwargs, error, pattern = next(b for b in BAD if b[0] == name)
    net = make_net()
    before = snapshot(net)
    storage = [p.data_ptr() for p in net.parameters()]
    kwargs = dict(module=net, lr=0.1, ess=10.0) | kwargs

    with pytest.raises(error, match=pattern):
        bf.IVON(**kwargs)

    assert unchanged(before, net) and storage == [p.data_ptr() for p in net.parameters()]


def test_bad_parameters():
    net = make_net()
    net.register_parameter("phase", nn.Parameter(torch.ones(2, dtype=torch.complex128)))
    with pytest.raises(TypeError, match=r"IVON: expected real floating-point parameters"):
        bf.IVON(net, lr=0.1, ess=1.0)
    bf.IVON(net, lr=0.1, ess=1.0, exclude=["phase"])

    counted = make_net()  # an integer parameter cannot require gradients: it is left out
    counted.register_parameter("count", nn.Parameter(torch.ones(2, dtype=torch.int64), False))
    assert "count" not in bf.IVON(counted, lr=0.1, ess=1.0).posterior.mean

    mixed = make_net()
    mixed[2].float()
    with pytest.raises(ValueError, match=r"IVON: expected the picked parameters to share one"):
        bf.IVON(mixed, lr=0.1, ess=1.0)


def test_bad_calls(gen):
    net, (x, y) = make_net(), data()
    opt = bf.IVON(net, lr=0.1, ess=10.0)
    before = snapshot(net, opt.posterior, opt.hess)

    with pytest.raises(RuntimeError, match=r"IVON\.step: expected gradients of the samples drawn"):
        opt.step()
    with pytest.raises(TypeError, match=r"IVON\.step: expected closure to be a callable or None"):
        opt.step(1)
    opt.sample(2, generator=gen(0))
    with pytest.raises(RuntimeError, match=r"IVON\.step: expected gradients"):
        opt.step()  # no backward
    with pytest.raises(ValueError, match=r"IVON\.sample: expected n to be a positive int, got 0"):
        opt.sample(0)
    with pytest.raises(TypeError, match=r"IVON\.sample: expected n to be a positive int"):
        opt.sample(2.0)
    with pytest.raises(TypeError, match=r"IVON\.sample: expected generator to be a torch"):
        opt.sample(2, generator=0)
    if torch.device(x.device).type == "cpu" and torch.cuda.is_available():
        with pytest.raises(
            ValueError, match=r"IVON\.sample: expected a generator on the posterior"
        ):
            opt.sample(2, generator=torch.Generator("cuda"))
    params = opt.sample(2, generator=gen(0))
    (bf.vmap_call(net, params, x) - y).square().mean().backward()
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"IVON\.step: expected a finite lr >= 0, got -1.0"):
        opt.step()
    assert unchanged(before, net, opt.posterior, opt.hess)

    opt.param_groups[0]["lr"] = 0.1
    state = opt.state_dict()
    with pytest.raises(TypeError, match=r"IVON\.load_state_dict: expected a dict, got list"):
        opt.load_state_dict([])
    with pytest.raises(ValueError, match=r"IVON\.load_state_dict: expected a dict from IVON"):
        opt.load_state_dict({"state": {}})
    with pytest.raises(ValueError, match=r"IVON\.add_param_group: expected one parameter group"):
        opt.add_param_group({"params": [torch.zeros(2)]})
    other = bf.IVON(make_net(), lr=0.1, ess=1.0, include=["0"]).state_dict()
    with pytest.raises(ValueError, match=r"IVON\.load_state_dict: expected a state over"):
        opt.load_state_dict(other)
    bad = copy.deepcopy(state)
    bad["state"]["hess"] = bad["state"]["hess"][:3]
    with pytest.raises(ValueError, match=r"IVON\.load_state_dict: expected hess of shape \(50,\)"):
        opt.load_state_dict(bad)
    bad["state"]["hess"] = -state["state"]["hess"]
    with pytest.raises(ValueError, match=r"IVON\.load_state_dict: expected finite hess with"):
        opt.load_state_dict(bad)
    assert unchanged(before, net, opt.posterior, opt.hess)


# Data-parallel: two gloo processes, one sample each, average as one process with two.

WORLD = 2


def _worker(rank, steps, rendezvous, path):
    r"""Runs `steps(rank)` in process `rank` of a gloo group and saves what it returns at
    `path.rank`."""

    import datetime
    import os

    import torch.distributed as dist

    # A file to meet at, not a TCP port: a free port found beforehand may be taken by
    # another process before the workers bind it.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.set_default_dtype(torch.float64)
        torch.set_num_threads(1)
        torch.save(steps(rank), f"{path}.{rank}")
        # Neither process tears gloo down while the other still talks to it.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done and saved: leave without the interpreter's teardown, where gloo's threads now and
    # then abort the process ("terminate called without an active exception", SIGABRT).
    os._exit(0)


def _ivon_steps(rank):
    net, (x, y) = make_net(), data()
    if rank == 1:
        with torch.no_grad():  # the optimizer starts every process from the first's means
            net[0].weight.add_(1.0)
    opt = bf.IVON(net, **HYPERS["decay-clip"])
    shard = slice(10 * rank, 10 * (rank + 1))
    for t in range(3):
        # each process draws its own sample, on its own shard of the batch
        params = opt.sample(1, generator=torch.Generator().manual_seed(100 * t + rank))
        (bf.vmap_call(net, params, x[shard]) - y[shard]).square().mean().backward()
        opt.step()
    state = opt.state_dict()["state"]
    state["logvar"] = flat(opt.posterior.logvar.values())
    return state


def _run_workers(steps, tmp_path):
    r"""Runs `steps(rank)` in :data:`WORLD` processes of a gloo group; returns what each
    returned."""

    import time

    import torch.multiprocessing as mp

    path = str(tmp_path / "rank")
    context = mp.start_processes(
        _worker,
        args=(steps, str(tmp_path / "rendezvous"), path),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 120.0
    try:
        while not context.join(timeout=1.0):
            assert time.monotonic() < deadline, f"the {WORLD} processes did not end in time"
    finally:
        for p in context.processes:
            if p.is_alive():
                p.terminate()
    return [torch.load(f"{path}.{r}") for r in range(WORLD)]


def test_data_parallel_equals_one_process_with_two_samples(tmp_path, monkeypatch):
    ranks = _run_workers(_ivon_steps, tmp_path)

    # one process, the same two samples, as two draws on the two shards, then one step
    (x, y), looped = data(), make_net()
    loop_opt = bf.IVON(looped, **HYPERS["decay-clip"])
    # one process, the same two samples in one vectorized pass, each on its shard
    net = make_net()
    opt = bf.IVON(net, **HYPERS["decay-clip"])
    shards = x.view(2, 10, 3), y.view(2, 10, 2)
    for t in range(3):
        eps = []
        for rank in range(WORLD):
            generator = torch.Generator().manual_seed(100 * t + rank)
            eps.append(
                torch.randn(1, size(net), generator=torch.Generator().manual_seed(100 * t + rank))
            )
            params = loop_opt.sample(1, generator=generator)
            shard = slice(10 * rank, 10 * (rank + 1))
            (bf.vmap_call(looped, params, x[shard]) - y[shard]).square().mean().backward()
        loop_opt.step()

        with feeding(monkeypatch, [torch.cat(eps)]):
            params = opt.sample(2)
        out = bf.vmap_call(net, params, shards[0], in_dims=(0,))
        (out - shards[1]).square().mean().backward()
        opt.step()

    for name, oracle in (("loop", loop_opt), ("one pass", opt)):
        state = oracle.state_dict()["state"]
        state["logvar"] = flat(oracle.posterior.logvar.values())
        for rank in ranks:
            for k in ("mean", "hess", "momentum", "logvar"):
                assert close(rank[k], state[k]), (name, k)
    assert not close(ranks[0]["mean"], flat(make_net().parameters()), 1e-3)


def _diverged_steps(rank):
    net, (x, y) = make_net(), data()
    opt = bf.IVON(net, **HYPERS["decay-clip"])
    before = flat(net.parameters())
    params = opt.sample(1, generator=torch.Generator().manual_seed(rank))
    loss = (bf.vmap_call(net, params, x) - y).square().mean()
    (loss * (math.nan if rank == 1 else 1.0)).backward()  # diverged in process 1 only
    try:
        opt.step()
        error = None
    except ValueError as e:
        error = str(e)
    state = {"error": error, "updated": not torch.equal(flat(net.parameters()), before)}
    state["finite"] = bool(torch.isfinite(flat(net.parameters())).all())
    return state


def test_data_parallel_a_loss_diverged_in_one_process_is_refused_in_every_one(tmp_path):
    for rank in _run_workers(_diverged_steps, tmp_path):
        assert rank["error"] is not None
        assert rank["error"].startswith("IVON.step: expected finite gradients of the samples")
        assert "NaN or infinite values in a process" in rank["error"]
        assert not rank["updated"] and rank["finite"]


def test_from_scratch_page_runs():
    run_page("from-scratch.md", 4)


def _loss(net, params, x, y):
    return (bf.vmap_call(net, params, x) - y).square().mean()


@pytest.mark.parametrize("pattern", ["documented", "draw-all-first", "graph-only"])
def test_draws_before_one_backward_are_averaged(pattern, gen):
    r"""Two draws of one sample, backpropagated at once (the draws kept by the caller, or
    only by the graph), step as the documented loop of draws, each backpropagated before
    the next; and as the paper's equations with the same noise."""

    net, (x, y) = make_net(), data()
    start = copy.deepcopy(net)
    opt = bf.IVON(net, **HYPERS["decay-clip"])
    g = gen(3)
    state = g.get_state()
    eps = torch.cat([torch.randn(1, size(net), generator=g) for _ in range(2)])
    g.set_state(state)
    if pattern == "documented":
        for _ in range(2):
            _loss(net, opt.sample(1, generator=g), x, y).backward()
    elif pattern == "draw-all-first":
        a, b = opt.sample(1, generator=g), opt.sample(1, generator=g)
        out = bf.vmap_call(net, a, x)
        assert not torch.allclose(out, bf.vmap_call(net, b, x))  # two different samples
        (_loss(net, a, x, y) + _loss(net, b, x, y)).backward()  # each as if alone
    else:
        loss = _loss(net, opt.sample(1, generator=g), x, y)
        loss = loss + _loss(net, opt.sample(1, generator=g), x, y)
        loss.backward()
        del loss  # the graph held the first draw's samples; nothing does now
    opt.step()

    m, h, mom, _ = paper_ivon(start, x, y, [eps], 1, **HYPERS["decay-clip"])
    assert close(flat(net.parameters()), m)
    assert close(flat(opt.hess.values()), h)
    assert close(flat(opt.momentum.values()), mom)


def test_draws_no_one_holds_are_forgotten(gen):
    net = make_net()
    opt = bf.IVON(net, lr=0.1, ess=20.0)
    for _ in range(5):
        opt.sample(4, generator=gen(0))  # for monitoring, dropped at once
    held = opt.sample(2, generator=gen(1))
    opt.sample(1, generator=gen(2))
    assert [d.n for d in opt._state.draws] == [2, 1]  # memory: no dropped draw is kept
    del held


@pytest.mark.parametrize("change", ["backward", "clip"])
def test_a_gradient_changed_after_it_was_taken_refuses_to_step(change, gen):
    net, (x, y) = make_net(), data()
    opt = bf.IVON(net, lr=0.1, ess=20.0)
    a = opt.sample(1, generator=gen(0))
    _loss(net, a, x, y).backward()
    b = opt.sample(1, generator=gen(1))  # takes a's gradients
    _loss(net, b, x, y).backward()
    if change == "backward":
        _loss(net, a, x, y).backward()  # more gradient for a, after it was taken
    else:
        torch.nn.utils.clip_grad_norm_([*a.values(), *b.values()], 1e-3)
    before = {k: v.clone() for k, v in opt.state_dict()["state"].items() if k != "step"}
    with pytest.raises(RuntimeError, match=r"IVON\.step: expected the gradients of each draw"):
        opt.step()
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[k], v) for k, v in before.items())

    opt.zero_grad()  # drops the draws: a fresh start steps
    _loss(net, opt.sample(1, generator=gen(2)), x, y).backward()
    opt.step()


def test_a_gradient_reaching_a_sample_only_after_its_draw_was_taken_refuses_to_step(gen):
    # A loss for one head, the next draw (which takes the first draw's gradients: none yet
    # for the other head's samples, counted as zero), then the other head's loss for the
    # first draw: its gradient was ignored, and the step moved the other head's means as
    # if it were zero (1.7e-2 off the step with both losses first).
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x), self.b(x)

    x = data()[0]
    torch.manual_seed(0)
    net = TwoHeads()
    opt = bf.IVON(net, lr=0.1, ess=10.0)
    first = opt.sample(1, generator=gen(0))
    ya, yb = bf.vmap_call(net, first, x)
    ya.square().mean().backward()
    second = opt.sample(1, generator=gen(1))  # takes the first draw's gradients
    yb.square().mean().backward()  # b's samples of the first draw: a gradient only now
    assert first["b.weight"].grad is not None
    za, zb = bf.vmap_call(net, second, x)
    (za.square().mean() + zb.square().mean()).backward()
    before = {k: v.clone() for k, v in opt.state_dict()["state"].items() if k != "step"}
    means = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match=r"IVON\.step: expected the gradients of each draw"):
        opt.step()
    after = opt.state_dict()["state"]
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(torch.equal(p, m) for p, m in zip(net.parameters(), means, strict=True))

    # Both losses before the next draw: the step takes both (the oracle of the order).
    opt.zero_grad()
    first = opt.sample(1, generator=gen(0))
    ya, yb = bf.vmap_call(net, first, x)
    (ya.square().mean() + yb.square().mean()).backward()
    opt.sample(1, generator=gen(1))  # a draw no gradient reaches: forgotten
    opt.step()
    assert not any(torch.equal(p, m) for p, m in zip(net.parameters(), means, strict=True))


def test_a_failed_sample_leaves_the_draws_as_found(gen):
    # A Hessian estimate written invalid through IVON.hess: sample refused it, but had
    # already folded the draw awaiting its gradients, so that a second loss term for that
    # draw (legal: no draw came after it) then made step refuse.
    net, (x, y) = make_net(), data()

    def run(failed_call):
        torch.manual_seed(0)
        fresh = make_net()
        opt = bf.IVON(fresh, lr=0.1, ess=10.0)
        params = opt.sample(1, generator=gen(0))
        out = bf.vmap_call(fresh, params, x)
        (out - y).square().mean().backward(retain_graph=True)
        if failed_call:
            h = next(iter(opt.hess.values())).view(-1)
            old = h[0].item()
            with torch.no_grad():
                h[0] = -1.0
            with pytest.raises(ValueError, match=r"IVON\.sample: expected finite Hessian"):
                opt.sample(1)
            with torch.no_grad():
                h[0] = old  # as it was
        out.abs().mean().backward()  # a second loss term for the same draw
        opt.step()
        return [p.detach().clone() for p in fresh.parameters()]

    expected, got = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(got, net.parameters(), strict=True))


def test_a_changed_ess_between_draw_and_step_uses_the_sigma_sampled(gen):
    net, (x, y) = make_net(), data()
    start = copy.deepcopy(net)
    opt = bf.IVON(net, lr=0.1, ess=50.0, beta2=0.0)
    g = gen(0)
    state = g.get_state()
    eps = torch.randn(size(net), generator=g)
    g.set_state(state)
    params = opt.sample(1, generator=g)
    _loss(net, params, x, y).backward()
    grad = flat(params[k].grad for k in params)
    opt.param_groups[0]["ess"] = 200.0
    opt.step()

    wd, h0 = DEFAULTS["weight_decay"], 1.0
    sigma = 1 / (50.0 * (h0 + wd)) ** 0.5
    h_hat = grad * eps / sigma  # the Price estimator for the distribution sampled
    expected = h_hat + 0.5 * (h0 - h_hat) ** 2 / (h0 + wd)
    assert close(flat(opt.hess.values()), expected)
    assert not torch.equal(flat(net.parameters()), flat(start.parameters()))
    var = flat(bf.std(opt.posterior).values()) ** 2
    assert close(var, 1 / (200.0 * (expected + wd)))


def test_frozen_parameters_are_left_out(gen):
    net, (x, y) = make_net(), data()
    net[0].weight.requires_grad_(False)
    frozen = net[0].weight.clone()
    trainable = copy.deepcopy(net)
    opt = bf.IVON(net, **HYPERS["decay-clip"])
    ref = bf.IVON(trainable, **HYPERS["decay-clip"], exclude=["0.weight"])
    assert list(opt.posterior.mean) == list(ref.posterior.mean) == ["0.bias", "2.weight", "2.bias"]
    for t in range(3):
        vectorized_step(opt, net, x, y, 2, gen(t))
        vectorized_step(ref, trainable, x, y, 2, gen(t))
    assert torch.equal(net[0].weight, frozen)
    assert close(flat(net.parameters()), flat(trainable.parameters()))

    net[0].bias.requires_grad_(False)
    net[2].requires_grad_(False)
    with pytest.raises(ValueError, match=r"IVON: expected .* trainable parameter .* frozen ones"):
        bf.IVON(net, lr=0.1, ess=20.0)


def test_a_parameter_frozen_after_the_optimizer_was_created_is_refused(gen):
    # requires_grad was read once, in the constructor: a parameter frozen later (a backbone
    # frozen for fine-tuning) still got samples that required gradients, and steps moved it.
    # Unfrozen again, training goes on as if nothing had happened (the oracle: a twin).
    net, (x, y) = make_net(), data()
    twin = copy.deepcopy(net)
    opt, ref = bf.IVON(net, **HYPERS["defaults"]), bf.IVON(twin, **HYPERS["defaults"])
    vectorized_step(opt, net, x, y, 2, gen(0))
    vectorized_step(ref, twin, x, y, 2, gen(0))
    params = opt.sample(2, generator=gen(1))
    (bf.vmap_call(net, params, x) - y).square().mean().backward()

    net[0].weight.requires_grad_(False)
    before = snapshot(net, opt._posterior, opt.hess, opt.momentum)
    match = r"IVON\.{}: expected the module's parameter '0\.weight' to require gradients"
    with pytest.raises(RuntimeError, match=match.format("step")):
        opt.step()
    with pytest.raises(RuntimeError, match=match.format("sample")):
        opt.sample(1)
    net[0].weight.requires_grad_(True)

    def freezing():
        net[0].weight.requires_grad_(False)

    with pytest.raises(RuntimeError, match=match.format("step")):
        opt.step(freezing)  # frozen by the closure
    assert unchanged(before, net, opt._posterior, opt.hess, opt.momentum)

    net[0].weight.requires_grad_(True)
    opt.step()  # the draw made before the freeze
    vectorized_step(ref, twin, x, y, 2, gen(1))
    assert torch.equal(flat(net.parameters()), flat(twin.parameters()))
    assert torch.equal(flat(opt.hess.values()), flat(ref.hess.values()))


@pytest.mark.parametrize("kind", ["string", "iterator"])
def test_patterns_are_shown_as_given(kind):
    # One string is one pattern (not its characters), an iterator is read once: the
    # message shows the patterns that picked nothing trainable, for IVON and SWAG alike.
    net = make_net()
    net[0].requires_grad_(False)

    def include():
        return "0." if kind == "string" else iter(["0."])  # (0. is 0)

    for make in (
        lambda: bf.IVON(net, lr=0.1, ess=20.0, include=include()),
        lambda: bf.SWAG(net, include=include()),
    ):
        with pytest.raises(ValueError, match=r"expected include=\('0\.',\) and exclude=\(\) "):
            make()


@needs_ivon
def test_frozen_parameters_match_ivon_opt_over_the_trainable_ones(gen, monkeypatch):
    net, (x, y) = make_net(), data()
    net[0].weight.requires_grad_(False)
    reference = copy.deepcopy(net)
    opt = bf.IVON(net, **HYPERS["decay-clip"])
    trainable = [p for p in reference.parameters() if p.requires_grad]
    ref = ivon.IVON(trainable, mc_samples=1, **(DEFAULTS | HYPERS["decay-clip"]))
    for t in range(3):
        eps = torch.randn(1, sum(p.numel() for p in trainable), generator=gen(t))
        vectorized_step(opt, net, x, y, 1, gen(t))
        with feeding(monkeypatch, eps):
            with ref.sampled_params(train=True):
                ref.zero_grad()
                (reference(x) - y).square().mean().backward()
            ref.step()
    assert close(flat(net.parameters()), flat(reference.parameters()))
    assert close(flat(opt.hess.values()), ref.param_groups[0]["hess"])


def test_load_state_dict_refuses_a_bad_state_and_changes_nothing(gen):
    net, (x, y) = make_net(), data()
    opt = bf.IVON(net, lr=0.1, ess=20.0)
    vectorized_step(opt, net, x, y, 2, gen(0))
    good = opt.state_dict()
    before = copy.deepcopy(good)

    missing = copy.deepcopy(good)
    del missing["param_groups"][0]["debias"]
    with pytest.raises(ValueError, match=r"IVON\.load_state_dict: expected a dict from IVON"):
        opt.load_state_dict(missing)
    for key in ("mean", "momentum"):
        bad = copy.deepcopy(good)
        bad["state"][key][3] = math.nan
        with pytest.raises(
            ValueError, match=rf"IVON\.load_state_dict: expected finite values in {key}"
        ):
            opt.load_state_dict(bad)
    after = opt.state_dict()
    for k in ("mean", "hess", "momentum"):
        assert torch.equal(after["state"][k], before["state"][k])
    assert after["param_groups"] == before["param_groups"]


@pytest.mark.parametrize("change", ["second-ivon", "to", "assign"])
def test_an_optimizer_whose_module_moved_away_refuses_to_run(change, gen):
    # The module's parameters share the posterior's memory: `net(x)` is the mean model.
    # Once something gives them other memory, steps would silently train a posterior that
    # the module no longer shows; sample and step refuse, before any change.
    net, (x, y) = make_net(), data()
    opt = bf.IVON(net, **HYPERS["defaults"])
    vectorized_step(opt, net, x, y, 2, gen(0))
    torch.testing.assert_close(net(x), bf.vmap_call(net, bf.mean_params(opt.posterior), x)[0])
    if change == "second-ivon":
        bf.IVON(net, **HYPERS["defaults"])
    elif change == "to":
        net.to(torch.float32)
    else:
        net.load_state_dict(copy.deepcopy(net.state_dict()), assign=True)
    before = snapshot(opt.posterior.mean, opt.posterior.logvar, opt.hess, opt.momentum)
    with pytest.raises(
        RuntimeError, match=r"IVON.sample: expected the module's parameter '0.weight'"
    ):
        opt.sample(1, generator=gen(1))
    with pytest.raises(RuntimeError, match=r"IVON.step: expected the module's parameter"):
        opt.step(lambda: 0.0)
    assert unchanged(before, opt.posterior.mean, opt.posterior.logvar, opt.hess, opt.momentum)


def test_an_optimizer_whose_memory_moved_with_its_module_runs_on(gen):
    # `share_memory_()` moves the storage the module and the means share: still linked.
    net, (x, y) = make_net(), data()
    opt = bf.IVON(net, **HYPERS["defaults"])
    net.share_memory()
    assert net[0].weight.is_shared() and opt.posterior.mean["0.weight"].is_shared()
    vectorized_step(opt, net, x, y, 2, gen(0))
    torch.testing.assert_close(net(x), bf.vmap_call(net, bf.mean_params(opt.posterior), x)[0])


# Half precision, writes through IVON.hess, tensor hyperparameters, failed steps.


@pytest.mark.parametrize("ess", [6e4, 1e5, 1.28e6])
def test_float16_variance_where_ess_times_h_overflows(ess):
    # ess * (h + weight_decay) above float16's largest number (65504) made the variance
    # the posterior's floor, e^-17.98, for the posterior and the draws alike.
    # Within 2 % (float16's log-variances are 2^-6 apart near 16); the floor is 1000x off.
    net = nn.Linear(4, 1).to(torch.float16)
    nn.init.zeros_(net.weight)  # theta = sigma * eps, without rounding against the mean
    opt = bf.IVON(net, lr=0.1, ess=ess, weight_decay=1e-4)
    want = 1 / (ess * (1.0 + 1e-4))  # float64: the closed form, well inside the range
    var = bf.std(opt.posterior)["weight"].double().square()
    assert close(var, torch.full_like(var, want), rtol=2e-2)
    state = torch.Generator().manual_seed(0)
    theta = opt.sample(1, generator=state)["weight"].detach().double()
    eps = torch.randn(1, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float16)
    drawn = (theta - net.weight.detach().double()).view(-1) / eps.double().view(-1)[:4]
    assert close(drawn.square(), torch.full_like(drawn, want), rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_log_variances_at_the_limit_are_finite(dtype):
    # A variance at the floor, e^-17.98, rounds to log-variance -18 in bfloat16, where the
    # inverse soft clip is infinite: the posterior's log-variances were NaN.
    net = nn.Linear(3, 1).to(dtype)
    opt = bf.IVON(net, lr=0.1, ess=1e9)  # sigma^2 = 1e-9 < e^-17.98: clamped
    logvar = opt.posterior.logvar["weight"]
    assert torch.isfinite(logvar).all()
    std = bf.std(opt.posterior)["weight"].double()
    floor = math.exp(-LOGVAR_LIMIT / 2)  # within 2 %: bfloat16's soft clip rounds
    assert close(std, torch.full_like(std, floor), rtol=2e-2)
    assert close(opt._state.std.double(), torch.full((4,), floor, dtype=torch.float64), 2e-2)
    assert torch.isfinite(bf.sample(opt.posterior, 2)["weight"]).all()


def _hess_and_momentum_oracle(draws, ess, hess_init, beta1, beta2, weight_decay):
    r"""Returns the Hessian estimate and the momentum after the steps of `draws`, a list
    of (noise, gradients of the samples), each `(n, P)`, by the paper's equations in
    float64 (each sample's gradient is g_k / n: the step sums them), with the standard
    deviations clamped to the posterior's range."""

    h = torch.full_like(draws[0][0][0], hess_init, dtype=torch.float64)
    mu, r = torch.zeros_like(h), 1 - beta2
    for eps, grads in draws:
        eps, grads = eps.double(), grads.double()
        sigma = (ess * (h + weight_decay)).rsqrt()
        sigma = sigma.clamp(math.exp(-LOGVAR_LIMIT / 2), math.exp(LOGVAR_LIMIT / 2))
        g_bar, h_hat = grads.sum(0), (grads * eps).sum(0) / sigma
        mu = beta1 * mu + (1 - beta1) * g_bar
        h = beta2 * h + r * h_hat + r * r / 2 * (h - h_hat).square() / (h + weight_decay)
    return h, mu


@pytest.mark.parametrize(
    "dtype, scale", [(torch.bfloat16, 1.0), (torch.float16, 1.0), (torch.float16, 3e3)]
)
def test_half_precision_state_follows_the_equations(dtype, scale):
    # The Hessian estimate was kept in the parameters' dtype: at the default beta2 every
    # update rounded away (h stayed at hess_init, the variances were never learned,
    # silently), and in float16 gradients of a few thousand made h infinite and the next
    # step NaN in the module. The state is float32 now: h and the momentum follow the
    # equations (float64, from the drawn noise and the samples' gradients).
    torch.manual_seed(0)
    net = nn.Linear(3, 2).to(dtype)
    # beta2 = 0.999: h moves by 1e-2 and more in 20 steps (float16 rounds at 5e-4).
    ess, lr = (100.0, 0.05) if scale == 1 else (1e5, 1e-4)  # gradients of ~3000 stay
    hess_init, wd = 1.0, 1e-4
    opt = bf.IVON(net, lr=lr, ess=ess, hess_init=hess_init, beta2=0.999, weight_decay=wd)
    x, y = torch.randn(16, 3, dtype=dtype), torch.randn(16, 2, dtype=dtype)
    draws, n = [], 2
    for i in range(20):
        params = opt.sample(n, generator=torch.Generator().manual_seed(i))
        assert all(t.dtype == dtype for t in params.values())
        out = bf.vmap_call(net, params, x)
        (scale * (out - y).square().mean()).backward()
        eps = torch.randn(n, 8, generator=torch.Generator().manual_seed(i), dtype=dtype)
        grads = torch.cat([params[k].grad.reshape(n, -1) for k in ("weight", "bias")], 1)
        draws.append((eps, grads))
        opt.step()

    group = opt.param_groups[0]
    h, mu = _hess_and_momentum_oracle(draws, ess, hess_init, group["beta1"], group["beta2"], wd)
    got_h = torch.cat([opt.hess[k].reshape(-1) for k in ("weight", "bias")]).double()
    got_mu = torch.cat([opt.momentum[k].reshape(-1) for k in ("weight", "bias")]).double()
    assert close(got_h, h, rtol=1e-4) and close(got_mu, mu, rtol=1e-4)
    assert (h - hess_init).abs().max() > 1e-2 * h.abs().max()  # h did move
    assert max(g.abs().max().item() for _, g in draws) > scale / 10
    assert torch.isfinite(net.weight).all() and net.weight.dtype == dtype
    # The posterior, in the parameters' dtype, has the variances of h.
    var = bf.std(opt.posterior)["weight"].double().square().reshape(-1)
    want = (1 / (ess * (h[:6] + wd))).clamp(math.exp(-LOGVAR_LIMIT), math.exp(LOGVAR_LIMIT))
    assert opt.posterior.logvar["weight"].dtype == dtype
    assert close(var, want, rtol=2e-2)  # half precision's log-variance steps


def test_half_precision_state_dict_resumes_training(gen):
    # The float32 state is saved and restored as it is (a conversion to the parameters'
    # dtype on load rounded it away); a state saved in bfloat16 (before) still loads.
    net, (x, y) = make_net().to(torch.bfloat16), data()
    x, y = x.to(torch.bfloat16), y.to(torch.bfloat16)
    opt = bf.IVON(net, lr=0.1, ess=20.0, beta2=0.999, weight_decay=1e-3)
    for t in range(3):
        vectorized_step(opt, net, x, y, 2, gen(t))
    state = copy.deepcopy(opt.state_dict())
    assert state["state"]["hess"].dtype == torch.float32
    for t in range(3, 5):
        vectorized_step(opt, net, x, y, 2, gen(t))

    resumed = make_net().to(torch.bfloat16)
    opt2 = bf.IVON(resumed, lr=1.0, ess=1.0)
    opt2.load_state_dict(state)
    for t in range(3, 5):
        vectorized_step(opt2, resumed, x, y, 2, gen(t))
    assert torch.equal(flat(resumed.parameters()), flat(net.parameters()))
    assert torch.equal(flat(opt2.hess.values()), flat(opt.hess.values()))
    assert not torch.equal(flat(opt.hess.values()), torch.ones(50))  # it moved

    old = copy.deepcopy(state)
    for k in ("hess", "momentum"):
        old["state"][k] = old["state"][k].to(torch.bfloat16)
    opt2.load_state_dict(old)
    assert torch.equal(flat(opt2.hess.values()), old["state"]["hess"].float())


def test_writes_through_hess_are_read(gen):
    # A per-layer initial Hessian, written through IVON.hess, was ignored by sample(), the
    # posterior and the next step until ess or weight_decay changed.
    net, (x, y) = make_net(), data()
    twin = copy.deepcopy(net)
    opt = bf.IVON(net, lr=0.1, ess=30.0)
    opt.hess["2.weight"].fill_(10.0)
    wd = DEFAULTS["weight_decay"]

    var = bf.std(opt.posterior)["2.weight"].double().square()
    assert close(var, torch.full_like(var, 1 / (30.0 * (10.0 + wd))))
    eps = torch.randn(1, size(net), generator=gen(0))
    params = opt.sample(1, generator=gen(0))
    sigma = (30.0 * (flat(opt.hess.values()) + wd)).rsqrt()
    assert close(flat(params.values()), flat(net.parameters()) + sigma * eps[0])

    # The oracle: the same state through load_state_dict, which sets the variances.
    ref = bf.IVON(twin, lr=0.1, ess=30.0)
    ref.load_state_dict(opt.state_dict())
    for o, n in ((opt, net), (ref, twin)):
        if o is ref:
            o.sample(1, generator=gen(0))
            p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
            o._state.draws[-1] = o._state.draws[-1]._replace(leaves=list(p.values()))
        else:
            p = params
        (bf.vmap_call(n, p, x) - y).square().mean().backward()
        o.step()
    assert torch.equal(flat(opt.hess.values()), flat(ref.hess.values()))
    assert torch.equal(flat(net.parameters()), flat(twin.parameters()))

    opt.hess["0.bias"][0] = -1.0
    before = snapshot(net, opt._posterior, opt.hess)
    with pytest.raises(ValueError, match=r"IVON\.sample: expected finite Hessian estimates"):
        opt.sample(1)
    with pytest.raises(ValueError, match=r"IVON\.posterior: expected finite Hessian estimates"):
        opt.posterior  # noqa: B018
    assert unchanged(before, net, opt._posterior, opt.hess)


@pytest.mark.parametrize("when", ["between-steps", "between-draw-and-step"])
def test_a_lower_weight_decay_with_hess_plus_weight_decay_not_positive_is_refused(when, gen):
    # The update keeps h + weight_decay > 0, not h > 0. Lowering weight_decay (a schedule)
    # to where h + weight_decay <= 0 gave NaN log-variances and samples, then a misleading
    # "loss that diverged"; between a draw and its step, a step uphill (a negative H).
    net, (x, y) = make_net(), data()
    twin = copy.deepcopy(net)
    hyper = dict(lr=0.05, ess=20.0, beta2=0.0, weight_decay=0.5)
    opt, ref = bf.IVON(net, **hyper), bf.IVON(twin, **hyper)
    for t in range(2):
        vectorized_step(opt, net, x, y, 1, gen(t))
        vectorized_step(ref, twin, x, y, 1, gen(t))
    low = flat(opt.hess.values()).min().item()
    assert -0.5 < low < 0  # legal: h < 0 with h + weight_decay > 0

    if when == "between-draw-and-step":
        params = opt.sample(1, generator=gen(2))
        (bf.vmap_call(net, params, x) - y).square().mean().backward()
    before = snapshot(net, opt._posterior, opt.hess, opt.momentum)
    opt.param_groups[0]["weight_decay"] = -low / 2
    match = r"IVON\.{}: expected hess \+ weight_decay > 0, got min hess = .* weight_decay = "
    calls = {"posterior": lambda: opt.posterior, "sample": lambda: opt.sample(1)}
    if when == "between-draw-and-step":
        calls = {"step": opt.step}
    for where, call in calls.items():
        with pytest.raises(ValueError, match=match.format(where)):
            call()
    assert unchanged(before, net, opt._posterior, opt.hess, opt.momentum)

    # Back to a weight_decay that fits: training goes on as if nothing had happened.
    opt.param_groups[0]["weight_decay"] = 0.5
    if when == "between-draw-and-step":
        opt.step()
    else:
        vectorized_step(opt, net, x, y, 1, gen(2))
    vectorized_step(ref, twin, x, y, 1, gen(2))
    assert torch.equal(flat(net.parameters()), flat(twin.parameters()))
    assert torch.equal(flat(opt.hess.values()), flat(ref.hess.values()))

    # A lower weight_decay that keeps h + weight_decay > 0 is the paper's variance.
    wd = -flat(opt.hess.values()).min().item() + 0.05
    opt.param_groups[0]["weight_decay"] = wd
    var = flat(bf.std(opt.posterior).values()) ** 2
    assert close(var, 1 / (20.0 * (flat(opt.hess.values()) + wd)))


def test_tensor_lr_updated_in_place_by_a_scheduler(gen):
    # torch's schedulers update a tensor lr in place (the same object): IVON kept the lr
    # it had read first.
    nets = make_net(), make_net()
    x, y = data()
    by_float = bf.IVON(nets[0], lr=0.1, ess=20.0)
    by_tensor = bf.IVON(nets[1], lr=0.1, ess=20.0)
    by_tensor.param_groups[0]["lr"] = torch.tensor(0.1)
    schedule = torch.optim.lr_scheduler.StepLR(by_tensor, step_size=1, gamma=0.1)
    for t in range(3):
        vectorized_step(by_float, nets[0], x, y, 1, gen(t))
        vectorized_step(by_tensor, nets[1], x, y, 1, gen(t))
        schedule.step()
        by_float.param_groups[0]["lr"] = float(by_tensor.param_groups[0]["lr"])
    assert isinstance(by_tensor.param_groups[0]["lr"], torch.Tensor)
    assert abs(by_float.param_groups[0]["lr"] - 1e-4) < 1e-12
    assert torch.equal(flat(nets[0].parameters()), flat(nets[1].parameters()))

    by_tensor.param_groups[0]["lr"] = torch.tensor([0.1, 0.2])
    with pytest.raises(TypeError, match=r"IVON\.sample: expected lr to be a number, got Tensor"):
        by_tensor.sample(1)


def test_a_failed_step_changes_nothing(gen):
    net = make_net()
    opt = bf.IVON(net, lr=0.1, ess=10.0)
    before = snapshot(net, opt.posterior, opt.hess)
    opt.param_groups[0]["ess"] = 40.0  # the variances are set again at the next draw or step
    with pytest.raises(RuntimeError, match=r"IVON\.step: expected gradients of the samples"):
        opt.step()
    opt.param_groups[0]["ess"] = 10.0
    assert unchanged(before, net, opt._posterior, opt.hess)


def test_bad_states_are_named():
    opt = bf.IVON(make_net(), lr=0.1, ess=10.0)
    before = snapshot(opt._posterior, opt.hess)
    with pytest.raises(
        ValueError,
        match=r"IVON\.load_state_dict: expected a dict from IVON.*got keys 'param_groups', 0",
    ):
        opt.load_state_dict({0: {}, "param_groups": []})
    state = opt.state_dict()
    two = copy.deepcopy(state)
    two["param_groups"] = two["param_groups"] * 2
    with pytest.raises(
        ValueError, match=r"IVON\.load_state_dict: expected one parameter group, got 2"
    ):
        opt.load_state_dict(two)
    complex_state = copy.deepcopy(state)
    complex_state["state"]["momentum"] = complex_state["state"]["momentum"].to(torch.complex128)
    with pytest.raises(
        TypeError, match=r"IVON\.load_state_dict: expected real momentum, got torch\.complex128"
    ):
        opt.load_state_dict(complex_state)
    assert unchanged(before, opt._posterior, opt.hess)


def test_a_state_of_other_shapes_with_the_same_names_and_size_is_refused(gen):
    # Only the names and the total size were compared: the state of a 3-8-2 MLP loaded
    # into a 5-6-2 MLP (50 numbers each), rows of one weight silently became the other's.
    net, (x, y) = make_net(), data()
    opt = bf.IVON(net, **HYPERS["defaults"])
    vectorized_step(opt, net, x, y, 2, gen(0))
    state = opt.state_dict()
    other = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    assert size(other) == size(net)
    opt2 = bf.IVON(other, **HYPERS["defaults"])
    before = snapshot(other, opt2._posterior, opt2.hess, opt2.momentum)
    with pytest.raises(
        ValueError,
        match=r"IVON\.load_state_dict: expected '0\.weight' of shape \(6, 5\), got \(8, 3\)",
    ):
        opt2.load_state_dict(state)
    state["param_groups"][0]["shapes"] = 3
    with pytest.raises(ValueError, match=r"IVON\.load_state_dict: expected shapes to list"):
        opt2.load_state_dict(state)
    assert unchanged(before, other, opt2._posterior, opt2.hess, opt2.momentum)


def test_a_loaded_tensor_lr_is_a_copy_as_torchs_optimizers_load_it(gen):
    # The loaded group's values were the saved ones: a scheduler's in-place update of a
    # tensor lr on the optimizer loaded into also changed the saved state and the
    # optimizer it was saved from. The oracle: torch's Adam, which deep-copies.
    net, (x, y) = make_net(), data()
    lrs = {}
    for kind in ("ivon", "adam"):
        if kind == "ivon":
            opt1, opt2 = bf.IVON(make_net(), lr=0.1, ess=20.0), bf.IVON(net, lr=0.1, ess=20.0)
            opt1.param_groups[0]["lr"] = torch.tensor(0.1)
        else:
            opt1, opt2 = (torch.optim.Adam(make_net().parameters(), lr=torch.tensor(0.1)),
                          torch.optim.Adam(make_net().parameters(), lr=torch.tensor(0.1)))  # fmt: skip
        saved = opt1.state_dict()
        opt2.load_state_dict(saved)
        schedule = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
        if kind == "ivon":
            vectorized_step(opt2, net, x, y, 1, gen(0))
        else:
            opt2.step()
        schedule.step()
        lrs[kind] = [float(o.param_groups[0]["lr"]) for o in (opt1, opt2)]
        lrs[kind].append(float(saved["param_groups"][0]["lr"]))
    assert lrs["ivon"] == lrs["adam"]
    assert lrs["ivon"][1] != lrs["ivon"][0]  # the schedule did step the one loaded into


def test_a_gradient_on_the_modules_own_parameters_is_refused_and_cleared(gen):
    # A loss term computed with the module itself (a penalty on the mean model's weights)
    # put gradients on the module's parameters: step() ignored them (the update was bit
    # for bit the one without the term) and zero_grad() never cleared them.
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    opt = bf.IVON(net, lr=0.1, ess=100.0)
    before = copy.deepcopy(opt.state_dict())
    params = opt.sample(1, generator=gen(1))
    loss = (bf.vmap_call(net, params, x) - y).square().mean() + net.weight.square().sum()
    loss.backward()
    with pytest.raises(RuntimeError, match=r"IVON.step: expected gradients on the samples .*"
                       r"the module's own parameters \['weight'\]"):  # fmt: skip
        opt.step()
    after = opt.state_dict()
    assert all(
        torch.equal(after["state"][k], v) for k, v in before["state"].items() if k != "step"
    )
    opt.zero_grad(set_to_none=False)
    assert torch.equal(net.weight.grad, torch.zeros_like(net.weight))
    opt.zero_grad()
    assert net.weight.grad is None and net.bias.grad is None
    params = opt.sample(1, generator=gen(1))
    (bf.vmap_call(net, params, x) - y).square().mean().backward()
    opt.step()  # the sampled term alone steps
    assert not torch.equal(opt.state_dict()["state"]["mean"], before["state"]["mean"])


def test_a_loaded_state_that_records_gradients_leaves_the_optimizer_working(gen):
    # A warm start from a posterior of bf.init (whose tensors require gradients): the
    # copies recorded history, the optimizer's means required gradients, samples were no
    # leaves and every step failed, even after a clean state was loaded again.
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    opt = bf.IVON(net, lr=0.1, ess=100.0)
    q = bf.init(copy.deepcopy(net), init_logvar=-4.0)
    state = opt.state_dict()
    state["state"]["mean"] = torch.cat([q.mean[k].flatten() for k in ("weight", "bias")])
    assert state["state"]["mean"].requires_grad
    opt.load_state_dict(state)
    assert not any(t.requires_grad for t in opt.posterior.mean.values())
    params = opt.sample(1, generator=gen(2))
    assert all(t.is_leaf for t in params.values())
    (bf.vmap_call(net, params, x) - y).square().mean().backward()
    opt.step()
    assert torch.equal(net.weight, opt.posterior.mean["weight"])


def test_state_dict_hooks_run_as_torchs_optimizers_run_them():
    # IVON replaced state_dict and load_state_dict and never ran the hooks registered with
    # torch's register_*_hook methods, which Adam and ivon-opt run.
    net = nn.Linear(3, 1)
    opt = bf.IVON(net, lr=0.1, ess=100.0)
    ran = []
    opt.register_state_dict_pre_hook(lambda o: ran.append("save pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "tag": 1})
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: {k: v for k, v in sd.items() if k != "tag"}
    )
    opt.register_load_state_dict_post_hook(lambda o: ran.append("load post"))
    state = opt.state_dict()
    assert state["tag"] == 1 and ran == ["save pre"]
    opt.load_state_dict(state)  # the pre-hook takes the tag out again
    assert ran == ["save pre", "load post"]


def test_copying_or_pickling_the_optimizer_is_refused_with_a_message():
    # A copy (or pickle) kept torch's fields only and failed later with a bare
    # AttributeError ('_state', '_slots') that named no function.
    import io
    import pickle

    opt = bf.IVON(nn.Linear(3, 1), lr=0.1, ess=100.0)
    for copy_it in (copy.deepcopy, copy.copy, lambda o: torch.save(o, io.BytesIO()), pickle.dumps):
        with pytest.raises(TypeError, match=r"IVON: expected to be saved with state_dict\(\)"):
            copy_it(opt)


def _diverged_draws(opt, net, x, y, draws, bad, g):
    r"""Draws `draws` (each a number of samples) and backpropagates each draw's loss, the
    last sample's output times `bad` (NaN or an infinity) in the last draw."""

    for i, n in enumerate(draws):
        out = bf.vmap_call(net, opt.sample(n, generator=g), x)
        if i == len(draws) - 1:
            out = torch.cat((out[:-1], out[-1:] * bad))
        (out - y).square().mean().backward()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("draws", [(1,), (2,), (1, 1)], ids=["one", "two-samples", "two-draws"])
def test_a_diverged_loss_is_refused_and_changes_nothing(draws, bad, gen):
    r"""A NaN or infinite gradient (in the one sample's, the vectorized draw's, or the
    draw already taken by the next draw) is refused, and nothing is updated: the means,
    which are the module's weights, stay finite, and the next step is the step of an
    optimizer that never saw the diverged draws."""

    net, (x, y) = make_net(), data()
    twin = copy.deepcopy(net)
    opt, twin_opt = bf.IVON(net, **HYPERS["decay-clip"]), bf.IVON(twin, **HYPERS["decay-clip"])
    vectorized_step(opt, net, x, y, 2, gen(1))
    vectorized_step(twin_opt, twin, x, y, 2, gen(1))
    before, start = snapshot(net, opt.posterior, opt.hess, opt.momentum), flat(net.parameters())

    _diverged_draws(opt, net, x, y, draws, bad, gen(2))
    with pytest.raises(ValueError, match=r"IVON\.step: expected finite gradients of the samples"):
        opt.step()
    assert unchanged(before, net, opt.posterior, opt.hess, opt.momentum)

    # The draws were dropped: no zero_grad() needed.
    vectorized_step(opt, net, x, y, 2, gen(3))
    vectorized_step(twin_opt, twin, x, y, 2, gen(3))
    assert torch.equal(flat(net.parameters()), flat(twin.parameters()))
    assert torch.equal(flat(opt.hess.values()), flat(twin_opt.hess.values()))
    assert torch.equal(flat(opt.momentum.values()), flat(twin_opt.momentum.values()))
    assert not torch.equal(flat(net.parameters()), start)  # the step did update


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_finiteness_check_is_exact_where_a_sum_overflows(dtype):
    from bayesflow._ivon import finite

    big = torch.full((8,), torch.finfo(dtype).max / 2, dtype=dtype)
    assert not math.isfinite(big.sum().item())  # the fast sum overflows: the exact test
    assert finite(big) and finite(-big) and finite(big[:0])
    for bad in (math.nan, math.inf, -math.inf):
        assert not finite(torch.cat((big, torch.tensor([bad], dtype=dtype))))
        assert not finite(torch.tensor([1.0, bad], dtype=dtype))
