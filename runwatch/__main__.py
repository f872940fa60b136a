"""``python -m runwatch`` is the ``runwatch`` command."""

from runwatch.cli import main

main()
