"""Who may say what on the bus (contract section 8), attacked on the real broker.

One deployment for the whole module, on a vhost of its own, with the least-privilege users that
deploy/rabbitmq/setup-users.sh creates: the service as `NS-image-service`, two agents A and B as
`NS-backup-agent-<uuid>` (each pinned to its uuid, taking commands only from the service), the
test's client as `NS-image-cli`. The attacker, `NS-mallory`, holds ordinary broker credentials:
the same permissions as `NS-image-cli`, as another tenant's console would. The test's own broker
user (guest) gets full rights on the vhost, to inspect queues, to play the volume service, and
to stand for a user that could publish anything anywhere (the service's last line of defence).

Two layers are attacked:
- the broker's permissions. An agent's user may publish only to `NS.agents` under its own keys
  `result.<uuid>` / `heartbeat.<uuid>` (topic permissions), to `NS.events` under
  `image.progress.*`, and never to the default exchange: it can neither speak for another
  backup storage (nor squat a newly enrolled one's uuid), nor send commands to another agent,
  nor call the API. Mallory cannot publish to `NS.agents` at all, nor read or reconfigure
  anyone's queues, nor sign as someone else. Each refusal's ACCESS_REFUSED / PRECONDITION_FAILED
  text is asserted.
- the service's and the agents' own checks, for what the broker lets through. The service drops
  a result or heartbeat that did not come through `NS.agents` under the key of the backup
  storage its body names (say straight to `NS.results` through the default exchange, or through
  amq.direct), that has no user_id, that comes from a user other than its backup storage's, or
  (results) that names another backup storage's op or a file other than the command's; an agent
  drops a command not signed by the service's user; the service drops volume events that did
  not come through `NS.events` and never replies to its internal queues.

Each attack is replayed unsigned, signed by mallory and, where it applies, by the other agent's
user; then the database rows, the files and their md5 must be exactly as before, the service or
agent must have logged why it dropped the message (or the broker refused it), and ordinary calls
still work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aio_pika
import aiormq
import asyncpg
import pytest
import pytest_asyncio

from image_service.protocol.client import ApiClient
from image_service.protocol.names import Names
from tests.conftest import (
    AMQP_URL,
    TEST_USER,
    Agent,
    FileServer,
    Proc,
    Stack,
    _drop_database,
    clone_database,
    wait_for,
)
from tests.helpers import (
    add_ready,
    error_of,
    heartbeats_handled,
    install_path,
    md5_of,
    query_image,
    wait_disconnected,
)

REPO = Path(__file__).resolve().parents[2]
SETUP_USERS = REPO / "deploy" / "rabbitmq" / "setup-users.sh"
RABBITMQCTL = os.environ.get("RABBITMQCTL", "rabbitmqctl")
# A fixed quota keeps each backup storage's capacity still between heartbeats (the disk's free
# space moves with every other test), so that its row can be compared whole.
CAPACITY = 2**30
SLOW_RATE = 192 * 1024  # bytes per second of a download that must stay running for a while
TIB = 2**40

pytestmark = pytest.mark.skipif(
    shutil.which(RABBITMQCTL.split()[0]) is None, reason=f"{RABBITMQCTL} not found"
)


# --- the broker's users, through rabbitmqctl and setup-users.sh ------------------------------


async def _run(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def ctl(*args: str, check: bool = True) -> str:
    """`rabbitmqctl -q ARGS` on the machine's broker; its output."""
    code, out = await _run([*RABBITMQCTL.split(), "-q", *args])
    if check and code != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({code}): {out.strip()}")
    return out


async def ctl_json(*args: str) -> list[dict[str, Any]]:
    out = await ctl("--formatter", "json", *args)
    rows: list[dict[str, Any]] = json.loads(out) if out.strip() else []
    return rows


async def connected_users(vhost: str) -> list[str]:
    """The broker users with a connection open to `vhost`."""
    return [
        c["user"]
        for c in await ctl_json("list_connections", "user", "vhost")
        if c["vhost"] == vhost
    ]


# --- the deployment -----------------------------------------------------------------------------


