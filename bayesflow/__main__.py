r"""Runs the `bayesflow` command line, as `python -m bayesflow`."""

import sys

from .cli import main

sys.exit(main())
