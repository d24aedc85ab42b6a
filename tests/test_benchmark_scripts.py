r"""The benchmark scripts refuse counts they cannot run with, before any work; their
hand-written references compute what they stand for."""

import subprocess
import sys

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# Each script with arguments it cannot run with: an argparse error (exit status 2) that
# names the argument, not a traceback after minutes of work.
BAD = [
    ("allocator.py", ["--rounds", "0"], "expected positive --rounds"),
    ("closure_keys.py", ["--rounds", "0"], "argument --rounds: expected a positive integer"),
    ("conv_paths.py", ["--k", "0"], "argument --k: expected a positive integer"),
    ("cost_k1.py", ["--rounds", "0"], "argument --rounds: expected a positive integer"),
    ("ensemble_cost.py", ["--k", "-1"], "argument --k: expected a positive integer"),
    ("from_scratch.py", ["--epochs", "0"], "argument --epochs: expected a positive integer"),
    ("ivon_cost.py", ["--rounds", "0"], "argument --rounds: expected a positive integer"),
    ("posteriors.py", ["--threads", "0"], "argument --threads: expected a positive integer"),
    ("posteriors_fit.py", ["--models", "foo"], "argument --models: invalid choice: 'foo'"),
    (
        "posteriors_fit.py",
        ["--min-run-time", "nan"],
        "argument --min-run-time: expected a positive",
    ),
    ("posteriors_regression.py", ["--splits", "0"], "argument --splits: expected a positive"),
    ("seeds.py", ["--seeds", "0"], "argument --seeds: expected a positive integer, got 0"),
    ("tutorial.py", ["--k", "0"], "argument --k: expected a positive integer"),
    ("vmap_overhead.py", ["--rounds", "0"], "argument --rounds: expected a positive integer"),
]

# One interpreter runs every case (one import of torch, not one per script): each script as
# `python script args`, its own folder first on the path and its sibling modules forgotten
# between scripts (benchmarks/posteriors.py would shadow the peer package of that name).
RUNNER = r"""
import json, runpy, sys
cases, out = json.loads(sys.argv[1]), []
base = set(sys.modules)
for path, args in cases:
    sys.argv = [path, *args]
    sys.path.insert(0, path.rsplit("/", 1)[0])
    try:
        runpy.run_path(path, run_name="__main__")
        out.append(None)
    except SystemExit as e:
        out.append(e.code)
    finally:
        sys.path.pop(0)
        for name in set(sys.modules) - base:
            if getattr(sys.modules[name], "__file__", None) and "/benchmarks/" in sys.modules[name].__file__:
                del sys.modules[name]
print(json.dumps(out))
"""


def test_bad_counts_are_refused_by_argparse():
    import json

    cases = [(str(BENCHMARKS / script), args) for script, args, _ in BAD]
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    assert codes == [2] * len(BAD), list(zip([b[0] for b in BAD], codes, strict=True))
    assert "Traceback" not in done.stderr
    for script, _, message in BAD:
        assert f"{script}: error: {message}" in done.stderr, (script, done.stderr[-3000:])


def test_cost_k1_hand_written_references_match_autograd():
    # The references a K = 1 step is compared with must compute the same step: the
    # sample, the KL and their gradients of the formulas, written with autograd (float64).
    import runpy

    import torch

    ref = runpy.run_path(str(BENCHMARKS / "cost_k1.py"))
    g = torch.Generator().manual_seed(0)
    shapes = [torch.Size([3, 4]), torch.Size([4]), torch.Size([2, 3])]
    means = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    logvars = [torch.randn(s, generator=g, dtype=torch.float64) * 8 - 4 for s in shapes]
    size = sum(s.numel() for s in shapes)
    eps, w = torch.randn(2, size, generator=g, dtype=torch.float64)

    def loss(theta, kl):
        return theta @ w + 0.3 * kl

    m = torch.cat([t.reshape(-1) for t in means]).requires_grad_()
    lv = torch.cat([t.reshape(-1) for t in logvars]).requires_grad_()
    clipped = lv / (1 + (lv / ref["BOUND"]) ** 2).sqrt()
    theta = m + (0.5 * clipped).exp() * eps
    kl = 0.5 * (clipped.exp() + m.square() - clipped - 1).sum()
    expected = torch.autograd.grad(loss(theta, kl), (m, lv))

    m2, lv2 = m.detach().requires_grad_(), lv.detach().requires_grad_()
    out = ref["_FlatSampleKL"].apply(m2, lv2, eps)
    assert torch.allclose(out[0], theta) and torch.allclose(out[1], kl)
    flat = torch.autograd.grad(loss(*out), (m2, lv2))

    leaves = [t.clone().requires_grad_() for t in (*means, *logvars)]
    out = ref["_LeavesSampleKL"].apply(eps, shapes, *leaves)
    assert torch.allclose(out[0], theta) and torch.allclose(out[1], kl)
    grads = torch.autograd.grad(loss(*out), leaves)
    per_leaf = [torch.cat([t.reshape(-1) for t in half]) for half in (grads[:3], grads[3:])]

    for got in (flat, per_leaf):
        for a, b in zip(got, expected, strict=True):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert expected[1].abs().min() > 0  # the log-variances' gradients are not all zero


def test_cost_goals_compares_each_peer_with_the_same_work():
    # The peers' training cells hold the KL; `vmap`'s do not, `nelbo-grad`'s do: a peer's
    # training step is divided by `nelbo-grad`'s, a bare torch.func vmap's by `vmap`'s.
    import runpy

    goals = runpy.run_path(str(BENCHMARKS / "cost_goals.py"))

    def record(method, mode, ms):
        return {"model": "mlp", "method": method, "mode": mode, "batch": 64, "median_ms": ms}

    records = [
        record("vmap", "train", 0.5),
        record("nelbo-grad", "train", 1.0),
        record("bayesian-torch", "train", 0.8),
        record("torch-func", "train", 0.6),
        record("vmap", "forward", 0.2),
        record("bayesian-torch", "forward", 0.1),
    ]
    peers = {(r["model"], r["method"], r["mode"], r["batch"]): r for r in records}
    assert goals["_peer_cell"](peers, "train") == (
        "bayesian-torch / nelbo-grad: 0.80x (0.8 / 1 ms)"
    )
    assert goals["_peer_cell"](peers, "forward") == "bayesian-torch / vmap: 0.50x (0.1 / 0.2 ms)"
    del peers["mlp", "nelbo-grad", "train", 64]
    assert goals["_peer_cell"](peers, "train") == "torch-func / vmap: 1.20x (0.6 / 0.5 ms)"
