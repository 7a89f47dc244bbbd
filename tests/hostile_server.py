"""An HTTP image source that misbehaves on request, for the hostile-source tests.

A real aiohttp server on 127.0.0.1 (port 0) that can also listen on other loopback addresses
(127.0.0.2, ::1), each a "site" with a port of its own, so that a test can prove that a refused
redirect or a refused address never reached a site. Every request is recorded as a `Hit`: the
route, the name, the site that took it, the headers that matter (Range, If-Range,
Accept-Encoding), the status, and the body bytes written to the socket.

Routes (NAME is a key of `blobs`, unique per test case; hits are counted per NAME):

- `/blob/NAME`: the bytes of `blobs[NAME]`. Query parameters:
    - `ranges=1|0` (default 1): with 1, `Accept-Ranges: bytes` and a strong ETag, and a
      `Range: bytes=N-` request (with a matching `If-Range`, or none) gets 206 with
      `Content-Range: bytes N-(total-1)/total`; with 0, neither header, and Range is ignored.
    - `drops=A,B,...`: request i (0-based) sends the body up to the absolute offset drops[i]
      and then closes the connection (the Content-Length still promises the whole rest).
    - `fail=STATUS&fail_count=K`: the first K requests (K=-1: all) get STATUS with a reason
      phrase, a body and a header that all contain "SECRET-" (never to be quoted back).
    - `gzip=1`: the body gzip-compressed with `Content-Encoding: gzip`, whatever the request's
      Accept-Encoding said.
    - `rate=BYTES_PER_S`: throttled, in ten steps a second.
    - `broken206=1`: a Range request gets 206 whatever its If-Range says (a broken cache).
    A NAME added with several versions (`add_versions`) serves version i to request i (the
    last one from then on): a resource republished between two tries.
- `/endless/NAME`: zeros without end and without a Content-Length (chunked), until the client
  goes away.
- `/huge/NAME?length=N`: announces `Content-Length: N`, then sends 64 KiB of zeros every 50 ms
  until the client goes away.
- `/drip/NAME?interval=S&length=N`: announces `Content-Length: N` (default 1 GiB), then one byte
  every S seconds until the client goes away (noticed within 50 ms, so teardown is quick).
- `/redirect/NAME?to=URL&code=302`: a redirect to any URL at all (file://, another site...).

Every handler that waits ends within 50 ms of the client leaving or of `stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import re
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

CHUNK = 1 << 20
POLL = 0.05
SECRET = "SECRET-"
_RANGE = re.compile(r"^bytes=(\d+)-$")


def ipv6_loopback_available() -> bool:
    """Whether ::1 can be bound on this machine."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@dataclass
class Hit:
    """One request as the server saw it."""

    route: str
    name: str
    host: str  # the local address (site) that accepted it
    index: int  # 0-based count of earlier requests for this name
    headers: dict[str, str]
    status: int = 0
    sent: int = 0  # body bytes handed to the socket
    dropped: bool = False

    @property
    def range(self) -> str | None:
        return self.headers.get("Range")

    @property
    def range_start(self) -> int | None:
        match = _RANGE.match(self.range or "")
        return int(match[1]) if match else None


