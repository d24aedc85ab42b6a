r"""Deep ensembles trained and predicted in one pass: K separate trainings are the oracle."""

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import zuko

from torch.nn.utils import parametrizations

import bayesflow as bf

from .registry import NanBuffer

K = 3


def make_net():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def make_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    )


BUILDERS = {"mlp-batchnorm": (make_net, (4,)), "cnn-batchnorm": (make_cnn, (1, 6, 6))}


def batches(shape, steps=4, size=10):
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(size, *shape, generator=g), torch.randint(0, 3, (size,), generator=g))
        for _ in range(steps)
    ]


def _trained_alone(make, seed, opt_of, data):
    r"""The oracle: one member built under its seed and trained by itself, in train mode."""

    torch.manual_seed(seed)
    member = make().train()
    member_opt = opt_of(member.parameters())
    for x, y in data:
        member_opt.zero_grad()
        F.cross_entropy(member(x), y).backward()
        member_opt.step()
    return member


@pytest.mark.parametrize("optimizer", ["adam", "sgd-momentum"])
@pytest.mark.parametrize("name", BUILDERS)
def test_one_pass_equals_k_separate_trainings(name, optimizer, gen):
    make, shape = BUILDERS[name]
    opt_of = {
        "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
        "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9),
    }[optimizer]
    data = batches(shape)

    ens = bf.ensemble(make, K, generator=gen(0))
    ens.module.train()
    opt = opt_of(ens.params.values())
    for x, y in data:
        logits = bf.vmap_call(ens.module, ens.params, x, buffers=ens.buffers, fallback=False)
        losses = F.cross_entropy(logits.transpose(1, 2), y.expand(K, -1), reduction="none")
        opt.zero_grad()
        losses.mean(1).sum().backward()  # the sum: each member its own gradient
        opt.step()

    for i, seed in enumerate(ens.seeds):
        member = _trained_alone(make, seed, opt_of, data)
        for p_name, p in member.named_parameters():
            assert torch.allclose(ens.params[p_name][i], p, atol=1e-10), p_name
        for b_name, b in member.named_buffers():
            assert torch.allclose(ens.buffers[b_name][i], b, atol=1e-10), b_name

    # the members differ (each its own initialization and statistics)
    assert not torch.allclose(ens.params["0.weight"][0], ens.params["0.weight"][1])
    assert not torch.allclose(ens.buffers["1.running_mean"][0], ens.buffers["1.running_mean"][1])


def test_prediction_uses_every_members_buffers(gen):
    members = []
    for seed in range(K):
        torch.manual_seed(seed)
        net = make_net().train()
        net(torch.randn(16, 4) * (seed + 1) + seed)  # statistics of its own
        members.append(net.eval())
    x = torch.randn(5, 4)
    ens = bf.stack_modules(members)
    module_state = copy.deepcopy(ens.module.state_dict())

    y = bf.vmap_call(ens.module, ens.params, x, buffers=ens.buffers, fallback=False)
    y_loop = bf.loop_call(ens.module, ens.params, x, buffers=ens.buffers)

    expected = torch.stack([m(x) for m in members])
    assert torch.allclose(y, expected, atol=1e-10)
    assert torch.allclose(y_loop, expected, atol=1e-10)
    # Without the buffers every member normalized with members[0]'s statistics (logits
    # off by up to 1.2 in a newcomer's example), silently: refused, as in train mode below.
    for call in (bf.vmap_call, bf.loop_call):
        with pytest.raises(ValueError, match=f"{call.__name__}: expected buffers=ens.buffers"):
            call(ens.module, ens.params, x)
    for k, v in module_state.items():
        assert torch.equal(ens.module.state_dict()[k], v)  # the module is left alone
    with pytest.raises(
        ValueError, match=r"stack_params: expected equal buffers .*bayesflow.stack_modules"
    ):
        bf.stack_params(members)


def test_train_mode_updates_each_members_buffers_once_per_call(gen):
    ens = bf.ensemble(make_net, K, generator=gen(1))
    ens.module.train()
    before = {k: v.clone() for k, v in ens.buffers.items()}
    own = copy.deepcopy(ens.module.state_dict())
    x = torch.randn(8, 4)

    y = bf.vmap_call(ens.module, ens.params, x, buffers=ens.buffers, fallback=False)
    after = {k: v.clone() for k, v in ens.buffers.items()}
    for k, v in before.items():
        ens.buffers[k].copy_(v)
    y_loop = bf.loop_call(ens.module, ens.params, x, buffers=ens.buffers)

    assert torch.allclose(y, y_loop, atol=1e-10)
    for k, v in after.items():
        assert torch.allclose(ens.buffers[k], v, atol=1e-12), k
    assert (ens.buffers["1.num_batches_tracked"] == 1).all()
    assert not torch.allclose(after["1.running_mean"], before["1.running_mean"])
    for k, v in own.items():
        assert torch.equal(ens.module.state_dict()[k], v)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_every_other_member_updates_its_own_buffers(gen, chunk_size):
    # A subset of an ensemble's members by a strided view (`v[::2]`): torch's batching
    # rule of batch norm wrote the statistics of non-contiguous buffers into a copy it
    # dropped, so vmap_call left the running statistics as they were, silently (while
    # num_batches_tracked moved). Oracle: each member trained alone (a deep copy).
    torch.manual_seed(0)
    everyone = [make_net().train() for _ in range(2 * K)]
    ens = bf.stack_modules(everyone)
    members = [copy.deepcopy(m) for m in everyone[::2]]
    x = torch.randn(8, 4)
    params = {k: v[::2] for k, v in ens.params.items()}
    buffers = {k: v[::2] for k, v in ens.buffers.items()}
    assert not buffers["1.running_mean"].is_contiguous()
    before = {k: v.clone() for k, v in ens.buffers.items()}

    y = bf.vmap_call(ens.module, params, x, buffers=buffers, chunk_size=chunk_size, fallback=False)
    expected = torch.stack([m.train()(x) for m in members])
    assert torch.allclose(y, expected, atol=1e-10)
    for k, v in ens.buffers.items():
        alone = torch.stack([dict(m.named_buffers())[k] for m in members])
        assert torch.allclose(v[::2], alone.to(v.dtype), atol=1e-12), k
        assert torch.equal(v[1::2], before[k][1::2]), k  # the others untouched
    assert not torch.allclose(ens.buffers["1.running_mean"], before["1.running_mean"])


