r"""Opens pages of the built documentation site in headless Chromium and checks them.

    python scripts/browser_check.py docs/_build/html [--chromium /usr/bin/chromium]

For each page (the index, an API page, a notebook page, and a page with math) it checks that
the page loads with no console error, no uncaught exception, no failed load and no request
that leaves the machine (only file:, data: and blob: URLs), that MathJax typeset the math
from the copy shipped with the site, and it saves a screenshot of the top of the page into
`_screenshots/` of the site. Chromium is driven through the DevTools protocol over a pipe
(`--remote-debugging-pipe`): the standard library is all it needs. Exits 1 with the
problems listed if any check fails.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from pathlib import Path
from typing import Any

#: The pages to check: (name of the screenshot, page, whether it must show typeset math,
#: the element the screenshot starts at or None for the top).
PAGES = (
    ("index", "index.html", False, None),
    ("api", "docs/api/posterior.html", True, None),
    ("notebook", "notebooks/04_loop_vs_vmap.html", True, None),
    ("readme-quickstart", "README.html", False, "#quickstart-the-functional-api"),
)

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--mute-audio",
    "--remote-debugging-pipe",
)

LOCAL = ("file:", "data:", "blob:", "about:")


class Browser:
    r"""Chromium with the DevTools protocol on fds 3 (commands) and 4 (replies)."""

    def __init__(self, chromium: str, profile: str) -> None:
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()

        def fds() -> None:  # in the child: the pipes become its fds 3 and 4
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [chromium, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(3, 4),
            preexec_fn=fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("browser_check: no answer from Chromium")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("browser_check: Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(
        self,
        method: str,
        params: dict | None = None,
        session: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"browser_check: {method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        while True:
            for event in self.events[seen:]:
                if event.get("method") == method and event.get("sessionId") == session:
                    return
            seen = len(self.events)
            self.events.append(self._receive(deadline))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._read)
        os.close(self._write)


def _problems(events: list[dict[str, Any]], session: str) -> list[str]:
    found = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith(LOCAL):
                found.append(f"a request leaves the machine: {url}")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            found.append(f"a load failed: {params.get('errorText')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            found.append(f"console {params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            found.append(f"uncaught exception: {text}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            found.append(f"log error: {entry['text']} {entry.get('url', '')}".strip())
    return found


def check_page(
    browser: Browser,
    url: str,
    math: bool,
    screenshot: Path,
    width: int,
    height: int,
    at: str | None = None,
) -> list[str]:
    r"""Loads `url` in a fresh tab, checks it and saves a screenshot; returns the problems."""

    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
        "sessionId"
    ]
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.send(f"{domain}.enable", session=session)
    browser.send(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        session=session,
    )
    browser.send("Page.navigate", {"url": url}, session=session)
    browser.wait_for("Page.loadEventFired", session)

    problems = []
    if math:
        # MathJax typesets after the load event: wait for its promise, then count.
        found = browser.send(
            "Runtime.evaluate",
            {
                "expression": "(async () => { if (!window.MathJax) return -1;"
                " await MathJax.startup.promise;"
                " return document.querySelectorAll('mjx-container').length; })()",
                "awaitPromise": True,
                "returnByValue": True,
            },
            session=session,
        )["result"].get("value")
        if found == -1:
            problems.append("MathJax is not loaded")
        elif not found:
            problems.append("no typeset math (mjx-container) on the page")
    time.sleep(0.3)  # late console messages
    browser.send("Runtime.evaluate", {"expression": "0"}, session=session)

    options: dict[str, Any] = {"format": "png"}
    if at is not None:
        top = browser.send(
            "Runtime.evaluate",
            {
                "expression": f"(e => e ? e.getBoundingClientRect().top + window.scrollY : null)"
                f"(document.querySelector({json.dumps(at)}))",
                "returnByValue": True,
            },
            session=session,
        )["result"].get("value")
        if top is None:
            problems.append(f"no {at} on the page")
        else:
            clip = {"x": 0, "y": max(0, top - 16), "width": width, "height": height, "scale": 1}
            options.update(clip=clip, captureBeyondViewport=True)
    shot = browser.send("Page.captureScreenshot", options, session=session)
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    problems += _problems(browser.events, session)
    browser.send("Target.closeTarget", {"targetId": target})
    return problems


def find_chromium(given: str | None) -> str | None:
    if given:
        return given
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the built site, e.g. docs/_build/html")
    parser.add_argument("--chromium", help="the browser (default: chromium on the PATH)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)

    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("browser_check: no chromium on the PATH (apt-get install chromium)", file=sys.stderr)
        return 1
    site = args.site.resolve()
    out = site / "_screenshots"
    out.mkdir(exist_ok=True)

    failed = False
    with tempfile.TemporaryDirectory(prefix="browser-check-") as profile:
        browser = Browser(chromium, profile)
        try:
            browser.send("Target.setDiscoverTargets", {"discover": False})
            for name, page, math, at in PAGES:
                path = site / page
                if not path.exists():
                    print(f"browser_check: {page}: missing from the site", file=sys.stderr)
                    failed = True
                    continue
                shot = out / f"{name}.png"
                start = time.perf_counter()
                problems = check_page(
                    browser, path.as_uri(), math, shot, args.width, args.height, at
                )
                took = time.perf_counter() - start
                status = "ok" if not problems else "FAILED"
                print(f"browser_check: {page}: {status} ({took:.1f} s), screenshot {shot}")
                for problem in problems:
                    print(f"  {problem}", file=sys.stderr)
                failed |= bool(problems)
        finally:
            browser.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
