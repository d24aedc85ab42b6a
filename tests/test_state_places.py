r"""The places a call swaps and puts back: buffers registered as None or added by forward,
tied buffers reassigned through their second holder, a tensor both a parameter and a
buffer, and parameters also held in plain lists and dicts. Each call is checked against
deep copies of the module with one sample loaded (or the loop), and the module after it."""

import copy

import pytest
import torch
import torch.nn as nn

from torch._C._functorch import is_batchedtensor
from torch.nn.utils import parametrizations

import bayesflow as bf

K = 3


def _samples(module, n=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        name: p.detach() + 0.5 * torch.randn(n, *p.shape, dtype=p.dtype, generator=g)
        for name, p in module.named_parameters()
    }


def _load(module, params, k):
    r"""A deep copy of `module` with sample `k` copied into its parameters."""

    c = copy.deepcopy(module)
    own = dict(c.named_parameters())
    with torch.no_grad():
        for name, v in params.items():
            own[name].copy_(v[k])
    return c


def _oracle(module, params, x, n=K):
    r"""Outputs and deep copies after forward, one per sample."""

    copies = [_load(module, params, k) for k in range(n)]
    return torch.stack([c(x) for c in copies]), copies


def _snapshot(module):
    return {
        "params": [(k, p, p.detach().clone()) for k, p in module.named_parameters()],
        "tables": [
            (m, dict(m._parameters), dict(m._buffers), set(m._non_persistent_buffers_set))
            for m in module.modules()
        ],
        "values": {k: b.detach().clone() for k, b in module.named_buffers()},
    }


def _params_intact(module, snap):
    now = dict(module.named_parameters())
    for k, p, v in snap["params"]:
        assert now[k] is p and torch.equal(p.detach(), v), k


def _as_found(module, snap):
    r"""The module as `snap` found it: tensors by identity and value, table keys."""

    _params_intact(module, snap)
    for m, params, buffers, nonpersistent in snap["tables"]:
        assert m._parameters.keys() == params.keys()
        assert all(m._parameters[k] is v for k, v in params.items())
        assert m._buffers.keys() == buffers.keys()
        assert all(m._buffers[k] is v for k, v in buffers.items())
        assert m._non_persistent_buffers_set == nonpersistent
    for k, b in module.named_buffers():
        assert torch.equal(b, snap["values"][k]), k
    _usable(module)


def _usable(module):
    r"""No vmap wrapper left in the module: it copies, saves and computes."""

    for t in (*module.parameters(), *module.buffers()):
        assert not is_batchedtensor(t)
    copy.deepcopy(module)
    for t in module.state_dict().values():
        t.sum()


CALLS = {
    "vmap": lambda m, p, x: bf.vmap_call(m, p, x),
    "vmap-chunked": lambda m, p, x: bf.vmap_call(m, p, x, chunk_size=2),
    "loop": lambda m, p, x: bf.loop_call(m, p, x),
}


def _call(name, m, p, x):
    if name.startswith("vmap"):
        with pytest.warns(bf.VmapFallbackWarning, match="buffers"):
            return CALLS[name](m, p, x)
    return CALLS[name](m, p, x)


# 1. A buffer registered as None, filled by forward.


class Cache(nn.Module):
    r"""A lazily filled cache: a buffer registered as None, set by the first forward."""

    def __init__(self, other_buffer=False):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.register_buffer("h", None)
        if other_buffer:
            self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.fail = False

    def forward(self, x):
        if self.h is None:
            self.h = self.lin.weight.detach() * 2
        if self.fail:
            raise ValueError("boom")
        return self.lin(x) + x @ self.h.T


@pytest.mark.parametrize("call", CALLS)
def test_none_buffer_filled_by_forward(call):
    m, x = Cache(), torch.randn(5, 3, dtype=torch.float64)
    p = _samples(m)
    snap = _snapshot(m)
    expected, copies = _oracle(m, p, x)
    assert not torch.allclose(expected[0], expected[1])  # the samples matter

    y = _call(call, m, p, x)

    # Every sample starts from the state the call found (no cache), and the buffer ends at
    # the average of what the samples left: a real tensor, not vmap's wrapper.
    torch.testing.assert_close(y, expected)
    _params_intact(m, snap)
    _usable(m)
    assert type(m._buffers["h"]) is torch.Tensor and not m.h.requires_grad
    torch.testing.assert_close(m.h, torch.stack([c.h for c in copies]).mean(0))
    assert "h" in m.state_dict()