class _ScaledByBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x):
        return self.lin(x) * self.scale


def test_non_contiguous_per_sample_buffers_that_are_only_read(gen):
    # Their copies were written back whatever happened: a buffer that records gradients
    # broke the backward pass (its version moved), and one made in inference mode could
    # not be written (the call fell back to the loop). Only what changed is written back.
    # Oracle: loop_call.
    torch.manual_seed(0)
    net, n = _ScaledByBuffer(), 3
    params = {k: v.detach() for k, v in bf.sample(bf.init(net, -4.0), n, generator=gen(1)).items()}
    x = torch.randn(5, 3)
    grads = []
    for call in (bf.vmap_call, bf.loop_call):
        raw = torch.linspace(-1.0, 1.0, 4 * n).view(4, n).requires_grad_()
        options = {"fallback": False} if call is bf.vmap_call else {}
        out = call(net, params, x, buffers={"scale": raw.exp().T}, **options)
        out.square().sum().backward()
        grads.append(raw.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)
    assert grads[0][:, 0].ne(grads[0][:, 1]).any()  # each sample its own scale

    for value in (0.5, math.nan):  # NaN is NaN (torch.equal says no to any)
        with torch.inference_mode():
            frozen = torch.rand(4, n) + value
        with torch.no_grad():
            out = bf.vmap_call(net, params, x, buffers={"scale": frozen.T}, fallback=False)
            expected = bf.loop_call(net, params, x, buffers={"scale": frozen.T})
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6, equal_nan=True)


class _Negates(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.register_buffer("sign", torch.zeros(4))

    def forward(self, x):
        self.sign.mul_(-1.0)  # 0.0 becomes -0.0: equal values, other bits
        return self.lin(x)


@pytest.mark.parametrize("dtype", [torch.complex128, torch.float16, torch.bfloat16])
def test_only_read_buffers_of_other_dtypes_holding_nan_are_left_alone(dtype, gen):
    # The bits compared where torch.equal says no to any NaN: complex numbers as their
    # real pairs (a complex NaN buffer made in inference mode could not be written back).
    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.register_buffer("z", torch.zeros(4, dtype=dtype))

        def forward(self, x):
            return self.lin(x) + self.z.real.to(x.dtype).nan_to_num()

    net, n = Reads(), 3
    params = {k: v.detach() for k, v in bf.sample(bf.init(net, -4.0), n, generator=gen(1)).items()}
    x = torch.randn(5, 3)
    with torch.inference_mode():
        frozen = torch.full((4, n), math.nan, dtype=dtype)
    with torch.no_grad():
        out = bf.vmap_call(net, params, x, buffers={"z": frozen.T}, fallback=False)
        expected = bf.loop_call(net, params, x, buffers={"z": frozen.T})
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out[0], out[1])


def test_a_write_of_other_bits_with_equal_values_is_written_back(gen):
    # Written back only where the values differed: -0.0 over 0.0 was lost (the loop
    # writes it). Oracle: loop_call.
    net, n = _Negates(), 3
    params = {k: v.detach() for k, v in bf.sample(bf.init(net, -4.0), n, generator=gen(1)).items()}
    x = torch.randn(5, 3)
    signs = []
    for call in (bf.vmap_call, bf.loop_call):
        given = torch.zeros(4, n).T  # not contiguous: a copy runs, written back
        call(net, params, x, buffers={"sign": given})
        signs.append(given.signbit())
    assert signs[0].all() and torch.equal(signs[0], signs[1])


def test_per_sample_buffers_that_share_memory_are_refused(gen):
    # Buffers expanded over the samples (stride 0) got every sample's writes, in order, in
    # the loop that vmap fell back to: 0.1 off K separate runs, silently.
    ens = bf.ensemble(make_net, K, generator=gen(1))
    ens.module.train()
    x = torch.randn(8, 4)
    buffers = {k: v[:1].expand_as(v) for k, v in ens.buffers.items()}
    own = copy.deepcopy(ens.module.state_dict())
    for call in (bf.vmap_call, bf.loop_call):
        with pytest.raises(ValueError, match=rf"{call.__name__}: expected per-sample buffers "):
            call(ens.module, ens.params, x, buffers=buffers)
    for k, v in own.items():
        assert torch.equal(ens.module.state_dict()[k], v)


