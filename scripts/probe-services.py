#!/usr/bin/env python3
"""Is RabbitMQ (AMQP login) or PostgreSQL (login without a password) really usable?

Standard library only, so that it runs before the project and its dependencies are installed:

    probe-services.py amqp [--url amqp://guest:guest@127.0.0.1:5672/] [--wait SECONDS]
    probe-services.py postgres [--url postgresql://postgres@127.0.0.1:5432/postgres] [--wait S]

Exit status: 0 usable; 1 nothing answers (or it is still starting); 3 it answers but refuses
the login (wrong password, no permission on the vhost, pg_hba.conf wants a password).
With --wait it retries "nothing answers" until the time is up.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import struct
import sys
import time
from urllib.parse import unquote, urlsplit

UNREACHABLE = 1
REFUSED = 3


class Unreachable(Exception):
    """Nothing answers, or the server is not ready yet: worth waiting for."""


class Refused(Exception):
    """The server answers but will not let us in: waiting will not help."""


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise Unreachable("connection closed by the server")
        data += chunk
    return data


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise Unreachable(f"{host}:{port}: {exc}") from None


# --- AMQP 0-9-1: protocol header, Start/StartOk (PLAIN), Tune/TuneOk, Open/OpenOk, Close --------


def _shortstr(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("!B", len(raw)) + raw


def _longstr(raw: bytes) -> bytes:
    return struct.pack("!I", len(raw)) + raw


def _amqp_send(sock: socket.socket, class_id: int, method_id: int, args: bytes) -> None:
    payload = struct.pack("!HH", class_id, method_id) + args
    sock.sendall(struct.pack("!BHI", 1, 0, len(payload)) + payload + b"\xce")


def _amqp_recv(sock: socket.socket) -> tuple[int, int, bytes]:
    frame_type, _channel, size = struct.unpack("!BHI", _recv_exactly(sock, 7))
    payload = _recv_exactly(sock, size)
    _recv_exactly(sock, 1)  # frame end
    if frame_type != 1:
        return 0, 0, payload
    class_id, method_id = struct.unpack("!HH", payload[:4])
    return class_id, method_id, payload[4:]


def _close_reason(args: bytes) -> str:
    code, length = struct.unpack("!HB", args[:3])
    return f"{code} {args[3 : 3 + length].decode(errors='replace')}"


def probe_amqp(url: str, timeout: float) -> str:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672
    user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    with _connect(host, port, timeout) as sock:
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        try:
            class_id, method_id, _ = _amqp_recv(sock)
        except (Unreachable, struct.error):
            raise Unreachable(f"{host}:{port} does not speak AMQP 0-9-1 (yet)") from None
        if (class_id, method_id) != (10, 10):
            raise Unreachable(f"{host}:{port}: unexpected AMQP method {class_id}.{method_id}")
        response = b"\x00" + user.encode() + b"\x00" + password.encode()
        # client-properties {"capabilities": {"authentication_failure_close": true}}: so that
        # a refused login is answered with Connection.Close and a reason, not a bare reset.
        capabilities = _shortstr("authentication_failure_close") + b"t\x01"
        properties = _shortstr("capabilities") + b"F" + _longstr(capabilities)
        start_ok = (
            _longstr(properties) + _shortstr("PLAIN") + _longstr(response) + _shortstr("en_US")
        )
        _amqp_send(sock, 10, 11, start_ok)
        try:
            class_id, method_id, args = _amqp_recv(sock)
        except (Unreachable, OSError):
            raise Refused(f"login as {user!r} refused") from None
        if (class_id, method_id) == (10, 50):
            raise Refused(f"login as {user!r} refused: {_close_reason(args)}")
        if (class_id, method_id) != (10, 30):
            raise Unreachable(f"unexpected AMQP method {class_id}.{method_id} after login")
        channel_max, frame_max, _heartbeat = struct.unpack("!HIH", args[:8])
        _amqp_send(sock, 10, 31, struct.pack("!HIH", channel_max, frame_max, 0))
        _amqp_send(sock, 10, 40, _shortstr(vhost) + _shortstr("") + b"\x00")
        class_id, method_id, args = _amqp_recv(sock)
        if (class_id, method_id) == (10, 50):
            raise Refused(f"vhost {vhost!r} refused for {user!r}: {_close_reason(args)}")
        _amqp_send(sock, 10, 50, struct.pack("!H", 200) + _shortstr("probe done") + b"\0" * 4)
        with contextlib.suppress(Unreachable, OSError):
            _amqp_recv(sock)  # Close-Ok
    return f"RabbitMQ at {host}:{port} accepts {user!r} on vhost {vhost!r}"


# --- PostgreSQL: StartupMessage, then AuthenticationOk and ReadyForQuery -----------------------


def _pg_error(body: bytes) -> tuple[str, str]:
    fields: dict[str, str] = {}
    for item in body.split(b"\x00"):
        if item:
            fields[chr(item[0])] = item[1:].decode(errors="replace")
    return fields.get("C", ""), fields.get("M", "")


def probe_postgres(url: str, timeout: float) -> str:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5432
    user = unquote(parts.username or "postgres")
    database = unquote(parts.path[1:]) if len(parts.path) > 1 else "postgres"
    with _connect(host, port, timeout) as sock:
        params = b"".join(
            key.encode() + b"\x00" + value.encode() + b"\x00"
            for key, value in (("user", user), ("database", database))
        )
        body = struct.pack("!I", 196608) + params + b"\x00"
        sock.sendall(struct.pack("!I", len(body) + 4) + body)
        while True:
            kind = _recv_exactly(sock, 1)
            (length,) = struct.unpack("!I", _recv_exactly(sock, 4))
            payload = _recv_exactly(sock, length - 4)
            if kind == b"E":
                code, message = _pg_error(payload)
                if code in ("57P03", "53300"):  # starting up / too many connections
                    raise Unreachable(message)
                raise Refused(f"{code} {message}")
            if kind == b"R":
                (auth,) = struct.unpack("!I", payload[:4])
                if auth != 0:
                    raise Refused(
                        f"PostgreSQL asks {user!r} for a password (auth method {auth}): "
                        f"pg_hba.conf must trust {user} on {host}"
                    )
            if kind == b"Z":
                sock.sendall(b"X" + struct.pack("!I", 4))
                return f"PostgreSQL at {host}:{port} accepts {user!r} on {database!r}"


PROBES = {
    "amqp": (probe_amqp, "amqp://guest:guest@127.0.0.1:5672/"),
    "postgres": (probe_postgres, "postgresql://postgres@127.0.0.1:5432/postgres"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("service", choices=sorted(PROBES))
    parser.add_argument("--url", help="what to log in to (default: the contract's defaults)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    probe, default_url = PROBES[args.service]
    deadline = time.monotonic() + args.wait
    while True:
        try:
            message = probe(args.url or default_url, 5.0)
        except Refused as exc:
            print(f"probe {args.service}: {exc}", file=sys.stderr)
            return REFUSED
        except (Unreachable, OSError, struct.error) as exc:
            if time.monotonic() >= deadline:
                if not args.quiet:
                    print(f"probe {args.service}: not reachable: {exc}", file=sys.stderr)
                return UNREACHABLE
            time.sleep(1.0)
            continue
        if not args.quiet:
            print(f"probe {args.service}: {message}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
