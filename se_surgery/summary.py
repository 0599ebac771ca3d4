"""Deprecated: ``python -m se_surgery.summary`` is ``python -m se_surgery.describe`` under its old name."""

import sys

if __name__ == "__main__":
    from se_surgery.describe import main

    print("note: python -m se_surgery.summary is deprecated; use python -m se_surgery.describe", file=sys.stderr)
    raise SystemExit(main())

# Imported rather than run: stand in for the function se_surgery.summary, which a submodule of that name would hide.
from se_surgery.surgery.cost import summary  # noqa: E402

sys.modules[__name__] = summary
