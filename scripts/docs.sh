#!/usr/bin/env bash
# Sets up .venv with the docs extra and builds the documentation site into docs/_build/html,
# warnings as errors; then checks it: the site's tests (no page loads anything from the
# network, MathJax ships with the site, index.html is a real page) and a real headless
# browser (Chromium: each page type loads with no console error and no outside request; the
# screenshots land in docs/_build/html/_screenshots/). Extra arguments go to sphinx-build.
# BAYESFLOW_DOCS_NO_BROWSER=1 skips the browser check (e.g. without root to install Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh docs
# shellcheck disable=SC1091
. .venv/bin/activate
# The source directory is the repository root (see docs/conf.py). -E: every page is read
# again, so a second run reports the same warnings as the first.
python -m sphinx -E -W --keep-going -c docs . docs/_build/html "$@"

export BAYESFLOW_DOCS_HTML="$PWD/docs/_build/html"
if [[ "${BAYESFLOW_DOCS_NO_BROWSER:-}" == 1 ]]; then
  python -m pytest -q -p no:cacheprovider tests/test_docs.py -k site
  echo "docs: BAYESFLOW_DOCS_NO_BROWSER=1: no browser check"
  exit 0
fi

chromium_path() { command -v chromium || command -v chromium-browser || true; }

if [[ -z "$(chromium_path)" ]]; then
  # Debian's chromium, installed the way CI's fresh machine can: as root, or with sudo.
  sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    if sudo -n true 2>/dev/null; then
      sudo=(sudo -n)
    else
      echo "docs: no chromium, and no root to install it (apt-get install chromium);" >&2
      echo "docs: install it, or set BAYESFLOW_DOCS_NO_BROWSER=1 to skip the browser check" >&2
      exit 1
    fi
  fi
  for attempt in 1 2 3; do
    if "${sudo[@]}" apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq \
        chromium > /dev/null; then
      break
    fi
    echo "docs: installing chromium failed (attempt $attempt)" >&2
    [[ $attempt == 3 ]] && exit 1
    sleep 10
  done
fi

# The site's tests, and the tests of the browser check itself (now that Chromium is here).
python -m pytest -q -p no:cacheprovider tests/test_docs.py tests/test_browser_check.py \
  -k "site or browser_check"
python scripts/browser_check.py docs/_build/html --chromium "$(chromium_path)"