def test_none_buffer_filled_by_forward_at_one_sample():
    m, x = Cache(), torch.randn(5, 3, dtype=torch.float64)
    p = _samples(m, 1)
    expected, copies = _oracle(m, p, x, 1)
    looped = copy.deepcopy(m)
    y = bf.vmap_call(m, p, x)
    torch.testing.assert_close(y, expected)
    _usable(m)
    torch.testing.assert_close(m.h, copies[0].h)
    # The loop agrees with the plain call.
    torch.testing.assert_close(bf.loop_call(looped, p, x), expected)
    torch.testing.assert_close(looped.h, copies[0].h)


# Calls in which fn raises: vmap's error (fallback=False), fn's own from the fallback loop,
# from the loop, and from the plain call of one sample.
FAILING = {
    "vmap": lambda m, p, x: bf.vmap_call(m, p, x, fallback=False),
    "vmap-fallback": lambda m, p, x: bf.vmap_call(m, p, x),
    "loop": lambda m, p, x: bf.loop_call(m, p, x),
    "one": lambda m, p, x: bf.vmap_call(m, {k: v[:1] for k, v in p.items()}, x),
}


@pytest.mark.parametrize("call", FAILING)
def test_failed_call_leaves_a_none_buffer_none(call):
    m, x = Cache(other_buffer=True), torch.randn(5, 3, dtype=torch.float64)
    m.fail = True
    p = _samples(m)
    snap = _snapshot(m)
    with pytest.raises((ValueError, RuntimeError)):
        FAILING[call](m, p, x)
    _as_found(m, snap)
    assert m._buffers["h"] is None


def test_failed_call_at_one_sample_leaves_a_none_buffer_none_without_other_buffers():
    m, x = Cache(), torch.randn(5, 3, dtype=torch.float64)
    m.fail = True
    p = _samples(m, 1)
    with pytest.raises(ValueError):
        bf.vmap_call(m, p, x)
    assert m._buffers["h"] is None


class Registers(nn.Module):
    r"""Registers a buffer in its forward, from the weight it sees."""

    def __init__(self, persistent=True, fail=False):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.register_buffer("seen", torch.zeros(2, dtype=torch.float64))
        self.persistent, self.fail = persistent, fail

    def forward(self, x):
        if "scale" not in self._buffers:
            scale = self.lin.weight.detach().abs().mean()
            self.register_buffer("scale", scale, persistent=self.persistent)
        if self.fail:
            raise ValueError("boom")
        return self.lin(x) * self.scale


@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("call", CALLS)
def test_buffer_registered_in_forward(call, persistent):
    m, x = Registers(persistent), torch.randn(5, 3, dtype=torch.float64)
    p = _samples(m)
    snap = _snapshot(m)
    expected, copies = _oracle(m, p, x)
    assert not torch.allclose(expected[0], expected[1])

    y = _call(call, m, p, x)

    torch.testing.assert_close(y, expected)
    _params_intact(m, snap)
    _usable(m)
    torch.testing.assert_close(m.scale, torch.stack([c.scale for c in copies]).mean(0))
    assert ("scale" in m.state_dict()) == persistent
    assert ("scale" in m._non_persistent_buffers_set) == (not persistent)


@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("call", FAILING)
def test_failed_call_removes_a_buffer_registered_in_forward(call, persistent):
    m, x = Registers(persistent, fail=True), torch.randn(5, 3, dtype=torch.float64)
    p = _samples(m)
    snap = _snapshot(m)
    with pytest.raises((ValueError, RuntimeError)):
        FAILING[call](m, p, x)
    _as_found(m, snap)
    assert "scale" not in m._buffers


# 2. A tied buffer reassigned through its second holder.


class TiedBuffer(nn.Module):
    def __init__(self, fail=False, both=False):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 2).double(), nn.Linear(2, 2).double()
        pe = torch.zeros(2, dtype=torch.float64)
        self.l1.register_buffer("pe", pe)
        self.l2.register_buffer("pe", pe)
        self.fail, self.both = fail, both

    def forward(self, x):
        h = self.l1(x)
        new = 0.9 * self.l2.pe + 0.1 * h.mean(0).detach()
        if self.both:
            self.l1.pe = self.l2.pe = new
        else:
            self.l2.pe = new
        if self.fail:
            raise ValueError("boom")
        return self.l2(h) + self.l2.pe + self.l1.pe


