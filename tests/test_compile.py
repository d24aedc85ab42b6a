r"""torch.compile on the vectorized forward and training step of a small MLP (CPU)."""

import pytest
import torch
import torch._dynamo
import zuko

import bayesflow as bf

# Warnings from torch's own internals: inductor imports torch.utils.mkldnn, which uses
# torch.jit, and dynamo reads `.grad` of the sampled (non-leaf) parameters it traces.
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
    ),
    pytest.mark.filterwarnings(
        "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"
    ),
]


@pytest.fixture(autouse=True)
def _fresh_compiler():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def mse(net, x, y):
    return -(net(x) - y).square().mean(dim=-1)


def test_compiled_vectorized_forward(gen):
    net = zuko.nn.MLP(3, 2, hidden_features=(8,))
    q = bf.init(net, init_logvar=-3.0)
    x = torch.randn(6, 3)

    def forward(params, x):
        return bf.vmap_call(net, params, x, fallback=False)

    compiled = torch.compile(forward)
    params = bf.sample(q, 4, generator=gen(0))

    y = compiled(params, x)
    assert torch.allclose(y, forward(params, x), atol=1e-10)
    assert torch.allclose(y, bf.loop_call(net, params, x), atol=1e-10)
    assert not torch.allclose(y[0], net(x))  # the sampled parameters were used

    params = bf.sample(q, 4, generator=gen(1))  # no recompile needed
    assert torch.allclose(compiled(params, x), bf.loop_call(net, params, x), atol=1e-10)


def test_compiled_training_step(gen):
    net = zuko.nn.MLP(3, 2, hidden_features=(8,))
    q = bf.init(net, init_logvar=-3.0)
    leaves = [*q.mean.values(), *q.logvar.values()]
    x, y = torch.randn(6, 3), torch.randn(6, 2)

    def step(x, y, seed):
        g = gen(seed)
        return bf.nelbo(net, q, x, y, fn=mse, num_data=100, n=4, generator=g)

    def oracle(x, y, seed):
        g = gen(seed)
        return bf.loop_nelbo(net, q, x, y, fn=mse, num_data=100, n=4, generator=g)

    compiled = torch.compile(step)
    for seed in (0, 1):
        loss = compiled(x, y, seed)
        g = torch.autograd.grad(loss, leaves)
        expected = oracle(x, y, seed)
        h = torch.autograd.grad(expected, leaves)
        assert torch.allclose(loss, expected, atol=1e-10)
        assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g, h, strict=True))

    # a whole optimizer step around the compiled objective
    optimizer = torch.optim.Adam(leaves, lr=1e-2)
    before = [t.detach().clone() for t in leaves]
    loss = compiled(x, y, 2)
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, leaves, strict=True))


def test_compiled_fullgraph_with_one_recompile():
    from torch._dynamo.utils import counters

    counters.clear()
    net = zuko.nn.MLP(5, 5, hidden_features=(16, 16))
    q = bf.init(net, -4.0)
    x = torch.randn(8, 5)

    @torch.compile(fullgraph=True)
    def f(params, x):
        return bf.vmap_call(net, params, x)

    for k in (4, 8, 16, 32):
        params = {name: v.detach() for name, v in bf.sample(q, k).items()}
        assert torch.allclose(f(params, x), bf.loop_call(net, params, x), atol=1e-10)

    assert counters["stats"]["unique_graphs"] <= 2  # K = 4, then one dynamic graph


def test_compiled_calls_guard_on_no_weak_cache_of_structures():
    # dynamo guarded on the keys of a weak dictionary keyed by modules' structures, which
    # any garbage collection changes: in a full test run, a compilation failed at random
    # ("Error while creating guard ... IndexError: list index out of range").
    net = zuko.nn.MLP(5, 5, hidden_features=(16, 16))
    q = bf.init(net, -4.0)
    x = torch.randn(8, 5)
    params = {name: v.detach() for name, v in bf.sample(q, 4).items()}
    bf.vmap_call(net, params, x)  # fills the caches, as earlier calls do
    out = torch._dynamo.explain(lambda p, x: bf.vmap_call(net, p, x))(params, x)
    names = [g.name for g in out.out_guards]
    assert names and not [n for n in names if "_RECURRENT" in n]


def test_compiled_fullgraph_on_a_module_with_buffers():
    # The check that an ensemble's stacked parameters come with their buffers looked up a
    # weak dictionary, which dynamo cannot trace: every module with buffers failed fullgraph.
    nn = torch.nn
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    q = bf.init(net, -4.0)
    x = torch.randn(6, 5)
    params = {name: v.detach() for name, v in bf.sample(q, 4).items()}
    out = torch.compile(lambda p, x: bf.vmap_call(net, p, x), fullgraph=True)(params, x)
    assert torch.allclose(out, bf.loop_call(net, params, x), atol=1e-10)
    assert not torch.allclose(out[0], out[1])


