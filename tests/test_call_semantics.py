r"""Regression tests for what a call must never do silently: corrupt tied weights, repeat
side effects, mix threads, ignore randomness; and the small contracts of the call."""

import contextlib
import copy
import functools
import sys
import threading
import types
import warnings

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import zuko

import bayesflow as bf

from .registry import NanBuffer, TiedLM, snapshot, unchanged


def _shared():
    lin = nn.Linear(3, 3)
    return nn.Sequential(lin, nn.Tanh(), lin)


def _identity(module):
    return {k: (p, p.detach().clone()) for k, p in module.named_parameters(remove_duplicate=False)}


def _unchanged(module, before):
    after = dict(module.named_parameters(remove_duplicate=False))
    return after.keys() == before.keys() and all(
        after[k] is p and torch.equal(after[k], v) for k, (p, v) in before.items()
    )


TIED_CALLS = {
    "loop_call": lambda m, p, x: bf.loop_call(m, p, x),
    "vmap_call": lambda m, p, x: bf.vmap_call(m, p, x, fallback=False),
    "vmap_call-n1": lambda m, p, x: bf.vmap_call(m, {k: v[:1] for k, v in p.items()}, x),
    "vmap_call-chunked": lambda m, p, x: bf.vmap_call(m, p, x, chunk_size=2, fallback=False),
    "local_call": lambda m, p, x: bf.local_call(m, bf.init(m, -3.0), 3, x),
}


@pytest.mark.parametrize("build", [_shared, TiedLM], ids=["shared-submodule", "tied-embedding"])
@pytest.mark.parametrize("call", TIED_CALLS)
def test_tied_weights_get_the_sample_everywhere_and_are_restored(build, call, gen):
    module = build()
    x = torch.tensor([[1, 2, 3], [4, 5, 6]]) if build is TiedLM else torch.randn(4, 3)
    params = bf.sample(
        bf.init(module, -3.0),
        3,
        generator=gen(0),
    )
    before = _identity(module)

    y = TIED_CALLS[call](module, params, x)

    assert _unchanged(module, before)
    if call != "local_call":
        # an oracle independent of the swap: sample k copied into a deep copy
        for k in range(y.shape[0]):
            m = copy.deepcopy(module)
            with torch.no_grad():
                for name, v in params.items():
                    m.get_parameter(name).copy_(v[k])
            assert torch.allclose(y[k], m(x), atol=1e-10)
    assert module(x).shape == y.shape[1:]  # still usable


@pytest.mark.parametrize("local_trick", [False, True])
def test_tied_weights_with_the_bridge(local_trick):
    module = _shared()
    before = _identity(module)
    bnet = bf.BayesianModel(module, init_logvar=-3.0)
    x = torch.randn(4, 3)

    bnet(x, n=3, fallback=False).sum().backward()
    bnet(x).sum().backward()
    with bnet.reparameterize(local_trick=local_trick) as m:
        assert m[0].weight is m[2].weight  # one sample in both places
        m(x).sum().backward()

    assert _unchanged(module, before)
    assert bnet.means["0-weight"].grad is not None


def test_init_explains_tied_names():
    module = TiedLM()
    for where, pick in (("select", bf.select), ("init", bf.init)):
        with pytest.raises(ValueError, match=rf"{where}: .*'dec.weight' is tied to 'emb.weight'"):
            pick(module, include=["dec"])
    with pytest.raises(
        ValueError, match=r"vmap_call: .*'dec.weight', which is tied to 'emb.weight'"
    ):
        bf.vmap_call(module, {"dec.weight": torch.zeros(2, 7, 4)}, torch.tensor([1]))


def test_a_tied_parameter_picked_by_its_second_name_only_is_refused():
    # With a bias on the decoder, include=["dec"] silently gave a posterior of the bias
    # alone (Laplace, SWAG, IVON, init): the tied weight's one name is emb.weight.
    class Biased(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.dec = nn.Embedding(7, 4), nn.Linear(4, 7)
            self.dec.weight = self.emb.weight

        def forward(self, tok):
            return self.dec(self.emb(tok).mean(1))

    module = Biased()
    before = copy.deepcopy(module.state_dict())
    tok, y = torch.randint(0, 7, (4, 3)), torch.randint(0, 7, (4,))
    ll = lambda m, t, y: -F.cross_entropy(m(t), y, reduction="none")
    message = (
        r"got tied names whose Parameter it leaves out \('dec.weight' is tied to 'emb.weight'"
    )
    for where, call in (
        ("select", lambda **kw: bf.select(module, **kw)),
        ("init", lambda **kw: bf.init(module, **kw)),
        ("SWAG", lambda **kw: bf.SWAG(module, **kw)),
        ("IVON", lambda **kw: bf.IVON(module, lr=0.1, ess=4.0, **kw)),
        ("laplace_fit", lambda **kw: bf.laplace_fit(module, ll, [(tok, y)], hessian="ef", **kw)),
    ):
        with pytest.raises(ValueError, match=rf"^{where}: .*{message}"):
            call(include=["dec"])
        assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    # both names, or the bias alone said outright, are fine; so is the Parameter left out
    # by its first name
    assert list(bf.init(module, include=["dec", "emb"]).mean) == ["emb.weight", "dec.bias"]
    assert bf.select(module, include=["dec"], exclude=["dec.weight"]) == ["dec.bias"]
    assert bf.select(module, exclude=["emb"]) == ["dec.bias"]
    lin = nn.Linear(3, 3)
    twice = nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(3, 1))
    assert bf.select(twice, exclude=["0.bias"]) == ["0.weight", "3.weight", "3.bias"]
    with pytest.raises(ValueError, match=r"'2.weight' is tied to '0.weight'"):
        bf.select(twice, include=["2", "3"])
    module.emb.weight.requires_grad_(False)  # frozen: init keeps frozen parameters
    with pytest.raises(ValueError, match=r"'dec.weight' is tied to 'emb.weight'"):
        bf.init(module, include=["dec"])
    # zuko's wrapper picks as zuko does: by the first names
    assert list(bf.BayesianModel(module, include_params=["dec"]).means) == ["dec-bias"]


def test_failed_vectorized_attempt_leaves_no_trace_and_updates_once():
    # momentum=None (a cumulative average) cannot update per sample: vmap fails on it
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None)).train()
    params = bf.sample(bf.init(module, -2.0, include=["0"]), 4)
    x = torch.randn(8, 3)
    looped = copy.deepcopy(module)

    with pytest.warns(bf.VmapFallbackWarning, match="momentum=None"):
        y = bf.vmap_call(module, params, x)

    y_loop = bf.loop_call(looped, params, x)
    assert torch.allclose(y, y_loop, atol=1e-10)
    bn, bn_loop = module[1], looped[1]
    assert bn.num_batches_tracked.item() == 1  # once per call, not 1 + K
    assert torch.allclose(bn.running_mean, bn_loop.running_mean, atol=1e-12)
    with pytest.raises(RuntimeError, match="momentum=None"):
        bf.vmap_call(copy.deepcopy(module), params, x, fallback=False)


def test_a_failed_call_restores_buffers():
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    params = bf.sample(bf.init(module, -2.0), 3)
    state = {k: v.clone() for k, v in module.state_dict().items()}

    def fn(m, x):
        m(x)  # updates the running statistics, then fails
        raise KeyError("boom")

    for call in (bf.vmap_call, bf.loop_call):
        with pytest.raises(KeyError):
            call(module, params, torch.randn(8, 3), fn=fn)
        assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())


def _naf(seed):
    torch.manual_seed(seed)
    flow = zuko.flows.NAF(2, 1, transforms=1, hidden_features=(8,), signal=4)
    params = bf.sample(
        bf.init(flow, -4.0),
        3,
        generator=torch.Generator(torch.get_default_device()).manual_seed(seed),
    )
    c, x = torch.randn(5, 1), torch.randn(5, 2)
    return flow, params, c, x


def _log_prob(f, c, x):
    return f(c).log_prob(x)


def test_threads_each_get_their_own_numbers():
    jobs = [_naf(seed) for seed in (1, 2)]
    expected = [bf.loop_call(f, p, c, x, fn=_log_prob) for f, p, c, x in jobs]
    plain_flow, _, plain_c, plain_x = _naf(3)
    plain_expected = plain_flow(plain_c).log_prob(plain_x)
    results, errors, plain = [], [], []
    done = threading.Event()

    def work(i):
        f, p, c, x = jobs[i]
        try:
            for _ in range(6):
                y = bf.vmap_call(f, p, c, x, fn=_log_prob, fallback=False)
                results.append(torch.allclose(y, expected[i], atol=1e-10))
        except Exception as err:
            errors.append(err)

    def outside():  # zuko used directly, in a thread outside any bayesflow call
        while not done.is_set():
            plain.append(torch.allclose(plain_flow(plain_c).log_prob(plain_x), plain_expected))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    watcher = threading.Thread(target=outside)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()

    assert not errors and len(results) == 12 and all(results)
    assert plain and all(plain)


def test_threads_on_the_same_module_are_serialized():
    module = zuko.nn.MLP(3, 2, hidden_features=(16,))
    before = _identity(module)
    q = bf.init(module, -3.0)
    x = torch.randn(6, 3)
    samples = [bf.sample(q, 4) for _ in range(4)]
    expected = [bf.loop_call(module, p, x) for p in samples]
    ok = []

    def work(i):
        for _ in range(5):
            ok.append(torch.allclose(bf.vmap_call(module, samples[i], x), expected[i], atol=1e-10))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(ok) == 20 and all(ok)
    assert _unchanged(module, before)


def test_threads_on_a_module_and_its_submodule_are_serialized():
    # A lock per module let the two calls swap each other's samples in and out.
    old = sys.getswitchinterval()
    inner = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    model = nn.Sequential(inner, nn.Tanh(), nn.Linear(8, 2))
    before = _identity(model)
    x = torch.randn(16, 8)
    jobs = {
        "model": (model, bf.sample(bf.init(model, -2.0), 4)),
        "inner": (inner, bf.sample(bf.init(inner, -2.0), 4)),
    }
    expected = {k: bf.loop_call(m, p, x) for k, (m, p) in jobs.items()}
    assert not torch.allclose(expected["model"][0], expected["model"][1])
    ok, errors = [], []

    def work(key):
        m, p = jobs[key]
        try:
            for _ in range(50):
                ok.append(torch.allclose(bf.vmap_call(m, p, x), expected[key], atol=1e-10))
        except Exception as err:
            errors.append(err)

    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)

    assert not errors and len(ok) == 100 and all(ok)
    assert _unchanged(model, before)


def _dropout_net():
    return nn.Sequential(nn.Linear(3, 64), nn.Dropout(0.5), nn.Linear(64, 1)).train()


def test_randomness_different_draws_independent_masks():
    net = _dropout_net()
    q = bf.init(net, -30.0)  # the weights barely vary: the spread is dropout's
    x = torch.randn(2, 3)
    K = 4000
    params = bf.sample(q, K)

    y = bf.vmap_call(net, params, x, randomness="different", fallback=False)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bf.VmapFallbackWarning)
        y_loop = bf.vmap_call(net, params, x)  # falls back: the loop, one mask per sample

    assert not torch.equal(y[0], y[1])
    se = y_loop.std(0) / K**0.5
    assert ((y.mean(0) - y_loop.mean(0)).abs() < 5 * 2**0.5 * se).all()
    ratio = y.var(0) / y_loop.var(0)
    assert ((ratio - 1).abs() < 5 * (4 / K) ** 0.5).all()


def test_randomness_same_and_error():
    net = _dropout_net()
    q = bf.init(net, -30.0)
    x = torch.randn(2, 3)
    params = {k: v[:1].expand(3, *v.shape[1:]) for k, v in bf.sample(q, 1).items()}

    y = bf.vmap_call(net, params, x, randomness="same", fallback=False)
    assert torch.equal(y[0], y[1])  # one mask for all samples (and equal weights)
    y = bf.vmap_call(net, params, x, randomness="different", fallback=False)
    assert not torch.equal(y[0], y[1])
    with pytest.raises(RuntimeError, match="randomness='different'"):
        bf.vmap_call(net, params, x, randomness="error", fallback=False)
    with pytest.raises(ValueError, match="vmap_call: expected randomness"):
        bf.vmap_call(net, params, x, randomness="other")


