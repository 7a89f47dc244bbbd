"""Templates from volumes and snapshots: bring the source (and its backing chain) within
reach, then flatten it into one standalone image with `qemu-img convert -f SRC -O DST`.

A `file://` source must lie under one of the agent's `--volume-root` directories, backing
files included, so that a volume event cannot make the agent copy any file of its host. An
`sftp://` source is fetched with its backing chain into a scratch directory (host keys checked
against known_hosts), and the local copies are re-linked with `qemu-img rebase -u`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import posixpath
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from backup_agent.fetchers import FetchSettings, OpFailure, redact
from backup_agent.inspection import (
    check_content,
    image_info,
    refuse_external_data_file,
    run_qemu_img,
)
from backup_agent.transfer import Limits, Progress, receive
from image_service.protocol.errors import ErrorCode

CONVERT_TIMEOUT = 4 * 3600.0
CONVERT_MEMORY = 2 << 30
MAX_CHAIN = 16
FORMATS = frozenset({"qcow2", "raw"})
# The virtual size of the whole volume is checked once (check_virtual_size); a layer's own
# head check needs no limit of its own.
MAX_LAYER_VIRTUAL_SIZE = 1 << 62
HASH_CHUNK = 16 << 20


@dataclass(frozen=True, slots=True)
class Hashed:
    size: int
    md5: str
    sha256: str


def _within(path: Path, roots: tuple[Path, ...]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == root or root in real.parents for root in roots)


async def _check_local_chain(path: Path, fmt: str, roots: tuple[Path, ...]) -> None:
    if not roots:
        raise OpFailure(
            ErrorCode.URL_NOT_ALLOWED, "this agent serves no --volume-root for file:// sources"
        )
    if not _within(path, roots):
        raise OpFailure(ErrorCode.URL_NOT_ALLOWED, f"{path} is outside the agent's volume roots")
    if not path.is_file():
        raise OpFailure(ErrorCode.OPERATION_ERROR, f"source {path} does not exist")
    chain = await image_info(path, fmt, backing_chain=True)
    for layer in chain if isinstance(chain, list) else [chain]:
        refuse_external_data_file(layer)
        filename = Path(layer.get("filename", ""))
        if not _within(filename, roots):
            raise OpFailure(
                ErrorCode.URL_NOT_ALLOWED, f"backing file {filename} is outside the volume roots"
            )
        # A backing file whose format the layer does not name is probed by qemu: a VMDK
        # descriptor there would make the conversion read any file its extents name.
        layer_fmt = layer.get("format")
        if layer_fmt not in FORMATS:
            raise OpFailure(
                ErrorCode.UNSAFE_IMAGE, f"a layer of the volume is {layer_fmt}, not qcow2 or raw"
            )
        if layer.get("backing-filename") and layer.get("backing-filename-format") not in FORMATS:
            raise OpFailure(
                ErrorCode.UNSAFE_IMAGE, "a backing file without an explicit qcow2 or raw format"
            )
        if layer_fmt == "raw":
            # A raw layer must not be another format in disguise (format_inspector.py).
            await asyncio.to_thread(check_content, filename, "raw", MAX_LAYER_VIRTUAL_SIZE)


def _sftp_url(base: str, path: str) -> str:
    parts = urlsplit(base)
    return parts._replace(path=quote(path)).geturl()


async def _fetch_sftp_chain(
    url: str,
    fmt: str,
    workdir: Path,
    settings: FetchSettings,
    available: int,
    progress: Progress,
    limits: Limits,
) -> Path:
    """Download an sftp source and its backing files; returns the local top image."""
    workdir.mkdir(parents=True, exist_ok=True)
    top = workdir / "layer0"
    current_url, current, current_fmt = url, top, fmt
    for depth in range(MAX_CHAIN):
        await receive(
            current_url, current, settings, available=available, progress=progress, limits=limits
        )
        if current_fmt != "qcow2":
            return top
        info = await image_info(current, "qcow2")
        refuse_external_data_file(info)
        backing = info.get("backing-filename")
        if not backing:
            return top
        backing_fmt = info.get("backing-filename-format")
        if backing_fmt not in FORMATS:
            raise OpFailure(
                ErrorCode.UNSAFE_IMAGE, "a backing file without a known qcow2/raw format"
            )
        remote_dir = posixpath.dirname(unquote(urlsplit(current_url).path))
        remote = backing if posixpath.isabs(backing) else posixpath.join(remote_dir, backing)
        local = workdir / f"layer{depth + 1}"
        await run_qemu_img(
            "rebase", "-u", "-f", "qcow2", "-b", str(local), "-F", backing_fmt, str(current)
        )
        current_url, current, current_fmt = _sftp_url(url, remote), local, backing_fmt
    raise OpFailure(ErrorCode.UNSAFE_IMAGE, f"backing chain deeper than {MAX_CHAIN}")


async def materialize(
    source: str,
    fmt: str,
    workdir: Path,
    *,
    volume_roots: tuple[Path, ...],
    settings: FetchSettings,
    available: int,
    progress: Progress,
    limits: Limits,
) -> Path:
    """A local path from which `qemu-img convert` can read the whole source image."""
    if fmt not in FORMATS:
        raise OpFailure(ErrorCode.UNSAFE_IMAGE, f"source format {fmt!r} is not qcow2 or raw")
    parts = urlsplit(source)
    if parts.scheme == "file":
        path = Path(unquote(parts.path))
        await _check_local_chain(path, fmt, volume_roots)
        return path
    if parts.scheme == "sftp":
        return await _fetch_sftp_chain(source, fmt, workdir, settings, available, progress, limits)
    raise OpFailure(ErrorCode.URL_NOT_ALLOWED, f"source {redact(source)}: only file:// and sftp://")


async def flatten(source: Path, source_fmt: str, destination: Path, fmt: str) -> None:
    """A standalone image of the whole chain: no backing file is left in `destination`."""
    try:
        await run_qemu_img(
            "convert",
            "-f",
            source_fmt,
            "-O",
            fmt,
            str(source),
            str(destination),
            timeout=CONVERT_TIMEOUT,
            memory=CONVERT_MEMORY,
            cpu_seconds=int(CONVERT_TIMEOUT),
            failure_code=ErrorCode.OPERATION_ERROR,
        )
    except TimeoutError:
        raise OpFailure(ErrorCode.TIMEOUT, "qemu-img convert did not finish in time") from None


def _hash_file(path: Path, stop: threading.Event) -> Hashed:
    """md5 in this thread, sha256 in a second one, chunk by chunk while the next chunk is read;
    `stop` ends it between two chunks (a cancelled op, the agent stopping), so even a 1 TiB
    sparse file of zeros is left within a chunk's time, not after hours."""
    md5 = hashlib.md5(usedforsecurity=False)
    sha256 = hashlib.sha256()
    size = 0
    with open(path, "rb") as f, ThreadPoolExecutor(1, "sha256") as pool:
        chunk = f.read(HASH_CHUNK)
        while chunk:
            if stop.is_set():
                raise asyncio.CancelledError
            pending = pool.submit(sha256.update, chunk)
            md5.update(chunk)
            size += len(chunk)
            following = f.read(HASH_CHUNK)
            pending.result()
            chunk = following
    return Hashed(size, md5.hexdigest(), sha256.hexdigest())


async def hash_file(path: Path) -> Hashed:
    stop = threading.Event()
    work = asyncio.ensure_future(asyncio.to_thread(_hash_file, path, stop))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.gather(work, return_exceptions=True)  # the thread stops within a chunk
        raise


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
