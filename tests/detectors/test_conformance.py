"""Every series detector passes the conformance checks of ``runwatch.detectors.checks``."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest

from runwatch.detectors import checks
from runwatch.detectors.checks import Factory, conformance_cases, findings, mixed_stream
from runwatch.detectors.dead_units import DeadUnits, Saturation
from runwatch.detectors.divergence import Divergence
from runwatch.detectors.drift import ActivationDrift
from runwatch.detectors.nonfinite import NonFinite, Positive
from runwatch.detectors.spike import Spike
from runwatch.detectors.system import CounterIncrease, Drop, MemoryGrowth, Regression

FACTORIES: dict[str, Factory] = {
    "Divergence": Divergence,
    "ActivationDrift": ActivationDrift,
    "ActivationDrift(mean)": functools.partial(ActivationDrift, min_ratio=4, recent=9),
    "DeadUnits": DeadUnits,
    "Saturation": Saturation,
    "Drop": Drop,
    "Drop(gpu_util)": functools.partial(Drop, kind="gpu_util_collapse", duration_s=300),
    "Regression": Regression,
    "Regression(data_stall)": functools.partial(
        Regression, kind="data_stall", factor=2, min_value=0.05
    ),
    "MemoryGrowth": MemoryGrowth,
    "MemoryGrowth(capacity)": functools.partial(MemoryGrowth, capacity_gb=64.0),
    "CounterIncrease": CounterIncrease,
    "Spike": Spike,
    "NonFinite": NonFinite,
    "Positive": Positive,
}
CASES = conformance_cases(FACTORIES)


@pytest.mark.parametrize(
    ("factory", "check"),
    [
        pytest.param(
            factory,
            check,
            id=case_id,
        )
        for case_id, factory, check in CASES
    ],
)
def test_conformance(factory: Factory, check: Callable[[Factory], None]) -> None:
    check(factory)


def test_every_check_is_run() -> None:
    assert len(CASES) == len(FACTORIES) * len(checks.CHECKS)
    assert {case_id.split(":")[1] for case_id, _, _ in CASES} == {
        check.__name__ for check in checks.CHECKS
    }


@pytest.mark.parametrize("name", list(FACTORIES))
def test_the_stream_provokes_findings_so_the_snapshot_checks_compare_something(
    name: str,
) -> None:
    stream = mixed_stream(3)
    detector = FACTORIES[name]()
    findings(detector, stream[: len(stream) // 2])
    assert findings(detector, stream[len(stream) // 2 :]), f"{name} finds nothing: vacuous"


def test_ids_name_the_class_when_no_label_is_given() -> None:
    ids = [case_id for case_id, _, _ in conformance_cases([Drop, Drop, NonFinite])]
    assert ids[0] == "Drop:check_constructs_with_defaults"
    assert f"Drop#2:{checks.CHECKS[0].__name__}" in ids
    assert ids[-1] == f"NonFinite:{checks.CHECKS[-1].__name__}"
