"""Storage of detection: anomalies with non-finite evidence, and detector snapshots replaced."""

from __future__ import annotations

import math

import numpy as np
from sqlalchemy import delete

from runwatch.collector.storage.anomalies import (
    AnomalyFilter,
    Found,
    count_anomalies,
    insert_anomalies,
    list_anomalies,
)
from runwatch.collector.storage.detector_state import Snapshot, load_state, save_states
from runwatch.collector.storage.runs import create_or_resume
from runwatch.collector.storage.store import Store
from runwatch.collector.storage.tables import runs
from runwatch.detectors.base import Anomaly


def new_run(store: Store, name: str = "r") -> int:
    with store.write() as conn:
        return create_or_resume(conn, "p", name)[0].id


def test_evidence_keeps_nonfinite_numbers_and_odd_values(store: Store) -> None:
    run = new_run(store)
    anomaly = Anomaly(
        kind="k" * 80,  # longer than the column: cut, not refused
        severity="critical",
        key="train/loss",
        rank=3,
        step=2**40,
        score=math.nan,  # the protocol says finite; the column must not get NaN anyway
        detector="d",
        message="m",
        evidence={  # type: ignore[dict-item]
            "nan": math.nan,
            "inf": math.inf,
            "ninf": -math.inf,
            "int": 7,
            "np": np.float32(0.5),
            "text": "why",
        },
    )
    with store.write() as conn:
        assert insert_anomalies(conn, [Found(run, 1.5, anomaly)], 2.5) == 1
        assert insert_anomalies(conn, [], 2.5) == 0
    with store.read() as conn:
        (got,) = list_anomalies(conn, run, AnomalyFilter())
        assert count_anomalies(conn, run) == {("k" * 64, "critical"): 1}
    assert (got.kind, got.rank, got.step, got.wall_time, got.created_at) == (
        "k" * 64,
        3,
        2**40,
        1.5,
        2.5,
    )
    assert got.score == 0.0
    evidence = got.evidence
    assert math.isnan(evidence.pop("nan"))  # type: ignore[arg-type]
    assert evidence == {"inf": math.inf, "ninf": -math.inf, "int": 7, "np": 0.5, "text": "why"}


def test_a_snapshot_is_replaced_and_goes_with_its_run(store: Store) -> None:
    run, other = new_run(store, "a"), new_run(store, "b")
    with store.write() as conn:
        save_states(conn, [Snapshot(run, b"\x00one", 1, 10.0), Snapshot(other, b"x", None, 10.0)])
        save_states(conn, [Snapshot(run, b"\x00two", 2, 20.0)])
    with store.read() as conn:
        assert load_state(conn, run) == Snapshot(run, b"\x00two", 2, 20.0)
        assert load_state(conn, other) == Snapshot(other, b"x", None, 10.0)
        assert load_state(conn, 12345) is None
    with store.write() as conn:
        conn.execute(delete(runs).where(runs.c.id == run))
    with store.read() as conn:
        assert load_state(conn, run) is None
