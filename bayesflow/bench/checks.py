r"""The reference (the loop on the same noise) and the checks every method passes before timing.

* Methods that draw their noise from a :class:`torch.Generator` in one flat draw (`loop`,
  `vmap`, `vmap-compiled`, `bmm`, `limit`, `torch-func`) are compared with
  :func:`bayesflow.loop_call` on the samples that :func:`bayesflow.sample` gives for the
  same generator state.
* zuko's own methods (`zuko-loop`, `sample-model-loop`) draw one tensor at a time from the
  global generator; the reference replays those draws (same seed, same order), so they
  are compared exactly too.
* `local-trick`, `nelbo-local` and `nelbo-flipout` sample activations and the peers have
  their own samplers, so no shared samples exist: they are checked statistically on
  `max(K, 128)` samples or more against the loop on as many, in train mode as
  :data:`STEP_DRAWS` independent draws whose means are compared in standard errors of
  their spread, the method built at the K timed where that costs little; in forward and
  sample modes each call's output shape and the independence of the K samples of a call
  are checked too (see :func:`check_statistically`). That checks the law of their estimator;
  `local-trick`, `nelbo-local` and `nelbo-flipout` are also compared exactly, at the K
  that is timed, with bayesflow's loop on the same draws, their oracle
  (`vectorized=False`; see :func:`check_oracle`).
* `deterministic`, the plain module, is compared with the loop on the mean model
  (:func:`bayesflow.mean_params`): outputs, and in train mode the loss and the gradient
  with respect to every Bayesian parameter before its Adam step.
"""

from __future__ import annotations

__all__ = [
    "GRADIENT_ERROR",
    "PERMUTATIONS",
    "STATISTICAL_SAMPLES",
    "STEP_DRAWS",
    "VARIANCE_GROUPS",
    "Check",
    "check_deterministic",
    "check_exact",
    "check_oracle",
    "check_statistically",
    "mode_fn",
    "reference",
    "tolerance",
]

import itertools
import math

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from torch import Tensor

import bayesflow as bf

from bayesflow._numerics import std

from .cases import Case
from .methods import Method, Noise, bf_targets
from .peers import NUM_DATA
from .status import NotApplicable

#: The least number of samples of a statistical check.
STATISTICAL_SAMPLES = 128

#: The samples of a call the independence check reads, at most (its permutations cost the
#: square of the rows: 9 s at 2 x 1024).
INDEPENDENCE_ROWS = 128

#: The number of independent draws a train-mode statistical check makes of the method
#: and of the loop, each on `samples / STEP_DRAWS` of the samples or more: their means are
#: compared in standard errors of the spread of the draws, that of the losses (one mean per
#: draw, whether a method returns it or per-sample losses) and that of the gradients.
STEP_DRAWS = 32

#: The number of groups of samples whose average output variances a forward-mode
#: statistical check compares, in standard errors of their spread.
VARIANCE_GROUPS = 8

#: The number of random assignments of the samples to calls that give the law of the
#: independence statistic of a forward-mode statistical check under independence.
PERMUTATIONS = 200

#: The largest relative L2 error of a peer's gradient with respect to the means (their
#: Monte Carlo noise gives 0.02-0.03 on the tutorial MLP at 128 samples; a gradient off by
#: a factor of 2, or of the wrong sign, gives 0.5 or more).
GRADIENT_ERROR = 0.2


@dataclass(frozen=True)
class Check:
    r"""The outcome of a check: whether it passed, its error (relative, or in standard
    errors; inf for a mismatch of shape or finiteness) and why it failed, or how it passed
    where that differs from the rule."""

    ok: bool
    error: float
    detail: str = ""


def mode_fn(case: Case, mode: str) -> tuple[Callable, tuple]:
    r"""Returns what a mode computes on a case, and its inputs."""

    if mode == "sample":
        if case.sample_fn is None:
            raise NotApplicable(f"{case.model} has no sample mode")
        return case.sample_fn, case.sample_args
    return case.fn, case.args


def _zuko_params(case: Case, K: int, seed: int) -> dict[str, Tensor]:
    q = case.posterior
    torch.manual_seed(seed)
    draws = [
        {k.replace("-", "."): torch.randn_like(m) for k, m in case.zuko.means.items()}
        for _ in range(K)
    ]
    return {
        name: q.mean[name] + std(q.logvar[name]) * torch.stack([d[name] for d in draws])
        for name in q.mean
    }


