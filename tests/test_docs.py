"""The API reference (docs/api/) documents every public name, by its public path.

Reads the page sources for autodoc directives; builds nothing and needs no Sphinx.
"""

import re

from pathlib import Path

import bayesflow

API = Path(__file__).resolve().parent.parent / "docs" / "api"

# `.. autofunction:: bayesflow.sample` (reStructuredText) or ```{autofunction} bayesflow.sample
# (MyST), any auto* directive.
DIRECTIVE = re.compile(r"^[ \t]*(?:\.\.[ \t]+auto\w+::|`{3,}\{auto\w+\})[ \t]*(\S+)", re.M)


def documented_names() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(API.rglob("*")):
        if path.suffix in (".rst", ".md"):
            for match in DIRECTIVE.finditer(path.read_text(encoding="utf-8")):
                found.setdefault(match.group(1), []).append(path.name)
    return found


def public_names() -> list[str]:
    names = [f"bayesflow.{name}" for name in bayesflow.__all__]
    names += [f"bayesflow.datasets.{name}" for name in bayesflow.datasets.__all__]
    return names


def test_api_reference_documents_every_public_name():
    found = documented_names()
    public = public_names()

    missing = [name for name in public if name not in found]
    assert not missing, (
        f"public names missing from the API reference: {missing}; add an autodoc directive "
        "with the public path (e.g. `.. autofunction:: bayesflow.sample`) to a topic page "
        "under docs/api/"
    )

    twice = {name: pages for name, pages in found.items() if len(pages) > 1}
    assert not twice, f"documented more than once: {twice}"

    # Only public paths: an internal one (bayesflow.posterior.sample) breaks when the modules
    # move, and a name dropped from __all__ must leave the reference too. Members of a public
    # class (bayesflow.BayesianModel.forward) are public as well.
    other = [
        name
        for name in found
        if name not in public and not any(name.startswith(f"{p}.") for p in public)
    ]
    assert not other, f"documented by a path that is not public: {other}"
