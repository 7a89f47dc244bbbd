"""The private TLS node of tls_broker.py behaves like the production broker does for certificate
logins, with nothing but aio-pika: a certificate from the trusted CA logs its common name in
with EXTERNAL (no password), RabbitMQ holds that user to the `user_id` of what it publishes,
and a client whose certificate, or whose trust in the server, is wrong never gets in.

If these fail, the tests that rely on the fixture cannot be believed either way.
"""

from __future__ import annotations

import asyncio
import time

import aio_pika
import pytest
from aio_pika.exceptions import AMQPConnectionError, ChannelPreconditionFailed

from tests.integration.tls_broker import TlsBroker, tls_broker_fixture  # noqa: F401 (fixture)

USER = "cert-user"  # a client certificate's common name, and the broker user it logs in as
CONNECT_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def cert_user(tls_broker: TlsBroker) -> str:
    """A user with no password at all, so that only its certificate can log it in."""
    tls_broker.add_user(USER)
    tls_broker.set_permissions(USER, ".*", ".*", ".*")
    return USER


async def wait_for_log(broker: TlsBroker, text: str, before: int, timeout: float = 5.0) -> None:
    """Wait until the node's log holds `text` more than `before` times (it writes its log
    asynchronously, so a refused connection's reason lands a moment after the refusal)."""
    deadline = time.monotonic() + timeout
    while broker.log_text().count(text) <= before:
        assert time.monotonic() < deadline, f"the broker never logged {text!r}"
        await asyncio.sleep(0.05)


async def test_certificate_logs_in_with_external_and_round_trips(
    tls_broker: TlsBroker,
    cert_user: str,
) -> None:
    # The URL's query parameters (auth=external, cafile, certfile, keyfile) as aiormq reads them.
    url = tls_broker.amqps_url(client=cert_user)
    assert url.startswith(f"amqps://localhost:{tls_broker.amqps_port}/?auth=external&")
    async with await aio_pika.connect(url, timeout=CONNECT_TIMEOUT) as connection:
        connections = await asyncio.to_thread(
            tls_broker.rabbitmqctl,
            "list_connections",
            "--no-table-headers",
            "user",
            "auth_mechanism",
            "ssl",
        )
        assert connections.split() == [cert_user, "EXTERNAL", "true"]

        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"over tls"), queue.name)
        message = await queue.get(timeout=5)
        assert message is not None
        await message.ack()
        assert message.body == b"over tls"


async def test_user_id_must_name_the_certificate_user(
    tls_broker: TlsBroker,
    cert_user: str,
) -> None:
    # This time the context is built by the fixture and handed over; the URL asks for EXTERNAL.
    context = tls_broker.ssl_context(tls_broker.client_cert(cert_user))
    async with await aio_pika.connect(
        tls_broker.amqps_url(), ssl_context=context, timeout=CONNECT_TIMEOUT
    ) as connection:
        channel = await connection.channel()  # with publisher confirms: publish awaits the ack
        queue = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(
            aio_pika.Message(b"signed", user_id=cert_user), queue.name
        )
        message = await queue.get(timeout=5)
        assert message is not None
        await message.ack()
        assert (message.body, message.user_id) == (b"signed", cert_user)

        with pytest.raises(ChannelPreconditionFailed, match="user_id property set to 'mallory'"):
            await channel.default_exchange.publish(
                aio_pika.Message(b"forged", user_id="mallory"), queue.name
            )
        assert channel.is_closed


@pytest.mark.parametrize(
    ("certificate", "reason"),
    [("untrusted", "Unknown CA"), ("none", "Certificate required")],
)
async def test_client_without_a_trusted_certificate_is_refused(
    tls_broker: TlsBroker,
    cert_user: str,
    certificate: str,
    reason: str,
) -> None:
    # The same common name as the user that gets in, from a CA the node does not trust (or no
    # certificate at all). Under TLS 1.3 the client only sees the connection reset; the
    # broker's log says why it refused.
    client = tls_broker.untrusted_client_cert(cert_user) if certificate == "untrusted" else None
    before = tls_broker.log_text().count(reason)
    with pytest.raises(AMQPConnectionError):
        await aio_pika.connect(
            tls_broker.amqps_url(),
            ssl_context=tls_broker.ssl_context(client),
            timeout=CONNECT_TIMEOUT,
        )
    await wait_for_log(tls_broker, reason, before)


async def test_client_that_does_not_trust_the_server_ca_is_refused(
    tls_broker: TlsBroker,
    cert_user: str,
) -> None:
    # A good client certificate, but no cafile: the client checks the server's certificate
    # against the system's CAs, which never signed it, and gives up before any AMQP is spoken.
    url = tls_broker.amqps_url(client=cert_user, trust_ca=False)
    assert "cafile" not in url
    with pytest.raises(AMQPConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        await aio_pika.connect(url, timeout=CONNECT_TIMEOUT)
