"""What the agent does for each command: download, create (flatten a volume), delete.

Each returns the op's result or raises `OpFailure` with a contract error code. Files are
written under `.agent/partial/` and moved into `templates/` only once complete, checked and
inspected; downloads and creations share `--max-downloads` slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from backup_agent.config import AgentSettings
from backup_agent.conversion import flatten, hash_file, materialize, remove_tree
from backup_agent.fetchers import OpFailure
from backup_agent.inspection import ImageFacts, check_virtual_size, inspect_image
from backup_agent.layout import Gauge, Layout, PathRejected, allocated, fsync_dir
from backup_agent.slots import Slots
from backup_agent.transfer import Progress, receive
from image_service.protocol.agent import (
    AgentCommand,
    AgentResult,
    CreateCommand,
    DeleteCommand,
    DownloadCommand,
    FileFacts,
    InspectCommand,
    StoredFile,
)
from image_service.protocol.errors import ErrorCode

log = logging.getLogger(__name__)

ReportProgress = Callable[[str, int, int | None], Awaitable[None]]
# Whether the op (by id) was itself moving a file to the path when it stopped; it records the
# path just before each move (the callable of that name records it).
WasPlacing = Callable[[str, Path], bool]
Placing = Callable[[AgentCommand, Path], None]


class Work:
    def __init__(
        self,
        settings: AgentSettings,
        layout: Layout,
        backup_storage_uuid: str,
        running: dict[str, asyncio.Task[None]],
        report_progress: ReportProgress,
        placing: Placing,
        was_placing: WasPlacing,
        gauge: Gauge,
    ) -> None:
        self.settings = settings
        self.layout = layout
        # Measures capacity; every change under templates/ goes through `gauge.changing`.
        self.gauge = gauge
        self.uuid = backup_storage_uuid
        # The agent's running ops, by op id: a delete cancels those it names.
        self.running = running
        self._report_progress = report_progress
        self._placing = placing
        self._was_placing = was_placing
        self.limits = settings.limits
        self.slots = Slots(settings.max_downloads, settings.min_throughput)

    async def run(self, command: AgentCommand) -> AgentResult:
        if isinstance(command, DownloadCommand):
            return await self._download(command)
        if isinstance(command, CreateCommand):
            return await self._create(command)
        if isinstance(command, InspectCommand):
            return await self._inspect_stored(command)
        return await self._delete(command)

    def _target(self, command: DownloadCommand | CreateCommand | InspectCommand) -> Path:
        try:
            return self.layout.resolve_install_path(command.installPath, command.imageUuid)
        except PathRejected as exc:
            raise OpFailure(ErrorCode.INVALID_ARGUMENT, str(exc)) from None

    def _reporter(self, command: AgentCommand) -> Progress:
        async def progress(done: int, total: int | None) -> None:
            await self._report_progress(command.imageUuid, done, total)

        return progress

    async def _store(
        self,
        command: DownloadCommand | CreateCommand,
        partial: Path,
        final: Path,
        size: int,
        md5: str,
        sha256: str,
        facts: ImageFacts,
    ) -> AgentResult:
        """Move an inspected partial file into place; the op's result."""
        # A stored file is never replaced (only a delete of its image removes it), except by
        # the op that was moving it into place when the agent stopped, resumed now.
        if final.exists() and not self._was_placing(command.opId, final):
            raise OpFailure(
                ErrorCode.OPERATION_ERROR,
                f"{command.installPath} already holds a stored image; the agent never replaces one",
            )
        final.parent.mkdir(parents=True, exist_ok=True)
        self._placing(command, final)
        async with self.gauge.changing() as changed:
            before = allocated(final)  # a resumed move's own earlier file
            os.replace(partial, final)
            fsync_dir(final.parent)
            changed(allocated(final) - before)
        stored = StoredFile(
            # The path as the command named it: the service records only that one.
            installPath=command.installPath,
            size=size,
            actualSize=facts.actual_size,
            virtualSize=facts.virtual_size,
            md5Sum=md5,
            format=command.format,
            sha256Sum=sha256,
        )
        return AgentResult.stored_as(command, self.uuid, stored)

    def _refuse_size(self, size: int, available: int) -> None:
        if size > min(available, self.limits.max_image_size):
            raise OpFailure(
                ErrorCode.CAPACITY_EXCEEDED,
                f"the template has {size} bytes; {available} are available"
                f" and --max-image-size is {self.limits.max_image_size}",
            )

    async def _inspect(self, path: Path, fmt: str) -> ImageFacts:
        return await inspect_image(path, fmt, max_virtual_size=self.limits.max_virtual_size)

    async def _download(self, command: DownloadCommand) -> AgentResult:
        final = self._target(command)
        async with self.slots.download() as ticket:
            capacity = await self.gauge.measure()
            partial = self.layout.partial_path(command.opId)
            received = await receive(
                command.url,
                partial,
                self.settings.fetch,
                available=capacity.available,
                progress=self._reporter(command),
                limits=self.limits,
                declared_format=command.format,
                ticket=ticket,
            )
            try:
                await ticket.hold()  # inspection runs in a slot, whatever the transfer's pace
                for name, expected, got in (
                    ("md5", command.md5Sum, received.md5),
                    ("sha256", command.sha256Sum, received.sha256),
                ):
                    if expected and expected != got:
                        raise OpFailure(
                            ErrorCode.CHECKSUM_MISMATCH, f"expected {name} {expected}, got {got}"
                        )
                facts = await self._inspect(partial, command.format)
                return await self._store(
                    command, partial, final, received.size, received.md5, received.sha256, facts
                )
            except BaseException:
                partial.unlink(missing_ok=True)
                raise

    async def _create(self, command: CreateCommand) -> AgentResult:
        final = self._target(command)
        async with self.slots.exclusive():
            capacity = await self.gauge.measure()
            partial = self.layout.partial_path(command.opId)
            workdir = partial.with_name(f"{partial.name}.chain")
            try:
                source = await materialize(
                    command.source,
                    command.sourceFormat,
                    workdir,
                    volume_roots=self.settings.volume_roots,
                    settings=self.settings.fetch,
                    available=capacity.available,
                    progress=self._reporter(command),
                    limits=self.limits,
                )
                # Refused before a conversion of its whole virtual disk is paid for; a raw
                # template is as large as its virtual disk, so its size is known already too.
                virtual_size = await check_virtual_size(
                    source, command.sourceFormat, self.limits.max_virtual_size
                )
                if command.format == "raw":
                    self._refuse_size(virtual_size, capacity.available)
                await flatten(source, command.sourceFormat, partial, command.format)
                self._refuse_size(partial.stat().st_size, capacity.available)
                # Inspected before hashing: a refused template costs no pass over its bytes.
                facts = await self._inspect(partial, command.format)
                hashed = await hash_file(partial)
                return await self._store(
                    command, partial, final, hashed.size, hashed.md5, hashed.sha256, facts
                )
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            finally:
                remove_tree(workdir)

    async def _inspect_stored(self, command: InspectCommand) -> AgentResult:
        """Measure a stored file, and hash it when asked (RecoverImage): the service compares
        the checksums with the image's. A file that is gone is RESOURCE_NOT_FOUND, which makes
        the service drop the reference; the file is never changed here."""
        path = self._target(command)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise OpFailure(
                ErrorCode.RESOURCE_NOT_FOUND, f"{command.installPath} is gone"
            ) from None
        # qemu-img and hashing read the file: an inspect takes a slot like a transfer.
        async with self.slots.exclusive():
            try:
                facts = await self._inspect(path, command.format)
                md5 = sha256 = None
                if command.checksums and command.size in (None, size):
                    hashed = await hash_file(path)
                    size, md5, sha256 = hashed.size, hashed.md5, hashed.sha256
            except (OpFailure, OSError):
                if not path.exists():
                    raise OpFailure(
                        ErrorCode.RESOURCE_NOT_FOUND, f"{command.installPath} is gone"
                    ) from None
                raise
        inspected = FileFacts(
            size=size,
            actualSize=facts.actual_size,
            virtualSize=facts.virtual_size,
            md5Sum=md5,
            sha256Sum=sha256,
        )
        return AgentResult(
            opId=command.opId, backupStorageUuid=self.uuid, success=True, inspected=inspected
        )

    async def _delete(self, command: DeleteCommand) -> AgentResult:
        for cancel_id in command.cancelOpIds:
            task = self.running.get(cancel_id)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            self.layout.partial_path(cancel_id).unlink(missing_ok=True)
        try:
            path = self.layout.resolve_install_path(command.installPath, command.imageUuid)
        except PathRejected as exc:
            log.error("delete of %s refused: %s", command.installPath, exc)
        else:
            async with self.gauge.changing() as changed:
                freed = allocated(path)
                path.unlink(missing_ok=True)
                changed(-freed)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # only when empty
        return AgentResult.done(command, self.uuid)