@dataclass
class TrustStack(Stack):
    """A `Stack` on a vhost of its own whose processes log in as setup-users.sh's users."""

    vhost: str = ""
    prefix: str = ""
    passwords: dict[str, str] = field(default_factory=dict)  # every broker user created
    agent_users: dict[str, str] = field(default_factory=dict)  # backup storage uuid -> user
    setup_output: list[str] = field(default_factory=list)

    @property
    def service_user(self) -> str:
        return f"{self.prefix}image-service"

    @property
    def cli_user(self) -> str:
        return f"{self.prefix}image-cli"

    @property
    def mallory(self) -> str:
        return f"{self.prefix}mallory"

    def agent_user(self, agent: Agent | str) -> str:
        bs_uuid = agent if isinstance(agent, str) else agent.uuid
        return f"{self.prefix}backup-agent-{bs_uuid}"

    def url(self, user: str, password: str | None = None) -> str:
        parts = urlsplit(AMQP_URL)
        secret = self.passwords[user] if password is None else password
        host = parts.hostname or "127.0.0.1"
        port = parts.port or 5672
        return (
            f"amqp://{quote(user, safe='')}:{quote(secret, safe='')}@{host}:{port}/"
            f"{quote(self.vhost, safe='')}"
        )

    @property
    def admin_url(self) -> str:
        """The test's own user (guest), with every right on this vhost."""
        return self.url(TEST_USER, unquote(urlsplit(AMQP_URL).password or "guest"))

    @property
    def service(self) -> Proc:
        return self.services[0]

    async def setup_users(self, *args: str, env: dict[str, str] | None = None) -> str:
        """deploy/rabbitmq/setup-users.sh ARGS on this vhost, namespace and prefix."""
        environ = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("IMAGE_") and k != "BACKUP_AGENT_PASSWORD"
        }
        environ.update(env or {})
        code, out = await _run(
            [
                "sh",
                str(SETUP_USERS),
                *args,
                "--vhost",
                self.vhost,
                "--namespace",
                self.namespace,
                "--user-prefix",
                self.prefix,
            ],
            env=environ,
        )
        self.setup_output.append(out)
        assert code == 0, f"setup-users.sh {' '.join(args)} failed ({code}):\n{out}"
        return out

    async def enrol_agent(self, bs_uuid: str) -> str:
        user = self.agent_user(bs_uuid)
        self.passwords[user] = secrets.token_hex(16)
        self.agent_users[bs_uuid] = user
        await self.setup_users(
            "add-agent", bs_uuid, env={"BACKUP_AGENT_PASSWORD": self.passwords[user]}
        )
        return user

    async def start_trusted_agent(self, name: str, bs_uuid: str) -> Agent:
        return await self.start_agent(
            name,
            "--amqp-url",
            self.url(self.agent_user(bs_uuid)),
            "--backup-storage-uuid",
            bs_uuid,
            "--service-user",
            self.service_user,
            "--capacity",
            str(CAPACITY),
            "--hostname",
            f"{name}.trust.test",
        )

    async def publish_event(self, routing_key: str, body: bytes | dict[str, Any]) -> None:
        """On `NS.events` as the volume service would (as guest: no setup-users.sh user may
        publish volume events)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection = await aio_pika.connect(self.admin_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(self.names.events)
            await exchange.publish(
                aio_pika.Message(data, content_type="application/json"),
                routing_key=routing_key,
                timeout=10,
            )

    async def queue_state(self, name: str) -> tuple[int, int] | None:
        """(messages, consumers) of a queue, None when there is no such queue."""
        connection = await aio_pika.connect(self.admin_url)
        async with connection:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return None
            result = queue.declaration_result
            return int(result.message_count or 0), int(result.consumer_count or 0)

    async def send_through_exchange(self, queue_name: str, body: dict[str, Any]) -> str:
        """Publish to `queue_name` through amq.direct (bound for the moment), not the default
        exchange, signed by the test's own user. Returns the message id."""
        message_id = uuid.uuid4().hex
        connection = await aio_pika.connect(self.admin_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            direct = await channel.get_exchange("amq.direct")
            queue = await channel.get_queue(queue_name, ensure=False)
            key = f"forged-{message_id}"
            await queue.bind(direct, routing_key=key)
            try:
                await direct.publish(
                    aio_pika.Message(
                        json.dumps(body).encode(), user_id=TEST_USER, message_id=message_id
                    ),
                    routing_key=key,
                    timeout=10,
                )
            finally:
                await queue.unbind(direct, routing_key=key)
        return message_id

    async def send_on(
        self,
        exchange: str,
        routing_key: str,
        body: bytes | dict[str, Any],
        *,
        user: str,
        signed: bool = True,
        **properties: Any,
    ) -> str:
        """Publish to `exchange` ("" for the default exchange) as broker user `user` (TEST_USER
        for the test's own), with its `user_id` when `signed` (none otherwise; `user_id=` signs
        as another), waiting for the broker's confirm. Returns the message id."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        message_id = properties.pop("message_id", None) or uuid.uuid4().hex
        user_id = properties.pop("user_id", user if signed else None)
        connection = await aio_pika.connect(self.admin_url if user == TEST_USER else self.url(user))
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            target = (
                channel.default_exchange
                if exchange == ""
                else await channel.get_exchange(exchange, ensure=False)
            )
            await target.publish(
                aio_pika.Message(
                    data,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    user_id=user_id,
                    message_id=message_id,
                    **properties,
                ),
                routing_key=routing_key,
                timeout=10,
            )
        return message_id

    async def send(
        self,
        routing_key: str,
        body: bytes | dict[str, Any],
        *,
        user: str,
        signed: bool = True,
        **properties: Any,
    ) -> str:
        """`send_on` the default exchange: straight to the queue `routing_key`."""
        return await self.send_on("", routing_key, body, user=user, signed=signed, **properties)

    async def send_result(
        self, key_uuid: str, body: dict[str, Any], *, user: str, signed: bool = True
    ) -> str:
        """A result on `NS.agents` under `result.<key_uuid>`, as agents publish theirs."""
        names = self.names
        return await self.send_on(
            names.agent_messages, names.result_key(key_uuid), body, user=user, signed=signed
        )

    async def send_heartbeat(
        self, key_uuid: str, body: dict[str, Any], *, user: str, signed: bool = True
    ) -> str:
        """A heartbeat on `NS.agents` under `heartbeat.<key_uuid>`, as agents publish theirs."""
        names = self.names
        return await self.send_on(
            names.agent_messages, names.heartbeat_key(key_uuid), body, user=user, signed=signed
        )

    def exchange_refused(self, exchange: str, user: str) -> str:
        """The broker's refusal of a publish (or bind) for want of permission on `exchange`."""
        return (
            f"ACCESS_REFUSED - access to exchange '{exchange or 'amq.default'}' in vhost"
            f" '{self.vhost}' refused for user '{user}'"
        )

    def topic_refused(self, exchange: str, key: str, user: str) -> str:
        """The broker's refusal of a publish under `key` for want of topic permission."""
        return (
            f"ACCESS_REFUSED - access to topic '{key}' in exchange '{exchange}' in vhost"
            f" '{self.vhost}' refused for user '{user}'"
        )

    def dropped_route(self, what: str, exchange: str, key: str, expected_key: str) -> str:
        """The service's log line for an agent's message that did not come through NS.agents
        under the key of the backup storage its body names."""
        return (
            f"{what} dropped: published to {exchange!r} with key {key!r}, not to"
            f" {self.names.agent_messages!r} with key {expected_key!r}"
        )


async def _api_consumed(stack: TrustStack) -> bool:
    try:
        state = await stack.queue_state(stack.names.api)
    except Exception:
        return False
    return state is not None and state[1] > 0


async def _create_like(stack: TrustStack, source: str, target: str) -> None:
    """Create `target` with exactly the permissions (and topic permissions) of `source`."""
    await ctl("add_user", "--", target, stack.passwords[target])
    for perm in await ctl_json("list_user_permissions", "--", source):
        if perm["vhost"] == stack.vhost:
            await ctl(
                "set_permissions",
                "-p",
                stack.vhost,
                "--",
                target,
                perm["configure"],
                perm["write"],
                perm["read"],
            )
    for perm in await ctl_json("list_user_topic_permissions", "--", source):
        if perm["vhost"] == stack.vhost:
            await ctl(
                "set_topic_permissions",
                "-p",
                stack.vhost,
                "--",
                target,
                perm["exchange"],
                perm["write"],
                perm["read"],
            )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def trust(
    tmp_path_factory: pytest.TempPathFactory, template_database: str
) -> AsyncIterator[TrustStack]:
    """The deployment every test of this module attacks: service, agents A and B, client."""
    namespace = f"t{uuid.uuid4().hex[:12]}"
    prefix = f"{namespace}-"
    workdir = tmp_path_factory.mktemp("trust")
    dbname = f"images_{namespace}"
    http = FileServer(workdir / "www")
    http.directory.mkdir()
    await http.start()
    stack = TrustStack(
        namespace,
        "",
        workdir,
        http,
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        vhost=namespace,
        prefix=prefix,
    )
    for user in (stack.service_user, stack.cli_user, stack.mallory):
        stack.passwords[user] = secrets.token_hex(16)
    try:
        await stack.setup_users(
            "init",
            env={
                "IMAGE_SERVICE_PASSWORD": stack.passwords[stack.service_user],
                "IMAGE_CLI_PASSWORD": stack.passwords[stack.cli_user],
            },
        )
        bs_uuids = [uuid.uuid4().hex, uuid.uuid4().hex]
        await asyncio.gather(
            *(stack.enrol_agent(u) for u in bs_uuids),
            _create_like(stack, stack.cli_user, stack.mallory),
            ctl("set_permissions", "-p", stack.vhost, "--", TEST_USER, ".*", ".*", ".*"),
        )
        stack.database_url = await clone_database(template_database, dbname)
        stack.db = await asyncpg.connect(stack.database_url)
        stack.client = ApiClient(stack.url(stack.cli_user), Names(namespace))
        await stack.client.connect()
        stack.start_service(
            "--amqp-url",
            stack.url(stack.service_user),
            "--agent-user-pattern",
            f"^{re.escape(prefix)}backup-agent-[0-9a-f]{{32}}$",
        )
        await wait_for(lambda: _api_consumed(stack), timeout=30)
        await stack.start_trusted_agent("bs-a", bs_uuids[0])
        await stack.start_trusted_agent("bs-b", bs_uuids[1])
        yield stack
    finally:
        if os.environ.get("TEST_SHOW_LOGS"):
            print("===== setup-users.sh\n" + "\n".join(stack.setup_output))
        await stack.stop_processes()
        if stack.client is not None:
            with contextlib.suppress(Exception):
                await stack.client.close()
        await http.stop()
        # Deleting the users closes their connections; deleting the vhost removes its queues.
        await asyncio.gather(
            *(ctl("delete_user", "--", user, check=False) for user in stack.passwords),
            return_exceptions=True,
        )
        await ctl("clear_permissions", "-p", stack.vhost, "--", TEST_USER, check=False)
        await ctl("delete_vhost", "--", stack.vhost, check=False)
        await _drop_database(dbname)


def agents_of(stack: TrustStack) -> tuple[Agent, Agent]:
    return stack.agents[0], stack.agents[1]


# --- what must not change ------------------------------------------------------------------------

STATE_QUERIES = {
    "image": "SELECT * FROM image ORDER BY uuid",
    "image_backup_storage_ref": (
        "SELECT * FROM image_backup_storage_ref ORDER BY image_uuid, backup_storage_uuid"
    ),
    # last_heartbeat moves with every heartbeat; everything else stays while Connected.
    "backup_storage": (
        "SELECT uuid, name, description, url, hostname, type, state, status, total_capacity,"
        " available_capacity, heartbeat_interval, agent_user, create_date, last_op_date"
        " FROM backup_storage ORDER BY uuid"
    ),
    "deleted_backup_storage": "SELECT * FROM deleted_backup_storage ORDER BY uuid",
    # attempts and last_sent_at move when a Pending op's command is re-sent.
    "op": (
        "SELECT op_id, kind, status, message_id, image_uuid, backup_storage_uuid, command,"
        " result, error_code, error_details, created_at, finished_at FROM op ORDER BY op_id"
    ),
    "volume": "SELECT * FROM volume ORDER BY uuid",
    "volume_snapshot": "SELECT * FROM volume_snapshot ORDER BY uuid",
}


async def db_state(db: asyncpg.Connection) -> dict[str, list[dict[str, Any]]]:
    return {table: [dict(r) for r in await db.fetch(sql)] for table, sql in STATE_QUERIES.items()}


async def heartbeats_applied(stack: TrustStack, count: int = 2) -> None:
    """Until the service has applied `count` more heartbeats of every running agent: time
    measured in the service's work, and each backup storage's capacity counts every file stored
    before the call."""
    uuids = [a.uuid for a in stack.agents if a.proc.running]
    seen: dict[str, list[Any]] = {u: [] for u in uuids}

    async def moved_on() -> bool:
        rows = await stack.db.fetch(
            "SELECT uuid, last_heartbeat FROM backup_storage WHERE uuid = ANY($1::bpchar[])",
            uuids,
        )
        for row in rows:
            values = seen[row["uuid"]]
            if not values or values[-1] != row["last_heartbeat"]:
                values.append(row["last_heartbeat"])
        return all(len(v) > count for v in seen.values())

    await wait_for(moved_on, timeout=15, interval=0.05)


async def settled_state(stack: TrustStack) -> dict[str, list[dict[str, Any]]]:
    """The database's state once the agents' heartbeats caught up with their files."""
    await heartbeats_applied(stack)
    return await db_state(stack.db)


def files_state(*agents: Agent) -> dict[str, Any]:
    """Every stored file with its md5, and the names of the agents' journal entries."""
    state: dict[str, Any] = {}
    for agent in agents:
        templates = agent.root / "templates"
        state[agent.name] = {
            "templates": {
                str(p.relative_to(agent.root)): md5_of(p)
                for p in sorted(templates.rglob("*"))
                if p.is_file()
            },
            "journal": sorted(p.name for p in (agent.root / ".agent" / "ops").iterdir()),
        }
    return state


async def assert_no_trace_of(db: asyncpg.Connection, *needles: str) -> None:
    """None of the service's tables mentions any of `needles` (a forged path, say)."""
    for table in ("image", "image_backup_storage_ref", "backup_storage", "op", "outbox"):
        rows = await db.fetch(f"SELECT row_to_json(t)::text AS j FROM {table} t")
        for row in rows:
            for needle in needles:
                assert needle not in row["j"], f"{table}: {row['j']}"


class Since:
    """What a process has logged since this object was made."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.offset = len(proc.log())

    def text(self) -> str:
        return self.proc.log()[self.offset :]

    async def wait(self, lines: Iterable[str], timeout: float = 20) -> None:
        """Until every one of `lines` has been logged (each as many times as it is given)."""
        wanted: dict[str, int] = {}
        for line in lines:
            wanted[line] = wanted.get(line, 0) + 1

        async def all_logged() -> bool:
            text = self.text()
            return all(text.count(w) >= n for w, n in wanted.items())

        try:
            await wait_for(all_logged, timeout, interval=0.05)
        except AssertionError:
            text = self.text()
            missing = [w for w, n in wanted.items() if text.count(w) < n]
            raise AssertionError(
                f"{self.proc.name} never logged {missing!r}; it logged:\n{text[-6000:]}"
            ) from None


async def assert_serving(stack: TrustStack, *agents: Agent) -> None:
    """An ordinary AddImage to `agents` still works, with the right md5 on disk, and goes."""
    data = os.urandom(96 * 1024)
    name = f"ordinary-{uuid.uuid4().hex[:8]}"
    url, md5 = stack.http.add(f"{name}.raw", data)
    reply = await stack.add_image(url, list(agents), name=name)
    assert reply["success"], reply
    inventory = reply["inventory"]
    assert inventory["status"] == "Ready" and inventory["md5Sum"] == md5
    for agent in agents:
        assert md5_of(install_path(agent, inventory["uuid"], name)) == md5
    found = await query_image(stack, inventory["uuid"])
    assert found is not None and found["status"] == "Ready"
    reply = await stack.call("DeleteImage", {"uuid": inventory["uuid"]})
    assert reply["success"], reply
    for agent in agents:
        assert not install_path(agent, inventory["uuid"], name).exists()
    assert stack.service.running, stack.service.log()[-3000:]
    assert all(a.proc.running for a in stack.agents if a in agents)


async def raises_refused(
    action: Callable[[], Awaitable[Any]], *exceptions: type[BaseException]
) -> str:
    """Run `action`, which the broker must refuse; the refusal's text."""
    with pytest.raises(exceptions or (aiormq.exceptions.ChannelAccessRefused,)) as info:
        await action()
    return str(info.value)


async def assert_refused(expected: str, action: Awaitable[Any]) -> None:
    """Await `action`, which the broker must refuse with `expected` (ACCESS_REFUSED)."""
    text = await raises_refused(lambda: action)
    assert expected in text, (expected, text)


def forged_result(op_id: str, bs_uuid: str) -> dict[str, Any]:
    """A Ready for `op_id`: /etc/passwd as the image, an md5 of zeros, a virtual size of 1 TiB."""
    return {
        "opId": op_id,
        "backupStorageUuid": bs_uuid,
        "success": True,
        "installPath": "/etc/passwd",
        "size": 4096,
        "actualSize": 4096,
        "virtualSize": TIB,
        "md5Sum": "0" * 32,
        "format": "raw",
    }


async def op_of(stack: TrustStack, image_uuid: str, agent: Agent) -> str:
    op_id = await stack.db.fetchval(
        "SELECT op_id::text FROM op WHERE image_uuid = $1 AND backup_storage_uuid = $2"
        " AND kind = 'download'",
        image_uuid,
        agent.uuid,
    )
    assert op_id is not None
    return str(op_id)


# --- the deployment itself --------------------------------------------------------------------


async def test_least_privilege_users_run_the_whole_service(trust: TrustStack) -> None:
    """Service, agents and client work with setup-users.sh's users alone, every message they
    publish carries their broker user, and each backup storage is bound to its agent's user."""
    stack = trust
    a, b = agents_of(stack)
    rows = await stack.db.fetch("SELECT uuid, agent_user, hostname FROM backup_storage")
    assert {r["uuid"]: r["agent_user"] for r in rows} == {
        a.uuid: stack.agent_user(a),
        b.uuid: stack.agent_user(b),
    }

    # Events: the service's as the service user, the agents' progress as the agents' users.
    seen: list[tuple[str, str | None]] = []
    connection = await aio_pika.connect(stack.url(stack.cli_user))
    async with connection:
        channel = await connection.channel()
        events = await channel.get_exchange(stack.names.events, ensure=False)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(events, routing_key="image.#")

        async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            seen.append((message.routing_key or "", message.user_id))

        await queue.consume(on_event, no_ack=True)

        url, md5 = stack.http.add("both.raw", os.urandom(3 * 2**20))
        reply = await stack.add_image(url, [a, b], name="both")
        assert reply["success"], reply
        inventory = reply["inventory"]
        assert inventory["status"] == "Ready" and inventory["md5Sum"] == md5
        refs = {r["backupStorageUuid"]: r for r in inventory["backupStorageRefs"]}
        for agent in (a, b):
            assert refs[agent.uuid]["status"] == "Ready"
            assert md5_of(refs[agent.uuid]["installPath"]) == md5

        # A reply to the caller carries the service's user too.
        reply_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps({"api": "QueryImage", "params": {"conditions": []}}).encode(),
                reply_to=reply_queue.name,
                message_id=uuid.uuid4().hex,
                user_id=stack.cli_user,
            ),
            routing_key=stack.names.api,
        )
        answer = await wait_for(lambda: reply_queue.get(fail=False), timeout=15)
        assert answer.user_id == stack.service_user
        assert json.loads(answer.body)["success"] is True

        def senders() -> dict[str, set[str | None]]:
            by_kind: dict[str, set[str | None]] = {}
            for key, user in seen:
                by_kind.setdefault(key.split(".")[1], set()).add(user)
            return by_kind

        async def all_seen() -> bool:
            # Each agent reports progress at least at the start and at the end of a download.
            return "status" in senders() and len(senders().get("progress", ())) >= 2

        await wait_for(all_seen, timeout=15)

    assert senders()["status"] == {stack.service_user}, seen
    assert senders()["progress"] == {stack.agent_user(a), stack.agent_user(b)}, seen

    reply = await stack.call("DeleteImage", {"uuid": inventory["uuid"]})
    assert reply["success"], reply
    assert a.files() == [] and b.files() == []

    # No refusal but the expected one: an agent may not declare the shared queues.
    for proc in (stack.service, a.proc, b.proc):
        log = proc.log()
        refused = [line for line in log.splitlines() if "ACCESS_REFUSED" in line]
        if proc is stack.service:
            assert refused == [], refused
        else:
            assert all("shared queues left to the service to declare" in r for r in refused)
        assert "Traceback" not in log, log[-3000:]