@pytest.mark.parametrize("fallback", [True, False])
def test_randomness_error_refuses_a_draw_at_one_sample_and_one_by_one(
    monkeypatch, gen, fresh_caches, fallback
):
    # "error" asserts that fn draws nothing: a plain call (K = 1) and the one-by-one loop
    # (samples larger than a core's cache) drew dropout silently where vmap refuses (and,
    # with the fallback, warns before the loop).
    from bayesflow import _engine, _memory

    def refused():
        if fallback:
            return pytest.warns(bf.VmapFallbackWarning, match="random operation")
        return pytest.raises(RuntimeError, match="random operation")

    net = _dropout_net()
    q = bf.init(net, -3.0)
    x = torch.randn(2, 3)
    for k in (1, 3):
        with refused():
            bf.vmap_call(net, bf.sample(q, k), x, randomness="error", fallback=fallback)

    bf.vmap_call(net, bf.sample(q, 3), x, randomness="different")  # measures the footprint
    (measured,) = _engine._FOOTPRINTS.get(net).entries.values()
    monkeypatch.setattr(_memory, "_CORE_CACHE", [measured - 1])
    with refused():
        bf.vmap_call(net, bf.sample(q, 3), x, randomness="error", fallback=fallback)

    # A module that draws nothing runs, one sample or one by one, with the loop's numbers.
    net.eval()
    for k in (1, 3):
        params = bf.sample(q, k, generator=gen(1))
        y = bf.vmap_call(net, params, x, randomness="error", fallback=False)
        assert torch.allclose(y, bf.loop_call(net, params, x), atol=1e-12)
        assert k == 1 or not torch.allclose(y[0], y[1])


def _record_chunks(monkeypatch, name="vmap"):
    r"""Wraps `_engine.<name>` in a spy; returns the list of the chunk sizes it is called with."""
    from bayesflow import _engine

    seen = []
    original = getattr(_engine, name)

    def recording(*args, chunk_size=None, **kwargs):
        seen.append(chunk_size)
        return original(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(_engine, name, recording)
    return seen


@pytest.mark.parametrize("randomness", ["different", "same"])
def test_a_chunk_of_every_sample_is_no_chunk(monkeypatch, randomness):
    # chunk_size >= n runs unchunked (torch's chunked path would split and concatenate),
    # with the numbers and the dropout masks of torch's own one-chunk vmap.
    from bayesflow import _engine

    net = _dropout_net()
    x = torch.randn(5, 3)
    params = bf.sample(bf.init(net, -3.0), 4)
    torch_vmap = _engine.torch_vmap
    seen = _record_chunks(monkeypatch, "torch_vmap")
    outs = []
    for chunk_size in (4, 9, None):
        torch.manual_seed(7)
        outs.append(bf.vmap_call(net, params, x, chunk_size=chunk_size, randomness=randomness))
    assert seen == [None, None, None]

    monkeypatch.setattr(_engine, "torch_vmap", torch_vmap)
    monkeypatch.setattr(_engine, "vmap", lambda *a, size, **k: torch_vmap(*a, **k))
    torch.manual_seed(7)
    chunked = bf.vmap_call(net, params, x, chunk_size=4, randomness=randomness)
    for y in outs:
        assert torch.equal(y, chunked)
    assert not torch.equal(chunked[0], chunked[1])  # the samples (and masks) differ


def test_randomness_reaches_nelbo_and_the_bridge():
    net = _dropout_net()
    q = bf.init(net, -6.0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def ll(m, x, y):
        return -(m(x) - y).square()

    loss = bf.nelbo(net, q, x, y, fn=ll, num_data=8, n=4, randomness="different")
    loss.backward()
    assert q.mean["0.weight"].grad is not None
    bnet = bf.BayesianModel(net, init_logvar=-6.0)
    assert bnet(x, n=4, randomness="different", fallback=False).shape == (4, 8, 1)


def test_none_outputs_pass_through():
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    params = bf.sample(bf.init(mha, -3.0), 3)
    x = torch.randn(2, 5, 8)

    def fn(m, x):
        return m(x, x, x, need_weights=False)

    for call in (bf.vmap_call, bf.loop_call):
        out, weights = call(mha, params, x, fn=fn)
        assert out.shape == (3, 2, 5, 8) and weights is None


def test_numpy_integers_are_ints():
    net = zuko.nn.MLP(3, 2, hidden_features=(8,))
    q = bf.init(net)
    x = torch.randn(4, 3)
    params = bf.sample(q, np.int64(4))

    assert bf.vmap_call(net, params, x, chunk_size=np.int32(2)).shape == (4, 4, 2)
    assert bf.local_call(net, q, np.int64(3), x).shape == (3, 4, 2)
    assert bf.LinearWarmup(steps=np.int64(10))(np.int64(5)) == 0.5
    probs = torch.softmax(torch.randn(10, 3), -1)
    bf.expected_calibration_error(probs, torch.randint(0, 3, (10,)), bins=np.int64(5))
    flow = zuko.flows.MAF(2, 1)
    flow_params = bf.sample(bf.init(flow), np.int64(2))
    assert bf.flow_sample(flow, flow_params, torch.randn(1), (np.int64(3),)).shape == (2, 3, 2)
    assert bf.BayesianModel(net).sample_params(np.int64(2))["0.weight"].shape[0] == 2
    assert bf.datasets.two_moons(np.int64(5))[0].shape == (5, 2)


@pytest.mark.parametrize("bad", [0.0, torch.tensor(0), "0"])
def test_in_dims_entries_must_be_zero_or_none(bad):
    net = zuko.nn.MLP(3, 2, hidden_features=(8,))
    params = bf.sample(bf.init(net), 2)
    with pytest.raises(ValueError, match="vmap_call: expected in_dims"):
        bf.vmap_call(net, params, torch.randn(2, 4, 3), in_dims=[bad])


def test_posterior_fields_and_dtype():
    net = nn.Linear(3, 2)
    q = bf.init(net)
    with pytest.raises(TypeError, match=r"sample: expected posterior.mean to be a dict"):
        bf.sample(bf.Posterior(list(q.mean.values()), q.logvar), 2)
    wrong = bf.Posterior(
        {k: v.float() for k, v in q.mean.items()}, {k: v.float() for k, v in q.logvar.items()}
    )
    with pytest.raises(
        ValueError, match=r"mean_model: .*\(torch.float64 on cpu\), got torch.float32 on cpu"
    ):
        bf.mean_model(net, wrong)
    with pytest.raises(
        ValueError, match=r"local_call: .*torch.float64 on cpu.*torch.float32 on cpu"
    ):
        bf.local_call(net, wrong, 2, torch.randn(4, 3))
    with pytest.raises(
        ValueError, match=r"vmap_call: .*torch.float64 on cpu.*torch.float32 on cpu"
    ):
        bf.vmap_call(net, bf.sample(wrong, 2), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"nelbo: .*torch.float64 on cpu.*torch.float32 on cpu"):
        bf.nelbo(net, wrong, torch.randn(4, 3), fn=lambda m, x: m(x), num_data=4)


def test_init_messages_show_patterns():
    with pytest.raises(ValueError, match=r"include=\('nothing',\)"):
        bf.init(nn.Linear(2, 2), include="nothing")
    with pytest.raises(
        TypeError, match=r"init: expected real floating-point parameters, got 'weight'"
    ):
        bf.init(nn.Linear(2, 2, dtype=torch.complex64))


def test_auto_chunk_size_fits_the_budget(monkeypatch):
    from bayesflow import _memory

    net = nn.Sequential(nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 8))
    params = bf.sample(bf.init(net, -3.0), 40)
    x = torch.randn(32, 8)
    per_sample = _memory.per_sample_bytes(lambda: net(x))
    assert per_sample >= 32 * 256 * 8  # at least the hidden activations, in float64

    chunks = _record_chunks(monkeypatch)
    budget = 5 * per_sample + 1
    y = bf.vmap_call(net, params, x, chunk_size="auto", max_memory=budget, fallback=False)

    assert chunks == [5]  # as many samples as fit
    assert torch.allclose(y, bf.loop_call(net, params, x), atol=1e-10)
    with pytest.raises(
        ValueError, match="vmap_call: expected chunk_size to be a positive int, 'auto'"
    ):
        bf.vmap_call(net, params, x, chunk_size="big")
    with pytest.raises(ValueError, match="vmap_call: expected max_memory"):
        bf.vmap_call(net, params, x, chunk_size="auto", max_memory=0)
    # A budget without chunk_size="auto" was silently ignored: one unchunked pass.
    for chunk_size in (None, 2):
        with pytest.raises(ValueError, match="vmap_call: expected chunk_size='auto' with max"):
            bf.vmap_call(net, params, x, chunk_size=chunk_size, max_memory=1)
    # at least one sample per chunk, and no more chunks than samples
    bf.vmap_call(net, params, x, chunk_size="auto", max_memory=1)
    bf.vmap_call(net, params, x, chunk_size="auto")
    assert chunks[-2] == 1 and chunks[-1] == 40


# Modules left exactly as found, and calls that must not silently ignore their samples.


def _hooked():
    from torch.nn.utils import spectral_norm, weight_norm

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.Sequential(
            weight_norm(nn.Linear(3, 4)), nn.Tanh(), spectral_norm(nn.Linear(4, 2))
        )


HOOKED_CALLS = {
    "vmap_call": lambda m, p, x: bf.vmap_call(m, p, x, fallback=False),
    "vmap_call-n1": lambda m, p, x: bf.vmap_call(m, {k: v[:1] for k, v in p.items()}, x),
    "loop_call": lambda m, p, x: bf.loop_call(m, p, x),
    "local_call": lambda m, p, x: bf.local_call(m, bf.init(m, -3.0), 3, x),
    "bridge": lambda m, p, x: bf.BayesianModel(m, init_logvar=-3.0)(x, n=3),
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("call", HOOKED_CALLS)
def test_hook_based_norms_are_left_as_found(call, train):
    # The hook-based weight_norm and spectral_norm assign `weight` before every forward: a
    # call must leave the very weight it found (not a sample, not a vmap-batched tensor).
    module = _hooked().train(train)
    params = bf.sample(bf.init(module, -3.0), 3)
    x = torch.randn(5, 3)
    weights = [vars(module[0])["weight"], vars(module[2])["weight"]]
    values = [w.clone() for w in weights]

    y = HOOKED_CALLS[call](module, params, x)

    assert y.shape[1:] == (5, 2)
    assert [vars(module[0])["weight"], vars(module[2])["weight"]] == weights
    assert all(w is v or torch.equal(w, v) for w, v in zip(weights, values, strict=True))
    torch.save(module, __import__("io").BytesIO())
    copy.deepcopy(module)


@pytest.mark.parametrize("local_trick", [False, True], ids=["weights", "local-trick"])
def test_calls_inside_reparameterize_use_their_own_samples(local_trick, gen):
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    bnet = bf.BayesianModel(net, init_logvar=-2.0)
    x = torch.randn(5, 3)
    params = bnet.sample_params(4, generator=gen(1))
    outside = {
        "loop_call": bf.loop_call(net, params, x),
        "vmap_call": bf.vmap_call(net, params, x, fallback=False),
        "bridge": bnet(x, n=4, generator=gen(2), fallback=False),
    }

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with bnet.reparameterize(local_trick=local_trick) as held:
            y_held = held(x)
            inside = {
                "loop_call": bf.loop_call(net, params, x),
                "vmap_call": bf.vmap_call(net, params, x, fallback=False),
                "bridge": bnet(x, n=4, generator=gen(2), fallback=False),
            }
            assert torch.equal(held(x), y_held)  # still the block's own sample

    for name, y in inside.items():
        assert torch.allclose(y, outside[name], atol=1e-12), name
        assert not torch.allclose(y[0], y[1])
    assert "forward" not in vars(net[0])


def test_the_local_trick_of_the_bridge_has_the_law_of_a_weight_sample(gen):
    # Convolutions keep the block's weight sample (exact); the law after a global pooling.
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.AdaptiveAvgPool2d(1))
    bnet = bf.BayesianModel(net, init_logvar=-2.0)
    x = torch.ones(1, 1, 6, 6)
    g = gen(3)
    ys = []
    for _ in range(2000):
        with torch.no_grad(), bnet.reparameterize(local_trick=True, generator=g) as held:
            ys.append(held(x).flatten())
    y = torch.stack(ys)
    with torch.no_grad():
        exact = bf.vmap_call(net, bnet.sample_params(2000, generator=g), x).flatten(1)

    se = (y.var(0) / 2000 + exact.var(0) / 2000).sqrt()
    assert ((y.mean(0) - exact.mean(0)).abs() <= 5 * se).all()
    d, e = (y - y.mean(0)).square(), (exact - exact.mean(0)).square()
    se = (d.var(0) / 2000 + e.var(0) / 2000).sqrt()
    assert ((d.mean(0) - e.mean(0)).abs() <= 5 * se).all()


def _bn_train():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()


def test_bad_arguments_are_refused_before_the_first_forward():
    # A train-mode BatchNorm counts every forward pass: a late check would leave it moved.
    module = _bn_train()
    q = bf.init(module, -2.0)
    x, y = torch.randn(8, 3), torch.randn(8, 4)
    state = copy.deepcopy(module.state_dict())

    def ll(m, x, y):
        return -(m(x) - y).square().sum(-1)

    bad = [
        (dict(prior=0.0), ValueError, r"nelbo: expected a finite prior variance > 0, got 0"),
        (dict(prior=-1.0), ValueError, r"nelbo: expected a finite prior variance > 0"),
        (dict(prior="wide"), TypeError, r"nelbo: expected prior to be a bayesflow.priors.Prior"),
        (
            dict(prior=bf.GaussianPrior(var={"0.weight": 1.0})),
            ValueError,
            r"nelbo: expected the prior var to name every posterior parameter",
        ),
        (dict(max_memory=0), ValueError, r"nelbo: expected max_memory to be a positive int"),
        (dict(max_memory=10**9), ValueError, r"nelbo: expected chunk_size='auto' with max_mem"),
        (dict(chunk_size="some"), ValueError, r"nelbo: expected chunk_size"),
        (dict(randomness="new"), ValueError, r"nelbo: expected randomness"),
        (dict(vectorized=1), TypeError, r"nelbo: expected vectorized to be a bool"),
        (dict(kl_weight=-1.0), ValueError, r"nelbo: expected a finite kl_weight >= 0"),
    ]
    for kwargs, error, match in bad:
        for estimator in ("weights", "local"):
            with pytest.raises(error, match=match):
                bf.nelbo(module, q, x, y, fn=ll, num_data=8, estimator=estimator, **kwargs)
            assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("n", [1, 3])
def test_an_output_error_leaves_the_buffers_as_found(n):
    module = _bn_train()
    state = copy.deepcopy(module.state_dict())
    params = bf.sample(bf.init(module, -2.0), n)
    bnet = bf.BayesianModel(module, init_logvar=-2.0)

    def fn(m, x):
        return {"y": m(x), "note": "text"}

    for call in (
        lambda: bf.vmap_call(module, params, torch.randn(8, 3), fn=fn),
        lambda: bf.loop_call(module, params, torch.randn(8, 3), fn=fn),
        lambda: bnet(torch.randn(8, 3), n=None if n == 1 else n, fn=fn),
    ):
        with pytest.raises(TypeError, match="expected fn to return tensors"):
            call()
        assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())


