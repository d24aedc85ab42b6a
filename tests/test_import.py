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