TIED_CALLS = {**CALLS, "one": None, "loop-one": None}


@pytest.mark.parametrize("both", [False, True], ids=["second", "both"])
@pytest.mark.parametrize("call", TIED_CALLS)
def test_tied_buffer_reassigned_through_a_holder(call, both):
    m, x = TiedBuffer(both=both), torch.randn(5, 3, dtype=torch.float64)
    n = 1 if call in ("one", "loop-one") else K
    p = _samples(m, n)
    pe = m.l1.pe
    snap = _snapshot(m)
    expected, copies = _oracle(m, p, x, n)
    if n > 1:
        assert not torch.allclose(expected[0], expected[1])

    if call == "one":
        y = bf.vmap_call(m, p, x)
    elif call == "loop-one":
        y = bf.loop_call(m, p, x)
    else:
        y = _call(call, m, p, x)

    torch.testing.assert_close(y, expected)
    _params_intact(m, snap)
    _usable(m)
    # Each holder ends as in the copies, averaged over the samples: the one forward left
    # alone keeps the very tensor it held (unchanged); the tie holds where both moved.
    for holder in ("l1", "l2"):
        want = torch.stack([getattr(c, holder).pe for c in copies]).mean(0)
        torch.testing.assert_close(getattr(m, holder).pe, want)
    assert m.l1.pe is pe
    assert (m.l2.pe is pe) == both
    if not both:
        assert torch.equal(pe, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("call", FAILING)
def test_failed_call_puts_a_tied_buffer_back(call):
    m, x = TiedBuffer(fail=True), torch.randn(5, 3, dtype=torch.float64)
    p = _samples(m)
    snap = _snapshot(m)
    with pytest.raises((ValueError, RuntimeError)):
        FAILING[call](m, p, x)
    _as_found(m, snap)
    assert m.l1.pe is m.l2.pe


# 3. A tensor that is a parameter of one module and a buffer of another.


class ParamBuffer(nn.Module):
    def __init__(self, buffer_first=False):
        super().__init__()
        if buffer_first:
            self.aux = nn.Module()
        self.lin = nn.Linear(3, 2).double()
        if not buffer_first:
            self.aux = nn.Module()
        self.aux.register_buffer("w", self.lin.weight)

    def forward(self, x):
        return self.lin(x) + x @ self.aux.w.T


@pytest.mark.parametrize("buffer_first", [False, True])
@pytest.mark.parametrize("call", {**CALLS, "one": None})
def test_parameter_also_a_buffer(call, buffer_first):
    m, x = ParamBuffer(buffer_first), torch.randn(5, 3, dtype=torch.float64)
    n = 1 if call == "one" else K
    p = _samples(m, n)
    assert set(p) == {"lin.weight", "lin.bias"}
    snap = _snapshot(m)
    expected, _ = _oracle(m, p, x, n)
    if n > 1:
        assert not torch.allclose(expected[0], expected[1])

    if call == "one":
        y = bf.vmap_call(m, p, x)
    else:
        y = CALLS[call](m, p, x)

    # Both places get the sample.
    torch.testing.assert_close(y, expected)
    _as_found(m, snap)
    assert m.aux._buffers["w"] is m.lin.weight


# 4. A parameter also held in a plain list or dict attribute.


class Heads(nn.Module):
    def __init__(self, kind="list"):
        super().__init__()
        self.a = nn.Linear(3, 2, bias=False).double()
        self.b = nn.Linear(3, 2, bias=False).double()
        self.kind = kind
        if kind == "list":
            self.weights = [self.a.weight, self.b.weight]
        elif kind == "dict":
            self.weights = {"a": self.a.weight, "b": self.b.weight}
        elif kind == "tuple":
            self.weights = (self.a.weight, self.b.weight)
        elif kind == "nested":
            self.weights = [[self.a.weight, self.b.weight]]

    def forward(self, x):
        if self.kind == "dict":
            weights = self.weights.values()
        elif self.kind == "nested":
            weights = self.weights[0]
        else:
            weights = self.weights
        return sum(x @ w.T for w in weights)


ALIAS_CALLS = {
    **CALLS,
    "vmap-strict": lambda m, p, x: bf.vmap_call(m, p, x, fallback=False),
    "one": lambda m, p, x: bf.vmap_call(m, {k: v[:1] for k, v in p.items()}, x),
}


@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("call", ALIAS_CALLS)
def test_parameter_also_in_a_list_or_dict(call, kind):
    m, x = Heads(kind), torch.randn(4, 3, dtype=torch.float64)
    p = _samples(m)
    n = 1 if call == "one" else K
    snap = _snapshot(m)
    held = list(m.weights.values() if kind == "dict" else m.weights)
    expected, _ = _oracle(m, p, x, n)
    assert not torch.allclose(expected[0], m(x))

    y = ALIAS_CALLS[call](m, p, x)

    torch.testing.assert_close(y, expected)
    if n > 1:
        assert not torch.allclose(y[0], y[1])
    _as_found(m, snap)
    now = list(m.weights.values() if kind == "dict" else m.weights)
    assert len(now) == len(held) and all(a is b for a, b in zip(now, held, strict=True))


def test_parameter_in_a_list_replaced_after_a_call():
    m, x = Heads("list"), torch.randn(4, 3, dtype=torch.float64)
    p = _samples(m)
    bf.vmap_call(m, p, x)
    # The list is replaced (the structure seen before is stale): the new one gets the sample.
    m.weights = [m.b.weight]
    expected, _ = _oracle(m, p, x)
    torch.testing.assert_close(bf.vmap_call(m, p, x), expected)
    assert m.weights[0] is m.b.weight


def test_parameter_in_a_list_inside_a_reparameterize_block():
    m, x = Heads("list"), torch.randn(4, 3, dtype=torch.float64)
    held = list(m.weights)
    plain = m(x)
    model = bf.BayesianModel(m, init_logvar=0.0)
    with model.reparameterize(generator=torch.Generator().manual_seed(0)) as net:
        assert net.weights[0] is net.a.weight and net.weights[1] is net.b.weight
        y = net(x)
        torch.testing.assert_close(y, x @ (net.a.weight + net.b.weight).T)
    assert not torch.allclose(y, plain)
    assert all(a is b for a, b in zip(m.weights, held, strict=True))
    assert m.weights[0] is m.a.weight


@pytest.mark.parametrize("kind", ["tuple", "nested"])
@pytest.mark.parametrize("call", ["vmap", "loop"])
def test_parameter_in_an_unswappable_place_warns(call, kind):
    m, x = Heads(kind), torch.randn(4, 3, dtype=torch.float64)
    p = _samples(m)
    snap = _snapshot(m)
    with pytest.warns(UserWarning, match=r"weights.*a\.weight|a\.weight.*weights"):
        CALLS[call](m, p, x)
    _as_found(m, snap)


def test_unswappable_place_of_a_parameter_not_sampled_does_not_warn():
    m, x = Heads("tuple"), torch.randn(4, 3, dtype=torch.float64)
    m.c = nn.Linear(3, 2).double()
    p = {k: v for k, v in _samples(m).items() if k.startswith("c.")}
    bf.vmap_call(m, p, x)  # filterwarnings = error: no warning


@pytest.mark.parametrize("call", ["vmap", "loop", "one"])
def test_recurrent_layers_cached_weights_need_no_warning(call):
    lstm = nn.LSTM(3, 4, batch_first=True).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    p = _samples(lstm, 1 if call == "one" else K)
    fn = lambda m, x: m(x)[0]
    flat = list(lstm._flat_weights)
    expected = torch.stack(
        [fn(_load(lstm, p, k), x) for k in range(next(iter(p.values())).shape[0])]
    )
    if call == "loop":
        y = bf.loop_call(lstm, p, x, fn=fn)
    else:
        y = bf.vmap_call(lstm, p, x, fn=fn)
    torch.testing.assert_close(y, expected)
    assert all(a is b for a, b in zip(lstm._flat_weights, flat, strict=True))


class AliasedStats(nn.Module):
    r"""A running statistic also held in a dict, and updated in place through it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.register_buffer("running", torch.zeros(2, dtype=torch.float64))
        self.stats = {"running": self.running}

    def forward(self, x):
        h = self.lin(x)
        self.stats["running"].mul_(0.9).add_(0.1 * h.mean(0).detach())
        return h + self.stats["running"]


@pytest.mark.parametrize("call", ["vmap", "loop"])
def test_buffer_also_in_a_dict_updated_through_it(call):
    m, x = AliasedStats(), torch.randn(5, 3, dtype=torch.float64)
    p = _samples(m)
    running = m.running
    expected, copies = _oracle(m, p, x)
    assert not torch.allclose(expected[0], expected[1])
    if call == "vmap":
        with pytest.warns(bf.VmapFallbackWarning):
            y = bf.vmap_call(m, p, x)
    else:
        y = bf.loop_call(m, p, x)
    # Every sample starts from the statistic the call found, which ends at their average.
    torch.testing.assert_close(y, expected)
    assert m.running is running and m.stats["running"] is running
    torch.testing.assert_close(m.running, torch.stack([c.running for c in copies]).mean(0))
    _usable(m)


class Queue(nn.Module):
    r"""Takes the weight it uses from a plain list that forward consumes (a queue)."""

    def __init__(self, move):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.move = move
        self.todo = [self.lin.weight]

    def forward(self, x):
        if self.move == "pop":
            w = self.todo.pop() if self.todo else self.lin.weight
        else:  # items put before it: it moves to another index
            self.todo.insert(0, torch.zeros(2, 3, dtype=torch.float64))
            w = self.todo[-1]
        return x @ w.T


@pytest.mark.parametrize("move", ["pop", "insert"])
@pytest.mark.parametrize("call", ["vmap", "one"])
def test_a_list_that_forward_changes_gets_its_items_back_where_they_are(call, move):
    # The list's places were put back by index: a popped list raised IndexError and left
    # the sample (vmap's batched tensor) in the module's table, which could not be copied;
    # items moved by an insert got the original at the old index, the sample stayed.
    m, x = Queue(move), torch.randn(4, 3, dtype=torch.float64)
    n = 1 if call == "one" else K
    p = _samples(m, n)
    want, copies = _oracle(m, p, x, n)
    mean = copy.deepcopy(m)(x)
    out = bf.vmap_call(m, p, x)
    torch.testing.assert_close(out, want)
    assert not torch.allclose(want[0], mean)
    assert type(m.lin._parameters["weight"]) is nn.Parameter
    kept = [t for t in m.todo if t.shape == (2, 3) and not torch.equal(t, torch.zeros(2, 3))]
    assert all(t is m.lin.weight for t in kept)  # no sample left in the list
    assert len(m.todo) == len(copies[0].todo)
    _usable(m)


class ViewAttr(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.w_t = self.lin.weight.T  # a view: no sample can be put there

    def forward(self, x):
        return x @ self.w_t


@pytest.mark.parametrize("call", ["vmap", "loop"])
def test_a_view_of_a_sampled_parameter_held_as_an_attribute_warns(call):
    m, x = ViewAttr(), torch.randn(4, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"'lin\.weight' in w_t \(a view\)"):
        CALLS[call](m, _samples(m), x)


class LateList(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2).double()

    def forward(self, x):
        return x @ self.ws[0].T if hasattr(self, "ws") else self.a(x)


def test_a_list_attribute_set_after_a_call_gets_the_sample():
    # The structure, cached at the first call, did not know the list set afterwards: every
    # sample gave the mean model's output.
    m, x = LateList(), torch.randn(4, 3, dtype=torch.float64)
    p = _samples(m)
    bf.vmap_call(m, p, x)
    m.ws = [m.a.weight]
    want, _ = _oracle(m, p, x)
    torch.testing.assert_close(bf.vmap_call(m, p, x), want)
    assert not torch.allclose(want[0], want[1])


class FillsWithAParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.register_buffer("h", None)

    def forward(self, x):
        if self.h is None:
            self.h = nn.Parameter(torch.ones(2, dtype=torch.float64))
        return self.lin(x) + self.h


@pytest.mark.parametrize("call", ["vmap", "loop"])
def test_a_none_buffer_replaced_by_a_parameter_is_a_parameter_only(call):
    # The emptied place was put back (None) where fn had removed it: `h` in both tables.
    m, x = FillsWithAParameter(), torch.randn(4, 3, dtype=torch.float64)
    plain = copy.deepcopy(m)
    plain(x)
    CALLS[call](m, _samples(m), x)
    assert m._parameters.keys() == plain._parameters.keys()
    assert m._buffers.keys() == plain._buffers.keys()
    _usable(m)


@pytest.mark.parametrize("call", ["loop", "vmap-chunked"])
def test_a_list_that_forward_changes_in_every_sample_gets_its_items_back(call):
    # A sample per forward, one after another (the loop, chunks of one): the places of a
    # list whose items forward moved were put back by their old index, and the next sample
    # got the place of another item: samples left in the list (vmap's batched tensors),
    # wrong outputs.
    m, x = Queue("insert"), torch.randn(4, 3, dtype=torch.float64)
    p = _samples(m)
    want = torch.stack([_load(m, p, k)(x) for k in range(K)])
    out = bf.loop_call(m, p, x) if call == "loop" else bf.vmap_call(m, p, x, chunk_size=1)
    torch.testing.assert_close(out, want)
    assert not torch.allclose(want[0], want[1])
    kept = [t for t in m.todo if t.abs().sum() > 0]  # zeros, then W
    assert len(kept) == 1 and kept[0] is m.lin.weight and m.todo[-1] is m.lin.weight
    _usable(m)


class Reverses(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2, bias=False).double()
        self.b = nn.Linear(3, 2, bias=False).double()
        self.ws = [self.a.weight, self.b.weight]

    def forward(self, x):
        self.ws.reverse()
        return x @ (self.ws[0] + 2 * self.ws[1]).T


@pytest.mark.parametrize("order", ["in", "out"])
def test_blocks_left_out_of_order_put_moved_list_items_back_by_identity(order):
    # Two blocks on one module, the list's items moved in between: leaving them out of
    # order paired the places by index, and each parameter went back into the other's.
    m, x = Reverses(), torch.randn(4, 3, dtype=torch.float64)
    a, b = m.a.weight, m.b.weight
    first = bf.BayesianModel(m, init_logvar=0.0).reparameterize(
        generator=torch.Generator().manual_seed(1)
    )
    second = bf.BayesianModel(m, init_logvar=0.0).reparameterize(
        generator=torch.Generator().manual_seed(2)
    )
    first.__enter__()
    m(x)
    second.__enter__()
    m(x)
    blocks = (second, first) if order == "in" else (first, second)
    for block in blocks:
        block.__exit__(None, None, None)
    # Two reversals: the list as it began, the module's own tensors in it.
    assert m.ws[0] is a and m.ws[1] is b
    assert m.a.weight is a and m.b.weight is b
    _usable(m)


class HookedByItself(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.register_forward_hook(self._hook)  # its own bound method: a cycle

    def _hook(self, module, args, out):
        return out

    def forward(self, x):
        return self.lin(x)


def test_a_module_whose_dict_leads_back_to_it_is_freed_after_a_call():
    # The cached structure held the root's `__dict__`, which led back to the module that
    # keys the cache: the module was never freed.
    import gc
    import weakref

    m, x = HookedByItself(), torch.randn(4, 3, dtype=torch.float64)
    bf.vmap_call(m, _samples(m), x)
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


class AliasedAndHookedByItself(HookedByItself):
    r"""Reads its weight through a plain attribute too (a place the samples are put in)."""

    def __init__(self):
        super().__init__()
        vars(self)["w"] = self.lin.weight  # a plain attribute (setattr would register it)

    def forward(self, x):
        return x @ self.w.T + self.lin.bias


def test_a_module_with_an_aliasing_attribute_whose_dict_leads_back_to_it_is_freed():
    # A plain attribute that holds a tensor of the module is a place of it: the cached
    # structure held the module's `__dict__` for it, which led back to the module (a hook
    # that is its own bound method): never freed until clear_caches(). The samples still
    # reach that place (oracle: a deep copy with sample k loaded).
    import gc
    import weakref

    x = torch.randn(4, 3, dtype=torch.float64)
    refs = []
    for _ in range(3):
        m = AliasedAndHookedByItself()
        params = _samples(m)
        out = bf.vmap_call(m, params, x)
        for k in range(out.shape[0]):
            assert torch.allclose(out[k], _load(m, params, k)(x), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(out[0], out[1])
        refs.append(weakref.ref(m))
        del m, out, params
    gc.collect()
    assert all(r() is None for r in refs)


class _Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        vars(self)["w"] = self.lin.weight  # a plain attribute (a place of the weight)

    def forward(self, x):
        return x @ self.w.T + self.lin.bias


class _AliasedEqual(_Aliased):
    r"""Equal to any other of its class (a config-like module), hashable by that."""

    def __eq__(self, other):
        return type(other) is type(self)

    def __hash__(self):
        return hash(type(self))


def test_modules_that_compare_equal_have_plain_attribute_places_of_their_own():
    # The places of plain attributes were looked up by equality: the second of two equal
    # modules put its samples into the first one's attribute (0.68 off a deep copy).
    torch.manual_seed(0)
    first, second = _AliasedEqual(), _AliasedEqual()
    x = torch.randn(4, 3, dtype=torch.float64)
    bf.vmap_call(first, _samples(first), x)
    params = _samples(second, seed=1)
    for call in (bf.vmap_call, bf.loop_call):
        out = call(second, params, x)
        for k in range(out.shape[0]):
            assert torch.allclose(out[k], _load(second, params, k)(x), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(out[0], out[1])
    assert first.w is first.lin.weight and second.w is second.lin.weight


@pytest.mark.parametrize("order", ["in-order", "out-of-order"])
def test_holds_left_in_any_order_put_a_plain_attribute_back(order):
    # Two holds (`reparameterize()`), the structure rebuilt between them: each had a place
    # of its own for the attribute, which the holds pair by identity, so leaving the first
    # one first left the second's sample in `w` for good (the mean model 1.26 off).
    torch.manual_seed(0)
    bnet = bf.BayesianModel(_Aliased(), init_logvar=0.0)
    base, x = bnet.base, torch.randn(4, 3, dtype=torch.float64)
    own, plain = base.lin.weight, base(x)
    first = bnet.reparameterize(generator=torch.Generator().manual_seed(1))
    first.__enter__()
    base.lin.register_buffer("moved", None)  # the module changes: a structure of its own
    second = bnet.reparameterize(generator=torch.Generator().manual_seed(2))
    held = second.__enter__()
    assert not torch.allclose(held(x), plain)  # the samples reach `w`
    for hold in (second, first) if order == "in-order" else (first, second):
        hold.__exit__(None, None, None)
    assert base.w is own and base.lin.weight is own
    assert torch.equal(base(x), plain)


class HookedByItsRoot(nn.Module):
    r"""A submodule's hook that is a method of the root: capturing a feature."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 3).double()
        self.head = nn.Linear(3, 2).double()
        self.feats = None
        self.body.register_forward_hook(self._keep)

    def _keep(self, module, args, out):
        self.feats = out

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def _weight_normed():
    return parametrizations.weight_norm(nn.Linear(3, 2).double())


@pytest.mark.parametrize("make", [HookedByItsRoot, _weight_normed, "bridge"])
def test_a_module_whose_submodules_lead_back_to_it_is_freed_after_a_call(make):
    # The cached structure held the submodules (their hooks), and the class torch makes for
    # a parametrized module (whose properties lead back to it): such modules were freed
    # only by clear_caches(), one more per notebook trial.
    import gc
    import weakref

    x = torch.randn(4, 3, dtype=torch.float64)
    refs = []
    for _ in range(3):
        m = _weight_normed() if make == "bridge" else make()
        if make == "bridge":
            bnet = bf.BayesianModel(m)
            out = bnet(x, n=3)
            with bnet.reparameterize() as held:
                held(x)
            refs.append(weakref.ref(bnet))
            del bnet, held
        else:
            out = bf.vmap_call(m, _samples(m), x)
        assert not torch.allclose(out[0], out[1])
        refs.append(weakref.ref(m))
        del m, out
    gc.collect()
    assert all(r() is None for r in refs)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2, bias=False).double()
        self.ws = [self.a.weight, self.a.weight]  # one tensor in two places of one list

    def forward(self, x):
        return x @ (self.ws[0] + self.ws[1]).T


@pytest.mark.parametrize("order", ["in", "out"])
def test_blocks_left_out_of_order_on_a_list_holding_a_tensor_twice(order):
    m, x = Twice(), torch.randn(4, 3, dtype=torch.float64)
    a = m.a.weight
    blocks = [
        bf.BayesianModel(m, init_logvar=0.0).reparameterize(
            generator=torch.Generator().manual_seed(s)
        )
        for s in (1, 2)
    ]
    outs = []
    for block in blocks:
        block.__enter__()
        outs.append(m(x))
    assert not torch.allclose(outs[0], outs[1])
    for block in reversed(blocks) if order == "in" else blocks:
        block.__exit__(None, None, None)
    assert m.ws[0] is a and m.ws[1] is a and m.a.weight is a
    _usable(m)
