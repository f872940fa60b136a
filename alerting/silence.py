"""Silence matchers: which alerts a silence holds back.

A silence is a set of matchers over an alert's run (name glob), run_id (exact), kind, key
and severity (globs); an alert is silenced when every matcher matches. Silences suppress
notifications only: the alert is still recorded, deduplicated and counted.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

FIELDS = ("run", "run_id", "kind", "key", "severity")
"""What a matcher may name: run (a glob on the run's name), run_id (exact), kind, key and
severity (globs). Stdlib only, so that the CLI of a trainer-side install can check too."""


def silence_matches(
    matchers: Mapping[str, Any], *, run: str, run_id: int, kind: str, key: str, severity: str
) -> bool:
    values = {"run": run, "kind": kind, "key": key, "severity": severity}
    for name, pattern in matchers.items():
        if name == "run_id":
            if int(pattern) != run_id:
                return False
        elif not fnmatch.fnmatchcase(values[name], str(pattern)):
            return False
    return True


def check_matchers(matchers: Mapping[str, Any]) -> dict[str, Any]:
    """The matchers, checked: known fields, at least one, globs as text, run_id a number.
    :class:`ValueError` saying what is wrong otherwise."""
    if not matchers:
        raise ValueError(f"a silence needs at least one matcher ({', '.join(FIELDS)})")
    unknown = sorted(set(matchers) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown matcher {', '.join(unknown)} (known: {', '.join(FIELDS)})")
    checked: dict[str, Any] = {}
    for name, value in matchers.items():
        if name == "run_id":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError("run_id is a run's id: a positive whole number")
        elif not isinstance(value, str) or not 1 <= len(value) <= 256:
            raise ValueError(f"matcher {name} is a glob of 1 to 256 characters")
        checked[name] = value
    return checked