def test_outputs_that_differ_between_samples_are_refused_with_the_buffers_as_found(gen):
    # The loop stacked them after writing the buffers' statistics: torch's "stack expects
    # each tensor to be equal size" or a KeyError with the buffers moved, a key beyond the
    # first sample's dropped silently, and a None first sample gave None for every sample.
    module = _bn_train()
    params = bf.sample(bf.init(module, -1.0), 3, generator=gen(0))
    x = torch.randn(8, 3)
    cases = {
        r"\(\d+, 4\) for sample \d and \(\d+, 4\) for sample 0": lambda m, x: m(x)[m(x)[:, 0] > 0],
        r"\{'\w+': \(8, 4\)\} for sample \d and \{'\w+': \(8, 4\)\} for sample 0": lambda m, x: {
            "pos" if m(x)[:, 0].sum() > 0 else "neg": m(x)
        },
        r"for sample \d and \{'y': \(8, 4\)(, 'z': \(8, 4\))?\} for sample 0": lambda m, x: (
            {"y": m(x)} if m(x)[:, 0].sum() > 0 else {"y": m(x), "z": m(x)}
        ),
        r"(None|\(8, 4\)) for sample \d and (None|\(8, 4\)) for sample 0": lambda m, x: (
            m(x) if m(x)[:, 0].sum() > 0 else None
        ),
    }
    # Each fn's outputs do differ between these samples (one sample at a time, on a copy).
    for fn in cases.values():
        shapes = {
            str(bf._outputs.map_outputs("", lambda t: tuple(t.shape), out))
            for out in (
                bf.loop_call(
                    copy.deepcopy(module), {k: v[i : i + 1] for k, v in params.items()}, x, fn=fn
                )
                for i in range(3)
            )
        }
        assert len(shapes) > 1
    before = snapshot(module)
    for message, fn in cases.items():
        for call in (bf.loop_call, bf.vmap_call):  # vmap_call: its fallback, the loop
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with pytest.raises(
                    ValueError,
                    match=rf"{call.__name__}: expected fn to return outputs of the same "
                    rf"structure and shapes for every sample, got .*{message}",
                ):
                    call(module, params, x, fn=fn)
            assert unchanged(before, module)
    # A dict's keys in another order for another sample: stacked by key, as before.
    order = lambda m, x: (
        {"a": m(x), "b": 2 * m(x)} if m(x)[:, 0].sum() > 0 else {"b": 2 * m(x), "a": m(x)}
    )
    out = bf.loop_call(module.eval(), params, x, fn=order)
    assert len({bool(y[:, 0].sum() > 0) for y in out["a"]}) == 2  # both orders were met
    assert torch.allclose(out["b"], 2 * out["a"], rtol=1e-12)
    assert torch.allclose(out["a"], bf.loop_call(module, params, x), rtol=1e-12)
    module.train()
    # Outputs of one structure stack as before: the loop's numbers, those of vmap.
    assert torch.allclose(
        bf.loop_call(module.eval(), params, x, fn=lambda m, x: {"y": m(x)})["y"],
        bf.vmap_call(module, params, x),
        rtol=1e-12,
    )


@pytest.mark.parametrize("n", [1, 3])
def test_outputs_never_share_memory_with_the_inputs_or_the_module(n, gen):
    # vmap expands an output that does not depend on the sample as a view of the tensor fn
    # returned (stride 0), and the plain call at K = 1 returned such a tensor unsqueezed: a
    # write to one sample's output rewrote the caller's input or the module's buffer (and
    # every other sample's). The loop's outputs are stacked copies.
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    q = bf.init(module, init_logvar=-3.0, include=["0"])
    # Inputs that are views themselves: slices of a data set, samples of a larger draw.
    params = {k: v[:n] for k, v in bf.sample(q, n + 2, generator=gen(0)).items()}
    data, per_sample = torch.randn(9, 3), torch.randn(n + 2, 2)
    x, z = data[2:7], per_sample[:n]  # z: per sample

    def fn(m, x, z):
        return m(x), x, x[1:], z, m[1].running_var, m[2].weight, m[0].weight

    calls = {
        "loop_call": lambda: bf.loop_call(module, params, x, z, fn=fn),
        "vmap_call": lambda: bf.vmap_call(module, params, x, z, fn=fn),
        "vmap_call, chunks": lambda: bf.vmap_call(module, params, x, z, fn=fn, chunk_size=2),
        "local_call": lambda: bf.local_call(module, q, n, x, z, fn=fn, generator=gen(0)),
        "BayesianModel": lambda: bf.BayesianModel(module, include_params=["0"])(x, z, n=n, fn=fn),
    }
    expected = calls["loop_call"]()
    for name, call in calls.items():
        before = snapshot(module, data, per_sample, params)
        outs = call()
        if n > 1:  # the samples do change the output
            assert not torch.allclose(outs[0][0], outs[0][1]), name
        if name in ("loop_call", "vmap_call", "vmap_call, chunks"):
            for a, b in zip(outs, expected, strict=True):
                assert torch.allclose(a, b, rtol=1e-12), name
        with torch.no_grad():
            for t in outs[1:]:
                t[0].fill_(-7.0)
                if n > 1:
                    assert not (t[1] == -7.0).any(), name
        assert unchanged(before, module, data, per_sample, params), name

    # An input inside a container argument (a dict of tensors, a tuple).
    before = snapshot(data)
    for batch, pick in (({"x": x}, lambda b: b["x"]), ((x, z), lambda b: b[0][1:])):
        out = bf.vmap_call(module, params, batch, fn=lambda m, b, pick=pick: pick(b))
        with torch.no_grad():
            out[0].fill_(-7.0)
        assert unchanged(before, data)


def test_nelbo_passes_max_memory_on(monkeypatch):
    from bayesflow import _engine

    seen = []
    auto_chunk_size = _engine.auto_chunk_size

    def spy(per_sample, n, device, max_memory):
        seen.append(max_memory)
        return auto_chunk_size(per_sample, n, device, max_memory)

    monkeypatch.setattr(_engine, "auto_chunk_size", spy)
    net = zuko.nn.MLP(3, 2, hidden_features=(8,))
    q = bf.init(net, -2.0)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    bf.nelbo(
        net,
        q,
        x,
        y,
        fn=lambda m, x, y: -(m(x) - y).square().sum(-1),
        num_data=8,
        n=4,
        chunk_size="auto",
        max_memory=12345,
    )
    assert seen == [12345]


def test_activation_checkpointing_inside_a_call_is_refused(gen):
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = checkpoint(self.b, self.a(x).tanh(), use_reentrant=False)
            return self.c(h.tanh())

    module = Checkpointed()
    q = bf.init(module, -1.0)
    x = torch.randn(5, 3)
    params = bf.sample(q, 3, generator=gen(1))
    # Its backward would recompute with the module's own weights: silently other gradients.
    for call in (bf.loop_call, bf.vmap_call):
        with pytest.raises(RuntimeError, match=r"activation checkpointing .* inside the call"):
            call(module, params, x)
    with torch.no_grad():  # no backward, no recomputation: fine
        assert torch.allclose(bf.vmap_call(module, params, x), bf.loop_call(module, params, x))

    # A checkpoint around the whole call recomputes the whole call: the right gradients.
    plain = nn.Sequential(module.a, nn.Tanh(), module.b, nn.Tanh(), module.c)
    q = bf.init(plain, -1.0)
    params = bf.sample(q, 3, generator=gen(2))
    y = checkpoint(lambda x: bf.vmap_call(plain, params, x), x, use_reentrant=False)
    g = torch.autograd.grad(y.square().sum(), q.mean["0.weight"], retain_graph=True)[0]
    expected = torch.autograd.grad(
        bf.loop_call(plain, params, x).square().sum(), q.mean["0.weight"]
    )[0]
    assert torch.allclose(g, expected, atol=1e-10)


def test_second_derivatives_match_the_loop(gen):
    # Hessian-vector products through the vectorized linear layers (their backward is
    # bayesflow's own): the loop's numbers.
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    q = bf.init(net, init_logvar=-2.0)
    x = torch.randn(4, 3)
    leaves = [*q.mean.values(), *q.logvar.values()]
    v = [torch.randn_like(t) for t in leaves]

    def hvp(call):
        y = call(net, bf.sample(q, 3, generator=gen(1)), x)
        g = torch.autograd.grad(y.square().sum(), leaves, create_graph=True)
        dot = sum((a * b).sum() for a, b in zip(g, v, strict=True))
        return torch.autograd.grad(dot, leaves)

    vectorized = hvp(lambda m, p, x: bf.vmap_call(m, p, x, fallback=False))
    looped = hvp(bf.loop_call)
    for a, b in zip(vectorized, looped, strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    assert all(a.abs().sum() > 0 for a in vectorized)


# torch's forward mode loads its decompositions through torch.jit.script on first use.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_outer_torch_func_transforms_run_vectorized_with_the_loops_numbers(fresh_caches, gen):
    # The batched linear layer's Function had no vmap rule and no jvp: per-example gradients
    # (vmap of grad), jvp and Hessians (jacfwd of jacrev) over vmap_call fell back to the
    # loop with "vmap cannot run Sequential", and the first jvp of an fn and shape failed
    # in the memory-measuring pass. fallback=False: they must run vectorized.
    from torch.func import grad, hessian, jvp, vmap

    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    q = bf.init(net, init_logvar=-2.0)
    params = {k: v.detach() for k, v in bf.sample(q, 4, generator=gen(1)).items()}
    x, y = torch.randn(6, 3, generator=gen(2)), torch.randn(6, 2, generator=gen(3))
    vec = lambda p, x: bf.vmap_call(net, p, x, fallback=False)

    def per_example(call):
        loss = lambda p, xi, yi: (call(p, xi[None]) - yi).square().sum()
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)

    got, want = per_example(vec), per_example(lambda p, x: bf.loop_call(net, p, x))
    assert all(torch.allclose(got[k], want[k], atol=1e-12) for k in params)
    assert not torch.allclose(got["0.weight"][:, 0], got["0.weight"][:, 1])  # per sample

    tangents = {k: torch.randn(v.shape, generator=gen(4)) for k, v in params.items()}
    x_t = torch.randn(x.shape, generator=gen(5))
    for call in (vec, lambda p, x: bf.loop_call(net, p, x)):
        out, out_t = jvp(call, (params, x), (tangents, x_t))
        if call is vec:
            got = out, out_t
        else:
            assert torch.allclose(got[0], out, atol=1e-12)
            assert torch.allclose(got[1], out_t, atol=1e-12)
    assert got[1].abs().sum() > 0

    w = params["2.weight"]
    h = lambda call: hessian(lambda w: call({**params, "2.weight": w}, x).square().sum())(w)
    got = h(vec)
    assert torch.allclose(got, h(lambda p, x: bf.loop_call(net, p, x)), atol=1e-10)
    assert got.abs().sum() > 0


