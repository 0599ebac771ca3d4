"""``python -m se_surgery.train``: see :mod:`se_surgery.train.cli` (``--help`` for the flags)."""

from .cli import main

raise SystemExit(main())
