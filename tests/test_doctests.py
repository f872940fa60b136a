"""Docstring examples are tests: every module of runwatch, its agent and alerting runs its own."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import runwatch
import runwatch.agent
import runwatch.alerting

MODULES = sorted(
    {
        info.name
        for package in (runwatch, runwatch.agent, runwatch.alerting)
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")
        if not info.name.endswith("__main__")
    }
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
