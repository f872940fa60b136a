"""The on-disk spool: bounded, ordered, and robust to what a crash or a tidy-up leaves behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import msgpack
import pytest

from runwatch.agent.spool import Spool, point_count


def frame(n: int, points: int = 1) -> bytes:
    return msgpack.packb(
        {"rank": 0, "seq": n, "heartbeat": 0.0, "points": [[0, 0.0, "k", 1.0]] * points}
    )


def replay(spool: Spool) -> list[int]:
    seqs = []
    while (head := spool.peek()) is not None:
        seqs.append(msgpack.unpackb(head)["seq"])
        spool.pop()
    return seqs


def test_frames_come_back_in_order_across_segments_and_reopening(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=8 * 200)  # segments of ~200 bytes: a few frames each
    for n in range(10):
        spool.append(n, frame(n))
    assert len(list(tmp_path.glob("*.spool"))) > 1
    assert replay(Spool(tmp_path, max_bytes=8 * 200)) == list(range(10))  # a new process
    assert replay(spool) == []  # the first process's view: the other one took them


def test_over_the_limit_the_oldest_segments_are_dropped_and_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=8 * 300)
    for n in range(200):
        spool.append(n, frame(n, points=3))
    assert spool.size <= 8 * 300 + 300
    kept = replay(spool)
    assert kept == list(range(200 - len(kept), 200)), "the newest batches survive"
    assert spool.dropped_batches == 200 - len(kept)
    assert spool.dropped_points == 3 * spool.dropped_batches


def test_a_frame_torn_by_a_crash_does_not_swallow_the_next_process_frames(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=2**20)
    spool.append(1, frame(1))
    segment = next(tmp_path.glob("*.spool"))
    with segment.open("ab") as out:
        out.write(b"\x00\x00\x00\x40" + frame(2)[:10])  # a 64-byte header, then the crash
    after_crash = Spool(tmp_path, max_bytes=2**20)
    for n in (100, 101, 102):
        after_crash.append(n, frame(n))
    assert replay(after_crash) == [1, 100, 101, 102]


def test_stray_files_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "backup.spool").write_bytes(b"not a segment")
    spool = Spool(tmp_path, max_bytes=2**20)
    spool.append(5, frame(5))
    assert replay(spool) == [5]


def test_a_spool_removed_under_the_agent_loses_those_batches_not_the_spool(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = Spool(directory, max_bytes=2**20)
    spool.append(1, frame(1))
    shutil.rmtree(directory)  # a tmp cleaner
    assert spool.peek() is None and spool.unreadable_segments == 1
    with pytest.raises(OSError):
        spool.append(2, frame(2))  # the directory is gone: the caller counts the loss
    assert not spool, "a segment that was never written must not be listed"
    directory.mkdir()
    spool.append(3, frame(3))
    assert replay(spool) == [3]


def test_point_count_of_a_frame() -> None:
    assert point_count(frame(0, points=7)) == 7
    assert point_count(b"\xc1") == 0
