"""``python -m benchmarks.scenarios``; see the package docstring."""

from __future__ import annotations

import sys

from benchmarks.scenarios.runner import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; collector stopped", file=sys.stderr)
        sys.exit(130)
