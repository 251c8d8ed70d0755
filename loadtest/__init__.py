"""chatd's load harness: a client of the wire protocol (never imports ``chatd.server``).

``python -m loadtest SCENARIO [options]``; see docs/benchmarks.md and :mod:`loadtest.cli`.
"""

from __future__ import annotations
