r"""Every zuko flow on the vectorized path, against the loop oracle and zuko itself."""

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import zuko

from torch.func import functional_call

import bayesflow as bf

from bayesflow import _vmap_safe, _zuko_transforms
from bayesflow.flows import flow_sample

from .registry import FLOWS, FLOWS_ONLY, HIDDEN, INVERTED, NO_LOOP_GRAD, C, F, snapshot, unchanged

B, K = 4, 3


def log_prob(flow, c, x):
    return flow(c).log_prob(x)


def inverse(flow, c, z):
    return flow(c).transform.inv(z)


def tight():
    return 1e-10 if torch.get_default_dtype() == torch.float64 else 1e-4


def setup(name, init_logvar=-6.0):
    flow = FLOWS[name]()
    q = bf.init(flow, init_logvar=init_logvar)
    for t in (*q.mean.values(), *q.logvar.values()):
        t.requires_grad_(True)
    return flow, q


def draw(q, n=K, seed=1):
    return bf.sample(
        q, n, generator=torch.Generator(q.mean[next(iter(q.mean))].device).manual_seed(seed)
    )


def leaves(q):
    return [*q.mean.values(), *q.logvar.values()]


def zuko_grads(flow, params, c, x, i):
    r"""zuko's own gradients for the `i`-th parameter set, loaded into a copy of `flow`."""

    clone = copy.deepcopy(flow)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            p.copy_(params[name][i])

    y = log_prob(clone, c, x)
    return torch.autograd.grad(y.sum(), [p for _, p in clone.named_parameters()])


@pytest.mark.parametrize("name", FLOWS)
def test_log_prob_matches_loop(name):
    flow, q = setup(name)
    c, x = torch.randn(B, C), torch.randn(B, F)
    params = draw(q)

    y = bf.vmap_call(flow, params, c, x, fn=log_prob, fallback=False)
    y_loop = bf.loop_call(flow, params, c, x, fn=log_prob)

    assert y.shape == (K, B)
    assert torch.allclose(y, y_loop, rtol=tight(), atol=tight())
    assert not torch.allclose(y[0], log_prob(flow, c, x), atol=1e-3)  # the samples were used

    if name in NO_LOOP_GRAD:
        # The oracle is zuko itself, one parameter set at a time, w.r.t. the parameters.
        params = {k: v.detach().requires_grad_() for k, v in params.items()}
        y = bf.vmap_call(flow, params, c, x, fn=log_prob, fallback=False)
        grads = torch.autograd.grad(y.sum(), list(params.values()))
        for i in range(K):
            for g, g_zuko in zip(grads, zuko_grads(flow, params, c, x, i), strict=True):
                # CNF: the gradient of the discrete solution vs zuko's adjoint, two
                # approximations of the same gradient, within the solver's accuracy.
                scale = g_zuko.abs().max()
                atol = 5e-2 * scale if name == "CNF" else tight() * (1 + scale)
                assert torch.allclose(g[i], g_zuko, rtol=0, atol=atol)
    else:
        grads = torch.autograd.grad(y.sum(), leaves(q), retain_graph=True)
        grads_loop = torch.autograd.grad(y_loop.sum(), leaves(q))
        for g, g_loop in zip(grads, grads_loop, strict=True):
            assert torch.allclose(g, g_loop, rtol=tight(), atol=tight())


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", sorted(NO_LOOP_GRAD))
def test_loop_and_single_sample_gradients_match_zuko(name, mode):
    # zuko's quadrature and ODE adjoint recompute the flow in their backward pass, which
    # ran after the call had put the module's own parameters back: an error in train mode,
    # and in eval mode (no parameters in their phi) silently wrong gradients.
    flow, q = setup(name)
    getattr(flow, mode)()
    c, x = torch.randn(B, C), torch.randn(B, F)
    for n, call in ((3, bf.loop_call), (1, bf.loop_call), (1, bf.vmap_call)):
        params = {k: v.detach().requires_grad_() for k, v in draw(q, n).items()}
        y = call(flow, params, c, x, fn=log_prob)
        grads = torch.autograd.grad(y.sum(), list(params.values()))
        for i in range(n):
            # zuko differentiates its parameters in train mode only: the oracle's mode
            oracle = zuko_grads(copy.deepcopy(flow).train(), params, c, x, i)
            for g, g_zuko in zip(grads, oracle, strict=True):
                scale = g_zuko.abs().max()
                atol = 5e-2 * scale if name == "CNF" else tight() * (1 + scale)
                assert torch.allclose(g[i], g_zuko, rtol=0, atol=atol)
        assert not torch.allclose(y[0], log_prob(flow, c, x), atol=1e-3)


@pytest.mark.parametrize("name", FLOWS_ONLY)
def test_inverse_matches_loop(name):
    flow, q = setup(name)
    c, z = torch.randn(B, C), torch.randn(B, F)
    params = draw(q)

    x = bf.vmap_call(flow, params, c, z, fn=inverse, fallback=False)
    x_loop = bf.loop_call(flow, params, c, z, fn=inverse)

    atol = 1e-4 if name in INVERTED else tight()
    assert x.shape == (K, B, F)
    assert torch.allclose(x, x_loop, atol=atol)
    assert not torch.allclose(x[0], inverse(flow, c, z), atol=1e-3)


