"""Streaming an image from its source to disk, hashing it on the way.

Pieces are gathered into chunks of 4 MiB (as a list: never joined, never copied); each chunk
is hashed in one worker thread and written with writev in another at the same time (hashlib and
file writes release the GIL) while the event loop reads the next one, so memory stays at a few
chunks whatever the image size. Written data is flushed to disk every 256 MiB, so the final
fsync does not wait for a whole image's worth of dirty pages (measured in
tests/benchmarks/bench_add_image.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backup_agent.fetchers import FetchSettings, OpFailure, opener_for, redact
from image_service.protocol.errors import ErrorCode

MIN_CHUNK = 4 << 20
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
SYNC_EVERY = 256 << 20
PROGRESS_EVERY = 1.0

Progress = Callable[[int, int | None], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Received:
    size: int
    md5: str


class HashingWriter:
    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self._md5 = hashlib.md5(usedforsecurity=False)
        # Pieces as received, not joined: a join would copy every byte once more.
        self._pieces: list[bytes] = []
        self._gathered = 0
        self._pending: asyncio.Future[Any] | None = None
        # Held by whoever uses or closes the descriptor: a worker thread may still be writing
        # when the download is cancelled, and abort() must not close the descriptor under it
        # (nor let a later write reach a number that another file has taken since).
        self._fd_lock = threading.Lock()
        self._unsynced = 0
        self.size = 0

    def _hash(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self._md5.update(piece)

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
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending

    async def write(self, data: bytes) -> None:
        self._pieces.append(data)
        self._gathered += len(data)
        self.size += len(data)
        if self._gathered >= MIN_CHUNK:
            await self._hand_off()

    async def _hand_off(self) -> None:
        pieces, length = self._pieces, self._gathered
        self._pieces, self._gathered = [], 0
        await self._wait()
        loop = asyncio.get_running_loop()
        # The hash and the write of one chunk run side by side; the next chunk waits for both,
        # which keeps both the md5 updates and the writes in order.
        self._pending = asyncio.gather(
            loop.run_in_executor(None, self._hash, pieces),
            loop.run_in_executor(None, self._write, pieces, length),
        )

    async def finish(self) -> Received:
        if self._pieces:
            await self._hand_off()
        await self._wait()
        await asyncio.to_thread(self._sync_close)
        return Received(self.size, self._md5.hexdigest())

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
        if self._pending is not None:
            self._pending.add_done_callback(_consume_outcome)
            self._pending = None
        await asyncio.to_thread(self._close_quietly)


def _consume_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def receive(
    url: str,
    destination: Path,
    settings: FetchSettings,
    *,
    available: int,
    progress: Progress,
) -> Received:
    """Download `url` into `destination`; on any failure the partial file is removed."""
    opener = opener_for(url)
    writer = HashingWriter(destination)
    try:
        async with opener(url, settings) as source:
            if source.total is not None and source.total > available:
                raise OpFailure(
                    ErrorCode.CAPACITY_EXCEEDED,
                    f"the image has {source.total} bytes; {available} are available",
                )
            await progress(0, source.total)
            last_report = time.monotonic()
            async for data in source.chunks:
                await writer.write(data)
                if writer.size > available:
                    raise OpFailure(
                        ErrorCode.CAPACITY_EXCEEDED, f"more than the {available} bytes available"
                    )
                now = time.monotonic()
                if now - last_report >= PROGRESS_EVERY:
                    last_report = now
                    await progress(writer.size, source.total)
            if source.total is not None and writer.size != source.total:
                raise OpFailure(
                    ErrorCode.DOWNLOAD_FAILED,
                    f"{redact(url)}: got {writer.size} of {source.total} bytes",
                )
        received = await writer.finish()
        await progress(received.size, source.total)
        return received
    except OSError as exc:
        await writer.abort()
        destination.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OpFailure(ErrorCode.CAPACITY_EXCEEDED, f"disk full: {exc.strerror}") from None
        raise OpFailure(ErrorCode.DOWNLOAD_FAILED, f"{type(exc).__name__}: {exc}") from None
    except BaseException:
        await writer.abort()
        destination.unlink(missing_ok=True)
        raise
