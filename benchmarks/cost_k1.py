r"""The cost of being Bayesian at K = 1: a training step and a forward pass against the
deterministic ones, on one CPU thread, every ratio taken in one run.

    python benchmarks/cost_k1.py              # the tables, the phases and the profile
    python benchmarks/cost_k1.py --quick      # shorter timings, no phases, no profile

Training steps (sample, forward, backward, Adam with its defaults on every trained tensor):

- `deterministic`: the plain module, Adam on its parameters;
- `nelbo`: `bf.nelbo(net, q, x, y, fn=..., n=1)`, Adam on `q.mean` and `q.logvar`;
- `per-tensor`: the same step written by hand in plain torch, one tensor at a time (sigma,
  sample and KL per tensor, `torch.func.functional_call`), Adam on the same leaves;
- `flat`: a hand-written reference that gives up separate tensors: one flat mean and one
  flat log-variance (2 leaves, not a `bf.Posterior`), the sample and the KL in one custom
  autograd Function;
- `flat, per-tensor leaves`: the same node over a `bf.Posterior`'s own tensors (a mean and
  a log-variance per weight, copied into flat ones inside the node), Adam on all of them:
  what any step pays for keeping them as tensors of their own;
- `nelbo, local trick`: `bf.nelbo(..., estimator="local")`;
- `local trick by hand`: the same written in plain torch (per linear layer the mean and the
  variance of its outputs, two matrix products, and one draw per output; the KL per tensor).

Both again with `torch.optim.Adam(..., fused=True)`: on the CPU, torch's default Adam updates
one tensor at a time, which costs more than the arithmetic on small tensors.

Models: zuko's tutorial MLP 5-64-64-5 at batch 64 (mean squared error), and a wide MLP
784-1024-1024-10 at batch 256 (cross-entropy). Forward: `bf.vmap_call(net, bf.sample(q, 1),
x)` against `net(x)`, with and without autograd. Each time is the median of
`torch.utils.benchmark.Timer.blocked_autorange`, then the median over interleaved rounds (the
machine may be shared: interleaving spreads the load over every method alike).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import zuko

from torch.func import functional_call
from torch.utils.benchmark import Timer

import bayesflow as bf

from bayesflow.cli import _positive_int

NUM_DATA = 60_000.0
BOUND = 18.0


def tutorial() -> tuple[nn.Module, tuple, object]:
    net = zuko.nn.MLP(5, 5)
    x = torch.randn(64, 5)
    y = x.sort(dim=-1).values

    def ll(net, x, y):
        return -(net(x) - y).square().mean(dim=-1)

    return net, (x, y), ll


def wide() -> tuple[nn.Module, tuple, object]:
    net = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    x = torch.randn(256, 784)
    y = torch.randint(0, 10, (256,))

    def ll(net, x, y):
        return -F.cross_entropy(net(x), y, reduction="none")

    return net, (x, y), ll


MODELS = {"tutorial MLP 5-64-64-5, batch 64": tutorial, "wide MLP 784-1024^2-10, batch 256": wide}


def deterministic(net, args, ll, **adam):
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, **adam)

    def step():
        opt.zero_grad()
        (-ll(net, *args).mean()).backward()
        opt.step()

    return step


def bayesflow_nelbo(net, args, ll, **adam):
    q = bf.init(net, init_logvar=-9.0)
    opt = torch.optim.Adam([*q.mean.values(), *q.logvar.values()], lr=1e-4, **adam)
    g = torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad()
        bf.nelbo(net, q, *args, fn=ll, num_data=NUM_DATA, n=1, generator=g).backward()
        opt.step()

    return step


def _softclip(x):
    return x / (1 + (x / BOUND) ** 2).sqrt()


def per_tensor(net, args, ll):
    q = bf.init(net, init_logvar=-9.0)
    opt = torch.optim.Adam([*q.mean.values(), *q.logvar.values()], lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad()
        params, kl = {}, 0.0
        for name, mu in q.mean.items():
            lv = _softclip(q.logvar[name])
            sigma = (0.5 * lv).exp()
            params[name] = mu + sigma * torch.randn(mu.shape, generator=g)
            kl = kl + 0.5 * (lv.exp() + mu.square() - lv - 1).sum()
        loss = kl / NUM_DATA - ll(lambda *a: functional_call(net, params, a), *args).mean()
        loss.backward()
        opt.step()

    return step


class _FlatSampleKL(torch.autograd.Function):
    r"""theta = mu + sigma(logvar) * eps and the KL from N(0, I), one pass each way."""

    @staticmethod
    def forward(ctx, mean, logvar, eps):
        r = torch.addcmul(torch.ones(()), logvar, logvar, value=BOUND**-2).rsqrt_()
        sc = r.mul(logvar)
        sigma = sc.mul(0.5).exp_()
        theta = torch.addcmul(mean, sigma, eps)
        kl = 0.5 * (sigma.dot(sigma) + mean.dot(mean) - sc.sum() - mean.numel())
        ctx.save_for_backward(mean, eps, sigma, r)
        return theta, kl

    @staticmethod
    def backward(ctx, g_theta, g_kl):
        mean, eps, sigma, r = ctx.saved_tensors
        g_mean = torch.addcmul(g_theta, mean, g_kl)
        # d sigma / d logvar = sigma r^3 / 2, d KL / d logvar = (sigma^2 - 1) r^3 / 2
        t = g_theta.mul(eps).addcmul_(sigma, g_kl).mul_(sigma).sub_(g_kl)
        g_logvar = t.mul_(r.square().mul_(r)).mul_(0.5)
        return g_mean, g_logvar, None


def flat(net, args, ll):
    q = bf.init(net, init_logvar=-9.0)
    names = list(q.mean)
    shapes = [q.mean[k].shape for k in names]
    sizes = [s.numel() for s in shapes]
    mean = torch.cat([q.mean[k].detach().flatten() for k in names]).requires_grad_()
    logvar = torch.cat([q.logvar[k].detach().flatten() for k in names]).requires_grad_()
    opt = torch.optim.Adam([mean, logvar], lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad()
        eps = torch.randn(mean.shape, generator=g)
        theta, kl = _FlatSampleKL.apply(mean, logvar, eps)
        params = {k: t.view(s) for k, t, s in zip(names, theta.split(sizes), shapes, strict=True)}
        loss = kl / NUM_DATA - ll(lambda *a: functional_call(net, params, a), *args).mean()
        loss.backward()
        opt.step()

    return step


class _LeavesSampleKL(torch.autograd.Function):
    r"""`_FlatSampleKL` over a posterior's own tensors (a mean and a log-variance per
    weight): copied into flat ones inside the node, their gradients handed back as views."""

    @staticmethod
    def forward(ctx, eps, shapes, *tensors):
        t = len(tensors) // 2
        mean = torch.cat([m.reshape(-1) for m in tensors[:t]])
        logvar = torch.cat([lv.reshape(-1) for lv in tensors[t:]])
        ctx.shapes = shapes
        return _FlatSampleKL.forward(ctx, mean, logvar, eps)

    @staticmethod
    def backward(ctx, g_theta, g_kl):
        g_mean, g_logvar, _ = _FlatSampleKL.backward(ctx, g_theta, g_kl)
        sizes = [s.numel() for s in ctx.shapes]
        views = [
            g.view(s)
            for whole in (g_mean, g_logvar)
            for g, s in zip(whole.split(sizes), ctx.shapes, strict=True)
        ]
        return None, None, *views


def flat_leaves(net, args, ll):
    r"""`flat` on a `bf.Posterior`'s tensors, Adam on all of them: what any step must pay
    to keep a mean and a log-variance per weight as tensors of their own."""

    q = bf.init(net, init_logvar=-9.0)
    names = list(q.mean)
    shapes = [q.mean[k].shape for k in names]
    sizes = [s.numel() for s in shapes]
    tensors = [*q.mean.values(), *q.logvar.values()]
    opt = torch.optim.Adam(tensors, lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad()
        eps = torch.randn(sum(sizes), generator=g)
        theta, kl = _LeavesSampleKL.apply(eps, shapes, *tensors)
        params = {k: t.view(s) for k, t, s in zip(names, theta.split(sizes), shapes, strict=True)}
        loss = kl / NUM_DATA - ll(lambda *a: functional_call(net, params, a), *args).mean()
        loss.backward()
        opt.step()

    return step


def bayesflow_local(net, args, ll):
    q = bf.init(net, init_logvar=-9.0)
    opt = torch.optim.Adam([*q.mean.values(), *q.logvar.values()], lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad()
        loss = bf.nelbo(
            net, q, *args, fn=ll, num_data=NUM_DATA, n=1, generator=g, estimator="local"
        )
        loss.backward()
        opt.step()

    return step


def local_by_hand(net, args, ll):
    r"""The local trick written in plain torch for a sequence of linear layers and
    activations: two matrix products per layer, the KL per tensor."""

    q = bf.init(net, init_logvar=-9.0)
    opt = torch.optim.Adam([*q.mean.values(), *q.logvar.values()], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    layers = [(f"{i}.", layer) for i, layer in enumerate(net)]

    def forward(x):
        for prefix, layer in layers:
            if not isinstance(layer, nn.Linear):
                x = layer(x)
                continue
            w, b = prefix + "weight", prefix + "bias"
            mean = F.linear(x, q.mean[w], q.mean[b])
            var = F.linear(x.square(), _softclip(q.logvar[w]).exp(), _softclip(q.logvar[b]).exp())
            x = torch.addcmul(mean, var.sqrt(), torch.randn(mean.shape, generator=g))
        return x

    def step():
        opt.zero_grad()
        kl = 0.0
        for name, mu in q.mean.items():
            lv = _softclip(q.logvar[name])
            kl = kl + 0.5 * (lv.exp() + mu.square() - lv - 1).sum()
        loss = kl / NUM_DATA - ll(forward, *args).mean()
        loss.backward()
        opt.step()

    return step


STEPS = {
    "deterministic": deterministic,
    "nelbo": bayesflow_nelbo,
    "per-tensor": per_tensor,
    "flat": flat,
    "flat, per-tensor leaves": flat_leaves,
    "nelbo, local trick": bayesflow_local,
    "local trick by hand": local_by_hand,
}


def forwards(net, args):
    q = bf.init(net, init_logvar=-9.0)
    g = torch.Generator().manual_seed(0)
    x = args[0]
    size = sum(m.numel() for m in q.mean.values())
    return {
        "plain": lambda: net(x),
        "vmap_call(sample(q, 1))": lambda: bf.vmap_call(net, bf.sample(q, 1, generator=g), x),
        "sample(q, 1)": lambda: bf.sample(q, 1, generator=g),
        "randn(1, P) alone": lambda: torch.randn(1, size, generator=g),
    }


def _median_ms(fn, min_run_time: float) -> float:
    fn()
    fn()
    timer = Timer("fn()", globals={"fn": fn}, num_threads=1)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def _measure(stmts: dict, min_run_time: float, rounds: int) -> dict[str, float]:
    times = {k: [] for k in stmts}
    for _ in range(rounds):
        for k, fn in stmts.items():
            times[k].append(_median_ms(fn, min_run_time))
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def _table(title: str, ms: dict[str, float], base: str) -> None:
    print(f"\n{title}\n")
    print(f"| {'what':<26} | {'ms':>9} | {'x ' + base:>16} |")
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 18}|")
    for k, v in ms.items():
        print(f"| {k:<26} | {v:9.3f} | {v / ms[base]:16.2f} |")


def phases(rounds: int = 10) -> None:
    r"""Where a step's time goes, phase by phase (CPU time, least of `rounds` steps)."""

    try:
        from bayesflow.priors import sample_and_kl
    except ImportError:  # before sampling and the KL were fused

        def sample_and_kl(where, q, n, g, prior):
            return bf.sample(q, n, generator=g), bf.kl_divergence(q)

    torch.manual_seed(0)
    net, (x, y), ll = wide()
    q = bf.init(net, init_logvar=-9.0)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam([*q.mean.values(), *q.logvar.values()], lr=1e-4)
    dopt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def bayesian():
        opt.zero_grad()
        params, kl = sample_and_kl("nelbo", q, 1, g, None)
        yield "sample and KL"
        out = bf.vmap_call(net, params, x, y, fn=ll)
        yield "forward"
        (kl / NUM_DATA - out.mean()).backward()
        yield "backward"
        opt.step()
        yield "Adam"

    def plain():
        dopt.zero_grad()
        yield "sample and KL"
        out = ll(net, x, y)
        yield "forward"
        (-out.mean()).backward()
        yield "backward"
        dopt.step()
        yield "Adam"

    print("\nPhases of a step, wide MLP (ms of CPU time, least of", rounds, "steps)\n")
    print(f"| {'phase':<14} | {'deterministic':>13} | {'nelbo(n=1)':>10} |")
    print(f"|{'-' * 16}|{'-' * 15}|{'-' * 12}|")
    best = {}
    for name, step in (("deterministic", plain), ("nelbo", bayesian)):
        for _ in range(rounds + 2):
            t = time.process_time()
            for phase in step():
                now = time.process_time()
                key = (name, phase)
                best[key] = min(best.get(key, float("inf")), now - t)
                t = now
    for phase in ("sample and KL", "forward", "backward", "Adam"):
        a, b = best[("deterministic", phase)], best[("nelbo", phase)]
        print(f"| {phase:<14} | {a * 1e3:13.2f} | {b * 1e3:10.2f} |")