def test_the_default_chunk_fits_the_cpu_cache(monkeypatch, gen, fresh_caches):
    # On the CPU, samples whose working set overflows the last-level cache run in chunks
    # that fit it (the same numbers); those that fit run at once. The first call, all at
    # once, measures what a sample allocates.
    from bayesflow import _engine, _memory

    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    params = bf.sample(bf.init(net, -3.0), 12, generator=gen(1))
    x = torch.randn(16, 1, 4, 4)

    chunks = _record_chunks(monkeypatch)
    y_first = bf.vmap_call(net, params, x, fallback=False)
    measured = list(_engine._FOOTPRINTS.get(net).entries.values())
    monkeypatch.setattr(_memory, "_CACHE", [3 * measured[0] + 1])
    y = bf.vmap_call(net, params, x, fallback=False)
    monkeypatch.setattr(_memory, "_CACHE", [12 * measured[0]])
    y_at_once = bf.vmap_call(net, params, x, fallback=False)

    if x.device.type == "cpu":
        assert len(measured) == 1 and measured[0] >= 16 * 4 * 16 * 8  # a float64 activation
        assert chunks == [None, 3, None]
    assert torch.allclose(y, bf.loop_call(net, params, x), atol=1e-10)
    assert torch.allclose(y, y_at_once, atol=1e-10) and torch.allclose(y, y_first, atol=1e-10)
    assert not torch.allclose(y[0], y[1])


def test_a_fresh_lambda_over_the_next_batch_measures_nothing_again(gen, fresh_caches):
    # A training loop's lambda closes over the step's labels and numbers (a float made
    # anew at each step): the footprint of the call was measured again at every step (a
    # pass more), keyed by the identity of the labels, which also stayed alive in the cache.
    from bayesflow import _engine

    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
    q = bf.init(net, -3.0)
    steps = [(torch.randn(16, 3), torch.randint(0, 4, (16,)), 2.0 + 0 * i) for i in range(4)]

    def loss(y, scale):  # a new lambda over this step's labels
        return lambda m, x: -F.cross_entropy(m(x) * scale, y, reduction="none")

    for x, y, scale in steps:
        params = bf.sample(q, 3, generator=gen(1))
        fn = loss(y, scale)
        got = bf.vmap_call(net, params, x, fn=fn)
        assert torch.allclose(got, bf.loop_call(net, params, x, fn=fn), atol=1e-10)
        assert not torch.allclose(got[0], got[1])
    if x.device.type == "cpu":  # the footprint is measured on the CPU only
        assert len(_engine._FOOTPRINTS.get(net)) == 1


def test_a_layer_replaced_or_a_mode_switched_is_measured_again(gen, fresh_caches):
    # The footprint was keyed by fn, the sampled names and the argument shapes: a layer
    # replaced by a 16x larger one kept the small one's, and chunk_size="auto" overshot
    # max_memory 16-fold.
    from bayesflow import _engine

    net = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    x = torch.randn(4, 3)

    def measured():
        params = bf.sample(bf.init(net, -3.0), 2, generator=gen(1))
        bf.vmap_call(net, params, x, chunk_size="auto", randomness="different")
        return sorted(_engine._FOOTPRINTS.get(net).entries.values())

    small = measured()
    net[0], net[2] = nn.Linear(3, 128), nn.Linear(128, 2)
    large = measured()
    assert len(large) == 2 and large[1] > small[0]
    net.eval()
    assert len(measured()) == 3


def test_modules_that_compare_equal_are_two_modules(gen, fresh_caches):
    # Caches kept per module matched keys by ==: a module class whose instances compare
    # equal by their configuration shared one structure, and the second module's samples
    # went into the first's parameters (every sample gave the second's own output).
    class Configured(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x)

        def __eq__(self, other):
            return isinstance(other, Configured)

        def __hash__(self):
            return 0

    a, b = Configured(), Configured()
    x = torch.randn(4, 3)
    for net in (a, b):
        params = bf.sample(bf.init(net, 0.0), 3, generator=gen(1))
        for got in (bf.vmap_call(net, params, x), bf.loop_call(net, params, x)):
            for k in range(3):
                one = copy.deepcopy(net)
                one.load_state_dict({n: v[k] for n, v in params.items()})
                assert torch.allclose(got[k], one(x), atol=1e-10)
            assert not torch.allclose(got[0], got[1])


def test_a_sample_larger_than_a_core_cache_runs_one_by_one(monkeypatch, gen, fresh_caches):
    # On the CPU, once the footprint of a call is known, samples that each overflow a
    # core's cache run one by one: the loop's numbers and gradients, with no vmap at all.
    from bayesflow import _engine, _memory

    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    q = bf.init(net, -3.0)
    x = torch.randn(16, 1, 4, 4)

    calls = _record_chunks(monkeypatch)

    def run(call):
        params = bf.sample(q, 5, generator=gen(3))
        y = call(net, params, x)
        grads = torch.autograd.grad(y.square().sum(), [*q.mean.values(), *q.logvar.values()])
        return y, grads

    y_first, _ = run(bf.vmap_call)  # all at once: measures the footprint
    (measured,) = _engine._FOOTPRINTS.get(net).entries.values()
    monkeypatch.setattr(_memory, "_CORE_CACHE", [measured - 1])
    y, grads = run(bf.vmap_call)
    y_loop, grads_loop = run(bf.loop_call)
    monkeypatch.setattr(_memory, "_CORE_CACHE", [measured])
    y_together, grads_together = run(bf.vmap_call)

    if x.device.type == "cpu":
        assert calls == [None, None]  # the first and the last call only
        assert torch.equal(y, y_loop)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_loop, strict=True))
    assert torch.allclose(y, y_together, atol=1e-10) and torch.allclose(y, y_first, atol=1e-10)
    for a, b in zip(grads, grads_together, strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    assert not torch.allclose(y[0], y[1])


def test_in_place_randomness_points_to_flow_sample():
    # randomness="different" was passed: the advice is flow_sample, not that option again.
    flow = zuko.flows.MAF(2, 1)
    params = bf.sample(bf.init(flow), 3)

    with pytest.raises(RuntimeError, match=r"vmap cannot run MAF .*use bayesflow\.flow_sample"):
        bf.vmap_call(
            flow,
            params,
            torch.randn(1),
            fn=lambda f, c: f(c).rsample(),
            randomness="different",
            fallback=False,
        )


@pytest.mark.parametrize("randomness", ["different", "same"])
def test_a_fallback_after_random_draws_starts_from_the_state_the_call_found(randomness):
    module = _dropout_net()
    params = bf.sample(bf.init(module, -2.0), 4)
    x = torch.randn(5, 3)

    def fn(m, x):
        h = m(x)
        h.sum().item()  # vmap cannot: the loop runs, after the dropout has drawn
        return h

    torch.manual_seed(1)
    with pytest.warns(bf.VmapFallbackWarning):
        out = bf.vmap_call(module, params, x, fn=fn, randomness=randomness)
    after = torch.rand(3)
    torch.manual_seed(1)
    if randomness == "different":  # the oracle: the loop, every sample its own draw
        expected = bf.loop_call(module, params, x, fn=fn)
    else:  # every sample with the one draw, as the vectorized call that succeeds
        expected = bf.vmap_call(module, params, x, randomness="same")
    assert torch.allclose(out, expected, atol=1e-12)
    assert torch.equal(torch.rand(3), after)  # the generator advanced as by the oracle
    assert not torch.allclose(out[0], out[1])


def test_an_interrupt_in_a_chunked_call_leaves_the_buffers_as_found():
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    params = bf.sample(bf.init(module, -2.0), 3)
    own = {k: v.clone() for k, v in module.state_dict().items()}
    buffers = {
        "1.running_mean": torch.zeros(3, 4),
        "1.running_var": torch.ones(3, 4),
        "1.num_batches_tracked": torch.zeros(3, dtype=torch.long),
    }
    found = {k: v.clone() for k, v in buffers.items()}
    calls = []

    def fn(m, x):
        calls.append(None)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return m(x)

    for call in (bf.loop_call, lambda *a, **k: bf.vmap_call(*a, chunk_size=1, **k)):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            call(module, params, torch.randn(8, 3), fn=fn, buffers=buffers)
        assert all(torch.equal(buffers[k], v) for k, v in found.items())
        assert all(torch.equal(module.state_dict()[k], v) for k, v in own.items())


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_a_train_mode_norm_that_fn_never_calls_keeps_its_statistics_to_the_bit(chunk_size, gen):
    # The mean of K equal float copies may round to another number: the statistics of a
    # layer that no sample ran drifted by an ulp per call, where the loop leaves them.
    net = nn.ModuleDict({"body": nn.Linear(3, 64), "unused": nn.BatchNorm1d(64)}).train()
    g = gen(0)
    with torch.no_grad():
        net["unused"].running_mean.copy_(torch.randn(64, generator=g) * 10)
        net["unused"].running_var.copy_(torch.rand(64, generator=g) * 10)
    before = {k: v.clone() for k, v in net.named_buffers()}
    params = bf.sample(bf.init(net, -1.0, include=["body"]), 3, generator=g)
    x = torch.randn(4, 3, generator=g)

    def fn(m, x):
        return m["body"](x)

    for call in (bf.loop_call, lambda *a, **k: bf.vmap_call(*a, **k, chunk_size=chunk_size)):
        y = call(net, params, x, fn=fn)
        assert not torch.allclose(y[0], y[1])
        for k, v in net.named_buffers():
            assert torch.equal(v, before[k]), k


class _ReassignsItsBuffer(nn.Module):
    def __init__(self, no_grad=True):
        super().__init__()
        self.no_grad = no_grad  # else the new tensor holds the sample's graph
        self.lin = nn.Linear(3, 4)
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x):
        h = self.lin(x)
        if self.training:
            with torch.no_grad() if self.no_grad else contextlib.nullcontext():
                self.ema = 0.9 * self.ema + 0.1 * h.mean(0)  # a new tensor each time
        return h - self.ema


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_a_buffer_assigned_anew_falls_back_to_the_loop(chunk_size):
    # vmap's wrappers escaped into the module: wrong numbers when chunked, and a module
    # that no later call could run.
    module = _ReassignsItsBuffer().train()
    params = bf.sample(bf.init(module, -2.0), 3)
    x = torch.randn(8, 3)
    oracle, emas = [], []
    for i in range(3):  # a deep copy with sample i loaded
        copy_i = copy.deepcopy(module)
        copy_i.load_state_dict({**module.state_dict(), **{k: v[i] for k, v in params.items()}})
        oracle.append(copy_i(x).detach())
        emas.append(copy_i.ema)
    oracle = torch.stack(oracle)

    with pytest.warns(
        bf.VmapFallbackWarning, match=r"assigns new tensors to the buffers \['ema'\]"
    ):
        out = bf.vmap_call(module, params, x, chunk_size=chunk_size)

    assert torch.allclose(out, oracle, atol=1e-12)
    assert not torch.allclose(oracle[0], oracle[1])
    assert torch.allclose(module.ema, torch.stack(emas).mean(0), atol=1e-12)  # the average
    module.eval()
    assert bf.vmap_call(module, params, x, fallback=False).shape == (3, 8, 4)  # still usable


def test_max_norm_set_after_a_first_call_leaves_the_samples_alone():
    # The structure seen by the first call said no weight is written in place: the next
    # call let the embedding renormalize the caller's samples.
    module = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    tokens = torch.tensor([[1, 2, 3], [4, 5, 9]])
    params = {k: v.detach() for k, v in bf.sample(bf.init(module, -1.0), 3).items()}
    bf.vmap_call(module, params, tokens)
    module[0].max_norm = 1.0
    before = {k: v.clone() for k, v in params.items()}
    expected = bf.loop_call(module, params, tokens)

    for call in (bf.vmap_call, bf.loop_call):
        out = call(module, params, tokens)
        assert all(torch.equal(params[k], v) for k, v in before.items())
        assert torch.allclose(out, expected, atol=1e-12)
    assert not torch.allclose(expected[0], expected[1])
    assert params["0.weight"].norm(dim=-1).max() > 1.5  # rows the module renormalizes


