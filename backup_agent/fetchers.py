"""Image sources: the only code of the agent that opens sockets to them.

A fetcher opens a url and yields a `Source`: the announced length (or None) and an async
iterator of byte chunks. Every failure becomes a `FetchError` with a contract error code, and
every wait is bounded (connect timeout, and a stall timeout between two reads).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import asyncssh

from image_service.protocol.errors import ErrorCode

READ_SIZE = 1 << 20

log = logging.getLogger(__name__)


class OpFailure(Exception):
    """An operation failed with one of the contract's error codes."""

    def __init__(self, code: ErrorCode, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True, slots=True)
class Source:
    total: int | None
    chunks: AsyncIterator[bytes]


@dataclass(frozen=True, slots=True)
class FetchSettings:
    connect_timeout: float = 15.0
    stall_timeout: float = 30.0
    ssh_key: str | None = None
    # Never None when connecting: asyncssh reads `known_hosts=None` as "check nothing".
    known_hosts: str = "~/.ssh/known_hosts"
    trust_on_first_use: bool = False


def redact(url: str) -> str:
    """A url fit for logs and error details: no user info."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return parts._replace(netloc=host).geturl()


@asynccontextmanager
async def open_http(url: str, settings: FetchSettings) -> AsyncIterator[Source]:
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=settings.connect_timeout,
        sock_connect=settings.connect_timeout,
        sock_read=settings.stall_timeout,
    )
    # No decompression: the md5 and size are those of the bytes the server holds.
    async with aiohttp.ClientSession(
        timeout=timeout, read_bufsize=READ_SIZE, auto_decompress=False
    ) as session:
        try:
            async with session.get(url, max_redirects=5) as response:
                if response.status != 200:
                    raise OpFailure(
                        ErrorCode.DOWNLOAD_FAILED,
                        f"{redact(url)}: HTTP {response.status} {response.reason}",
                    )
                yield Source(response.content_length, response.content.iter_chunked(READ_SIZE))
        except aiohttp.ClientPayloadError as exc:
            raise OpFailure(
                ErrorCode.DOWNLOAD_FAILED, f"{redact(url)}: body incomplete ({exc})"
            ) from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise OpFailure(
                ErrorCode.DOWNLOAD_FAILED, f"{redact(url)}: no data for {settings.stall_timeout:g}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise OpFailure(ErrorCode.DOWNLOAD_FAILED, f"{redact(url)}: {exc}") from None


def _known_hosts_file(settings: FetchSettings) -> Path:
    return Path(os.path.expanduser(settings.known_hosts))


def _host_pattern(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def _entries_for(path: Path, host: str, addr: str, port: int) -> tuple[Any, ...] | None:
    """What known_hosts says about this host (by name or address), as asyncssh's match gives
    it: (trusted host keys, trusted CA keys, revoked keys, x509 entries...). None when the file
    cannot be read or parsed: trust on first use must then fail closed, never take a damaged
    file for an empty one."""
    try:
        return tuple(asyncssh.read_known_hosts(str(path)).match(host, addr, port))
    except (OSError, ValueError, asyncssh.Error) as exc:
        log.error("known_hosts %s unreadable (%s): refusing unknown host keys", path, exc)
        return None


class _TrustOnFirstUse(asyncssh.SSHClient):
    """asyncssh asks this only about a key that the known_hosts it was given does not trust
    (revoked keys are refused before): accept it when the file, read again now, lists nothing
    at all for the host, and record it there, so that every later connection is checked
    against it. A key recorded meanwhile by another download is accepted if it is this one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        with self.path.open("a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # one agent, several downloads: one check-and-append
            entries = _entries_for(self.path, host, addr, port)
            if entries is None:
                return False
            if any(entries):
                trusted, revoked = entries[0], entries[2]
                return key in trusted and key not in revoked
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(f.tell() - 1)
                if f.read(1) != "\n":
                    f.write("\n")
            entry = _host_pattern(host, port)
            f.write(f"{entry} {key.export_public_key('openssh').decode().strip()}\n")
            f.flush()
            os.fsync(f.fileno())
        log.warning("trust on first use: recorded the host key of %s in %s", entry, self.path)
        return True


def _host_key_policy(
    host: str, port: int, settings: FetchSettings
) -> tuple[asyncssh.SSHKnownHosts, Callable[[], asyncssh.SSHClient] | None]:
    """The known_hosts asyncssh checks host keys against (by name and by address), read once
    here, and, only with the explicit trust-on-first-use option, the client that may accept
    the key of a host that file does not mention yet."""
    path = _known_hosts_file(settings)
    client_factory: Callable[[], asyncssh.SSHClient] | None = None
    if settings.trust_on_first_use:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        client_factory = lambda: _TrustOnFirstUse(path)  # noqa: E731
    elif not path.is_file():
        raise OpFailure(
            ErrorCode.DOWNLOAD_FAILED,
            f"no known_hosts file at {path} to check the host key of "
            f"{_host_pattern(host, port)}; add the key (ssh-keyscan) or start the agent with "
            "--trust-on-first-use",
        )
    try:
        known_hosts = asyncssh.read_known_hosts(str(path))
    except (OSError, ValueError, asyncssh.Error) as exc:
        raise OpFailure(
            ErrorCode.DOWNLOAD_FAILED, f"known_hosts {path} cannot be used: {exc}"
        ) from None
    return known_hosts, client_factory


@asynccontextmanager
async def open_sftp(url: str, settings: FetchSettings) -> AsyncIterator[Source]:
    parts = urlsplit(url)
    if not parts.hostname or not parts.path:
        raise OpFailure(ErrorCode.DOWNLOAD_FAILED, f"{redact(url)}: no host or path")
    host, port = parts.hostname, parts.port or 22
    known_hosts, client_factory = _host_key_policy(host, port, settings)
    try:
        async with (
            asyncssh.connect(
                host,
                port=port,
                username=unquote(parts.username) if parts.username else None,
                client_keys=[settings.ssh_key] if settings.ssh_key else (),
                known_hosts=known_hosts,
                client_factory=client_factory,
                connect_timeout=settings.connect_timeout,
                password=None,
                agent_path=None,
            ) as conn,
            _sftp_source(conn, parts.path, settings) as source,
        ):
            yield source
    except TimeoutError:
        raise OpFailure(
            ErrorCode.DOWNLOAD_FAILED, f"{redact(url)}: no data for {settings.stall_timeout:g}s"
        ) from None
    except (asyncssh.Error, OSError) as exc:
        raise OpFailure(
            ErrorCode.DOWNLOAD_FAILED, f"{redact(url)}: {type(exc).__name__}: {exc}"
        ) from None


@asynccontextmanager
async def _sftp_source(
    conn: asyncssh.SSHClientConnection, path: str, settings: FetchSettings
) -> AsyncIterator[Source]:
    async with (
        conn.start_sftp_client() as sftp,
        sftp.open(unquote(path), "rb") as remote,
    ):
        size = (await remote.stat()).size

        async def chunks() -> AsyncIterator[bytes]:
            while True:
                data = await asyncio.wait_for(remote.read(READ_SIZE), settings.stall_timeout)
                if not data:
                    return
                assert isinstance(data, bytes)
                yield data

        yield Source(size, chunks())


Opener = Callable[[str, FetchSettings], AbstractAsyncContextManager[Source]]
OPENERS: dict[str, Opener] = {"http": open_http, "https": open_http, "sftp": open_sftp}


def opener_for(url: str) -> Opener:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in OPENERS:
        raise OpFailure(ErrorCode.URL_NOT_ALLOWED, f"unsupported url scheme {scheme!r}")
    return OPENERS[scheme]