def profile(rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    step = bayesflow_nelbo(*wide())
    for _ in range(3):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    print("\nProfile of 5 nelbo(n=1) steps, wide MLP (self CPU time, wall clock)\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short timings, no profile")
    parser.add_argument(
        "--rounds", type=_positive_int, default=3, help="interleaved rounds per table"
    )
    opts = parser.parse_args()

    torch.set_num_threads(1)
    min_run_time = 0.2 if opts.quick else 1.0
    rounds = 1 if opts.quick else opts.rounds
    print(
        f"torch {torch.__version__}, zuko {zuko.__version__}, bayesflow {bf.__version__} "
        f"({os.path.dirname(bf.__file__)}), Python {platform.python_version()}, 1 thread, "
        f"float32, median ms; load average {os.getloadavg()[0]:.2f}"
    )

    for title, build in MODELS.items():
        torch.manual_seed(0)
        net, args, ll = build()
        steps = {k: make(net, args, ll) for k, make in STEPS.items()}
        _table(f"Training step, {title}", _measure(steps, min_run_time, rounds), "deterministic")
        steps = {k: STEPS[k](net, args, ll, fused=True) for k in ("deterministic", "nelbo")}
        ms = _measure(steps, min_run_time, rounds)
        _table(f"Training step, Adam(fused=True) for both, {title}", ms, "deterministic")

        if build is tutorial:
            ms = _measure(forwards(net, args), min_run_time, rounds)
            _table(f"K = 1 forward, {title}", ms, "plain")
            with torch.no_grad():
                ms = _measure(forwards(net, args), min_run_time, rounds)
            _table(f"K = 1 forward under torch.no_grad(), {title}", ms, "plain")

    if not opts.quick:
        phases()
        profile()
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
