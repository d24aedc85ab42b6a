r"""Sphinx configuration of the bayesflow documentation site.

Build it with ``bash scripts/docs.sh``: it installs the ``docs`` extra into ``.venv`` and runs
``sphinx-build -W --keep-going -c docs . docs/_build/html``.

Why Sphinx + furo + myst-nb (rather than mkdocs-material + mkdocstrings): bayesflow's
docstrings are written for Sphinx, in zuko's style: Google-style ``Arguments:``/``Returns:``
sections, which ``sphinx.ext.napoleon`` reads, and reStructuredText roles (``:math:``,
``:func:``, ``:class:``, ``:py:``) and ``.. math::`` blocks, which autodoc renders as they
are and which mkdocstrings would show verbatim. It is also zuko's own stack, so both projects'
references look and cross-link alike, and myst-nb renders the committed notebooks (outputs
and figures included) without running them, while myst-parser reads the existing Markdown
pages unchanged.

Why the source directory is the repository root (``-c docs .``) and not ``docs/``: the pages
live where the repository keeps them (``README.md``, ``docs/*.md``, ``notebooks/*.ipynb``,
``benchmarks/RESULTS.md``) and link to each other by their repository paths
(``docs/training.md``, ``../benchmarks/RESULTS.md``, ``results/paper.png``). With the root as
source directory every such link resolves as it does on GitHub, nothing is copied or
rewritten, and ``include_patterns`` below picks the pages out of the tree.

Adding a page: put it under ``docs/`` and add one line to a toctree in ``docs/index.md``;
an API entry goes into one of the topic pages under ``docs/api/`` (``tests/test_docs.py``
checks that every public name has one).
"""

from __future__ import annotations

import sys

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's bayesflow, installed or not

import bayesflow  # noqa: E402

## Project

project = "bayesflow"
author = "the bayesflow authors"
copyright = "the bayesflow authors"
version = release = bayesflow.__version__

## Sources

root_doc = "docs/index"
include_patterns = [
    "README.md",
    "docs/**",
    "notebooks/README.md",
    "notebooks/*.ipynb",
    "benchmarks/RESULTS.md",
]
exclude_patterns = [
    ".venv",
    ".git",
    "docs/_build",
    "**/.ipynb_checkpoints",
]

## Extensions

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # MathJax 3 (its es5 bundle, fonts included) shipped with the site in _static/mathjax,
    # in place of Sphinx's CDN: the pages read offline. From PyPI, in the docs extra.
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "myst_nb",  # brings myst_parser along
]

# Docstrings: Google style, as in zuko.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
}
autodoc_inherit_docstrings = False
# Type hints in the signatures: with "description", autodoc leaves the string annotations of
# a class's __init__ (``from __future__ import annotations``) unevaluated, so aliases such as
# ``InitLogvar`` would show up as bare, unlinked names.
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
python_maximum_signature_line_length = 88

# No intersphinx: the build runs without internet, so references to torch, zuko and the
# standard library's collections.abc cannot be resolved. Those, and the bare `Tensor` of the
# NamedTuples' string annotations, are the only references let through unresolved: with
# `nitpicky`, every other reference, and every reference to a bayesflow name, must resolve.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|zuko)\..*"),
    (r"py:class", r"collections\.abc\..*"),
    (r"py:class", r"Tensor"),
]

# Notebooks are rendered with their committed outputs, never executed. No widget
# JavaScript (it would load require.js and the widget manager from a CDN): the notebooks
# have no widgets.
nb_execution_mode = "off"
nb_ipywidgets_js: dict = {}
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

## HTML

html_theme = "furo"
html_title = f"{project} {version}"
html_theme_options = {"sidebar_hide_name": False}
html_show_sourcelink = False
html_copy_source = False
# Code blocks scroll sideways with a visible scrollbar, and the content column is a little
# wider than furo's, so that the shape comments of the examples are not cut off.
html_static_path = ["_static"]
html_css_files = ["bayesflow.css"]

# As in zuko's docstrings: single backticks are inline code, and :py:`...` is Python code.
default_role = "literal"
rst_prolog = """
.. role:: py(code)
    :class: highlight
    :language: python
"""


def _write_index(app: object, exception: Exception | None) -> None:
    # The root document is docs/index, built as docs/index.html. The site's own index.html
    # is the same page, with a <base> so that its relative links resolve from docs/: a
    # real page, not a redirect (which headless browsers may not follow).
    if exception is None and getattr(app, "builder", None) and app.builder.format == "html":
        page = (Path(app.outdir) / "docs" / "index.html").read_text(encoding="utf-8")
        head = "<head>"
        if head not in page:
            raise RuntimeError("docs/conf.py: expected a <head> in docs/index.html")
        page = page.replace(head, f'{head}\n  <base href="docs/">', 1)
        (Path(app.outdir) / "index.html").write_text(page, encoding="utf-8")


def _skip_namedtuple_fields(
    app: object, what: str, name: str, obj: object, skip: bool, options: object
) -> bool | None:
    # A NamedTuple's fields come with generated docstrings ("Alias for field number 0"); the
    # class docstring's "Attributes:" section documents them instead.
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


def setup(app: object) -> None:
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
    app.connect("build-finished", _write_index)
