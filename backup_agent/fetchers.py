"""Image sources: the only code of the agent that opens sockets to them.

A fetcher opens a url and yields a `Source`: the announced length (or None) and an async
iterator of byte chunks. Every failure becomes a `FetchError` with a contract error code, and
every wait is bounded (connect timeout, and a stall timeout between two reads).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import re
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import asyncssh

from backup_agent.netpolicy import NetworkPolicy
from image_service.protocol.errors import ErrorCode

READ_SIZE = 1 << 20

log = logging.getLogger(__name__)


class OpFailure(Exception):
    """An operation failed with one of the contract's error codes."""

    def __init__(self, code: ErrorCode, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class Transient(OpFailure):
    """A failure worth another try (contract section 9: connection errors, 5xx, 429, a body
    cut short); anything else (4xx, checksum, format, policy) is final."""

    def __init__(self, details: str) -> None:
        super().__init__(ErrorCode.DOWNLOAD_FAILED, details)


class SourceChanged(Transient):
    """The source answered a resume with another version of the resource: the next try starts
    again from byte 0."""


@dataclass(frozen=True, slots=True)
class Validator:
    """What a resumed transfer must find unchanged: the resource's length and its strong ETag
    or, failing that, its Last-Modified date (HTTP), or its size and mtime (sftp)."""

    total: int
    tag: str


@dataclass(frozen=True, slots=True)
class Resume:
    offset: int
    validator: Validator


@dataclass(frozen=True, slots=True)
class Source:
    total: int | None
    chunks: AsyncIterator[bytes]
    # Offset of the first byte `chunks` yields: the resume offset when the source took the
    # resume request, 0 when it sends the whole resource again.
    start: int = 0
    # Set when the source can resume this resource after a drop.
    validator: Validator | None = None


@dataclass(frozen=True, slots=True)
class FetchSettings:
    connect_timeout: float = 15.0
    stall_timeout: float = 30.0
    ssh_key: str | None = None
    # Never None when connecting: asyncssh reads `known_hosts=None` as "check nothing".
    known_hosts: str = "~/.ssh/known_hosts"
    trust_on_first_use: bool = False
    policy: NetworkPolicy = field(default_factory=NetworkPolicy)


def redact(url: str) -> str:
    """A url fit for logs and error details: no user info, no query (it may carry a token)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port:
        host = f"{host}:{parts.port}"
    return parts._replace(netloc=host, query="", fragment="").geturl()


class AddressRefused(OSError):
    """The network policy refused the address a socket was about to connect to."""


class _Guard:
    """The socket factory aiohttp calls for every address it connects to (redirects included),
    after name resolution: the last moment before connect, so no DNS answer and no spelling
    of an address escapes the policy. Refusals are kept to name them in the error; `begin`
    starts the record of one connection attempt (aiohttp's connection-create trace), so that a
    connection fails as URL_NOT_ALLOWED only when the policy refused every address it had."""

    def __init__(self, policy: NetworkPolicy) -> None:
        self.policy = policy
        self.refused: list[str] = []
        self.allowed = 0

    def begin(self) -> None:
        self.refused, self.allowed = [], 0

    def check(self, address: str) -> None:
        reason = self.policy.refusal(address)
        if reason is not None:
            if reason not in self.refused:
                self.refused.append(reason)
            raise AddressRefused(errno.EACCES, reason)
        self.allowed += 1

    def socket(self, addr_info: tuple[Any, ...]) -> socket.socket:
        family, type_, proto, _canonname, sockaddr = addr_info
        self.check(str(sockaddr[0]))
        return socket.socket(family=family, type=type_, proto=proto)

    def refusal(self) -> OpFailure | None:
        """URL_NOT_ALLOWED when the policy refused every address of the failed attempt."""
        if not self.refused or self.allowed:
            return None
        return OpFailure(ErrorCode.URL_NOT_ALLOWED, "; ".join(self.refused))

    def trace(self) -> aiohttp.TraceConfig:
        config = aiohttp.TraceConfig()

        async def started(*_args: Any) -> None:
            self.begin()

        config.on_connection_create_start.append(started)
        return config


def _status_text(status: int) -> str:
    """The status as the standard names it: the server's own reason phrase is its text, which
    error details never repeat."""
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _http_validator(response: aiohttp.ClientResponse, total: int | None) -> Validator | None:
    if total is None or response.headers.get("Accept-Ranges", "").strip().lower() != "bytes":
        return None
    etag = response.headers.get("ETag", "").strip()
    if etag and not etag.startswith("W/") and len(etag) <= 256:
        return Validator(total, etag)
    modified = response.headers.get("Last-Modified", "").strip()
    if modified and len(modified) <= 64:
        return Validator(total, modified)
    return None


_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


def _check_partial(response: aiohttp.ClientResponse, resume: Resume, url: str) -> None:
    """A 206 must be the rest of the very resource that was cut short: the range asked for,
    the same length, and the same ETag (or Last-Modified, when that was the validator)."""
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "").strip())
    validator = resume.validator
    header = "ETag" if validator.tag.startswith('"') else "Last-Modified"
    if (
        match is None
        or int(match[1]) != resume.offset
        or int(match[2]) != validator.total - 1
        or int(match[3]) != validator.total
        or response.headers.get(header, "").strip() != validator.tag
    ):
        raise SourceChanged(f"{redact(url)}: the source changed during the download")


@asynccontextmanager
async def open_http(
    url: str, settings: FetchSettings, resume: Resume | None = None
) -> AsyncIterator[Source]:
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=settings.connect_timeout,
        sock_connect=settings.connect_timeout,
        sock_read=settings.stall_timeout,
    )
    guard = _Guard(settings.policy)
    # No decompression, and none asked for: the md5 and size are those of the bytes the server
    # holds, and a server that compresses anyway is refused below.
    headers = {"Accept-Encoding": "identity"}
    if resume is not None:
        headers["Range"] = f"bytes={resume.offset}-"
        headers["If-Range"] = resume.validator.tag
    connector = aiohttp.TCPConnector(socket_factory=guard.socket, use_dns_cache=False)
    async with aiohttp.ClientSession(
        connector=connector,
        trace_configs=[guard.trace()],
        timeout=timeout,
        read_bufsize=READ_SIZE,
        auto_decompress=False,
        trust_env=False,
    ) as session:
        received = 0
        try:
            async with session.get(url, max_redirects=5, headers=headers) as response:
                status = response.status
                if status == 429 or status >= 500:
                    raise Transient(f"{redact(url)}: {_status_text(status)}")
                if status not in (200, 206) or (status == 206 and resume is None):
                    raise OpFailure(
                        ErrorCode.DOWNLOAD_FAILED, f"{redact(url)}: {_status_text(status)}"
                    )
                encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise OpFailure(
                        ErrorCode.DOWNLOAD_FAILED,
                        f"{redact(url)}: the server encoded the body (Content-Encoding) although"
                        " the agent asked for none",
                    )
                start, total = 0, response.content_length
                validator: Validator | None = None
                if status == 206:
                    assert resume is not None
                    _check_partial(response, resume, url)
                    start, total, validator = (
                        resume.offset,
                        resume.validator.total,
                        resume.validator,
                    )
                else:
                    validator = _http_validator(response, total)

                async def chunks() -> AsyncIterator[bytes]:
                    nonlocal received
                    async for data in response.content.iter_chunked(READ_SIZE):
                        received += len(data)
                        yield data

                yield Source(total, chunks(), start, validator)
        except aiohttp.TooManyRedirects:
            raise OpFailure(
                ErrorCode.DOWNLOAD_FAILED, f"{redact(url)}: too many redirects"
            ) from None
        except (aiohttp.InvalidUrlRedirectClientError, aiohttp.NonHttpUrlRedirectClientError):
            raise OpFailure(
                ErrorCode.URL_NOT_ALLOWED, f"{redact(url)}: redirected to a url that is not http(s)"
            ) from None
        except aiohttp.InvalidURL:
            # aiohttp refuses non-canonical hosts (`127.1`, `2130706433`) before any connection.
            raise OpFailure(
                ErrorCode.URL_NOT_ALLOWED, f"{redact(url)}: not a valid host name or address"
            ) from None
        except aiohttp.ClientConnectorCertificateError:
            raise OpFailure(
                ErrorCode.DOWNLOAD_FAILED, f"{redact(url)}: the server's certificate is not trusted"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            refusal = guard.refusal()
            if refusal is not None:
                raise OpFailure(refusal.code, f"{redact(url)}: {refusal.details}") from None
            reason = exc.os_error.strerror or type(exc.os_error).__name__
            raise Transient(f"{redact(url)}: cannot connect: {reason}") from None
        except aiohttp.ConnectionTimeoutError:
            raise Transient(
                f"{redact(url)}: no connection within {settings.connect_timeout:g}s"
            ) from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise Transient(
                f"{redact(url)}: no data for {settings.stall_timeout:g}s after {received} bytes"
            ) from None
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, ConnectionError):
            raise Transient(f"{redact(url)}: connection lost after {received} bytes") from None
        except aiohttp.ClientError as exc:
            raise OpFailure(
                ErrorCode.DOWNLOAD_FAILED, f"{redact(url)}: {type(exc).__name__}"
            ) from None


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


async def _connect_checked(host: str, port: int, settings: FetchSettings) -> socket.socket:
    """A TCP socket to `host`, connected only to an address the policy allows; the name is
    resolved once here and the socket handed to asyncssh, so no second resolution can differ."""
    loop = asyncio.get_running_loop()
    guard = _Guard(settings.policy)
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), settings.connect_timeout
        )
    except (OSError, TimeoutError):
        raise Transient(f"cannot resolve {host}") from None
    last: OSError | None = None
    for info in infos:
        try:
            sock = guard.socket(info)
        except AddressRefused:
            continue
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, info[4]), settings.connect_timeout)
            return sock
        except (OSError, TimeoutError) as exc:
            sock.close()
            last = exc if isinstance(exc, OSError) else OSError(errno.ETIMEDOUT, "timed out")
        except BaseException:
            sock.close()
            raise
    refusal = guard.refusal()
    if refusal is not None and last is None:
        raise refusal
    reason = last.strerror if last is not None and last.strerror else "no address"
    raise Transient(f"cannot connect to {host}:{port}: {reason}")


def _sftp_reason(exc: BaseException) -> str:
    """What went wrong, by the kind of error only: an SSH or SFTP server's messages are its own
    text, which error details never repeat."""
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return "the host key is not trusted (known_hosts)"
    if isinstance(exc, asyncssh.PermissionDenied):
        return "authentication refused"
    if isinstance(exc, asyncssh.SFTPNoSuchFile):
        return "no such file"
    if isinstance(exc, asyncssh.SFTPPermissionDenied):
        return "permission denied"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


@asynccontextmanager
async def open_sftp(
    url: str, settings: FetchSettings, resume: Resume | None = None
) -> AsyncIterator[Source]:
    parts = urlsplit(url)
    if not parts.hostname or not parts.path:
        raise OpFailure(ErrorCode.DOWNLOAD_FAILED, f"{redact(url)}: no host or path")
    host, port = parts.hostname, parts.port or 22
    known_hosts, client_factory = _host_key_policy(host, port, settings)
    sock = await _connect_checked(host, port, settings)
    streaming = False  # from then on, what reaches the except clauses is the consumer's own
    try:
        async with (
            asyncssh.connect(
                host,
                port=port,
                sock=sock,
                username=unquote(parts.username) if parts.username else None,
                client_keys=[settings.ssh_key] if settings.ssh_key else (),
                known_hosts=known_hosts,
                client_factory=client_factory,
                connect_timeout=settings.connect_timeout,
                password=None,
                agent_path=None,
            ) as conn,
            _sftp_source(conn, parts.path, url, settings, resume) as source,
        ):
            streaming = True
            yield source
    except TimeoutError:
        if streaming:
            raise
        raise Transient(f"{redact(url)}: no answer for {settings.connect_timeout:g}s") from None
    except (asyncssh.ConnectionLost, asyncssh.DisconnectError, ConnectionError) as exc:
        if streaming:
            raise
        if isinstance(exc, asyncssh.HostKeyNotVerifiable | asyncssh.PermissionDenied):
            raise OpFailure(
                ErrorCode.DOWNLOAD_FAILED, f"{redact(url)}: {_sftp_reason(exc)}"
            ) from None
        raise Transient(f"{redact(url)}: connection lost ({_sftp_reason(exc)})") from None
    except (asyncssh.Error, OSError) as exc:
        if streaming:
            raise  # the writer's own error (a full disk, say) keeps its meaning
        raise OpFailure(ErrorCode.DOWNLOAD_FAILED, f"{redact(url)}: {_sftp_reason(exc)}") from None


@asynccontextmanager
async def _sftp_source(
    conn: asyncssh.SSHClientConnection,
    path: str,
    url: str,
    settings: FetchSettings,
    resume: Resume | None,
) -> AsyncIterator[Source]:
    async with (
        conn.start_sftp_client() as sftp,
        sftp.open(unquote(path), "rb") as remote,
    ):
        attrs = await remote.stat()
        size = attrs.size
        validator = (
            Validator(size, f"{size}:{attrs.mtime}") if size is not None and attrs.mtime else None
        )
        start = 0
        if resume is not None and validator == resume.validator:
            start = resume.offset
            await remote.seek(start)

        async def chunks() -> AsyncIterator[bytes]:
            received = 0
            while True:
                try:
                    async with asyncio.timeout(settings.stall_timeout):
                        data = await remote.read(READ_SIZE)
                except TimeoutError:
                    raise Transient(
                        f"{redact(url)}: no data for {settings.stall_timeout:g}s"
                        f" after {received} bytes"
                    ) from None
                except (asyncssh.ConnectionLost, asyncssh.DisconnectError, ConnectionError):
                    raise Transient(
                        f"{redact(url)}: connection lost after {received} bytes"
                    ) from None
                except (asyncssh.Error, OSError) as exc:
                    raise OpFailure(
                        ErrorCode.DOWNLOAD_FAILED, f"{redact(url)}: {_sftp_reason(exc)}"
                    ) from None
                if not data:
                    return
                assert isinstance(data, bytes)
                received += len(data)
                yield data

        yield Source(size, chunks(), start, validator)


Opener = Callable[[str, FetchSettings, Resume | None], AbstractAsyncContextManager[Source]]
OPENERS: dict[str, Opener] = {"http": open_http, "https": open_http, "sftp": open_sftp}


def opener_for(url: str) -> Opener:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in OPENERS:
        raise OpFailure(ErrorCode.URL_NOT_ALLOWED, f"unsupported url scheme {scheme!r}")
    return OPENERS[scheme]