def test_an_ensemble_called_without_its_buffers_is_refused(gen):
    # In train mode the calls moved the module's own statistics (member 0's), averaged
    # over the members, and ens.buffers never moved.
    ens = bf.ensemble(make_net, K, generator=gen(3))
    ens.module.train()
    x = torch.randn(8, 4)
    own = copy.deepcopy(ens.module.state_dict())
    stacked = {k: v.clone() for k, v in ens.buffers.items()}
    for call in (bf.vmap_call, bf.loop_call):
        with pytest.raises(ValueError, match=f"{call.__name__}: expected buffers=ens.buffers"):
            call(ens.module, ens.params, x)
        with pytest.raises(ValueError, match=f"{call.__name__}: expected buffers=ens.buffers"):
            call(ens.module, ens.params, x, buffers={})
    assert all(torch.equal(ens.module.state_dict()[k], v) for k, v in own.items())
    assert all(torch.equal(ens.buffers[k], v) for k, v in stacked.items())

    # A module without buffers needs none; stack_params (equal buffers, used as the
    # module's) is not an ensemble's stack.
    plain = bf.ensemble(lambda: nn.Linear(4, 3), K, generator=gen(4))
    y = bf.vmap_call(plain.module, plain.params, x)
    assert y.shape == (K, 8, 3) and not torch.allclose(y[0], y[1])
    members = [make_net().eval() for _ in range(K)]
    y = bf.vmap_call(members[0], bf.stack_params(members), x)
    assert torch.allclose(y, torch.stack([m(x) for m in members]), atol=1e-10)


def test_a_failed_call_leaves_the_members_buffers_as_found(gen):
    ens = bf.ensemble(make_net, K, generator=gen(2))
    ens.module.train()
    before = {k: v.clone() for k, v in ens.buffers.items()}

    def fn(m, x):
        m(x)
        raise KeyError("boom")

    for call in (bf.vmap_call, bf.loop_call):
        with pytest.raises(KeyError):
            call(ens.module, ens.params, torch.randn(8, 4), fn=fn, buffers=ens.buffers)
        assert all(torch.equal(ens.buffers[k], v) for k, v in before.items())


def test_ensemble_seeds_and_global_state(gen):
    state = torch.random.get_rng_state()
    # Before CUDA starts, torch.manual_seed queues the seed it will get: each member's seed
    # must not stay queued in place of the user's (on a CPU-only build too).
    tracker = torch.cuda._lazy_seed_tracker
    torch.cuda.manual_seed_all(11)
    queued = list(tracker.get_calls())
    a = bf.ensemble(make_net, K, generator=gen(3))
    b = bf.ensemble(make_net, K, generator=gen(3))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global state is untouched
    if not torch.cuda.is_initialized():
        assert tracker.get_calls() == queued
    assert a.seeds == b.seeds and len(set(a.seeds)) == K
    for name, p in a.params.items():
        assert p.is_leaf and p.requires_grad and p.shape[0] == K
        assert torch.equal(p, b.params[name])


def make_frozen():
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    net[0].weight.requires_grad_(False)  # a frozen feature layer, random per member
    return net


def test_frozen_parameters_stay_frozen_as_in_k_separate_trainings(gen):
    data = batches((4,))
    ens = bf.ensemble(make_frozen, K, generator=gen(4))
    assert not ens.params["0.weight"].requires_grad and ens.params["0.bias"].requires_grad
    start = ens.params["0.weight"].clone()

    def sgd(ps):
        return torch.optim.SGD(ps, lr=1e-1, momentum=0.9, weight_decay=1e-2)

    opt = sgd(ens.params.values())
    for x, y in data:
        logits = bf.vmap_call(ens.module, ens.params, x, fallback=False)
        losses = F.cross_entropy(logits.transpose(1, 2), y.expand(K, -1), reduction="none")
        opt.zero_grad()
        losses.mean(1).sum().backward()
        opt.step()

    assert torch.equal(ens.params["0.weight"], start)
    for i, seed in enumerate(ens.seeds):
        member = _trained_alone(make_frozen, seed, sgd, data)
        for p_name, p in member.named_parameters():
            assert torch.allclose(ens.params[p_name][i], p, atol=1e-10), p_name
    # each member keeps its own frozen layer: the outputs differ by member
    out = bf.vmap_call(ens.module, ens.params, data[0][0])
    assert not torch.allclose(out[0], out[1])


def test_members_that_freeze_different_parameters_are_refused(gen):
    nets = [make_frozen(), make_frozen()]
    nets[1][0].weight.requires_grad_(True)
    for stack in (bf.stack_modules, lambda ms: bf.ensemble(iter(ms).__next__, 2)):
        with pytest.raises(ValueError, match="requires_grad=False in every module"):
            stack(nets)


def test_a_failed_ensemble_call_draws_no_seeds(gen):
    state = torch.random.get_rng_state()
    for make in (lambda: "not a module", make_net):
        with pytest.raises(TypeError, match="ensemble: expected k"):
            bf.ensemble(make, 2.5)
    with pytest.raises(TypeError, match="ensemble: expected make_module to return"):
        bf.ensemble(lambda: "not a module", 2)
    assert torch.equal(torch.random.get_rng_state(), state)
    g = gen(5)
    g_state = g.get_state()
    with pytest.raises(TypeError, match="ensemble: expected make_module to return"):
        bf.ensemble(lambda: "not a module", 2, generator=g)
    assert torch.equal(g.get_state(), g_state)