@pytest.mark.parametrize("name", FLOWS)
def test_flow_sample_matches_loop(name, gen):
    flow, q = setup(name)
    c = torch.randn(C)
    params = draw(q)

    def sample(params, vectorized=True):
        return flow_sample(flow, params, c, (5,), generator=gen(2), vectorized=vectorized)

    x = sample(params)
    x_loop = sample(params, vectorized=False)
    mean = {k: v.detach().expand(K, *v.shape) for k, v in q.mean.items()}

    atol = 1e-4 if name in INVERTED else tight()
    assert x.shape == (K, 5, F)
    assert torch.allclose(x, x_loop, atol=atol)
    assert not torch.allclose(x, sample(mean), atol=1e-3)  # the samples were used

    if name in {"NICE", "RealNVP", "MAF", "NSF", "NCSF", "GF", "BPF"}:  # zuko's loop gradients
        grads = torch.autograd.grad(x.sum(), leaves(q), retain_graph=True)
        grads_loop = torch.autograd.grad(x_loop.sum(), leaves(q))
        for g, g_loop in zip(grads, grads_loop, strict=True):
            assert torch.allclose(g, g_loop, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["NAF", "CNF", "GMM"])
def test_flow_sample_without_grad(name, gen):
    flow, q = setup(name)
    c = torch.randn(C)
    params = draw(q)
    gen = gen(5)

    with torch.no_grad():
        x = flow_sample(flow, params, c, (5,), generator=gen)
    x_grad = flow_sample(flow, params, c, (5,), generator=gen.manual_seed(5))

    assert not x.requires_grad
    assert torch.allclose(x, x_grad, atol=tight())


@pytest.mark.parametrize("name", FLOWS_ONLY)
def test_flow_sample_matches_zuko_rsample(name):
    flow, q = setup(name)
    c = torch.randn(B, C)
    params = draw(q, n=1)

    torch.manual_seed(3)
    x = flow_sample(flow, params, c, (2,))
    torch.manual_seed(3)
    x_zuko = bf.loop_call(flow, params, c, fn=lambda f, c: f(c).rsample((2,)))

    assert x.shape == (1, 2, B, F)
    assert torch.allclose(x, x_zuko, atol=tight())


@pytest.mark.parametrize("vectorized", [True, False], ids=["vmap", "loop"])
def test_an_ensemble_of_flows_samples_each_member_with_its_own_buffers(vectorized):
    # flow_sample took no buffers, and refused an ensemble's parameters without them: no
    # ensemble of flows (their bases and masks are buffers) could be sampled. Oracle: each
    # member by itself, zuko's own transform of the same noise.
    make = lambda: zuko.flows.MAF(2, 1, transforms=2, hidden_features=(8,), randperm=True)
    torch.manual_seed(0)
    members = [make() for _ in range(3)]
    ens = bf.stack_modules(members)
    c = torch.randn(4, 1)
    g = torch.Generator().manual_seed(7)
    x = flow_sample(
        ens.module, ens.params, c, (5,), generator=g, buffers=ens.buffers, vectorized=vectorized
    )
    eps = torch.randn(3, 5, 4, 2, generator=torch.Generator().manual_seed(7))
    for k, member in enumerate(members):
        d = member(c)
        expected = d.transform.inv(d.base.base_dist.loc + d.base.base_dist.scale * eps[k])
        assert torch.allclose(x[k], expected, atol=tight()), k
    assert not torch.allclose(x[0], x[1])
    with pytest.raises(ValueError, match=r"^flow_sample: expected the same number of samples"):
        flow_sample(
            ens.module, ens.params, c, (5,), buffers={k: v[:2] for k, v in ens.buffers.items()}
        )


def test_gmm_sample_moments(gen):
    flow, q = setup("GMM", init_logvar=-2.0)
    c = torch.randn(C)
    params = draw(q, n=2)
    n = 4000

    x = flow_sample(flow, params, c, (n,), generator=gen(4))

    for i in range(2):
        with torch.no_grad():
            d = functional_call(flow, {k: v[i] for k, v in params.items()}, (c,))
        w = torch.softmax(d.logits, dim=-1)
        mean = (w[:, None] * d.base.mean).sum(0)
        second = (
            w[:, None, None]
            * (d.base.covariance_matrix + d.base.mean[:, :, None] * d.base.mean[:, None, :])
        ).sum(0)
        var = torch.diagonal(second) - mean**2
        assert torch.all(abs(x[i].mean(0) - mean) < 5 * (var / n).sqrt())


@pytest.mark.parametrize("name", ["NAF", "GF", "BPF", "SOSPF", "CNF"])
def test_inference_mode_matches_loop(name):
    # the stand-ins differentiate in forward mode: under inference mode they must still
    # give the loop's numbers, never a zero derivative
    flow, q = setup(name)
    c, x = torch.randn(B, C), torch.randn(B, F)
    params = {k: v.detach() for k, v in draw(q).items()}

    with torch.inference_mode():
        lp = bf.vmap_call(flow, params, c, x, fn=log_prob, fallback=False)
    with torch.no_grad():
        expected = bf.loop_call(flow, params, c, x, fn=log_prob)

    assert torch.isfinite(lp).all()
    assert torch.allclose(lp, expected, rtol=tight(), atol=tight())
    assert not torch.allclose(lp[0], log_prob(flow, c, x), atol=1e-3)  # the samples were used


