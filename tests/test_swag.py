r"""SWAG-diagonal: the moments against a direct float64 computation over a recorded SGD
trajectory, the posterior's variances, BatchNorm statistics for the mean weights, and
save/load."""

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn as nn

import bayesflow as bf

from bayesflow._numerics import LOGVAR_LIMIT

from .registry import LoRA


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))


def train(module, swag, steps=12, seed=0, record=None):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 3, generator=g), torch.randn(32, 2, generator=g)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        (module(x) - y).square().mean().backward()
        optimizer.step()
        swag.collect(module)
        if record is not None:
            record.append({k: p.detach().double().clone() for k, p in module.named_parameters()})
    return x, y


def snapshot(module):
    return (
        {k: (p, p.detach().clone()) for k, p in module.named_parameters()},
        {k: b.clone() for k, b in module.named_buffers()},
    )


def unchanged(module, before):
    params, buffers = before
    now = dict(module.named_parameters())
    return all(now[k] is p and torch.equal(p, v) for k, (p, v) in params.items()) and all(
        torch.equal(b, buffers[k]) for k, b in module.named_buffers()
    )


def test_moments_match_a_direct_float64_computation_of_the_trajectory():
    module = net()
    swag = bf.SWAG(module, exclude=["**.bias"])
    trajectory = []

    train(module, swag, record=trajectory)

    assert swag.n == 12 and list(swag.mean) == ["0.weight", "2.weight"]
    for k in swag.mean:
        stack = torch.stack([t[k] for t in trajectory])
        mean, sq = stack.mean(0), stack.square().mean(0)
        assert torch.allclose(swag.mean[k], mean, rtol=1e-12, atol=1e-14)
        assert torch.allclose(swag.var[k], sq - mean.square(), rtol=1e-8, atol=1e-14)
        assert (swag.var[k] > 0).all()


def test_float32_moments_stay_accurate_where_the_mean_dwarfs_the_spread():
    # Weights near 1 that move by 1e-3: E[x^2] - E[x]^2 in float32 keeps about one digit,
    # Welford's update keeps four.
    torch.manual_seed(0)
    module = nn.Linear(200, 1).float()
    swag = bf.SWAG(module, include=["weight"])
    base = 1 + torch.randn(1, 200, dtype=torch.float32)
    steps = [base + 1e-3 * torch.randn(1, 200, dtype=torch.float32) for _ in range(50)]
    with torch.no_grad():
        for w in steps:
            module.weight.copy_(w)
            swag.collect(module)

    stack = torch.stack(steps)
    expected = stack.double().var(0, unbiased=False)
    naive = stack.square().mean(0) - stack.mean(0).square()
    assert swag.var["weight"].dtype == torch.float32
    assert ((swag.var["weight"].double() - expected).abs() / expected).max() < 1e-3
    assert ((naive.double() - expected).abs() / expected).max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_moments_are_those_of_the_iterates(dtype):
    # Moments kept in the parameters' dtype: mean += delta / n fell below half an ulp as n
    # grew, and the bfloat16 mean stalled up to 1.4 posterior stds off the iterates' mean,
    # with variances up to 2.8 times theirs. The oracle: the float64 moments of the very same
    # half-precision iterates (SGD-like noise of 2e-3 around weights of about 0.1).
    torch.manual_seed(0)
    module = nn.Linear(100, 50).to(dtype)
    mode = {k: p.detach().double().clone() for k, p in module.named_parameters()}
    swag = bf.SWAG(module)
    trajectory = []
    n = 300
    for _ in range(n):
        with torch.no_grad():
            for k, p in module.named_parameters():
                p.copy_(mode[k] + 2e-3 * torch.randn(p.shape))
        swag.collect(module)
        trajectory.append({k: p.detach().double().clone() for k, p in module.named_parameters()})

    q = swag.posterior()

    with torch.no_grad():
        std = bf.std(q)
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).smallest_normal
    eps32 = torch.finfo(torch.float32).eps
    for k in swag.mean:
        stack = torch.stack([t[k] for t in trajectory])
        mean, var = stack.mean(0), stack.var(0, unbiased=False)
        assert swag.mean[k].dtype == swag.var[k].dtype == torch.float32
        assert q.mean[k].dtype == q.logvar[k].dtype == dtype
        # Welford's update in float32 over n iterates: within n * eps_float32.
        assert ((swag.var[k].double() - var).abs() <= n * eps32 * var).all()
        # The posterior's mean: that float32 mean rounded once to the dtype, half an ulp
        # (eps / 2 relative; float16's subnormals are eps * tiny apart).
        bound = eps / 2 * (mean.abs() + tiny) + n * eps32 * mean.abs()
        assert ((q.mean[k].double() - mean).abs() <= bound).all()
        # Its log-variance y held in the dtype: off by up to |y| * eps / 2 (stored, then
        # softclip), half of that in log std.
        logvar = var.log()
        assert ((std[k].double().log() - var.sqrt().log()).abs() <= logvar.abs() * eps / 2).all()
    mean_net = swag.mean_model(module)
    assert mean_net.weight.dtype == dtype
    assert torch.equal(mean_net.weight, q.mean["weight"])