def reference(case: Case, K: int, mode: str, noise: Noise, seed: int, kl: bool = False) -> Any:
    r"""Returns the loop's outputs (or, in train mode, `(losses, gradients)`) on the noise
    that a method of kind `noise` draws for `seed`.

    With `kl` (the peers, the `nelbo` steps), the train-mode losses are per-datum negative
    ELBOs: the closed-form KL over :data:`~bayesflow.bench.peers.NUM_DATA` is added.
    """

    key = (K, mode, noise, seed, kl)
    if key not in case.cache:
        case.cache[key] = _loop(case, K, mode, noise, seed, kl)
    return case.cache[key]


def _loop(case: Case, K: int, mode: str, noise: Noise, seed: int, kl: bool) -> Any:
    q = case.posterior
    fn, args = mode_fn(case, mode)
    with torch.set_grad_enabled(mode == "train"):
        if noise is Noise.ZUKO:
            params = _zuko_params(case, K, seed)
        else:
            g = torch.Generator(device=q.mean[next(iter(q.mean))].device).manual_seed(seed)
            params = bf.sample(q, K, generator=g)
        out = bf.loop_call(case.module, params, *args, fn=fn)
        if mode == "train":
            losses = case.loss(out)
            if kl:
                losses = losses + bf.kl_divergence(q) / NUM_DATA
            targets = bf_targets(case)
            grads = torch.autograd.grad(losses.mean(), list(targets.values()))
            result = (losses.detach(), dict(zip(targets, grads, strict=True)))
        else:
            result = out.detach()
    return result


def tolerance(dtype: torch.dtype) -> float:
    r"""Returns the relative error allowed between a method and the loop."""

    # Half precision: a few units of its rounding relative to a tensor's largest value, as
    # two orders of the same sums give them (zuko's own loop was 3.7e-2 off the reference
    # on an LSTM step in float16, 2.1e-2 on an NSF step in bfloat16).
    return {torch.float64: 1e-8, torch.float32: 2e-4}.get(dtype, 5e-2)


def _close(a: Tensor, b: Tensor, tol: float) -> tuple[bool, float, str]:
    r"""Returns whether `a` is within `tol` of `b`, relative to the largest magnitude of `b`,
    the error and, for a shape mismatch or non-finite values, why (the error is then inf).
    Non-finite values must be those of `b` (an infinity, the same one; NaN never passes):
    a non-finite value of the loop's compared with nothing would let any value through."""

    if a.shape != b.shape:
        return False, math.inf, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not (fa.all() and fb.all()):
        if not (torch.equal(fa, fb) and torch.equal(a[~fa], b[~fb])):
            return (
                False,
                math.inf,
                "non-finite values (the loop's: "
                + ("none)" if fb.all() else f"{int((~fb).sum())})"),
            )
        a, b = a[fa], b[fb]
        if a.numel() == 0:
            return True, 0.0, ""
    # Each tensor on its own scale: a floor (say 1) would make the bound absolute for small
    # tensors, and log-variance gradients of 1e-5 replaced by zeros would pass.
    scale = b.abs().max()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all zeros: absolute
    err = ((a - b).abs().max() / scale).item()
    return err <= tol, err, ""


def _compare(pairs: Iterable[tuple[str, Tensor | None, Tensor, float]]) -> Check:
    r"""Compares `(what, got, want, tol)` with :func:`_close`: the check fails on the
    first mismatch of shape or finiteness, or with the largest error if it exceeds its
    `tol`; its detail names the tensor."""

    results = []
    for what, got, want, tol in pairs:
        if got is None:
            return Check(False, math.inf, f"{what}: missing")
        _, err, why = _close(got, want, tol)
        if why:
            return Check(False, math.inf, f"{what}: {why}")
        results.append((err / tol, err, tol, what))
    _, err, tol, what = max(results)
    ok = err <= tol
    return Check(ok, err, "" if ok else f"max relative error {err:.2e} > {tol:.0e} ({what})")


