r"""What `bayesflow bench` runs: the defaults and the named sweeps (`--sweep NAME`).

A sweep sets any of `models`, `samples`, `modes`, `methods`, `batch`, `device`, `dtype`,
`threads`, `chunk_size`, `min_time`, `repeats`, `seed` and `model_samples` (numbers of
samples for some models, in place of `samples`); a JSON file with these keys is a sweep too.
"""

from __future__ import annotations

__all__ = ["CORE", "DEFAULTS", "PEERS", "SWEEPS"]

from typing import Any

from .cases import FLOWS

#: bayesflow's own methods, zuko's loops and the hand-written references.
CORE = (
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
        "methods": ["vmap", "bmm", "limit", *PEERS, "zuko-loop"],
        "min_time": 0.5,
        "threads": 1,
    },
    "architectures": {
        "models": ["lstm", "cnn", "last-layer", "transformer"],
        "samples": [1, 8, 32],
        "model_samples": {"last-layer": [1, 8, 32, 256]},
        "modes": ["forward", "train"],
        "methods": ["zuko-loop", "loop", "vmap"],
        "min_time": 0.25,
    },
    "flows": {
        "models": sorted(FLOWS),
        "samples": [32],
        "modes": ["forward"],
        "methods": ["zuko-loop", "loop", "vmap"],
        "min_time": 0.1,
    },
    # Sampling inverts the flow: by bisection for NAF, UNAF, SOSPF, GF and BPF (slow in a
    # loop), by an ODE for CNF; these five invert in closed form or autoregressively.
    "flows-sample": {
        "models": ["maf", "ncsf", "nice", "nsf", "realnvp"],
        "samples": [8],
        "modes": ["sample"],
        "methods": ["zuko-loop", "loop", "vmap"],
        "min_time": 0.1,
    },
    "cuda": {
        "models": ["mlp", "nsf", "cnn", "last-layer"],
        "samples": [1, 32, 128, 1024],
        "modes": ["forward", "train"],
        "methods": [*CORE, *PEERS],
        "device": "cuda",
        "min_time": 0.5,
    },
}
