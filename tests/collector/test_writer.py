"""The group-commit writer: exactly once inside a group, and no batch fails its neighbours."""

from __future__ import annotations

import math

import pytest

from runwatch.collector.batch import Batch
from runwatch.collector.storage.points import write_batches
from runwatch.collector.storage.queries import list_series, metric_range
from runwatch.collector.storage.runs import create_or_resume
from runwatch.collector.storage.store import Store
from runwatch.collector.storage.writer import BatchWriter


def make_batch(run: int, seq: int, *, rank: int = 0, n: int = 10, key: str = "loss") -> Batch:
    steps = list(range(seq * n, (seq + 1) * n))
    return Batch(
        run=run,
        rank=rank,
        seq=seq,
        steps=steps,
        wall_times=[1000.0 + s for s in steps],
        keys=[key] * n,
        values=[None if s % 7 == 3 else float(s) for s in steps],
    )


def new_run(store: Store, name: str = "r") -> int:
    with store.write() as conn:
        return create_or_resume(conn, "p", name)[0].id


def test_a_batch_repeated_within_one_group_is_stored_once(store: Store) -> None:
    run = new_run(store)
    first, again, other = make_batch(run, 0), make_batch(run, 0), make_batch(run, 1)
    results = write_batches(store, [first, again, other])
    assert [r.stored for r in results] == [True, False, True]
    assert [r.n_points for r in results] == [10, 0, 10]
    with store.read() as conn:
        (series,) = list_series(conn, run)
    assert series.n_points == 20
    assert (series.first_step, series.last_step, series.last_value) == (0, 19, 19.0)


def test_summaries_of_one_series_from_several_batches_are_merged(store: Store) -> None:
    run = new_run(store)
    late = make_batch(run, 0)  # older points, sent after the newer batch
    newer = make_batch(run, 1)
    write_batches(store, [newer, late])
    with store.read() as conn:
        (series,) = list_series(conn, run)
    assert series.n_points == 20 and series.first_step == 0
    assert series.last_step == 19 and series.last_wall_time == 1019.0
    assert math.isnan(list_series_value(store, run, 3))


def list_series_value(store: Store, run: int, step: int) -> float:
    with store.read() as conn:
        (series,) = list_series(conn, run)
        found = metric_range(conn, series.id, start=step, end=step)
    return found.points[0][2]


def test_a_failing_batch_does_not_fail_its_group(store: Store) -> None:
    run = new_run(store)
    writer = BatchWriter(store)
    try:
        # Submitted back to back so that they are likely to share a group; either way
        # the good batches are stored and only the one for a missing run fails.
        futures = [
            writer.submit(make_batch(run, 0)),
            writer.submit(make_batch(run + 1000, 0)),  # no such run: a foreign key fails
            writer.submit(make_batch(run, 1, rank=1)),
        ]
        assert futures[0].result(timeout=30).stored
        with pytest.raises(Exception) as failed:
            futures[1].result(timeout=30)
        assert (
            "IntegrityError" in type(failed.value).__name__
            or "foreign" in str(failed.value).lower()
        )
        assert futures[2].result(timeout=30).stored
    finally:
        writer.close()
    with store.read() as conn:
        assert {(s.rank, s.n_points) for s in list_series(conn, run)} == {(0, 10), (1, 10)}


def test_a_cancelled_request_is_dropped_and_the_writer_carries_on(store: Store) -> None:
    run = new_run(store)
    writer = BatchWriter(store)
    try:
        futures = [writer.submit(make_batch(run, seq)) for seq in range(50)]
        cancelled = [f for f in futures[10:] if f.cancel()]
        done = [f.result(timeout=30) for f in futures if f not in cancelled]
        assert all(r.stored for r in done)
        assert writer.submit(make_batch(run, 99)).result(timeout=30).stored
    finally:
        writer.close()
    with store.read() as conn:
        (series,) = list_series(conn, run)
    assert series.n_points == 10 * (len(done) + 1)