# --- forged results -----------------------------------------------------------------------------


async def test_forged_results_for_a_finished_op_change_nothing(trust: TrustStack) -> None:
    """Forged Ready results (/etc/passwd, md5 of zeros, 1 TiB) for A's finished op, by every
    path: the broker refuses what it can, the service drops the rest, nothing changes."""
    stack = trust
    a, b = agents_of(stack)
    names = stack.names
    agents_exchange = names.agent_messages
    inventory = await add_ready(stack, [a], name="finished")
    op_id = await op_of(stack, inventory["uuid"], a)
    db_before, files_before = await settled_state(stack), files_state(a, b)
    passwd_md5 = md5_of("/etc/passwd")
    log = Since(stack.service)
    results = names.results
    forged = forged_result(op_id, a.uuid)
    what = f"result of op {op_id}"
    key_a, key_b = names.result_key(a.uuid), names.result_key(b.uuid)
    user_a, user_b = stack.agent_user(a), stack.agent_user(b)

    # Straight to NS.results through the default exchange (mallory may write there).
    await stack.send(results, forged, user=stack.mallory, signed=False)
    await stack.send(results, forged, user=stack.mallory)
    # Through an exchange bound to the results queue for the moment (the test's own user).
    routed = await stack.send_through_exchange(results, forged)
    # Mallory has no write on NS.agents; agent B none on the default exchange, and may publish
    # on NS.agents under its own keys only.
    for signed in (False, True):
        await assert_refused(
            stack.exchange_refused(agents_exchange, stack.mallory),
            stack.send_result(a.uuid, forged, user=stack.mallory, signed=signed),
        )
    await assert_refused(
        stack.exchange_refused("", user_b), stack.send(results, forged, user=user_b)
    )
    await assert_refused(
        stack.topic_refused(agents_exchange, key_a, user_b),
        stack.send_result(a.uuid, forged, user=user_b),
    )
    # Agent B under its own key: a body naming A's backup storage, then one naming A's op for
    # B's own backup storage.
    await stack.send_result(b.uuid, forged, user=user_b)
    await stack.send_result(b.uuid, forged_result(op_id, b.uuid), user=user_b)
    # A user that may publish anything anywhere (guest): under A's key, unsigned and signed.
    await stack.send_result(a.uuid, forged, user=TEST_USER, signed=False)
    await stack.send_result(a.uuid, forged, user=TEST_USER)
    # The rightful agent itself, replaying the op with another path (a compromised host).
    await stack.send_result(a.uuid, forged, user=user_a)

    await log.wait(
        [
            stack.dropped_route(what, "", results, key_a),
            stack.dropped_route(what, "", results, key_a),
            stack.dropped_route(what, "amq.direct", f"forged-{routed}", key_a),
            stack.dropped_route(what, agents_exchange, key_b, key_a),
            f"result for op {op_id} from the wrong backup storage dropped",
            f"{what} dropped: it has no user_id, so its sender is unknown",
            f"result for op {op_id} dropped: sent by broker user {TEST_USER!r},"
            f" backup storage {a.uuid} belongs to {user_a!r}",
            f"result for op {op_id} names '/etc/passwd', not the command's installPath",
            f"stale result for op {op_id}",
        ]
    )
    assert await db_state(stack.db) == db_before
    assert files_state(a, b) == files_before
    assert md5_of("/etc/passwd") == passwd_md5
    await assert_no_trace_of(stack.db, "/etc/passwd", "0" * 32, str(TIB))
    found = await query_image(stack, inventory["uuid"])
    assert found is not None and found["status"] == "Ready"
    assert found["md5Sum"] == inventory["md5Sum"] and found["virtualSize"] != TIB
    await assert_serving(stack, a)
    reply = await stack.call("DeleteImage", {"uuid": inventory["uuid"]})
    assert reply["success"], reply