@pytest.mark.parametrize("name", ["NICE", "NAF", "UNAF", "CNF", "GMM"])
def test_chunked_matches_unchunked(name):
    flow, q = setup(name)
    c, x = torch.randn(B, C), torch.randn(B, F)
    params = draw(q, n=5)

    y = bf.vmap_call(flow, params, c, x, fn=log_prob, fallback=False)
    y_chunked = bf.vmap_call(flow, params, c, x, fn=log_prob, chunk_size=2, fallback=False)

    assert torch.allclose(y, y_chunked, rtol=tight(), atol=tight())


CALLS = {"vmap": bf.vmap_call, "loop": bf.loop_call}


@pytest.mark.parametrize("call", CALLS)
def test_second_derivatives_through_the_quadrature_match_finite_differences(call):
    # The bounds of the quadrature (UNAF) got constant gradients, f(b).detach(): the
    # derivative of a score-matching penalty w.r.t. the parameters was off by 2.5 on a
    # scale of 6.3, and the Hessian in x missed f'(b), silently.
    if torch.get_default_dtype() != torch.float64:
        pytest.skip("finite differences need float64")
    call = CALLS[call]
    flow, q = setup("UNAF")
    c, x = torch.randn(B, C), torch.randn(B, F)
    params = {k: v.detach() for k, v in draw(q).items()}
    v = {k: torch.randn_like(p) for k, p in params.items()}
    h = 1e-5

    def score(params, x, create_graph=False):
        x = x.detach().requires_grad_()
        y = call(flow, params, c, x, fn=log_prob)
        return x, torch.autograd.grad(y.sum(), x, create_graph=create_graph)[0]

    def penalty(params, create_graph=False):
        return score(params, x, create_graph)[1].square().sum()

    p = {k: t.clone().requires_grad_() for k, t in params.items()}
    grads = torch.autograd.grad(penalty(p, create_graph=True), list(p.values()))
    d = sum((g * v[k]).sum() for g, k in zip(grads, p, strict=True))
    shifted = [{k: t + s * h * v[k] for k, t in params.items()} for s in (1, -1)]
    d_fd = (penalty(shifted[0]) - penalty(shifted[1])) / (2 * h)

    xv, s = score(params, x, create_graph=True)
    hess = torch.autograd.grad(s.sum(), xv)[0]  # the Hessian in x times ones
    hess_fd = (score(params, x + h)[1] - score(params, x - h)[1]) / (2 * h)

    # The values come from a 32-point quadrature, the gradients of its bounds from the
    # integrand itself (as in zuko): the two agree to about 1e-6, relative.
    assert torch.allclose(d, d_fd, rtol=0, atol=1e-4 * (1 + d_fd.abs()))
    assert torch.allclose(hess, hess_fd, rtol=0, atol=1e-4 * (1 + hess_fd.abs().max()))
    y = call(flow, params, c, x, fn=log_prob)
    assert not torch.allclose(y[0], log_prob(flow, c, x), atol=1e-3)  # the samples were used


@pytest.mark.parametrize("call", CALLS)
def test_second_derivatives_through_the_bisection_raise(call):
    # The implicit gradients of the bisection (the inverse of NAF, UNAF, GF, BPF, SOSPF)
    # are exact to first order only: differentiated again, they gave d2x/dz2 off by 66 on
    # a scale of 86, silently (zuko's own bisection raises). Also where the incoming
    # gradient is a constant, which `once_differentiable` lets pass.
    call = CALLS[call]
    flow, q = setup("NAF")
    c, z = torch.randn(B, C), 0.3 * torch.randn(B, F)
    params = {k: v.detach() for k, v in draw(q).items()}
    match = "bisection: expected derivatives of first order"

    def first_order(create_graph):
        p = {k: t.clone().requires_grad_() for k, t in params.items()}
        zv = z.clone().requires_grad_()
        x = call(flow, p, c, zv, fn=inverse)
        inputs = [zv, *p.values()]
        return x, inputs, torch.autograd.grad(x.sum(), inputs, create_graph=create_graph)

    x, inputs, grads = first_order(create_graph=True)
    _, _, expected = first_order(create_graph=False)

    assert all(torch.equal(g, e) for g, e in zip(grads, expected, strict=True))
    with pytest.raises(RuntimeError, match=match):
        torch.autograd.grad(grads[0].sum(), inputs[0], retain_graph=True)
    with pytest.raises(RuntimeError, match=match):
        torch.autograd.grad(sum(g.sum() for g in grads[1:]), inputs[1:])

    def total(zv):
        return call(flow, params, c, zv, fn=inverse).sum()

    assert torch.equal(torch.func.grad(total)(z), expected[0])
    with pytest.raises(RuntimeError, match=match):
        torch.func.grad(lambda zv: torch.func.grad(total)(zv).sum())(z)
    assert not torch.allclose(x[0], inverse(flow, c, z), atol=1e-3)  # the samples were used


def originals():
    return {
        (piece.module, piece.owner, piece.name): piece.original(piece.target())
        for piece in _vmap_safe._PIECES
    }


def test_patched_only_during_the_call():
    before = originals()
    flow, q = setup("NAF")
    c, x = torch.randn(B, C), torch.randn(B, F)
    seen = []

    def fn(flow, c, x):
        seen.append(originals())
        return log_prob(flow, c, x)

    bf.vmap_call(flow, draw(q), c, x, fn=fn, fallback=False)

    assert all(seen[0][k] is not v for k, v in before.items())  # every piece was swapped
    assert all(originals()[k] is v for k, v in before.items())
    assert (
        zuko.transforms.MonotonicTransform.call_and_ladj
        is before[("zuko.transforms", "MonotonicTransform", "call_and_ladj")]
    )


