r"""Importing bayesflow changes no torch global and does not import zuko."""

import json
import subprocess
import sys

SNAPSHOT = """
import json, sys, torch
from torch.distributions import Distribution
def state():
    return {
        "dtype": str(torch.get_default_dtype()),
        "threads": torch.get_num_threads(),
        "grad": torch.is_grad_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "validate_args": Distribution._validate_args,
        "arg_constraints": repr(vars(Distribution).get("arg_constraints")),
        "zuko": sorted(m for m in sys.modules if m.split(".")[0] == "zuko"),
        # torch.compile's machinery (torch.compiler.disable imports it): a second on import
        "dynamo": "torch._dynamo" in sys.modules,
    }
before = state()
import bayesflow
print(json.dumps([before, state()]))
"""


def test_import_changes_no_global():
    out = subprocess.run(
        [sys.executable, "-c", SNAPSHOT], capture_output=True, text=True, check=True
    ).stdout
    before, after = json.loads(out)

    assert after == before
    assert after["zuko"] == [] and not after["dynamo"]


FIRST_CALLS = """
import sys, torch, torch.nn as nn
import bayesflow as bf
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
q = bf.init(net, init_logvar=-4.0)
x, y = torch.randn(5, 3), torch.randn(5, 2)
params = bf.sample(q, 4)
out = bf.vmap_call(net, params, x)  # on the CPU, measures the call's memory first
assert torch.allclose(out, bf.loop_call(net, params, x))
loss = bf.nelbo(net, q, x, y, fn=lambda m, x, y: -(m(x) - y).square().sum(-1), num_data=10.0)
loss.backward()
from bayesflow import _engine
measured = _engine._FOOTPRINTS.get(net)
print(len(measured) if measured is not None else 0, "torch._dynamo" in sys.modules)
"""


def test_first_calls_do_not_import_the_compiler():
    # The memory measurement of a process's first vectorized call ran a torch dispatch
    # mode, whose first call imported torch._dynamo: 2.3 s before the first result.
    out = subprocess.run(
        [sys.executable, "-c", FIRST_CALLS], capture_output=True, text=True, check=True
    ).stdout
    measured, dynamo = out.split()
    assert int(measured) > 0  # the measuring mode ran
    assert dynamo == "False"
