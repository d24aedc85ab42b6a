r"""What `bayesflow bench` runs: the defaults and the named sweeps (`--sweep NAME`).

A sweep sets any of `models`, `samples`, `modes`, `methods`, `batch` (one size or a list:
a batch sweep), `device`, `dtype`, `threads`, `chunk_size`, `min_time`, `repeats`, `seed`,
`model_samples` (numbers of samples for some models, in place of `samples`),
`max_loop_samples` (the largest K of the Python loops) and `small` (the smaller settings
of the slowest flows, :data:`~bayesflow.bench.cases.SMALL`); a JSON file with these keys
is a sweep too.
"""

from __future__ import annotations

__all__ = ["CORE", "COST", "DEFAULTS", "PEERS", "SWEEPS"]

from typing import Any

from .cases import FLOWS

#: bayesflow's own methods, zuko's loops and the references (the plain module and the
#: hand-written batched GEMMs).
CORE = (
    "deterministic",
    "zuko-loop",
    "sample-model-loop",
    "loop",
    "vmap",
    "vmap-compiled",
    "local-trick",
    "bmm",
    "limit",
)

#: What a user could pick instead: a bare torch.func vmap and the peer libraries.
PEERS = ("torch-func", "bayesian-torch", "posteriors", "pyro", "pyro-vec")

#: The cost of being Bayesian: one sample against the plain module (`--sweep cost`).
COST = ("deterministic", "vmap", "nelbo", "nelbo-local", "nelbo-flipout")

#: What a run with no option does: small enough for a 2-core CPU in about a minute.
DEFAULTS: dict[str, Any] = {
    "models": ["mlp", "nsf"],
    "samples": [1, 8, 32],
    "modes": ["forward", "train"],
    "methods": [m for m in CORE if m != "vmap-compiled"],
    "min_time": 0.25,
    # One thread: on a shared CPU, two OpenMP threads that compete with other processes
    # make parallel kernels up to 10x slower, at random. `--threads` sets more.
    "threads": 1,
}

#: Named sweeps for `bayesflow bench --sweep NAME`.
SWEEPS: dict[str, dict[str, Any]] = {
    "default": dict(DEFAULTS),
    "quick": {
        "models": ["mlp", "nsf"],
        "samples": [1, 4],
        "modes": ["forward", "train", "sample"],
        "methods": [*(m for m in CORE if m != "vmap-compiled"), "torch-func"],
        "batch": 16,
        "min_time": 0.01,
        "repeats": 3,
        "small": True,
    },
    "paper": {
        "models": ["mlp", "nsf"],
        "samples": [1, 8, 32, 128],
        "modes": ["forward", "train"],
        "methods": list(CORE),
        "min_time": 0.5,
    },
    # The tutorial MLP against the libraries a user could pick instead (benchmarks/run.sh
    # peers writes its table into benchmarks/RESULTS.md).
    "peers": {
        "models": ["mlp"],
        "samples": [1, 8, 32, 128],
        "modes": ["forward", "train"],
        # `nelbo-grad`: the peers' training cells hold the KL too, `vmap`'s do not.
        "methods": ["deterministic", "vmap", "nelbo-grad", "bmm", "limit", *PEERS, "zuko-loop"],
        "min_time": 0.5,
        "threads": 1,
    },
    "architectures": {
        "models": ["lstm", "cnn", "last-layer", "transformer"],
        "samples": [1, 8, 32],
        "model_samples": {"last-layer": [1, 8, 32, 256]},
        "modes": ["forward", "train"],
        "methods": ["deterministic", "zuko-loop", "loop", "vmap"],
        "min_time": 0.25,
    },
    # K = 1 against the plain module: a forward, and a training step with Adam (the nelbo
    # steps with each estimator; local and Flipout apply to the MLPs and the CNN).
    # `bash benchmarks/run.sh cost` writes its table into benchmarks/RESULTS.md.
    "cost": {
        "models": ["mlp", "wide-mlp", "digits-cnn", "lstm", "transformer"],
        "samples": [1],
        "modes": ["forward", "train"],
        "methods": list(COST),
        "min_time": 0.5,
        "threads": 1,
    },
    # The digits CNN, vectorized against the loop, over batch sizes.
    "cnn": {
        "models": ["digits-cnn"],
        "samples": [1, 8, 32],
        "batch": [16, 64, 256, 540, 1024],
        "modes": ["forward", "train"],
        "methods": ["deterministic", "zuko-loop", "loop", "vmap", "torch-func"],
        "min_time": 0.25,
    },
    "flows": {
        "models": sorted(FLOWS),
        "samples": [32],
        "modes": ["forward"],
        "methods": ["deterministic", "zuko-loop", "loop", "vmap"],
        "min_time": 0.1,
    },
    # Sampling inverts the flow: by bisection for NAF, UNAF, SOSPF, GF and BPF (slow in a
    # loop), by an ODE for CNF; these five invert in closed form or autoregressively.
    "flows-sample": {
        "models": ["maf", "ncsf", "nice", "nsf", "realnvp"],
        "samples": [8],
        "modes": ["sample"],
        "methods": ["deterministic", "zuko-loop", "loop", "vmap"],
        "min_time": 0.1,
    },
    # The reduced GPU sweep of scripts/gpu-check.sh: the loops only up to K = 128.
    "cuda": {
        "models": ["mlp", "nsf", "digits-cnn", "last-layer"],
        "samples": [1, 128, 1024],
        "modes": ["forward", "train"],
        "methods": ["deterministic", "zuko-loop", "loop", "vmap", "bmm", "limit", "torch-func"],
        "max_loop_samples": 128,
        "device": "cuda",
        "min_time": 0.2,
        "repeats": 5,
    },
}