async def test_a_running_download_survives_forged_results_and_cancels(
    trust: TrustStack,
) -> None:
    """While a download runs on A: forged Ready results for its op and forged deletes that
    cancel it, unsigned and by mallory through the default exchange (dropped), by B's user
    (refused by the broker, or dropped under B's own key). It must finish as if nothing
    happened."""
    stack = trust
    a, b = agents_of(stack)
    data = os.urandom(2**20)
    _, md5 = stack.http.add("running.raw", data)
    task = asyncio.create_task(
        stack.add_image(stack.http.url(f"slow/running.raw?rate={SLOW_RATE}"), [a], name="running")
    )
    try:

        async def running_op() -> tuple[str, str] | None:
            row = await stack.db.fetchrow(
                "SELECT op_id::text AS op, image_uuid FROM op WHERE status = 'Pending'"
                " AND kind = 'download' AND backup_storage_uuid = $1",
                a.uuid,
            )
            if row is None or not a.root.joinpath(".agent", "partial", row["op"]).exists():
                return None  # not yet receiving on the agent
            return row["op"], row["image_uuid"]

        op_id, image_uuid = await wait_for(running_op, timeout=15, interval=0.05)
        path = str(install_path(a, image_uuid, "running"))
        service_log, agent_log = Since(stack.service), Since(a.proc)
        names = stack.names
        results, commands = names.results, names.agent(a.uuid)
        user_b = stack.agent_user(b)
        forged = forged_result(op_id, a.uuid)
        what = f"result of op {op_id}"
        cancel = {
            "command": "delete",
            "imageUuid": image_uuid,
            "backupStorageUuid": a.uuid,
            "installPath": path,
            "cancelOpIds": [op_id],
        }
        dropped: list[str] = []
        for signed in (False, True):
            await stack.send(results, forged, user=stack.mallory, signed=signed)
            message = await stack.send(
                commands, {**cancel, "opId": str(uuid.uuid4())}, user=stack.mallory, signed=signed
            )
            dropped.append(
                f"command dropped (message {message!r}): sent by broker user"
                f" {stack.mallory if signed else None!r} through exchange ''"
            )
        # Agent B: the default exchange (results, A's commands) is closed to it, and A's key
        # on NS.agents too; under its own key the body does not match.
        for queue_name, body in ((results, forged), (commands, {**cancel, "opId": op_id})):
            await assert_refused(
                stack.exchange_refused("", user_b),
                stack.send(queue_name, body, user=user_b),
            )
        await assert_refused(
            stack.topic_refused(names.agent_messages, names.result_key(a.uuid), user_b),
            stack.send_result(a.uuid, forged, user=user_b),
        )
        await stack.send_result(b.uuid, forged, user=user_b)
        key_a = names.result_key(a.uuid)
        await service_log.wait(
            [
                stack.dropped_route(what, "", results, key_a),
                stack.dropped_route(what, "", results, key_a),
                stack.dropped_route(what, names.agent_messages, names.result_key(b.uuid), key_a),
            ]
        )
        await agent_log.wait(dropped)
        assert not task.done(), "the download ended before the forgeries were handled"
        assert (
            await stack.db.fetchval(
                "SELECT status::text FROM op WHERE op_id = $1", uuid.UUID(op_id)
            )
            == "Pending"
        )
        ref = await stack.db.fetchrow(
            "SELECT status::text AS status, install_path FROM image_backup_storage_ref"
            " WHERE image_uuid = $1",
            image_uuid,
        )
        assert ref is not None and ref["status"] != "Ready" and ref["install_path"] == path
        await assert_no_trace_of(stack.db, "/etc/passwd", "0" * 32)

        reply = await asyncio.wait_for(task, 60)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    assert reply["success"], reply
    inventory = reply["inventory"]
    assert inventory["status"] == "Ready" and inventory["md5Sum"] == md5
    assert inventory["size"] == len(data) and inventory["virtualSize"] == len(data)
    assert [r["installPath"] for r in inventory["backupStorageRefs"]] == [path]
    assert md5_of(path) == md5
    assert "cancel" not in agent_log.text().replace("cancelOpIds", "")
    await assert_no_trace_of(stack.db, "/etc/passwd", "0" * 32)
    reply = await stack.call("DeleteImage", {"uuid": image_uuid})
    assert reply["success"], reply


