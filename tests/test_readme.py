r"""The README's Python examples run, in order, as one script."""

import re
import textwrap

from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)^\s*```", README.read_text(), flags=re.S | re.M)
    blocks = [textwrap.dedent(b) for b in blocks]
    assert len(blocks) >= 3

    torch.set_default_dtype(torch.float32)
    # A user's session on the CPU, whatever --device: the pages draw from CPU generators.
    with torch.device("cpu"):
        exec(compile("\n".join(blocks), str(README), "exec"), {})