@pytest.mark.parametrize("bag", [False, True], ids=["embedding", "embedding-bag"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_max_norm_renormalizes_copies_never_the_callers_samples(bag, grad, gen):
    # Embedding and EmbeddingBag with max_norm renormalize the rows they use in place:
    # each sample its own copy, never the caller's tensors, vectorized or looped.
    emb = nn.EmbeddingBag(10, 4, mode="sum", max_norm=0.5) if bag else nn.Embedding(10, 4, 0, 0.5)
    module = nn.Sequential(emb, nn.Linear(4, 2))
    tokens = torch.tensor([[1, 2, 3], [4, 5, 9]])
    q = bf.init(module, -1.0)
    with torch.set_grad_enabled(grad):
        params = bf.sample(q, 3, generator=gen(0))
        before = {k: v.detach().clone() for k, v in params.items()}
        assert before["0.weight"][:, [1, 2, 3, 4, 5, 9]].norm(dim=-1).max() > 1.0
        with warnings.catch_warnings():  # embedding_bag falls back: no batching rule
            warnings.simplefilter("ignore", bf.VmapFallbackWarning)
            outs = [call(module, params, tokens) for call in (bf.vmap_call, bf.loop_call)]
    for k, v in before.items():
        assert torch.equal(params[k], v), k
    # The oracle: sample k in a deep copy, renormalized there.
    for k in range(3):
        m = copy.deepcopy(module)
        with torch.no_grad():
            for name, v in before.items():
                m.get_parameter(name).copy_(v[k])
            expected = m(tokens)
        for out in outs:
            torch.testing.assert_close(out[k].detach(), expected, rtol=0, atol=1e-12)
    assert not torch.allclose(outs[0][0], outs[0][1])
    if grad:
        g = [torch.autograd.grad(o.sum(), q.mean["0.weight"], retain_graph=True)[0] for o in outs]
        torch.testing.assert_close(g[0], g[1])


def test_calls_inside_a_parametrization_cache_are_refused():
    # The cache kept the first weight computed for every sample (both paths).
    module = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh())
    params = bf.sample(bf.init(module, -2.0), 3)
    x = torch.randn(5, 3)
    expected = bf.loop_call(module, params, x)
    assert not torch.allclose(expected[0], expected[1])
    before = _identity(module)
    q, bnet = bf.init(module, -2.0), bf.BayesianModel(copy.deepcopy(module))

    def loss(m, x):
        return m(x).sum(-1)

    calls = {
        "vmap_call": lambda: bf.vmap_call(module, params, x),
        "loop_call": lambda: bf.loop_call(module, params, x),
        "nelbo": lambda: bf.nelbo(module, q, x, fn=loss, num_data=1.0),
        "local_nelbo": lambda: bf.local_nelbo(module, q, x, fn=loss, num_data=1.0),
        "BayesianModel.forward": lambda: bnet(x, n=2),
    }
    state = torch.random.get_rng_state()
    with torch.nn.utils.parametrize.cached():
        for where, call in calls.items():
            message = rf"{where}: expected no torch\.nn\.utils\.parametrize\.cached"
            with pytest.raises(RuntimeError, match=message):
                call()
    assert torch.equal(torch.random.get_rng_state(), state)  # no draw: a retry is the same
    assert _unchanged(module, before)
    assert torch.allclose(bf.vmap_call(module, params, x, fallback=False), expected, atol=1e-12)


def test_a_call_on_another_module_does_not_wait_for_one_in_progress():
    # While a call on `held` is inside its fn, a call on a disjoint module runs to the end
    # (a single lock made it wait: a fn waiting on it would never return).
    held, other = nn.Linear(3, 2), nn.Linear(3, 2)
    x = torch.randn(4, 3)
    params = {m: bf.sample(bf.init(m, -2.0), 3) for m in (held, other)}
    inside, finished = threading.Event(), threading.Event()
    results = {}

    def fn(m, x):
        inside.set()
        results["other finished while held"] = finished.wait(timeout=30)
        return m(x)

    def work():
        inside.wait(timeout=30)
        results["other"] = bf.vmap_call(other, params[other], x)
        finished.set()

    thread = threading.Thread(target=work)
    thread.start()
    out = bf.loop_call(held, params[held], x, fn=fn)
    thread.join()

    assert results["other finished while held"]
    assert torch.allclose(results["other"], bf.loop_call(other, params[other], x), atol=1e-12)
    assert torch.allclose(out, bf.loop_call(held, params[held], x), atol=1e-12)


class _Integrand(nn.Module):
    r"""The layers of a monotonic transform's hyper-network and integrand, with a forward
    that names no zuko."""

    def __init__(self):
        super().__init__()
        self.hyper = nn.Linear(2, 3)
        self.integrand = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def g(self, s, x):
        h = torch.cat((x[..., None], s.expand(*x.shape, 3)), -1)
        return nn.functional.softplus(self.integrand(h)).squeeze(-1) + 1e-2

    def forward(self, c, x):
        return self.hyper(c).sum(-1, keepdim=True) + x


class _OwnMonotonic(_Integrand):
    r"""Torch layers whose forward builds zuko's quadrature-based transform itself."""

    def forward(self, c, x):
        s = self.hyper(c)[..., None, :]
        transform = zuko.transforms.UnconstrainedMonotonicTransform(
            g=lambda u: self.g(s, u), phi=(s,)
        )
        return transform(x).sum(-1)


class _OwnMonotonicByHelper(_OwnMonotonic):
    def make(self, c):
        s = self.hyper(c)[..., None, :]
        return zuko.transforms.UnconstrainedMonotonicTransform(g=lambda u: self.g(s, u), phi=(s,))

    def forward(self, c, x):  # names no zuko: its helper does
        return self.make(c)(x).sum(-1)


def _passing(f):
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

    return wrapper


class _OwnMonotonicDecorated(_OwnMonotonic):
    forward = _passing(_OwnMonotonic.forward)


class _GaussianLikelihood(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 3)

    def forward(self, x, y):  # zuko's plain distributions need no stand-in
        return zuko.distributions.DiagNormal(self.net(x), torch.ones(3)).log_prob(y)


# A module of the user's other than this one (its own globals), whose function builds the
# transform: a module calling it, or an `fn` that builds it, names no zuko itself.
_HELPERS = types.ModuleType("user_flow_helpers")
exec(
    "import zuko\n"
    "def make(net, c):\n"
    "    s = net.hyper(c)[..., None, :]\n"
    "    return zuko.transforms.UnconstrainedMonotonicTransform(\n"
    "        g=lambda u: net.g(s, u), phi=(s,)\n"
    "    )\n",
    _HELPERS.__dict__,
)
_make = _HELPERS.make


class _ByOtherModule(_Integrand):
    def forward(self, c, x):
        return _HELPERS.make(self, c)(x).sum(-1)


class _ByImportedFunction(_Integrand):
    def forward(self, c, x):
        return _make(self, c)(x).sum(-1)


def _fn_builds(m, c, x):
    s = m.hyper(c)[..., None, :]
    return zuko.transforms.UnconstrainedMonotonicTransform(g=lambda u: m.g(s, u), phi=(s,))(x).sum(
        -1
    )


def _closing_over(make):
    return lambda m, c, x: make(m, c)(x).sum(-1)


def _installed_helper_net():
    # The user's own package, installed (under a site-packages folder) rather than edited
    # in place: installed packages are otherwise not read.
    import importlib
    import tempfile

    name = "user_installed_flows"
    if name not in sys.modules:
        root = Path(tempfile.mkdtemp()) / "site-packages"
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(
            "from zuko.transforms import UnconstrainedMonotonicTransform\n"
            "def make(net, c):\n"
            "    s = net.hyper(c)[..., None, :]\n"
            "    return UnconstrainedMonotonicTransform(g=lambda u: net.g(s, u), phi=(s,))\n"
        )
        sys.path.insert(0, str(root))
        importlib.import_module(name)
    make = sys.modules[name].make

    class Net(_Integrand):
        def forward(self, c, x):
            return make(self, c)(x).sum(-1)

    return Net()


# The module, and the `fn` of the call (None: the module's forward).
OWN_MONOTONIC = {
    "installed-package": (_installed_helper_net, None),
    "forward": (_OwnMonotonic, None),
    "helper": (_OwnMonotonicByHelper, None),
    "decorated": (_OwnMonotonicDecorated, None),
    "other-module": (_ByOtherModule, None),
    "imported-function": (_ByImportedFunction, None),
    "fn": (_Integrand, _fn_builds),
    "fn-closure": (_Integrand, _closing_over(_HELPERS.make)),
}


@pytest.mark.parametrize("kind", OWN_MONOTONIC)
@pytest.mark.parametrize("call", ["vmap_call", "loop_call"])
def test_a_module_whose_forward_builds_zukos_transforms_gets_the_stand_ins(call, kind, gen):
    # Only zuko's own module types got the vmap-safe stand-ins: here zuko's quadrature ran,
    # its backward recomputed the integrand after the call had put the module's own
    # weights back, and the gradients were those of other weights (0.29 for 3.47). So it
    # did where the transform was built by a function of another module, or by `fn`.
    from bayesflow._structure import fn_runs_zuko, structure

    torch.manual_seed(0)
    make, fn = OWN_MONOTONIC[kind]
    net = make()
    assert structure(net).uses_zuko or fn_runs_zuko(fn)
    assert not fn_runs_zuko(lambda m, c, x: m(c, x)) and not fn_runs_zuko(None)
    # the stand-ins cost ~50 us a call: not for modules that do not need them
    assert not structure(nn.Linear(2, 2)).uses_zuko
    assert not structure(_GaussianLikelihood()).uses_zuko
    assert not structure(zuko.nn.MLP(2, 2)).uses_zuko
    c, x = torch.randn(4, 2), torch.randn(4, 5)
    q = bf.init(net, init_logvar=-2.0)
    params = {k: v.detach().requires_grad_() for k, v in bf.sample(q, 3, generator=gen(1)).items()}

    y = getattr(bf, call)(
        net, params, c, x, fn=fn, **({"fallback": False} if call == "vmap_call" else {})
    )
    names = ["hyper.bias", "integrand.2.bias"]  # the oracle: central differences (zuko's
    grads = torch.autograd.grad(y.sum(), [params[k] for k in names])  # drops the integrand's)

    def total(i, name, j, step):
        clone = copy.deepcopy(net)
        with torch.no_grad():
            for k, p in clone.named_parameters():
                p.copy_(params[k][i])
            clone.get_parameter(name).view(-1)[j] += step
            return (clone(c, x) if fn is None else fn(clone, c, x)).sum()

    for i in range(3):
        for g, name in zip(grads, names, strict=True):
            fd = [
                (total(i, name, j, 1e-6) - total(i, name, j, -1e-6)) / 2e-6
                for j in range(g[i].numel())
            ]
            assert torch.allclose(g[i].reshape(-1), torch.stack(fd), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(y[0], y[1])  # the samples were used


NO_TENSORS = {
    "none": lambda m, x: None,
    "empty-tuple": lambda m, x: (),
    "nested": lambda m, x: {"a": None, "b": [None, ()]},
}


@pytest.mark.parametrize("chunk_size", [None, 1, 2, "auto"])
@pytest.mark.parametrize("name", NO_TENSORS)
def test_an_fn_that_returns_no_tensors_gives_what_the_loop_gives(name, chunk_size, gen):
    # vmap_call with n >= 2 refused an fn whose output holds no tensor ("expected fn to
    # return at least one tensor, got None"), where the loop and a one-sample call return it.
    def fn(m, x):
        m(x)  # the forward pass still runs: the buffer rule applies
        return NO_TENSORS[name](m, x)

    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    params = bf.sample(bf.init(net, init_logvar=-3.0), 3, generator=gen(1))
    x = torch.randn(5, 3)
    looped = copy.deepcopy(net)

    expected = bf.loop_call(looped, params, x, fn=fn)
    out = bf.vmap_call(net, params, x, fn=fn, chunk_size=chunk_size, fallback=False)

    assert out == expected
    assert type(out) is type(expected)
    for (k, a), b in zip(net.state_dict().items(), looped.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-12), k  # the samples' passes ran and updated them
    assert not torch.equal(net[1].running_mean, torch.zeros(4))


def _params(module):
    assert all(isinstance(p, nn.Parameter) for p in module.parameters())
    return dict(module.named_parameters())


def _collect(m):
    swag = bf.SWAG(m)  # before the call: collect is what reads during it

    def read():
        swag.collect(m)
        return swag.mean

    return read


def _swag_mean_model(m):
    swag = bf.SWAG(m)
    swag.collect(m)
    return lambda: _params(swag.mean_model(m))


def _swag(m):
    swag = bf.SWAG(m)
    swag.collect(m)
    return swag.mean


# What reads a module's parameters, prepared before another thread's call starts: the
# values read, by name.
READERS = {
    "mean_model": lambda m: lambda: _params(bf.mean_model(m, bf.init(m))),
    "init": lambda m: lambda: bf.init(m).mean,
    "stack_params": lambda m: lambda: {k: t[0] for k, t in bf.stack_params([m, m]).items()},
    "stack_modules": lambda m: (
        lambda: {k: t[1] for k, t in bf.stack_modules([m, m]).params.items()}
    ),
    "SWAG": lambda m: lambda: _swag(m),
    "SWAG.mean_model": _swag_mean_model,
    "SWAG.collect": _collect,
    "IVON": lambda m: (
        lambda: {k: v.clone() for k, v in bf.IVON(m, lr=0.1, ess=1.0).posterior.mean.items()}
    ),
}


@pytest.mark.parametrize("reader", READERS)
def test_reading_a_module_waits_for_a_call_in_progress(reader):
    # mean_model, the stack functions, SWAG and init read the module without its lock:
    # while another thread's call had samples swapped in, they copied or stacked the
    # samples (a mean model 1.6 off, tensors that were not Parameters, torch's deepcopy
    # error on a module holding computed tensors).
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    own = {k: v.detach().clone() for k, v in module.named_parameters()}
    params = {k: v + 1.0 for k, v in bf.sample(bf.init(module, -2.0), 2).items()}  # far off
    read = READERS[reader](module)
    inside, release = threading.Event(), threading.Event()
    results = {}

    def fn(m, x):
        inside.set()
        release.wait(timeout=30)
        return m(x)

    def work():
        inside.wait(timeout=30)
        results["read"] = read()

    reader_thread = threading.Thread(target=work)
    caller = threading.Thread(
        target=lambda: bf.loop_call(module, params, torch.randn(5, 3), fn=fn)
    )
    caller.start()
    reader_thread.start()
    inside.wait(timeout=30)
    reader_thread.join(timeout=0.5)
    waited = reader_thread.is_alive()  # it waits for the call to end
    release.set()
    caller.join()
    reader_thread.join()

    assert waited
    got = results["read"]
    assert got.keys() == own.keys()
    for k, t in got.items():
        assert torch.equal(t, own[k]), k


def test_max_norm_leaves_trainable_samples_alone(gen):
    # The write-back of renormalized rows is for an ensemble's parameters only: a sample
    # made a trainable leaf (detach().requires_grad_(), IVON's draws) is the caller's.
    module = nn.Sequential(nn.Embedding(10, 4, max_norm=0.5), nn.Linear(4, 2))
    tokens = torch.tensor([[1, 2, 3], [4, 5, 9]])
    q = bf.init(module, -1.0)
    opt = bf.IVON(copy.deepcopy(module), lr=0.1, ess=1.0)
    for params in (
        {k: v.detach().requires_grad_() for k, v in bf.sample(q, 3, generator=gen(0)).items()},
        opt.sample(3, generator=gen(0)),
    ):
        before = {k: v.detach().clone() for k, v in params.items()}
        assert before["0.weight"][:, [1, 2, 3, 4, 5, 9]].norm(dim=-1).max() > 0.5
        for call in (bf.vmap_call, bf.loop_call):
            call(module, params, tokens).sum().backward()
            assert all(torch.equal(params[k], v) for k, v in before.items())


def test_the_zuko_verdicts_keep_no_batch_alive():
    # The verdict on the functions an fn's closure holds was cached by a strong reference,
    # 128 of them: a helper made per step, closing over its batch, kept 128 batches alive.
    # (The call's other caches keep the last 16 fns' closures.)
    import gc
    import weakref

    module = nn.Linear(3, 2)
    params = bf.sample(bf.init(module, -2.0), 2)
    refs = []

    def step():
        batch = torch.randn(5, 3)
        refs.append(weakref.ref(batch))

        def shift(h):
            return h + batch.mean()

        out = bf.vmap_call(module, params, batch, fn=lambda m, x: shift(m(x)))
        assert not torch.allclose(out[0], out[1])

    for _ in range(24):
        step()
    gc.collect()
    assert all(r() is None for r in refs[:8])


class _Trainer:
    r"""A notebook's trial object: its `fn` closes over `self`, which holds the module."""

    def __init__(self, estimator):
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 5))
        self.q = bf.init(self.net, init_logvar=-6.0)
        self.estimator = estimator
        self.x = torch.randn(8, 5)

    def ll(self, m, x):
        return -(m(x) - x).square().mean(-1)

    def step(self):
        fn = lambda m, x: self.ll(m, x)
        loss = bf.nelbo(
            self.net, self.q, self.x, fn=fn, n=3, num_data=100, estimator=self.estimator
        )
        loss.backward()
        out = bf.vmap_call(self.net, bf.sample(self.q, 3), self.x, fn=fn)
        assert not torch.allclose(out[0], out[1])