async def test_a_result_from_the_rightful_agent_naming_another_file_fails_its_op(
    trust: TrustStack,
) -> None:
    """The agent A itself (a compromised host) answers a running op with /etc/passwd: the op
    fails with OPERATION_ERROR, the path is never recorded, and the file the command named does
    not stay behind."""
    stack = trust
    a, _ = agents_of(stack)
    stack.http.add("misplaced.raw", os.urandom(2**20))
    passwd_md5 = md5_of("/etc/passwd")
    task = asyncio.create_task(
        stack.add_image(
            stack.http.url(f"slow/misplaced.raw?rate={SLOW_RATE}"), [a], name="misplaced"
        )
    )

    async def pending_op() -> tuple[str, str] | None:
        row = await stack.db.fetchrow(
            "SELECT op_id::text AS op, image_uuid FROM op WHERE status = 'Pending'"
            " AND kind = 'download' AND backup_storage_uuid = $1",
            a.uuid,
        )
        return (row["op"], row["image_uuid"]) if row is not None else None

    op_id, image_uuid = await wait_for(pending_op, timeout=15, interval=0.05)
    await stack.send_result(a.uuid, forged_result(op_id, a.uuid), user=stack.agent_user(a))
    reply = await asyncio.wait_for(task, 30)
    error = error_of(reply)
    assert error["code"] == "OPERATION_ERROR", reply
    assert error["details"] == "the agent reported a file other than the one the command named"
    assert await stack.db.fetchval("SELECT count(*) FROM image WHERE uuid = $1", image_uuid) == 0
    await assert_no_trace_of(stack.db, "/etc/passwd", "0" * 32)
    assert md5_of("/etc/passwd") == passwd_md5

    # The real download still ends on the agent; its late result is stale and its file removed.
    target = install_path(a, image_uuid, "misplaced")

    async def cleaned_up() -> bool:
        return (
            not target.exists()
            and not any(a.root.joinpath(".agent", "partial").iterdir())
            and await stack.db.fetchval("SELECT count(*) FROM op WHERE status = 'Pending'") == 0
        )

    await wait_for(cleaned_up, timeout=30)


# --- forged commands ----------------------------------------------------------------------------


async def test_forged_commands_are_dropped_by_the_agents(trust: TrustStack) -> None:
    """Delete a Ready image's file, download over it, download in an unknown or wrong format,
    on both agents' queues: unsigned and by mallory, which the agent drops, and by the other
    agent's user, which the broker refuses (no write on the default exchange)."""
    stack = trust
    a, b = agents_of(stack)
    inventory = await add_ready(stack, [a, b], name="target")
    image_uuid = inventory["uuid"]
    evil_url, _ = stack.http.add("evil.raw", os.urandom(64 * 1024))
    db_before, files_before = await settled_state(stack), files_state(a, b)
    logs = {agent.name: Since(agent.proc) for agent in (a, b)}
    expected: dict[str, list[str]] = {a.name: [], b.name: []}

    for target, other in ((a, b), (b, a)):
        path = str(install_path(target, image_uuid, "target"))
        base = {"imageUuid": image_uuid, "backupStorageUuid": target.uuid, "installPath": path}
        commands = [
            {**base, "command": "delete"},
            {**base, "command": "download", "url": evil_url, "format": "raw"},
            {**base, "command": "download", "url": evil_url, "format": "vmdk"},
            {**base, "command": "download", "url": evil_url, "format": "qcow2"},
        ]
        for signed in (False, True):
            for command in commands:
                message = await stack.send(
                    stack.names.agent(target.uuid),
                    {**command, "opId": str(uuid.uuid4())},
                    user=stack.mallory,
                    signed=signed,
                )
                expected[target.name].append(
                    f"command dropped (message {message!r}): sent by broker user"
                    f" {stack.mallory if signed else None!r} through exchange ''; commands count"
                    f" only from {stack.service_user!r}"
                )
        # The other agent's user may not publish to the default exchange at all.
        other_user = stack.agent_user(other)
        for command in commands:
            await assert_refused(
                stack.exchange_refused("", other_user),
                stack.send(
                    stack.names.agent(target.uuid),
                    {**command, "opId": str(uuid.uuid4())},
                    user=other_user,
                ),
            )
    for agent in (a, b):
        await logs[agent.name].wait(expected[agent.name])

    assert stack.http.hits.get("evil.raw", 0) == 0
    assert files_state(a, b) == files_before
    assert await db_state(stack.db) == db_before
    for agent in (a, b):
        assert md5_of(install_path(agent, image_uuid, "target")) == inventory["md5Sum"]
        text = logs[agent.name].text()
        assert "invalid command dropped" not in text and "Traceback" not in text
    await assert_serving(stack, a, b)
    reply = await stack.call("DeleteImage", {"uuid": image_uuid})
    assert reply["success"], reply


async def test_even_the_service_user_cannot_escape_the_image_directory(
    trust: TrustStack,
) -> None:
    """Commands signed by the service's own user (a replayed or confused command): an install
    path outside templates/<imageUuid>/ of the command's image is refused, and a download never
    overwrites a file that another finished op stored."""
    stack = trust
    a, b = agents_of(stack)
    inventory = await add_ready(stack, [a], name="kept")
    image_uuid = inventory["uuid"]
    path = str(install_path(a, image_uuid, "kept"))
    evil_url, _ = stack.http.add("replayed.raw", os.urandom(64 * 1024))
    db_before, files_before = await settled_state(stack), files_state(a, b)
    passwd_md5 = md5_of("/etc/passwd")
    log, service_log = Since(a.proc), Since(stack.service)
    other_image = uuid.uuid4().hex
    base = {"backupStorageUuid": a.uuid, "command": "download", "url": evil_url, "format": "raw"}
    op_ids = {
        # Another image's command naming this image's file.
        "other image": {**base, "imageUuid": other_image, "installPath": path},
        "outside": {**base, "imageUuid": image_uuid, "installPath": "/etc/passwd"},
        "climbing": {
            **base,
            "imageUuid": image_uuid,
            "installPath": f"{a.root}/templates/{image_uuid}/../../../../etc/passwd",
        },
        # The right image and path, but a new op: the file is another op's.
        "overwrite": {**base, "imageUuid": image_uuid, "installPath": path},
    }
    sent: dict[str, str] = {}
    for what, command in op_ids.items():
        sent[what] = str(uuid.uuid4())
        await stack.send(
            stack.names.agent(a.uuid), {**command, "opId": sent[what]}, user=stack.service_user
        )
    delete_other = str(uuid.uuid4())
    await stack.send(
        stack.names.agent(a.uuid),
        {
            "command": "delete",
            "opId": delete_other,
            "imageUuid": other_image,
            "backupStorageUuid": a.uuid,
            "installPath": path,
        },
        user=stack.service_user,
    )
    await log.wait(
        [
            f"op {sent['other image']} failed: INVALID_ARGUMENT: {path} is not in the directory"
            f" of image {other_image}",
            f"op {sent['outside']} failed: INVALID_ARGUMENT: /etc/passwd is outside",
            f"op {sent['climbing']} failed: INVALID_ARGUMENT: ",
            f"op {sent['overwrite']} failed: OPERATION_ERROR: {path} already holds a stored image",
            f"delete of {path} refused: {path} is not in the directory of image {other_image}",
        ]
    )
    # Their results reach the service, which knows none of these ops.
    await service_log.wait(
        [f"result for unknown op {op} dropped" for op in [*sent.values(), delete_other]]
    )
    assert md5_of(path) == inventory["md5Sum"]
    assert md5_of("/etc/passwd") == passwd_md5
    assert await db_state(stack.db) == db_before
    after = files_state(a, b)
    assert after[a.name]["templates"] == files_before[a.name]["templates"]
    assert after[b.name] == files_before[b.name]
    reply = await stack.call("DeleteImage", {"uuid": image_uuid})
    assert reply["success"], reply
    assert not Path(path).exists()


# --- forged heartbeats --------------------------------------------------------------------------


