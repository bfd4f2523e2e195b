"""The durable client spool: encoded WriteRequests the server could not take yet, on disk until acknowledged.

Layout: `ROOT/<client>/NNNNNNNN.seg`, one directory per live client, each held by an flock on `ROOT/<client>/lock`
for the client's lifetime. The kernel releases that lock when the process dies however it dies, so a client that
finds a sibling directory whose lock it can take knows its writer is gone, adopts it and replays it; two live
clients never replay the same directory. Ranks of one job may share ROOT (one environment variable for all).

A segment is append-only: an 8-byte magic, then records framed as

    u32 body length | u32 CRC-32 of the body | body = u32 size (points + rows) | i64 spooled-at ms | WriteRequest

Every batch of records is written, then fsynced once. A crash mid-write leaves a torn record at the end: its
length runs past the file or its CRC fails, and it is ignored (with a log line), together with anything after it.
The WriteRequest bytes are what the client sends; columnar already, so the spool costs what the wire costs. A
segment is deleted once every record in it is acknowledged (or refused for good).
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: The environment variable that turns the spool on, when `Client(spool_dir=...)` is not given.
SPOOL_DIR_ENV = "TRACKHOUSE_SPOOL_DIR"
_MAGIC = b"THSPOOL\x01"
_FRAME = struct.Struct("<II")
_BODY = struct.Struct("<Iq")
_LOCK = "lock"
_SUFFIX = ".seg"
#: No record is larger than the client ever sends; a larger length is corruption, not a record.
_MAX_RECORD = 256 * 1024 * 1024 + _BODY.size


@dataclass(eq=False, slots=True)
class Segment:
    path: Path
    fd: int
    size: int
    #: Records not yet acknowledged.
    pending: int = 0
    #: Still being appended to; a sealed segment goes once nothing in it is pending.
    active: bool = False


@dataclass(frozen=True, slots=True)
class Record:
    segment: Segment
    offset: int
    length: int
    #: Points plus run, param and tag rows.
    size: int
    spooled_at_ms: int

    def read(self) -> bytes:
        return os.pread(self.segment.fd, self.length, self.offset)


@dataclass(frozen=True, slots=True)
class SpoolDepth:
    bytes: int
    requests: int
    points: int
    #: Seconds since the oldest record still spooled was written; 0 when empty.
    oldest_age_s: float


@dataclass(eq=False, slots=True)
class _Directory:
    """One client's directory and the lock that says who owns it."""

    path: Path
    lock_fd: int
    segments: list[Segment] = field(default_factory=list)

    @classmethod
    def create(cls, root: Path) -> _Directory:
        """A new directory for this client, locked before its name appears, so no one adopts it half made."""
        name = f"{time.time_ns():020d}-{os.getpid()}-{os.urandom(4).hex()}"  # sorts by creation time
        hidden = root / f".{name}"
        hidden.mkdir(mode=0o700)
        directory = cls._lock(hidden, os.O_CREAT)
        assert directory is not None
        os.write(directory.lock_fd, f"{os.getpid()}\n".encode())
        hidden.rename(root / name)
        directory.path = root / name
        return directory

    @classmethod
    def take(cls, path: Path) -> _Directory | None:
        """Lock an existing directory; None when a live client holds it or it has gone."""
        return cls._lock(path, 0)

    @classmethod
    def _lock(cls, path: Path, create: int) -> _Directory | None:
        try:
            fd = os.open(path / _LOCK, os.O_RDWR | create, 0o600)
        except FileNotFoundError:
            return None
        import fcntl  # here, not at the top: the client imports on platforms without it, and spools only with it

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if not (path / _LOCK).exists():  # removed by the owner that just let go of it
            os.close(fd)
            return None
        return cls(path, fd)

    def remove(self) -> None:
        """Delete the directory (empty of segments), then let go of the lock."""
        for segment in self.segments:
            os.close(segment.fd)
        self.segments.clear()
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self.lock_fd)

    def release(self) -> None:
        for segment in self.segments:
            os.close(segment.fd)
        self.segments.clear()
        os.close(self.lock_fd)


