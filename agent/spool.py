"""A bounded on-disk FIFO of encoded batches, for while the collector is away.

Layout: one directory per (project, run name, rank); inside it, segment files
named by the sequence number of their first frame, each a run of frames
``<4-byte big-endian length><msgpack batch>``. Frames are appended and
flushed to the OS (not fsynced: a spool protects against a collector outage,
not against the trainer's machine losing power, and an fsync per batch would
cost more than the batch). The oldest segment is read into memory when
replay starts and deleted once every frame in it was delivered; a crash in
between replays the segment again, which the collector's ``(run, rank, seq)``
idempotency absorbs.

Beyond ``max_bytes`` whole segments are dropped oldest first and their points
counted, so the newest data survives a long outage.
"""

from __future__ import annotations

import struct
from collections import deque
from pathlib import Path

import msgpack

HEADER = struct.Struct(">I")
SUFFIX = ".spool"
SEGMENTS_PER_SPOOL = 8
"""The size limit is enforced a segment at a time, so a segment is 1/8 of it."""


class Spool:
    """FIFO of frames (bytes) on disk; not thread-safe: the sender thread owns it."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = max(1, max_bytes // SEGMENTS_PER_SPOOL)
        self.dropped_points = 0
        self.dropped_batches = 0
        self.unreadable_segments = 0
        directory.mkdir(parents=True, exist_ok=True)
        found = [p for p in directory.glob(f"*{SUFFIX}") if p.stem.isdigit()]
        self._segments: deque[Path] = deque(sorted(found, key=lambda p: int(p.stem)))
        self._sizes = {path: path.stat().st_size for path in self._segments}
        self._sealed = set(self._segments)
        """Segments an earlier process wrote: never appended to, since one may end in a frame
        torn by a crash, whose length would swallow the frames written after it."""
        self._head: deque[bytes] = deque()
        """Frames of the oldest segment not yet delivered; loaded on demand."""
        self._head_loaded: Path | None = None

    def __bool__(self) -> bool:
        return bool(self._segments)

    @property
    def size(self) -> int:
        """Bytes on disk."""
        return sum(self._sizes.values())

    def append(self, seq: int, frame: bytes) -> None:
        """Add one frame at the tail; drop the oldest segments if over the limit."""
        tail = self._segments[-1] if self._segments else None
        new = (
            tail is None
            or tail == self._head_loaded
            or tail in self._sealed
            or self._sizes[tail] >= self.segment_bytes
        )
        if new:
            tail = self.directory / f"{seq:020d}{SUFFIX}"
        assert tail is not None
        with tail.open("ab") as out:  # registered only once written: a failed open adds nothing
            out.write(HEADER.pack(len(frame)) + frame)
        if new:
            self._segments.append(tail)
            self._sizes[tail] = 0
        self._sizes[tail] += HEADER.size + len(frame)
        while self.size > self.max_bytes and len(self._segments) > 1:
            self._drop_oldest()

    def peek(self) -> bytes | None:
        """The oldest frame not yet delivered, or None when the spool is empty."""
        while self._segments:
            if self._head_loaded != self._segments[0]:
                try:
                    data = self._segments[0].read_bytes()
                except OSError:  # deleted or unreadable under us: those batches are gone
                    self.unreadable_segments += 1
                    self._remove(self._segments[0])
                    continue
                self._head = deque(split_frames(data))
                self._head_loaded = self._segments[0]
            if self._head:
                return self._head[0]
            self._remove(self._segments[0])
        return None

    def pop(self) -> None:
        """Forget the frame :meth:`peek` returned: it was delivered (or given up)."""
        if self._head:
            self._head.popleft()
        if not self._head and self._segments and self._head_loaded == self._segments[0]:
            self._remove(self._segments[0])

    def _drop_oldest(self) -> None:
        oldest = self._segments[0]
        if self._head_loaded == oldest:
            frames: list[bytes] | deque[bytes] = self._head
        else:
            try:
                frames = split_frames(oldest.read_bytes())
            except OSError:
                frames = []
                self.unreadable_segments += 1
        for frame in frames:
            self.dropped_batches += 1
            self.dropped_points += point_count(frame)
        self._remove(oldest)

    def _remove(self, path: Path) -> None:
        self._segments.remove(path)
        del self._sizes[path]
        self._sealed.discard(path)
        if self._head_loaded == path:
            self._head, self._head_loaded = deque(), None
        path.unlink(missing_ok=True)


def split_frames(data: bytes) -> list[bytes]:
    """Split a segment into frames; a torn last frame (crash mid-write) is ignored."""
    frames, offset = [], 0
    while offset + HEADER.size <= len(data):
        (length,) = HEADER.unpack_from(data, offset)
        start = offset + HEADER.size
        if start + length > len(data):
            break
        frames.append(data[start : start + length])
        offset = start + length
    return frames


def point_count(frame: bytes) -> int:
    """Points in one frame; 0 if it cannot be read."""
    try:
        return len(msgpack.unpackb(frame).get("points", ()))
    except (ValueError, msgpack.UnpackException, AttributeError):
        return 0
