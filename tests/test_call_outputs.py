r"""What a call's outputs and arguments hold afterwards, against the loop (`loop_call`): an
argument every sample shares written in place by `fn`, outputs that share memory with each
other or with tensors held elsewhere, outputs of another structure in a later chunk."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import bayesflow as bf


def _linear(seed=0):
    torch.manual_seed(seed)
    module = nn.Linear(3, 2).double()
    q = bf.init(module, init_logvar=-2.0)
    return module, q


def _writes(m, x):
    x.add_(1.0)  # an augmentation written into the batch
    return m(x)


def _oracle(module, params, x, fn):
    # K deep copies, sample k loaded in the k-th, on the same x one after the other.
    outs = []
    for k in range(next(iter(params.values())).shape[0]):
        copied = copy.deepcopy(module)
        with torch.no_grad():
            for name, p in copied.named_parameters():
                p.copy_(params[name][k])
        outs.append(fn(copied, x))
    return torch.stack(outs)


@pytest.mark.parametrize("chunk_size", [None, 2, "auto"])
@pytest.mark.parametrize("fallback", [True, False])
def test_a_shared_argument_written_in_place_is_refused(chunk_size, fallback):
    # The loop's samples each see the writes of those before them; one vectorized pass
    # wrote once (or once per chunk), silently, and a fallback ran the loop on that write.
    module, q = _linear()
    params = bf.sample(q, 4, generator=torch.Generator().manual_seed(1))
    x0 = torch.randn(5, 3, dtype=torch.float64)
    x = x0.clone()
    ref = bf.loop_call(module, params, x, fn=_writes)
    assert torch.allclose(x, x0 + 4, rtol=0, atol=1e-12)
    assert torch.equal(ref, _oracle(module, params, x0.clone(), _writes))
    assert not torch.allclose(ref[0], ref[1])

    with pytest.raises(ValueError, match=r"vmap_call: .* argument 0 written in place"):
        bf.vmap_call(
            module, params, x0.clone(), fn=_writes, chunk_size=chunk_size, fallback=fallback
        )

    def raises_after_writing(m, x):
        x.add_(1.0)
        raise RuntimeError("vmap cannot run this")  # the fallback would start from x + 1

    x = x0.clone()
    if chunk_size == "auto":  # fn raises in the pass that measures it, on copies
        with pytest.raises(RuntimeError, match="vmap cannot run this"):
            bf.vmap_call(module, params, x, fn=raises_after_writing, chunk_size=chunk_size)
        assert torch.equal(x, x0)
        return
    with pytest.raises(ValueError, match="written in place"):
        bf.vmap_call(module, params, x, fn=raises_after_writing, chunk_size=chunk_size)


def test_a_shared_argument_written_in_place_by_a_local_call_is_refused():
    module, q = _linear()
    x0 = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"local_call: .* argument 0 written in place"):
        bf.local_call(module, q, 3, x0.clone(), fn=_writes)


def test_arguments_written_in_place_where_the_loop_agrees():
    # One sample (one write, as the loop's) and per-sample arguments (each sample writes its
    # own row once, as in the loop) run as before.
    module, q = _linear()
    x0 = torch.randn(5, 3, dtype=torch.float64)
    one = bf.sample(q, 1, generator=torch.Generator().manual_seed(2))
    x, y = x0.clone(), x0.clone()
    assert torch.equal(
        bf.vmap_call(module, one, x, fn=_writes), bf.loop_call(module, one, y, fn=_writes)
    )
    assert torch.equal(x, y) and torch.allclose(x, x0 + 1, rtol=0, atol=1e-12)

    params = bf.sample(q, 3, generator=torch.Generator().manual_seed(2))
    xs0 = torch.randn(3, 5, 3, dtype=torch.float64)
    xs, ys = xs0.clone(), xs0.clone()
    out = bf.vmap_call(module, params, xs, fn=_writes, in_dims=(0,), fallback=False)
    ref = bf.loop_call(module, params, ys, fn=_writes, in_dims=(0,))
    assert torch.allclose(out, ref, rtol=0, atol=1e-12) and torch.equal(xs, ys)
    assert not torch.allclose(ref[0], ref[1])


def test_a_per_sample_argument_expanded_over_the_samples_is_written_by_each_alone():
    # An argument per sample (in_dims=0) expanded from one (stride 0): one memory for all
    # samples, so in the loop (vmap refuses the write and falls back) sample k read the
    # writes of the samples before it: 9.4 off K separate runs. Each gets a copy now.
    # Oracle: K deep copies with sample k loaded, each on its own copy of the input.
    module, q = _linear()
    params = bf.sample(q, 3, generator=torch.Generator().manual_seed(2))
    x0 = torch.randn(1, 5, 3, dtype=torch.float64)
    expected = []
    for k in range(3):
        copy_k = copy.deepcopy(module)
        with torch.no_grad():
            copy_k.weight.copy_(params["weight"][k])
            copy_k.bias.copy_(params["bias"][k])
        expected.append(_writes(copy_k, x0[0].clone()))
    expected = torch.stack(expected)
    for call in (bf.vmap_call, bf.loop_call):
        x = x0.clone().expand(3, 5, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", bf.VmapFallbackWarning)
            out = call(module, params, x, fn=_writes, in_dims=(0,))
        assert torch.allclose(out, expected, rtol=0, atol=1e-12), call.__name__
    assert not torch.allclose(expected[0], expected[1])


@pytest.mark.parametrize("n", [1, 3])
def test_a_first_local_call_writes_an_argument_as_often_as_the_loop(n):
    # The first call's shape-finding pass ran fn on the caller's tensors: one write more.
    module, q = _linear()
    x0 = torch.randn(5, 3, dtype=torch.float64)
    bf.clear_caches()
    x = x0.clone()
    bf.local_call(module, q, 1, x, fn=_writes, vectorized=False)
    assert torch.allclose(x, x0 + 1, rtol=0, atol=1e-12)
    bf.clear_caches()
    x = x0.clone()
    if n == 1:
        bf.local_call(module, q, 1, x, fn=_writes)
    else:
        with pytest.raises(ValueError, match="written in place"):
            bf.local_call(module, q, n, x, fn=_writes)
    assert torch.allclose(
        x, x0 + 1, rtol=0, atol=1e-12
    )  # the vectorized pass's one write, never the shape pass's


@pytest.mark.parametrize("chunk_size", [None, 2, "auto"])
def test_a_first_call_measuring_its_footprint_writes_no_argument(chunk_size):
    # chunk_size="auto" measures the footprint by one pass of fn on the first call, which
    # wrote the caller's argument once more than later calls do.
    module, q = _linear()
    params = bf.sample(q, 4, generator=torch.Generator().manual_seed(1))
    x0 = torch.randn(5, 3, dtype=torch.float64)
    bf.clear_caches()
    moved = []
    for _ in range(2):
        x = x0.clone()
        with pytest.raises(ValueError, match="written in place"):
            bf.vmap_call(module, params, x, fn=_writes, chunk_size=chunk_size)
        moved.append(x - x0)
    assert torch.equal(moved[0], moved[1])
    assert moved[0].min() > 0.5  # written (once per chunk)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_outputs_sharing_memory_are_copies_of_their_own(n, chunk_size):
    # fn returns (y, y, y.T): the loop's outputs are stacked copies; vmap_call's were the
    # same object, and a write to one changed the others and their gradients.
    module, q = _linear()
    q.mean["weight"].requires_grad_()
    x = torch.randn(5, 3, dtype=torch.float64)

    def fn(m, x):
        y = m(x)
        return y, y, y.T

    got = {}
    for call in (bf.loop_call, bf.vmap_call):
        params = bf.sample(q, n, generator=torch.Generator().manual_seed(3))
        kwargs = {} if call is bf.loop_call else {"chunk_size": chunk_size}
        a, b, c = call(module, params, x, fn=fn, **kwargs)
        before = b.detach().clone()
        a.mul_(2.0)
        assert torch.equal(b.detach(), before), call.__name__
        assert torch.equal(c.detach(), before.transpose(-1, -2)), call.__name__
        (grad,) = torch.autograd.grad(b.sum() + 0.5 * c.sum(), q.mean["weight"])
        got[call] = (a.detach(), b.detach(), grad)
    for want, have in zip(got[bf.loop_call], got[bf.vmap_call], strict=True):
        assert torch.allclose(have, want, rtol=0, atol=1e-12)
    if n > 1:
        assert not torch.allclose(got[bf.loop_call][1][0], got[bf.loop_call][1][1])


@pytest.mark.parametrize("call", ["vmap_call", "local_call"])
def test_an_output_held_elsewhere_is_a_copy_at_one_sample(call):
    # At one sample (a plain call), a tensor fn closes over, or a module's plain tensor
    # attribute, came back as a view of itself: a write to the output changed it.
    module, q = _linear()
    module.scale = torch.ones(2, dtype=torch.float64)  # not a registered buffer
    table = torch.zeros(2, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    for fn in (lambda m, x: (m(x), table), lambda m, x: (m(x), m.scale)):
        if call == "vmap_call":
            out = bf.vmap_call(module, bf.sample(q, 1), x, fn=fn)
        else:
            out = bf.local_call(module, q, 1, x, fn=fn)
        out[1].fill_(7.0)
        assert torch.equal(table, torch.zeros(2, dtype=torch.float64))
        assert torch.equal(module.scale, torch.ones(2, dtype=torch.float64))


def _counting(keys):
    calls = [0]

    def fn(m, x):
        calls[0] += 1
        y = m(x)
        return {k: y * len(k) for k in keys(calls[0])}  # by key, whatever the order

    return fn, calls


def test_a_later_chunk_of_another_structure_is_refused():
    # The keys of fn's dict change after its first call: the loop refuses; in chunks of 2,
    # vmap_call gave every sample the last chunk's keys.
    module, q = _linear()
    params = bf.sample(q, 4, generator=torch.Generator().manual_seed(4))
    x = torch.randn(5, 3, dtype=torch.float64)
    fn, calls = _counting(lambda c: ["first"] if c == 1 else ["later"])
    with pytest.raises(ValueError, match="for sample 1"):
        bf.loop_call(module, params, x, fn=fn)
    calls[0] = 0
    with pytest.raises(ValueError, match=r"vmap_call: .*'later'.* later chunk .*'first'"):
        bf.vmap_call(module, params, x, fn=fn, chunk_size=2)


def test_a_later_chunk_with_its_keys_in_another_order_is_taken_by_key():
    # The same keys in another order: the loop stacks them by key, and so do the chunks
    # (their tensors were stacked by position: the first chunk's "a" under "b").
    module, q = _linear()
    params = bf.sample(q, 4, generator=torch.Generator().manual_seed(4))
    x = torch.randn(5, 3, dtype=torch.float64)
    fn, calls = _counting(lambda c: ["a", "bb"] if c == 1 else ["bb", "a"])
    ref = bf.loop_call(module, params, x, fn=fn)
    calls[0] = 0
    out = bf.vmap_call(module, params, x, fn=fn, chunk_size=2, fallback=False)
    assert list(out) == list(ref) == ["a", "bb"]
    for k in ref:
        assert torch.allclose(out[k], ref[k], rtol=0, atol=1e-12), k
    assert not torch.allclose(ref["a"][0], ref["a"][1])


def test_a_buffer_given_as_an_argument_is_the_buffers_rule():
    # A train-mode module's buffer passed as an argument that fn only reads: the call's own
    # write of the averaged statistics bumped its version, and the call was refused.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    params = bf.sample(
        bf.init(net, init_logvar=-2.0), 4, generator=torch.Generator().manual_seed(1)
    )
    x = torch.randn(6, 3, dtype=torch.float64)

    def fn(m, x, mean):
        return m(x - mean.sum())

    a, b = copy.deepcopy(net), copy.deepcopy(net)
    ref = bf.loop_call(a, params, x, a[1].running_mean, fn=fn)
    out = bf.vmap_call(b, params, x, b[1].running_mean, fn=fn)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    assert torch.allclose(a[1].running_mean, b[1].running_mean, rtol=0, atol=1e-12)
    assert not torch.allclose(ref[0], ref[1])


def test_a_tensor_fn_closes_over_written_in_place_is_refused():
    module, q = _linear()
    params = bf.sample(q, 3, generator=torch.Generator().manual_seed(1))
    x = torch.randn(5, 3, dtype=torch.float64)
    shift = torch.zeros(3, dtype=torch.float64)

    def fn(m, x):
        shift.add_(1.0)
        return m(x + shift)

    ref = bf.loop_call(module, params, x, fn=fn)
    assert torch.equal(shift, torch.full((3,), 3.0, dtype=torch.float64))
    assert not torch.allclose(ref[1], ref[2])
    with pytest.raises(ValueError, match=r"the tensor 'shift' that fn closes over written"):
        bf.vmap_call(module, params, x, fn=fn)
    with pytest.raises(ValueError, match=r"local_call: .*'shift' that fn closes over"):
        bf.local_call(module, q, 3, x, fn=fn)


@pytest.mark.parametrize("outer", ["grad", "vmap"])
def test_a_shared_argument_written_under_an_outer_transform_is_refused(outer):
    # Under torch.func.grad or vmap over the data, the argument is the transform's wrapper:
    # its write went unseen (off by 20 against the loop).
    module, q = _linear()
    params = bf.sample(q, 4, generator=torch.Generator().manual_seed(1))
    x0 = torch.randn(5, 3, dtype=torch.float64)

    def total(x):
        return bf.vmap_call(module, params, x * 1.0, fn=_writes).sum()

    with pytest.raises(ValueError, match="written in place"):
        if outer == "grad":
            torch.func.grad(total)(x0)
        else:
            torch.func.vmap(total)(x0[None].expand(2, 5, 3))


@pytest.mark.parametrize("how", ["randomness-error", "chunk-of-one"])
def test_writes_one_sample_at_a_time_are_the_loops(how):
    # One sample vectorized (randomness="error" vectorizes it) writes once, as the loop;
    # chunks of one sample write in the loop's order: neither is refused.
    module, q = _linear()
    x0 = torch.randn(5, 3, dtype=torch.float64)
    n, kwargs = (
        (1, {"randomness": "error"}) if how == "randomness-error" else (3, {"chunk_size": 1})
    )
    params = bf.sample(q, n, generator=torch.Generator().manual_seed(1))
    x, y = x0.clone(), x0.clone()
    out = bf.vmap_call(module, params, x, fn=_writes, **kwargs)
    ref = bf.loop_call(module, params, y, fn=_writes)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12) and torch.equal(x, y)
    if n > 1:
        assert not torch.allclose(ref[0], ref[1])


def test_outputs_sharing_storage_without_a_view_are_copies():
    # (y, y.detach()) share memory without `_base`: a write to one changed the other.
    module, q = _linear()
    params = bf.sample(q, 4, generator=torch.Generator().manual_seed(1))
    x = torch.randn(5, 3, dtype=torch.float64)
    a, b = bf.vmap_call(module, params, x, fn=lambda m, x: (lambda y: (y, y.detach()))(m(x)))
    before = b.clone()
    with torch.no_grad():
        a.add_(100.0)
    assert torch.equal(b, before)


def test_one_sample_vectorized_returns_copies():
    # randomness="error" runs one sample through vmap: an output held elsewhere came back
    # as a view of it.
    module, q = _linear()
    params = bf.sample(q, 1, generator=torch.Generator().manual_seed(1))
    x = torch.randn(5, 3, dtype=torch.float64)
    table = torch.zeros(4, dtype=torch.float64)
    _, out = bf.vmap_call(module, params, x, fn=lambda m, x: (m(x), table), randomness="error")
    out.add_(1.0)
    assert torch.equal(table, torch.zeros(4, dtype=torch.float64))