def test_posterior_scale_and_minimum():
    module = net()
    swag = bf.SWAG(module)
    train(module, swag)
    with torch.no_grad():  # a weight that never moved: zero variance
        swag._m2["2.bias"][0] = 0.0

    q = swag.posterior(scale=0.5)

    for k in swag.mean:
        assert torch.equal(q.mean[k], swag.mean[k])
        assert q.mean[k].is_leaf and q.mean[k].requires_grad and q.logvar[k].requires_grad
        expected = (0.5 * swag.var[k]).clamp_min(math.exp(-LOGVAR_LIMIT))
        assert torch.allclose(bf.std(q)[k].square(), expected, rtol=1e-10)
    floor = bf.std(swag.posterior(min_var=1e-4))["2.bias"][0].square()
    assert torch.allclose(floor, torch.tensor(1e-4), rtol=1e-10)

    params = bf.sample(q, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 3)
    out = bf.vmap_call(module, params, x)
    assert torch.allclose(out, bf.loop_call(module, params, x), atol=1e-12)
    assert not torch.allclose(out[0], out[1])  # the sampled weights were used


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_posterior_holds_the_clamped_variances(dtype):
    # Rows: a weight that never moved (variance 0: the floor, where float16 holds no
    # min_var = 1e-30), and weights whose scaled variances are ~1e2, beyond float16 (~1e6)
    # and beyond the posterior's cap (~2e8). Log-variances near +-17.98 were NaN in bfloat16.
    module = nn.Linear(1, 4, bias=False).to(dtype)
    swag = bf.SWAG(module)
    g = torch.Generator().manual_seed(0)
    offset = torch.tensor([[0.5], [0], [0], [0]])
    amplitude = torch.tensor([[0], [1e-2], [1], [50]])
    steps = [(offset + amplitude * torch.randn(4, 1, generator=g)).to(dtype) for _ in range(4)]
    with torch.no_grad():
        for w in steps:
            module.weight.copy_(w)
            swag.collect(module)
    scale = 1e6

    q = swag.posterior(scale=scale)

    # The oracle: the paper's variance of the iterates in float64, scaled, in the range a
    # posterior holds.
    paper = scale * torch.stack(steps).double().var(0, unbiased=False)
    low, high = math.exp(-LOGVAR_LIMIT), math.exp(LOGVAR_LIMIT)
    assert paper[0] == 0 and 1 < paper[1] < 1e3 and 65504 < paper[2] < high < paper[3]
    expected = paper.clamp(low, high).sqrt()
    assert q.logvar["weight"].dtype == dtype and torch.isfinite(q.logvar["weight"]).all()
    with torch.no_grad():
        std = bf.std(q)["weight"]
    # A log-variance y held in the dtype is off by up to |y| * eps / 2 per rounding (two:
    # stored, then softclip), half of that in log std; |y| <= LOGVAR_LIMIT.
    error = (std.double().log() - expected.log()).abs().max()
    assert error <= LOGVAR_LIMIT * torch.finfo(dtype).eps

    x = bf.sample(q, 3, generator=torch.Generator().manual_seed(0))["weight"]
    assert x.dtype == dtype and torch.isfinite(x).all()
    assert (x[:, 3] != x[0, 3]).any()  # drawn with the capped, not a NaN, variance


