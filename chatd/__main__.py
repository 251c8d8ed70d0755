"""``python -m chatd`` is the ``chatd`` command."""

from __future__ import annotations

from chatd.cli import main

raise SystemExit(main())