@pytest.mark.parametrize("fallback", [False, True])
def test_restored_when_the_call_raises(fallback):
    before = originals()
    flow, q = setup("UNAF")
    c, x = torch.randn(B, C), torch.randn(B, F)

    def fn(flow, c, x):
        raise KeyError("broken fn")

    with pytest.raises(RuntimeError if not fallback else KeyError):
        bf.vmap_call(flow, draw(q), c, x, fn=fn, fallback=fallback)

    assert all(originals()[k] is v for k, v in before.items())


def test_nested_and_reentrant():
    before = originals()

    with _vmap_safe.vmap_safe():
        inside = originals()
        with _vmap_safe.vmap_safe():
            pass
        assert originals() == inside

    assert all(originals()[k] is v for k, v in before.items())


def test_fixed_piece_left_alone(monkeypatch):
    def merge(self, x_a, x_b, shape):  # a vmap-safe merge, as a future zuko might have
        return _vmap_safe._safe.coupling_merge(self, x_a, x_b, shape)

    monkeypatch.setattr(zuko.transforms.CouplingTransform, "merge", merge)
    flow, q = setup("RealNVP")
    c, x = torch.randn(B, C), torch.randn(B, F)
    seen = []

    def fn(flow, c, x):
        seen.append(zuko.transforms.CouplingTransform.merge)
        return log_prob(flow, c, x)

    y = bf.vmap_call(flow, draw(q), c, x, fn=fn, fallback=False)

    assert seen[0] is merge
    assert zuko.transforms.CouplingTransform.merge is merge
    assert torch.allclose(y, bf.loop_call(flow, draw(q), c, x, fn=log_prob), atol=tight())


@pytest.mark.parametrize("name", ["UNAF", "NAF"])
def test_a_first_call_under_a_func_transform_keeps_the_stand_ins(name, fresh_caches):
    # The probes of zuko's pieces ran inside the caller's torch.func.grad, where zuko's
    # old-style functions raise: read as "zuko changed", the stand-ins were kept out of
    # every later call, whose loop then ran zuko's backward after the swap (UNAF in eval
    # mode: gradients off by 1.8).
    flow, q = setup(name)
    c, x = torch.randn(B, C), torch.randn(B, F)
    params = {k: v.detach() for k, v in draw(q).items()}

    # first call of the process' caches: under torch.func.grad
    g = torch.func.grad(lambda p: bf.vmap_call(flow, p, c, x, fn=log_prob).sum())(params)
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    expected = torch.autograd.grad(
        bf.vmap_call(flow, p, c, x, fn=log_prob).sum(), list(p.values())
    )
    assert all(
        torch.allclose(g[k], e, rtol=1e-10, atol=1e-12) for k, e in zip(p, expected, strict=True)
    )

    flow.eval()  # where zuko's own backward gave silently wrong gradients
    y = _eval_gradients_match_zuko(flow, params, c, x)
    assert not torch.allclose(y[0], log_prob(flow, c, x), atol=1e-3)


def _eval_gradients_match_zuko(flow, params, c, x):
    r"""The gradients of `vmap_call` on `flow` (in eval mode) against zuko's own backward
    on a train-mode copy per sample; returns the outputs."""

    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    y = bf.vmap_call(flow, p, c, x, fn=log_prob, fallback=False)
    grads = torch.autograd.grad(y.sum(), list(p.values()))
    for i in range(K):
        oracle = zuko_grads(copy.deepcopy(flow).train(), params, c, x, i)
        for g_i, g_zuko in zip(grads, oracle, strict=True):
            assert torch.allclose(g_i[i], g_zuko, rtol=0, atol=tight() * (1 + g_zuko.abs().max()))
    return y