def test_collect_refuses_a_diverged_iterate_and_goes_on():
    module = net()
    swag = bf.SWAG(module)
    trajectory = []
    train(module, swag, steps=3, record=trajectory)
    state = swag.state_dict()

    for value in (math.nan, math.inf, -math.inf):
        diverged = copy.deepcopy(module)
        with torch.no_grad():
            diverged[2].bias[1] = value
        with pytest.raises(
            ValueError,
            match=rf"SWAG\.collect: expected finite parameters.*got {value} in '2.bias'",
        ):
            swag.collect(diverged)
        assert swag.n == state["n"]
        assert all(torch.equal(swag.mean[k], v) for k, v in state["mean"].items())
        assert all(torch.equal(swag._m2[k], v) for k, v in state["m2"].items())

    train(module, swag, steps=3, seed=1, record=trajectory)  # training goes on
    for k in swag.mean:
        stack = torch.stack([t[k] for t in trajectory])
        assert torch.allclose(swag.mean[k], stack.mean(0), rtol=1e-12, atol=1e-14)
        assert torch.allclose(swag.var[k], stack.var(0, unbiased=False), rtol=1e-8, atol=1e-14)
    assert swag.n == 6 and torch.isfinite(swag.posterior().logvar["0.weight"]).all()


def test_frozen_parameters_are_left_out_as_ivon_and_laplace_do():
    # A trained head on a frozen body: the posterior was over the body too.
    module = net()
    module[0].requires_grad_(False)
    trainable = [k for k, p in module.named_parameters() if p.requires_grad]
    swag = bf.SWAG(module)
    trajectory = []

    train(module, swag, steps=4, record=trajectory)

    assert list(swag.mean) == trainable == ["2.weight", "2.bias"]
    assert list(swag.posterior().mean) == trainable
    assert list(swag.state_dict()["mean"]) == list(swag.state_dict()["m2"]) == trainable
    assert list(bf.IVON(module, lr=0.1, ess=1.0).posterior.mean) == trainable
    for k in trainable:
        stack = torch.stack([t[k] for t in trajectory])
        assert torch.allclose(swag.var[k], stack.var(0, unbiased=False), rtol=1e-8, atol=1e-14)
    mean_net = swag.mean_model(module)
    for k, p in mean_net.named_parameters():
        assert torch.equal(p, swag.mean[k] if k in trainable else module.get_parameter(k))

    resumed = bf.SWAG(module)
    resumed.load_state_dict(swag.state_dict())
    assert all(torch.equal(resumed.var[k], swag.var[k]) for k in trainable)
    with pytest.raises(ValueError, match=r"SWAG\.load_state_dict: expected mean for the param"):
        resumed.load_state_dict(bf.SWAG(net()).state_dict())  # a state over the body too
    with pytest.raises(
        ValueError,
        match=r"SWAG: expected .* trainable parameter .* frozen ones \(requires_grad=False\): "
        r"\['0.weight', '0.bias'\]",
    ):
        bf.SWAG(module, include=["0"])


def test_mean_model_refreshes_batchnorm_statistics_for_the_mean_weights():
    module = bn_net()
    swag = bf.SWAG(module)
    x, _ = train(module, swag)
    module.eval()
    before = snapshot(module)
    loader = [(x[:16],), (x[16:],)]

    mean_net = swag.mean_model(module, loader)

    assert unchanged(module, before) and not mean_net.training
    for k in swag.mean:
        assert torch.equal(mean_net.get_parameter(k), swag.mean[k])
    # The oracle: BatchNorm's cumulative average of the batch statistics of its inputs.
    features = [mean_net[0](b[0]) for b in loader]
    running_mean = torch.stack([f.mean(0) for f in features]).mean(0)
    running_var = torch.stack([f.var(0, unbiased=True) for f in features]).mean(0)
    assert torch.allclose(mean_net[1].running_mean, running_mean, rtol=1e-10)
    assert torch.allclose(mean_net[1].running_var, running_var, rtol=1e-10)
    assert not torch.allclose(module[1].running_mean, running_mean)

    with pytest.raises(ValueError, match=r"SWAG\.mean_model: expected data for the BatchNorm"):
        swag.mean_model(module)
    plain = net()
    plain_swag = bf.SWAG(plain)
    train(plain, plain_swag)
    assert torch.equal(plain_swag.mean_model(plain)[0].weight, plain_swag.mean["0.weight"])


