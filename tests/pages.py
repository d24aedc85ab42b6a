r"""Runs the code of the documentation's pages, as a user's session would."""

from __future__ import annotations

import re

from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"


def run_page(name: str, least: int) -> None:
    r"""Runs the python blocks of `docs/<name>` in order, in one namespace, on the CPU
    whatever `--device` (the pages draw from CPU generators); checks that the page has at
    least `least` blocks, so that a changed fence cannot leave nothing to run."""

    page = DOCS / name
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) >= least, f"{name}: {len(blocks)} python blocks, expected >= {least}"

    with torch.device("cpu"):
        exec(compile("\n".join(blocks), str(page), "exec"), {})