class _Wrapper(nn.Module):
    r"""A BayesianModel inside a user's module, its `fn` closing over the module."""

    def __init__(self):
        super().__init__()
        self.bnet = bf.BayesianModel(nn.Sequential(nn.Linear(5, 8), nn.Tanh()))
        self.head = nn.Linear(8, 5)

    def forward(self, x, n):
        return self.bnet(x, n=n, fn=lambda m, x: self.head(m(x)))


@pytest.mark.parametrize("make", ["weights", "local", "wrapper", "exec"])
def test_a_module_an_fn_closes_over_is_freed(make):
    # The caches' keys held what fn closes over (and its globals): a trainer whose fn
    # closes over `self`, a module calling its own BayesianModel, the namespace of a script
    # run by exec. Each trial's module, posterior and data stayed alive until
    # clear_caches(), one more per trial.
    import gc
    import weakref

    def trial():
        if make == "wrapper":
            w = _Wrapper()
            w(torch.randn(4, 5), 3).sum().backward()
            return weakref.ref(w)
        if make == "exec":
            ns = {"__name__": "__sweep__", "bf": bf, "torch": torch, "nn": nn}
            exec(  # a lambda whose globals hold the net
                "net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 5))\n"
                "out = bf.vmap_call(net, bf.sample(bf.init(net), 3), torch.randn(8, 5),\n"
                "                   fn=lambda m, x: m(x))\n",
                ns,
            )
            return weakref.ref(ns["net"])
        t = _Trainer(make)
        t.step()
        t.step()
        return weakref.ref(t)

    refs = [trial() for _ in range(4)]
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_tensor_fn_closes_over_can_be_swapped_afterwards(gen):
    # The caches' keys took weak references to the tensors they hold by identity (a
    # sparse one), which torch.utils.swap_tensors refuses: held, as before.
    net = nn.Linear(3, 3)
    q = bf.init(net, -3.0)
    adj = torch.eye(3).to_sparse()
    x = torch.randn(3, 3)
    with warnings.catch_warnings():  # torch's: sparse_mm has no batching rule
        warnings.simplefilter("ignore")
        out = bf.local_call(
            net, q, 2, x, fn=lambda m, x: torch.sparse.mm(adj, m(x)), generator=gen(0)
        )
    assert not torch.allclose(out[0], out[1])
    del out  # (its graph holds adj)
    torch.utils.swap_tensors(adj, torch.zeros(3, 3).to_sparse())


def test_per_step_objects_given_to_fn_are_not_kept():
    # Keyed by identity, a dataclass batch (or one fn closes over) was held by the last 16
    # keys of the module's caches: 16 batches alive. A named tuple is keyed by its fields'
    # values, as a tuple, and finds the last step's entry.
    import collections
    import dataclasses
    import gc
    import weakref

    from bayesflow import _engine

    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor
        extra: torch.Tensor

    Pair = collections.namedtuple("Pair", "x extra")
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 5))
    params = bf.sample(bf.init(net, init_logvar=-2.0), 4)
    for make, fn in (
        (Batch, lambda m, b: m(b.x)),
        (Pair, lambda m, b: m(b.x)),
    ):
        bf.clear_caches()
        refs = []
        for _ in range(20):
            b = make(torch.randn(8, 5), torch.randn(1000))
            out = bf.vmap_call(net, params, b, fn=fn)
            torch.testing.assert_close(out, bf.loop_call(net, params, b, fn=fn))
            assert not torch.allclose(out[0], out[1])
            refs.append(weakref.ref(b.extra))
            closing = bf.vmap_call(net, params, b.x, fn=lambda m, x, b=b: m(x) + 0 * b.extra[0])
            torch.testing.assert_close(closing, out)
            del b
        gc.collect()
        assert all(r() is None for r in refs)
        if make is Pair:
            assert len(_engine._FOOTPRINTS.get(net)) <= 2  # (and the closure's)


class _RunningInput(nn.Module):
    r"""Writes buffers in place with values the samples share: a running mean of its
    input and a step counter."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("mean", torch.zeros(3))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        self.count.add_(1)
        return self.lin(x - self.mean)


@pytest.mark.parametrize("chunking", ["int", "auto", "cache"])
def test_buffers_written_in_place_by_a_chunked_pass_follow_the_rule(
    chunking, monkeypatch, gen, fresh_caches
):
    # In chunks, the writes ran once per chunk and later chunks read the earlier ones':
    # outputs 0.19 off the copies holding each sample, the counter at 2 for one call
    # (the default's cache chunks too: the second call of a module differed).
    from bayesflow import _engine, _memory

    if chunking == "cache" and torch.get_default_device().type != "cpu":
        pytest.skip("the default chunks by the cache on the CPU only")
    net = _RunningInput()
    params = bf.sample(bf.init(net, -2.0), 4, generator=gen(1))
    x = torch.randn(5, 3) + 1.0
    if chunking == "cache":
        bf.vmap_call(net, params, x)  # all at once: measures the footprint
        (measured,) = _engine._FOOTPRINTS.get(net).entries.values()
        monkeypatch.setattr(_memory, "_CACHE", [2 * measured + 1])
        with torch.no_grad():
            net.mean.zero_(), net.count.zero_()
    copies = [copy.deepcopy(net) for _ in range(4)]
    with torch.no_grad():
        for i, m in enumerate(copies):
            for k, v in params.items():
                m.get_parameter(k).copy_(v[i])
    expected = torch.stack([m(x) for m in copies])

    options = {"int": {"chunk_size": 2}, "auto": {"chunk_size": "auto"}, "cache": {}}[chunking]
    if chunking == "auto":
        monkeypatch.setattr(_engine, "auto_chunk_size", lambda *args: 2)
    chunks = _record_chunks(monkeypatch)
    if chunking == "cache":
        # Chunks the user did not ask for: the writes put back, then one pass (as the
        # first call ran), remembered. Before, the same call succeeded once, then fell
        # back to the loop (or raised, with fallback=False) at every later call.
        with warnings.catch_warnings():
            warnings.simplefilter("error", bf.VmapFallbackWarning)
            out = bf.vmap_call(net, params, x, fallback=False)
        assert chunks == [2, None]
    else:
        with pytest.warns(bf.VmapFallbackWarning, match=r"writes the buffers \['mean', 'count'\]"):
            out = bf.vmap_call(net, params, x, **options)
        assert chunks == [2]

    assert torch.allclose(out, expected, atol=1e-12)
    assert not torch.allclose(out[0], out[1])
    assert net.count.item() == 1  # once per call
    assert torch.allclose(net.mean, copies[0].mean, atol=1e-15)
    if chunking == "cache":
        chunks.clear()
        again = bf.vmap_call(net, params, x, fallback=False)  # one pass at once
        assert chunks == [None] and net.count.item() == 2
        assert not torch.allclose(again, out)  # it read the mean the first call wrote
        return
    with pytest.raises(RuntimeError, match=r"chunk_size=4 or more runs all samples"):
        bf.vmap_call(net, params, x, fallback=False, **options)
    assert net.count.item() == 1  # the failed call left it as found


class _TransposedDropout(nn.Module):
    r"""Dropout on a transposed (non-contiguous) activation, as a transformer's attention
    output: vmap draws its mask in the batched layout, the loop in one sample's."""

    def __init__(self):
        super().__init__()
        self.a, self.d, self.b = nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(5, 2)

    def forward(self, x):
        return self.b(self.d(self.a(x).t())).t()


@pytest.mark.parametrize(
    "make", [_TransposedDropout, lambda: nn.Sequential(_RunningInput(), nn.Dropout(0.5))]
)
@pytest.mark.parametrize("randomness", ["different", "same"])
def test_with_randomness_the_default_runs_every_call_at_once(
    monkeypatch, fresh_caches, make, randomness
):
    # The footprint the first call measured (all at once) made the next calls run in
    # chunks or one by one, which draw other numbers (masks by the chunk; a transposed
    # activation's in one sample's layout): one seed gave the second call outputs 5.5 off
    # the first's on a wider such net (a transformer layer's 1.7), and a module whose
    # buffers the chunks wrote
    # ran a pass again. With randomness, the default runs all at once every time.
    from bayesflow import _engine, _memory

    if torch.get_default_device().type != "cpu":
        pytest.skip("the default chunks by the cache on the CPU only")
    net = make().train()
    params = bf.sample(bf.init(net, -2.0), 4, generator=torch.Generator().manual_seed(1))
    x = torch.randn(5, 3)
    options = {"randomness": randomness, "fallback": False}
    state = copy.deepcopy(net.state_dict())
    torch.manual_seed(7)
    first = bf.vmap_call(net, params, x, **options)  # all at once: measures the footprint
    (measured,) = _engine._FOOTPRINTS.get(net).entries.values()
    for cache in (2 * measured + 1, measured - 1):  # chunks of 2, one by one
        monkeypatch.setattr(_memory, "_CACHE", [cache])
        monkeypatch.setattr(_memory, "_CORE_CACHE", [cache])
        net.load_state_dict(state)
        chunks = _record_chunks(monkeypatch)
        torch.manual_seed(7)
        again = bf.vmap_call(net, params, x, **options)
        assert chunks == [None]
        assert torch.equal(again, first)
    net.load_state_dict(state)
    torch.manual_seed(7)
    assert torch.equal(bf.vmap_call(net, params, x, chunk_size=4, **options), first)
    assert not torch.equal(first[0], first[1])  # the samples (and masks) differ