class _EMA(nn.Module):
    r"""Updates its buffers by assigning new tensors (`self.ema = ...`), not in place."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("ema", torch.zeros(2))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        y = self.lin(x)
        self.ema = 0.9 * self.ema + 0.1 * y.detach().mean(0)
        self.steps = self.steps + 1
        return y


@pytest.mark.parametrize("k", [3, 1])
@pytest.mark.parametrize("call", ["loop", "vmap"])
def test_members_buffers_assigned_anew_are_written_back(call, k):
    # The members' buffers, given per sample, must end as K separate runs leave them
    # whether fn updates them in place or assigns new tensors; they stayed as they were.
    # vmap cannot batch the assignment: it falls back to the loop and says why.
    members = []
    for s in range(k):
        torch.manual_seed(s)
        members.append(_EMA())
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    ens = bf.stack_modules(members)
    separate = [copy.deepcopy(m) for m in members]
    expected = torch.stack([m(x) for m in separate])
    own = copy.deepcopy(ens.module.state_dict())

    if call == "loop":
        y = bf.loop_call(ens.module, ens.params, x, buffers=ens.buffers)
    elif k == 1:
        y = bf.vmap_call(ens.module, ens.params, x, buffers=ens.buffers, fallback=False)
    else:
        with pytest.warns(bf.VmapFallbackWarning, match="buffers given per sample"):
            y = bf.vmap_call(ens.module, ens.params, x, buffers=ens.buffers)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    assert k == 1 or not torch.allclose(y[0], y[1])
    for name in ("ema", "steps"):
        torch.testing.assert_close(
            ens.buffers[name], torch.stack([m.get_buffer(name) for m in separate])
        )
    assert (ens.buffers["steps"] == 1).all()
    for name, v in own.items():  # the module's own are left alone
        assert torch.equal(ens.module.state_dict()[name], v)


class _KeepsThePrevious(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("cur", torch.zeros(2))
        self.register_buffer("prev", torch.zeros(2))

    def forward(self, x):
        self.prev = self.cur  # a given buffer, assigned to another
        self.cur = self.cur + 1
        return self.lin(x)


@pytest.mark.parametrize("k", [3, 1])
@pytest.mark.parametrize("call", [bf.loop_call, bf.vmap_call], ids=["loop", "vmap"])
def test_members_buffers_assigned_each_other_are_read_before_written(call, k):
    # The oracle: K separate runs, two calls each (cur 2, prev 1); the write-back read
    # `prev`'s value after overwriting `cur` (2, 2).
    members = []
    for s in range(k):
        torch.manual_seed(s)
        members.append(_KeepsThePrevious())
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    separate = [copy.deepcopy(m) for m in members]
    for m in separate:
        expected = m(x), m(x)
    ens = bf.stack_modules(members)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bf.VmapFallbackWarning)  # vmap: the loop writes back
        for _ in range(2):
            y = call(ens.module, ens.params, x, buffers=ens.buffers)
    torch.testing.assert_close(y[-1], expected[1])
    assert k == 1 or not torch.allclose(y[0], y[1])
    for name in ("cur", "prev"):
        torch.testing.assert_close(
            ens.buffers[name], torch.stack([m.get_buffer(name) for m in separate])
        )


class _Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(6, 4, max_norm=0.5)  # renormalizes the rows it reads, in place
        self.head = nn.Linear(4, 3)

    def forward(self, idx):
        return self.head(self.e(idx).mean(1))


@pytest.mark.parametrize("call", ["vmap_call", "loop_call"])
def test_embeddings_with_max_norm_train_as_k_separate_trainings(call, gen):
    # Each sample renormalized a copy of its weight, and the ensemble's parameters never
    # saw it: trained, they were not the K separate trainings (weights 1.7 apart).
    _assert_trains_as_k_separate_trainings(bf.ensemble(_Bag, K, generator=gen(0)), call)


def _assert_trains_as_k_separate_trainings(ens, call="vmap_call"):
    r"""Trains the `_Bag` ensemble `ens` three SGD steps through `call`, against each
    member trained alone from its seed."""

    g = torch.Generator().manual_seed(3)
    data = [(torch.randint(0, 5, (8, 3), generator=g), torch.randint(0, 3, (8,), generator=g))]
    data *= 3
    opt_of = lambda ps: torch.optim.SGD(ps, lr=0.5)

    opt = opt_of(ens.params.values())
    for idx, y in data:
        logits = getattr(bf, call)(ens.module, ens.params, idx)
        losses = F.cross_entropy(logits.transpose(1, 2), y.expand(K, -1), reduction="none")
        opt.zero_grad()
        losses.mean(1).sum().backward()
        opt.step()

    for i, seed in enumerate(ens.seeds):
        member = _trained_alone(_Bag, seed, opt_of, data)
        for p_name, p in member.named_parameters():
            assert torch.allclose(ens.params[p_name][i], p, atol=1e-12), p_name
    norms = ens.params["e.weight"].detach().norm(dim=-1)
    # Rows read were renormalized to 0.5 (initial norms about 2), then moved by the steps;
    # row 5, never read, kept its own.
    assert (norms[:, :5] < 0.6).all() and (norms[:, 5] > 0.6).all()


def _saved_and_loaded(ens):
    buffer = io.BytesIO()
    torch.save(ens, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _rebuilt(ens):
    # What `torch.load`'s default (weights_only=True) can read back: the tensors alone.
    buffer = io.BytesIO()
    torch.save({"params": ens.params, "buffers": ens.buffers}, buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    return bf.Ensemble(ens.module, state["params"], state["buffers"], ens.seeds)


def _replaced(ens):
    return ens._replace(
        params={k: v.detach().clone().requires_grad_() for k, v in ens.params.items()}
    )


def _pickled_at_protocol_0(ens):
    return pickle.loads(pickle.dumps(ens, protocol=0))


@pytest.mark.parametrize(
    "route", [copy.deepcopy, _saved_and_loaded, _rebuilt, _replaced, _pickled_at_protocol_0]
)
def test_a_copied_or_reloaded_ensemble_with_max_norm_trains_as_k_separate_trainings(route, gen):
    # The write-back of the renormalized rows went to the tensors bf.ensemble had made
    # (marked by identity): a copy's, a reloaded one's, or tensors saved and put back in
    # an Ensemble, were never renormalized in place (0.25 off K separate trainings).
    _assert_trains_as_k_separate_trainings(route(bf.ensemble(_Bag, K, generator=gen(0))))


def test_samples_of_a_posterior_are_not_renormalized_in_place(gen):
    # Written back into an Ensemble's parameters only: a posterior's samples are the
    # caller's, left as they are.
    net = _Bag()
    q = bf.init(net, init_logvar=-2.0)
    idx = torch.randint(0, 5, (4, 3), generator=gen(1))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            params = bf.sample(q, K, generator=gen(2))
        before = {k: v.detach().clone() for k, v in params.items()}
        out = bf.vmap_call(net, params, idx)
        assert all(torch.equal(params[k], before[k]) for k in params)
        assert not torch.allclose(out[0], out[1])  # the samples change the output
        # the outputs are those of the renormalized copies: as K modules' calls
        for i in range(K):
            member = copy.deepcopy(net)
            member.load_state_dict({k: v[i] for k, v in before.items()}, strict=False)
            assert torch.allclose(out[i], member(idx), atol=1e-12)


@pytest.mark.parametrize("k", [1, 2])
def test_lazy_members_are_refused_with_a_message(k, gen):
    # torch's "Can't access the shape of an uninitialized parameter" (or "Attempted to use an
    # uninitialized parameter") came from deep inside the stacking, naming no function.
    state = gen(0).get_state()
    g = gen(0)
    with pytest.raises(
        ValueError, match=r"ensemble: expected initialized modules, got '0\.weight'"
    ):
        bf.ensemble(lambda: nn.Sequential(nn.LazyLinear(3)), k, generator=g)
    assert torch.equal(g.get_state(), state)  # a failed call draws no seeds
    lazy = [nn.Sequential(nn.LazyLinear(3)) for _ in range(k)]
    for where, stack in (("stack_params", bf.stack_params), ("stack_modules", bf.stack_modules)):
        with pytest.raises(ValueError, match=rf"{where}: expected initialized modules"):
            stack(lazy)


def test_ensemble_refuses_a_module_or_a_factory_that_gives_one_initialization(gen):
    # A module is callable (its forward): "forward() missing 1 required positional argument"
    # came from inside. A factory that returns one module, copies of a template or a net
    # from a seed of its own gave K equal members, which train identically: an ensemble with
    # no spread, and no word of it.
    template = make_net()
    before = copy.deepcopy(template.state_dict())
    state = torch.random.get_rng_state()
    g = gen(6)
    g_state = g.get_state()

    def fixed_seed():
        torch.manual_seed(0)
        return make_net()

    with pytest.raises(
        TypeError,
        match=r"ensemble: expected make_module to be a function that builds a module, got the "
        r"module Sequential; .*lambda: Sequential\(\.\.\.\)",
    ):
        bf.ensemble(template, K)
    with pytest.raises(
        ValueError,
        match=r"ensemble: expected make_module to build a new module each call, got "
        r"the same Sequential for members 0 and 1",
    ):
        bf.ensemble(lambda: template, K, generator=g)
    for make in (lambda: copy.deepcopy(template), fixed_seed):
        for generator in (None, g):
            with pytest.raises(
                ValueError,
                match=rf"ensemble: expected members with different initial parameters, got {K} "
                r"equal ones, which would train identically; make_module must initialize each "
                r"member from torch's global random state",
            ):
                bf.ensemble(make, K, generator=generator)
    assert torch.equal(torch.random.get_rng_state(), state)  # a failed call draws no seeds
    assert torch.equal(g.get_state(), g_state)
    assert all(torch.equal(v, before[k]) for k, v in template.state_dict().items())

    one = bf.ensemble(lambda: template, 1, generator=g)  # one member: nothing to compare
    assert torch.equal(one.params["0.weight"][0], template[0].weight)


def _with(layer):
    return lambda: nn.Sequential(nn.Linear(4, 8), layer(), nn.Linear(8, 3))


# Members that differ only where check_members read no tensor: each ran as members[0].
DIFFERENT = {
    "activation": (
        _with(nn.ReLU),
        _with(nn.Tanh),
        r"expected the submodules of modules\[0\] \(names and classes\) in every module, got "
        r"submodule '1' \(Tanh\) at index 1 where modules\[0\] has submodule '1' \(ReLU\)",
    ),
    "submodule": (
        _with(nn.ReLU),
        lambda: nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU()), nn.Linear(8, 3)),
        r"got submodule '1' \(Sequential\) at index 1 where modules\[0\] has submodule '1' \(ReLU\)",
    ),
    "batchnorm-eps": (
        _with(lambda: nn.BatchNorm1d(8, eps=0.5)),
        _with(lambda: nn.BatchNorm1d(8)),
        r"expected the settings of modules\[0\] in every module, got submodule '1' with "
        r"eps=1e-05 at index 1 and eps=0.5 in modules\[0\]",
    ),
    "batchnorm-momentum": (
        _with(lambda: nn.BatchNorm1d(8, momentum=None)),
        _with(lambda: nn.BatchNorm1d(8)),
        r"got submodule '1' with momentum=0.1 at index 1 and momentum=None in modules\[0\]",
    ),
    "dropout-p": (
        _with(lambda: nn.Dropout(0.1)),
        _with(lambda: nn.Dropout(0.5)),
        r"got submodule '1' with p=0.5 at index 1 and p=0.1 in modules\[0\]",
    ),
    "leaky-relu-slope": (
        _with(lambda: nn.LeakyReLU(0.1)),
        _with(nn.LeakyReLU),
        r"got submodule '1' with negative_slope=0.01 at index 1",
    ),
    "mode": (
        lambda: make_net().train(),
        lambda: make_net().eval(),
        r"expected every module in the mode of modules\[0\], got the module in evaluation mode "
        r"at index 1 and in training mode in modules\[0\]; call .train\(\) or .eval\(\) on each",
    ),
    "submodule-mode": (
        _with(lambda: nn.Dropout(0.5)),
        lambda: _with(lambda: nn.Dropout(0.5).eval())(),
        r"got submodule '1' in evaluation mode at index 1 and in training mode in modules\[0\]",
    ),
}


class _Scaled(nn.Module):
    r"""A layer whose forward calls a function it made in its `__init__`: a new object in
    each member, which computes the same where it captured the same."""

    def __init__(self, scale):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.act = lambda x: torch.tanh(scale * x)

    def forward(self, x):
        return self.act(self.linear(x))


class _Offset(nn.Module):
    r"""A layer with a tensor attribute that is neither a parameter nor a buffer: not
    stacked, so every member runs with modules[0]'s."""

    def __init__(self, offset):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.offset = torch.full((3,), offset)

    def forward(self, x):
        return self.linear(x) + self.offset


