r"""scripts/browser_check.py finds what it is there to find, in a real headless Chromium."""

import importlib.util
import shutil

from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "browser_check.py"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium (scripts/docs.sh installs it: apt-get install chromium)"
)


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("browser_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def browser(check, tmp_path_factory):
    b = check.Browser(CHROMIUM, str(tmp_path_factory.mktemp("profile")))
    yield b
    b.close()


PAGES = {
    "clean": "<p>fine</p><script>console.log('a log is no error')</script>",
    "outside": '<script src="http://example.invalid/x.js"></script>',
    "console": "<script>console.error('boom')</script>",
    "exception": "<script>undefinedFunction()</script>",
    "missing": '<link rel="stylesheet" href="missing.css">',
}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("clean", None),
        ("outside", "a request leaves the machine: http://example.invalid/x.js"),
        ("console", "console error: boom"),
        ("exception", "uncaught exception: ReferenceError"),
        ("missing", "missing.css"),
    ],
)
def test_browser_check_finds_problems(check, browser, tmp_path, name, expected):
    page = tmp_path / f"{name}.html"
    page.write_text(
        f"<!doctype html><html><head><title>t</title></head><body>{PAGES[name]}</body></html>"
    )
    shot = tmp_path / "shot.png"

    problems = check.check_page(browser, page.as_uri(), False, shot, 400, 300)

    assert shot.read_bytes().startswith(b"\x89PNG")
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


def test_browser_check_wants_typeset_math(check, browser, tmp_path):
    page = tmp_path / "math.html"
    page.write_text("<!doctype html><html><body>\\(x^2\\)</body></html>")
    problems = check.check_page(browser, page.as_uri(), True, tmp_path / "s.png", 400, 300)
    assert problems == ["MathJax is not loaded"]
