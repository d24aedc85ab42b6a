r"""The benchmark behind `bayesflow bench`: loops, vmap, hand-written limits and peers.

Every method computes the same thing, K posterior samples of a model evaluated on the same
inputs, and is checked against :func:`bayesflow.loop_call` before it is timed (see
:mod:`bayesflow.bench.checks`); a method that disagrees is reported `wrong` and never
timed. The package reads in the order of a run:

* :mod:`~bayesflow.bench.cases`: the models, their posteriors and inputs;
* :mod:`~bayesflow.bench.methods`: the methods, typed records in a registry, with the
  hand-written batched GEMMs of :mod:`~bayesflow.bench.limit` and the peer libraries of
  :mod:`~bayesflow.bench.peers`;
* :mod:`~bayesflow.bench.checks`: the reference on the loop and the checks;
* :mod:`~bayesflow.bench.measure` and :mod:`~bayesflow.bench.run`: timing, memory and the
  loop over cells;
* :mod:`~bayesflow.bench.report`: tables, JSON, CSV and plots;
* :mod:`~bayesflow.bench.sweeps`: the defaults and the named sweeps.

The benchmark imports bayesflow; nothing in bayesflow's core imports the benchmark.
"""

from __future__ import annotations

__all__ = [
    "DEFAULTS",
    "METHODS",
    "MODELS",
    "MODES",
    "SWEEPS",
    "Case",
    "Method",
    "Noise",
    "NotApplicable",
    "NotInstalled",
    "Options",
    "Status",
    "Unsupported",
    "Wrong",
    "cost_table",
    "flows_table",
    "format_table",
    "get_method",
    "make_case",
    "markdown_table",
    "plot",
    "replace_section",
    "run_bench",
    "write_csv",
    "write_json",
]

from .cases import MODELS, MODES, Case, make_case
from .methods import METHODS, Method, Noise, get_method
from .report import (
    cost_table,
    flows_table,
    format_table,
    markdown_table,
    plot,
    replace_section,
    write_csv,
    write_json,
)
from .run import Options, run_bench
from .status import NotApplicable, NotInstalled, Status, Unsupported, Wrong
from .sweeps import DEFAULTS, SWEEPS