def _encoder(**kwargs):
    return lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, **kwargs).eval()


# Settings that `extra_repr` does not print (it prints nothing for these layers), and a
# function, not a submodule: every member ran with those of modules[0], as the oracle
# test below measures.
DIFFERENT_UNPRINTED = {
    "attention-batch-first": (
        lambda: nn.MultiheadAttention(8, 2).eval(),
        lambda: nn.MultiheadAttention(8, 2, batch_first=True).eval(),
        r"got the module with batch_first=True at index 1 and batch_first=False in modules\[0\]",
    ),
    "encoder-norm-first": (
        _encoder(),
        _encoder(norm_first=True),
        r"got the module with norm_first=True at index 1 and norm_first=False in modules\[0\]",
    ),
    "encoder-activation": (
        _encoder(activation="relu"),
        _encoder(activation="gelu"),
        r"got the module with activation_relu_or_gelu=2 at index 1",
    ),
    "encoder-activation-function": (
        _encoder(activation=F.silu),
        _encoder(activation=torch.tanh),
        r"got the module with activation=torch.tanh at index 1 and "
        r"activation=torch.nn.functional.silu in modules\[0\]",
    ),
    "captured-value": (
        lambda: _Scaled(1.0),
        lambda: _Scaled(3.0),
        r"got the module with act=.*<lambda> \(with other defaults or captured values\) at "
        r"index 1",
    ),
}
DIFFERENT.update(
    {
        name: (first, other, rf"expected the settings of modules\[0\] in every module, {message}")
        for name, (first, other, message) in DIFFERENT_UNPRINTED.items()
    }
)
DIFFERENT["attention-dropout"] = (  # what differs in training mode only
    lambda: nn.MultiheadAttention(8, 2, dropout=0.1),
    lambda: nn.MultiheadAttention(8, 2),
    r"got the module with dropout=0.0 at index 1 and dropout=0.1 in modules\[0\]",
)