def check_exact(
    method: Method, case: Case, K: int, mode: str, work: Callable[[int], Any], seed: int
) -> Check:
    r"""Checks a method against the loop on the same samples: outputs and, in train mode,
    every gradient, each within :func:`tolerance` of its largest magnitude."""

    tol = tolerance(case.posterior.mean[next(iter(case.posterior.mean))].dtype)
    got = work(seed)
    return _compare_work(got, reference(case, K, mode, method.noise, seed, method.kl), mode, tol)


def check_oracle(
    case: Case, mode: str, work: Callable[[int], Any], oracle: Callable[[int], Any], seed: int
) -> Check:
    r"""Checks a method against its oracle, bayesflow's loop over the same draws
    (`vectorized=False`), both seeded with `seed`: outputs and, in train mode, every
    gradient, each within :func:`tolerance` of its largest magnitude, as
    :func:`check_exact`."""

    tol = tolerance(case.posterior.mean[next(iter(case.posterior.mean))].dtype)
    check = _compare_work(work(seed), oracle(seed), mode, tol)
    why = f"{check.detail}, against bayesflow's loop (vectorized=False)"
    return check if check.ok else Check(False, check.error, why)


def _compare_work(got: Any, ref: Any, mode: str, tol: float) -> Check:
    r"""Compares what a method computed with its reference: the outputs or, in train mode,
    the losses and every gradient of the reference."""

    if mode == "train":
        # A whole training step (nelbo) returns the mean loss only.
        want = ref[0].mean() if got[0].dim() == 0 else ref[0]
        pairs = [("losses", got[0], want, tol)]
        pairs += [(f"gradient of {k}", got[1].get(k), g, tol) for k, g in ref[1].items()]
        return _compare(pairs)
    return _compare([("outputs", got, ref, tol)])


def check_deterministic(case: Case, mode: str, work: Callable[[int], Any], seed: int) -> Check:
    r"""Checks the plain module against the loop on the mean model: outputs and, in train
    mode, the loss and its gradient with respect to every Bayesian parameter, within
    :func:`tolerance` (the gradients within `case.plain_gradient_error` where set)."""

    q = case.posterior
    tol = tolerance(q.mean[next(iter(q.mean))].dtype)
    fn, args = mode_fn(case, mode)
    got = work(seed)
    with torch.set_grad_enabled(mode == "train"):
        out = bf.loop_call(case.module, bf.mean_params(q), *args, fn=fn)
        if mode != "train":
            return _compare([("outputs", got, out.detach(), tol)])
        losses = case.loss(out)
        grads = torch.autograd.grad(losses.sum(), list(q.mean.values()))

    gtol = tol if case.plain_gradient_error is None else max(tol, case.plain_gradient_error)
    pairs = [("losses", got[0], losses.detach(), tol)]
    pairs += [
        (f"gradient of mean:{k}", got[1].get(f"mean:{k}"), g, gtol)
        for k, g in zip(q.mean, grads, strict=True)
    ]
    check = _compare(pairs)
    if check.ok and gtol > tol:
        note = f"gradients within {gtol:.0e}: {case.plain_gradient_note}"
        return Check(True, check.error, note)
    return check


def _log_variances(x: Tensor, groups: int) -> Tensor:
    r"""Returns the log of the average variance over the columns of `x`, in each of `groups`
    groups of its rows (the samples), of equal size."""

    m = x.shape[0] // groups
    v = x[: m * groups].reshape(groups, m, -1).var(1).mean(1)
    return v.clamp_min(1e-300).log()