def test_mean_model_weights_batchnorm_batches_by_their_size():
    # torch's update_bn weighs every batch the same: a last batch of 2 examples counted as
    # one of 64, and the running mean was 3.1 off the data's. The oracle is the paper's
    # bn_update (momentum b / (n + b)): the mean of the data's features, and the average of
    # the batches' unbiased variances weighted by their sizes.
    module = bn_net()
    swag = bf.SWAG(module)
    train(module, swag)
    module[1].momentum = None  # the copy keeps its momentum (as the module, another one)
    x = torch.randn(130, 3, generator=torch.Generator().manual_seed(1))
    x[128:] += 10.0
    loader = [(x[:64],), (x[64:128],), (x[128:],)]
    before = snapshot(module)

    mean_net = swag.mean_model(module, loader)

    assert unchanged(module, before) and mean_net[1].momentum is None
    with torch.no_grad():
        features = [mean_net[0](b[0]) for b in loader]
    data = torch.cat(features)
    running_var = sum(len(f) * f.var(0, unbiased=True) for f in features) / len(data)
    assert torch.allclose(mean_net[1].running_mean, data.mean(0), rtol=1e-12, atol=1e-14)
    assert torch.allclose(mean_net[1].running_var, running_var, rtol=1e-12)
    equal_weights = torch.stack([f.mean(0) for f in features]).mean(0)
    assert not torch.allclose(mean_net[1].running_mean, equal_weights, atol=1.0)

    # A loader that fails halfway: the copy (seen through a hook the copy inherits) is
    # dropped with its momentum and modes restored, the module left as found.
    module[1].momentum = 0.3
    module.eval()
    copies = []
    hook = module[1].register_forward_pre_hook(lambda m, args: copies.append(m))

    def failing():
        yield (x[:64],)
        raise RuntimeError("the loader broke")

    with pytest.raises(RuntimeError, match="the loader broke"):
        swag.mean_model(module, failing())
    hook.remove()
    assert len(copies) == 1 and copies[0] is not module[1]
    assert copies[0].momentum == 0.3 and not copies[0].training
    assert module[1].momentum == 0.3 and unchanged(module, before)


def test_mean_model_keeps_every_submodule_mode_and_refuses_data_without_batches():
    # torch's update_bn sets every submodule to the top module's mode, and on no batch at
    # all leaves the statistics reset (mean 0, var 1): a copy that predicts otherwise.
    module = bn_net()
    swag = bf.SWAG(module)
    x, _ = train(module, swag)
    module.train()
    module[1].eval()  # a frozen BatchNorm in a training net
    modes = [m.training for m in module.modules()]
    before = snapshot(module)

    mean_net = swag.mean_model(module, [(x,)])
    assert [m.training for m in mean_net.modules()] == modes
    assert unchanged(module, before)

    batches = iter([(x,)])
    next(batches)  # consumed
    for data in ([], batches):
        with pytest.raises(ValueError, match=r"SWAG\.mean_model: expected data to hold at least"):
            swag.mean_model(module, data)
    with pytest.raises(
        TypeError, match=r"SWAG\.mean_model: expected data to be an iterable.*\[x\]"
    ):
        swag.mean_model(module, x)
    with pytest.raises(TypeError, match=r"SWAG\.mean_model: expected data to be an iterable"):
        swag.mean_model(module, 5)
    assert unchanged(module, before)


def test_mean_model_checks_each_batch_as_it_is_read_and_leaves_the_module_as_found():
    module = bn_net()
    swag = bf.SWAG(module)
    x, _ = train(module, swag)
    module.train()
    module[1].eval()
    modes = [m.training for m in module.modules()]
    before = snapshot(module)

    # What update_bn takes: a tensor, or a tuple or list whose first item is the input.
    reference = swag.mean_model(module, [(x[:16],), (x[16:],)])
    for data in ([x[:16], x[16:]], [[x[:16], 0], (x[16:], "y")]):
        mean_net = swag.mean_model(module, data)
        assert torch.equal(mean_net[1].running_mean, reference[1].running_mean)
        assert torch.equal(mean_net[1].running_var, reference[1].running_var)

    cases = [
        ([1, 2], "int at batch 0"),
        (iter([(x[:16],), [5, x[16:]]]), "a list whose first item is int at batch 1"),
        (((x[:16],), ()), "an empty tuple at batch 1"),
        ([x, {"x": x}], "dict at batch 1"),
    ]
    for data, got in cases:
        with pytest.raises(
            TypeError, match=rf"SWAG\.mean_model: expected each batch to be a tensor .*got {got}"
        ):
            swag.mean_model(module, data)
        assert unchanged(module, before)
        assert [m.training for m in module.modules()] == modes