@pytest.mark.parametrize("name", ["NAF"])  # (UNAF's probes take no jvp)
def test_a_first_call_under_forward_mode_keeps_the_stand_ins(name, fresh_caches):
    # The same with a level of forward-mode AD open (no dual tensor needed; gradcheck's
    # check_forward_ad opens one): the probes' jvp cannot run there, the "no" was kept,
    # and every later call ran zuko's backward after the swap (eval: 6 of 10 gradients
    # None, the others off by 10%; train: autograd's "appears to not have been used").
    flow, q = setup(name)
    c, x = torch.randn(B, C), torch.randn(B, F)
    params = {k: v.detach() for k, v in draw(q).items()}
    # (There, without the stand-ins, vmap cannot run zuko's pieces: the loop, warned.)
    with torch.autograd.forward_ad.dual_level(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bf.vmap_call(flow, params, c, x, fn=log_prob)

    flow.eval()
    y = _eval_gradients_match_zuko(flow, params, c, x)
    assert not torch.allclose(y[0], y[1], atol=1e-3)


def _changed_merge():
    # As a future zuko might have it: its own function, which no longer takes the probe's
    # one-dimensional input (but still works in the flows).
    merge = zuko.transforms.CouplingTransform.merge

    def changed(self, x_a, x_b, shape):
        if len(shape) < 2:
            raise TypeError("merge: expected a batch dim")
        return merge(self, x_a, x_b, shape)

    changed.__module__, changed.__qualname__ = "zuko.transforms", "CouplingTransform.merge"
    return changed


def test_a_changed_zuko_piece_is_left_alone_with_a_warning(monkeypatch, fresh_caches):
    changed = _changed_merge()
    monkeypatch.setattr(zuko.transforms.CouplingTransform, "merge", changed)
    flow, q = setup("RealNVP")
    c, x = torch.randn(B, C), torch.randn(B, F)

    with pytest.warns(RuntimeWarning, match=r"zuko .*'s merge no longer runs the probe"):
        with pytest.warns(bf.VmapFallbackWarning):
            y = bf.vmap_call(flow, draw(q), c, x, fn=log_prob)

    assert zuko.transforms.CouplingTransform.merge is changed
    assert torch.allclose(y, bf.loop_call(flow, draw(q), c, x, fn=log_prob), atol=tight())


def test_a_stand_in_that_disagrees_is_not_used(monkeypatch, fresh_caches):
    right = _zuko_transforms.coupling_merge

    def wrong(self, x_a, x_b, shape):
        return 2 * right(self, x_a, x_b, shape)

    monkeypatch.setattr(_zuko_transforms, "coupling_merge", wrong)
    flow, q = setup("RealNVP")
    c, x = torch.randn(B, C), torch.randn(B, F)

    with pytest.warns(RuntimeWarning, match="stand-in for zuko .*'s merge does not reproduce it"):
        with pytest.raises(RuntimeError, match="vmap cannot run RealNVP"):
            bf.vmap_call(flow, draw(q), c, x, fn=log_prob, fallback=False)


def test_zuko_outside_the_tested_range_warns_once(monkeypatch, fresh_caches):
    monkeypatch.setattr(zuko, "__version__", "9.0.0")
    flow, q = setup("NAF")
    c, x = torch.randn(B, C), torch.randn(B, F)

    with pytest.warns(RuntimeWarning, match=r"zuko 9.0.0 is outside the tested range \(1.6.x\)"):
        y = bf.vmap_call(flow, draw(q), c, x, fn=log_prob, fallback=False)
    bf.vmap_call(flow, draw(q), c, x, fn=log_prob, fallback=False)  # once: no warning now

    assert torch.allclose(y, bf.loop_call(flow, draw(q), c, x, fn=log_prob), atol=tight())


def test_import_patches_nothing():
    script = textwrap.dedent(
        """
        import inspect
        import zuko, zuko.transforms, zuko.utils, zuko.mixtures, torch.distributions

        def snapshot():
            out = {}
            for mod in (zuko.transforms, zuko.utils, zuko.mixtures, zuko.distributions,
                        zuko.lazy, torch.distributions.transforms):
                for name, obj in vars(mod).items():
                    out[mod.__name__, name] = obj
                    if inspect.isclass(obj):
                        for attr, value in vars(obj).items():
                            out[mod.__name__, name + "." + attr] = value
            return out

        before = snapshot()
        import bayesflow
        after = snapshot()
        changed = [k for k in before if k not in after or after[k] is not before[k]]
        added = [k for k in after if k not in before]
        print(changed, added)
        assert not changed and not added, (changed, added)
        """
    )

    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] []"


def test_flow_sample_errors():
    flow, q = setup("MAF")
    params = draw(q)

    with pytest.raises(ValueError, match="flow_sample: expected shape"):
        flow_sample(flow, params, torch.randn(C), (-1,))
    with pytest.raises(TypeError, match=r"flow_sample: expected a torch.nn.Module"):
        flow_sample(lambda c: c, params, torch.randn(C))
    with pytest.raises(TypeError, match="flow_sample: expected flow\\(c\\)"):
        net = zuko.nn.MLP(C, F)
        flow_sample(net, draw(bf.init(net)), torch.randn(C))


def test_flow_sample_refuses_a_base_it_cannot_draw_from_before_any_draw(gen):
    # The shape pass ran the inverse on the base's mean, which a mixture does not have (torch's bare NotImplementedError), and the message helper then
    # failed on the empty message: an IndexError instead of a clear TypeError.
    from torch.distributions import Independent, Laplace
    from zuko.distributions import DiagNormal, Mixture
    from zuko.lazy import Flow, UnconditionalDistribution

    maf = zuko.flows.MAF(F, C, transforms=2, hidden_features=(8,))
    bases = {
        "Mixture": UnconditionalDistribution(
            lambda loc, scale, w: Mixture(DiagNormal(loc, scale), w),
            torch.randn(2, F),
            torch.ones(2, F),
            torch.zeros(2),
            buffer=True,
        ),
        "Independent\\(Laplace\\)": UnconditionalDistribution(
            lambda loc, scale: Independent(Laplace(loc, scale), 1),
            torch.zeros(F),
            torch.ones(F),
            buffer=True,
        ),
    }
    for kind, base in bases.items():
        flow = Flow(maf.transform, base)
        c = torch.randn(C)
        assert flow(c).sample((4,)).shape == (4, F)  # zuko draws from it
        params, g = draw(bf.init(flow)), gen(0)
        with pytest.raises(
            TypeError,
            match=rf"flow_sample: expected a Normal or Uniform base distribution \(possibly "
            rf"Independent\), got {kind}$",
        ):
            flow_sample(flow, params, c, (4,), generator=g)
        assert torch.equal(g.get_state(), gen(0).get_state())