@pytest.mark.parametrize("kind", ["full", "pre", "global"])
def test_backward_hooks_are_run_as_a_plain_call_runs_them(kind, gen):
    # torch.func's vmap runs no backward hook: at K >= 2 the gradients were those of the
    # module without the hook (21.7 off a deep copy's, where K = 1 and the loop ran it).
    calls = []

    def scale(*args):
        calls.append(1)
        grad = args[-1]  # grad_output of a pre-hook, grad_input of a hook
        return (grad[0] * 3.0,)

    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    # (An input that requires gradients: torch warns where a global hook fires on a module
    # whose inputs require none.)
    x = torch.randn(6, 3, generator=gen(0)).requires_grad_()
    k = 3
    q = bf.init(net, init_logvar=-2.0)
    samples = {n: v.detach() for n, v in bf.sample(q, k, generator=gen(1)).items()}

    def grads(call, module):
        params = {n: v.clone().requires_grad_() for n, v in samples.items()}
        out = call(module, params, x)
        return torch.autograd.grad(out.square().sum(), params["0.weight"])[0]

    plain = grads(bf.vmap_call, net)  # before any hook
    if kind == "full":
        handle = net[2].register_full_backward_hook(lambda m, gi, go: scale(gi))
    elif kind == "pre":
        handle = net[2].register_full_backward_pre_hook(lambda m, go: scale(go))
    else:
        handle = nn.modules.module.register_module_full_backward_hook(
            lambda m, gi, go: scale(gi) if getattr(m, "out_features", 0) == 2 else None
        )
    try:
        oracle = []  # sample k in a deep copy, called as plain torch
        for i in range(k):
            m = copy.deepcopy(net)
            with torch.no_grad():
                for n, v in samples.items():
                    m.get_parameter(n).copy_(v[i])
            out = m(x).square().sum()
            oracle.append(torch.autograd.grad(out, m[0].weight)[0])
        oracle = torch.stack(oracle)
        assert not torch.allclose(oracle, plain)  # the hook changes the gradients

        before = snapshot(net)
        calls.clear()
        with pytest.warns(bf.VmapFallbackWarning, match="vmap runs no backward hook"):
            got = grads(bf.vmap_call, net)
        assert torch.allclose(got, oracle, rtol=1e-12, atol=1e-12) and len(calls) == k
        assert torch.allclose(grads(bf.loop_call, net), oracle, rtol=1e-12, atol=1e-12)
        with pytest.raises(RuntimeError, match=r"vmap_call: vmap runs no backward hook"):
            bf.vmap_call(net, samples, x, fallback=False)
        assert unchanged(before, net)
        if kind != "global":
            where = "on '2'"
            with pytest.raises(RuntimeError, match=rf"has backward hooks \({where}\)"):
                bf.vmap_call(net, samples, x, fallback=False)
        # Nothing that records gradients: vectorized, no warning (under no_grad, and with
        # samples, input and the module's other parameters that require none).
        frozen = copy.deepcopy(net)
        frozen.requires_grad_(False)
        for module, args in ((net, (x,)), (frozen, (x.detach(),))):
            with warnings.catch_warnings():
                warnings.simplefilter("error", bf.VmapFallbackWarning)
                with torch.no_grad():
                    out = bf.vmap_call(module, samples, *args, fallback=False)
                calls.clear()
                again = bf.vmap_call(frozen, samples, x.detach(), fallback=False)
            assert torch.equal(out, again) and out.shape == (k, 6, 2) and not calls
            assert not again.requires_grad
    finally:
        handle.remove()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_gives_the_loops_outputs_and_gradients(dtype, gen):
    # The batched linear layer's Function saved float32 inputs and multiplied them by the
    # gradient autocast gave in bfloat16: the backward raised "expected scalar type
    # BFloat16 but found Float". Oracle: the loop under the same autocast.
    f32 = torch.float32
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(f32)
    q = bf.init(net, init_logvar=-3.0)
    x = torch.randn(6, 3, generator=gen(0), dtype=f32)
    before = snapshot(net)

    results = []
    for call in (bf.loop_call, bf.vmap_call):
        params = bf.sample(q, 3, generator=gen(1))
        kwargs = {} if call is bf.loop_call else {"fallback": False}
        with torch.autocast("cpu", dtype=dtype):
            out = call(net, params, x, **kwargs)
        grads = torch.autograd.grad(
            out.float().square().sum(), [*q.mean.values(), *q.logvar.values()]
        )
        results.append((out, grads))

    (loop, loop_grads), (vec, vec_grads) = results
    assert vec.dtype == loop.dtype == dtype
    assert torch.allclose(vec.float(), loop.float(), rtol=1e-2, atol=1e-2)
    for a, b in zip(vec_grads, loop_grads, strict=True):
        assert torch.allclose(a, b, rtol=2e-2, atol=2e-2)
    assert not torch.allclose(vec[0].float(), vec[1].float())  # the samples change the output
    assert unchanged(before, net)


def _autocast_cases():
    f32, x = torch.float32, torch.randn(5, 2, 4, dtype=torch.float32)
    cnn = nn.Sequential(nn.Conv1d(2, 3, 1), nn.Tanh(), nn.Conv1d(3, 2, 1), nn.Flatten(0))
    return {
        # the second convolution's weight is not sampled: its batched input runs torch's
        # rule too
        "conv": (cnn.to(f32), (x,), ("0.*",), False),
        # the same for a linear layer with a bias on a batched input
        "linear": (
            nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(f32),
            (x,),
            ("0.*",),
            False,
        ),
        # the transposed convolutions, the second's weight not sampled (torch's rule of the
        # convolution, below autocast: float32)
        "conv-transpose": (
            nn.Sequential(
                nn.ConvTranspose1d(2, 3, 2),
                nn.Tanh(),
                nn.ConvTranspose1d(3, 2, 2, stride=2, output_padding=1),
                nn.Flatten(0),
            ).to(f32),
            (x,),
            ("0.*",),
            False,
        ),
        "attention": (nn.MultiheadAttention(4, 2).to(f32), (x, x, x), ("",), True),
        "lstm": (nn.LSTM(4, 4).to(f32), (x,), ("",), True),
        "lstm-cell": (nn.LSTMCell(4, 4).to(f32), (x[0],), ("",), True),
    }


@pytest.mark.parametrize(
    "case", ["conv", "linear", "conv-transpose", "attention", "lstm", "lstm-cell"]
)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_autocast_layers_give_the_loops_dtypes(case, grad, gen):
    # torch's batching rules of convolution, of a linear layer's bias on a batched input,
    # of baddbmm (attention) and the recurrent steps run below autocast: vmap_call gave
    # float32 where the loop gave bfloat16 (and other values), with no warning. Linear
    # layers and convolutions now cast as autocast does; the others fall back to the
    # loop, and say why.
    net, args, include, falls_back = _autocast_cases()[case]
    q = bf.init(net, init_logvar=-3.0, include=include)
    params = bf.sample(q, 3, generator=gen(1))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        loop = bf.loop_call(net, params, *args)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vec = bf.vmap_call(net, params, *args)
    loop, vec = (loop[0], vec[0]) if isinstance(loop, tuple) else (loop, vec)
    said = [w for w in caught if issubclass(w.category, bf.VmapFallbackWarning)]
    assert bool(said) == falls_back
    assert all("autocast" in str(w.message) for w in said)
    assert vec.dtype == loop.dtype
    assert torch.allclose(vec.float(), loop.float(), rtol=2e-2, atol=2e-2)
    assert not torch.allclose(vec[0].float(), vec[1].float())


class _RecurrentHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.LSTM(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


@pytest.mark.parametrize("case", ["conv", "lstm", "cpu-model-cuda-autocast"])
def test_local_calls_under_autocast_run_as_the_loop_does(case, gen, fresh_caches):
    # Under autocast the convolution stand-in replaced a local call's own forward of a
    # conv layer (and its shape-finding pass), and the recurrent stand-ins refused autocast
    # in the plain shape-finding pass: local_call raised, its loop oracle too. With CUDA's
    # autocast on, a model on the CPU was caught as well.
    f32 = torch.float32
    if case == "lstm":
        net, x = _RecurrentHead().to(f32), torch.randn(6, 3, 4, dtype=f32)
    else:
        net = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 2))
        net, x = net.to(f32), torch.randn(4, 2, 8, dtype=f32)
    q = bf.init(net, init_logvar=-2.0)
    device = "cuda" if case == "cpu-model-cuda-autocast" else "cpu"
    outs = []
    for vectorized in (False, True):
        bf.clear_caches()
        torch.set_autocast_enabled(device, True)
        try:
            if device == "cpu":
                torch.set_autocast_dtype("cpu", torch.bfloat16)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                y = bf.local_call(net, q, 3, x, generator=gen(1), vectorized=vectorized)
        finally:
            torch.set_autocast_enabled(device, False)
            torch.set_autocast_dtype("cpu", torch.bfloat16)
        said = [w for w in caught if issubclass(w.category, bf.VmapFallbackWarning)]
        assert bool(said) == (vectorized and case == "lstm")
        outs.append(y)
    loop, vec = outs
    assert vec.dtype == loop.dtype
    assert torch.allclose(vec.float(), loop.float(), rtol=5e-2, atol=5e-2)
    assert not torch.allclose(vec[0].float(), vec[1].float())


def _fn_cases():
    w = torch.randn(6, 3, dtype=torch.float32)
    y = torch.randint(0, 3, (5,))
    return {
        # losses that autocast computes in float32 (vmap: in bfloat16, 5e-3 off)
        "cross-entropy": lambda m, x: -F.cross_entropy(m(x), y, reduction="none"),
        "mse": lambda m, x: -F.mse_loss(m(x), torch.zeros(5, 3, dtype=w.dtype), reduction="none"),
        # functions that autocast computes in bfloat16 (vmap: in float32)
        "linear": lambda m, x: F.linear(m(x), w[:3], torch.ones(3, dtype=w.dtype)),
        "baddbmm": lambda m, x: torch.baddbmm(
            torch.ones(1, 5, 3, dtype=w.dtype), m(x)[None], w[None, :3]
        ),
        "addmm": lambda m, x: torch.addmm(torch.ones(5, 3, dtype=w.dtype), m(x), w[:3]),
        "conv": lambda m, x: F.conv1d(m(x)[:, None], w[None, None, :2, 0]),
        "trace": lambda m, x: torch.trace(m(x)[:3]),
        "vecdot": lambda m, x: torch.linalg.vecdot(m(x), w[:5]),
        # autocast turned off, or another dtype, for a block of fn: the rules follow it
        "off": lambda m, x: _off(lambda: F.linear(m(x).float(), w[:3], w[0])),
        "off-loss": lambda m, x: _off_loss(m(x)),  # bfloat16 logits, a bfloat16 loss
        "float16": lambda m, x: _half(lambda: F.linear(m(x).float(), w[:3], w[0])),
    }


def _off(f):
    with torch.autocast("cpu", enabled=False):
        return f()


def _off_loss(h):
    return _off(lambda: -F.mse_loss(h, h * 0, reduction="none"))


def _half(f):
    with torch.autocast("cpu", dtype=torch.float16):
        return f()


@pytest.mark.parametrize("case", list(_fn_cases()))
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_autocast_functions_in_fn_give_the_loops_numbers(case, grad, gen):
    # Inside vmap, the batched kernels of these functions run below autocast: a loss of
    # bfloat16 logits was computed in bfloat16 (nelbo vectorized and looped differed), a
    # linear with a bias or a convolution called in fn in float32.
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).float()
    x = torch.randn(5, 4, dtype=torch.float32)
    fn = _fn_cases()[case]
    params = bf.sample(bf.init(net, init_logvar=-3.0), 3, generator=gen(1))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
        loop = bf.loop_call(net, params, x, fn=fn)
        vec = bf.vmap_call(net, params, x, fn=fn, fallback=False)
    assert vec.dtype == loop.dtype
    assert torch.allclose(vec.float(), loop.float(), rtol=1e-2, atol=1e-2)
    assert not torch.allclose(vec[0].float(), vec[1].float())
    if case in ("cross-entropy", "trace"):  # the loop's computation
        assert torch.equal(vec, loop)


def _after_a_linear():
    f32 = torch.float32
    return {
        "batch-norm-eval": nn.Sequential(
            nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)
        ).eval(),
        "batch-norm-train": nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)),
        "prelu": nn.Sequential(nn.Linear(3, 8), nn.PReLU(), nn.Linear(8, 2)).eval(),
        # (the norm's output is the network's: a linear layer after it would cast it)
        "layer-norm": nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8)),
        "group-norm": nn.Sequential(nn.Linear(3, 8), nn.GroupNorm(2, 8)),
        "conv-transpose": nn.Sequential(
            nn.Linear(3, 8), nn.Unflatten(1, (2, 4)), nn.ConvTranspose1d(2, 3, 3), nn.Flatten()
        ).eval(),
    }, f32


