"""Image sources: the only code of the agent that opens sockets to them.

A fetcher opens a url and yields a `Source`: the announced length (or None) and an async
iterator of byte chunks. Every failure becomes a `FetchError` with a contract error code, and
every wait is bounded (connect timeout, and a stall timeout between two reads).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import aiohttp
import asyncssh

READ_SIZE = 1 << 20


class OpFailure(Exception):
    """An operation failed with one of the contract's error codes."""

    def __init__(self, code: str, details: str) -> None:
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
    known_hosts: str | None = None


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
                        "DOWNLOAD_FAILED",
                        f"{redact(url)}: HTTP {response.status} {response.reason}",
                    )
                yield Source(response.content_length, response.content.iter_chunked(READ_SIZE))
        except aiohttp.ClientPayloadError as exc:
            raise OpFailure("DOWNLOAD_FAILED", f"{redact(url)}: body incomplete ({exc})") from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise OpFailure(
                "DOWNLOAD_FAILED", f"{redact(url)}: no data for {settings.stall_timeout:g}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise OpFailure("DOWNLOAD_FAILED", f"{redact(url)}: {exc}") from None


@asynccontextmanager
async def open_sftp(url: str, settings: FetchSettings) -> AsyncIterator[Source]:
    parts = urlsplit(url)
    if not parts.hostname or not parts.path:
        raise OpFailure("DOWNLOAD_FAILED", f"{redact(url)}: no host or path")
    try:
        async with (
            asyncssh.connect(
                parts.hostname,
                port=parts.port or 22,
                username=unquote(parts.username) if parts.username else None,
                client_keys=[settings.ssh_key] if settings.ssh_key else (),
                known_hosts=settings.known_hosts,
                connect_timeout=settings.connect_timeout,
                password=None,
                agent_path=None,
            ) as conn,
            conn.start_sftp_client() as sftp,
            sftp.open(unquote(parts.path), "rb") as remote,
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
    except TimeoutError:
        raise OpFailure(
            "DOWNLOAD_FAILED", f"{redact(url)}: no data for {settings.stall_timeout:g}s"
        ) from None
    except (asyncssh.Error, OSError) as exc:
        raise OpFailure("DOWNLOAD_FAILED", f"{redact(url)}: {type(exc).__name__}: {exc}") from None


Opener = Callable[[str, FetchSettings], AbstractAsyncContextManager[Source]]
OPENERS: dict[str, Opener] = {"http": open_http, "https": open_http, "sftp": open_sftp}


def opener_for(url: str) -> Opener:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in OPENERS:
        raise OpFailure("URL_NOT_ALLOWED", f"unsupported url scheme {scheme!r}")
    return OPENERS[scheme]