def test_flow_sample_names_a_context_error_without_a_message():
    class Silent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, c):
            raise RuntimeError()

    flow = Silent()
    with pytest.raises(
        ValueError, match=r"flow_sample: expected a context c whose last dim .* \(RuntimeError\)$"
    ):
        flow_sample(flow, draw(bf.init(flow)), torch.randn(C))


@pytest.mark.parametrize("fallback", [False, True])
def test_cnf_with_nan_parameters_stops(fallback):
    flow = zuko.flows.CNF(2, 1, hidden_features=(8,))
    params = {k: v.detach().clone() for k, v in bf.sample(bf.init(flow, -4.0), 2).items()}
    first = next(iter(params))
    params[first][1] = float("nan")
    c, x = torch.randn(3, 1), torch.randn(3, 2)

    # zuko's own solver would loop forever on NaN: the vectorized one stops, and no
    # fallback to that loop happens
    with pytest.raises(RuntimeError, match="odeint: the ODE's state or derivative is not finite"):
        bf.vmap_call(flow, params, c, x, fn=lambda f, c, x: f(c).log_prob(x), fallback=fallback)


@pytest.mark.parametrize(
    "build",
    [
        lambda: zuko.flows.MAF(2, 3),
        lambda: zuko.flows.NSF(2, 3, transforms=2),
        lambda: zuko.flows.RealNVP(2, 3),
        lambda: zuko.mixtures.GMM(2, 3),
    ],
    ids=["maf", "nsf", "realnvp", "gmm"],
)
def test_flow_sample_says_a_conditional_flow_needs_a_context(build, gen):
    flow = build()
    params = bf.sample(bf.init(flow, init_logvar=-4.0), 3, generator=gen(0))
    state = {k: v.clone() for k, v in flow.state_dict().items()}
    g = gen(1)
    before = g.get_state()

    with pytest.raises(ValueError, match="flow_sample: expected a context c, got None"):
        bf.flow_sample(flow, params, None, (5,), generator=g)

    assert torch.equal(g.get_state(), before)  # no noise drawn
    assert all(torch.equal(v, state[k]) for k, v in flow.state_dict().items())
    # A context of the wrong size: the same, before any draw.
    with pytest.raises(ValueError, match=r"flow_sample: expected a context c .* got shape \(5,\)"):
        bf.flow_sample(flow, params, torch.randn(5), (5,), generator=g)
    assert torch.equal(g.get_state(), before)
    assert all(torch.equal(v, state[k]) for k, v in flow.state_dict().items())
    # With a context, the same call runs.
    assert bf.flow_sample(flow, params, torch.randn(3), (5,), generator=g).shape == (3, 5, 2)


def test_flow_sample_checks_each_new_context_and_structure(gen):
    # The check of a context runs once per flow structure and context shape: a context
    # seen before is not checked again, a new one or a changed flow is.
    flow = zuko.flows.MAF(2, 3)
    params = bf.sample(bf.init(flow, init_logvar=-4.0), 3, generator=gen(0))
    assert bf.flow_sample(flow, params, torch.randn(3), (5,), generator=gen(1)).shape == (3, 5, 2)
    g = gen(2)
    before = g.get_state()
    with pytest.raises(ValueError, match=r"flow_sample: expected a context c .* got shape \(4,\)"):
        bf.flow_sample(flow, params, torch.randn(4), (5,), generator=g)
    assert torch.equal(g.get_state(), before)

    flow.transform = zuko.flows.MAF(2, 4).transform  # now 4 context features
    params = bf.sample(bf.init(flow, init_logvar=-4.0), 3, generator=gen(0))
    with pytest.raises(ValueError, match=r"flow_sample: expected a context c .* got shape \(3,\)"):
        bf.flow_sample(flow, params, torch.randn(3), (5,), generator=g)
    assert torch.equal(g.get_state(), before)
    c = torch.randn(4)
    x = bf.flow_sample(flow, params, c, (5,), generator=gen(1))
    ref = bf.flow_sample(flow, params, c, (5,), generator=gen(1), vectorized=False)
    assert x.shape == (3, 5, 2) and torch.allclose(x, ref, atol=1e-10)
    assert not torch.allclose(x[0], x[1])


def test_flow_sample_without_context_on_an_unconditional_flow(gen):
    flow = zuko.flows.MAF(2)
    params = bf.sample(bf.init(flow, init_logvar=-4.0), 3, generator=gen(0))
    x = bf.flow_sample(flow, params, None, (5,), generator=gen(1))
    ref = bf.flow_sample(flow, params, None, (5,), generator=gen(1), vectorized=False)
    assert x.shape == (3, 5, 2) and torch.allclose(x, ref, atol=1e-10)
    assert not torch.allclose(x[0], x[1])  # the sampled parameters were used