def _check_outputs(outs: list[Tensor], ref: Tensor, K: int) -> Check:
    r"""Checks the outputs of calls of a method built at `K` against the loop's `ref` on as
    many samples: each call's shape, then the law of their elements (see
    :func:`check_statistically`) and the independence of the samples of a call."""

    want = (K, *ref.shape[1:])
    # Before any flattening: `(K, B * D)` for `(K, B, D)` has the same elements.
    for out in outs:
        if tuple(out.shape) != want:
            return Check(False, math.inf, f"shape {tuple(out.shape)} != {want}")
    used = ref.shape[0] // K  # the calls the law is compared on (the others: independence)
    everything = torch.cat(outs).double().flatten(1)
    a, b = everything[: used * K], ref.double().flatten(1)
    n = b.shape[0]
    if not torch.isfinite(a).all():
        return Check(False, math.inf, "non-finite outputs")
    va, vb = a.var(0), b.var(0)
    se = ((va + vb) / n).sqrt().clamp_min(1e-12 * b.abs().max().item())
    z_mean = ((a.mean(0) - b.mean(0)).abs() / se).max().item()
    # The average variance over output elements, whose spread is not that of one variance
    # from n samples: it is measured, from independent groups of the samples.
    groups = min(VARIANCE_GROUPS, n // 2)
    z_var = _z(_log_variances(a, groups), _log_variances(b, groups)).item() if groups > 1 else 0
    ok = z_mean <= 5.0 and z_var <= 5.0
    if not ok:
        return Check(
            False, max(z_mean, z_var), f"means off by {z_mean:.1f} SE, variances by {z_var:.1f} SE"
        )
    # On at most INDEPENDENCE_ROWS samples a call: its cost grows as the square of them.
    rows = min(K, INDEPENDENCE_ROWS)
    sampled = everything.view(len(outs), K, -1)[:, :rows].reshape(len(outs) * rows, -1)
    independence = _check_independence(sampled, len(outs))
    if not independence.ok:
        return independence
    return Check(True, max(z_mean, z_var, independence.error))


def _between_within(gram: Tensor, perms: Tensor, C: int, K: int) -> Tensor:
    r"""Returns the log of the ratio of the between-call and within-call mean squares of
    samples whose centered Gram matrix is `gram`, reordered by each of `perms` (of shape
    `(R, N)`) and taken as `C` calls of `K` consecutive samples."""

    R = perms.shape[0]
    blocks = gram[perms[:, :, None], perms[:, None, :]].reshape(R, C, K, C, K)
    between = blocks.diagonal(dim1=1, dim2=3).sum((1, 2, 3)) / K
    within = (gram.trace() - between).clamp_min(0)
    tiny = torch.finfo(torch.float64).tiny
    return (between / (C - 1)).clamp_min(tiny).log() - (within / (C * (K - 1))).clamp_min(
        tiny
    ).log()


def _ranks(x: Tensor) -> Tensor:
    r"""Returns the ranks of the entries of each column of `x` among that column's, tied
    entries sharing their average rank."""

    col = x.T.contiguous()
    ordered = col.sort(1).values
    lo = torch.searchsorted(ordered, col, right=False)
    hi = torch.searchsorted(ordered, col, right=True)
    return ((lo + hi - 1) / 2).T.double()


def _repeats(x: Tensor, C: int) -> bool:
    r"""Whether rows of `x` (`C` calls of `K` consecutive rows) repeat exactly within
    calls and never between them, beyond chance: under independence, a pair of rows that
    are equal is as likely within a call as between two, so all of `T` equal pairs fall
    within calls with probability :math:`q^T`, `q` the share of pairs within calls (below
    :math:`10^{-6}`: a draw given twice). Rows equal by chance (low precision, a tiny
    spread) fall between calls as well."""

    N = x.shape[0]
    K = N // C
    within_share = C * K * (K - 1) / (N * (N - 1)) if N > 1 else 0.0
    if within_share == 0.0 or x.shape[1] == 0:
        return False
    _, ids = torch.unique(x, dim=0, return_inverse=True)
    ids = ids.cpu()
    calls = torch.arange(C).repeat_interleave(K)

    def equal_pairs(keys: Tensor) -> float:
        m = torch.bincount(keys).double()
        return (m * (m - 1) / 2).sum().item()

    total = equal_pairs(ids)
    within = equal_pairs(calls * (int(ids.max()) + 1) + ids)
    if total == 0 or within < total:
        return False
    return total * math.log(within_share) < math.log(1e-6)


def _check_independence(x: Tensor, C: int) -> Check:
    r"""Checks that the samples of each of `C` calls, the consecutive rows of `x` in groups
    of `K`, are independent: the ratio of the between-call and within-call mean squares of
    their ranks (pooled over the columns) against its law when the rows are assigned to
    calls at random."""

    N = x.shape[0]
    K = N // C
    varies = (x != x[:1]).any(0)
    if C >= 2 and varies.any() and all(torch.equal(c, x[:K]) for c in x[K:].split(K)):
        # A draw made once and given again (the seed unused): never by chance.
        return Check(False, math.inf, "every call gave the same samples")
    if _repeats(x[:, varies], C):
        return Check(False, math.inf, "samples repeat exactly within calls, never between")
    if K < 2 or C < 2:
        return Check(True, 0.0)  # one sample a call: nothing to compare
    # Ranks: a few outlying samples (heavy-tailed log-densities) would otherwise make the
    # statistic's law under random assignment heavy-tailed too, and 5 of its standard
    # deviations no longer rare. Tied entries (constant elements) share one rank.
    r = _ranks(x)
    r = r - r.mean(0)
    calls = r.reshape(C, K, -1)
    total = r.square().sum().item()
    within = (calls - calls.mean(1, keepdim=True)).square().sum().item()
    if total == 0:
        return Check(True, 0.0)  # constant outputs: the law of the elements was compared
    if within == 0:
        # Every call made of one sample repeated: the chance of that under a random
        # assignment of the samples to calls, C! / prod (m / K)! of N! / prod m!
        # arrangements, if each distinct sample occurs m times, a multiple of K.
        counts = torch.unique(x, dim=0, return_counts=True)[1].tolist()
        if all(m % K == 0 for m in counts):
            log_p = math.lgamma(C + 1) - math.lgamma(N + 1)
            log_p += sum(math.lgamma(m + 1) - math.lgamma(m // K + 1) for m in counts)
            if log_p < math.log(1e-6):
                return Check(False, math.inf, "the samples of a call are all equal")
        return Check(True, 0.0)
    # Samples alike within a call (repeated draws) make the spread of the call means, in
    # K times their mean square, larger than that within the calls: with K independent
    # samples the two agree in expectation, whatever the correlations across output
    # elements. The law of their log-ratio is that of the same samples assigned to calls
    # at random (exact under independence, as samples are then exchangeable): the
    # statistic must not be more than 5 of its standard deviations, from
    # :data:`PERMUTATIONS` assignments, above their mean. On ranks and on the log scale
    # the right tail of that law is no heavier than a normal's.
    between = total - within
    stat = math.log(between / (C - 1) / (within / (C * (K - 1)))) if between > 0 else -math.inf
    gram = (r @ r.T).cpu()
    g = torch.Generator().manual_seed(0)
    perms = torch.rand(PERMUTATIONS, N, generator=g).argsort(1)
    batch = max(1, 2**22 // N**2)  # 32 MiB of reordered Gram matrices at a time
    null = torch.cat([_between_within(gram, p, C, K) for p in perms.split(batch)])
    mean, sd = null.mean().item(), null.std().item()
    z = (stat - mean) / sd if sd > 0 else (math.inf if stat > mean else 0.0)
    if not z <= 5.0:
        return Check(
            False, z, f"samples of a call not independent: between-call variance of ranks "
            f"{math.exp(stat):.2f} times the within-call one, {z:.1f} SD above chance"
        )  # fmt: skip
    return Check(True, max(z, 0.0))


def _z(a: Tensor, b: Tensor) -> Tensor:
    r"""Returns how far the means of the draws `a` and `b` (along dim 0) are apart, in
    standard errors of that difference."""

    a, b = a.double(), b.double()
    diff = (a.mean(0) - b.mean(0)).abs()
    se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
    se = torch.maximum(se, 1e-12 * torch.maximum(a.mean(0).abs(), b.mean(0).abs()))
    return torch.where(diff == 0, 0.0, diff / se)  # equal constants: 0, not 0 / 0


class _Draws(NamedTuple):
    r"""What a check keeps of independent training steps: per draw, the mean loss, each
    gradient projected on its direction and each gradient's squared norm; over draws, the
    mean of some gradients; and, if a step's gradients are unusable, why."""

    losses: Tensor
    projections: dict[str, Tensor]
    squares: dict[str, Tensor]
    means: dict[str, Tensor]
    problem: str = ""


def _draws(
    steps: Iterable[tuple[Tensor, dict[str, Tensor]]],
    directions: dict[str, Tensor],
    keep: Iterable[str] = (),
) -> _Draws:
    r"""Summarizes training steps, one at a time (a step's gradients are dropped after):
    each must have gradients for the tensors of `directions` exactly (if any), for those
    named in `keep`, and finite ones."""

    keep = list(keep)
    losses: list[Tensor] = []
    projections: dict[str, list[Tensor]] = {k: [] for k in directions}
    squares: dict[str, list[Tensor]] = {k: [] for k in directions}
    sums: dict[str, Tensor] = {}
    for loss, grads in steps:
        problem = ""
        if directions and grads.keys() != directions.keys():
            problem = "gradients for other tensors than the posterior's"
        elif not set(keep) <= grads.keys():
            problem = "gradients missing for some means"
        elif not all(torch.isfinite(g).all() for g in grads.values()):
            problem = "non-finite gradients"
        if problem:
            return _Draws(torch.zeros(0), {}, {}, {}, problem)
        losses.append(loss.double().mean())
        for k, u in directions.items():
            g = grads[k].double()
            projections[k].append((g * u).sum())
            squares[k].append(g.square().sum())
        for k in keep:
            sums[k] = sums[k] + grads[k].double() if k in sums else grads[k].double()
    return _Draws(
        torch.stack(losses),
        {k: torch.stack(p) for k, p in projections.items()},
        {k: torch.stack(p) for k, p in squares.items()},
        {k: g / len(losses) for k, g in sums.items()},
    )


def _averaged(
    steps: Iterable[tuple[Tensor, dict[str, Tensor]]], calls: int
) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    r"""Averages training steps by groups of `calls`, one draw on `calls` times as many
    samples: the mean of their mean losses and their mean gradients (of the tensors that
    every step of the group has gradients for)."""

    steps = iter(steps)
    while group := list(itertools.islice(steps, calls)):
        loss = torch.stack([loss.double().mean() for loss, _ in group]).mean()
        names = [k for k in group[0][1] if all(k in grads for _, grads in group)]
        yield loss, {k: torch.stack([grads[k] for _, grads in group]).mean(0) for k in names}


def _reference_draws(
    case: Case, m: int, noise: Noise, seed: int, kl: bool
) -> tuple[dict[str, Tensor], _Draws]:
    r"""Returns the loop's gradients on `m` samples for `seed`, as unit vectors (the
    directions), and :data:`STEP_DRAWS` more of its training steps on `m` samples each
    (seeds `seed + 1`, ...), summarized on those directions."""

    key = ("draws", m, noise, seed, kl)
    if key not in case.cache:
        _, grads = _loop(case, m, "train", noise, seed, kl)
        tiny = torch.finfo(torch.float64).tiny  # a gradient of zeros stays zeros
        directions = {k: g.double() / g.double().norm().clamp_min(tiny) for k, g in grads.items()}
        steps = (_loop(case, m, "train", noise, seed + 1 + i, kl) for i in range(STEP_DRAWS))
        means = [k for k in grads if k.startswith("mean:")] if noise is Noise.OWN else []
        case.cache[key] = (directions, _draws(steps, directions, means))
    return case.cache[key]


def _check_steps(
    case: Case, K: int, m: int, noise: Noise, build: Callable[[int], Any], seed: int, kl: bool
) -> Check:
    r"""Checks :data:`STEP_DRAWS` draws of a method's training steps on `m` samples or more
    each against as many of the loop's: below `m`, each draw averages the steps of
    `ceil(m / K)` calls of the method built at `K`; from `m` on, a draw is one step of the
    method built at `m`."""

    # Past m, the method built at K would cost STEP_DRAWS steps at K (a minute of Pyro's at
    # K = 128): the local methods are checked at K against their oracle, the peers are not.
    calls, size = (-(-m // K), K) if K < m else (1, m)
    directions, ref = _reference_draws(case, calls * size, noise, seed, kl)
    own = noise is Noise.OWN
    step = build(size)
    # Seeds apart from the loop's: the same seed would replay the loop's normal draws.
    first = seed + STEP_DRAWS + 1
    steps = (step(s) for s in range(first, first + calls * STEP_DRAWS))
    got = _draws(_averaged(steps, calls) if calls > 1 else steps, directions, ref.means)
    if got.problem:
        return Check(False, math.inf, got.problem)

    z = _z(got.losses, ref.losses).item()
    if not z <= 5.0:
        return Check(False, z, f"loss mean off by {z:.1f} standard errors")

    if own:
        # The gradient of the expected loss with respect to the means, estimated with
        # other noise: the means are the one parameterization that every peer shares.
        g = torch.cat([got.means[k].flatten() for k in ref.means])
        r = torch.cat([ref.means[k].flatten() for k in ref.means])
        err = ((g - r).norm() / r.norm()).item()
        if not err <= GRADIENT_ERROR:
            return Check(False, err, f"mean gradients off by {err:.0%} (relative L2)")
        # The same estimator (weights sampled, the gradient through the sample) has the
        # same spread whatever the noise: each gradient's squared norm, averaged over the
        # steps, within 5 standard errors. The expected gradient of a log-variance is
        # small next to its spread (a zeroed or doubled one passes the projections).
        zs = {k: _z(got.squares[k], ref.squares[k]).item() for k in directions}
        worst = max(zs, key=zs.__getitem__)
        if not zs[worst] <= 5.0:
            return Check(
                False, zs[worst], f"squared norm of the gradient of {worst} off by "
                f"{zs[worst]:.1f} standard errors"
            )  # fmt: skip

    # The same expected gradient, estimated with other noise: each tensor's, projected on
    # the loop's from an independent draw, must agree within 5 standard errors. A peer's
    # gradient with respect to its own standard-deviation parameter comes taken to the
    # log-variance by the chain rule (see bayesflow.bench.peers), so it is checked too.
    zs = {k: _z(got.projections[k], ref.projections[k]).item() for k in directions}
    worst = max(zs, key=zs.__getitem__)
    if not zs[worst] <= 5.0:
        return Check(
            False, zs[worst], f"gradient of {worst} off by {zs[worst]:.1f} standard errors"
        )
    return Check(True, max(z, zs[worst]))


def check_statistically(
    case: Case,
    K: int,
    mode: str,
    noise: Noise,
    build: Callable[[int], Any],
    seed: int,
    samples: int = STATISTICAL_SAMPLES,
    kl: bool = False,
) -> Check:
    r"""Checks a method that has its own noise against the loop, on `max(K, samples)`
    samples or more, with the method built anew for them.

    Forward and sample modes: the method built at `K`, called `ceil(max(K, samples) / K)`
    times (seeds `seed + 1`, ...). Each call's output must have the shape of the loop's on
    `K` samples; then, concatenated, for every output element, the mean over samples must
    agree with the loop's within 5 standard errors; the log of the average variance over
    output elements, in each of :data:`VARIANCE_GROUPS` groups of the samples, averaged
    over the groups, within 5 standard errors of that average (from the groups' spread);
    and, for `K > 1` and two calls or more, the samples of a call must be independent: the
    ratio of the between-call and within-call mean squares of their ranks, pooled over
    output elements, no more than 5 standard deviations above its mean when the samples
    are assigned to calls at random (:data:`PERMUTATIONS` assignments).
    Train mode: :data:`STEP_DRAWS` draws of training steps of the method, each on
    `m = max(K, samples) / STEP_DRAWS` samples (rounded up) or more, against as many of the
    loop's, with finite gradients for every posterior tensor. Where `K < m`, a draw averages
    the steps of `ceil(m / K)` calls of the method built at `K`; otherwise a draw is one
    step of the method built at `m`, not at `K`. The mean loss of a draw (a method's own,
    or the mean of its per-sample losses) averaged over the draws must agree with the
    loop's within 5 standard errors of that average. The gradient of every posterior tensor,
    projected on the loop's from one more step, likewise; for a peer (which has its own
    parameterization), also the gradient with respect to the means, averaged over the
    draws, within a relative L2 error of :data:`GRADIENT_ERROR` of the loop's, and each
    gradient's squared norm within 5 standard errors.
    """

    n = max(K, samples)
    if mode == "train":
        m = -(-n // STEP_DRAWS)
        return _check_steps(case, K, m, noise, build, seed, kl or noise is Noise.OWN)
    # The law on the calls that make `n` samples; independence on two calls at least (a
    # second call where one is enough for the law).
    run, calls = build(K), -(-n // K)
    outs = [run(seed + 1 + i) for i in range(max(2, calls))]
    return _check_outputs(outs, reference(case, calls * K, mode, noise, seed), K)
