"""Helpers shared by the integration tests: reading replies, the service's state and the
agents' files, and waiting on conditions (never on the clock).

`wait_for` itself lives in `tests.conftest` and is re-exported here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Protocol

import aio_pika
import asyncpg

from image_service.protocol.names import Names
from tests.conftest import AMQP_URL, TEST_USER, Agent, EventRecorder, Stack, wait_for

__all__ = [
    "BARRIER_BINDING",
    "Service",
    "add_ready",
    "assert_serving",
    "closed_port",
    "error_of",
    "events_delivered",
    "heartbeats_handled",
    "image_count",
    "install_path",
    "md5_of",
    "outbox_empty",
    "pending_ops",
    "publish",
    "qemu_img",
    "qemu_info",
    "query_image",
    "queue_counts",
    "wait_disconnected",
    "wait_for",
    "wait_no_files",
    "wait_no_pending_ops",
]

# Events published by `events_delivered`; a recorder it is used with must bind this key too.
BARRIER_BINDING = "barrier.#"


class Service(Protocol):
    """What the helpers below need: the service's database and its APIs. Both the whole
    deployment (`Stack`) and the database with the read-only APIs only (`PgStack`) are one."""

    @property
    def db(self) -> asyncpg.Connection: ...

    async def call(
        self, api: str, params: dict[str, Any] | None = None, **kw: Any
    ) -> dict[str, Any]: ...


# --- replies ------------------------------------------------------------------------------


def error_of(reply: dict[str, Any]) -> dict[str, Any]:
    """The `error` of a failed reply, which carries every field of the contract (A.6)."""
    assert reply.get("success") is False, reply
    error: dict[str, Any] = reply["error"]
    assert {"code", "description", "details", "causes"} <= set(error), error
    return error


async def assert_serving(stack: Stack) -> None:
    """The service still answers, and its first process has not died meanwhile."""
    reply = await stack.call("QueryImage", {"conditions": [], "count": True}, timeout=15)
    assert reply["success"] is True, reply
    assert stack.services[0].running, stack.services[0].log()[-3000:]


# --- the service's state --------------------------------------------------------------------


async def query_image(service: Service, image_uuid: str) -> dict[str, Any] | None:
    """The image's inventory as QueryImage gives it, None when there is no such image."""
    reply = await service.call(
        "QueryImage", {"conditions": [{"name": "uuid", "op": "=", "value": image_uuid}]}
    )
    assert reply["success"], reply
    inventories: list[dict[str, Any]] = reply["inventories"]
    return inventories[0] if inventories else None


async def image_count(service: Service, *, through_api: bool = False) -> int:
    """How many images there are: rows of the database, or (`through_api`) QueryImage's
    count, as a caller of the service sees it."""
    if through_api:
        reply = await service.call("QueryImage", {"conditions": [], "count": True})
        assert reply["success"], reply
        return int(reply["total"])
    return int(await service.db.fetchval("SELECT count(*) FROM image"))


async def pending_ops(service: Service) -> int:
    return int(await service.db.fetchval("SELECT count(*) FROM op WHERE status = 'Pending'"))


async def wait_no_pending_ops(service: Service, timeout: float = 15) -> None:
    async def none_pending() -> bool:
        return await pending_ops(service) == 0

    await wait_for(none_pending, timeout)


async def outbox_empty(service: Service) -> bool:
    """Everything the service committed to publish has been published (and confirmed)."""
    return bool(await service.db.fetchval("SELECT count(*) FROM outbox") == 0)


async def wait_disconnected(stack: Stack, agent: Agent, timeout: float = 15) -> dict[str, Any]:
    """Until the service has declared the agent's backup storage Disconnected."""
    result: dict[str, Any] = await wait_for(
        lambda: stack.bs_status(agent.uuid, "Disconnected"), timeout=timeout
    )
    return result


# --- the broker ------------------------------------------------------------------------------