async def test_forged_heartbeats_change_no_backup_storage(trust: TrustStack) -> None:
    """Heartbeats for A (a backup storage bound to its user) and for an unknown uuid (a
    registration), by every path: the broker refuses what it can, the service drops the rest."""
    stack = trust
    a, b = agents_of(stack)
    names = stack.names
    agents_exchange = names.agent_messages
    db_before = await settled_state(stack)
    log = Since(stack.service)
    fake = uuid.uuid4().hex
    user_a, user_b = stack.agent_user(a), stack.agent_user(b)

    def beat(bs_uuid: str) -> dict[str, Any]:
        return {
            "uuid": bs_uuid,
            "name": "evil",
            "url": "/evil",
            "hostname": "evil.example",
            "totalCapacity": 0,
            "availableCapacity": 0,
            "heartbeatInterval": 3600,
        }

    def what(bs_uuid: str) -> str:
        return f"heartbeat of backup storage {bs_uuid}"

    heartbeats = names.heartbeats
    expected: list[str] = []
    for bs_uuid in (a.uuid, fake):
        # Straight to NS.heartbeats through the default exchange.
        for signed in (False, True):
            await stack.send(heartbeats, beat(bs_uuid), user=stack.mallory, signed=signed)
            expected.append(
                stack.dropped_route(what(bs_uuid), "", heartbeats, names.heartbeat_key(bs_uuid))
            )
        # Mallory may not publish on NS.agents at all.
        await assert_refused(
            stack.exchange_refused(agents_exchange, stack.mallory),
            stack.send_heartbeat(bs_uuid, beat(bs_uuid), user=stack.mallory),
        )
        # Agent B, under its own key, for another backup storage.
        await stack.send_heartbeat(b.uuid, beat(bs_uuid), user=user_b)
        expected.append(
            stack.dropped_route(
                what(bs_uuid),
                agents_exchange,
                names.heartbeat_key(b.uuid),
                names.heartbeat_key(bs_uuid),
            )
        )
    # An agent under another's key, or through the default exchange: refused by the broker.
    for user, bs_uuid in ((user_b, a.uuid), (user_a, b.uuid), (user_b, fake)):
        await assert_refused(
            stack.topic_refused(agents_exchange, names.heartbeat_key(bs_uuid), user),
            stack.send_heartbeat(bs_uuid, beat(bs_uuid), user=user),
        )
    await assert_refused(
        stack.exchange_refused("", user_b),
        stack.send(heartbeats, beat(a.uuid), user=user_b),
    )
    # Through an exchange bound to the heartbeats queue for the moment.
    routed = await stack.send_through_exchange(heartbeats, beat(fake))
    expected.append(
        stack.dropped_route(what(fake), "amq.direct", f"forged-{routed}", names.heartbeat_key(fake))
    )
    # A user that may publish anything anywhere (guest), under the right keys.
    await stack.send_heartbeat(a.uuid, beat(a.uuid), user=TEST_USER, signed=False)
    await stack.send_heartbeat(a.uuid, beat(a.uuid), user=TEST_USER)
    await stack.send_heartbeat(fake, beat(fake), user=TEST_USER)
    expected += [
        f"{what(a.uuid)} dropped: it has no user_id, so its sender is unknown",
        f"{what(a.uuid)} from broker user {TEST_USER!r} dropped: it belongs to {user_a!r}",
        f"{what(fake)} dropped: broker user {TEST_USER!r} may not register backup storages"
        " (--agent-user-pattern)",
    ]

    await log.wait(expected)
    # The real heartbeats go on being applied after the forged ones.
    await heartbeats_applied(stack)
    assert await db_state(stack.db) == db_before
    assert await stack.queue_state(stack.names.agent(fake)) is None
    for agent in (a, b):
        inventory = await stack.bs_status(agent.uuid, "Connected")
        assert inventory is not None
        assert inventory["hostname"] == f"{agent.name}.trust.test"
        assert inventory["availableCapacity"] > 0
    reply = await stack.call(
        "QueryBackupStorage", {"conditions": [{"name": "uuid", "op": "=", "value": fake}]}
    )
    assert reply["success"] and reply["inventories"] == [], reply
    await assert_serving(stack, a, b)


# --- the broker's own refusals ------------------------------------------------------------------


async def test_the_broker_refuses_other_users_queues_and_signatures(trust: TrustStack) -> None:
    """Reading a queue that is not one's own, reconfiguring the service's queues, publishing
    events, publishing on NS.agents under another's key (or at all, for mallory), publishing
    to the default exchange as an agent, listening to or deleting NS.agents, or signing as
    someone else: the broker refuses (ACCESS_REFUSED / PRECONDITION_FAILED)."""
    stack = trust
    a, b = agents_of(stack)
    names = stack.names
    internal = [
        names.agent(a.uuid),
        names.agent(b.uuid),
        names.results,
        names.heartbeats,
        names.api,
        names.volume_events,
        names.dead_letters,
    ]
    db_before, files_before = await settled_state(stack), files_state(a, b)

    async def as_user(
        user: str, attempt: Callable[[aio_pika.abc.AbstractChannel], Awaitable[Any]]
    ) -> None:
        connection = await aio_pika.connect(stack.url(user))
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await attempt(channel)

    async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        raise AssertionError(f"a refused consumer received {message.body!r}")

    async def on_queue(user: str, queue_name: str, action: str) -> None:
        async def attempt(channel: aio_pika.abc.AbstractChannel) -> None:
            queue = await channel.get_queue(queue_name, ensure=False)
            if action == "consume":
                await queue.consume(ignore, no_ack=True)
            elif action == "get":
                await queue.get(no_ack=False, fail=False)
            elif action == "purge":
                await queue.purge()
            elif action == "delete":
                await queue.delete(if_unused=False, if_empty=False)
            else:  # bind: have the events (say volume.*) routed into it too
                await queue.bind(names.events, routing_key="#")

        await as_user(user, attempt)

    mallory, agent_a, agent_b = stack.mallory, stack.agent_user(a), stack.agent_user(b)
    attempts = [(mallory, queue_name, "consume") for queue_name in internal]
    for queue_name in (names.agent(a.uuid), names.results):
        attempts += [(mallory, queue_name, act) for act in ("get", "purge", "delete", "bind")]
    attempts += [
        (agent_a, queue_name, "consume")
        for queue_name in (names.agent(b.uuid), names.results, names.api, names.heartbeats)
    ]
    attempts += [
        (agent_b, names.agent(a.uuid), "consume"),
        (agent_b, names.agent(a.uuid), "get"),
        (agent_a, names.agent(b.uuid), "delete"),
        (agent_a, names.agent(b.uuid), "purge"),
        (agent_a, names.results, "purge"),
    ]
    for user, queue_name, action in attempts:
        text = await raises_refused(
            lambda u=user, q=queue_name, act=action: on_queue(u, q, act)  # type: ignore[misc]
        )
        refusal = (
            f"ACCESS_REFUSED - access to queue '{queue_name}' in vhost '{stack.vhost}'"
            f" refused for user '{user}'"
        )
        assert refusal in text, (user, queue_name, action, text)

    # Publishing the service's events (image.*) on NS.events: mallory may not write there at
    # all, an agent only image.progress.*.
    async def publish_event(user: str, key: str) -> None:
        async def attempt(channel: aio_pika.abc.AbstractChannel) -> None:
            exchange = await channel.get_exchange(names.events, ensure=False)
            await exchange.publish(
                aio_pika.Message(b"{}", user_id=user), routing_key=key, timeout=10
            )

        await as_user(user, attempt)

    text = await raises_refused(
        lambda: publish_event(stack.mallory, f"image.deleted.{uuid.uuid4().hex}")
    )
    assert (
        f"ACCESS_REFUSED - access to exchange '{names.events}' in vhost '{stack.vhost}'"
        f" refused for user '{stack.mallory}'" in text
    ), text
    key = f"image.deleted.{uuid.uuid4().hex}"
    text = await raises_refused(lambda: publish_event(stack.agent_user(a), key))
    assert (
        f"ACCESS_REFUSED - access to topic '{key}' in exchange '{names.events}' in vhost"
        f" '{stack.vhost}' refused for user '{stack.agent_user(a)}'" in text
    ), text

    # Publishing what agents publish: mallory may not write on NS.agents at all, an agent
    # only under its own keys there, and nowhere through the default exchange (neither to the
    # service's queues nor to another agent's, nor its own).
    agents_exchange = names.agent_messages
    user_a, user_b = stack.agent_user(a), stack.agent_user(b)
    for key in (names.result_key(a.uuid), names.heartbeat_key(a.uuid), "anything"):
        await assert_refused(
            stack.exchange_refused(agents_exchange, stack.mallory),
            stack.send_on(agents_exchange, key, b"{}", user=stack.mallory),
        )
    for key in (
        names.result_key(b.uuid),
        names.heartbeat_key(b.uuid),
        names.result_key(uuid.uuid4().hex),
        f"{names.result_key(a.uuid)}.more",
        f"result.{a.uuid[:-1]}",
        f"command.{a.uuid}",
    ):
        await assert_refused(
            stack.topic_refused(agents_exchange, key, user_a),
            stack.send_on(agents_exchange, key, b"{}", user=user_a),
        )
    for queue_name in (*internal, names.agent(uuid.uuid4().hex)):
        await assert_refused(
            stack.exchange_refused("", user_a),
            stack.send(queue_name, b"{}", user=user_a),
        )

    # Listening to NS.agents (every agent's results and heartbeats) or removing it.
    async def bind_agents(user: str, queue_name: str | None) -> None:
        async def attempt(channel: aio_pika.abc.AbstractChannel) -> None:
            if queue_name is None:
                queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            else:
                queue = await channel.get_queue(queue_name, ensure=False)
            await queue.bind(agents_exchange, routing_key="#")

        await as_user(user, attempt)

    async def delete_agents(user: str) -> None:
        async def attempt(channel: aio_pika.abc.AbstractChannel) -> None:
            await channel.exchange_delete(agents_exchange)

        await as_user(user, attempt)

    await assert_refused(
        stack.exchange_refused(agents_exchange, stack.mallory),
        bind_agents(stack.mallory, None),
    )
    await assert_refused(
        f"ACCESS_REFUSED - access to queue '{names.agent(a.uuid)}' in vhost '{stack.vhost}'"
        f" refused for user '{user_a}'",
        bind_agents(user_a, names.agent(a.uuid)),
    )
    for user in (stack.mallory, user_a):
        await assert_refused(
            stack.exchange_refused(agents_exchange, user),
            delete_agents(user),
        )

    # Signing as another user: the broker holds user_id to the connection's user, also where
    # the user may publish.
    for user, as_whom, exchange, key in (
        (stack.mallory, stack.service_user, "", names.agent(a.uuid)),
        (stack.mallory, user_a, "", names.results),
        (user_b, user_a, agents_exchange, names.heartbeat_key(b.uuid)),
        (user_b, user_a, agents_exchange, names.result_key(b.uuid)),
        (user_a, stack.service_user, names.events, f"image.progress.{uuid.uuid4().hex}"),
    ):
        text = await raises_refused(
            lambda u=user, w=as_whom, e=exchange, k=key: stack.send_on(  # type: ignore[misc]
                e, k, b"{}", user=u, user_id=w
            ),
            aiormq.exceptions.ChannelPreconditionFailed,
        )
        assert "PRECONDITION_FAILED" in text and f"user_id property set to '{as_whom}'" in text, (
            text
        )

    # None of that touched anything, and the agents still consume their own queues.
    for agent in (a, b):
        state = await stack.queue_state(names.agent(agent.uuid))
        assert state is not None and state[1] == 1, state
    assert await db_state(stack.db) == db_before
    assert files_state(a, b) == files_before
    await assert_serving(stack, a, b)


