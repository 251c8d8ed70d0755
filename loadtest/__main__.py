"""``python -m loadtest``."""

from __future__ import annotations

import sys

from loadtest.cli import main

try:
    code = main()
except KeyboardInterrupt:
    print("loadtest: interrupted", file=sys.stderr)
    code = 130
raise SystemExit(code)