def _forward(module, x):
    if isinstance(module, nn.MultiheadAttention):
        return module(x, x, x, need_weights=False)[0]
    return module(x)


def _input(module):
    return torch.randn(5, 4) if isinstance(module, (_Scaled, _Offset)) else torch.randn(5, 3, 8)


@pytest.mark.parametrize("case", DIFFERENT_UNPRINTED)
def test_members_that_differ_in_unprinted_settings_compute_other_functions(case):
    # The oracle behind the refusals above: run as modules[0] (its settings, member 1's
    # weights), member 1 computes another function than its own.
    make_first, make_other, _ = DIFFERENT_UNPRINTED[case]
    torch.manual_seed(0)
    first, other = make_first(), make_other()
    x = _input(first)
    as_first = copy.deepcopy(first)
    as_first.load_state_dict(other.state_dict())
    assert not torch.allclose(_forward(as_first, x), _forward(other, x), atol=1e-3)


@pytest.mark.parametrize("case", DIFFERENT_UNPRINTED)
def test_members_alike_in_unprinted_settings_are_stacked_and_each_runs_its_own(case):
    # What the comparison must let through: members of one factory, settings, functions
    # (torch's, or a lambda of the module's that captured the same value) and all.
    make_first, _, _ = DIFFERENT_UNPRINTED[case]
    members = []
    for seed in range(K):
        torch.manual_seed(seed)
        members.append(make_first())
    x = _input(members[0])
    own = torch.stack([_forward(copy.deepcopy(m), x) for m in members])

    ens = bf.stack_modules(members)
    for call in (bf.vmap_call, bf.loop_call):
        out = call(ens.module, ens.params, x, fn=_forward, buffers=ens.buffers)
        assert torch.allclose(out, own, atol=1e-12), call.__name__
    assert not torch.allclose(out[1], out[0])  # the stacked parameters were used


