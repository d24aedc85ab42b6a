r"""vmap_call against its oracle, loop_call."""

import warnings

import pytest
import torch
import torch.nn as nn
import zuko

import bayesflow as bf

from .registry import MODELS, call, snapshot, unchanged

N = 4


def setup(name: str, init_logvar: float = -3.0):
    case = MODELS[name]
    module = case.build()
    q = bf.init(module, init_logvar=init_logvar, include=case.include, exclude=case.exclude)
    return case, module, q, case.args()


@pytest.mark.parametrize("name", MODELS)
def test_vmap_matches_loop_and_chunks(name, gen):
    case, module, q, args = setup(name)
    params = bf.sample(q, N, generator=gen(1))

    y = bf.vmap_call(module, params, *args, fn=case.fn, fallback=False)
    y_loop = bf.loop_call(module, params, *args, fn=case.fn)
    y_chunk = bf.vmap_call(module, params, *args, fn=case.fn, chunk_size=3, fallback=False)

    assert y.shape[0] == N
    assert torch.allclose(y, y_loop, atol=1e-10)  # float64
    assert torch.allclose(y_chunk, y_loop, atol=1e-10)
    # the sampled parameters were used, and differ between samples
    assert not torch.allclose(y[0], call(case, module, *args), atol=1e-6)
    assert not torch.allclose(y[0], y[1], atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_vmap_without_autograd_matches_loop(name, gen):
    # Without a graph to record, the vectorized layers skip their autograd Functions.
    case, module, q, args = setup(name)
    params = bf.sample(q, N, generator=gen(1))
    y_grad = bf.vmap_call(module, params, *args, fn=case.fn, fallback=False)
    detached = {k: v.detach() for k, v in params.items()}

    for context in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        with context():
            y = bf.vmap_call(module, detached, *args, fn=case.fn, fallback=False)
            y_loop = bf.loop_call(module, detached, *args, fn=case.fn)
        if context is not torch.enable_grad:
            assert not y.requires_grad
        assert torch.allclose(y, y_loop, atol=1e-10)  # float64
        assert torch.allclose(y, y_grad, atol=1e-12)
        assert not torch.allclose(y[0], y[1], atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_gradients_match_loop(name, gen):
    case, module, q, args = setup(name)

    def grads(runner):
        params = bf.sample(q, N, generator=gen(2))
        y = runner(module, params, *args, fn=case.fn)
        leaves = [*q.mean.values(), *q.logvar.values()]
        return torch.autograd.grad(y.square().sum(), leaves)

    g_vmap, g_loop = grads(bf.vmap_call), grads(bf.loop_call)

    for a, b in zip(g_vmap, g_loop, strict=True):
        assert torch.allclose(a, b, atol=1e-9)
    assert any(g.abs().sum() > 0 for g in g_vmap)


@pytest.mark.parametrize("name", ["mlp", "nsf"])
def test_single_sample_fast_path(name):
    case, module, q, args = setup(name)
    params = bf.sample(q, 1)

    y = bf.vmap_call(module, params, *args, fn=case.fn)

    assert torch.allclose(y, bf.loop_call(module, params, *args, fn=case.fn), atol=1e-12)
    assert not torch.allclose(y[0], call(case, module, *args), atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "nsf"])
def test_per_sample_arguments(name):
    case, module, q, args = setup(name)
    params = bf.sample(q, N)
    per_sample = tuple(torch.randn(N, *a.shape) for a in args)
    dims = (0,) * len(args)

    y = bf.vmap_call(module, params, *per_sample, fn=case.fn, in_dims=dims, fallback=False)
    y_loop = bf.loop_call(module, params, *per_sample, fn=case.fn, in_dims=dims)

    assert torch.allclose(y, y_loop, atol=1e-10)
    expected = call(case, module, *(a[1] for a in per_sample))
    assert not torch.allclose(y[1], expected, atol=1e-6)
    # each sample saw its own input: sample 1 on the inputs of sample 0 gives another answer
    one = {k: v[1:2] for k, v in params.items()}
    y_other = bf.loop_call(module, one, *(a[0] for a in per_sample), fn=case.fn)
    assert not torch.allclose(y[1], y_other[0], atol=1e-6)


def test_absent_parameters_stay_shared():
    case, module, q, args = setup("nsf-partial")
    params = bf.sample(q, N)
    chosen = set(params)

    assert chosen and chosen != {n for n, _ in module.named_parameters()}

    y = bf.vmap_call(module, params, *args, fn=case.fn)
    # The oracle: a copy whose own parameters are set by hand, one sample at a time.
    for i in range(N):
        copy = case.build()
        copy.load_state_dict(module.state_dict())
        with torch.no_grad():
            for name, p in copy.named_parameters():
                if name in chosen:
                    p.copy_(params[name][i])
        assert torch.allclose(y[i], case.fn(copy, *args), atol=1e-10)


@pytest.mark.parametrize("shape", [(0, 4), (3, 0)], ids=["no-inputs", "no-outputs"])
@pytest.mark.parametrize("batch", [5, 0])
def test_empty_linear_layers_run_vectorized(shape, batch, gen):
    # A layer with no inputs (its output is its bias) or no outputs: vmap runs it, with
    # no fallback, and gives the loop's numbers and gradients.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: initializing zero-element tensors
        net = nn.Linear(*shape)
    q = bf.init(net, -1.0)
    params = bf.sample(q, 3, generator=gen(0))
    x = torch.randn(batch, shape[0], generator=gen(1))
    y = bf.vmap_call(net, params, x, fallback=False)
    ref = bf.loop_call(net, params, x)
    assert y.shape == (3, batch, shape[1])
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    if y.numel():  # the samples reach the output
        assert not torch.allclose(y[0], y[1])
    grads = torch.autograd.grad(y.square().sum(), params["bias"])
    torch.testing.assert_close(grads, torch.autograd.grad(ref.square().sum(), params["bias"]))


@pytest.mark.parametrize("name", MODELS)
def test_calls_are_pure(name):
    case, module, q, args = setup(name)
    params = bf.sample(q, N)
    before = snapshot(module, q.mean, q.logvar, params, args)

    bf.vmap_call(module, params, *args, fn=case.fn)
    bf.loop_call(module, params, *args, fn=case.fn)

    assert unchanged(before, module, q.mean, q.logvar, params, args)
    assert all(isinstance(p, nn.Parameter) for p in module.parameters())


def test_named_tuple_outputs():
    from collections import namedtuple

    Out = namedtuple("Out", ["y", "total"])
    module = zuko.nn.MLP(3, 4, hidden_features=(8,))
    x = torch.randn(5, 3)
    fn = lambda m, x: Out(m(x), m(x).sum())

    for n in (1, N):
        params = bf.sample(bf.init(module, -3.0), n)
        out = bf.vmap_call(module, params, x, fn=fn)
        ref = bf.loop_call(module, params, x, fn=fn)
        assert type(out) is Out and out.y.shape == (n, 5, 4) and out.total.shape == (n,)
        assert torch.allclose(out.y, ref.y) and torch.allclose(out.total, ref.total)
        assert not torch.allclose(out.y[0], module(x), atol=1e-6)


def test_structured_outputs():
    module = zuko.nn.MLP(3, 4, hidden_features=(8,))
    params = bf.sample(bf.init(module, -3.0), N)
    x = torch.randn(5, 3)

    def fn(m, x):
        y = m(x)
        return {"y": y, "pair": (y.sum(-1), y.mean())}

    out = bf.vmap_call(module, params, x, fn=fn)
    ref = bf.loop_call(module, params, x, fn=fn)

    assert out["y"].shape == (N, 5, 4) and out["pair"][1].shape == (N,)
    assert torch.allclose(out["y"], ref["y"]) and torch.allclose(out["pair"][0], ref["pair"][0])
    assert torch.allclose(out["pair"][1], ref["pair"][1])
    assert not torch.allclose(out["y"][0], module(x), atol=1e-6)


class ItemNet(nn.Module):
    r"""A module vmap cannot batch: it turns a tensor into a Python number."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w.sum().item() + self.w


def test_fallback_warns_and_matches_loop():
    module = ItemNet()
    params = bf.sample(bf.init(module, init_logvar=-2.0), N)
    x = torch.randn(3)

    with pytest.warns(bf.VmapFallbackWarning, match=r"vmap_call: vmap cannot run ItemNet"):
        y = bf.vmap_call(module, params, x)

    assert torch.allclose(y, bf.loop_call(module, params, x))
    assert not torch.allclose(y[0], module(x))

    with pytest.raises(RuntimeError, match=r"vmap_call: vmap cannot run ItemNet \(RuntimeError"):
        bf.vmap_call(module, params, x, fallback=False)


def test_broken_fn_raises_its_own_error_without_a_warning():
    module = zuko.nn.MLP(3, 4)
    params = bf.sample(bf.init(module), N)

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        bf.vmap_call(module, params, torch.randn(5, 2))


def test_distributions_must_be_reduced_inside_fn():
    flow = zuko.flows.MAF(2, 1)
    params = bf.sample(bf.init(flow), N)

    with pytest.raises(TypeError, match="vmap_call: expected fn to return tensors"):
        bf.vmap_call(flow, params, torch.randn(1))
    with pytest.raises(TypeError, match="loop_call: expected fn to return tensors"):
        bf.loop_call(flow, params, torch.randn(1))


def test_lazy_flow_runs_inside_the_swap():
    # trap 1: the naive functional_call returns the base model's log-density
    flow = zuko.flows.NSF(2, 1, hidden_features=(8, 8))
    params = bf.sample(bf.init(flow, init_logvar=-1.0), 2)
    c, x = torch.randn(5, 1), torch.randn(5, 2)
    one = {k: v[0] for k, v in params.items()}

    naive = torch.func.functional_call(flow, one, (c,)).log_prob(x)
    ours = bf.vmap_call(flow, params, c, x, fn=lambda f, c, x: f(c).log_prob(x))[0]

    assert torch.allclose(naive, flow(c).log_prob(x))  # the trap, reproduced
    assert not torch.allclose(ours, naive, atol=1e-6)


def _instance_forwards(rnn_too):
    lin = nn.Linear(3, 4)
    conv = nn.Conv1d(4, 2, 3, padding=1)
    rnn = nn.GRU(2, 3, batch_first=True)
    for m in (lin, conv, rnn) if rnn_too else (lin, conv):
        plain = m.forward  # the class's, bound
        m.forward = lambda *a, plain=plain: _twice(plain(*a))  # as a monkeypatch does

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.conv, self.rnn = lin, conv, rnn

        def forward(self, x):
            h = self.conv(self.lin(x).transpose(1, 2)).transpose(1, 2)
            return self.rnn(h)[0]

    return Net()


def _twice(out):
    return tuple(_twice(o) for o in out) if isinstance(out, tuple) else 2 * out + 1


@pytest.mark.parametrize("rnn_too", [False, True], ids=["linear-conv", "and-gru"])
def test_forwards_set_on_the_instance_run_as_they_are(rnn_too, gen):
    # A stand-in put over an instance's own forward dropped it, silently.
    net = _instance_forwards(rnn_too)
    params = bf.sample(bf.init(net, init_logvar=-2.0), 3, generator=gen(0))
    x = torch.randn(2, 5, 3)
    oracle = torch.stack(
        [
            torch.func.functional_call(net, {k: v[i] for k, v in params.items()}, (x,))
            for i in range(3)
        ]
    )

    for chunk_size in (None, 2):
        if rnn_too:  # no batching rule for the GRU's kernel without the stand-in: the loop
            with pytest.warns(bf.VmapFallbackWarning, match="aten::gru"):
                out = bf.vmap_call(net, params, x, chunk_size=chunk_size)
        else:
            out = bf.vmap_call(net, params, x, chunk_size=chunk_size, fallback=False)
        assert torch.allclose(out, oracle, atol=1e-10)
    assert torch.allclose(bf.loop_call(net, params, x), oracle, atol=1e-10)
    assert not torch.allclose(oracle[0], oracle[1])  # the samples changed the output
    assert all("forward" in vars(m) for m in (net.lin, net.conv))  # still theirs
    assert bf.local_layers(net) == {}  # nor does the local trick
