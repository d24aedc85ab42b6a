r"""The research notebooks: executed at reduced size, and checked as committed."""

import re
import shutil

from pathlib import Path

import pytest

# The notebook tests need the test extra's nbformat and nbclient (absent on a bare GPU machine,
# see scripts/gpu-check.sh): without them, they skip and say so.
nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (the test extra)")
nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (the test extra)")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
NAMES = [
    "01_bayesian_networks_and_flows",
    "02_vectorized_ensemble_prediction",
    "03_flow_uncertainty",
    "04_loop_vs_vmap",
    "05_digits_uncertainty",
    "06_diabetes_regression",
    "07_posteriors_compared",
]


def read(path):
    return nbformat.read(path, as_version=4)


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_notebooks_are_there():
    assert [p.stem for p in PATHS] == NAMES
    readme = (NOTEBOOKS / "README.md").read_text()
    for name in NAMES:
        assert f"{name}.ipynb" in readme


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_committed_notebook(path):
    nb = read(path)
    nbformat.validate(nb)
    assert path.stat().st_size < 1_000_000

    # A title, then one sentence on the notebook's purpose.
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    title, purpose = first.source.split("\n", 1)
    assert title.startswith("# ")
    assert len(re.findall(r"[.!?](\s|$)", purpose.strip())) == 1

    # The first code cell: the imports and the seed.
    cells = code_cells(nb)
    setup = cells[0].source
    assert "import bayesflow as bf" in setup
    assert "import torch" in setup
    assert "import matplotlib.pyplot as plt" in setup
    assert "torch.manual_seed(0)" in setup
    assert 'os.environ.get("BAYESFLOW_NOTEBOOK_QUICK") == "1"' in setup

    # Committed executed top to bottom, with their outputs and no error.
    counts = [c.execution_count for c in cells]
    assert counts == list(range(1, len(cells) + 1))
    outputs = [o for c in cells for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if o.get("name") == "stderr" and "Traceback" in o.text]
    assert any("image/png" in o.get("data", {}) for o in outputs)

    # Public API only: no private bayesflow module, nothing defined in the library's name.
    for cell in cells:
        assert not re.search(r"bayesflow\._[a-z]|bf\._[a-z]|from \.", cell.source)


def execute(nb, tmp_path, monkeypatch):
    r"""Executes `nb` at reduced size in a fresh kernel, in `tmp_path`."""

    monkeypatch.setenv("BAYESFLOW_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    client = nbclient.NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on any error


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    # A temporary copy: executing never rewrites the committed notebook.
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    before = path.read_bytes()

    nb = read(copy)
    execute(nb, tmp_path, monkeypatch)

    outputs = [o for c in code_cells(nb) for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert path.read_bytes() == before


# The notebooks that split a fixed data set (the digits) into training and test images.
# (02 draws a new data set in the cell that splits it: run again, both parts are new.)
FIXED_SPLITS = ["05_digits_uncertainty", "07_posteriors_compared"]


@pytest.mark.parametrize("name", FIXED_SPLITS)
def test_split_is_the_same_when_run_again(name, tmp_path, monkeypatch):
    # A split drawn from the global generator changes when its cell runs again, after
    # anything else has drawn: its test set then holds images the models were trained on.
    cells = code_cells(read(NOTEBOOKS / f"{name}.ipynb"))
    k = next(i for i, c in enumerate(cells) if re.search(r"^x_test\b.*=", c.source, re.M))
    again = (
        "first = x_train.clone(), x_test.clone()\n"
        "torch.rand(3)  # anything that draws from the global generator\n"
        f"{cells[k].source}\n"
        "assert torch.equal(first[0], x_train) and torch.equal(first[1], x_test)\n"
    )
    new = nbformat.v4.new_code_cell
    nb = nbformat.v4.new_notebook(cells=[new(c.source) for c in cells[: k + 1]] + [new(again)])
    execute(nb, tmp_path, monkeypatch)