@pytest.mark.parametrize("case", DIFFERENT)
def test_stacking_refuses_members_that_differ_in_submodules_mode_or_settings(case):
    # ReLU against Tanh: member 1's prediction was 0.5 off its own; BatchNorm's eps, 1.1.
    make_first, make_other, message = DIFFERENT[case]
    torch.manual_seed(0)
    members = [make_first(), make_other()]
    for where, stack in (
        ("stack_modules", bf.stack_modules),
        ("stack_params", bf.stack_params),
        ("ensemble", lambda ms: bf.ensemble(iter(ms).__next__, 2)),
    ):
        with pytest.raises(ValueError, match=rf"{where}: .*{message}"):
            stack(members)


def test_stacking_refuses_members_with_a_submodule_more():
    first = _with(nn.ReLU)()
    other = _with(nn.ReLU)()
    other.add_module("3", nn.Identity())
    for where, stack in (("stack_modules", bf.stack_modules), ("stack_params", bf.stack_params)):
        with pytest.raises(
            ValueError,
            match=rf"{where}: expected the submodules .*, got an extra submodule '3' "
            r"\(Identity\) at index 1",
        ):
            stack([first, other])
        with pytest.raises(ValueError, match=rf"{where}: .*got no submodule '3' \(Identity\)"):
            stack([other, first])


def test_stacking_takes_members_of_one_factory_with_their_own_statistics(gen):
    # What the comparison must let through: BatchNorm statistics of their own (buffers,
    # compared as tensors), and zuko flows, whose extra_repr builds a transform and draws from
    # the global random state (not read: the state is left as found).
    members = []
    for seed in range(K):
        torch.manual_seed(seed)
        net = make_net().train()
        net(torch.randn(16, 4) + seed)
        members.append(net.eval())
    assert bf.stack_modules(members).buffers["1.running_mean"].shape == (K, 8)

    flows = []
    for seed in range(K):
        torch.manual_seed(seed)
        flows.append(zuko.flows.NSF(2, 1, transforms=2, hidden_features=(8,)))
    state = torch.random.get_rng_state()
    ens = bf.stack_modules(flows)
    params = bf.stack_params(flows)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert ens.params.keys() == params.keys()
    ens = bf.ensemble(lambda: zuko.flows.NSF(2, 1, transforms=2, hidden_features=(8,)), K, gen(7))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_members_with_masks_of_their_own_keep_them_under_vmap():
    # zuko's MaskedLinear under vmap multiplied by the mask read when its vectorized forward
    # was installed, the module's own (member 0's): the members of an ensemble of
    # autoregressive flows with random orders got member 0's masks (log-densities 0.26 to
    # 1.46 off, gradients up to 2.0), while the loop gave each its own.
    members = []
    for seed in (10, 11, 12):
        torch.manual_seed(seed)
        members.append(zuko.flows.MAF(3, 1, transforms=2, hidden_features=(8,), randperm=True))
    ens = bf.stack_modules(members)
    masks = ens.buffers["transform.transforms.0.hyper.0.mask"]
    assert not torch.equal(masks[0], masks[1])  # the members' masks differ
    c, x = torch.randn(4, 1), torch.randn(4, 3)
    fn = lambda f, c, x: f(c).log_prob(x)
    own = torch.stack([fn(m, c, x) for m in members])
    for call in (bf.vmap_call, bf.loop_call):
        out = call(ens.module, ens.params, c, x, fn=fn, buffers=ens.buffers)
        assert torch.allclose(out, own, rtol=1e-10), call.__name__


# torch.nn.utils.parametrize makes a class of its own for each parametrized module: members
# of one factory were refused as of two classes ("got submodule '0' (ParametrizedLinear)
# at index 1 where modules[0] has submodule '0' (ParametrizedLinear)").
PARAMETRIZED = {
    "weight-norm": lambda: nn.Sequential(
        parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)
    ),
    "spectral-norm": lambda: nn.Sequential(
        parametrizations.spectral_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)
    ),
    "orthogonal": lambda: nn.Sequential(
        nn.Linear(3, 4), parametrizations.orthogonal(nn.Linear(4, 4)), nn.Linear(4, 2)
    ),
    "root": lambda: parametrizations.weight_norm(nn.Linear(3, 4)),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", PARAMETRIZED)
def test_members_with_parametrizations_are_stacked_and_each_runs_its_own(name, mode, gen):
    make = lambda: getattr(PARAMETRIZED[name](), mode)().double()
    members = []
    for seed in range(K):
        torch.manual_seed(seed)
        members.append(make())
    copies = [copy.deepcopy(m) for m in members]  # the oracle: each member by itself
    x = torch.randn(5, 3, dtype=torch.float64)
    own = torch.stack([m(x) for m in copies])
    own.square().sum().backward()

    ens = bf.stack_modules(members)
    out = bf.vmap_call(ens.module, ens.params, x, buffers=ens.buffers, fallback=False)
    out.square().sum().backward()

    assert torch.allclose(out, own, atol=1e-12)
    assert not torch.allclose(out[1], out[0])  # the stacked parameters were used
    for key, p in ens.params.items():  # each member's gradients, through its parametrization
        expected = torch.stack([dict(m.named_parameters())[key].grad for m in copies])
        assert torch.allclose(p.grad, expected, atol=1e-12), key
    for key, b in ens.buffers.items():  # spectral norm's power iteration, each member its own
        # (to rounding: a batched matrix-vector product may round apart from one alone)
        expected = torch.stack([dict(m.named_buffers())[key] for m in copies])
        assert torch.allclose(b, expected, rtol=0, atol=1e-14), key
        assert not torch.allclose(b[1], b[0]), key

    # Without buffers (weight norm), one module runs the members' stacked parameters.
    if not ens.buffers:
        params = bf.stack_params(members)
        assert torch.allclose(bf.vmap_call(members[0], params, x), own, atol=1e-12)
    built = bf.ensemble(make, K, generator=gen(3))
    assert built.params.keys() == ens.params.keys()