@pytest.mark.filterwarnings("ignore::bayesflow.VmapFallbackWarning")  # vmap cannot trace UNAF
@pytest.mark.parametrize("n", [1, 2])
def test_compiled_flow_whose_backward_recomputes_gets_zukos_gradients(n, gen):
    # zuko's quadrature recomputes the flow in its backward, after the call has put the
    # module's own parameters back; traced, no stand-in was installed, and in eval mode the
    # gradients were silently those of other weights (off by 12.5).
    import copy

    flow = zuko.flows.UNAF(2, 1, transforms=1, signal=2, network={"hidden_features": (4,)})
    flow.eval()
    q = bf.init(flow, init_logvar=-4.0)
    c, x = torch.randn(3, 1), torch.randn(3, 2)
    params = {k: v.detach().requires_grad_() for k, v in bf.sample(q, n, generator=gen(1)).items()}

    def log_prob(params, c, x):
        return bf.vmap_call(flow, params, c, x, fn=lambda f, c, x: f(c).log_prob(x))

    y = torch.compile(log_prob, backend="eager")(params, c, x)
    grads = torch.autograd.grad(y.sum(), list(params.values()))
    for i in range(n):
        clone = copy.deepcopy(flow).train()  # zuko differentiates its parameters in train mode
        with torch.no_grad():
            for name, p in clone.named_parameters():
                p.copy_(params[name][i])
        expected = torch.autograd.grad(clone(c).log_prob(x).sum(), list(clone.parameters()))
        for g, e in zip(grads, expected, strict=True):
            assert torch.allclose(g[i], e, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(y[0], flow(c).log_prob(x), atol=1e-3)  # the samples were used


class _TiesOnAFlag(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 4)
        self.tie = False

    def forward(self, x):
        h = self.head(torch.tanh(self.body(x)))
        if self.tie:  # the head's weight read outside its call
            h = h + torch.nn.functional.linear(h, self.head.weight)
        return h


def test_compiled_local_call_sees_a_read_a_retrace_adds(gen):
    # torch.compile retraces when the flag switches; the layout recorded by the first
    # trace was reused, and the head's second read got the module's own weight (5.5 off).
    torch.manual_seed(0)
    net, x = _TiesOnAFlag(), torch.randn(5, 3)
    q = bf.init(net, init_logvar=-2.0)

    def call(g):
        return bf.local_call(net, q, 1, x, generator=g, vectorized=False)

    compiled = torch.compile(call, backend="eager")  # the layout is chosen while tracing
    compiled(gen(0))
    net.tie = True
    y = compiled(gen(1))
    # and no recompile per call (the shape-finding pass guarded on each call's tensors),
    # once the caches the first traces fill are full
    compiled(gen(2)), compiled(gen(2))
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.allclose(compiled(gen(1)), y, atol=1e-10)
    bf.clear_caches()
    assert torch.allclose(y, call(gen(1)), atol=1e-10)
    assert not torch.allclose(y, bf.local_call(net, q, 1, x, generator=gen(2)))  # noise used


def test_compiled_vectorized_local_call(gen):
    # The noise tape (Flipout's too) kept the last sample's slab, a vmap tensor, after the
    # pass: compiling a vectorized local call raised "Cannot access storage of
    # BatchedTensorImpl".
    torch.manual_seed(0)
    net, x = zuko.nn.MLP(3, 2, hidden_features=(8,)), torch.randn(6, 3)
    q = bf.init(net, init_logvar=-3.0)

    def call(g):
        return bf.local_call(net, q, 4, x, generator=g)

    y = torch.compile(call, backend="aot_eager")(gen(1))
    assert torch.allclose(y, call(gen(1)), atol=1e-10)
    loop = bf.local_call(net, q, 4, x, generator=gen(1), vectorized=False)
    assert torch.allclose(y, loop, atol=1e-10)
    assert not torch.allclose(y[0], y[1])  # the samples were used


class _Counted(torch.nn.Module):
    r"""A step counter written in place, which scales the output."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count += 1
        return self.layer(x) * self.count


@pytest.mark.parametrize("where", ["root", "submodule"])
def test_a_compiled_chunked_call_writes_a_buffer_once(where, gen):
    # Compiled, the chunks of a call read the in-place writes of the chunks before them:
    # samples 2 and 3 were scaled by 2, and the counter ended at 2 (an eager call sees the
    # write and runs the loop; a trace reads no version counter).
    x = torch.randn(5, 3)
    outs, counts = [], []
    for compiled in (False, True):
        torch.manual_seed(0)
        net = _Counted()
        if where == "submodule":  # the root in evaluation mode, the counter's owner not
            net = torch.nn.Sequential(net).eval()
            net[0].train()
        params = bf.sample(bf.init(net, init_logvar=-2.0), 4, generator=gen(1))
        f = lambda p, x, net=net: bf.vmap_call(net, p, x, chunk_size=2)
        if compiled:
            with torch.no_grad():
                outs.append(torch.compile(f, backend="eager")(params, x))
        else:
            with torch.no_grad(), pytest.warns(bf.VmapFallbackWarning, match="once per chunk"):
                outs.append(f(params, x))
        counts.append((net if where == "root" else net[0]).count.item())
    assert counts == [1.0, 1.0]
    assert torch.allclose(outs[1], outs[0], rtol=1e-12)
    assert not torch.allclose(outs[0][0], outs[0][1])  # the samples were used


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_sampling_from_the_global_generator_as_the_number_of_samples_changes(backend):
    # An explicit generator=None made torch.randn fail once K was dynamic (a
    # TorchRuntimeError at the third K), where "changing K recompiles once".
    net = torch.nn.Linear(3, 2)
    q = bf.init(net, -2.0)
    x = torch.randn(4, 3)

    @torch.compile(backend=backend)
    def f(x, k):
        params = bf.sample(q, k)
        return bf.vmap_call(net, params, x), params

    for k in (2, 3, 4):
        out, params = f(x, k)
        assert out.shape == (k, 4, 2)
        expected = bf.loop_call(net, {n: v.detach() for n, v in params.items()}, x)
        assert torch.allclose(out, expected, rtol=1e-12, atol=1e-14)
        assert not torch.allclose(out[0], out[1])
