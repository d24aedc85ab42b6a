"""The documentation: every public name in the API reference, every code block runs, and the
built site reads offline.

The first tests read the sources and need no Sphinx. The site's tests check a site built by
`bash scripts/docs.sh` when `BAYESFLOW_DOCS_HTML` names it (the script sets it), or build one
into a temporary folder when Sphinx (the `docs` extra) is installed, and skip otherwise.
"""

import ast
import html.parser
import os
import re
import subprocess
import sys

from pathlib import Path

import pytest
import torch

import bayesflow

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api"
PAGES = sorted((ROOT / "docs").glob("*.md"))
# Every page with code blocks: a block needs a language; python blocks run.
CODE_PAGES = [
    ROOT / "README.md",
    *PAGES,
    ROOT / "benchmarks/RESULTS.md",
    ROOT / "benchmarks/NOTEBOOK_RESULTS.md",
    ROOT / "notebooks/README.md",
]
FENCE = re.compile(r"^([ \t]*)```([^\n`]*)\n(.*?)^\1```[ \t]*$", re.S | re.M)
NOT_RUN = "<!-- docs-test: not run ("
# Python that is shown and not run (it needs a process group, say): after a NOT_RUN comment.
SHOWN = "{code-block} python"
# A code line longer than this is cut off at the site's width (furo, 1280 px).
WIDTH = 88

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


def code_blocks(path):
    text = path.read_text(encoding="utf-8")
    for match in FENCE.finditer(text):
        info = match.group(2).strip()
        before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
        yield info, match.group(3), before, text[: match.start()].count("\n") + 1


@pytest.mark.parametrize("path", CODE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_have_a_language_and_fit(path):
    for info, code, _, line in code_blocks(path):
        assert info, (
            f"{path.name}:{line}: a code block without a language; say python (it runs), "
            "text, bash or sh"
        )
        if info not in ("python", "bash", "sh", SHOWN):  # text (output) may scroll sideways
            continue
        for i, row in enumerate(code.splitlines()):
            assert len(row) <= WIDTH, (
                f"{path.name}:{line + 1 + i}: {len(row)} characters, more than fit the site's "
                f"code blocks ({WIDTH}): {row}"
            )


@pytest.mark.parametrize(
    "path",
    [p for p in PAGES if any(info == "python" for info, *_ in code_blocks(p))],
    ids=lambda p: p.name,
)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    # Each page's python blocks, in order, as one script (as the README's).
    blocks = []
    for info, code, before, line in code_blocks(path):
        if info == SHOWN:
            assert before.startswith(NOT_RUN), f"{path.name}:{line}: say why it does not run"
            continue
        if info != "python":
            continue
        assert not before.startswith(NOT_RUN), f"{path.name}:{line}: python blocks run"
        blocks.append("\n" * (line - 1 - sum(b.count("\n") for b in blocks)) + code)
    assert blocks

    monkeypatch.chdir(tmp_path)
    torch.set_default_dtype(torch.float32)  # as a user's session; the fixture restores it
    torch.manual_seed(0)
    # A user's session on the CPU, whatever --device: the pages draw from CPU generators.
    with torch.device("cpu"):
        exec(compile("".join(blocks), str(path), "exec"), {"__name__": "__docs__"})


def test_every_skipped_block_says_why():
    for path in PAGES:
        for info, _, before, line in code_blocks(path):
            assert info != SHOWN or before.startswith(NOT_RUN), f"{path.name}:{line}"
            if before.startswith(NOT_RUN):
                reason = before[len(NOT_RUN) :]
                tests = re.findall(r"tests/\w+\.py", reason)
                assert tests and all((ROOT / t).exists() for t in tests), (
                    f"{path.name}:{line}: a block that is not run names the test that runs it"
                )


# docs/architecture.md's layers against the code.

PACKAGE = ROOT / "bayesflow"


def _layer_rows() -> list[set[str]]:
    r"""The modules of each row of the table under "The layers", bottom layer first."""

    modules = {p.stem for p in PACKAGE.glob("*.py")} | {"bench"}
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## The layers", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("|")][2:]
    rows = []
    for line in table:
        names = re.findall(r"`([\w/]+)`", line.split("|")[2])
        rows.append({n.rstrip("/") for n in names} & modules)
    return rows


def _internal_imports() -> list[tuple[str, str, str]]:
    r"""`(importer, imported, where)` for every import of one bayesflow module by another,
    at module level, inside functions and under `TYPE_CHECKING`; `bench/` is one module and
    `bayesflow` itself is `__init__`."""

    modules = {p.stem for p in PACKAGE.glob("*.py")} | {"bench"}
    found = []
    for path in sorted(PACKAGE.glob("*.py")) + sorted(PACKAGE.glob("bench/*.py")):
        in_bench = path.parent.name == "bench"
        importer = "bench" if in_bench else path.stem
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                parts = [a.name.split(".") for a in node.names]
                targets = [(p[1:] or ["__init__"])[0] for p in parts if p[0] == "bayesflow"]
            elif isinstance(node, ast.ImportFrom):
                level = node.level - in_bench  # relative to bayesflow/
                parts = (node.module or "").split(".")
                if node.level == 0 and parts[0] == "bayesflow":
                    level, parts = 1, parts[1:]
                if level == 1:
                    names = [a.name if a.name in modules else "__init__" for a in node.names]
                    targets = [parts[0]] if parts and parts[0] else names
            where = f"{path.relative_to(PACKAGE)}:{node.lineno}" if targets else ""
            found += [(importer, t, where) for t in targets if t != importer]
    return found


def test_architecture_layers_hold_every_module():
    rows = _layer_rows()
    listed = [m for row in rows for m in row]
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"} | {"bench"}
    assert sorted(listed) == sorted(modules), "docs/architecture.md: each module in one row"


def test_architecture_layers_match_the_imports():
    rows = _layer_rows()
    layer = {m: i for i, row in enumerate(rows) for m in row}
    layer["__init__"] = layer["bayesian"]  # the package re-exports the bridge
    layer["__main__"] = layer["cli"]
    upward = [
        f"{where}: {a} (row {layer[a] + 1}) imports {b} (row {layer[b] + 1})"
        for a, b, where in _internal_imports()
        if layer[b] > layer[a]
    ]
    assert not upward, "docs/architecture.md's layers: " + "; ".join(upward)


# The built site.


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    given = os.environ.get("BAYESFLOW_DOCS_HTML")
    if given:
        return Path(given)
    pytest.importorskip("sphinx", reason="the docs extra is not installed: bash scripts/docs.sh")
    pytest.importorskip("furo", reason="the docs extra is not installed: bash scripts/docs.sh")
    out = tmp_path_factory.mktemp("html")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-E",
            "-W",
            "--keep-going",
            "-q",
            "-c",
            "docs",
            ".",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        timeout=600,
    )
    return out


