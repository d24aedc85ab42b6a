r"""Vectorized vs looped log-density of every zuko flow family.

Prints, per family, the median time of `bayesflow.loop_call` and `bayesflow.vmap_call`
(fallback disabled) for `flow(c).log_prob(x)` with K posterior samples, and their ratio.

    python benchmarks/flows_speed.py --samples 32 --batch 256 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import zuko

from torch.utils.benchmark import Timer

import bayesflow as bf

HIDDEN = {"hidden_features": (64, 64)}


def families(features: int, context: int) -> dict:
    f, c = features, context
    return {
        "NICE": lambda: zuko.flows.NICE(f, c, transforms=3, **HIDDEN),
        "RealNVP": lambda: zuko.flows.RealNVP(f, c, transforms=3, **HIDDEN),
        "MAF": lambda: zuko.flows.MAF(f, c, transforms=3, **HIDDEN),
        "NSF": lambda: zuko.flows.NSF(f, c, transforms=3, **HIDDEN),
        "NCSF": lambda: zuko.flows.NCSF(f, c, transforms=3, **HIDDEN),
        "SOSPF": lambda: zuko.flows.SOSPF(f, c, transforms=3, **HIDDEN),
        "NAF": lambda: zuko.flows.NAF(f, c, transforms=3, **HIDDEN),
        "UNAF": lambda: zuko.flows.UNAF(f, c, transforms=3, **HIDDEN),
        "GF": lambda: zuko.flows.GF(f, c, transforms=3, **HIDDEN),
        "BPF": lambda: zuko.flows.BPF(f, c, transforms=3, **HIDDEN),
        "CNF": lambda: zuko.flows.CNF(f, c, **HIDDEN),
        "GMM": lambda: zuko.flows.GMM(f, c, components=8, **HIDDEN),
    }


def log_prob(flow: torch.nn.Module, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return flow(c).log_prob(x)


def median_ms(
    stmts: list[str], env: dict, threads: int, min_run_time: float, rounds: int, clock: str
) -> list[float]:
    r"""Median times of `stmts`, measured in alternating rounds (fairer on a busy machine)."""

    timer = time.perf_counter if clock == "wall" else time.process_time
    timers = [Timer(stmt=stmt, globals=env, num_threads=threads, timer=timer) for stmt in stmts]
    for timer in timers:
        timer.timeit(1)  # warmup

    times = [[] for _ in stmts]
    for _ in range(rounds):
        for timer, t in zip(timers, times, strict=True):
            t.append(timer.blocked_autorange(min_run_time=min_run_time).median * 1e3)

    return [sorted(t)[len(t) // 2] for t in times]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="posterior samples K")
    parser.add_argument("--batch", type=int, default=256, help="data batch size")
    parser.add_argument("--features", type=int, default=2)
    parser.add_argument("--context", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall-clock time, or the process's CPU time (steadier on a shared machine)",
    )
    parser.add_argument("--only", nargs="*", default=None, help="family names to run")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, zuko {zuko.__version__}, {platform.processor() or 'cpu'}, "
        f"{args.threads} threads, float32, K = {args.samples}, batch {args.batch}, "
        f"features {args.features}, context {args.context}, "
        f"median of {args.rounds} rounds, {args.clock} clock"
    )
    print(f"| {'flow':<8} | {'loop (ms)':>10} | {'vmap (ms)':>10} | {'speed-up':>8} |")
    print(f"|{'-' * 10}|{'-' * 11}:|{'-' * 11}:|{'-' * 9}:|")

    for name, build in families(args.features, args.context).items():
        if args.only and name not in args.only:
            continue

        flow = build()
        params = bf.sample(bf.init(flow, init_logvar=-9.0), args.samples)
        params = {k: v.detach() for k, v in params.items()}
        c = torch.randn(args.batch, args.context)
        x = torch.randn(args.batch, args.features)
        env = {"bf": bf, "flow": flow, "params": params, "c": c, "x": x, "fn": log_prob}

        try:
            bf.vmap_call(flow, params, c, x, fn=log_prob, fallback=False)
        except RuntimeError as err:
            cause = type(err.__cause__).__name__ if err.__cause__ else "RuntimeError"
            print(f"| {name:<8} | vmap: unsupported ({cause}) |")
            continue

        loop, vec = median_ms(
            [
                "bf.loop_call(flow, params, c, x, fn=fn)",
                "bf.vmap_call(flow, params, c, x, fn=fn, fallback=False)",
            ],
            env,
            args.threads,
            args.min_run_time,
            args.rounds,
            args.clock,
        )
        print(f"| {name:<8} | {loop:>10.2f} | {vec:>10.2f} | {loop / vec:>7.2f}x |", flush=True)

    return 0


if __name__ == "__main__":
    raise SystemExit(main())