def test_mean_model_names_a_batch_of_one_for_batchnorm():
    # A DataLoader's last batch of one example: torch's BatchNorm error named no function.
    module = bn_net()
    swag = bf.SWAG(module)
    x, _ = train(module, swag)
    before = snapshot(module)
    data = [(x[:16],), (x[16:31],), (x[31:],)]  # 16, 15, 1
    with pytest.raises(
        ValueError,
        match=r"SWAG\.mean_model: expected batches whose BatchNorm layers see more than one "
        r"value per channel, got a batch of 1 at batch 2 .*drop_last=True",
    ):
        swag.mean_model(module, data)
    assert unchanged(module, before)
    swag.mean_model(module, data[:2])  # without it


def test_state_dict_round_trip_and_resumed_collection():
    module = net()
    swag = bf.SWAG(module)
    train(module, swag, steps=5)
    buffer = io.BytesIO()
    torch.save(swag.state_dict(), buffer)
    buffer.seek(0)

    resumed = bf.SWAG(module)
    resumed.load_state_dict(torch.load(buffer))
    copy_module = net()
    copy_module.load_state_dict(module.state_dict())
    train(module, swag, steps=4, seed=1)
    train(copy_module, resumed, steps=4, seed=1)

    assert resumed.n == swag.n == 9
    for k in swag.mean:
        assert torch.equal(resumed.mean[k], swag.mean[k])
        assert torch.equal(resumed.var[k], swag.var[k])
    assert repr(swag) == "SWAG(4 tensors, 50 parameters, n=9)"


def test_state_dict_of_zero_and_one_collections_round_trips():
    module = net()
    for steps in (0, 1):
        swag = bf.SWAG(module)
        train(module, swag, steps=steps)
        resumed = bf.SWAG(module)
        resumed.load_state_dict(swag.state_dict())
        assert resumed.n == steps
        assert all(torch.equal(resumed.mean[k], swag.mean[k]) for k in swag.mean)
        assert all(torch.equal(resumed.var[k], swag.var[k]) for k in swag.mean)


@pytest.mark.parametrize("route", [copy.copy, copy.deepcopy])
def test_a_copy_collects_apart_from_its_original(route):
    # copy.copy shared the moments but not the count: collecting into the copy moved the
    # original's mean and m2 and left its n, an inconsistent collector.
    module = net()
    swag = bf.SWAG(module)
    train(module, swag, steps=3)
    before = swag.state_dict()
    branch = route(swag)
    copy_module = copy.deepcopy(module)
    train(module, branch, steps=2, seed=1)
    assert swag.n == 3 and branch.n == 5
    for k in swag.mean:
        assert torch.equal(swag.mean[k], before["mean"][k])
        assert torch.equal(swag._m2[k], before["m2"][k])

    # the copy is the original resumed: as a collector loaded from its state
    resumed = bf.SWAG(copy_module)
    resumed.load_state_dict(before)
    train(copy_module, resumed, steps=2, seed=1)
    assert resumed.n == branch.n
    for k in swag.mean:
        assert torch.equal(resumed.mean[k], branch.mean[k])
        assert torch.equal(resumed.var[k], branch.var[k])
        assert not torch.equal(branch.mean[k], swag.mean[k])