class _Assets(html.parser.HTMLParser):
    r"""Collects what a page loads: scripts, stylesheets, fonts, preloads, images, frames."""

    def __init__(self):
        super().__init__()
        self.loads = []
        self.base = None
        self.refresh = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "base":
            self.base = a.get("href")
        if tag == "meta" and (a.get("http-equiv") or "").lower() == "refresh":
            self.refresh = True
        if tag in ("script", "img", "iframe", "source", "audio", "video") and a.get("src"):
            self.loads.append(a["src"])
        rel = (a.get("rel") or "").lower().split()
        if tag == "link" and {"stylesheet", "preload", "icon", "modulepreload"} & set(rel):
            self.loads.append(a.get("href", ""))


def _pages(site):
    return sorted(site.rglob("*.html"))


def _is_external(url):
    return bool(re.match(r"^(https?:)?//", url.strip(), re.I))


def test_site_needs_no_network(site):
    pages = _pages(site)
    assert len(pages) > 20
    for page in pages:
        parser = _Assets()
        parser.feed(page.read_text(encoding="utf-8"))
        external = [u for u in parser.loads if _is_external(u)]
        assert not external, f"{page.relative_to(site)} loads {external}"
        base = page.parent / (parser.base or "")
        for url in parser.loads:
            if url.startswith(("data:", "#")):
                continue
            local = (base / url.split("?")[0].split("#")[0]).resolve()
            assert local.exists(), f"{page.relative_to(site)}: {url} is not in the site"

    # Stylesheets load no font or image from elsewhere (data: URIs are inline).
    for css in site.rglob("*.css"):
        text = re.sub(r"/\*.*?\*/", "", css.read_text(encoding="utf-8"), flags=re.S)
        urls = re.findall(r"url\(\s*['\"]?([^'\")]+)", text) + re.findall(
            r"@import\s+['\"]([^'\"]+)", text
        )
        external = [u for u in urls if _is_external(u)]
        assert not external, f"{css.relative_to(site)} loads {external}"


def test_site_ships_mathjax(site):
    assert (site / "_static" / "mathjax" / "tex-chtml.js").exists()
    page = (site / "docs" / "api" / "posterior.html").read_text(encoding="utf-8")
    assert re.search(r'src="\.\./\.\./_static/mathjax/tex-chtml\.js(\?v=\w+)?"', page)
    assert r"\(q(\theta)" in page  # there is math on the page for it to typeset


def test_site_index_is_a_real_page(site):
    index = site / "index.html"
    parser = _Assets()
    parser.feed(index.read_text(encoding="utf-8"))
    assert not parser.refresh, "index.html is a redirect"
    assert parser.base == "docs/"
    text = index.read_text(encoding="utf-8")
    assert "Install torch first" in text and "scripts/bench.sh" in text
    assert text.replace('\n  <base href="docs/">', "", 1) == (
        site / "docs" / "index.html"
    ).read_text(encoding="utf-8")
