r"""Tests for the statistical forward check of methods with their own noise."""

import pytest
import torch

import bayesflow as bf

from bayesflow import bench
from bayesflow.bench import Status
from bayesflow.bench.checks import STATISTICAL_SAMPLES, _check_independence
from bayesflow.bench.methods import Noise


def _own(distinct, wrap=lambda out: out):
    # A method with its own noise whose K samples of a call are made of `distinct(K)`
    # independent draws, each repeated in turn to fill K, then passed through `wrap`.
    def build(case, K, mode, fn, args, **options):
        g = torch.Generator()

        def run(seed):
            k = distinct(K)
            params = bf.sample(case.posterior, k, generator=g.manual_seed(seed or 0))
            out = bf.vmap_call(case.module, params, *args, fn=fn)
            return wrap(out.repeat_interleave(-(-K // k), 0)[:K])

        return run

    return bench.Method("own", build, Noise.OWN, targets=None)


def _fixed(case, K, mode, fn, args, **options):
    # One draw at build time, given again at every call: the seed is never used.
    params = bf.sample(case.posterior, K, generator=torch.Generator().manual_seed(0))
    out = bf.vmap_call(case.module, params, *args, fn=fn)
    return lambda seed: out


WRONG = {
    "one draw repeated": (_own(lambda K: 1), 2),
    # With K at least the samples the check draws, it made one call, and compared nothing.
    "duplicated draws, one call's worth": (_own(lambda K: -(-K // 2)), STATISTICAL_SAMPLES),
    "the same draw at every call": (bench.Method("own", _fixed, Noise.OWN, targets=None), 8),
    "the same draw, one call's worth": (
        bench.Method("own", _fixed, Noise.OWN, targets=None),
        STATISTICAL_SAMPLES,
    ),
    "duplicated draws": (_own(lambda K: -(-K // 2)), 2),
    "duplicated draws, more samples a call": (_own(lambda K: -(-K // 2)), 8),
    "2 distinct of 8": (_own(lambda K: 2), 8),
    "flat shape": (_own(lambda K: K, lambda out: out.flatten(1)), 8),
    "a sample too many": (
        _own(lambda K: K, lambda out: torch.cat([out, out[:1]])),
        STATISTICAL_SAMPLES,
    ),
}


def _check(method, K):
    (r,) = bench.run_bench(
        ["mlp"], [K], ["forward"], [], extra={"own": method}, batch=16, dtype=torch.float64,
        min_time=0.001, repeats=1, check_samples=STATISTICAL_SAMPLES, progress=False,
    )  # fmt: skip
    return r


@pytest.mark.parametrize("K", [1, 2, 8])
def test_independent_samples_pass(K):
    r = _check(_own(lambda K: K), K)
    assert r["status"] is Status.OK and r["detail"] == "checked statistically", r


@pytest.mark.parametrize("name", WRONG)
def test_wrong_samples_are_wrong(name):
    method, K = WRONG[name]
    r = _check(method, K)
    assert r["status"] is Status.WRONG and r["median_ms"] is None, r


def test_independence_statistic_edge_cases():
    x = torch.randn(16, 6, dtype=torch.float64)
    x[:, :3] = 1.0  # elements constant across samples take no part
    assert _check_independence(x, 8).ok
    assert _check_independence(torch.ones(16, 6), 8).ok  # nothing varies
    assert _check_independence(x, 16).ok  # one sample a call
    # Four samples, two calls: one draw twice a call is as likely as not by chance.
    assert _check_independence(torch.tensor([[0.0], [0.0], [1.0], [1.0]]), 2).ok
    repeated = torch.randn(32, 6, dtype=torch.float64).repeat_interleave(2, 0)
    assert not _check_independence(repeated, 32).ok
    # Elements of few values (low precision) repeat rows by chance: no exact-repeat verdict.
    coarse = torch.randint(0, 2, (32, 6), generator=torch.Generator().manual_seed(0))
    assert _check_independence(coarse.double(), 4).ok
    # Samples given twice: in two identical calls, or within each call and never between.
    twice = torch.randn(16, 6, dtype=torch.float64).repeat(2, 1)
    assert not _check_independence(twice, 2).ok
    within = torch.randn(64, 6, dtype=torch.float64).repeat_interleave(2, 0)
    assert not _check_independence(within, 2).ok
    # Rows equal by chance, within and between calls alike (every element a function of
    # one draw rounded to a few thousand values, as a tiny posterior in low precision
    # gives): no verdict of repeats (it was one, at some samples equal).
    draw = torch.randint(0, 4000, (256, 1), generator=torch.Generator().manual_seed(1))
    chance = draw.double() * torch.arange(1.0, 7.0, dtype=torch.float64)
    assert torch.unique(chance, dim=0).shape[0] < 256  # equal rows there are
    assert _check_independence(chance, 2).ok