class EncodedFlow(zuko.lazy.LazyDistribution):
    r"""A flow behind a context encoder with a batch norm and, if `p`, a dropout (train
    mode)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.enc = torch.nn.Sequential(
            torch.nn.Linear(C, C), torch.nn.BatchNorm1d(C), torch.nn.Dropout(p)
        )
        self.flow = zuko.flows.MAF(F, C, transforms=2, hidden_features=(8,))

    def forward(self, c):
        return self.flow(self.enc(c))


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("n", [1, 3])
def test_flow_sample_updates_train_mode_buffers_once(n, vectorized, gen):
    # The check pass before the sampling pass ran the encoder too: every call moved the
    # batch norm's running statistics twice, where zuko's rsample moves them once.
    flow = EncodedFlow()
    params = draw(bf.init(flow, include=["flow.**"], init_logvar=-4.0), n)
    c = torch.randn(8, C)
    oracle = copy.deepcopy(flow)
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if name in params:
                p.copy_(params[name][0])
    oracle(c).rsample((4,))

    for calls in (1, 2):  # the second call: a context seen before
        x = flow_sample(flow, params, c, (4,), generator=gen(calls), vectorized=vectorized)
        assert x.shape == (n, 4, 8, F)
        bn, expected = flow.enc[1], oracle.enc[1]
        assert bn.num_batches_tracked.item() == expected.num_batches_tracked.item() == calls
        assert torch.allclose(bn.running_mean, expected.running_mean, rtol=0, atol=1e-15)
        assert torch.allclose(bn.running_var, expected.running_var, rtol=0, atol=1e-15)
        oracle(c).rsample((4,))  # the oracle of the next call


def test_flow_sample_draws_from_the_global_generator_as_one_pass(gen):
    # The check pass's dropout drew from torch's global generator too.
    flow = EncodedFlow(p=0.5)
    params = draw(bf.init(flow, include=["flow.**"], init_logvar=-4.0), 1)
    c = torch.randn(8, C)
    for _ in range(2):  # a new context, then one seen before
        torch.manual_seed(5)
        flow_sample(flow, params, c, (4,), generator=gen(1))
        after = torch.random.get_rng_state()
        torch.manual_seed(5)
        flow.enc(c)  # the one pass of the encoder, with its one dropout draw
        assert torch.equal(after, torch.random.get_rng_state())


@pytest.mark.parametrize("how", ["vectorized", "loop", "no-fallback"])
def test_a_failed_flow_sample_leaves_the_generator_as_found(how, gen):
    # The noise is drawn before the run: a run that fails (the flow's own forward, or vmap
    # that cannot run it without the loop to fall back on) puts the generator back.
    flow = FLOWS["MAF"]()
    params = draw(bf.init(flow, init_logvar=-6.0), 2)
    c = torch.randn(C)
    g = gen(1)
    state = g.get_state()

    def fails_in_the_run(module, inputs, output):
        if torch.equal(g.get_state(), state):  # the shape pass, before the draw
            return None
        if how == "no-fallback":
            output.abs().max().item()  # a value read, which vmap cannot batch
            return None
        raise KeyError("the hyper-network failed")

    first = flow.transform.transforms[0].hyper
    handle = first.register_forward_hook(fails_in_the_run)
    options = dict(vectorized=how != "loop", fallback=how != "no-fallback")
    try:
        with pytest.raises((KeyError, RuntimeError)):
            flow_sample(flow, params, c, (4,), generator=g, **options)
    finally:
        handle.remove()
    assert torch.equal(g.get_state(), state)
    a = flow_sample(flow, params, c, (4,), generator=g)  # as if the failed call never was
    b = flow_sample(flow, params, c, (4,), generator=gen(1))
    assert torch.equal(a, b) and not torch.allclose(a[0], a[1])


def test_flow_sample_names_a_context_of_the_wrong_dtype_or_device(gen):
    # A context of the right shape but another dtype was said to have the wrong last dim.
    # (A float32 context of a float64 flow runs, as in zuko: the context is promoted.)
    flow = FLOWS["MAF"]().float()
    params = draw(bf.init(flow, init_logvar=-6.0))
    like = next(flow.parameters())
    g = gen(1)
    before = g.get_state()
    state = snapshot(flow)
    for c in (torch.randn(B, C, dtype=torch.float64), torch.randn(B, C, device="meta")):
        with pytest.raises(ValueError) as info:
            flow_sample(flow, params, c, (5,), generator=g)
        message = str(info.value)
        assert message.startswith(
            f"flow_sample: expected a context c of the flow's dtype and device "
            f"({like.dtype} on {like.device}), got {c.dtype} on {c.device}; "
        )
        assert "last dim" not in message
        assert torch.equal(g.get_state(), before)  # no noise drawn
        assert unchanged(state, flow)
    # The last dim's message, for a wrong last dim only.
    with pytest.raises(ValueError, match=r"expected a context c whose last dim .* \(4, 3\)"):
        flow_sample(flow, params, torch.randn(B, C + 1, dtype=torch.float32), (5,), generator=g)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["UNAF", "SOSPF", "CNF"])
def test_reparameterize_backward_after_the_block_matches_inside(name, mode, gen):
    # zuko's quadrature and ODE adjoint recompute the flow in their backward pass: after
    # the block, with the module's own parameters back, that raised (train mode) or gave
    # silently wrong gradients (eval mode). The block now runs the stand-ins.
    flow = getattr(FLOWS[name](), mode)()
    bnet = bf.BayesianModel(flow, init_logvar=-4.0)
    c, x = torch.randn(B, C), torch.randn(B, F)
    before = originals()

    with bnet.reparameterize(generator=gen(1)) as f:
        inside = torch.autograd.grad(log_prob(f, c, x).sum(), leaves(bnet.posterior))
    with bnet.reparameterize(generator=gen(1)) as f:
        y = log_prob(f, c, x)
    assert all(originals()[k] is v for k, v in before.items())  # zuko's own pieces are back
    after = torch.autograd.grad(y.sum(), leaves(bnet.posterior))

    # The oracle: bayesflow's loop on the same sample.
    params = bnet.sample_params(1, generator=gen(1))
    y_loop = bf.loop_call(flow, params, c, x, fn=log_prob)
    expected = torch.autograd.grad(y_loop.sum(), leaves(bnet.posterior))
    assert torch.allclose(y, y_loop[0], rtol=0, atol=tight())
    for a, b, e in zip(after, inside, expected, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=tight() * (1 + b.abs().max()))
        assert torch.allclose(a, e, rtol=0, atol=tight() * (1 + e.abs().max()))
    assert any(g.abs().sum() > 0 for g in after)


def test_reparameterize_blocks_on_a_flow_left_out_of_order_keep_the_stand_ins(gen):
    # Enter A, enter B, leave A: B's block still runs the stand-ins until it is left.
    flow = FLOWS["UNAF"]().eval()
    bnet = bf.BayesianModel(flow, init_logvar=-4.0)
    c, x = torch.randn(B, C), torch.randn(B, F)
    before = originals()
    with bnet.reparameterize(generator=gen(2)) as f:
        expected = torch.autograd.grad(log_prob(f, c, x).sum(), leaves(bnet.posterior))

    a = bnet.reparameterize(generator=gen(1))
    b = bnet.reparameterize(generator=gen(2))
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert all(originals()[k] is not v for k, v in before.items() if v is not None)
    y = log_prob(flow, c, x)  # B's sample
    b.__exit__(None, None, None)

    assert all(originals()[k] is v for k, v in before.items())
    assert not _vmap_safe._inside()
    grads = torch.autograd.grad(y.sum(), leaves(bnet.posterior))
    for g, e in zip(grads, expected, strict=True):
        assert torch.allclose(g, e, rtol=0, atol=tight() * (1 + e.abs().max()))


@pytest.mark.parametrize("name", ["NAF", "GF", "BPF"])
def test_an_expanded_input_gives_zukos_log_prob(name):
    # The monotonic transforms' stand-in took an expanded x as the primal of forward mode:
    # "more than one element of the written-to tensor refers to a single memory location",
    # where zuko (which clones x) runs. Oracle: zuko with sample k loaded.
    flow, q = setup(name, init_logvar=-3.0)
    params = draw(q)
    c = torch.randn(B, C)
    x = torch.randn(F).expand(B, F)
    expected = []
    for i in range(K):
        clone = copy.deepcopy(flow)
        clone.load_state_dict({k: v[i] for k, v in params.items()}, strict=False)
        expected.append(log_prob(clone, c, x.contiguous()).detach())
    expected = torch.stack(expected)
    assert not torch.allclose(expected[0], expected[1])
    for call in (bf.vmap_call, bf.loop_call):
        kwargs = {"fallback": False} if call is bf.vmap_call else {}
        got = call(flow, params, c, x, fn=log_prob, **kwargs)
        assert torch.allclose(got, expected, atol=tight()), call.__name__


def test_a_one_feature_gmm_with_full_covariance(gen):
    # Its stand-in padded the strictly lower entries with a column cut from them, and one
    # feature has none: "index_select(): self indexing axis dim should be positive".
    flow = zuko.mixtures.GMM(1, C, components=3, covariance_type="full", **HIDDEN)
    q = bf.init(flow, init_logvar=-3.0)
    params = draw(q)
    c, x = torch.randn(B, C), torch.randn(B, 1)
    expected = []
    for i in range(K):
        clone = copy.deepcopy(flow)
        clone.load_state_dict({k: v[i] for k, v in params.items()}, strict=False)
        expected.append(log_prob(clone, c, x).detach())
    expected = torch.stack(expected)
    assert not torch.allclose(expected[0], expected[1])
    for call in (bf.vmap_call, bf.loop_call):
        kwargs = {"fallback": False} if call is bf.vmap_call else {}
        assert torch.allclose(
            call(flow, params, c, x, fn=log_prob, **kwargs), expected, atol=tight()
        )
    assert flow_sample(flow, params, c, (5,), generator=gen(0)).shape == (K, 5, B, 1)


@pytest.mark.parametrize("name", sorted(INVERTED))
def test_flow_sample_under_torch_func_grad_on_a_new_context(name, fresh_caches):
    # The pass that checks a new context ran zuko's own autograd Functions outside the
    # stand-ins: inside the caller's transform they raised, reported as a context error.
    # Oracle: autograd on the same call.
    flow, q = setup(name, init_logvar=-4.0)
    params = {k: v.detach() for k, v in draw(q, n=2).items()}
    c = torch.randn(B, C)
    loss = lambda p: (
        flow_sample(flow, p, c, (2,), generator=torch.Generator().manual_seed(3)).square().sum()
    )

    got = torch.func.grad(loss)(params)  # the first call with this context
    leaves_ = {k: v.clone().requires_grad_() for k, v in params.items()}
    expected = torch.autograd.grad(loss(leaves_), list(leaves_.values()))
    for k, e in zip(leaves_, expected, strict=True):
        assert torch.allclose(got[k], e, rtol=1e-6, atol=1e-8), k
    assert any(g.abs().sum() > 0 for g in got.values())