# --- the API is not an agent's to call ------------------------------------------------------------


async def test_an_agent_user_cannot_call_the_api(trust: TrustStack) -> None:
    """An agent's user (a compromised host) sending API requests to NS.api: DeleteImage of a
    Ready image (Enforcing too), ChangeImageState, DeleteBackupStorage of its neighbour, signed
    or not, replies to its own queue. The broker refuses it the default exchange (and NS.api as
    a key on NS.agents); the service never sees the requests and nothing changes."""
    stack = trust
    a, b = agents_of(stack)
    names = stack.names
    inventory = await add_ready(stack, [a, b], name="api-target")
    image_uuid = inventory["uuid"]
    db_before, files_before = await settled_state(stack), files_state(a, b)
    log = Since(stack.service)
    requests = [
        ("DeleteImage", {"uuid": image_uuid}),
        ("DeleteImage", {"uuid": image_uuid, "deleteMode": "Enforcing"}),
        ("ChangeImageState", {"uuid": image_uuid, "stateEvent": "disable"}),
    ]
    message_ids: list[str] = []
    for agent, other in ((a, b), (b, a)):
        user = stack.agent_user(agent)
        for api, params in [*requests, ("DeleteBackupStorage", {"uuid": other.uuid})]:
            body = {"api": api, "params": params}
            for signed in (True, False):
                message_id = uuid.uuid4().hex
                message_ids.append(message_id)
                await assert_refused(
                    stack.exchange_refused("", user),
                    stack.send(
                        names.api,
                        body,
                        user=user,
                        signed=signed,
                        message_id=message_id,
                        reply_to=names.agent(agent.uuid),
                    ),
                )
            await assert_refused(
                stack.topic_refused(names.agent_messages, names.api, user),
                stack.send_on(names.agent_messages, names.api, body, user=user),
            )

    # The service has moved on (it answers, and the agents' heartbeats were applied since).
    reply = await stack.call("QueryImage", {"conditions": []}, timeout=15)
    assert reply["success"], reply
    await heartbeats_applied(stack)
    text = log.text()
    for message_id in message_ids:
        assert message_id not in text, (message_id, text[-4000:])
    assert await db_state(stack.db) == db_before
    assert files_state(a, b) == files_before
    found = await query_image(stack, image_uuid)
    assert found is not None
    assert found["status"] == "Ready" and found["state"] == "Enabled", found
    assert sorted(r["backupStorageUuid"] for r in found["backupStorageRefs"]) == sorted(
        [a.uuid, b.uuid]
    )
    for agent in (a, b):
        assert await stack.bs_status(agent.uuid, "Connected") is not None
        assert md5_of(install_path(agent, image_uuid, "api-target")) == inventory["md5Sum"]
    reply = await stack.call("DeleteImage", {"uuid": image_uuid})
    assert reply["success"], reply


# --- replies to internal queues -----------------------------------------------------------------


async def test_replies_are_never_sent_to_internal_queues(trust: TrustStack) -> None:
    stack = trust
    a, b = agents_of(stack)
    names = stack.names
    internal = [
        names.agent(a.uuid),
        names.agent(b.uuid),
        names.agent(uuid.uuid4().hex),
        names.results,
        names.heartbeats,
        names.api,
        names.volume_events,
        names.dead_letters,
    ]
    inventory = await add_ready(stack, [a], name="replied")
    db_before, files_before = await settled_state(stack), files_state(a, b)
    service_log = Since(stack.service)
    agent_logs = [Since(agent.proc) for agent in (a, b)]
    mallory = ApiClient(stack.url(stack.mallory), names)
    await mallory.connect()
    try:
        expected = []
        for reply_to in internal:
            for api, params in (
                (
                    "QueryImage",
                    {"conditions": [{"name": "uuid", "op": "=", "value": inventory["uuid"]}]},
                ),
                ("ChangeImageState", {"uuid": uuid.uuid4().hex, "stateEvent": "disable"}),
                ("DeleteImage", {"uuid": uuid.uuid4().hex}),
            ):
                message_id = uuid.uuid4().hex
                await mallory.publish_raw(
                    json.dumps({"api": api, "params": params}).encode(),
                    message_id=message_id,
                    reply_to=reply_to,
                    correlation_id=message_id,
                )
                expected.append(
                    f"message {message_id!r} names the internal queue {reply_to!r} as reply_to:"
                    " it gets no reply"
                )
        await service_log.wait(expected)
        # Their calls still ran (the ordinary ones after them are answered), and time passed.
        reply = await mallory.call("QueryImage", {"conditions": []}, timeout=15)
        assert reply["success"], reply
        await stack.call("ChangeImageState", {"uuid": uuid.uuid4().hex, "stateEvent": "disable"})
        await heartbeats_applied(stack)
        assert await stack.db.fetchval("SELECT count(*) FROM outbox") == 0
    finally:
        await mallory.close()

    text = service_log.text()
    for telltale in (
        "malformed agent result",
        "malformed heartbeat",
        "heartbeat of backup storage",
        "result of op",
        "result for",
        "event dropped",
    ):
        assert telltale not in text, (telltale, text[-4000:])
    for log in agent_logs:
        assert "command dropped" not in log.text(), log.text()[-4000:]
    dead = await stack.queue_state(names.dead_letters)
    assert dead is not None and dead[0] == 0, dead
    assert await stack.queue_state(internal[2]) is None  # the unknown agent's: not created
    assert await db_state(stack.db) == db_before
    assert files_state(a, b) == files_before
    reply = await stack.call("DeleteImage", {"uuid": inventory["uuid"]})
    assert reply["success"], reply


