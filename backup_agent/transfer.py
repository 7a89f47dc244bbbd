"""Streaming an image from its source to disk, hashing it on the way.

Pieces are gathered into chunks of 4 MiB (as a list: never joined, never copied); md5, sha256
and the writev of the chunks are three lanes, each a thread taking the chunks in order
(hashlib and file writes release the GIL) while the event loop reads the next ones, so memory
stays at a few chunks whatever the image size, and the second digest costs no time on two
cores (measured in tests/benchmarks/bench_add_image.py). Written data is flushed to disk every 256 MiB, so the final
fsync does not wait for a whole image's worth of dirty pages (measured in
tests/benchmarks/bench_add_image.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backup_agent.fetchers import (
    FetchSettings,
    OpFailure,
    Resume,
    SourceChanged,
    Transient,
    Validator,
    opener_for,
    redact,
)
from backup_agent.format_inspector import HeadCollector, UnsafeContent, check_head
from backup_agent.slots import Ticket
from image_service.protocol.errors import ErrorCode

MIN_CHUNK = 4 << 20
IN_FLIGHT = 3
METER_SAMPLES = 64
LANES = ("md5", "sha256", "write")
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
SYNC_EVERY = 256 << 20
PROGRESS_EVERY = 1.0

log = logging.getLogger(__name__)

Progress = Callable[[int, int | None], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Received:
    size: int
    md5: str
    sha256: str


@dataclass(frozen=True, slots=True)
class Limits:
    """What one download may cost (contract section 9)."""

    max_image_size: int = 2 << 40
    max_virtual_size: int = 16 << 40
    deadline: float = 21600.0
    min_throughput: int = 65536
    throughput_window: float = 60.0
    retries: int = 4
    backoff: float = 1.0


class Meter:
    """Judges a source's throughput over the last `window` seconds: slower than `minimum`
    bytes a second over a whole window fails the download. It keeps a sample per 1/64 of the
    window at most, not one per chunk: a fast source sends thousands of chunks a second."""

    def __init__(self, minimum: int, window: float) -> None:
        self.minimum = minimum
        self.window = window
        self.moved = 0
        self.restart()

    def restart(self) -> None:
        """A new window from now: time spent waiting for a slot or between two tries is the
        agent's, not the source's."""
        self.started = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque([(self.started, self.moved)])

    def add(self, count: int) -> None:
        self.moved += count
        now = time.monotonic()
        samples = self._samples
        if now - samples[-1][0] >= self.window / METER_SAMPLES:
            samples.append((now, self.moved))
        # Keep one sample at or before the window's start, and none older.
        while len(samples) > 2 and samples[1][0] <= now - self.window:
            samples.popleft()
        if now - self.started >= self.window and samples[0][0] <= now - self.window:
            rate = (self.moved - samples[0][1]) / (now - samples[0][0])
            if rate < self.minimum:
                raise OpFailure(
                    ErrorCode.DOWNLOAD_FAILED,
                    f"the source sent {rate:.0f} bytes/s over the last {self.window:g}s;"
                    f" the minimum is {self.minimum} (--min-throughput)",
                )


class HashingWriter:
    """md5, sha256 and the write of the file are three lanes, each taking the chunks in order in
    a thread of its own, so that each runs as fast as it can alone: in lockstep (the next chunk
    waiting for all three) the disk sat idle while md5 ran and a second digest made ingest
    slower on two cores. At most `IN_FLIGHT` chunks are between the lanes."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._sha256 = hashlib.sha256()
        # Pieces as received, not joined: a join would copy every byte once more.
        self._pieces: list[bytes] = []
        self._gathered = 0
        self._executor = ThreadPoolExecutor(len(LANES), thread_name_prefix="ingest")
        self._lanes: dict[str, asyncio.Future[None] | None] = dict.fromkeys(LANES)
        self._in_flight: deque[asyncio.Future[Any]] = deque()
        # Held by whoever uses or closes the descriptor: a worker thread may still be writing
        # when the download is cancelled, and abort() must not close the descriptor under it
        # (nor let a later write reach a number that another file has taken since).
        self._fd_lock = threading.Lock()
        self._unsynced = 0
        self.size = 0

    def _hash_md5(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self._md5.update(piece)

    def _hash_sha256(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self._sha256.update(piece)

    def _write(self, pieces: list[bytes], length: int) -> None:
        with self._fd_lock:
            if self._fd < 0:
                return  # aborted meanwhile
            self._write_all(pieces)
            self._unsynced += length
            if self._unsynced >= SYNC_EVERY:
                os.fdatasync(self._fd)
                self._unsynced = 0

    def _write_all(self, pieces: list[bytes]) -> None:
        queue: list[bytes | memoryview] = [piece for piece in pieces if piece]
        start = 0
        while start < len(queue):
            written = os.writev(self._fd, queue[start : start + IOV_MAX])
            if written == 0:
                raise OSError(errno.EIO, "writev wrote nothing")
            # Skip what was written; a short write leaves the rest of one piece for next time.
            while written:
                piece = queue[start]
                if written >= len(piece):
                    written -= len(piece)
                    start += 1
                else:
                    queue[start] = memoryview(piece)[written:]
                    written = 0

    async def _wait(self) -> None:
        while self._in_flight:
            await self._in_flight.popleft()

    async def write(self, data: bytes) -> None:
        self._pieces.append(data)
        self._gathered += len(data)
        self.size += len(data)
        if self._gathered >= MIN_CHUNK:
            await self._hand_off()

    def _submit(self, lane: str, job: Callable[[], None]) -> asyncio.Future[None]:
        """`job` after the lane's previous job (and failing when that one failed)."""
        previous = self._lanes[lane]
        loop = asyncio.get_running_loop()

        async def run() -> None:
            if previous is not None:
                await previous
            await loop.run_in_executor(self._executor, job)

        future = asyncio.ensure_future(run())
        self._lanes[lane] = future
        return future

    async def _hand_off(self) -> None:
        pieces, length = self._pieces, self._gathered
        self._pieces, self._gathered = [], 0
        self._in_flight.append(
            asyncio.gather(
                self._submit("md5", lambda: self._hash_md5(pieces)),
                self._submit("sha256", lambda: self._hash_sha256(pieces)),
                self._submit("write", lambda: self._write(pieces, length)),
            )
        )
        while len(self._in_flight) > IN_FLIGHT:
            await self._in_flight.popleft()

    async def restart(self) -> None:
        """Back to byte 0: the source sends the whole image again."""
        self._pieces, self._gathered = [], 0
        await self._wait()
        self._lanes = dict.fromkeys(LANES)
        await asyncio.to_thread(self._truncate)
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._sha256 = hashlib.sha256()
        self.size = 0

    def _truncate(self) -> None:
        with self._fd_lock:
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._unsynced = 0

    async def finish(self) -> Received:
        if self._pieces:
            await self._hand_off()
        await self._wait()
        self._executor.shutdown(wait=False)
        await asyncio.to_thread(self._sync_close)
        return Received(self.size, self._md5.hexdigest(), self._sha256.hexdigest())

    def _sync_close(self) -> None:
        with self._fd_lock:
            fd, self._fd = self._fd, -1
            if fd < 0:
                return
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _close_quietly(self) -> None:
        with self._fd_lock:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    async def abort(self) -> None:
        # Waits (in a thread) for a write in progress to release the descriptor; never closes
        # it twice. The outcome of the last hand-off no longer matters: consume it quietly.
        for future in (*self._in_flight, *self._lanes.values()):
            if future is not None:
                future.add_done_callback(_consume_outcome)
        self._in_flight.clear()
        self._lanes = dict.fromkeys(LANES)
        self._executor.shutdown(wait=False)
        await asyncio.to_thread(self._close_quietly)


def _consume_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _backoff(attempt: int, base: float) -> float:
    """Exponential, capped at 30 s, with full jitter so that many agents cut off by one
    outage do not come back in step."""
    return random.uniform(0, min(30.0, base * 2 ** (attempt - 1)))


async def receive(
    url: str,
    destination: Path,
    settings: FetchSettings,
    *,
    available: int,
    progress: Progress,
    limits: Limits = Limits(),
    declared_format: str | None = None,
    ticket: Ticket | None = None,
) -> Received:
    """Download `url` into `destination`; on any failure the partial file is removed.

    A transient failure is retried `limits.retries` times with backoff, resuming where the
    source allows it; the whole download, retries included, ends by `limits.deadline`. With
    `declared_format`, the head of the stream must show that format (format_inspector) before
    any more is stored."""
    opener = opener_for(url)
    writer = HashingWriter(destination)
    head = HeadCollector()
    meter = Meter(limits.min_throughput, limits.throughput_window)
    limit = min(available, limits.max_image_size)

    def too_big(size: int) -> OpFailure:
        if size > limits.max_image_size:
            return OpFailure(
                ErrorCode.CAPACITY_EXCEEDED,
                f"the image has more than {limits.max_image_size} bytes (--max-image-size)",
            )
        return OpFailure(
            ErrorCode.CAPACITY_EXCEEDED, f"the image has {size} bytes; {available} are available"
        )

    def inspect() -> None:
        if declared_format is None:
            return
        try:
            check_head(
                head.head,
                declared_format,
                max_virtual_size=limits.max_virtual_size,
                complete=False,
            )
        except UnsafeContent as exc:
            raise OpFailure(ErrorCode.UNSAFE_IMAGE, str(exc)) from None

    # What the source said it can resume, as of its last answer.
    known: Validator | None = None

    async def transfer(resume: Resume | None) -> None:
        nonlocal known
        async with opener(url, settings, resume) as source:
            known = source.validator
            meter.restart()
            if source.start == 0 and writer.size:
                await writer.restart()  # the source sends the whole image again
                head.reset()
            elif source.start != writer.size:
                raise OpFailure(ErrorCode.INTERNAL_ERROR, "resumed at the wrong offset")
            if source.total is not None and source.total > limit:
                raise too_big(source.total)
            await progress(writer.size, source.total)
            last_report = time.monotonic()
            async for data in source.chunks:
                if not head.full and head.feed(data):
                    inspect()  # a bad header stops the download at once
                    if ticket is not None and await ticket.claim():
                        meter.restart()  # the rest streams in a slot (slots.py)
                elif ticket is not None and await ticket.keep_pace():
                    meter.restart()
                await writer.write(data)
                if writer.size > limit:
                    raise too_big(writer.size)
                meter.add(len(data))
                if ticket is not None:
                    ticket.add(len(data))
                now = time.monotonic()
                if now - last_report >= PROGRESS_EVERY:
                    last_report = now
                    await progress(writer.size, source.total)
            if source.total is not None and writer.size != source.total:
                raise Transient(f"{redact(url)}: got {writer.size} of {source.total} bytes")
            await progress(writer.size, source.total)

    try:
        async with asyncio.timeout(limits.deadline):
            resume: Resume | None = None
            attempt = 0
            while True:
                try:
                    await transfer(resume)
                    break
                except Transient as exc:
                    attempt += 1
                    if attempt > limits.retries:
                        raise OpFailure(exc.code, f"{exc.details} ({attempt} attempts)") from None
                    log.info("download of %s: %s; retrying", redact(url), exc.details)
                    if isinstance(exc, SourceChanged):
                        known = None  # not the same resource any more: from byte 0
                    resume = Resume(writer.size, known) if known and writer.size else None
                    await asyncio.sleep(_backoff(attempt, limits.backoff))
        # A file shorter than the head is judged whole by the inspection of the stored file.
        return await writer.finish()
    except TimeoutError:
        await _discard(writer, destination)
        raise OpFailure(
            ErrorCode.DOWNLOAD_FAILED,
            f"{redact(url)}: not finished within {limits.deadline:g}s (--download-deadline)",
        ) from None
    except OSError as exc:
        await _discard(writer, destination)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OpFailure(ErrorCode.CAPACITY_EXCEEDED, f"disk full: {exc.strerror}") from None
        raise OpFailure(
            ErrorCode.DOWNLOAD_FAILED, f"storing the image failed: {exc.strerror}"
        ) from None
    except BaseException:
        await _discard(writer, destination)
        raise


async def _discard(writer: HashingWriter, destination: Path) -> None:
    await writer.abort()
    destination.unlink(missing_ok=True)