@pytest.mark.parametrize("wrap", ["spectral_norm", "weight_norm"])
def test_the_mean_model_of_a_net_with_a_hook_based_norm(wrap):
    # After any step, the hook-based norms hold a weight computed with gradients, which
    # copy.deepcopy refuses: mean_model raised in SWAG's documented use (SGD, collect).
    torch.manual_seed(0)
    make = lambda: nn.Sequential(
        getattr(nn.utils, wrap)(nn.Linear(4, 8)), nn.Tanh(), nn.Linear(8, 3)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's: use the parametrizations
        module = make()
        oracle = make()
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    swag = bf.SWAG(module)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()
        swag.collect(module)
    computed = module[0].weight
    assert computed.grad_fn is not None
    before = snapshot(module)

    mean = swag.mean_model(module)

    assert module[0].weight is computed and unchanged(module, before)
    # oracle: a module of its own, loaded with the state and the collected means
    oracle.load_state_dict(module.state_dict())
    with torch.no_grad():
        for k, m in swag.mean.items():
            oracle.get_parameter(k).copy_(m)
    mean.eval(), oracle.eval(), module.eval()
    with torch.no_grad():
        assert torch.allclose(mean(x), oracle(x), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(mean(x), module(x), atol=1e-4)  # the means, not the last


def test_the_mean_models_statistics_with_an_fn_for_a_forward_of_two_inputs():
    # mean_model called module(batch[0]): a BatchNorm net whose forward takes two inputs
    # got torch's bare TypeError. fn(copy, *batch) runs it; oracle: torch's update_bn on
    # a one-input wrapper with every batch the same size (where both weigh alike).
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)
            self.bn, self.out = nn.BatchNorm1d(4), nn.Linear(4, 3)

        def forward(self, x1, x2):
            return self.out(torch.relu(self.bn(self.a(x1) + self.b(x2))))

    torch.manual_seed(0)
    module = Two()
    x1, x2, y = torch.randn(32, 3), torch.randn(32, 2), torch.randint(0, 3, (32,))
    data = [(x1[i : i + 8], x2[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    swag = bf.SWAG(module)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(3):
        for a, b, t in data:
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(a, b), t).backward()
            optimizer.step()
        swag.collect(module)

    with pytest.raises(TypeError, match=r"^SWAG.mean_model: expected fn to be callable"):
        swag.mean_model(module, data, fn=3)
    mean = swag.mean_model(module, data, fn=lambda m, a, b, t: m(a, b))

    class One(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ab):
            return self.inner(ab[:, :3], ab[:, 3:])

    oracle = copy.deepcopy(module)
    with torch.no_grad():
        for k, m in swag.mean.items():
            oracle.get_parameter(k).copy_(m)
    torch.optim.swa_utils.update_bn([torch.cat([a, b], 1) for a, b, _ in data], One(oracle))
    for name in ("running_mean", "running_var"):
        assert torch.allclose(getattr(mean.bn, name), getattr(oracle.bn, name), rtol=1e-10)
    assert not torch.allclose(mean.bn.running_mean, module.bn.running_mean)


def test_bad_input_leaves_module_and_moments_alone():
    module = net()
    swag = bf.SWAG(module)
    train(module, swag, steps=3)
    state = swag.state_dict()
    before = snapshot(module)

    cases = [
        (lambda: bf.SWAG("net"), TypeError, "SWAG: expected a torch.nn.Module"),
        (
            lambda: bf.SWAG(module, include=["nothing"]),
            ValueError,
            "SWAG: expected include=.* to pick",
        ),
        (
            lambda: bf.SWAG(bf.BayesianModel(module)),
            TypeError,
            "SWAG: expected the module the posterior",
        ),
        (
            lambda: swag.collect(nn.Linear(3, 8)),
            ValueError,
            "SWAG.collect: expected a module with the collected parameter '0.weight'",
        ),
        (
            lambda: swag.collect(net().float()),
            ValueError,
            r"SWAG.collect: expected .* \(torch.float64",
        ),
        (
            lambda: swag.posterior(scale=0.0),
            ValueError,
            "SWAG.posterior: expected a finite scale > 0",
        ),
        (
            lambda: swag.posterior(min_var=-1.0),
            ValueError,
            "SWAG.posterior: expected a finite min_var > 0",
        ),
        (
            lambda: bf.SWAG(net()).posterior(),
            ValueError,
            "SWAG.posterior: expected at least 2 collected",
        ),
        (
            lambda: bf.SWAG(net()).mean_model(module),
            ValueError,
            "SWAG.mean_model: expected at least 1",
        ),
        (
            lambda: swag.load_state_dict({"n": 1}),
            ValueError,
            "SWAG.load_state_dict: expected a dict with the keys",
        ),
        (  # a TypeError, as IVON.load_state_dict's (a ValueError before)
            lambda: swag.load_state_dict([1]),
            TypeError,
            "SWAG.load_state_dict: expected a dict, got list",
        ),
        (
            lambda: swag.load_state_dict({**state, "n": -1}),
            ValueError,
            "SWAG.load_state_dict: expected n",
        ),
        *(
            (
                lambda n=n: swag.load_state_dict({**state, "n": n}),
                TypeError,
                rf"SWAG.load_state_dict: expected n to be an int >= 0, got {type(n).__name__}",
            )
            for n in (3.0, None, True)
        ),
        (
            lambda: swag.load_state_dict(
                {**state, "mean": {**state["mean"], "0.weight": state["mean"]["0.weight"] + 1j}}
            ),
            TypeError,
            r"SWAG.load_state_dict: expected real tensors, got mean\['0.weight'\] of dtype "
            "torch.complex128",
        ),
        (
            # one parameter set has no spread
            lambda: swag.load_state_dict({**state, "n": 1}),
            ValueError,
            r"SWAG.load_state_dict: expected m2 = 0 with n = 1",
        ),
        (
            lambda: swag.load_state_dict({**state, "n": 0}),
            ValueError,
            r"SWAG.load_state_dict: expected mean = 0 and m2 = 0 with n = 0 .*nonzero mean",
        ),
        (
            lambda: swag.load_state_dict(
                {
                    **state,
                    "n": 0,
                    "mean": {k: torch.zeros_like(v) for k, v in state["mean"].items()},
                }
            ),
            ValueError,
            r"SWAG.load_state_dict: expected mean = 0 and m2 = 0 with n = 0 .*nonzero m2",
        ),
        (
            lambda: swag.load_state_dict(
                {**state, "m2": {**state["m2"], "0.weight": torch.zeros(2)}}
            ),
            ValueError,
            r"SWAG.load_state_dict: expected m2\['0.weight'\] of shape",
        ),
        (
            lambda: swag.load_state_dict(
                {**state, "m2": {**state["m2"], "0.weight": -state["m2"]["0.weight"] - 1}}
            ),
            ValueError,
            r"SWAG.load_state_dict: expected m2 >= 0",
        ),
        (
            lambda: swag.load_state_dict(
                {**state, "mean": {**state["mean"], "0.bias": state["mean"]["0.bias"] * math.nan}}
            ),
            ValueError,
            r"SWAG.load_state_dict: expected finite moments, got others in '0.bias'",
        ),
        (
            # a later tensor that cannot convert: nothing before it changed
            lambda: swag.load_state_dict(
                {
                    **state,
                    "n": state["n"] + 5,
                    "mean": {k: v + 1 for k, v in state["mean"].items()},
                    "m2": {
                        **state["m2"],
                        "2.bias": torch.empty(state["m2"]["2.bias"].shape, device="meta"),
                    },
                }
            ),
            ValueError,
            r"SWAG.load_state_dict: expected tensors that convert",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
        assert unchanged(module, before)
        assert swag.n == state["n"]
        assert all(torch.equal(swag.mean[k], v) for k, v in state["mean"].items())
        assert all(torch.equal(swag._m2[k], v) for k, v in state["m2"].items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-300, 1e300], ids=["tiny", "huge"])
def test_a_scale_beyond_the_dtype_gives_the_clamped_posterior(scale, dtype):
    # scale * var underflowed to 0 (or overflowed to inf) in the dtype, and posterior()
    # raised "expected finite positive variances" instead of giving the floor (the cap).
    module = nn.Linear(2, 1).to(dtype)
    swag = bf.SWAG(module)
    for step in range(3):
        with torch.no_grad():
            module.weight.add_(0.1 * (step + 1))
        swag.collect(module)
    q = swag.posterior(scale=scale)
    limit = -LOGVAR_LIMIT if scale < 1 else LOGVAR_LIMIT
    logvar = bf.std(q)["weight"].double().square().log()
    assert torch.allclose(logvar, torch.full_like(logvar, limit), rtol=1e-6)


def test_the_mean_model_gets_its_modes_back_through_train():
    # The modes of the mean model were put back by their flags after the BatchNorm pass:
    # a layer that overrides train() (a LoRA merge) was left merged in training mode.
    # Oracle: the modes of the module, and each layer's own consistency.
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), LoRA(6, 3))
    module[3].eval()  # merged, under a parent in training mode
    swag = bf.SWAG(module)
    swag.collect(module)
    x = torch.randn(32, 4)

    new = swag.mean_model(module, [x[:16], x[16:]])

    assert [m.training for m in new.modules()] == [m.training for m in module.modules()]
    lora = new[3]
    assert lora.merged == (not lora.training)
    assert torch.allclose(lora.weight, module[3].weight, atol=1e-12)  # merged as found
    assert not torch.equal(new[1].running_mean, module[1].running_mean)  # the pass ran
