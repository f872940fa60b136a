"""``python -m benchmarks.recovery``: see the package docstring."""

import sys

from benchmarks.recovery.runner import main

sys.exit(main())
