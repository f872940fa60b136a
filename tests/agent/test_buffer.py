"""The point buffer: bounded, never blocking, and it drops the least important points first."""

from __future__ import annotations

import threading

import pytest

from runwatch.agent.buffer import CRITICAL, DETAIL, SYSTEM, PointBuffer


def test_overflow_drops_oldest_lower_priority_first() -> None:
    buffer = PointBuffer(capacity=10)
    buffer.put_vector(0, ["d0", "d1", "d2"], [0.0, 1.0, 2.0], DETAIL)
    buffer.put_vector(1, ["d3", "d4", "d5"], [0.0, 1.0, 2.0], DETAIL)
    buffer.put_scalars(0, {"cpu": 1.0, "mem": 2.0}, SYSTEM)
    buffer.put_scalars(0, {"loss": 1.0, "lr": 0.1}, CRITICAL)  # 10 points: full
    buffer.put_scalars(1, {"loss": 0.9, "lr": 0.1}, CRITICAL)  # evicts the oldest detail record
    assert buffer.dropped["queue_overflow"] == 3
    buffer.put_scalars(1, {"cpu": 1.0, "mem": 2.0}, SYSTEM)  # evicts the other detail record
    assert buffer.dropped["queue_overflow"] == 6
    buffer.put_scalars(2, {"loss": 0.8, "lr": 0.1, "val": 1.0}, CRITICAL)  # evicts system, step 0
    assert buffer.dropped["queue_overflow"] == 8
    buffer.put_vector(2, ["d6", "d7"], [0.0, 1.0], DETAIL)  # nothing lower to evict: dropped
    assert buffer.dropped["queue_overflow"] == 10
    records = buffer.drain()
    assert [(r.step, r.size) for r in records] == [(0, 2), (1, 2), (2, 3), (1, 2)]
    assert len(buffer) == 0


def test_critical_points_are_dropped_only_when_the_queue_is_all_critical() -> None:
    buffer = PointBuffer(capacity=4)
    for step in range(3):
        buffer.put_scalars(step, {"loss": 1.0, "lr": 0.1}, CRITICAL)
    assert buffer.dropped["queue_overflow"] == 2
    assert [r.step for r in buffer.drain()] == [0, 1]  # the newest is dropped, not the oldest


def test_a_record_larger_than_the_queue_is_dropped_whole() -> None:
    buffer = PointBuffer(capacity=2)
    buffer.put_scalars(0, {"a": 1.0}, DETAIL)
    buffer.put_scalars(0, {"a": 1.0, "b": 2.0, "c": 3.0}, CRITICAL)
    assert buffer.dropped["queue_overflow"] == 3
    assert len(buffer) == 1


def test_put_copies_the_callers_dict() -> None:
    buffer = PointBuffer()
    metrics = {"loss": 1.0}
    buffer.put_scalars(0, metrics)
    metrics["loss"] = 2.0
    assert buffer.drain()[0].values == {"loss": 1.0}


def test_wait_returns_early_once_enough_points_are_queued() -> None:
    buffer = PointBuffer()
    buffer.ready_size = 3
    assert not buffer.wait(0.01)
    threading.Timer(0.05, buffer.put_scalars, (0, {"a": 1.0, "b": 2.0, "c": 3.0})).start()
    assert buffer.wait(5)
    buffer.drain()
    assert not buffer.wait(0.01)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        PointBuffer(capacity=0)