async def queue_counts(name: str) -> tuple[int, int]:
    """(message_count, consumer_count) of a queue, from a passive declare."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        result = queue.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)


async def publish(
    routing_key: str,
    body: bytes,
    *,
    url: str = AMQP_URL,
    user_id: str | None = TEST_USER,
    **properties: Any,
) -> None:
    """Publish straight to the default exchange, bypassing the service's and agents' own
    clients: for messages they would never send. By default as the broker user that the test
    stack's service and agents share (development's one account), so that the message passes
    as theirs; `user_id=None` sends it unsigned."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(
                body,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                user_id=user_id,
                **properties,
            ),
            routing_key=routing_key,
            timeout=10,
        )


async def publish_result(names: Names, backup_storage_uuid: str, body: bytes, **props: Any) -> None:
    """Publish an agent result the way agents do: on `NS.agents` under `result.<uuid>`, as the
    test stack's shared broker user (so it passes as that agent's)."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(names.agent_messages, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, user_id=TEST_USER, **props
            ),
            routing_key=names.result_key(backup_storage_uuid),
            timeout=10,
        )


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound for a moment, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- images and files -----------------------------------------------------------------------


async def add_ready(
    stack: Stack, agents: list[Agent], name: str = "img", **params: Any
) -> dict[str, Any]:
    """AddImage of 128 KiB of random raw bytes to `agents`; returns its Ready inventory."""
    url, _ = stack.http.add(f"{name}.raw", os.urandom(128 * 1024))
    reply = await stack.add_image(url, agents, name=name, **params)
    assert reply["success"], reply
    inventory: dict[str, Any] = reply["inventory"]
    assert inventory["status"] == "Ready"
    return inventory


def qemu_img(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def qemu_info(path: Path | str, fmt: str) -> dict[str, Any]:
    """`qemu-img info` of an image read as `fmt`."""
    out = qemu_img("info", "-f", fmt, "--output=json", str(path)).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def md5_of(path: Path | str) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def install_path(agent: Agent, image_uuid: str, name: str) -> Path:
    """Where the agent stores an image of that name (contract: templates/UUID/NAME.template)."""
    return agent.root / "templates" / image_uuid / f"{name}.template"


async def wait_no_files(*agents: Agent, timeout: float = 10) -> None:
    """Until none of the agents holds a stored or partial file."""

    async def empty() -> bool:
        return all(a.files() == [] for a in agents)

    await wait_for(empty, timeout=timeout)


# --- proof that time and work have passed ---------------------------------------------------
# A check that something does NOT happen cannot wait for it; these wait instead for positive
# markers that show the system has moved on, after which the negative is asserted.


async def heartbeats_handled(
    stack: Stack, agent: Agent, count: int = 3, timeout: float = 15
) -> None:
    """Until the service has handled `count` more heartbeats of `agent` (its row's
    `last_heartbeat` moved on `count` times): time measured in the service's work."""

    async def last_heartbeat() -> Any:
        return await stack.db.fetchval(
            "SELECT last_heartbeat FROM backup_storage WHERE uuid = $1", agent.uuid
        )

    seen = [await last_heartbeat()]

    async def moved_on() -> bool:
        value = await last_heartbeat()
        if value is None or value == seen[-1]:
            return False
        seen.append(value)
        return True

    for _ in range(count):
        await wait_for(moved_on, timeout, interval=0.05)


async def events_delivered(stack: Stack, recorder: EventRecorder, timeout: float = 15) -> None:
    """Until every event the service has committed so far has reached `recorder`, which must
    be subscribed to `BARRIER_BINDING`: once the outbox is empty the relay has published them
    all (with publisher confirms), and a marker published after that is queued behind them."""
    await wait_for(lambda: outbox_empty(stack), timeout)
    key = f"barrier.{uuid.uuid4().hex}"
    await stack.publish_event(key, {"barrier": key})

    async def arrived() -> bool:
        return any(k == key for k, _ in recorder.events)

    await wait_for(arrived, timeout, interval=0.05)


