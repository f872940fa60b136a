"""runwatch: watch long training runs from inside and out.

The bare install is the in-trainer agent, the wire types, the query client and
the CLI; ``runwatch[server]`` adds the collector. ``runwatch.init`` is
:func:`runwatch.agent.init`, imported on first use so that ``import runwatch``
stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["init"]


def __getattr__(name: str) -> Any:
    if name == "init":
        from runwatch.agent import init

        return init
    raise AttributeError(f"module 'runwatch' has no attribute {name!r}")