@dataclass
class HostileServer:
    hosts: tuple[str, ...] = ("127.0.0.1",)
    blobs: dict[str, bytes] = field(default_factory=dict)
    versions: dict[str, list[bytes]] = field(default_factory=dict)
    log: list[Hit] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    # --- set up and tear down ------------------------------------------------------------

    async def start(self) -> HostileServer:
        app = web.Application()
        app.router.add_get("/blob/{name}", self._blob)
        app.router.add_get("/endless/{name}", self._endless)
        app.router.add_get("/huge/{name}", self._huge)
        app.router.add_get("/drip/{name}", self._drip)
        app.router.add_get("/redirect/{name}", self._redirect)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        for host in self.hosts:
            site = web.TCPSite(self._runner, host, 0)
            await site.start()
            server = site._server
            assert server is not None and server.sockets
            self.ports[host] = int(server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> HostileServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- what the tests use ------------------------------------------------------------

    def url(self, route: str, name: str, host: str | None = None, **query: Any) -> str:
        host = host or self.hosts[0]
        netloc = f"[{host}]" if ":" in host else host
        text = f"http://{netloc}:{self.ports[host]}/{route}/{name}"
        if query:
            text += "?" + urlencode({k: str(v) for k, v in query.items()})
        return text

    def add(self, name: str, data: bytes) -> str:
        """Serve `data` as NAME; returns its md5."""
        self.blobs[name] = data
        return hashlib.md5(data).hexdigest()

    def add_versions(self, name: str, *versions: bytes) -> list[str]:
        """Serve version i to request i of NAME (the last one from then on); their md5s."""
        self.blobs[name] = versions[0]
        self.versions[name] = list(versions)
        return [hashlib.md5(v).hexdigest() for v in versions]

    def hits(self, name: str | None = None, host: str | None = None) -> list[Hit]:
        return [
            h
            for h in self.log
            if (name is None or h.name == name) and (host is None or h.host == host)
        ]

    def sent(self, name: str) -> int:
        return sum(h.sent for h in self.hits(name))

    # --- the routes ------------------------------------------------------------------

    def _record(self, request: web.Request, route: str) -> Hit:
        name = request.match_info["name"]
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        wanted = ("Range", "If-Range", "Accept-Encoding")
        hit = Hit(
            route=route,
            name=name,
            host=str(sockname[0]) if sockname else "",
            index=len(self.hits(name)),
            headers={k: request.headers[k] for k in wanted if k in request.headers},
        )
        self.log.append(hit)
        return hit

    @staticmethod
    def _gone(request: web.Request) -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    async def _wait(self, request: web.Request, seconds: float) -> bool:
        """Sleep `seconds`; False as soon as the client has gone or the server stops."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while True:
            if self._gone(request) or self._stopping.is_set():
                return False
            left = until - loop.time()
            if left <= 0:
                return True
            await asyncio.sleep(min(POLL, left))

    @staticmethod
    def _secret_response(hit: Hit, status: int) -> web.Response:
        hit.status = status
        return web.Response(
            status=status,
            reason=f"{SECRET}reason {hit.name}",
            text=f"{SECRET}body: internal token 1234 for {hit.name}\n",
            headers={"X-Debug": f"{SECRET}header", "Retry-After": "0"},
        )

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        hit = self._record(request, "blob")
        query = request.query
        data = self.blobs.get(hit.name)
        if hit.name in self.versions:
            versions = self.versions[hit.name]
            data = versions[min(hit.index, len(versions) - 1)]
        if data is None:
            hit.status = 404
            return web.Response(status=404)
        fail = int(query.get("fail", "0"))
        fail_count = int(query.get("fail_count", "-1"))
        if fail and (fail_count < 0 or hit.index < fail_count):
            return self._secret_response(hit, fail)

        headers = {"Content-Type": "application/octet-stream"}
        status, start = 200, 0
        if query.get("gzip") == "1":
            data = gzip.compress(data, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        elif query.get("ranges", "1") == "1":
            etag = f'"{hashlib.md5(data).hexdigest()}"'
            headers["Accept-Ranges"] = "bytes"
            headers["ETag"] = etag
            match = _RANGE.match(request.headers.get("Range", ""))
            if_range = request.headers.get("If-Range")
            unchanged = if_range in (None, etag) or query.get("broken206") == "1"
            if match and int(match[1]) < len(data) and unchanged:
                status, start = 206, int(match[1])
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        headers["Content-Length"] = str(len(data) - start)

        drops = [int(x) for x in query.get("drops", "").split(",") if x]
        drop_at = drops[hit.index] if hit.index < len(drops) else None
        end = len(data) if drop_at is None else max(start, min(drop_at, len(data)))
        rate = int(query.get("rate", "0"))
        step = max(1, rate // 10) if rate else CHUNK

        hit.status = status
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        view = memoryview(data)
        position = start
        try:
            while position < end:
                piece = view[position : min(end, position + step)]
                await response.write(piece)
                hit.sent += len(piece)
                position += len(piece)
                if rate and not await self._wait(request, 0.1):
                    return response
            if drop_at is not None:
                hit.dropped = True
                assert request.transport is not None
                request.transport.close()  # flushes what was written, then closes
                return response
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client went away
        return response

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        hit = self._record(request, "endless")
        hit.status = 200
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        zeros = bytes(CHUNK)
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not self._gone(request) and not self._stopping.is_set():
                await response.write(zeros)
                hit.sent += len(zeros)
        return response

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        hit = self._record(request, "huge")
        hit.status = 200
        length = int(request.query.get("length", str(2**50)))
        response = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        )
        await response.prepare(request)
        piece = bytes(64 * 1024)
        with contextlib.suppress(ConnectionError, RuntimeError):
            while await self._wait(request, POLL):
                await response.write(piece)
                hit.sent += len(piece)
        return response

    async def _drip(self, request: web.Request) -> web.StreamResponse:
        hit = self._record(request, "drip")
        hit.status = 200
        interval = float(request.query.get("interval", "1"))
        length = int(request.query.get("length", str(2**30)))
        response = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        )
        await response.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):
            while hit.sent < length and not self._gone(request):
                await response.write(b"\0")
                hit.sent += 1
                if not await self._wait(request, interval):
                    break
        return response

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        hit = self._record(request, "redirect")
        hit.status = int(request.query.get("code", "302"))
        return web.Response(status=hit.status, headers={"Location": request.query["to"]})