async def fill_images(db: asyncpg.Connection, images: int) -> None:
    """`images` images straight into the database, each with a backup storage reference (on
    one of 3 backup storages), a root volume and a user tag, then ANALYZE: the data the
    costly-query test and benchmark plan against. Image i's uuid is md5('img' || i)."""
    await db.execute(
        "INSERT INTO backup_storage (uuid, name, url, hostname)"
        " SELECT md5('bs' || i), 'bs' || i, '/bs' || i, 'h' FROM generate_series(1, 3) i"
    )
    await db.execute(
        "INSERT INTO image (uuid, name, url, status, format, media_type, platform, system, type)"
        " SELECT md5('img' || i), 'image ' || i, 'http://127.0.0.1/' || i, 'Downloading', 'raw',"
        " 'RootVolumeTemplate', 'Linux', false, 'zstack' FROM generate_series(1, $1) i",
        images,
    )
    await db.execute(
        "INSERT INTO image_backup_storage_ref (image_uuid, backup_storage_uuid, install_path,"
        " status) SELECT md5('img' || i), md5('bs' || (1 + i % 3)), '/p/' || i, 'Downloading'"
        " FROM generate_series(1, $1) i",
        images,
    )
    await db.execute(
        "INSERT INTO volume (uuid, name, vm_instance_uuid, root_image_uuid)"
        " SELECT md5('vol' || i), 'vol ' || i, md5('vm' || i), md5('img' || i)"
        " FROM generate_series(1, $1) i",
        images,
    )
    await db.execute(
        "INSERT INTO user_tag (uuid, resource_uuid, tag)"
        " SELECT md5('tag' || i), md5('img' || i), 'tag ' || i FROM generate_series(1, $1) i",
        images,
    )
    await db.execute("ANALYZE")


# --- hostile disk images ----------------------------------------------------------------------


def vmdk_descriptor(extent_path: str = "/etc/passwd") -> bytes:
    """A VMDK text descriptor whose one extent is `extent_path`: opened without -f, qemu
    serves that file (a host file, say) as the disk."""
    return (
        b"# Disk DescriptorFile\n"
        b"version=1\n"
        b"CID=fffffffe\n"
        b"parentCID=ffffffff\n"
        b'createType="monolithicFlat"\n'
        b"\n"
        b"# Extent description\n" + f'RW 2048 FLAT "{extent_path}" 0\n'.encode()
    )


def with_cd001(data: bytes, size: int = 0x9000) -> bytes:
    """`data` padded with zeros and an ISO 9660 primary volume descriptor planted at 0x8000,
    so that a declared iso can only be refused for the disk format it really is."""
    image = bytearray(data.ljust(size, b"\0"))
    image[0x8000:0x8007] = b"\x01CD001\x01"
    return bytes(image)


def luks1_header() -> bytes:
    """A LUKS1 header as cryptsetup writes it (magic, version, cipher name and mode): what to
    use when `qemu-img create -f luks` gives up, as it sometimes does on a loaded VM, because
    it benchmarks the CPU for its key derivation ("Unable to get accurate CPU usage")."""
    header = bytearray(4096)
    header[0:8] = b"LUKS\xba\xbe\x00\x01"
    header[8:11] = b"aes"
    header[40:51] = b"xts-plain64"
    header[72:78] = b"sha256"
    return bytes(header)


# --- the command line ---------------------------------------------------------------------


async def run_cli(stack: Stack, program: list[str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *program,
        "--amqp-url",
        AMQP_URL,
        "--namespace",
        stack.namespace,
        "--timeout",
        "30",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def cli(stack: Stack, *args: str) -> tuple[int, str, str]:
    """`python -m image_service.cli`."""
    return await run_cli(stack, [sys.executable, "-m", "image_service.cli"], *args)


async def image_cli(stack: Stack, *args: str) -> tuple[int, str, str]:
    """The installed `image-cli` console script."""
    return await run_cli(stack, [str(Path(sys.executable).with_name("image-cli"))], *args)