class _Scale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, w):
        return self.c * w


class _Shift(nn.Module):
    def forward(self, w):
        return w + 1.0


def _parametrized(parametrization):
    linear = nn.Linear(3, 4)
    nn.utils.parametrize.register_parametrization(linear, "weight", parametrization)
    return nn.Sequential(linear)


def test_members_with_other_parametrizations_are_refused():
    # The parametrizations are submodules, compared as any other: their classes and settings.
    for where, stack in (("stack_modules", bf.stack_modules), ("stack_params", bf.stack_params)):
        with pytest.raises(ValueError, match=rf"{where}: expected the same parameter names"):
            stack([nn.Sequential(nn.Linear(3, 4)), _parametrized(_Scale(2.0))])
        with pytest.warns(  # a parametrization of the user's: said, as its other settings
            UserWarning,
            match=rf"{where}: every member runs with the attributes of modules\[0\], got "
            r"submodule '0.parametrizations.weight.0' with c=3.0 at index 1 and c=2.0 in "
            r"modules\[0\]",
        ):
            stack([_parametrized(_Scale(2.0)), _parametrized(_Scale(3.0))])
        with pytest.raises(
            ValueError,
            match=rf"{where}: expected the submodules of modules\[0\] \(names and classes\) in "
            r"every module, got submodule '0.parametrizations.weight.0' \(_Shift\) at index 1 "
            r"where modules\[0\] has submodule '0.parametrizations.weight.0' \(_Scale\)",
        ):
            stack([_parametrized(_Scale(2.0)), _parametrized(_Shift())])


def test_classes_of_one_name_are_told_apart_by_their_qualified_names():
    # "expected modules of one class, got Net and Net" named no difference.
    def define():
        class Net(nn.Linear):
            pass

        return Net

    first, other = define()(3, 4), define()(3, 4)
    with pytest.raises(
        ValueError,
        match=r"stack_modules: expected modules of one class, got "
        r"tests\.test_ensemble\..*define\.<locals>\.Net and .*\.Net at index 1",
    ):
        bf.stack_modules([first, other])


def test_members_with_equal_buffers_that_hold_nan_stack():
    # torch.equal says no to NaN: stack_params refused even [m, m].
    torch.manual_seed(0)
    first = NanBuffer()
    members = [first, copy.deepcopy(first)]
    with torch.no_grad():
        members[1].lin.weight.add_(1.0)
    stacked = bf.stack_params(members)
    x = torch.randn(4, 3)
    out = bf.vmap_call(first, stacked, x)
    assert torch.allclose(out, torch.stack([m(x) for m in members]), atol=1e-12)
    assert not torch.allclose(out[0], out[1])
    other = copy.deepcopy(first)
    other.b[0] = 2.0  # a buffer that does differ is still refused
    with pytest.raises(ValueError, match="stack_params: expected equal buffers"):
        bf.stack_params([first, other])


def test_a_users_layer_that_differs_in_plain_data_is_stacked_with_a_warning(recwarn):
    # A layer of the user's may hold a name, a seed or a cache of its own (these were
    # refused), or a setting its forward reads (a tensor here: every member runs with
    # modules[0]'s). Said, not refused; torch's layers and functions are refused above.
    torch.manual_seed(0)
    members = [_Offset(1.0), _Offset(2.0)]
    with pytest.warns(
        UserWarning,
        match=r"stack_modules: every member runs with the attributes of modules\[0\], got the module with offset=tensor",
    ):
        ens = bf.stack_modules(members)
    with pytest.warns(UserWarning) as record:  # said once per call, at the caller's line
        bf.stack_modules([_Offset(1.0), _Offset(2.0), _Offset(3.0)])
    assert len(record) == 1 and record[0].filename == __file__
    x = torch.randn(5, 4)
    out = bf.vmap_call(ens.module, ens.params, x)
    as_first = copy.deepcopy(members[0])
    as_first.load_state_dict(members[1].state_dict())
    assert torch.allclose(out[1], as_first(x), atol=1e-12)  # what the warning says
    assert not torch.allclose(out[1], members[1](x))


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", ["lstm", "gru", "weight_norm", "spectral_norm", "prune"])
def test_members_whose_attributes_hold_their_own_weights_stack(kind):
    # A recurrent layer keeps its weights in a list (and weak references to them), hook-based
    # weight norm, spectral norm and pruning a computed weight: compared as settings, every
    # member differed from the first and was refused. Oracle: each member's own output.
    from torch.nn.utils import prune

    def make():
        if kind in ("lstm", "gru"):
            return (nn.LSTM if kind == "lstm" else nn.GRU)(3, 4, batch_first=True)
        lin = nn.Linear(3, 4)
        if kind == "weight_norm":
            return nn.utils.weight_norm(lin)
        if kind == "spectral_norm":
            return nn.utils.spectral_norm(lin).eval()
        return prune.l1_unstructured(lin, "weight", amount=0.5)

    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(make())
    x = torch.randn(2, 5, 3)
    fn = (lambda m, x: m(x)[0]) if kind in ("lstm", "gru") else None
    with torch.no_grad():
        own = torch.stack([(fn or (lambda m, x: m(x)))(m, x) for m in members])
    ens = bf.stack_modules(members)
    out = bf.vmap_call(ens.module, ens.params, x, fn=fn, buffers=ens.buffers)
    assert torch.allclose(out, own, atol=1e-6)
    assert not torch.allclose(out[0], out[1])