# --- volume events ------------------------------------------------------------------------------


async def test_volume_events_count_only_through_the_events_exchange(trust: TrustStack) -> None:
    stack = trust
    a, b = agents_of(stack)
    names = stack.names
    db_before = await settled_state(stack)
    log = Since(stack.service)
    forged = uuid.uuid4().hex
    event = {"uuid": forged, "name": "evil", "type": "Root", "installPath": "/etc/passwd"}

    # Straight to the service's queue, through the default exchange: mallory may, an agent may
    # not (it has no write on the default exchange).
    for signed in (False, True):
        await stack.send(names.volume_events, event, user=stack.mallory, signed=signed)
    await assert_refused(
        stack.exchange_refused("", stack.agent_user(a)),
        stack.send(names.volume_events, event, user=stack.agent_user(a)),
    )
    # Through the events exchange, as users that may not publish volume events.
    connection = await aio_pika.connect(stack.url(stack.agent_user(b)))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(names.events, ensure=False)
        text = await raises_refused(
            lambda: exchange.publish(
                aio_pika.Message(json.dumps(event).encode(), user_id=stack.agent_user(b)),
                routing_key=f"volume.created.{forged}",
                timeout=10,
            )
        )
    assert (
        f"ACCESS_REFUSED - access to topic 'volume.created.{forged}' in exchange '{names.events}'"
        f" in vhost '{stack.vhost}' refused for user '{stack.agent_user(b)}'" in text
    ), text

    await log.wait(["event dropped: published to '', not to the events exchange"] * 2)
    # The volume service's own event, through NS.events, is applied: the forged ones were not.
    genuine = uuid.uuid4().hex
    await stack.publish_event(f"volume.created.{genuine}", {"uuid": genuine, "name": "real"})

    async def applied() -> bool:
        return bool(await stack.db.fetchval("SELECT count(*) FROM volume WHERE uuid = $1", genuine))

    await wait_for(applied, timeout=15)
    assert await stack.db.fetchval("SELECT count(*) FROM volume WHERE uuid = $1", forged) == 0
    after = await db_state(stack.db)
    assert [v for v in after["volume"] if v["uuid"] != genuine] == db_before["volume"]
    assert {k: v for k, v in after.items() if k != "volume"} == {
        k: v for k, v in db_before.items() if k != "volume"
    }


# --- retiring an agent --------------------------------------------------------------------------


async def test_remove_agent_cuts_the_agent_off(trust: TrustStack) -> None:
    """`setup-users.sh remove-agent UUID` (a compromised host): its connections close, it can
    neither publish nor log in again, the service marks it Disconnected, and then
    DeleteBackupStorage forgets it; the other agents carry on."""
    stack = trust
    a, b = agents_of(stack)
    c_uuid = uuid.uuid4().hex
    c_user = await stack.enrol_agent(c_uuid)
    c = await stack.start_trusted_agent("bs-c", c_uuid)
    assert (
        await stack.db.fetchval("SELECT agent_user FROM backup_storage WHERE uuid = $1", c_uuid)
        == c_user
    )
    inventory = await add_ready(stack, [c], name="on-c")
    shared = await add_ready(stack, [a, c], name="on-a-and-c")
    assert c_user in await connected_users(stack.vhost)

    out = await stack.setup_users("remove-agent", c_uuid)
    assert f"user {c_user}: deleted" in out, out

    async def no_connection() -> bool:
        return c_user not in await connected_users(stack.vhost)

    await wait_for(no_connection, timeout=15)
    await wait_disconnected(stack, c, timeout=15)
    last = await stack.db.fetchval(
        "SELECT last_heartbeat FROM backup_storage WHERE uuid = $1", c_uuid
    )
    # It cannot come back: its credentials no longer log in.
    with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(stack.url(c_user))
    await heartbeats_handled(stack, a, 2)
    await heartbeats_handled(stack, b, 1)
    assert await stack.bs_status(c_uuid, "Disconnected") is not None
    assert (
        await stack.db.fetchval("SELECT last_heartbeat FROM backup_storage WHERE uuid = $1", c_uuid)
        == last
    )

    reply = await stack.call("DeleteBackupStorage", {"uuid": c_uuid})
    assert reply["success"], reply
    assert (
        await stack.db.fetchval("SELECT count(*) FROM backup_storage WHERE uuid = $1", c_uuid) == 0
    )
    assert await query_image(stack, inventory["uuid"]) is None
    remaining = await query_image(stack, shared["uuid"])
    assert remaining is not None and remaining["status"] == "Ready"
    assert [r["backupStorageUuid"] for r in remaining["backupStorageRefs"]] == [a.uuid]
    for agent in (a, b):
        assert await stack.bs_status(agent.uuid, "Connected") is not None
    c.proc.kill()
    await assert_serving(stack, a, b)
    reply = await stack.call("DeleteImage", {"uuid": shared["uuid"]})
    assert reply["success"], reply


# --- squatting a newly enrolled neighbour's uuid --------------------------------------------------


async def test_an_agent_cannot_squat_the_uuid_of_a_newly_enrolled_neighbour(
    trust: TrustStack,
) -> None:
    """C is enrolled (its broker user exists) but not started yet: agent B (a compromised host)
    tries to register C's backup storage first. The broker refuses B C's heartbeat key, the
    service drops C's heartbeat under B's key, no row for C appears, and once C starts its own
    heartbeat registers it, bound to C's user."""
    stack = trust
    _, b = agents_of(stack)
    names = stack.names
    user_b = stack.agent_user(b)
    c_uuid = uuid.uuid4().hex
    c_user = await stack.enrol_agent(c_uuid)
    log = Since(stack.service)
    squat = {
        "uuid": c_uuid,
        "name": "squatted",
        "url": "/squatted",
        "hostname": "squatter.example",
        "totalCapacity": 2**50,
        "availableCapacity": 2**50,
        "heartbeatInterval": 3600,
    }
    for signed in (True, False):
        await assert_refused(
            stack.topic_refused(names.agent_messages, names.heartbeat_key(c_uuid), user_b),
            stack.send_heartbeat(c_uuid, squat, user=user_b, signed=signed),
        )
    await assert_refused(
        stack.exchange_refused("", user_b),
        stack.send(names.heartbeats, squat, user=user_b),
    )
    await stack.send_heartbeat(b.uuid, squat, user=user_b)
    await log.wait(
        [
            stack.dropped_route(
                f"heartbeat of backup storage {c_uuid}",
                names.agent_messages,
                names.heartbeat_key(b.uuid),
                names.heartbeat_key(c_uuid),
            )
        ]
    )
    await heartbeats_applied(stack)
    assert (
        await stack.db.fetchval("SELECT count(*) FROM backup_storage WHERE uuid = $1", c_uuid) == 0
    )
    assert await stack.queue_state(names.agent(c_uuid)) is None

    c = await stack.start_trusted_agent("bs-squatted", c_uuid)
    try:
        await log.wait([f"backup storage {c_uuid} registered by broker user {c_user!r}"])
        row = await stack.db.fetchrow(
            "SELECT agent_user, hostname, total_capacity FROM backup_storage WHERE uuid = $1",
            c_uuid,
        )
        assert row is not None
        assert dict(row) == {
            "agent_user": c_user,
            "hostname": "bs-squatted.trust.test",
            "total_capacity": CAPACITY,
        }, dict(row)
        inventory = await stack.bs_status(c_uuid, "Connected")
        assert inventory is not None and inventory["hostname"] == "bs-squatted.trust.test"
        text = log.text()
        assert f"from broker user {c_user!r} dropped" not in text, text[-4000:]
        assert "squatter.example" not in text
        await assert_no_trace_of(stack.db, "squatter.example", "/squatted")
        # C serves: an image stored on it, then deleted.
        await assert_serving(stack, c)
    finally:
        c.proc.kill()
        reply = await stack.call("DeleteBackupStorage", {"uuid": c_uuid})
        assert reply["success"], reply
