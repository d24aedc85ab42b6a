r"""Tests for bayesflow._compat: the private torch APIs bayesflow relies on still behave."""

import pytest
import torch
import torch.nn as nn

import bayesflow._compat as compat


def test_unwrap_batched_reads_through_vmap():
    seen = []

    def f(x):
        seen.append(compat.unwrap_batched(x))
        return x * 2

    torch.func.vmap(torch.func.vmap(f))(torch.arange(6.0).view(2, 3))

    assert torch.equal(seen[0], torch.arange(6.0).view(2, 3))
    assert compat.unwrap_batched(torch.ones(2)).shape == (2,)


def test_a_batching_rule_of_our_own():
    # Unwrap at the current level, compute below it, wrap again: what the stand-ins do.
    w = torch.randn(4, 3, 2, requires_grad=True)
    x = torch.randn(5, 2)
    levels = []

    def f(wk):
        level = compat.batched_at_current_level(wk)
        levels.append((level, compat.batched_at_current_level(x)))
        value, dim = compat.unwrap_at(wk, level)
        with compat.unbatched():
            y = torch.bmm(x.expand(value.shape[0], 5, 2), value.movedim(dim, 0).transpose(1, 2))
        return compat.wrap_at(y, 0, level)

    y = torch.func.vmap(f)(w)

    assert levels[0][0] is not None and levels[0][1] is None
    assert compat.batched_at_current_level(w) is None  # outside vmap
    assert torch.allclose(y, x @ w.transpose(1, 2))
    (g,) = torch.autograd.grad(y.square().sum(), w)
    (g_ref,) = torch.autograd.grad((x @ w.transpose(1, 2)).square().sum(), w)
    assert torch.allclose(g, g_ref)


def test_allocated_bytes_counts_new_storage_only():
    x = torch.zeros(100, dtype=torch.float64)

    assert compat.allocated_bytes(lambda: x.view(10, 10)) == 0  # a view
    assert compat.allocated_bytes(lambda: x.add_(1)) == 0  # in place
    assert compat.allocated_bytes(lambda: x + 1) == 800
    assert compat.allocated_bytes(lambda: (x + 1, x * 2)) == 1600


def test_private_classes():
    assert isinstance(nn.BatchNorm1d(2), compat.BatchNorm)
    assert isinstance(nn.Conv2d(1, 1, 1), compat.ConvNd)
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(2, 2))
    assert isinstance(layer.parametrizations.weight[0], compat.WeightNorm)


class _Scale(torch.autograd.Function):
    # setup_context style, whose apply binds its arguments on every call.
    generate_vmap_rule = True

    @staticmethod
    def forward(x, w):
        return x * w

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum_to_size(w.shape)


def test_function_apply_is_apply_without_the_binding(monkeypatch):
    import inspect

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def loss(apply, x, w):
        return (apply(_Scale, x, w) ** 2).sum()

    public = torch.autograd.grad(loss(lambda f, *a: f.apply(*a), x, w), (x, w))
    with monkeypatch.context() as m:
        m.setattr(inspect, "signature", lambda *a, **k: pytest.fail("bound the arguments"))
        ours = torch.autograd.grad(loss(compat.function_apply, x, w), (x, w))
    assert all(torch.equal(a, b) for a, b in zip(public, ours, strict=True))

    # under torch.func transforms: apply's own path (custom_function_call)
    grads = torch.func.grad(lambda x, w: loss(compat.function_apply, x, w), argnums=(0, 1))
    assert all(
        torch.allclose(a, b) for a, b in zip(public, grads(x.detach(), w.detach()), strict=True)
    )
    rows = torch.func.vmap(lambda r: compat.function_apply(_Scale, r, w.detach()))(x.detach())
    assert torch.equal(rows, x.detach() * w.detach())

    # a tensor left over from a finished transform is unwrapped first, as apply does
    leaked = []
    torch.func.grad(lambda t: leaked.append(t) or (t * 1.0).sum())(torch.ones(4))
    assert compat.is_wrapped(leaked[0])
    out = compat.function_apply(_Scale, leaked[0], w.detach())
    assert not compat.is_wrapped(out) and torch.equal(out, w.detach())
