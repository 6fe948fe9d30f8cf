"""``python benchmarks/run.py``: the same as ``python -m benchmarks``, from a file path."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, only this file's folder is on the path: put the checkout's root first,
    # so `benchmarks` and `telemetrydeck_async` come from this checkout.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.suite import main

    raise SystemExit(main())