@pytest.mark.parametrize(
    "case",
    ["batch-norm-eval", "batch-norm-train", "prelu", "layer-norm", "group-norm", "conv-transpose"],
)
def test_autocast_layers_after_a_cast_layer_vectorize(case, gen):
    # A layer fed the bfloat16 output of a cast linear layer, with float32 weights of its
    # own: vmap's rules refused the mix a plain call computes, and every such call ran in
    # the loop (a batch normalization after a convolution, the commonest block).
    cases, f32 = _after_a_linear()
    net = cases[case].to(f32)
    x = torch.randn(6, 3, dtype=f32)
    params = bf.sample(bf.init(net, init_logvar=-3.0), 3, generator=gen(1))
    nets = [net, copy.deepcopy(net)]
    outs = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs.append(bf.loop_call(nets[0], params, x))
        with warnings.catch_warnings():
            warnings.simplefilter("error", bf.VmapFallbackWarning)
            outs.append(bf.vmap_call(nets[1], params, x))
    loop, vec = outs
    assert vec.dtype == loop.dtype == torch.bfloat16
    assert torch.allclose(vec.float(), loop.float(), rtol=2e-2, atol=2e-2)
    assert not torch.allclose(vec[0].float(), vec[1].float())
    for (name, a), (_, b) in zip(nets[0].named_buffers(), nets[1].named_buffers(), strict=True):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("flipout", [False, True], ids=["local", "flipout"])
@pytest.mark.parametrize("include", [("*",), ("*.bias",)], ids=["all", "bias"])
def test_local_calls_under_autocast_give_the_modules_dtype(flipout, include, gen):
    # Flipout's bias noise, and the local trick's variance of a layer whose bias alone is
    # Bayesian, were float32 terms added to the layer's bfloat16 output: float32 outputs
    # where the module (loop_call, vmap_call) gives bfloat16.
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).float()
    x = torch.randn(6, 3, dtype=torch.float32)
    q = bf.init(net, init_logvar=-3.0, include=include)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = bf.loop_call(net, bf.sample(q, 3, generator=gen(0)), x).dtype
        outs = [
            bf.local_call(net, q, 3, x, flipout=flipout, generator=gen(1), vectorized=v)
            for v in (False, True)
        ]
    assert want == torch.bfloat16
    assert [y.dtype for y in outs] == [want, want]
    assert torch.allclose(outs[1].float(), outs[0].float(), rtol=2e-2, atol=2e-2)
    assert not torch.allclose(outs[1][0].float(), outs[1][1].float())


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_a_closure_over_a_scalar_made_anew_measures_nothing_again(gen, fresh_caches):
    # A batch's scale closed over as a 0-dim float tensor, new at every step, was keyed by
    # identity: the footprint measured again at every call (a local call's shape-finding
    # pass too). A 0-dim integer tensor may set the amount of work: by identity still.
    from bayesflow import _engine

    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
    params = bf.sample(bf.init(net, -3.0), 3, generator=gen(1))

    def scaled(s):
        return lambda m, x: m(x / s)

    for _ in range(3):
        x = torch.randn(16, 3)
        fn = scaled(x.std())
        got = bf.vmap_call(net, params, x, fn=fn)
        assert torch.allclose(got, bf.loop_call(net, params, x, fn=fn), atol=1e-10)
    if x.device.type == "cpu":
        assert len(_engine._FOOTPRINTS.get(net)) == 1
        for k in range(3):
            bf.vmap_call(net, params, x, fn=scaled(torch.tensor(k + 1)))
        assert len(_engine._FOOTPRINTS.get(net)) == 4


def test_a_count_given_as_an_argument_sets_the_footprint(monkeypatch, gen, fresh_caches):
    # A 0-dim integer tensor that sets the amount of work, given as an argument rather than
    # closed over, was keyed by its shape: after a call with 1, a call with 400 ran all its
    # samples at once, 400 times over max_memory.
    net = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 4))
    params = bf.sample(bf.init(net, -3.0), 16, generator=gen(1))
    x = torch.randn(8, 3)

    def fn(m, x, k):
        return m(x.repeat(int(k), 1)).sum(0)

    per_row = _memory_of(net, x[:1], fn)
    budget = 100 * 8 * per_row  # one sample with k = 100 fits
    chunks = _record_chunks(monkeypatch)
    for k in (1, 400):
        got = bf.vmap_call(
            net, params, x, torch.tensor(k), fn=fn, chunk_size="auto", max_memory=budget
        )
        assert torch.allclose(got, bf.loop_call(net, params, x, torch.tensor(k), fn=fn))
    assert chunks[0] == 16 and chunks[1] == 1
    assert not torch.allclose(got[0], got[1])

    # The same tensor counted up in place (it was keyed by identity: the old chunk).
    bf.clear_caches()
    chunks.clear()
    k = torch.tensor(1)
    for _ in range(2):
        bf.vmap_call(net, params, x, k, fn=fn, chunk_size="auto", max_memory=budget)
        k += 399
    assert chunks == [16, 1]


def test_one_examples_label_made_anew_finds_the_last_ones_layout(gen, fresh_caches):
    # A 0-dim label (what a TensorDataset yields), new at every step, was keyed by identity:
    # a local call ran its shape-finding pass at every step. By value: once per label.
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    q = bf.init(net, init_logvar=-3.0)
    calls = types.SimpleNamespace(n=0)  # (an object: keyed by identity, not by its count)

    def fn(m, x, y):
        calls.n += 1
        return -F.cross_entropy(m(x[None]), y.reshape(1))

    labels = [0, 1, 2, 0, 1, 2, 2, 1, 0, 0]
    for y in labels:
        bf.local_call(net, q, 4, torch.randn(4), torch.tensor(y), fn=fn, generator=gen(y))
    assert calls.n == len(labels) + len(set(labels))


def test_the_default_budget_reads_the_available_memory(monkeypatch, tmp_path):
    # "Half the available physical memory": it read the free pages only, without the
    # caches the kernel gives back (15.5 against 21.9 GB on a machine at rest).
    import builtins

    from bayesflow import _memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 8000000 kB\nMemFree: 1000 kB\nMemAvailable: 3000000 kB\n")
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        return real_open(meminfo if path == "/proc/meminfo" else path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert _memory.available_memory(torch.device("cpu")) == 3000000 * 1024


def _memory_of(net, x, fn):
    from bayesflow import _memory

    return _memory.per_sample_bytes(lambda: fn(net, x, torch.tensor(1)))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_a_closure_over_a_nested_tensor_is_keyed_by_identity(gen, fresh_caches):
    # The keys of closures took every tensor's shape: a strided nested tensor has none,
    # and vmap_call and local_call raised where the loop ran.
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    q = bf.init(net, -3.0)
    params = bf.sample(q, 3, generator=gen(1))
    x = torch.randn(6, 4)
    nested = torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)])

    def fn(m, x):
        return m(x).sum(-1) + sum(m(t).sum() for t in nested.unbind())

    got = bf.vmap_call(net, params, x, fn=fn)
    assert torch.allclose(got, bf.loop_call(net, params, x, fn=fn), atol=1e-10)
    assert not torch.allclose(got[0], got[1])
    local = bf.local_call(net, q, 3, x, fn=fn, generator=gen(2))
    loop = bf.local_call(net, q, 3, x, fn=fn, generator=gen(2), vectorized=False)
    assert torch.allclose(local, loop, atol=1e-10)


class _OwnNorm(nn.Module):
    r"""Running statistics of a layer of the user's: through `.data`, or batch norm's
    kernel on its own buffers; neither bumps the buffers' version counters."""

    def __init__(self, d, kernel):
        super().__init__()
        self.kernel = kernel
        self.register_buffer("rm", torch.zeros(d))
        self.register_buffer("rv", torch.ones(d))

    def forward(self, x):
        if self.kernel:
            return nn.functional.batch_norm(x, self.rm, self.rv, training=self.training)
        if self.training:
            self.rm.data.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return x - self.rm


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 1, 2, "cache"])
def test_chunks_never_write_a_shared_buffer_once_each(
    kernel, chunk_size, monkeypatch, gen, fresh_caches
):
    # The chunked pass looked for such writes by version counter only: each chunk wrote the
    # buffer again, and the later chunks read the earlier ones' writes (outputs off by up
    # to 0.8, silently), with the cache's chunks as well as the user's. Oracle: deep copies.
    from bayesflow import _memory

    net = nn.Sequential(_OwnNorm(3, kernel), nn.Linear(3, 2)).train()
    params = bf.sample(bf.init(net, -1.0), 4, generator=gen(0))
    x = torch.randn(8, 3, generator=gen(1)) + 2.0
    if chunk_size == "cache":  # chunks of 2 that the cache rule picks, not the user
        bf.vmap_call(net, params, x)  # all at once: measures a sample
        entries = bf._engine._FOOTPRINTS.get(net)
        if entries is None:
            pytest.skip("the cache rule runs on the CPU only")
        per_sample = next(iter(entries.entries.values()))
        monkeypatch.setattr(_memory, "_CACHE", [2 * per_sample + 1])
    copies = []
    for i in range(4):
        c = copy.deepcopy(net)
        c.load_state_dict({**net.state_dict(), **{k: v[i] for k, v in params.items()}})
        copies.append(c)
    oracle = torch.stack([c(x) for c in copies]).detach()
    rm = torch.stack([c[0].rm for c in copies]).mean(0)

    if chunk_size == "cache":
        chunks = _record_chunks(monkeypatch)
        out = bf.vmap_call(net, params, x)  # chunks of 2, then all at once, remembered
        assert chunks == [2, None]
    elif chunk_size is None:
        out = bf.vmap_call(net, params, x, fallback=False)
    else:
        with pytest.warns(
            bf.VmapFallbackWarning, match=r"RuntimeError: fn writes the buffers \['0.rm'"
        ):
            out = bf.vmap_call(net, params, x, chunk_size=chunk_size)

    assert torch.allclose(out, oracle, atol=1e-12)
    assert not torch.allclose(oracle[0], oracle[1])
    assert torch.allclose(net[0].rm, rm, atol=1e-12) and not torch.allclose(rm, torch.zeros(3))


def test_one_sample_writes_a_reassigned_buffer_as_the_loop_does(gen):
    # With one sample, the plain call left the new tensor (and its graph: `self.ema = ...`
    # outside no_grad) in the module: a second backward failed ("backward through the graph
    # a second time"), and the module held another object than its buffer.
    x = torch.randn(8, 3, generator=gen(0))
    nets = {call: _ReassignsItsBuffer(no_grad=False) for call in ("vmap", "loop")}
    nets["loop"].load_state_dict(nets["vmap"].state_dict())
    q = bf.init(nets["vmap"], -2.0)
    for step in range(2):
        for call, net in nets.items():
            ema = net.ema
            params = bf.sample(q, 1, generator=gen(step))
            out = (bf.vmap_call if call == "vmap" else bf.loop_call)(net, params, x)
            out.square().sum().backward()
            assert (
                net.ema is ema and not net.ema.requires_grad and "ema" in dict(net.named_buffers())
            )
        assert torch.equal(nets["vmap"].ema, nets["loop"].ema) and nets["vmap"].ema.abs().sum() > 0


def test_auto_chunks_of_an_fn_that_differentiates_inside_fall_back_as_others_do(gen, fresh_caches):
    # The pass that measures a sample ran fn without gradients, outside the fallback: a
    # bare "element 0 of tensors does not require grad" where the loop works.
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    params = bf.sample(bf.init(net, -1.0), 3, generator=gen(0))
    x = torch.randn(4, 3, generator=gen(1), requires_grad=True)

    def score(m, x):
        return torch.autograd.grad(m(x).sum(), x, create_graph=True)[0]

    oracle = bf.loop_call(net, params, x, fn=score)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bf.VmapFallbackWarning)
        out = bf.vmap_call(net, params, x, fn=score, chunk_size="auto")
    assert torch.allclose(out, oracle, atol=1e-12) and not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("randomness", ["different", "same"])
def test_a_failed_call_leaves_torchs_generator_as_it_found_it(randomness, gen):
    # With fallback=False, the generator was saved only where a fallback could use it.
    net = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    params = bf.sample(bf.init(net, -1.0), 3, generator=gen(0))

    def fn(m, x):
        h = m(x)
        h.sum().item()  # vmap cannot read a value
        return h

    x = torch.randn(4, 3, generator=gen(1))
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    with pytest.raises(RuntimeError, match="vmap_call: vmap cannot run Sequential"):
        bf.vmap_call(net, params, x, fn=fn, randomness=randomness, fallback=False)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_buffer_that_holds_nan_keeps_a_chunked_call_vectorized(gen):
    # The check of shared writes compared by value with torch.equal, to which a NaN differs
    # from itself: a false "fn writes the buffers" fallback (or error, fallback=False).
    net = NanBuffer()
    params = bf.sample(bf.init(net, -2.0), 4, generator=gen(0))
    x = torch.randn(5, 3, generator=gen(1))
    out = bf.vmap_call(net, params, x, chunk_size=2, fallback=False)
    assert torch.allclose(out, bf.loop_call(net, params, x), atol=1e-12)
    assert not torch.allclose(out[0], out[1])