class Spool:
    """Appends batches of requests, hands back records to read and release; bounded by `max_bytes`.

    Appends and releases happen on the client's sender thread; `depth()` may be read from any thread.
    """

    def __init__(self, root: Path, max_bytes: int, segment_bytes: int = 64 * 1024 * 1024) -> None:
        if max_bytes <= 0:
            raise ValueError("the spool's max_bytes must be positive")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._segment_bytes = max(1, min(segment_bytes, max_bytes // 4))
        self._lock = threading.Lock()
        self._own: _Directory | None = None  # created on the first append
        self._adopted: list[_Directory] = []
        self._next_segment = 1
        self._bytes = 0
        self._records = 0
        self._points = 0
        self._oldest: dict[Segment, int] = {}  # spooled-at ms of each segment's first record
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    # ----- recovery -----

    def adopt(self) -> tuple[list[Record], int]:
        """Take over every directory under the root whose client is dead: its records, in the order written.

        Returns the records and how many directories were skipped because a live client holds them.
        """
        records: list[Record] = []
        skipped = 0
        for path in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if path in self.directories():
                continue
            directory = _Directory.take(path)
            if directory is None:
                skipped += int(path.exists())
                continue
            found = list(self._recover(directory))
            if directory.segments:
                self._adopted.append(directory)
                records += found
            else:
                directory.remove()
        return records, skipped

    def _recover(self, directory: _Directory) -> Iterator[Record]:
        for path in sorted(directory.path.glob(f"*{_SUFFIX}")):
            fd = os.open(path, os.O_RDONLY)
            segment = Segment(path, fd, os.fstat(fd).st_size)
            found = list(_scan(segment))
            if not found:
                os.close(fd)
                path.unlink()
                continue
            directory.segments.append(segment)
            with self._lock:
                segment.pending = len(found)
                self._bytes += segment.size
                self._records += len(found)
                self._points += sum(r.size for r in found)
                self._oldest[segment] = found[0].spooled_at_ms
            yield from found

    # ----- appending -----

    def append(self, payloads: list[tuple[bytes, int]]) -> list[Record]:
        """Write (request bytes, size) in order and fsync once; returns a record for each that fit under the cap."""
        now_ms = time.time_ns() // 1_000_000
        records: list[Record] = []
        written: list[Segment] = []
        for raw, size in payloads:
            frame = _FRAME.size + _BODY.size + len(raw)
            with self._lock:
                if self._bytes + frame > self.max_bytes:
                    break
            segment = self._segment_for(frame)
            body = _BODY.pack(size, now_ms)
            crc = zlib.crc32(raw, zlib.crc32(body))
            _write_all(segment.fd, _FRAME.pack(_BODY.size + len(raw), crc) + body)
            _write_all(segment.fd, raw)
            records.append(Record(segment, segment.size + _FRAME.size + _BODY.size, len(raw), size, now_ms))
            if not written or written[-1] is not segment:
                written.append(segment)
            with self._lock:
                segment.size += frame
                segment.pending += 1
                self._bytes += frame
                self._records += 1
                self._points += size
                self._oldest.setdefault(segment, now_ms)
        for segment in written:
            os.fsync(segment.fd)
        return records

    def _segment_for(self, frame: int) -> Segment:
        own = self._own
        if own is None:
            own = self._own = _Directory.create(self.root)
        if own.segments and own.segments[-1].active:
            current = own.segments[-1]
            if current.size + frame <= self._segment_bytes or current.size == len(_MAGIC):
                return current
            self._seal(current)
        path = own.path / f"{self._next_segment:08d}{_SUFFIX}"
        self._next_segment += 1
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        _write_all(fd, _MAGIC)
        segment = Segment(path, fd, len(_MAGIC), active=True)
        own.segments.append(segment)
        # The new file's directory entry must be durable too, or an fsynced segment could vanish in a crash.
        dir_fd = os.open(own.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        with self._lock:
            self._bytes += segment.size
        return segment

    # ----- acknowledgement -----

    def release(self, record: Record) -> None:
        """The record is settled (acknowledged, or refused for good); its segment goes once all of it is."""
        segment = record.segment
        with self._lock:
            segment.pending -= 1
            self._records -= 1
            self._points -= record.size
        if segment.pending == 0:
            self._seal(segment)

    def _seal(self, segment: Segment) -> None:
        segment.active = False
        if segment.pending:
            return
        with self._lock:
            self._bytes -= segment.size
            self._oldest.pop(segment, None)
        os.close(segment.fd)
        segment.path.unlink(missing_ok=True)
        for directory in [d for d in (self._own, *self._adopted) if d is not None]:
            if segment in directory.segments:
                directory.segments.remove(segment)
                if not directory.segments and directory is not self._own:
                    self._adopted.remove(directory)
                    directory.remove()

    # ----- reporting and closing -----

    def depth(self) -> SpoolDepth:
        with self._lock:
            oldest = min(self._oldest.values(), default=None)
            age = 0.0 if oldest is None or not self._records else max(0.0, time.time() - oldest / 1000)
            return SpoolDepth(self._bytes if self._records else 0, self._records, self._points, age)

    def close(self) -> None:
        """Let go of every directory: emptied ones are deleted, the rest stay for a later client to replay."""
        for directory in [d for d in (self._own, *self._adopted) if d is not None]:
            for segment in list(directory.segments):
                self._seal(segment)
            if directory.segments:
                directory.release()
            elif directory is self._own or directory in self._adopted:
                directory.remove()
        self._own = None
        self._adopted.clear()

    def directories(self) -> list[Path]:
        return [d.path for d in (self._own, *self._adopted) if d is not None]


def _scan(segment: Segment) -> Iterator[Record]:
    """The whole records of one segment, in order; a torn or corrupt tail is logged and ignored."""
    fd, end = segment.fd, segment.size
    if os.pread(fd, len(_MAGIC), 0) != _MAGIC:
        log.warning("trackhouse spool: %s is not a spool segment (wrong header); ignored", segment.path)
        return
    offset = len(_MAGIC)
    while offset < end:
        header = os.pread(fd, _FRAME.size, offset)
        length, crc = _FRAME.unpack(header) if len(header) == _FRAME.size else (0, 0)
        body_at = offset + _FRAME.size
        body = os.pread(fd, length, body_at) if _BODY.size <= length <= min(_MAX_RECORD, end - body_at) else b""
        if not body or zlib.crc32(body) != crc:
            log.warning(
                "trackhouse spool: %s: torn or corrupt record at byte %d; the last %d bytes are ignored",
                segment.path,
                offset,
                end - offset,
            )
            return
        size, spooled_at_ms = _BODY.unpack_from(body)
        yield Record(segment, body_at + _BODY.size, length - _BODY.size, size, spooled_at_ms)
        offset = body_at + length


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
