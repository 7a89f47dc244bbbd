"""Encryption on the wire (contract section 8): the service, two agents and a client reach a
broker of their own over amqps://, verify its certificate against a CA file, and log in with
client certificates only (RabbitMQ's EXTERNAL mechanism: no password anywhere). A client
without a valid certificate, or that does not trust the broker, never gets in.

The broker is a private RabbitMQ node with a TLS listener on other ports and its own data
directory (tests/integration/tls_broker.py); the CA and certificates are made with openssl in
the test.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import asyncpg
import pytest
import pytest_asyncio

from image_service.protocol.broker import Broker, BrokerConfigError
from image_service.protocol.client import ApiClient
from image_service.protocol.names import Names
from image_service.protocol.transport import Bus, WrongBrokerUser
from tests.conftest import (
    AMQP_URL,
    Agent,
    FileServer,
    Stack,
    _drop_database,
    clone_database,
    wait_for,
)
from tests.helpers import md5_of
from tests.integration.tls_broker import TlsBroker, tls_broker_fixture  # noqa: F401 (fixture)

SERVICE = "image-service"
AGENTS = ("backup-agent-a", "backup-agent-b")
CLIENT = "image-cli"


def cert_args(broker: TlsBroker, user: str) -> list[str]:
    cert, key = broker.client_cert(user)
    return [
        "--amqp-url",
        f"amqps://localhost:{broker.amqps_port}/",
        "--amqp-ca-file",
        str(broker.ca_cert),
        "--amqp-cert-file",
        str(cert),
        "--amqp-key-file",
        str(key),
    ]


def client_broker(broker: TlsBroker, user: str) -> Broker:
    cert, key = broker.client_cert(user)
    return Broker.configure(
        f"amqps://localhost:{broker.amqps_port}/",
        ca_file=broker.ca_cert,
        cert_file=cert,
        key_file=key,
    )


@pytest_asyncio.fixture(loop_scope="session")
async def tls_stack(
    tls_broker: TlsBroker, tmp_path: Path, template_database: str
) -> AsyncIterator[Stack]:
    namespace = f"t{uuid.uuid4().hex[:12]}"
    for user in (SERVICE, *AGENTS, CLIENT):
        tls_broker.add_user(user)  # no password: a certificate is the only way in
        tls_broker.set_permissions(user, ".*", ".*", ".*")
    dbname = f"images_{namespace}"
    database_url = await clone_database(template_database, dbname)
    http = FileServer(tmp_path / "www")
    http.directory.mkdir()
    await http.start()
    client = ApiClient(client_broker(tls_broker, CLIENT), Names(namespace))
    stack: Stack | None = None
    try:
        stack = Stack(namespace, database_url, tmp_path, http, client, None)  # type: ignore[arg-type]
        stack.start_service(
            *cert_args(tls_broker, SERVICE), "--agent-user-pattern", "backup-agent-.*"
        )
        stack.db = await asyncpg.connect(database_url)

        async def client_connects() -> bool:
            try:
                await client.connect()
            except (OSError, aio_pika.exceptions.AMQPError):
                return False
            return True

        await wait_for(client_connects, timeout=30)

        async def service_started() -> bool:
            # It consumes its API queue last: a request sent before would be unroutable.
            return "image service started" in stack.services[0].log()

        await wait_for(service_started, timeout=30)
        yield stack
    finally:
        if stack is not None:
            await stack.stop_processes()
        await client.close()
        await http.stop()
        await _drop_database(dbname)
        for user in (SERVICE, *AGENTS, CLIENT):
            with contextlib.suppress(Exception):
                tls_broker.delete_user(user)


async def start_agent(stack: Stack, broker: TlsBroker, user: str) -> Agent:
    return await stack.start_agent(
        user, *cert_args(broker, user), "--service-user", SERVICE, wait=False
    )


async def test_service_and_agents_work_over_tls_with_certificates_only(
    tls_stack: Stack, tls_broker: TlsBroker
) -> None:
    stack = tls_stack
    agents = [await start_agent(stack, tls_broker, user) for user in AGENTS]
    for agent in agents:
        await stack.wait_connected(agent, timeout=30)
    # Every connection is TLS and logged in by certificate, as the user its certificate names.
    listed = tls_broker.rabbitmqctl(
        "list_connections", "--no-table-headers", "user", "auth_mechanism", "ssl"
    )
    rows = {tuple(line.split()) for line in listed.splitlines() if line.strip()}
    assert {row[0] for row in rows} == {SERVICE, *AGENTS, CLIENT}
    assert all(row[1:] == ("EXTERNAL", "true") for row in rows), rows

    url, md5 = stack.http.add("tls.raw", b"image over tls" * 1000)
    reply = await stack.add_image(url, agents, name="over-tls")
    assert reply["success"], reply
    inventory = reply["inventory"]
    assert inventory["status"] == "Ready" and inventory["md5Sum"] == md5
    refs = {ref["backupStorageUuid"]: ref for ref in inventory["backupStorageRefs"]}
    assert set(refs) == {a.uuid for a in agents}
    for agent in agents:
        assert md5_of(Path(refs[agent.uuid]["installPath"])) == md5
    owners = {
        row["uuid"]: row["agent_user"]
        for row in await stack.db.fetch("SELECT uuid, agent_user FROM backup_storage")
    }
    assert owners == {a.uuid: a.name for a in agents}, "each bound to its certificate's user"


@pytest.mark.parametrize("case", ["untrusted certificate", "no certificate", "broker not trusted"])
async def test_a_client_without_a_valid_certificate_is_refused(
    tls_broker: TlsBroker, case: str
) -> None:
    # The intruder's user exists, may do anything, and has a password: only the certificate
    # (or the trust in the broker) can be why it is refused.
    tls_broker.add_user("intruder", "intruder-password")
    tls_broker.set_permissions("intruder", ".*", ".*", ".*")
    try:
        base = f"amqps://localhost:{tls_broker.amqps_port}/"
        if case == "untrusted certificate":
            cert, key = tls_broker.untrusted_client_cert("intruder")
            broker = Broker.configure(
                base, ca_file=tls_broker.ca_cert, cert_file=cert, key_file=key
            )
        elif case == "no certificate":
            broker = Broker.configure(
                f"amqps://intruder:intruder-password@localhost:{tls_broker.amqps_port}/",
                ca_file=tls_broker.ca_cert,
            )
        else:  # verifies the broker against the system's CAs, which do not know it
            cert, key = tls_broker.client_cert("intruder")
            broker = Broker.configure(base, cert_file=cert, key_file=key)
        client = ApiClient(broker, Names("refused"))
        with pytest.raises((OSError, aio_pika.exceptions.AMQPError)):
            await client.connect()
        await client.close()
    finally:
        tls_broker.delete_user("intruder")


def test_settings_that_cannot_work_end_the_process_with_one_line(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    """Certificate files with a plain amqp:// url, a certificate without its key, a CA file
    that does not exist: each stops the agent at once (exit 2), naming the problem."""
    cert, key = tls_broker.client_cert("x")
    cases = [
        (["--amqp-url", "amqp://127.0.0.1/", "--amqp-ca-file", str(tls_broker.ca_cert)], "amqps"),
        (["--amqp-url", "amqps://localhost/", "--amqp-cert-file", str(cert)], "its key"),
        (["--amqp-url", "amqps://localhost/", "--amqp-ca-file", str(tmp_path / "no")], "TLS files"),
    ]
    for args, words in cases:
        done = subprocess.run(
            [sys.executable, "-m", "backup_agent.main", "--root", str(tmp_path / "r"),
             "--name", "x", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )  # fmt: skip
        assert done.returncode == 2, (args, done.stderr)
        assert words in done.stderr and "Traceback" not in done.stderr, done.stderr
    with pytest.raises(BrokerConfigError):
        Broker.configure("amqps://localhost/", key_file=key)


async def test_a_process_the_broker_knows_as_another_user_does_not_start() -> None:
    """Every message is signed with the process's broker user; when the broker knows the
    connection as someone else (a certificate mapped by distinguished name, not common name),
    every publish would be refused. The service finds out at connect, not at its first reply."""
    bus = Bus(Broker(url=AMQP_URL, user="CN=image-service,O=example"), Names("probe"))
    try:
        with pytest.raises(WrongBrokerUser, match="ssl_cert_login_from = common_name"):
            await bus.connect()
    finally:
        await bus.close()
    good = Bus(Broker.plain(AMQP_URL), Names("probe"))
    try:
        await good.connect()
    finally:
        await good.close()
